//! The agent's Kubernetes layer end to end: a real `portguard run` with
//! `on_claim = "remove"` against recorded k3s API answers (no API server can run
//! here), removing k3s's packaged Traefik and auditing each object whole first.

use std::{path::Path, time::Duration};

use portguard_tests::{
    agent::Agent,
    cgroup::Cgroup,
    k8s_api::{
        Answer, RecordedApi, SVCLB, core, traefik_delete_paths, traefik_removal_routes,
        watched_routes,
    },
    netns::NetNs,
    require_root,
};

/// A default k3s install: watched, and every object of its Traefik removable.
fn k3s_cluster() -> RecordedApi {
    let restore = (
        "POST",
        core("services"),
        Answer::fixture(201, "service.traefik.json"),
    );
    RecordedApi::start(
        watched_routes()
            .into_iter()
            .chain(traefik_removal_routes(true))
            .chain([restore]),
    )
}

/// The agent on this node of the recorded cluster; its rule guard works on `ns`,
/// never on the host's ruleset.
fn start_agent(policy: &Path, cgroup: &Cgroup, ns: &NetNs, kubeconfig: &Path) -> Agent {
    Agent::start([
        "run".as_ref(),
        "--config".as_ref(),
        policy.as_os_str(),
        "--cgroup".as_ref(),
        cgroup.path().as_os_str(),
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--node-name".as_ref(),
        "k3s-node-a".as_ref(),
        "--netns".as_ref(),
        ns.name().as_ref(),
    ])
}

#[test]
fn agent_removes_packaged_traefik_and_audits_every_object_first() {
    require_root();
    let api = k3s_cluster();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[ports]]\nport = 80\nowner = \"docker\"\n[[ports]]\nport = 443\nowner = \"docker\"\n\
         [kubernetes]\non_claim = \"remove\"\n",
    )
    .unwrap();
    let cgroup = Cgroup::new("pg-k8s");
    // The agent enforces: its rule guard works on a namespace of its own, not the host's ruleset.
    let ns = NetNs::new("pg-k8s");
    let mut agent = start_agent(&policy, &cgroup, &ns, &kubeconfig);
    for _ in 0..3 {
        agent.wait_for_event(Duration::from_secs(20), "kube_object_removed");
    }
    // Four claims (80 and 443, by the Service and by ServiceLB's pods), one plan.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        api.paths_of("DELETE"),
        traefik_delete_paths(false),
        "exactly k3s's packaged Traefik (not its CRD chart), in order, once"
    );
    let (status, _, audit) = agent.stop_with_audit();
    assert!(status.success());
    let removed: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|r| r["kind"] == "k8s_object_removed")
        .collect();
    let names: Vec<(&str, &str)> = removed
        .iter()
        .map(|r| {
            (
                r["object_kind"].as_str().unwrap(),
                r["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("Service", "traefik"),
            ("DaemonSet", SVCLB),
            ("HelmChart", "traefik"),
        ]
    );
    // Whole manifests: enough to restore from the log alone.
    let service = portguard_tests::k8s_api::fixture_json("service.traefik.json");
    assert_eq!(removed[0]["manifest"], service);

    // `portguard restore ID` puts the Service back from the log alone.
    let log = dir.path().join("audit.jsonl");
    let lines: Vec<String> = audit.iter().map(|r| r.to_string()).collect();
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let out = std::process::Command::new(portguard_tests::portguard_bin())
        .args(["restore", &removed[0]["seq"].to_string(), "--audit-log"])
        .arg(&log)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--config")
        .arg(&policy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let posts: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].path, core("services"));
    let body: serde_json::Value = serde_json::from_str(&posts[0].body).unwrap();
    assert_eq!(body["metadata"]["name"], "traefik");
    assert!(
        body["metadata"].get("uid").is_none(),
        "server-owned fields stripped"
    );
    let restored: serde_json::Value = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .last()
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    assert_eq!(restored["kind"], "k8s_object_restored");
    assert_eq!(restored["removal_seq"], removed[0]["seq"]);
}

#[test]
fn observe_mode_reports_claims_and_removes_nothing() {
    require_root();
    let api = k3s_cluster();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "mode = \"observe\"\n[[ports]]\nport = 80\nowner = \"docker\"\n\
         [kubernetes]\non_claim = \"remove\"\n",
    )
    .unwrap();
    let cgroup = Cgroup::new("pg-k8s-obs");
    let ns = NetNs::new("pg-k8s-obs");
    let mut agent = start_agent(&policy, &cgroup, &ns, &kubeconfig);
    let claim = agent.wait_for_event(Duration::from_secs(20), "kube_claim");
    assert!(
        claim["claim"].as_str().unwrap().contains("tcp/80"),
        "{claim}"
    );
    // A reload restarts the Kubernetes layer too: its new watches see the claim afresh.
    // SAFETY: signalling the agent we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    agent.wait_for_event(Duration::from_secs(10), "policy_reloaded");
    let again = agent.wait_for_event(Duration::from_secs(20), "kube_claim");
    assert_eq!(again["claim"], claim["claim"], "{again}");
    let (status, _, audit) = agent.stop_with_audit();
    assert!(status.success());
    assert!(
        api.requests().iter().all(|r| r.method == "GET"),
        "observe mode changes nothing in the cluster"
    );
    assert!(audit.iter().all(|r| r["kind"] != "k8s_object_removed"));
}

/// Per-port `mode = "observe"` holds the Kubernetes layer back for those ports
/// (the global mode is enforce); a SIGHUP after the policy drops it restarts
/// the layer with the new policy, which then removes the packaged Traefik once.
#[test]
fn per_port_observe_is_honoured_and_sighup_applies_the_new_policy() {
    require_root();
    let api = k3s_cluster();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let policy = dir.path().join("policy.toml");
    let write_policy = |port_mode: &str| {
        std::fs::write(
            &policy,
            format!(
                "[[ports]]\nport = 80\nowner = \"docker\"\n{port_mode}\
                 [[ports]]\nport = 443\nowner = \"docker\"\n{port_mode}\
                 [kubernetes]\non_claim = \"remove\"\n"
            ),
        )
        .unwrap();
    };
    write_policy("mode = \"observe\"\n");
    let cgroup = Cgroup::new("pg-k8s-hup");
    let ns = NetNs::new("pg-k8s-hup");
    let mut agent = start_agent(&policy, &cgroup, &ns, &kubeconfig);
    // The claims of ServiceLB's pod on this node (80 and 443) are seen, and
    // each is left alone because its port is observed.
    for _ in 0..2 {
        agent.wait_for_event(Duration::from_secs(20), "kube_removal_observed");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        api.requests().iter().all(|r| r.method == "GET"),
        "observed ports change nothing in the cluster: {:#?}",
        api.paths_of("DELETE")
    );

    write_policy("");
    // SAFETY: signalling the agent we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    agent.wait_for_event(Duration::from_secs(10), "policy_reloaded");
    for _ in 0..3 {
        agent.wait_for_event(Duration::from_secs(20), "kube_object_removed");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        api.paths_of("DELETE"),
        traefik_delete_paths(false),
        "the reloaded policy enforces: k3s's packaged Traefik, in order, once"
    );
    let (status, _, audit) = agent.stop_with_audit();
    assert!(status.success());
    assert_eq!(
        audit
            .iter()
            .filter(|r| r["kind"] == "k8s_object_removed")
            .count(),
        3
    );
}
