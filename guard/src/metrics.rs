//! Prometheus exposition (`prometheus-client`) and the health endpoints, on
//! 127.0.0.1:9464 by default.
//!
//! The HTTP side is a small HTTP/1.1 responder on tokio: three GET routes,
//! one request per connection. A scraper needs nothing more, and it keeps a
//! server framework out of a root daemon.
//!
//! The server is bounded, because anyone on the host can connect to it and
//! the agent's descriptors are shared with its netlink sockets: at most
//! [`MAX_CONNECTIONS`] connections are served at once (a connection beyond
//! that is closed the moment it is accepted, so it holds a descriptor for
//! microseconds and costs no task), the request head must arrive within
//! [`HEADER_TIMEOUT`], a connection that sends nothing for [`IDLE_TIMEOUT`]
//! is closed, and a whole exchange is cut off after [`REQUEST_TIMEOUT`]. Idle
//! connections therefore cannot exhaust descriptors or tasks, and a scraper
//! gets through as soon as an idle slot times out.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, warn};

/// Connections served at once; more are closed as soon as they are accepted.
/// A scraper uses one; the rest is headroom for curl and a second scraper.
pub const MAX_CONNECTIONS: usize = 32;
/// The whole request head must arrive within this long after the accept.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole exchange (head, answer, write) is cut off after this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request head accepted (answered 431 beyond).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The pause after a failed accept (EMFILE and friends), so the loop doesn't spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

use crate::types::Proto;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HijackLabels {
    pub port: u16,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub port: u16,
    pub proto: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub port: u16,
    pub url: String,
}

/// Every figure the agent exports. Update through the methods; they take
/// domain values, not label structs.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    hijacks_detected: Family<HijackLabels, Counter>,
    hijacks_removed: Family<HijackLabels, Counter>,
    owner_shadowed: Family<HijackLabels, Counter>,
    binds_denied: Family<PortLabels, Counter>,
    removal_latency: Histogram,
    inspection_time: Histogram,
    ringbuf_drops: Counter,
    ringbuf_seen: AtomicU64,
    probe_up: Family<ProbeLabels, Gauge>,
    owner_present: Family<PortLabels, Gauge>,
    audit_records: Counter,
    audit_write_failures: Counter,
    audit_writable: Gauge,
    foreign_pin_tables: Gauge,
    pins_withheld: Gauge,
    ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portguard");
        let m = Self {
            hijacks_detected: Family::default(),
            hijacks_removed: Family::default(),
            owner_shadowed: Family::default(),
            binds_denied: Family::default(),
            // 0.1 ms .. ~3 s: removal is expected in milliseconds.
            removal_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            inspection_time: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ringbuf_drops: Counter::default(),
            ringbuf_seen: AtomicU64::new(0),
            probe_up: Family::default(),
            owner_present: Family::default(),
            audit_records: Counter::default(),
            audit_write_failures: Counter::default(),
            audit_writable: Gauge::default(),
            foreign_pin_tables: Gauge::default(),
            pins_withheld: Gauge::default(),
            ready: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "hijacks_detected",
            "Foreign NAT rules found on a protected port",
            m.hijacks_detected.clone(),
        );
        registry.register(
            "hijacks_removed",
            "Foreign NAT rules removed from a protected port",
            m.hijacks_removed.clone(),
        );
        registry.register(
            "owner_shadowed",
            "Foreign rules found taking new connections to a protected port away \
             before the owner's mapping (accept, return, drop or goto ahead of it)",
            m.owner_shadowed.clone(),
        );
        registry.register(
            "binds_denied",
            "Binds to a protected port denied to a stranger",
            m.binds_denied.clone(),
        );
        registry.register(
            "removal_latency_seconds",
            "Time from detecting a foreign rule to its removal",
            m.removal_latency.clone(),
        );
        registry.register(
            "ruleset_inspection_seconds",
            "Time to read and analyse the nftables ruleset once",
            m.inspection_time.clone(),
        );
        registry.register(
            "ringbuf_drops",
            "Bind events lost because the ring buffer was full",
            m.ringbuf_drops.clone(),
        );
        registry.register(
            "probe_up",
            "1 when the port's health probe last succeeded, 0 when it failed",
            m.probe_up.clone(),
        );
        registry.register(
            "owner_present",
            "1 when the port's owner is running, 0 when it is not",
            m.owner_present.clone(),
        );
        registry.register(
            "audit_records",
            "Records appended to the audit log",
            m.audit_records.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written (full disk, I/O error)",
            m.audit_write_failures.clone(),
        );
        registry.register(
            "audit_writable",
            "1 while the audit log can be written; 0: no rule is removed and no pin changed",
            m.audit_writable.clone(),
        );
        registry.register(
            "foreign_pin_tables",
            "Tables named `portguard` that are not this agent's (left alone)",
            m.foreign_pin_tables.clone(),
        );
        registry.register(
            "pins_withheld",
            "Wanted pins not installed because another table holds the pin table's name",
            m.pins_withheld.clone(),
        );
        registry.register(
            "ready",
            "1 while /readyz answers 200 (programs attached, ruleset inspected, audit log \
             writable), 0 otherwise",
            m.ready.clone(),
        );
        m.audit_writable.set(1);
        Self { registry, ..m }
    }

    /// Other programs' tables named like the pin table, and the pins they keep out.
    pub fn foreign_pin_tables(&self, tables: usize, withheld: usize) {
        self.foreign_pin_tables
            .set(i64::try_from(tables).unwrap_or(i64::MAX));
        self.pins_withheld
            .set(i64::try_from(withheld).unwrap_or(i64::MAX));
    }

    pub fn hijack_detected(&self, port: u16, source: &str) {
        self.hijacks_detected
            .get_or_create(&HijackLabels {
                port,
                source: source.to_owned(),
            })
            .inc();
    }

    /// A foreign rule found shadowing the owner's mapping of `port`.
    pub fn owner_shadowed(&self, port: u16, source: &str) {
        self.owner_shadowed
            .get_or_create(&HijackLabels {
                port,
                source: source.to_owned(),
            })
            .inc();
    }

    /// A removal, and how long after detection it happened.
    pub fn hijack_removed(&self, port: u16, source: &str, since_detection: Duration) {
        self.hijacks_removed
            .get_or_create(&HijackLabels {
                port,
                source: source.to_owned(),
            })
            .inc();
        self.removal_latency.observe(since_detection.as_secs_f64());
    }

    pub fn bind_denied(&self, port: u16, proto: Proto) {
        self.binds_denied
            .get_or_create(&PortLabels {
                port,
                proto: proto.to_string(),
            })
            .inc();
    }

    pub fn ruleset_inspected(&self, took: Duration) {
        self.inspection_time.observe(took.as_secs_f64());
    }

    /// The kernel's running total of dropped events; exported as a counter.
    pub fn ringbuf_drops_total(&self, total: u64) {
        let before = self.ringbuf_seen.fetch_max(total, Ordering::Relaxed);
        if total > before {
            self.ringbuf_drops.inc_by(total - before);
        }
    }

    pub fn probe_status(&self, port: u16, url: &str, up: bool) {
        self.probe_up
            .get_or_create(&ProbeLabels {
                port,
                url: url.to_owned(),
            })
            .set(i64::from(up));
    }

    pub fn owner_present(&self, port: u16, proto: Proto, present: bool) {
        self.owner_present
            .get_or_create(&PortLabels {
                port,
                proto: proto.to_string(),
            })
            .set(i64::from(present));
    }

    pub fn audit_record_written(&self) {
        self.audit_records.inc();
    }

    pub fn audit_write_failed(&self) {
        self.audit_write_failures.inc();
    }

    pub fn audit_writable(&self, writable: bool) {
        self.audit_writable.set(i64::from(writable));
    }

    /// What `/readyz` would answer now; set from [`Health::is_ready`] at each
    /// scrape, so the gauge and the endpoint cannot disagree.
    pub fn ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// The exposition, OpenMetrics text (Prometheus reads it).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// What `/healthz` and `/readyz` answer. The agent is healthy while it
/// serves at all; ready once its programs are attached and the first ruleset
/// inspection is done (the same moment it tells systemd READY=1), and not
/// while it is degraded (the audit log cannot be written: no removals), which
/// `/readyz` says with the reason.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    degraded: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.degraded().is_none()
    }

    /// Why the agent is not fully working although it runs; `None`: it is.
    pub fn set_degraded(&self, why: Option<String>) {
        *self
            .degraded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    pub fn degraded(&self) -> Option<String> {
        self.degraded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The server's bounds; [`Limits::default`] is the named constants above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// The listening endpoint. [`Self::serve`] runs until its task is dropped or aborted.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
}

impl MetricsEndpoint {
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        Self::bind_with(addr, Limits::default()).await
    }

    /// [`Self::bind`] with other bounds (tests use short timeouts).
    pub async fn bind_with(addr: SocketAddr, limits: Limits) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self {
            listener,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
        })
    }

    /// How many connections are being served; the handle stays valid while
    /// [`Self::serve`] runs.
    pub fn connections(&self) -> ConnectionCount {
        ConnectionCount {
            slots: self.slots.clone(),
            max: self.limits.max_connections,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Answers scrapes forever; each connection on its own task, at most
    /// [`Limits::max_connections`] of them at once.
    pub async fn serve(self, metrics: Arc<Metrics>, health: Arc<Health>) {
        let mut refused: u64 = 0;
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends pass; don't spin on them.
                    debug!(event = "metrics_accept_failed", error = %e, "metrics accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                // Every slot is taken: close at once (the drop), no task, no
                // buffer. Logged at 1, 2, 4, 8, ... refusals, not once each.
                refused += 1;
                if refused.is_power_of_two() {
                    warn!(
                        event = "metrics_connection_refused",
                        %peer,
                        refused,
                        max_connections = self.limits.max_connections,
                        "metrics endpoint at its connection cap; closing new connections"
                    );
                }
                drop(stream);
                continue;
            };
            let (metrics, health, limits) = (metrics.clone(), health.clone(), self.limits);
            tokio::spawn(async move {
                let answer = tokio::time::timeout(
                    limits.request_timeout,
                    answer(stream, &metrics, &health, &limits),
                )
                .await;
                if !matches!(answer, Ok(Ok(()))) {
                    debug!(
                        event = "metrics_request_failed",
                        %peer,
                        "metrics request failed or timed out"
                    );
                }
                drop(slot);
            });
        }
    }
}

/// How many connections the endpoint serves now (see [`MetricsEndpoint::connections`]).
#[derive(Clone, Debug)]
pub struct ConnectionCount {
    slots: Arc<Semaphore>,
    max: usize,
}

impl ConnectionCount {
    pub fn get(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// Reads one request head (within the idle and header timeouts) and answers
/// it; the connection then closes.
async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    health: &Health,
    limits: &Limits,
) -> std::io::Result<()> {
    let deadline = tokio::time::Instant::now() + limits.header_timeout;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        // Each read must bring something within the idle timeout, and all of
        // them together must end by the header deadline.
        let wait = limits
            .idle_timeout
            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let Ok(read) = tokio::time::timeout(wait, stream.read(&mut buf)).await else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request head not received in time",
            ));
        };
        let n = read?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD_BYTES {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
                false,
            )
            .await;
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
            head_only,
        )
        .await;
    }
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => {
            // Readiness is decided where `/readyz` decides it, at the moment
            // of the scrape: a scraper needs no second request to alert on it.
            metrics.ready(health.is_ready());
            let body = metrics.encode();
            respond(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
                head_only,
            )
            .await
        }
        "/healthz" => respond(&mut stream, "200 OK", TEXT, "ok\n", head_only).await,
        "/readyz" if health.is_ready() => {
            respond(&mut stream, "200 OK", TEXT, "ready\n", head_only).await
        }
        "/readyz" => {
            let body = match health.degraded() {
                Some(why) => format!("degraded: {why}\n"),
                None => "not ready\n".to_owned(),
            };
            respond(
                &mut stream,
                "503 Service Unavailable",
                TEXT,
                &body,
                head_only,
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                "404 Not Found",
                TEXT,
                "try /metrics, /healthz or /readyz\n",
                head_only,
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn scrape_over_loopback() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let endpoint = MetricsEndpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = endpoint.local_addr();
        assert!(addr.ip().is_loopback());
        let server = tokio::spawn(endpoint.serve(metrics.clone(), health.clone()));

        metrics.hijack_detected(443, "kube-proxy");
        metrics.owner_shadowed(80, "unknown");
        metrics.hijack_removed(443, "kube-proxy", Duration::from_millis(3));
        metrics.bind_denied(80, Proto::Tcp);
        metrics.bind_denied(80, Proto::Tcp);
        metrics.ruleset_inspected(Duration::from_micros(800));
        metrics.ringbuf_drops_total(5);
        metrics.ringbuf_drops_total(7);
        metrics.ringbuf_drops_total(6); // a stale reading never lowers a counter
        metrics.probe_status(443, "https://127.0.0.1/", false);
        metrics.owner_present(80, Proto::Tcp, true);

        let (status, head, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("application/openmetrics-text"));
        for line in [
            "portguard_hijacks_detected_total{port=\"443\",source=\"kube-proxy\"} 1",
            "portguard_owner_shadowed_total{port=\"80\",source=\"unknown\"} 1",
            "portguard_hijacks_removed_total{port=\"443\",source=\"kube-proxy\"} 1",
            "portguard_binds_denied_total{port=\"80\",proto=\"tcp\"} 2",
            "portguard_removal_latency_seconds_count 1",
            "portguard_ruleset_inspection_seconds_count 1",
            "portguard_ringbuf_drops_total 7",
            "portguard_probe_up{port=\"443\",url=\"https://127.0.0.1/\"} 0",
            "portguard_owner_present{port=\"80\",proto=\"tcp\"} 1",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing {line:?} in:\n{body}"
            );
        }
        assert!(body.ends_with("# EOF\n"));

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        assert!(body.lines().any(|l| l == "portguard_ready 0"), "{body}");
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (_, _, body) = get(addr, "/metrics").await;
        assert!(body.lines().any(|l| l == "portguard_ready 1"), "{body}");
        // Degraded (the audit log cannot be written): not ready, on both.
        health.set_degraded(Some("disk full".into()));
        assert_eq!(get(addr, "/readyz").await.0, 503);
        let (_, _, body) = get(addr, "/metrics").await;
        assert!(body.lines().any(|l| l == "portguard_ready 0"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);
        server.abort();
    }

    /// Idle connections opened by the flood test.
    const FLOOD: usize = 2_000;

    /// Raises this process's soft descriptor limit so the test itself can
    /// hold [`FLOOD`] connections (the server's side must not need it).
    fn raise_nofile(want: u64) {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into a valid, owned struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        if lim.rlim_cur >= want {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        // SAFETY: setrlimit reads one valid rlimit; raising the hard limit
        // needs CAP_SYS_RESOURCE, and without it the soft limit goes to the hard.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            let capped = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: as above.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) };
        }
    }

    fn open_descriptors() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// A GET that may find its connection closed (the cap): None then.
    async fn try_get(addr: SocketAddr, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.get(9..12)?.parse().ok()
    }

    /// Retries [`try_get`] until it is answered, for at most `within`.
    async fn get_eventually(addr: SocketAddr, path: &str, within: Duration) -> u16 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = try_get(addr, path).await {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} not answered within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn idle_connections_cannot_exhaust_the_endpoint() {
        raise_nofile(FLOOD as u64 + 1_024);
        let limits = Limits {
            max_connections: 16,
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_secs(5),
        };
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        health.set_ready(true);
        let endpoint = MetricsEndpoint::bind_with("127.0.0.1:0".parse().unwrap(), limits)
            .await
            .unwrap();
        let addr = endpoint.local_addr();
        let served = endpoint.connections();
        let server = tokio::spawn(endpoint.serve(metrics, health));
        let runtime = tokio::runtime::Handle::current().metrics();
        let (tasks_before, fds_before) = (runtime.num_alive_tasks(), open_descriptors());

        // The flood: connections that never send a byte, all held open by
        // the client. Let the server run between connects so it accepts.
        let mut idle = Vec::with_capacity(FLOOD);
        let mut most_served = 0;
        let mut most_tasks = 0;
        for _ in 0..FLOOD {
            idle.push(TcpStream::connect(addr).await.unwrap());
            tokio::task::yield_now().await;
            most_served = most_served.max(served.get());
            most_tasks = most_tasks.max(runtime.num_alive_tasks());
        }
        assert!(
            most_served <= limits.max_connections,
            "{most_served} served at once"
        );
        assert!(
            most_tasks <= tasks_before + limits.max_connections,
            "{most_tasks} tasks alive (before the flood: {tasks_before})"
        );
        // The server side holds about the cap; the rest of the descriptors
        // are the client's. Other tests run in this process and open
        // descriptors too, hence the slack (without the cap it would be
        // about FLOOD).
        const OTHER_TESTS_SLACK: usize = 64;
        let server_fds = open_descriptors().saturating_sub(fds_before + idle.len());
        assert!(
            server_fds <= limits.max_connections + OTHER_TESTS_SLACK,
            "{server_fds} descriptors held by the server"
        );

        // While every idle connection is still open on the client side, a
        // scrape and a readiness check get through once idle slots time out.
        let within = limits.idle_timeout * 10;
        assert_eq!(get_eventually(addr, "/metrics", within).await, 200);
        assert_eq!(get_eventually(addr, "/readyz", within).await, 200);
        assert!(served.get() <= limits.max_connections);
        assert_eq!(idle.len(), FLOOD);

        // A slow sender (bytes, but never a full head) is cut off by the
        // header timeout even though it is never idle for long.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut closed = false;
        while started.elapsed() < limits.header_timeout * 3 {
            if slow.write_all(b"X").await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(limits.idle_timeout / 3).await;
        }
        assert!(closed, "a trickling request head was not cut off");
        server.abort();
    }
}
