//! The ring-buffer reader: wakes the waiters of a port whenever the kernel says one of its
//! endpoints crossed zero, and every waiter when events were lost.

use std::{sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use log::{debug, error, warn};
use tokio::io::{Interest, unix::AsyncFd};

use drain_agent_common::{ConnEvent, ConnKey, crossing, event_kind};

use super::{KernelMaps, parse_event};
use crate::addr::key_addr;
use crate::tracker::{ConnectionEvent, Tracker, Vouch as _};

/// The kernel's record, in the tracker's terms.
fn connection_event(event: &ConnEvent) -> ConnectionEvent {
    let remote = ConnKey {
        family: event.remote_family,
        addr: event.remote,
        ..ConnKey::default()
    };
    ConnectionEvent {
        netns: event.key.netns,
        addr: key_addr(&event.key),
        port: event.key.port,
        remote: key_addr(&remote),
        opened: event.kind == event_kind::OPEN,
        crossing: event.crossing & (crossing::ENDPOINT | crossing::PORT) != 0,
        at_ns: event.at_ns,
    }
}

/// Wakes the waiters of a port whenever the kernel says one of its endpoints crossed zero.
/// If the ring buffer ever overflows (the kernel counts it), every waiter re-reads once.
/// Returns only when the ring buffer cannot be read (said at ERROR): the agent, which
/// watches this task (`crate::tasks`), then stops and exits 1 to be restarted.
pub async fn forward_events(ring: RingBuf<MapData>, tracker: Arc<Tracker>, maps: Arc<KernelMaps>) {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, until dropped,
    // and the AsyncFd owns the ring buffer.
    let mut ring = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(ring) => ring,
        Err(problem) => {
            let (_, problem) = problem.into_parts();
            error!(
                "cannot watch the event ring buffer: {problem}; no close would wake a waiter, so the agent stops"
            );
            return;
        }
    };
    let mut lost_seen = maps.lost_events().unwrap_or_default();
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
                        let event = connection_event(&event);
                        debug!(
                            "event: port {} {} (crossing: {}), read {} µs after the change",
                            event.port,
                            if event.opened { "open" } else { "close" },
                            event.crossing,
                            crate::tracker::monotonic_ns().saturating_sub(event.at_ns) / 1000
                        );
                        tracker.publish(event);
                    }
                }
                guard.clear_ready();
            }
            _ = lost_check.tick() => {
                if let Ok(lost) = maps.lost_events() && lost > lost_seen {
                    warn!("{} wake-up events were lost (ring buffer full); waking every waiter", lost - lost_seen);
                    lost_seen = lost;
                    tracker.events_lost(lost);
                }
            }
        }
    }
}
