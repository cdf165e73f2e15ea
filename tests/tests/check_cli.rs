//! `portguard check` as an operator runs it: a real ruleset in a namespace made
//! for the test, and the Kubernetes layer naming the pod behind a foreign DNAT
//! (against recorded k3s API answers: no API server can run here). Also where
//! no cgroup v2 hierarchy is visible (`ip netns exec` remounts `/sys`): NAT
//! findings are still reported, and what needs cgroups is named.

use std::process::Command;

use portguard_tests::{
    check_json,
    k8s_api::{RecordedApi, traefik_crd_count_routes, watched_routes},
    netns::NetNs,
    portguard_bin, require_root,
};
use serde_json::Value;

fn check(ns: &NetNs, policy: &std::path::Path, extra: &[&str]) -> (i32, Value) {
    check_json(ns.name(), policy, extra)
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
    // Only the running agent sees who commits: check says it does not know.
    assert!(f["committer"].is_null(), "{f:#}");

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

/// Where `portguard` runs under `ip netns exec NS`, `/sys` is remounted and
/// the cgroup v2 hierarchy is not visible. The NAT finding is still listed,
/// the exit code says "findings", and the owner kinds that could not be
/// resolved are named (text and JSON).
#[test]
fn ip_netns_exec_without_cgroup2_still_reports_nat_findings() {
    require_root();
    let ns = NetNs::new("pg-chk-nocg");
    let client = NetNs::new("pg-chk-nocg-c");
    ns.link(&client, "198.51.100.1/24", "198.51.100.2/24");
    ns.exec([
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        "203.0.113.9:80",
    ]);
    // The premise: no cgroup2 mount where the command runs.
    let mounts = ns.exec(["cat", "/proc/self/mountinfo"]);
    assert!(
        !mounts.lines().any(|l| l.contains(" - cgroup2 ")),
        "ip netns exec left a cgroup2 mount visible, this test proves nothing here:\n{mounts}"
    );
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[ports]]\nport = 80\nowner = \"docker\"\n\
         [[ports]]\nport = 8443\nowner = \"unit:pg-web.service\"\n",
    )
    .unwrap();

    let out = ns
        .command([
            portguard_bin().as_os_str(),
            "check".as_ref(),
            "--config".as_ref(),
        ])
        .arg(&policy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stdout: {text}\nstderr: {err}");
    assert!(
        text.contains("203.0.113.9:80") && text.contains("ACTIVE (prerouting)"),
        "the DNAT is listed: {text}"
    );
    assert!(text.contains("committed by: unknown"), "{text}");
    assert!(
        text.contains(
            "cgroup v2 not visible here: unit:/cgroup: owners and listener cgroups unknown"
        ),
        "{text}"
    );
    assert!(text.contains("unit:pg-web.service tcp/8443"), "{text}");

    let out = ns
        .command([
            portguard_bin().as_os_str(),
            "check".as_ref(),
            "--json".as_ref(),
            "--config".as_ref(),
        ])
        .arg(&policy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &v["findings"][0];
    assert_eq!(f["target"], "203.0.113.9:80", "{v:#}");
    assert_eq!(f["active"], true, "{v:#}");
    assert_eq!(
        v["unknown"]["owner_kinds"],
        serde_json::json!(["unit", "cgroup"])
    );
    assert_eq!(
        v["unknown"]["unresolved_owners"],
        serde_json::json!(["unit:pg-web.service tcp/8443"])
    );
    assert_eq!(v["unknown"]["listener_cgroups_unknown"], true);

    // Clean is clean there too: exit 0, and still says what it could not know.
    ns.exec(["iptables", "-t", "nat", "-F", "PREROUTING"]);
    let out = ns
        .command([
            portguard_bin().as_os_str(),
            "check".as_ref(),
            "--config".as_ref(),
        ])
        .arg(&policy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("cgroup v2 not visible here"), "{text}");
}

/// `listeners` in a private mount namespace whose cgroup v2 mount is gone
/// (`unshare --mount`, then `umount` there: the host's mounts are untouched).
/// The test's own socket on a port owned by a unit is "unknown", not a
/// stranger (exit 0), and the unit is named; with the hierarchy visible the
/// same socket is a stranger (exit 1).
#[test]
fn listeners_without_cgroup2_name_what_they_cannot_know() {
    require_root();
    let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("[[ports]]\nport = {port}\nowner = \"unit:pg-absent.service\"\n"),
    )
    .unwrap();
    let me = std::process::id();
    let holder = |v: &Value| -> Value {
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["port"] == port && h["pid"] == me)
            .cloned()
            .unwrap_or_else(|| panic!("this test's socket on {port} is listed: {v:#}"))
    };

    let seen = Command::new(portguard_bin())
        .args(["listeners", "--json", "--config"])
        .arg(&policy)
        .output()
        .unwrap();
    assert_eq!(seen.status.code(), Some(1), "{seen:?}");
    let v: Value = serde_json::from_slice(&seen.stdout).unwrap();
    assert_eq!(holder(&v)["ownership"], "stranger", "{v:#}");
    assert!(v["unknown"].is_null(), "{v:#}");

    // Every cgroup2 mount point, unmounted inside a private mount namespace only.
    let script = format!(
        "set -eu
         for m in $(awk '/ - cgroup2 / {{print $5}}' /proc/self/mountinfo | sort -r); do umount \"$m\"; done
         ! grep -q ' - cgroup2 ' /proc/self/mountinfo
         exec {} listeners --json --config {}",
        portguard_bin().display(),
        policy.display()
    );
    let blind = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&blind.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&blind.stdout),
            String::from_utf8_lossy(&blind.stderr)
        )
    });
    assert_eq!(blind.status.code(), Some(0), "{v:#}");
    assert_eq!(holder(&v)["ownership"], "unknown", "{v:#}");
    assert_eq!(
        v["unknown"]["unresolved_owners"],
        serde_json::json!([format!("unit:pg-absent.service tcp/{port}")])
    );
    // The host still has its hierarchy.
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(host.lines().any(|l| l.contains(" - cgroup2 ")), "{host}");
    drop(sock);
}

/// With `remove_crds = true`, `check` says what deleting HelmChart
/// `traefik-crd` would take with it, counted in the cluster now (recorded k3s
/// answers: 18 CRDs of the release, 4 objects), and writes nothing there.
#[test]
fn remove_crds_is_warned_with_what_it_would_delete() {
    require_root();
    let ns = NetNs::new("pg-chk-crd");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[ports]]\nport = 80\nowner = \"docker\"\n\
         [kubernetes]\non_claim = \"remove\"\nremove_crds = true\n",
    )
    .unwrap();
    let api = RecordedApi::start(traefik_crd_count_routes());
    let kubeconfig = api.kubeconfig(dir.path());
    let kubeconfig = kubeconfig.to_str().unwrap();

    let (code, v) = check(&ns, &policy, &["--kubeconfig", kubeconfig]);
    assert_eq!(code, 0, "a warning is not a finding: {v:#}");
    let counted = &v["crd_removal"]["counted"];
    assert_eq!(counted["crds"].as_array().map(Vec::len), Some(18), "{v:#}");
    let objects: u64 = counted["crds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["objects"].as_u64().unwrap())
        .sum();
    assert_eq!(objects, 4);

    let out = Command::new(portguard_bin())
        .args([
            "check",
            "--netns",
            ns.name(),
            "--kubeconfig",
            kubeconfig,
            "--config",
        ])
        .arg(&policy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "warning: remove_crds = true: deleting HelmChart kube-system/traefik-crd uninstalls \
             18 CRD(s) and with them 4 object(s) in every namespace: 2 IngressRoute"
        ) && text.contains("no audit record can bring these back"),
        "{text}"
    );
    assert!(
        api.requests().iter().all(|r| r.method == "GET"),
        "{:#?}",
        api.requests()
    );

    // Without remove_crds nothing is counted or said.
    std::fs::write(
        &policy,
        "[[ports]]\nport = 80\nowner = \"docker\"\n[kubernetes]\non_claim = \"remove\"\n",
    )
    .unwrap();
    let before = api.requests().len();
    let (code, v) = check(&ns, &policy, &["--kubeconfig", kubeconfig]);
    assert_eq!(code, 0);
    assert!(v["crd_removal"].is_null(), "{v:#}");
    assert_eq!(
        api.requests().len(),
        before,
        "no request without remove_crds"
    );

    // An unreachable cluster: the warning still stands, saying it could not count.
    std::fs::write(
        &policy,
        "[[ports]]\nport = 80\nowner = \"docker\"\n\
         [kubernetes]\non_claim = \"remove\"\nremove_crds = true\n",
    )
    .unwrap();
    let (_, v) = check(&ns, &policy, &["--kubeconfig", "/nonexistent/k3s.yaml"]);
    let why = v["crd_removal"]["uncounted"].as_str().unwrap_or_default();
    assert!(why.contains("/nonexistent/k3s.yaml"), "{v:#}");
}
