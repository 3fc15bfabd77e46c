//! `--pod-listen ADDR`: the agent's API inside every pod's network namespace, so a stop
//! hook reaches it at `localhost:PORT` (or, bound to `0.0.0.0`, at the pod's IP from the
//! kubelet's `httpGet`) and needs nothing in the application's image.
//!
//! This module is the listener manager: it finds namespaces (inotify on the named
//! namespace directories, `netns_watch.rs`, and a `/proc` rescan every second), makes a
//! socket in each new one on a thread that entered it (a socket stays in the namespace it
//! was created in), serves the routes there through its own [`server::serve`] (so connection
//! caps and per-source waiter limits apply per pod: one pod cannot starve another), and
//! closes the listener as soon as the namespace is gone from [`netns::all_namespaces`] —
//! a listening socket holds its namespace alive, so keeping it would pin a dead pod's
//! whole network stack.
//!
//! Requests there carry a [`PodScope`] (the handlers confine them to the namespace, see
//! `pod_scope.rs`); bound beyond loopback, only callers from loopback (the pod itself) and
//! from the node's own addresses (the kubelet calls the pod IP from the node) are answered,
//! others get 403.
//!
//! The port is taken from no pod: the socket is on loopback at a port the kernel picks, and
//! the namespace's `sk_lookup` program (`kernel/steer.rs`) steers ADDR's connections to it
//! only while no application listens on ADDR's port in that namespace; the application
//! keeps the port whenever it listens, before or after the agent came. Without `sk_lookup`
//! (WARN once at start) ADDR is bound in each namespace as before, with `SO_REUSEPORT`
//! (`handover.rs`): the next agent of an upgrade binds it beside this one. A namespace where
//! an application holds it already is skipped for its lifetime (logged once, counted in
//! `drain_agent_pod_listeners{state="skipped"}`) and never disturbed: no retry that could
//! take the port from the pod while its server restarts. One where an agent of an older
//! version holds it (it did not share it; found through the socket tables and `/proc`) is
//! retried on every rescan until that agent stops (`state="waiting"`).
//!
//! At the agent's stop each listener hands over (`handover.rs`, `kernel/steer.rs`): a
//! steered one detaches its steering first, accepts for [`STEER_SETTLE`] what was steered to
//! it before, then closes; a bound one closes, its queued connections moving to the next
//! agent's listener. Requests in progress get their usual answers during the agent's
//! `--shutdown-grace`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use axum::{
    Extension,
    extract::{ConnectInfo, Request, State},
    http::StatusCode,
    middleware::{Next, from_fn_with_state},
    response::Response,
};
use log::{debug, info, warn};
use prometheus::{IntGaugeVec, Opts};
use tokio::{sync::watch, task::JoinSet, time::Instant};

use crate::{
    addr::canonical_addr,
    http::api::error,
    http::handover::{Handover, Holder, StopPhase, holder_of, reached},
    http::pod_scope::PodScope,
    http::server::{self, ServerLimits},
    http::{AppState, router},
    kernel::steer::SteerLink,
    metrics::Metrics,
    sys::netns,
    sys::netns_watch::NetnsWatch,
};

/// How long a steered listener keeps accepting after its steering was detached at the
/// agent's stop: a connection steered at its SYN just before completes its handshake onto
/// this socket (within a round trip: loopback or the pod's veth).
const STEER_SETTLE: Duration = Duration::from_millis(250);

/// The `/proc` rescan period: namespaces of processes have no file event.
const RESCAN: Duration = Duration::from_secs(1);
/// After a file event, rescan this often for a while: `ip netns add` and the runtimes
/// create the file first and bind-mount the namespace onto it a moment later.
const BURST_EVERY: Duration = Duration::from_millis(25);
const BURST_FOR: Duration = Duration::from_millis(750);

/// Keeps the agent's own connections uncounted and steers the in-pod port to the agent
/// (the kernel side implements it).
pub trait OwnEndpoints: Send + Sync + 'static {
    /// Leaves connections to `port` in `netns` uncounted.
    fn ignore(&self, netns: u32, port: u16) -> Result<()>;
    /// Undoes [`OwnEndpoints::ignore`] and [`OwnEndpoints::steer`] once the listener is
    /// closed.
    fn forget(&self, netns: u32, port: u16) -> Result<()>;
    /// Why the in-pod port cannot be steered with `sk_lookup` here, or `None`.
    fn steering_problem(&self) -> Option<String>;
    /// Whether the steering stopped everywhere (a listener on the port may be uncounted).
    fn steering_stopped(&self) -> bool;
    /// Steers connections to `target` in `netns` (file `netns_file`) to `socket` while no
    /// application listens on `target`'s port there, and leaves them uncounted meanwhile;
    /// dropping the link detaches the steering.
    fn steer(
        &self,
        target: SocketAddr,
        netns: u32,
        netns_file: &File,
        socket: BorrowedFd<'_>,
    ) -> Result<SteerLink>;
}

/// What `--pod-listen` and its companion flags ask for.
#[derive(Clone, Debug)]
pub struct PodListenOptions {
    pub addr: SocketAddr,
    /// Only named namespaces (`/run/netns/NAME`) whose NAME starts with this.
    pub name_prefix: Option<String>,
    pub limits: ServerLimits,
    /// Binds the fallback's listeners so that the next agent shares them.
    pub handover: Arc<Handover>,
}

/// A listener being served.
struct Listening {
    stop: watch::Sender<bool>,
    /// On a socket of its own, the in-pod port steered to it (not bound).
    steered: bool,
}

/// Callers a listener beyond loopback answers besides loopback: the node's addresses.
#[derive(Clone, Default)]
struct NodeAddresses(Arc<RwLock<BTreeSet<IpAddr>>>);

impl NodeAddresses {
    fn allows(&self, peer: IpAddr) -> bool {
        let peer = canonical_addr(peer);
        peer.is_loopback()
            || self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&peer)
    }

    fn set(&self, addresses: BTreeSet<IpAddr>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = addresses;
    }
}

/// Serves the API inside every pod namespace until the agent stops (`stop` reaches
/// [`StopPhase::HandingOver`]); then every pod listener hands over and shuts down (answers
/// in progress get the agent's grace, then `limits.shutdown_timeout`) before this returns.
/// `opened` is told once the namespaces there at the start are served (the seeding walk
/// waits for it).
pub async fn serve_in_pods(
    options: PodListenOptions,
    state: Arc<AppState>,
    endpoints: Arc<dyn OwnEndpoints>,
    metrics: &Metrics,
    mut stop: watch::Receiver<StopPhase>,
    opened: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let gauge = IntGaugeVec::new(
        Opts::new(
            "drain_agent_pod_listeners",
            "--pod-listen listeners inside pod network namespaces: listening (all served), steered (of those, served through sk_lookup without taking the port; 0 while listening is not means the fallback that binds the port), skipped (fallback only: an application holds the address in that namespace), or waiting (fallback only: an agent of an older version holds it without sharing it; retried on every rescan).",
        ),
        &["state"],
    )?;
    metrics.register(Box::new(gauge.clone()))?;
    let own_netns = netns::inode_of(Path::new("/proc/self/ns/net"))
        .context("cannot read the agent's own network namespace")?;
    let mut watch = match NetnsWatch::new() {
        Ok(watch) => Some(watch),
        Err(problem) => {
            warn!("{problem:#}; finding new namespaces by rescanning every {RESCAN:?} only");
            None
        }
    };
    let node = NodeAddresses::default();
    let steer = match endpoints.steering_problem() {
        None => {
            info!(
                "the in-pod port {} is steered to the agent with sk_lookup where no application listens on it; the agent binds it nowhere",
                options.addr.port()
            );
            true
        }
        Some(problem) => {
            warn!(
                "the in-pod port {} cannot be steered with sk_lookup ({problem}); falling back to binding {} in each pod namespace: a pod that holds the port already is skipped, and an application that tries to listen on it after the agent did fails",
                options.addr.port(),
                options.addr
            );
            false
        }
    };
    let mut manager = Manager {
        steer,
        options,
        state,
        endpoints,
        node: node.clone(),
        own_netns,
        listening: BTreeMap::new(),
        skipped: BTreeSet::new(),
        waiting: BTreeSet::new(),
        failing: BTreeMap::new(),
        tasks: JoinSet::new(),
        stop: stop.clone(),
    };
    info!(
        "serving inside pod network namespaces on {} (node-level callers: loopback and this node's addresses)",
        manager.options.addr
    );
    let mut burst_until: Option<Instant> = None;
    let mut stopped_told = false;
    let mut opened = Some(opened);
    loop {
        manager.reconcile().await;
        if let Some(opened) = opened.take() {
            // The namespaces there at the start are served: the seeding walk may take the
            // kernel's lock now (agent.rs).
            let _ = opened.send(());
        }
        let stopped = if manager.steer && !stopped_told {
            // The kernel's lock may be held by a walk: not on the runtime's threads.
            let endpoints = Arc::clone(&manager.endpoints);
            tokio::task::spawn_blocking(move || endpoints.steering_stopped())
                .await
                .unwrap_or(false)
        } else {
            false
        };
        if stopped {
            stopped_told = true;
            warn!(
                "a listener on the in-pod port {} could not be counted (drain_agent_tracking_errors_total{{reason=\"pod_listen_count_failed\"}}): the port is steered to the agent in no pod any more, so no application can lose a connection to it; restart the agent to steer again",
                manager.options.addr.port()
            );
        }
        gauge
            .with_label_values(&["listening"])
            .set(i64::try_from(manager.listening.len()).unwrap_or(i64::MAX));
        gauge
            .with_label_values(&["skipped"])
            .set(i64::try_from(manager.skipped.len()).unwrap_or(i64::MAX));
        gauge
            .with_label_values(&["waiting"])
            .set(i64::try_from(manager.waiting.len()).unwrap_or(i64::MAX));
        let steered = manager.listening.values().filter(|l| l.steered).count();
        gauge
            .with_label_values(&["steered"])
            .set(i64::try_from(steered).unwrap_or(i64::MAX));
        if let Some(watch) = &mut watch {
            watch.watch_dirs();
        }
        let next = match burst_until {
            Some(until) if Instant::now() < until => BURST_EVERY,
            _ => {
                burst_until = None;
                RESCAN
            }
        };
        let changed = async {
            match &mut watch {
                Some(watch) => watch.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.wait_for(|phase| *phase >= StopPhase::HandingOver) => break,
            result = changed => {
                if let Err(problem) = result {
                    warn!("{problem:#}; finding new namespaces by rescanning only");
                    watch = None;
                }
                burst_until = Some(Instant::now() + BURST_FOR);
            }
            () = tokio::time::sleep(next) => {}
        }
        // Finished listener tasks (their namespaces went away).
        while manager.tasks.try_join_next().is_some() {}
    }
    // The agent stops: every listener hands over and shuts down on its own; wait for them.
    while manager.tasks.join_next().await.is_some() {}
    Ok(())
}

struct Manager {
    /// The in-pod port is steered to a socket of the agent's (`sk_lookup`), not bound.
    steer: bool,
    options: PodListenOptions,
    state: Arc<AppState>,
    endpoints: Arc<dyn OwnEndpoints>,
    node: NodeAddresses,
    own_netns: u32,
    listening: BTreeMap<u32, Listening>,
    /// Namespaces where an application holds the address (binding fallback only): left
    /// alone for their lifetime.
    skipped: BTreeSet<u32>,
    /// Namespaces where an agent of an older version holds it without sharing it (binding
    /// fallback only): retried on every rescan, logged once.
    waiting: BTreeSet<u32>,
    /// Namespaces where binding failed otherwise (e.g. loopback not up yet): retried on
    /// every rescan, the problem logged once.
    failing: BTreeMap<u32, String>,
    tasks: JoinSet<()>,
    stop: watch::Receiver<StopPhase>,
}

impl Manager {
    /// One rescan: close listeners of namespaces that are gone, open them in new ones.
    async fn reconcile(&mut self) {
        let prefix = self.options.name_prefix.clone();
        let own = self.own_netns;
        let scanned = tokio::task::spawn_blocking(move || {
            let addresses = crate::sys::ifaddrs::local_addresses();
            (candidates(own, prefix.as_deref()), addresses)
        })
        .await;
        let (present, addresses) = match scanned {
            Ok(scanned) => scanned,
            Err(problem) => {
                warn!("namespace scan failed: {problem}");
                return;
            }
        };
        match addresses {
            Ok(addresses) => self.node.set(addresses),
            Err(problem) => debug!("cannot read the node's addresses: {problem:#}"),
        }
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
        self.waiting.retain(|inode| present.contains_key(inode));
        self.failing.retain(|inode, _| present.contains_key(inode));
        let new: Vec<(u32, PathBuf)> = present
            .into_iter()
            .filter(|(inode, _)| {
                !self.listening.contains_key(inode) && !self.skipped.contains(inode)
            })
            .collect();
        self.open_all(new).await;
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
                let (steer, addr, endpoints, handover) = (
                    self.steer,
                    self.options.addr,
                    Arc::clone(&self.endpoints),
                    Arc::clone(&self.options.handover),
                );
                opening.spawn_blocking(move || {
                    let opened = if steer {
                        open_steered(&path, inode, addr, endpoints.as_ref())
                            .map(|(listener, link)| (listener, Some(link)))
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
        opened: Result<(std::net::TcpListener, Option<SteerLink>), Bind>,
    ) {
        let addr = self.options.addr;
        let (problem, steering) = match opened {
            Ok((listener, link)) => {
                self.failing.remove(&inode);
                if self.waiting.remove(&inode) {
                    info!(
                        "network namespace {inode}: {addr} is free of the older agent now; listening"
                    );
                }
                self.serve(inode, path, listener, link);
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
            Err(Bind::Failed(problem)) => (problem, false),
            Err(Bind::Steer(problem)) => (problem, true),
        };
        let text = format!("{problem:#}");
        if self.failing.get(&inode) == Some(&text) {
            return;
        }
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
        self.failing.insert(inode, text);
    }

    /// Serves the routes on `listener` until the namespace is gone or the agent stops.
    fn serve(
        &mut self,
        inode: u32,
        path: &Path,
        listener: std::net::TcpListener,
        link: Option<SteerLink>,
    ) {
        let addr = self.options.addr;
        let steered = link.is_some();
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(problem) => {
                warn!("network namespace {inode}: cannot register the listener: {problem}");
                return;
            }
        };
        let endpoints = Arc::clone(&self.endpoints);
        let port = addr.port();
        // Bound: after the bind (a pod that holds the port keeps its connections counted);
        // a connection in between is counted and un-counted like any other. Steered: done
        // by `steer` before the program is attached.
        if !steered && let Err(problem) = endpoints.ignore(inode, port) {
            warn!(
                "network namespace {inode}: cannot leave the agent's own connections there uncounted ({problem:#}); not listening"
            );
            return;
        }
        let mut app = router(Arc::clone(&self.state)).layer(Extension(PodScope { netns: inode }));
        if !addr.ip().is_loopback() {
            app = app.layer(from_fn_with_state(self.node.clone(), node_or_loopback_only));
        }
        let (stop_listener, stopped) = watch::channel(false);
        let agent_stop = self.stop.clone();
        let limits = self.options.limits;
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
                        () = reached(agent_stop, StopPhase::HandingOver) => true,
                    };
                    if let Some(link) = link {
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
            if let Err(problem) =
                server::serve_handing_over(listener, app, limits, stop_accepting, grace_over).await
            {
                warn!("network namespace {inode}: the listener failed: {problem:#}");
            }
            // The listener is closed (dropped by serve): the namespace is no longer held.
            let forgotten =
                tokio::task::spawn_blocking(move || endpoints.forget(inode, port)).await;
            if !matches!(forgotten, Ok(Ok(()))) {
                debug!("network namespace {inode}: own endpoint not forgotten");
            }
            debug!("network namespace {inode}: listener closed");
        });
        self.listening.insert(
            inode,
            Listening {
                stop: stop_listener,
                steered,
            },
        );
    }
}

/// At most this many pod listeners are being opened at once (threads inside namespaces).
const OPEN_AT_ONCE: usize = 8;

/// A socket of the agent's on loopback in the namespace at `path` (checked to be `inode`),
/// and the in-pod port steered to it.
fn open_steered(
    path: &Path,
    inode: u32,
    addr: SocketAddr,
    endpoints: &dyn OwnEndpoints,
) -> Result<(std::net::TcpListener, SteerLink), Bind> {
    let (listener, netns_file) = socket_in(path, inode, addr).map_err(Bind::Failed)?;
    let link = endpoints
        .steer(addr, inode, &netns_file, listener.as_fd())
        .map_err(Bind::Steer)?;
    Ok((listener, link))
}

/// Why a bind failed.
enum Bind {
    /// An application holds the address in that namespace (skip it for good).
    InUse,
    /// An agent of an older version holds it without `SO_REUSEPORT` (retry on each rescan).
    AgentThere,
    /// Anything else (retry later).
    Failed(anyhow::Error),
    /// The socket is made, the steering failed (retry later, WARN).
    Steer(anyhow::Error),
}

/// Binds `addr` on a thread inside the namespace at `path`, checking that it is still the
/// namespace `inode` (a PID may have been reused since the scan).
/// The listener is in the address's `SO_REUSEPORT` group (`handover.rs`): another agent's
/// listener there is shared, not a conflict.
fn bind_in(
    path: &Path,
    inode: u32,
    addr: SocketAddr,
    handover: &Arc<Handover>,
) -> Result<std::net::TcpListener, Bind> {
    let handover = Arc::clone(handover);
    let result = netns::run_in(path, move || {
        let entered = netns::inode_of(Path::new("/proc/thread-self/ns/net"))?;
        if entered != inode {
            bail!("{} is now namespace {entered}, not {inode}", addr);
        }
        // Who listens there already: an application keeps the port for good (also one that
        // set SO_REUSEPORT, whose group the agent's bind would join), agents share it, and
        // an older agent that does not share it is retried. Unknown (the socket tables
        // unreadable): an application's.
        let holder = holder_of(addr).unwrap_or(Holder::Application);
        if holder == Holder::Application {
            return Ok(Err(Holder::Application));
        }
        match handover.bind(addr) {
            Ok(listener) => Ok(Ok(listener)),
            Err(problem) if problem.kind() == std::io::ErrorKind::AddrInUse => {
                // Taken between the look and the bind: look again.
                Ok(Err(holder_of(addr).unwrap_or(Holder::Application)))
            }
            Err(problem) => Err(problem).with_context(|| format!("cannot listen on {addr}")),
        }
    });
    match result {
        Ok(Ok(listener)) => Ok(listener),
        Ok(Err(Holder::Application)) => Err(Bind::InUse),
        // An agent's listener that does not share the address, or one gone meanwhile.
        Ok(Err(Holder::Agents | Holder::Nobody)) => Err(Bind::AgentThere),
        Err(problem) => Err(Bind::Failed(problem)),
    }
}

/// The agent's socket for a steered in-pod port: made on a thread inside the namespace at
/// `path` (checked to still be `inode`), on loopback at a port the kernel picks (see
/// `kernel/steer.rs` for why), with the namespace's file for the `sk_lookup` link.
fn socket_in(path: &Path, inode: u32, addr: SocketAddr) -> Result<(std::net::TcpListener, File)> {
    netns::run_in(path, move || {
        let own = Path::new("/proc/thread-self/ns/net");
        let entered = netns::inode_of(own)?;
        if entered != inode {
            bail!("the namespace is now {entered}, not {inode}");
        }
        let netns_file = File::open(own).context("cannot open the namespace's file")?;
        let local = match addr.ip() {
            IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            // `[::]` takes IPv4 too, and a socket bound to `::1` is IPv6-only (binding a
            // specific IPv6 address sets `sk_ipv6only`, net/ipv6/af_inet6.c), which
            // `bpf_sk_assign()` refuses for IPv4: dual-stack on all addresses, as `[::]:9100`
            // itself was (callers beyond loopback and the node get 403 there too).
            IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
            IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
        };
        // The kernel may hand out the in-pod port itself if `ip_local_port_range` covers
        // it: holding that would take it from the pod, so pick again.
        for _ in 0..8 {
            let listener = std::net::TcpListener::bind(local)
                .with_context(|| format!("cannot listen on {local}"))?;
            if listener.local_addr().context("listener address")?.port() == addr.port() {
                continue;
            }
            listener
                .set_nonblocking(true)
                .context("cannot make the listener non-blocking")?;
            return Ok((listener, netns_file));
        }
        bail!("the kernel keeps picking the in-pod port {}", addr.port())
    })
}

/// The namespaces to listen in: every one but the agent's own, or with a name prefix only
/// named ones whose name starts with it.
fn candidates(own: u32, prefix: Option<&str>) -> BTreeMap<u32, PathBuf> {
    let mut found = netns::all_namespaces();
    found.remove(&own);
    let Some(prefix) = prefix else {
        return found;
    };
    let mut named = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(netns::NAMED_NETNS_DIR) {
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(prefix) {
                continue;
            }
            let path = entry.path();
            if let Ok(inode) = netns::inode_of(&path)
                && inode != own
            {
                named.insert(inode, path);
            }
        }
    }
    named
}

/// Middleware of listeners bound beyond loopback: loopback (the pod itself) and the node's
/// own addresses (the kubelet's `httpGet`) only; anyone else (other pods, other hosts)
/// gets 403.
async fn node_or_loopback_only(
    State(node): State<NodeAddresses>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    match peer {
        Some(peer) if node.allows(peer) => next.run(request).await,
        Some(peer) => error(
            StatusCode::FORBIDDEN,
            format!(
                "{peer} may not ask here: this listener inside a pod answers the pod itself (localhost) and its node only"
            ),
        ),
        None => error(StatusCode::FORBIDDEN, "unknown caller"),
    }
}
