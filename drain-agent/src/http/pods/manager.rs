//! The pod listener manager: one rescan closes the listeners of namespaces that are gone
//! and opens them in new ones ([`Manager::reconcile`]), and each listener is served until
//! its namespace is gone or the agent stops.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Result;
use axum::{Extension, Router, middleware::from_fn_with_state};
use log::{debug, info, warn};
use prometheus::IntGaugeVec;
use tokio::{sync::watch, task::JoinSet, time::Instant};

use super::{
    OwnEndpoints, PodListenOptions, SteeredPort,
    callers::{NodeCallers, pod_or_node_root_only},
    open::{Bind, bind_in, open_steered},
    recount::{CountChecks, Steered, Verified},
};
use crate::{
    http::handover::{StopPhase, reached},
    http::pod_scope::PodScope,
    http::server,
    http::{AppState, router},
    kernel::steer::SteerLink,
    sys::netns,
    tasks::TaskWatch,
};

/// How long a steered listener keeps accepting after its steering was detached at the
/// agent's stop: a connection steered at its SYN just before completes its handshake onto
/// this socket (within a round trip: loopback or the pod's veth).
const STEER_SETTLE: Duration = Duration::from_millis(250);

/// At the agent's stop, how long a steered listener keeps its steering in a namespace where
/// no other agent's program is attached yet, waiting for one (never past the grace): an
/// upgrade's next agent is ready once it serves the pods there at its start
/// ([`FirstRound`]), but a pod made since is opened by each agent on its own, within a
/// rescan (1 s; a few ms for a named namespace, inotify). Polled every
/// [`SUCCESSOR_POLL`]. Where no agent comes (an uninstall) the stop takes this much longer.
pub(super) const SUCCESSOR_WAIT: Duration = Duration::from_secs(2);
const SUCCESSOR_POLL: Duration = Duration::from_millis(20);

/// A namespace failing this long to get a listener (a socket, `setns`, the steering: EMFILE,
/// ENOMEM…) is said at WARN; before, only at debug (loopback may not be up yet in a
/// namespace just made, and a retry a second later serves it).
const FAILING_WARN_AFTER: Duration = Duration::from_secs(60);
/// At most one such WARN this often, for all namespaces together (and the stopped
/// steering's, [`Manager::report`]).
const FAILING_WARN_EVERY: Duration = Duration::from_secs(600);

/// The longest the agent's readiness waits, from its first complete scan, for a namespace
/// of that scan to be served or classified for good (skipped, its socket port taken, an
/// older agent's, a user's): one that keeps failing to get a listener (EMFILE, ENOMEM,
/// loopback not up, the steering) is retried on every rescan meanwhile, and after this
/// the agent is ready without it (WARN; `state="failing"`). Long enough for a passing
/// shortage or a sandbox being made; short enough that a namespace failing for good
/// delays an upgrade on its node by this much only.
pub(super) const FIRST_ROUND_WAIT: Duration = Duration::from_secs(30);

/// The first round of listeners, which the agent's readiness waits for
/// ([`crate::http::ready`]).
#[derive(Debug)]
pub(super) enum FirstRound {
    /// No scan has looked everywhere yet (an incomplete one opens nothing).
    Unscanned,
    /// The namespaces the first complete scan chose to listen in that are neither served
    /// nor classified yet, and when that scan was.
    Opening {
        since: Instant,
        namespaces: BTreeSet<u32>,
    },
    /// Every one was served or classified, or [`FIRST_ROUND_WAIT`] passed: the agent is
    /// ready.
    Done,
}

/// A listener being served.
pub(super) struct Listening {
    pub(super) stop: watch::Sender<bool>,
    /// On a socket of its own, the in-pod port steered to it (not bound).
    pub(super) steered: bool,
    /// Steered: what the checks of the namespace's listener count need (`recount.rs`).
    pub(super) count_check: Option<Steered>,
}

/// Why a namespace has no listener yet, and since when.
pub(super) struct Failing {
    problem: String,
    since: Instant,
}

/// A state of `drain_agent_pod_listeners` (its `state` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ListenerState {
    Listening,
    Steered,
    Skipped,
    SocketPortTaken,
    Waiting,
    Failing,
    UserOwned,
    OverLimit,
    /// Listening, steered, but the steering stopped for good ([`Manager::check_steering`]):
    /// counted here instead of [`ListenerState::Steered`].
    Stopped,
}

impl ListenerState {
    pub(super) const ALL: [Self; 9] = [
        Self::Listening,
        Self::Steered,
        Self::Skipped,
        Self::SocketPortTaken,
        Self::Waiting,
        Self::Failing,
        Self::UserOwned,
        Self::OverLimit,
        Self::Stopped,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Listening => "listening",
            Self::Steered => "steered",
            Self::Skipped => "skipped",
            Self::SocketPortTaken => "socket_port_taken",
            Self::Waiting => "waiting",
            Self::Failing => "failing",
            Self::UserOwned => "user_owned",
            Self::OverLimit => "over_limit",
            Self::Stopped => "stopped",
        }
    }
}

pub(super) struct Manager {
    /// The in-pod port is steered to a socket of the agent's (`sk_lookup`), not bound.
    pub(super) steer: bool,
    pub(super) options: PodListenOptions,
    pub(super) state: Arc<AppState>,
    pub(super) endpoints: Arc<dyn OwnEndpoints>,
    /// Who is answered from beyond the pod (bound beyond loopback): root of the node.
    pub(super) node: NodeCallers,
    pub(super) own_netns: u32,
    pub(super) listening: BTreeMap<u32, Listening>,
    /// Namespaces where an application holds the address (binding fallback only): left
    /// alone for their lifetime.
    pub(super) skipped: BTreeSet<u32>,
    /// Namespaces where an application holds the agent's socket port (`--pod-socket-port`;
    /// steered only): not served, and left alone for their lifetime (a retry could take the
    /// port while the application restarts).
    pub(super) socket_port_taken: BTreeSet<u32>,
    /// Namespaces where an agent of an older version holds it without sharing it (binding
    /// fallback only): retried on every rescan, logged once.
    pub(super) waiting: BTreeSet<u32>,
    /// Namespaces where binding failed otherwise (e.g. loopback not up yet): retried on
    /// every rescan, the problem logged once (at debug: at WARN once the namespace has
    /// failed for [`FAILING_WARN_AFTER`], see [`Manager::report`]), counted
    /// `state="failing"`.
    pub(super) failing: BTreeMap<u32, Failing>,
    /// When [`Manager::report`] last said at WARN that namespaces keep failing; `None`
    /// while none has failed for [`FAILING_WARN_AFTER`].
    pub(super) failing_told: Option<Instant>,
    /// Namespaces no pod's ([`netns::UserOwner::may_be_a_pod`]): a user's user namespace
    /// owns them, or one root made and they are not pinned under /run/netns (a root
    /// container's own). Never served, and not looked at again for their lifetime, but
    /// once their inode is pinned there (a runtime makes a `hostUsers: false` pod's
    /// namespace, then pins it: a rescan between the two found it unpinned).
    ///
    /// This set, `skipped` and `socket_port_taken` know a namespace by its inode alone,
    /// forgotten when a rescan finds it gone: a pod sandbox the kernel gives that inode
    /// (it hands the lowest free one out again) before then is taken for it and gets no
    /// listener (SECURITY.md), but in this set, where a pin of the inode has it looked at
    /// again (CRI runtimes pin every pod's). A served namespace's inode is not reused
    /// meanwhile: the listening socket holds the namespace. Once the listener is closed it
    /// may be, before that listener's forget ran (it waits for the kernel's lock): the
    /// forget undoes that listener's registration only ([`OwnEndpoints::forget`]).
    pub(super) user_owned: BTreeMap<u32, netns::UserOwner>,
    /// Namespaces left without a listener at the last rescan: `--pod-max-listeners` are
    /// served already.
    pub(super) over_limit: usize,
    pub(super) tasks: JoinSet<()>,
    pub(super) stop: watch::Receiver<StopPhase>,
    /// Where the namespaces to listen in are found: [`candidates`] (a test's own in tests).
    pub(super) scan: Scan,
    /// The last scan could not look everywhere (logged once when it begins, once when it
    /// ends).
    pub(super) scan_failing: bool,
    /// When [`Manager::report`] last said at WARN that the steering stopped; `None` while it
    /// runs (`state.pod_steering`, [`Manager::check_steering`]).
    pub(super) stopped_told: Option<Instant>,
    /// What the agent's readiness still waits for (`state.ready`).
    pub(super) first_round: FirstRound,
    /// The checks of the steered namespaces' listener counts (`recount.rs`).
    pub(super) count_checks: CountChecks,
}

/// Finds the namespaces to listen in: the agent's own inode and `--pod-listen-prefix`
/// given; an error when the scan could not look everywhere ([`netns::IncompleteScan`]).
pub(super) type Scan = fn(u32, Option<&str>) -> Result<BTreeMap<u32, PathBuf>>;

impl Manager {
    /// The pass over the steered namespaces' listener counts (`recount.rs`): after every
    /// rescan, at most every `recount::CHECK_EVERY`.
    pub(super) async fn check_counts(&mut self) {
        if !self.steer || self.state.pod_steering.stopped() || self.count_checks.recent() {
            return;
        }
        let steered: Vec<(u32, &mut Steered)> = self
            .listening
            .iter_mut()
            .filter_map(|(inode, listening)| Some((*inode, listening.count_check.as_mut()?)))
            .collect();
        self.count_checks
            .pass(&self.endpoints, self.options.addr.port(), steered)
            .await;
    }

    /// A manager with nothing opened yet, scanning with `candidates`.
    pub(super) fn new(
        steer: bool,
        options: PodListenOptions,
        state: Arc<AppState>,
        endpoints: Arc<dyn OwnEndpoints>,
        node: NodeCallers,
        own_netns: u32,
        stop: watch::Receiver<StopPhase>,
    ) -> Self {
        Self {
            steer,
            options,
            state,
            endpoints,
            node,
            own_netns,
            listening: BTreeMap::new(),
            skipped: BTreeSet::new(),
            socket_port_taken: BTreeSet::new(),
            waiting: BTreeSet::new(),
            failing: BTreeMap::new(),
            failing_told: None,
            user_owned: BTreeMap::new(),
            over_limit: 0,
            tasks: JoinSet::new(),
            stop,
            scan: candidates,
            scan_failing: false,
            stopped_told: None,
            first_round: FirstRound::Unscanned,
            count_checks: CountChecks::default(),
        }
    }

    /// Whether the steering stopped for good: asked of the kernel side after every rescan
    /// until it has, then kept in `state.pod_steering` (`/healthz` on every listener says
    /// so) and counted `state="stopped"` by [`Manager::report`].
    pub(super) async fn check_steering(&mut self) {
        if !self.steer || self.steering_stopped() {
            return;
        }
        // The kernel's lock may be held by a walk: not on the runtime's threads.
        let endpoints = Arc::clone(&self.endpoints);
        let stopped = tokio::task::spawn_blocking(move || endpoints.steering_stopped())
            .await
            .unwrap_or(false);
        if stopped {
            self.state.pod_steering.stop();
        }
    }

    fn steering_stopped(&self) -> bool {
        self.steer && self.state.pod_steering.stopped()
    }

    /// One rescan: close listeners of namespaces that are gone, open them in new ones. A
    /// scan that could not look everywhere (out of descriptors it finds no namespace at
    /// all) changes nothing: every listener stays open (closing them would drop the
    /// `preStop` waiters they serve), and none is opened until a scan is complete.
    pub(super) async fn reconcile(&mut self) {
        let prefix = self.options.name_prefix.clone();
        let own = self.own_netns;
        let scan = self.scan;
        let scanned = tokio::task::spawn_blocking(move || {
            let addresses = crate::sys::ifaddrs::local_addresses();
            let present = scan(own, prefix.as_deref());
            // After the scan, before any namespace is opened: `user_owner` checks a pin
            // again once it holds the namespace. Unread, nothing counts as pinned (no
            // listener in a namespace of root's user namespaces until it is read).
            let pins = netns::Pins::read().unwrap_or_else(|problem| {
                debug!("cannot read the pinned network namespaces: {problem:#}");
                netns::Pins::default()
            });
            (present, pins, addresses)
        })
        .await;
        let (present, pins, addresses) = match scanned {
            Ok(scanned) => scanned,
            Err(problem) => {
                warn!("namespace scan failed: {problem}");
                return;
            }
        };
        match addresses {
            Ok(addresses) => self.node.addresses.set(addresses),
            Err(problem) => debug!("cannot read the node's addresses: {problem:#}"),
        }
        let present = match present {
            Ok(present) => {
                if std::mem::take(&mut self.scan_failing) {
                    info!("the namespace scan looks everywhere again: pod listeners follow it");
                }
                present
            }
            Err(problem) => {
                if !std::mem::replace(&mut self.scan_failing, true) {
                    warn!(
                        "{problem:#}: the {} pod listener(s) stay open and no new one opens until a scan looks everywhere",
                        self.listening.len()
                    );
                }
                return;
            }
        };
        let gone: Vec<u32> = self
            .listening
            .keys()
            .filter(|inode| !present.contains_key(inode))
            .copied()
            .collect();
        for inode in gone {
            if let Some(listening) = self.listening.remove(&inode) {
                info!("network namespace {inode} is gone: closing its listener");
                let _ = listening.stop.send(true);
            }
        }
        self.skipped.retain(|inode| present.contains_key(inode));
        self.socket_port_taken
            .retain(|inode| present.contains_key(inode));
        self.waiting.retain(|inode| present.contains_key(inode));
        self.failing.retain(|inode, _| present.contains_key(inode));
        // One pinned now is looked at again: a `hostUsers: false` pod's, found before its
        // runtime pinned it, or a pod sandbox on the inode of one that went meanwhile.
        self.user_owned
            .retain(|inode, _| present.contains_key(inode) && !pins.contains(*inode));
        if let FirstRound::Opening { namespaces, .. } = &mut self.first_round {
            namespaces.retain(|inode| present.contains_key(inode));
        }
        let new: Vec<(u32, PathBuf)> = present
            .into_iter()
            .filter(|(inode, _)| {
                !self.listening.contains_key(inode)
                    && !self.skipped.contains(inode)
                    && !self.socket_port_taken.contains(inode)
                    && !self.user_owned.contains_key(inode)
            })
            .collect();
        // Two ioctls each, only for namespaces not served yet: off the runtime's threads.
        let owned = tokio::task::spawn_blocking(move || {
            new.into_iter()
                .map(|(inode, path)| {
                    let owner = netns::user_owner_of(inode, &path, &pins);
                    (inode, path, owner)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let owned = match owned {
            Ok(owned) => owned,
            Err(problem) => {
                warn!("reading the owners of new namespaces failed: {problem}");
                return;
            }
        };
        let max = self.options.max_listeners;
        let chosen = choose(owned, max.saturating_sub(self.listening.len()));
        for (inode, owner) in chosen.user_owned {
            debug!(
                "network namespace {inode}: no pod's ({owner:?}: a user's user namespace owns it, or one root made and it is not pinned under /run/netns); not listening there"
            );
            self.user_owned.insert(inode, owner);
        }
        if chosen.over_limit > 0 && self.over_limit == 0 {
            warn!(
                "{max} pod listeners are open or opening (--pod-max-listeners): {} more network namespaces get none while it stays so (drain_agent_pod_listeners{{state=\"over_limit\"}}); their hooks find no agent there",
                chosen.over_limit
            );
        } else if chosen.over_limit == 0 && self.over_limit > 0 {
            info!(
                "within --pod-max-listeners ({max}) again: no namespace is left out for want of room"
            );
        }
        self.over_limit = chosen.over_limit;
        if matches!(self.first_round, FirstRound::Unscanned) {
            self.first_round = FirstRound::Opening {
                since: Instant::now(),
                namespaces: chosen.open.iter().map(|(inode, _)| *inode).collect(),
            };
        }
        self.open_all(chosen.open).await;
    }

    /// Marks the agent ready (`state.ready`) once every namespace of the first round is
    /// served or classified for good, or [`FIRST_ROUND_WAIT`] has passed since its scan.
    /// Those still failing then are retried on every rescan as any other, and counted
    /// `state="failing"`; those waiting for an older agent (the binding fallback) count as
    /// classified, since that agent stops only once this one is ready.
    pub(super) fn check_first_round(&mut self) {
        let FirstRound::Opening { since, namespaces } = &mut self.first_round else {
            return;
        };
        namespaces.retain(|inode| {
            !self.listening.contains_key(inode)
                && !self.skipped.contains(inode)
                && !self.socket_port_taken.contains(inode)
                && !self.waiting.contains(inode)
                && !self.user_owned.contains_key(inode)
        });
        if namespaces.is_empty() {
            info!(
                "the pod listeners of the network namespaces found at the start are open: ready (/healthz?ready=true)"
            );
        } else if since.elapsed() >= FIRST_ROUND_WAIT {
            warn!(
                "{} network namespace(s) found at the start still have no pod listener after {FIRST_ROUND_WAIT:?} (drain_agent_pod_listeners{{state=\"failing\"}}; retrying on every rescan): ready without them, and once an agent beside this one stops their hooks find no agent there",
                namespaces.len()
            );
        } else {
            return;
        }
        self.first_round = FirstRound::Done;
        self.state.ready.set_ready();
    }

    /// Opens listeners in `new` namespaces, [`OPEN_AT_ONCE`] at a time: each takes a thread
    /// that enters the namespace and, steered, a program load under the kernel's lock; one
    /// after the other, 300 pods after a restart took over a second to be served.
    async fn open_all(&mut self, new: Vec<(u32, PathBuf)>) {
        let mut waiting = new.into_iter();
        let mut opening = JoinSet::new();
        loop {
            while opening.len() < OPEN_AT_ONCE {
                let Some((inode, path)) = waiting.next() else {
                    break;
                };
                let (steer, addr, socket_port, endpoints, handover) = (
                    self.steer,
                    self.options.addr,
                    self.options.socket_port,
                    Arc::clone(&self.endpoints),
                    Arc::clone(&self.options.handover),
                );
                opening.spawn_blocking(move || {
                    let opened = if steer {
                        open_steered(
                            &path,
                            inode,
                            addr,
                            socket_port,
                            endpoints.as_ref(),
                            &handover,
                        )
                        .map(|(listener, steered)| (listener, Some(steered)))
                    } else {
                        bind_in(&path, inode, addr, &handover).map(|listener| (listener, None))
                    };
                    (inode, path, opened)
                });
            }
            let Some(done) = opening.join_next().await else {
                return;
            };
            match done {
                Ok((inode, path, opened)) => self.opened(inode, &path, opened),
                Err(problem) => warn!("a pod listener's socket thread failed: {problem}"),
            }
        }
    }

    /// Serves what [`Manager::open_all`] opened, or notes why it could not (logged once,
    /// retried on the next rescan; a taken port in the binding fallback skips the namespace).
    fn opened(
        &mut self,
        inode: u32,
        path: &Path,
        opened: Result<(std::net::TcpListener, Option<SteeredPort>), Bind>,
    ) {
        let addr = self.options.addr;
        // In `failing` only while the last try failed that way (one served, skipped or
        // waited for is counted there, not as failing too).
        let failed_before = self.failing.remove(&inode);
        let (problem, steering) = match opened {
            Ok((listener, steered)) => {
                if self.waiting.remove(&inode) {
                    info!(
                        "network namespace {inode}: {addr} is free of the older agent now; listening"
                    );
                }
                self.serve(inode, path, listener, steered);
                return;
            }
            Err(Bind::AgentThere) => {
                if self.waiting.insert(inode) {
                    info!(
                        "network namespace {inode} ({}): an agent of an older version holds {addr} there without sharing it; retrying on every rescan until it stops",
                        path.display()
                    );
                }
                return;
            }
            Err(Bind::InUse) => {
                self.waiting.remove(&inode);
                info!(
                    "network namespace {inode} ({}): {addr} is in use there already; skipping it (no listener in that pod)",
                    path.display()
                );
                self.skipped.insert(inode);
                return;
            }
            Err(Bind::SocketPortTaken(local)) => {
                warn!(
                    "network namespace {inode} ({}): the agent's socket port is taken there ({local} in use: an application on --pod-socket-port {}?); the in-pod port {} is not steered in that pod, and its hooks find no agent there (their connections are refused, or reach the application on {}); choose a --pod-socket-port its pods do not use",
                    path.display(),
                    local.port(),
                    addr.port(),
                    addr.port()
                );
                self.socket_port_taken.insert(inode);
                return;
            }
            Err(Bind::Failed(problem)) => (problem, false),
            Err(Bind::Steer(problem)) => (problem, true),
        };
        let text = format!("{problem:#}");
        let since = match failed_before {
            Some(failing) if failing.problem == text => {
                self.failing.insert(inode, failing);
                return;
            }
            Some(failing) => failing.since,
            None => Instant::now(),
        };
        if steering {
            warn!(
                "network namespace {inode}: cannot steer the in-pod port {} there yet: {text} (retrying)",
                addr.port()
            );
        } else if self.steer {
            // Loopback may not be up yet in a namespace just made: retried quietly.
            debug!(
                "network namespace {inode}: cannot make the agent's socket there yet: {text} (retrying)"
            );
        } else {
            debug!("network namespace {inode}: cannot listen on {addr} yet: {text} (retrying)");
        }
        self.failing.insert(
            inode,
            Failing {
                problem: text,
                since,
            },
        );
    }

    /// How many namespaces are in `state` now.
    pub(super) fn count(&self, state: ListenerState) -> usize {
        match state {
            ListenerState::Listening => self.listening.len(),
            ListenerState::Steered if self.steering_stopped() => 0,
            ListenerState::Steered => self.steered(),
            ListenerState::Stopped if self.steering_stopped() => self.steered(),
            ListenerState::Stopped => 0,
            ListenerState::Skipped => self.skipped.len(),
            ListenerState::SocketPortTaken => self.socket_port_taken.len(),
            ListenerState::Waiting => self.waiting.len(),
            ListenerState::Failing => self.failing.len(),
            ListenerState::UserOwned => self.user_owned.len(),
            ListenerState::OverLimit => self.over_limit,
        }
    }

    /// Listeners served through the steering (stopped or not).
    fn steered(&self) -> usize {
        self.listening.values().filter(|l| l.steered).count()
    }

    /// Sets `gauge` (`drain_agent_pod_listeners`) to the namespaces in each state, and says
    /// at WARN, at most every [`FAILING_WARN_EVERY`], that the steering stopped, and when
    /// namespaces have been failing to get a listener for [`FAILING_WARN_AFTER`]: their
    /// pods' hooks find no agent.
    pub(super) fn report(&mut self, gauge: &IntGaugeVec) {
        for state in ListenerState::ALL {
            gauge
                .with_label_values(&[state.label()])
                .set(i64::try_from(self.count(state)).unwrap_or(i64::MAX));
        }
        if self.steering_stopped()
            && self
                .stopped_told
                .is_none_or(|told| told.elapsed() >= FAILING_WARN_EVERY)
        {
            warn!(
                "the in-pod port {} is steered to the agent in no pod: a count of the applications' listeners on it failed (drain_agent_tracking_errors_total{{reason=\"pod_listen_count_failed\"}}), so the kernel side steers nowhere for good rather than take a connection from an application; the hooks of {} pod(s) to it are refused (drain_agent_pod_listeners{{state=\"stopped\"}}, /healthz degraded). Restart the agent beside a new one (a rollout restart: the next agent steers with kernel state of its own)",
                self.options.addr.port(),
                self.count(ListenerState::Stopped)
            );
            self.stopped_told = Some(Instant::now());
        }
        let mut long = self
            .failing
            .iter()
            .filter(|(_, failing)| failing.since.elapsed() >= FAILING_WARN_AFTER);
        let Some((inode, first)) = long.next() else {
            if self.failing_told.take().is_some() {
                info!(
                    "no network namespace has failed to get a pod listener for {FAILING_WARN_AFTER:?} any more"
                );
            }
            return;
        };
        if self
            .failing_told
            .is_some_and(|told| told.elapsed() < FAILING_WARN_EVERY)
        {
            return;
        }
        warn!(
            "{} network namespace(s) have had no pod listener for over {FAILING_WARN_AFTER:?} (drain_agent_pod_listeners{{state=\"failing\"}}; retrying on every rescan), their hooks finding no agent there: namespace {inode}: {}",
            long.count() + 1,
            first.problem
        );
        self.failing_told = Some(Instant::now());
    }

    /// Waits until every listener has stopped (at the agent's stop they hand over and shut
    /// down on their own, each bounded, `serve`).
    pub(super) async fn stopped(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Serves the routes on `listener` until the namespace is gone or the agent stops
    /// (`steered`: its in-pod port steered to it, else bound).
    fn serve(
        &mut self,
        inode: u32,
        path: &Path,
        listener: std::net::TcpListener,
        steered: Option<SteeredPort>,
    ) {
        let addr = self.options.addr;
        let (link, steered_own) = match steered {
            Some(SteeredPort { link, own }) => (Some(link), Some(own)),
            None => (None, None),
        };
        let steered = link.is_some();
        // The seeder counted the namespace's listeners before the steering began: right as
        // of the skips the last check read, or earlier (`recount.rs`).
        let count_check = link.as_ref().map(|link| Steered {
            namespace: link.namespace(),
            verified: Verified {
                skips: self.count_checks.skips_read.unwrap_or(0),
            },
        });
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(problem) => {
                warn!("network namespace {inode}: cannot register the listener: {problem}");
                return;
            }
        };
        let endpoints = Arc::clone(&self.endpoints);
        // Bound: after the bind (a pod that holds the port keeps its connections counted);
        // a connection in between is counted and un-counted like any other. Steered: done
        // by `steer` before the program is attached.
        let own = match steered_own {
            Some(own) => own,
            None => match endpoints.ignore(inode, addr) {
                Ok(own) => own,
                Err(problem) => {
                    warn!(
                        "network namespace {inode}: cannot leave the agent's own connections there uncounted ({problem:#}); not listening"
                    );
                    return;
                }
            },
        };
        let app = pod_router(
            Arc::clone(&self.state),
            inode,
            (!addr.ip().is_loopback()).then(|| self.node.clone()),
            &self.options.tasks,
        );
        let (stop_listener, stopped) = watch::channel(false);
        let agent_stop = self.stop.clone();
        let phase = self.stop.clone();
        let limits = self.options.limits;
        let metrics = Arc::clone(&self.state.metrics);
        if steered {
            info!(
                "serving {addr} inside network namespace {inode} ({}) through sk_lookup (the port stays free for the pod)",
                path.display()
            );
        } else {
            info!(
                "listening on {addr} inside network namespace {inode} ({})",
                path.display()
            );
        }
        self.tasks.spawn(async move {
            // The link lives in this future, which `serve` drops before it returns: detached
            // before the socket is forgotten.
            let stop_accepting = {
                let mut stopped = stopped.clone();
                let agent_stop = agent_stop.clone();
                async move {
                    let agent_stopping = tokio::select! {
                        _ = stopped.wait_for(|stop| *stop) => false,
                        () = reached(agent_stop.clone(), StopPhase::HandingOver) => true,
                    };
                    if let Some(link) = link {
                        if agent_stopping {
                            // Not before the next agent serves here, if it comes soon.
                            tokio::select! {
                                () = successor_serves(&link, inode) => {}
                                () = reached(agent_stop, StopPhase::AnsweringRest) => {}
                            }
                        }
                        // The agent stops: the steering goes first (another agent's program
                        // serves the port from now on, kernel/steer.rs), then what was steered
                        // here before is accepted, then the socket closes.
                        drop(link);
                        if agent_stopping {
                            tokio::time::sleep(STEER_SETTLE).await;
                        }
                    }
                }
            };
            let grace_over = async move {
                let mut stopped = stopped;
                tokio::select! {
                    _ = stopped.wait_for(|stop| *stop) => {}
                    () = reached(agent_stop, StopPhase::AnsweringRest) => {}
                }
            };
            if let Err(problem) = server::serve_handing_over(
                listener,
                app,
                Ok,
                limits,
                metrics,
                stop_accepting,
                grace_over,
            )
            .await
            {
                warn!("network namespace {inode}: the listener failed: {problem:#}");
            }
            // The listener is closed (dropped by serve): the namespace is no longer held, and
            // its inode may be another's before this runs, served already: `forget` undoes
            // this listener's registration only.
            let forgotten = tokio::task::spawn_blocking(move || endpoints.forget(own));
            if agent_stopping(&phase) {
                // Not waited for: `forget` takes the kernel's lock, which a walk of the
                // sockets holds for its whole run (minutes with 100k connections), and the
                // agent's stop waits for that lock at most `EXIT_WAIT`, and for the blocking
                // pool as long again (`agent/mod.rs`). Undone, it is what a crash leaves:
                // these marks die with an unpinned agent's maps, and an adopting agent clears
                // a dead agent's (`Kernel::clear_dead_agents_marks`).
                debug!("network namespace {inode}: listener closed at the agent's stop");
                return;
            }
            if !matches!(forgotten.await, Ok(Ok(()))) {
                debug!("network namespace {inode}: own endpoint not forgotten");
            }
            debug!("network namespace {inode}: listener closed");
        });
        self.listening.insert(
            inode,
            Listening {
                stop: stop_listener,
                steered,
                count_check,
            },
        );
    }
}

/// Returns once another agent's `sk_lookup` program is attached beside `link` in namespace
/// `inode` (it serves the in-pod port there: the last attached wins), or after
/// [`SUCCESSOR_WAIT`], or at once when the kernel cannot say. Detaching before, a hook there
/// found no listener: refused, and the kubelet never retries an `httpGet` hook.
async fn successor_serves(link: &SteerLink, inode: u32) {
    let waited = tokio::time::timeout(SUCCESSOR_WAIT, async {
        loop {
            match link.others_attached() {
                Ok(true) => return,
                Ok(false) => tokio::time::sleep(SUCCESSOR_POLL).await,
                Err(problem) => {
                    debug!("network namespace {inode}: {problem:#}; detaching the steering");
                    return;
                }
            }
        }
    })
    .await;
    if waited.is_err() {
        info!(
            "network namespace {inode}: no other agent serves the in-pod port there after {SUCCESSOR_WAIT:?}; detaching the steering (its hooks find no agent until one does)"
        );
    }
}

/// Whether the agent is stopping: [`StopPhase::HandingOver`] reached, or the phases' sender
/// gone (the node's server failed), as [`reached`] takes it.
fn agent_stopping(phase: &watch::Receiver<StopPhase>) -> bool {
    *phase.borrow() >= StopPhase::HandingOver || phase.has_changed().is_err()
}

/// The routes of the listener in network namespace `netns`: the node's, confined to the
/// namespace ([`PodScope`]), `/healthz` failing once one of the agent's watched `tasks`
/// ended (as on the node listener: a pod's probe must not call an agent healthy whose
/// event reader is gone), and, for a listener bound beyond loopback (`node` given),
/// answered to the pod itself and root of the node only.
fn pod_router(
    state: Arc<AppState>,
    netns: u32,
    node: Option<NodeCallers>,
    tasks: &TaskWatch,
) -> Router {
    let app = tasks.guard_healthz(router(state).layer(Extension(PodScope { netns })));
    match node {
        Some(node) => app.layer(from_fn_with_state(node, pod_or_node_root_only)),
        None => app,
    }
}

/// At most this many pod listeners are being opened at once (threads inside namespaces).
const OPEN_AT_ONCE: usize = 8;

/// Which of the namespaces found new (each with its owner, or why it could not be read) a
/// rescan opens listeners in.
#[derive(Debug, Default, PartialEq, Eq)]
struct Chosen {
    /// Those to open: at most `room` of the namespaces that may be pods'.
    open: Vec<(u32, PathBuf)>,
    /// No pod's ([`netns::UserOwner::may_be_a_pod`]): a user's user namespace owns it, or a
    /// root container made it.
    user_owned: Vec<(u32, netns::UserOwner)>,
    /// May be pods', left out for want of room (`--pod-max-listeners`).
    over_limit: usize,
}

/// Chooses, among the namespaces found new, those to listen in: none that may not be a
/// pod's (a user's user namespace owns it, or a root container made it: any local user, and
/// any pod running as root, makes them; each listener would cost the agent descriptors, a
/// program and a server, and count as a pod of its own in the shared limits), and at most
/// `room` (in inode order). One whose owner cannot be read (gone
/// meanwhile) is left for the next rescan.
fn choose(found: Vec<(u32, PathBuf, Result<netns::UserOwner>)>, room: usize) -> Chosen {
    let mut chosen = Chosen::default();
    for (inode, path, owner) in found {
        match owner {
            Ok(owner) if !owner.may_be_a_pod() => chosen.user_owned.push((inode, owner)),
            Ok(_) if chosen.open.len() < room => chosen.open.push((inode, path)),
            Ok(_) => chosen.over_limit += 1,
            Err(problem) => debug!("network namespace {inode}: {problem:#} (retrying)"),
        }
    }
    chosen
}

/// The namespaces to listen in: every one but the agent's own, or with a name prefix only
/// named ones whose name starts with it. An error when the scan could not look everywhere
/// ([`netns::IncompleteScan`]): what it did not find may still be there.
pub(super) fn candidates(own: u32, prefix: Option<&str>) -> Result<BTreeMap<u32, PathBuf>> {
    let Some(prefix) = prefix else {
        let mut found = netns::all_namespaces()?;
        found.remove(&own);
        return Ok(found);
    };
    let mut named = BTreeMap::new();
    for (name, path) in netns::named_namespace_files()? {
        if !name.starts_with(prefix) {
            continue;
        }
        if let Some(inode) = netns::scanned_inode(&path)?
            && inode != own
        {
            named.insert(inode, path);
        }
    }
    Ok(named)
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use axum::{body::Body, extract::ConnectInfo, http::Request, http::StatusCode};
    use tower::ServiceExt as _;

    use super::*;
    use crate::{
        http::{
            identify::SocketTables, pods::callers::NodeAddresses, server::LocalAddr, tests::app,
        },
        kernel::OwnEndpoint,
    };

    /// Audit: every namespace found got a listener, those any local user makes
    /// (`unshare -Urn`, owned by the user's user namespace) among them, and without bound:
    /// the user's are left out (the rule `pod_addresses.rs` uses), the rest capped at the
    /// room left, and one whose owner cannot be read is left for the next rescan. A later
    /// audit: those a root container makes (`unshare -Urn` as root: a user namespace root
    /// made, the network namespace not pinned under /run/netns) were served; they are left
    /// out too, and a pinned one (a `hostUsers: false` pod's) is served.
    #[test]
    fn listens_in_no_namespace_a_user_owns_and_at_most_the_room_left() {
        use netns::UserOwner::{Initial, RootPinned, RootUnpinned, User};
        let found = |owners: &[(u32, Option<netns::UserOwner>)]| {
            owners
                .iter()
                .map(|&(inode, owner)| {
                    (
                        inode,
                        PathBuf::from(format!("/proc/{inode}/ns/net")),
                        owner.ok_or_else(|| anyhow::anyhow!("gone")),
                    )
                })
                .collect::<Vec<_>>()
        };
        let owners = [
            (1, Some(Initial)),
            (2, Some(User(1_000))),
            (3, Some(RootPinned)),
            (4, None),
            (5, Some(User(65_534))),
            (6, Some(RootUnpinned)),
        ];
        let chosen = choose(found(&owners), 10);
        assert_eq!(
            chosen,
            Chosen {
                open: vec![
                    (1, PathBuf::from("/proc/1/ns/net")),
                    (3, PathBuf::from("/proc/3/ns/net")),
                ],
                user_owned: vec![(2, User(1_000)), (5, User(65_534)), (6, RootUnpinned)],
                over_limit: 0,
            }
        );
        let chosen = choose(found(&owners), 1);
        assert_eq!(chosen.open, vec![(1, PathBuf::from("/proc/1/ns/net"))]);
        assert_eq!(chosen.over_limit, 1);
        assert_eq!(chosen.user_owned.len(), 3);
        assert_eq!(choose(found(&owners), 0).over_limit, 2);
    }

    /// The kernel side, faked: `forget` waits for `lock`, as the real one waits for the
    /// kernel's lock while a walk of the sockets holds it (minutes with 100k connections),
    /// then undoes its registration as the real one does, only if it is the latest of its
    /// namespace and port (recording whether it was, in `forgotten`);
    /// the steering stopped for good where `stopped` (counting how often that was asked);
    /// the handler skipped `skips` runs, and an application listener is counted where
    /// `counted` (counting the reads); the namespaces counted again are recorded.
    #[derive(Default)]
    struct FakeKernel {
        lock: Arc<std::sync::Mutex<()>>,
        stopped: bool,
        asked: std::sync::atomic::AtomicUsize,
        skips: std::sync::atomic::AtomicU64,
        counted: std::sync::atomic::AtomicBool,
        read: std::sync::atomic::AtomicU64,
        recounted: std::sync::Mutex<Vec<u32>>,
        registrations: std::sync::Mutex<crate::kernel::OwnRegistrations>,
        forgotten: std::sync::Mutex<Vec<bool>>,
    }

    impl FakeKernel {
        /// Whether each forget since the last call undid its registration (the latest of its
        /// namespace and port), in order.
        fn forgotten(&self) -> Vec<bool> {
            std::mem::take(
                &mut *self
                    .forgotten
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
        }
    }

    impl OwnEndpoints for FakeKernel {
        fn ignore(&self, netns: u32, addr: SocketAddr) -> Result<OwnEndpoint> {
            Ok(self
                .registrations
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .register(netns, addr.port()))
        }

        fn forget(&self, own: OwnEndpoint) -> Result<()> {
            drop(self.lock.lock());
            let undone = self
                .registrations
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .release(&own);
            self.forgotten
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(undone);
            Ok(())
        }

        fn steering_problem(&self) -> Option<String> {
            None
        }

        fn steering_stopped(&self) -> bool {
            self.asked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.stopped
        }

        fn steer(
            &self,
            _: SocketAddr,
            _: u32,
            _: &std::fs::File,
            _: std::os::fd::BorrowedFd<'_>,
        ) -> Result<SteeredPort> {
            anyhow::bail!("a fake")
        }

        fn handler_skips(&self) -> Result<Option<u64>> {
            Ok(Some(self.skips.load(std::sync::atomic::Ordering::SeqCst)))
        }

        fn pod_listeners_counted(&self, _: u32) -> Result<bool> {
            self.read.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(self.counted.load(std::sync::atomic::Ordering::SeqCst))
        }

        fn recount_pod_listeners(&self, netns: u32, _: &std::fs::File) -> Result<()> {
            self.recounted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(netns);
            Ok(())
        }
    }

    /// A scan out of descriptors.
    fn incomplete(_: u32, _: Option<&str>) -> Result<BTreeMap<u32, PathBuf>> {
        Err(anyhow::Error::new(netns::IncompleteScan))
    }

    /// A complete scan that finds no namespace.
    fn none_left(_: u32, _: Option<&str>) -> Result<BTreeMap<u32, PathBuf>> {
        Ok(BTreeMap::new())
    }

    /// A manager as `serve_in_pods` makes it, with `endpoints` for the kernel side.
    fn manager(endpoints: Arc<dyn OwnEndpoints>, stop: watch::Receiver<StopPhase>) -> Manager {
        let (_, state) = app(Vec::new());
        let options = PodListenOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 9_100)),
            name_prefix: None,
            limits: server::ServerLimits::default(),
            bind_only: true,
            socket_port: super::super::DEFAULT_SOCKET_PORT,
            max_listeners: 8,
            handover: Arc::new(crate::http::handover::Handover::new()),
            tasks: TaskWatch::default(),
        };
        let node = NodeCallers {
            addresses: NodeAddresses::default(),
            sockets: Arc::new(SocketTables),
        };
        Manager::new(false, options, state, endpoints, node, 1, stop)
    }

    /// Found by an audit: out of descriptors (EMFILE) the namespace scan found no
    /// namespace and said nothing, so the manager took every pod's namespace for gone and
    /// closed every listener ("is gone: closing its listener"), dropping the `preStop`
    /// waiters they served. An incomplete scan keeps every listener; a complete one that no
    /// longer finds a namespace closes its listener.
    #[tokio::test]
    async fn an_incomplete_scan_closes_no_listener() {
        let (_phases, stop) = watch::channel(StopPhase::Serving);
        let mut manager = manager(Arc::new(FakeKernel::default()), stop);
        manager.steer = true;
        manager.scan = incomplete;
        let pod = 4_026_532_000;
        let (stop_listener, stopped) = watch::channel(false);
        manager.listening.insert(
            pod,
            Listening {
                stop: stop_listener,
                steered: true,
                count_check: None,
            },
        );
        manager.reconcile().await;
        assert!(
            manager.listening.contains_key(&pod) && !*stopped.borrow(),
            "an incomplete scan closed a pod's listener"
        );
        manager.scan = none_left;
        manager.reconcile().await;
        assert!(manager.listening.is_empty() && *stopped.borrow());
    }

    /// Audit (a stop waited on a walk): each pod listener, once closed, forgets its own
    /// endpoint under the kernel's lock, and `serve_in_pods` waited for every listener task
    /// before the agent's stop went on, so a walk holding the lock (minutes at 100k
    /// connections) held the stop beyond every bound `agent::longest_stop` counts (the
    /// supervisor's SIGKILL). Here the "walk" holds the lock for 30 s: the listeners stop
    /// within the stop's own bounds; the forget is left to the exit's bounded wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_agents_stop_does_not_wait_for_a_walk_to_forget_a_pod_listener() {
        let lock = Arc::new(std::sync::Mutex::new(()));
        let (phase, phases) = watch::channel(StopPhase::Serving);
        let mut manager = manager(
            Arc::new(FakeKernel {
                lock: Arc::clone(&lock),
                ..FakeKernel::default()
            }),
            phases,
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        manager.serve(4_026_532_001, Path::new("/run/netns/pod"), listener, None);
        // The walk: a thread holding the kernel's lock for 30 s, or until told to end.
        let (locked, is_locked) = std::sync::mpsc::channel();
        let (end_walk, walk_ends) = std::sync::mpsc::channel::<()>();
        let walk = std::thread::spawn(move || {
            let _held = lock.lock();
            let _ = locked.send(());
            let _ = walk_ends.recv_timeout(Duration::from_secs(30));
        });
        is_locked.recv().expect("the walk holds the kernel's lock");
        phase.send(StopPhase::HandingOver).expect("SIGTERM");
        phase
            .send(StopPhase::AnsweringRest)
            .expect("the grace ends");
        let stopped = tokio::time::timeout(Duration::from_secs(10), manager.stopped()).await;
        drop(end_walk);
        walk.join().expect("the walk");
        assert!(
            stopped.is_ok(),
            "the pod listeners' stop waited for the walk holding the kernel's lock"
        );
    }

    /// Found by an audit: a closed pod listener's forget of its own endpoint waits for the
    /// kernel's lock, which a walk holds for minutes; by the time it ran, the namespace was
    /// gone and the kernel had given its inode to a new pod's namespace, served already, and
    /// the forget undid the new pod's registration (its own connections counted as the
    /// application's: a drain that never ends; its steering gone). The late forget undoes
    /// nothing now (tests/pod_port.rs shows it against the real kernel side); the new
    /// listener's own forget still undoes its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_forget_leaves_the_next_listener_on_its_inode_registered() {
        let lock = Arc::new(std::sync::Mutex::new(()));
        let kernel = Arc::new(FakeKernel {
            lock: Arc::clone(&lock),
            ..FakeKernel::default()
        });
        let (_phase, phases) = watch::channel(StopPhase::Serving);
        let mut manager = manager(Arc::clone(&kernel) as Arc<dyn OwnEndpoints>, phases);
        manager.scan = none_left;
        let pod = 4_026_532_001;
        let path = Path::new("/run/netns/pod");
        let listener = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("non-blocking");
            listener
        };
        let closed = async |manager: &mut Manager| {
            tokio::time::timeout(Duration::from_secs(10), manager.tasks.join_next())
                .await
                .expect("a listener's task ends")
                .expect("a listener's task")
                .expect("it did not panic");
        };
        // The walk: a thread holding the kernel's lock until told to end.
        let (locked, is_locked) = std::sync::mpsc::channel();
        let (end_walk, walk_ends) = std::sync::mpsc::channel::<()>();
        let walk = std::thread::spawn(move || {
            let _held = lock.lock();
            let _ = locked.send(());
            let _ = walk_ends.recv_timeout(Duration::from_secs(30));
        });
        is_locked.recv().expect("the walk holds the kernel's lock");
        manager.serve(pod, path, listener(), None);
        // The namespace is gone: its listener closes, its forget waits for the walk.
        manager.reconcile().await;
        assert!(manager.listening.is_empty());
        // A new pod's namespace on that inode, served meanwhile.
        manager.serve(pod, path, listener(), None);
        drop(end_walk);
        walk.join().expect("the walk");
        closed(&mut manager).await;
        assert_eq!(
            kernel.forgotten(),
            vec![false],
            "the old listener's late forget undid the new pod's registration"
        );
        // The new pod's namespace goes in turn: its listener's forget undoes its own.
        manager.reconcile().await;
        closed(&mut manager).await;
        assert_eq!(kernel.forgotten(), vec![true]);
    }

    /// Audit (silent lost hook): a namespace whose listener kept failing to open (EMFILE,
    /// ENOMEM, a setns error) was logged at debug and counted nowhere:
    /// `drain_agent_pod_listeners` had no state for it, so a pod without an agent was
    /// invisible. It is `state="failing"` now (an alert watches it), and gone from it once
    /// served.
    #[tokio::test]
    async fn a_namespace_failing_to_get_a_listener_is_counted() {
        let (_phase, phases) = watch::channel(StopPhase::Serving);
        let mut manager = manager(Arc::new(FakeKernel::default()), phases);
        let gauge = IntGaugeVec::new(
            prometheus::Opts::new("drain_agent_pod_listeners", "test"),
            &["state"],
        )
        .expect("gauge");
        let failing = |gauge: &IntGaugeVec| gauge.with_label_values(&["failing"]).get();
        let path = Path::new("/run/netns/pod");
        manager.opened(
            4_026_532_001,
            path,
            Err(Bind::Failed(anyhow::anyhow!(
                "cannot listen on 127.0.0.1:9100: Too many open files (os error 24)"
            ))),
        );
        manager.report(&gauge);
        assert_eq!(failing(&gauge), 1);
        assert_eq!(gauge.with_label_values(&["listening"]).get(), 0);
        // Another problem the next time: still one namespace.
        manager.opened(
            4_026_532_001,
            path,
            Err(Bind::Failed(anyhow::anyhow!(
                "cannot enter the namespace: Cannot allocate memory (os error 12)"
            ))),
        );
        manager.report(&gauge);
        assert_eq!(failing(&gauge), 1);
        // Another one failed once, then an application held the address: skipped, not
        // failing too.
        manager.opened(
            4_026_532_002,
            path,
            Err(Bind::Failed(anyhow::anyhow!("loopback not up"))),
        );
        manager.report(&gauge);
        assert_eq!(failing(&gauge), 2);
        manager.opened(4_026_532_002, path, Err(Bind::InUse));
        manager.report(&gauge);
        assert_eq!(failing(&gauge), 1);
        assert_eq!(gauge.with_label_values(&["skipped"]).get(), 1);
        // Served at last.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        manager.opened(4_026_532_001, path, Ok((listener, None)));
        manager.report(&gauge);
        assert_eq!(failing(&gauge), 0);
        assert_eq!(gauge.with_label_values(&["listening"]).get(), 1);
    }

    /// Audit (ready before serving in the pods): the agent was ready while its first round
    /// of pod listeners was still being opened. It is ready once every namespace of its
    /// first complete scan is served or classified for good (skipped, waiting for an older
    /// agent); an incomplete scan makes no round; one that keeps failing holds readiness for
    /// [`FIRST_ROUND_WAIT`] at most.
    #[tokio::test(start_paused = true)]
    async fn ready_once_the_first_round_is_served_or_classified() {
        let (_phase, phases) = watch::channel(StopPhase::Serving);
        let mut manager = manager(Arc::new(FakeKernel::default()), phases);
        // The manager's state, waiting for the first round.
        let waiting = |manager: &mut Manager| {
            let ready = crate::http::ready::Readiness::after_first_round();
            manager.state = Arc::new(AppState {
                ready: ready.clone(),
                ..(*manager.state).clone()
            });
            ready
        };
        let ready = waiting(&mut manager);
        manager.scan = incomplete;
        manager.reconcile().await;
        manager.check_first_round();
        tokio::time::advance(FIRST_ROUND_WAIT * 2).await;
        manager.check_first_round();
        assert!(!ready.is_ready(), "ready without a complete scan");
        // The first complete scan chose four namespaces.
        manager.first_round = FirstRound::Opening {
            since: Instant::now(),
            namespaces: BTreeSet::from([1, 2, 3, 4]),
        };
        let path = Path::new("/run/netns/pod");
        let listener = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("non-blocking");
            listener
        };
        manager.opened(1, path, Ok((listener(), None)));
        manager.opened(2, path, Err(Bind::InUse));
        manager.opened(3, path, Err(Bind::AgentThere));
        manager.opened(
            4,
            path,
            Err(Bind::Failed(anyhow::anyhow!("loopback not up"))),
        );
        manager.check_first_round();
        assert!(!ready.is_ready(), "ready while a namespace still fails");
        tokio::time::advance(Duration::from_secs(5)).await;
        manager.opened(4, path, Ok((listener(), None)));
        manager.check_first_round();
        assert!(ready.is_ready(), "every namespace served or classified");
        // One that keeps failing holds readiness for FIRST_ROUND_WAIT, not longer.
        let ready = waiting(&mut manager);
        manager.first_round = FirstRound::Opening {
            since: Instant::now(),
            namespaces: BTreeSet::from([5]),
        };
        manager.opened(5, path, Err(Bind::Failed(anyhow::anyhow!("EMFILE"))));
        tokio::time::advance(FIRST_ROUND_WAIT - Duration::from_millis(1)).await;
        manager.check_first_round();
        assert!(!ready.is_ready());
        tokio::time::advance(Duration::from_millis(1)).await;
        manager.check_first_round();
        assert!(
            ready.is_ready(),
            "a failing namespace held readiness past the bound"
        );
        assert!(matches!(manager.first_round, FirstRound::Done));
    }

    /// `GET /healthz` on `app` from the pod itself (loopback at both ends): the status.
    async fn healthz(app: Router) -> StatusCode {
        healthz_body(app).await.0
    }

    /// `GET /healthz` on `app` from the pod itself (loopback): the status and JSON body.
    async fn healthz_body(app: Router) -> (StatusCode, serde_json::Value) {
        let mut request = Request::get("/healthz")
            .body(Body::empty())
            .expect("request");
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40_000))));
        request
            .extensions_mut()
            .insert(LocalAddr(SocketAddr::from(([127, 0, 0, 1], 9100))));
        let response = app.oneshot(request).await.expect("response");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).expect("JSON"))
    }

    /// Audit (a silent stop): once the kernel side stopped steering for good, every pod's
    /// hook to the in-pod port was refused, and the agent said so in one WARN only:
    /// `/healthz` stayed `ok` and `drain_agent_pod_listeners{state="steered"}` counted the
    /// listeners as steered. Now `/healthz` (node and pods) says `degraded` naming it, and
    /// the listeners are counted `stopped`, for as long as it lasts.
    #[tokio::test]
    async fn a_stopped_steering_is_reported_while_it_lasts() {
        let (_phase, phases) = watch::channel(StopPhase::Serving);
        let kernel = Arc::new(FakeKernel {
            stopped: true,
            ..FakeKernel::default()
        });
        let mut manager = manager(Arc::clone(&kernel) as Arc<dyn OwnEndpoints>, phases);
        let gauge = IntGaugeVec::new(
            prometheus::Opts::new("drain_agent_pod_listeners", "test"),
            &["state"],
        )
        .expect("gauge");
        let count = |state: &str| gauge.with_label_values(&[state]).get();
        let routers = |manager: &Manager| {
            [
                router(Arc::clone(&manager.state)),
                pod_router(
                    Arc::clone(&manager.state),
                    4_026_532_001,
                    None,
                    &manager.options.tasks,
                ),
            ]
        };
        // The binding fallback steers nothing: nothing to ask, nothing stopped.
        manager.check_steering().await;
        assert_eq!(kernel.asked.load(std::sync::atomic::Ordering::Relaxed), 0);
        manager.steer = true;
        let (stop_listener, _stopped) = watch::channel(false);
        manager.listening.insert(
            4_026_532_001,
            Listening {
                stop: stop_listener,
                steered: true,
                count_check: None,
            },
        );
        manager.report(&gauge);
        assert_eq!((count("steered"), count("stopped")), (1, 0));
        for app in routers(&manager) {
            assert_eq!(healthz_body(app).await.1["status"], "ok");
        }
        // A rescan finds it stopped.
        manager.check_steering().await;
        for _ in 0..3 {
            manager.report(&gauge);
            assert_eq!(
                (count("listening"), count("steered"), count("stopped")),
                (1, 0, 1)
            );
            assert_eq!(count("failing"), 0, "open, not failing");
            for app in routers(&manager) {
                let (status, body) = healthz_body(app).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                assert_eq!(body["status"], "degraded", "{body}");
                assert_eq!(
                    body["reasons"],
                    serde_json::json!([super::super::SteeringStop::REASON]),
                    "{body}"
                );
            }
            // For good: not asked again.
            manager.check_steering().await;
        }
        assert_eq!(kernel.asked.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    /// Audit: `/healthz` on a pod listener is "as on the node" (README), but only the
    /// node's router was guarded by the agent's watched tasks: once the event reader ended,
    /// the node's `/healthz` answered 503 and every pod's still 200.
    #[tokio::test]
    async fn healthz_fails_on_a_pod_listener_once_a_watched_task_ended() {
        let (_, state) = app(Vec::new());
        let tasks = TaskWatch::default();
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        tasks.watch(
            "event reader",
            tokio::spawn(async move {
                let _ = ended.await;
            }),
        );
        let node = NodeCallers {
            addresses: NodeAddresses::default(),
            sockets: Arc::new(SocketTables),
        };
        // On loopback, and bound beyond it.
        let routers = || {
            [None, Some(node.clone())]
                .map(|node| pod_router(Arc::clone(&state), 4_026_532_000, node, &tasks))
        };
        for app in routers() {
            assert_eq!(healthz(app).await, StatusCode::OK);
        }
        end.send(()).expect("end the task");
        tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.ended().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the task's end is noticed");
        for app in routers() {
            assert_eq!(healthz(app).await, StatusCode::SERVICE_UNAVAILABLE);
        }
    }

    /// Found by an audit: a `listen()` whose handler run the kernel skipped left its
    /// namespace's count at 0, and the agent kept taking the application's connections on
    /// the in-pod port until a walk. A skip counted since the namespace was verified sends
    /// the manager's check to the namespace's socket tables, and a listener there is counted
    /// again; no skip, no listener, or a count that is not 0 leave the count alone. (Here the
    /// "namespace" is the test's own, and the in-pod port one the test listens on.)
    #[tokio::test]
    async fn a_skipped_run_has_the_listener_it_missed_counted_again() {
        use std::sync::atomic::Ordering::SeqCst;
        let test = "a_skipped_run_has_the_listener_it_missed_counted_again";
        if let Err(problem) = crate::sys::sockdiag::check_readable() {
            crate::test_skip::skip(test, &format!("{problem:#}"));
            return;
        }
        let app = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let (_phases, stop) = watch::channel(StopPhase::Serving);
        let kernel = Arc::new(FakeKernel::default());
        let mut manager = manager(Arc::clone(&kernel) as Arc<dyn OwnEndpoints>, stop);
        manager.steer = true;
        manager.options.addr = app.local_addr().expect("address");
        let pod = 4_026_532_000;
        let namespace = std::fs::File::open("/proc/self/ns/net").expect("own namespace");
        let (stop_listener, _stopped) = watch::channel(false);
        manager.listening.insert(
            pod,
            Listening {
                stop: stop_listener,
                steered: true,
                count_check: Some(Steered {
                    namespace: Arc::new(namespace),
                    verified: Verified { skips: 0 },
                }),
            },
        );
        let recounted = || {
            std::mem::take(
                &mut *kernel
                    .recounted
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
        };
        let check = async |manager: &mut Manager| {
            manager.count_checks.checked = None;
            manager.check_counts().await;
        };
        // No skip: the count is the handler's, trusted (not even read).
        check(&mut manager).await;
        assert_eq!(recounted(), Vec::<u32>::new());
        assert_eq!(kernel.read.load(SeqCst), 0);
        // A skip, the count not 0: nothing steered there, nothing to do yet.
        kernel.skips.store(1, SeqCst);
        kernel.counted.store(true, SeqCst);
        check(&mut manager).await;
        assert_eq!(recounted(), Vec::<u32>::new());
        // The count 0 while the tables show the listener: counted again.
        kernel.counted.store(false, SeqCst);
        check(&mut manager).await;
        assert_eq!(recounted(), vec![pod]);
        // Once the listener is gone, a skip finds nothing to count.
        drop(app);
        kernel.skips.store(2, SeqCst);
        check(&mut manager).await;
        check(&mut manager).await;
        assert_eq!(recounted(), Vec::<u32>::new());
        // Verified as of the skips read: no check, no recount, even with a listener.
        let _app = std::net::TcpListener::bind(manager.options.addr).expect("listen again");
        check(&mut manager).await;
        assert_eq!(recounted(), Vec::<u32>::new());
    }
}
