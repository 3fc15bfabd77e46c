//! Which agent of an upgrade's overlap answers `GET /metrics`.
//!
//! During an upgrade two agents listen on the node address (`handover.rs`), and each
//! scrape, on a fresh connection (the keep-alive idle limit is shorter than a scrape
//! interval), reaches either. Their counters differ (the userspace ones, and the kernel
//! ones too while the new agent cannot adopt the pinned state), so scrapes that alternate
//! read as a counter reset and a jump at every switch. So at most one answers: an agent
//! that bound its node listener beside listeners already there (the new agent of an
//! overlap) answers `/metrics` with `503` while one of *those* still listens, and serves
//! once they have all closed (the old agent closes its listeners at its SIGTERM, though it
//! runs on through its grace). A listener bound *after* this agent's never makes it yield:
//! the old agent serves until it closes, and a lone agent always serves.
//!
//! The listeners are told apart by their socket cookies (`SO_COOKIE`, never reused), read
//! in the socket tables (`sys/sockdiag`) just before the bind and at each scrape while one
//! of them listens. Where the tables cannot be read the agent serves (it is observability,
//! not a count), and says so once.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result};
use log::{info, warn};

use crate::sys::sockdiag::{Query, query, state};

/// `Retry-After` (seconds) of the `503` an agent answers while an older agent serves
/// `/metrics`: an overlap lasts until the old agent's SIGTERM, seconds in the DaemonSet.
pub const RETRY_AFTER: &str = "5";

/// The listeners of the calling thread's network namespace, by address.
pub trait ListenerTable: Send + Sync {
    /// The socket cookies of the TCP listeners on exactly `addr`.
    fn listeners_on(&self, addr: SocketAddr) -> Result<Vec<u64>>;
}

/// The kernel's socket tables (one `inet_diag` dump of the port's listeners).
pub struct SocketTables;

impl ListenerTable for SocketTables {
    fn listeners_on(&self, addr: SocketAddr) -> Result<Vec<u64>> {
        let listeners = query(&Query {
            local_port: addr.port(),
            states: state::bit(state::LISTEN),
            with_info: false,
        })
        .with_context(|| format!("cannot read the listeners on {addr}"))?;
        Ok(listeners
            .into_iter()
            .filter(|listener| listener.local == addr)
            .map(|listener| listener.cookie)
            .collect())
    }
}

/// Whose turn it is to answer `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// This agent's: no listener that was on its address before its own is there.
    Mine,
    /// An older agent's, which still listens on the address.
    Older,
    /// Unknown (the socket tables cannot be read): this agent serves.
    Unknown,
}

/// The `/metrics` turn of this agent's node listener.
pub struct MetricsTurn {
    addr: SocketAddr,
    /// The cookies of the listeners on `addr` just before this agent bound its own.
    earlier: Vec<u64>,
    table: Arc<dyn ListenerTable>,
    /// Set once none of `earlier` listens any more: they never come back (cookies are
    /// never reused), and the tables are not read again.
    gone: AtomicBool,
    /// The last turn said in the log, to say each change once.
    said: Mutex<Option<Turn>>,
}

impl MetricsTurn {
    /// An agent that serves `/metrics` whoever listens beside it (tests, and an agent that
    /// could not tell who listened before it).
    pub fn alone() -> Self {
        Self::after(
            SocketAddr::from(([0, 0, 0, 0], 0)),
            Vec::new(),
            Arc::new(SocketTables),
        )
    }

    /// The turn of a listener on `addr` bound just after `earlier` were seen there.
    pub fn after(addr: SocketAddr, earlier: Vec<u64>, table: Arc<dyn ListenerTable>) -> Self {
        let gone = earlier.is_empty();
        Self {
            addr,
            earlier,
            table,
            gone: AtomicBool::new(gone),
            said: Mutex::new(None),
        }
    }

    /// [`MetricsTurn::after`] the look before the bind ([`earlier_listeners`]); where that
    /// failed, the agent serves `/metrics` (said at WARN).
    pub fn after_look(addr: SocketAddr, earlier: Result<Vec<u64>>) -> Self {
        let earlier = earlier.unwrap_or_else(|problem| {
            warn!(
                "{problem:#}: cannot tell whether another agent listened on {addr} before this one; this agent answers /metrics even beside one (an upgrade's scrapes may then alternate between the two agents)"
            );
            Vec::new()
        });
        if !earlier.is_empty() {
            info!(
                "{} listener(s) on {addr} before this agent's (an upgrade's older agent?): /metrics is answered 503 until they close",
                earlier.len()
            );
        }
        Self::after(addr, earlier, Arc::new(SocketTables))
    }

    /// Whose turn it is now, read off the async workers (one netlink dump, only while an
    /// earlier listener may still be there).
    pub async fn now(self: &Arc<Self>) -> Turn {
        if self.gone.load(Ordering::Relaxed) {
            return Turn::Mine;
        }
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.read())
            .await
            .unwrap_or_else(|problem| {
                self.say(
                    Turn::Unknown,
                    &format!("the socket-table read failed: {problem}"),
                );
                Turn::Unknown
            })
    }

    fn read(&self) -> Turn {
        match self.table.listeners_on(self.addr) {
            Ok(listening) if listening.iter().any(|cookie| self.earlier.contains(cookie)) => {
                self.say(Turn::Older, "");
                Turn::Older
            }
            Ok(_) => {
                self.gone.store(true, Ordering::Relaxed);
                self.say(Turn::Mine, "");
                Turn::Mine
            }
            Err(problem) => {
                self.say(Turn::Unknown, &format!("{problem:#}"));
                Turn::Unknown
            }
        }
    }

    /// Logs `turn` if it is not the last one said.
    fn say(&self, turn: Turn, problem: &str) {
        let mut said = self.said.lock().unwrap_or_else(PoisonError::into_inner);
        if *said == Some(turn) {
            return;
        }
        *said = Some(turn);
        let addr = self.addr;
        match turn {
            Turn::Older => info!(
                "an agent that listened on {addr} before this one still does: it answers /metrics, this one 503 until it closes its listener"
            ),
            Turn::Mine => info!(
                "no agent that listened on {addr} before this one does any more: this one answers /metrics"
            ),
            Turn::Unknown => warn!(
                "{problem}: cannot tell whether an older agent still listens on {addr}; this agent answers /metrics meanwhile"
            ),
        }
    }
}

/// The cookies of the listeners on `addr` now (looked at just before the node listener is
/// bound: [`MetricsTurn::after_look`]).
pub fn earlier_listeners(addr: SocketAddr) -> Result<Vec<u64>> {
    SocketTables.listeners_on(addr)
}
