//! `cgroup:/path` owners: a cgroup v2 directory, identified by its cgroup id
//! (the directory's inode, what `bpf_get_current_cgroup_id()` returns).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::sys::cgroup;

/// A cgroup v2 directory: its path relative to the hierarchy root, and its id.
/// The id changes when the directory is removed and made again (a unit restart).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct CgroupRef {
    /// Relative to the hierarchy root, starting with `/`.
    pub path: String,
    pub id: u64,
}

impl CgroupRef {
    /// Resolves `relative` (as policies and `/proc/PID/cgroup` name it) under `root`.
    pub fn resolve(root: &Path, relative: &str) -> Option<Self> {
        let dir = absolute(root, relative);
        let id = cgroup::cgroup_id(&dir).ok()?;
        Some(Self {
            path: normalise(relative),
            id,
        })
    }

    /// The cgroup process `pid` lives in now.
    pub fn of_process(root: &Path, pid: u32) -> Option<Self> {
        Self::resolve(root, &cgroup::process_cgroup(pid)?)
    }

    pub fn is_root(&self) -> bool {
        self.path == "/"
    }
}

/// Where a cgroup will be made: its parent (which exists, by id) and its
/// name. A container's cgroup is made anew at every start, with a new id; the
/// kernel programs recognise it by its slot until the agent learns that id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct CgroupSlot {
    pub parent_id: u64,
    pub name: String,
}

impl CgroupSlot {
    /// The slot of `relative` under `root`, when its parent exists now.
    pub fn resolve(root: &Path, relative: &str) -> Option<Self> {
        let path = normalise(relative);
        let (parent, name) = path.rsplit_once('/')?;
        if name.is_empty() {
            return None;
        }
        let parent_id = cgroup::cgroup_id(&absolute(root, parent)).ok()?;
        Some(Self {
            parent_id,
            name: name.to_owned(),
        })
    }
}

/// The directory of a relative cgroup path under `root`.
pub fn absolute(root: &Path, relative: &str) -> PathBuf {
    root.join(relative.trim_start_matches('/'))
}

fn normalise(relative: &str) -> String {
    format!("/{}", relative.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_resolves_to_the_directory_inode() {
        let root = cgroup::unified_root().unwrap();
        let me = CgroupRef::of_process(&root, std::process::id()).unwrap();
        let dir = absolute(&root, &me.path);
        assert_eq!(me.id, cgroup::cgroup_id(&dir).unwrap());
        assert!(me.path.starts_with('/'));
    }

    #[test]
    fn a_missing_cgroup_is_none() {
        let root = cgroup::unified_root().unwrap();
        assert_eq!(CgroupRef::resolve(&root, "/no/such/portguard/cgroup"), None);
    }

    #[test]
    fn a_slot_is_the_parents_id_and_the_name_whether_or_not_the_cgroup_exists() {
        let root = cgroup::unified_root().unwrap();
        let me = CgroupRef::of_process(&root, std::process::id()).unwrap();
        let (parent, _) = me.path.rsplit_once('/').unwrap();
        let parent_id = cgroup::cgroup_id(&absolute(&root, parent)).unwrap();
        let slot = CgroupSlot::resolve(&root, &format!("{parent}/not-made-yet")).unwrap();
        assert_eq!(
            slot,
            CgroupSlot {
                parent_id,
                name: "not-made-yet".into()
            }
        );
        assert_eq!(CgroupSlot::resolve(&root, "/no/such/parent/child"), None);
        assert_eq!(CgroupSlot::resolve(&root, "/"), None);
    }

    #[test]
    fn root_is_root() {
        let root = cgroup::unified_root().unwrap();
        let r = CgroupRef::resolve(&root, "/").unwrap();
        assert!(r.is_root());
        assert_eq!(CgroupRef::resolve(&root, "").unwrap(), r);
    }
}
