//! The kernel maps as the tracker's source ([`Counts`], [`Vouch`], [`Stats`]): counts, doubts, peers and the
//! confirmation from the socket tables.

use std::{
    collections::{BTreeMap, HashSet},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::PoisonError,
    sync::atomic::Ordering,
};

use anyhow::{Context as _, Result};
use drain_agent_common::{
    DurationHistogram, PORT_COUNT, SOCK_UNSCOPED, STARTED_UNKNOWN, TRACKED_PORT_WORDS, error_index,
    repair, watched_bit,
};

use super::maps::{KernelMaps, canonical, namespaces_in, namespaces_of};
use crate::addr::key_addr;
use crate::{
    addr::canonical_addr,
    doubt::Doubt,
    drain_rule::Peer,
    sys::{netns, sockdiag},
    tracker::{Counts, Endpoint, Filter, PortState, ReclaimedTotals, Stats, Vouch, monotonic_ns},
};

impl Counts for KernelMaps {
    fn endpoints(&self) -> Result<Vec<Endpoint>> {
        let mut endpoints = Vec::new();
        for entry in self.counts.iter() {
            let (key, counts) = entry.context("cannot read the connection-count map")?;
            endpoints.push(Endpoint {
                netns: key.netns,
                addr: key_addr(&key),
                port: key.port,
                // Never negative by construction (exactly-once map); clamp all the same.
                active: u64::try_from(counts.active).unwrap_or(0),
                opened: counts.opened,
                closed: counts.closed,
                last_change_ns: counts.last_change_ns,
            });
        }
        Ok(endpoints)
    }

    fn port_state(&self, port: u16) -> Result<Option<PortState>> {
        let totals = self
            .port_totals
            .get(&u32::from(port), 0)
            .with_context(|| format!("cannot read the totals of port {port}"))?;
        Ok(Some(PortState {
            active: u64::try_from(totals.active).unwrap_or(0),
            last_change_ns: totals.last_change_ns,
        }))
    }

    /// The ports marked in `TRACKED_PORTS` (every port a socket was tracked on, scoped or
    /// for the port only: the mark is set before the port's total moves) and their totals.
    /// What it costs a scrape: the 64 KiB of marks in one system call (8,192 entries copied
    /// one by one in the kernel, about 2 ms on a small VM), then one lookup per marked port
    /// (a port that ever had an inbound connection: the services' ports), instead of
    /// 65,536 lookups in `PORT_TOTALS`; the endpoints' read is two system calls each.
    fn port_totals(&self) -> Result<Option<BTreeMap<u16, u64>>> {
        const PORTS_PER_WORD: usize = (PORT_COUNT / TRACKED_PORT_WORDS) as usize;
        let mut marks = vec![0_u8; PORT_COUNT as usize];
        super::raw::array_values(self.tracked_ports.as_fd(), PORTS_PER_WORD, &mut marks)
            .context("cannot read the tracked-ports map")?;
        let mut totals = BTreeMap::new();
        for (first, word) in (0..PORT_COUNT)
            .step_by(PORTS_PER_WORD)
            .zip(marks.chunks_exact(PORTS_PER_WORD))
        {
            if word.iter().all(|marked| *marked == 0) {
                continue;
            }
            for (port, marked) in (first..PORT_COUNT).zip(word) {
                if *marked == 0 {
                    continue;
                }
                let port = u16::try_from(port).context("a port beyond the port range")?;
                let state = self
                    .port_totals
                    .get(&u32::from(port), 0)
                    .with_context(|| format!("cannot read the totals of port {port}"))?;
                totals.insert(port, u64::try_from(state.active).unwrap_or(0));
            }
        }
        Ok(Some(totals))
    }

    fn reclaimed_last_change(&self, port: u16) -> u64 {
        self.reclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_change(port)
    }

    fn watch_port(&self, port: u16, watched: bool) -> Result<()> {
        let (word, mask) = watched_bit(port);
        let mut bitmap = self
            .watched_ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let bits = bitmap
            .get(&word, 0)
            .context("cannot read the watched-ports bitmap")?;
        let bits = if watched { bits | mask } else { bits & !mask };
        bitmap
            .set(word, bits, 0)
            .context("cannot update the watched-ports bitmap")?;
        // The bit must be visible before the caller reads the count it waits on (the
        // program reads the bit after changing a count): a full barrier between the two.
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }

    fn confirm(&self, filter: &Filter) -> Result<u64> {
        confirm_with(
            filter,
            &netns::all_namespaces,
            &|inode, path| Self::count_in_namespace(inode, path, filter),
            &|read| self.counted_unread(filter, read),
        )
    }

    /// The connections of `filter` from the socket tables. A report (`with_age`: the
    /// remaining connections of `/drained`, `/connections?peers=true`, a drain's record and
    /// what it closes at its deadline) gets their ages from the maps and, when the scope's
    /// counts are vouched for (no doubt), only the tracked ones: the tables also list
    /// outbound sockets whose local port is the port, which are no connections of the
    /// service's. In doubt, the tables' list stands as it is (a connection the maps missed
    /// must show), as it does for the drain rule's own look (not a report: no extra pass
    /// over the socket map each time it looks).
    fn peers(&self, filter: &Filter, with_age: bool) -> Result<Vec<Peer>> {
        let now_ns = monotonic_ns();
        let mut found = Vec::new();
        let mut read = HashSet::new();
        for (inode, path) in namespaces_of(filter)? {
            let port = filter.port;
            let addr = filter.addr;
            let sockets = match netns::run_in(inode, &path, move || {
                sockdiag::query(&sockdiag::Query {
                    local_port: port,
                    states: sockdiag::state::bit(sockdiag::state::ESTABLISHED)
                        | sockdiag::state::bit(sockdiag::state::CLOSE_WAIT),
                    with_info: true,
                })
            }) {
                Ok(sockets) => sockets,
                // A namespace that is gone has no connections left (a complete scan says so).
                Err(_) if netns::is_gone(inode) => continue,
                Err(problem) => {
                    return Err(problem)
                        .with_context(|| format!("cannot read network namespace {inode}"));
                }
            };
            read.insert(inode);
            found.extend(
                sockets
                    .into_iter()
                    .filter(|socket| {
                        addr.is_none_or(|addr| canonical_addr(socket.local.ip()) == addr)
                    })
                    .map(|socket| (inode, socket)),
            );
        }
        // Connections in a namespace the agent cannot find (kept alive only by its sockets)
        // cannot be listed. A list without them is not the scope's: a rule that looks at
        // each connection would judge it drained, and an answer's count would be too low.
        let unread = self.counted_unread(filter, &read)?;
        if unread > 0 {
            // Names nothing of the host: answers may say it whole.
            return Err(anyhow::Error::new(crate::logging::Told(format!(
                "{unread} connection(s) of the scope are in network namespaces the agent cannot enter, and cannot be listed"
            ))));
        }
        // Read after the tables: an inbound connection they show open was inserted before
        // it became ESTABLISHED (the handler runs before the state is stored), so unless the
        // scope is in doubt it is here, or has closed since.
        let tracked = if with_age && !found.is_empty() {
            match self.tracked(filter) {
                Ok(tracked) => Some(tracked),
                Err(problem) => {
                    log::debug!("connections listed without ages: {problem:#}");
                    None
                }
            }
        } else {
            None
        };
        let only_tracked =
            tracked.is_some() && self.doubts(filter).is_ok_and(|doubts| doubts.is_empty());
        let mut peers = Vec::new();
        for (inode, socket) in found {
            let tuple = (inode, canonical(socket.local), canonical(socket.remote));
            let started = tracked.as_ref().and_then(|tracked| tracked.get(&tuple));
            if only_tracked && started.is_none() {
                continue;
            }
            let idle_ms = socket.info.as_ref().map_or(0, |info| {
                u64::from(info.last_data_recv_ms.min(info.last_data_sent_ms))
            });
            // A request read and not answered yet (received, and nothing sent since or ever;
            // what is left undecided is told at `TcpInfoSummary::awaiting_reply`).
            let awaiting_reply = socket
                .info
                .as_ref()
                .is_some_and(sockdiag::TcpInfoSummary::awaiting_reply);
            let age_ms = started
                .filter(|started| **started != STARTED_UNKNOWN)
                .map(|started| now_ns.saturating_sub(*started) / 1_000_000);
            peers.push(Peer {
                remote: socket.remote,
                local: socket.local,
                age_ms,
                idle_ms,
                recv_queue: socket.recv_queue,
                send_queue: socket.send_queue,
                awaiting_reply,
                busy: false,
            });
        }
        Ok(peers)
    }
}

impl Vouch for KernelMaps {
    fn check_health(&self) -> Result<()> {
        self.errors
            .get(&0, 0)
            .map(drop)
            .context("the kernel maps are not readable")
    }

    fn doubts(&self, filter: &Filter) -> Result<Vec<Doubt>> {
        let mut doubts = self.global_doubts(false)?;
        let totals = self
            .port_totals
            .get(&u32::from(filter.port), 0)
            .with_context(|| format!("cannot read the totals of port {}", filter.port))?;
        let vouched = self.vouched();
        let lost_at_walk = vouched
            .snapshot
            .as_ref()
            .and_then(|snapshot| snapshot.lost.get(&filter.port).copied())
            .unwrap_or(0);
        if totals.lost > lost_at_walk {
            doubts.push(Doubt::ConnectionsLost { port: filter.port });
        }
        if vouched.unsure_ports.contains(&filter.port) {
            doubts.push(Doubt::PassivityUnknown { port: filter.port });
        }
        let scoped = filter.addr.is_some() || filter.netns.is_some();
        if scoped && totals.unscoped > 0 {
            doubts.push(Doubt::Unscoped { port: filter.port });
        }
        doubts.extend(
            vouched
                .unwalked
                .iter()
                .filter(|netns| filter.netns.is_none_or(|wanted| wanted == **netns))
                .map(|netns| Doubt::NamespaceUnwalked { netns: *netns }),
        );
        doubts.extend(self.own_port_shared(filter)?);
        Ok(doubts)
    }

    fn health_doubts(&self) -> Vec<Doubt> {
        self.global_doubts(true).unwrap_or_else(|problem| {
            log::warn!("cannot read the error counters: {problem:#}");
            vec![Doubt::ReadFailed]
        })
    }

    fn walks(&self) -> u64 {
        self.walks.load(Ordering::Relaxed)
    }

    fn skipped_runs(&self) -> u64 {
        self.handler_skipped_runs().unwrap_or(0)
    }

    fn lost_events(&self) -> Result<u64> {
        self.error_count(error_index::EVENT_LOST)
    }
}

impl Stats for KernelMaps {
    fn durations(&self) -> Result<Vec<(u16, DurationHistogram)>> {
        // One copy per CPU (the programs add without atomics): their sum is the histogram.
        self.durations
            .iter()
            .map(|entry| {
                entry
                    .map(|(port, per_cpu)| {
                        let mut histogram = DurationHistogram::default();
                        for copy in per_cpu.iter() {
                            for (total, add) in histogram.buckets.iter_mut().zip(copy.buckets) {
                                *total = total.wrapping_add(add);
                            }
                            histogram.sum_ns = histogram.sum_ns.wrapping_add(copy.sum_ns);
                        }
                        (u16::try_from(port).unwrap_or(0), histogram)
                    })
                    .context("cannot read the duration map")
            })
            .collect()
    }

    fn tracking_errors(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut errors: Vec<(&'static str, u64)> = error_index::NAMES
            .into_iter()
            .zip(self.error_counts()?)
            .collect();
        errors.push((
            "handler_skipped",
            self.handler_skipped.load(Ordering::Relaxed),
        ));
        Ok(errors)
    }

    fn repairs(&self) -> Result<Vec<(&'static str, u64)>> {
        let seeding = self.seeding_opens.load(Ordering::Relaxed);
        Ok(vec![
            (
                "missed_open",
                self.repair_count(repair::OPENS_FOUND)?
                    .saturating_sub(seeding),
            ),
            ("missed_close", self.repair_count(repair::CLOSES_FOUND)?),
        ])
    }

    fn reclaimed_totals(&self) -> ReclaimedTotals {
        self.reclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .totals()
    }
}

impl KernelMaps {
    /// What the maps count of `filter` in namespaces whose socket tables were not `read`
    /// (the agent cannot find them: kept alive only by their sockets).
    fn counted_unread(&self, filter: &Filter, read: &HashSet<u32>) -> Result<u64> {
        // A scope of one namespace whose tables were read has nothing elsewhere (a pod's
        // scope, the common case): no pass over the maps.
        if filter.netns.is_some_and(|netns| read.contains(&netns)) {
            return Ok(0);
        }
        // The port's total counts every tracked connection of the port, under an endpoint
        // or for the port only, and no count is ever negative: at 0, both passes below
        // would add 0. One lookup then spares them (each reads a whole map, which with
        // full maps under load took long enough to make doubted waiters late).
        let totals = self
            .port_totals
            .get(&u32::from(filter.port), 0)
            .with_context(|| format!("cannot read the totals of port {}", filter.port))?;
        if totals.active == 0 && totals.unscoped == 0 {
            return Ok(0);
        }
        let mut counted = 0;
        for endpoint in self.endpoints()? {
            if filter.matches(&endpoint) && !read.contains(&endpoint.netns) {
                counted += endpoint.active;
            }
        }
        // Connections counted for the port only (the endpoint map was full, or the endpoint
        // was being reclaimed) are in no endpoint above: their own entries say where they
        // are.
        if totals.unscoped > 0 {
            for entry in self.sockets.iter() {
                // Entries come and go while we read: a vanished one is closed.
                let Ok((_, entry)) = entry else { continue };
                if entry.flags & SOCK_UNSCOPED != 0
                    && !read.contains(&entry.key.netns)
                    && filter.matches_parts(entry.key.netns, key_addr(&entry.key), entry.key.port)
                {
                    counted += 1;
                }
            }
        }
        Ok(counted)
    }
}

/// [`Counts::confirm`] of the kernel maps: the socket tables' count of `filter` in each
/// namespace of its scope that `scan` finds (`count` reads one's tables), plus what the maps
/// count (`unread`) in the namespaces whose tables were not read (the agent cannot find
/// them: one kept alive only by its sockets, no process in it, nothing mounted on it; a
/// namespace that is really gone closed its sockets, and their closes took its counts to
/// zero, or left them too high, the safe side).
///
/// Fails closed: a scan that could not look everywhere ([`netns::IncompleteScan`]: out of
/// descriptors, every namespace looks gone) is an error, not a scope without namespaces
/// whose answer is the maps' own doubted count; and a namespace whose tables cannot be read
/// is taken for gone only when a complete scan no longer finds it.
fn confirm_with(
    filter: &Filter,
    scan: &dyn Fn() -> Result<BTreeMap<u32, PathBuf>>,
    count: &dyn Fn(u32, PathBuf) -> Result<u64>,
    unread: &dyn Fn(&HashSet<u32>) -> Result<u64>,
) -> Result<u64> {
    let targets = namespaces_in(filter, scan()?)?;
    let mut open = 0;
    let mut read = HashSet::new();
    for (inode, path) in targets {
        match count(inode, path) {
            Ok(count) => {
                open += count;
                read.insert(inode);
            }
            // A namespace that is gone has no connections left.
            Err(_) if scan().is_ok_and(|found| !found.contains_key(&inode)) => {}
            Err(problem) => {
                return Err(problem)
                    .with_context(|| format!("cannot read network namespace {inode}"));
            }
        }
    }
    Ok(open + unread(&read)?)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::closer::NamespaceGone;

    /// Found by an audit: out of descriptors (EMFILE), the namespace scan found no
    /// namespace at all and said nothing, so a confirmation read no tables and answered the
    /// maps' own count, the doubted one it was asked to check: a port-wide scope under a
    /// doubt (seeding, skipped handler runs) answered drained with a connection the maps
    /// missed, and a pod's scope took its namespace for gone. An incomplete scan fails the
    /// confirmation (503 unknown), and a namespace whose tables cannot be read is gone only
    /// when a complete scan says so.
    #[test]
    fn a_confirmation_fails_closed_when_the_namespace_scan_is_incomplete() {
        let incomplete =
            || -> Result<BTreeMap<u32, PathBuf>> { Err(anyhow::Error::new(netns::IncompleteScan)) };
        // The tables hold a connection the maps missed; the maps count none.
        let tables = |_: u32, _: PathBuf| -> Result<u64> { Ok(1) };
        let maps = |_: &HashSet<u32>| -> Result<u64> { Ok(0) };
        for scope in [None, Some(7)] {
            let filter = Filter {
                port: 8080,
                addr: None,
                netns: scope,
            };
            let problem = confirm_with(&filter, &incomplete, &tables, &maps)
                .expect_err("an incomplete scan is no answer");
            assert!(
                problem.downcast_ref::<netns::IncompleteScan>().is_some(),
                "{scope:?}: {problem:#}"
            );
            assert!(
                !problem.chain().any(|cause| cause.is::<NamespaceGone>()),
                "{scope:?}: a namespace taken for gone: {problem:#}"
            );
        }
        // Found at first, its tables unreadable, then the scan incomplete: not gone.
        let port_wide = Filter {
            port: 8080,
            addr: None,
            netns: None,
        };
        let scans = AtomicUsize::new(0);
        let found_then_incomplete = || -> Result<BTreeMap<u32, PathBuf>> {
            if scans.fetch_add(1, Ordering::SeqCst) == 0 {
                Ok(BTreeMap::from([(7, PathBuf::from("/proc/7/ns/net"))]))
            } else {
                incomplete()
            }
        };
        let unreadable = |_: u32, _: PathBuf| -> Result<u64> { anyhow::bail!("cannot enter") };
        let problem = confirm_with(&port_wide, &found_then_incomplete, &unreadable, &maps)
            .expect_err("an unreadable namespace that may exist is no answer");
        assert!(
            format!("{problem:#}").contains("namespace 7"),
            "{problem:#}"
        );
        // A complete scan that no longer finds it: gone, no connections left there.
        let scans = AtomicUsize::new(0);
        let found_then_gone = || -> Result<BTreeMap<u32, PathBuf>> {
            Ok(if scans.fetch_add(1, Ordering::SeqCst) == 0 {
                BTreeMap::from([(7, PathBuf::from("/proc/7/ns/net"))])
            } else {
                BTreeMap::new()
            })
        };
        assert_eq!(
            confirm_with(&port_wide, &found_then_gone, &unreadable, &maps).expect("gone"),
            0
        );
        // And a complete scan is read as before: the tables' count.
        let complete = || -> Result<BTreeMap<u32, PathBuf>> {
            Ok(BTreeMap::from([(7, PathBuf::from("/proc/7/ns/net"))]))
        };
        assert_eq!(
            confirm_with(&port_wide, &complete, &tables, &maps).expect("read"),
            1
        );
    }
}
