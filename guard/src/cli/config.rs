//! `portguard config check|show`.

use std::{fmt::Write as _, process::ExitCode};

use anyhow::Context as _;
use clap::Subcommand;

use super::PolicyArgs;
use crate::{
    owners::{DockerStatus, Found, Owners, ResolvedOwners, ResolvedPort},
    policy::Policy,
};

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the policy: exit 0 when valid, 2 with the file, line and column of the first error.
    Check(PolicyArgs),
    /// Print the effective policy as TOML, with each port's owners as resolved right now.
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Print JSON (policy, resolved owners, who may bind, NAT targets) instead of TOML.
    #[arg(long)]
    pub json: bool,
}

pub fn main(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCommand::Check(args) => {
            let (policy, source) = Policy::load(args.config.as_deref())?;
            println!(
                "{source}: ok ({} protected port entr{}, mode {})",
                policy.ports.len(),
                if policy.ports.len() == 1 { "y" } else { "ies" },
                policy.mode
            );
        }
        ConfigCommand::Show(args) => {
            let (policy, source) = Policy::load(args.policy.config.as_deref())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let resolved = runtime.block_on(Owners::new(policy.clone()).resolve_once());
            if args.json {
                let doc = serde_json::json!({
                    "source": source.to_string(),
                    "policy": policy,
                    "resolved": resolved,
                    "bind_owners": resolved.bind_owners().collect::<Vec<_>>(),
                    "nat_targets": resolved.nat_targets().collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!(
                    "# effective policy from {}",
                    comment_safe(&source.to_string())
                );
                print!("{}", show_toml(&policy, Some(&resolved)));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The policy as TOML, each `[[ports]]` entry followed by its resolved owners
/// as comments: the output parses back as the same policy.
pub fn show_toml(policy: &Policy, resolved: Option<&ResolvedOwners>) -> String {
    let mut out = String::new();
    if let Some(r) = resolved {
        let _ = writeln!(out, "# docker: {}", comment_safe(&docker_line(&r.docker)));
    }
    let _ = writeln!(out, "mode = \"{}\"", policy.mode);
    let _ = writeln!(out, "on_shadow = \"{}\"", policy.on_shadow);
    if policy.kubernetes != crate::policy::KubernetesPolicy::default() {
        // Under its own key, so that nested tables print as `[kubernetes.remap]`.
        #[derive(serde::Serialize)]
        struct Table<'a> {
            kubernetes: &'a crate::policy::KubernetesPolicy,
        }
        out.push('\n');
        out.push_str(
            &toml::to_string(&Table {
                kubernetes: &policy.kubernetes,
            })
            .expect("the kubernetes table always serialises"),
        );
    }
    for (i, entry) in policy.ports.iter().enumerate() {
        out.push_str("\n[[ports]]\n");
        out.push_str(&toml::to_string(entry).expect("a port entry always serialises"));
        if let Some(port) = resolved.and_then(|r| r.ports.get(i)) {
            resolved_comments(&mut out, port);
        }
    }
    out
}

fn docker_line(status: &DockerStatus) -> String {
    match status {
        DockerStatus::Reachable {
            version,
            api_version,
        } => format!("reachable (dockerd {version}, API {api_version})"),
        DockerStatus::Unreachable { reason } => format!("not reachable ({reason})"),
        DockerStatus::Connecting => "not reachable (not connected yet)".into(),
    }
}

fn resolved_comments(out: &mut String, port: &ResolvedPort) {
    let mut lines = vec![format!("[resolved] {}/{}", port.proto, port.port)];
    for owner in &port.owners {
        let spec = &owner.spec;
        match &owner.found {
            Found::Docker {
                containers,
                proxies,
                proxy_exe,
                daemon_exe,
            } => {
                if !containers.iter().any(|c| c.running) {
                    lines.push(format!("  {spec}: no running container matches"));
                }
                for c in containers {
                    if !c.running {
                        lines.push(format!(
                            "  {spec}: container {} ({}) not running: its cgroup is watched for",
                            c.name,
                            &c.id[..c.id.len().min(12)]
                        ));
                        continue;
                    }
                    let cgroup = c.cgroup.as_ref().map_or("cgroup unknown".into(), |g| {
                        format!("cgroup {} (id {})", g.path, g.id)
                    });
                    let pid = c.pid.map_or("-".into(), |p| p.to_string());
                    lines.push(format!(
                        "  {spec}: container {} ({}) pid {pid}, {cgroup}",
                        c.name,
                        &c.id[..c.id.len().min(12)]
                    ));
                    for n in &c.networks {
                        let ips: Vec<String> = n
                            .ipv4
                            .map(|ip| ip.to_string())
                            .into_iter()
                            .chain(n.ipv6.map(|ip| ip.to_string()))
                            .collect();
                        lines.push(format!("    network {}: {}", n.network, ips.join(", ")));
                    }
                    for p in &c.published {
                        let host = p.host_ip.map_or("*".into(), |ip| ip.to_string());
                        lines.push(format!(
                            "    publishes {host}:{}/{} -> {}",
                            p.host_port, p.proto, p.container_port
                        ));
                    }
                }
                match proxy_exe {
                    Some(id) => lines.push(format!("  docker-proxy: executable {id}")),
                    None => lines.push("  docker-proxy: executable not found".into()),
                }
                match daemon_exe {
                    Some(id) => lines.push(format!(
                        "  dockerd (serves the API; binds published ports itself with daemon-side binding): executable {id}"
                    )),
                    None => lines.push(
                        "  dockerd: the daemon's process could not be identified: its own binds are not recognised".into(),
                    ),
                }
                for p in proxies {
                    let cgroup = p.cgroup.as_ref().map_or(String::new(), |g| {
                        format!(", cgroup {} (id {})", g.path, g.id)
                    });
                    lines.push(format!(
                        "    pid {} {}:{}/{} -> {}:{}{cgroup}",
                        p.pid,
                        p.host_ip.map_or("*".into(), |ip| ip.to_string()),
                        p.host_port,
                        p.proto,
                        p.container_ip.map_or("?".into(), |ip| ip.to_string()),
                        p.container_port.map_or("?".into(), |port| port.to_string()),
                    ));
                }
            }
            Found::DockerUnreachable { reason } => {
                lines.push(format!("  {spec}: docker: not reachable ({reason})"));
            }
            Found::Cgroup(c) => lines.push(format!("  {spec}: cgroup {} (id {})", c.path, c.id)),
            Found::Exe { path, id } => {
                lines.push(format!("  {spec}: executable {} ({id})", path.display()));
            }
            Found::Missing { reason } => lines.push(format!("  {spec}: not found: {reason}")),
        }
    }
    for nat in port.nat_targets() {
        lines.push(format!(
            "  nat: {}:{}/{} -> {}:{} ({})",
            nat.host_ip.map_or("*".into(), |ip| ip.to_string()),
            nat.host_port,
            nat.proto,
            nat.container_ip,
            nat.container_port,
            nat.container
        ));
    }
    for line in lines {
        let _ = writeln!(out, "# {}", comment_safe(&line));
    }
}

/// A comment ends at a newline: names and labels must not break out of it.
fn comment_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        owners::{DockerFacts, resolve},
        policy::{Mode, OnShadow, OwnerSpec, PolicySource, ProtectedPort},
        types::{PortRange, Proto},
    };

    fn owner() -> impl Strategy<Value = OwnerSpec> {
        prop_oneof![
            Just(OwnerSpec::Docker),
            ".{1,12}".prop_map(OwnerSpec::DockerName),
            ("[^=]{1,8}", ".{0,8}").prop_map(|(key, value)| OwnerSpec::DockerLabel { key, value }),
            (
                "[a-z0-9@_.-]{1,10}",
                prop::sample::select(vec![".service", ".scope", ".slice"])
            )
                .prop_map(|(n, s)| OwnerSpec::Unit(format!("{n}{s}"))),
            ".{0,12}".prop_map(|p| OwnerSpec::Exe(format!("/{p}").into())),
            ".{0,12}".prop_map(|p| OwnerSpec::Cgroup(format!("/{p}").into())),
        ]
    }

    fn mode() -> impl Strategy<Value = Mode> {
        prop_oneof![Just(Mode::Enforce), Just(Mode::Observe)]
    }

    fn on_shadow() -> impl Strategy<Value = OnShadow> {
        prop_oneof![Just(OnShadow::Report), Just(OnShadow::Remove)]
    }

    prop_compose! {
        fn entry()(
            start in 1u16..=65535,
            len in prop_oneof![Just(0u16), 0u16..200],
            udp in any::<bool>(),
            owners in prop::collection::vec(owner(), 1..4),
            pin in any::<bool>(),
            mode in prop::option::of(mode()),
            on_shadow in prop::option::of(on_shadow()),
        ) -> ProtectedPort {
            let mut owner: Vec<OwnerSpec> = Vec::new();
            for o in owners {
                if !owner.contains(&o) {
                    owner.push(o);
                }
            }
            ProtectedPort {
                port: PortRange { start, end: start.saturating_add(len) },
                proto: if udp { Proto::Udp } else { Proto::Tcp },
                owner,
                pin,
                mode,
                on_shadow,
                probe: None,
            }
        }
    }

    prop_compose! {
        /// Valid policies only: overlapping entries are dropped, as the parser would refuse them.
        fn policy()(
            mode in mode(),
            on_shadow in on_shadow(),
            entries in prop::collection::vec(entry(), 0..6),
        ) -> Policy {
            let mut ports: Vec<ProtectedPort> = Vec::new();
            for e in entries {
                if !ports.iter().any(|p| p.proto == e.proto && p.port.overlaps(&e.port)) {
                    ports.push(e);
                }
            }
            Policy {
                mode,
                on_shadow,
                ports,
                kubernetes: Default::default(),
                metrics: Default::default(),
            }
        }
    }

    fn parse(text: &str) -> Policy {
        Policy::parse(text, PolicySource::Embedded)
            .unwrap_or_else(|e| panic!("{e}\n--- text ---\n{text}"))
    }

    proptest! {
        #[test]
        fn show_round_trips(policy in policy(), reason in ".{0,20}\n.{0,20}") {
            // Parse the file form first: "any config that parses".
            let parsed = parse(&policy.to_toml());
            prop_assert_eq!(&parsed, &policy);
            let facts = DockerFacts::new(DockerStatus::Unreachable { reason });
            let resolved = resolve(&parsed, &facts, None);
            let shown = show_toml(&parsed, Some(&resolved));
            prop_assert_eq!(parse(&shown), parsed);
        }
    }

    #[test]
    fn show_prints_the_kubernetes_table_and_it_parses_back() {
        let p = parse(
            "[[ports]]\nport = 80\nowner = \"docker\"\n[kubernetes]\non_claim = \"reconfigure\"\n\
             remap = { 80 = 8081, 443 = 8444 }\nremove_crds = true\nservicelb_namespace = \"lb\"\n",
        );
        let shown = show_toml(&p, None);
        assert!(shown.contains("[kubernetes.remap]"), "{shown}");
        assert_eq!(parse(&shown), p, "{shown}");
    }

    #[test]
    fn show_says_docker_is_not_reachable_and_still_parses() {
        let policy = parse(
            "[[ports]]\nport = 80\nowner = \"docker\"\n[[ports]]\nport = \"9000-9001\"\nproto = \"udp\"\nowner = [\"exe:/bin/sh\", \"cgroup:/no/such/pg\"]\npin = true\n",
        );
        let facts = DockerFacts::new(DockerStatus::Unreachable {
            reason: "/x.sock: connection refused\nsecond line".into(),
        });
        let shown = show_toml(&policy, Some(&resolve(&policy, &facts, None)));
        assert!(
            shown
                .starts_with("# docker: not reachable (/x.sock: connection refused?second line)\n"),
            "{shown}"
        );
        assert!(
            shown.contains("# [resolved] tcp/80\n#   docker: docker: not reachable ("),
            "{shown}"
        );
        assert!(
            shown.contains("#   exe:/bin/sh: executable /bin/sh (dev "),
            "{shown}"
        );
        assert!(
            shown.contains("#   cgroup:/no/such/pg: not found: no cgroup v2 hierarchy is mounted"),
            "{shown}"
        );
        assert_eq!(parse(&shown), policy);
    }
}
