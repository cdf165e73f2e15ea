//! The alerts and the dashboard in `packaging/` against the real things:
//! - promtool (Debian's `prometheus` package) checks
//!   `packaging/prometheus/portguard.rules.yml` and runs its unit tests;
//! - the Grafana dashboard `packaging/grafana/portguard.json` is a dashboard
//!   over one Prometheus datasource input;
//! - every series a rule or a panel names is in a running agent's `/metrics`,
//!   once the agent has seen a hijack, a shadowing rule, a denied bind and a
//!   probe (and every family the agent exports is on the dashboard);
//! - a real Prometheus scrapes a running agent, evaluates the rules, fires
//!   PortguardHijackRemoved on a real hijack removal, and answers every query
//!   of the dashboard with data.
//!
//! promtool and prometheus come from `cargo xtask setup`: a missing one fails
//! the test with that hint, never skips it.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use portguard_tests::{
    agent::Agent,
    cgroup::{Cgroup, spawn_in},
    free_port, helper_bin,
    incident::{IncidentLab, sh},
    require_root,
};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_owned()
}

fn rules_path() -> PathBuf {
    repo().join("packaging/prometheus/portguard.rules.yml")
}

fn dashboard_path() -> PathBuf {
    repo().join("packaging/grafana/portguard.json")
}

/// A program of Debian's `prometheus` package, from PATH.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} is not on PATH: run `cargo xtask setup` (it installs Debian's \
                 `prometheus` package, which provides promtool and prometheus)"
            )
        })
}

/// Runs a command; panics with its output unless it succeeds. Its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout.into_owned()
}

// ---------------------------------------------------------------------------
// The rules and the dashboard as data.

/// The rules file as JSON.
fn rules() -> Value {
    let text = std::fs::read_to_string(rules_path()).expect("read the rules file");
    serde_saphyr::from_str::<Value>(&text).expect("the rules file is YAML")
}

/// Every rule of every group.
fn each_rule(rules: &Value) -> Vec<&Value> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules of a group"))
        .collect()
}

/// (name, expression) of every rule, alerts and records alike.
fn rule_exprs(rules: &Value) -> Vec<(String, String)> {
    each_rule(rules)
        .into_iter()
        .map(|r| {
            let name = r["alert"].as_str().or(r["record"].as_str()).expect("name");
            let expr = r["expr"].as_str().expect("expr");
            (name.to_owned(), expr.trim().to_owned())
        })
        .collect()
}

/// The names the recording rules define.
fn recorded(rules: &Value) -> BTreeSet<String> {
    each_rule(rules)
        .into_iter()
        .filter_map(|r| r["record"].as_str().map(str::to_owned))
        .collect()
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(dashboard_path()).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Panels, with the ones nested in collapsed rows.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// (where, expression) of every query in the dashboard, Grafana variables
/// still in: each panel target's `expr`, and the selector of each
/// `label_values(SELECTOR, LABEL)` variable.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("no expr: {t}"));
            out.push((format!("panel {:?}", p["title"]), expr.to_owned()));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let def = v["definition"].as_str().expect("variable definition");
        let selector = def
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .and_then(|s| s.rsplit_once(','))
            .map(|(selector, _label)| selector.trim())
            .unwrap_or_else(|| panic!("variable {:?}: not label_values(…): {def}", v["name"]));
        out.push((format!("variable {:?}", v["name"]), selector.to_owned()));
    }
    out
}

/// A dashboard query as Prometheus gets it from Grafana: `$instance` is
/// every agent (the variable's allValue), the intervals fixed.
fn as_promql(expr: &str) -> String {
    let q = expr
        .replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$instance", ".*");
    assert!(
        !q.contains('$'),
        "a Grafana variable the test does not know: {expr}"
    );
    q
}

/// PromQL words that are not metric names.
const KEYWORDS: &[&str] = &[
    // Aggregations: `sum by (x) (…)` puts the modifier before the parenthesis.
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: identifiers outside
/// strings, label matchers (`{…}`), ranges (`[…]`) and label lists
/// (`by (…)`), that are neither keywords nor called (functions,
/// aggregations), nor Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let (mut braces, mut label_list, mut list_next) = (0u32, false, false);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '[' => {
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
            }
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            '(' if list_next => (label_list, list_next) = (true, false),
            ')' if label_list => label_list = false,
            '$' => {
                i += 1;
                while i < chars.len() && ident(chars[i]) {
                    i += 1;
                }
                continue;
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (10m, 1e3, 0.99).
                while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                    i += 1;
                }
                continue;
            }
            c if ident(c) => {
                let start = i;
                while i < chars.len() && ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let called = chars[i..].iter().find(|c| !c.is_whitespace()) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if braces > 0 || label_list {
                    // A label name.
                } else if KEYWORDS.contains(&lower.as_str()) {
                    list_next = LABEL_LISTS.contains(&lower.as_str());
                } else if !called {
                    names.insert(word);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

// ---------------------------------------------------------------------------
// HTTP to the agent and to Prometheus: one request per connection.

/// `GET PATH` (HTTP/1.0: no chunked answers): the status and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: no HTTP answer: {raw:?}"));
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: {head}"));
    (status, body.to_owned())
}

/// Percent-encoding of a query parameter (everything but the unreserved characters).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `check` every 100 ms until it gives a value, for at most `within`;
/// then panics with `what` and the last state `check` described.
fn wait_until<T>(within: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(v) => return v,
            Err(state) if Instant::now() > deadline => {
                panic!("{what}: not within {within:?}; last: {state}")
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ---------------------------------------------------------------------------
// A running agent that has seen every kind of event the rules alert on.

/// An HTTP server on loopback answering 200 to everything: the health page
/// the agent's probe checks. Stopped on drop.
struct HealthPage {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl HealthPage {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf);
                        let _ = s.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for HealthPage {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// kube-proxy style: a foreign nat chain at -110 and its DNAT of port 80.
const KP_CHAIN: &str = "nft add table ip kp
     nft 'add chain ip kp pre { type nat hook prerouting priority -110; }'";
const KP_HIJACK: &str = "nft add rule ip kp pre tcp dport 80 dnat to 203.0.113.130";

/// The incident lab (its host namespace's ruleset is what the agent guards)
/// and a real `portguard run` in enforce mode on a cgroup of the test's, with
/// a probe of [`HealthPage`] on port 80, and a port owned by a child cgroup
/// (Docker's ports are observed, never denied, while dockerd cannot be
/// asked, so a denial needs an owner the agent can always tell). Fields
/// drop in order: the agent first, then its cgroups, then the namespaces.
struct Scene {
    agent: Agent,
    /// The owner of [`Self::owned`]; inside [`Self::cgroup`].
    _owner: Cgroup,
    cgroup: Cgroup,
    /// A port only `_owner` may bind.
    owned: u16,
    lab: IncidentLab,
    page: HealthPage,
    _dir: tempfile::TempDir,
    /// The agent's metrics endpoint.
    metrics: SocketAddr,
}

impl Scene {
    fn start() -> Self {
        require_root();
        let lab = IncidentLab::new(false);
        lab.docker();
        let page = HealthPage::start();
        let cgroup = Cgroup::new("pg-prom");
        let owner = cgroup.child("owner");
        let owned = free_port();
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "mode = \"enforce\"\n\
                 [[ports]]\nport = 80\nowner = \"docker\"\npin = false\n\
                 [ports.probe]\nurl = \"{}\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
                 [[ports]]\nport = 443\nowner = \"docker\"\npin = false\n\
                 [[ports]]\nport = {owned}\nowner = \"cgroup:{}\"\n",
                page.url(),
                owner.relative()
            ),
        )
        .unwrap();
        let mut agent = Agent::start_in(
            None,
            &[],
            [
                "run".as_ref(),
                "--mode".as_ref(),
                "enforce".as_ref(),
                "--cgroup".as_ref(),
                cgroup.path().as_os_str(),
                "--netns".as_ref(),
                lab.h.name().as_ref(),
                "--config".as_ref(),
                policy.as_os_str(),
            ],
        );
        agent.wait_for_event(Duration::from_secs(20), "rule_guard_ready");
        let served = agent.wait_for_event(Duration::from_secs(5), "metrics_served");
        let metrics: SocketAddr = served["listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no listen address: {served}"));
        wait_until(
            Duration::from_secs(10),
            "the agent ready",
            || match http_get(metrics, "/readyz") {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status} {body}")),
            },
        );
        Self {
            agent,
            _owner: owner,
            cgroup,
            owned,
            lab,
            page,
            _dir: dir,
            metrics,
        }
    }

    fn scrape(&self) -> String {
        let (status, body) = http_get(self.metrics, "/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits until the agent's exposition has a sample line starting with `prefix`.
    fn wait_sample(&self, prefix: &str) -> String {
        wait_until(
            Duration::from_secs(10),
            &format!("a sample {prefix}… in /metrics"),
            || {
                let body = self.scrape();
                match body.lines().find(|l| l.starts_with(prefix)) {
                    Some(line) => Ok(line.to_owned()),
                    None => Err(body),
                }
            },
        )
    }

    /// A kube-proxy-style hijack of port 80, committed with `nft` in the
    /// guarded namespace; returns once the agent has removed it.
    fn hijack(&self) {
        let h = &self.lab.h;
        if !h.exec(["nft", "list", "tables"]).contains("ip kp") {
            sh(h, KP_CHAIN);
        }
        sh(h, KP_HIJACK);
        wait_until(Duration::from_secs(5), "the hijack removed", || {
            let chain = h.exec(["nft", "list", "chain", "ip", "kp", "pre"]);
            if chain.contains("dnat") {
                Err(chain)
            } else {
                Ok(())
            }
        });
        self.wait_sample("portguard_hijacks_removed_total{port=\"80\"");
    }

    /// Every labelled series the rules and the dashboard read gets a sample:
    /// a hijack removed, a rule shadowing the owner's mapping of 443
    /// (reported), a stranger's bind to the cgroup-owned port denied, the
    /// probe checked.
    fn produce_every_series(&self) {
        self.hijack();
        sh(
            &self.lab.h,
            "iptables -t nat -I PREROUTING 1 -p tcp --dport 443 -j RETURN",
        );
        self.wait_sample("portguard_owner_shadowed_total{port=\"443\"");
        let out = spawn_in(
            &self.cgroup,
            Command::new(helper_bin("bindprobe"))
                .args(["--addr", "127.0.0.1", "--port", &self.owned.to_string()])
                .stdout(Stdio::piped()),
        )
        .wait_with_output()
        .unwrap();
        let said: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "bindprobe said {:?}: {e}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(said["errno"], libc::EPERM, "the stranger's bind: {said}");
        self.wait_sample(&format!(
            "portguard_binds_denied_total{{port=\"{}\",proto=\"tcp\"}}",
            self.owned
        ));
        self.wait_sample(&format!(
            "portguard_probe_up{{port=\"80\",url=\"{}\"}} 1",
            self.page.url()
        ));
        self.wait_sample("portguard_owner_present{port=\"80\",proto=\"tcp\"}");
    }

    /// Stops the agent: a clean exit, and the removal the metrics counted is
    /// in its audit log.
    fn stop(self) {
        let (status, _, audit) = self.agent.stop_with_audit();
        assert!(status.success(), "{status}");
        assert!(
            audit
                .iter()
                .any(|r| r["kind"] == "rule_removed" && r["port"] == 80),
            "no removal recorded: {audit:?}"
        );
    }
}

/// The sample names of an exposition (`# ` lines are metadata).
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The metric families of an exposition (`# TYPE NAME KIND`).
fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------
// A real Prometheus.

/// Debian's `prometheus` scraping one agent every second, with the rules
/// loaded and evaluated every second; its own storage in the test's
/// directory. Killed on drop (SIGTERM, then SIGKILL).
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, agent: SocketAddr) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: portguard\n    static_configs:\n      - targets: [\"{agent}\"]\n",
                rules = rules_path().display()
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus");
        let mut me = Self { child, addr, log };
        wait_until(Duration::from_secs(30), "prometheus ready", || {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", me.log());
            }
            match TcpStream::connect_timeout(&me.addr, Duration::from_millis(200)) {
                Ok(_) => match http_get(me.addr, "/-/ready") {
                    (200, _) => Ok(()),
                    (s, body) => Err(format!("{s} {body}")),
                },
                Err(e) => Err(e.to_string()),
            }
        });
        me
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A GET of the HTTP API: its JSON; `status` must be "success".
    fn api(&self, path: &str) -> Value {
        let (code, body) = http_get(self.addr, path);
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {code}, not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "GET {path}: {code} {v}");
        v
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        let v = self.api(&format!("/api/v1/query?query={}", urlencode(promql)));
        v["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql}: {v}"))
            .clone()
    }

    /// The active alerts named `name` (pending or firing).
    fn alerts(&self, name: &str) -> Vec<Value> {
        self.api("/api/v1/alerts")["data"]["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .cloned()
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// The tests.

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let promtool = tool("promtool");
    let checked = run_ok(
        Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(rules_path()),
    );
    assert!(checked.contains("SUCCESS"), "{checked}");
    // Every rule was read: as many as the file holds.
    let n = rule_exprs(&rules()).len();
    assert!(
        checked.contains(&format!("{n} rules found")),
        "{n} rules in the file: {checked}"
    );
    let tests = repo().join("packaging/prometheus/tests/portguard.rules.test.yml");
    let tested = run_ok(Command::new(&promtool).arg("test").arg("rules").arg(&tests));
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_runbook_and_is_tested() {
    let rules = rules();
    let tests =
        std::fs::read_to_string(repo().join("packaging/prometheus/tests/portguard.rules.test.yml"))
            .unwrap();
    let tests: Value = serde_saphyr::from_str(&tests).expect("the rule tests are YAML");
    let mut alerts = 0;
    for r in each_rule(&rules) {
        let Some(name) = r["alert"].as_str() else {
            continue;
        };
        alerts += 1;
        assert!(
            matches!(
                r["labels"]["severity"].as_str(),
                Some("critical" | "warning")
            ),
            "{name}: severity {}",
            r["labels"]["severity"]
        );
        for a in ["summary", "description", "runbook"] {
            assert!(
                r["annotations"][a].as_str().is_some_and(|s| s.len() > 20),
                "{name}: no {a}"
            );
        }
        // Tested firing (an expected alert) and not firing (an empty expectation).
        let cases: Vec<&Value> = tests["tests"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
            .filter(|c| c["alertname"] == name)
            .collect();
        let len = |c: &&Value| c["exp_alerts"].as_array().map_or(0, Vec::len);
        assert!(
            cases.iter().any(|c| len(c) > 0),
            "{name}: never tested firing"
        );
        assert!(
            cases.iter().any(|c| len(c) == 0),
            "{name}: never tested not firing"
        );
    }
    assert!(alerts >= 8, "{alerts} alerts");
}

#[test]
fn the_dashboard_is_grafana_json_over_one_prometheus_input() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let panels = panels(&d);
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in &panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id: {p}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}: no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            queries += 1;
        }
        let g = &p["gridPos"];
        assert!(
            g["w"].as_u64().is_some_and(|w| w > 0 && w <= 24) && g["h"].as_u64().is_some(),
            "{}: gridPos {g}",
            p["title"]
        );
    }
    assert!(queries >= 15, "{queries} queries");
    // The figures the dashboard is for.
    let named: BTreeSet<String> = dashboard_exprs(&d)
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    for want in [
        "portguard_hijacks_detected_total",
        "portguard_hijacks_removed_total",
        "portguard_removal_latency_seconds_bucket",
        "portguard_binds_denied_total",
        "portguard_probe_up",
        "portguard_owner_present",
        "portguard_audit_writable",
        "portguard_audit_write_failures_total",
        "portguard_ringbuf_drops_total",
        "portguard_ruleset_inspection_seconds_bucket",
        "portguard_ready",
        "up",
    ] {
        assert!(named.contains(want), "no panel shows {want}: {named:?}");
    }
}

#[test]
fn metric_names_are_the_selected_series_only() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"sum without () (portguard_hijacks_removed_total unless portguard_hijacks_removed_total offset 10m)
               or sum without () (increase(portguard_hijacks_removed_total[10m]))"#
        ),
        ["portguard_hijacks_removed_total"]
    );
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, instance) (rate(portguard_removal_latency_seconds_bucket{instance=~"$instance", port!="a{b}"}[$__rate_interval])))"#
        ),
        ["portguard_removal_latency_seconds_bucket"]
    );
    assert_eq!(
        names(
            r#"count(portguard_ready{instance=~"$instance"} == bool 0) or vector(0) / on (job) group_left (port) up{job="portguard"}"#
        ),
        ["portguard_ready", "up"]
    );
    assert_eq!(
        names("portguard:hijacks_removed:increase10m > 3"),
        ["portguard:hijacks_removed:increase10m"]
    );
}

/// The agent's real output, after a hijack, a shadowing rule, a denied bind
/// and a probe: every name a rule or a panel selects is there (or is a
/// recording rule of the file, or Prometheus's own `up`), and every family
/// the agent exports is on the dashboard.
#[test]
fn every_series_the_rules_and_the_dashboard_name_is_in_a_running_agents_output() {
    let rules = rules();
    let d = dashboard();
    // Before the agent: the test's own inputs are sound.
    let recorded = recorded(&rules);
    assert!(!recorded.is_empty());
    let scene = Scene::start();
    scene.produce_every_series();
    let exposition = scene.scrape();
    let exposed = sample_names(&exposition);

    let mut checked = 0;
    let mut missing = Vec::new();
    for (place, expr) in rule_exprs(&rules)
        .into_iter()
        .map(|(name, e)| (format!("rule {name}"), e))
        .chain(dashboard_exprs(&d))
    {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{place} selects no series: {expr}");
        for name in names {
            checked += 1;
            let known = name == "up" || recorded.contains(&name) || exposed.contains(&name);
            if !known {
                missing.push(format!("{place}: {name}"));
            }
            // Records are the rules file's own names, never the agent's.
            assert!(
                !recorded.contains(&name) || name.starts_with("portguard:"),
                "{name}"
            );
        }
    }
    assert!(
        missing.is_empty(),
        "series named but not in the agent's output:\n{}\n\nthe agent's output:\n{exposition}",
        missing.join("\n")
    );
    assert!(checked > 30, "{checked} names checked");

    // The other way round: each family the agent exports is on the dashboard.
    let on_dashboard: BTreeSet<String> = dashboard_exprs(&d)
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    let fams = families(&exposition);
    assert!(fams.len() >= 15, "{fams:?}");
    for fam in fams {
        let shown = ["", "_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| on_dashboard.contains(&format!("{fam}{suffix}")));
        assert!(shown, "the agent exports {fam}, no panel shows it");
    }
    scene.stop();
}

/// A real Prometheus scrapes a running agent with the rules loaded: every
/// rule evaluates, PortguardHijackRemoved is not active before the hijack and
/// fires (for: 0s: straight to firing) once the agent removed a real hijack,
/// with the port and source of the removal; no fight is called on one
/// removal; and every dashboard query answers with data.
#[test]
fn a_real_prometheus_fires_on_a_real_hijack_removal_and_answers_the_dashboard() {
    let scene = Scene::start();
    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(dir.path(), scene.metrics);

    wait_until(Duration::from_secs(30), "the agent scraped", || {
        let up = prom.query(r#"up{job="portguard"} == 1"#);
        let ready = prom.query("portguard_ready == 1");
        if up.len() == 1 && ready.len() == 1 {
            Ok(())
        } else {
            Err(format!("up {up:?} ready {ready:?}\n{}", prom.log()))
        }
    });
    // Every rule is loaded and evaluates without error.
    let n = rule_exprs(&rules()).len();
    wait_until(Duration::from_secs(30), "every rule evaluated", || {
        let groups = prom.api("/api/v1/rules")["data"]["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        let bad: Vec<&Value> = rules.iter().filter(|r| r["health"] != "ok").collect();
        if rules.len() == n && bad.is_empty() {
            Ok(())
        } else {
            Err(format!("{} rules, not ok: {bad:#?}", rules.len()))
        }
    });
    assert!(
        prom.alerts("PortguardHijackRemoved").is_empty(),
        "active before any hijack: {:?}",
        prom.alerts("PortguardHijackRemoved")
    );

    scene.produce_every_series();
    let removed = scene.wait_sample("portguard_hijacks_removed_total{port=\"80\"");
    let source = removed
        .split("source=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no source: {removed}"))
        .to_owned();
    let alert = wait_until(
        Duration::from_secs(30),
        "PortguardHijackRemoved firing",
        || {
            let alerts = prom.alerts("PortguardHijackRemoved");
            alerts
                .iter()
                .find(|a| a["state"] == "firing")
                .cloned()
                .ok_or_else(|| format!("{alerts:?}\n{}", prom.log()))
        },
    );
    assert_eq!(alert["labels"]["port"], "80", "{alert:#}");
    assert_eq!(alert["labels"]["source"], source.as_str(), "{alert:#}");
    assert_eq!(alert["labels"]["job"], "portguard", "{alert:#}");
    assert_eq!(alert["labels"]["severity"], "warning", "{alert:#}");
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("port 80")),
        "{alert:#}"
    );
    assert!(
        alert["annotations"]["description"]
            .as_str()
            .is_some_and(|s| s.contains("removed 1 foreign NAT rule(s)")),
        "{alert:#}"
    );
    // One removal is no fight, and the other events alert too.
    assert!(prom.alerts("PortguardHijackFight").is_empty());
    for name in ["PortguardBindDenied", "PortguardOwnerShadowed"] {
        wait_until(Duration::from_secs(30), &format!("{name} firing"), || {
            let a = prom.alerts(name);
            if a.iter().any(|a| a["state"] == "firing") {
                Ok(())
            } else {
                Err(format!("{a:?}"))
            }
        });
    }
    // Nothing that should stay quiet on a healthy agent is active.
    for name in [
        "PortguardDown",
        "PortguardNotReady",
        "PortguardProbeFailing",
        "PortguardAuditUnwritable",
        "PortguardAuditWriteFailures",
    ] {
        assert!(
            prom.alerts(name).is_empty(),
            "{name}: {:?}",
            prom.alerts(name)
        );
    }

    // Every dashboard query parses, runs, and shows data.
    let exprs = dashboard_exprs(&dashboard());
    wait_until(
        Duration::from_secs(30),
        "every dashboard query answered with data",
        || {
            let empty: Vec<String> = exprs
                .iter()
                .filter(|(_, e)| prom.query(&as_promql(e)).is_empty())
                .map(|(place, e)| format!("{place}: {e}"))
                .collect();
            if empty.is_empty() {
                Ok(())
            } else {
                Err(empty.join("\n"))
            }
        },
    );
    // The record the removal alerts read: one removal on port 80, counted
    // although its counter's series is new (increase() alone would say 0).
    let record = prom.query(r#"portguard:hijacks_removed:increase10m{port="80"}"#);
    assert_eq!(record.len(), 1, "{record:?}");
    assert_eq!(record[0]["value"][1], "1", "{record:?}");
    drop(prom);
    scene.stop();
}
