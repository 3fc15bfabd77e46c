//! The operating system's interfaces the agent reads: the socket tables (sock_diag), network
//! namespaces and their watcher, interface addresses, the file limit.

pub mod fdlimit;
pub mod ifaddrs;
pub mod netlink;
pub mod netns;
pub mod netns_watch;
pub mod pod_addresses;
pub mod sockdiag;
