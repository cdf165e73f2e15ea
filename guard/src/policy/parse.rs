//! TOML → [`Policy`], with every error placed at a file, line and column.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use super::model::{
    KubeObjectName, KubernetesPolicy, Mode, OnClaim, OwnerSpec, Policy, PortRange, ProtectedPort,
    Proto,
};

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
        let new = ProtectedPort {
            port,
            proto,
            owner,
            pin: raw.pin,
            mode: port_mode,
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
            other => {
                return Err((
                    v.span(),
                    format!("unknown on_claim {other:?}: expected \"report\" or \"remove\""),
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
    Ok(KubernetesPolicy {
        kubeconfig,
        on_claim,
        removable,
    })
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
        assert_eq!(p.find(8050, Proto::Udp).unwrap().owner.len(), 2);
        assert!(p.find(8050, Proto::Tcp).is_none());
    }

    #[test]
    fn unknown_key_is_placed() {
        assert_eq!(
            err("[[ports]]\nport = 80\nowner = \"docker\"\npinn = true\n"),
            "/etc/portguard/config.toml:4:1: unknown field `pinn`, expected one of `port`, `proto`, `owner`, `pin`, `mode`"
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
            "/etc/portguard/config.toml:2:12: unknown on_claim \"delete\": expected \"report\" or \"remove\""
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
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncdé f", 7), (2, 4));
        assert_eq!(line_col("", 5), (1, 1));
    }
}
