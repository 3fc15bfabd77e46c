//! A connection source the tests set by hand.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use anyhow::{Result, bail};

use super::source::{Counts, Endpoint, Filter, PortState, ReclaimedTotals, Stats, Totals, Vouch};
use crate::{doubt::Doubt, drain_rule::Peer};

/// What the fake does right after a read of its counts.
pub type AfterRead = Box<dyn FnOnce(&FakeSource) + Send>;

pub struct FakeSource {
    pub endpoints: Mutex<Vec<Endpoint>>,
    pub broken: AtomicBool,
    /// What a read says while `broken`.
    pub why_broken: Mutex<String>,
    /// Ports the tracker asked to watch, as it left them.
    pub watched: Mutex<std::collections::BTreeSet<u16>>,
    /// What `doubts` says for every filter.
    pub doubts: Mutex<Vec<Doubt>>,
    /// What `skipped_runs` says.
    pub skipped_runs: AtomicU64,
    /// What `lost_events` says.
    pub lost_events: AtomicU64,
    /// What `confirm` answers (an error text, or the count).
    pub confirmed: Mutex<Result<u64, String>>,
    /// How often `confirm` was asked.
    pub confirmations: AtomicUsize,
    /// How often the connections were listed (`peers`).
    pub peer_lists: AtomicUsize,
    /// What `peers` lists, and how long a listing takes (real time: a slow socket table);
    /// `None`: listing fails, with [`FakeSource::unlisted`]'s text.
    pub listed: Mutex<Option<(std::time::Duration, Vec<Peer>)>>,
    /// Why listing fails while `listed` is `None`.
    pub unlisted: Mutex<String>,
    /// What `walks` says.
    pub walks: AtomicU64,
    /// Run once, by the next `endpoints` read, right after it took the counts: what
    /// happens between a read of the counts and the read of their doubts.
    pub after_next_read: Mutex<Option<AfterRead>>,
    /// How long an `endpoints` read takes (real time, blocking: a whole endpoint map).
    pub read_takes: Mutex<std::time::Duration>,
    /// `endpoints` reads done, running now, and the most ever running at once.
    pub reads: AtomicUsize,
    pub reads_running: AtomicUsize,
    pub most_reads_running: AtomicUsize,
    /// What `reclaimed_totals` says ([`FakeSource::reclaim`] adds to it).
    pub reclaimed: Mutex<ReclaimedTotals>,
    /// Connections open now that are counted for their port only, by port (the kernel's
    /// endpoint map was full): in the port's totals, under no endpoint.
    pub port_only: Mutex<BTreeMap<u16, u64>>,
}

impl Default for FakeSource {
    fn default() -> Self {
        Self {
            endpoints: Mutex::default(),
            broken: AtomicBool::default(),
            why_broken: Mutex::new("fake source is broken".into()),
            watched: Mutex::default(),
            doubts: Mutex::default(),
            skipped_runs: AtomicU64::default(),
            lost_events: AtomicU64::default(),
            confirmed: Mutex::new(Err("no socket tables in the fake".into())),
            confirmations: AtomicUsize::default(),
            peer_lists: AtomicUsize::default(),
            listed: Mutex::default(),
            unlisted: Mutex::new("no socket tables in the fake".into()),
            walks: AtomicU64::default(),
            after_next_read: Mutex::default(),
            read_takes: Mutex::default(),
            reads: AtomicUsize::default(),
            reads_running: AtomicUsize::default(),
            most_reads_running: AtomicUsize::default(),
            reclaimed: Mutex::default(),
            port_only: Mutex::default(),
        }
    }
}

impl FakeSource {
    pub fn set(&self, endpoints: Vec<Endpoint>) {
        *self.endpoints.lock().expect("lock") = endpoints;
    }

    /// What the kernel's reclaim does to an idle endpoint: its counters leave the endpoints
    /// and go to the reclaimed totals.
    pub fn reclaim(&self, gone: &Endpoint) {
        let mut endpoints = self.endpoints.lock().expect("lock");
        endpoints.retain(|endpoint| endpoint != gone);
        let address_kept = endpoints
            .iter()
            .any(|endpoint| (endpoint.port, endpoint.addr) == (gone.port, gone.addr));
        let counted = Totals {
            opened: gone.opened,
            closed: gone.closed,
        };
        self.reclaimed
            .lock()
            .expect("lock")
            .fold(gone.port, gone.addr, counted, address_kept);
    }

    fn port_only(&self, port: u16) -> u64 {
        self.port_only
            .lock()
            .expect("lock")
            .get(&port)
            .copied()
            .unwrap_or(0)
    }

    fn health(&self) -> Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            bail!("{}", self.why_broken.lock().expect("lock"));
        }
        Ok(())
    }
}

impl Counts for FakeSource {
    fn endpoints(&self) -> Result<Vec<Endpoint>> {
        self.health()?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        let running = self.reads_running.fetch_add(1, Ordering::AcqRel) + 1;
        self.most_reads_running.fetch_max(running, Ordering::AcqRel);
        let takes = *self.read_takes.lock().expect("lock");
        std::thread::sleep(takes);
        self.reads_running.fetch_sub(1, Ordering::AcqRel);
        let endpoints = self.endpoints.lock().expect("lock").clone();
        let after = self.after_next_read.lock().expect("lock").take();
        if let Some(after) = after {
            after(self);
        }
        Ok(endpoints)
    }

    /// As the kernel's port totals: the endpoints of the port added up, and the connections
    /// counted for the port only.
    fn port_state(&self, port: u16) -> Result<Option<PortState>> {
        let mut state = PortState {
            active: self.port_only(port),
            last_change_ns: 0,
        };
        for endpoint in self.endpoints()? {
            if endpoint.port == port {
                state.active += endpoint.active;
                state.last_change_ns = state.last_change_ns.max(endpoint.last_change_ns);
            }
        }
        Ok(Some(state))
    }

    /// As the kernel's: the endpoints added up by port, and the connections counted for
    /// their port only.
    fn port_totals(&self) -> Result<Option<BTreeMap<u16, u64>>> {
        self.health()?;
        let mut totals = self.port_only.lock().expect("lock").clone();
        for endpoint in self.endpoints.lock().expect("lock").iter() {
            *totals.entry(endpoint.port).or_default() += endpoint.active;
        }
        Ok(Some(totals))
    }

    fn reclaimed_last_change(&self, _port: u16) -> u64 {
        0
    }

    fn watch_port(&self, port: u16, watched: bool) -> Result<()> {
        let mut ports = self.watched.lock().expect("lock");
        let changed = if watched {
            ports.insert(port)
        } else {
            ports.remove(&port)
        };
        assert!(changed, "port {port} watched={watched} twice in a row");
        Ok(())
    }

    fn confirm(&self, _filter: &Filter) -> Result<u64> {
        self.confirmations.fetch_add(1, Ordering::Relaxed);
        self.confirmed
            .lock()
            .expect("lock")
            .clone()
            .map_err(anyhow::Error::msg)
    }

    fn peers(&self, _filter: &Filter, _with_age: bool) -> Result<Vec<Peer>> {
        self.peer_lists.fetch_add(1, Ordering::Relaxed);
        let Some((takes, peers)) = self.listed.lock().expect("lock").clone() else {
            bail!("{}", self.unlisted.lock().expect("lock"))
        };
        std::thread::sleep(takes);
        Ok(peers)
    }
}

impl Vouch for FakeSource {
    fn check_health(&self) -> Result<()> {
        self.health()
    }

    fn doubts(&self, _filter: &Filter) -> Result<Vec<Doubt>> {
        Ok(self.doubts.lock().expect("lock").clone())
    }

    fn health_doubts(&self) -> Vec<Doubt> {
        self.doubts.lock().expect("lock").clone()
    }

    fn walks(&self) -> u64 {
        self.walks.load(Ordering::Relaxed)
    }

    fn skipped_runs(&self) -> u64 {
        self.skipped_runs.load(Ordering::Relaxed)
    }

    fn lost_events(&self) -> Result<u64> {
        self.health()?;
        Ok(self.lost_events.load(Ordering::Relaxed))
    }
}

/// No statistics but the reclaimed totals set by hand: the defaults.
impl Stats for FakeSource {
    fn reclaimed_totals(&self) -> ReclaimedTotals {
        self.reclaimed.lock().expect("lock").clone()
    }
}

pub fn endpoint(addr: &str, port: u16, active: u64) -> Endpoint {
    Endpoint {
        netns: 4_026_531_840,
        addr: addr.parse().expect("addr"),
        port,
        active,
        opened: active,
        closed: 0,
        last_change_ns: 0,
    }
}

/// A quiet, idle connection from `remote` to `local` (`"ip:port"`), as the socket tables
/// list it.
pub fn peer(remote: &str, local: &str) -> Peer {
    Peer {
        remote: remote.parse().expect("remote address"),
        local: local.parse().expect("local address"),
        age_ms: None,
        idle_ms: 0,
        recv_queue: 0,
        send_queue: 0,
        awaiting_reply: false,
        busy: false,
    }
}
