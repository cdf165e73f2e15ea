//! The rule guard's loop on the in-memory backend: no root, no kernel. Each
//! test starts the real [`RuleGuard::run`] against a [`MemoryBackend`], drives
//! it through the backend's control (rules added, overruns, tables re-created,
//! rules vanishing) and the owners channel, and checks every committed batch,
//! the model after it, and the audit log.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    GuardError, GuardReport, MemoryBackend, MemoryControl, RuleGuard,
    backend::{RulePlace, RuleTarget, memory::MEMORY_PORT_ID},
};
use crate::{
    audit::{AuditHandle, AuditLog, Rotation},
    nft::{
        LocalAddr, RulesetModel,
        model::Family,
        netlink::{decode_messages, tests::sample_dump},
        pin::{self, Pin},
        transaction::Op,
    },
    owners::{
        DockerStatus, Found, ResolvedOwner, ResolvedOwners, ResolvedPort,
        docker::{Container, NetworkIp, Published},
    },
    policy::{Mode, OwnerSpec, Policy, PolicySource, PortRange, Proto},
};

/// How long a test waits for the guard to do something it must do.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long a test waits to see that the guard does nothing.
const QUIET: Duration = Duration::from_millis(200);
/// The sample dump's hijack: `table ip t`, chain `pre`, handle 7.
const TABLE: &str = "t";
const CHAIN: &str = "pre";
const HIJACK_HANDLE: u64 = 7;

/// The sample hijack's raw expressions (`tcp dport 80 … dnat to 203.0.113.9`).
fn hijack_exprs() -> Vec<u8> {
    decode_messages(&sample_dump()).tables[0].chains[0].rules[0]
        .raw_exprs()
        .expect("read over netlink: raw")
        .to_vec()
}

fn hijack_at() -> (Family, &'static str, &'static str) {
    (Family::IP, TABLE, CHAIN)
}

/// A DNAT on a port nobody protects: no finding, never touched.
fn innocent_exprs() -> Vec<u8> {
    Pin {
        proto: Proto::Tcp,
        port: 8080,
        host: None,
        target: "203.0.113.9:8080".parse().unwrap(),
        exclude_iif: None,
    }
    .expressions(false)
}

fn addr(ip: &str, prefix_len: u8, ifindex: u32, ifname: &str) -> LocalAddr {
    LocalAddr {
        addr: ip.parse().unwrap(),
        prefix_len,
        ifindex,
        ifname: ifname.into(),
    }
}

fn host_addrs() -> Vec<LocalAddr> {
    vec![
        addr("198.51.100.1", 24, 2, "eth0"),
        addr("172.17.0.1", 16, 3, "docker0"),
    ]
}

fn policy(pin: bool) -> Policy {
    let mut policy = Policy::parse(
        &format!("[[ports]]\nport = 80\nowner = \"docker\"\npin = {pin}\n"),
        PolicySource::Embedded,
    )
    .expect("policy");
    policy.mode = Mode::Enforce;
    policy
}

/// Docker reachable; `web` publishes 80→80 from `ip`, when given.
fn owners(ip: Option<&str>) -> ResolvedOwners {
    let containers = ip
        .map(|ip| Container {
            id: "c0ffee".into(),
            name: "web".into(),
            running: true,
            pid: Some(4242),
            cgroup: None,
            labels: BTreeMap::new(),
            networks: vec![NetworkIp {
                network: "bridge".into(),
                ipv4: Some(ip.parse().unwrap()),
                ipv6: None,
            }],
            published: vec![Published {
                proto: Proto::Tcp,
                host_ip: None,
                host_port: 80,
                container_port: 80,
            }],
            cgroup_candidates: Vec::new(),
            cgroup_slots: Vec::new(),
        })
        .into_iter()
        .collect();
    ResolvedOwners {
        docker: DockerStatus::Reachable {
            version: "27.0".into(),
            api_version: "1.46".into(),
        },
        docker_bridges: vec!["docker0".into()],
        cgroup_root: None,
        ports: vec![ResolvedPort {
            proto: Proto::Tcp,
            port: PortRange::single(80),
            owners: vec![ResolvedOwner {
                slots: Vec::new(),
                spec: OwnerSpec::Docker,
                found: Found::Docker {
                    containers,
                    proxies: Vec::new(),
                    proxy_exe: None,
                    daemon_exe: None,
                },
            }],
        }],
    }
}

/// A running guard on a memory backend.
struct Harness {
    control: MemoryControl,
    /// The guard's audit log (a test makes its appends fail).
    audit: AuditHandle,
    reports: mpsc::Receiver<GuardReport>,
    owners: watch::Sender<Arc<ResolvedOwners>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), GuardError>>,
    audit_path: PathBuf,
    /// What the audit log held when each batch was committed: (batch,
    /// `rule_removing` intents).
    audit_at_commit: Arc<Mutex<Vec<(String, usize)>>>,
    _dir: tempfile::TempDir,
}

fn records_of(path: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|r| r["kind"] == kind)
        .collect()
}

fn rule_removed_records(path: &Path) -> Vec<serde_json::Value> {
    records_of(path, "rule_removed")
}

fn audit_kinds(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter_map(|r| r["kind"].as_str().map(str::to_owned))
        .collect()
}

impl Harness {
    /// `prepare` edits the ruleset before the guard starts (unannounced, as
    /// the state the guard's first read finds).
    fn start(
        model: RulesetModel,
        policy: Policy,
        owners: ResolvedOwners,
        prepare: impl FnOnce(&MemoryControl),
    ) -> Self {
        Self::start_with_audit(model, policy, owners, prepare, None)
    }

    /// [`Self::start`], the audit log failing with `errno` from the start.
    fn start_with_audit(
        model: RulesetModel,
        policy: Policy,
        owners: ResolvedOwners,
        prepare: impl FnOnce(&MemoryControl),
        failing: Option<i32>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit_path = dir.path().join("audit.jsonl");
        let audit = AuditHandle::new(AuditLog::open(&audit_path, Rotation::default()).unwrap());
        audit.fail_appends(failing);
        let audit_control = audit.clone();
        let (backend, control) = MemoryBackend::new(model, host_addrs());
        prepare(&control);
        let audit_at_commit = Arc::new(Mutex::new(Vec::new()));
        let (seen, path) = (audit_at_commit.clone(), audit_path.clone());
        control.on_commit(move |tx| {
            let intents = records_of(&path, "rule_removing").len();
            seen.lock().unwrap().push((tx.to_string(), intents));
        });
        let (owners_tx, owners_rx) = watch::channel(Arc::new(owners));
        let (reports_tx, reports) = mpsc::channel(1024);
        let (stop, stop_rx) = watch::channel(false);
        let guard = RuleGuard {
            netns: None,
            policy,
            audit,
            owners: owners_rx,
            reports: reports_tx,
            legacy_poll: Duration::from_secs(3600),
            legacy_check: Duration::from_secs(3600),
            cluster: None,
        };
        let task = tokio::spawn(guard.run(backend, stop_rx));
        Self {
            control,
            audit: audit_control,
            reports,
            owners: owners_tx,
            stop,
            task,
            audit_path,
            audit_at_commit,
            _dir: dir,
        }
    }

    /// The next report `pick` accepts (others are skipped).
    async fn wait_for<T>(&mut self, what: &str, pick: impl FnMut(GuardReport) -> Option<T>) -> T {
        self.wait_for_within(DEADLINE, what, pick).await
    }

    async fn wait_for_within<T>(
        &mut self,
        deadline: Duration,
        what: &str,
        mut pick: impl FnMut(GuardReport) -> Option<T>,
    ) -> T {
        tokio::time::timeout(deadline, async {
            loop {
                let r = self.reports.recv().await.expect("the guard runs");
                if let Some(t) = pick(r) {
                    return t;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the guard did not report {what} within {deadline:?}"))
    }

    /// The next removal: (id, returns, latency measured).
    async fn removed(&mut self) -> (String, u64, bool) {
        self.wait_for("a removal", |r| match r {
            GuardReport::Removed {
                id,
                returns,
                latency,
                ..
            } => Some((id, returns, latency.is_some())),
            _ => None,
        })
        .await
    }

    /// The next report of other tables named like the pin table.
    async fn foreign_pin_tables(&mut self) -> (Vec<pin::ForeignPinTable>, Vec<Pin>) {
        self.wait_for("foreign pin tables", |r| match r {
            GuardReport::ForeignPinTables { tables, withheld } => Some((tables, withheld)),
            _ => None,
        })
        .await
    }

    async fn pins_synced(&mut self) -> Vec<Pin> {
        self.wait_for("pins synced", |r| match r {
            GuardReport::PinSynced { pins } => Some(pins),
            _ => None,
        })
        .await
    }

    /// The number of rules the guard's model holds, at its next inspection
    /// that is not a full read.
    async fn inspected_rules(&mut self) -> usize {
        self.wait_for("an inspection", |r| match r {
            GuardReport::Inspected {
                rules,
                full_read: false,
                ..
            } => Some(rules),
            _ => None,
        })
        .await
    }

    /// Every full read from now until `QUIET` passes without a report.
    async fn quiet(&mut self) -> usize {
        let mut full_reads = 0;
        while let Ok(Some(r)) = tokio::time::timeout(QUIET, self.reports.recv()).await {
            if matches!(
                r,
                GuardReport::Inspected {
                    full_read: true,
                    ..
                }
            ) {
                full_reads += 1;
            }
        }
        full_reads
    }

    fn batches(&self) -> Vec<String> {
        self.control
            .committed()
            .iter()
            .map(|c| c.tx.to_string())
            .collect()
    }

    async fn stop(&mut self) -> Result<(), GuardError> {
        self.stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("the guard stops")
            .expect("the guard does not panic")
    }
}

fn delete_batch(handle: u64) -> String {
    format!("delete rule ip {TABLE} {CHAIN} handle {handle}\n")
}

/// The guard started on the sample dump with a DNAT of port 8080
/// ([`innocent_exprs`]) beside the hijack in its chain; that rule's handle.
fn beside_the_hijack(policy: Policy) -> (Harness, u64) {
    let handle = Arc::new(Mutex::new(0));
    let keep = handle.clone();
    let h = Harness::start(
        decode_messages(&sample_dump()),
        policy,
        owners(None),
        move |c| {
            let (family, table, chain) = hijack_at();
            *keep.lock().unwrap() = c.add_rule_unannounced(&RuleTarget {
                family,
                table,
                chain,
                exprs: &innocent_exprs(),
            });
        },
    );
    let handle = *handle.lock().unwrap();
    (h, handle)
}

#[tokio::test]
async fn a_hijack_is_recorded_whole_then_only_it_is_deleted() {
    let (mut h, innocent) = beside_the_hijack(policy(false));
    let (id, returns, _) = h.removed().await;
    assert_eq!(id, format!("ip/{TABLE}/{CHAIN}/{HIJACK_HANDLE}"));
    assert_eq!(returns, 0, "first time: not a return");
    h.quiet().await;
    // One batch, deleting only the hijack by its handle.
    assert_eq!(h.batches(), [delete_batch(HIJACK_HANDLE)]);
    assert_eq!(h.control.committed()[0].result, Ok(()));
    assert_eq!(
        h.control.handles(Family::IP, TABLE, CHAIN),
        [innocent],
        "the other rule in the chain stays"
    );
    // The intent was on disk when the batch was committed, whole.
    assert_eq!(
        *h.audit_at_commit.lock().unwrap(),
        [(delete_batch(HIJACK_HANDLE), 1)]
    );
    // Then the confirmed removal, whole again (what `restore` takes): its
    // raw expressions, byte for byte.
    assert_eq!(
        audit_kinds(&h.audit_path),
        ["rule_removing", "rule_removed"]
    );
    for records in [
        records_of(&h.audit_path, "rule_removing"),
        rule_removed_records(&h.audit_path),
    ] {
        assert_eq!(records.len(), 1);
        assert_eq!(records[0]["rule"]["handle"], HIJACK_HANDLE);
        assert_eq!(
            records[0]["rule"]["expressions"],
            B64.encode(hijack_exprs()),
            "{records:?}"
        );
    }
    h.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_removal_does_not_wait_for_the_rules_only_reported() {
    // One inspection finds a hijack of an enforced port and a foreign rule
    // on an observed one: the removal goes first, the reported rule's log,
    // report and durable `rule_found` record after it.
    let mut policy = Policy::parse(
        "[[ports]]\nport = 80\nowner = \"docker\"\npin = false\n\
         [[ports]]\nport = 8080\nowner = \"docker\"\nmode = \"observe\"\n",
        PolicySource::Embedded,
    )
    .expect("policy");
    policy.mode = Mode::Enforce;
    let (mut h, observed) = beside_the_hijack(policy);
    let mut order = Vec::new();
    h.wait_for("the removal, then the observed rule", |r| {
        match r {
            GuardReport::Removed { id, .. } => order.push(format!("removed {id}")),
            GuardReport::Observed { finding, .. } => {
                order.push(format!("observed {:?}:{}", finding.handle, finding.port));
            }
            _ => {}
        }
        (order.len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        order,
        [
            format!("removed ip/{TABLE}/{CHAIN}/{HIJACK_HANDLE}"),
            format!("observed Some({observed}):8080"),
        ]
    );
    h.quiet().await;
    h.stop().await.expect("clean stop");
    assert_eq!(h.batches(), [delete_batch(HIJACK_HANDLE)]);
    assert_eq!(
        h.control.handles(Family::IP, TABLE, CHAIN),
        [observed],
        "the observed rule stays"
    );
    assert_eq!(
        audit_kinds(&h.audit_path),
        ["rule_removing", "rule_removed", "rule_found"]
    );
    assert_eq!(records_of(&h.audit_path, "rule_found")[0]["port"], 8080);
}

#[tokio::test]
async fn a_hijack_committed_during_the_read_a_new_chain_caused_is_removed_naming_its_committer() {
    // kube-proxy makes a chain, then writes its rule into it at once. The
    // chain makes the guard read everything again; the rule is committed
    // while that read is under way, so the read holds it, and only its
    // announcement, still queued, names who committed it. The guard takes
    // that announcement before judging: the removal's records name `nft`.
    let mut h = Harness::start(
        decode_messages(&sample_dump()),
        policy(false),
        owners(None),
        |_| {},
    );
    h.removed().await;
    h.control.set_committer(std::process::id(), "nft");
    h.control.during_next_read(|c| {
        c.add_rule(&RuleTarget {
            family: Family::IP,
            table: "kp",
            chain: "pre",
            exprs: &hijack_exprs(),
        });
    });
    h.control.add_table(
        Family::IP,
        "kp",
        None,
        ("pre", crate::nft::Hook::Prerouting, -110),
    );
    let (id, _, _) = h.removed().await;
    assert!(id.starts_with("ip/kp/pre/"), "{id}");
    h.quiet().await;
    h.stop().await.expect("clean stop");
    assert!(h.control.handles(Family::IP, "kp", "pre").is_empty());
    let removed = rule_removed_records(&h.audit_path);
    assert_eq!(removed.len(), 2, "{removed:#?}");
    for kind in ["rule_removing", "rule_removed"] {
        let record = &records_of(&h.audit_path, kind)[1];
        assert_eq!(record["rule"]["table"], "kp", "{record:#}");
        assert_eq!(record["committer"]["name"], "nft", "{kind}: {record:#}");
    }
}

#[tokio::test]
async fn a_returning_rule_is_removed_again_and_counted() {
    let mut h = Harness::start(
        decode_messages(&sample_dump()),
        policy(false),
        owners(None),
        |_| {},
    );
    assert_eq!(h.removed().await.1, 0);
    for again in 1..=2 {
        // kube-proxy writes it back: announced, a new handle.
        let (family, table, chain) = hijack_at();
        let handle = h.control.add_rule(&RuleTarget {
            family,
            table,
            chain,
            exprs: &hijack_exprs(),
        });
        assert_ne!(handle, HIJACK_HANDLE);
        let (id, returns, latency) = h.removed().await;
        assert_eq!(id, format!("ip/{TABLE}/{CHAIN}/{handle}"));
        assert_eq!(returns, again, "the same rule back: a return");
        assert!(
            latency,
            "removed in answer to a notification: latency measured"
        );
        assert!(h.control.handles(Family::IP, TABLE, CHAIN).is_empty());
        assert_eq!(h.batches().last(), Some(&delete_batch(handle)));
    }
    assert_eq!(h.batches().len(), 3);
    assert_eq!(rule_removed_records(&h.audit_path).len(), 3);
    h.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_overrun_resyncs_and_removes_what_was_missed() {
    let mut model = decode_messages(&sample_dump());
    model.tables[0].chains[0].rules.clear();
    let mut h = Harness::start(model, policy(false), owners(None), |_| {});
    h.quiet().await;
    assert!(h.batches().is_empty(), "a clean ruleset: nothing to do");
    // A hijack whose notification was lost: the guard cannot know yet.
    let (family, table, chain) = hijack_at();
    let handle = h.control.add_rule_unannounced(&RuleTarget {
        family,
        table,
        chain,
        exprs: &hijack_exprs(),
    });
    h.quiet().await;
    assert!(
        h.batches().is_empty(),
        "unannounced: not seen without a re-read"
    );
    // ENOBUFS: the guard re-reads everything and finds it.
    h.control.overrun();
    let (id, returns, _) = h.removed().await;
    assert_eq!(id, format!("ip/{TABLE}/{CHAIN}/{handle}"));
    assert_eq!(returns, 0);
    assert_eq!(h.batches(), [delete_batch(handle)]);
    assert!(h.control.handles(Family::IP, TABLE, CHAIN).is_empty());
    h.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_recreated_table_is_read_again_and_deleted_by_its_new_handle() {
    let mut model = decode_messages(&sample_dump());
    model.tables[0].chains[0].rules.clear();
    let mut h = Harness::start(model, policy(false), owners(None), |_| {});
    h.quiet().await;
    let (family, table, chain) = hijack_at();
    let old = h.control.add_rule_unannounced(&RuleTarget {
        family,
        table,
        chain,
        exprs: &hijack_exprs(),
    });
    // `nft -f` of a saved ruleset: the same rules, new handles.
    let renamed = h.control.recreate_table(Family::IP, TABLE);
    let [(was, new)] = renamed.as_slice() else {
        panic!("{renamed:?}")
    };
    assert_eq!(*was, old);
    let (id, _, _) = h.removed().await;
    assert_eq!(id, format!("ip/{TABLE}/{CHAIN}/{new}"));
    assert_eq!(h.batches(), [delete_batch(*new)], "never the stale handle");
    assert_eq!(h.control.committed()[0].result, Ok(()));
    h.stop().await.expect("clean stop");
}

fn place(handle: u64) -> RulePlace {
    RulePlace {
        family: Family::IP,
        table: TABLE.into(),
        chain: CHAIN.into(),
        handle,
    }
}

fn hijack_target(exprs: &[u8]) -> RuleTarget<'_> {
    let (family, table, chain) = hijack_at();
    RuleTarget {
        family,
        table,
        chain,
        exprs,
    }
}

/// The results of every committed batch.
fn results(control: &MemoryControl) -> Vec<Result<(), i32>> {
    control.committed().iter().map(|c| c.result).collect()
}

#[tokio::test]
async fn a_rule_gone_before_the_commit_is_not_an_error_and_not_recorded_removed() {
    let mut h = Harness::start(
        decode_messages(&sample_dump()),
        policy(false),
        owners(None),
        |c| {
            // Someone else deletes it between the guard's read and its batch.
            c.vanish_before_next_commit(place(HIJACK_HANDLE));
        },
    );
    h.quiet().await;
    // The ruleset moved: refused whole, read again, nothing left to do.
    assert_eq!(results(&h.control), [Err(crate::sys::uapi::ERESTART)]);
    assert_eq!(audit_kinds(&h.audit_path), ["rule_removing"]);
    assert!(
        rule_removed_records(&h.audit_path).is_empty(),
        "not removed by us"
    );
    // Still guarding.
    let handle = h.control.add_rule(&hijack_target(&hijack_exprs()));
    assert_eq!(h.removed().await.0, format!("ip/{TABLE}/{CHAIN}/{handle}"));
    h.stop().await.expect("clean stop");
}

/// Race: the table is re-created (`iptables-nft-restore` without
/// `--noflush`) between the guard's read and its commit, its handles started
/// again: the hijack's old handle now names somebody's new rule.
#[tokio::test]
async fn a_table_recreated_before_the_commit_keeps_the_new_rule_with_the_reused_handle() {
    for hijack_still_there in [true, false] {
        let mut h = Harness::start(
            decode_messages(&sample_dump()),
            policy(false),
            owners(None),
            move |c| {
                c.before_next_commit(move |c| {
                    let mut rules = vec![(CHAIN, HIJACK_HANDLE, innocent_exprs())];
                    if hijack_still_there {
                        rules.push((CHAIN, HIJACK_HANDLE + 1, hijack_exprs()));
                    }
                    c.recreate_table_as(Family::IP, TABLE, &rules);
                });
            },
        );
        h.quiet().await;
        let handles = h.control.handles(Family::IP, TABLE, CHAIN);
        assert_eq!(
            handles,
            [HIJACK_HANDLE],
            "the innocent rule with the reused handle survives \
             (hijack still there: {hijack_still_there})"
        );
        let removed = rule_removed_records(&h.audit_path);
        if hijack_still_there {
            assert_eq!(
                results(&h.control),
                [Err(crate::sys::uapi::ERESTART), Ok(())]
            );
            assert_eq!(h.batches()[1], delete_batch(HIJACK_HANDLE + 1));
            assert_eq!(removed.len(), 1);
            assert_eq!(removed[0]["rule"]["handle"], HIJACK_HANDLE + 1);
        } else {
            assert_eq!(results(&h.control), [Err(crate::sys::uapi::ERESTART)]);
            assert!(removed.is_empty(), "{removed:?}");
        }
        h.stop().await.expect("clean stop");
    }
}

/// Race: one rule of a batch vanishes, another is a live hijack; a batch is
/// all or nothing. With the generation check (the kernel refuses the moved
/// batch) and without it (an older kernel: `ENOENT` aborts the batch), the
/// hijack is removed and only it is recorded as removed.
#[tokio::test]
async fn a_vanished_rule_does_not_hide_a_live_hijack_in_the_same_batch() {
    for generation_checked in [true, false] {
        let second = Arc::new(Mutex::new(0));
        let keep = second.clone();
        let mut h = Harness::start(
            decode_messages(&sample_dump()),
            policy(false),
            owners(None),
            move |c| {
                c.set_generation_checked(generation_checked);
                *keep.lock().unwrap() = c.add_rule_unannounced(&hijack_target(&hijack_exprs()));
                c.vanish_before_next_commit(place(HIJACK_HANDLE));
            },
        );
        let second = *second.lock().unwrap();
        let (id, returns, _) = h.removed().await;
        assert_eq!(id, format!("ip/{TABLE}/{CHAIN}/{second}"));
        assert_eq!(returns, 0);
        h.quiet().await;
        assert!(
            h.control.handles(Family::IP, TABLE, CHAIN).is_empty(),
            "the live hijack is gone (generation checked: {generation_checked})"
        );
        let expected_first = if generation_checked {
            crate::sys::uapi::ERESTART
        } else {
            libc::ENOENT
        };
        assert_eq!(results(&h.control), [Err(expected_first), Ok(())]);
        assert_eq!(h.batches()[1], delete_batch(second));
        let removed = rule_removed_records(&h.audit_path);
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert_eq!(removed[0]["rule"]["handle"], second);
        h.stop().await.expect("clean stop");
    }
}

/// Race: the subscription opens before the dump, so a rule added just before
/// is in the dump and announced as well: applied once, no ghost (no second
/// removal, no fake return).
#[tokio::test]
async fn a_notification_already_in_the_dump_adds_no_ghost_rule() {
    let mut model = decode_messages(&sample_dump());
    model.tables[0].chains[0].rules.clear();
    let handles = Arc::new(Mutex::new((0, 0)));
    let keep = handles.clone();
    let mut h = Harness::start(model, policy(false), owners(None), move |c| {
        // Announced (still pending when the guard reads): in both.
        let innocent = c.add_rule(&hijack_target(&innocent_exprs()));
        let hijack = c.add_rule(&hijack_target(&hijack_exprs()));
        *keep.lock().unwrap() = (innocent, hijack);
    });
    let (innocent, hijack) = *handles.lock().unwrap();
    let (id, returns, _) = h.removed().await;
    assert_eq!(id, format!("ip/{TABLE}/{CHAIN}/{hijack}"));
    assert_eq!(returns, 0);
    h.quiet().await;
    assert_eq!(h.batches(), [delete_batch(hijack)], "removed once");
    assert_eq!(h.control.handles(Family::IP, TABLE, CHAIN), [innocent]);
    assert_eq!(rule_removed_records(&h.audit_path).len(), 1);
    // The guard's model holds the innocent rule once (an address change makes
    // it inspect, and report how many rules it holds).
    h.control.set_addresses(host_addrs());
    assert_eq!(
        h.inspected_rules().await,
        1,
        "no duplicate of the innocent rule"
    );
    // Still following changes: a new hijack is removed (and is no return of a ghost).
    let again = h.control.add_rule(&hijack_target(&hijack_exprs()));
    let (id, returns, _) = h.removed().await;
    assert_eq!(id, format!("ip/{TABLE}/{CHAIN}/{again}"));
    assert_eq!(returns, 1, "the same rule back once");
    h.quiet().await;
    assert_eq!(h.batches().len(), 2);
    assert_eq!(h.control.handles(Family::IP, TABLE, CHAIN), [innocent]);
    h.stop().await.expect("clean stop");
}

/// The pin rules a batch writes, as `nft` reads them.
fn pin_rules(batch: &super::backend::Committed) -> Vec<String> {
    batch
        .tx
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::AddRule { table, summary, .. } if table == pin::PIN_TABLE => Some(summary.clone()),
            _ => None,
        })
        .collect()
}

fn pin_table_rules(control: &MemoryControl) -> Option<usize> {
    let model = control.model();
    let t = model
        .tables
        .iter()
        .find(|t| t.family == Family::IP && t.name == pin::PIN_TABLE)?;
    Some(t.chains.iter().map(|c| c.rules.len()).sum())
}

#[tokio::test]
async fn a_pin_follows_the_owner_to_a_new_address_and_goes_with_it() {
    let mut h = Harness::start(
        RulesetModel::default(),
        policy(true),
        owners(Some("172.17.0.2")),
        |_| {},
    );
    let pins = h.pins_synced().await;
    assert_eq!(
        pins.iter()
            .map(|p| p.target.to_string())
            .collect::<Vec<_>>(),
        ["172.17.0.2:80"]
    );
    assert_eq!(
        pins[0].exclude_iif.as_deref(),
        Some("docker0"),
        "hairpin spared"
    );
    let first = h.control.committed();
    assert_eq!(first.len(), 1);
    let rules = pin_rules(&first[0]);
    assert_eq!(rules.len(), 2, "prerouting and output: {rules:?}");
    assert!(
        rules.iter().all(|r| r.ends_with("dnat to 172.17.0.2:80")),
        "{rules:?}"
    );
    h.quiet().await;
    assert_eq!(pin_table_rules(&h.control), Some(2));
    assert_eq!(h.control.committed().len(), 1, "in sync: not written again");

    // The container comes back on a new address: the table is swapped whole.
    h.owners.send(Arc::new(owners(Some("172.17.0.3")))).unwrap();
    let pins = h.pins_synced().await;
    assert_eq!(pins[0].target.to_string(), "172.17.0.3:80");
    let committed = h.control.committed();
    let swap = committed.last().unwrap();
    assert_eq!(swap.result, Ok(()));
    assert!(
        matches!(&swap.tx.ops[0], Op::DeleteTable { name, .. } if name == pin::PIN_TABLE),
        "{}",
        swap.tx
    );
    let rules = pin_rules(swap);
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert!(
        rules.iter().all(|r| r.ends_with("dnat to 172.17.0.3:80")),
        "{rules:?}"
    );
    h.quiet().await;
    assert_eq!(pin_table_rules(&h.control), Some(2));

    // The owner goes away: so does the pin.
    let ours = h
        .control
        .model()
        .tables
        .iter()
        .find(|t| t.name == pin::PIN_TABLE)
        .map(|t| t.handle)
        .expect("our pin table");
    h.owners.send(Arc::new(owners(None))).unwrap();
    assert!(h.pins_synced().await.is_empty());
    let committed = h.control.committed();
    assert!(
        matches!(
            committed.last().unwrap().tx.ops[..],
            [Op::DeleteTable { handle, .. }] if handle == ours
        ),
        "our own table, by its handle: {}",
        committed.last().unwrap().tx
    );
    assert_eq!(pin_table_rules(&h.control), None, "no pin table left");
    assert_eq!(
        audit_kinds(&h.audit_path),
        ["pin_installed", "pin_updated", "pin_removed"]
    );
    h.stop().await.expect("clean stop");
}

#[tokio::test]
async fn stopping_removes_the_pins() {
    let mut h = Harness::start(
        RulesetModel::default(),
        policy(true),
        owners(Some("172.17.0.2")),
        |_| {},
    );
    h.pins_synced().await;
    h.quiet().await;
    h.stop().await.expect("clean stop");
    assert_eq!(
        pin_table_rules(&h.control),
        None,
        "no pin outlives the guard"
    );
    assert!(
        h.control
            .committed()
            .last()
            .unwrap()
            .tx
            .to_string()
            .starts_with("delete table ip handle "),
        "{:?}",
        h.batches()
    );
    assert_eq!(audit_kinds(&h.audit_path), ["pin_installed", "pin_removed"]);
}

/// Tables named `portguard` in `control`'s model: (family, owner).
fn pin_named_tables(control: &MemoryControl) -> Vec<(Family, Option<u32>)> {
    control
        .model()
        .tables
        .iter()
        .filter(|t| t.name == pin::PIN_TABLE)
        .map(|t| (t.family, t.owner))
        .collect()
}

/// A guard asked to pin the owner, started beside another program's
/// `table ip portguard` (owned by netlink port `owner`, or by no one) holding
/// one nat prerouting chain (name, priority).
fn beside_a_pin_named_table(owner: Option<u32>, (chain, priority): (&str, i32)) -> Harness {
    Harness::start(
        RulesetModel::default(),
        policy(true),
        owners(Some("172.17.0.2")),
        |c| {
            c.add_table(
                Family::IP,
                pin::PIN_TABLE,
                owner,
                (chain, crate::nft::Hook::Prerouting, priority),
            );
        },
    )
}

#[tokio::test]
async fn a_foreign_table_named_like_the_pin_table_is_reported_and_never_touched() {
    // Another program's `table ip portguard` (no owner: e.g. one left by an
    // older portguard without `flags owner`, or anyone's), there before the
    // guard starts.
    let mut h = beside_a_pin_named_table(None, ("theirs", -150));
    let (tables, withheld) = h.foreign_pin_tables().await;
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert_eq!((tables[0].family, tables[0].owner), (Family::IP, None));
    assert_eq!(
        withheld
            .iter()
            .map(|p| p.target.to_string())
            .collect::<Vec<_>>(),
        ["172.17.0.2:80"],
        "the ip pin cannot be installed while their table holds the name"
    );
    h.quiet().await;
    assert!(
        h.batches().is_empty(),
        "nothing deleted, nothing written: {:?}",
        h.batches()
    );
    assert_eq!(pin_named_tables(&h.control), [(Family::IP, None)]);

    assert!(h.control.delete_table(Family::IP, pin::PIN_TABLE));
    // Their table gone: our pin goes in, owned by our socket.
    let pins = h.pins_synced().await;
    assert_eq!(pins.len(), 1);
    h.quiet().await;
    assert_eq!(
        pin_named_tables(&h.control),
        [(Family::IP, Some(MEMORY_PORT_ID))]
    );
    h.stop().await.expect("clean stop");
    assert_eq!(pin_named_tables(&h.control), [], "ours removed on stop");
}

#[tokio::test]
async fn another_sockets_pin_table_is_not_ours_and_survives_our_stop() {
    let mut h =
        beside_a_pin_named_table(Some(MEMORY_PORT_ID + 1), (pin::PIN_PREROUTING_CHAIN, -199));
    let (tables, _) = h.foreign_pin_tables().await;
    assert_eq!(tables[0].owner, Some(MEMORY_PORT_ID + 1));
    h.quiet().await;
    h.stop().await.expect("clean stop");
    assert!(h.batches().is_empty(), "{:?}", h.batches());
    assert_eq!(
        pin_named_tables(&h.control),
        [(Family::IP, Some(MEMORY_PORT_ID + 1))]
    );
}

#[tokio::test]
async fn a_full_disk_withholds_removals_until_space_returns() {
    let mut h = Harness::start_with_audit(
        decode_messages(&sample_dump()),
        policy(false),
        owners(None),
        |_| {},
        Some(libc::ENOSPC),
    );
    let error = h
        .wait_for("the audit log down", |r| match r {
            GuardReport::AuditUnavailable { error } => Some(error),
            _ => None,
        })
        .await;
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("No space left")),
        "{error:?}"
    );
    let why = h
        .wait_for("the hijack reported", |r| match r {
            GuardReport::Observed { finding, why } if finding.handle == Some(HIJACK_HANDLE) => {
                Some(why)
            }
            _ => None,
        })
        .await;
    assert!(why.contains("audit log cannot be written"), "{why}");
    h.quiet().await;
    assert!(
        h.batches().is_empty(),
        "nothing removed unrecorded: {:?}",
        h.batches()
    );
    assert!(
        h.control
            .handles(Family::IP, TABLE, CHAIN)
            .contains(&HIJACK_HANDLE)
    );

    // Space returns: the guard notices on its own (no ruleset change needed).
    h.audit.fail_appends(None);
    let back = h
        .wait_for_within(Duration::from_secs(12), "the audit log back", |r| match r {
            GuardReport::AuditUnavailable { error } => Some(error),
            _ => None,
        })
        .await;
    assert_eq!(back, None);
    let (id, _, _) = h.removed().await;
    assert_eq!(id, format!("ip/{TABLE}/{CHAIN}/{HIJACK_HANDLE}"));
    assert_eq!(
        audit_kinds(&h.audit_path),
        ["audit_resumed", "rule_removing", "rule_removed"]
    );
    h.stop().await.expect("clean stop");
}

/// An unconditional `accept` as raw expressions (`immediate` into the verdict
/// register), what `nft add rule … accept` sends.
fn accept_exprs() -> Vec<u8> {
    use crate::{
        nft::attr,
        sys::uapi::{
            NF_ACCEPT, NFT_REG_VERDICT, NFTA_DATA_VERDICT, NFTA_EXPR_DATA, NFTA_EXPR_NAME,
            NFTA_IMMEDIATE_DATA, NFTA_IMMEDIATE_DREG, NFTA_LIST_ELEM, NFTA_VERDICT_CODE,
            NLA_F_NESTED,
        },
    };
    let mut verdict = Vec::new();
    attr::put(&mut verdict, NFTA_VERDICT_CODE, &NF_ACCEPT.to_be_bytes());
    let mut data = Vec::new();
    attr::put(&mut data, NFTA_DATA_VERDICT | NLA_F_NESTED, &verdict);
    let mut imm = Vec::new();
    attr::put(
        &mut imm,
        NFTA_IMMEDIATE_DREG,
        &NFT_REG_VERDICT.to_be_bytes(),
    );
    attr::put(&mut imm, NFTA_IMMEDIATE_DATA | NLA_F_NESTED, &data);
    let mut expr = Vec::new();
    attr::put_str(&mut expr, NFTA_EXPR_NAME, "immediate");
    attr::put(&mut expr, NFTA_EXPR_DATA | NLA_F_NESTED, &imm);
    let mut list = Vec::new();
    attr::put(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &expr);
    list
}

/// The sample table re-made as: an `accept`, then the owner's own DNAT of
/// port 80 to the container `web` (172.17.0.2): nothing rewrites the port
/// away, yet no new connection reaches the owner.
fn shadowed_owner(c: &MemoryControl) {
    let owners_dnat = Pin {
        proto: Proto::Tcp,
        port: 80,
        host: None,
        target: "172.17.0.2:80".parse().unwrap(),
        exclude_iif: None,
    }
    .expressions(false);
    c.recreate_table_as(
        Family::IP,
        TABLE,
        &[(CHAIN, 1, accept_exprs()), (CHAIN, 2, owners_dnat)],
    );
}

#[tokio::test]
async fn a_rule_shadowing_the_owner_is_reported_and_recorded_never_removed_by_default() {
    let mut h = Harness::start(
        decode_messages(&sample_dump()),
        policy(false),
        owners(Some("172.17.0.2")),
        shadowed_owner,
    );
    let (finding, why) = h
        .wait_for("the shadow reported", |r| match r {
            GuardReport::Observed { finding, why } if finding.is_shadow() => Some((finding, why)),
            _ => None,
        })
        .await;
    assert_eq!(
        (finding.handle, finding.port, finding.shadows.clone()),
        (Some(1), 80, vec!["172.17.0.2:80".to_owned()])
    );
    assert!(why.contains("on_shadow"), "{why}");
    h.quiet().await;
    h.stop().await.expect("clean stop");
    assert!(h.batches().is_empty(), "nothing removed: {:?}", h.batches());
    assert_eq!(h.control.handles(Family::IP, TABLE, CHAIN), [1, 2]);
    let recorded = records_of(&h.audit_path, "owner_shadowed");
    assert_eq!(recorded.len(), 1, "recorded once, not per inspection");
    assert_eq!(recorded[0]["port"], 80);
    assert_eq!(recorded[0]["finding"], format!("ip/{TABLE}/{CHAIN}/1:80"));
    assert_eq!(recorded[0]["rule"]["kind"], "shadow");
    assert_eq!(recorded[0]["rule"]["shadows"][0], "172.17.0.2:80");
}

#[tokio::test]
async fn on_shadow_remove_removes_it_recorded_whole_and_leaves_the_owner_alone() {
    let mut policy = policy(false);
    policy.on_shadow = crate::policy::OnShadow::Remove;
    let mut h = Harness::start(
        decode_messages(&sample_dump()),
        policy,
        owners(Some("172.17.0.2")),
        shadowed_owner,
    );
    let (id, _, _) = h.removed().await;
    assert_eq!(id, format!("ip/{TABLE}/{CHAIN}/1"));
    h.quiet().await;
    h.stop().await.expect("clean stop");
    assert_eq!(
        h.control.handles(Family::IP, TABLE, CHAIN),
        [2],
        "the owner's DNAT stays"
    );
    assert_eq!(h.batches().len(), 1, "{:?}", h.batches());
    let removed = rule_removed_records(&h.audit_path);
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0]["rule"]["findings"][0]["kind"], "shadow");
    // Whole: the raw expressions are what `restore` puts back.
    let raw = B64
        .decode(removed[0]["rule"]["expressions"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, accept_exprs());
}

/// `jump CHAIN` as a rule's only expression.
fn jump_rule(handle: u64, chain: &str) -> crate::nft::model::Rule {
    use crate::nft::model::{Data, Expr, Verdict};
    crate::nft::model::Rule::new(
        handle,
        vec![Expr::Immediate {
            dreg: 0,
            data: Data::Verdict(Verdict::Jump(chain.into())),
        }],
        None,
    )
}

#[tokio::test]
async fn a_change_in_a_chain_no_probe_enters_is_dismissed_without_an_inspection() {
    use crate::nft::model::Chain;
    // `pre` jumps to `reached`; nothing jumps to `unrelated`.
    let mut model = decode_messages(&sample_dump());
    let table = &mut model.tables[0];
    table.chains[0].rules.push(jump_rule(50, "reached"));
    for (name, handle) in [("reached", 60), ("unrelated", 61)] {
        table.chains.push(Chain {
            name: name.into(),
            handle,
            base: None,
            rules: Default::default(),
        });
    }
    let mut h = Harness::start(model, policy(false), owners(None), |_| {});
    h.removed().await;
    h.quiet().await;
    // A DNAT of port 80 where no connection goes: applied, not inspected, kept.
    let at = |chain| RuleTarget {
        family: Family::IP,
        table: TABLE,
        chain,
        exprs: &[],
    };
    let exprs = hijack_exprs();
    let unreached = h.control.add_rule(&RuleTarget {
        exprs: &exprs,
        ..at("unrelated")
    });
    let (mut inspections, mut dismissals) = (0, 0);
    while let Ok(Some(r)) = tokio::time::timeout(QUIET, h.reports.recv()).await {
        match r {
            GuardReport::Inspected { .. } => inspections += 1,
            GuardReport::Dismissed { .. } => dismissals += 1,
            _ => {}
        }
    }
    assert_eq!(
        (inspections, dismissals),
        (0, 1),
        "a rule no connection to a protected port can meet costs no inspection"
    );
    assert_eq!(
        h.control.handles(Family::IP, TABLE, "unrelated"),
        [unreached],
        "unreachable: no hijack, left alone"
    );
    assert_eq!(h.batches().len(), 1, "only the first hijack's removal");
    // The same rule where connections go: inspected and removed.
    let reached = h.control.add_rule(&RuleTarget {
        exprs: &exprs,
        ..at("reached")
    });
    let (id, ..) = h.removed().await;
    assert_eq!(id, format!("ip/{TABLE}/reached/{reached}"));
    h.control.delete_rule(&RulePlace {
        family: Family::IP,
        table: TABLE.into(),
        chain: "unrelated".into(),
        handle: unreached,
    });
    assert_eq!(h.quiet().await, 0, "a deletion there is dismissed too");
    h.stop().await.expect("clean stop");
}
