//! TOML → [`Policy`], with every error placed at a file, line and column.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use super::model::{
    DEFAULT_SERVICELB_NAMESPACE, KubeObjectName, KubernetesPolicy, MetricsSpec, Mode, OnClaim,
    OnShadow, OwnerSpec, Policy, ProbeSpec, ProtectedPort,
};
use crate::types::{PortRange, Proto, parse_duration};

pub const DEFAULT_POLICY_PATH: &str = "/etc/portguard/config.toml";
/// Used when no policy file exists: tcp/80 and tcp/443 owned by Docker.
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../../packaging/default-policy.toml");

/// Where a policy came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Embedded => f.write_str("<built-in default policy>"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: PolicySource,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Policy {
    /// Loads the policy: `explicit` when given (it must exist), else the default
    /// path when it exists, else the embedded default.
    pub fn load(explicit: Option<&Path>) -> Result<(Self, PolicySource), PolicyError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_POLICY_PATH).exists() => DEFAULT_POLICY_PATH.into(),
            None => {
                return Self::parse(DEFAULT_POLICY_TOML, PolicySource::Embedded)
                    .map(|p| (p, PolicySource::Embedded));
            }
        };
        let text = fs::read_to_string(&path).map_err(|source| PolicyError::Read {
            path: path.clone(),
            source,
        })?;
        let source = PolicySource::File(path);
        Self::parse(&text, source.clone()).map(|p| (p, source))
    }

    /// Parses and validates a policy text.
    pub fn parse(text: &str, source: PolicySource) -> Result<Self, PolicyError> {
        let at = |span: Range<usize>, message: String| {
            let (line, column) = line_col(text, span.start);
            PolicyError::Invalid {
                origin: source.clone(),
                line,
                column,
                message,
            }
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            at(
                e.span().unwrap_or(0..0),
                e.message().trim_end().replace('\n', " "),
            )
        })?;
        validate(raw).map_err(|(span, msg)| at(span, msg))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    mode: Option<Spanned<String>>,
    on_shadow: Option<Spanned<String>>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    ports: Vec<Spanned<RawPort>>,
    kubernetes: Option<RawKubernetes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    kubeconfig: Option<Spanned<String>>,
    on_claim: Option<Spanned<String>>,
    #[serde(default)]
    removable: Vec<Spanned<String>>,
    #[serde(default)]
    remove_crds: bool,
    servicelb_namespace: Option<Spanned<String>>,
    remap: Option<Spanned<std::collections::BTreeMap<String, i64>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    listen: Option<Spanned<String>>,
    #[serde(default)]
    allow_remote: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    url: Spanned<String>,
    expect_status: Option<Spanned<i64>>,
    expect_body: Option<String>,
    insecure_tls: Option<Spanned<bool>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: Spanned<RawPortValue>,
    proto: Option<Spanned<String>>,
    owner: Spanned<RawOwner>,
    #[serde(default)]
    pin: bool,
    mode: Option<Spanned<String>>,
    on_shadow: Option<Spanned<String>>,
    probe: Option<Spanned<RawProbe>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPortValue {
    Number(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawOwner {
    One(String),
    Many(Vec<String>),
}

type Invalid = (Range<usize>, String);

fn validate(raw: RawPolicy) -> Result<Policy, Invalid> {
    let mode = match raw.mode {
        Some(m) => parse_mode(&m)?,
        None => Mode::default(),
    };
    let on_shadow = raw
        .on_shadow
        .as_ref()
        .map(parse_on_shadow)
        .transpose()?
        .unwrap_or_default();
    let metrics = raw
        .metrics
        .map(parse_metrics)
        .transpose()?
        .unwrap_or_default();
    let mut ports: Vec<(Range<usize>, ProtectedPort)> = Vec::new();
    for entry in raw.ports {
        let span = entry.span();
        let raw = entry.into_inner();
        let port = parse_port(&raw.port)?;
        let proto = match &raw.proto {
            None => Proto::Tcp,
            Some(p) => match p.get_ref().as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                other => {
                    return Err((
                        p.span(),
                        format!("unknown proto {other:?}: expected \"tcp\" or \"udp\""),
                    ));
                }
            },
        };
        let owner_span = raw.owner.span();
        let names = match raw.owner.into_inner() {
            RawOwner::One(s) => vec![s],
            RawOwner::Many(v) => v,
        };
        if names.is_empty() {
            return Err((
                owner_span,
                "owner list is empty: name at least one owner".into(),
            ));
        }
        let mut owner = Vec::with_capacity(names.len());
        for name in names {
            let spec: OwnerSpec = name
                .parse()
                .map_err(|e| (owner_span.clone(), format!("{e}")))?;
            if !owner.contains(&spec) {
                owner.push(spec);
            }
        }
        let port_mode = raw.mode.as_ref().map(parse_mode).transpose()?;
        let port_on_shadow = raw.on_shadow.as_ref().map(parse_on_shadow).transpose()?;
        let probe = raw.probe.map(parse_probe).transpose()?;
        let new = ProtectedPort {
            port,
            proto,
            owner,
            pin: raw.pin,
            mode: port_mode,
            on_shadow: port_on_shadow,
            probe,
        };
        for (_, old) in &ports {
            if old.proto == new.proto && old.port.overlaps(&new.port) {
                let same_owners = old.owner.iter().collect::<BTreeSet<_>>()
                    == new.owner.iter().collect::<BTreeSet<_>>();
                if !same_owners {
                    return Err((
                        raw.port.span(),
                        format!(
                            "{}/{} overlaps {}/{} with different owners ({} vs {})",
                            new.proto,
                            new.port,
                            old.proto,
                            old.port,
                            join(&new.owner),
                            join(&old.owner)
                        ),
                    ));
                }
                return Err((
                    raw.port.span(),
                    format!(
                        "{}/{} is already protected by an earlier entry ({}/{}): merge them",
                        new.proto, new.port, old.proto, old.port
                    ),
                ));
            }
        }
        ports.push((span, new));
    }
    let kubernetes = match raw.kubernetes {
        Some(k) => parse_kubernetes(k)?,
        None => KubernetesPolicy::default(),
    };
    Ok(Policy {
        mode,
        on_shadow,
        metrics,
        ports: ports.into_iter().map(|(_, p)| p).collect(),
        kubernetes,
    })
}

fn parse_kubernetes(raw: RawKubernetes) -> Result<KubernetesPolicy, Invalid> {
    let kubeconfig = match raw.kubeconfig {
        Some(k) if !k.get_ref().starts_with('/') => {
            return Err((
                k.span(),
                format!("kubeconfig {:?} must be an absolute path", k.get_ref()),
            ));
        }
        Some(k) => Some(PathBuf::from(k.into_inner())),
        None => None,
    };
    let on_claim = match &raw.on_claim {
        None => OnClaim::default(),
        Some(v) => match v.get_ref().as_str() {
            "report" => OnClaim::Report,
            "remove" => OnClaim::Remove,
            "reconfigure" => OnClaim::Reconfigure,
            other => {
                return Err((
                    v.span(),
                    format!(
                        "unknown on_claim {other:?}: expected \"report\", \"reconfigure\" or \"remove\""
                    ),
                ));
            }
        },
    };
    let mut removable = Vec::with_capacity(raw.removable.len());
    for entry in raw.removable {
        let name: KubeObjectName = entry
            .get_ref()
            .parse()
            .map_err(|e| (entry.span(), format!("{e}")))?;
        if !removable.contains(&name) {
            removable.push(name);
        }
    }
    let servicelb_namespace = match raw.servicelb_namespace {
        None => DEFAULT_SERVICELB_NAMESPACE.to_owned(),
        Some(ns) => {
            let valid = !ns.get_ref().is_empty()
                && ns.get_ref().len() <= 63
                && ns
                    .get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !ns.get_ref().starts_with('-')
                && !ns.get_ref().ends_with('-');
            if !valid {
                return Err((
                    ns.span(),
                    format!(
                        "servicelb_namespace {:?} is not a namespace name (lower case letters, \
                         digits and '-', at most 63)",
                        ns.get_ref()
                    ),
                ));
            }
            ns.into_inner()
        }
    };
    let mut remap = std::collections::BTreeMap::new();
    if let Some(table) = raw.remap {
        let span = table.span();
        for (from, to) in table.into_inner() {
            let from_port = match from.as_str() {
                "80" => 80,
                "443" => 443,
                _ => {
                    return Err((
                        span,
                        format!(
                            "remap {from:?}: only 80 (Traefik's `web`) and 443 (`websecure`) can be moved"
                        ),
                    ));
                }
            };
            let to_port = u16::try_from(to)
                .ok()
                .filter(|p| *p != 0 && *p != from_port)
                .ok_or_else(|| {
                    (
                        span.clone(),
                        format!("remap {from} = {to}: not a port other than {from} (1-65535)"),
                    )
                })?;
            remap.insert(from_port, to_port);
        }
    }
    Ok(KubernetesPolicy {
        kubeconfig,
        on_claim,
        removable,
        remove_crds: raw.remove_crds,
        servicelb_namespace,
        remap,
    })
}

fn parse_metrics(raw: RawMetrics) -> Result<MetricsSpec, Invalid> {
    let mut spec = MetricsSpec {
        allow_remote: raw.allow_remote,
        ..MetricsSpec::default()
    };
    if let Some(enabled) = raw.enabled {
        spec.enabled = enabled;
    }
    if let Some(listen) = raw.listen {
        spec.listen = listen.get_ref().parse::<SocketAddr>().map_err(|_| {
            (
                listen.span(),
                format!(
                    "metrics listen {:?} is not an address:port like \"127.0.0.1:9464\"",
                    listen.get_ref()
                ),
            )
        })?;
        // Metrics name ports and owners: not for the network unless said so.
        if !spec.listen.ip().is_loopback() && !spec.allow_remote {
            return Err((
                listen.span(),
                format!(
                    "metrics listen {} is not loopback: set allow_remote = true to serve it beyond this host",
                    spec.listen
                ),
            ));
        }
    }
    Ok(spec)
}

fn parse_probe(raw: Spanned<RawProbe>) -> Result<ProbeSpec, Invalid> {
    let span = raw.span();
    let raw = raw.into_inner();
    let url = raw.url.get_ref().clone();
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return Err((
            raw.url.span(),
            format!("probe url {url:?} must start with http:// or https://"),
        ));
    }
    let insecure_tls = raw.insecure_tls.as_ref().is_some_and(|b| *b.get_ref());
    if let Some(flag) = raw.insecure_tls.as_ref().filter(|_| insecure_tls && !https) {
        return Err((
            flag.span(),
            "insecure_tls applies to https:// probes only".into(),
        ));
    }
    let expect_status = match raw.expect_status {
        None => 200,
        Some(s) => u16::try_from(*s.get_ref())
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| {
                (
                    s.span(),
                    format!(
                        "expect_status {} is not an HTTP status (100-599)",
                        s.get_ref()
                    ),
                )
            })?,
    };
    let interval = raw
        .interval
        .as_ref()
        .map(parse_interval)
        .transpose()?
        .unwrap_or(ProbeSpec::DEFAULT_INTERVAL);
    let timeout = raw
        .timeout
        .as_ref()
        .map(parse_interval)
        .transpose()?
        .unwrap_or(ProbeSpec::DEFAULT_TIMEOUT.min(interval));
    if timeout > interval {
        let at = raw.timeout.map_or(span, |t| t.span());
        return Err((
            at,
            format!("probe timeout {timeout:?} is longer than its interval {interval:?}"),
        ));
    }
    Ok(ProbeSpec {
        url,
        expect_status,
        expect_body: raw.expect_body,
        insecure_tls,
        interval,
        timeout,
    })
}

/// Shortest probe interval or timeout the policy accepts.
const MIN_PROBE_DURATION: Duration = Duration::from_millis(100);

/// A probe's interval or timeout ([`parse_duration`]'s syntax); at least 100 ms.
fn parse_interval(value: &Spanned<String>) -> Result<Duration, Invalid> {
    let d = parse_duration(value.get_ref()).map_err(|e| (value.span(), e.to_string()))?;
    if d < MIN_PROBE_DURATION {
        let s = value.get_ref().trim();
        return Err((
            value.span(),
            format!("duration {s:?} is below {MIN_PROBE_DURATION:?}"),
        ));
    }
    Ok(d)
}

fn join(owners: &[OwnerSpec]) -> String {
    owners
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_mode(m: &Spanned<String>) -> Result<Mode, Invalid> {
    match m.get_ref().as_str() {
        "enforce" => Ok(Mode::Enforce),
        "observe" => Ok(Mode::Observe),
        other => Err((
            m.span(),
            format!("unknown mode {other:?}: expected \"enforce\" or \"observe\""),
        )),
    }
}

fn parse_on_shadow(m: &Spanned<String>) -> Result<OnShadow, Invalid> {
    match m.get_ref().as_str() {
        "report" => Ok(OnShadow::Report),
        "remove" => Ok(OnShadow::Remove),
        other => Err((
            m.span(),
            format!("unknown on_shadow {other:?}: expected \"report\" (the default) or \"remove\""),
        )),
    }
}

fn parse_port(value: &Spanned<RawPortValue>) -> Result<PortRange, Invalid> {
    let span = value.span();
    let one = |n: i64| {
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| (span.clone(), format!("port {n} is out of range (1-65535)")))
    };
    match value.get_ref() {
        RawPortValue::Number(n) => one(*n).map(PortRange::single),
        RawPortValue::Text(s) => {
            let bad = || {
                (
                    span.clone(),
                    format!("port {s:?} is neither a number nor a range like \"8000-8099\""),
                )
            };
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let a: i64 = a.trim().parse().map_err(|_| bad())?;
            let b: i64 = b.trim().parse().map_err(|_| bad())?;
            let (start, end) = (one(a)?, one(b)?);
            if start > end {
                return Err((span, format!("port range {s:?} runs backwards")));
            }
            Ok(PortRange { start, end })
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Policy::parse(
            text,
            PolicySource::File("/etc/portguard/config.toml".into()),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn embedded_default_protects_80_and_443_for_docker() {
        let (policy, source) = (
            Policy::parse(DEFAULT_POLICY_TOML, PolicySource::Embedded).unwrap(),
            PolicySource::Embedded,
        );
        assert_eq!(source.to_string(), "<built-in default policy>");
        assert_eq!(policy.mode, Mode::Enforce);
        let ports: Vec<_> = policy
            .ports
            .iter()
            .map(|p| (p.port.start, p.proto))
            .collect();
        assert_eq!(ports, [(80, Proto::Tcp), (443, Proto::Tcp)]);
        assert!(policy.ports.iter().all(|p| p.owner == [OwnerSpec::Docker]));
    }

    #[test]
    fn full_shape_parses() {
        let p = Policy::parse(
            r#"
mode = "observe"
[[ports]]
port = 443
owner = "docker:frontend"
pin = true
[[ports]]
port = "8000-8099"
proto = "udp"
owner = ["unit:nginx.service", "exe:/usr/sbin/nginx"]
mode = "enforce"
on_shadow = "remove"
"#,
            PolicySource::Embedded,
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Observe);
        assert!(p.ports[0].pin);
        assert_eq!(
            p.ports[1].port,
            PortRange {
                start: 8000,
                end: 8099
            }
        );
        assert_eq!(p.mode_of(&p.ports[1]), Mode::Enforce);
        assert_eq!(p.on_shadow_of(&p.ports[0]), OnShadow::Report);
        assert_eq!(p.on_shadow_of(&p.ports[1]), OnShadow::Remove);
        assert_eq!(p.find(8050, Proto::Udp).unwrap().owner.len(), 2);
        assert!(p.find(8050, Proto::Tcp).is_none());
    }

    #[test]
    fn unknown_key_is_placed() {
        assert_eq!(
            err("[[ports]]\nport = 80\nowner = \"docker\"\npinn = true\n"),
            "/etc/portguard/config.toml:4:1: unknown field `pinn`, expected one of `port`, `proto`, `owner`, `pin`, `mode`, `on_shadow`, `probe`"
        );
    }

    #[test]
    fn port_out_of_range_is_placed() {
        assert_eq!(
            err("[[ports]]\nport = 70000\nowner = \"docker\"\n"),
            "/etc/portguard/config.toml:2:8: port 70000 is out of range (1-65535)"
        );
        assert_eq!(
            err("[[ports]]\nport = 0\nowner = \"docker\"\n"),
            "/etc/portguard/config.toml:2:8: port 0 is out of range (1-65535)"
        );
    }

    #[test]
    fn overlapping_ranges_with_different_owners() {
        assert_eq!(
            err(
                "[[ports]]\nport = \"8000-8099\"\nowner = \"docker\"\n[[ports]]\nport = 8050\nowner = \"unit:x.service\"\n"
            ),
            "/etc/portguard/config.toml:5:8: tcp/8050 overlaps tcp/8000-8099 with different owners (unit:x.service vs docker)"
        );
    }

    #[test]
    fn unknown_owner_kind() {
        assert_eq!(
            err("[[ports]]\nport = 80\nowner = \"podman:web\"\n"),
            "/etc/portguard/config.toml:3:9: unknown owner kind \"podman:web\": expected docker, docker:NAME, docker-label:KEY=VALUE, unit:NAME.service, exe:/PATH or cgroup:/PATH"
        );
    }

    #[test]
    fn kubernetes_remedies_parse_and_bad_ones_are_placed() {
        let p = Policy::parse(
            "[kubernetes]\non_claim = \"reconfigure\"\nremap = { 80 = 8081, 443 = 8444 }\n\
             servicelb_namespace = \"lb-system\"\nremove_crds = true\n",
            PolicySource::Embedded,
        )
        .unwrap();
        assert_eq!(p.kubernetes.on_claim, OnClaim::Reconfigure);
        assert_eq!(
            p.kubernetes.remap,
            std::collections::BTreeMap::from([(80, 8081), (443, 8444)])
        );
        assert_eq!(p.kubernetes.servicelb_namespace, "lb-system");
        assert!(p.kubernetes.remove_crds);
        // Printed back (`config show`), it parses as the same policy.
        let shown = p.to_toml();
        assert_eq!(
            Policy::parse(&shown, PolicySource::Embedded).unwrap(),
            p,
            "{shown}"
        );
        let d = Policy::parse("", PolicySource::Embedded).unwrap();
        assert_eq!(d.kubernetes.servicelb_namespace, "kube-system");
        assert!(!d.kubernetes.remove_crds);
        for (text, want) in [
            ("[kubernetes]\nremap = { 22 = 2222 }\n", "only 80"),
            (
                "[kubernetes]\nremap = { 80 = 80 }\n",
                "not a port other than 80",
            ),
            (
                "[kubernetes]\nremap = { 80 = 70000 }\n",
                "not a port other than 80",
            ),
            (
                "[kubernetes]\nservicelb_namespace = \"Kube_System\"\n",
                "not a namespace name",
            ),
            ("[kubernetes]\non_claim = \"delete\"\n", "\"reconfigure\""),
        ] {
            let e = err(text);
            assert!(e.starts_with("/etc/portguard/config.toml:2:"), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn on_shadow_is_report_unless_said_and_a_typo_is_placed() {
        let p = Policy::parse("on_shadow = \"remove\"\n", PolicySource::Embedded).unwrap();
        assert_eq!(p.on_shadow, OnShadow::Remove);
        let p = Policy::parse("", PolicySource::Embedded).unwrap();
        assert_eq!(p.on_shadow, OnShadow::Report);
        assert!(
            err("on_shadow = \"delete\"\n").starts_with(
                "/etc/portguard/config.toml:1:13: unknown on_shadow \"delete\": expected \"report\""
            ),
            "{}",
            err("on_shadow = \"delete\"\n")
        );
    }

    #[test]
    fn bad_mode_proto_and_range() {
        assert!(
            err("mode = \"block\"\n")
                .starts_with("/etc/portguard/config.toml:1:8: unknown mode \"block\"")
        );
        assert!(
            err("[[ports]]\nport = 80\nproto = \"sctp\"\nowner = \"docker\"\n")
                .contains(":3:9: unknown proto \"sctp\"")
        );
        assert!(
            err("[[ports]]\nport = \"90-80\"\nowner = \"docker\"\n").contains("runs backwards")
        );
        assert!(
            err("[[ports]]\nport = \"http\"\nowner = \"docker\"\n").contains("neither a number")
        );
    }

    #[test]
    fn syntax_error_is_placed() {
        assert!(err("mode = \n").starts_with("/etc/portguard/config.toml:1:"));
    }

    #[test]
    fn missing_owner_is_an_error() {
        assert!(err("[[ports]]\nport = 80\n").contains("missing field `owner`"));
    }

    #[test]
    fn kubernetes_table_parses() {
        let p = Policy::parse(
            r#"
[kubernetes]
kubeconfig = "/etc/rancher/k3s/k3s.yaml"
on_claim = "remove"
removable = ["monitoring/daemonset/node-exporter", "default/svc/web"]
"#,
            PolicySource::Embedded,
        )
        .unwrap();
        let k = &p.kubernetes;
        assert_eq!(
            k.kubeconfig.as_deref(),
            Some(Path::new("/etc/rancher/k3s/k3s.yaml"))
        );
        assert_eq!(k.on_claim, OnClaim::Remove);
        assert_eq!(k.removable.len(), 2);
        assert!(k.may_remove(&"default/service/web".parse().unwrap()));
        assert!(!k.may_remove(&"default/service/api".parse().unwrap()));
        let shown = p.to_toml();
        assert!(shown.contains("on_claim = \"remove\""), "{shown}");
        assert!(shown.contains("\"default/service/web\""), "{shown}");
    }

    #[test]
    fn kubernetes_table_is_optional_and_defaults_to_report() {
        let p = Policy::parse(DEFAULT_POLICY_TOML, PolicySource::Embedded).unwrap();
        assert_eq!(p.kubernetes, KubernetesPolicy::default());
        assert_eq!(p.kubernetes.on_claim, OnClaim::Report);
        assert!(!p.to_toml().contains("kubernetes"));
    }

    #[test]
    fn kubernetes_errors_are_placed() {
        assert_eq!(
            err("[kubernetes]\non_claim = \"delete\"\n"),
            "/etc/portguard/config.toml:2:12: unknown on_claim \"delete\": expected \"report\", \"reconfigure\" or \"remove\""
        );
        assert!(
            err("[kubernetes]\nremovable = [\"kube-system/service/*\"]\n")
                .starts_with("/etc/portguard/config.toml:2:14: \"kube-system/service/*\": \"*\" is not an object name")
        );
        assert!(err("[kubernetes]\nremovable = [\"traefik\"]\n").contains("NAMESPACE/KIND/NAME"));
        assert!(err("[kubernetes]\nkubeconfig = \"k3s.yaml\"\n").contains("absolute path"));
        assert!(err("[kubernetes]\nwatch = true\n").contains("unknown field `watch`"));
    }

    #[test]
    fn probe_and_metrics_parse() {
        let p = Policy::parse(
            r#"
[metrics]
listen = "127.0.0.1:19464"

[[ports]]
port = 443
owner = "docker:frontend"
[ports.probe]
url = "https://127.0.0.1/"
expect_body = "Example Shop"
insecure_tls = true
interval = "5s"
timeout = "1500ms"

[[ports]]
port = 80
owner = "docker"
[ports.probe]
url = "http://127.0.0.1/api/health"
"#,
            PolicySource::Embedded,
        )
        .unwrap();
        assert_eq!(p.metrics.listen, "127.0.0.1:19464".parse().unwrap());
        assert!(p.metrics.enabled);
        let probe = p.ports[0].probe.as_ref().unwrap();
        assert_eq!(probe.expect_status, 200);
        assert_eq!(probe.expect_body.as_deref(), Some("Example Shop"));
        assert!(probe.insecure_tls);
        assert_eq!(probe.interval, Duration::from_secs(5));
        assert_eq!(probe.timeout, Duration::from_millis(1500));
        let plain = p.ports[1].probe.as_ref().unwrap();
        assert_eq!(
            (plain.interval, plain.timeout),
            (ProbeSpec::DEFAULT_INTERVAL, ProbeSpec::DEFAULT_TIMEOUT)
        );
        assert!(!plain.insecure_tls);
        // `config show` prints it back in the same words, and that parses again.
        let shown = p.to_toml();
        assert!(
            shown.contains("interval = \"5s\"") && shown.contains("timeout = \"1500ms\""),
            "{shown}"
        );
        assert_eq!(Policy::parse(&shown, PolicySource::Embedded).unwrap(), p);
    }

    #[test]
    fn default_metrics_are_loopback() {
        let p = Policy::parse(DEFAULT_POLICY_TOML, PolicySource::Embedded).unwrap();
        assert_eq!(p.metrics.listen.to_string(), "127.0.0.1:9464");
        assert!(p.ports.iter().all(|port| port.probe.is_none()));
    }

    #[test]
    fn probe_and_metrics_errors_are_placed() {
        let port = "[[ports]]\nport = 443\nowner = \"docker\"\n[ports.probe]\n";
        assert_eq!(
            err(&format!("{port}url = \"ftp://x/\"\n")),
            "/etc/portguard/config.toml:5:7: probe url \"ftp://x/\" must start with http:// or https://"
        );
        assert!(
            err(&format!(
                "{port}url = \"http://127.0.0.1/\"\ninsecure_tls = true\n"
            ))
            .contains(":6:16: insecure_tls applies to https:// probes only")
        );
        assert!(
            err(&format!(
                "{port}url = \"http://127.0.0.1/\"\nexpect_status = 999\n"
            ))
            .contains(":6:17: expect_status 999 is not an HTTP status")
        );
        assert!(
            err(&format!(
                "{port}url = \"http://127.0.0.1/\"\ninterval = \"1s\"\ntimeout = \"2s\"\n"
            ))
            .contains(":7:11: probe timeout 2s is longer than its interval 1s")
        );
        assert!(
            err(&format!(
                "{port}url = \"http://127.0.0.1/\"\ninterval = \"10\"\n"
            ))
            .contains("expected a whole number and ms, s, m (or min), h, d or w")
        );
        assert!(
            err(&format!("{port}url = \"http://127.0.0.1/\"\nretries = 3\n"))
                .contains("unknown field `retries`")
        );
        assert_eq!(
            err("[metrics]\nlisten = \"0.0.0.0:9464\"\n"),
            "/etc/portguard/config.toml:2:10: metrics listen 0.0.0.0:9464 is not loopback: set allow_remote = true to serve it beyond this host"
        );
        assert!(
            Policy::parse(
                "[metrics]\nlisten = \"192.0.2.10:9464\"\nallow_remote = true\n",
                PolicySource::Embedded
            )
            .is_ok()
        );
        assert!(err("[metrics]\nlisten = \"localhost\"\n").contains("is not an address:port"));
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncdé f", 7), (2, 4));
        assert_eq!(line_col("", 5), (1, 1));
    }
}
