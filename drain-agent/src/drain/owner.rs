//! Whose a drain's scope is, for the limits shared by the whole node: drains in progress
//! (`--max-waiters`), `/drained` waiters blocked (`--max-waiters` too), gates held after
//! a drain ([`HELD_MAX`]) and scopes the metrics count ended drains by ([`SCOPES_MAX`]:
//! one pod's many short drains must not push another pod's `timeout` out before a scrape,
//! [`evictee`] as for the gates). Without an owner, one pod
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
//! [`SCOPES_MAX`]: super::SCOPES_MAX

use std::collections::HashMap;

pub use crate::tracker::owner::{Owner, WAITERS_PER_OWNER};

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

/// What to evict from `kept` (held gates, scopes counted for the metrics) so that
/// `newcomer`'s can be kept, when as many are kept as allowed: the first to go (the least
/// `first_to_go`: the soonest-ending gate, the oldest scope) of the owner keeping the most;
/// among owners keeping as many, the newcomer's own. So an owner loses one to another only
/// while it keeps more than that other one (and so more than its share, the limit split
/// among the owners keeping some and the newcomer's): an owner that keeps no more than the
/// newcomer's loses none, and one that keeps adding evicts its own once it keeps the most.
/// `owner` says whose an entry is. `None`: nothing kept.
pub(super) fn evictee<K: Clone, V, T: Ord>(
    kept: &HashMap<K, V>,
    owner: impl Fn(&K, &V) -> Owner,
    first_to_go: impl Fn(&V) -> T,
    newcomer: Owner,
) -> Option<K> {
    let mut counts: HashMap<Owner, usize> = HashMap::new();
    for (key, value) in kept {
        *counts.entry(owner(key, value)).or_default() += 1;
    }
    let own = counts.get(&newcomer).copied().unwrap_or(0);
    let most = counts.values().copied().max()?;
    let evicted = if own == most {
        newcomer
    } else {
        counts
            .iter()
            .find(|&(_, &count)| count == most)
            .map(|(&whose, _)| whose)?
    };
    kept.iter()
        .filter(|(key, value)| owner(key, value) == evicted)
        .min_by_key(|(_, value)| first_to_go(value))
        .map(|(key, _)| key.clone())
}
