//! Reclaiming endpoint counters that went idle, so that the endpoint map cannot be filled
//! for good by endpoints that come and go (pod churn, or a user connecting to thousands of
//! loopback addresses).
//!
//! The rule, and why no open is ever lost (the kernel half is `is_retiring` in the eBPF
//! program):
//! 1. mark: set the port's bit in `RETIRING_PORTS`, put the key in `RETIRING`;
//! 2. wait for an RCU grace period (`rcu::grace_period`): when it returns every run that
//!    could have missed the mark has ended, and every later open of the key sees the mark
//!    and counts the socket for its port only, never touching the endpoint's counters;
//! 3. read the counters and delete the entry only if `active` is 0: no socket is counted in
//!    it, no open can add one, and a close only touches it for a socket counted in it;
//! 4. unmark.
//!
//! So a deleted entry is one no program holds or will take a pointer to. Writing from user
//! space into the map instead (or deleting without the grace period) could let an open add
//! to an element that is already freed and reused by another key: a count silently too low.

use std::{collections::HashMap as StdHashMap, net::IpAddr, sync::PoisonError, time::Duration};

use anyhow::{Context as _, Result};
use drain_agent_common::{ConnKey, watched_bit};
use log::debug;

use super::Kernel;
use crate::addr::key_addr;
use crate::tracker::monotonic_ns;

/// An endpoint at zero for this long is reclaimed.
pub const RECLAIM_IDLE: Duration = Duration::from_secs(60);
/// Above this share of the endpoint map in use, endpoints at zero are reclaimed however
/// recently they changed.
const PRESSURE_PERCENT: u64 = 75;
/// At most this many endpoints per round (the size of the `RETIRING` map).
const BATCH: usize = 4_096;

/// What a reclaim round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    pub reclaimed: u64,
    /// Endpoints that gained a connection while being reclaimed and were kept.
    pub kept: u64,
}

impl Kernel {
    /// Reclaims the counters of endpoints at zero that have been idle for `idle` (or at all,
    /// when the map is under pressure). See the module documentation for why it is safe.
    pub fn reclaim_idle_endpoints(&mut self, idle: Duration) -> Result<ReclaimReport> {
        if self.grace_periods.is_err() {
            // Said once at start.
            return Ok(ReclaimReport::default());
        }
        let now = monotonic_ns();
        let idle_ns = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        let mut in_use = 0u64;
        let mut candidates = Vec::new();
        for entry in self.counts.iter() {
            let Ok((key, counts)) = entry else { continue };
            in_use += 1;
            if counts.active == 0 && candidates.len() < BATCH {
                candidates.push((key, counts.last_change_ns));
            }
        }
        let pressure = in_use * 100 >= u64::from(self.max_endpoints) * PRESSURE_PERCENT;
        candidates
            .retain(|(_, last_change)| pressure || now.saturating_sub(*last_change) >= idle_ns);
        if candidates.is_empty() {
            return Ok(ReclaimReport::default());
        }
        // 1. Mark.
        let mut words: StdHashMap<u32, u64> = StdHashMap::new();
        for (key, _) in &candidates {
            let (word, mask) = watched_bit(key.port);
            *words.entry(word).or_default() |= mask;
        }
        self.set_retiring_ports(&words, true)?;
        let mut marked = Vec::with_capacity(candidates.len());
        for (key, _) in &candidates {
            if self.retiring.insert(key, 1, 0).is_ok() {
                marked.push(*key);
            }
        }
        // 2. Wait for every program run that may have missed the mark.
        let waited = self.grace_period();
        // 3. Delete the entries still at zero (only if the wait really happened).
        let mut report = ReclaimReport::default();
        if waited.is_ok() {
            // Held from the first delete to the last fold: a scrape sees each endpoint's
            // totals in the endpoint or in the reclaimed totals, never in both or neither
            // (`Tracker::counters`).
            let mut reclaimed = self
                .maps
                .reclaimed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // An address's series keeps a reclaimed endpoint's totals while another
            // endpoint (another namespace's) has its port and address; with the last one it
            // ends. Read before the first delete, so that each endpoint's totals are written
            // to the pinned map right after its delete: a `kill -9` in between loses that
            // one endpoint's totals, not a whole round's. Unread: kept (dropped by a later
            // round).
            let mut live = self.live_endpoints();
            let mut folded = false;
            for key in &marked {
                let Ok(counts) = self.counts.get(key, 0) else {
                    continue;
                };
                if counts.active != 0 {
                    report.kept += 1;
                    continue;
                }
                if self.counts.remove(key).is_err() {
                    continue;
                }
                let kept = live.as_mut().is_none_or(|live| {
                    let address = (key.port, key_addr(key));
                    let others = live.get_mut(&address).map_or(0, |endpoints| {
                        *endpoints = endpoints.saturating_sub(1);
                        *endpoints
                    });
                    others > 0
                });
                reclaimed.fold(key, &counts, kept);
                report.reclaimed += 1;
                folded = true;
            }
            if folded && let Some(live) = &live {
                let addresses = live
                    .iter()
                    .filter(|(_, endpoints)| **endpoints > 0)
                    .map(|(address, _)| *address)
                    .collect();
                reclaimed.keep_addresses(&addresses);
            }
        }
        // 4. Unmark: the keys first, then the bits (an open that still sees a bit finds no
        // key and counts normally).
        for key in &marked {
            let _ = self.retiring.remove(key);
        }
        self.set_retiring_ports(&words, false)?;
        waited.context("cannot wait for running programs; no endpoint reclaimed")?;
        debug!(
            "reclaimed {} idle endpoints ({} kept, map {}% full)",
            report.reclaimed,
            report.kept,
            in_use * 100 / u64::from(self.max_endpoints.max(1))
        );
        Ok(report)
    }

    /// Sets (`retiring`) or clears the bits of `words` (word index to mask) in
    /// `RETIRING_PORTS`, the bitmap that sends an open to look its key up in `RETIRING`.
    fn set_retiring_ports(&mut self, words: &StdHashMap<u32, u64>, retiring: bool) -> Result<()> {
        for (word, mask) in words {
            let bits = self
                .retiring_ports
                .get(word, 0)
                .context("retiring bitmap")?;
            let bits = if retiring { bits | mask } else { bits & !mask };
            self.retiring_ports
                .set(*word, bits, 0)
                .context("retiring bitmap")?;
        }
        Ok(())
    }

    /// The ports and addresses endpoints have now (`None`: the map could not be read).
    /// How many endpoints of the map each (port, address) has; `None` if the map could not
    /// be read whole.
    fn live_endpoints(&self) -> Option<StdHashMap<(u16, IpAddr), usize>> {
        let mut live = StdHashMap::new();
        for key in self.counts.keys() {
            let key = key.ok()?;
            *live.entry((key.port, key_addr(&key))).or_insert(0) += 1;
        }
        Some(live)
    }

    /// Keys being reclaimed now (for tests).
    pub fn retiring_keys(&self) -> Vec<ConnKey> {
        self.retiring.keys().filter_map(Result::ok).collect()
    }
}
