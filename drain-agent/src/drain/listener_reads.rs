//! The listener reads of held gates, shared by the questions about them.
//!
//! A question about a held gate (`/health`, the agent-check: anyone may ask) needs the
//! scope's listeners ([`Closer::listeners`]: a scan of /proc for the namespaces, a thread
//! entering each, a sock_diag dump). That read runs on a blocking thread, never on an async
//! worker nor under the registry's `held` lock; at most one read of a scope is in flight,
//! the questions arriving meanwhile wait for it, and a read that started less than
//! [`LISTENERS_FRESH`] ago answers the questions after it. So a flood of questions costs
//! at most one read per scope per interval. Safe: a read never reopens a gate by itself
//! failing, and a new instance's listener is seen by the first read that starts after it
//! listens, at most [`LISTENERS_FRESH`] (and a read's duration) later; the gate stays
//! closed meanwhile, the fail-closed direction.
//!
//! A read is used for a hold only if it started after the hold was made ([`Serial`]): a
//! read from before a drain's end may hold a listener gone by then, which that end's read
//! did not see and would take for a new instance (a gate reopened too early).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::{sync::watch, time::Instant};

use crate::{closer::Closer, drain::lock, tracker::Filter};

/// How long a listener read answers for the questions about a held gate of its scope after
/// it started: a new instance's listener reopens the gate at most this much (and a read)
/// later; until then the gate stays closed.
pub const LISTENERS_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// One read's outcome: the listeners' cookies, or why they could not be read.
pub(super) type Read = Result<Arc<[u64]>, Arc<anyhow::Error>>;

/// Reads are numbered in the order they start: a hold (or another agent's file read) takes
/// a mark ([`ListenerReads::mark`]), and only reads numbered above it are its.
pub(super) type Serial = u64;

/// How many reads are kept before those neither in flight nor fresh are dropped.
const PRUNE_FROM: usize = 64;

/// The reads by scope (the filter given to [`Closer::listeners`]).
#[derive(Default)]
pub(super) struct ListenerReads {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: Serial,
    by_filter: HashMap<Filter, Slot>,
}

/// The last read of a filter.
struct Slot {
    serial: Serial,
    started: Instant,
    /// `None` while the read runs.
    outcome: watch::Receiver<Option<Read>>,
}

impl Slot {
    /// The read's outcome; `None` while it runs. One whose thread ended without one (a
    /// panic) failed.
    fn outcome(&self) -> Option<Read> {
        outcome_of(&self.outcome)
    }

    fn fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.started) < LISTENERS_FRESH
    }
}

/// See [`Slot::outcome`]: whether the sender is gone is looked at first, so a value sent
/// just before is not taken for a missing one.
fn outcome_of(outcome: &watch::Receiver<Option<Read>>) -> Option<Read> {
    let ended = outcome.has_changed().is_err();
    match outcome.borrow().as_ref() {
        Some(read) => Some(read.clone()),
        None if ended => Some(Err(Arc::new(anyhow::anyhow!(
            "the listener read ended without an answer"
        )))),
        None => None,
    }
}

impl ListenerReads {
    /// A mark: every read that starts from now on has a number above it (a hold made now
    /// takes those), and no other mark is this one (it tells a hold from a later one of
    /// its scope).
    pub(super) fn mark(&self) -> Serial {
        let mut inner = lock(&self.inner);
        let mark = inner.next;
        inner.next += 1;
        mark
    }

    /// `filter`'s listeners as `closer` reads them, by a read numbered above `from`:
    /// the one in flight, else the last one if it started within [`LISTENERS_FRESH`], else
    /// one started now on a blocking thread. A read in flight numbered `from` or below (it
    /// started before the mark) is waited for, one read of a filter at a time, and then
    /// another is started.
    pub(super) async fn read(
        &self,
        closer: &Arc<dyn Closer>,
        filter: &Filter,
        from: Serial,
    ) -> Read {
        loop {
            let (mut outcome, ours) = {
                let mut inner = lock(&self.inner);
                let now = Instant::now();
                match inner.by_filter.get(filter) {
                    Some(slot) if slot.serial > from => match slot.outcome() {
                        None => (slot.outcome.clone(), true),
                        Some(read) if slot.fresh(now) => return read,
                        Some(_) => (inner.start(closer, filter, now), true),
                    },
                    Some(slot) if slot.outcome().is_none() => (slot.outcome.clone(), false),
                    _ => (inner.start(closer, filter, now), true),
                }
            };
            // Err: the read's thread ended without an answer, which `outcome_of` says.
            let _ = outcome.wait_for(Option::is_some).await;
            if ours {
                return outcome_of(&outcome).unwrap_or_else(|| {
                    Err(Arc::new(anyhow::anyhow!(
                        "the listener read ended without an answer"
                    )))
                });
            }
        }
    }
}

impl Inner {
    /// Starts a read of `filter` on a blocking thread; its outcome comes on the receiver.
    fn start(
        &mut self,
        closer: &Arc<dyn Closer>,
        filter: &Filter,
        now: Instant,
    ) -> watch::Receiver<Option<Read>> {
        if self.by_filter.len() >= PRUNE_FROM {
            self.by_filter
                .retain(|_, slot| slot.outcome().is_none() || slot.fresh(now));
        }
        let (sender, outcome) = watch::channel(None);
        let serial = self.next;
        self.next += 1;
        self.by_filter.insert(
            filter.clone(),
            Slot {
                serial,
                started: now,
                outcome: outcome.clone(),
            },
        );
        let (closer, filter) = (Arc::clone(closer), filter.clone());
        // Runs to its end whoever still waits: a question that goes away neither cancels
        // it nor makes the next one start another.
        drop(tokio::task::spawn_blocking(move || {
            let read = closer.listeners(&filter).map(Arc::from).map_err(Arc::new);
            sender.send_replace(Some(read));
        }));
        outcome
    }
}
