//! Thin, typed views of the kernel facts the agent needs: cgroup v2, network
//! namespaces, processes; the one netlink layer and the kernel's constants.

pub mod cgroup;
pub mod memory;
pub mod netlink;
pub mod netns;
pub mod process;
pub mod sockets;
pub mod uapi;
pub mod workload;
