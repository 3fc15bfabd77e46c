//! A drain is a thing: started for a scope (idempotently), the load balancer told while it
//! runs (`/health` and HAProxy's agent-check read [`Drains::draining`]), its deadline
//! enforced if asked (closing what is left), and every drain put on record (`/drains`, one
//! log line, metrics, and an optional journal that survives restarts).

pub mod advice;
pub mod journal;
pub mod state_file;

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    closer::Closer,
    drain::journal::Journal,
    drain::state_file::StateFile,
    drain_rule::{Cidr, DrainRule, Peer},
    tracker::{DrainOutcome, Filter, Tracker, WaitError},
};

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainEnd {
    Drained,
    Timeout,
    ClosedAtDeadline,
    Cancelled,
    AgentShutdown,
    /// Started by `/drained` waiters, every one of which went away before it ended.
    Abandoned,
}

impl DrainEnd {
    pub const ALL: [Self; 6] = [
        Self::Drained,
        Self::Timeout,
        Self::ClosedAtDeadline,
        Self::Cancelled,
        Self::AgentShutdown,
        Self::Abandoned,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::Timeout => "timeout",
            Self::ClosedAtDeadline => "closed_at_deadline",
            Self::Cancelled => "cancelled",
            Self::AgentShutdown => "agent_shutdown",
            Self::Abandoned => "abandoned",
        }
    }

    /// Whether the scope stays out of rotation after this end: a drain that ran its course
    /// precedes a stop; a cancelled, abandoned or interrupted one does not.
    pub const fn holds_the_gate(self) -> bool {
        matches!(self, Self::Drained | Self::Timeout | Self::ClosedAtDeadline)
    }
}

/// What to do when a drain's timeout passes with connections left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Leave them (the default): the answer is 503 and nothing is closed.
    #[default]
    Keep,
    /// Close them: idle ones first, then the rest, at most `pace` per second. The peers
    /// get a reset.
    Close,
}

/// A drain's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainSpec {
    pub filter: Filter,
    pub timeout: Duration,
    pub rule: DrainRule,
    pub on_timeout: OnTimeout,
    /// Closings per second at the deadline (0: all at once).
    pub pace: u32,
    /// Which settings the request named: only those must agree with a drain in progress.
    pub given: Given,
}

/// The settings a request named explicitly (the rest take the drain's, or the defaults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Given {
    pub on_timeout: bool,
    pub quiet: bool,
    pub ignore: bool,
    pub idle: bool,
    pub pace: bool,
}

impl DrainSpec {
    /// What `asked` names that differs from this drain in progress, or `None`: a request
    /// that would change a drain others wait on gets 409, never a silent drop.
    fn conflict(&self, asked: &Self) -> Option<String> {
        let mut differences = Vec::new();
        if asked.given.on_timeout && asked.on_timeout != self.on_timeout {
            differences.push(format!(
                "on_timeout={} (asked {})",
                self.on_timeout.label(),
                asked.on_timeout.label()
            ));
        }
        if asked.given.quiet && asked.rule.quiet != self.rule.quiet {
            differences.push(format!(
                "quiet={:?} (asked {:?})",
                self.rule.quiet, asked.rule.quiet
            ));
        }
        if asked.given.ignore && asked.rule.ignore != self.rule.ignore {
            differences.push("a different ignore list".into());
        }
        if asked.given.idle && asked.rule.idle != self.rule.idle {
            differences.push(format!(
                "idle={:?} (asked {:?})",
                self.rule.idle, asked.rule.idle
            ));
        }
        if asked.given.pace && asked.pace != self.pace {
            differences.push(format!("pace={} (asked {})", self.pace, asked.pace));
        }
        (!differences.is_empty()).then(|| differences.join(", "))
    }
}

impl OnTimeout {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Close => "close",
        }
    }
}

/// Why a drain could not be started or joined.
#[derive(Debug)]
pub enum JoinError {
    /// As many drains as allowed are in progress.
    Full,
    /// The drain in progress of this scope has other settings (named, with its id).
    Conflict(u64, String),
}

/// What a drain came to: the answer its waiters get.
#[derive(Clone, Debug)]
pub struct Final {
    pub result: DrainEnd,
    pub outcome: crate::tracker::DrainOutcome,
    /// Connections the agent closed at the deadline (`on_timeout=close`).
    pub closed: Option<u64>,
}

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

/// The record of one drain (`/drains`, the journal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    pub id: u64,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    /// Unix time in milliseconds.
    pub started_ms: u64,
    /// Milliseconds after the start when the count was first seen at zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_zero_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// `None` while in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<DrainEnd>,
    pub active_at_start: u64,
    /// Connections that arrived after the start (sources not ignored).
    pub late_arrivals: u64,
    /// The first connections still open at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_at_end: Vec<Peer>,
    pub closed_by_agent: u64,
    pub wait_ms: u64,
    pub on_timeout: OnTimeout,
}

/// What `--state-dir` keeps across a restart: the drains `POST /drain` started that are in
/// progress, and the scopes held out of rotation after their drains.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedDrains {
    drains: Vec<SavedDrain>,
    held: Vec<SavedHold>,
}

/// A POSTed drain in progress: its record and everything its spec needs.
#[derive(Debug, Serialize, Deserialize)]
struct SavedDrain {
    record: DrainRecord,
    /// Unix time in milliseconds when it ends (at a restart it resumes with what is left).
    deadline_ms: u64,
    timeout_ms: u64,
    quiet_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ignore: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idle_ms: Option<u64>,
    pace: u32,
    given: SavedGiven,
}

/// [`Given`] on disk.
#[derive(Debug, Serialize, Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one flag per setting a request can name, as `Given`"
)]
struct SavedGiven {
    on_timeout: bool,
    quiet: bool,
    ignore: bool,
    idle: bool,
    pace: bool,
}

/// A scope held out of rotation after its drain.
#[derive(Debug, Serialize, Deserialize)]
struct SavedHold {
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<u32>,
    /// Cookies of the listeners when the drain ended (a socket's cookie never changes).
    listeners: Vec<u64>,
    /// Unix time in milliseconds when the hold ends.
    until_ms: u64,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl SavedDrain {
    fn of(
        spec: &DrainSpec,
        record: &DrainRecord,
        deadline: tokio::time::Instant,
        now: tokio::time::Instant,
        now_ms: u64,
    ) -> Self {
        Self {
            record: record.clone(),
            deadline_ms: now_ms.saturating_add(millis(deadline.saturating_duration_since(now))),
            timeout_ms: millis(spec.timeout),
            quiet_ms: millis(spec.rule.quiet),
            ignore: spec.rule.ignore.iter().map(ToString::to_string).collect(),
            idle_ms: spec.rule.idle.map(millis),
            pace: spec.pace,
            given: SavedGiven {
                on_timeout: spec.given.on_timeout,
                quiet: spec.given.quiet,
                ignore: spec.given.ignore,
                idle: spec.given.idle,
                pace: spec.given.pace,
            },
        }
    }

    /// The drain's spec again; `None` when a setting cannot be read.
    fn spec(&self) -> Option<DrainSpec> {
        let ignore = self
            .ignore
            .iter()
            .map(|cidr| cidr.parse::<Cidr>().ok())
            .collect::<Option<Vec<_>>>()?;
        Some(DrainSpec {
            filter: Filter {
                port: self.record.port,
                addr: self.record.addr,
                netns: self.record.netns,
            },
            timeout: Duration::from_millis(self.timeout_ms),
            rule: DrainRule {
                quiet: Duration::from_millis(self.quiet_ms),
                ignore,
                idle: self.idle_ms.map(Duration::from_millis),
            },
            on_timeout: self.record.on_timeout,
            pace: self.pace,
            given: Given {
                on_timeout: self.given.on_timeout,
                quiet: self.given.quiet,
                ignore: self.given.ignore,
                idle: self.given.idle,
                pace: self.given.pace,
            },
        })
    }
}

/// After a drain ends, its port stays out of rotation (the stop that follows is about to
/// end the service) until a new instance listens on it, until `DELETE /drain`, or at most
/// this long.
pub const GATE_HOLD: Duration = Duration::from_secs(300);

/// At most this many scopes are held out of rotation after their drains; past it the
/// oldest hold ends first.
pub const HELD_MAX: usize = 4096;

/// A scope kept out of rotation after its drain.
struct Held {
    /// The listeners when the drain ended: any other one is a new instance.
    listeners: std::collections::HashSet<u64>,
    until: tokio::time::Instant,
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

impl PortGate for Drains {
    fn draining(
        &self,
        port: u16,
        addr: Option<IpAddr>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            let asked = self.resolve(port, addr, None).await;
            self.gated(&asked)
        })
    }
}

/// A drain in progress.
struct Running {
    spec: DrainSpec,
    /// When it started (a drain restored at start-up: as long before as it had run).
    started: tokio::time::Instant,
    deadline: tokio::time::Instant,
    record: Mutex<DrainRecord>,
    /// Set to end the drain early: `Cancelled` (`DELETE`) or `Abandoned` (its waiters left).
    cancel: watch::Sender<Option<DrainEnd>>,
    finished: watch::Sender<Option<Arc<Final>>>,
    /// Started or joined by `POST /drain`: lives until its timeout or `DELETE`, whoever waits.
    posted: std::sync::atomic::AtomicBool,
    /// `/drained` waiters attached now.
    waiters: std::sync::atomic::AtomicUsize,
}

/// A `/drained` waiter's part in a drain. Dropping it (answered, or the client went away)
/// ends the drain when it was the last waiter of a drain no `POST` asked for.
pub struct Membership {
    drain: Arc<Running>,
}

impl Membership {
    pub fn id(&self) -> u64 {
        lock(&self.drain.record).id
    }

    /// When the drain's own deadline passes.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.drain.deadline
    }

    /// The drain's outcome, if it ends before `until`.
    pub async fn outcome(&self, until: tokio::time::Instant) -> Option<Arc<Final>> {
        let mut finished = self.drain.finished.subscribe();
        tokio::time::timeout_at(until, finished.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|done| done.ok().and_then(|done| done.clone()))
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let left = self.drain.waiters.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0
            && !self.drain.posted.load(Ordering::Acquire)
            && tokio::time::Instant::now() < self.drain.deadline
        {
            // Nobody waits for it and nobody asked for it to run on its own.
            self.drain.cancel.send_if_modified(|end| {
                end.is_none() && {
                    *end = Some(DrainEnd::Abandoned);
                    true
                }
            });
        }
    }
}

/// How many ended drains `/drains` keeps.
pub const HISTORY: usize = 200;

/// Drain durations' histogram buckets, seconds.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Ended drains, counted for the metrics.
#[derive(Clone, Debug, Default)]
pub struct DrainStats {
    pub ended: HashMap<DrainEnd, u64>,
    /// Cumulative counts per [`DURATION_BUCKETS`] bound, the total count and sum (s).
    pub buckets: [u64; DURATION_BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

/// Every drain: in progress and ended.
pub struct Drains {
    tracker: Arc<Tracker>,
    closer: Option<Arc<dyn Closer>>,
    journal: Option<Arc<Journal>>,
    next_id: AtomicU64,
    running: Mutex<HashMap<Filter, Arc<Running>>>,
    /// Scopes whose drain ended and that stay out of rotation (see [`GATE_HOLD`],
    /// [`HELD_MAX`]).
    held: Mutex<HashMap<Filter, Held>>,
    /// Which namespace an address asked about belongs to (`None` in unit tests: the node).
    pods: Option<Arc<crate::sys::pod_addresses::PodAddresses>>,
    /// Drains in progress at most (`--max-waiters`).
    max_running: usize,
    history: Mutex<VecDeque<DrainRecord>>,
    stats: Mutex<DrainStats>,
    /// Where POSTed drains and held gates are kept across restarts (`--state-dir`).
    state: Option<Arc<StateFile>>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Drains {
    /// The registry; the journal's records (if any) become the history, and ids go on
    /// from the highest one there.
    pub fn new(
        tracker: Arc<Tracker>,
        closer: Option<Arc<dyn Closer>>,
        journal: Option<Journal>,
        pods: Option<Arc<crate::sys::pod_addresses::PodAddresses>>,
        max_running: usize,
    ) -> Self {
        let past = journal
            .as_ref()
            .map(|journal| journal.read_records::<DrainRecord>(HISTORY))
            .unwrap_or_default();
        let next_id = past.iter().map(|record| record.id).max().unwrap_or(0) + 1;
        Self {
            tracker,
            closer,
            journal: journal.map(Arc::new),
            next_id: AtomicU64::new(next_id),
            running: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            pods,
            max_running,
            history: Mutex::new(past.into_iter().collect()),
            stats: Mutex::new(DrainStats::default()),
            state: None,
        }
    }

    /// Keeps POSTed drains and held gates in `file` from now on (see [`Drains::restore`]).
    #[must_use]
    pub fn with_state_file(mut self, file: StateFile) -> Self {
        self.state = Some(Arc::new(file));
        self
    }

    /// The drains and gates to keep across a restart, as they are now; `None` once the agent
    /// is stopping (drains end then as `agent_shutdown`, and must stay on disk to resume).
    fn saved(&self) -> Option<SavedDrains> {
        if self.tracker.shutting_down() {
            return None;
        }
        let now_ms = unix_ms();
        let now = tokio::time::Instant::now();
        let drains = lock(&self.running)
            .values()
            .filter(|drain| drain.posted.load(Ordering::Acquire))
            .map(|drain| {
                SavedDrain::of(
                    &drain.spec,
                    &lock(&drain.record),
                    drain.deadline,
                    now,
                    now_ms,
                )
            })
            .collect();
        let held = lock(&self.held)
            .iter()
            .filter(|(_, hold)| hold.until > now)
            .map(|(scope, hold)| SavedHold {
                port: scope.port,
                addr: scope.addr,
                netns: scope.netns,
                listeners: hold.listeners.iter().copied().collect(),
                until_ms: now_ms.saturating_add(millis(hold.until - now)),
            })
            .collect();
        Some(SavedDrains { drains, held })
    }

    /// Writes the state file (if any) and syncs it: called before `POST /drain` and
    /// `DELETE /drain` are answered, and when a drain ends. A failure is logged: the drain
    /// goes on, but would not survive a restart.
    pub async fn save(self: &Arc<Self>) {
        let Some(file) = self.state.clone() else {
            return;
        };
        let drains = Arc::clone(self);
        let written = tokio::task::spawn_blocking(move || file.write_with(|| drains.saved())).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(problem)) => {
                log::warn!("cannot save the drains (they will not survive a restart): {problem:#}");
            }
            Err(problem) => log::warn!("the state file writer failed: {problem}"),
        }
    }

    /// At start-up: the drains POSTed before the last stop resume with their own deadlines
    /// (waiters of `/drained` are gone with the old process: a drain only they started would
    /// have ended `abandoned`, so none is kept), and held gates stay held until their hold
    /// ends, a new listener appears, or `DELETE /drain`. Ids go on after the restored ones.
    pub fn restore(self: &Arc<Self>) {
        self.restore_saved(false);
    }

    /// Once the agent that wrote the state file has gone (an upgrade: `StateFile`): what it
    /// saved after this agent started (drains POSTed to it meanwhile, gates it held) joins
    /// this agent's, scopes this agent has already kept as they are, and this agent writes
    /// from now on.
    pub async fn take_over_state(self: &Arc<Self>) {
        let Some(file) = self.state.clone() else {
            return;
        };
        if file.is_writer() {
            return;
        }
        match tokio::task::spawn_blocking(move || file.wait_to_write()).await {
            Ok(Ok(())) => {}
            Ok(Err(problem)) => {
                log::warn!(
                    "{problem:#}: the drains are not saved (they will not survive a restart)"
                );
                return;
            }
            Err(problem) => {
                log::warn!("the state file's lock waiter failed: {problem}");
                return;
            }
        }
        self.restore_saved(true);
        self.save().await;
    }

    /// Restores the state file's drains and gates; `only_new`: not for scopes this agent
    /// has a drain or a gate of already.
    fn restore_saved(self: &Arc<Self>, only_new: bool) {
        let Some(file) = &self.state else {
            return;
        };
        let Some(saved) = file.read::<SavedDrains>() else {
            return;
        };
        let now_ms = unix_ms();
        let now = tokio::time::Instant::now();
        let mut gates = 0;
        {
            let mut held = lock(&self.held);
            for hold in saved.held {
                if hold.until_ms <= now_ms || held.len() >= HELD_MAX {
                    continue;
                }
                let scope = Filter {
                    port: hold.port,
                    addr: hold.addr,
                    netns: hold.netns,
                };
                if only_new && held.contains_key(&scope) {
                    continue;
                }
                held.insert(
                    scope,
                    Held {
                        listeners: hold.listeners.into_iter().collect(),
                        until: now + Duration::from_millis(hold.until_ms - now_ms),
                    },
                );
                gates += 1;
            }
        }
        let mut drains = 0;
        for drain in saved.drains {
            let Some(spec) = drain.spec() else {
                log::warn!(
                    "{}: drain {} has settings this agent cannot read: not resumed",
                    file.path().display(),
                    drain.record.id
                );
                continue;
            };
            let id = drain.record.id;
            if only_new && lock(&self.running).contains_key(&spec.filter) {
                continue;
            }
            self.next_id.fetch_max(id + 1, Ordering::Relaxed);
            let ran_for = Duration::from_millis(now_ms.saturating_sub(drain.record.started_ms));
            let left = Duration::from_millis(drain.deadline_ms.saturating_sub(now_ms));
            let resumed = Arc::new(Running {
                spec: spec.clone(),
                started: now.checked_sub(ran_for).unwrap_or(now),
                deadline: now + left,
                record: Mutex::new(drain.record),
                cancel: watch::channel(None).0,
                finished: watch::channel(None).0,
                posted: std::sync::atomic::AtomicBool::new(true),
                waiters: std::sync::atomic::AtomicUsize::new(0),
            });
            if lock(&self.running)
                .insert(spec.filter.clone(), Arc::clone(&resumed))
                .is_some()
            {
                log::warn!(
                    "{}: two drains of one scope; the later one kept",
                    file.path().display()
                );
            }
            log::info!(
                "drain {id} resumed after a restart: port={} addr={} netns={} {left:?} left",
                spec.filter.port,
                spec.filter.addr.map_or("-".into(), |addr| addr.to_string()),
                spec.filter
                    .netns
                    .map_or("-".into(), |netns| netns.to_string()),
            );
            let registry = Arc::clone(self);
            tokio::spawn(async move { registry.run(spec, resumed).await });
            drains += 1;
        }
        log::info!(
            "restored {drains} drain(s) in progress and {gates} held /health gate(s) from {}",
            file.path().display()
        );
    }

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
    /// drain of one scope never gates another (see [`Asked::covered_by`]).
    pub fn gated(&self, asked: &Asked) -> bool {
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
        gated
    }

    /// Puts `filter`'s scope back in rotation at once (`DELETE /drain` after a drain ended).
    pub fn release(&self, filter: &Filter) -> bool {
        lock(&self.held).remove(filter).is_some()
    }

    /// `POST /drain`: starts a drain of `spec.filter`, or returns the one in progress for
    /// that scope (`false`), which from now on lives until its timeout or `DELETE`.
    pub fn post(self: &Arc<Self>, spec: DrainSpec) -> Result<(DrainRecord, bool), JoinError> {
        let (drain, created) = self.start(spec, true)?;
        drain.posted.store(true, Ordering::Release);
        let record = lock(&drain.record).clone();
        Ok((record, created))
    }

    /// A `/drained` waiter with a timeout: joins the drain of its scope, starting one if
    /// none is in progress. The drain lives while a waiter is attached (or a `POST` asked).
    pub fn join(self: &Arc<Self>, spec: DrainSpec) -> Result<(Membership, bool), JoinError> {
        let (drain, created) = self.start(spec, false)?;
        Ok((Membership { drain }, created))
    }

    /// The drain of `spec.filter`, started now (`true`) or in progress, with one more
    /// waiter attached unless `posted`.
    fn start(
        self: &Arc<Self>,
        spec: DrainSpec,
        posted: bool,
    ) -> Result<(Arc<Running>, bool), JoinError> {
        let mut running = lock(&self.running);
        if let Some(existing) = running.get(&spec.filter) {
            if let Some(difference) = existing.spec.conflict(&spec) {
                return Err(JoinError::Conflict(lock(&existing.record).id, difference));
            }
            if !posted {
                existing.waiters.fetch_add(1, Ordering::AcqRel);
            }
            return Ok((Arc::clone(existing), false));
        }
        if running.len() >= self.max_running {
            return Err(JoinError::Full);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let active_at_start = self.tracker.active(&spec.filter).unwrap_or(0);
        let record = DrainRecord {
            id,
            port: spec.filter.port,
            addr: spec.filter.addr,
            netns: spec.filter.netns,
            started_ms: unix_ms(),
            first_zero_after_ms: None,
            ended_ms: None,
            result: None,
            active_at_start,
            late_arrivals: 0,
            peers_at_end: Vec::new(),
            closed_by_agent: 0,
            wait_ms: 0,
            on_timeout: spec.on_timeout,
        };
        let drain = Arc::new(Running {
            spec: spec.clone(),
            started: tokio::time::Instant::now(),
            deadline: tokio::time::Instant::now() + spec.timeout,
            record: Mutex::new(record),
            cancel: watch::channel(None).0,
            finished: watch::channel(None).0,
            posted: std::sync::atomic::AtomicBool::new(posted),
            waiters: std::sync::atomic::AtomicUsize::new(usize::from(!posted)),
        });
        running.insert(spec.filter.clone(), Arc::clone(&drain));
        drop(running);
        log::info!(
            "drain {id} started: port={} addr={} netns={} timeout={:?} active={active_at_start}",
            spec.filter.port,
            spec.filter.addr.map_or("-".into(), |addr| addr.to_string()),
            spec.filter
                .netns
                .map_or("-".into(), |netns| netns.to_string()),
            spec.timeout
        );
        let registry = Arc::clone(self);
        let running = Arc::clone(&drain);
        tokio::spawn(async move { registry.run(spec, running).await });
        Ok((drain, true))
    }

    /// Cancels the drain of `filter`; its record, or `None` if none is in progress.
    /// The scope's held gate (if any) is released either way: `DELETE /drain` after a drain
    /// ended puts the scope back in rotation (before, it did nothing without a drain in
    /// progress).
    pub async fn cancel(&self, filter: &Filter) -> Option<DrainRecord> {
        self.release(filter);
        let drain = lock(&self.running).get(filter).cloned()?;
        let mut finished = drain.finished.subscribe();
        drain.cancel.send_if_modified(|end| {
            end.is_none() && {
                *end = Some(DrainEnd::Cancelled);
                true
            }
        });
        // The drain ends at once on cancel; wait for its record.
        let _ = finished.wait_for(Option::is_some).await;
        let record = lock(&drain.record).clone();
        Some(record)
    }

    /// Waits until the drain of `filter` (if one runs) has ended, at most `limit`.
    #[cfg(test)]
    pub async fn wait_ended(&self, filter: &Filter, limit: Duration) -> Option<DrainRecord> {
        let drain = lock(&self.running).get(filter).cloned()?;
        let mut finished = drain.finished.subscribe();
        let _ = tokio::time::timeout(limit, finished.wait_for(Option::is_some)).await;
        let record = lock(&drain.record).clone();
        Some(record)
    }

    /// Waits until no drain is in progress (at shutdown), at most `limit`.
    pub async fn wait_all_ended(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !lock(&self.running).is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drains in progress and the last ended ones, newest first.
    pub fn list(&self) -> (Vec<DrainRecord>, Vec<DrainRecord>) {
        let running = lock(&self.running)
            .values()
            .map(|drain| lock(&drain.record).clone())
            .collect();
        let ended = lock(&self.history).iter().rev().cloned().collect();
        (running, ended)
    }

    /// Counts of ended drains, for the metrics.
    pub fn stats(&self) -> DrainStats {
        lock(&self.stats).clone()
    }

    /// One drain, from start to record.
    async fn run(self: Arc<Self>, spec: DrainSpec, drain: Arc<Running>) {
        let mut cancel = drain.cancel.subscribe();
        let started = drain.started;
        // Its own deadline: for a drain resumed after a restart, what was left of it.
        let left = drain
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        let waited = tokio::select! {
            outcome = self.tracker.wait_for_drain(&spec.filter, left, &spec.rule) => Ok(outcome),
            end = cancel.wait_for(Option::is_some) => Err(end.ok().and_then(|end| *end).unwrap_or(DrainEnd::Cancelled)),
        };
        let mut closed = 0;
        let (result, outcome) = match waited {
            Err(end) => (end, self.not_drained(&spec.filter, started, None)),
            Ok(Ok(outcome)) => {
                {
                    let mut record = lock(&drain.record);
                    record.first_zero_after_ms = outcome
                        .first_zero
                        .map(|at| u64::try_from(at.as_millis()).unwrap_or(u64::MAX));
                    record.late_arrivals = outcome.arrivals;
                    record.peers_at_end = outcome.peers.clone();
                }
                if outcome.drained {
                    (DrainEnd::Drained, outcome)
                } else if self.tracker.shutting_down() {
                    (DrainEnd::AgentShutdown, outcome)
                } else if spec.on_timeout == OnTimeout::Close {
                    closed = self.close_remaining(&spec).await;
                    // Drained only if nothing is left now: a close that failed must not turn
                    // into a "drained". Asked like any answer (doubts confirmed), without the
                    // quiet window, which the deadline has ended.
                    let now_rule = DrainRule {
                        quiet: Duration::ZERO,
                        ..spec.rule.clone()
                    };
                    let after = self
                        .tracker
                        .wait_for_drain(&spec.filter, Duration::ZERO, &now_rule)
                        .await
                        .map(|after| DrainOutcome {
                            waited: started.elapsed(),
                            ..after
                        })
                        .unwrap_or(outcome);
                    (DrainEnd::ClosedAtDeadline, after)
                } else {
                    (DrainEnd::Timeout, outcome)
                }
            }
            Ok(Err(problem)) => {
                let why = match problem {
                    WaitError::TooManyWaiters(max) => format!("{max} waiters already"),
                    WaitError::Source(source) => format!("{source:#}"),
                };
                (
                    DrainEnd::Timeout,
                    self.not_drained(&spec.filter, started, Some(why)),
                )
            }
        };
        let record = {
            let mut record = lock(&drain.record);
            record.result = Some(result);
            record.ended_ms = Some(unix_ms());
            record.closed_by_agent = closed;
            record.wait_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            record.clone()
        };
        // The listeners now (the gate waits for a new one): a netlink query per namespace,
        // off the async workers, which are answering the drain's waiters meanwhile.
        let listeners = match (&self.closer, record.result) {
            (Some(closer), Some(result)) if result.holds_the_gate() => {
                let (closer, filter) = (Arc::clone(closer), spec.filter.clone());
                tokio::task::spawn_blocking(move || closer.listeners(&filter))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        };
        // The record is on disk before any waiter gets the answer (`Final` is sent last).
        if let Some(journal) = &self.journal {
            let (journal, line) = (Arc::clone(journal), record.clone());
            let written = tokio::task::spawn_blocking(move || journal.append(&line)).await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(problem)) => log::warn!("cannot write the drain journal: {problem:#}"),
                Err(problem) => log::warn!("the drain journal writer failed: {problem}"),
            }
        }
        self.finish(&spec.filter, record, listeners);
        drain.finished.send_replace(Some(Arc::new(Final {
            result,
            outcome,
            closed: (spec.on_timeout == OnTimeout::Close && result == DrainEnd::ClosedAtDeadline)
                .then_some(closed),
        })));
        // Ended (and its gate held, if it holds one): after the answer, which must not wait
        // for a second sync. A crash in between resumes the drain, which ends again.
        self.save().await;
    }

    /// A not-drained outcome with the count now (a drain that ended before its wait did).
    fn not_drained(
        &self,
        filter: &Filter,
        started: tokio::time::Instant,
        unknown: Option<String>,
    ) -> DrainOutcome {
        DrainOutcome {
            drained: false,
            active: self.tracker.active(filter).unwrap_or(0),
            waited: started.elapsed(),
            unknown,
            idle: None,
            busy: None,
            peers: Vec::new(),
            first_zero: None,
            arrivals: 0,
        }
    }

    /// Closes what is left of `spec`'s scope: idle connections first, then the rest, paced.
    async fn close_remaining(&self, spec: &DrainSpec) -> u64 {
        let Some(closer) = self.closer.clone() else {
            log::warn!("cannot close connections: this agent has no way to close sockets");
            return 0;
        };
        let mut peers = match self.tracker.remaining(&spec.filter).await {
            Ok(peers) => peers,
            Err(problem) => {
                log::warn!("cannot list the connections to close: {problem:#}");
                return 0;
            }
        };
        // Ignored sources (probes) never held the drain: leave them. Idle ones first:
        // closing them loses nothing in flight.
        peers.retain(|peer| !spec.rule.ignores(peer.remote.ip()));
        peers.sort_by_key(|peer| peer.busy);
        let batch = if spec.pace == 0 {
            peers.len().max(1)
        } else {
            spec.pace as usize
        };
        let mut closed = 0;
        for (round, chunk) in peers.chunks(batch).enumerate() {
            if round > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let (closer, filter, chunk) =
                (Arc::clone(&closer), spec.filter.clone(), chunk.to_vec());
            match tokio::task::spawn_blocking(move || closer.close(&filter, &chunk)).await {
                Ok(Ok(count)) => closed += count,
                Ok(Err(problem)) => log::warn!("cannot close connections: {problem:#}"),
                Err(problem) => log::warn!("closing failed: {problem}"),
            }
        }
        closed
    }

    /// Moves an ended drain to the history, the journal, the log and the metrics.
    fn finish(&self, filter: &Filter, record: DrainRecord, listeners: Vec<u64>) {
        if record.result.is_some_and(DrainEnd::holds_the_gate) {
            let mut held = lock(&self.held);
            if held.len() >= HELD_MAX && !held.contains_key(filter) {
                // Bounded: the hold that ends soonest goes first.
                let soonest = held
                    .iter()
                    .min_by_key(|(_, hold)| hold.until)
                    .map(|(scope, _)| scope.clone());
                if let Some(soonest) = soonest {
                    held.remove(&soonest);
                }
            }
            held.insert(
                filter.clone(),
                Held {
                    listeners: listeners.into_iter().collect(),
                    until: tokio::time::Instant::now() + GATE_HOLD,
                },
            );
        }
        lock(&self.running).remove(filter);
        log::info!(
            "drain {} ended: result={} port={} waited_ms={} active_at_start={} late_arrivals={} left={} closed_by_agent={}",
            record.id,
            record.result.map_or("-", DrainEnd::label),
            record.port,
            record.wait_ms,
            record.active_at_start,
            record.late_arrivals,
            record.peers_at_end.len(),
            record.closed_by_agent
        );
        {
            let mut stats = lock(&self.stats);
            if let Some(result) = record.result {
                *stats.ended.entry(result).or_default() += 1;
            }
            let seconds = record.wait_ms as f64 / 1000.0;
            for (bound, count) in DURATION_BUCKETS.iter().zip(stats.buckets.iter_mut()) {
                if seconds <= *bound {
                    *count += 1;
                }
            }
            stats.count += 1;
            stats.sum_seconds += seconds;
        }
        let mut history = lock(&self.history);
        history.push_back(record);
        while history.len() > HISTORY {
            history.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::fake::{FakeSource, endpoint};

    fn registry(active: u64) -> (Arc<FakeSource>, Arc<Tracker>, Arc<Drains>) {
        let source = Arc::new(FakeSource::default());
        source.set(vec![endpoint("127.0.0.1", 8080, active)]);
        let tracker = Arc::new(Tracker::new(source.clone(), 16));
        let drains = Arc::new(Drains::new(Arc::clone(&tracker), None, None, None, 4));
        (source, tracker, drains)
    }

    fn spec(timeout: Duration) -> DrainSpec {
        DrainSpec {
            filter: Filter::port(8080),
            timeout,
            rule: DrainRule::default(),
            on_timeout: OnTimeout::Keep,
            pace: 0,
            given: Given::default(),
        }
    }

    /// A registry keeping its drains in `dir` (what `--state-dir` does).
    fn saving_registry(
        active: u64,
        dir: &std::path::Path,
    ) -> (Arc<FakeSource>, Arc<Tracker>, Arc<Drains>) {
        let source = Arc::new(FakeSource::default());
        // 8081 busy too: the drain only waiters join must still run when it is saved.
        source.set(vec![
            endpoint("127.0.0.1", 8080, active),
            endpoint("127.0.0.1", 8081, active),
        ]);
        let tracker = Arc::new(Tracker::new(source.clone(), 16));
        let drains = Arc::new(
            Drains::new(Arc::clone(&tracker), None, None, None, 4)
                .with_state_file(StateFile::open(dir).expect("state file")),
        );
        (source, tracker, drains)
    }

    #[tokio::test]
    async fn posted_drains_and_held_gates_are_restored_and_joined_ones_are_not() {
        let dir = tempfile::tempdir().expect("dir");
        let (_, _, drains) = saving_registry(2, dir.path());
        let mut posted = spec(Duration::from_secs(600));
        posted.rule.ignore = vec!["10.0.0.0/8".parse().expect("cidr")];
        posted.given.ignore = true;
        let (record, _) = drains.post(posted.clone()).expect("room");
        let joined = DrainSpec {
            filter: Filter::port(8081),
            ..spec(Duration::from_secs(600))
        };
        let (_membership, _) = drains.join(joined).expect("room");
        // A gate held after a drain of 9090 that ran its course.
        drains.finish(
            &Filter::port(9090),
            DrainRecord {
                result: Some(DrainEnd::Drained),
                port: 9090,
                ..record.clone()
            },
            vec![7],
        );
        drains.save().await;

        let (_, tracker, restored) = saving_registry(2, dir.path());
        restored.restore();
        let (running, _) = restored.list();
        assert_eq!(running.len(), 1, "only the POSTed drain: {running:?}");
        assert_eq!((running[0].id, running[0].port), (record.id, 8080));
        assert_eq!(running[0].started_ms, record.started_ms);
        assert!(restored.gated(&node(8080)) && restored.gated(&node(9090)));
        assert!(!restored.gated(&node(8081)));
        // Its settings came back: a request naming other ones conflicts.
        let mut other = spec(Duration::from_secs(600));
        other.given.ignore = true;
        assert!(matches!(
            restored.post(other),
            Err(JoinError::Conflict(id, _)) if id == record.id
        ));
        assert!(matches!(restored.post(posted), Ok((again, false)) if again.id == record.id));
        // Stopping writes nothing: what is on disk resumes at the next start.
        tracker.begin_shutdown();
        restored.release(&Filter::port(9090));
        restored.save().await;
        let (_, _, again) = saving_registry(2, dir.path());
        again.restore();
        assert!(again.gated(&node(9090)));
        assert_eq!(again.list().0.len(), 1);
    }

    /// What `/health?port=P` asks on the node (the node's namespace is 0 here).
    fn node(port: u16) -> Asked {
        Asked {
            port,
            addr: None,
            netns: 0,
            whole_namespace: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn starting_is_idempotent_and_the_gate_follows_the_drain() {
        let (source, tracker, drains) = registry(2);
        assert!(!drains.gated(&node(8080)));
        let (first, created) = drains.post(spec(Duration::from_secs(60))).expect("room");
        assert!(created);
        let (again, created) = drains.post(spec(Duration::from_secs(60))).expect("room");
        assert!(!created);
        assert_eq!(first.id, again.id);
        assert_eq!(first.active_at_start, 2);
        assert!(drains.gated(&node(8080)) && !drains.gated(&node(8081)));
        source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
        tracker.notify_port(8080);
        let record = drains
            .wait_ended(&Filter::port(8080), Duration::from_secs(5))
            .await
            .expect("record");
        assert_eq!(record.result, Some(DrainEnd::Drained));
        // Drained: the port stays out of rotation until a new instance listens (no kernel
        // here to ask) or it is released.
        assert!(drains.gated(&node(8080)));
        // DELETE /drain with no drain in progress: nothing cancelled, the gate released.
        assert!(drains.cancel(&Filter::port(8080)).await.is_none());
        assert!(!drains.gated(&node(8080)));
        let (running, ended) = drains.list();
        assert!(running.is_empty());
        assert_eq!(ended[0].id, first.id);
        assert_eq!(drains.stats().ended.get(&DrainEnd::Drained), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_and_timeout_are_recorded() {
        let (_, _, drains) = registry(1);
        let (started, _) = drains.post(spec(Duration::from_secs(3600))).expect("room");
        let record = drains.cancel(&Filter::port(8080)).await.expect("cancelled");
        assert_eq!(
            (record.id, record.result),
            (started.id, Some(DrainEnd::Cancelled))
        );
        assert!(!drains.gated(&node(8080)));
        assert!(drains.cancel(&Filter::port(8080)).await.is_none());
        drains.post(spec(Duration::from_secs(2))).expect("room");
        let record = drains
            .wait_ended(&Filter::port(8080), Duration::from_secs(10))
            .await
            .expect("record");
        assert_eq!(record.result, Some(DrainEnd::Timeout));
        assert_eq!(record.closed_by_agent, 0);
        assert_eq!(drains.list().1.len(), 2);
    }

    /// Issue 22: a `GET` whose client went away after 1 s left a 10-minute drain running,
    /// gating the port for 10 minutes. Now the drain lives while one of its waiters waits.
    #[tokio::test(start_paused = true)]
    async fn a_drain_whose_only_waiter_left_ends_at_once_and_a_posted_one_does_not() {
        let (_, _, drains) = registry(1);
        let (first, created) = drains.join(spec(Duration::from_secs(600))).expect("room");
        assert!(created);
        let (second, _) = drains.join(spec(Duration::from_secs(600))).expect("room");
        assert_eq!(first.id(), second.id());
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(first);
        tokio::task::yield_now().await;
        assert!(drains.gated(&node(8080)), "one waiter is still there");
        drop(second);
        let record = drains
            .wait_ended(&Filter::port(8080), Duration::from_secs(1))
            .await;
        // Ended (or already gone from the running set) within a second.
        assert!(record.is_none_or(|record| record.result == Some(DrainEnd::Abandoned)));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(drains.list().0.is_empty());
        assert_eq!(drains.list().1[0].result, Some(DrainEnd::Abandoned));
        assert!(
            !drains.gated(&node(8080)),
            "an abandoned drain holds no gate"
        );
        // A POST keeps it running whoever waits.
        let (waiter, _) = drains.join(spec(Duration::from_secs(600))).expect("room");
        drains.post(spec(Duration::from_secs(600))).expect("room");
        drop(waiter);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(drains.list().0.len(), 1);
    }

    /// Issue 22: a request with other settings silently joined a drain in progress (a
    /// close request answered `on_timeout: keep`). Named settings that differ are refused.
    #[tokio::test(start_paused = true)]
    async fn a_request_whose_settings_differ_is_refused_naming_the_difference() {
        let (_, _, drains) = registry(1);
        drains.post(spec(Duration::from_secs(600))).expect("room");
        let close = DrainSpec {
            on_timeout: OnTimeout::Close,
            given: Given {
                on_timeout: true,
                ..Given::default()
            },
            ..spec(Duration::from_secs(3))
        };
        match drains.post(close.clone()) {
            Err(JoinError::Conflict(_, text)) => {
                assert!(text.contains("on_timeout=keep (asked close)"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(drains.join(close), Err(JoinError::Conflict(..))));
        // Settings not named take the drain's: the plain hook joins.
        assert!(drains.join(spec(Duration::from_secs(3))).is_ok());
        let quiet = DrainSpec {
            rule: DrainRule {
                quiet: Duration::from_secs(5),
                ..DrainRule::default()
            },
            given: Given {
                quiet: true,
                ..Given::default()
            },
            ..spec(Duration::from_secs(30))
        };
        assert!(matches!(drains.post(quiet), Err(JoinError::Conflict(..))));
    }

    /// Issue 22: a pod's drain of its own port flipped the node-wide `/health?port=P` and
    /// agent-check for 5 minutes. A drain gates only what it covers.
    #[tokio::test(start_paused = true)]
    async fn one_scopes_drain_never_gates_another() {
        let (_, _, drains) = registry(1);
        let pod_a = Filter {
            port: 8080,
            addr: None,
            netns: Some(7),
        };
        let pod_b_addr: IpAddr = "10.1.0.8".parse().expect("ip");
        let pod_a_addr: IpAddr = "10.1.0.7".parse().expect("ip");
        drains
            .post(DrainSpec {
                filter: pod_a.clone(),
                ..spec(Duration::from_secs(600))
            })
            .expect("room");
        let a_inside = Asked {
            port: 8080,
            addr: None,
            netns: 7,
            whole_namespace: true,
        };
        let a_by_addr = Asked {
            port: 8080,
            addr: Some(pod_a_addr),
            netns: 7,
            whole_namespace: false,
        };
        let b_inside = Asked {
            netns: 8,
            ..a_inside
        };
        let b_by_addr = Asked {
            addr: Some(pod_b_addr),
            netns: 8,
            ..a_by_addr
        };
        assert!(drains.gated(&a_inside) && drains.gated(&a_by_addr));
        assert!(!drains.gated(&node(8080)), "the node's port");
        assert!(
            !drains.gated(&b_inside) && !drains.gated(&b_by_addr),
            "pod B"
        );
        // Pod A's hook on the node listener drains {addr, netns}: its own /health sees it.
        drains.cancel(&pod_a).await.expect("cancelled");
        drains
            .post(DrainSpec {
                filter: Filter {
                    addr: Some(pod_a_addr),
                    ..pod_a.clone()
                },
                ..spec(Duration::from_secs(600))
            })
            .expect("room");
        assert!(drains.gated(&a_inside) && drains.gated(&a_by_addr));
        assert!(!drains.gated(&node(8080)) && !drains.gated(&b_inside));
        // A node-wide drain covers every pod's port.
        drains.post(spec(Duration::from_secs(600))).expect("room");
        assert!(drains.gated(&node(8080)) && drains.gated(&b_by_addr));
    }
}
