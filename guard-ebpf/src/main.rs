//! portguard's kernel side: cgroup `bind4`/`bind6` programs that see every bind()
//! below the cgroup they are attached to, report binds to protected ports, and in
//! enforce mode deny them to anyone but the port's owner.
//!
//! The entry points are thin; the work is in `try_*` functions so that every
//! early return is a decision, not an error path that could leak a deny.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_task,
            bpf_get_netns_cookie, bpf_probe_read_kernel_str,
        },
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use guard_common::{
    AF_INET, AF_INET6, BIND_EVENTS_BYTES, BindEvent, CGROUP_NAME_LEN, CgroupOffsets, Counters,
    ExeOffsets, GuardConfig, MAX_CGROUP_DEPTH, MAX_OWNER_CGROUPS, MAX_OWNER_EXES, MAX_OWNER_SLOTS,
    MAX_PROTECTED_PORTS, OwnerCgroupKey, OwnerExeKey, OwnerSlotKey, PORT_ENFORCE,
    PORT_FILTER_WORDS, PortKey, PortRule, ROUTINE_WAKEUP_GAP_NS, Verdict, port_filter_bit,
};

/// Ring buffer flags (linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Wake the reader once this much is pending even within the gap.
const WAKEUP_BYTES: u64 = 64 * 1024;

/// cgroup sock_addr programs return 1 to let the bind proceed, 0 to fail it with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "BIND_EVENTS")]
static BIND_EVENTS: RingBuf = RingBuf::with_byte_size(BIND_EVENTS_BYTES, 0);

#[map(name = "PORT_FILTER")]
static PORT_FILTER: Array<u64> = Array::with_max_entries(PORT_FILTER_WORDS, 0);

#[map(name = "PROTECTED_PORTS")]
static PROTECTED_PORTS: HashMap<PortKey, PortRule> =
    HashMap::with_max_entries(MAX_PROTECTED_PORTS, 0);

#[map(name = "OWNER_CGROUPS")]
static OWNER_CGROUPS: HashMap<OwnerCgroupKey, u8> = HashMap::with_max_entries(MAX_OWNER_CGROUPS, 0);

#[map(name = "OWNER_EXES")]
static OWNER_EXES: HashMap<OwnerExeKey, u8> = HashMap::with_max_entries(MAX_OWNER_EXES, 0);

#[map(name = "OWNER_SLOTS")]
static OWNER_SLOTS: HashMap<OwnerSlotKey, u8> = HashMap::with_max_entries(MAX_OWNER_SLOTS, 0);

#[map(name = "GUARD_CONFIG")]
static GUARD_CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

/// When a routine event last woke the reader (`bpf_ktime_get_ns`). Shared by
/// every CPU: a race costs at most one wakeup more.
#[map(name = "LAST_WAKEUP")]
static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

/// The wakeup flag of a routine event (see `ROUTINE_WAKEUP_GAP_NS`).
#[inline(always)]
fn routine_wakeup() -> u64 {
    // SAFETY: a BPF helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else {
        return BPF_RB_FORCE_WAKEUP;
    };
    // SAFETY: the map's one element, valid for the program's run.
    let due = now.saturating_sub(unsafe { *last }) >= ROUTINE_WAKEUP_GAP_NS;
    if due || BIND_EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        // SAFETY: as above.
        unsafe { *last = now };
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[cgroup_sock_addr(bind4)]
pub fn portguard_bind4(ctx: SockAddrContext) -> i32 {
    try_bind(&ctx, AF_INET)
}

#[cgroup_sock_addr(bind6)]
pub fn portguard_bind6(ctx: SockAddrContext) -> i32 {
    try_bind(&ctx, AF_INET6)
}

#[inline(always)]
fn try_bind(ctx: &SockAddrContext, family: u16) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    // user_port holds the port in network order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    if port == 0 {
        // An ephemeral bind: the kernel picks the port, which is never a protected one
        // unless the operator protects the ephemeral range, which we do not support.
        return ALLOW;
    }
    // Most binds are to unprotected ports: one bit answers them.
    let (word, bit) = port_filter_bit(port);
    if PORT_FILTER.get(word).is_none_or(|w| *w & bit == 0) {
        return ALLOW;
    }
    let proto = sa.protocol as u8;
    let Some(rule) = (unsafe { PROTECTED_PORTS.get(PortKey::new(port, proto)) }) else {
        return ALLOW;
    };
    let Some(config) = GUARD_CONFIG.get(0) else {
        return ALLOW;
    };
    if config.armed == 0 {
        return ALLOW;
    }

    // SAFETY: the helper only reads the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let exe = current_exe(&config.exe);
    let verdict = if netns_cookie != config.host_netns_cookie {
        count(|c| c.other_netns_binds += 1);
        Verdict::OtherNetns
    } else {
        count(|c| c.host_binds += 1);
        if is_owner(port, proto)
            || (config.check_exe != 0 && is_owner_exe(exe, port, proto))
            || (config.check_slots != 0 && is_owner_slot(&config.cgroup, port, proto))
        {
            Verdict::Owner
        } else if rule.flags & PORT_ENFORCE != 0 {
            count(|c| c.denied += 1);
            Verdict::Denied
        } else {
            Verdict::Observed
        }
    };

    report(sa, family, port, proto, netns_cookie, verdict, exe);

    if verdict == Verdict::Denied {
        debug!(ctx, "portguard: denied bind to port {}", port);
        DENY
    } else {
        ALLOW
    }
}

/// The binder owns the port when its cgroup, or any ancestor, is an owner cgroup of it.
#[inline(always)]
fn is_owner(port: u16, proto: u8) -> bool {
    // SAFETY: the helpers take no pointers.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { OWNER_CGROUPS.get(OwnerCgroupKey::new(own, port, proto)) }.is_some() {
        return true;
    }
    for level in 0..MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            // Deeper than the process's own cgroup.
            break;
        }
        if unsafe { OWNER_CGROUPS.get(OwnerCgroupKey::new(id, port, proto)) }.is_some() {
            return true;
        }
    }
    false
}

/// The binder owns the port when the executable it runs (by inode and device, which
/// a rename of the process cannot fake) is an owner executable of it.
#[inline(always)]
fn is_owner_exe(exe: Option<(u64, u32)>, port: u16, proto: u8) -> bool {
    match exe {
        Some((ino, dev)) => {
            unsafe { OWNER_EXES.get(OwnerExeKey::new(ino, dev, port, proto)) }.is_some()
        }
        None => false,
    }
}

/// The binder's own cgroup sits in an owner slot: the agent expects an owner's
/// cgroup under that name and parent (a container's, made by runc just
/// before the container's process runs; a unit's, made at each restart) and
/// may not have learned its id yet.
/// Only strangers by id and executable get here: no cost on the common path.
#[inline(always)]
fn is_owner_slot(off: &CgroupOffsets, port: u16, proto: u8) -> bool {
    if !off.known() {
        return false;
    }
    // SAFETY: as in current_exe: every pointer is read through the probe helpers.
    let key = unsafe { current_slot(off, port, proto) };
    key.is_some_and(|key| unsafe { OWNER_SLOTS.get(key) }.is_some())
}

/// The current task's cgroup as an [`OwnerSlotKey`]: task → css_set →
/// default-hierarchy cgroup → kernfs node (its name, and its parent's id).
#[inline(always)]
unsafe fn current_slot(off: &CgroupOffsets, port: u16, proto: u8) -> Option<OwnerSlotKey> {
    // SAFETY: see current_exe.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let cset = read_ptr(task, off.task_cgroups)?;
        let cgroup = read_ptr(cset, off.css_set_dfl_cgrp)?;
        let kn = read_ptr(cgroup, off.cgroup_kn)?;
        let parent = read_ptr(kn, off.kn_parent)?;
        let name = read_ptr(kn, off.kn_name)?;
        let parent_id: u64 = bpf_probe_read_kernel(parent.add(off.kn_id as usize).cast()).ok()?;
        let mut key = OwnerSlotKey::unnamed(parent_id, port, proto);
        // The count includes the NUL; a full buffer may be a longer name cut
        // short, which no slot holds (OwnerSlotKey::new refuses such names).
        let read = bpf_probe_read_kernel_str(
            key.name.as_mut_ptr().cast(),
            CGROUP_NAME_LEN as u32,
            name.cast(),
        );
        (read > 0 && (read as usize) < CGROUP_NAME_LEN).then_some(key)
    }
}

/// (inode, device) of the current task's executable, following BTF-derived offsets.
#[inline(always)]
fn current_exe(off: &ExeOffsets) -> Option<(u64, u32)> {
    if !off.known() {
        return None;
    }
    // SAFETY: every pointer is only dereferenced through bpf_probe_read_kernel,
    // which fails cleanly on a bad address.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let mm: *const u8 = read_ptr(task, off.task_mm)?;
        let file: *const u8 = read_ptr(mm, off.mm_exe_file)?;
        let inode: *const u8 = read_ptr(file, off.file_inode)?;
        let sb: *const u8 = read_ptr(inode, off.inode_sb)?;
        let ino: u64 = bpf_probe_read_kernel(inode.add(off.inode_ino as usize).cast()).ok()?;
        let dev: u32 = bpf_probe_read_kernel(sb.add(off.sb_dev as usize).cast()).ok()?;
        Some((ino, dev))
    }
}

#[inline(always)]
unsafe fn read_ptr(base: *const u8, offset: u32) -> Option<*const u8> {
    if base.is_null() {
        return None;
    }
    // SAFETY: see current_exe.
    let p: *const u8 = unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast()) }.ok()?;
    (!p.is_null()).then_some(p)
}

#[inline(always)]
fn report(
    sa: &bpf_sock_addr,
    family: u16,
    port: u16,
    proto: u8,
    netns_cookie: u64,
    verdict: Verdict,
    exe: Option<(u64, u32)>,
) {
    let Some(mut entry) = BIND_EVENTS.reserve::<BindEvent>(0) else {
        count(|c| c.ringbuf_dropped += 1);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let mut addr = [0u8; 16];
    if family == AF_INET {
        addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    } else {
        let words = sa.user_ip6;
        let mut i = 0;
        while i < 4 {
            addr[i * 4..i * 4 + 4].copy_from_slice(&words[i].to_ne_bytes());
            i += 1;
        }
    }
    entry.write(BindEvent {
        // SAFETY: no pointers.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        addr,
        port,
        family,
        proto,
        verdict: verdict as u8,
        _pad: [0; 2],
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        exe_ino: exe.map_or(0, |(ino, _)| ino),
        exe_dev: exe.map_or(0, |(_, dev)| dev),
        _pad2: 0,
    });
    // A wakeup per event costs the binder a context switch. Denials wake the
    // reader at once; a routine event wakes it when the last wakeup is a gap
    // ago (or much is pending), else waits for the reader's read a gap after
    // that wakeup (`ROUTINE_WAKEUP_GAP_NS`). No timer runs in an idle agent.
    let flags = if verdict == Verdict::Denied {
        BPF_RB_FORCE_WAKEUP
    } else {
        routine_wakeup()
    };
    entry.submit(flags);
}

fn count(f: impl FnOnce(&mut Counters)) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot: no other program touches it while this one runs.
        f(unsafe { &mut *counters });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
