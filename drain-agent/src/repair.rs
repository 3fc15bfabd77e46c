//! The repair scheduler: when to walk the open sockets again (skipped handler runs, lasting
//! doubts, the periodic walk), when to reclaim idle endpoints, and logging each doubt about
//! the agent's health once when it appears and once when it clears. The walks themselves
//! are `kernel::Kernel::repair`.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use anyhow::Result;
use log::{info, warn};

use crate::{
    doubt::Doubt,
    kernel::{Kernel, KernelMaps, RECLAIM_IDLE, RepairReport},
    tracker::Tracker,
};

/// How often the handler's skipped runs are read: each may be a missed close that leaves a
/// waiter's count too high, and waiters woken by it look at the socket tables at once.
const SKIP_WATCH: Duration = Duration::from_millis(100);

/// Wakes every waiter when the kernel skipped the handler (a cheap read of
/// `recursion_misses`, apart from the walks, which take the kernel lock).
pub async fn watch_skipped_runs(maps: Arc<KernelMaps>, tracker: Arc<Tracker>) {
    let mut tick = tokio::time::interval(SKIP_WATCH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seen = maps.handler_skipped_runs().unwrap_or(0);
    loop {
        tick.tick().await;
        if let Ok(now) = maps.handler_skipped_runs()
            && now > seen
        {
            seen = now;
            tracker.notify_all();
        }
    }
}

/// The shortest time between two repair walks started by skipped handler runs.
const REPAIR_GAP: Duration = Duration::from_secs(5);
/// The shortest time between two walks started by a lasting doubt (a full map, a
/// namespace that cannot be entered): each walk may clear it, but none is likely to soon.
const DOUBT_GAP: Duration = Duration::from_secs(30);
/// How often idle endpoints are reclaimed.
const RECLAIM_EVERY: Duration = Duration::from_secs(10);

/// How the repair task's first walk begins.
pub enum FirstWalk {
    /// `--no-seed`: repairs only.
    None,
    /// Count the connections open before the agent started (`Kernel::seed_existing_connections`)
    /// once `ready` fires (the pod listeners are open: they need the kernel's lock for a moment
    /// each, and the seeding holds it for its whole walk) or after [`SEED_AFTER_AT_MOST`].
    /// Until the seeding has ended every answer is doubted (`Doubt::Seeding`) and confirmed
    /// with the socket tables: the agent serves meanwhile, never answering "drained" from
    /// counts that miss what was open before it.
    Seed {
        ready: tokio::sync::oneshot::Receiver<()>,
    },
}

/// The longest the seeding waits for the pod listeners to be open.
pub const SEED_AFTER_AT_MOST: Duration = Duration::from_secs(3);

/// The seeding walk, retried every [`REPAIR_GAP`] until it succeeds (the doubt stands
/// meanwhile: answers are confirmed with the socket tables).
async fn seed(kernel: &Arc<std::sync::Mutex<Kernel>>, ready: tokio::sync::oneshot::Receiver<()>) {
    let _ = tokio::time::timeout(SEED_AFTER_AT_MOST, ready).await;
    loop {
        let kernel = Arc::clone(kernel);
        let seeded = tokio::task::spawn_blocking(move || {
            let mut kernel = kernel
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let seeded = kernel.seed_existing_connections().map(|_| ());
            kernel.release_load_time_memory();
            seeded
        })
        .await;
        match seeded {
            Ok(Ok(())) => return,
            Ok(Err(problem)) => warn!(
                "cannot count the connections that were open before the agent started: {problem:#}; answers stay confirmed with the socket tables, retrying in {REPAIR_GAP:?}"
            ),
            Err(problem) => warn!("the seeding walk failed: {problem}; retrying in {REPAIR_GAP:?}"),
        }
        tokio::time::sleep(REPAIR_GAP).await;
    }
}

/// Walks the open sockets to repair missed state changes: soon after the kernel reports
/// that it skipped the handler, an open found a dead socket's entry at its address, or a
/// close came during a sweep and was left to a walk (checked every second, walks at most every [`REPAIR_GAP`]),
/// while the agent cannot vouch for its counts (at most every [`DOUBT_GAP`]), and every
/// `interval` (0: only then). Also reclaims idle endpoints, and logs each doubt about the
/// agent's health once when it appears and once when it clears.
pub async fn repair_missed_changes(
    kernel: Arc<std::sync::Mutex<Kernel>>,
    tracker: Arc<Tracker>,
    interval: Duration,
    can_walk: bool,
    first: FirstWalk,
) {
    if let FirstWalk::Seed { ready } = first {
        seed(&kernel, ready).await;
        // A close at a drain's deadline waits for this (`Tracker::seeded`): only tracked
        // connections can be closed.
        tracker.walk_ended();
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut missed_seen = 0;
    let mut last_walk = tokio::time::Instant::now();
    let mut last_reclaim = tokio::time::Instant::now();
    let mut reported: BTreeSet<Doubt> = BTreeSet::new();
    loop {
        tick.tick().await;
        let doubts: BTreeSet<Doubt> = tracker.health_doubts().into_iter().collect();
        for doubt in doubts.difference(&reported) {
            warn!(
                "cannot vouch for every count: {doubt}; /drained confirms with the socket tables or answers 503"
            );
        }
        for doubt in reported.difference(&doubts) {
            info!("resolved: {doubt}");
        }
        // A limit of the kernel (old kernels: `kernel::version`) is no reason to walk.
        let doubted = doubts.iter().any(Doubt::walk_may_clear);
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
        let outcome =
            tokio::task::spawn_blocking(move || -> Result<Option<(u64, RepairReport)>> {
                let mut kernel = kernel
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if reclaim && let Err(problem) = kernel.reclaim_idle_endpoints(RECLAIM_IDLE) {
                    warn!("cannot reclaim idle endpoints: {problem:#}");
                }
                let missed = kernel.missed_changes()?;
                if !may_walk || (missed == missed_seen && !periodic && !doubt_walk) {
                    return Ok(None);
                }
                Ok(Some((missed, kernel.repair()?)))
            })
            .await;
        match outcome {
            Ok(Ok(None)) => {}
            Ok(Ok(Some((missed, report)))) => {
                if missed > missed_seen {
                    info!(
                        "the handler missed {} state change(s) (skipped runs, opens at a dead socket's address, or closes left to a walk); repaired {} missed open(s) and {} missed close(s)",
                        missed - missed_seen,
                        report.opens_found,
                        report.closes_found
                    );
                } else if report.opens_found + report.closes_found > 0 {
                    warn!(
                        "walk repaired {} missed open(s) and {} missed close(s)",
                        report.opens_found, report.closes_found
                    );
                }
                missed_seen = missed;
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
