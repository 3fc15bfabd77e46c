//! The agent's view of the connections: what is open now, and waiting until none are.
//!
//! Counts are read from a [`Source`] (the kernel maps, or a fake in tests; see
//! [`source`]) each time they are needed, so every answer is the kernel's current truth.
//! Waiters sleep on a per-port `watch` channel ([`wake`]) that the ring-buffer reader bumps
//! whenever an endpoint's count reaches or leaves zero: a drained port is noticed at once,
//! without polling. What a waiter does at each look is decided by a [`waiter::Waiter`].

#[cfg(test)]
pub mod fake;
pub mod owner;
pub mod shared_lists;
pub mod source;
mod waiter;
mod wake;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Result;
use drain_agent_common::DurationHistogram;
use tokio::{sync::watch, time::Instant};

use self::{
    owner::{Owner, WAITERS_PER_OWNER},
    shared_lists::SharedLists,
    waiter::{Pass, Step, Waiter, idle_and_busy},
    wake::PortChannels,
};
pub use self::{
    source::{
        Counts, Endpoint, Filter, PortState, ReclaimedTotals, Source, Stats, Totals, Vouch,
        monotonic_ns,
    },
    waiter::{DrainOutcome, PEERS_SHOWN},
    wake::ConnectionEvent,
};
use crate::{
    doubt::Doubt,
    drain_rule::{DrainRule, Peer},
};

/// The idle bar used to call a connection idle or busy in reports when the request has no
/// `idle` (it then decides nothing).
pub const REPORT_IDLE_BAR: Duration = Duration::from_secs(1);

/// Why a wait could not even start.
#[derive(Debug)]
pub enum WaitError {
    /// More waiters than `--max-waiters` are blocked already.
    TooManyWaiters(usize),
    /// As many waiters of this owner as one owner may have
    /// ([`WAITERS_PER_OWNER`], the limit named)
    /// are blocked already.
    OwnerFull(Owner, usize),
    /// The counts could not be read.
    Source(anyhow::Error),
}

/// Why connections are listed one by one.
#[derive(Clone, Copy, Debug)]
enum Look {
    /// The drain rule's own look (idle, ignored sources): always a fresh pass.
    Rule,
    /// A report (an answer's peers, `/connections`): shared, waited for at most this long.
    Report(Duration),
}

/// How long a waiter's answer, due now, waits for its list of remaining connections: a
/// list is a report (best effort), the answer's time is the caller's deadline.
pub const ANSWER_LIST_BUDGET: Duration = Duration::from_millis(20);

/// How long an explicit request for the list (`/connections?peers=true`, `peers=true`)
/// waits for it.
pub const REPORT_BUDGET: Duration = Duration::from_secs(10);

/// How many times a pass reads its scope when walks keep ending during the read
/// ([`Tracker::read_scope`]).
const SCOPE_READS: u32 = 3;

/// Shared state behind the HTTP handlers.
pub struct Tracker {
    source: Arc<dyn Source>,
    channels: PortChannels,
    shutdown: watch::Sender<bool>,
    /// Sent when a walk of the sockets has ended (the seeding among them): what waits for
    /// the seeding ([`Tracker::seeded`]) looks again, woken rather than polling.
    walked: watch::Sender<()>,
    waiting: Mutex<Waiting>,
    max_waiters: usize,
    /// Waiters one owner may have at most ([`WAITERS_PER_OWNER`]).
    waiters_per_owner: usize,
    /// The report lists of answers (with ages), one pass per scope for the waiters
    /// answered together.
    reports: SharedLists<Filter, Vec<Peer>>,
}

/// The waiters blocked now: all of them, and those of each owner that has a share
/// ([`Tracker::admit`]); one lock, so that no two requests both take the last place.
#[derive(Default)]
struct Waiting {
    total: usize,
    per_owner: HashMap<Owner, usize>,
}

fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps the waiter counts right however a wait ends (answer, timeout, client gone).
pub struct WaiterSlot<'a> {
    waiting: &'a Mutex<Waiting>,
    owner: Option<Owner>,
}

impl Drop for WaiterSlot<'_> {
    fn drop(&mut self) {
        let mut waiting = lock(self.waiting);
        waiting.total = waiting.total.saturating_sub(1);
        if let Some(owner) = self.owner
            && let Some(count) = waiting.per_owner.get_mut(&owner)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                waiting.per_owner.remove(&owner);
            }
        }
    }
}

impl Tracker {
    pub fn new(source: Arc<dyn Source>, max_waiters: usize) -> Self {
        Self {
            source,
            channels: PortChannels::default(),
            shutdown: watch::channel(false).0,
            walked: watch::channel(()).0,
            waiting: Mutex::default(),
            max_waiters,
            waiters_per_owner: WAITERS_PER_OWNER,
            reports: SharedLists::default(),
        }
    }

    /// Every endpoint, as the kernel counts it now. Blocking (a pass over the whole
    /// endpoint map); on the runtime, use [`Tracker::snapshot_off_runtime`].
    pub fn snapshot(&self) -> Result<Vec<Endpoint>> {
        self.source.endpoints()
    }

    /// [`Tracker::snapshot`] on a blocking thread: never holds an async worker.
    pub async fn snapshot_off_runtime(&self) -> Result<Vec<Endpoint>> {
        let source = Arc::clone(&self.source);
        tokio::task::spawn_blocking(move || source.endpoints())
            .await
            .map_err(|problem| {
                anyhow::anyhow!("the read of the counts did not finish: {problem}")
            })?
    }

    /// The connections open now of every port that has had a tracked connection, those
    /// counted for their port only included ([`Counts::port_totals`]); for a source that
    /// counts by endpoint only, `endpoints` (read just before) added up by port. Blocking.
    pub fn port_totals(&self, endpoints: &[Endpoint]) -> Result<BTreeMap<u16, u64>> {
        if let Some(totals) = self.source.port_totals()? {
            return Ok(totals);
        }
        let mut totals = BTreeMap::new();
        for endpoint in endpoints {
            *totals.entry(endpoint.port).or_default() += endpoint.active;
        }
        Ok(totals)
    }

    pub fn check_health(&self) -> Result<()> {
        self.source.check_health()
    }

    pub fn durations(&self) -> Result<Vec<(u16, DurationHistogram)>> {
        self.source.durations()
    }

    pub fn tracking_errors(&self) -> Result<Vec<(&'static str, u64)>> {
        self.source.tracking_errors()
    }

    pub fn repairs(&self) -> Result<Vec<(&'static str, u64)>> {
        self.source.repairs()
    }

    /// Walks of the open sockets completed so far.
    pub fn walks(&self) -> u64 {
        self.source.walks()
    }

    /// Every endpoint and what the reclaimed ones counted, read with no reclaim between the
    /// two reads (one would show its endpoint's totals twice in a scrape, or not at all:
    /// counters that go down in the next). Blocking, as [`Tracker::snapshot`].
    pub fn counters(&self) -> Result<(Vec<Endpoint>, ReclaimedTotals)> {
        // Reclaims are 10 s apart: a second read is all but certain to see none.
        const READS: usize = 4;
        for _ in 0..READS {
            let before = self.source.reclaimed_totals().generation;
            let endpoints = self.source.endpoints()?;
            let reclaimed = self.source.reclaimed_totals();
            if reclaimed.generation == before {
                return Ok((endpoints, reclaimed));
            }
        }
        anyhow::bail!("endpoints were reclaimed during each of {READS} reads of the counters")
    }

    /// Active connections matching `filter`, now. Blocking: a scope narrower than a port
    /// is a pass over the whole endpoint map; on the runtime, use
    /// [`Tracker::active_off_runtime`].
    pub fn active(&self, filter: &Filter) -> Result<u64> {
        Ok(scope_state(&*self.source, filter)?.active)
    }

    /// [`Tracker::active`] on a blocking thread: a scoped count never holds an async worker.
    pub async fn active_off_runtime(&self, filter: &Filter) -> Result<u64> {
        let source = Arc::clone(&self.source);
        let scope = filter.clone();
        tokio::task::spawn_blocking(move || Ok(scope_state(&*source, &scope)?.active))
            .await
            .map_err(|problem| anyhow::anyhow!("the count did not finish: {problem}"))?
    }

    /// [`read_scope`] on a blocking thread, awaited: the count of a scope narrower than a
    /// port is a pass over the whole endpoint map (up to `--max-endpoints` entries, two
    /// system calls each), and the doubts of the agent's own port enter namespaces. On an
    /// async worker, a few waiters woken by every arrival kept both workers busy. A waiter
    /// awaits its read before it looks at anything else, so it never has two in flight;
    /// what it hears meanwhile is taken in after the read, together.
    async fn read_scope(&self, filter: &Filter) -> Result<(u64, Result<Vec<Doubt>, String>)> {
        let source = Arc::clone(&self.source);
        let scope = filter.clone();
        tokio::task::spawn_blocking(move || read_scope(&*source, &scope))
            .await
            .map_err(|problem| {
                anyhow::anyhow!("the read of the counts did not finish: {problem}")
            })?
    }

    /// Called by the event reader: an endpoint on `port` crossed zero.
    pub fn notify_port(&self, port: u16) {
        self.channels.notify(port);
    }

    /// Called by the event reader for every tracked open and close on a watched port.
    pub fn publish(&self, event: ConnectionEvent) {
        self.channels.publish(event);
    }

    /// Called when a count may have moved unannounced (the kernel skipped runs): every
    /// waiter re-reads its count.
    pub fn notify_all(&self) {
        self.channels.notify_all();
    }

    /// Called when the kernel lost events (its ring buffer was full; its count of lost
    /// events reads `lost`): every waiter re-reads its count, and a quiet window restarts,
    /// since an arrival may have gone unheard (unless the waiter counted these losses
    /// itself already: it reads the count before a drained answer under a quiet window).
    pub fn events_lost(&self, lost: u64) {
        self.channels.events_lost(lost);
    }

    /// Open waiters answer at once with what they have; new ones answer immediately.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Whether the agent is shutting down (waiters answer at once).
    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Called by the repair task when a walk of the sockets has ended (the seeding walk
    /// first): [`Tracker::seeded`] looks at the doubts again.
    pub fn walk_ended(&self) {
        self.walked.send_replace(());
    }

    /// Waits until the connections open before the agent started are counted (the seeding
    /// walk has ended: no [`Doubt::Seeding`]), at most until `limit`, or until the agent
    /// stops; whether they are. Woken by [`Tracker::walk_ended`] and by the stop.
    pub async fn seeded(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        // Subscribed before looking: a walk that ends in between is not missed.
        let mut walked = self.walked.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let seeding = self.health_doubts().contains(&Doubt::Seeding);
            if !seeding {
                return true;
            }
            if self.shutting_down() {
                return false;
            }
            tokio::select! {
                changed = tokio::time::timeout_at(until, walked.changed()) => {
                    if !matches!(changed, Ok(Ok(()))) {
                        return !self.health_doubts().contains(&Doubt::Seeding);
                    }
                }
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Waiters blocked now.
    pub fn waiters(&self) -> usize {
        lock(&self.waiting).total
    }

    /// Another share of `--max-waiters` per owner than [`WAITERS_PER_OWNER`]: a small one,
    /// for tests that fill it.
    #[cfg(test)]
    #[must_use]
    pub fn with_waiters_per_owner(mut self, waiters_per_owner: usize) -> Self {
        self.waiters_per_owner = waiters_per_owner;
        self
    }

    /// The socket tables' count for `filter` (off the async workers: a pass over the
    /// tables in each namespace of the scope).
    async fn confirm(&self, filter: &Filter) -> Result<u64> {
        let source = Arc::clone(&self.source);
        let scope = filter.clone();
        tokio::task::spawn_blocking(move || source.confirm(&scope))
            .await
            .map_err(|problem| anyhow::anyhow!("the confirmation did not finish: {problem}"))?
    }

    /// The connections of `filter` open now, one by one (for `/connections?peers=true`).
    pub async fn remaining(&self, filter: &Filter) -> Result<Vec<Peer>> {
        self.peers(filter, REPORT_IDLE_BAR, Look::Report(REPORT_BUDGET))
            .await
    }

    /// Adds to a not-drained `outcome` what it shows of the connections left: the first
    /// [`PEERS_SHOWN`] (busy first, then the oldest), and how many are idle and busy by
    /// `rule`, if the list comes within `budget` (for a pure query asked with `peers=true`,
    /// or a waiter answered before its drain ended; a waiter's answer has them already).
    /// Best effort: the list is a pass over the socket tables, and a failed one adds nothing.
    pub async fn list_remaining(
        &self,
        filter: &Filter,
        rule: &DrainRule,
        outcome: &mut DrainOutcome,
        budget: Duration,
    ) {
        if outcome.drained || outcome.active == 0 {
            return;
        }
        let Ok(mut list) = self
            .peers(
                filter,
                rule.idle.unwrap_or(REPORT_IDLE_BAR),
                Look::Report(budget),
            )
            .await
        else {
            return;
        };
        let (idle, busy) = idle_and_busy(Some(&list));
        list.truncate(PEERS_SHOWN);
        outcome.peers = list;
        outcome.idle = outcome.idle.or(idle);
        outcome.busy = outcome.busy.or(busy);
    }

    /// The remaining connections of `filter`, each marked busy or idle by `bar`.
    /// Reports (answers, `/connections`) share one pass per scope among the callers of the
    /// same moment (`shared_lists`), each waiting at most its budget; the drain rule's own
    /// look is always fresh.
    async fn peers(&self, filter: &Filter, bar: Duration, look: Look) -> Result<Vec<Peer>> {
        let pass = |with_age: bool| {
            let source = Arc::clone(&self.source);
            let scope = filter.clone();
            async move {
                tokio::task::spawn_blocking(move || source.peers(&scope, with_age))
                    .await
                    .map_err(|problem| format!("listing connections failed: {problem}"))?
                    // The one place a listing's error becomes text: what answers may say.
                    .map_err(|problem| {
                        crate::logging::told("cannot list the connections", &problem)
                    })
            }
        };
        let mut peers = match look {
            Look::Rule => pass(false).await.map_err(anyhow::Error::msg)?,
            Look::Report(budget) => self
                .reports
                .get(filter, budget, || pass(true))
                .await
                .unwrap_or_else(|| {
                    Err(format!(
                        "the list of connections was not ready within {} ms",
                        budget.as_millis()
                    ))
                })
                .map_err(anyhow::Error::msg)?
                .as_ref()
                .clone(),
        };
        for peer in &mut peers {
            peer.busy = !peer.is_idle(bar);
        }
        // Busy first, then the oldest: the ones a reader wants to see.
        peers.sort_by_key(|peer| (!peer.busy, std::cmp::Reverse(peer.age_ms)));
        Ok(peers)
    }

    /// A waiter's place among `--max-waiters`, for a request that waits on a drain's
    /// outcome rather than on [`Tracker::wait_until_drained`]; held until dropped.
    ///
    /// `owner`: whose share it takes, at most [`WAITERS_PER_OWNER`] places of the node's
    /// (`drain/owner.rs`: a pod's namespace, the node's local users), so that one owner's
    /// waiters never fill the node's limit. `None` (the node: root, a bearer token, and its
    /// port-wide scopes): the node's limit only. The owner's limit is asked first, so that
    /// an owner past it is told of its own limit.
    pub fn admit(&self, owner: Option<Owner>) -> Result<WaiterSlot<'_>, WaitError> {
        let mut waiting = lock(&self.waiting);
        if let Some(owner) = owner
            && waiting.per_owner.get(&owner).copied().unwrap_or(0) >= self.waiters_per_owner
        {
            return Err(WaitError::OwnerFull(owner, self.waiters_per_owner));
        }
        if waiting.total >= self.max_waiters {
            return Err(WaitError::TooManyWaiters(self.max_waiters));
        }
        waiting.total += 1;
        if let Some(owner) = owner {
            *waiting.per_owner.entry(owner).or_default() += 1;
        }
        Ok(WaiterSlot {
            waiting: &self.waiting,
            owner,
        })
    }

    /// Blocks until `filter` is drained by `rule` (see [`crate::drain_rule`]), or until
    /// `timeout` passes, or until the agent shuts down. `timeout` zero answers at once.
    /// Never answers drained from a count it cannot vouch for (see [`Doubt`]).
    ///
    /// Woken by the kernel: zero crossings for the strict rule, every open and close of the
    /// port for a quiet window or a rule that looks at each connection; by the clock only
    /// when time alone changes the answer (the window ends, a silent connection turns
    /// idle) and, for the one thing no event announces, data in flight.
    pub async fn wait_until_drained(
        &self,
        filter: &Filter,
        timeout: Duration,
        rule: &DrainRule,
    ) -> Result<DrainOutcome, WaitError> {
        let _slot = self.admit(None)?;
        Ok(self.wait(filter, timeout, rule).await?.0)
    }

    /// [`Tracker::wait_until_drained`] for the agent's own drains: not a request, so not
    /// counted in `drain_waiters` nor limited by `--max-waiters` (drains are limited by
    /// their own registry).
    pub async fn wait_for_drain(
        &self,
        filter: &Filter,
        timeout: Duration,
        rule: &DrainRule,
    ) -> Result<DrainOutcome, WaitError> {
        Ok(self.wait(filter, timeout, rule).await?.0)
    }

    /// [`Tracker::wait_for_drain`] for a drain's verdict: the outcome, and when the last
    /// read of the counts it was judged by began (before that read's count, its doubts and
    /// any look at the socket tables after it). The outcome is about every connection
    /// opened by then: a drained one is the verdict of a waiter that asked by then, and of
    /// no later one (a connection it has may have opened after the read began).
    pub async fn wait_for_verdict(
        &self,
        filter: &Filter,
        timeout: Duration,
        rule: &DrainRule,
    ) -> Result<(DrainOutcome, Instant), WaitError> {
        self.wait(filter, timeout, rule).await
    }

    /// The wait: gathers what a [`Waiter`] needs (counts, doubts, events, the time) and
    /// carries out its steps; every decision is the waiter's ([`Waiter::judge`]). With the
    /// outcome, when the last read of the counts began ([`Tracker::wait_for_verdict`]).
    async fn wait(
        &self,
        filter: &Filter,
        timeout: Duration,
        rule: &DrainRule,
    ) -> Result<(DrainOutcome, Instant), WaitError> {
        let started = Instant::now();
        // Watch before the first read: a change after the read is then announced. The
        // request's quiet window starts here, once arrivals are announced.
        let mut port_watch = self
            .channels
            .watch(filter, &*self.source)
            .map_err(WaitError::Source)?;
        // Read before the window's start: every loss it counts is of a change before the
        // request (an unknown count: the first look before a drained answer is a loss).
        let lost_at_start = self.source.lost_events().ok();
        let mut waiter = Waiter::new(
            filter,
            rule,
            started,
            monotonic_ns(),
            timeout,
            lost_at_start,
        );
        // A run the kernel skips after this may be this scope's close: the socket tables
        // then decide, whatever a walk vouches for meanwhile.
        let skipped_at_start = self.source.skipped_runs();
        let mut shutdown = self.shutdown.subscribe();
        let idle_bar = rule.idle.unwrap_or(REPORT_IDLE_BAR);
        loop {
            // Mark the current generation seen *before* reading, so a change that lands
            // between the read and the sleep still wakes us.
            port_watch.mark_seen();
            while let Some(heard) = port_watch.try_hear() {
                waiter.hear(heard);
            }
            let read_began = Instant::now();
            let (count, doubts) = self.read_scope(filter).await.map_err(WaitError::Source)?;
            let skipped = self.source.skipped_runs() > skipped_at_start;
            let mut pass = Pass {
                now: Instant::now(),
                now_ns: monotonic_ns(),
                stopping: false,
                count,
                doubts,
                skipped,
                tables: None,
                peers: None,
                lost_events: None,
            };
            let (judgment, until) = loop {
                // Events heard meanwhile count (a longer quiet window, never shorter).
                while let Some(heard) = port_watch.try_hear() {
                    waiter.hear(heard);
                }
                pass.now = Instant::now();
                pass.now_ns = monotonic_ns();
                pass.stopping = *shutdown.borrow_and_update();
                match waiter.judge(&pass) {
                    Step::Confirm => {
                        pass.tables = Some(self.confirm(filter).await.map_err(|problem| {
                            crate::logging::told("cannot read the socket tables", &problem)
                        }));
                    }
                    Step::ListPeers => {
                        // Told already (`peers`: a listing's error is what answers may say).
                        pass.peers = Some(
                            self.peers(filter, idle_bar, Look::Rule)
                                .await
                                .map_err(|problem| format!("{problem:#}")),
                        );
                    }
                    Step::CountLosses => {
                        pass.lost_events = Some(self.source.lost_events().map_err(|problem| {
                            crate::logging::in_general(
                                "cannot read whether the kernel lost events",
                                &problem,
                            )
                        }));
                    }
                    Step::Answer {
                        judgment,
                        list,
                        waited,
                    } => {
                        judgment.log(filter, started);
                        let mut peers = pass.peers.take().and_then(Result::ok);
                        if list
                            && let Ok(report) = self
                                .peers(filter, idle_bar, Look::Report(ANSWER_LIST_BUDGET))
                                .await
                        {
                            peers = Some(report);
                        }
                        return Ok((waiter.outcome(judgment, peers, waited), read_began));
                    }
                    Step::Sleep { judgment, until } => break (judgment, until),
                }
            };
            judgment.log(filter, started);
            loop {
                tokio::select! {
                    heard = port_watch.woken() => {
                        if let Some(heard) = heard {
                            let wakes = waiter.wakes_on(&heard, judgment.in_doubt);
                            waiter.hear(heard);
                            if !wakes {
                                // Counted; nothing to decide until a crossing or the clock.
                                continue;
                            }
                        }
                    }
                    _ = shutdown.changed() => {}
                    () = tokio::time::sleep_until(until) => {}
                }
                break;
            }
        }
    }

    /// Doubts about the agent as a whole (for `/healthz`).
    pub fn health_doubts(&self) -> Vec<Doubt> {
        self.source.health_doubts()
    }
}

/// The counts of `filter` now: a port's totals, or (a narrower scope, or a source without
/// totals) a pass over every endpoint. Blocking.
fn scope_state(source: &dyn Source, filter: &Filter) -> Result<PortState> {
    if filter.addr.is_none()
        && filter.netns.is_none()
        && let Some(state) = source.port_state(filter.port)?
    {
        return Ok(state);
    }
    let mut state = PortState {
        active: 0,
        last_change_ns: 0,
    };
    for endpoint in source.endpoints()? {
        if filter.matches(&endpoint) {
            state.active += endpoint.active;
            state.last_change_ns = state.last_change_ns.max(endpoint.last_change_ns);
        }
    }
    // A reclaimed endpoint of this port may have been in scope: its last change counts.
    state.last_change_ns = state
        .last_change_ns
        .max(source.reclaimed_last_change(filter.port));
    Ok(state)
}

/// The scope's count, for a decision: a port's total (one atomic counter), or the scope's
/// endpoints added up, and `false` when that sum is 0 but could not be read twice alike.
///
/// Why twice: the endpoints are read one by one (a pass over the map, milliseconds), so
/// their sum is no snapshot. With a connection left on endpoint A and a new one opening on
/// C (the pod's address and its loopback), a pass that reads C before the open and A after
/// the close adds up to 0 although the scope never was at 0, and a waiter answered drained
/// at once with C's connection open (an audit found it; the wake-up rule only helps a
/// waiter that goes to sleep). A zero is vouched for only when a second pass finds every
/// endpoint of the scope as the first did (the same endpoints, each with the same
/// `opened`, `closed` and `active`): an endpoint's `opened` and `closed` only grow, so none
/// of them changed between its two reads, and the span from the end of the first pass to
/// the start of the second lies between the two reads of every one of them. Throughout
/// that span each was at the `active` read, 0: the scope was at 0 at an instant inside
/// the read, as a port's single counter is. Other scopes' changes (other pods on the same
/// port) do not matter. After [`SCOPE_READS`] pairs that differ, the zero is a doubt.
fn scope_count(source: &dyn Source, filter: &Filter) -> Result<(u64, bool)> {
    if filter.addr.is_none()
        && filter.netns.is_none()
        && let Some(state) = source.port_state(filter.port)?
    {
        return Ok((state.active, true));
    }
    let in_scope = || -> Result<Vec<Endpoint>> {
        let mut endpoints: Vec<Endpoint> = source
            .endpoints()?
            .into_iter()
            .filter(|endpoint| filter.matches(endpoint))
            .collect();
        endpoints.sort_by_key(|endpoint| (endpoint.netns, endpoint.addr, endpoint.port));
        Ok(endpoints)
    };
    let sum = |endpoints: &[Endpoint]| endpoints.iter().map(|endpoint| endpoint.active).sum();
    let mut first = in_scope()?;
    for _ in 0..SCOPE_READS {
        let count: u64 = sum(&first);
        if count > 0 {
            // Too high at worst (a close read before another's open): never a drained answer.
            return Ok((count, true));
        }
        let second = in_scope()?;
        if second == first {
            return Ok((0, true));
        }
        first = second;
    }
    Ok((sum(&first), false))
}

/// The scope's count, then its doubts: the waiter judges a zero by the doubts of the
/// same read. Read in that order, a doubt that appears in between is seen; one that a
/// walk *clears* in between is not (the walk counted what the count missed, then
/// vouched), so a read during which a walk ended is read again. Walks are seconds
/// apart: after [`SCOPE_READS`] reads that each saw one end, the last read's doubts
/// are replaced by an error, which is a doubt (never a drained answer from it).
/// Blocking ([`Tracker::read_scope`] runs it off the async workers).
fn read_scope(source: &dyn Source, filter: &Filter) -> Result<(u64, Result<Vec<Doubt>, String>)> {
    let mut read = 0;
    loop {
        read += 1;
        let walks = source.walks();
        let (count, steady) = scope_count(source, filter)?;
        let doubts = if steady {
            source.doubts(filter).map_err(|problem| {
                crate::logging::in_general("cannot read whether the counts are whole", &problem)
            })
        } else {
            Err("the scope's connections kept opening and closing while they were counted".into())
        };
        if source.walks() == walks {
            return Ok((count, doubts));
        }
        if read == SCOPE_READS {
            return Ok((
                count,
                Err("walks of the open sockets kept ending while the counts were read".into()),
            ));
        }
    }
}

#[cfg(test)]
mod tests;
