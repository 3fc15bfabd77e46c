//! The process around the agent: its allocator tuning, its async runtime and the stop
//! signals.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};

use crate::{http::handover::StopPhase, tasks::TaskWatch, tracker::Tracker};

/// How long the exit waits for work on blocking threads (a walk of the sockets, a pass over
/// the socket tables) before it leaves without it.
pub const EXIT_WAIT: Duration = Duration::from_secs(3);

/// Whether `shared`'s lock could be taken within `wait` (a walk holding it has ended).
pub async fn released_within<T: Send + 'static>(shared: &Arc<Mutex<T>>, wait: Duration) -> bool {
    let shared = Arc::clone(shared);
    let taken = tokio::task::spawn_blocking(move || {
        drop(
            shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    });
    matches!(tokio::time::timeout(wait, taken).await, Ok(Ok(())))
}

/// The runtime the agent runs on: two workers (the agent mostly waits), with the
/// allocator tuned for them first.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// glibc gives every thread that allocates its own arena (up to 8 per core), and waves of
/// waiters touch many threads (workers, blocking pool): memory then plateaus far above
/// what is in use. Two arenas are plenty for an agent with two workers.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The stop, in phases (handover.rs): at `signal` (SIGTERM or Ctrl-C) the listeners close
/// (the next agent takes new and queued connections) and the waiters get their usual
/// answers for up to `grace` (--shutdown-grace); then the rest are answered
/// `agent_shutdown`.
///
/// When one of the watched `tasks` ends (`crate::tasks`: the event reader, the repair
/// task, …) the agent cannot keep its answers on time, and it stops the same way, but
/// without the grace: no next agent can start beside it before it exits (its supervisor
/// restarts it once it has: `agent::main` exits 1), so its waiters are answered
/// `agent_shutdown` at once, with `Retry-After`, and `drain-agent wait` asks the next
/// agent. A task that ends during a SIGTERM's grace ends the grace likewise.
pub async fn stop_in_phases(
    signal: impl Future<Output = ()>,
    tasks: TaskWatch,
    phase: watch::Sender<StopPhase>,
    grace: Duration,
    tracker: Arc<Tracker>,
) {
    let grace = tokio::select! {
        () = signal => {
            info!(
                "stopping: listeners closed (an agent beside this one takes new connections); open waiters get their usual answers for up to {grace:?} (--shutdown-grace)"
            );
            grace
        }
        ended = tasks.first_end() => {
            warn!(
                "stopping because {ended}: listeners closed, the waiters answered agent_shutdown at once (no grace: no next agent can start beside this one), then exiting 1 for the supervisor to restart the agent"
            );
            Duration::ZERO
        }
    };
    phase.send_replace(StopPhase::HandingOver);
    tokio::select! {
        () = tokio::time::sleep(grace) => {
            info!("shutdown grace over: answering the waiters left (agent_shutdown)");
        }
        ended = tasks.first_end(), if !grace.is_zero() => {
            warn!(
                "{ended} during the shutdown grace: answering the waiters left now (agent_shutdown), then exiting 1"
            );
        }
    }
    tracker.begin_shutdown();
    phase.send_replace(StopPhase::AnsweringRest);
}

/// SIGTERM and SIGINT, caught from the moment [`StopSignals::install`] returns.
pub struct StopSignals {
    terminate: Option<Signal>,
    interrupt: Option<Signal>,
}

impl StopSignals {
    /// Installs the handlers now, before the agent serves. Registered by the stop task when
    /// it was first polled, they could come late: under load the agent answered `/healthz`
    /// first, and a SIGTERM right after it (a supervisor that saw it healthy) killed it with
    /// the signal's default action, no stop in phases, no hand-over.
    pub fn install() -> Self {
        let catch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(caught) => Some(caught),
            Err(problem) => {
                warn!("cannot catch {name}: {problem}");
                None
            }
        };
        Self {
            terminate: catch(SignalKind::terminate(), "SIGTERM"),
            interrupt: catch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Resolves at the first SIGTERM or SIGINT since [`StopSignals::install`].
    pub async fn first(mut self) {
        async fn next(signal: Option<&mut Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = next(self.terminate.as_mut()) => {}
            () = next(self.interrupt.as_mut()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop during a long walk did not end within 10 s (the bench, 100k connections):
    /// the wait for the walk's lock is bounded.
    #[tokio::test]
    async fn the_wait_for_a_walk_is_bounded() {
        let shared = Arc::new(Mutex::new(()));
        let (held, release) = std::sync::mpsc::channel::<()>();
        let walker = {
            let shared = Arc::clone(&shared);
            let (started, running) = std::sync::mpsc::channel();
            let walker = std::thread::spawn(move || {
                let _walk = shared.lock().expect("lock");
                started.send(()).expect("started");
                // The walk: until the test lets it go (at most 20 s).
                let _ = release.recv_timeout(Duration::from_secs(20));
            });
            running.recv().expect("running");
            walker
        };
        let asked = std::time::Instant::now();
        assert!(!released_within(&shared, Duration::from_millis(200)).await);
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "{:?}",
            asked.elapsed()
        );
        held.send(()).expect("release");
        walker.join().expect("walker");
        assert!(released_within(&shared, Duration::from_secs(5)).await);
    }
}

#[cfg(test)]
mod task_end_tests {
    use super::*;
    use crate::tracker::fake::FakeSource;

    /// A watched task named `name` that ends when the sender is used.
    fn task_that_ends(tasks: &TaskWatch, name: &'static str) -> tokio::sync::oneshot::Sender<()> {
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        tasks.watch(
            name,
            tokio::spawn(async move {
                let _ = ended.await;
            }),
        );
        end
    }

    /// The stop reaches `AnsweringRest` at once (not after a grace), the tracker answers its
    /// waiters as shutting down, and the stop task ends.
    async fn answers_the_rest_at_once(
        phases: &mut watch::Receiver<StopPhase>,
        stopper: tokio::task::JoinHandle<()>,
        tracker: &Tracker,
    ) {
        tokio::time::timeout(
            Duration::from_secs(5),
            phases.wait_for(|phase| *phase == StopPhase::AnsweringRest),
        )
        .await
        .expect("the stop reaches AnsweringRest at once, not after the grace")
        .expect("phases");
        assert!(tracker.shutting_down());
        tokio::time::timeout(Duration::from_secs(5), stopper)
            .await
            .expect("the stop task ends")
            .expect("stopper");
    }

    /// Audit: a watched task that ended (the event reader, the repair task) only made
    /// `/healthz` fail, and nothing restarted the agent under systemd: it served on, its
    /// waiters never woken. Now the end of one stops the agent as SIGTERM does, without the
    /// grace (no next agent starts beside it before it exits): listeners closed, then every
    /// waiter answered `agent_shutdown`.
    #[tokio::test]
    async fn a_task_that_ends_stops_the_agent_without_the_grace() {
        let tracker = Arc::new(Tracker::new(Arc::new(FakeSource::default()), 4));
        let tasks = TaskWatch::default();
        let (phase, mut phases) = watch::channel(StopPhase::Serving);
        let end = task_that_ends(&tasks, "event reader");
        // No signal ever comes; the DaemonSet's grace.
        let stopper = tokio::spawn(stop_in_phases(
            std::future::pending(),
            tasks.clone(),
            phase,
            Duration::from_secs(600),
            Arc::clone(&tracker),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*phases.borrow(), StopPhase::Serving);
        assert!(!tracker.shutting_down());

        end.send(()).expect("end the task");
        answers_the_rest_at_once(&mut phases, stopper, &tracker).await;
        let outcome = tasks.outcome().expect_err("the agent exits 1");
        assert!(
            outcome.to_string().contains("the event reader ended"),
            "{outcome:#}"
        );
    }

    /// A task that ends during a SIGTERM's grace ends the grace: the waiters it would have
    /// woken (or kept counted right) are answered `agent_shutdown` at once, not at their
    /// timeouts.
    #[tokio::test]
    async fn a_task_that_ends_during_the_grace_ends_it() {
        let tracker = Arc::new(Tracker::new(Arc::new(FakeSource::default()), 4));
        let tasks = TaskWatch::default();
        let (phase, mut phases) = watch::channel(StopPhase::Serving);
        let end = task_that_ends(&tasks, "repair task");
        let (sigterm, signal) = tokio::sync::oneshot::channel::<()>();
        let stopper = tokio::spawn(stop_in_phases(
            async move {
                let _ = signal.await;
            },
            tasks.clone(),
            phase,
            Duration::from_secs(600),
            Arc::clone(&tracker),
        ));
        sigterm.send(()).expect("SIGTERM");
        tokio::time::timeout(
            Duration::from_secs(5),
            phases.wait_for(|phase| *phase == StopPhase::HandingOver),
        )
        .await
        .expect("the stop starts")
        .expect("phases");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*phases.borrow(), StopPhase::HandingOver, "in the grace");
        assert!(!tracker.shutting_down());

        end.send(()).expect("end the task");
        answers_the_rest_at_once(&mut phases, stopper, &tracker).await;
        assert!(tasks.outcome().is_err(), "the agent exits 1");
    }
}

#[cfg(test)]
mod signal_tests {
    use super::*;

    /// A SIGTERM sent once `install` has returned, before anybody waits, is not lost (and
    /// does not kill the test process with the default action).
    #[tokio::test]
    async fn a_signal_right_after_install_is_caught() {
        let signals = StopSignals::install();
        // SAFETY: a signal to this very process, whose handler is installed above.
        unsafe { libc::raise(libc::SIGINT) };
        tokio::time::timeout(Duration::from_secs(5), signals.first())
            .await
            .expect("the signal is seen");
    }
}
