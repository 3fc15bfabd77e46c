//! Whose a drain's scope is, for the limits shared by the whole node: drains in progress
//! (`--max-waiters`), `/drained` waiters blocked (`--max-waiters` too) and gates held after
//! a drain ([`HELD_MAX`]). Without an owner, one pod
//! could use them all up: post drains until the node's limit, so that another pod's `POST
//! /drain` got 429 and its `/drained` waited unrecorded (no `/health` gate, no close at the
//! deadline); or end short drains until the held gates' limit, evicting another pod's gate
//! and putting it back in rotation while it stops.
//!
//! [`Owner`] itself lives with the tracker (`tracker/owner.rs`), which counts waiters by it.
//!
//! Also whose a port's sockets are ([`PortOwners`], [`holding`]): a local user controls only
//! ports whose sockets are all its own, when its drain starts and while it runs.
//!
//! [`HELD_MAX`]: super::HELD_MAX

use std::collections::HashMap;

pub use crate::tracker::owner::{Owner, WAITERS_PER_OWNER};
use crate::{drain::gate::Held, tracker::Filter};

/// Drains in progress one [`Owner`] may have at once (beside the node-wide `--max-waiters`);
/// [`Owner::Node`] has only the node-wide limit. A pod needs about one per port it serves
/// (a stop hook drains each port it listens on): 64 is far above that, and far below the
/// default `--max-waiters` (1024), so that one owner never takes what the others need.
pub const RUNNING_PER_OWNER: usize = 64;

/// The uids of the sockets on a local port, in the node's own network namespace.
pub trait PortOwners: Send + Sync + 'static {
    fn owners(&self, port: u16) -> anyhow::Result<Vec<u32>>;
}

/// The real one: the kernel's socket tables, read on the calling thread (the agent's
/// threads are in the node's namespace).
pub struct SocketTableOwners;

impl PortOwners for SocketTableOwners {
    fn owners(&self, port: u16) -> anyhow::Result<Vec<u32>> {
        use crate::sys::sockdiag::{Query, query, state};
        let states = state::bit(state::LISTEN)
            | state::bit(state::ESTABLISHED)
            | state::bit(state::CLOSE_WAIT);
        Ok(query(&Query {
            local_port: port,
            states,
            with_info: false,
        })?
        .into_iter()
        .map(|socket| socket.uid)
        .collect())
    }
}

/// Whose the sockets on a port are, for one local user (`http/authority.rs`: a local user
/// controls only ports whose sockets are all its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding {
    /// There are sockets on it, and all are that user's.
    Own,
    /// Nothing listens or is connected on it: no user owns it.
    Nobody,
    /// Another user's sockets are on it.
    Others,
}

/// Whether `uid` holds `port` in the node's namespace: the one check of a local user's
/// control, when its drain starts (`http/authority.rs`) and while it runs (`run.rs`). The
/// socket tables are read on a blocking thread.
pub async fn holding(
    owners: &std::sync::Arc<dyn PortOwners>,
    port: u16,
    uid: u32,
) -> anyhow::Result<Holding> {
    let owners = std::sync::Arc::clone(owners);
    let uids = tokio::task::spawn_blocking(move || owners.owners(port))
        .await
        .map_err(|problem| anyhow::anyhow!("{problem}"))??;
    Ok(if uids.is_empty() {
        Holding::Nobody
    } else if uids.iter().all(|&owner| owner == uid) {
        Holding::Own
    } else {
        Holding::Others
    })
}

/// The gate to evict so that `newcomer`'s can be held, when as many are held as allowed:
/// the soonest-ending one of the owner holding the most; among owners holding as many, the
/// newcomer's own. So an owner loses a gate to another only while it holds more than that
/// other one (and so more than its share, the limit split among the owners holding gates
/// and the newcomer's): an owner that holds no more gates than the newcomer's loses none,
/// and one that keeps posting evicts its own once it holds the most. `None`: nothing held.
pub(super) fn evictee(held: &HashMap<Filter, Held>, newcomer: Owner) -> Option<Filter> {
    let mut counts: HashMap<Owner, usize> = HashMap::new();
    for scope in held.keys() {
        *counts.entry(Owner::of(scope)).or_default() += 1;
    }
    let own = counts.get(&newcomer).copied().unwrap_or(0);
    let most = counts.values().copied().max()?;
    let owner = if own == most {
        newcomer
    } else {
        counts
            .iter()
            .find(|&(_, &count)| count == most)
            .map(|(&owner, _)| owner)?
    };
    held.iter()
        .filter(|(scope, _)| Owner::of(scope) == owner)
        .min_by_key(|(_, hold)| hold.until)
        .map(|(scope, _)| scope.clone())
}
