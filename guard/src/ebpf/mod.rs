//! The bind guard's user side: loads the kernel programs, attaches them to a
//! cgroup, keeps their maps in step with the policy, and reads their events.

mod bind_policy;
pub mod btf;
mod event;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{CgroupSockAddr, ProgramError, links::CgroupAttachMode},
};
pub use bind_policy::{BindPolicy, Ownership, ProcessIdentity, kernel_dev};
pub use btf::KernelOffsets;
pub use event::{BindRecord, read_bind_event};
use guard_common::{
    Counters, GuardConfig, MAP_BIND_EVENTS, MAP_COUNTERS, MAP_GUARD_CONFIG, MAP_OWNER_CGROUPS,
    MAP_OWNER_EXES, MAP_OWNER_SLOTS, MAP_PORT_FILTER, MAP_PROTECTED_PORTS, OwnerCgroupKey,
    OwnerExeKey, OwnerSlotKey, PORT_ENFORCE, PORT_FILTER_WORDS, PROG_BIND4, PROG_BIND6, PortKey,
    PortRule, port_filter_bit,
};

/// The compiled kernel programs, built by `build.rs` from `guard-ebpf`.
static GUARD_EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "this portguard binary was built without its kernel programs (AYA_BUILD_SKIP); rebuild with `cargo xtask setup` done"
    )]
    NotBuilt,
    #[error(
        "loading the kernel programs failed (needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN): {0}"
    )]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {0} is missing from the kernel object")]
    MissingMap(&'static str),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A protected port as the kernel programs see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortEntry {
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    pub enforce: bool,
}

/// The loaded and attached bind guard. Dropping it detaches the programs: no
/// enforcement outlives the agent.
pub struct BindGuard {
    ebpf: Ebpf,
    cgroup: PathBuf,
    config: GuardConfig,
    ports: BTreeMap<(u16, u8), bool>,
    /// What [`MAP_PORT_FILTER`] holds, word by word.
    filter: Vec<u64>,
    owners: BTreeSet<OwnerCgroupKey>,
    owner_exes: BTreeSet<OwnerExeKey>,
    owner_slots: BTreeSet<OwnerSlotKey>,
}

/// The kernel-side log reader; it must be kept alive (and read) while the programs run.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

impl BindGuard {
    /// Loads the programs and attaches `bind4`/`bind6` to the cgroup v2 directory
    /// `cgroup`, alongside any other programs there. They let every bind through
    /// until [`BindGuard::arm`] is called.
    pub fn load_and_attach(cgroup: &Path) -> Result<(Self, Option<KernelLogger>), GuardError> {
        if GUARD_EBPF_OBJECT.is_empty() {
            return Err(GuardError::NotBuilt);
        }
        // No kernel BTF for the load: the programs carry no CO-RE relocation
        // (kernel struct offsets come from `btf::running_kernel_offsets`,
        // through a map). aya 0.14's `EbpfLoader::new` has parsed it already
        // (13 MB for a moment, the agent's peak at start; no constructor
        // avoids it); `btf(None)` frees it before the load.
        let mut ebpf = EbpfLoader::new().btf(None).load(GUARD_EBPF_OBJECT)?;
        // The logger owns the log ring buffer; it must stay alive (and be read) for as
        // long as the programs run, or the map closes under them.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::debug!(error = %e, "kernel-side logging unavailable");
                None
            }
        };
        let dir = File::open(cgroup).map_err(|source| GuardError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        for name in [PROG_BIND4, PROG_BIND6] {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(GuardError::Program {
                    name,
                    source: ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(|source| GuardError::Program { name, source })?;
            program
                .load()
                .map_err(|source| GuardError::Program { name, source })?;
            // On kernels with bpf_link (5.7+, which BTF already implies) the link coexists with
            // every other program on the cgroup; link flags must be 0, which is `Single` here.
            program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| GuardError::Program { name, source })?;
        }
        Ok((
            Self {
                ebpf,
                cgroup: cgroup.into(),
                config: GuardConfig::default(),
                ports: BTreeMap::new(),
                filter: vec![0; PORT_FILTER_WORDS as usize],
                owners: BTreeSet::new(),
                owner_exes: BTreeSet::new(),
                owner_slots: BTreeSet::new(),
            },
            logger,
        ))
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Tells the programs which network namespace is the host's, how to find a
    /// task's executable and cgroup on this kernel, and starts deciding.
    pub fn arm(
        &mut self,
        host_netns_cookie: u64,
        offsets: KernelOffsets,
    ) -> Result<(), GuardError> {
        self.config.host_netns_cookie = host_netns_cookie;
        self.config.exe = offsets.exe;
        self.config.cgroup = offsets.cgroup;
        self.config.armed = 1;
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), GuardError> {
        let mut config: Array<_, GuardConfig> = map_mut(&mut self.ebpf, MAP_GUARD_CONFIG)?;
        config
            .set(0, self.config, 0)
            .map_err(|source| GuardError::Map {
                name: MAP_GUARD_CONFIG,
                source,
            })
    }

    /// Replaces the protected ports with `entries`, touching only what changed.
    pub fn set_ports(
        &mut self,
        entries: impl IntoIterator<Item = PortEntry>,
    ) -> Result<(), GuardError> {
        let wanted: BTreeMap<(u16, u8), bool> = entries
            .into_iter()
            .map(|e| ((e.port, e.proto), e.enforce))
            .collect();
        let mut map: HashMap<_, PortKey, PortRule> = map_mut(&mut self.ebpf, MAP_PROTECTED_PORTS)?;
        let err = |source| GuardError::Map {
            name: MAP_PROTECTED_PORTS,
            source,
        };
        for (&(port, proto), &enforce) in &wanted {
            if self.ports.get(&(port, proto)) != Some(&enforce) {
                let rule = PortRule {
                    flags: if enforce { PORT_ENFORCE } else { 0 },
                    _pad: 0,
                };
                map.insert(PortKey::new(port, proto), rule, 0)
                    .map_err(err)?;
            }
        }
        // The filter after the rules it lets through exist, before the rules
        // of ports no longer protected go: no bind sees a set bit without a rule
        // it should meet, and a cleared bit only lets through an unprotected port.
        self.set_filter(wanted.keys().map(|(port, _)| *port))?;
        let mut map: HashMap<_, PortKey, PortRule> = map_mut(&mut self.ebpf, MAP_PROTECTED_PORTS)?;
        for &(port, proto) in self.ports.keys() {
            if !wanted.contains_key(&(port, proto)) {
                map.remove(&PortKey::new(port, proto)).map_err(err)?;
            }
        }
        self.ports = wanted;
        Ok(())
    }

    /// Makes the port filter's bits those of `ports`, writing only the
    /// words that change.
    fn set_filter(&mut self, ports: impl Iterator<Item = u16>) -> Result<(), GuardError> {
        let mut wanted = vec![0u64; PORT_FILTER_WORDS as usize];
        for port in ports {
            let (word, bit) = port_filter_bit(port);
            wanted[word as usize] |= bit;
        }
        let mut filter: Array<_, u64> = map_mut(&mut self.ebpf, MAP_PORT_FILTER)?;
        for (word, (now, want)) in self.filter.iter_mut().zip(&wanted).enumerate() {
            if now != want {
                filter
                    .set(word as u32, *want, 0)
                    .map_err(|source| GuardError::Map {
                        name: MAP_PORT_FILTER,
                        source,
                    })?;
                *now = *want;
            }
        }
        Ok(())
    }

    /// Replaces the owner cgroups: a process may bind `port` when its cgroup or
    /// an ancestor is listed for it.
    pub fn set_owner_cgroups(
        &mut self,
        entries: impl IntoIterator<Item = OwnerCgroupKey>,
    ) -> Result<(), GuardError> {
        let wanted = entries.into_iter().collect();
        sync_key_set(&mut self.ebpf, MAP_OWNER_CGROUPS, &mut self.owners, wanted)
    }

    /// Replaces the owner executables: a process may bind `port` when it runs
    /// one of them (matched by inode and device in the kernel).
    pub fn set_owner_exes(
        &mut self,
        entries: impl IntoIterator<Item = OwnerExeKey>,
    ) -> Result<(), GuardError> {
        let wanted = entries.into_iter().collect();
        sync_key_set(&mut self.ebpf, MAP_OWNER_EXES, &mut self.owner_exes, wanted)?;
        // Walking the task costs a few probe reads per bind: only when needed.
        let on = !self.owner_exes.is_empty();
        self.set_check(|c| &mut c.check_exe, on)
    }

    /// Replaces the owner slots: a process may bind `port` when its own
    /// cgroup has the slot's name and parent (an owner's cgroup made anew,
    /// whose id the agent may not have learned yet).
    pub fn set_owner_slots(
        &mut self,
        entries: impl IntoIterator<Item = OwnerSlotKey>,
    ) -> Result<(), GuardError> {
        let wanted = entries.into_iter().collect();
        sync_key_set(
            &mut self.ebpf,
            MAP_OWNER_SLOTS,
            &mut self.owner_slots,
            wanted,
        )?;
        // Reading the cgroup's name costs a few probe reads per stranger's
        // bind to a protected port: only when some slot exists.
        let on = !self.owner_slots.is_empty();
        self.set_check(|c| &mut c.check_slots, on)
    }

    /// Sets one of the config's `check_*` flags, writing the config only
    /// when it changes.
    fn set_check(
        &mut self,
        flag: impl FnOnce(&mut GuardConfig) -> &mut u32,
        on: bool,
    ) -> Result<(), GuardError> {
        let flag = flag(&mut self.config);
        if *flag == u32::from(on) {
            return Ok(());
        }
        *flag = u32::from(on);
        self.write_config()
    }

    /// Makes the maps say what `policy` says, touching only what changed.
    pub fn apply(&mut self, policy: &BindPolicy) -> Result<(), GuardError> {
        // Owners first, so that a newly protected port never sees a moment without them.
        self.set_owner_cgroups(policy.owner_cgroups.iter().copied())?;
        self.set_owner_exes(policy.owner_exes.iter().copied())?;
        self.set_owner_slots(policy.owner_slots.iter().copied())?;
        self.set_ports(policy.ports.iter().copied())
    }

    /// Takes the event ring buffer; call once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, GuardError> {
        let map = self
            .ebpf
            .take_map(MAP_BIND_EVENTS)
            .ok_or(GuardError::MissingMap(MAP_BIND_EVENTS))?;
        RingBuf::try_from(map).map_err(|source| GuardError::Map {
            name: MAP_BIND_EVENTS,
            source,
        })
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, GuardError> {
        let map = self
            .ebpf
            .map(MAP_COUNTERS)
            .ok_or(GuardError::MissingMap(MAP_COUNTERS))?;
        let err = |source| GuardError::Map {
            name: MAP_COUNTERS,
            source,
        };
        let array: PerCpuArray<_, Counters> = PerCpuArray::try_from(map).map_err(err)?;
        let per_cpu = array.get(&0, 0).map_err(err)?;
        Ok(per_cpu.iter().fold(Counters::default(), |mut sum, c| {
            sum.ringbuf_dropped += c.ringbuf_dropped;
            sum.other_netns_binds += c.other_netns_binds;
            sum.host_binds += c.host_binds;
            sum.denied += c.denied;
            sum
        }))
    }
}

/// Makes a set-like hash map (key → 1) hold `wanted`, touching only the
/// difference from `current`, which it then becomes.
fn sync_key_set<K: aya::Pod + Ord>(
    ebpf: &mut Ebpf,
    name: &'static str,
    current: &mut BTreeSet<K>,
    wanted: BTreeSet<K>,
) -> Result<(), GuardError> {
    let mut map: HashMap<_, K, u8> = map_mut(ebpf, name)?;
    let err = |source| GuardError::Map { name, source };
    for key in wanted.difference(current) {
        map.insert(*key, 1, 0).map_err(err)?;
    }
    for key in current.difference(&wanted) {
        map.remove(key).map_err(err)?;
    }
    *current = wanted;
    Ok(())
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, GuardError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(GuardError::MissingMap(name))?;
    T::try_from(map).map_err(|source| GuardError::Map { name, source })
}

impl std::fmt::Debug for BindGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindGuard")
            .field("cgroup", &self.cgroup)
            .field("ports", &self.ports)
            .field("owners", &self.owners.len())
            .finish()
    }
}
