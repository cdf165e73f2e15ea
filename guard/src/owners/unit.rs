//! `unit:NAME.service` owners: the cgroup systemd made for the unit.
//!
//! systemd puts every unit in a cgroup named after it: services usually at
//! `/system.slice/NAME.service`, but slices nest, so when that path is absent
//! the hierarchy is searched for a directory of that name. Without systemd as
//! the init system there are no unit cgroups: that is a state, not an error.

use std::{collections::VecDeque, fs, path::Path};

use super::cgroup::CgroupRef;

/// How deep below the root a unit's cgroup may sit (slices nest a few levels).
const MAX_DEPTH: usize = 6;

/// Why a unit has no cgroup.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnitMissing {
    #[error("no cgroup named {0} (the unit is not running)")]
    NotRunning(String),
    #[error("no cgroup named {0}, and systemd is not the init system here")]
    NoSystemd(String),
}

/// Finds the cgroup of unit `name` in the hierarchy mounted at `root`.
pub fn resolve(root: &Path, name: &str) -> Result<CgroupRef, UnitMissing> {
    let direct = format!("/system.slice/{name}");
    if let Some(found) = CgroupRef::resolve(root, &direct) {
        return Ok(found);
    }
    if let Some(found) = search(root, name).and_then(|rel| CgroupRef::resolve(root, &rel)) {
        return Ok(found);
    }
    if systemd_booted() {
        Err(UnitMissing::NotRunning(name.to_owned()))
    } else {
        Err(UnitMissing::NoSystemd(name.to_owned()))
    }
}

/// Breadth first, so the shallowest match wins.
fn search(root: &Path, name: &str) -> Option<String> {
    let mut queue = VecDeque::from([(String::new(), 0usize)]);
    while let Some((rel, depth)) = queue.pop_front() {
        let Ok(entries) = fs::read_dir(root.join(rel.trim_start_matches('/'))) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let child = format!("{rel}/{}", entry.file_name().to_string_lossy());
            if entry.file_name() == name {
                return Some(child);
            }
            if depth + 1 < MAX_DEPTH {
                queue.push_back((child, depth + 1));
            }
        }
    }
    None
}

/// sd_booted(3): systemd creates this directory when it is PID 1.
fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::cgroup::unified_root;

    #[test]
    fn finds_a_nested_unit_cgroup_by_name() {
        let root = unified_root().unwrap();
        let top = format!("pg-unit-test-{}", std::process::id());
        let nested = root.join(&top).join("inner.slice").join("pgtest.service");
        fs::create_dir_all(&nested).unwrap();
        let found = resolve(&root, "pgtest.service");
        fs::remove_dir(&nested).unwrap();
        fs::remove_dir(nested.parent().unwrap()).unwrap();
        fs::remove_dir(root.join(&top)).unwrap();
        let found = found.unwrap();
        assert_eq!(found.path, format!("/{top}/inner.slice/pgtest.service"));
        assert_ne!(found.id, 0);
    }

    #[test]
    fn an_absent_unit_is_a_state() {
        let root = unified_root().unwrap();
        let err = resolve(&root, "pg-surely-absent.service").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no cgroup named pg-surely-absent.service"),
            "{err}"
        );
    }
}
