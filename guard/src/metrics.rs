//! Prometheus exposition (`prometheus-client`) and the health endpoints, on
//! 127.0.0.1:9464 by default.
//!
//! The HTTP side is a small HTTP/1.1 responder on tokio: three GET routes,
//! one request per connection. A scraper needs nothing more, and it keeps a
//! server framework out of a root daemon.

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
};
use tracing::debug;

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
    binds_denied: Family<PortLabels, Counter>,
    removal_latency: Histogram,
    inspection_time: Histogram,
    ringbuf_drops: Counter,
    ringbuf_seen: AtomicU64,
    probe_up: Family<ProbeLabels, Gauge>,
    owner_present: Family<PortLabels, Gauge>,
    audit_records: Counter,
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
            binds_denied: Family::default(),
            // 0.1 ms .. ~3 s: removal is expected in milliseconds.
            removal_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            inspection_time: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ringbuf_drops: Counter::default(),
            ringbuf_seen: AtomicU64::new(0),
            probe_up: Family::default(),
            owner_present: Family::default(),
            audit_records: Counter::default(),
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
        Self { registry, ..m }
    }

    pub fn hijack_detected(&self, port: u16, source: &str) {
        self.hijacks_detected
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

    /// The exposition, OpenMetrics text (Prometheus reads it).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// What `/healthz` and `/readyz` answer. The agent is healthy while it
/// serves at all; ready once its programs are attached and the first ruleset
/// inspection is done (the same moment it tells systemd READY=1).
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
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

/// The listening endpoint. [`Self::serve`] runs until its task is dropped or aborted.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
}

impl MetricsEndpoint {
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Answers scrapes forever; each connection on its own task.
    pub async fn serve(self, metrics: Arc<Metrics>, health: Arc<Health>) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends pass; don't spin on them.
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    answer(stream, &metrics, &health),
                )
                .await;
                if !matches!(answer, Ok(Ok(()))) {
                    debug!(%peer, "metrics request failed or timed out");
                }
            });
        }
    }
}

/// Reads one request head and answers it; the connection then closes.
async fn answer(mut stream: TcpStream, metrics: &Metrics, health: &Health) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
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
            respond(
                &mut stream,
                "503 Service Unavailable",
                TEXT,
                "not ready\n",
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
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        assert_eq!(get(addr, "/nope").await.0, 404);
        server.abort();
    }
}
