//! The load balancer's side of the drains: which scope a `/health` or agent-check question
//! is about, whether a drain in progress (or one that ended, until a new instance listens)
//! takes it out of rotation, and the [`PortGate`] the agent-check reads.

use std::{collections::HashSet, net::IpAddr, sync::Arc, time::Duration};

use crate::{
    drain::{Drains, lock},
    tracker::Filter,
};

/// The scope a `/health` or agent-check question is about, resolved to a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asked {
    pub port: u16,
    pub addr: Option<IpAddr>,
    /// The namespace asked about: the pod's, the one `addr` belongs to, else the node's.
    pub netns: u32,
    /// Asked for a whole namespace (a pod about itself): any drain inside it counts.
    pub whole_namespace: bool,
}

impl Asked {
    /// Whether a drain of `scope` takes what is asked about out of rotation: it covers it.
    /// A drain of one pod (namespace or address) never covers another pod or the node.
    pub fn covered_by(&self, scope: &Filter) -> bool {
        scope.port == self.port
            && scope.netns.is_none_or(|netns| netns == self.netns)
            && match scope.addr {
                None => true,
                Some(addr) => {
                    self.addr == Some(addr)
                        || (self.addr.is_none()
                            && self.whole_namespace
                            && scope.netns == Some(self.netns))
                }
            }
    }
}

/// After a drain ends, its port stays out of rotation (the stop that follows is about to
/// end the service) until a new instance listens on it, until `DELETE /drain`, or at most
/// this long.
pub const GATE_HOLD: Duration = Duration::from_secs(300);

/// At most this many scopes are held out of rotation after their drains; past it the
/// soonest-ending hold of the owner holding the most ends first (`owner::evictee`: one
/// pod's drains evict its own holds, not another pod's).
pub const HELD_MAX: usize = 4096;

/// A scope kept out of rotation after its drain.
pub(super) struct Held {
    /// The listeners when the drain ended: any other one is a new instance.
    pub(super) listeners: HashSet<u64>,
    pub(super) until: tokio::time::Instant,
}

/// Which scopes are draining now (implemented by the agent's drain registry): a port, or a
/// port at one local address (a pod's IP, which names the pod's namespace). A drain of one
/// pod never answers `drain` for another pod or for the node's port.
pub trait PortGate: Send + Sync + 'static {
    fn draining(
        &self,
        port: u16,
        addr: Option<IpAddr>,
    ) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// On the shared registry: a gone agent's `drains.next.json` is folded in before the
/// answer ([`Drains::catch_up`]).
impl PortGate for Arc<Drains> {
    fn draining(
        &self,
        port: u16,
        addr: Option<IpAddr>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            self.catch_up().await;
            let asked = self.resolve(port, addr, None).await;
            self.gated(&asked)
        })
    }
}

impl Drains {
    /// The scope a `/health?port=P[&addr=IP]` or agent-check question is about: `pod` is
    /// the asking pod's namespace (its own listener, or its address on the node's); else
    /// the namespace `addr` belongs to, else the node's own.
    pub async fn resolve(&self, port: u16, addr: Option<IpAddr>, pod: Option<u32>) -> Asked {
        let addr = addr.map(crate::addr::canonical_addr);
        if let Some(netns) = pod {
            return Asked {
                port,
                addr,
                netns,
                whole_namespace: addr.is_none(),
            };
        }
        let (own, owner) = match (&self.pods, addr) {
            (Some(pods), Some(addr)) => (pods.own_netns(), pods.owner(addr).await),
            (Some(pods), None) => (pods.own_netns(), None),
            (None, _) => (0, None),
        };
        Asked {
            port,
            addr,
            netns: owner.unwrap_or(own),
            whole_namespace: false,
        }
    }

    /// Whether what is asked is out of rotation: a drain that covers it is in progress, or
    /// one ended and no new instance listens yet. What `/health?port=P` and the agent-check
    /// answer: a load balancer must not send to a service that drained and is stopping. A
    /// drain of one scope never gates another (see [`Asked::covered_by`]). Beside the agent
    /// writing the state file (an upgrade's overlap), what that agent's file says is out of
    /// rotation counts too ([`Drains::writers_gate`]); so does, for every scope, a state file
    /// this agent could not read ([`Drains::fail_closed`]).
    pub fn gated(&self, asked: &Asked) -> bool {
        // A state file this agent could not read (a later release's, after a rollback) may
        // hold a drain or a gate of any scope: none is vouched for until it could not.
        if self.failing_closed() {
            return true;
        }
        if lock(&self.running)
            .keys()
            .any(|scope| asked.covered_by(scope))
        {
            return true;
        }
        let now = tokio::time::Instant::now();
        let mut held = lock(&self.held);
        let mut gated = false;
        held.retain(|scope, hold| {
            if !asked.covered_by(scope) {
                return true;
            }
            let reopen = now >= hold.until
                || self.closer.as_ref().is_some_and(|closer| {
                    closer
                        .listeners(scope)
                        .is_ok_and(|now| now.iter().any(|cookie| !hold.listeners.contains(cookie)))
                });
            if reopen {
                log::info!(
                    "port {} (addr {}, netns {}) back in rotation: a new instance listens, or the hold ended",
                    scope.port,
                    scope.addr.map_or("-".into(), |addr| addr.to_string()),
                    scope.netns.map_or("-".into(), |netns| netns.to_string())
                );
            }
            gated |= !reopen;
            !reopen
        });
        drop(held);
        // Beside the writer (an upgrade's overlap): what was POSTed to it meanwhile.
        gated || self.writers_gate(asked)
    }

    /// Puts `filter`'s scope back in rotation at once (`DELETE /drain` after a drain ended).
    pub fn release(&self, filter: &Filter) -> bool {
        lock(&self.held).remove(filter).is_some()
    }
}
