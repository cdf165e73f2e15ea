//! cgroup v2: where the unified hierarchy is mounted, and cgroup ids.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); portguard needs cgroup v2"
    )]
    NoUnifiedHierarchy,
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not inside the cgroup v2 hierarchy mounted at {root}")]
    OutsideHierarchy { path: PathBuf, root: PathBuf },
}

/// Mount point of the cgroup v2 hierarchy: `/sys/fs/cgroup` on a pure v2 host,
/// usually `/sys/fs/cgroup/unified` on a hybrid one.
pub fn unified_root() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.into(),
        source,
    })?;
    unified_root_from_mountinfo(&text).ok_or(CgroupError::NoUnifiedHierarchy)
}

fn unified_root_from_mountinfo(mountinfo: &str) -> Option<PathBuf> {
    // Fields: id parent maj:min root mountpoint options [optional...] - fstype source superopts
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect();
    // Prefer the canonical location when several are mounted (containers bind-mount it).
    found.sort_by_key(|p| (p != Path::new("/sys/fs/cgroup"), p.as_os_str().len()));
    found.into_iter().next()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 id of a cgroup directory: the inode number of the directory,
/// which is what `bpf_get_current_cgroup_id()` returns for processes in it.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            path: dir.into(),
            source,
        })
}

/// The cgroup v2 path (relative to the hierarchy root, starting with `/`) of a process.
pub fn process_cgroup(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Checks that `dir` lies inside the hierarchy at `root` and exists.
pub fn check_inside(root: &Path, dir: &Path) -> Result<(), CgroupError> {
    let canon = |p: &Path| {
        fs::canonicalize(p).map_err(|source| CgroupError::Io {
            path: p.into(),
            source,
        })
    };
    let (root_c, dir_c) = (canon(root)?, canon(dir)?);
    if dir_c.starts_with(&root_c) {
        Ok(())
    } else {
        Err(CgroupError::OutsideHierarchy {
            path: dir.into(),
            root: root.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
";
    const PURE: &str = "\
30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate
99 30 0:26 / /run/some\\040place rw - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_hybrid_unified_mount() {
        assert_eq!(
            unified_root_from_mountinfo(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn prefers_canonical_mount_on_pure_v2() {
        assert_eq!(
            unified_root_from_mountinfo(PURE),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            unified_root_from_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/run/some\\040place"), "/run/some place");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn own_cgroup_is_readable() {
        let path =
            process_cgroup(std::process::id()).expect("own /proc/self/cgroup has a 0:: line");
        assert!(path.starts_with('/'), "{path}");
    }
}
