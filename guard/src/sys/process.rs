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

/// The fields of `/proc/PID/stat` the agent uses (`proc(5)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 4.
    pub ppid: u32,
    /// Field 22: clock ticks after boot; with the pid, names one process
    /// even after its pid is reused.
    pub start_time: u64,
    /// Field 3 is `Z` or `X`: it has exited (a zombie waits for its parent
    /// to reap it; its executable and memory are gone already).
    pub exited: bool,
}

impl ProcStat {
    /// One read of `/proc/PID/stat`; None when the process is gone.
    pub fn read(pid: u32) -> Option<Self> {
        Self::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// The comm (field 2) may hold spaces and parentheses: fields are counted
    /// after its last `)`.
    fn parse(stat: &str) -> Option<Self> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_ascii_whitespace();
        // Fields 3 (state) and 4 (ppid).
        let state = fields.next()?;
        let ppid = fields.next()?.parse().ok()?;
        // Field 22 is the 18th after ppid.
        let start_time = fields.nth(17)?.parse().ok()?;
        Some(Self {
            ppid,
            start_time,
            exited: matches!(state, "Z" | "X"),
        })
    }
}

/// `/proc/PID/comm`, without its newline.
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end_matches('\n').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_of_self_names_the_parent_and_a_start_time() {
        let me = ProcStat::read(std::process::id()).expect("own stat");
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert!(me.start_time > 0);
        assert_eq!(ProcStat::read(u32::MAX - 1), None);
    }

    #[test]
    fn stat_parsing_survives_a_comm_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime priority nice threads
        // itrealvalue starttime ...
        let line =
            "812 (a b) (c)) S 77 812 812 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 99887766 1000 200";
        assert_eq!(
            ProcStat::parse(line),
            Some(ProcStat {
                ppid: 77,
                start_time: 99_887_766,
                exited: false,
            })
        );
        assert_eq!(ProcStat::parse("812 (x) S"), None);
        let zombie = line.replace(") S 77", ") Z 77");
        assert!(ProcStat::parse(&zombie).is_some_and(|s| s.exited));
    }

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
