//! docker-proxy: the userland proxy dockerd starts for each published port. It
//! binds the host port itself, so it is the process that must be allowed to.
//!
//! Found through `/proc`: a process whose executable file is named
//! `docker-proxy` and whose parent runs `dockerd`, with `-host-port N` in its
//! arguments. Never by `comm`, which any process can set.
//!
//! A proxy binds before Docker reports the container started, so its pid cannot
//! be known in advance; what can be is the proxy's executable, [`proxy_exe`].

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{cgroup::CgroupRef, exe::ExeId};
use crate::types::Proto;

/// One running docker-proxy and what it forwards.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DockerProxy {
    pub pid: u32,
    pub proto: Proto,
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_ip: Option<IpAddr>,
    pub container_port: Option<u16>,
    /// dockerd's cgroup, which the proxy inherits.
    pub cgroup: Option<CgroupRef>,
    pub exe: ExeId,
}

/// Every docker-proxy running now.
pub fn scan(cgroup_root: Option<&Path>) -> Vec<DockerProxy> {
    let mut found: Vec<DockerProxy> = pids()
        .filter(|&pid| exe_name(pid).as_deref() == Some("docker-proxy"))
        .filter(|&pid| parent(pid).and_then(exe_name).as_deref() == Some("dockerd"))
        .filter_map(|pid| {
            let args = cmdline(pid)?;
            let mut proxy = parse_args(pid, &args)?;
            proxy.exe = ExeId::of_process(pid).ok()?;
            proxy.cgroup = cgroup_root.and_then(|root| CgroupRef::of_process(root, pid));
            Some(proxy)
        })
        .collect();
    found.sort();
    found
}

/// The docker-proxy executable, known before any proxy runs: a running proxy's
/// file when there is one, else dockerd's `--userland-proxy-path`, else the
/// first `docker-proxy` next to dockerd or in the usual directories.
pub fn proxy_exe(running: &[DockerProxy]) -> Option<ExeId> {
    if let Some(p) = running.first() {
        return Some(p.exe);
    }
    let dockerd = pids().find(|&pid| exe_name(pid).as_deref() == Some("dockerd"));
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(pid) = dockerd {
        let args = cmdline(pid).unwrap_or_default();
        let configured = args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix("--userland-proxy-path=")
                .map(str::to_owned)
                .or_else(|| (a == "--userland-proxy-path").then(|| args.get(i + 1).cloned())?)
        });
        candidates.extend(configured.map(PathBuf::from));
        if let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe"))
            && let Some(dir) = exe.parent()
        {
            candidates.push(dir.join("docker-proxy"));
        }
    }
    candidates.extend(
        [
            "/usr/bin",
            "/usr/sbin",
            "/usr/local/bin",
            "/usr/libexec/docker",
        ]
        .iter()
        .map(|d| Path::new(d).join("docker-proxy")),
    );
    candidates.iter().find_map(|p| ExeId::of_path(p).ok())
}

fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

fn exe_name(pid: u32) -> Option<String> {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    // A replaced binary reads as "/usr/bin/x (deleted)".
    let name = exe.file_name()?.to_string_lossy().into_owned();
    Some(name.trim_end_matches(" (deleted)").to_owned())
}

fn parent(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// `-proto tcp -host-ip 127.0.0.1 -host-port 8080 -container-ip 172.17.0.2 -container-port 80`
fn parse_args(pid: u32, args: &[String]) -> Option<DockerProxy> {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag || a.strip_prefix('-') == Some(flag))
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let host_port = value("-host-port")?.parse().ok()?;
    let proto = match value("-proto").unwrap_or("tcp") {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    Some(DockerProxy {
        pid,
        proto,
        host_ip: value("-host-ip").and_then(|s| s.parse().ok()),
        host_port,
        container_ip: value("-container-ip").and_then(|s| s.parse().ok()),
        container_port: value("-container-port").and_then(|s| s.parse().ok()),
        cgroup: None,
        exe: ExeId { dev: 0, ino: 0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_docker_proxy_arguments() {
        let p = parse_args(
            7,
            &args("/usr/sbin/docker-proxy -proto tcp -host-ip 127.0.0.1 -host-port 18080 -container-ip 172.17.0.2 -container-port 8080"),
        )
        .unwrap();
        assert_eq!(p.proto, Proto::Tcp);
        assert_eq!(p.host_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(p.host_port, 18080);
        assert_eq!(p.container_ip, Some("172.17.0.2".parse().unwrap()));
        assert_eq!(p.container_port, Some(8080));
        let v6 = parse_args(8, &args("docker-proxy -proto udp -host-ip :: -host-port 53 -container-ip fd00::2 -container-port 53")).unwrap();
        assert_eq!(v6.proto, Proto::Udp);
        assert_eq!(v6.host_ip, Some("::".parse().unwrap()));
    }

    #[test]
    fn without_host_port_it_is_not_a_proxy() {
        assert_eq!(parse_args(1, &args("docker-proxy -proto tcp")), None);
    }

    #[test]
    fn a_process_calling_itself_docker_proxy_is_not_one() {
        let mut child = crate::owners::exe::tests::spawn_renamed(
            "docker-proxy",
            &["-proto", "tcp", "-host-port", "80"],
        );
        let pid = child.id();
        let found = scan(None);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found.iter().all(|p| p.pid != pid), "{found:?}");
    }
}
