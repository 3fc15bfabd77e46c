//! The maps the agent reads while serving, shared with the HTTP side: counts, totals,
//! errors, and what the last walk vouched for (the fail-closed rule, see [`Doubt`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, MapData, PerCpuHashMap};
use drain_agent_common::{
    ConnCounts, ConnKey, DurationHistogram, PORT_COUNT, PortTotals, SockEntry, error_index,
};

use super::{
    AttachMethod,
    reclaimed::Reclaimed,
    shared_pass::SharedPasses,
    version::{KernelVersion, old_kernel_doubts},
};
use crate::{
    addr::{canonical_addr, key_addr},
    closer::NamespaceGone,
    doubt::Doubt,
    sys::netns,
    sys::sockdiag,
    tracker::Filter,
};

/// A connection by its addresses: (netns, local, remote), addresses canonical
/// ([`canonical_addr`]: IPv4-mapped IPv6 folded to IPv4, as the kernel side keys them).
pub type FourTuple = (u32, SocketAddr, SocketAddr);

/// The tracked connections of a scope, each with when it started (`STARTED_UNKNOWN` for
/// one a walk found): see [`KernelMaps::tracked`].
pub type Tracked = StdHashMap<FourTuple, u64>;

/// The maps the agent reads while serving.
pub struct KernelMaps {
    pub(super) counts: HashMap<MapData, ConnKey, ConnCounts>,
    /// A read handle on the tracked sockets: when each connection started, for reports.
    pub(super) sockets: HashMap<MapData, u64, SockEntry>,
    pub(super) durations: PerCpuHashMap<MapData, u32, DurationHistogram>,
    pub(super) errors: Array<MapData, u64>,
    pub(super) port_totals: Array<MapData, PortTotals>,
    /// `TRACKED_PORTS`: the ports that have had a tracked connection, one byte each (set
    /// by the programs, never cleared): which of `port_totals` to read for the metrics.
    pub(super) tracked_ports: OwnedFd,
    /// The bitmap of ports with waiters; updated read-modify-write, hence the lock.
    pub(super) watched_ports: Mutex<Array<MapData, u64>>,
    pub(super) repairs: Array<MapData, u64>,
    /// The attached handler (this agent's, or the adopted one), to read how many runs the
    /// kernel skipped.
    pub(super) handler: OwnedFd,
    /// Repairs made by the start-up seeding walk, which are not repairs.
    pub(super) seeding_opens: AtomicU64,
    /// Runs of the handler the kernel skipped (`recursion_misses`), as last read.
    pub(super) handler_skipped: AtomicU64,
    /// What the walks vouched for.
    pub(super) vouched: Mutex<Vouched>,
    /// Walks completed.
    pub(super) walks: AtomicU64,
    /// What reclaimed endpoints counted (their counters left the kernel map), pinned with
    /// the counting state. Held by a reclaim from its first delete to its last fold.
    pub(super) reclaimed: Mutex<Reclaimed>,
    /// This kernel cannot walk the open sockets.
    pub(super) no_walker: bool,
    /// Connections open before start were not counted (`--no-seed`).
    pub(super) not_seeded: bool,
    /// The counts were adopted from an earlier agent's pinned state (`pin`): nothing
    /// vouches for what happened while no agent watched until this agent's first walk.
    pub(super) adopted: bool,
    /// The running kernel's version (`version`), and how the handler is attached: what an
    /// older kernel cannot vouch for (`version::old_kernel_doubts`).
    pub(super) kernel_version: Mutex<KernelVersion>,
    pub(super) attach: AttachMethod,
    /// A walk has begun on these counts (this agent's, or the earlier agent's whose pinned
    /// counts were adopted).
    pub(super) walk_began: AtomicBool,
    /// The addresses of the agent's own bound listeners (the node's `--listen`, the in-pod
    /// ones of the binding fallback) by namespace and port. `OWN_ENDPOINTS` marks a
    /// (namespace, port) only, so a program on the same port at another address (an
    /// IPv6-only `[::]:9100` beside the agent's `0.0.0.0:9100`) would have its connections
    /// taken for the agent's: [`KernelMaps::own_port_shared`] finds those sockets.
    pub(super) own_bound: Mutex<BTreeMap<(u32, u16), SocketAddr>>,
    /// [`KernelMaps::own_port_shared`]'s passes, one at a time per own listener.
    pub(super) own_port_passes: SharedPasses<(u32, SocketAddr), Result<bool, String>>,
}

/// The error counters and skipped runs at one instant, and the per-port `lost` counters
/// of the ports that have any.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub skipped: u64,
    pub errors: [u64; error_index::COUNT as usize],
    pub lost: StdHashMap<u16, u64>,
}

/// What the last complete walk vouched for: every change before `snapshot` was taken is
/// reflected in the maps (a walk counts the missed opens and un-counts the missed closes of
/// every namespace it could enter), except in the namespaces in `unwalked`.
#[derive(Debug, Default)]
pub struct Vouched {
    pub snapshot: Option<Snapshot>,
    pub unwalked: BTreeSet<u32>,
    /// Ports of open sockets the walk found untracked with no listener on their port: they
    /// may be inbound (a service that closed its listener), so answers for these ports are
    /// confirmed with the socket tables until a walk no longer finds such sockets.
    pub unsure_ports: BTreeSet<u16>,
    /// The connections lost in all (`socket_map_full` + `address_taken`) when `lost` was
    /// last read port by port.
    lost_read_at: Option<u64>,
    lost: StdHashMap<u16, u64>,
}

impl KernelMaps {
    pub(super) fn repair_count(&self, index: u32) -> Result<u64> {
        self.repairs
            .get(&index, 0)
            .with_context(|| format!("cannot read repair counter {index}"))
    }

    /// One of the `ERRORS` counters (an `error_index`).
    pub(super) fn error_count(&self, index: u32) -> Result<u64> {
        self.errors.get(&index, 0).with_context(|| {
            format!(
                "cannot read error counter {}",
                error_index::NAMES
                    .get(index as usize)
                    .copied()
                    .unwrap_or("?")
            )
        })
    }

    pub(super) fn error_counts(&self) -> Result<[u64; error_index::COUNT as usize]> {
        let mut counts = [0; error_index::COUNT as usize];
        for (index, slot) in (0..error_index::COUNT).zip(counts.iter_mut()) {
            *slot = self.error_count(index)?;
        }
        Ok(counts)
    }

    /// Passive opens so far that found their socket's address held by the entry of a dead
    /// socket whose close was skipped (each such connection is untracked until a walk).
    pub fn addresses_taken(&self) -> Result<u64> {
        self.error_count(error_index::ADDRESS_TAKEN)
    }

    /// Closes of tracked sockets so far that came while the agent was dropping a dead
    /// socket's entry at the same address: left for the next walk.
    pub fn closes_deferred(&self) -> Result<u64> {
        self.error_count(error_index::CLOSE_DEFERRED)
    }

    /// Runs of the handler the kernel skipped so far.
    pub fn handler_skipped_runs(&self) -> Result<u64> {
        let skipped = super::recursion_misses(self.handler.as_fd())?;
        self.handler_skipped.store(skipped, Ordering::Relaxed);
        Ok(skipped)
    }

    pub(super) fn vouched(&self) -> std::sync::MutexGuard<'_, Vouched> {
        self.vouched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters now, taken just before a walk begins. Reading `lost` port by port
    /// costs 65,536 lookups, so it is done only when a connection was lost (the socket map
    /// overflowed, or an open found its address taken) since the last read.
    pub(super) fn snapshot(&self) -> Result<Snapshot> {
        let skipped = self.handler_skipped_runs()?;
        let errors = self.error_counts()?;
        let lost_in_all = lost_in_all(&errors);
        let read_at = self.vouched().lost_read_at;
        // Read without holding `vouched`: every waiter's pass reads it, and 65,536 lookups
        // take long enough under load to make them late (a CI run saw answers 1 s late).
        // Only the walker takes snapshots, so no other writer races this one.
        if let Some((lost, read_at)) = read_lost_if_moved(lost_in_all, read_at, |port| {
            Ok(self
                .port_totals
                .get(&port, 0)
                .context("cannot read the port totals")?
                .lost)
        })? {
            let mut vouched = self.vouched();
            vouched.lost = lost;
            vouched.lost_read_at = Some(read_at);
        }
        Ok(Snapshot {
            skipped,
            errors,
            lost: self.vouched().lost.clone(),
        })
    }

    /// A walk that began at `snapshot` has ended; `unwalked` are the namespaces it could
    /// not enter (and that still exist).
    pub(super) fn vouch(
        &self,
        snapshot: Snapshot,
        unwalked: BTreeSet<u32>,
        unsure_ports: BTreeSet<u16>,
    ) {
        let mut vouched = self.vouched();
        vouched.snapshot = Some(snapshot);
        vouched.unwalked = unwalked;
        vouched.unsure_ports = unsure_ports;
        self.walks.fetch_add(1, Ordering::Relaxed);
    }

    /// The doubts this kernel's version holds for good (`version::old_kernel_doubts`).
    pub fn old_kernel_doubts(&self) -> Vec<Doubt> {
        old_kernel_doubts(
            *self
                .kernel_version
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            self.attach,
            !self.no_walker,
            self.walk_began.load(Ordering::Relaxed),
        )
    }

    /// Doubts from now on as on a kernel of `version`: how the tests of older kernels'
    /// doubts run on a newer one (the agent itself uses the running kernel's).
    pub fn assume_kernel_version(&self, version: KernelVersion) {
        *self
            .kernel_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = version;
    }

    /// Doubts that concern every scope.
    pub(super) fn global_doubts(&self, health: bool) -> Result<Vec<Doubt>> {
        let mut doubts = Vec::new();
        if self.no_walker {
            doubts.push(Doubt::NoWalker);
        }
        doubts.extend(self.old_kernel_doubts());
        let vouched = self.vouched();
        let Some(snapshot) = &vouched.snapshot else {
            // No walk has ended yet. With --no-seed none was asked for. On adopted counts
            // (the pinned handler's, exact while it saw every change) the runs it skipped,
            // the connections it lost and the error counters are compared with what a walk
            // vouched for, and the agent that walked last is gone: until this agent's first
            // walk (a repair: it stamps what exists and fixes what was missed, it does not
            // rebuild) every answer is confirmed with the socket tables. Otherwise the
            // seeding walk runs beside the serving agent (`agent/mod.rs`). Either way nothing open
            // before the start is vouched for.
            doubts.push(if self.not_seeded {
                Doubt::NotSeeded
            } else if self.adopted {
                Doubt::AdoptedUnwalked
            } else {
                Doubt::Seeding
            });
            return Ok(doubts);
        };
        let errors = self.error_counts()?;
        let grew = |index: u32| errors[index as usize] > snapshot.errors[index as usize];
        if !health && self.handler_skipped_runs()? > snapshot.skipped {
            doubts.push(Doubt::HandlerSkipped);
        }
        if grew(error_index::READ_FAILED) {
            doubts.push(Doubt::ReadFailed);
        }
        if grew(error_index::LISTENER_MAP_FULL) {
            doubts.push(Doubt::ListenerMapFull);
        }
        if grew(error_index::COUNT_MISSING) {
            doubts.push(Doubt::CountMissing);
        }
        if health {
            if grew(error_index::SOCKET_MAP_FULL) {
                doubts.push(Doubt::SocketMapFull);
            }
            if grew(error_index::COUNT_MAP_FULL) {
                doubts.push(Doubt::EndpointMapFull);
            }
            doubts.extend(
                vouched
                    .unwalked
                    .iter()
                    .map(|netns| Doubt::NamespaceUnwalked { netns: *netns }),
            );
        }
        Ok(doubts)
    }

    /// Counts the connections of `filter` in one namespace from its socket tables.
    pub(super) fn count_in_namespace(inode: u32, path: PathBuf, filter: &Filter) -> Result<u64> {
        let port = filter.port;
        let addr = filter.addr;
        netns::run_in(inode, &path, move || {
            use crate::sys::sockdiag::{Query, query, state};
            let sockets = query(&Query {
                local_port: port,
                states: state::bit(state::ESTABLISHED) | state::bit(state::CLOSE_WAIT),
                with_info: false,
            })?;
            Ok(sockets
                .iter()
                .filter(|socket| addr.is_none_or(|addr| canonical_addr(socket.local.ip()) == addr))
                .count() as u64)
        })
    }
}

/// Connections that could not be tracked, for any reason, so far (each also counted in
/// its port's `lost`).
fn lost_in_all(errors: &[u64; error_index::COUNT as usize]) -> u64 {
    errors[error_index::SOCKET_MAP_FULL as usize]
        .saturating_add(errors[error_index::ADDRESS_TAKEN as usize])
}

/// The ports' `lost` counts read one by one (`port_lost`), when the connections lost in all
/// (`lost_in_all`, from `ERRORS`) moved since they were last read (`read_at`); with the sum of
/// what was read, the `read_at` of the next snapshot.
///
/// The handler adds to `ERRORS` first and to the port's `lost` after (`lose_connection`), so
/// a read between its two adds finds the port one short of `lost_in_all`. Keeping
/// `lost_in_all` as `read_at` then kept that short map for good (every later snapshot found
/// nothing moved), and the port's live `lost`, one above it, doubted its answers until some
/// other connection was lost. The sum of what was read is short too, so the next snapshot
/// reads again.
fn read_lost_if_moved(
    lost_in_all: u64,
    read_at: Option<u64>,
    port_lost: impl Fn(u32) -> Result<u64>,
) -> Result<Option<(StdHashMap<u16, u64>, u64)>> {
    if lost_in_all == 0 || read_at == Some(lost_in_all) {
        return Ok(None);
    }
    let mut lost = StdHashMap::new();
    let mut sum = 0_u64;
    for port in 1..PORT_COUNT {
        let count = port_lost(port)?;
        if count > 0 {
            lost.insert(u16::try_from(port).unwrap_or(u16::MAX), count);
            sum = sum.saturating_add(count);
        }
    }
    Ok(Some((lost, sum)))
}

/// The namespaces a filter covers, with a path to enter each. The one namespace it names
/// gone (no process nor name holds it): [`NamespaceGone`], which a drain's end tells from a
/// failed read (`drain/gate.rs` `Drains::end_listeners`). A scan that could not look
/// everywhere is an error ([`netns::IncompleteScan`]): neither "no namespace" nor "gone".
pub(super) fn namespaces_of(filter: &Filter) -> Result<Vec<(u32, PathBuf)>> {
    namespaces_in(filter, netns::all_namespaces()?)
}

/// [`namespaces_of`] among the namespaces a complete scan `found`.
pub(super) fn namespaces_in(
    filter: &Filter,
    mut found: BTreeMap<u32, PathBuf>,
) -> Result<Vec<(u32, PathBuf)>> {
    Ok(match filter.netns {
        Some(wanted) => vec![(wanted, found.remove(&wanted).ok_or(NamespaceGone(wanted))?)],
        None => found.into_iter().collect(),
    })
}

/// The peer address of a tracked socket.
fn remote_addr(entry: &SockEntry) -> IpAddr {
    key_addr(&ConnKey {
        family: entry.remote_family,
        addr: entry.remote,
        ..ConnKey::default()
    })
}

impl KernelMaps {
    /// [`Doubt::OwnPortShared`] for each namespace of `filter`'s scope where the agent's own
    /// listener is bound on `filter.port` and another program has sockets on that port
    /// (read from the namespace's socket tables, on a thread inside it). The handler leaves
    /// a connection uncounted by its namespace and port alone (`OWN_ENDPOINTS`), so the
    /// connections of a program beside the agent on the same port (`[::]:9100` IPv6-only
    /// beside the agent's `0.0.0.0:9100`) would be taken for the agent's and a scope with
    /// them open answered drained. Looked at on every read of the scope, its connections
    /// included: a server that closes its listener to drain keeps its connections, and they
    /// must keep the doubt. Only for the ports of the agent's own listeners.
    pub(super) fn own_port_shared(&self, filter: &Filter) -> Result<Vec<Doubt>> {
        let own: Vec<(u32, SocketAddr)> = self
            .own_bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|((netns, port), _)| {
                *port == filter.port && filter.netns.is_none_or(|wanted| wanted == *netns)
            })
            .map(|((netns, _), addr)| (*netns, *addr))
            .collect();
        if own.is_empty() {
            return Ok(Vec::new());
        }
        let mut doubts = Vec::new();
        for (inode, addr) in own {
            // One pass at a time per listener, shared by the reads that ask meanwhile, each
            // given a pass begun after it asked (`shared_pass`). Not cached: this is a doubt
            // input, and a kept "not shared" would go stale in the unsafe direction (a
            // program that binds beside the agent and is answered drained); only what
            // fails closed may be kept, and a kept "shared" would save nothing that matters.
            let shared = self
                .own_port_passes
                .get(&(inode, addr), || own_port_shared_in(inode, addr));
            match shared {
                Ok(true) => doubts.push(Doubt::OwnPortShared {
                    port: filter.port,
                    netns: inode,
                }),
                Ok(false) => {}
                Err(problem) => {
                    return Err(anyhow::Error::msg(problem)).with_context(|| {
                        format!(
                            "cannot read who uses the agent's own port {} in network namespace {inode}",
                            filter.port
                        )
                    });
                }
            }
        }
        Ok(doubts)
    }
}

/// Whether another program has sockets on the port of the agent's own listener at `addr`
/// in namespace `inode` (its socket tables, read on a thread inside it). A namespace that
/// is gone has no sockets left; an incomplete scan cannot say it is gone (an error).
fn own_port_shared_in(inode: u32, addr: SocketAddr) -> Result<bool, String> {
    let Some(path) = netns::all_namespaces()
        .map_err(|problem| format!("{problem:#}"))?
        .remove(&inode)
    else {
        return Ok(false);
    };
    let shared = netns::run_in(inode, &path, move || {
        use sockdiag::state::{CLOSE_WAIT, ESTABLISHED, LISTEN, SYN_RECV, bit};
        let sockets = sockdiag::query(&sockdiag::Query {
            local_port: addr.port(),
            states: bit(LISTEN) | bit(SYN_RECV) | bit(ESTABLISHED) | bit(CLOSE_WAIT),
            with_info: false,
        })?;
        Ok(sockets
            .iter()
            .any(|socket| not_the_agents(addr, socket.local, socket.state == LISTEN)))
    });
    match shared {
        Ok(shared) => Ok(shared),
        Err(_) if netns::is_gone(inode) => Ok(false),
        Err(problem) => Err(format!("{problem:#}")),
    }
}

/// Whether a socket at `local` (a listener if `listening`) on the port of `own`, the agent's
/// listener's address, cannot be the agent's: a listener at another address (agents share theirs, `handover.rs`), or a
/// connection the agent's listener cannot have accepted. That listener is `0.0.0.0` (takes
/// every IPv4 connection: an IPv6 one is another program's), `[::]` (dual-stack, set so by
/// `Handover::bind`: nothing else can bind the port beside it but a member of its
/// `SO_REUSEPORT` group, whose listener has the same address), or one address (takes
/// connections to that address only). IPv4-mapped addresses are folded to IPv4 by the
/// socket tables.
fn not_the_agents(own: SocketAddr, local: SocketAddr, listening: bool) -> bool {
    let local = canonical(local);
    if listening {
        return local != canonical(own);
    }
    match canonical_addr(own.ip()) {
        IpAddr::V4(ip) if ip.is_unspecified() => !local.is_ipv4(),
        IpAddr::V6(ip) if ip.is_unspecified() => false,
        ip => local.ip() != ip,
    }
}

/// A socket-table address as the maps spell it.
pub(super) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_addr(addr.ip()), addr.port())
}

impl KernelMaps {
    /// The connections of `filter`'s scope that the maps track, read from `SOCKETS`: by
    /// construction inbound ones (an entry is made by a passive open, or by a walk that
    /// found the socket open on a port with a listener). What a forced close may touch,
    /// and what tells them from outbound sockets that use the same local port.
    pub fn tracked(&self, filter: &Filter) -> Result<Tracked> {
        let mut tracked = Tracked::new();
        for entry in self.sockets.iter() {
            // Entries that vanish while we read are skipped by the iterator (closed).
            let (_, entry) = entry.context("cannot read the socket map")?;
            let local = key_addr(&entry.key);
            if !filter.matches_parts(entry.key.netns, local, entry.key.port) {
                continue;
            }
            let remote = SocketAddr::new(remote_addr(&entry), entry.remote_port);
            tracked.insert(
                (
                    entry.key.netns,
                    SocketAddr::new(local, entry.key.port),
                    remote,
                ),
                entry.started_ns(),
            );
        }
        Ok(tracked)
    }

    /// The listening sockets that may take connections of `filter`'s scope, by socket
    /// cookie (for the drains' gate, through [`super::destroy::KernelCloser`]): on its port
    /// in its namespaces; with an address, only in the one namespace `filter.netns` names
    /// (the one that holds the address: the drains resolve it, `drain/gate.rs`) and only
    /// those bound to that address or to the wildcard that takes it ([`takes_address`]).
    /// An address without a namespace is an error: which namespace's listeners take its
    /// connections is not known here, and a listener elsewhere (another pod's on the same
    /// port) must never count as the scope's.
    pub fn listeners(&self, filter: &Filter) -> Result<Vec<u64>> {
        if let (Some(addr), None) = (filter.addr, filter.netns) {
            bail!(
                "the listeners of {addr} port {} are asked without its network namespace",
                filter.port
            );
        }
        let mut cookies = Vec::new();
        for (inode, path) in namespaces_of(filter)? {
            let port = filter.port;
            let found = netns::run_in(inode, &path, move || {
                sockdiag::query(&sockdiag::Query {
                    local_port: port,
                    states: sockdiag::state::bit(sockdiag::state::LISTEN),
                    with_info: false,
                })
            });
            match found {
                Ok(sockets) => cookies.extend(
                    sockets
                        .iter()
                        .filter(|socket| {
                            filter.addr.is_none_or(|addr| {
                                takes_address(socket.local.ip(), socket.v6only, addr)
                            })
                        })
                        .map(|socket| socket.cookie),
                ),
                Err(_) if netns::is_gone(inode) => {}
                Err(problem) => return Err(problem),
            }
        }
        Ok(cookies)
    }
}

/// Whether a listener bound to `bound` (as the socket tables give it: IPv4-mapped folded to
/// IPv4) takes connections to `addr` (canonical) in its namespace: bound to it, to
/// `0.0.0.0` for an IPv4 one, to `[::]` for an IPv6 one, or to `[::]` dual-stack
/// (`v6only` false) for an IPv4 one. An IPv6 wildcard whose `IPV6_V6ONLY` the kernel did
/// not say takes no IPv4 address here: such a listener must not reopen a gate.
fn takes_address(bound: IpAddr, v6only: Option<bool>, addr: IpAddr) -> bool {
    let bound = canonical_addr(bound);
    if bound == addr {
        return true;
    }
    match (bound, addr) {
        (IpAddr::V4(bound), IpAddr::V4(_)) => bound.is_unspecified(),
        (IpAddr::V6(bound), IpAddr::V6(_)) => bound.is_unspecified(),
        (IpAddr::V6(bound), IpAddr::V4(_)) => bound.is_unspecified() && v6only == Some(false),
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audit (kernel counts): a snapshot read between the handler's two adds (`ERRORS`, then
    /// the port's `lost`) found port 8080 one short, and remembered `ERRORS`' total as read:
    /// the next snapshots never read the ports again, and 8080's answers stayed doubted.
    #[test]
    fn a_port_read_short_of_the_total_is_read_again() {
        let short = |_port: u32| Ok(0);
        let (lost, read_at) = read_lost_if_moved(1, None, short)
            .expect("read")
            .expect("moved: read");
        assert!(lost.is_empty());
        // The handler's second add lands; nothing else was lost.
        let complete = |port: u32| Ok(u64::from(port == 8080));
        let again = read_lost_if_moved(1, Some(read_at), complete)
            .expect("read")
            .expect("the short read is read again");
        assert_eq!(again, (StdHashMap::from([(8080, 1)]), 1));
        // Read complete: nothing to read until something else is lost.
        assert!(
            read_lost_if_moved(1, Some(again.1), complete)
                .expect("read")
                .is_none()
        );
    }

    fn at(addr: &str) -> SocketAddr {
        addr.parse().expect("address")
    }

    #[test]
    fn a_listener_takes_its_address_or_its_familys_wildcard() {
        let ip = |text: &str| -> IpAddr { text.parse().expect("address") };
        let (pod, pod6) = (ip("10.213.81.2"), ip("fd00::2"));
        assert!(takes_address(ip("10.213.81.2"), None, pod));
        assert!(takes_address(ip("0.0.0.0"), None, pod));
        assert!(!takes_address(ip("10.213.82.2"), None, pod));
        assert!(!takes_address(ip("127.0.0.1"), None, pod));
        // [::] takes IPv4 only dual-stack; unsaid is not taken for it.
        assert!(takes_address(ip("::"), Some(false), pod));
        assert!(!takes_address(ip("::"), Some(true), pod));
        assert!(!takes_address(ip("::"), None, pod));
        // An IPv6 socket bound to the IPv4-mapped address is that address's.
        assert!(takes_address(ip("::ffff:10.213.81.2"), Some(false), pod));
        assert!(takes_address(ip("::"), Some(true), pod6));
        assert!(takes_address(ip("fd00::2"), Some(true), pod6));
        assert!(!takes_address(ip("0.0.0.0"), None, pod6));
        assert!(!takes_address(ip("fd00::3"), Some(false), pod6));
    }

    #[test]
    fn sockets_the_agents_listener_cannot_have_are_anothers() {
        let v4_any = at("0.0.0.0:9100");
        // Another agent's listener shares the address; any other listener is another's.
        assert!(!not_the_agents(v4_any, at("0.0.0.0:9100"), true));
        assert!(not_the_agents(v4_any, at("[::]:9100"), true));
        assert!(not_the_agents(v4_any, at("10.0.0.5:9100"), true));
        // 0.0.0.0 takes IPv4 connections only: an IPv6 one is an IPv6-only app's.
        assert!(!not_the_agents(v4_any, at("10.0.0.5:9100"), false));
        assert!(!not_the_agents(
            v4_any,
            at("[::ffff:127.0.0.1]:9100"),
            false
        ));
        assert!(not_the_agents(v4_any, at("[::1]:9100"), false));
        // One address: connections to that address only.
        let loopback = at("127.0.0.1:9100");
        assert!(!not_the_agents(loopback, at("127.0.0.1:9100"), false));
        assert!(not_the_agents(loopback, at("10.0.0.5:9100"), false));
        assert!(not_the_agents(loopback, at("[::1]:9100"), false));
        // [::] is dual-stack (Handover::bind): every connection may be the agent's.
        let v6_any = at("[::]:9100");
        assert!(!not_the_agents(v6_any, at("10.0.0.5:9100"), false));
        assert!(!not_the_agents(v6_any, at("[::1]:9100"), false));
        assert!(not_the_agents(v6_any, at("0.0.0.0:9100"), true));
    }
}
