//! The HTML report in a real browser: `portguard report --format html` from a
//! generated audit log, screenshotted by headless Chromium (Debian's package,
//! installed by `cargo xtask setup`).
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
    audit::{AuditEvent, AuditRecord, BindAttempt, ForeignRuleRecord},
    policy::Proto,
};
use serde_json::json;
use time::OffsetDateTime;

const POLICY: &str = include_str!("../../packaging/example-policy.toml");

/// Three days of a k3s host fighting Docker for 80/443.
fn write_log(path: &Path, now: OffsetDateTime) {
    let mut f = fs::File::create(path).unwrap();
    let mut seq = 0;
    let mut push = |ago_min: i64, event: AuditEvent| {
        seq += 1;
        let r = AuditRecord {
            seq,
            ts: now - time::Duration::minutes(ago_min),
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
    for ago in (10..3 * 1440 - 10).rev().step_by(97) {
        n += 1;
        let port = if n % 3 == 0 { 80 } else { 443 };
        let rule = ForeignRuleRecord {
            finding: format!("f-{port}-{n}"),
            port,
            proto: Proto::Tcp,
            source: sources[n % 2].into(),
            location: Some("ip nat KUBE-SERVICES handle 12".into()),
            rule: json!({"chain": "KUBE-SERVICES", "expr": [{"dnat": {"addr": "10.42.0.9", "port": port}}]}),
        };
        push(ago, AuditEvent::RuleFound(rule.clone()));
        push(ago, AuditEvent::RuleRemoved(rule));
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
}

fn chromium() -> &'static str {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(c).exists() {
            return c;
        }
    }
    panic!("chromium is not installed: `cargo xtask setup` installs it (apt package chromium)");
}

#[test]
fn html_report_renders_in_a_real_browser() {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-html");
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("audit.jsonl");
    let policy = scratch.path().join("config.toml");
    fs::write(&policy, POLICY).unwrap();
    write_log(&log, OffsetDateTime::now_utc());
    let html = out_dir.join("report.html");

    let out = Command::new(env!("CARGO_BIN_EXE_portguard"))
        .args(["report", "--since", "7d", "--format", "html", "--output"])
        .arg(&html)
        .arg("--log")
        .arg(&log)
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

    let png = out_dir.join("report.png");
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
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
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
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap_or_default();
    assert!(status.success(), "chromium failed ({status}): {stderr}");
    let bytes =
        fs::read(&png).unwrap_or_else(|e| panic!("no screenshot ({e}); chromium said: {stderr}"));
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
