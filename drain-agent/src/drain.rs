//! A drain is a thing: started for a scope (idempotently), the load balancer told while it
//! runs (`/health` and HAProxy's agent-check read [`Drains::draining`]), its deadline
//! enforced if asked (closing what is left), and every drain put on record (`/drains`, one
//! log line, metrics, and an optional journal that survives restarts).

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
    drain_rule::{DrainRule, Peer},
    journal::Journal,
    tracker::{Filter, Tracker, WaitError},
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
}

impl DrainEnd {
    pub const ALL: [Self; 5] = [
        Self::Drained,
        Self::Timeout,
        Self::ClosedAtDeadline,
        Self::Cancelled,
        Self::AgentShutdown,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::Timeout => "timeout",
            Self::ClosedAtDeadline => "closed_at_deadline",
            Self::Cancelled => "cancelled",
            Self::AgentShutdown => "agent_shutdown",
        }
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

/// After a drain ends, its port stays out of rotation (the stop that follows is about to
/// end the service) until a new instance listens on it, until `DELETE /drain`, or at most
/// this long.
pub const GATE_HOLD: Duration = Duration::from_secs(300);

/// A port kept out of rotation after its drain.
struct Held {
    filter: Filter,
    /// The listeners when the drain ended: any other one is a new instance.
    listeners: std::collections::HashSet<u64>,
    until: tokio::time::Instant,
}

impl crate::agentcheck::PortGate for Drains {
    fn draining(&self, port: u16) -> bool {
        Drains::draining(self, port)
    }
}

/// A drain in progress.
struct Running {
    record: Mutex<DrainRecord>,
    cancel: watch::Sender<bool>,
    finished: watch::Sender<bool>,
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
    journal: Option<Journal>,
    next_id: AtomicU64,
    running: Mutex<HashMap<Filter, Arc<Running>>>,
    /// Ports whose drain ended and that stay out of rotation (see [`GATE_HOLD`]).
    held: Mutex<HashMap<u16, Held>>,
    /// Drains in progress at most (`--max-waiters`).
    max_running: usize,
    history: Mutex<VecDeque<DrainRecord>>,
    stats: Mutex<DrainStats>,
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
            journal,
            next_id: AtomicU64::new(next_id),
            running: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            max_running,
            history: Mutex::new(past.into_iter().collect()),
            stats: Mutex::new(DrainStats::default()),
        }
    }

    /// Whether `port` is out of rotation: a drain of it (any scope) is in progress, or one
    /// ended and no new instance listens yet. What `/health?port=P` and the agent-check
    /// answer: a load balancer must not send to a service that drained and is stopping.
    pub fn draining(&self, port: u16) -> bool {
        if lock(&self.running).keys().any(|filter| filter.port == port) {
            return true;
        }
        let mut held = lock(&self.held);
        let Some(hold) = held.get(&port) else {
            return false;
        };
        let reopen = tokio::time::Instant::now() >= hold.until
            || self.closer.as_ref().is_some_and(|closer| {
                closer
                    .listeners(&hold.filter)
                    .is_ok_and(|now| now.iter().any(|cookie| !hold.listeners.contains(cookie)))
            });
        if reopen {
            held.remove(&port);
            log::info!("port {port} back in rotation: a new instance listens");
        }
        !reopen
    }

    /// Puts `filter`'s port back in rotation at once (`DELETE /drain` after a drain ended).
    pub fn release(&self, filter: &Filter) -> bool {
        lock(&self.held).remove(&filter.port).is_some()
    }

    /// Whether a drain of `port` in the namespace `netns` is in progress: `/health?port=P`
    /// asked inside a pod (its own drains only).
    pub fn draining_in(&self, port: u16, netns: u32) -> bool {
        lock(&self.running)
            .keys()
            .any(|filter| filter.port == port && filter.netns == Some(netns))
    }

    /// Starts a drain of `spec.filter`, or returns the one in progress for that scope.
    /// `true` when it was started now; `None` when as many drains as allowed run already.
    pub fn start(self: &Arc<Self>, spec: DrainSpec) -> Option<(DrainRecord, bool)> {
        let mut running = lock(&self.running);
        if let Some(existing) = running.get(&spec.filter) {
            return Some((lock(&existing.record).clone(), false));
        }
        if running.len() >= self.max_running {
            return None;
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
            record: Mutex::new(record.clone()),
            cancel: watch::channel(false).0,
            finished: watch::channel(false).0,
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
        tokio::spawn(async move { registry.run(spec, drain).await });
        Some((record, true))
    }

    /// Cancels the drain of `filter`; its record, or `None` if none is in progress.
    pub async fn cancel(&self, filter: &Filter) -> Option<DrainRecord> {
        let drain = lock(&self.running).get(filter).cloned()?;
        self.release(filter);
        let mut finished = drain.finished.subscribe();
        drain.cancel.send_replace(true);
        // The drain ends at once on cancel; wait for its record.
        let _ = finished.wait_for(|done| *done).await;
        let record = lock(&drain.record).clone();
        Some(record)
    }

    /// Waits until the drain of `filter` (if one runs) has ended, at most `limit`.
    pub async fn wait_ended(&self, filter: &Filter, limit: Duration) -> Option<DrainRecord> {
        let drain = lock(&self.running).get(filter).cloned()?;
        let mut finished = drain.finished.subscribe();
        let _ = tokio::time::timeout(limit, finished.wait_for(|done| *done)).await;
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
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            outcome = self.tracker.wait_for_drain(&spec.filter, spec.timeout, &spec.rule) => Some(outcome),
            _ = cancel.wait_for(|cancelled| *cancelled) => None,
        };
        let mut closed = 0;
        let result = match outcome {
            None => DrainEnd::Cancelled,
            Some(Ok(outcome)) => {
                {
                    let mut record = lock(&drain.record);
                    record.first_zero_after_ms = outcome
                        .first_zero
                        .map(|at| u64::try_from(at.as_millis()).unwrap_or(u64::MAX));
                    record.late_arrivals = outcome.arrivals;
                    record.peers_at_end = outcome.peers.clone();
                }
                if outcome.drained {
                    DrainEnd::Drained
                } else if self.tracker.shutting_down() {
                    DrainEnd::AgentShutdown
                } else if spec.on_timeout == OnTimeout::Close {
                    closed = self.close_remaining(&spec).await;
                    DrainEnd::ClosedAtDeadline
                } else {
                    DrainEnd::Timeout
                }
            }
            Some(Err(WaitError::TooManyWaiters(_) | WaitError::Source(_))) => DrainEnd::Timeout,
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
            (Some(closer), Some(result))
                if result != DrainEnd::Cancelled && result != DrainEnd::AgentShutdown =>
            {
                let (closer, filter) = (Arc::clone(closer), spec.filter.clone());
                tokio::task::spawn_blocking(move || closer.listeners(&filter))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        };
        self.finish(&spec.filter, record, listeners);
        drain.finished.send_replace(true);
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
        if record.result != Some(DrainEnd::Cancelled)
            && record.result != Some(DrainEnd::AgentShutdown)
        {
            lock(&self.held).insert(
                filter.port,
                Held {
                    filter: filter.clone(),
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
        if let Some(journal) = &self.journal
            && let Err(problem) = journal.append(&record)
        {
            log::warn!("cannot write the drain journal: {problem:#}");
        }
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
        let drains = Arc::new(Drains::new(Arc::clone(&tracker), None, None, 4));
        (source, tracker, drains)
    }

    fn spec(timeout: Duration) -> DrainSpec {
        DrainSpec {
            filter: Filter::port(8080),
            timeout,
            rule: DrainRule::default(),
            on_timeout: OnTimeout::Keep,
            pace: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn starting_is_idempotent_and_the_gate_follows_the_drain() {
        let (source, tracker, drains) = registry(2);
        assert!(!drains.draining(8080));
        let (first, created) = drains.start(spec(Duration::from_secs(60))).expect("room");
        assert!(created);
        let (again, created) = drains.start(spec(Duration::from_secs(60))).expect("room");
        assert!(!created);
        assert_eq!(first.id, again.id);
        assert_eq!(first.active_at_start, 2);
        assert!(drains.draining(8080) && !drains.draining(8081));
        source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
        tracker.notify_port(8080);
        let record = drains
            .wait_ended(&Filter::port(8080), Duration::from_secs(5))
            .await
            .expect("record");
        assert_eq!(record.result, Some(DrainEnd::Drained));
        // Drained: the port stays out of rotation until a new instance listens (no kernel
        // here to ask) or it is released.
        assert!(drains.draining(8080));
        assert!(drains.release(&Filter::port(8080)));
        assert!(!drains.draining(8080));
        let (running, ended) = drains.list();
        assert!(running.is_empty());
        assert_eq!(ended[0].id, first.id);
        assert_eq!(drains.stats().ended.get(&DrainEnd::Drained), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_and_timeout_are_recorded() {
        let (_, _, drains) = registry(1);
        let (started, _) = drains.start(spec(Duration::from_secs(3600))).expect("room");
        let record = drains.cancel(&Filter::port(8080)).await.expect("cancelled");
        assert_eq!(
            (record.id, record.result),
            (started.id, Some(DrainEnd::Cancelled))
        );
        assert!(!drains.draining(8080));
        assert!(drains.cancel(&Filter::port(8080)).await.is_none());
        drains.start(spec(Duration::from_secs(2))).expect("room");
        let record = drains
            .wait_ended(&Filter::port(8080), Duration::from_secs(10))
            .await
            .expect("record");
        assert_eq!(record.result, Some(DrainEnd::Timeout));
        assert_eq!(record.closed_by_agent, 0);
        assert_eq!(drains.list().1.len(), 2);
    }
}
