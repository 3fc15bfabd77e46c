//! `drain-agent run`: wire the kernel side, the tracker and the HTTP server together, and
//! shut them down in order on SIGTERM or Ctrl-C, or when a watched task ends (then exit 1).

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use log::{error, info, warn};

mod kernel_side;
mod process;

pub use self::kernel_side::KernelEndpoints;

use crate::{
    cli::RunArgs,
    closer::Closer,
    drain::Drains,
    drain::journal::Journal,
    http::handover::{Handover, StopPhase, reached},
    http::pods::{OwnEndpoints, PodListenOptions, serve_in_pods},
    http::server::ServerLimits,
    http::{AppState, WaitLimits, router},
    kernel::destroy::KernelCloser,
    kernel::{Kernel, KernelOptions, events::forward_events},
    metrics::Metrics,
    repair::{FirstWalk, repair_missed_changes, watch_skipped_runs},
    tracker::Tracker,
};

/// How long the drains in progress get to write their records once the waiters are answered.
pub const DRAIN_RECORDS_WAIT: Duration = Duration::from_secs(2);
/// How long the exit waits for the agent-check listener (`--agent-check-listen`, closed at
/// SIGTERM) to end its last checks.
pub const AGENT_CHECK_STOP_WAIT: Duration = Duration::from_secs(2);
/// How long the exit waits for work on blocking threads, once for a walk holding the
/// kernel's lock and once more for the runtime's blocking pool.
pub const EXIT_WAIT: Duration = process::EXIT_WAIT;

/// The longest an agent run with `args` takes from SIGTERM to its exit, every bounded wait
/// of the stop one after the other: `--shutdown-grace` (or, when shorter, the wait for the
/// requests of connections accepted just before the stop, which runs beside it),
/// `--http-shutdown-timeout`, the drains' records, the agent-check listener (when there is
/// one), and [`EXIT_WAIT`] twice.
/// A supervisor's stop timeout (`terminationGracePeriodSeconds`, `TimeoutStopSec=`) must
/// be longer, or it kills the agent while it still answers waiters; the deploy tests
/// (`tests/deploy_kubernetes.rs`, `tests/deploy_systemd.rs`) hold the shipped ones to it.
/// Not counted: a pod's steering kept, where no other agent serves, for up to 2 s of the
/// grace (`http/pods/manager.rs` `SUCCESSOR_WAIT`) and then detached for 250 ms, which the
/// supervisors' margin covers.
pub fn longest_stop(args: &RunArgs) -> Duration {
    let agent_check = if args.agent_check_listen.is_some() {
        AGENT_CHECK_STOP_WAIT
    } else {
        Duration::ZERO
    };
    // The requests of connections accepted just before the stop are waited for beside the
    // grace (`serve_handing_over`): a grace shorter than that wait ends with it.
    let requests_read = crate::http::server::FIRST_REQUEST_GRACE;
    args.shutdown_grace.max(requests_read)
        + args.http_shutdown_timeout
        + DRAIN_RECORDS_WAIT
        + agent_check
        + EXIT_WAIT
        + EXIT_WAIT
}

/// A name for an agent started without `--instance`: 16 hex digits from the kernel's
/// random source, or the process id and the time should that not be readable (a name
/// only has to differ from the other agent's on the same address).
fn random_instance() -> String {
    use std::io::Read as _;
    let mut bytes = [0_u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut source| source.read_exact(&mut bytes)) {
        Ok(()) => bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
        Err(problem) => {
            warn!("cannot read /dev/urandom ({problem}): the instance is named by pid and time");
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.subsec_nanos());
            format!("{}-{nanos}", std::process::id())
        }
    }
}

/// `task`, ended after `after` when given (`run --end-event-reader-after`, a test hook).
async fn ending_after(after: Option<Duration>, task: impl Future<Output = ()>) {
    match after {
        Some(after) => {
            let _ = tokio::time::timeout(after, task).await;
        }
        None => task.await,
    }
}

/// Runs the agent until SIGTERM/Ctrl-C, or until one of its watched tasks ends
/// (`crate::tasks`); exit status 0 after a clean shutdown at a signal, 1 on error or after
/// such a task ended (the same stop, then `Restart=on-failure` or the container runtime
/// restarts the agent).
pub fn main(args: RunArgs) -> ExitCode {
    crate::logging::init(args.log_level, args.log_format);
    let result = process::runtime().and_then(|runtime| {
        let result = runtime.block_on(run(args));
        // A walk of the sockets or a pass over the socket tables may still run on a
        // blocking thread (minutes at worst on a node with 100k connections under load):
        // it must not hold the exit. What it leaves half done is what a crash leaves, and
        // the next agent's adoption finishes it (`kernel::ownership`).
        runtime.shutdown_timeout(EXIT_WAIT);
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            error!("{problem:#}");
            ExitCode::FAILURE
        }
    }
}

/// The agent itself.
pub async fn run(args: RunArgs) -> Result<()> {
    // Room for the eBPF objects and --http-max-connections sockets under a default unit's
    // soft limit of 1,024.
    match crate::sys::fdlimit::raise_soft_limit() {
        Ok(limit) => log::debug!("open-file limit: {limit}"),
        Err(problem) => warn!("{problem:#}"),
    }
    args.check()?;
    let instance = args.instance.clone().unwrap_or_else(random_instance);
    info!("instance {instance} (drain-agent probe --instance)");
    // Bind first: a port conflict is the most common start-up mistake, and it should not
    // cost the programs' load to find out. Shared with the next agent of an upgrade
    // (handover.rs).
    let handover = Arc::new(Handover::new());
    // Who listened there before is looked at just before the bind: while one of them still
    // does (an upgrade's older agent), it answers /metrics and this one does not
    // (http/metrics_turn.rs).
    let (listener, earlier) = handover.bind_node_looking(args.listen, "--listen").await?;
    let metrics_turn = Arc::new(crate::http::metrics_turn::MetricsTurn::after_look(
        listener.local_addr().context("listener address")?,
        earlier,
    ));

    // The journal next, also before the program load: a path that is not a regular file
    // of its own (a link, a FIFO, a device) stops the start at once, naming it.
    let journal = args
        .journal
        .as_deref()
        .map(|path| Journal::open(path, args.journal_max_bytes))
        .transpose()?;
    // And the state directory: drains and gates that outlive a restart (drain.rs).
    // A state file this agent cannot read (a later release's) gates every scope for as long
    // as a drain and its hold could last here, unless the file says less.
    let state_file = crate::drain::state_file::StateFile::open(&args.state_dir)?
        .with_longest_gate(args.max_timeout.saturating_add(crate::drain::GATE_HOLD));

    let mut kernel = Kernel::load(&KernelOptions {
        max_connections: args.max_connections,
        max_endpoints: args.max_endpoints,
        attach: args.attach.map(Into::into),
        no_seed: args.no_seed,
        preallocate_sockets: args.preallocate_sockets,
        pod_port: args.pod_listen.map_or(0, |addr| addr.port()),
        pin_dir: (!args.no_pin).then(|| args.pin_dir.clone()),
    })?;
    if let Some(asked) = args.assume_kernel_version {
        let version = crate::kernel::version::assumed(asked, crate::kernel::version::running());
        warn!(
            "doubting as on Linux {}.{} (--assume-kernel-version, for tests)",
            version.0, version.1
        );
        kernel.maps().assume_kernel_version(version);
    }
    // The agent's own API connections are not a service's: they take no slot (for as long
    // as the agent runs: this registration is never forgotten).
    let own_netns = crate::sys::netns::inode_of(std::path::Path::new("/proc/self/ns/net"))
        .context("cannot read the agent's own network namespace")?;
    kernel.ignore_own_endpoint(
        own_netns,
        listener.local_addr().context("listener address")?,
    )?;
    let kernel_maps = kernel.maps();
    let tracker = Arc::new(Tracker::new(kernel.maps(), args.max_waiters));
    let events = kernel
        .take_events()
        .context("the ring buffer was taken already")?;
    // A task that ends stops the agent as SIGTERM does, without the grace, and it exits 1 to
    // be restarted (crate::tasks, `process::stop_in_phases`); /healthz fails meanwhile.
    let tasks = crate::tasks::TaskWatch::default();
    let event_task = tasks.watch(
        "event reader",
        tokio::spawn(ending_after(
            args.end_event_reader_after,
            forward_events(events, Arc::clone(&tracker), kernel.maps()),
        )),
    );
    // The seeding walk (2-13 ms per network namespace) runs beside the serving agent, as
    // the repair task's first walk: until it ends every answer is doubted and confirmed
    // with the socket tables (`Doubt::Seeding`), so serving first never answers a false
    // "drained". Only whether it can run at all is decided before serving.
    if args.no_seed {
        info!("not counting connections opened before start (--no-seed)");
    } else if let Some(problem) = kernel.walker_problem() {
        anyhow::bail!(
            "cannot count the connections that were open before the agent started: {problem} \
             (run with --no-seed to count only new ones)"
        );
    }
    if let Err(problem) = crate::sys::sockdiag::check_readable() {
        warn!(
            "{problem:#}: a count the agent cannot vouch for (after skipped handler runs) is \
             not confirmed at once but waits for the next walk of the sockets; load the \
             inet_diag and tcp_diag modules"
        );
    }
    kernel.release_load_time_memory();
    let attach = kernel.attach_method();
    let kernel_state = kernel.state();
    let can_walk = kernel.can_walk();
    let kernel = Arc::new(std::sync::Mutex::new(kernel));
    // Fired (or dropped) once the pod listeners of the namespaces there now are open.
    let (pods_opened, seed_when) = tokio::sync::oneshot::channel();
    let first_walk = if args.no_seed {
        FirstWalk::None
    } else {
        FirstWalk::Seed { ready: seed_when }
    };
    let skip_task = tasks.watch(
        "skipped-run watch",
        tokio::spawn(watch_skipped_runs(
            Arc::clone(&kernel_maps),
            Arc::clone(&tracker),
        )),
    );
    let repair_task = tasks.watch(
        "repair task",
        tokio::spawn(repair_missed_changes(
            Arc::clone(&kernel),
            Arc::clone(&tracker),
            args.repair_interval,
            can_walk,
            first_walk,
        )),
    );

    let metrics = Arc::new(Metrics::new(
        Arc::clone(&tracker),
        args.ports.clone(),
        args.metrics_labels,
        attach.name(),
        true,
    )?);
    metrics.register_kernel_state(Arc::clone(&kernel_state))?;
    let method = {
        let kernel = kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        kernel_side::close_method(args.close_method, &kernel)?
    };
    info!("connections closed at a deadline use {method:?}");
    // Found once, before anything is served: an on_timeout=close that cannot happen is
    // refused, never recorded as done (a failed close is only a WARN once the drain runs).
    let unavailable = kernel_side::close_problem(method, args.close_method);
    if let Some(problem) = &unavailable {
        error!(
            "connections cannot be closed at a drain's deadline: {problem}; on_timeout=close (drain-agent wait --close-at-timeout) is refused until the agent runs with it"
        );
    }
    let closer = KernelCloser {
        kernel: Arc::clone(&kernel),
        maps: Arc::clone(&kernel_maps),
        method,
        unavailable,
    };
    // Who may do what (authority.rs): the node's own namespace, and which pod an address
    // belongs to.
    let pods = Arc::new(crate::sys::pod_addresses::PodAddresses::new(
        own_netns,
        Arc::new(crate::sys::pod_addresses::NamespaceAddresses { own_netns }),
    ));
    // One source of whose a port's sockets are: a local user's control is checked against
    // it when its drain starts (authority.rs) and while the drain runs (drain/run.rs).
    let owners: Arc<dyn crate::drain::owner::PortOwners> =
        Arc::new(crate::drain::owner::SocketTableOwners);
    let authority = Arc::new(crate::http::authority::Authority {
        pods: Arc::clone(&pods),
        owners: Arc::clone(&owners),
    });
    let tokens = match &args.auth_token_file {
        Some(path) => Some(Arc::new(crate::http::identify::Tokens::read(path)?)),
        None => None,
    };
    let drains = Arc::new(
        Drains::new(
            Arc::clone(&tracker),
            Some(Arc::new(closer) as Arc<dyn Closer>),
            journal,
            Some(pods),
            args.max_waiters,
        )
        .with_state_file(state_file)
        .with_port_owners(owners)
        // A pod's drain ends once its inode is another namespace's (another cookie).
        .with_namespaces(Arc::new(
            crate::drain::namespace::KernelNamespaces::default(),
        ))
        // Counted by scope as /metrics exports them (--ports, --metrics-labels).
        .with_metric_labels(metrics.labels().clone()),
    );
    // Before anything is served: /health answers for a restored drain from the first question.
    drains.restore();
    // Beside an agent that still writes the state file (an upgrade): this one writes once
    // that one has gone, with what it saved meanwhile.
    tokio::spawn({
        let drains = Arc::clone(&drains);
        async move { drains.take_over_state().await }
    });
    metrics.register_drains(Arc::clone(&drains))?;
    // The stop, in phases (handover.rs): SIGTERM closes the listeners (the next agent takes
    // new and queued connections) and the waiters get their usual answers for up to
    // --shutdown-grace; then the rest are answered `agent_shutdown`. A watched task that
    // ends starts the same stop, with no grace (`process::stop_in_phases`).
    let (phase, phases) = tokio::sync::watch::channel(StopPhase::Serving);
    // HAProxy's agent-check: bound before serving, so a conflict fails the start. It closes
    // at SIGTERM with the other listeners: an agent that stops answers from a state about to
    // be handed over (its drains end `agent_shutdown` at the grace's end), and a check it
    // does not take reaches the next agent, or finds none and changes nothing in HAProxy.
    let agent_check_task = match args.agent_check_listen {
        Some(address) => {
            let listener = handover.bind_node(address, "--agent-check-listen").await?;
            info!("agent-check on {address}");
            let gate = Arc::new(Arc::clone(&drains)) as Arc<dyn crate::drain::PortGate>;
            Some(crate::http::agentcheck::spawn(
                listener,
                gate,
                reached(phases.clone(), StopPhase::HandingOver),
            ))
        }
        None => None,
    };
    let address = listener.local_addr().context("listener address")?;
    let state = Arc::new(AppState {
        tracker: Arc::clone(&tracker),
        limits: WaitLimits {
            default_timeout: args.default_timeout,
            max_timeout: args.max_timeout,
            own_port: Some(address.port()),
            own_netns: Some(own_netns),
        },
        metrics,
        drains: Arc::clone(&drains),
        authority: Arc::clone(&authority),
        // Ready (`/healthz?ready=true`, the readiness probe's `drain-agent probe --ready`)
        // once the pod listeners of the namespaces there at the start are open (or could not
        // be, http/pods/manager.rs): before, an upgrade's old agent would be stopped, and
        // detach its steering in pods this one does not serve yet.
        ready: if args.pod_listen.is_some() {
            crate::http::ready::Readiness::after_first_round()
        } else {
            crate::http::ready::Readiness::ready()
        },
        pod_steering: crate::http::pods::SteeringStop::default(),
        metrics_turn,
    });
    // The node's socket tables: they tell a local caller of the node listener, and a caller
    // from a node address of a pod listener, by its socket's owner.
    let sockets: Arc<dyn crate::http::identify::ClientSockets> =
        Arc::new(crate::http::identify::SocketTables);
    let identify = crate::http::identify::Identify {
        authority,
        sockets: Arc::clone(&sockets),
        tokens,
    };
    info!("serving on http://{address} (attached with {attach})");
    let stopper = tokio::spawn(process::stop_in_phases(
        process::StopSignals::install().first(),
        tasks.clone(),
        phase,
        args.shutdown_grace,
        Arc::clone(&tracker),
    ));
    let pods_task = match args.pod_listen {
        Some(addr) => {
            let options = PodListenOptions {
                addr,
                name_prefix: args.pod_netns_prefix.clone(),
                bind_only: args.pod_listen_bind,
                socket_port: args.pod_socket_port,
                max_listeners: crate::http::pods::listener_limit(
                    args.pod_max_listeners,
                    args.http_max_connections,
                    args.pod_http_max_connections,
                    args.agent_check_listen
                        .map(|_| crate::http::agentcheck::Limits::default()),
                ),
                handover: Arc::clone(&handover),
                tasks: tasks.clone(),
                limits: ServerLimits {
                    max_connections: args.pod_http_max_connections,
                    ..args.server_limits()
                },
            };
            // The same state, but the agent's own port there is the pod port.
            let pod_state = Arc::new(AppState {
                tracker: Arc::clone(&state.tracker),
                limits: WaitLimits {
                    own_port: Some(addr.port()),
                    own_netns: None,
                    ..state.limits
                },
                metrics: Arc::clone(&state.metrics),
                drains: Arc::clone(&state.drains),
                authority: Arc::clone(&state.authority),
                ready: state.ready.clone(),
                // One for the node's `/healthz` and the pods': the manager sets it.
                pod_steering: state.pod_steering.clone(),
                // Not served in a pod: the node listener's.
                metrics_turn: Arc::clone(&state.metrics_turn),
            });
            let endpoints: Arc<dyn OwnEndpoints> =
                Arc::new(kernel_side::KernelEndpoints(Arc::clone(&kernel)));
            let metrics = Arc::clone(&state.metrics);
            let phases = phases.clone();
            Some(tokio::spawn(async move {
                serve_in_pods(
                    options,
                    pod_state,
                    endpoints,
                    sockets,
                    &metrics,
                    phases,
                    pods_opened,
                )
                .await
            }))
        }
        None => {
            drop(pods_opened);
            None
        }
    };
    // The caller is identified before the server's `/drained` limits, which count it as
    // who it is (a user, a pod), not by its address; every answer names the instance, the
    // limits' 429s and identification's 401s too.
    let metrics = Arc::clone(&state.metrics);
    let served = crate::http::server::serve_handing_over(
        listener,
        tasks.guard_healthz(router(state)),
        |limited| {
            crate::http::naming_instance(
                limited.layer(axum::middleware::from_fn_with_state(
                    identify,
                    crate::http::identify::identify,
                )),
                &instance,
            )
        },
        args.server_limits(),
        metrics,
        reached(phases.clone(), StopPhase::HandingOver),
        reached(phases.clone(), StopPhase::AnsweringRest),
    )
    .await
    .context("the HTTP server failed");
    if served.is_err() {
        // The pod listeners stop too (the phase's sender is gone).
        stopper.abort();
    }
    // No walk starts from here on (one in progress keeps the kernel's lock until it ends:
    // waited for below, at most EXIT_WAIT).
    repair_task.abort();
    if let Some(pods_task) = pods_task {
        // The pod listeners shut down with the node's (their shutdown is bounded as well).
        // What each does under the kernel's lock once closed (`OwnEndpoints::forget`) is
        // not waited for here, but with the walk below and the blocking pool in `main`.
        match pods_task.await {
            Ok(Ok(())) => {}
            Ok(Err(problem)) => error!("the pod listeners failed: {problem:#}"),
            Err(problem) => error!("the pod listener task failed: {problem}"),
        }
    }
    // Every waiter answered before the grace ended: the rest of the stop needs no grace.
    stopper.abort();
    tracker.begin_shutdown();
    served?;
    // Drains in progress ended with the shutdown: let them write their records.
    drains.wait_all_ended(DRAIN_RECORDS_WAIT).await;
    // Closed at SIGTERM (or when the phases' sender went with a failed server): its last
    // connections are bounded.
    if let Some(task) = agent_check_task {
        let _ = tokio::time::timeout(AGENT_CHECK_STOP_WAIT, task).await;
    }
    event_task.abort();
    skip_task.abort();
    // A walk in progress holds the lock; it is waited for, but not for long.
    if !process::released_within(&kernel, EXIT_WAIT).await {
        warn!(
            "a walk of the sockets still runs after {EXIT_WAIT:?}: exiting without it; the next agent finishes what it left, as after a crash"
        );
        return tasks.outcome();
    }
    drop(kernel);
    if kernel_state.pinned() {
        info!("programs released; the pinned handler counts on for the next agent; bye");
    } else {
        info!("programs detached; bye");
    }
    // A watched task that ended stopped the agent: exit 1, so that it is restarted.
    tasks.outcome()
}
