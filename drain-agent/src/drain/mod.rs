//! A drain is a thing: started for a scope (idempotently), the load balancer told while it
//! runs (`/health` and HAProxy's agent-check read [`Drains::gated`]), its deadline
//! enforced if asked (closing what is left), and every drain put on record (`/drains`, one
//! log line, metrics, and an optional journal that survives restarts).
//!
//! This file holds the vocabulary (spec, end, record) and the registry [`Drains`]; by job:
//! `registry.rs` starts, joins and cancels drains, `run.rs` runs one from start to record,
//! `waiter.rs` answers a `/drained` request (its one wait), `gate.rs` says what is out of
//! rotation, `saved.rs` keeps drains across a restart (in `state_file.rs`), `journal.rs`
//! keeps the ended ones, `untrusted_path.rs` opens the files of both.

pub mod advice;
mod gate;
pub mod journal;
mod listener_reads;
pub mod namespace;
pub mod owner;
mod registry;
mod run;
mod saved;
pub mod state_file;
mod untrusted_path;
pub mod waiter;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    closer::Closer,
    drain::{gate::Held, journal::Journal, registry::Running, state_file::StateFile},
    drain_rule::{DrainRule, Peer},
    metric_labels::MetricLabels,
    tracker::{Filter, Tracker},
};

pub use gate::{Asked, GATE_HOLD, HELD_MAX, PortGate, Question};
pub use listener_reads::LISTENERS_FRESH;
pub use registry::{ENDING_WAIT, Membership};
pub use saved::Saved;

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
    /// Started by a local user, whose port's sockets were no longer all its own: another
    /// user's were on it while it ran, or at its end (before it would close or list what
    /// is left) they were not all its own, none were left, or they could not be read.
    /// Nothing closed, no gate held (`http/authority.rs`: a local user controls only ports
    /// whose sockets are all its own, for as long as its drain acts on them).
    NotOwned,
    /// Started by `/drained` waiters only, every one attached at its deadline a slice of a
    /// longer wait (`continues=true`: `drain-agent wait` asks a wait over `--max-timeout`
    /// in slices): the hook asks again, and its next slice starts the scope's next drain.
    /// Not a timeout: the alerts and the Argo template do not count it as cut short. It
    /// holds the gate as `Timeout` does (the hook still waits: the scope stays out of
    /// rotation between the slices).
    Continued,
}

impl DrainEnd {
    pub const ALL: [Self; 8] = [
        Self::Drained,
        Self::Timeout,
        Self::ClosedAtDeadline,
        Self::Cancelled,
        Self::AgentShutdown,
        Self::Abandoned,
        Self::NotOwned,
        Self::Continued,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::Timeout => "timeout",
            Self::ClosedAtDeadline => "closed_at_deadline",
            Self::Cancelled => "cancelled",
            Self::AgentShutdown => "agent_shutdown",
            Self::Abandoned => "abandoned",
            Self::NotOwned => "not_owned",
            Self::Continued => "continued",
        }
    }

    /// Whether the scope stays out of rotation after this end (for [`GATE_HOLD`], across a
    /// restart): a drain that ran its course precedes a stop; a cancelled, abandoned or
    /// interrupted one does not. An interrupted one stays out of rotation until the
    /// stopping agent exits (`Drains::gated`), and resumes at the next start. A `continued`
    /// one holds it as a `timeout` does: its hook still waits, and its next slice's drain
    /// takes over the scope.
    pub const fn holds_the_gate(self) -> bool {
        matches!(
            self,
            Self::Drained | Self::Timeout | Self::ClosedAtDeadline | Self::Continued
        )
    }
}

/// Who started a drain (`started_by` in its record): whom `/drains` shows the record to
/// (`http/authority.rs`: a local user sees only the drains it started, for a record names
/// the clients still connected at the end), and whether the drain's sockets must still be
/// its starter's when it acts on them ([`Drains::still_owned`]: a local user controls only
/// ports whose sockets are all its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StartedBy {
    /// Root on the node, or the holder of a bearer token.
    Node,
    /// A process of another user on the node, in the node's own namespace.
    LocalUser { uid: u32 },
    /// A pod: the drain's scope is its namespace (the record's `netns`).
    Pod,
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
        if asked.given.ignore && !asked.rule.ignores_the_same(&self.rule) {
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

    /// The rule a request `asked` that joined this drain judges by when it judges for itself
    /// (its own deadline came first, or the drain ended undrained before it): the settings
    /// it named, and this drain's for the rest. Never its own defaults: a stop hook naming
    /// no `quiet` that joined a drain with a quiet window was answered drained at the first
    /// zero, the window not met.
    fn rule_for(&self, asked: &Self) -> DrainRule {
        DrainRule {
            quiet: if asked.given.quiet {
                asked.rule.quiet
            } else {
                self.rule.quiet
            },
            ignore: if asked.given.ignore {
                asked.rule.ignore.clone()
            } else {
                self.rule.ignore.clone()
            },
            idle: if asked.given.idle {
                asked.rule.idle
            } else {
                self.rule.idle
            },
        }
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
    /// As many drains as the node allows (`--max-waiters`) are in progress.
    Full,
    /// As many drains of this owner as one owner may have ([`owner::RUNNING_PER_OWNER`],
    /// the limit named) are in progress.
    OwnerFull(owner::Owner, usize),
    /// The drain in progress of this scope has other settings (named, with its id).
    Conflict(u64, String),
    /// The drain of this scope (its id) has taken its verdict and did not end within
    /// [`registry::ENDING_WAIT`]: a request must not get that verdict, nor join it.
    Ending(u64),
}

/// What a drain came to: the answer its waiters get.
#[derive(Clone, Debug)]
pub struct Final {
    pub result: DrainEnd,
    pub outcome: crate::tracker::DrainOutcome,
    /// Connections the agent closed at the deadline (`on_timeout=close`).
    pub closed: Option<u64>,
    /// Whose verdict a drained `outcome` is: a waiter's that asked by then
    /// ([`Membership::takes`]). For a verdict of the counts, when the last read it was
    /// judged by began ([`crate::tracker::Tracker::wait_for_verdict`]); for a namespace
    /// replaced, its end (no connection of the namespace any member asked about is left).
    pub asked_by: tokio::time::Instant,
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
    /// Who started it (a POST or `/drained` waiter that joined later is not named). `None`:
    /// a record an agent wrote before records said so (its journal, its state file), which
    /// only the node and the pod of its namespace are shown. Optional and left out when
    /// `None`, so the state file keeps its version: an older agent reading a newer file
    /// ignores the field (nothing there denies unknown fields), a newer one reads an older.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<StartedBy>,
}

/// How many ended drains `/drains` keeps.
pub const HISTORY: usize = 200;

/// Drain durations' histogram buckets, seconds.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// How long a scope's ended drains stay counted by scope after its last one ended: long
/// enough for every scrape and alert to see the count rise, short enough that the scopes
/// of pods long gone leave the metrics.
pub const SCOPE_KEEP: Duration = Duration::from_secs(3600);

/// Scopes counted by scope at most: a bound however many pods come and go within
/// [`SCOPE_KEEP`]. Past it the oldest scope of the owner counting the most goes
/// ([`owner::evictee`], as for held gates): one pod ending many drains pushes out its own
/// scopes, never another pod's (whose `timeout` an alert is about to see).
pub const SCOPES_MAX: usize = 256;

/// A drain's scope as the metrics name it: its port and, with `--metrics-labels address`,
/// the address it was asked for or, for a namespace's drain (a pod listener's), the
/// namespace's own address on that port (`None`: every address, or a namespace with none
/// known, or `--metrics-labels port`; the namespace itself is nothing Prometheus can join).
pub type ScopeLabels = (u16, Option<IpAddr>);

/// The ended drains of one scope.
#[derive(Clone, Debug)]
pub struct ScopeEnds {
    pub ended: HashMap<DrainEnd, u64>,
    pub last_end: std::time::Instant,
    /// Whose drains ended here, for [`SCOPES_MAX`]: the owner of its drains' scopes, or
    /// [`Owner::Node`](owner::Owner::Node) once drains of two owners ended here (a port
    /// every pod serves, with `--metrics-labels port`): then neither can push it out by
    /// ending drains of its own.
    pub owner: owner::Owner,
}

/// Ended drains, counted for the metrics.
#[derive(Clone, Debug, Default)]
pub struct DrainStats {
    pub ended: HashMap<DrainEnd, u64>,
    /// By scope, for scopes whose last drain ended within [`SCOPE_KEEP`].
    pub by_scope: HashMap<ScopeLabels, ScopeEnds>,
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
    /// Scopes whose drain the agent's stop ended (`agent_shutdown`): out of rotation until
    /// the process exits. The drain is kept on disk and resumes at the next start; what this
    /// agent still answers until then (a `/health` on a connection open since before the
    /// stop) must not put the scope back in rotation mid-drain. Never more than the drains in
    /// progress at the stop.
    interrupted: Mutex<HashSet<Filter>>,
    /// Which namespace an address asked about belongs to (`None` in unit tests: the node).
    pods: Option<Arc<crate::sys::pod_addresses::PodAddresses>>,
    /// Whose a port's sockets are: a local user's drain acts on its scope only while they
    /// are all that user's ([`Drains::with_port_owners`]; `None`: never).
    port_owners: Option<Arc<dyn owner::PortOwners>>,
    /// What a namespace's drain checks its namespace against: still the one it started in
    /// ([`Drains::with_namespaces`]; `None`: never checked, as in unit tests on the node).
    namespaces: Option<Arc<dyn namespace::Namespaces>>,
    /// Drains in progress at most (`--max-waiters`).
    max_running: usize,
    /// Drains in progress one owner may have at most ([`owner::RUNNING_PER_OWNER`]).
    running_per_owner: usize,
    /// Gates held at most ([`HELD_MAX`]).
    held_max: usize,
    history: Mutex<VecDeque<DrainRecord>>,
    stats: Mutex<DrainStats>,
    /// Where POSTed drains and held gates are kept across restarts (`--state-dir`).
    state: Option<Arc<StateFile>>,
    /// While another agent writes the state file (an upgrade's overlap): what this one
    /// restored and cancelled, for the take-over (`saved.rs`).
    overlap: Mutex<Option<saved::Overlap>>,
    /// Held while a gone agent's `drains.next.json` is folded in: by the writer's periodic
    /// check and by a request that found the file first ([`Drains::catch_up`]), one at a time.
    folding: tokio::sync::Mutex<()>,
    /// Beside the writer: what its state file says is out of rotation, as last read
    /// ([`Drains::writers_gate`]).
    writer_view: Mutex<saved::WriterView>,
    /// The writer, beside an agent started for an upgrade: what that agent's
    /// `drains.next.json` says is out of rotation, as last read ([`Drains::beside_gate`]),
    /// and the look at it, one at a time ([`Drains::look_beside`]).
    beside_view: Mutex<saved::WriterView>,
    beside_looking: tokio::sync::Mutex<()>,
    /// Until when a state file this agent could not read (set aside) could still gate:
    /// every scope is answered "draining" until then ([`Drains::fail_closed`]).
    unreadable_until: Mutex<Option<tokio::time::Instant>>,
    /// The held gates' listener reads, shared by the questions (`listener_reads.rs`).
    listener_reads: listener_reads::ListenerReads,
    /// What the metrics export: which drains are counted by scope, and how a scope is
    /// named ([`Drains::with_metric_labels`]).
    metric_labels: MetricLabels,
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
            interrupted: Mutex::new(HashSet::new()),
            pods,
            port_owners: None,
            namespaces: None,
            max_running,
            running_per_owner: owner::RUNNING_PER_OWNER,
            held_max: HELD_MAX,
            history: Mutex::new(past.into_iter().collect()),
            stats: Mutex::new(DrainStats::default()),
            state: None,
            overlap: Mutex::new(None),
            folding: tokio::sync::Mutex::new(()),
            writer_view: Mutex::new(saved::WriterView::default()),
            beside_view: Mutex::new(saved::WriterView::default()),
            beside_looking: tokio::sync::Mutex::new(()),
            unreadable_until: Mutex::new(None),
            listener_reads: listener_reads::ListenerReads::default(),
            metric_labels: MetricLabels::default(),
        }
    }

    /// Counts ended drains by scope as the metrics export them (`--ports`,
    /// `--metrics-labels`; the metrics refuse drains counted otherwise): a drain of a port
    /// left out is not counted by scope, and with `--metrics-labels port` a scope is its
    /// port alone, every address's drains summed when they end (a counter that never goes
    /// down while it shows). Without it: every port, by address.
    #[must_use]
    pub fn with_metric_labels(mut self, labels: MetricLabels) -> Self {
        self.metric_labels = labels;
        self
    }

    /// What the drains count by scope with ([`Drains::with_metric_labels`]).
    pub fn metric_labels(&self) -> &MetricLabels {
        &self.metric_labels
    }

    /// Keeps POSTed drains and held gates in `file` from now on (see [`Drains::restore`]).
    #[must_use]
    pub fn with_state_file(mut self, file: StateFile) -> Self {
        self.state = Some(Arc::new(file));
        self
    }

    /// Reads whose a port's sockets are from `owners` (the source `http/authority.rs`
    /// checks a local user's control with): a local user's drain is checked against it
    /// while it runs and before it acts at its end. Without it, a local user's drain that
    /// does not drain ends `not_owned`: nothing closed, no gate held.
    #[must_use]
    pub fn with_port_owners(mut self, owners: Arc<dyn owner::PortOwners>) -> Self {
        self.port_owners = Some(owners);
        self
    }

    /// Checks that a namespace's drain's namespace is still the one it started in (its
    /// cookie, `namespace.rs`), at its start, when restored, while it runs and before it
    /// acts at its end: one whose namespace is replaced (a new pod given the inode: another
    /// cookie) ends drained, closing nothing and keeping none of the new namespace's listeners.
    #[must_use]
    pub fn with_namespaces(mut self, namespaces: Arc<dyn namespace::Namespaces>) -> Self {
        self.namespaces = Some(namespaces);
        self
    }

    /// Other limits than the agent's ([`owner::RUNNING_PER_OWNER`], [`HELD_MAX`]): small
    /// ones, for tests that fill them.
    #[cfg(test)]
    #[must_use]
    pub fn with_limits(mut self, running_per_owner: usize, held_max: usize) -> Self {
        self.running_per_owner = running_per_owner;
        self.held_max = held_max;
        self
    }

    /// Why this agent cannot close connections at a drain's deadline (its closer said so at
    /// the start), if it cannot: `on_timeout=close` is then refused, not accepted and
    /// recorded as a close that never happened.
    pub fn close_unavailable(&self) -> Option<&str> {
        self.closer.as_deref().and_then(Closer::unavailable)
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
        let mut stats = lock(&self.stats);
        stats.forget_old_scopes(std::time::Instant::now());
        stats.clone()
    }
}

impl Drains {
    /// The scopes of the drains in progress, as the metrics label them (those of ports the
    /// metrics leave out are not among them).
    pub fn in_progress_scopes(&self) -> Vec<ScopeLabels> {
        let (running, _) = self.list();
        let endpoints = if running.iter().any(|r| self.needs_endpoints(r)) {
            self.tracker.snapshot().unwrap_or_default()
        } else {
            Vec::new()
        };
        running
            .iter()
            .filter_map(|record| self.scope_labels(record, &endpoints))
            .collect()
    }

    /// Whether labelling `record` reads the endpoints (a namespace's drain, by address).
    fn needs_endpoints(&self, record: &DrainRecord) -> bool {
        record.addr.is_none()
            && record.netns.is_some()
            && self.metric_labels.by_address()
            && self.metric_labels.exports_port(record.port)
    }

    /// `record`'s scope as the metrics label it (`None`: its port is not exported). By
    /// address, a namespace's drain gets the lowest address (IPv4 first) its endpoints of
    /// the port have other than loopback: the pod's IP.
    fn scope_labels(
        &self,
        record: &DrainRecord,
        endpoints: &[crate::tracker::Endpoint],
    ) -> Option<ScopeLabels> {
        if !self.metric_labels.exports_port(record.port) {
            return None;
        }
        if !self.metric_labels.by_address() {
            return Some((record.port, None));
        }
        let addr = record.addr.or_else(|| {
            let netns = record.netns?;
            endpoints
                .iter()
                .filter(|e| e.netns == netns && e.port == record.port && !e.addr.is_loopback())
                .map(|e| e.addr)
                .min()
        });
        Some((record.port, addr))
    }
}

impl DrainStats {
    /// Counts a drain of `scope`, `whose`'s, that ended with `result` at `now`. A scope new
    /// here when [`SCOPES_MAX`] are counted pushes out one of the owner counting the most
    /// (its oldest; among owners counting as many, `whose`'s own): so an owner loses a scope
    /// to another only while it counts more than that other one.
    fn count_scope(
        &mut self,
        scope: ScopeLabels,
        whose: owner::Owner,
        result: DrainEnd,
        now: std::time::Instant,
    ) {
        self.forget_old_scopes(now);
        if self.by_scope.len() >= SCOPES_MAX
            && !self.by_scope.contains_key(&scope)
            && let Some(evicted) = owner::evictee(
                &self.by_scope,
                |_, ends| ends.owner,
                |ends| ends.last_end,
                whose,
            )
        {
            self.by_scope.remove(&evicted);
        }
        let ends = self.by_scope.entry(scope).or_insert_with(|| ScopeEnds {
            ended: HashMap::new(),
            last_end: now,
            owner: whose,
        });
        if ends.owner != whose {
            ends.owner = owner::Owner::Node;
        }
        *ends.ended.entry(result).or_default() += 1;
        ends.last_end = now;
    }

    /// Leaves out the scopes past [`SCOPE_KEEP`].
    fn forget_old_scopes(&mut self, now: std::time::Instant) {
        self.by_scope
            .retain(|_, ends| now.saturating_duration_since(ends.last_end) <= SCOPE_KEEP);
    }
}

#[cfg(test)]
mod tests;
