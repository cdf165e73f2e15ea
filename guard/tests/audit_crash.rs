//! SIGKILL in the middle of a burst of audit appends: every sequence number
//! the writer reported done is in the log, the sequence has no gap, and the
//! next open leaves no torn line (repairing and reporting one if the kill
//! landed mid-write).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portguard::audit::{AuditEvent, AuditLog, AuditTrail, Rotation};

/// Starts a burst, waits until `after` records are reported, kills it with
/// SIGKILL, and returns every sequence number it reported.
fn burst_and_kill(log: &Path, after: usize) -> Vec<u64> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portguard"))
        .args([
            "audit-selftest",
            "--burst",
            "1000000",
            "--rotate-bytes",
            "16000",
            "--keep",
            "10000",
            "--log",
        ])
        .arg(log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn portguard audit-selftest");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut reported = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = stdout.lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("torn ") {
            continue;
        }
        reported.push(
            line.parse::<u64>()
                .unwrap_or_else(|_| panic!("not a seq: {line}")),
        );
        if reported.len() >= after {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "burst too slow: {} records in 60 s",
            reported.len()
        );
    }
    assert_eq!(reported.len(), after, "the writer stopped early");
    child.kill().expect("SIGKILL the writer");
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed, not finished: {status}");
    // Whatever it reported between our read and the kill counts as well.
    for line in lines {
        let Ok(line) = line else { break };
        if let Ok(seq) = line.parse() {
            reported.push(seq);
        }
    }
    reported
}

#[test]
fn sigkill_mid_burst_leaves_no_gap_and_no_torn_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut expected_first = 1;
    for after in [150, 777, 1500] {
        let reported = burst_and_kill(&log, after);
        assert_eq!(
            reported[0], expected_first,
            "the sequence continues across restarts"
        );
        let max_reported = *reported.last().unwrap();

        // Reading without repair: at most the live file's last line is torn.
        let before = AuditTrail::read(&log).unwrap();
        assert!(before.unreadable.len() <= 1, "{:?}", before.unreadable);
        if let Some(u) = before.unreadable.first() {
            assert_eq!(u.file, log, "only the live file can have a torn tail");
        }

        // Open repairs (and reports) a torn tail.
        let mut opened = AuditLog::open(&log, Rotation::default()).unwrap();
        if let Some(t) = opened.torn_tail() {
            eprintln!(
                "round {after}: torn tail of {} bytes at {} repaired",
                t.bytes, t.offset
            );
        }
        opened.flush().unwrap();
        let next = opened.next_seq();
        drop(opened);

        let trail = AuditTrail::read(&log).unwrap();
        assert!(trail.unreadable.is_empty(), "{:?}", trail.unreadable);
        assert!(trail.gaps().is_empty(), "gaps: {:?}", trail.gaps());
        assert_eq!(trail.records.first().unwrap().seq, 1);
        let last = trail.records.last().unwrap().seq;
        assert_eq!(next, last + 1);
        for seq in &reported {
            let r = trail
                .find(*seq)
                .unwrap_or_else(|| panic!("reported seq {seq} is not durable"));
            assert!(matches!(
                r.event,
                AuditEvent::BindDenied(_) | AuditEvent::AuditTornTail { .. }
            ));
        }
        assert!(last >= max_reported);
        let text = std::fs::read(&log).unwrap();
        assert!(
            text.is_empty() || text.ends_with(b"\n"),
            "no torn line after open"
        );
        expected_first = next;
    }
    assert!(
        portguard::audit::rotated_files(&log).unwrap().len() > 5,
        "the bursts crossed rotations"
    );
}
