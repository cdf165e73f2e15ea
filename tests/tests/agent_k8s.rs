//! The agent's Kubernetes layer end to end: a real `portguard run` with
//! `on_claim = "remove"` against recorded k3s API answers (no API server can run
//! here), removing k3s's packaged Traefik and auditing each object whole first.

use std::time::Duration;

use portguard_tests::{
    agent::Agent,
    cgroup::Cgroup,
    k8s_api::{Answer, RecordedApi},
    require_root,
};

const SVCLB: &str = "svclb-traefik-3f3ed2e1";

fn core(path: &str) -> String {
    format!("/api/v1/namespaces/kube-system/{path}")
}
fn apps(path: &str) -> String {
    format!("/apis/apps/v1/namespaces/kube-system/{path}")
}
fn helm(path: &str) -> String {
    format!("/apis/helm.cattle.io/v1/namespaces/kube-system/helmcharts/{path}")
}

/// A default k3s install: watched, and every object of its Traefik removable.
fn k3s_cluster() -> RecordedApi {
    RecordedApi::start([
        (
            "GET",
            "/version".into(),
            Answer::fixture(200, "version.json"),
        ),
        (
            "GET",
            "/api/v1/services".into(),
            Answer::fixture(200, "services.list.json"),
        ),
        (
            "WATCH",
            "/api/v1/services".into(),
            Answer::watch("services.watch.jsonl"),
        ),
        (
            "GET",
            "/api/v1/pods".into(),
            Answer::fixture(200, "pods.list.json"),
        ),
        (
            "WATCH",
            "/api/v1/pods".into(),
            Answer::watch("pods.watch.jsonl"),
        ),
        (
            "GET",
            apps("daemonsets"),
            Answer::fixture(200, "daemonsets.kube-system.list.json"),
        ),
        (
            "GET",
            core("services/traefik"),
            Answer::fixture(200, "service.traefik.json"),
        ),
        (
            "DELETE",
            core("services/traefik"),
            Answer::fixture(200, "service.traefik.deleted.json"),
        ),
        (
            "GET",
            apps(&format!("daemonsets/{SVCLB}")),
            Answer::fixture(200, &format!("daemonset.{SVCLB}.json")),
        ),
        (
            "DELETE",
            apps(&format!("daemonsets/{SVCLB}")),
            Answer::fixture(200, "status.success.daemonset.json"),
        ),
        (
            "GET",
            helm("traefik"),
            Answer::fixture(200, "helmchart.traefik.json"),
        ),
        (
            "DELETE",
            helm("traefik"),
            Answer::fixture(200, "helmchart.traefik.json"),
        ),
        (
            "GET",
            helm("traefik-crd"),
            Answer::fixture(200, "helmchart.traefik-crd.json"),
        ),
        (
            "DELETE",
            helm("traefik-crd"),
            Answer::fixture(200, "helmchart.traefik-crd.json"),
        ),
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
