//! Wake-up channels: per waiter, a `watch` channel the ring-buffer reader bumps whenever
//! a count of its scope may have crossed zero, and a queue of the tracked opens and closes
//! in its scope, so that a waiter sleeps until something that concerns it happens.
//!
//! Per waiter, not per port: every pod's hook waits on the same port number (8080), each
//! scoped to its own namespace, and an event of one pod must neither wake another pod's
//! waiter (a re-read of its count, a pass over the whole endpoint map) nor fill its
//! backlog (a waiter that falls behind counts what it missed as arrivals of its own).
//! So each event goes only to the waiters whose scope holds its endpoint.
//!
//! No wake-up is lost by that: a waiter's count is its scope's endpoints added up (or, for
//! a port-only waiter, the port's total, and every endpoint of the port is in its scope).
//! The change that brings that count to 0, or off it, is a change of one of those
//! endpoints, and the kernel follows it with an event of that endpoint marked as a
//! crossing (`emit_event` in the eBPF `track.rs`: each counter's last decrement reads
//! the 0 it leaves): an event in the waiter's scope. An endpoint outside the scope moves
//! no count the waiter reads. What cannot be attributed still goes to every waiter of
//! the port: a wake-up without an event ([`PortChannels::notify`], a repair walk's
//! [`PortChannels::notify_all`]) and a loss of events ([`Heard::Lost`]).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Result;
use tokio::sync::{
    mpsc::{self, error::TrySendError},
    watch,
};

use super::source::{Filter, Source, monotonic_ns};

/// A tracked open or close on a watched port, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionEvent {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
    pub remote: IpAddr,
    pub opened: bool,
    /// A count moved between 0 and 1 (the waiters whose scope holds the endpoint re-read).
    pub crossing: bool,
    /// CLOCK_MONOTONIC nanoseconds of the change.
    pub at_ns: u64,
}

/// Events of its scope kept per waiter until it reads them; a waiter that falls further
/// behind treats those it missed as arrivals now (the safe side: a longer quiet window).
/// Only its own scope's events count towards it: another pod's traffic never makes it
/// fall behind.
const EVENT_BACKLOG: usize = 1024;

/// One waiter's end of its port's channel: its scope, and how to wake it and tell it of
/// an event.
struct Listener {
    /// Tells this listener from the port's others (to remove it).
    id: u64,
    scope: Filter,
    changes: watch::Sender<u64>,
    events: mpsc::Sender<ConnectionEvent>,
    /// Events of its scope that did not fit in its backlog, not yet heard.
    missed: Arc<AtomicU64>,
}

impl Listener {
    /// This waiter re-reads its count.
    fn wake(&self) {
        self.changes
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// An event of its scope: a crossing wakes it, and the event joins its backlog (or is
    /// counted as missed when the backlog is full).
    fn tell(&self, event: ConnectionEvent) {
        if event.crossing {
            self.wake();
        }
        match self.events.try_send(event) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.missed.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// The waiters of one port.
#[derive(Default)]
struct PortChannel {
    listeners: Vec<Listener>,
}

impl PortChannel {
    /// Every waiter of the port re-reads its count.
    fn wake(&self) {
        self.listeners.iter().for_each(Listener::wake);
    }
}

/// Wakes the waiters of one port when a count of their scope may have crossed zero.
#[derive(Default)]
pub(super) struct PortChannels {
    ports: Mutex<HashMap<u16, PortChannel>>,
    /// The next [`Listener::id`].
    next_id: AtomicU64,
    /// Times a loss of events was noticed (the kernel's ring buffer was full), and the last
    /// notice: every waiter hears it once as [`Heard::Lost`]. The notice is written before
    /// the count moves, so a waiter that sees the count move reads that notice or a later one.
    losses: AtomicU64,
    last_loss: Mutex<LostNotice>,
}

/// When a loss of events was noticed, and the kernel's count of lost events then.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct LostNotice {
    /// CLOCK_MONOTONIC ns of the notice.
    pub at_ns: u64,
    /// The kernel's `event_lost` counter read for it: every loss it counts happened before.
    pub lost: u64,
}

impl PortChannels {
    fn lock(&self) -> MutexGuard<'_, HashMap<u16, PortChannel>> {
        self.ports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn notify(&self, port: u16) {
        if let Some(channel) = self.lock().get(&port) {
            channel.wake();
        }
    }

    pub(super) fn notify_all(&self) {
        self.lock().values().for_each(PortChannel::wake);
    }

    /// Events were lost (the kernel's counter of lost events reads `lost`): any port may
    /// have had arrivals nobody heard of. Every waiter hears it once ([`Heard::Lost`]) and
    /// re-reads its count.
    pub(super) fn events_lost(&self, lost: u64) {
        *self
            .last_loss
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = LostNotice {
            at_ns: monotonic_ns(),
            lost,
        };
        self.losses.fetch_add(1, Ordering::AcqRel);
        self.notify_all();
    }

    /// An open or close: told to the waiters of its port whose scope holds its endpoint
    /// (a few comparisons a waiter of the port), none of the others (see the module's
    /// comment for why no wake-up is lost).
    pub(super) fn publish(&self, event: ConnectionEvent) {
        if let Some(channel) = self.lock().get(&event.port) {
            channel
                .listeners
                .iter()
                .filter(|listener| {
                    listener
                        .scope
                        .matches_parts(event.netns, event.addr, event.port)
                })
                .for_each(|listener| listener.tell(event));
        }
    }

    /// Subscribes to the wake-ups and events of `scope`; the first waiter on a port asks
    /// `source` to announce its zero crossings.
    pub(super) fn watch<'a>(
        &'a self,
        scope: &Filter,
        source: &'a dyn Source,
    ) -> Result<PortWatch<'a>> {
        let port = scope.port;
        let mut ports = self.lock();
        let channel = ports.entry(port).or_default();
        if channel.listeners.is_empty()
            && let Err(problem) = source.watch_port(port, true)
        {
            ports.remove(&port);
            return Err(problem);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (changes, changes_heard) = watch::channel(0);
        let (events, events_heard) = mpsc::channel(EVENT_BACKLOG);
        let missed = Arc::new(AtomicU64::new(0));
        channel.listeners.push(Listener {
            id,
            scope: scope.clone(),
            changes,
            events,
            missed: Arc::clone(&missed),
        });
        Ok(PortWatch {
            channels: self,
            source,
            port,
            id,
            changes: changes_heard,
            events: events_heard,
            missed,
            losses_heard: self.losses.load(Ordering::Acquire),
        })
    }
}

/// What a waiter heard on its port's stream of events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Heard {
    Event(ConnectionEvent),
    /// It fell this many events of its scope behind, noticed at `at_ns`.
    Missed {
        count: u64,
        at_ns: u64,
    },
    /// The kernel lost events (of any port: how many of this one's, and which, is not
    /// known).
    Lost(LostNotice),
}

/// A waiter's subscription to its scope; the last one of a port to leave unwatches it.
pub(super) struct PortWatch<'a> {
    channels: &'a PortChannels,
    source: &'a dyn Source,
    port: u16,
    /// Its [`Listener::id`].
    id: u64,
    changes: watch::Receiver<u64>,
    events: mpsc::Receiver<ConnectionEvent>,
    /// [`Listener::missed`].
    missed: Arc<AtomicU64>,
    /// [`PortChannels::losses`] when last heard.
    losses_heard: u64,
}

impl PortWatch<'_> {
    /// Marks the current generation seen: call it *before* reading the count, so that a
    /// change landing between the read and the sleep still wakes the waiter.
    pub(super) fn mark_seen(&mut self) {
        self.changes.borrow_and_update();
    }

    /// The next thing already heard, without waiting: a loss of events first, then events
    /// missed, then the events of the backlog.
    pub(super) fn try_hear(&mut self) -> Option<Heard> {
        let losses = self.channels.losses.load(Ordering::Acquire);
        if losses != self.losses_heard {
            self.losses_heard = losses;
            return Some(Heard::Lost(
                *self
                    .channels
                    .last_loss
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            ));
        }
        self.missed()
            .or_else(|| self.events.try_recv().ok().map(Heard::Event))
    }

    /// The events of its scope that did not fit in its backlog since last heard, if any.
    /// Only a full backlog misses one, and a full backlog is never waited on: `woken`
    /// returns at once, and the next `woken` or `try_hear` hears what was missed.
    fn missed(&self) -> Option<Heard> {
        let count = self.missed.swap(0, Ordering::AcqRel);
        (count > 0).then(|| Heard::Missed {
            count,
            at_ns: monotonic_ns(),
        })
    }

    /// Sleeps until a count of its scope may have crossed zero (None) or an event of its
    /// scope comes (Some): events missed first.
    pub(super) async fn woken(&mut self) -> Option<Heard> {
        if let Some(missed) = self.missed() {
            return Some(missed);
        }
        tokio::select! {
            changed = self.changes.changed() => {
                if changed.is_err() {
                    // The channel never closes while the tracker lives; be safe anyway: the
                    // waiter's other wake-ups (events, its clock, shutdown) still come.
                    std::future::pending::<()>().await;
                }
                None
            }
            received = self.events.recv() => match received {
                Some(event) => Some(Heard::Event(event)),
                // Closed: as above, never while the waiter is listed.
                None => std::future::pending().await,
            },
        }
    }
}

impl Drop for PortWatch<'_> {
    fn drop(&mut self) {
        let mut ports = self.channels.lock();
        let Some(channel) = ports.get_mut(&self.port) else {
            return;
        };
        channel.listeners.retain(|listener| listener.id != self.id);
        if channel.listeners.is_empty() {
            ports.remove(&self.port);
            if let Err(problem) = self.source.watch_port(self.port, false) {
                log::warn!("cannot unwatch port {}: {problem:#}", self.port);
            }
        }
    }
}
