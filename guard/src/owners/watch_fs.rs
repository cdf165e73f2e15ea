//! Change notification for the owners that live in the filesystem: a unit's
//! restart makes its cgroup again (a new id), a package upgrade replaces an
//! executable (a new inode). inotify on the parent directories says when to
//! look again; nothing polls.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use super::{Found, ResolvedOwners, cgroup::absolute};
use crate::policy::{OwnerSpec, Policy};

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// inotify watches on the directories the policy's filesystem owners live in.
pub struct FsChanges {
    fd: Option<AsyncFd<OwnedFd>>,
    watches: BTreeMap<PathBuf, i32>,
}

impl FsChanges {
    pub fn new(policy: &Policy, model: &ResolvedOwners) -> Self {
        let mut out = Self::empty().unwrap_or_else(|error| {
            warn!(
                %error,
                "owners: inotify unavailable: unit, exe and cgroup owners are read only when Docker changes"
            );
            Self {
                fd: None,
                watches: BTreeMap::new(),
            }
        });
        let _ = out.rearm(policy, model);
        out
    }

    /// An inotify instance watching nothing yet.
    fn empty() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned right below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd nobody else owns; the OwnedFd keeps it open
        // and the same for as long as the AsyncFd lives.
        let fd = unsafe {
            AsyncFd::register_with_interest(
                OwnedFd::from_raw_fd(raw),
                tokio::io::Interest::READABLE,
            )
        }?;
        Ok(Self {
            fd: Some(fd),
            watches: BTreeMap::new(),
        })
    }

    /// Watches one directory (for [`appears`]).
    fn watching(dir: &Path) -> io::Result<Self> {
        let mut out = Self::empty()?;
        let raw = out
            .fd
            .as_ref()
            .map(|fd| fd.get_ref().as_raw_fd())
            .ok_or_else(|| io::Error::other("no inotify"))?;
        let c = CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(raw, c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        out.watches.insert(dir.to_owned(), wd);
        Ok(out)
    }

    /// Watches exactly the directories `policy` and `model` need now. True
    /// when a directory is watched that was not before (what it holds may have
    /// changed unseen: resolve again).
    pub fn rearm(&mut self, policy: &Policy, model: &ResolvedOwners) -> bool {
        let Some(fd) = &self.fd else { return false };
        let mut added = false;
        let wanted = directories(policy, model);
        let raw = fd.get_ref().as_raw_fd();
        self.watches.retain(|dir, wd| {
            let keep = wanted.contains(dir);
            if !keep {
                // SAFETY: removing our own watch descriptor.
                unsafe { libc::inotify_rm_watch(raw, *wd) };
            }
            keep
        });
        for dir in wanted {
            if self.watches.contains_key(&dir) {
                continue;
            }
            let Ok(c) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: valid fd and NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(raw, c.as_ptr(), MASK) };
            if wd < 0 {
                debug!(dir = %dir.display(), error = %io::Error::last_os_error(), "owners: cannot watch");
            } else {
                self.watches.insert(dir, wd);
                added = true;
            }
        }
        added
    }

    /// Waits until something changed in a watched directory (forever without
    /// inotify); returns the names of the entries that appeared.
    pub async fn next(&mut self) -> Vec<String> {
        let Some(fd) = &self.fd else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return std::future::pending().await;
            };
            let mut buf = [0u8; 4096];
            let mut got = false;
            let mut created = Vec::new();
            loop {
                // SAFETY: reading into our own buffer from our own fd.
                let n = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                let Ok(n) = usize::try_from(n) else { break };
                if n == 0 {
                    break;
                }
                got = true;
                created.extend(created_names(&buf[..n]));
            }
            ready.clear_ready();
            if got {
                return created;
            }
        }
    }
}

/// Waits until `path` exists: an inotify watch on its parent says when an
/// entry of its name is created or moved in. Returns at once when it exists,
/// and after `at_most` in any case (a path that appears in a way inotify does
/// not see, a new mount, is still found). Without inotify: after `at_most`.
pub async fn appears(path: &Path, at_most: std::time::Duration) {
    let wait = async {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return std::future::pending().await;
        };
        let Ok(mut changes) = FsChanges::watching(dir) else {
            return std::future::pending().await;
        };
        // Created between the first look and the watch: seen here.
        while !path.exists() {
            let created = changes.next().await;
            if created.iter().any(|c| c.as_str() == name.to_string_lossy()) {
                return;
            }
        }
    };
    if !path.exists() {
        let _ = tokio::time::timeout(at_most, wait).await;
    }
}

/// `struct inotify_event`'s fixed part: wd, mask, cookie, len.
const EVENT_HEADER: usize = 16;

/// The names of entries created or moved in, from a buffer of inotify events.
fn created_names(buf: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + EVENT_HEADER <= buf.len() {
        let word =
            |i: usize| u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().expect("4 bytes"));
        let (mask, len) = (word(4), word(12) as usize);
        let Some(name) = buf.get(at + EVENT_HEADER..at + EVENT_HEADER + len) else {
            break;
        };
        if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            out.push(String::from_utf8_lossy(&name[..end]).into_owned());
        }
        at += EVENT_HEADER + len;
    }
    out
}

/// The directories whose entries decide what the filesystem owners resolve to.
fn directories(policy: &Policy, model: &ResolvedOwners) -> std::collections::BTreeSet<PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let root = model.cgroup_root.as_deref();
    for entry in &policy.ports {
        for spec in &entry.owner {
            match spec {
                OwnerSpec::Exe(path) => out.extend(parent_that_exists(path)),
                OwnerSpec::Cgroup(path) => {
                    if let Some(root) = root {
                        out.extend(parent_that_exists(&absolute(root, &path.to_string_lossy())));
                    }
                }
                OwnerSpec::Unit(name) => {
                    if let Some(root) = root {
                        out.extend(parent_that_exists(&absolute(
                            root,
                            &format!("/system.slice/{name}"),
                        )));
                    }
                }
                OwnerSpec::Docker | OwnerSpec::DockerName(_) | OwnerSpec::DockerLabel { .. } => {}
            }
        }
    }
    // Containers that bind for themselves (`docker:NAME`, `docker-label:`, e.g.
    // with `--network host`): where their cgroup will appear, or is (a restart
    // makes it again).
    if let Some(root) = root {
        for owner in model.ports.iter().flat_map(|p| &p.owners) {
            let (
                OwnerSpec::DockerName(_) | OwnerSpec::DockerLabel { .. },
                Found::Docker { containers, .. },
            ) = (&owner.spec, &owner.found)
            else {
                continue;
            };
            for c in containers {
                let paths = c.cgroup.iter().map(|g| g.path.clone());
                for p in paths.chain(c.cgroup_candidates.iter().cloned()) {
                    out.extend(parent_that_exists(&absolute(root, &p)));
                }
            }
        }
    }
    // Where a unit was found (slices nest), watch there too.
    if let Some(root) = root {
        for owner in model.ports.iter().flat_map(|p| &p.owners) {
            if let (OwnerSpec::Unit(_), Found::Cgroup(c)) = (&owner.spec, &owner.found) {
                out.extend(parent_that_exists(&absolute(root, &c.path)));
            }
        }
    }
    out
}

/// The nearest existing ancestor of `path` (exclusive): where it would appear.
fn parent_that_exists(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .skip(1)
        .find(|p| p.is_dir())
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_entries_are_read_from_inotify_events() {
        let mut buf = Vec::new();
        for (mask, name) in [
            (libc::IN_CREATE, "abc"),
            (libc::IN_DELETE, "gone"),
            (libc::IN_MOVED_TO, "moved-in"),
        ] {
            let padded = (name.len() + 1).next_multiple_of(4);
            buf.extend_from_slice(&1i32.to_ne_bytes());
            buf.extend_from_slice(&mask.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&(padded as u32).to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(padded, 0);
            buf.extend_from_slice(&n);
        }
        assert_eq!(created_names(&buf), ["abc", "moved-in"]);
        assert!(
            created_names(&buf[..10]).is_empty(),
            "a torn header is no event"
        );
    }

    #[test]
    fn nearest_existing_parent() {
        assert_eq!(
            parent_that_exists(Path::new("/usr/bin/definitely-not-here/x")),
            Some(PathBuf::from("/usr/bin"))
        );
        assert_eq!(
            parent_that_exists(Path::new("/usr")),
            Some(PathBuf::from("/"))
        );
    }
}
