//! Where the counts come from, in three small traits by job: [`Counts`] (what is open),
//! [`Vouch`] (whether those counts can be trusted) and [`Stats`] (reports only). The kernel
//! maps implement all three; tests use a fake ([`super::fake`]).
//!
//! No method whose default would vouch: an empty list of doubts, "nothing skipped" or
//! "nothing forgotten" is a claim a source must make on purpose, so those methods have no
//! default (a new source that forgot one would otherwise be trusted). The defaults left
//! either fail (`confirm`, `peers`: the wait then stays in doubt, never answers drained) or
//! report nothing (`Stats`, `port_state`, `port_totals`: the tracker then adds the endpoints
//! up itself).

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use anyhow::{Result, bail};
use drain_agent_common::DurationHistogram;
use serde::{Deserialize, Serialize};

use crate::{doubt::Doubt, drain_rule::Peer};

/// One listening endpoint (netns, local address, port) and its counts (also a row of the
/// `/connections` answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
    /// Tracked connections open now (ESTABLISHED or CLOSE_WAIT).
    pub active: u64,
    pub opened: u64,
    pub closed: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last open or close.
    #[serde(skip)]
    pub last_change_ns: u64,
}

/// What is open: the counts, and the socket tables' view of the same scope.
pub trait Counts: Send + Sync + 'static {
    /// Every endpoint that has had a tracked connection.
    fn endpoints(&self) -> Result<Vec<Endpoint>>;
    /// Totals of one port over every namespace and address, when the source keeps them
    /// (one lookup instead of a walk over every endpoint). None: the tracker adds up
    /// [`Counts::endpoints`].
    fn port_state(&self, _port: u16) -> Result<Option<PortState>> {
        Ok(None)
    }
    /// The connections open now of every port that has had a tracked connection (0 for
    /// one that has none now), over every namespace and address, those counted for their
    /// port only included: what the metrics show by port, and the tracked sockets in all.
    /// None: the source counts by endpoint only, and the tracker adds up
    /// [`Counts::endpoints`].
    fn port_totals(&self) -> Result<Option<BTreeMap<u16, u64>>> {
        Ok(None)
    }
    /// The last change of endpoints of `port` that were reclaimed (CLOCK_MONOTONIC ns, 0:
    /// none): scoped quiet windows must not forget them. No default: 0 says nothing was
    /// forgotten.
    fn reclaimed_last_change(&self, port: u16) -> u64;
    /// Somebody waits on `port` (or nobody any more): the source only needs to send
    /// zero-crossing wake-ups for watched ports. Must take effect before it returns. No
    /// default: Ok promises the wake-ups a waiter sleeps on.
    fn watch_port(&self, port: u16, watched: bool) -> Result<()>;
    /// Connections matching `filter` open right now, counted from the kernel's socket
    /// tables rather than the maps (blocking; enters namespaces). Used only to confirm a
    /// doubted zero; the default fails, so a doubted zero stays unknown (fail closed).
    fn confirm(&self, _filter: &Filter) -> Result<u64> {
        bail!("this source cannot confirm counts")
    }
    /// The connections of `filter` open now, one by one, from the kernel's socket tables
    /// (blocking; enters namespaces). `busy` is left false for the caller to set; `with_age`
    /// also looks up when each started and, unless the scope is in doubt, leaves out the
    /// sockets the maps do not track (outbound ones from the port): a pass over the tracked
    /// sockets, reports only. The default fails: a rule that looks at each connection then
    /// never answers drained.
    fn peers(&self, _filter: &Filter, _with_age: bool) -> Result<Vec<Peer>> {
        bail!("this source cannot list connections")
    }
}

/// Whether the counts can be trusted. No method has a default: every answer here vouches
/// or doubts, and a source must say which.
pub trait Vouch: Send + Sync + 'static {
    /// Ok when the counts can be trusted (programs attached, maps readable).
    fn check_health(&self) -> Result<()>;
    /// Why the counts of `filter` cannot be vouched for now (empty: they can).
    fn doubts(&self, filter: &Filter) -> Result<Vec<Doubt>>;
    /// Doubts about the agent as a whole, for `/healthz` and the logs.
    fn health_doubts(&self) -> Vec<Doubt>;
    /// Walks of the open sockets completed so far.
    fn walks(&self) -> u64;
    /// Runs of the handler the kernel skipped so far (fresh): a waiter whose scope may
    /// have lost a run since it started asks the socket tables.
    fn skipped_runs(&self) -> u64;
    /// Events the kernel could not send so far (its ring buffer was full; fresh): a waiter
    /// whose answer depends on hearing every arrival (a quiet window) reads it before it
    /// answers drained, and a loss it has not heard of restarts its window.
    fn lost_events(&self) -> Result<u64>;
}

/// What is reported and decides nothing: empty by default.
pub trait Stats: Send + Sync + 'static {
    /// Connection-duration histograms, by local port (one entry per endpoint).
    fn durations(&self) -> Result<Vec<(u16, DurationHistogram)>> {
        Ok(Vec::new())
    }
    /// What the kernel side could not track, by reason.
    fn tracking_errors(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(Vec::new())
    }
    /// State changes the kernel side missed and later found and repaired, by kind.
    fn repairs(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(Vec::new())
    }
    /// What reclaimed endpoints counted (nothing by default).
    fn reclaimed_totals(&self) -> ReclaimedTotals {
        ReclaimedTotals::default()
    }
}

/// Connections opened and closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub opened: u64,
    pub closed: u64,
}

impl Totals {
    pub fn add(&mut self, other: Self) {
        self.opened = self.opened.saturating_add(other.opened);
        self.closed = self.closed.saturating_add(other.closed);
    }
}

/// What the endpoints that were reclaimed (idle, their counters taken out of the source's
/// map) had counted, so that the counters made from the endpoints never go down.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReclaimedTotals {
    /// Every reclaimed endpoint's, by port: a port's whole history (`--metrics-labels port`).
    pub by_port: BTreeMap<u16, Totals>,
    /// By port and local address, only while an endpoint (of another namespace: 127.0.0.1
    /// in every pod) still has that port and address: its address's series goes on from
    /// them. With the last endpoint of a port and address its series goes, and these with
    /// it (so they are bounded by the endpoints).
    pub by_address: BTreeMap<(u16, IpAddr), Totals>,
    /// Changed by every reclaim: two reads with the same generation saw none between them.
    pub generation: u64,
}

impl ReclaimedTotals {
    /// Takes in what an endpoint at `port` and `addr` counted as it is reclaimed;
    /// `address_kept`: another endpoint still has that port and address.
    pub fn fold(&mut self, port: u16, addr: IpAddr, counted: Totals, address_kept: bool) {
        self.by_port.entry(port).or_default().add(counted);
        if address_kept {
            self.by_address
                .entry((port, addr))
                .or_default()
                .add(counted);
        } else {
            self.by_address.remove(&(port, addr));
        }
        self.generation = self.generation.wrapping_add(1);
    }

    /// Drops the totals of every port and address that no endpoint has (`live`); what
    /// it dropped.
    pub fn keep_addresses(&mut self, live: &HashSet<(u16, IpAddr)>) -> Vec<(u16, IpAddr)> {
        let gone: Vec<(u16, IpAddr)> = self
            .by_address
            .keys()
            .filter(|key| !live.contains(key))
            .copied()
            .collect();
        for key in &gone {
            self.by_address.remove(key);
        }
        gone
    }
}

/// A whole source, as the [`super::Tracker`] holds it.
pub trait Source: Counts + Vouch + Stats {}

impl<T: Counts + Vouch + Stats> Source for T {}

/// The counts of a port or filter at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortState {
    pub active: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last open or close (0: never).
    pub last_change_ns: u64,
}

/// Which connections a question is about (also a drain's scope).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Filter {
    pub port: u16,
    /// Only this local address (a pod's IP). IPv4-mapped IPv6 is folded to IPv4.
    pub addr: Option<IpAddr>,
    /// Only this network namespace (inode).
    pub netns: Option<u32>,
}

impl Filter {
    pub const fn port(port: u16) -> Self {
        Self {
            port,
            addr: None,
            netns: None,
        }
    }

    pub fn matches(&self, endpoint: &Endpoint) -> bool {
        self.matches_parts(endpoint.netns, endpoint.addr, endpoint.port)
    }

    pub fn matches_parts(&self, netns: u32, addr: IpAddr, port: u16) -> bool {
        port == self.port
            && self.addr.is_none_or(|wanted| wanted == addr)
            && self.netns.is_none_or(|wanted| wanted == netns)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}
