//! The agent's view of the connections: what is open now, and waiting until none are.
//!
//! Counts are read from a [`ConnectionSource`] (the kernel maps, or a fake in tests) each
//! time they are needed, so every answer is the kernel's current truth. Waiters sleep on a
//! per-port `watch` channel that the ring-buffer reader bumps whenever an endpoint's count
//! reaches or leaves zero: a drained port is noticed at once, without polling.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, bail};
use drain_agent_common::DurationHistogram;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};

use crate::doubt::{Doubt, describe};

/// One listening endpoint (netns, local address, port) and its counts (also a row of the
/// `/connections` answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
    /// Tracked connections open now (ESTABLISHED or CLOSE_WAIT).
    pub active: u64,
    pub opened: u64,
    pub closed: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last open or close.
    #[serde(skip)]
    pub last_change_ns: u64,
}

/// Where the counts come from. The kernel maps implement it; tests use a fake.
pub trait ConnectionSource: Send + Sync + 'static {
    /// Every endpoint that has had a tracked connection.
    fn endpoints(&self) -> Result<Vec<Endpoint>>;
    /// Ok when the counts can be trusted (programs attached, maps readable).
    fn check_health(&self) -> Result<()>;
    /// Connection-duration histograms, by local port (one entry per endpoint).
    fn durations(&self) -> Result<Vec<(u16, DurationHistogram)>> {
        Ok(Vec::new())
    }
    /// What the kernel side could not track, by reason.
    fn tracking_errors(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(Vec::new())
    }
    /// State changes the kernel side missed and later found and repaired, by kind.
    fn repairs(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(Vec::new())
    }
    /// Totals of one port over every namespace and address, when the source keeps them
    /// (one lookup instead of a walk over every endpoint).
    fn port_state(&self, _port: u16) -> Result<Option<PortState>> {
        Ok(None)
    }
    /// Somebody waits on `port` (or nobody any more): the source only needs to send
    /// zero-crossing wake-ups for watched ports. Must take effect before it returns.
    fn watch_port(&self, _port: u16, _watched: bool) -> Result<()> {
        Ok(())
    }
    /// Why the counts of `filter` cannot be vouched for now (empty: they can).
    fn doubts(&self, _filter: &Filter) -> Result<Vec<Doubt>> {
        Ok(Vec::new())
    }
    /// Doubts about the agent as a whole, for `/healthz` and the logs.
    fn health_doubts(&self) -> Vec<Doubt> {
        Vec::new()
    }
    /// Connections matching `filter` open right now, counted from the kernel's socket
    /// tables rather than the maps (blocking; enters namespaces). Used only to confirm a
    /// doubted zero.
    fn confirm(&self, _filter: &Filter) -> Result<u64> {
        bail!("this source cannot confirm counts")
    }
    /// Walks of the open sockets completed so far.
    fn walks(&self) -> u64 {
        0
    }
    /// Opened and closed totals of reclaimed endpoints, by port: `(port, opened, closed)`.
    fn reclaimed_totals(&self) -> Vec<(u16, u64, u64)> {
        Vec::new()
    }
    /// The last change of endpoints of `port` that were reclaimed (CLOCK_MONOTONIC ns, 0:
    /// none): scoped quiet windows must not forget them.
    fn reclaimed_last_change(&self, _port: u16) -> u64 {
        0
    }
}

/// The counts of a port or filter at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortState {
    pub active: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last open or close (0: never).
    pub last_change_ns: u64,
}

/// Which connections a question is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub port: u16,
    /// Only this local address (a pod's IP). IPv4-mapped IPv6 is folded to IPv4.
    pub addr: Option<IpAddr>,
    /// Only this network namespace (inode).
    pub netns: Option<u32>,
}

impl Filter {
    pub const fn port(port: u16) -> Self {
        Self {
            port,
            addr: None,
            netns: None,
        }
    }

    pub fn matches(&self, endpoint: &Endpoint) -> bool {
        endpoint.port == self.port
            && self.addr.is_none_or(|addr| addr == endpoint.addr)
            && self.netns.is_none_or(|netns| netns == endpoint.netns)
    }
}

/// Folds `::ffff:a.b.c.d` to `a.b.c.d`, as the kernel side does for keys.
pub fn canonical_addr(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// The answer to "is it drained?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainOutcome {
    pub drained: bool,
    pub active: u64,
    pub waited: Duration,
    /// Set when the count could not be vouched for and the kernel's socket tables could
    /// not settle it either: why the answer is "not drained" although the count is 0.
    pub unknown: Option<String>,
}

/// What a doubted zero turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Nothing to doubt, or the socket tables confirm zero.
    Drained,
    /// The socket tables show connections the maps missed.
    Busy(u64),
    /// Neither the maps nor the socket tables can say.
    Unknown(String),
}

/// How long a doubted waiter waits before it asks the socket tables again: connections
/// the maps missed send no events when they close, so this one case looks periodically.
const CONFIRM_RETRY: Duration = Duration::from_millis(250);
const CONFIRM_RETRY_MAX: Duration = Duration::from_secs(2);

/// Why a wait could not even start.
#[derive(Debug)]
pub enum WaitError {
    /// More waiters than `--max-waiters` are blocked already.
    TooManyWaiters(usize),
    /// The counts could not be read.
    Source(anyhow::Error),
}

/// One port's wake-up channel and how many waiters listen on it.
struct PortChannel {
    sender: watch::Sender<u64>,
    waiters: usize,
}

impl PortChannel {
    /// Every waiter of the port re-reads its count.
    fn wake(&self) {
        self.sender
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }
}

/// Wakes the waiters of one port when its count may have crossed zero.
#[derive(Default)]
struct PortChannels {
    ports: Mutex<HashMap<u16, PortChannel>>,
}

impl PortChannels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, PortChannel>> {
        self.ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn notify(&self, port: u16) {
        if let Some(channel) = self.lock().get(&port) {
            channel.wake();
        }
    }

    fn notify_all(&self) {
        self.lock().values().for_each(PortChannel::wake);
    }
}

/// A waiter's subscription to its port; the last one to leave unwatches the port.
struct PortWatch<'a> {
    tracker: &'a Tracker,
    port: u16,
    changes: watch::Receiver<u64>,
}

impl Drop for PortWatch<'_> {
    fn drop(&mut self) {
        let mut ports = self.tracker.channels.lock();
        let Some(channel) = ports.get_mut(&self.port) else {
            return;
        };
        channel.waiters = channel.waiters.saturating_sub(1);
        if channel.waiters == 0 {
            ports.remove(&self.port);
            if let Err(problem) = self.tracker.source.watch_port(self.port, false) {
                log::warn!("cannot unwatch port {}: {problem:#}", self.port);
            }
        }
    }
}

/// After a waiter starts, its count is read once more this much later, whatever happens:
/// on CPUs where the kernel's atomic add is not a full barrier, a change racing with the
/// waiter's arrival might otherwise go unannounced. One look, not polling.
const ARRIVAL_RECHECK: Duration = Duration::from_millis(50);

/// Shared state behind the HTTP handlers.
pub struct Tracker {
    source: Arc<dyn ConnectionSource>,
    channels: PortChannels,
    shutdown: watch::Sender<bool>,
    waiters: AtomicUsize,
    max_waiters: usize,
}

/// Keeps the waiter count right however a wait ends (answer, timeout, client gone).
struct WaiterSlot<'a>(&'a AtomicUsize);

impl Drop for WaiterSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

impl Tracker {
    pub fn new(source: Arc<dyn ConnectionSource>, max_waiters: usize) -> Self {
        Self {
            source,
            channels: PortChannels::default(),
            shutdown: watch::channel(false).0,
            waiters: AtomicUsize::new(0),
            max_waiters,
        }
    }

    /// Every endpoint, as the kernel counts it now.
    pub fn snapshot(&self) -> Result<Vec<Endpoint>> {
        self.source.endpoints()
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

    /// Opened and closed totals of reclaimed endpoints, by port.
    pub fn reclaimed_totals(&self) -> Vec<(u16, u64, u64)> {
        self.source.reclaimed_totals()
    }

    /// Active connections matching `filter`, now.
    pub fn active(&self, filter: &Filter) -> Result<u64> {
        Ok(self.state(filter)?.active)
    }

    fn state(&self, filter: &Filter) -> Result<PortState> {
        if filter.addr.is_none()
            && filter.netns.is_none()
            && let Some(state) = self.source.port_state(filter.port)?
        {
            return Ok(state);
        }
        let mut state = PortState {
            active: 0,
            last_change_ns: 0,
        };
        for endpoint in self.source.endpoints()? {
            if filter.matches(&endpoint) {
                state.active += endpoint.active;
                state.last_change_ns = state.last_change_ns.max(endpoint.last_change_ns);
            }
        }
        // A reclaimed endpoint of this port may have been in scope: its last change counts.
        state.last_change_ns = state
            .last_change_ns
            .max(self.source.reclaimed_last_change(filter.port));
        Ok(state)
    }

    /// Subscribes to `port`'s wake-ups; the first waiter on a port asks the source to
    /// announce its zero crossings.
    fn watch(&self, port: u16) -> Result<PortWatch<'_>> {
        let mut ports = self.channels.lock();
        let channel = ports.entry(port).or_insert_with(|| PortChannel {
            sender: watch::channel(0).0,
            waiters: 0,
        });
        if channel.waiters == 0
            && let Err(problem) = self.source.watch_port(port, true)
        {
            ports.remove(&port);
            return Err(problem);
        }
        channel.waiters += 1;
        let changes = channel.sender.subscribe();
        Ok(PortWatch {
            tracker: self,
            port,
            changes,
        })
    }

    /// Called by the event reader: an endpoint on `port` crossed zero.
    pub fn notify_port(&self, port: u16) {
        self.channels.notify(port);
    }

    /// Called when events may have been lost: every waiter re-reads its count.
    pub fn notify_all(&self) {
        self.channels.notify_all();
    }

    /// Open waiters answer at once with what they have; new ones answer immediately.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waiters blocked now.
    pub fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Acquire)
    }

    /// Whether a zero count for `filter` can be trusted: without doubts, yes; with
    /// doubts, the kernel's socket tables decide.
    async fn verdict(&self, filter: &Filter) -> Verdict {
        let doubts = match self.source.doubts(filter) {
            Ok(doubts) => doubts,
            Err(problem) => return Verdict::Unknown(format!("{problem:#}")),
        };
        if doubts.is_empty() {
            return Verdict::Drained;
        }
        let source = Arc::clone(&self.source);
        let scope = filter.clone();
        let confirmed = tokio::task::spawn_blocking(move || source.confirm(&scope)).await;
        match confirmed {
            Ok(Ok(0)) => Verdict::Drained,
            Ok(Ok(open)) => Verdict::Busy(open),
            Ok(Err(problem)) => Verdict::Unknown(format!(
                "{} (and the socket tables could not be read: {problem:#})",
                describe(&doubts)
            )),
            Err(problem) => Verdict::Unknown(format!("{}: {problem}", describe(&doubts))),
        }
    }

    /// Blocks until no connection matching `filter` has been active for `settle`, or until
    /// `timeout` passes, or until the agent shuts down. `timeout` zero answers at once.
    /// Never answers drained from a count it cannot vouch for (see [`Doubt`]).
    pub async fn wait_until_drained(
        &self,
        filter: &Filter,
        timeout: Duration,
        settle: Duration,
    ) -> Result<DrainOutcome, WaitError> {
        let before = self.waiters.fetch_add(1, Ordering::AcqRel);
        let _slot = WaiterSlot(&self.waiters);
        if before >= self.max_waiters {
            return Err(WaitError::TooManyWaiters(self.max_waiters));
        }
        let started = Instant::now();
        let deadline = started + timeout;
        // Watch before the first read: a change after the read is then announced.
        let mut port_watch = self.watch(filter.port).map_err(WaitError::Source)?;
        let mut shutdown = self.shutdown.subscribe();
        let settle_ns = u64::try_from(settle.as_nanos()).unwrap_or(u64::MAX);
        let mut recheck_at = Some(started + ARRIVAL_RECHECK);
        let mut confirm_retry = CONFIRM_RETRY;
        loop {
            // Mark the current generation seen *before* reading, so a change that lands
            // between the read and the sleep still wakes us.
            port_watch.changes.borrow_and_update();
            let mut state = self.state(filter).map_err(WaitError::Source)?;
            let zero_for_ns = monotonic_ns().saturating_sub(state.last_change_ns);
            let quiet = state.active == 0 && zero_for_ns >= settle_ns;
            let mut unknown = None;
            let mut doubted = false;
            let drained = if quiet {
                match self.verdict(filter).await {
                    Verdict::Drained => true,
                    Verdict::Busy(open) => {
                        state.active = open;
                        doubted = true;
                        false
                    }
                    Verdict::Unknown(why) => {
                        unknown = Some(why);
                        doubted = true;
                        false
                    }
                }
            } else {
                false
            };
            let now = Instant::now();
            if drained || now >= deadline || *shutdown.borrow_and_update() {
                return Ok(DrainOutcome {
                    drained,
                    active: state.active,
                    waited: now - started,
                    unknown,
                });
            }
            // At zero but not settled yet: look again when the settle time is up.
            let mut wake_at = if state.active == 0 && !doubted {
                deadline.min(now + Duration::from_nanos(settle_ns - zero_for_ns))
            } else {
                deadline
            };
            if doubted {
                wake_at = wake_at.min(now + confirm_retry);
                confirm_retry = (confirm_retry * 2).min(CONFIRM_RETRY_MAX);
            }
            match recheck_at {
                Some(at) if at <= now => recheck_at = None,
                Some(at) => wake_at = wake_at.min(at),
                None => {}
            }
            tokio::select! {
                changed = port_watch.changes.changed() => {
                    if changed.is_err() {
                        // The channel never closes while the tracker lives; be safe anyway.
                        tokio::time::sleep_until(wake_at).await;
                    }
                }
                _ = shutdown.changed() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// Doubts about the agent as a whole (for `/healthz`).
    pub fn health_doubts(&self) -> Vec<Doubt> {
        self.source.health_doubts()
    }
}

#[cfg(test)]
pub mod fake {
    //! A connection source the tests set by hand.
    use super::*;

    pub struct FakeSource {
        pub endpoints: Mutex<Vec<Endpoint>>,
        pub broken: std::sync::atomic::AtomicBool,
        /// Ports the tracker asked to watch, as it left them.
        pub watched: Mutex<std::collections::BTreeSet<u16>>,
        /// What `doubts` says for every filter.
        pub doubts: Mutex<Vec<Doubt>>,
        /// What `confirm` answers (an error text, or the count).
        pub confirmed: Mutex<Result<u64, String>>,
        /// How often `confirm` was asked.
        pub confirmations: std::sync::atomic::AtomicUsize,
    }

    impl Default for FakeSource {
        fn default() -> Self {
            Self {
                endpoints: Mutex::default(),
                broken: std::sync::atomic::AtomicBool::default(),
                watched: Mutex::default(),
                doubts: Mutex::default(),
                confirmed: Mutex::new(Err("no socket tables in the fake".into())),
                confirmations: std::sync::atomic::AtomicUsize::default(),
            }
        }
    }

    impl FakeSource {
        pub fn set(&self, endpoints: Vec<Endpoint>) {
            *self.endpoints.lock().expect("lock") = endpoints;
        }
    }

    impl ConnectionSource for FakeSource {
        fn doubts(&self, _filter: &Filter) -> Result<Vec<Doubt>> {
            Ok(self.doubts.lock().expect("lock").clone())
        }

        fn confirm(&self, _filter: &Filter) -> Result<u64> {
            self.confirmations.fetch_add(1, Ordering::Relaxed);
            self.confirmed
                .lock()
                .expect("lock")
                .clone()
                .map_err(anyhow::Error::msg)
        }

        fn endpoints(&self) -> Result<Vec<Endpoint>> {
            if self.broken.load(Ordering::Relaxed) {
                anyhow::bail!("fake source is broken");
            }
            Ok(self.endpoints.lock().expect("lock").clone())
        }

        fn check_health(&self) -> Result<()> {
            if self.broken.load(Ordering::Relaxed) {
                anyhow::bail!("fake source is broken");
            }
            Ok(())
        }

        fn watch_port(&self, port: u16, watched: bool) -> Result<()> {
            let mut ports = self.watched.lock().expect("lock");
            let changed = if watched {
                ports.insert(port)
            } else {
                ports.remove(&port)
            };
            assert!(changed, "port {port} watched={watched} twice in a row");
            Ok(())
        }
    }

    pub fn endpoint(addr: &str, port: u16, active: u64) -> Endpoint {
        Endpoint {
            netns: 4_026_531_840,
            addr: addr.parse().expect("addr"),
            port,
            active,
            opened: active,
            closed: 0,
            last_change_ns: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::*, *};

    fn tracker(endpoints: Vec<Endpoint>) -> (Arc<FakeSource>, Arc<Tracker>) {
        let source = Arc::new(FakeSource::default());
        source.set(endpoints);
        let tracker = Arc::new(Tracker::new(source.clone(), 16));
        (source, tracker)
    }

    type WaitResult = Result<DrainOutcome, String>;

    /// A waiter on `port` with a one-hour timeout, running in the background.
    fn spawn_hour_long_waiter(
        tracker: &Arc<Tracker>,
        port: u16,
    ) -> tokio::task::JoinHandle<WaitResult> {
        let tracker = Arc::clone(tracker);
        tokio::spawn(async move {
            tracker
                .wait_until_drained(
                    &Filter::port(port),
                    Duration::from_secs(3600),
                    Duration::ZERO,
                )
                .await
                .map_err(|e| format!("{e:?}"))
        })
    }

    #[test]
    fn filters_by_port_address_and_namespace() {
        let (_, tracker) = tracker(vec![
            endpoint("10.0.0.1", 8080, 2),
            endpoint("10.0.0.2", 8080, 3),
            Endpoint {
                netns: 7,
                ..endpoint("10.0.0.2", 8080, 4)
            },
            endpoint("10.0.0.1", 9090, 5),
        ]);
        assert_eq!(tracker.active(&Filter::port(8080)).expect("count"), 9);
        let by_addr = Filter {
            addr: Some("10.0.0.2".parse().expect("ip")),
            ..Filter::port(8080)
        };
        assert_eq!(tracker.active(&by_addr).expect("count"), 7);
        let by_netns = Filter {
            netns: Some(7),
            ..Filter::port(8080)
        };
        assert_eq!(tracker.active(&by_netns).expect("count"), 4);
        assert_eq!(tracker.active(&Filter::port(1)).expect("count"), 0);
    }

    #[test]
    fn mapped_addresses_fold_to_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(
            canonical_addr(mapped),
            "10.1.2.3".parse::<IpAddr>().expect("ip")
        );
        let v6: IpAddr = "fd00::3".parse().expect("ip");
        assert_eq!(canonical_addr(v6), v6);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_zero_answers_at_once() {
        let (_, tracker) = tracker(vec![endpoint("127.0.0.1", 80, 3)]);
        let outcome = tracker
            .wait_until_drained(&Filter::port(80), Duration::ZERO, Duration::ZERO)
            .await
            .map_err(|e| format!("{e:?}"))
            .expect("outcome");
        assert_eq!(
            outcome,
            DrainOutcome {
                drained: false,
                active: 3,
                waited: Duration::ZERO,
                unknown: None,
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_on_the_port_event_not_on_a_timer() {
        let (source, tracker) = tracker(vec![endpoint("127.0.0.1", 80, 1)]);
        let waiter = spawn_hour_long_waiter(&tracker, 80);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiter.is_finished());
        // The count drops, but nobody says so: the waiter keeps sleeping (no polling).
        source.set(vec![endpoint("127.0.0.1", 80, 0)]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiter.is_finished());
        // An event on another port does not concern it either... but its port's does.
        tracker.notify_port(81);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tracker.notify_port(80);
        let outcome = waiter.await.expect("join").expect("outcome");
        assert!(outcome.drained);
        assert_eq!(outcome.active, 0);
        assert_eq!(outcome.waited, Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_waiter_looks_once_more_for_a_change_that_raced_its_arrival() {
        let (source, tracker) = tracker(vec![endpoint("127.0.0.1", 80, 1)]);
        let waiter = spawn_hour_long_waiter(&tracker, 80);
        tokio::time::sleep(Duration::from_millis(1)).await;
        // The close raced the waiter's arrival: no wake-up comes for it.
        source.set(vec![endpoint("127.0.0.1", 80, 0)]);
        let outcome = waiter.await.expect("join").expect("outcome");
        assert!(outcome.drained);
        assert_eq!(outcome.waited, ARRIVAL_RECHECK);
    }

    #[tokio::test(start_paused = true)]
    async fn ports_are_watched_exactly_while_somebody_waits() {
        let (source, tracker) = tracker(vec![endpoint("127.0.0.1", 80, 1)]);
        let first = spawn_hour_long_waiter(&tracker, 80);
        let second = spawn_hour_long_waiter(&tracker, 80);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*source.watched.lock().expect("lock"), [80].into());
        first.abort();
        let _ = first.await;
        assert_eq!(
            *source.watched.lock().expect("lock"),
            [80].into(),
            "one waiter left"
        );
        source.set(vec![endpoint("127.0.0.1", 80, 0)]);
        tracker.notify_port(80);
        assert!(second.await.expect("join").expect("outcome").drained);
        assert!(
            source.watched.lock().expect("lock").is_empty(),
            "nobody waits"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_answers_not_drained() {
        let (_, tracker) = tracker(vec![endpoint("127.0.0.1", 80, 2)]);
        let outcome = tracker
            .wait_until_drained(&Filter::port(80), Duration::from_secs(5), Duration::ZERO)
            .await
            .map_err(|e| format!("{e:?}"))
            .expect("outcome");
        assert!(!outcome.drained);
        assert_eq!(outcome.active, 2);
        assert_eq!(outcome.waited, Duration::from_secs(5));
    }

    // Real time: `settle` is measured against the kernel's clock (CLOCK_MONOTONIC).
    #[tokio::test]
    async fn settle_needs_the_count_to_stay_zero() {
        let settle = Duration::from_millis(300);
        let (source, tracker) = tracker(vec![Endpoint {
            last_change_ns: monotonic_ns(),
            ..endpoint("127.0.0.1", 80, 0)
        }]);
        let started = Instant::now();
        let waiter = {
            let tracker = tracker.clone();
            tokio::spawn(async move {
                tracker
                    .wait_until_drained(&Filter::port(80), Duration::from_secs(30), settle)
                    .await
                    .map_err(|e| format!("{e:?}"))
            })
        };
        // Half-way through, a connection comes and goes: the settle time starts again.
        tokio::time::sleep(settle / 2).await;
        source.set(vec![Endpoint {
            last_change_ns: monotonic_ns(),
            ..endpoint("127.0.0.1", 80, 0)
        }]);
        tracker.notify_port(80);
        let outcome = waiter.await.expect("join").expect("outcome");
        assert!(outcome.drained);
        assert!(
            started.elapsed() >= settle + settle / 2,
            "{:?}",
            started.elapsed()
        );

        // Long at zero already: answers at once, even with timeout 0.
        source.set(vec![endpoint("127.0.0.1", 80, 0)]);
        let outcome = tracker
            .wait_until_drained(&Filter::port(80), Duration::ZERO, settle)
            .await
            .map_err(|e| format!("{e:?}"))
            .expect("outcome");
        assert!(outcome.drained);
    }

    #[tokio::test(start_paused = true)]
    async fn a_doubted_zero_is_never_drained_unless_the_socket_tables_confirm_it() {
        let (source, tracker) = tracker(vec![endpoint("127.0.0.1", 80, 0)]);
        *source.doubts.lock().expect("lock") = vec![Doubt::ConnectionsLost { port: 80 }];
        // The socket tables cannot be read: 503 with the reason, at the timeout.
        let outcome = tracker
            .wait_until_drained(&Filter::port(80), Duration::from_secs(3), Duration::ZERO)
            .await
            .map_err(|e| format!("{e:?}"))
            .expect("outcome");
        assert!(!outcome.drained);
        assert!(outcome.waited >= Duration::from_secs(3));
        let why = outcome.unknown.expect("a reason");
        assert!(
            why.contains("port 80") && why.contains("socket tables"),
            "{why}"
        );
        // They show two connections the maps missed: not drained, and the count says so.
        *source.confirmed.lock().expect("lock") = Ok(2);
        let outcome = tracker
            .wait_until_drained(&Filter::port(80), Duration::ZERO, Duration::ZERO)
            .await
            .map_err(|e| format!("{e:?}"))
            .expect("outcome");
        assert_eq!((outcome.drained, outcome.active), (false, 2));
        // A waiter looks again by itself (those connections send no events) and answers
        // once the tables show zero.
        let waiter = spawn_hour_long_waiter(&tracker, 80);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished());
        *source.confirmed.lock().expect("lock") = Ok(0);
        let outcome = waiter.await.expect("join").expect("outcome");
        assert!(outcome.drained);
        assert!(outcome.waited <= Duration::from_secs(5) + CONFIRM_RETRY_MAX);
        // Without doubts the tables are not asked at all.
        source.doubts.lock().expect("lock").clear();
        let asked = source.confirmations.load(Ordering::Relaxed);
        let outcome = tracker
            .wait_until_drained(&Filter::port(80), Duration::ZERO, Duration::ZERO)
            .await
            .map_err(|e| format!("{e:?}"))
            .expect("outcome");
        assert!(outcome.drained);
        assert_eq!(source.confirmations.load(Ordering::Relaxed), asked);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_answers_open_waiters() {
        let (_, tracker) = tracker(vec![endpoint("127.0.0.1", 80, 1)]);
        let waiter = spawn_hour_long_waiter(&tracker, 80);
        tokio::task::yield_now().await;
        tracker.begin_shutdown();
        let outcome = waiter.await.expect("join").expect("outcome");
        assert!(!outcome.drained);
        assert_eq!(outcome.active, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_limited_and_released() {
        let source = Arc::new(FakeSource::default());
        source.set(vec![endpoint("127.0.0.1", 80, 1)]);
        let tracker = Arc::new(Tracker::new(source, 1));
        let first = {
            let tracker = tracker.clone();
            tokio::spawn(async move {
                let _ = tracker
                    .wait_until_drained(&Filter::port(80), Duration::from_secs(10), Duration::ZERO)
                    .await;
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(tracker.waiters(), 1);
        let second = tracker
            .wait_until_drained(&Filter::port(80), Duration::from_secs(10), Duration::ZERO)
            .await;
        assert!(matches!(second, Err(WaitError::TooManyWaiters(1))));
        first.abort();
        let _ = first.await;
        assert_eq!(tracker.waiters(), 0);
    }
}
