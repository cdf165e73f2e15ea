//! cgroup v2 directories made for one test, emptied and removed on drop.

use std::{
    fs,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use crate::unique_name;

/// Where cgroup v2 is mounted here (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn unified_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut roots: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    roots.sort_by_key(|p| p != Path::new("/sys/fs/cgroup"));
    roots
        .into_iter()
        .next()
        .expect("cgroup v2 must be mounted for these tests")
}

/// A cgroup directory under the v2 root. Dropping it kills what is left inside and removes it.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(prefix: &str) -> Self {
        let path = unified_root().join(unique_name(prefix));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// A child cgroup inside this one (removed with its parent).
    pub fn child(&self, name: &str) -> Self {
        let path = self.path.join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the hierarchy root, with a leading `/`, as policies name it.
    pub fn relative(&self) -> String {
        format!(
            "/{}",
            self.path
                .strip_prefix(unified_root())
                .expect("inside the root")
                .display()
        )
    }

    /// The cgroup id the kernel programs see (the directory's inode).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path).expect("stat cgroup").ino()
    }

    /// Makes `cmd` start inside this cgroup: the child moves itself before exec,
    /// so not one instruction of the program runs elsewhere.
    pub fn enter_on_spawn<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let procs = self.path.join("cgroup.procs");
        let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: between fork and exec only async-signal-safe calls (open, write, close).
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" means the writing process itself.
                let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if rc != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // cgroup.kill (5.14+) kills the whole subtree at once.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if remove_tree(&self.path).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

fn remove_tree(path: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(path)
}

/// Spawns `cmd` inside `cgroup` (convenience for `enter_on_spawn` + spawn).
pub fn spawn_in(cgroup: &Cgroup, cmd: &mut Command) -> std::process::Child {
    cgroup
        .enter_on_spawn(cmd)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?} in {}: {e}", cgroup.path().display()))
}
