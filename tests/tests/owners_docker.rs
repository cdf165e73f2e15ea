//! Owners resolved from a real dockerd and kept current through its events:
//! containers this test makes, published on loopback only.

use std::{
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use portguard::{
    owners::{Container as Resolved, DockerStatus, ExeId, Found, Owners, ResolvedOwners},
    policy::{Policy, PolicySource, Proto},
};
use portguard_tests::{
    cgroup::unified_root,
    docker::{Container, Image, Network, SocketForward},
    free_port, require_root,
};
use tokio::{runtime::Runtime, sync::watch};

/// Generous: a timeout, not a latency assertion (the figure is printed).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

fn policy(text: &str) -> Policy {
    Policy::parse(text, PolicySource::Embedded).unwrap()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The containers the first entry's first owner resolved to.
fn containers(model: &ResolvedOwners) -> &[Resolved] {
    match &model.ports[0].owners[0].found {
        Found::Docker { containers, .. } => containers,
        other => panic!("docker owner resolved to {other:?}"),
    }
}

fn find<'a>(model: &'a ResolvedOwners, c: &Container) -> Option<&'a Resolved> {
    containers(model).iter().find(|r| r.id == c.id())
}

/// Waits until the model satisfies `pred`; returns it and how long that took
/// after `since`. Panics with the last model on timeout.
fn wait_model(
    rt: &Runtime,
    rx: &mut watch::Receiver<Arc<ResolvedOwners>>,
    what: &str,
    since: Instant,
    pred: impl FnMut(&Arc<ResolvedOwners>) -> bool,
) -> (Arc<ResolvedOwners>, Duration) {
    let got = rt.block_on(async {
        tokio::time::timeout(CHANGE_TIMEOUT, rx.wait_for(pred))
            .await
            .map(|r| r.expect("the owners task is alive").clone())
    });
    match got {
        Ok(model) => (model, since.elapsed()),
        Err(_) => panic!(
            "{what}: no such model within {CHANGE_TIMEOUT:?}; last:\n{:#?}",
            rx.borrow()
        ),
    }
}

/// Runs a docker command and says how long the model took to follow it.
fn measured(
    rt: &Runtime,
    rx: &mut watch::Receiver<Arc<ResolvedOwners>>,
    what: &str,
    command: impl FnOnce(),
    pred: impl FnMut(&Arc<ResolvedOwners>) -> bool,
) -> Arc<ResolvedOwners> {
    let start = Instant::now();
    command();
    let returned = start.elapsed();
    let (model, total) = wait_model(rt, rx, what, start, pred);
    // Docker emits the event before the CLI returns, so "after return" is often 0.
    println!(
        "latency: {what}: model updated {} ms after the command started, {} ms after it returned (command took {} ms)",
        total.as_millis(),
        total.saturating_sub(returned).as_millis(),
        returned.as_millis()
    );
    model
}

/// What the host says the container's cgroup id is: the inode of its cgroup
/// v2 directory, found through its init process.
fn host_cgroup_id(c: &Container) -> u64 {
    let pid = c.pid();
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    fs::metadata(unified_root().join(rel.trim_start_matches('/')))
        .unwrap()
        .ino()
}

fn assert_matches_docker(r: &Resolved, c: &Container) {
    assert_eq!(r.name, c.name());
    assert_eq!(r.pid, Some(c.pid()));
    let ip: IpAddr = c.ip("bridge").parse().unwrap();
    let bridge = r.networks.iter().find(|n| n.network == "bridge").unwrap();
    assert_eq!(
        bridge.ipv4.map(IpAddr::V4),
        Some(ip),
        "docker inspect says {ip}"
    );
    assert_eq!(r.cgroup.as_ref().map(|g| g.id), Some(host_cgroup_id(c)));
}

#[test]
fn a_published_container_is_resolved_and_followed_through_events() {
    require_root();
    let image = Image::busybox();
    let port = free_port();
    let web = Container::httpd(&image, &format!("127.0.0.1:{port}:8080"), &[]);
    let rt = runtime();
    let (mut rx, follow) = rt.block_on(
        Owners::new(policy(&format!(
            "[[ports]]\nport = {port}\nowner = \"docker\"\n"
        )))
        .start(),
    );
    let task = rt.spawn(follow);

    // Resolved: container, IP, cgroup, published port, docker-proxy, NAT target.
    let (model, _) = wait_model(&rt, &mut rx, "container up", Instant::now(), |m| {
        find(m, &web).is_some()
    });
    assert!(
        matches!(model.docker, DockerStatus::Reachable { .. }),
        "{:?}",
        model.docker
    );
    let r = find(&model, &web).unwrap();
    assert_matches_docker(r, &web);
    assert!(r.publishes(Proto::Tcp, port));
    let Found::Docker {
        proxies, proxy_exe, ..
    } = &model.ports[0].owners[0].found
    else {
        unreachable!()
    };
    let proxy = proxies
        .iter()
        .find(|p| p.host_port == port)
        .expect("docker-proxy for the published port");
    assert_eq!(proxy.host_ip, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(proxy.container_ip, Some(c_ip(&web)));
    let cmdline = fs::read(format!("/proc/{}/cmdline", proxy.pid)).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains(&port.to_string()));
    let proxy_file =
        ExeId::of_path(&fs::read_link(format!("/proc/{}/exe", proxy.pid)).unwrap()).unwrap();
    assert_eq!(*proxy_exe, Some(proxy_file));
    let allowed = model.bind_owners().find(|b| b.port == port).unwrap();
    assert!(allowed.cgroups.contains(&host_cgroup_id(&web)));
    assert!(allowed.exes.contains(&proxy_file));
    let nat: Vec<_> = model.nat_targets().collect();
    assert_eq!(nat.len(), 1, "{nat:?}");
    assert_eq!(
        (nat[0].host_port, nat[0].container_ip, nat[0].container_port),
        (port, c_ip(&web), 8080)
    );
    let first_ip = c_ip(&web);

    // Stop: gone from the model, and the proxy with it.
    let model = measured(
        &rt,
        &mut rx,
        "docker stop",
        || web.stop(),
        |m| find(m, &web).is_none(),
    );
    assert!(model.bind_owners().all(|b| b.cgroups.is_empty()));
    assert_eq!(model.nat_targets().count(), 0);

    // Another container takes the freed address, so the restart gets a new one.
    let squatter = Container::sleeper(&image);
    let model = measured(
        &rt,
        &mut rx,
        "docker start",
        || web.start(),
        |m| find(m, &web).is_some_and(|r| r.pid == Some(web.pid())),
    );
    assert_matches_docker(find(&model, &web).unwrap(), &web);
    println!(
        "address before stop {first_ip}, squatter {}, after start {}",
        squatter.ip("bridge"),
        c_ip(&web)
    );
    if squatter.ip("bridge") == first_ip.to_string() {
        assert_ne!(c_ip(&web), first_ip, "the old address is taken");
    }

    // Restart: a new init process in a new cgroup directory, same container.
    let old_cgroup = find(&model, &web).unwrap().cgroup.clone();
    let model = measured(
        &rt,
        &mut rx,
        "docker restart",
        || web.restart(),
        |m| find(m, &web).is_some_and(|r| r.pid == Some(web.pid()) && r.cgroup != old_cgroup),
    );
    assert_matches_docker(find(&model, &web).unwrap(), &web);

    // Remove.
    let id = web.id().to_owned();
    measured(
        &rt,
        &mut rx,
        "docker rm --force",
        || web.remove(),
        |m| containers(m).iter().all(|r| r.id != id),
    );
    task.abort();
}

fn c_ip(c: &Container) -> IpAddr {
    c.ip("bridge").parse().unwrap()
}

#[test]
fn network_connect_and_disconnect_update_addresses() {
    require_root();
    let image = Image::busybox();
    let port = free_port();
    let web = Container::httpd(&image, &format!("127.0.0.1:{port}:8080"), &[]);
    let net = Network::create();
    let rt = runtime();
    let name = web.name().to_owned();
    let (mut rx, follow) = rt.block_on(
        Owners::new(policy(&format!(
            "[[ports]]\nport = {port}\nowner = \"docker:{name}\"\n"
        )))
        .start(),
    );
    let task = rt.spawn(follow);
    let on = |m: &Arc<ResolvedOwners>, network: &str| {
        find(m, &web).is_some_and(|r| r.networks.iter().any(|n| n.network == network))
    };
    wait_model(&rt, &mut rx, "container up", Instant::now(), |m| {
        on(m, "bridge")
    });
    let model = measured(
        &rt,
        &mut rx,
        "docker network connect",
        || net.connect(&web),
        |m| on(m, net.name()),
    );
    let ip = find(&model, &web)
        .unwrap()
        .networks
        .iter()
        .find(|n| n.network == net.name())
        .and_then(|n| n.ipv4)
        .map(|ip| ip.to_string());
    assert_eq!(ip.as_deref(), Some(web.ip(net.name()).as_str()));
    measured(
        &rt,
        &mut rx,
        "docker network disconnect",
        || net.disconnect(&web),
        |m| !on(m, net.name()) && on(m, "bridge"),
    );
    task.abort();
}

#[test]
fn names_and_labels_select_only_their_containers() {
    require_root();
    let image = Image::busybox();
    let label = format!("com.example.pgtest={}", std::process::id());
    let labelled = Container::httpd(
        &image,
        &format!("127.0.0.1:{}:8080", free_port()),
        &["--label", &label],
    );
    let plain = Container::httpd(&image, &format!("127.0.0.1:{}:8080", free_port()), &[]);
    let text = format!(
        "[[ports]]\nport = 1\nowner = \"docker-label:{label}\"\n[[ports]]\nport = 2\nowner = \"docker:{}\"\n",
        plain.name()
    );
    let rt = runtime();
    let model = rt.block_on(Owners::new(policy(&text)).resolve_once());
    let names = |entry: usize| -> Vec<String> {
        match &model.ports[entry].owners[0].found {
            Found::Docker { containers, .. } => containers.iter().map(|c| c.name.clone()).collect(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(names(0), [labelled.name()]);
    assert_eq!(names(1), [plain.name()]);
    // Named containers own their entry's port even without publishing it.
    let allowed: Vec<_> = model.bind_owners().map(|b| b.cgroups.len()).collect();
    assert_eq!(allowed, [1, 1]);
}

#[test]
fn docker_going_away_is_a_state_and_owners_come_back() {
    require_root();
    let image = Image::busybox();
    let port = free_port();
    let web = Container::httpd(&image, &format!("127.0.0.1:{port}:8080"), &[]);
    let socket = SocketForward::path_for_test();
    assert!(!Path::new(&socket).exists());
    let rt = runtime();
    let (mut rx, follow) = rt.block_on(
        Owners::new(policy(&format!(
            "[[ports]]\nport = {port}\nowner = \"docker\"\n"
        )))
        .docker_socket(&socket)
        .start(),
    );
    let task = rt.spawn(follow);
    {
        let model = rx.borrow();
        let DockerStatus::Unreachable { reason } = &model.docker else {
            panic!("{:?}", model.docker)
        };
        assert!(reason.contains(&socket.display().to_string()), "{reason}");
        assert!(matches!(
            model.ports[0].owners[0].found,
            Found::DockerUnreachable { .. }
        ));
    }

    // dockerd "comes back": owners resolve without anyone asking.
    let forward = SocketForward::start(&socket);
    let (model, after) = wait_model(&rt, &mut rx, "docker reachable", Instant::now(), |m| {
        matches!(m.docker, DockerStatus::Reachable { .. })
    });
    println!(
        "latency: reconnect after the socket appeared: {} ms (backoff ≤ 5 s)",
        after.as_millis()
    );
    assert!(find(&model, &web).is_some());

    // And goes away again mid-stream: a state, not a crash.
    let model = measured(
        &rt,
        &mut rx,
        "event stream cut",
        || forward.stop(),
        |m| matches!(m.docker, DockerStatus::Unreachable { .. }),
    );
    assert!(model.bind_owners().all(|b| b.cgroups.is_empty()));
    assert!(
        !task.is_finished(),
        "the owners task survives dockerd going away"
    );
    task.abort();
}
