//! The Kubernetes layer against recorded k3s API responses.
//!
//! No Kubernetes API server can be installed on these machines, so the client
//! talks to `RecordedApi`: a local HTTP/1.1 server on 127.0.0.1 that answers with
//! the fixtures in `tests/fixtures/k3s/` (k3s v1.30 answers: the traefik
//! LoadBalancer Service, ServiceLB's svclb-traefik DaemonSet and pods, the
//! HelmCharts traefik and traefik-crd, watch event streams, 401/403/404 Status).
//! Everything below runs the real kube client, real watchers and real requests;
//! only the server is a stand-in.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use portguard::{
    k8s::{
        ClaimVia, ClusterError, ClusterState, ClusterView, NodeIdentity, RemovalStep, cluster,
        crd_impact, remove, spawn_watches,
    },
    policy::{
        KubeKind, KubeObjectName, KubernetesPolicy, OnClaim, Policy, PolicySource, ProtectedPort,
    },
};
use portguard_tests::k8s_api::{
    Answer, RecordedApi, SVCLB, SVCLB_TRAEFIK_SELECTOR, apps, core, fixture_json, helm,
    traefik_crd_count_routes, traefik_delete_paths, traefik_removal_routes, watched_routes,
    write_kubeconfig,
};

/// Runs the packaged Traefik's `remove` plan against `api`, every record accepted.
fn remove_traefik(api: &RecordedApi, remove_crds: bool) -> Vec<RemovalStep> {
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        remove::remove(
            &client,
            &traefik_plan(remove_crds),
            |_| Ok::<(), String>(()),
        )
        .await
        .expect("plan resolves")
    })
}

/// The packaged Traefik's plan: `remove`, with or without `remove_crds`.
fn traefik_plan(remove_crds: bool) -> remove::RemovalPlan {
    remove::k3s_traefik_plan(&KubernetesPolicy {
        on_claim: OnClaim::Remove,
        remove_crds,
        ..Default::default()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn protected_ports() -> Vec<ProtectedPort> {
    Policy::parse(
        "[[ports]]\nport = 80\nowner = \"docker\"\n[[ports]]\nport = 443\nowner = \"docker\"\n\
         [[ports]]\nport = 8443\nowner = \"docker\"\n",
        PolicySource::Embedded,
    )
    .expect("test policy")
    .ports
}

fn node() -> NodeIdentity {
    NodeIdentity {
        name: "k3s-node-a".into(),
        addresses: ["198.51.100.10".parse().expect("ip")].into(),
    }
}

fn name(s: &str) -> KubeObjectName {
    s.parse().expect("object name")
}

/// The cluster as k3s leaves it after a default install, seen by a watcher.
fn watched_cluster() -> RecordedApi {
    RecordedApi::start(watched_routes())
}

/// Waits for the view to satisfy `done`; panics with the last view on timeout.
async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<ClusterView>,
    done: impl Fn(&ClusterView) -> bool,
) -> ClusterView {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        {
            let view = rx.borrow_and_update();
            if done(&view) {
                return view.clone();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, rx.changed()).await.is_err() {
            panic!("timed out; last view: {:#?}", *rx.borrow());
        }
    }
}

#[test]
fn probe_reads_the_k3s_version_with_the_kubeconfig_token() {
    let api = watched_cluster();
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let version = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        cluster::probe(&client).await.expect("probe")
    });
    assert_eq!(version, "v1.30.6+k3s1");
    let seen = api.requests();
    assert_eq!(seen[0].path, "/version");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer recorded-token")
    );
}

#[test]
fn watches_find_traefik_loadbalancer_svclb_hostports_and_a_watched_external_ip() {
    let api = watched_cluster();
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let rt = runtime();
    // The watch lives to the end of the test: dropping it aborts the watches,
    // and the Pod watch request below may still be on its way.
    let (view, _watch) = rt.block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        let mut watch = spawn_watches(client, node(), protected_ports());
        // The edge Service only arrives as an ADDED event on the watch stream.
        let view = wait_for(&mut watch.view, |v| {
            v.state == ClusterState::Watching && v.claims.iter().any(|c| c.object.name == "edge")
        })
        .await;
        (view, watch)
    });

    let shown: BTreeSet<String> = view.claims.iter().map(ToString::to_string).collect();
    let expected: BTreeSet<String> = [
        "tcp/80 claimed by kube-system/service/traefik via LoadBalancer ingress 198.51.100.10",
        "tcp/443 claimed by kube-system/service/traefik via LoadBalancer ingress 198.51.100.10",
        "tcp/80 claimed by kube-system/pod/svclb-traefik-3f3ed2e1-x7k2p via hostPort of container lb-tcp-80 (→ 80), \
         controller kube-system/daemonset/svclb-traefik-3f3ed2e1, for kube-system/service/traefik",
        "tcp/443 claimed by kube-system/pod/svclb-traefik-3f3ed2e1-x7k2p via hostPort of container lb-tcp-443 (→ 443), \
         controller kube-system/daemonset/svclb-traefik-3f3ed2e1, for kube-system/service/traefik",
        "tcp/8443 claimed by web/service/edge via externalIP 198.51.100.10",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    // Not claims: the ingress IP 203.0.113.20 is k3s-node-b's, and so are the
    // hostPorts of the svclb pod running there; the kubernetes Service is
    // ClusterIP; Traefik's own pod has containerPort 8443 but no hostPort.
    assert_eq!(shown, expected);
    assert!(
        view.claims
            .iter()
            .filter(|c| c.object.namespace == "kube-system")
            .all(|c| c.packaged_traefik),
        "{:#?}",
        view.claims
    );
    assert!(
        view.claims
            .iter()
            .any(|c| matches!(c.via, ClaimVia::HostPort { .. }))
    );

    // The DNAT targets link back to the objects.
    let lookup = |ip: &str| {
        view.pods
            .lookup_target(ip.parse::<IpAddr>().expect("ip"))
            .cloned()
    };
    let traefik = lookup("10.42.0.9").expect("traefik pod IP");
    assert_eq!(
        traefik.pod,
        name("kube-system/pod/traefik-5d45fc8cc9-w2xj9")
    );
    assert_eq!(
        traefik.controller,
        Some(name("kube-system/deployment/traefik"))
    );
    assert_eq!(traefik.services, [name("kube-system/service/traefik")]);
    assert_eq!(
        traefik.to_string(),
        "pod kube-system/traefik-5d45fc8cc9-w2xj9 (kube-system/deployment/traefik), Service kube-system/traefik"
    );
    let svclb = lookup("10.42.0.8").expect("svclb pod IP");
    assert_eq!(
        svclb.controller,
        Some(name(&format!("kube-system/daemonset/{SVCLB}")))
    );
    assert_eq!(svclb.services, [name("kube-system/service/traefik")]);
    assert!(
        lookup("10.42.0.6").is_none(),
        "a finished helm job pod holds nothing"
    );

    // Watched, not polled: one list and at least one watch per resource. The
    // view is ready once the lists are in; a watch request follows its list
    // a moment later (the watcher opens it after handing over the list).
    let deadline = Instant::now() + Duration::from_secs(5);
    let watching = |seen: &[portguard_tests::k8s_api::SeenRequest]| {
        ["/api/v1/services", "/api/v1/pods"]
            .iter()
            .all(|p| seen.iter().any(|r| r.path == *p && r.is_watch()))
    };
    while !watching(&api.requests()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = api.requests();
    for path in ["/api/v1/services", "/api/v1/pods"] {
        assert!(
            seen.iter().any(|r| r.path == path && !r.is_watch()),
            "no list of {path}"
        );
        assert!(
            seen.iter().any(|r| r.path == path && r.is_watch()),
            "no watch of {path}"
        );
    }
    assert!(
        seen.iter().all(|r| r.method == "GET"),
        "watching changed something: {seen:#?}"
    );
}

/// The k3s-default cluster for removal: every object of the packaged Traefik.
fn removable_cluster(helmchart_crd_present: bool) -> RecordedApi {
    RecordedApi::start(traefik_removal_routes(helmchart_crd_present))
}

#[test]
fn traefik_removal_records_each_manifest_whole_then_deletes_exactly_those_objects() {
    let api = removable_cluster(true);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let mut records: Vec<(KubeObjectName, serde_json::Value, usize)> = Vec::new();
    let steps = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        remove::remove(&client, &traefik_plan(true), |recorded| {
            // Written before its DELETE: count the DELETEs the server has seen so far.
            let deletes = api
                .requests()
                .iter()
                .filter(|r| r.method == "DELETE")
                .count();
            records.push((recorded.object.clone(), recorded.manifest.clone(), deletes));
            Ok::<(), String>(())
        })
        .await
        .expect("plan resolves")
    });

    assert_eq!(api.paths_of("DELETE"), traefik_delete_paths(true));
    // ServiceLB's DaemonSet is found by the labels ServiceLB writes for this
    // Service, never by a name prefix (which a user's `traefik-internal` shares).
    let list = api
        .requests()
        .into_iter()
        .find(|r| r.method == "GET" && r.path == apps("daemonsets"))
        .expect("the DaemonSets listed");
    assert!(
        list.query.split('&').any(|kv| kv == SVCLB_TRAEFIK_SELECTOR),
        "{}",
        list.query
    );
    assert_eq!(steps.len(), 4);
    assert!(
        steps
            .iter()
            .all(|s| matches!(s, RemovalStep::Removed { .. })),
        "{steps:#?}"
    );

    let fixtures = [
        "service.traefik.json".to_owned(),
        format!("daemonset.{SVCLB}.json"),
        "helmchart.traefik.json".to_owned(),
        "helmchart.traefik-crd.json".to_owned(),
    ];
    assert_eq!(records.len(), 4);
    for (i, ((object, manifest, deletes_before), fixture)) in
        records.iter().zip(&fixtures).enumerate()
    {
        assert_eq!(
            *deletes_before, i,
            "{object} was recorded after a later DELETE"
        );
        // Whole: byte-for-byte the same JSON value the API returned.
        assert_eq!(
            manifest,
            &fixture_json(fixture),
            "{object} not recorded whole"
        );
    }
    assert_eq!(records[0].0.kind, KubeKind::Service);
    assert_eq!(records[1].0.kind, KubeKind::DaemonSet);

    // Each DELETE carries the recorded uid as a precondition.
    for request in api.requests().iter().filter(|r| r.method == "DELETE") {
        let body: serde_json::Value =
            serde_json::from_str(&request.body).expect("delete body is JSON");
        let uid = body.pointer("/preconditions/uid").and_then(|u| u.as_str());
        assert!(
            uid.is_some_and(|u| !u.is_empty()),
            "{}: {body}",
            request.path
        );
    }
    let service_delete = api
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE" && r.path == core("services/traefik"))
        .expect("service delete");
    assert!(
        service_delete
            .body
            .contains("3f3ed2e1-7c4a-4b7e-9a55-2f1d0c8e6b21")
    );
}

/// Without `remove_crds` the CRD chart is neither read nor deleted: its
/// uninstall would take every Traefik custom resource in the cluster along.
#[test]
fn traefik_crd_is_left_alone_unless_remove_crds() {
    let api = removable_cluster(true);
    let steps = remove_traefik(&api, false);
    assert_eq!(steps.len(), 3, "{steps:#?}");
    assert_eq!(api.paths_of("DELETE"), traefik_delete_paths(false));
    assert!(!api.requests().iter().any(|r| r.path == helm("traefik-crd")));
}

/// helm-controller's finalizer keeps a deleted HelmChart until its uninstall
/// job ran; the API answers the DELETE with the object, `deletionTimestamp`
/// set. A second run of the plan meanwhile records nothing and sends no
/// second DELETE.
#[test]
fn an_object_being_deleted_is_waited_for_not_deleted_again() {
    let mut routes = traefik_removal_routes(false);
    for r in &mut routes {
        if r.1 == helm("traefik") {
            r.2 = Answer::fixture(200, "helmchart.traefik.deleting.json");
        }
    }
    let api = RecordedApi::start(routes);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let mut recorded = Vec::new();
    let steps = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        remove::remove(&client, &traefik_plan(false), |r| {
            recorded.push(r.object.clone());
            Ok::<(), String>(())
        })
        .await
        .expect("plan resolves")
    });
    assert_eq!(
        steps[2],
        RemovalStep::BeingDeleted {
            object: name("kube-system/helmchart/traefik")
        }
    );
    assert!(!recorded.contains(&name("kube-system/helmchart/traefik")));
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.method == "DELETE" && r.path == helm("traefik")),
        "no second DELETE"
    );
}

/// Restoring ServiceLB's DaemonSet would leave an orphan beside the one
/// ServiceLB makes for the re-created Service: refused, nothing posted.
#[test]
fn restore_refuses_servicelbs_daemonset() {
    let api = RecordedApi::start(Vec::new());
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let manifest = fixture_json(&format!("daemonset.{SVCLB}.json"));
    let err = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        remove::restore(&client, &manifest)
            .await
            .expect_err("refused")
    });
    assert!(
        err.to_string().contains("restore the Service instead"),
        "{err}"
    );
    assert!(api.requests().is_empty(), "{:?}", api.requests());
}

#[test]
fn a_missing_helmchart_is_already_gone_and_not_deleted() {
    let api = removable_cluster(false);
    let steps = remove_traefik(&api, true);
    assert_eq!(steps.len(), 4);
    assert_eq!(
        steps[3],
        RemovalStep::AlreadyGone {
            object: name("kube-system/helmchart/traefik-crd")
        }
    );
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.method == "DELETE" && r.path == helm("traefik-crd"))
    );
}

#[test]
fn a_refused_record_deletes_nothing() {
    let api = removable_cluster(true);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let steps = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        remove::remove(&client, &traefik_plan(true), |_| Err("audit log is full"))
            .await
            .expect("plan resolves")
    });
    assert!(
        steps.iter().all(
            |s| matches!(s, RemovalStep::NotRecorded { error, .. } if error == "audit log is full")
        ),
        "{steps:#?}"
    );
    assert!(!api.requests().iter().any(|r| r.method == "DELETE"));
}

#[test]
fn restore_posts_the_manifest_without_server_owned_fields() {
    let api = RecordedApi::start([(
        "POST",
        core("services"),
        Answer::fixture(201, "service.traefik.json"),
    )]);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let recorded = fixture_json("service.traefik.json");
    let restored = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        remove::restore(&client, &recorded).await.expect("restore")
    });
    assert_eq!(restored, name("kube-system/service/traefik"));
    let posts: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1);
    let body: serde_json::Value = serde_json::from_str(&posts[0].body).expect("POST body is JSON");
    let meta = body.get("metadata").expect("metadata");
    for gone in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "managedFields",
    ] {
        assert!(meta.get(gone).is_none(), "{gone} was POSTed: {meta}");
    }
    assert!(body.get("status").is_none());
    assert_eq!(meta.get("labels"), recorded.pointer("/metadata/labels"));
    assert_eq!(
        body.get("spec"),
        recorded.get("spec"),
        "the spec goes back unchanged"
    );
    assert_eq!(body.get("kind").and_then(|k| k.as_str()), Some("Service"));
}

#[test]
fn forbidden_watch_is_a_failing_state_with_the_apis_message() {
    let api = RecordedApi::start([
        (
            "GET",
            "/api/v1/services".into(),
            Answer::fixture(403, "status.403.services.json"),
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
    ]);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let view = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        let mut watch = spawn_watches(client, node(), protected_ports());
        wait_for(&mut watch.view, |v| {
            matches!(v.state, ClusterState::Failing { .. })
        })
        .await
    });
    let ClusterState::Failing { error } = &view.state else {
        unreachable!()
    };
    assert!(matches!(error, ClusterError::Forbidden { .. }), "{error:?}");
    assert_eq!(
        view.state.to_string(),
        "failing: Kubernetes API forbids watching Services (403): services is forbidden: User \
         \"system:serviceaccount:default:portguard\" cannot list resource \"services\" in API group \"\" at the cluster scope"
    );
}

#[test]
fn rejected_credentials_and_unreachable_api_are_clear_states() {
    let api = RecordedApi::start([(
        "GET",
        "/version".into(),
        Answer::fixture(401, "status.401.json"),
    )]);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    // A port nothing listens on: bind one, note it, let it go.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let gone_dir = tempfile::tempdir().expect("temp dir");
    let unreachable = write_kubeconfig(gone_dir.path(), &format!("http://{closed}"));
    let (rejected, refused) = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        let rejected = cluster::probe(&client).await.expect_err("401 must fail");
        let client = cluster::connect(&unreachable).await.expect("client");
        let refused = cluster::probe(&client)
            .await
            .expect_err("closed port must fail");
        (rejected, refused)
    });
    assert_eq!(
        rejected.to_string(),
        "Kubernetes API rejected the credentials (401) while asking the server version: Unauthorized"
    );
    assert!(
        matches!(refused, ClusterError::Unreachable { .. }),
        "{refused:?}"
    );
    assert!(
        refused
            .to_string()
            .starts_with("Kubernetes API unreachable: asking the server version"),
        "{refused}"
    );
}

#[test]
fn recorded_fixtures_parse_as_k8s_openapi_types() {
    // The fixtures are only worth something if they are what the API sends:
    // every one must deserialize into the real types.
    use k8s_openapi::{
        List,
        api::{
            apps::v1::DaemonSet,
            core::v1::{Pod, Service},
        },
    };
    let _: List<Service> =
        serde_json::from_value(fixture_json("services.list.json")).expect("ServiceList");
    let _: List<Pod> = serde_json::from_value(fixture_json("pods.list.json")).expect("PodList");
    let _: List<DaemonSet> =
        serde_json::from_value(fixture_json("daemonsets.kube-system.list.json"))
            .expect("DaemonSetList");
    let _: Service = serde_json::from_value(fixture_json("service.traefik.json")).expect("Service");
    let _: DaemonSet = serde_json::from_value(fixture_json(&format!("daemonset.{SVCLB}.json")))
        .expect("DaemonSet");
    let _: List<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        serde_json::from_value(fixture_json("crds.list.json")).expect("CustomResourceDefinitionList");
}

#[test]
fn start_with_a_broken_kubeconfig_is_a_failing_state_not_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("k3s.yaml");
    std::fs::write(&bad, "clusters: [").expect("write");
    let policy = Policy::parse("", PolicySource::Embedded).expect("empty policy");
    let view = runtime().block_on(async {
        let watch = portguard::k8s::start(Some(&bad), &policy, node()).await;
        watch.view.borrow().clone()
    });
    let ClusterState::Failing { error } = &view.state else {
        panic!("expected Failing, got {:?}", view.state)
    };
    assert!(
        matches!(error, ClusterError::Kubeconfig { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with(&format!("kubeconfig {}: ", bad.display())),
        "{error}"
    );
}

/// `/apis/helm.cattle.io/v1/namespaces/kube-system/helmchartconfigs[/NAME]`
fn helm_config(name: Option<&str>) -> String {
    let base = "/apis/helm.cattle.io/v1/namespaces/kube-system/helmchartconfigs";
    name.map_or_else(|| base.to_owned(), |n| format!("{base}/{n}"))
}

/// The reconfigure remedy where no HelmChartConfig exists: it is recorded
/// first, then created (one GET, one POST, nothing deleted); the Service
/// becomes ClusterIP through k3s's own mechanism.
#[test]
fn reconfigure_creates_a_recorded_helmchartconfig_and_deletes_nothing() {
    use portguard::k8s::reconfigure::{self, ReconfigureStep};
    let api = RecordedApi::start([
        (
            "GET",
            helm_config(Some("traefik")),
            Answer::fixture(404, "status.404.helmchartconfig.json"),
        ),
        (
            "POST",
            helm_config(None),
            Answer::fixture(201, "helmchartconfig.traefik.portguard.json"),
        ),
    ]);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let mut recorded_before_post = None;
    let step = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        reconfigure::reconfigure(&client, &Default::default(), |m| {
            recorded_before_post = Some((m.clone(), api.paths_of("POST").len()));
            Ok::<(), String>(())
        })
        .await
    });
    assert!(matches!(step, ReconfigureStep::Created { .. }), "{step:?}");
    let (manifest, posts) = recorded_before_post.expect("recorded");
    assert_eq!(posts, 0, "recorded before the POST");
    let methods: Vec<(String, String)> = api
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        methods,
        [
            ("GET".to_owned(), helm_config(Some("traefik"))),
            ("POST".to_owned(), helm_config(None))
        ]
    );
    let post = api
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&post.body).unwrap();
    assert_eq!(
        body["spec"]["valuesContent"],
        "service:\n  type: ClusterIP\n"
    );
    assert_eq!(
        body["metadata"]["annotations"]["portguard.io/remedy"],
        "traefik service ClusterIP"
    );
    assert_eq!(body, manifest, "what was recorded is what was created");
}

/// Someone's own HelmChartConfig is never overwritten; ours already there
/// is not created twice.
#[test]
fn reconfigure_leaves_someone_elses_helmchartconfig_and_is_idempotent() {
    use portguard::k8s::reconfigure::{self, ReconfigureStep};
    for (fixture, want_ours) in [
        ("helmchartconfig.traefik.user.json", false),
        ("helmchartconfig.traefik.portguard.json", true),
    ] {
        let api = RecordedApi::start([(
            "GET",
            helm_config(Some("traefik")),
            Answer::fixture(200, fixture),
        )]);
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = api.kubeconfig(dir.path());
        let step = runtime().block_on(async {
            let client = cluster::connect(&kubeconfig).await.expect("client");
            reconfigure::reconfigure(&client, &Default::default(), |_| {
                Err::<(), _>("must not be recorded")
            })
            .await
        });
        if want_ours {
            assert_eq!(step, ReconfigureStep::AlreadyDone);
        } else {
            assert!(matches!(step, ReconfigureStep::NotOurs { .. }), "{step:?}");
        }
        assert!(
            api.requests().iter().all(|r| r.method == "GET"),
            "{:?}",
            api.requests()
        );
    }
}

/// Undo deletes exactly our HelmChartConfig (uid precondition), and refuses
/// one that is no longer ours.
#[test]
fn undoing_the_reconfiguration_deletes_only_ours() {
    use portguard::k8s::reconfigure;
    let manifest = reconfigure::traefik_config(&Default::default());
    for (fixture, ours) in [
        ("helmchartconfig.traefik.portguard.json", true),
        ("helmchartconfig.traefik.user.json", false),
    ] {
        let api = RecordedApi::start([
            (
                "GET",
                helm_config(Some("traefik")),
                Answer::fixture(200, fixture),
            ),
            (
                "DELETE",
                helm_config(Some("traefik")),
                Answer::fixture(200, fixture),
            ),
        ]);
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = api.kubeconfig(dir.path());
        let result = runtime().block_on(async {
            let client = cluster::connect(&kubeconfig).await.expect("client");
            reconfigure::undo(&client, &manifest).await
        });
        let deletes: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.method == "DELETE")
            .collect();
        if ours {
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(deletes.len(), 1);
            let body: serde_json::Value = serde_json::from_str(&deletes[0].body).unwrap();
            assert_eq!(
                body["preconditions"]["uid"],
                "6c0d2e7a-51b9-4f3e-9d8a-2b7c4e1f0a93"
            );
        } else {
            assert!(result.is_err());
            assert!(deletes.is_empty(), "someone else's is never deleted");
        }
    }
}

/// A `traefik` that is not k3s's packaged one (no HelmChart kube-system/traefik,
/// or one without k3s's addon annotations: a user's own release) is never
/// touched: not one DELETE, not one record.
#[test]
fn a_traefik_that_is_not_k3s_packaged_one_is_never_removed() {
    for helmchart in [
        Answer::fixture(404, "status.404.helmchart.json"),
        Answer::fixture(200, "helmchart.traefik.user.json"),
    ] {
        let mut routes = traefik_removal_routes(false);
        for r in &mut routes {
            if r.0 == "GET" && r.1 == helm("traefik") {
                r.2 = helmchart.clone();
            }
        }
        let api = RecordedApi::start(routes);
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = api.kubeconfig(dir.path());
        let mut records = 0;
        let result = runtime().block_on(async {
            let client = cluster::connect(&kubeconfig).await.expect("client");
            remove::remove(&client, &traefik_plan(false), |_| {
                records += 1;
                Ok::<(), String>(())
            })
            .await
        });
        let err = result.expect_err("refused");
        assert!(
            err.to_string().contains("not k3s's packaged Traefik"),
            "{err}"
        );
        assert_eq!(records, 0);
        assert!(api.paths_of("DELETE").is_empty(), "{:?}", api.requests());
    }
}

/// ServiceLB also runs DaemonSets for a user's LoadBalancer `traefik-internal`
/// (its name starts like the packaged one's) and for a user's own `traefik`
/// in namespace `web`. Even if the list answer held them (a server ignoring
/// the label selector), only the packaged Traefik's is read and deleted.
#[test]
fn servicelb_daemonsets_of_users_services_are_never_touched() {
    let mut list = fixture_json("daemonsets.kube-system.list.json");
    let ours = list["items"][0].clone();
    for (name, svc, ns) in [
        (
            "svclb-traefik-internal-1a2b3c4d",
            "traefik-internal",
            "kube-system",
        ),
        ("svclb-traefik-9f8e7d6c", "traefik", "web"),
    ] {
        let mut ds = ours.clone();
        ds["metadata"]["name"] = name.into();
        ds["metadata"]["uid"] = format!("{name}-uid").into();
        ds["metadata"]["labels"]["svccontroller.k3s.cattle.io/svcname"] = svc.into();
        ds["metadata"]["labels"]["svccontroller.k3s.cattle.io/svcnamespace"] = ns.into();
        list["items"].as_array_mut().unwrap().push(ds);
    }
    let mut routes = traefik_removal_routes(false);
    for r in &mut routes {
        if r.0 == "GET" && r.1 == apps("daemonsets") {
            r.2 = Answer {
                status: 200,
                body: serde_json::to_vec(&list).unwrap(),
                stream: false,
            };
        }
    }
    let api = RecordedApi::start(routes);
    let steps = remove_traefik(&api, false);
    assert_eq!(steps.len(), 3, "{steps:#?}");
    assert_eq!(api.paths_of("DELETE"), traefik_delete_paths(false));
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.path.contains("traefik-internal") || r.path.contains("9f8e7d6c")),
        "{:?}",
        api.requests()
    );
}

/// What `remove_crds = true` would destroy is counted from the CRDs of k3s's
/// `traefik-crd` Helm release only (never k3s's own CRDs or another
/// release's), kind by kind across namespaces, with GETs alone.
#[test]
fn remove_crds_impact_counts_the_objects_of_the_releases_crds_and_writes_nothing() {
    let api = RecordedApi::start(traefik_crd_count_routes());
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let impact = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        crd_impact::traefik_crd_impact(&client)
            .await
            .expect("counted")
    });
    assert_eq!(impact.crds.len(), 18, "{impact:#?}");
    assert_eq!(impact.objects(), 4);
    let counted: Vec<(&str, u64)> = impact
        .crds
        .iter()
        .filter(|c| c.objects > 0)
        .map(|c| (c.crd.as_str(), c.objects))
        .collect();
    assert_eq!(
        counted,
        [
            ("ingressroutes.traefik.io", 2),
            ("middlewares.traefik.io", 1),
            ("tlsoptions.traefik.containo.us", 1),
        ]
    );
    assert_eq!(
        impact.to_string(),
        "deleting HelmChart kube-system/traefik-crd uninstalls 18 CRD(s) and with them 4 object(s) \
         in every namespace: 2 IngressRoute (ingressroutes.traefik.io), 1 Middleware \
         (middlewares.traefik.io), 1 TLSOption (tlsoptions.traefik.containo.us)"
    );

    let seen = api.requests();
    assert!(seen.iter().all(|r| r.method == "GET"), "{seen:#?}");
    assert_eq!(
        seen[0].path,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    );
    let listed: BTreeSet<&str> = seen[1..].iter().map(|r| r.path.as_str()).collect();
    assert_eq!(listed.len(), 18, "each kind listed once: {listed:#?}");
    assert!(
        listed
            .iter()
            .all(|p| p.starts_with("/apis/traefik.io/v1alpha1/")
                || p.starts_with("/apis/traefik.containo.us/v1alpha1/")),
        "only the release's kinds: {listed:#?}"
    );
}

/// Without the right to list CRDs the count is refused with the API's own words.
#[test]
fn remove_crds_impact_without_rights_says_so() {
    let api = RecordedApi::start([(
        "GET",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions".to_owned(),
        Answer::fixture(403, "status.403.crds.json"),
    )]);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let err = runtime().block_on(async {
        let client = cluster::connect(&kubeconfig).await.expect("client");
        crd_impact::traefik_crd_impact(&client)
            .await
            .expect_err("forbidden")
    });
    let err = ClusterError::from_kube(err, "counting the objects of Traefik's CRDs");
    assert!(matches!(err, ClusterError::Forbidden { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("cannot list resource \"customresourcedefinitions\""),
        "{err}"
    );
}
