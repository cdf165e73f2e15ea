//! `portguard check` as an operator runs it: a real ruleset in a namespace made
//! for the test, and the Kubernetes layer naming the pod behind a foreign DNAT
//! (against recorded k3s API answers: no API server can run here).

use std::process::Command;

use portguard_tests::{
    k8s_api::{RecordedApi, watched_routes},
    netns::NetNs,
    portguard_bin, require_root,
};
use serde_json::Value;

fn check(ns: &NetNs, policy: &std::path::Path, extra: &[&str]) -> (i32, Value) {
    let out = Command::new(portguard_bin())
        .args(["check", "--json", "--netns", ns.name(), "--config"])
        .arg(policy)
        .args(extra)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), v)
}

#[test]
fn foreign_dnat_to_a_pod_names_the_pod_and_its_service() {
    require_root();
    let ns = NetNs::new("pg-chk");
    let client = NetNs::new("pg-chk-client");
    ns.link(&client, "198.51.100.1/24", "198.51.100.2/24");
    // What ServiceLB's hostPort becomes: a DNAT of the host's port 80 to the Traefik pod.
    ns.nft_load(
        "table ip cni_hostport_test {\n\
           chain prerouting {\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             fib daddr type local tcp dport 80 dnat to 10.42.0.9:8000\n\
           }\n\
         }\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[[ports]]\nport = 80\nowner = \"docker\"\n").unwrap();

    let api = RecordedApi::start(watched_routes());
    let kubeconfig = api.kubeconfig(dir.path());
    let (code, v) = check(
        &ns,
        &policy,
        &["--kubeconfig", kubeconfig.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{v:#}");
    let f = &v["findings"][0];
    assert_eq!(f["port"], 80);
    assert_eq!(f["active"], true);
    assert_eq!(f["target"], "10.42.0.9:8000");
    let k = &f["kubernetes"];
    assert!(
        k.to_string().contains("traefik-5d45fc8cc9-w2xj9"),
        "the pod behind the target is named: {v:#}"
    );
    assert!(k["services"].to_string().contains("traefik"), "{k:#}");

    // Without a cluster the finding stands alone, and says nothing it cannot know.
    let (code, v) = check(&ns, &policy, &["--kubeconfig", "/nonexistent/k3s.yaml"]);
    assert_eq!(code, 1);
    assert!(v["findings"][0].get("kubernetes").is_none(), "{v:#}");
}

#[test]
fn clean_namespace_exits_zero() {
    require_root();
    let ns = NetNs::new("pg-chk-clean");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[[ports]]\nport = 443\nowner = \"docker\"\n").unwrap();
    let (code, v) = check(&ns, &policy, &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["findings"], serde_json::json!([]));
}
