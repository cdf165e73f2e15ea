//! Types shared by the kernel programs (`guard-ebpf`) and the agent (`guard`).
//!
//! Every struct is `#[repr(C)]` with explicit padding fields so that the layout
//! is identical on both sides and no uninitialised bytes travel through maps.
#![no_std]

/// Ring buffer carrying [`BindEvent`]s from the kernel to the agent.
pub const MAP_BIND_EVENTS: &str = "BIND_EVENTS";
/// Hash map [`PortKey`] → [`PortRule`]: the protected ports.
pub const MAP_PROTECTED_PORTS: &str = "PROTECTED_PORTS";
/// Array of [`PORT_FILTER_WORDS`] `u64`: one bit per port, set when the port
/// is protected for some protocol. Most binds are to unprotected ports; an
/// array lookup (inlined by the verifier) answers them before the hash map.
pub const MAP_PORT_FILTER: &str = "PORT_FILTER";
/// Hash map [`OwnerCgroupKey`] → `u8`: cgroups (and their subtrees) allowed to bind a port.
pub const MAP_OWNER_CGROUPS: &str = "OWNER_CGROUPS";
/// Hash map [`OwnerExeKey`] → `u8`: executables (by device and inode) allowed to bind a port.
pub const MAP_OWNER_EXES: &str = "OWNER_EXES";
/// Hash map [`OwnerSlotKey`] → `u8`: where an owner's cgroup will be made
/// (its parent's id and its name), so that its first bind is the owner's even
/// before the agent has learned the new cgroup's id.
pub const MAP_OWNER_SLOTS: &str = "OWNER_SLOTS";
/// Array of one [`GuardConfig`].
pub const MAP_GUARD_CONFIG: &str = "GUARD_CONFIG";
/// Per-CPU array of [`Counters`]: what the programs could not report.
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Program names, as the kernel side exports them.
pub const PROG_BIND4: &str = "portguard_bind4";
pub const PROG_BIND6: &str = "portguard_bind6";

/// Size of the bind event ring buffer in bytes (a power of two, page aligned).
pub const BIND_EVENTS_BYTES: u32 = 1 << 20;
/// Routine (not denied) bind events wake the agent at most once per this
/// many nanoseconds; the agent reads again this long after each wakeup, and
/// again while it finds events. Denials wake it at once. An idle agent is
/// never woken.
pub const ROUTINE_WAKEUP_GAP_NS: u64 = 50_000_000;
/// How many cgroup ancestors the programs check against the owner map.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Maximum entries in the protected port map.
pub const MAX_PROTECTED_PORTS: u32 = 65_536;
/// Words of [`MAP_PORT_FILTER`]: 65,536 ports, 64 a word.
pub const PORT_FILTER_WORDS: u32 = 1 << 10;

/// Where `port`'s bit lives in [`MAP_PORT_FILTER`]: the word's index and the bit.
#[inline(always)]
pub const fn port_filter_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1 << (port & 63))
}

/// Maximum entries in the owner cgroup map.
pub const MAX_OWNER_CGROUPS: u32 = 16_384;
/// Maximum entries in the owner executable map.
pub const MAX_OWNER_EXES: u32 = 16_384;
/// Maximum entries in the owner slot map.
pub const MAX_OWNER_SLOTS: u32 = 4_096;
/// Bytes of a cgroup's name an [`OwnerSlotKey`] holds, NUL-padded: Docker's
/// longest, `docker-<64 hex>.scope`, is 77.
pub const CGROUP_NAME_LEN: usize = 80;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// What the program decided about a bind.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The binder owns the port.
    Owner = 0,
    /// A stranger, and the port is enforced: the bind failed with EPERM.
    Denied = 1,
    /// A stranger, but the port is observed only: the bind went through.
    Observed = 2,
    /// A bind in another network namespace: it cannot take a host port.
    OtherNetns = 3,
}

impl Verdict {
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Owner),
            1 => Some(Self::Denied),
            2 => Some(Self::Observed),
            3 => Some(Self::OtherNetns),
            _ => None,
        }
    }
}

/// Key of [`MAP_PROTECTED_PORTS`]: host-order port and IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl PortKey {
    pub const fn new(port: u16, proto: u8) -> Self {
        Self {
            port,
            proto,
            _pad: 0,
        }
    }
}

/// `PortRule::flags`: deny strangers (enforce) rather than only report them.
pub const PORT_ENFORCE: u32 = 1;

/// Value of [`MAP_PROTECTED_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRule {
    pub flags: u32,
    pub _pad: u32,
}

/// Key of [`MAP_OWNER_CGROUPS`]: a cgroup v2 id allowed to bind `port`/`proto`.
/// A process is an owner when its cgroup or any ancestor is in the map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerCgroupKey {
    pub cgroup_id: u64,
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

impl OwnerCgroupKey {
    pub const fn new(cgroup_id: u64, port: u16, proto: u8) -> Self {
        Self {
            cgroup_id,
            port,
            proto,
            _pad: [0; 5],
        }
    }
}

/// Key of [`MAP_OWNER_EXES`]: an executable file, by inode and device, allowed
/// to bind `port`/`proto`. `dev` is the kernel's encoding (major << 20 | minor).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerExeKey {
    pub ino: u64,
    pub dev: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl OwnerExeKey {
    pub const fn new(ino: u64, dev: u32, port: u16, proto: u8) -> Self {
        Self {
            ino,
            dev,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// Byte offsets of the kernel struct fields that lead from the current task to
/// its executable's inode: task_struct.mm → mm_struct.exe_file → file.f_inode →
/// inode.{i_ino, i_sb} → super_block.s_dev. Read from the running kernel's BTF
/// by the agent, since they differ between kernel builds. All zero: unknown,
/// and executable owners cannot be recognised.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExeOffsets {
    pub task_mm: u32,
    pub mm_exe_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
}

impl ExeOffsets {
    pub const fn known(&self) -> bool {
        self.task_mm != 0 && self.mm_exe_file != 0 && self.file_inode != 0 && self.inode_sb != 0
    }
}

/// Key of [`MAP_OWNER_SLOTS`]: a cgroup named `name` directly below the
/// cgroup `parent_id` may bind `port`/`proto`. Only the binder's own cgroup is
/// matched this way (the container runtime puts the container's processes
/// there), never its ancestors.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerSlotKey {
    pub parent_id: u64,
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
    /// NUL-padded; see [`OwnerSlotKey::new`] for the names that have no slot.
    pub name: [u8; CGROUP_NAME_LEN],
}

impl OwnerSlotKey {
    /// `None` when `name` is [`CGROUP_NAME_LEN`] - 1 bytes or longer (the
    /// kernel side reads at most that many and cannot tell such a name from
    /// a longer one), or holds a NUL.
    pub fn new(parent_id: u64, name: &[u8], port: u16, proto: u8) -> Option<Self> {
        if name.len() >= CGROUP_NAME_LEN - 1 || name.contains(&0) {
            return None;
        }
        let mut out = Self::unnamed(parent_id, port, proto);
        out.name[..name.len()].copy_from_slice(name);
        Some(out)
    }

    /// The key with an all-NUL name, for the kernel side to read a name into.
    pub const fn unnamed(parent_id: u64, port: u16, proto: u8) -> Self {
        Self {
            parent_id,
            port,
            proto,
            _pad: [0; 5],
            name: [0; CGROUP_NAME_LEN],
        }
    }
}

/// Byte offsets of the kernel struct fields that lead from the current task
/// to its cgroup's name and parent: task_struct.cgroups → css_set.dfl_cgrp →
/// cgroup.kn → kernfs_node.{name, __parent → id}. From the running kernel's
/// BTF, like [`ExeOffsets`]. All zero: unknown, and owner slots are not
/// matched (the owner's cgroup counts once the agent has learned its id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupOffsets {
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kn_name: u32,
    pub kn_parent: u32,
    pub kn_id: u32,
}

impl CgroupOffsets {
    pub const fn known(&self) -> bool {
        self.task_cgroups != 0
            && self.css_set_dfl_cgrp != 0
            && self.cgroup_kn != 0
            && self.kn_name != 0
            && self.kn_parent != 0
            && self.kn_id != 0
    }
}

/// The single entry of [`MAP_GUARD_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// Network namespace cookie of the host namespace; binds elsewhere cannot take a host port.
    pub host_netns_cookie: u64,
    /// Non-zero once the agent has filled the maps; before that every bind passes.
    pub armed: u32,
    /// Non-zero when some owner is an executable: only then is the task walked.
    pub check_exe: u32,
    pub exe: ExeOffsets,
    /// Non-zero when some owner has a slot: only then is the cgroup's name read.
    pub check_slots: u32,
    pub cgroup: CgroupOffsets,
    pub _pad: u32,
}

/// Counters the programs keep per CPU; the agent sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events that did not fit into the ring buffer.
    pub ringbuf_dropped: u64,
    /// Binds to protected ports seen in other network namespaces.
    pub other_netns_binds: u64,
    /// Binds to protected ports seen in the host namespace.
    pub host_binds: u64,
    /// Binds denied.
    pub denied: u64,
}

/// One bind to a protected port, as the kernel saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindEvent {
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// Thread id (the kernel's pid).
    pub pid: u32,
    /// Process id (the kernel's tgid).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// IPv4 addresses use the first four bytes; all in network order.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub family: u16,
    pub proto: u8,
    pub verdict: u8,
    pub _pad: [u8; 2],
    pub comm: [u8; 16],
    /// The executable's inode and kernel device number (0 when unknown): what
    /// the process runs, even when it is gone before the agent reads the event.
    pub exe_ino: u64,
    pub exe_dev: u32,
    pub _pad2: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all are `#[repr(C)]` plain old data with explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for OwnerCgroupKey {}
    unsafe impl aya::Pod for GuardConfig {}
    unsafe impl aya::Pod for OwnerExeKey {}
    unsafe impl aya::Pod for OwnerSlotKey {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for BindEvent {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    // The kernel side sees the same bytes; implicit padding would break that silently.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PortKey>(), 4);
        assert_eq!(size_of::<PortRule>(), 8);
        assert_eq!(size_of::<OwnerCgroupKey>(), 16);
        assert_eq!(size_of::<GuardConfig>(), 16 + 24 + 4 + 24 + 4);
        assert_eq!(size_of::<OwnerSlotKey>(), 16 + CGROUP_NAME_LEN);
        assert_eq!(size_of::<OwnerExeKey>(), 16);
        assert_eq!(size_of::<Counters>(), 32);
        assert_eq!(size_of::<BindEvent>(), 8 + 8 + 16 + 16 + 8 + 16 + 16);
    }

    #[test]
    fn every_port_has_one_bit_of_its_own() {
        let mut seen = [0u64; PORT_FILTER_WORDS as usize];
        for port in 0..=u16::MAX {
            let (word, bit) = port_filter_bit(port);
            assert_eq!(bit.count_ones(), 1);
            assert_eq!(seen[word as usize] & bit, 0, "port {port} shares a bit");
            seen[word as usize] |= bit;
        }
        assert!(seen.iter().all(|w| *w == u64::MAX));
    }

    #[test]
    fn slot_names_fit_with_their_nul_or_have_no_slot() {
        let scope = [b'a'; 77];
        let key = OwnerSlotKey::new(7, &scope, 80, IPPROTO_TCP).expect("Docker's longest fits");
        assert_eq!(&key.name[..77], &scope[..]);
        assert!(key.name[77..].iter().all(|b| *b == 0));
        assert!(OwnerSlotKey::new(7, &[b'a'; CGROUP_NAME_LEN - 2], 80, IPPROTO_TCP).is_some());
        assert!(OwnerSlotKey::new(7, &[b'a'; CGROUP_NAME_LEN - 1], 80, IPPROTO_TCP).is_none());
        assert!(OwnerSlotKey::new(7, b"a\0b", 80, IPPROTO_TCP).is_none());
    }

    #[test]
    fn verdict_round_trips() {
        for v in [
            Verdict::Owner,
            Verdict::Denied,
            Verdict::Observed,
            Verdict::OtherNetns,
        ] {
            assert_eq!(Verdict::from_u8(v as u8), Some(v));
        }
        assert_eq!(Verdict::from_u8(9), None);
    }
}
