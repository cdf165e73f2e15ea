//! `portguard config check|show` as a user runs them: exit codes, messages
//! placed at file:line:col, and `show` printing resolved owners that parse back.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use portguard::policy::{Policy, PolicySource};
use portguard_tests::{
    docker::{Container, Image},
    portguard_bin, require_root, unique_name,
};

/// A policy file removed on drop.
struct PolicyFile(PathBuf);

impl PolicyFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name("pg-config") + ".toml");
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn portguard(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(portguard_bin());
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied());
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_places_every_error_class_and_exits_2() {
    let cases = [
        (
            "[[ports]]\nport = 80\nowner = \"docker\"\npinn = true\n",
            "4:1: unknown field `pinn`, expected one of `port`, `proto`, `owner`, `pin`, `mode`",
        ),
        (
            "[[ports]]\nport = 70000\nowner = \"docker\"\n",
            "2:8: port 70000 is out of range (1-65535)",
        ),
        (
            "[[ports]]\nport = \"8000-8099\"\nowner = \"docker\"\n[[ports]]\nport = 8050\nowner = \"unit:x.service\"\n",
            "5:8: tcp/8050 overlaps tcp/8000-8099 with different owners (unit:x.service vs docker)",
        ),
        (
            "[[ports]]\nport = 80\nowner = \"podman:web\"\n",
            "3:9: unknown owner kind \"podman:web\": expected docker, docker:NAME, docker-label:KEY=VALUE, unit:NAME.service, exe:/PATH or cgroup:/PATH",
        ),
    ];
    for (policy, message) in cases {
        let file = PolicyFile::new(policy);
        let out = portguard(&["config", "check"], file.path(), &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{policy:?}: {stderr}");
        let expected = format!("{}:{message}", file.path().display());
        assert!(
            stderr.contains(&expected),
            "expected {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_accepts_a_valid_policy_and_refuses_a_missing_file() {
    let file =
        PolicyFile::new("mode = \"observe\"\n[[ports]]\nport = 443\nowner = \"docker:frontend\"\n");
    let out = portguard(&["config", "check"], file.path(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(": ok (1 protected port entry, mode observe)"));

    let missing = std::env::temp_dir().join(unique_name("pg-absent") + ".toml");
    let out = portguard(&["config", "check"], &missing, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read policy"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn show_without_docker_says_so_and_parses_back() {
    let policy = "[[ports]]\nport = 80\nowner = \"docker\"\npin = true\n[[ports]]\nport = \"9000-9001\"\nproto = \"udp\"\nowner = [\"exe:/bin/sh\", \"cgroup:/\"]\n";
    let file = PolicyFile::new(policy);
    let env = [("DOCKER_HOST", "unix:///nonexistent/pgtest/docker.sock")];
    let out = portguard(&["config", "show"], file.path(), &env);
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(shown.contains("# docker: not reachable ("), "{shown}");
    assert!(
        shown.contains("#   docker: docker: not reachable ("),
        "{shown}"
    );
    assert!(
        shown.contains("#   exe:/bin/sh: executable /bin/sh (dev "),
        "{shown}"
    );
    assert!(shown.contains("#   cgroup:/: cgroup / (id "), "{shown}");
    let original = Policy::parse(policy, PolicySource::Embedded).unwrap();
    assert_eq!(
        Policy::parse(&shown, PolicySource::Embedded).unwrap(),
        original
    );

    let out = portguard(&["config", "show", "--json"], file.path(), &env);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["resolved"]["docker"]["state"], "unreachable");
    assert_eq!(v["policy"]["ports"][1]["owner"][0], "exe:/bin/sh");
    assert_eq!(
        v["bind_owners"].as_array().unwrap().len(),
        3,
        "one per port"
    );
}

#[test]
fn show_lists_a_running_container_with_its_address_and_cgroup() {
    require_root();
    let image = Image::busybox();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web = Container::httpd(&image, &format!("127.0.0.1:{port}:8080"), &[]);
    let policy = format!("[[ports]]\nport = {port}\nowner = \"docker\"\n");
    let file = PolicyFile::new(&policy);
    let out = portguard(&["config", "show"], file.path(), &[]);
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ip = web.ip("bridge");
    assert!(shown.contains("# docker: reachable (dockerd "), "{shown}");
    assert!(
        shown.contains(&format!("#   docker: container {} (", web.name())),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("#     network bridge: {ip}\n")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("#     publishes 127.0.0.1:{port}/tcp -> 8080\n")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!(
            "#   nat: 127.0.0.1:{port}/tcp -> {ip}:8080 ({})",
            web.name()
        )),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("cgroup /docker/{}", web.id())),
        "{shown}"
    );
    assert_eq!(
        Policy::parse(&shown, PolicySource::Embedded).unwrap(),
        Policy::parse(&policy, PolicySource::Embedded).unwrap()
    );
    println!("{shown}");
}
