//! The recorded k3s answers are what k3s and helm-controller write.
//!
//! No API server runs here, so the Kubernetes tests stand on the fixtures in
//! `tests/fixtures/k3s/`. These tests hold the fixtures to the rules of the
//! code that writes the real objects (each rule names its source; see also
//! `tests/fixtures/k3s/SOURCES.md`), so a fixture edited by hand into a shape
//! k3s never returns fails here instead of quietly proving the wrong thing.

use std::{collections::BTreeSet, io::Read};

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use portguard_tests::k8s_api::fixture_json;
use serde_json::Value;
use sha1::{Digest, Sha1};

const ID: &str = "objectset.rio.cattle.io/id";
const OWNER_GVK: &str = "objectset.rio.cattle.io/owner-gvk";
const OWNER_NAME: &str = "objectset.rio.cattle.io/owner-name";
const OWNER_NAMESPACE: &str = "objectset.rio.cattle.io/owner-namespace";
const HASH: &str = "objectset.rio.cattle.io/hash";
const APPLIED: &str = "objectset.rio.cattle.io/applied";
const SVCNAME: &str = "svccontroller.k3s.cattle.io/svcname";
const SVCNAMESPACE: &str = "svccontroller.k3s.cattle.io/svcnamespace";

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

/// Every object a wrangler apply wrote (k3s's deploy controller for the
/// packaged HelmCharts, ServiceLB for its DaemonSets) in the fixtures.
fn applied_objects() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for file in [
        "daemonset.svclb-traefik-3f3ed2e1.json",
        "helmchart.traefik.json",
        "helmchart.traefik-crd.json",
        "helmchart.traefik.deleting.json",
        "helmchart.traefik-crd.deleting.json",
    ] {
        out.push((file.to_owned(), fixture_json(file)));
    }
    let list = fixture_json("daemonsets.kube-system.list.json");
    for item in list["items"].as_array().expect("items") {
        // Items of a list answer carry no kind: the list's kind names them.
        assert!(item.get("kind").is_none());
        let mut item = item.clone();
        item["kind"] = list["kind"]
            .as_str()
            .and_then(|k| k.strip_suffix("List"))
            .expect("a ...List")
            .into();
        out.push(("daemonsets.kube-system.list.json".to_owned(), item));
    }
    out
}

/// wrangler `pkg/apply/desiredset_apply.go` (`GetLabelsAndAnnotations`,
/// `objectSetHash`): the hash label is the SHA-1 of the set ID, owner GVK,
/// owner name and owner namespace, written one after the other; and
/// `desiredset_compare.go` (`appliedToAnnotation`): the applied annotation is
/// the applied object as gzip, in base64 without padding.
#[test]
fn objects_written_by_a_wrangler_apply_carry_its_hash_and_applied_annotation() {
    let objects = applied_objects();
    assert!(objects.len() >= 5);
    for (file, obj) in objects {
        let meta = &obj["metadata"];
        let ann = &meta["annotations"];
        let mut dig = Sha1::new();
        for key in [ID, OWNER_GVK, OWNER_NAME, OWNER_NAMESPACE] {
            dig.update(str_of(&ann[key], key).as_bytes());
        }
        let want: String = dig.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(meta["labels"][HASH], want.as_str(), "{file}: hash label");
        // k3s v1.30 applies both with an empty set ID (cloudprovider.go's
        // `apply.NewForConfig`, deploy's apply without `WithSetID`).
        assert_eq!(ann[ID], "", "{file}: set ID");

        let b64 = str_of(&ann[APPLIED], APPLIED);
        assert!(!b64.ends_with('='), "{file}: RawStdEncoding has no padding");
        let gz = STANDARD_NO_PAD
            .decode(b64)
            .unwrap_or_else(|e| panic!("{file}: applied annotation is not base64: {e}"));
        let mut json = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut json)
            .unwrap_or_else(|e| panic!("{file}: applied annotation is not gzip: {e}"));
        let applied: Value = serde_json::from_str(&json).expect("applied is JSON");
        assert_eq!(applied["kind"], obj["kind"], "{file}");
        assert_eq!(applied["metadata"]["name"], meta["name"], "{file}");
        assert_eq!(
            applied["metadata"]["namespace"], meta["namespace"],
            "{file}"
        );
        assert_eq!(applied["metadata"]["labels"][HASH], want.as_str(), "{file}");
        assert!(
            applied["metadata"]["annotations"].get(APPLIED).is_none(),
            "{file}: the applied copy never holds itself"
        );
    }
}

/// k3s `pkg/cloudprovider/servicelb.go` (`newDaemonSet`, `generateName`) and
/// `cloudprovider.go` (no owner references: the apply only annotates its owner).
#[test]
fn the_servicelb_daemonset_is_the_one_newdaemonset_builds_for_the_traefik_service() {
    let svc = fixture_json("service.traefik.json");
    let ds = fixture_json("daemonset.svclb-traefik-3f3ed2e1.json");
    let listed = fixture_json("daemonsets.kube-system.list.json")["items"][0].clone();
    assert_eq!(
        without_type_meta(&ds),
        listed,
        "the GET and the LIST answers agree"
    );

    let uid = str_of(&svc["metadata"]["uid"], "uid");
    let svc_name = str_of(&svc["metadata"]["name"], "name");
    assert_eq!(
        ds["metadata"]["name"],
        format!("svclb-{svc_name}-{}", &uid[..8]).as_str()
    );
    assert_eq!(ds["metadata"]["namespace"], "kube-system");
    assert!(ds["metadata"].get("ownerReferences").is_none());
    let labels = &ds["metadata"]["labels"];
    assert_eq!(labels[SVCNAME], svc["metadata"]["name"]);
    assert_eq!(labels[SVCNAMESPACE], svc["metadata"]["namespace"]);
    assert_eq!(
        ds["metadata"]["annotations"][OWNER_GVK],
        "/v1, Kind=Service"
    );
    assert_eq!(
        ds["metadata"]["annotations"][OWNER_NAME],
        svc["metadata"]["name"]
    );

    let local = svc["spec"]["externalTrafficPolicy"] == "Local";
    let cluster_ips: Vec<&str> = svc["spec"]["clusterIPs"]
        .as_array()
        .expect("clusterIPs")
        .iter()
        .map(|v| str_of(v, "clusterIP"))
        .collect();
    let ports = svc["spec"]["ports"].as_array().expect("ports");
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), ports.len());
    for (port, c) in ports.iter().zip(containers) {
        let p = port["port"].as_u64().expect("port");
        let proto = str_of(&port["protocol"], "protocol").to_lowercase();
        assert_eq!(c["name"], format!("lb-{proto}-{p}").as_str());
        assert_eq!(c["ports"][0]["hostPort"], p);
        assert_eq!(c["ports"][0]["containerPort"], p);
        let env = |name: &str| {
            c["env"]
                .as_array()
                .expect("env")
                .iter()
                .find(|e| e["name"] == name)
                .unwrap_or_else(|| panic!("env {name}"))
                .clone()
        };
        assert_eq!(env("SRC_PORT")["value"], p.to_string().as_str());
        if local {
            assert_eq!(
                env("DEST_PORT")["value"],
                port["nodePort"].to_string().as_str()
            );
            assert!(env("DEST_IPS")["valueFrom"].is_object());
        } else {
            assert_eq!(env("DEST_PORT")["value"], p.to_string().as_str());
            assert_eq!(env("DEST_IPS")["value"], cluster_ips.join(",").as_str());
        }
    }
}

/// k3s `servicelb.go` (`getStatus`, `podIPs`): one ingress address per node
/// running a ready svclb pod of the Service, sorted; and every svclb pod's
/// containers are its DaemonSet's.
#[test]
fn the_traefik_ingress_addresses_are_the_nodes_running_its_ready_svclb_pods() {
    let ds = fixture_json("daemonset.svclb-traefik-3f3ed2e1.json");
    let pods = fixture_json("pods.list.json");
    let svclb: Vec<&Value> = pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|p| p["metadata"]["labels"][SVCNAME] == "traefik")
        .collect();
    assert!(!svclb.is_empty());
    let mut node_ips = Vec::new();
    for pod in &svclb {
        assert_eq!(
            pod["spec"]["containers"].as_array().map(Vec::len),
            ds["spec"]["template"]["spec"]["containers"]
                .as_array()
                .map(Vec::len)
        );
        for (pc, dc) in pod["spec"]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .zip(
                ds["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .expect("c"),
            )
        {
            assert_eq!(pc["env"], dc["env"], "pod env is the template's");
            assert_eq!(pc["ports"], dc["ports"]);
        }
        let ready = pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        assert!(ready, "{}", pod["metadata"]["name"]);
        node_ips.push(str_of(&pod["status"]["hostIP"], "hostIP").to_owned());
    }
    let nodes: BTreeSet<&str> = svclb
        .iter()
        .map(|p| str_of(&p["spec"]["nodeName"], "nodeName"))
        .collect();
    assert_eq!(
        nodes.len(),
        svclb.len(),
        "a DaemonSet runs one pod per node"
    );
    assert_eq!(ds["status"]["numberReady"], svclb.len() as u64);
    node_ips.sort();

    for file in ["service.traefik.json", "service.traefik.deleted.json"] {
        let svc = fixture_json(file);
        let ingress: Vec<String> = svc["status"]["loadBalancer"]["ingress"]
            .as_array()
            .expect("ingress")
            .iter()
            .map(|i| str_of(&i["ip"], "ip").to_owned())
            .collect();
        assert_eq!(ingress, node_ips, "{file}");
    }
    let listed = fixture_json("services.list.json");
    let traefik = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|s| s["metadata"]["name"] == "traefik")
        .expect("traefik in the list");
    assert_eq!(
        traefik,
        &without_type_meta(&fixture_json("service.traefik.json"))
    );
}

/// helm-controller `pkg/controllers/chart/chart.go` (`OnChange`: JobCreated
/// True and Failed False; `shouldManage`: the managed-by annotation on every
/// chart it takes; the `on-helm-chart-remove` remove handler's finalizer) and
/// k3s `manifests/traefik.yaml` (the specs).
#[test]
fn helmcharts_carry_what_helm_controller_writes() {
    for file in [
        "helmchart.traefik.json",
        "helmchart.traefik-crd.json",
        "helmchart.traefik.deleting.json",
        "helmchart.traefik-crd.deleting.json",
        "helmchart.traefik.user.json",
    ] {
        let chart = fixture_json(file);
        let name = str_of(&chart["metadata"]["name"], "name");
        assert_eq!(
            chart["metadata"]["finalizers"],
            serde_json::json!(["wrangler.cattle.io/on-helm-chart-remove"]),
            "{file}"
        );
        assert_eq!(
            chart["metadata"]["annotations"]["helmcharts.cattle.io/managed-by"], "helm-controller",
            "{file}"
        );
        let status = &chart["status"];
        assert_eq!(status["jobName"], format!("helm-install-{name}").as_str());
        let conditions: Vec<(&str, &str)> = status["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| (str_of(&c["type"], "type"), str_of(&c["status"], "status")))
            .collect();
        assert_eq!(
            conditions,
            [("JobCreated", "True"), ("Failed", "False")],
            "{file}"
        );
        let chart_url = str_of(&chart["spec"]["chart"], "chart");
        assert!(
            chart_url.starts_with("https://%{KUBERNETES_API}%/static/charts/")
                && chart_url.ends_with("-27.0.201+up27.0.2.tgz"),
            "{file}: {chart_url}"
        );
    }
    let traefik = fixture_json("helmchart.traefik.json");
    let deleting = fixture_json("helmchart.traefik.deleting.json");
    assert_eq!(traefik["metadata"]["uid"], deleting["metadata"]["uid"]);
    assert_eq!(traefik["spec"], deleting["spec"]);
    assert_eq!(deleting["metadata"]["deletionGracePeriodSeconds"], 0);
    assert!(deleting["metadata"]["deletionTimestamp"].is_string());
    assert!(traefik["metadata"].get("deletionTimestamp").is_none());
    let crd = fixture_json("helmchart.traefik-crd.json");
    let crd_deleting = fixture_json("helmchart.traefik-crd.deleting.json");
    assert_eq!(crd["metadata"]["uid"], crd_deleting["metadata"]["uid"]);
    assert_eq!(crd["spec"], crd_deleting["spec"]);
    assert!(crd_deleting["metadata"]["deletionTimestamp"].is_string());
    // The CRD chart has no values (manifests/traefik.yaml); Traefik's has them.
    assert!(
        fixture_json("helmchart.traefik-crd.json")["spec"]
            .get("valuesContent")
            .is_none()
    );
    assert!(str_of(&traefik["spec"]["valuesContent"], "values").contains("publishedService"));
    // A user's own chart carries none of the deploy controller's annotations.
    let user = fixture_json("helmchart.traefik.user.json");
    assert!(user["metadata"]["annotations"].get(OWNER_GVK).is_none());
    assert!(user["metadata"]["labels"].get(HASH).is_none());
}

/// An object as a list answer holds it: without `kind` and `apiVersion`.
fn without_type_meta(obj: &Value) -> Value {
    let mut obj = obj.clone();
    let map = obj.as_object_mut().expect("an object");
    map.remove("kind");
    map.remove("apiVersion");
    obj
}
