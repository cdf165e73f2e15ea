//! The allocator's behaviour for a long-running agent.

/// Allocations this large or larger get pages of their own, given back to
/// the kernel when freed (glibc's default, 128 KiB).
pub const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Makes glibc give large freed buffers back at once, for good.
///
/// glibc raises its mmap threshold to the size of the largest mapped block
/// freed so far (up to 32 MiB). The agent reads the kernel's BTF (5 MB) once
/// at start; after that, every buffer up to that size came from the heap and
/// stayed resident when freed: 15 MB of an idle agent's 31 MB. A fixed
/// threshold stops the raising. Without glibc (musl) this does nothing.
pub fn return_large_frees() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // thread of ours exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
