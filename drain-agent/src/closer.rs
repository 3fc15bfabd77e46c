//! What the drains need from the kernel side: a trait of its own, below both, so that the
//! kernel implements it without importing the drains (`drain` uses it, `kernel` provides it).

use crate::{drain_rule::Peer, tracker::Filter};

/// Closing connections and listing listeners, for the drains.
pub trait Closer: Send + Sync + 'static {
    /// Closes `targets` (connections of `filter`); returns how many were closed.
    fn close(&self, filter: &Filter, targets: &[Peer]) -> anyhow::Result<u64>;
    /// The listening sockets that may take connections of `filter`'s scope, by socket
    /// cookie: a new cookie is a new instance of the service. On its port in its
    /// namespaces; with an address, in the namespace `filter.netns` (the one holding the
    /// address: required, else an error) and bound to that address or to the wildcard that
    /// takes it — never another pod's listener on the same port.
    fn listeners(&self, filter: &Filter) -> anyhow::Result<Vec<u64>>;
    /// Why no connection can be closed here at all (found once at the start, e.g. the
    /// netlink method without `CAP_NET_ADMIN`), or `None` when closing can work. A drain
    /// asking for a close at its deadline is refused while this says why: accepting it
    /// would record a close that never happens.
    fn unavailable(&self) -> Option<&str>;
}

/// What [`Closer::listeners`] fails with when the one namespace it is asked about
/// (`filter.netns`, an inode) is gone: no process and no name holds it any more, so nothing
/// can listen in it. A drain's end tells it from a failed read (`drain/gate.rs`
/// `Drains::end_listeners`): a pod's drain ending after its pod was deleted.
#[derive(Debug)]
pub struct NamespaceGone(pub u32);

impl std::fmt::Display for NamespaceGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "network namespace {} is gone", self.0)
    }
}

impl std::error::Error for NamespaceGone {}
