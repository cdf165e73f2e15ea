//! `exe:/path` owners: an executable is the file (device + inode), never its name.
//!
//! A process can rename itself (`comm`, `argv[0]`) at will; it cannot change
//! which file the kernel mapped as its executable. A copy of a binary is another
//! file and so another identity; a hard link is the same file and the same identity.

use std::{fs, io, os::unix::fs::MetadataExt as _, path::Path};

use serde::Serialize;

/// The identity of an executable file: `st_dev` and `st_ino` of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ExeId {
    /// `st_dev` as user space sees it (glibc encoding).
    pub dev: u64,
    pub ino: u64,
}

impl ExeId {
    /// The identity of the file at `path` (symlinks followed, as `execve` does).
    pub fn of_path(path: &Path) -> io::Result<Self> {
        fs::metadata(path).map(|m| Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The identity of what process `pid` is running. `/proc/PID/exe` resolves to
    /// the mapped file itself, so this holds even when the file was since deleted
    /// or replaced on disk.
    pub fn of_process(pid: u32) -> io::Result<Self> {
        Self::of_path(Path::new(&format!("/proc/{pid}/exe")))
    }

    pub fn major(&self) -> u32 {
        libc::major(self.dev)
    }

    pub fn minor(&self) -> u32 {
        libc::minor(self.dev)
    }

    /// The device number as the kernel stores it in `super_block.s_dev`
    /// (`MKDEV`: major << 20 | minor), for comparisons in BPF programs.
    pub fn kernel_dev(&self) -> u32 {
        (self.major() << 20) | self.minor()
    }
}

impl std::fmt::Display for ExeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dev {}:{} ino {}", self.major(), self.minor(), self.ino)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pg-exe-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_copy_is_another_identity_a_hard_link_is_not() {
        let dir = temp_dir("copy");
        let original = dir.join("original");
        fs::write(&original, b"#!/bin/sh\n").unwrap();
        let copy = dir.join("copy");
        fs::copy(&original, &copy).unwrap();
        let link = dir.join("link");
        fs::hard_link(&original, &link).unwrap();
        let id = ExeId::of_path(&original).unwrap();
        assert_ne!(id, ExeId::of_path(&copy).unwrap(), "a copy is a new file");
        assert_eq!(
            id,
            ExeId::of_path(&link).unwrap(),
            "a hard link is the same file"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A shell that renames itself (only a process itself may set its comm) and
    /// then waits on stdin; `read` is a builtin, so the shell stays this process.
    pub(crate) fn spawn_renamed(comm: &str, extra_args: &[&str]) -> std::process::Child {
        let script = format!("printf %s {comm} > /proc/self/comm; read x");
        let mut child = Command::new("/bin/sh")
            .args(["-c", &script, "sh"])
            .args(extra_args)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let path = format!("/proc/{}/comm", child.id());
        for _ in 0..500 {
            if fs::read_to_string(&path).unwrap().trim_end() == comm {
                return child;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        panic!("{path} never became {comm}");
    }

    #[test]
    fn renaming_comm_changes_nothing() {
        let mut child = spawn_renamed("nginx", &[]);
        let renamed = ExeId::of_process(child.id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(renamed, ExeId::of_path(Path::new("/bin/sh")).unwrap());
        assert_ne!(
            renamed,
            ExeId::of_path(Path::new("/bin/busybox")).unwrap(),
            "different files differ"
        );
    }

    #[test]
    fn a_copy_running_is_not_the_original() {
        let sleep = which_sleep();
        let dir = temp_dir("run");
        let copy = dir.join("sleep-copy");
        fs::copy(&sleep, &copy).unwrap();
        let mut child = Command::new(&copy).arg("30").spawn().unwrap();
        let running = ExeId::of_process(child.id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(running, ExeId::of_path(&copy).unwrap());
        assert_ne!(running, ExeId::of_path(&sleep).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_dev_packs_major_and_minor() {
        let id = ExeId {
            dev: libc::makedev(8, 1),
            ino: 1,
        };
        assert_eq!((id.major(), id.minor()), (8, 1));
        assert_eq!(id.kernel_dev(), (8 << 20) | 1);
    }

    fn which_sleep() -> std::path::PathBuf {
        ["/usr/bin/sleep", "/bin/sleep"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
            .expect("coreutils sleep")
    }
}
