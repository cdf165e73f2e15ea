//! The bind guard end to end: a real agent process attached to a cgroup made for
//! the test, real child processes binding real sockets inside it.

use std::{
    process::{Command, Output},
    time::Duration,
};

use portguard_tests::{
    agent::Agent,
    cgroup::{Cgroup, spawn_in},
    free_port, helper_bin,
    netns::NetNs,
    require_root,
};
use serde_json::Value;

const EPERM: i64 = 1;

struct Setup {
    cgroup: Cgroup,
    owner: Cgroup,
    port: u16,
    _policy: portguard_tests::TempFile,
    agent: Agent,
}

fn setup(mode: &str) -> Setup {
    require_root();
    let cgroup = Cgroup::new("pg-bind");
    let owner = cgroup.child("owner");
    let port = free_port();
    let policy = portguard_tests::TempFile::new(&format!(
        "mode = \"{mode}\"\n[[ports]]\nport = {port}\nowner = \"cgroup:{}\"\n",
        owner.relative()
    ));
    let agent = start_agent(&policy, &cgroup);
    Setup {
        cgroup,
        owner,
        port,
        _policy: policy,
        agent,
    }
}

fn probe(cg: &Cgroup, args: &[&str]) -> (u32, Value) {
    let child = spawn_in(
        cg,
        Command::new(helper_bin("bindprobe"))
            .args(args)
            .stdout(std::process::Stdio::piped()),
    );
    let pid = child.id();
    let Output { stdout, .. } = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("bindprobe said {:?}: {e}", String::from_utf8_lossy(&stdout)));
    assert_eq!(v["pid"].as_u64(), Some(pid.into()));
    (pid, v)
}

fn bind_event(agent: &mut Agent, pid: u32, port: u16) -> Value {
    agent.wait_for(Duration::from_secs(5), |v| {
        v["event"] == "bind" && v["tgid"] == pid && v["port"] == port
    })
}

#[test]
fn observed_bind_is_reported_with_pid_port_and_family() {
    let mut s = setup("observe");
    let port = s.port.to_string();

    let (pid, out) = probe(&s.cgroup, &["--addr", "127.0.0.1", "--port", &port]);
    assert_eq!(out["ok"], true, "observe mode lets the bind through");
    let ev = bind_event(&mut s.agent, pid, s.port);
    assert_eq!(ev["pid"], pid);
    assert_eq!(ev["family"], "ipv4");
    assert_eq!(ev["addr"], "127.0.0.1");
    assert_eq!(ev["proto"], "tcp");
    assert_eq!(ev["verdict"], "observed");
    assert_eq!(ev["comm"], "bindprobe");
    assert_eq!(ev["host_netns"], true);
    assert_eq!(ev["cgroup_id"], s.cgroup.id());
    assert_eq!(ev["cgroup"], s.cgroup.relative());

    let (pid6, out6) = probe(&s.cgroup, &["--addr", "::1", "--port", &port]);
    assert_eq!(out6["ok"], true);
    let ev6 = bind_event(&mut s.agent, pid6, s.port);
    assert_eq!(ev6["family"], "ipv6");
    assert_eq!(ev6["addr"], "::1");
}

#[test]
fn enforce_denies_strangers_and_lets_owners_bind() {
    let mut s = setup("enforce");
    let port = s.port.to_string();

    let (pid, out) = probe(&s.cgroup, &["--addr", "0.0.0.0", "--port", &port]);
    assert_eq!(out["ok"], false);
    assert_eq!(out["errno"], EPERM);
    let ev = bind_event(&mut s.agent, pid, s.port);
    assert_eq!(ev["verdict"], "denied");
    assert_eq!(ev["addr"], "0.0.0.0");

    // Dual-stack wildcard, and a v4-mapped address on an IPv6 socket.
    for addr in ["::", "::ffff:127.0.0.1"] {
        let (pid, out) = probe(
            &s.cgroup,
            &["--addr", addr, "--port", &port, "--v6only", "0"],
        );
        assert_eq!(out["errno"], EPERM, "{addr}");
        let ev = bind_event(&mut s.agent, pid, s.port);
        assert_eq!(ev["family"], "ipv6");
        assert_eq!(ev["verdict"], "denied");
    }

    let (opid, own) = probe(&s.owner, &["--addr", "0.0.0.0", "--port", &port]);
    assert_eq!(own["ok"], true, "the owner's cgroup may bind");
    let ev = bind_event(&mut s.agent, opid, s.port);
    assert_eq!(ev["verdict"], "owner");
    assert_eq!(ev["cgroup_id"], s.owner.id());

    // The audit trail: started, the first denial at once, the other two of
    // the same kind (bindprobe, this port) as one summary, stopped; no gaps.
    let (status, _, audit) = s.agent.stop_with_audit();
    assert!(status.success());
    let kinds: Vec<&str> = audit.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "agent_started",
            "bind_denied",
            "bind_denied",
            "agent_stopped"
        ],
        "{audit:#?}"
    );
    let seqs: Vec<u64> = audit.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=4).collect::<Vec<_>>());
    assert_eq!(audit[1]["pid"], pid);
    assert_eq!(audit[1]["port"], s.port);
    assert_eq!(audit[1]["comm"], "bindprobe");
    assert!(audit[1].get("repeats").is_none(), "{}", audit[1]);
    assert_eq!(audit[2]["repeats"], 2, "{}", audit[2]);
    assert_eq!(audit[3]["reason"], "SIGTERM");
}

#[test]
fn a_bind_flood_by_an_unprivileged_user_costs_a_bounded_number_of_records() {
    let s = setup("enforce");
    let port = s.port.to_string();
    const FLOOD: u64 = 100_000;
    let (_, out) = probe(
        &s.cgroup,
        &[
            "--addr",
            "0.0.0.0",
            "--port",
            &port,
            "--uid",
            "65534",
            "--repeat",
            &FLOOD.to_string(),
        ],
    );
    assert_eq!(out["denied"], FLOOD, "{out}");
    let (status, _, audit) = s.agent.stop_with_audit();
    assert!(status.success());
    let denials: Vec<&Value> = audit
        .iter()
        .filter(|r| r["kind"] == "bind_denied")
        .collect();
    // One record at once and one summary per 10 s window of the flood.
    assert!(
        (1..=8).contains(&denials.len()),
        "{} denial records for {FLOOD} attempts",
        denials.len()
    );
    let attempts: u64 = denials
        .iter()
        .map(|r| 1 + r["repeats"].as_u64().unwrap_or(0))
        .sum();
    // What reached the audit writer is counted; under a flood the ring buffer
    // and the writer's queue shed events, counted apart (`ringbuf_drops`,
    // `bind_records_lost`), so this is a lower bound.
    assert!(
        (1..=FLOOD).contains(&attempts),
        "{attempts} attempts counted"
    );
    // What was written before the flood is still in the (unrotated) log.
    assert_eq!(audit[0]["kind"], "agent_started");
    assert_eq!(audit[0]["seq"], 1);
    assert_eq!(audit.last().unwrap()["kind"], "agent_stopped");
}

#[test]
fn udp_on_a_tcp_port_is_not_guarded_and_other_ports_pass() {
    let s = setup("enforce");
    let port = s.port.to_string();
    let (_, udp) = probe(
        &s.cgroup,
        &["--addr", "127.0.0.1", "--port", &port, "--proto", "udp"],
    );
    assert_eq!(udp["ok"], true, "the policy protects tcp only");
    let other = free_port().to_string();
    let (_, out) = probe(&s.cgroup, &["--addr", "127.0.0.1", "--port", &other]);
    assert_eq!(out["ok"], true);
    let (status, lines) = s.agent.stop();
    assert!(status.success(), "{status}");
    let stopped: Value = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "agent_stopped")
        .expect("stop line");
    assert_eq!(stopped["host_binds"], 0, "no protected bind happened");
}

#[test]
fn renamed_stranger_is_still_a_stranger() {
    let mut s = setup("enforce");
    let port = s.port.to_string();
    // Owner identity is the cgroup, never comm: calling itself like the owner changes nothing.
    let (pid, out) = probe(
        &s.cgroup,
        &[
            "--addr",
            "127.0.0.1",
            "--port",
            &port,
            "--comm",
            "docker-proxy",
        ],
    );
    assert_eq!(out["errno"], EPERM);
    let ev = bind_event(&mut s.agent, pid, s.port);
    assert_eq!(ev["comm"], "docker-proxy");
    assert_eq!(ev["verdict"], "denied");
}

#[test]
fn bind_in_another_network_namespace_is_not_a_host_bind() {
    let mut s = setup("enforce");
    let ns = NetNs::new("pg-bindns");
    let port = s.port.to_string();
    let path = format!("/run/netns/{}", ns.name());
    let (pid, out) = probe(
        &s.cgroup,
        &["--addr", "127.0.0.1", "--port", &port, "--netns", &path],
    );
    assert_eq!(
        out["ok"], true,
        "a container's own port cannot take the host's"
    );
    let ev = bind_event(&mut s.agent, pid, s.port);
    assert_eq!(ev["verdict"], "other-netns");
    assert_eq!(ev["host_netns"], false);
}

#[test]
fn stopping_the_agent_detaches_enforcement() {
    let s = setup("enforce");
    let port = s.port.to_string();
    let (_, before) = probe(&s.cgroup, &["--addr", "127.0.0.1", "--port", &port]);
    assert_eq!(before["errno"], EPERM);
    let (status, _) = s.agent.stop();
    assert!(status.success());
    let (_, after) = probe(&s.cgroup, &["--addr", "127.0.0.1", "--port", &port]);
    assert_eq!(after["ok"], true, "no enforcement outlives the agent");
    drop(s.owner);
}

fn start_agent(policy: &portguard_tests::TempFile, cgroup: &Cgroup) -> Agent {
    Agent::start([
        "run".as_ref(),
        "--config".as_ref(),
        policy.path().as_os_str(),
        "--cgroup".as_ref(),
        cgroup.path().as_os_str(),
    ])
}

#[test]
fn executable_owner_is_recognised_by_inode_not_by_name() {
    require_root();
    let cgroup = Cgroup::new("pg-exe");
    let port = free_port();
    // The owner is a copy of bindprobe: same bytes, another file.
    let dir = std::env::temp_dir().join(portguard_tests::unique_name("pg-exe"));
    std::fs::create_dir_all(&dir).unwrap();
    let owner_exe = dir.join("webserver");
    std::fs::copy(helper_bin("bindprobe"), &owner_exe).unwrap();
    let policy = portguard_tests::TempFile::new(&format!(
        "[[ports]]\nport = {port}\nowner = \"exe:{}\"\n",
        owner_exe.display()
    ));
    let mut agent = start_agent(&policy, &cgroup);
    let p = port.to_string();

    let child = spawn_in(
        &cgroup,
        Command::new(&owner_exe)
            .args(["--addr", "127.0.0.1", "--port", &p])
            .stdout(std::process::Stdio::piped()),
    );
    let pid = child.id();
    let out: Value = serde_json::from_slice(&child.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(out["ok"], true, "the owner executable may bind");
    let ev = bind_event(&mut agent, pid, port);
    assert_eq!(ev["verdict"], "owner");
    // The kernel records what the process ran, even if it is gone before the agent looks.
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(ev["exe_ino"], std::fs::metadata(&owner_exe).unwrap().ino());

    // The original binary, even calling itself "webserver", is a stranger.
    let (spid, stranger) = probe(
        &cgroup,
        &["--addr", "127.0.0.1", "--port", &p, "--comm", "webserver"],
    );
    assert_eq!(stranger["errno"], EPERM);
    let ev = bind_event(&mut agent, spid, port);
    assert_eq!(ev["comm"], "webserver");
    assert_eq!(ev["verdict"], "denied");
    drop(agent);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn owners_changed_at_runtime_take_effect_without_restart() {
    require_root();
    let cgroup = Cgroup::new("pg-reload");
    let newcomer = cgroup.child("newcomer");
    let port = free_port();
    let p = port.to_string();
    let policy = portguard_tests::TempFile::new(&format!(
        "[[ports]]\nport = {port}\nowner = \"cgroup:/nonexistent-owner\"\n"
    ));
    let mut agent = start_agent(&policy, &cgroup);
    let (_, before) = probe(&newcomer, &["--addr", "127.0.0.1", "--port", &p]);
    assert_eq!(before["errno"], EPERM);

    // A bad policy is rejected and the old one stays in force.
    std::fs::write(
        policy.path(),
        "[[ports]]\nport = 99999\nowner = \"docker\"\n",
    )
    .unwrap();
    // SAFETY: signalling the agent we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    let rejected = agent.wait_for_event(Duration::from_secs(5), "policy_rejected");
    assert!(
        rejected["error"].as_str().unwrap().contains("out of range"),
        "{rejected}"
    );
    let (_, still) = probe(&newcomer, &["--addr", "127.0.0.1", "--port", &p]);
    assert_eq!(still["errno"], EPERM);

    std::fs::write(
        policy.path(),
        format!(
            "[[ports]]\nport = {port}\nowner = \"cgroup:{}\"\n",
            newcomer.relative()
        ),
    )
    .unwrap();
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    agent.wait_for_event(Duration::from_secs(5), "policy_reloaded");
    let (pid, after) = probe(&newcomer, &["--addr", "127.0.0.1", "--port", &p]);
    assert_eq!(after["ok"], true, "the new owner may bind after the reload");
    assert_eq!(bind_event(&mut agent, pid, port)["verdict"], "owner");
}

/// A `cgroup:` owner made (again) while the agent is stopped outright
/// (SIGSTOP), as a unit's restart makes its cgroup anew: the kernel programs
/// alone let its first bind through, by the slot (parent id, name) the agent
/// registered before, and still deny a sibling and a namesake elsewhere.
#[test]
fn an_owner_cgroup_made_while_the_agent_is_frozen_binds_as_the_owner() {
    require_root();
    let cgroup = Cgroup::new("pg-slot");
    let parent = cgroup.child("parent");
    let port = free_port();
    let p = port.to_string();
    let owner_path = format!("{}/owner", parent.relative());
    let policy = portguard_tests::TempFile::new(&format!(
        "mode = \"enforce\"\n[[ports]]\nport = {port}\nowner = \"cgroup:{owner_path}\"\n"
    ));
    let mut agent = start_agent(&policy, &cgroup);
    let owner = {
        let _frozen = agent.freeze();
        let owner = parent.child("owner");
        let sibling = parent.child("sibling");
        let elsewhere = cgroup.child("elsewhere");
        let namesake = elsewhere.child("owner");
        let bind = |cg: &Cgroup| probe(cg, &["--addr", "127.0.0.1", "--port", &p]);
        let (owner_pid, o) = bind(&owner);
        assert_eq!(
            o["ok"], true,
            "the owner's new cgroup binds by its slot: {o}"
        );
        let (_, s) = bind(&sibling);
        assert_eq!(s["errno"], EPERM, "a sibling is a stranger: {s}");
        let (_, n) = bind(&namesake);
        assert_eq!(
            n["errno"], EPERM,
            "the name under another parent is a stranger: {n}"
        );
        owner_pid
    };
    // Continued: the kernel's verdict reaches the log as it was made.
    assert_eq!(bind_event(&mut agent, owner, port)["verdict"], "owner");
}

/// A file removed on drop, without another dependency.
/// `portguard listeners` against real sockets held by real processes.
mod listeners {
    use std::{
        io::{BufRead as _, BufReader},
        process::Stdio,
    };

    use super::*;

    /// Starts bindprobe holding a listening socket; returns it once bound.
    fn hold(cg: &Cgroup, port: u16) -> std::process::Child {
        let mut child = spawn_in(
            cg,
            Command::new(helper_bin("bindprobe"))
                .args(["--addr", "127.0.0.1", "--port", &port.to_string(), "--hold"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        );
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("\"ok\":true"), "{line}");
        child
    }

    fn listeners(policy: &portguard_tests::TempFile) -> (i32, Value) {
        let out = Command::new(portguard_tests::portguard_bin())
            .args(["listeners", "--json", "--config"])
            .arg(policy.path())
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.code().unwrap(), v)
    }

    #[test]
    fn names_the_holder_and_whether_it_owns_the_port() {
        require_root();
        let cg = Cgroup::new("pg-listen");
        let owner = cg.child("owner");
        let (p_owned, p_taken) = (free_port(), free_port());
        let policy = portguard_tests::TempFile::new(&format!(
            "[[ports]]\nport = {p_owned}\nowner = \"cgroup:{o}\"\n[[ports]]\nport = {p_taken}\nowner = \"cgroup:{o}\"\n",
            o = owner.relative()
        ));
        let mut by_owner = hold(&owner, p_owned);
        let (code, v) = listeners(&policy);
        assert_eq!(code, 0, "{v}");
        let l = &v["listeners"][0];
        assert_eq!(l["port"], p_owned);
        assert_eq!(l["pid"], by_owner.id());
        assert_eq!(l["ownership"], "owner");

        let mut by_stranger = hold(&cg, p_taken);
        let (code, v) = listeners(&policy);
        assert_eq!(code, 1, "a stranger holds a protected port: {v}");
        let l = v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["port"] == p_taken)
            .unwrap()
            .clone();
        assert_eq!(l["pid"], by_stranger.id());
        assert_eq!(l["ownership"], "stranger");
        assert_eq!(l["comm"], "bindprobe");
        assert_eq!(l["addr"], "127.0.0.1");
        assert_eq!(l["cgroup"], cg.relative());
        for c in [&mut by_owner, &mut by_stranger] {
            drop(c.stdin.take());
            c.wait().unwrap();
        }
    }
}

/// docker-proxy binds a published port before Docker reports the container
/// started, so it must be recognised by its executable alone. The real
/// `/usr/sbin/docker-proxy` (package docker.io) is started here inside the test
/// cgroup, with a dockerd answering so that Docker owners resolve.
#[test]
fn docker_proxy_may_bind_a_docker_owned_port_before_any_container_runs() {
    require_root();
    portguard_tests::docker::require_docker();
    let cgroup = Cgroup::new("pg-proxy");
    let port = free_port();
    let policy = portguard_tests::TempFile::new(&format!(
        "mode = \"enforce\"\n[[ports]]\nport = {port}\nowner = \"docker\"\n"
    ));
    let mut agent = start_agent(&policy, &cgroup);
    let p = port.to_string();

    let mut proxy = spawn_in(
        &cgroup,
        Command::new("/usr/sbin/docker-proxy").args([
            "-proto",
            "tcp",
            "-host-ip",
            "127.0.0.1",
            "-host-port",
            &p,
            "-container-ip",
            "127.0.0.1",
            "-container-port",
            "9",
        ]),
    );
    let ev = agent.wait_for(Duration::from_secs(5), |v| {
        v["event"] == "bind" && v["tgid"] == proxy.id()
    });
    // "owner": the kernel let the bind through (without dockerd's status pipe
    // on fd 3 the proxy stops right after, which does not matter here).
    assert_eq!(ev["verdict"], "owner", "{ev}");
    assert_eq!(ev["comm"], "docker-proxy");

    let (pid, stranger) = probe(
        &cgroup,
        &[
            "--addr",
            "127.0.0.1",
            "--port",
            &p,
            "--comm",
            "docker-proxy",
        ],
    );
    assert_eq!(
        stranger["errno"], EPERM,
        "a stranger named docker-proxy is still a stranger"
    );
    assert_eq!(bind_event(&mut agent, pid, port)["verdict"], "denied");
    let _ = proxy.kill();
    let _ = proxy.wait();
}
