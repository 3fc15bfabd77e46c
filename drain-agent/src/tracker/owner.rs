//! Whose a scope is ([`Owner`]), for the limits the whole node shares: waiters blocked here
//! ([`WAITERS_PER_OWNER`], `Tracker::admit`), and, in `drain/owner.rs`, drains in progress
//! and gates held. It is read from the scope alone, so it sits beside the scope ([`Filter`]).

use std::{fmt, net::IpAddr};

use super::Filter;

/// `/drained` waiters one [`Owner`] may have blocked at once (beside the node-wide
/// `--max-waiters`, `Tracker::admit`); the node (root, a bearer token, its port-wide scopes)
/// has only the node-wide limit. A pod needs about one per port its stop hooks wait on: 64,
/// like `RUNNING_PER_OWNER` (drains in progress, `drain/owner.rs`), is far above that and a sixteenth of the default
/// `--max-waiters` (1024).
pub const WAITERS_PER_OWNER: usize = 64;

/// Whose a scope is: the owner a scope's drains and held gate count against.
///
/// It is read from the scope alone, as `http/authority.rs` and `http/pod_scope.rs` confine
/// it per caller: every scope a pod may control carries its network namespace (on its own
/// listener, and on the node's when it is known by its address), and every scope a local
/// user may control carries the node's own namespace. A scope without a namespace can only
/// be asked for by the node (root or a bearer token). So:
/// - a scope with a namespace is that namespace's: one pod's, whatever its addresses; or,
///   for the node's own namespace, its local users' (they share it: the scope does not say
///   which user asked);
/// - else one with an address is that address's (the node drains one pod by its IP);
/// - else it is the node's: a port on every namespace.
///
/// The node's scopes may also be of a namespace (root may name any one): those count
/// against that namespace, so that a pod cannot evict them unless it evicts its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    Netns(u32),
    Addr(IpAddr),
    Node,
}

impl Owner {
    pub fn of(scope: &Filter) -> Self {
        match (scope.netns, scope.addr) {
            (Some(netns), _) => Self::Netns(netns),
            (None, Some(addr)) => Self::Addr(addr),
            (None, None) => Self::Node,
        }
    }

    /// Whether the per-owner limits (`RUNNING_PER_OWNER` of `drain/owner.rs`, [`WAITERS_PER_OWNER`]) apply: to everyone but the node's port-wide scopes,
    /// which keep only the node-wide limit (what they had before owners).
    pub fn limited(self) -> bool {
        self != Self::Node
    }
}

/// How a 429 names the owner: the caller's own namespace or address, nothing else.
impl fmt::Display for Owner {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Netns(netns) => write!(formatter, "network namespace {netns}"),
            Self::Addr(addr) => write!(formatter, "address {addr}"),
            Self::Node => formatter.write_str("the node"),
        }
    }
}
