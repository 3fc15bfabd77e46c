//! Wake-up channels: per watched port, a `watch` channel the ring-buffer reader bumps
//! whenever an endpoint's count may have crossed zero, and a `broadcast` of every tracked
//! open and close, so that a waiter sleeps until something that concerns it happens.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Result;
use tokio::sync::{
    broadcast::{self, error::TryRecvError},
    watch,
};

use super::source::{Source, monotonic_ns};

/// A tracked open or close on a watched port, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionEvent {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
    pub remote: IpAddr,
    pub opened: bool,
    /// A count moved between 0 and 1 (waiters of the port must re-read).
    pub crossing: bool,
    /// CLOCK_MONOTONIC nanoseconds of the change.
    pub at_ns: u64,
}

/// Events kept per port for waiters that have not read them yet; a waiter that falls
/// further behind treats it as an arrival now (the safe side: a longer quiet window).
const EVENT_BACKLOG: usize = 1024;

/// One port's wake-up channel, its stream of events, and how many waiters listen on it.
struct PortChannel {
    sender: watch::Sender<u64>,
    events: broadcast::Sender<ConnectionEvent>,
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
pub(super) struct PortChannels {
    ports: Mutex<HashMap<u16, PortChannel>>,
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

    pub(super) fn publish(&self, event: ConnectionEvent) {
        if let Some(channel) = self.lock().get(&event.port) {
            if event.crossing {
                channel.wake();
            }
            // Nobody subscribed is fine: only waiters with a quiet window or a rule that
            // looks at each connection listen.
            let _ = channel.events.send(event);
        }
    }

    /// Subscribes to `port`'s wake-ups; the first waiter on a port asks `source` to
    /// announce its zero crossings.
    pub(super) fn watch<'a>(&'a self, port: u16, source: &'a dyn Source) -> Result<PortWatch<'a>> {
        let mut ports = self.lock();
        let channel = ports.entry(port).or_insert_with(|| PortChannel {
            sender: watch::channel(0).0,
            events: broadcast::channel(EVENT_BACKLOG).0,
            waiters: 0,
        });
        if channel.waiters == 0
            && let Err(problem) = source.watch_port(port, true)
        {
            ports.remove(&port);
            return Err(problem);
        }
        channel.waiters += 1;
        let changes = channel.sender.subscribe();
        let events = channel.events.subscribe();
        Ok(PortWatch {
            channels: self,
            source,
            port,
            changes,
            events,
            losses_heard: self.losses.load(Ordering::Acquire),
        })
    }
}

/// What a waiter heard on its port's stream of events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Heard {
    Event(ConnectionEvent),
    /// It fell this many events behind, noticed at `at_ns`.
    Missed {
        count: u64,
        at_ns: u64,
    },
    /// The kernel lost events (of any port: how many of this one's, and which, is not
    /// known).
    Lost(LostNotice),
}

impl Heard {
    /// What a receive gave (None: nothing more, or the stream closed).
    fn from(received: Result<ConnectionEvent, TryRecvError>) -> Option<Self> {
        match received {
            Ok(event) => Some(Self::Event(event)),
            Err(TryRecvError::Lagged(count)) => Some(Self::Missed {
                count,
                at_ns: monotonic_ns(),
            }),
            Err(TryRecvError::Empty | TryRecvError::Closed) => None,
        }
    }
}

/// A waiter's subscription to its port; the last one to leave unwatches the port.
pub(super) struct PortWatch<'a> {
    channels: &'a PortChannels,
    source: &'a dyn Source,
    port: u16,
    changes: watch::Receiver<u64>,
    events: broadcast::Receiver<ConnectionEvent>,
    /// [`PortChannels::losses`] when last heard.
    losses_heard: u64,
}

impl PortWatch<'_> {
    /// Marks the current generation seen: call it *before* reading the count, so that a
    /// change landing between the read and the sleep still wakes the waiter.
    pub(super) fn mark_seen(&mut self) {
        self.changes.borrow_and_update();
    }

    /// The next event already received, without waiting; a loss of events first.
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
        Heard::from(self.events.try_recv())
    }

    /// Sleeps until the port's count may have crossed zero (None) or an event comes (Some);
    /// None too if the stream of events closed (it does not while the tracker lives).
    pub(super) async fn woken(&mut self) -> Option<Heard> {
        tokio::select! {
            changed = self.changes.changed() => {
                if changed.is_err() {
                    // The channel never closes while the tracker lives; be safe anyway: the
                    // waiter's other wake-ups (events, its clock, shutdown) still come.
                    std::future::pending::<()>().await;
                }
                None
            }
            received = self.events.recv() => Heard::from(received.map_err(|problem| match problem {
                broadcast::error::RecvError::Lagged(n) => TryRecvError::Lagged(n),
                broadcast::error::RecvError::Closed => TryRecvError::Closed,
            })),
        }
    }
}

impl Drop for PortWatch<'_> {
    fn drop(&mut self) {
        let mut ports = self.channels.lock();
        let Some(channel) = ports.get_mut(&self.port) else {
            return;
        };
        channel.waiters = channel.waiters.saturating_sub(1);
        if channel.waiters == 0 {
            ports.remove(&self.port);
            if let Err(problem) = self.source.watch_port(self.port, false) {
                log::warn!("cannot unwatch port {}: {problem:#}", self.port);
            }
        }
    }
}
