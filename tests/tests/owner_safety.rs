//! Never harm the owner: `portguard run` in enforce mode guards the ruleset and
//! the binds of a real dockerd (`portguard_tests::dockerd_ns`: dockerd 20.10
//! in a test network namespace with its own socket, data root, exec root,
//! bridge and cgroup), **with Docker reachable** — the agent runs inside that
//! namespace as if it were the host's and talks to that dockerd over its
//! socket, exactly as on a stock host.
//!
//! Every case goes through the owner's real lifecycle (container restarts,
//! re-creation on a new address, a dockerd restart, both binding modes, a
//! user-defined network with a custom bridge name, a `--network host` owner,
//! a loopback-only publish with a pin) and then asserts: no owner rule
//! removed, no owner bind denied, the site answers after every event, and the
//! audit log records no hijack. A control at the end of each case (a foreign
//! DNAT, a renamed stranger's bind) proves the guard was enforcing all along.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use portguard_tests::{
    agent::Agent,
    cgroup::Cgroup,
    docker::{Container, Network},
    dockerd_ns::{DockerdOptions, HOST_V4, NsDockerd, await_page, fetch},
    helper_bin, run, unique_name,
};
use serde_json::Value;

/// How long the site may take to answer again after an event (a dockerd
/// restart with `--restart always` containers is the slowest).
const SETTLE: Duration = Duration::from_secs(30);

/// A container's network namespace under a name (`ip netns attach`), so a
/// test can connect from inside the container; detached on drop.
struct ContainerNetns(String);

impl ContainerNetns {
    fn of(c: &Container) -> Self {
        let name = unique_name("pgctr");
        run(Command::new("ip").args(["netns", "attach", &name, &c.pid().to_string()]));
        Self(name)
    }
}

impl Drop for ContainerNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// A policy file removed on drop.
struct PolicyFile(PathBuf);

impl PolicyFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name("pg-owner-policy") + ".toml");
        std::fs::write(&path, text).unwrap();
        Self(path)
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The agent inside the dockerd's namespace, enforcing, binds guarded below
/// dockerd's cgroup, Docker reachable over its socket.
fn start_agent(d: &NsDockerd, policy: &Path) -> Agent {
    let env = d.env();
    let envs: Vec<(&str, &OsStr)> = env
        .iter()
        .map(|(k, v)| (k.as_str(), OsStr::new(v)))
        .collect();
    let mut agent = Agent::start_in(
        Some(d.netns().name()),
        &envs,
        [
            "run".as_ref(),
            "--mode".as_ref(),
            "enforce".as_ref(),
            "--cgroup".as_ref(),
            d.cgroup().path().as_os_str(),
            "--config".as_ref(),
            policy.as_os_str(),
        ],
    );
    agent.wait_for_event(Duration::from_secs(20), "rule_guard_ready");
    agent
}

/// The page from a visitor (the client namespace, PREROUTING) and from the
/// host itself (the dockerd namespace, OUTPUT), both to the host's address.
fn site_answers(d: &NsDockerd, port: u16, marker: &str, after: &str) {
    let url = format!("http://{HOST_V4}:{port}/");
    for ns in [d.client().name(), d.netns().name()] {
        if let Err(e) = await_page(ns, &url, marker, SETTLE) {
            panic!(
                "after {after}: the site does not answer from {ns}: {e}\nruleset:\n{}\ncontainers:\n{}\ndockerd:\n{}",
                d.ruleset(),
                d.containers_report(),
                d.log_tail()
            );
        }
    }
}

/// A foreign DNAT of `port` in a table of its own, ahead of Docker: the agent
/// must remove it (proof that it was guarding while it left Docker alone).
fn foreign_hijack(d: &NsDockerd, port: u16) {
    let table = "pgforeign";
    d.netns().exec(["nft", "add", "table", "ip", table]);
    d.netns().exec([
        "nft",
        &format!("add chain ip {table} pre {{ type nat hook prerouting priority -150; }}"),
    ]);
    d.netns().exec([
        "nft",
        &format!("add rule ip {table} pre tcp dport {port} dnat to 203.0.113.250:{port}"),
    ]);
}

/// What the audit log and the agent's logs must (not) say once a case is done:
/// exactly `foreign` removals, none of them in Docker's chains, no denial of
/// anyone but the renamed strangers (by pid).
fn assert_owner_unharmed(lines: &[String], audit: &[Value], foreign: usize, strangers: &[u64]) {
    let removed: Vec<&Value> = audit
        .iter()
        .filter(|r| r["kind"] == "rule_removed")
        .collect();
    assert_eq!(
        removed.len(),
        foreign,
        "only the control hijack may be removed:\n{removed:#?}"
    );
    for r in &removed {
        assert_ne!(
            r["rule"]["chain"], "DOCKER",
            "an owner rule was removed: {r}"
        );
        assert_ne!(r["source"], "docker", "an owner rule was removed: {r}");
    }
    // Docker's own rules (its DNATs), in every state its lifecycle leaves
    // them, never keep connections from its own mapping and are never
    // reported. (A test's foreign rule put into Docker's chain is reported:
    // it is a REDIRECT.)
    let reported: Vec<&Value> = audit
        .iter()
        .filter(|r| {
            r["kind"] == "owner_shadowed"
                || (r["kind"] == "rule_found"
                    && r["source"] == "docker"
                    && r["rule"]["kind"] == "dnat")
        })
        .collect();
    assert!(
        reported.is_empty(),
        "an owner rule was reported:\n{reported:#?}"
    );
    let denied: Vec<&Value> = audit
        .iter()
        .filter(|r| r["kind"] == "bind_denied")
        .collect();
    // Attempts of one kind within a window share a record (`repeats`).
    let attempts: u64 = denied
        .iter()
        .map(|r| 1 + r["repeats"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        attempts,
        strangers.len() as u64,
        "an owner bind was denied:\n{denied:#?}"
    );
    for r in &denied {
        assert!(
            r["pid"].as_u64().is_some_and(|p| strangers.contains(&p)),
            "only the renamed stranger may be denied: {r}"
        );
        assert_eq!(r["comm"], "dockerd", "{r}");
    }
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("\"source\":\"docker\"") && l.contains("foreign NAT rule removed")),
        "a Docker rule was removed"
    );
}

/// The bind events the agent logged for `port`, as (exe, verdict).
fn binds_of(lines: &[String], port: u16) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "bind")
        .filter(|v| v["port"].as_u64() == Some(u64::from(port)))
        .map(|v| {
            (
                v["exe"].as_str().unwrap_or_default().to_owned(),
                v["verdict"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A stranger renamed `dockerd`, inside dockerd's cgroup and namespace, binding
/// `port`: the guard must deny it (a name is not an identity).
fn renamed_stranger_binds(d: &NsDockerd, port: u16) -> Value {
    stranger_binds_in(d, d.cgroup(), port)
}

/// [`renamed_stranger_binds`] from the cgroup `cgroup`.
fn stranger_binds_in(d: &NsDockerd, cgroup: &Cgroup, port: u16) -> Value {
    let mut cmd = Command::new(helper_bin("bindprobe"));
    cmd.args([
        "--addr",
        "0.0.0.0",
        "--port",
        &port.to_string(),
        "--comm",
        "dockerd",
        "--netns",
        &format!("/run/netns/{}", d.netns().name()),
    ]);
    let out = cgroup
        .enter_on_spawn(&mut cmd)
        .output()
        .expect("bindprobe runs");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bindprobe said {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The owner's whole lifecycle on port 80 in one binding mode.
fn lifecycle(userland_proxy: bool) {
    let mut d = NsDockerd::start(DockerdOptions::with_proxy(userland_proxy));
    let policy = PolicyFile::new("mode = \"enforce\"\n[[ports]]\nport = 80\nowner = \"docker\"\n");
    let mut agent = start_agent(&d, &policy.0);
    let marker = unique_name("site");
    // Published while the agent enforces: Docker's bind (proxy or daemon) and rules.
    let web = d.httpd(&marker, "80:8080", &["--restart", "always"]);
    site_answers(&d, 80, &marker, "docker run");
    for i in 1..=3 {
        web.restart();
        site_answers(&d, 80, &marker, &format!("docker restart #{i}"));
    }
    let old_ip = web.address();
    let mut squatter = None;
    let web = web.recreate_with(|| squatter = Some(Container::sleeper(d.image())));
    let new_ip = web.address();
    assert_ne!(old_ip, new_ip, "the re-created container has a new address");
    site_answers(&d, 80, &marker, "re-creation on a new address");
    let (stop, start) = d.restart();
    eprintln!("dockerd restart: stop {stop:?}, start {start:?}");
    site_answers(&d, 80, &marker, "a dockerd restart");
    // While dockerd could not be asked, its ports were observed, not enforced;
    // the guard is back once the agent reconnects.
    agent.wait_for_event(Duration::from_secs(10), "docker_reachable");
    web.restart();
    site_answers(&d, 80, &marker, "docker restart after the dockerd restart");

    // Controls: the guard was enforcing the whole time.
    foreign_hijack(&d, 80);
    let v = agent.wait_for_event(Duration::from_secs(10), "rule_removed");
    assert_eq!(
        v["rule"].as_str().map(|r| r.contains("pgforeign")),
        Some(true),
        "{v}"
    );
    site_answers(&d, 80, &marker, "the control hijack's removal");
    web.stop();
    let stranger = renamed_stranger_binds(&d, 80);
    assert_eq!(
        stranger["ok"], false,
        "a process named dockerd is no dockerd: {stranger}"
    );
    web.start();
    site_answers(&d, 80, &marker, "docker start after the stranger");

    let (status, lines, audit) = agent.stop_with_audit();
    assert!(status.success(), "{status}");
    assert_owner_unharmed(&lines, &audit, 1, &[stranger["pid"].as_u64().unwrap()]);
    // The owner's binds were seen and allowed as the owner's, by executable.
    let binds = binds_of(&lines, 80);
    let binder = if userland_proxy {
        "docker-proxy"
    } else {
        "dockerd"
    };
    assert!(
        binds
            .iter()
            .any(|(exe, verdict)| exe.ends_with(binder) && verdict == "owner"),
        "{binder}'s bind of port 80 seen and allowed: {binds:?}"
    );
    assert!(
        !binds
            .iter()
            .any(|(exe, verdict)| exe.ends_with(binder) && verdict == "denied"),
        "{binds:?}"
    );
    drop(squatter);
}

#[test]
fn docker_proxy_binding_restarts_recreation_and_dockerd_restart_harm_nothing() {
    lifecycle(true);
}

#[test]
fn daemon_side_binding_restarts_recreation_and_dockerd_restart_harm_nothing() {
    lifecycle(false);
}

/// A user-defined network with a custom bridge name: Docker's DNAT points
/// behind a bridge named neither `docker*` nor `br-*`; a foreign REDIRECT put
/// into Docker's own chain is reported, never removed (Docker's place).
#[test]
fn a_custom_bridge_name_is_dockers_and_dockers_chain_is_never_touched() {
    let d = NsDockerd::start(DockerdOptions::with_proxy(true));
    let bridge = format!("pgb{}", std::process::id() % 100_000);
    let net = Network::with_bridge(d.daemon(), &bridge, &[]);
    let policy = PolicyFile::new("mode = \"enforce\"\n[[ports]]\nport = 80\nowner = \"docker\"\n");
    let mut agent = start_agent(&d, &policy.0);
    let marker = unique_name("custom");
    let web = d.httpd(&marker, "80:8080", &["--network", net.name()]);
    site_answers(&d, 80, &marker, "docker run on a custom bridge");
    assert!(
        d.ruleset().contains(&format!("iifname != \"{bridge}\"")),
        "Docker's DNAT names the custom bridge:\n{}",
        d.ruleset()
    );
    for i in 1..=2 {
        web.restart();
        site_answers(&d, 80, &marker, &format!("docker restart #{i}"));
    }
    // Something else writes into Docker's own chain: reported, left in place.
    d.netns().exec([
        "iptables",
        "-t",
        "nat",
        "-I",
        "DOCKER",
        "1",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "REDIRECT",
        "--to-ports",
        "9",
    ]);
    let v = agent.wait_for(Duration::from_secs(10), |v| {
        v["event"] == "foreign_rule_reported" && v["chain"] == "DOCKER"
    });
    assert_eq!(
        v["why"], "in a chain Docker manages: reported, never removed",
        "{v}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        d.netns()
            .exec(["iptables", "-t", "nat", "-S", "DOCKER"])
            .contains("REDIRECT"),
        "the rule in Docker's chain is left alone"
    );
    let (status, lines, audit) = agent.stop_with_audit();
    assert!(status.success(), "{status}");
    assert_owner_unharmed(&lines, &audit, 0, &[]);
    drop(web);
}

/// A `--network host` busybox httpd answering on `port`, and the agent
/// enforcing with that container as the port's `docker:NAME` owner. Bound in
/// this order, they drop in reverse: the agent first, dockerd last.
struct HostNetOwner {
    d: NsDockerd,
    marker: String,
    web: Container,
    _policy: PolicyFile,
    agent: Agent,
}

fn host_network_owner(port: u16, label: &str) -> HostNetOwner {
    let d = NsDockerd::start(DockerdOptions::with_proxy(true));
    let marker = unique_name(label);
    let web = d.host_httpd(&marker, port, &[]);
    site_answers(&d, port, &marker, "docker run --network host");
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[ports]]\nport = {port}\nowner = \"docker:{}\"\n",
        web.name()
    ));
    let agent = start_agent(&d, &policy.0);
    HostNetOwner {
        d,
        marker,
        web,
        _policy: policy,
        agent,
    }
}

/// A `docker:NAME` owner with `--network host` binds for itself as soon as
/// its process starts, before Docker reports it started: its cgroup is
/// learned as runc makes it. Restarts and a re-creation (a new cgroup each
/// time) never lock it out.
#[test]
fn a_host_network_owner_is_never_locked_out_of_its_port() {
    let port = 18_090;
    let HostNetOwner {
        d,
        marker,
        web,
        _policy,
        agent,
    } = host_network_owner(port, "hostnet");
    for i in 1..=3 {
        web.restart();
        site_answers(
            &d,
            port,
            &marker,
            &format!("docker restart #{i} under enforcement"),
        );
    }
    // Re-creation: a new container id, learned while it starts (dockerd holds
    // the container's lock for the whole start, so `inspect` cannot say).
    let mut web = web;
    for i in 1..=3 {
        web = web.recreate();
        site_answers(
            &d,
            port,
            &marker,
            &format!("re-creation #{i} under enforcement"),
        );
    }
    web.stop();
    let stranger = renamed_stranger_binds(&d, port);
    assert_eq!(stranger["ok"], false, "the port is guarded: {stranger}");
    web.start();
    site_answers(&d, port, &marker, "docker start after the stranger");
    let (status, lines, audit) = agent.stop_with_audit();
    assert!(status.success(), "{status}");
    assert_owner_unharmed(&lines, &audit, 0, &[stranger["pid"].as_u64().unwrap()]);
    let binds = binds_of(&lines, port);
    // Three restarts and three re-creations, each a new cgroup bound under
    // enforcement (the last start's event may still sit in the ring buffer
    // when the agent stops).
    assert!(
        binds.iter().filter(|(_, v)| v == "owner").count() >= 6,
        "each start's bind seen and allowed as the owner's: {binds:?}"
    );
}

/// Every start of a container makes its cgroup anew, with a new id, and its
/// process binds a moment later: faster than a loaded agent may learn the id.
/// With the agent frozen outright, the kernel programs alone must still let
/// the owner's new cgroup bind (by its slot: parent and name, known before the
/// start), and still deny a stranger in a cgroup of the same name elsewhere.
#[test]
fn a_host_network_owner_starting_while_the_agent_is_frozen_is_the_owner() {
    let port = 18_091;
    let HostNetOwner {
        d,
        marker,
        web,
        _policy,
        mut agent,
    } = host_network_owner(port, "frozen");
    let stranger = {
        let _frozen = agent.freeze();
        for i in 1..=2 {
            web.restart();
            site_answers(
                &d,
                port,
                &marker,
                &format!("docker restart #{i} with the agent frozen"),
            );
        }
        web.stop();
        // The container's name under another parent is not its slot.
        let elsewhere = d.cgroup().child(&unique_name("elsewhere"));
        let namesake = elsewhere.child(web.id());
        let stranger = stranger_binds_in(&d, &namesake, port);
        assert_eq!(
            stranger["ok"], false,
            "a namesake cgroup under another parent is a stranger: {stranger}"
        );
        web.start();
        site_answers(&d, port, &marker, "docker start with the agent frozen");
        stranger
    };
    // Continued: the kernel's verdicts reach the agent's log as they were made.
    for _ in 0..3 {
        agent.wait_for(SETTLE, |v| {
            v["event"] == "bind"
                && v["port"].as_u64() == Some(u64::from(port))
                && v["verdict"] == "owner"
        });
    }
    let (status, lines, audit) = agent.stop_with_audit();
    assert!(status.success(), "{status}");
    assert_owner_unharmed(&lines, &audit, 0, &[stranger["pid"].as_u64().unwrap()]);
}

/// `-p 127.0.0.1:PORT:…` with a pin: the pin matches 127.0.0.1 only (never
/// every local address: a pin must not widen exposure); a pinned publish on
/// every address keeps hairpin traffic (a container reaching its own
/// published port through the host's address) working.
#[test]
fn pins_follow_the_publish_address_and_keep_hairpin_traffic() {
    let d = NsDockerd::start(DockerdOptions::with_proxy(true));
    let policy = PolicyFile::new(
        "mode = \"enforce\"\n[[ports]]\nport = 8081\nowner = \"docker\"\npin = true\n[[ports]]\nport = 80\nowner = \"docker\"\npin = true\n",
    );
    let mut agent = start_agent(&d, &policy.0);
    let local = unique_name("loopback");
    let lo = d.httpd(&local, "127.0.0.1:8081:8080", &[]);
    let marker = unique_name("public");
    let web = d.httpd(&marker, "80:8080", &[]);
    agent.wait_for(SETTLE, |v| {
        v["event"] == "pins_synced" && v["pins"].as_u64() == Some(2)
    });
    if let Err(e) = await_page(d.netns().name(), "http://127.0.0.1:8081/", &local, SETTLE) {
        panic!(
            "the loopback publish answers on loopback: {e}\n{}",
            d.ruleset()
        );
    }
    assert_eq!(
        fetch(d.client().name(), &format!("http://{HOST_V4}:8081/")),
        None,
        "a loopback-only publish must not become reachable from outside:\n{}",
        d.ruleset()
    );
    let pins = d.netns().exec(["nft", "list", "table", "ip", "portguard"]);
    assert!(pins.contains("ip daddr 127.0.0.1"), "{pins}");
    assert!(pins.contains("iifname != \"docker0\""), "{pins}");
    site_answers(&d, 80, &marker, "the pin");
    // Hairpin: from inside the container's own network namespace, through
    // the host's address, back to itself.
    let inside = ContainerNetns::of(&web);
    if let Err(e) = await_page(&inside.0, &format!("http://{HOST_V4}:80/"), &marker, SETTLE) {
        panic!("hairpin through the pin: {e}\n{}", d.ruleset());
    }
    drop(inside);
    let (status, lines, audit) = agent.stop_with_audit();
    assert!(status.success(), "{status}");
    assert_owner_unharmed(&lines, &audit, 0, &[]);
    let installed: Vec<&Value> = audit
        .iter()
        .filter(|r| r["kind"] == "pin_installed")
        .collect();
    assert!(
        installed
            .iter()
            .any(|r| r["port"] == 8081 && r["rule"]["host"] == "127.0.0.1"),
        "{installed:#?}"
    );
    drop((lo, web));
}

/// Docker with IPv6 (`--ipv6 --ip6tables`): its `ip6 nat DOCKER` rules point
/// behind the bridge's IPv6 subnet and are the owner's too.
#[test]
fn ipv6_dockers_own_rules_are_the_owners() {
    let d = NsDockerd::start(DockerdOptions {
        ipv6: true,
        ..DockerdOptions::with_proxy(false)
    });
    let policy = PolicyFile::new("mode = \"enforce\"\n[[ports]]\nport = 80\nowner = \"docker\"\n");
    let mut agent = start_agent(&d, &policy.0);
    let marker = unique_name("six");
    let web = d.httpd(&marker, "80:8080", &[]);
    let url6 = format!("http://[{}]:80/", portguard_tests::dockerd_ns::HOST_V6);
    for i in 0..=2 {
        if i > 0 {
            web.restart();
        }
        site_answers(&d, 80, &marker, &format!("IPv6 start #{i}"));
        if let Err(e) = await_page(d.client().name(), &url6, &marker, SETTLE) {
            panic!(
                "over IPv6 after start #{i}: {e}\n{}",
                d.netns().exec(["ip6tables-save", "-t", "nat"])
            );
        }
    }
    assert!(
        d.netns()
            .exec(["ip6tables", "-t", "nat", "-S", "DOCKER"])
            .contains("DNAT"),
        "Docker wrote an IPv6 DNAT"
    );
    // Control: a foreign IPv6 hijack is still removed.
    d.netns().exec(["nft", "add", "table", "ip6", "pgforeign6"]);
    d.netns().exec([
        "nft",
        "add chain ip6 pgforeign6 pre { type nat hook prerouting priority -150; }",
    ]);
    d.netns().exec([
        "nft",
        "add rule ip6 pgforeign6 pre tcp dport 80 dnat to [2001:db8:ffff::9]:80",
    ]);
    agent.wait_for(Duration::from_secs(10), |v| {
        v["message"] == "foreign NAT rule removed"
            && v["rule"].as_str().is_some_and(|r| r.contains("pgforeign6"))
    });
    let (status, lines, audit) = agent.stop_with_audit();
    assert!(status.success(), "{status}");
    assert_owner_unharmed(&lines, &audit, 1, &[]);
}
