//! The load balancer's side of the drains: which scope a `/health` or agent-check question
//! is about, whether a drain in progress (or one that ended, until a new instance listens)
//! takes it out of rotation, and the [`PortGate`] the agent-check reads.

use std::{collections::HashSet, net::IpAddr, sync::Arc, time::Duration};

use crate::{
    closer::NamespaceGone,
    drain::{
        Drains,
        listener_reads::{Read, Serial},
        lock,
    },
    sys::pod_addresses::{Named, may_name_a_pod},
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

/// A `/health` or agent-check question resolved: the scope it is about, and when its `addr`
/// names no one namespace for sure ([`Named::Unsure`]: two namespaces hold it, or the pod it
/// named lately holds it no more), the same question in each namespace it may be about.
/// It is out of rotation if any of them is ([`Drains::gated_any`]): a neighbour that gives
/// itself pod A's address must not put A back in rotation while A drains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// The question as it was resolved before any doubt: the pod's, the one namespace
    /// `addr` names, else the node's.
    pub asked: Asked,
    /// The namespaces `addr` may be about beside `asked.netns` (none when it names one pod
    /// or nobody).
    pub unsure: Vec<u32>,
    /// A pod asking about itself (with no address, one of its own, or loopback): the
    /// addresses that may be its (as an `addr=` question
    /// resolves them, [`PodAddresses::addresses_of`]). A drain scoped by one of them and no
    /// namespace (the node's `POST /drain?port=P&addr=<pod IP>`) covers the pod as it covers
    /// `/health?addr=` and the agent-check about that address.
    ///
    /// [`PodAddresses::addresses_of`]: crate::sys::pod_addresses::PodAddresses::addresses_of
    pub addresses: Vec<IpAddr>,
}

impl Question {
    /// Every scope the question may be about, `asked` first.
    pub fn each(&self) -> impl Iterator<Item = Asked> + '_ {
        std::iter::once(self.asked)
            .chain(
                self.unsure
                    .iter()
                    .filter(|&&netns| netns != self.asked.netns)
                    .map(|&netns| Asked {
                        netns,
                        ..self.asked
                    }),
            )
            .chain(self.addresses.iter().map(|&addr| Asked {
                addr: Some(addr),
                whole_namespace: false,
                ..self.asked
            }))
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
    pub(super) listeners: AtEnd,
    pub(super) until: tokio::time::Instant,
    /// Its listener read mark: only reads numbered above it, started after the hold was
    /// made, are its (`listener_reads.rs`; an earlier one may hold a listener gone at the
    /// end, which would look new). Also tells this hold from a later one of its scope.
    pub(super) reads_from: Serial,
}

/// A live hold covering a question, as it was when the question looked (the listener read
/// is done without the `held` lock).
struct Covering {
    scope: Filter,
    listeners: AtEnd,
    reads_from: Serial,
}

/// The listeners of a held scope when its drain ended (socket cookies: a socket's never
/// changes, nor its namespace), which a listener must not be among to be a new instance.
/// Read as [`Drains::end_listeners`] reads them: every listener on the port in the
/// namespaces the scope names, whatever its address — a superset of the scope's own
/// ([`Drains::scope_listeners`]), which is what the state file keeps and what an agent of an
/// earlier release compares with every listener of those namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AtEnd {
    /// Read: any other listener of the scope is a new instance.
    Read(HashSet<u64>),
    /// The read at the end failed (a failed netlink read). Fail closed: no listener is new
    /// until a read succeeds, and the first that does is taken for the end's (nothing in it
    /// is new; a later listener is). A new instance already listening by then keeps the
    /// scope out of rotation until `DELETE /drain` or the hold's end, never puts it back
    /// too early. Before, an empty set was kept and the application's own listener, still
    /// running, reopened the gate at once.
    Unknown,
}

impl AtEnd {
    /// From the read at a drain's end ([`Drains::end_listeners`]).
    pub(super) fn of(read: anyhow::Result<Vec<u64>>) -> Self {
        match read {
            Ok(cookies) => Self::Read(cookies.into_iter().collect()),
            Err(problem) => {
                log::warn!(
                    "cannot read the listeners at a drain's end ({problem:#}): its gate holds until a read succeeds, and then until a listener appears that it did not see"
                );
                Self::Unknown
            }
        }
    }

    /// Whether a listener of the scope in `now` (read after the end,
    /// [`Drains::scope_listeners`]) is a new instance.
    pub(super) fn new_among(&self, now: &[u64]) -> bool {
        match self {
            Self::Read(seen) => now.iter().any(|cookie| !seen.contains(cookie)),
            Self::Unknown => false,
        }
    }
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

/// On the shared registry: a gone agent's `drains.next.json` is folded in, and a running
/// one's looked at, before the answer ([`Drains::catch_up`]).
impl PortGate for Arc<Drains> {
    fn draining(
        &self,
        port: u16,
        addr: Option<IpAddr>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            self.catch_up().await;
            let question = self.resolve(port, addr, None).await;
            self.gated_any(&question).await
        })
    }
}

impl Drains {
    /// The scope a `/health?port=P[&addr=IP]` or agent-check question is about: `pod` is
    /// the asking pod's namespace (its own listener, or its address on the node's). A pod's
    /// question without `addr`, or with one of its own (one that may name it, or loopback
    /// and the like, which name no pod), is about its namespace; any other `addr` is asked
    /// as anyone asks it (`/health` is public): the namespace `addr` belongs to, else the
    /// node's own. An `addr` that names no one namespace for sure (two hold it, or the pod
    /// it named lately holds it no more) asks in the node's namespace (a pod: its own) and in
    /// each it may be about ([`Question::unsure`]).
    pub async fn resolve(&self, port: u16, addr: Option<IpAddr>, pod: Option<u32>) -> Question {
        let addr = addr.map(crate::addr::canonical_addr);
        let named = match (&self.pods, addr) {
            (Some(pods), Some(addr)) => pods.named(addr).await,
            _ => Named::Nobody,
        };
        if let Some(netns) = pod {
            let own = match (&self.pods, addr, &named) {
                // No address map (never in the agent): the pod's own, as it cannot be told.
                (None, ..) | (_, None, _) => true,
                (Some(_), Some(_), Named::Pod(holder)) => *holder == netns,
                (Some(_), Some(_), Named::Unsure(maybe)) => maybe.contains(&netns),
                (Some(_), Some(addr), Named::Nobody) => !may_name_a_pod(addr),
            };
            if own {
                // Whichever way it names itself (no address, one of its own, its loopback),
                // a drain of any address that may be its covers it, as README says: a
                // readiness check by loopback was answered 200 while the node drained it.
                let addresses = match &self.pods {
                    Some(pods) => pods.addresses_of(netns).await,
                    None => Vec::new(),
                };
                return Question {
                    asked: Asked {
                        port,
                        addr,
                        netns,
                        whole_namespace: addr.is_none(),
                    },
                    unsure: match named {
                        Named::Unsure(maybe) => maybe,
                        Named::Pod(_) | Named::Nobody => Vec::new(),
                    },
                    addresses,
                };
            }
        }
        let own = self.pods.as_ref().map_or(0, |pods| pods.own_netns());
        let (netns, unsure) = match named {
            Named::Pod(netns) => (netns, Vec::new()),
            Named::Nobody => (own, Vec::new()),
            // As before, the node's question; and every namespace it may be about besides.
            Named::Unsure(maybe) => (own, maybe),
        };
        Question {
            asked: Asked {
                port,
                addr,
                netns,
                whole_namespace: false,
            },
            unsure,
            addresses: Vec::new(),
        }
    }

    /// Whether any scope `question` may be about is out of rotation ([`Drains::gated`]).
    pub async fn gated_any(&self, question: &Question) -> bool {
        for asked in question.each() {
            if self.gated(&asked).await {
                return true;
            }
        }
        false
    }

    /// Whether what is asked is out of rotation: a drain that covers it is in progress (or
    /// the agent's stop ended it: until the process exits), or one ended and no new
    /// instance listens yet. What `/health?port=P` and the agent-check
    /// answer: a load balancer must not send to a service that drained and is stopping. A
    /// drain of one scope never gates another (see [`Asked::covered_by`]). Beside the agent
    /// writing the state file (an upgrade's overlap), what that agent's file says is out of
    /// rotation counts too ([`Drains::writers_gate`]); for that writer, what the agent
    /// beside it keeps in `drains.next.json`, as the last [`Drains::catch_up`] read it
    /// ([`Drains::beside_gate`]); and, for every scope, a state file this agent could not
    /// read ([`Drains::fail_closed`]).
    ///
    /// A held gate's listeners are read on a blocking thread, shared by the questions of
    /// the moment and reused for [`LISTENERS_FRESH`](crate::drain::LISTENERS_FRESH) (`listener_reads.rs`), never on the
    /// async worker answering nor under the `held` lock: before, a flood of public
    /// questions about a held gate held up every answer of the agent (its liveness probe's
    /// too), and the drains ending meanwhile.
    pub async fn gated(&self, asked: &Asked) -> bool {
        // A state file this agent could not read (a later release's, after a rollback) may
        // hold a drain or a gate of any scope: none is vouched for until it could not.
        if self.failing_closed() {
            return true;
        }
        // Beside the writer (an upgrade's overlap), what its file says, *before* this
        // agent's own drains and holds. The take-over moves that agent's last state into
        // them and ends the overlap under one hold of the `overlap` lock
        // (`Drains::take_over_state`), which `writers_gate` reads first: if it sees the
        // overlap, the file it then reads has that agent's drains (its last state, or the
        // merge this agent wrote since); if not, the take-over's restore is done, and the
        // look at `running` and `held` below, which comes after, sees what it restored.
        // Looked at last (as before), a question that had looked at `running`, then waited
        // on a held gate's listener read while the take-over ran, found no overlap and
        // missed the drain POSTed to the old agent: "not draining" once while it ran
        // (`a_question_during_the_take_over_sees_the_old_agents_drain`).
        if self.writers_gate(asked).await {
            return true;
        }
        if lock(&self.running)
            .keys()
            .chain(lock(&self.interrupted).iter())
            .any(|scope| asked.covered_by(scope))
        {
            return true;
        }
        let mut gated = false;
        // Every covering hold is looked at (none skipped once one gates): a hold whose
        // listeners were not read at its end learns them at its first question.
        for hold in self.covering_holds(asked) {
            gated |= !self.reopens(hold).await;
        }
        // The writer of an upgrade's overlap: what the agent beside it drains (POSTed to it
        // meanwhile, or started there by a hook's `/drained`).
        gated || self.beside_gate(asked).await
    }

    /// The holds that cover `asked` and have not ended; those that have are put back in
    /// rotation. Under the `held` lock, no I/O.
    fn covering_holds(&self, asked: &Asked) -> Vec<Covering> {
        let now = tokio::time::Instant::now();
        let mut covering = Vec::new();
        lock(&self.held).retain(|scope, hold| {
            if !asked.covered_by(scope) {
                return true;
            }
            if now >= hold.until {
                back_in_rotation(scope);
                return false;
            }
            covering.push(Covering {
                scope: scope.clone(),
                listeners: hold.listeners.clone(),
                reads_from: hold.reads_from,
            });
            true
        });
        covering
    }

    /// Whether a listener of `hold`'s scope now is one its drain did not see at its end: a
    /// new instance, which reopens the gate (the hold goes, if it is still the one asked
    /// about). When the end's read failed ([`AtEnd::Unknown`]), nothing reopens it yet:
    /// the first read that succeeds is taken for the end's, read as the end reads
    /// ([`Drains::end_listeners`]) so that the state file keeps one meaning.
    async fn reopens(&self, hold: Covering) -> bool {
        match &hold.listeners {
            AtEnd::Unknown => {
                let read = self.later_end_listeners(&hold.scope, hold.reads_from).await;
                // Learned only by the hold it was read for (not a later one of the scope).
                if let Some(Ok(seen)) = read
                    && let Some(now) = lock(&self.held).get_mut(&hold.scope)
                    && now.reads_from == hold.reads_from
                    && now.listeners == AtEnd::Unknown
                {
                    now.listeners = AtEnd::Read(seen.iter().copied().collect());
                }
                false
            }
            AtEnd::Read(_) => {
                let reopen = self
                    .scope_listeners(&hold.scope, hold.reads_from)
                    .await
                    .is_some_and(|read| read.is_ok_and(|now| hold.listeners.new_among(&now)));
                if reopen {
                    let mut held = lock(&self.held);
                    if held
                        .get(&hold.scope)
                        .is_some_and(|now| now.reads_from == hold.reads_from)
                    {
                        held.remove(&hold.scope);
                        back_in_rotation(&hold.scope);
                    }
                }
                reopen
            }
        }
    }

    /// The listeners that may take `scope`'s connections now, by cookie, which a held gate
    /// compares with those its drain's end saw ([`Drains::end_listeners`], a superset)
    /// (`None`: no closer here to read them), by a read numbered above `from`
    /// ([`crate::drain::listener_reads::ListenerReads::read`]: shared, off the workers).
    /// For a scope of one address and no namespace
    /// (a root or token drain `addr=<pod IP>`): only in the namespace that address names
    /// (`sys/pod_addresses.rs`, as last read: a question from the node's listener reads it
    /// when stale, [`Drains::resolve`]; an address that names no pod, the node's
    /// namespace), and there only listeners that take connections to it
    /// ([`crate::closer::Closer::listeners`]). Before, every namespace's listener on the
    /// port counted: another pod's (a rolling update's new pod) put a stopping pod back in
    /// rotation. An address that names no one namespace for sure ([`Named::Unsure`]), or
    /// not read yet, cannot be told: `Err`, which never reopens a gate.
    pub(super) async fn scope_listeners(&self, scope: &Filter, from: Serial) -> Option<Read> {
        let closer = self.closer.as_ref()?;
        Some(match self.listening_scope(scope) {
            Ok(listening) => self.listener_reads.read(closer, &listening, from).await,
            Err(problem) => Err(Arc::new(problem)),
        })
    }

    /// `scope` with the namespace its address names (see [`Drains::scope_listeners`]).
    fn listening_scope(&self, scope: &Filter) -> anyhow::Result<Filter> {
        let (Some(addr), None, Some(pods)) = (scope.addr, scope.netns, &self.pods) else {
            return Ok(scope.clone());
        };
        let netns = match pods.named_as_read(addr) {
            Some(Named::Pod(netns)) => netns,
            Some(Named::Nobody) => pods.own_netns(),
            Some(Named::Unsure(maybe)) => anyhow::bail!(
                "address {addr} names no one network namespace (it may be any of {maybe:?}): its listeners cannot be told"
            ),
            None => anyhow::bail!("which network namespace holds {addr} has not been read"),
        };
        Ok(Filter {
            netns: Some(netns),
            ..scope.clone()
        })
    }

    /// The listeners a held gate keeps from its drain's end ([`AtEnd`]; `None`: no closer
    /// here to read them): every listener on `scope`'s port in the namespaces it names,
    /// whatever its address (no namespace: every namespace's). It is what an agent of an
    /// earlier release saved and compares with every listener of those namespaces, so the
    /// state file means the same to it (a rollback, or the other agent of an upgrade's
    /// overlap reading this one's file): saving only the scope's own listeners made another
    /// pod's, running all along, look new to it and put the drained pod back in rotation.
    /// It is a superset of the scope's listeners at the end ([`Drains::scope_listeners`]),
    /// and a valid one to tell a new listener of the scope by: a socket's namespace never
    /// changes and cookies are not reused, so a listener the scope gains later is in it
    /// only if it was there at the end (bound to another address of its namespace, or in
    /// another namespace that the address moved to): not a new instance, which keeps the
    /// gate held, never reopens it early. It needs no address map,
    /// so a scope whose address names no one namespace at the end (its pod gave it up) is
    /// read as well: only a failed read is [`AtEnd::Unknown`] (`"listeners":null`).
    ///
    /// A scope's namespace that is gone ([`NamespaceGone`]: a pod's drain ending after its
    /// pod was deleted) has no listener: an empty set, which an earlier release reads too.
    /// Safe: its later reads fail (it cannot be entered) and keep the gate held, as they
    /// did before with the empty set the end's failed read left; were its inode reused by
    /// a new namespace, listeners there are a new pod's, which the gone pod's gate should
    /// not keep out of rotation anyway.
    pub(super) fn end_listeners(&self, scope: &Filter) -> Option<anyhow::Result<Vec<u64>>> {
        let closer = self.closer.as_ref()?;
        let everywhere = Filter {
            addr: None,
            ..scope.clone()
        };
        Some(match closer.listeners(&everywhere) {
            Err(problem) if gone_namespace(scope, &problem) => {
                log::debug!("no listeners at a drain's end: {problem:#}");
                Ok(Vec::new())
            }
            read => read,
        })
    }

    /// What [`Drains::end_listeners`] reads, read for a hold whose end's read failed (its
    /// first question after it, [`AtEnd::Unknown`]), by a read numbered above `from`:
    /// shared with the questions, off the workers.
    async fn later_end_listeners(&self, scope: &Filter, from: Serial) -> Option<Read> {
        let closer = self.closer.as_ref()?;
        let everywhere = Filter {
            addr: None,
            ..scope.clone()
        };
        Some(
            match self.listener_reads.read(closer, &everywhere, from).await {
                Err(problem) if gone_namespace(scope, &problem) => Ok(Arc::from([])),
                read => read,
            },
        )
    }

    /// Puts `filter`'s scope back in rotation at once (`DELETE /drain` after a drain ended).
    pub fn release(&self, filter: &Filter) -> bool {
        lock(&self.held).remove(filter).is_some()
    }
}

/// Whether `problem` says that the one namespace `scope` names is gone: none listens there
/// ([`Drains::end_listeners`]).
fn gone_namespace(scope: &Filter, problem: &anyhow::Error) -> bool {
    scope.netns.is_some() && problem.chain().any(|cause| cause.is::<NamespaceGone>())
}

/// Says that `scope`'s gate reopened.
fn back_in_rotation(scope: &Filter) {
    log::info!(
        "port {} (addr {}, netns {}) back in rotation: a new instance listens, or the hold ended",
        scope.port,
        scope.addr.map_or("-".into(), |addr| addr.to_string()),
        scope.netns.map_or("-".into(), |netns| netns.to_string())
    );
}
