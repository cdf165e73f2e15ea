//! What `/proc` says about a process, read once when an event arrives.

use std::{fs, path::PathBuf};

/// Facts about a process that outlive its `comm` (which anyone can set).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcessInfo {
    /// `/proc/PID/exe`; `None` when the process is gone or a kernel thread.
    pub exe: Option<PathBuf>,
    /// The command line, arguments joined by spaces.
    pub cmdline: Option<String>,
    /// cgroup v2 path.
    pub cgroup: Option<String>,
}

impl ProcessInfo {
    pub fn read(pid: u32) -> Self {
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .filter(|b| !b.is_empty())
            .map(|b| {
                b.split(|c| *c == 0)
                    .filter(|s| !s.is_empty())
                    .map(String::from_utf8_lossy)
                    .collect::<Vec<_>>()
                    .join(" ")
            });
        let cgroup = super::cgroup::process_cgroup(pid);
        Self {
            exe,
            cmdline,
            cgroup,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_self() {
        let me = ProcessInfo::read(std::process::id());
        assert_eq!(me.exe, Some(std::env::current_exe().unwrap()));
        assert!(me.cmdline.is_some());
        assert!(me.cgroup.is_some());
    }

    #[test]
    fn gone_process_is_empty() {
        // pid_max is at most 2^22; this pid cannot exist.
        assert_eq!(ProcessInfo::read(u32::MAX - 1), ProcessInfo::default());
    }
}
