//! Who committed a foreign rule: proof from the kernel, not a guess.
//!
//! Every nf_tables transaction ends with an `NFT_MSG_NEWGEN` naming the
//! committing process (`NFTA_GEN_PROC_PID`, `NFTA_GEN_PROC_NAME`). The guard
//! stamps each rule a batch adds with that [`Commit`] ([`commit_of`]: one
//! `/proc/PID/stat` read per batch that adds rules, so a committer that exits
//! at once is still known by its parent). The `rule_removing` record written
//! before a deletion names the committer as the kernel did ([`as_named`]);
//! once the deletion is confirmed, `rule_removed` names it through `/proc`
//! ([`resolve`]): executable, cgroup and what it says (systemd unit,
//! container, pod), and the parent chain. Nothing between a hijack's commit
//! and its deletion waits for more than that one read. The chain-name
//! guess (`kube-proxy`, `cni-portmap`, …) stays beside it as a hint.
//!
//! Rules the agent did not see committed (there before it started, or read
//! back whole after an overrun) have no committer: unknown, never guessed.

use std::{
    collections::HashMap,
    fs,
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use time::OffsetDateTime;

use crate::{
    audit::{Committer, ProcessRef},
    nft::{
        Finding, RulesetModel,
        model::{Commit, CommitterStat, Family},
        monitor::NewGen,
        netlink::RuleMessage,
    },
    sys::{
        cgroup::process_cgroup,
        process::{ProcStat, comm},
        workload::Workload,
    },
};

/// How far up the parent chain a committer is followed (below pid 1).
const MAX_PARENTS: usize = 6;

/// The commit a `NEWGEN` names, when it names a process; read now, while
/// the committer may still live.
pub fn commit_of(generation: &NewGen) -> Option<Arc<Commit>> {
    let (pid, name) = generation.by.clone()?;
    let commit = Arc::new(Commit {
        pid,
        name,
        generation: generation.id,
        seen: SystemTime::now(),
        stat: OnceLock::new(),
    });
    // `/proc/PID/stat` costs tens of microseconds (more for a process of
    // many threads): read on the blocking pool, beside the removal, which
    // names the committer only as the kernel did. Whoever needs it first
    // waits for it (`stat_of`).
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            let read = commit.clone();
            runtime.spawn_blocking(move || stat_of(&read));
        }
        Err(_) => {
            stat_of(&commit);
        }
    }
    Some(commit)
}

/// The committer's parent and start time (read once; see [`Commit::stat`]).
pub fn stat_of(commit: &Commit) -> Option<CommitterStat> {
    *commit.stat.get_or_init(|| {
        ProcStat::read(commit.pid).map(|s| CommitterStat {
            ppid: s.ppid,
            start_time: s.start_time,
        })
    })
}

/// Marks the rule a notification added, found in `model` (read whole
/// before its notification was applied), with its commit: same place, same
/// handle, same expressions, and no commit yet.
pub fn stamp(model: &mut RulesetModel, msg: &RuleMessage, commit: &Arc<Commit>) {
    let Some(rule) = model
        .tables
        .iter_mut()
        .find(|t| t.family == msg.family && t.name == msg.table)
        .and_then(|t| t.chain_mut(&msg.chain))
        .and_then(|c| c.rules.iter_mut().find(|r| r.handle == msg.rule.handle))
    else {
        return;
    };
    if rule.commit().is_none()
        && rule.raw_exprs().is_some()
        && rule.raw_exprs() == msg.rule.raw_exprs()
    {
        rule.set_commit(commit.clone());
    }
}

/// Carries the commits of `old`'s rules over to the same rules in `new` (a
/// full read: same place, handle and expressions). Costs nothing when no
/// rule of `old` has one.
pub fn carry(old: &RulesetModel, new: &mut RulesetModel) {
    type Place<'a> = (Family, &'a str, &'a str, u64);
    let mut known: HashMap<Place<'_>, (&Arc<Commit>, Option<&[u8]>)> = HashMap::new();
    for t in &old.tables {
        for c in &t.chains {
            for r in &c.rules {
                if let Some(commit) = r.commit() {
                    known.insert(
                        (t.family, t.name.as_str(), c.name.as_str(), r.handle),
                        (commit, r.raw_exprs()),
                    );
                }
            }
        }
    }
    if known.is_empty() {
        return;
    }
    for t in &mut new.tables {
        for c in &mut t.chains {
            for r in &mut c.rules {
                if let Some((commit, raw)) =
                    known.get(&(t.family, t.name.as_str(), c.name.as_str(), r.handle))
                    && raw.is_some()
                    && r.raw_exprs() == *raw
                {
                    r.set_commit((*commit).clone());
                }
            }
        }
    }
}

/// The committer as the kernel named it, nothing read from `/proc` (for the
/// record written before a deletion, which must not wait).
pub fn as_named(commit: &Commit) -> Committer {
    Committer {
        pid: commit.pid,
        name: commit.name.clone(),
        generation: commit.generation,
        committed_at: Some(OffsetDateTime::from(commit.seen)),
        ..Committer::default()
    }
}

/// Names the committer now: from `/proc` while it lives (the same process:
/// its start time is checked), else by the parent it had.
pub fn resolve(commit: &Commit) -> Committer {
    let mut out = as_named(commit);
    let first = stat_of(commit);
    let start_time = first.map(|s| s.start_time);
    // The same process (its start time), and not exited (a zombie has no
    // executable left to read).
    let alive = ProcStat::read(commit.pid)
        .filter(|s| start_time.is_none_or(|t| t == s.start_time) && !s.exited);
    // A process past the release of its memory (exiting) has no executable
    // either: it is as gone as a zombie.
    let alive = alive.and_then(|stat| Some((stat, exe(commit.pid)?)));
    let mut next = match alive {
        Some((stat, exe)) => {
            out.exe = Some(exe);
            out.cgroup = process_cgroup(commit.pid);
            out.cgroup_of = out.cgroup.as_ref().map(|_| commit.pid);
            Some(stat.ppid)
        }
        None => {
            out.gone = true;
            // Its parent as read when the commit arrived, else (a zombie) now.
            first.map(|s| s.ppid).or_else(|| {
                ProcStat::read(commit.pid)
                    .filter(|s| start_time.is_none_or(|t| t == s.start_time))
                    .map(|s| s.ppid)
            })
        }
    };
    while let Some(pid) = next.filter(|p| *p > 1) {
        if out.parents.len() == MAX_PARENTS {
            break;
        }
        let Some(stat) = ProcStat::read(pid) else {
            break;
        };
        out.parents.push(ProcessRef {
            pid,
            name: comm(pid).unwrap_or_default(),
            exe: exe(pid),
        });
        if out.cgroup.is_none() {
            out.cgroup = process_cgroup(pid);
            out.cgroup_of = out.cgroup.as_ref().map(|_| pid);
        }
        next = Some(stat.ppid);
    }
    if let Some(cgroup) = &out.cgroup {
        let w = Workload::from_cgroup_path(cgroup);
        out.unit = w.unit;
        out.container_id = w.container_id;
        out.pod_uid = w.pod_uid;
    }
    out
}

/// The committer of the rule a finding names, when the model knows it.
pub fn committer_of(model: &RulesetModel, finding: &Finding) -> Option<Committer> {
    let handle = finding.handle?;
    let rule = model
        .tables
        .iter()
        .find(|t| t.family == finding.family && t.name == finding.table)?
        .chain(&finding.chain)?
        .rules
        .iter()
        .find(|r| r.handle == handle)?;
    rule.commit().map(|c| resolve(c))
}

fn exe(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    fn newgen(pid: u32, name: &str) -> NewGen {
        NewGen {
            id: Some(7),
            by: Some((pid, name.into())),
        }
    }

    #[test]
    fn a_live_committer_is_named_with_its_executable_cgroup_and_parents() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::null())
            .spawn()
            .expect("sleep");
        let commit = commit_of(&newgen(child.id(), "sleep")).expect("a commit");
        assert_eq!(stat_of(&commit).map(|s| s.ppid), Some(std::process::id()));
        let c = resolve(&commit);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            (c.pid, c.name.as_str(), c.gone),
            (child.id(), "sleep", false)
        );
        assert!(
            c.exe.as_deref().is_some_and(|e| e.ends_with("/sleep")),
            "{c:?}"
        );
        assert_eq!(c.cgroup, process_cgroup(child.id()).or(c.cgroup.clone()));
        assert_eq!(
            c.parents[0].pid,
            std::process::id(),
            "its parent is this test"
        );
        assert_eq!(
            c.parents[0].exe,
            Some(std::env::current_exe().unwrap().display().to_string())
        );
        assert_eq!(c.generation, Some(7));
        assert!(c.committed_at.is_some());
    }

    #[test]
    fn a_committer_that_exited_is_named_by_its_parent() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = child.id();
        // Read while it lives (as the guard does when the NEWGEN arrives)...
        let commit = commit_of(&newgen(pid, "sleep")).expect("a commit");
        assert_eq!(stat_of(&commit).map(|s| s.ppid), Some(std::process::id()));
        child.kill().expect("kill");
        child.wait().expect("reaped");
        // ...named after it is gone: the kernel's name, its parent's details.
        let c = resolve(&commit);
        assert!(c.gone, "{c:?}");
        assert_eq!(c.exe, None, "nothing of the exited process is guessed");
        assert_eq!(c.name, "sleep");
        assert_eq!(c.parents[0].pid, std::process::id());
        assert_eq!(c.cgroup_of, Some(std::process::id()));
        assert_eq!(c.cgroup, process_cgroup(std::process::id()));
    }

    #[test]
    fn a_reused_pid_is_not_taken_for_the_committer() {
        let me = std::process::id();
        let commit = Commit {
            pid: me,
            name: "gone-long-ago".into(),
            generation: None,
            seen: SystemTime::now(),
            // Not this process's start time.
            stat: OnceLock::from(Some(CommitterStat {
                ppid: 1,
                start_time: 1,
            })),
        };
        let c = resolve(&commit);
        assert!(c.gone);
        assert_eq!(c.exe, None);
        assert!(c.parents.is_empty());
    }

    #[test]
    fn a_newgen_without_a_process_names_nobody() {
        assert!(commit_of(&NewGen::id(3)).is_none());
    }
}
