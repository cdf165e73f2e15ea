//! The HTML report in a real browser: `portguard report --format html` over
//! the generated audit logs of two hosts (one named as a file, one as a
//! directory of logs), rendered by headless Chromium (Debian's package,
//! installed by `cargo xtask setup`): its DOM holds both hosts and the fleet's
//! totals, and its screenshot is a page of tables and a chart.
//!
//! The screenshot stays at `target/tmp/report-html/report.png` for a person to look at.

use std::{
    fs,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use portguard::{
    audit::{AuditEvent, AuditRecord, BindAttempt, Committer, ForeignRuleRecord, Host, ProcessRef},
    policy::Proto,
};
use serde_json::json;
use time::OffsetDateTime;

const POLICY: &str = include_str!("../../packaging/example-policy.toml");

/// Three days of a k3s host fighting Docker for 80/443 (every `step`
/// minutes a hijack); returns how many hijacks it removed.
fn write_log(path: &Path, now: OffsetDateTime, host: &Host, step: usize) -> usize {
    let mut f = fs::File::create(path).unwrap();
    let mut seq = 0;
    let mut push = |ago_min: i64, event: AuditEvent| {
        seq += 1;
        let r = AuditRecord {
            seq,
            ts: now - time::Duration::minutes(ago_min),
            host: Some(host.clone()),
            event,
        };
        writeln!(f, "{}", serde_json::to_string(&r).unwrap()).unwrap();
    };
    push(
        3 * 1440,
        AuditEvent::AgentStarted {
            version: "0.1.0".into(),
            pid: 812,
            mode: "enforce".into(),
            policy: "/etc/portguard/config.toml".into(),
        },
    );
    push(
        3 * 1440 - 1,
        AuditEvent::PinInstalled {
            port: 80,
            proto: Proto::Tcp,
            target: "172.17.0.2:80".into(),
            rule: json!({"chain": "PORTGUARD-PIN"}),
        },
    );
    let sources = ["kube-proxy", "cni-portmap"];
    let mut n = 0;
    for ago in (10..3 * 1440 - 10).rev().step_by(step) {
        n += 1;
        let port = if n % 3 == 0 { 80 } else { 443 };
        let rule = ForeignRuleRecord {
            finding: format!("f-{port}-{n}"),
            port,
            proto: Proto::Tcp,
            source: sources[n % 2].into(),
            location: Some("ip nat KUBE-SERVICES handle 12".into()),
            rule: json!({"chain": "KUBE-SERVICES", "expr": [{"dnat": {"addr": "10.42.0.9", "port": port}}]}),
            committer: None,
        };
        push(ago, AuditEvent::RuleFound(rule.clone()));
        // What the kernel said of the commit: kube-proxy's iptables-restore,
        // gone by the time it was named, 2 ms before the removal.
        let committer = Committer {
            pid: 9000 + n as u32,
            name: "iptables-nft-re".into(),
            gone: true,
            parents: vec![ProcessRef {
                pid: 77,
                name: "k3s-server".into(),
                exe: Some("/usr/local/bin/k3s".into()),
            }],
            unit: Some("k3s.service".into()),
            committed_at: Some(
                now - time::Duration::minutes(ago) - time::Duration::milliseconds(2),
            ),
            ..Committer::default()
        };
        push(
            ago,
            AuditEvent::RuleRemoved(ForeignRuleRecord {
                committer: Some(Box::new(committer)),
                ..rule
            }),
        );
        if n % 4 == 0 {
            for (comm, p) in [("traefik", 443), ("traefik", 80), ("nginx", 80)]
                .into_iter()
                .take(n % 3 + 1)
            {
                push(
                    ago - 1,
                    AuditEvent::BindDenied(BindAttempt {
                        port: p,
                        proto: Proto::Tcp,
                        address: Some("0.0.0.0".parse().unwrap()),
                        pid: 4000 + n as u32,
                        comm: comm.into(),
                        exe: Some(format!("/usr/bin/{comm}")),
                        cgroup: Some("/kubepods.slice".into()),
                        owner: Some("docker:frontend".into()),
                        repeats: 0,
                    }),
                );
            }
        }
    }
    push(
        5,
        AuditEvent::ProbeFailed {
            port: 443,
            proto: Proto::Tcp,
            url: "https://127.0.0.1/".into(),
            error: "status 404, expected 200".into(),
            status: Some(404),
            finding: Some("f-443-1".into()),
            finding_seq: Some(3),
        },
    );
    n
}

fn chromium() -> &'static str {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(c).exists() {
            return c;
        }
    }
    panic!("chromium is not installed: `cargo xtask setup` installs it (apt package chromium)");
}

/// Runs headless Chromium on `html` with `extra` flags; its stdout.
fn chromium_run(html: &Path, extra: &[&str]) -> Vec<u8> {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1200,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("file://{}", html.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    // Read the pipes while it runs (a DOM can outgrow a pipe's buffer).
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf)
            .map(|_| buf)
            .unwrap_or_default()
    });
    let err = thread::spawn(move || std::io::read_to_string(&mut stderr).unwrap_or_default());
    // A browser that hangs must not hang the test run.
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        thread::sleep(Duration::from_millis(100));
    };
    let stderr = err.join().unwrap();
    assert!(status.success(), "chromium failed ({status}): {stderr}");
    out.join().unwrap()
}

#[test]
fn html_report_renders_in_a_real_browser() {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-html");
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let edge_a = Host {
        name: "edge-a".into(),
        machine_id: "0a0a0a0a0a0a4a0a8a0a0a0a0a0a0a0a".into(),
    };
    let edge_b = Host {
        name: "edge-b".into(),
        machine_id: "0b0b0b0b0b0b4b0b8b0b0b0b0b0b0b0b".into(),
    };
    let log_a = scratch.path().join("edge-a.jsonl");
    let collected = scratch.path().join("collected");
    fs::create_dir_all(&collected).unwrap();
    let removed_a = write_log(&log_a, now, &edge_a, 97);
    let removed_b = write_log(&collected.join("edge-b.jsonl"), now, &edge_b, 331);
    let policy = scratch.path().join("config.toml");
    fs::write(&policy, POLICY).unwrap();
    let html = out_dir.join("report.html");

    let out = Command::new(env!("CARGO_BIN_EXE_portguard"))
        .args(["report", "--since", "7d", "--format", "html", "--output"])
        .arg(&html)
        .arg("--audit-log")
        .arg(&log_a)
        .arg("--audit-log")
        .arg(&collected)
        .arg("--config")
        .arg(&policy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(&html).unwrap();
    assert!(text.contains("<svg") && text.contains("Bind denials by process"));
    assert!(text.contains("kube-proxy") && text.contains("traefik"));

    // The browser's own DOM: both hosts, their machine ids, the fleet's totals,
    // who committed the removed rules and how long they lived.
    let dom = chromium_run(&html, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom);
    for needle in [
        "edge-a",
        "edge-b",
        edge_a.machine_id.as_str(),
        edge_b.machine_id.as_str(),
        "hosts (2 with hijacks)",
        "iptables-nft-re",
        "via k3s-server (pid 77, /usr/local/bin/k3s), unit k3s.service",
        "2 ms",
    ] {
        assert!(dom.contains(needle), "{needle:?} not in the rendered page");
    }
    let removed = format!(
        "<b>{}</b><span>foreign rules removed</span>",
        removed_a + removed_b
    );
    assert!(dom.contains(&removed), "fleet total {removed} not rendered");

    let png = out_dir.join("report.png");
    chromium_run(&html, &[&format!("--screenshot={}", png.display())]);
    let bytes = fs::read(&png).unwrap_or_else(|e| panic!("no screenshot ({e})"));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1200, 1600));
    // A blank page compresses to a few kilobytes; tables and a chart do not.
    assert!(
        bytes.len() > 40_000,
        "screenshot is suspiciously small: {} bytes",
        bytes.len()
    );
    eprintln!("screenshot: {} ({} bytes)", png.display(), bytes.len());
}
