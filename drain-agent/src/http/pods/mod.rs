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
//! whole network stack. Only a complete scan says a namespace is gone: one that could not
//! look everywhere (out of descriptors) closes nothing and opens nothing.
//!
//! Requests there carry a [`PodScope`] (the handlers confine them to the namespace, see
//! `pod_scope.rs`); bound beyond loopback, only callers on loopback at both ends (the pod
//! itself calling localhost) and root of the node are answered (the kubelet calls the pod
//! IP from the node: a caller from a node address is told by its socket's owner in the
//! node's tables, `callers.rs`), others get 403, a call a proxy in the pod relays from
//! loopback to the pod's address (a service mesh's sidecar) among them.
//!
//! The port is taken from no pod: the socket is on loopback at `--pod-socket-port` (29100:
//! that port is taken in every pod instead, and a pod whose application holds it already is
//! not served, logged once, `state="socket_port_taken"`: also an application running as
//! root with `SO_REUSEPORT`, whose socket would not make the agent's bind fail — who holds
//! the port is looked at before the bind and once bound, `open.rs`; one that binds it that
//! way *after* the agent shares the agent's socket until the pod is gone, a window
//! SECURITY.md describes), and
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
//! A namespace where the listener cannot be opened otherwise (its socket, entering the
//! namespace, the steering: EMFILE, ENOMEM…) is retried on every rescan, counted
//! `state="failing"` at once and said at WARN once it has failed for a minute.
//!
//! Once the kernel side could not keep a count of an application's listeners on the port
//! (`pod_listen_count_failed`), every namespace's steering stops for good: no pod's port
//! is steered to the agent, and its hooks there are refused. The agent says so as long as
//! it lasts ([`SteeringStop`]): `/healthz` is `degraded` naming it, the steered listeners
//! are counted `state="stopped"` (none `steered`), and a WARN repeats every 10 minutes. Not
//! a failed `/healthz`: the liveness probe's restart would close the node listener too (for
//! up to `--shutdown-grace` while waiters are held: their hooks refused as well), and a
//! cause that lasts would restart it in a loop. The next agent started beside this one (an
//! upgrade, a rollout restart) makes kernel state of its own and steers again, with no
//! moment without an agent.
//!
//! At the agent's stop each listener hands over (`handover.rs`, `kernel/steer.rs`): a
//! steered one detaches its steering first — once another agent's program is attached in
//! its namespace (the next agent serves there), or after `SUCCESSOR_WAIT` (2 s, never past
//! the grace) where none comes — accepts for [`STEER_SETTLE`] what was steered to it before,
//! then closes, what is still queued on it moving to the next agent's socket; a
//! bound one closes, its queued connections moving to the next agent's listener. Requests
//! in progress get their usual answers during the agent's `--shutdown-grace`. What a closed
//! listener then does under the kernel's lock (forgetting its own endpoint) is not waited
//! for: a walk may hold that lock for minutes, and the agent's exit waits for it, bounded.
//!
//! That forget, whenever it runs, undoes only its own listener's registration
//! ([`OwnEndpoint`]): run late, it may find the namespace gone and its inode given to a new
//! pod's namespace, served already, whose mark and steering it leaves alone.

mod callers;
mod manager;
mod open;
mod recount;

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::BorrowedFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use prometheus::{IntGaugeVec, Opts};
use tokio::{sync::watch, time::Instant};

use self::{
    callers::{NodeAddresses, NodeCallers},
    manager::Manager,
};
use crate::{
    http::AppState,
    http::handover::{Handover, StopPhase},
    http::identify::ClientSockets,
    http::server::ServerLimits,
    kernel::{OwnEndpoint, steer::SteerLink},
    metrics::Metrics,
    sys::netns,
    sys::netns_watch::NetnsWatch,
    tasks::TaskWatch,
};

/// The `/proc` rescan period: namespaces of processes have no file event.
const RESCAN: Duration = Duration::from_secs(1);
/// After a file event, rescan this often for a while: `ip netns add` and the runtimes
/// create the file first and bind-mount the namespace onto it a moment later.
const BURST_EVERY: Duration = Duration::from_millis(25);
const BURST_FOR: Duration = Duration::from_millis(750);

/// Keeps the agent's own connections uncounted and steers the in-pod port to the agent
/// (the kernel side implements it).
pub trait OwnEndpoints: Send + Sync + 'static {
    /// Leaves connections to the agent's listener bound at `addr` in `netns` uncounted;
    /// returns the registration [`OwnEndpoints::forget`] undoes.
    fn ignore(&self, netns: u32, addr: SocketAddr) -> Result<OwnEndpoint>;
    /// Undoes the registration `own` made by [`OwnEndpoints::ignore`] or
    /// [`OwnEndpoints::steer`] once its listener is closed: nothing when its namespace and
    /// port were registered again since. A forget can run minutes late (it waits for the
    /// kernel's lock, which a walk holds), when the namespace is gone and the kernel has
    /// given its inode to another, which the agent may serve already.
    fn forget(&self, own: OwnEndpoint) -> Result<()>;
    /// Why the in-pod port cannot be steered with `sk_lookup` here, or `None`.
    fn steering_problem(&self) -> Option<String>;
    /// Whether the steering stopped everywhere (a listener on the port may be uncounted).
    fn steering_stopped(&self) -> bool;
    /// Steers connections to `target` in `netns` (file `netns_file`) to `socket` while no
    /// application listens on `target`'s port there, and leaves them uncounted meanwhile.
    fn steer(
        &self,
        target: SocketAddr,
        netns: u32,
        netns_file: &File,
        socket: BorrowedFd<'_>,
    ) -> Result<SteeredPort>;
    /// Runs of the kernel side's handler the kernel skipped so far, or `None` where it does
    /// not count them all (`recount.rs`).
    fn handler_skips(&self) -> Result<Option<u64>>;
    /// Whether the kernel side counts an application listener on the in-pod port in
    /// `netns` now (then nothing is steered there).
    fn pod_listeners_counted(&self, netns: u32) -> Result<bool>;
    /// Counts the listeners on the in-pod port in `netns` (file `netns_file`) again, as
    /// before its steering began: one a skipped handler run missed is counted, none twice.
    fn recount_pod_listeners(&self, netns: u32, netns_file: &File) -> Result<()>;
}

/// A pod namespace's in-pod port steered to the agent ([`OwnEndpoints::steer`]).
pub struct SteeredPort {
    /// Dropping it detaches the steering.
    pub link: SteerLink,
    /// The registration [`OwnEndpoints::forget`] undoes once the listener is closed.
    pub own: OwnEndpoint,
}

/// Whether the in-pod port's steering stopped for good ([`OwnEndpoints::steering_stopped`]):
/// set by the listener manager, read by `/healthz` on every listener. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct SteeringStop(Arc<AtomicBool>);

impl SteeringStop {
    /// `/healthz`'s reason while the steering is stopped: general, naming the state only.
    pub const REASON: &str = "the in-pod port is steered to the agent in no pod (a count of its listeners failed: pod_listen_count_failed); its hooks there are refused until the agent is restarted beside a new one (a rollout restart)";

    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `--pod-socket-port`'s default: the port of the agent's own socket in every pod. A fixed
/// port an operator can know and keep free, not one the kernel picks: a picked one comes
/// from `ip_local_port_range` (32768–60999), where servers do bind fixed ports (gRPC's
/// 50051, MySQL X's 33060), and the agent makes its socket as soon as a pod's namespace
/// appears, before the application starts: once in some 28,000 pods it held the
/// application's port and the application's `bind()` failed. This one is below that range
/// (no outbound connection's port) and is no common server's default that we know of.
pub const DEFAULT_SOCKET_PORT: u16 = 29100;

/// What `--pod-listen` and its companion flags ask for.
#[derive(Clone, Debug)]
pub struct PodListenOptions {
    pub addr: SocketAddr,
    /// Only named namespaces (`/run/netns/NAME`) whose NAME starts with this.
    pub name_prefix: Option<String>,
    pub limits: ServerLimits,
    /// Bind ADDR in each namespace even where `sk_lookup` could steer it (the fallback's
    /// tests: `--pod-listen-bind`).
    pub bind_only: bool,
    /// The port of the agent's own socket in each pod, which ADDR is steered to
    /// (`--pod-socket-port`, [`DEFAULT_SOCKET_PORT`]).
    pub socket_port: u16,
    /// At most this many listeners are open (`--pod-max-listeners`); more namespaces get
    /// none while it stays so.
    pub max_listeners: usize,
    /// Binds the fallback's listeners so that the next agent shares them.
    pub handover: Arc<Handover>,
    /// The agent's watched tasks: `/healthz` on every pod listener fails once one has
    /// ended, as on the node listener.
    pub tasks: TaskWatch,
}

/// Descriptors one pod listener may hold: its socket, its steering program and link, a file
/// of its namespace (`SteerLink`), and its server's connections (`pod_connections`) with
/// their overflow reserve.
fn descriptors_per_listener(pod_connections: usize) -> u64 {
    crate::http::server::connection_descriptors(pod_connections).saturating_add(4)
}

/// How many pod listeners `open_file_limit` leaves room for, each holding what
/// [`descriptors_per_listener`] says, beside the node listener's `node_connections` and its
/// reserve ([`connection_descriptors`](crate::http::server::connection_descriptors)), the
/// agent-check listener's when there is one (`agent_check`, its limits:
/// [`Limits::descriptors`](crate::http::agentcheck::Limits::descriptors)) and the descriptors
/// kept for the rest of the agent ([`RESERVED_FDS`](crate::http::server::RESERVED_FDS)); at
/// least 1. Each server's own cap is sized against the whole limit, so without this budget,
/// listeners past it (1,024 by default, each up to 24 descriptors) could take the node
/// listener's and the agent's last descriptors: stop hooks and pods refused with EMFILE.
pub fn listener_budget(
    open_file_limit: u64,
    node_connections: usize,
    pod_connections: usize,
    agent_check: Option<crate::http::agentcheck::Limits>,
) -> usize {
    let node = crate::http::server::connection_descriptors(node_connections);
    let checks = agent_check.map_or(0, |limits| limits.descriptors());
    let room = open_file_limit
        .saturating_sub(crate::http::server::RESERVED_FDS)
        .saturating_sub(node)
        .saturating_sub(checks);
    usize::try_from(room / descriptors_per_listener(pod_connections))
        .unwrap_or(usize::MAX)
        .max(1)
}

/// `--pod-max-listeners` (`wanted`), lowered to what the open-file limit leaves room for
/// ([`listener_budget`]), with a WARN when it is.
pub fn listener_limit(
    wanted: u32,
    node_connections: usize,
    pod_connections: usize,
    agent_check: Option<crate::http::agentcheck::Limits>,
) -> usize {
    let wanted = usize::try_from(wanted).unwrap_or(usize::MAX);
    let limit = match crate::sys::fdlimit::soft_limit() {
        Ok(limit) => limit,
        Err(problem) => {
            warn!("{problem:#}; keeping --pod-max-listeners {wanted}");
            return wanted;
        }
    };
    let budget = listener_budget(limit, node_connections, pod_connections, agent_check);
    if budget < wanted {
        warn!(
            "--pod-max-listeners {wanted} lowered to {budget}: the open-file limit is {limit}, and each pod listener may hold up to {} descriptors beside the node listener's{} (raise LimitNOFILE, or lower --pod-http-max-connections)",
            descriptors_per_listener(pod_connections),
            if agent_check.is_some() {
                " and the agent-check listener's"
            } else {
                ""
            }
        );
        budget
    } else {
        wanted
    }
}

/// Serves the API inside every pod namespace until the agent stops (`stop` reaches
/// [`StopPhase::HandingOver`]); then every pod listener hands over and shuts down (answers
/// in progress get the agent's grace, then `limits.shutdown_timeout`) before this returns.
/// `opened` is told once the namespaces there at the start are served (the seeding walk
/// waits for it). `sockets`: the node's socket tables, which tell a caller from a node
/// address by its socket's owner (only root's is answered).
pub async fn serve_in_pods(
    options: PodListenOptions,
    state: Arc<AppState>,
    endpoints: Arc<dyn OwnEndpoints>,
    sockets: Arc<dyn ClientSockets>,
    metrics: &Metrics,
    mut stop: watch::Receiver<StopPhase>,
    opened: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let gauge = IntGaugeVec::new(
        Opts::new(
            "drain_agent_pod_listeners",
            "--pod-listen listeners inside pod network namespaces: listening (all served), steered (of those, served through sk_lookup without taking the port; 0 while listening is not means the fallback that binds the port), skipped (fallback only: an application holds the address in that namespace), socket_port_taken (steered only: an application held --pod-socket-port there when the agent came, also one with SO_REUSEPORT; not served), waiting (an agent of an older version holds the address, or steered --pod-socket-port, without sharing it; retried on every rescan), failing (the listener could not be opened: loopback not up yet, EMFILE, ENOMEM, setns or steering errors; retried on every rescan, WARN after a minute), user_owned (no pod's, never served: namespaces a user's user namespace owns, e.g. unshare -Urn, or a user namespace root made while no bind mount under /run/netns pins them, e.g. unshare -Urn in a container running as root), over_limit (namespaces left without a listener: --pod-max-listeners are open), or stopped (listening, but the steering stopped for good: a count of the applications' listeners on the port failed, tracking_errors_total{reason=\"pod_listen_count_failed\"}; their hooks to the in-pod port are refused until the agent is restarted, and steered is 0 meanwhile).",
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
    let node = NodeCallers {
        addresses: NodeAddresses::default(),
        sockets,
    };
    let problem = if options.bind_only {
        Some("--pod-listen-bind asks for the fallback".to_owned())
    } else {
        endpoints.steering_problem()
    };
    let steer = match problem {
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
    let mut manager = Manager::new(
        steer,
        options,
        state,
        endpoints,
        node.clone(),
        own_netns,
        stop.clone(),
    );
    info!(
        "serving inside pod network namespaces on {} (callers: the pod itself calling localhost, and root of this node from its addresses)",
        manager.options.addr
    );
    let mut burst_until: Option<Instant> = None;
    let mut opened = Some(opened);
    loop {
        manager.reconcile().await;
        // Ready once the first round is served (or classified, or FIRST_ROUND_WAIT passed):
        // after every rescan, complete or not.
        manager.check_first_round();
        if let Some(opened) = opened.take() {
            // The namespaces there at the start are served: the seeding walk may take the
            // kernel's lock now (agent/mod.rs).
            let _ = opened.send(());
        }
        manager.check_steering().await;
        // A listener a skipped handler run left uncounted gets its port back (recount.rs).
        manager.check_counts().await;
        manager.report(&gauge);
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
    // The agent stops: every listener hands over and shuts down on its own; wait for them
    // (not for what they leave on a blocking thread: `Manager::serve`).
    manager.stopped().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audit (descriptors): each pod server's cap is sized against the whole open-file
    /// limit, so the default 1,024 pod listeners (each up to 16 + 4 connections, its socket,
    /// its program and link, a file of its namespace) could hold 24,576 descriptors under a
    /// 20,000 limit, the node listener's and the agent's among them. The listeners' number
    /// is now kept within what the limit leaves. Audit (resources): the budget left out the
    /// namespace file each steered listener holds (`SteerLink`): 838 listeners of 24
    /// descriptors, 816 more than the room.
    #[test]
    fn pod_listeners_are_kept_within_the_open_file_limit() {
        // This machine's hard limit, the node's default 512 connections, 16 per pod.
        let budget = listener_budget(20_000, 512, 16, None);
        assert!(budget < 1_024, "{budget}");
        let per = descriptors_per_listener(16);
        assert_eq!(
            per,
            16 + 4 + 4,
            "connections, socket, program, link, namespace"
        );
        assert_eq!(budget, 804, "the README's figure");
        let node = 512 + crate::http::server::overflow_reserve(512) as u64;
        assert!(
            budget as u64 * per + node + crate::http::server::RESERVED_FDS <= 20_000,
            "{budget} listeners of {per} descriptors"
        );
        // Audit (descriptors): with `--agent-check-listen`, its connections and its socket
        // were counted nowhere, and the pod listeners took those descriptors from the rest
        // of the agent's.
        let agent_check = crate::http::agentcheck::Limits::default();
        let checks = agent_check.max_connections as u64 + 1;
        let budget = listener_budget(20_000, 512, 16, Some(agent_check));
        assert_eq!(budget, 801, "the README's figure with --agent-check-listen");
        assert!(
            budget as u64 * per + node + checks + crate::http::server::RESERVED_FDS <= 20_000,
            "{budget} listeners of {per} descriptors beside the agent-check's {checks}"
        );
        // A node with a generous limit keeps the default.
        assert!(listener_budget(1 << 20, 1_024, 16, Some(agent_check)) >= 1_024);
        // Never none.
        assert_eq!(listener_budget(100, 1_024, 16, Some(agent_check)), 1);
    }

    /// `--http-max-connections` and `--pod-http-max-connections` take any `usize`: the
    /// budget of the largest overflowed (a panic in a debug build) where it should say that
    /// nothing but one listener fits.
    #[test]
    fn the_largest_connection_limits_leave_room_for_one_listener() {
        assert_eq!(descriptors_per_listener(usize::MAX), u64::MAX);
        assert_eq!(listener_budget(20_000, usize::MAX, usize::MAX, None), 1);
        assert_eq!(listener_budget(u64::MAX, 1_024, usize::MAX, None), 1);
    }
}
