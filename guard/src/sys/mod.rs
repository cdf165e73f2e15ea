//! Thin, typed views of the kernel facts the agent needs: cgroup v2, network
//! namespaces, processes.

pub mod cgroup;
pub mod netns;
pub mod process;
pub mod sockets;
pub mod workload;
