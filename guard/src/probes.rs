//! HTTP(S) health probes of the services that own protected ports: the
//! incident's "frontend answers with the site's name" check, continuous.
//!
//! A [`HealthProbe`] checks once; [`ProbeState`] turns checks into transitions
//! (failed, recovered), which is what the audit log records: one record per
//! outage, not one per failed check. [`HealthProbe::run`] checks on the
//! probe's interval and sends each result to the agent.
//!
//! A probed service is not trusted to be small: at most [`MAX_BODY_BYTES`] of
//! a response body are read, and a larger body (or an endless one) is a
//! failed check ([`ProbeFailure::BodyTooLarge`]), not an allocation that grows
//! until the agent is killed.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::{
    audit::AuditEvent,
    policy::{Policy, ProbeSpec},
    types::Proto,
};

/// The most of a response body a probe reads: a health page is kilobytes, so
/// one megabyte is generous, and it bounds what a hostile service can make
/// the agent hold.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("probe {url}: cannot build an HTTP client: {source}")]
pub struct ProbeError {
    url: String,
    source: reqwest::Error,
}

/// Why a check failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    #[error("status {got}, expected {want}")]
    Status { got: u16, want: u16 },
    #[error("status {status} but the body lacks {want:?}")]
    Body { status: u16, want: String },
    #[error("status {status} but the body is larger than {limit} bytes")]
    BodyTooLarge { status: u16, limit: usize },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Request(String),
}

impl ProbeFailure {
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { got, .. } => Some(*got),
            Self::Body { status, .. } | Self::BodyTooLarge { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One port's probe.
#[derive(Clone, Debug)]
pub struct HealthProbe {
    pub port: u16,
    pub proto: Proto,
    pub spec: ProbeSpec,
    client: reqwest::Client,
}

impl HealthProbe {
    pub fn new(port: u16, proto: Proto, spec: ProbeSpec) -> Result<Self, ProbeError> {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            // Self-signed certificates are allowed per probe, never globally.
            .danger_accept_invalid_certs(spec.insecure_tls)
            .timeout(spec.timeout)
            .connect_timeout(spec.timeout)
            // The expected status is the first answer's, and probes go to the
            // host's own services: no redirects, no proxies.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("portguard-probe/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ProbeError {
                url: spec.url.clone(),
                source,
            })?;
        Ok(Self {
            port,
            proto,
            spec,
            client,
        })
    }

    /// Every probe the policy configures.
    pub fn from_policy(policy: &Policy) -> Result<Vec<Self>, ProbeError> {
        policy
            .ports
            .iter()
            .filter_map(|p| {
                p.probe
                    .clone()
                    .map(|spec| Self::new(p.port.start, p.proto, spec))
            })
            .collect()
    }

    /// One check.
    pub async fn check(&self) -> Result<u16, ProbeFailure> {
        let response = self
            .client
            .get(&self.spec.url)
            .send()
            .await
            .map_err(|e| self.failure(&e))?;
        let status = response.status().as_u16();
        if status != self.spec.expect_status {
            return Err(ProbeFailure::Status {
                got: status,
                want: self.spec.expect_status,
            });
        }
        if let Some(want) = &self.spec.expect_body {
            let body = self.read_body(response, status).await?;
            if !body.contains(want.as_str()) {
                return Err(ProbeFailure::Body {
                    status,
                    want: want.clone(),
                });
            }
        }
        Ok(status)
    }

    /// The body, read chunk by chunk up to [`MAX_BODY_BYTES`]; beyond that
    /// (announced by Content-Length or found while reading) the check fails.
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        status: u16,
    ) -> Result<String, ProbeFailure> {
        let too_large = ProbeFailure::BodyTooLarge {
            status,
            limit: MAX_BODY_BYTES,
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY_BYTES as u64)
        {
            return Err(too_large);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.failure(&e))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn failure(&self, e: &reqwest::Error) -> ProbeFailure {
        if e.is_timeout() {
            return ProbeFailure::Timeout(self.spec.timeout);
        }
        // reqwest's Display is terse ("error sending request"); the cause says why.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        ProbeFailure::Request(text)
    }
}

/// A change worth recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeChange {
    Failed(ProbeFailure),
    Recovered { down_for: Duration },
}

/// Up/down memory of one probe. A probe starts up as far as the log is
/// concerned: a first failure is a change, a first success is not.
#[derive(Clone, Debug, Default)]
pub struct ProbeState {
    down_since: Option<Instant>,
}

impl ProbeState {
    pub fn observe(
        &mut self,
        result: &Result<u16, ProbeFailure>,
        now: Instant,
    ) -> Option<ProbeChange> {
        match (result, self.down_since) {
            (Err(failure), None) => {
                self.down_since = Some(now);
                Some(ProbeChange::Failed(failure.clone()))
            }
            (Ok(_), Some(since)) => {
                self.down_since = None;
                Some(ProbeChange::Recovered {
                    down_for: now - since,
                })
            }
            _ => None,
        }
    }

    pub fn is_down(&self) -> bool {
        self.down_since.is_some()
    }
}

/// One check's result, as a probe task sends it to the agent.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    pub port: u16,
    pub proto: Proto,
    pub url: String,
    pub result: Result<u16, ProbeFailure>,
    pub change: Option<ProbeChange>,
}

impl ProbeReport {
    /// The audit record for a change, linked to the foreign rule on the port
    /// when the agent knows one: `(finding id, seq of its rule_found record)`.
    pub fn audit_event(&self, foreign: Option<(String, u64)>) -> Option<AuditEvent> {
        match self.change.as_ref()? {
            ProbeChange::Failed(failure) => {
                let (finding, finding_seq) =
                    foreign.map_or((None, None), |(f, s)| (Some(f), Some(s)));
                Some(AuditEvent::ProbeFailed {
                    port: self.port,
                    proto: self.proto,
                    url: self.url.clone(),
                    error: failure.to_string(),
                    status: failure.status(),
                    finding,
                    finding_seq,
                })
            }
            ProbeChange::Recovered { down_for } => Some(AuditEvent::ProbeRecovered {
                port: self.port,
                proto: self.proto,
                url: self.url.clone(),
                down_ms: u64::try_from(down_for.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

impl HealthProbe {
    /// Checks on the probe's interval, sending every result to `reports`
    /// (metrics want each, the audit log only the changes). Runs until dropped
    /// or until `reports` closes; the caller runs it where it runs its tasks.
    pub async fn run<E: From<ProbeReport>>(self, reports: mpsc::Sender<E>) {
        let mut state = ProbeState::default();
        let mut tick = tokio::time::interval(self.spec.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = self.check().await;
            let change = state.observe(&result, Instant::now());
            let report = ProbeReport {
                port: self.port,
                proto: self.proto,
                url: self.spec.url.clone(),
                result,
                change,
            };
            if reports.send(report.into()).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };
    use tokio_rustls::{
        TlsAcceptor,
        rustls::{
            self,
            pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
        },
    };

    use super::*;

    /// A loopback server answering every request with `status` and `body`
    /// (after `delay`), over TLS with a fresh self-signed certificate when `tls`.
    async fn server(status: u16, body: &'static str, delay: Duration, tls: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls.then(|| {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
            let key =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
            let cert: CertificateDer<'static> = ck.cert.der().clone();
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
            TlsAcceptor::from(Arc::new(config))
        });
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
                        mut s: S,
                        response: String,
                        delay: Duration,
                    ) {
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf).await;
                        tokio::time::sleep(delay).await;
                        let _ = s.write_all(response.as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(stream).await {
                                serve(s, response, delay).await;
                            }
                        }
                        None => serve(stream, response, delay).await,
                    }
                });
            }
        });
        addr
    }

    fn spec(url: String) -> ProbeSpec {
        ProbeSpec {
            url,
            expect_status: 200,
            expect_body: Some("Example Shop".into()),
            insecure_tls: false,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
        }
    }

    fn probe(spec: ProbeSpec) -> HealthProbe {
        HealthProbe::new(443, Proto::Tcp, spec).unwrap()
    }

    #[tokio::test]
    async fn http_status_and_body() {
        let ok = server(200, "<h1>Example Shop</h1>", Duration::ZERO, false).await;
        assert_eq!(probe(spec(format!("http://{ok}/"))).check().await, Ok(200));

        // The incident: Traefik's 404 where the shop should be.
        let hijacked = server(404, "404 page not found", Duration::ZERO, false).await;
        assert_eq!(
            probe(spec(format!("http://{hijacked}/"))).check().await,
            Err(ProbeFailure::Status {
                got: 404,
                want: 200
            })
        );
        let wrong = server(200, "Welcome to nginx", Duration::ZERO, false).await;
        let failure = probe(spec(format!("http://{wrong}/")))
            .check()
            .await
            .unwrap_err();
        assert_eq!(
            failure.to_string(),
            "status 200 but the body lacks \"Example Shop\""
        );
    }

    /// A loopback server that answers 200 and then sends body bytes forever
    /// (no length, so the client can only stop by itself).
    async fn endless_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let head =
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n";
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 * 1024];
                    while s.write_all(&chunk).await.is_ok() {}
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_endless_body_is_a_failed_probe_not_an_oom() {
        let endless = endless_server().await;
        let mut spec = spec(format!("http://{endless}/"));
        // Long enough that the size limit, not the timeout, ends the check.
        spec.timeout = Duration::from_secs(30);
        let started = Instant::now();
        let got = probe(spec).check().await;
        assert_eq!(
            got,
            Err(ProbeFailure::BodyTooLarge {
                status: 200,
                limit: MAX_BODY_BYTES
            })
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(got.unwrap_err().status(), Some(200));

        // An announced length beyond the limit fails without reading.
        let big = "x".repeat(MAX_BODY_BYTES + 1).leak();
        let announced = server(200, big, Duration::ZERO, false).await;
        assert!(matches!(
            probe(spec_for(announced)).check().await,
            Err(ProbeFailure::BodyTooLarge { .. })
        ));
    }

    fn spec_for(addr: SocketAddr) -> ProbeSpec {
        spec(format!("http://{addr}/"))
    }

    #[tokio::test]
    async fn timeout_and_refused() {
        let slow = server(200, "Example Shop", Duration::from_secs(5), false).await;
        assert_eq!(
            probe(spec(format!("http://{slow}/"))).check().await,
            Err(ProbeFailure::Timeout(Duration::from_millis(500)))
        );
        // A port nobody listens on: bind, learn the port, close.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let failure = probe(spec(format!("http://{closed}/")))
            .check()
            .await
            .unwrap_err();
        assert!(
            matches!(&failure, ProbeFailure::Request(t) if t.contains("onnection refused")),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn self_signed_only_when_the_probe_allows_it() {
        let tls = server(200, "Example Shop", Duration::ZERO, true).await;
        let url = format!("https://localhost:{}/", tls.port());
        let strict = probe(spec(url.clone())).check().await.unwrap_err();
        assert!(
            matches!(&strict, ProbeFailure::Request(t) if t.to_lowercase().contains("certificate")),
            "{strict}"
        );
        let insecure = ProbeSpec {
            insecure_tls: true,
            ..spec(url)
        };
        assert_eq!(probe(insecure).check().await, Ok(200));
    }

    #[test]
    fn one_record_per_outage_linked_to_the_foreign_rule() {
        let mut state = ProbeState::default();
        let t0 = Instant::now();
        let down = Err(ProbeFailure::Status {
            got: 404,
            want: 200,
        });
        assert_eq!(
            state.observe(&Ok(200), t0),
            None,
            "a first success is not news"
        );
        let change = state.observe(&down, t0);
        assert!(matches!(change, Some(ProbeChange::Failed(_))));
        assert_eq!(state.observe(&down, t0 + Duration::from_secs(1)), None);
        let report = ProbeReport {
            port: 443,
            proto: Proto::Tcp,
            url: "https://127.0.0.1/".into(),
            result: down.clone(),
            change,
        };
        let Some(AuditEvent::ProbeFailed {
            status,
            finding,
            finding_seq,
            error,
            ..
        }) = report.audit_event(Some(("f-443-1".into(), 41)))
        else {
            panic!("a failure is audited");
        };
        assert_eq!(
            (status, finding.as_deref(), finding_seq),
            (Some(404), Some("f-443-1"), Some(41))
        );
        assert_eq!(error, "status 404, expected 200");
        let back = state.observe(&Ok(200), t0 + Duration::from_secs(3));
        assert_eq!(
            back,
            Some(ProbeChange::Recovered {
                down_for: Duration::from_secs(3)
            })
        );
        assert!(!state.is_down());
    }

    #[tokio::test]
    async fn a_running_probe_reports_each_check() {
        let ok = server(200, "Example Shop", Duration::ZERO, false).await;
        let mut spec = spec(format!("http://{ok}/"));
        spec.interval = Duration::from_millis(100);
        spec.timeout = Duration::from_millis(100);
        let (tx, mut rx) = mpsc::channel(8);
        let _task = tokio::spawn(probe(spec).run::<ProbeReport>(tx));
        for _ in 0..3 {
            let report = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(report.result, Ok(200));
            assert_eq!(report.change, None);
        }
    }
}
