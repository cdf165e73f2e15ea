//! A stand-in Kubernetes API server on 127.0.0.1 that answers with recorded
//! k3s API responses (fixtures under `tests/fixtures/k3s/`) and records every
//! request it gets, so tests can assert exactly what the client asked for.
//!
//! No Kubernetes API server can be installed on these machines; this serves the
//! same bytes a k3s v1.30 API server answers, over plain HTTP/1.1. Watches are
//! served as the API does: newline-delimited `{"type":…,"object":…}` events on a
//! response that stays open (until the client goes away or the server stops).

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// One answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// Keep the response open after the body (a watch).
    pub stream: bool,
}

impl Answer {
    pub fn fixture(status: u16, name: &str) -> Self {
        Self {
            status,
            body: fixture(name),
            stream: false,
        }
    }

    pub fn watch(name: &str) -> Self {
        Self {
            status: 200,
            body: fixture(name),
            stream: true,
        }
    }
}

/// The bytes of one fixture file.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// A fixture parsed as JSON.
pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&fixture(name))
        .unwrap_or_else(|e| panic!("fixture {name} is not JSON: {e}"))
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k3s")
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub body: String,
}

impl SeenRequest {
    pub fn is_watch(&self) -> bool {
        self.query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
    }
}

type Routes = HashMap<(String, String), Answer>;

/// The running server; stops (and closes open watches) on drop.
pub struct RecordedApi {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl RecordedApi {
    /// Routes are (method, path) → answer; method "WATCH" is a GET with watch=true.
    /// Anything else gets the API's 404 Status.
    pub fn start(routes: impl IntoIterator<Item = (&'static str, String, Answer)>) -> Self {
        let routes: Routes = routes
            .into_iter()
            .map(|(m, p, a)| ((m.to_owned(), p), a))
            .collect();
        let routes = Arc::new(routes);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (routes, seen, stop) = (routes.clone(), seen.clone(), stop.clone());
                            std::thread::spawn(move || serve(conn, &routes, &seen, &stop));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            })
        };
        Self {
            addr,
            seen,
            stop,
            acceptor: Some(acceptor),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("request log").clone()
    }

    /// The paths of every `method` request so far, in arrival order.
    pub fn paths_of(&self, method: &str) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method)
            .map(|r| r.path)
            .collect()
    }

    /// Writes a kubeconfig for this server (bearer token `recorded-token`) into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        write_kubeconfig(dir, &self.url())
    }
}

impl Drop for RecordedApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// A kubeconfig for `server` in the shape k3s writes (/etc/rancher/k3s/k3s.yaml),
/// with a token instead of client certificates because the server is plain HTTP.
pub fn write_kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("k3s.yaml");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: {server}\n  name: default\n\
         contexts:\n- context:\n    cluster: default\n    user: default\n  name: default\n\
         current-context: default\npreferences: {{}}\nusers:\n- name: default\n  user:\n    token: recorded-token\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Status",
    }
}

fn not_found(path: &str) -> Answer {
    Answer {
        status: 404,
        body: format!(
            r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"the server could not find the requested resource ({path})","reason":"NotFound","details":{{}},"code":404}}"#
        )
        .into_bytes(),
        stream: false,
    }
}

/// One connection: one request, one answer, then close (watches stay open).
fn serve(conn: TcpStream, routes: &Routes, seen: &Mutex<Vec<SeenRequest>>, stop: &AtomicBool) {
    conn.set_nonblocking(false).expect("blocking conn");
    let mut reader = BufReader::new(conn.try_clone().expect("clone conn"));
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let (mut length, mut authorization) = (0usize, None);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((&header, ""));
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "authorization" => authorization = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("request body");
    let request = SeenRequest {
        method: method.clone(),
        path: path.to_owned(),
        query: query.to_owned(),
        authorization,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let key_method = if method == "GET" && request.is_watch() {
        "WATCH".to_owned()
    } else {
        method
    };
    seen.lock().expect("request log").push(request);
    let answer = routes
        .get(&(key_method, path.to_owned()))
        .cloned()
        .unwrap_or_else(|| not_found(path));
    let mut out = conn;
    let head = if answer.stream {
        // No length: the body runs until the connection closes, as a watch does.
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
            answer.status,
            reason(answer.status)
        )
    } else {
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            answer.status,
            reason(answer.status),
            answer.body.len()
        )
    };
    if out.write_all(head.as_bytes()).is_err() || out.write_all(&answer.body).is_err() {
        return;
    }
    let _ = out.flush();
    if answer.stream {
        // Hold the watch open until the client leaves or the server stops.
        out.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            match out.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    }
}

/// The packaged Traefik's ServiceLB DaemonSet in the fixtures.
pub const SVCLB: &str = "svclb-traefik-3f3ed2e1";

/// `/api/v1/namespaces/kube-system/PATH`
pub fn core(path: &str) -> String {
    format!("/api/v1/namespaces/kube-system/{path}")
}

/// `/apis/apps/v1/namespaces/kube-system/PATH`
pub fn apps(path: &str) -> String {
    format!("/apis/apps/v1/namespaces/kube-system/{path}")
}

/// The HelmChart `NAME` in kube-system.
pub fn helm(name: &str) -> String {
    format!("/apis/helm.cattle.io/v1/namespaces/kube-system/helmcharts/{name}")
}

/// The DELETEs that remove k3s's packaged Traefik, in the plan's order
/// (`traefik-crd` only with `remove_crds`).
pub fn traefik_delete_paths(remove_crds: bool) -> Vec<String> {
    let mut paths = vec![
        core("services/traefik"),
        apps(&format!("daemonsets/{SVCLB}")),
        helm("traefik"),
    ];
    if remove_crds {
        paths.push(helm("traefik-crd"));
    }
    paths
}

/// The label selector ServiceLB's DaemonSet for kube-system/traefik is listed
/// by (URL-encoded as kube sends it).
pub const SVCLB_TRAEFIK_SELECTOR: &str = "labelSelector=svccontroller.k3s.cattle.io%2Fsvcname%3Dtraefik%2Csvccontroller.k3s.cattle.io%2Fsvcnamespace%3Dkube-system";

/// One route: method (`WATCH` for a watch GET), path, answer.
pub type Route = (&'static str, String, Answer);

/// The cluster as k3s leaves it after a default install, as a watcher sees it.
pub fn watched_routes() -> Vec<Route> {
    vec![
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
    ]
}

/// Every object of k3s's packaged Traefik, fetchable and deletable
/// (HelmChart traefik-crd answers 404 unless `crd_present`).
pub fn traefik_removal_routes(crd_present: bool) -> Vec<Route> {
    let mut routes = vec![
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
        // helm-controller's finalizer holds a HelmChart: the DELETE answers
        // with the object, deletionTimestamp set.
        (
            "DELETE",
            helm("traefik"),
            Answer::fixture(200, "helmchart.traefik.deleting.json"),
        ),
    ];
    if crd_present {
        routes.push((
            "GET",
            helm("traefik-crd"),
            Answer::fixture(200, "helmchart.traefik-crd.json"),
        ));
        routes.push((
            "DELETE",
            helm("traefik-crd"),
            Answer::fixture(200, "helmchart.traefik-crd.deleting.json"),
        ));
    } else {
        routes.push((
            "GET",
            helm("traefik-crd"),
            Answer::fixture(404, "status.404.helmchart.json"),
        ));
    }
    routes
}

/// The CRD list, and each kind of k3s's `traefik-crd` release listed across
/// namespaces as `PartialObjectMetadataList` (what `list_metadata` asks for):
/// 2 IngressRoutes and 1 Middleware (traefik.io), 1 TLSOption
/// (traefik.containo.us), none of the other 15 kinds. Kinds of other CRDs have
/// no route: listing them answers 404.
pub fn traefik_crd_count_routes() -> Vec<Route> {
    let crds = fixture_json("crds.list.json");
    let mut routes = vec![(
        "GET",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions".to_owned(),
        Answer::fixture(200, "crds.list.json"),
    )];
    for crd in crds["items"].as_array().expect("items") {
        let ann = &crd["metadata"]["annotations"];
        if ann["meta.helm.sh/release-name"] != "traefik-crd" {
            continue;
        }
        let spec = &crd["spec"];
        let (group, plural) = (
            spec["group"].as_str().expect("group"),
            spec["names"]["plural"].as_str().expect("plural"),
        );
        let version = spec["versions"][0]["name"].as_str().expect("version");
        let file = format!("partialobjectmetadata.{plural}.{group}.json");
        let answer = if fixtures_dir().join(&file).exists() {
            Answer::fixture(200, &file)
        } else {
            Answer::fixture(200, "partialobjectmetadata.empty.json")
        };
        routes.push(("GET", format!("/apis/{group}/{version}/{plural}"), answer));
    }
    routes
}
