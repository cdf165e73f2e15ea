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
    fn root_is_root() {
        let root = cgroup::unified_root().unwrap();
        let r = CgroupRef::resolve(&root, "/").unwrap();
        assert!(r.is_root());
        assert_eq!(CgroupRef::resolve(&root, "").unwrap(), r);
    }
}
