//! The agent's Kubernetes layer end to end: a real `portguard run` with
//! `on_claim = "remove"` against recorded k3s API answers (no API server can run
//! here), removing k3s's packaged Traefik and auditing each object whole first.

use std::time::Duration;

use portguard_tests::{
    agent::Agent,
    cgroup::Cgroup,
    k8s_api::{RecordedApi, SVCLB, apps, core, helm, traefik_removal_routes, watched_routes},
    require_root,
};

/// A default k3s install: watched, and every object of its Traefik removable.
fn k3s_cluster() -> RecordedApi {
    RecordedApi::start(
        watched_routes()
            .into_iter()
            .chain(traefik_removal_routes(true)),
    )
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
    let mut agent = Agent::start([
        "run".as_ref(),
        "--config".as_ref(),
        policy.as_os_str(),
        "--cgroup".as_ref(),
        cgroup.path().as_os_str(),
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--node-name".as_ref(),
        "k3s-node-a".as_ref(),
    ]);
    for _ in 0..4 {
        agent.wait_for(Duration::from_secs(20), |v| {
            v["message"] == "Kubernetes object removed (recorded whole)"
        });
    }
    let deletes: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert_eq!(
        deletes,
        [
            core("services/traefik"),
            apps(&format!("daemonsets/{SVCLB}")),
            helm("traefik"),
            helm("traefik-crd"),
        ],
        "exactly k3s's packaged Traefik, in order, once"
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
            ("HelmChart", "traefik-crd"),
        ]
    );
    // Whole manifests: enough to restore from the log alone.
    let service = portguard_tests::k8s_api::fixture_json("service.traefik.json");
    assert_eq!(removed[0]["manifest"], service);
}
