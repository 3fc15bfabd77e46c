//! `drain-agent run`: wire the kernel side, the tracker and the HTTP server together, and
//! shut them down in order on SIGTERM or Ctrl-C.

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{MapData, RingBuf};
use log::{error, info, warn};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    cli::RunArgs,
    http::{AppState, WaitLimits, router},
    kernel::{Kernel, KernelOptions, parse_event},
    metrics::Metrics,
    tracker::Tracker,
};

/// Runs the agent until SIGTERM/Ctrl-C; exit status 0 after a clean shutdown, 1 on error.
pub fn main(args: RunArgs) -> ExitCode {
    crate::logging::init(&args.log_level, args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(problem) => Err(problem).context("cannot start the async runtime"),
    };
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
    match crate::fdlimit::raise_soft_limit() {
        Ok(limit) => log::debug!("open-file limit: {limit}"),
        Err(problem) => warn!("{problem:#}"),
    }
    ensure!(
        args.default_timeout <= args.max_timeout,
        "--default-timeout ({:?}) is longer than --max-timeout ({:?})",
        args.default_timeout,
        args.max_timeout
    );
    ensure!(args.max_waiters > 0, "--max-waiters must be at least 1");
    // Bind first: a port conflict is the most common start-up mistake, and it should not
    // cost a program load to find out.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (another agent or node_exporter there? choose one with --listen)",
                args.listen
            )
        })?;

    let mut kernel = Kernel::load(&KernelOptions {
        max_connections: args.max_connections,
        max_endpoints: args.max_endpoints,
        attach: args.attach,
        no_seed: args.no_seed,
    })?;
    // The agent's own API connections are not a service's: they take no slot.
    let own_netns = crate::netns::inode_of(std::path::Path::new("/proc/self/ns/net"))
        .context("cannot read the agent's own network namespace")?;
    kernel.ignore_own_endpoint(
        own_netns,
        listener.local_addr().context("listener address")?.port(),
    )?;
    let tracker = Arc::new(Tracker::new(kernel.maps(), args.max_waiters));
    let events = kernel
        .take_events()
        .context("the ring buffer was taken already")?;
    // A task that ends makes /healthz fail (crate::tasks), so the agent gets restarted.
    let tasks = crate::tasks::TaskWatch::default();
    let event_task = tasks.watch(
        "event reader",
        tokio::spawn(forward_events(events, Arc::clone(&tracker))),
    );
    if args.no_seed {
        info!("not counting connections opened before start (--no-seed)");
    } else {
        kernel.seed_existing_connections().context(
            "cannot count the connections that were open before the agent started \
             (run with --no-seed to count only new ones)",
        )?;
    }
    kernel.release_load_time_memory();
    let attach = kernel.attach_method();
    let can_walk = kernel.can_walk();
    let kernel = Arc::new(std::sync::Mutex::new(kernel));
    let repair_task = tasks.watch(
        "repair task",
        tokio::spawn(repair_missed_changes(
            Arc::clone(&kernel),
            Arc::clone(&tracker),
            args.repair_interval,
            can_walk,
        )),
    );

    let metrics = Arc::new(Metrics::new(
        Arc::clone(&tracker),
        args.ports.clone(),
        attach.name(),
        true,
    )?);
    let address = listener.local_addr().context("listener address")?;
    let state = Arc::new(AppState {
        tracker: Arc::clone(&tracker),
        limits: WaitLimits {
            default_timeout: args.default_timeout,
            max_timeout: args.max_timeout,
            own_port: Some(address.port()),
        },
        metrics,
    });
    info!("serving on http://{address} (attached with {attach})");
    let shutdown_tracker = Arc::clone(&tracker);
    crate::server::serve(
        listener,
        tasks.guard_healthz(router(state)),
        crate::server::ServerLimits::from_args(&args),
        async move {
            wait_for_stop_signal().await;
            info!("shutting down: answering open waiters");
            shutdown_tracker.begin_shutdown();
        },
    )
    .await
    .context("the HTTP server failed")?;
    event_task.abort();
    repair_task.abort();
    // A repair in progress holds the lock; taking it waits for that walk to end.
    drop(
        kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    drop(kernel);
    info!("programs detached; bye");
    Ok(())
}

/// The shortest time between two repair walks started by skipped handler runs.
const REPAIR_GAP: Duration = Duration::from_secs(5);
/// The shortest time between two walks started by a lasting doubt (a full map, a
/// namespace that cannot be entered): each walk may clear it, but none is likely to soon.
const DOUBT_GAP: Duration = Duration::from_secs(30);
/// How often idle endpoints are reclaimed.
const RECLAIM_EVERY: Duration = Duration::from_secs(10);

/// Walks the open sockets to repair missed state changes: soon after the kernel reports
/// that it skipped the handler (checked every second, walks at most every [`REPAIR_GAP`]),
/// while the agent cannot vouch for its counts (at most every [`DOUBT_GAP`]), and every
/// `interval` (0: only then). Also reclaims idle endpoints, and logs each doubt about the
/// agent's health once when it appears and once when it clears.
async fn repair_missed_changes(
    kernel: Arc<std::sync::Mutex<Kernel>>,
    tracker: Arc<Tracker>,
    interval: Duration,
    can_walk: bool,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut skipped_seen = 0;
    let mut last_walk = tokio::time::Instant::now();
    let mut last_reclaim = tokio::time::Instant::now();
    let mut reported: std::collections::BTreeSet<crate::doubt::Doubt> = Default::default();
    loop {
        tick.tick().await;
        let doubts: std::collections::BTreeSet<_> = tracker.health_doubts().into_iter().collect();
        for doubt in doubts.difference(&reported) {
            warn!(
                "cannot vouch for every count: {doubt}; /drained confirms with the socket tables or answers 503"
            );
        }
        for doubt in reported.difference(&doubts) {
            info!("resolved: {doubt}");
        }
        let doubted = !doubts.is_empty();
        reported = doubts;
        let kernel = Arc::clone(&kernel);
        let periodic = !interval.is_zero() && last_walk.elapsed() >= interval;
        // A walk costs a pass over every socket; under a steady trickle of skipped runs,
        // walk at most every REPAIR_GAP (a skipped change is repaired within that).
        let may_walk = can_walk && (periodic || last_walk.elapsed() >= REPAIR_GAP);
        let doubt_walk = doubted && last_walk.elapsed() >= DOUBT_GAP;
        let reclaim = last_reclaim.elapsed() >= RECLAIM_EVERY;
        if reclaim {
            last_reclaim = tokio::time::Instant::now();
        }
        let outcome = tokio::task::spawn_blocking(
            move || -> Result<Option<(u64, crate::kernel::RepairReport)>> {
                let mut kernel = kernel
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if reclaim
                    && let Err(problem) = kernel.reclaim_idle_endpoints(crate::kernel::RECLAIM_IDLE)
                {
                    warn!("cannot reclaim idle endpoints: {problem:#}");
                }
                let skipped = kernel.handler_skipped_runs()?;
                if !may_walk || (skipped == skipped_seen && !periodic && !doubt_walk) {
                    return Ok(None);
                }
                Ok(Some((skipped, kernel.repair()?)))
            },
        )
        .await;
        match outcome {
            Ok(Ok(None)) => {}
            Ok(Ok(Some((skipped, report)))) => {
                if skipped > skipped_seen {
                    info!(
                        "the kernel skipped the handler {} time(s); repaired {} missed open(s) and {} missed close(s)",
                        skipped - skipped_seen,
                        report.opens_found,
                        report.closes_found
                    );
                } else if report.opens_found + report.closes_found > 0 {
                    warn!(
                        "walk repaired {} missed open(s) and {} missed close(s)",
                        report.opens_found, report.closes_found
                    );
                }
                skipped_seen = skipped;
                last_walk = tokio::time::Instant::now();
            }
            Ok(Err(problem)) => {
                warn!("cannot repair missed state changes: {problem:#}");
                // Do not hammer a failing walk: wait for the next interval.
                last_walk = tokio::time::Instant::now();
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Err(problem) => warn!("repair task failed: {problem}"),
        }
    }
}

async fn wait_for_stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(problem) => {
                warn!("cannot listen for SIGTERM: {problem}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Wakes the waiters of a port whenever the kernel says one of its endpoints crossed zero.
/// If the ring buffer ever overflows (the kernel counts it), every waiter re-reads once.
async fn forward_events(ring: RingBuf<MapData>, tracker: Arc<Tracker>) {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, until dropped,
    // and the AsyncFd owns the ring buffer.
    let mut ring = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(ring) => ring,
        Err(problem) => {
            let (_, problem) = problem.into_parts();
            error!(
                "cannot watch the event ring buffer: {problem}; waiters will only answer on timeout"
            );
            return;
        }
    };
    let mut lost_seen = lost_events(&tracker);
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(problem) => {
                        error!("event ring buffer failed: {problem}");
                        return;
                    }
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(event) = parse_event(&item) {
                        tracker.notify_port(event.key.port);
                    }
                }
                guard.clear_ready();
            }
            _ = lost_check.tick() => {
                let lost = lost_events(&tracker);
                if lost > lost_seen {
                    warn!("{} wake-up events were lost (ring buffer full); waking every waiter", lost - lost_seen);
                    lost_seen = lost;
                    tracker.notify_all();
                }
            }
        }
    }
}

fn lost_events(tracker: &Tracker) -> u64 {
    tracker
        .tracking_errors()
        .ok()
        .and_then(|errors| {
            errors
                .into_iter()
                .find(|(name, _)| *name == "event_lost")
                .map(|(_, count)| count)
        })
        .unwrap_or(0)
}
