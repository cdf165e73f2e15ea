//! The real CNI plugins (Debian's containernetworking-plugins), run by hand the
//! way a container runtime runs them.

use std::{io::Write as _, process::Stdio};

use crate::netns::NetNs;

/// Where Debian installs the plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// Runs `plugin` with `CNI_COMMAND=ADD` in `host` for the pod namespace `pod`
/// and the network config `conf` on stdin; returns the plugin's result JSON.
pub fn add(host: &NetNs, pod: &NetNs, plugin: &str, conf: &str) -> String {
    let mut child = host
        .command([format!("{CNI_PATH}/{plugin}")])
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "pgtest0123456789")
        .env("CNI_NETNS", format!("/run/netns/{}", pod.name()))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn CNI plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "CNI {plugin} failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The pod network of the test labs: the real bridge plugin on `cni0`, pods in
/// 203.0.113.128/25, host-local IPAM keeping its state in `ipam_dir`.
pub fn bridge_conf(ipam_dir: &std::path::Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"cbr0","type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,"ipam":{{"type":"host-local","subnet":"203.0.113.128/25","dataDir":"{}","routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
        ipam_dir.display()
    )
}
