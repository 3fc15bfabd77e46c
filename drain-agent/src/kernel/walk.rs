//! Walks of the open sockets: seeding at start (connections opened before the agent) and
//! repairs (state changes the kernel skipped), with the sweep that drops tracked sockets a
//! walk no longer finds. Each walk also records what it vouches for (`maps::Vouched`).

use std::{
    collections::{BTreeSet, HashSet},
    io::Read as _,
    sync::atomic::Ordering,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{Iter, RawTracePoint},
};
use drain_agent_common::repair;
use log::{info, warn};

use super::{Kernel, forget::FORGETTER};
use crate::sys::netns;

impl Kernel {
    /// Counts the connections that were established before the handler was attached, in
    /// every network namespace, with the `iter/tcp` iterator (see the eBPF side for why this
    /// is exactly-once). Call it once, after [`Kernel::load`].
    ///
    /// With adopted state (`pin`) nothing is seeded: the pinned handler kept counting. The
    /// walk is then a repair ([`Kernel::repair`]): it stamps what is open, counts the opens
    /// and un-counts the closes the handler missed while no agent watched, and only then
    /// vouches for the counts.
    pub fn seed_existing_connections(&mut self) -> Result<WalkReport> {
        if self.maps.adopted {
            let repaired = self.repair()?;
            info!(
                "checked the adopted counts: {} missed opens counted, {} missed closes un-counted",
                repaired.opens_found, repaired.closes_found
            );
            return Ok(WalkReport::default());
        }
        let mut report = self.walk()?;
        if let Some((snapshot, failed, unsure)) = report.vouches.take() {
            self.maps.vouch(snapshot, failed, unsure);
        }
        let found = self.maps.repair_count(repair::OPENS_FOUND)?;
        self.maps.seeding_opens.store(found, Ordering::Relaxed);
        info!(
            "counted {found} connections open before start, in {} network namespaces ({} could not be read)",
            report.walked.len(),
            report.failed
        );
        Ok(report)
    }

    /// Walks the open sockets of every network namespace: counts open passive sockets that
    /// are not tracked and stamps the tracked ones it finds open.
    fn walk(&mut self) -> Result<WalkReport> {
        if let Some(problem) = &self.walker_problem {
            bail!("{problem}");
        }
        // Before Linux 5.15 a walk can race a close from here on (`Doubt::WalkUnlocked`).
        self.maps.walk_began.store(true, Ordering::Relaxed);
        let program: &mut Iter = self
            .ebpf
            .program_mut(WALKER)
            .context("the eBPF object has no walker")?
            .try_into()
            .context("the walker is not an iterator")?;
        // Every counter as it is before the walk: what the walk will vouch for.
        let snapshot = self.maps.snapshot()?;
        // Found after the snapshot: every namespace that existed at it is walked. A scan
        // that could not look everywhere (out of descriptors it finds none) fails the walk
        // before it changes anything: walking only what it found would vouch for the
        // namespaces it missed (`Doubt::Seeding`'s connections opened before the start,
        // never counted).
        let namespaces = netns::all_namespaces().context("cannot walk the open sockets")?;
        // Listeners are recorded afresh by each walk (a closed one must not linger, and a
        // full map is then only ever this walk's).
        let stale_listeners: Vec<u64> = self.listeners.keys().filter_map(Result::ok).collect();
        for key in stale_listeners {
            let _ = self.listeners.remove(&key);
        }
        // So are the ports of sockets whose passivity the walk cannot tell.
        let stale_unsure: Vec<u16> = self.unsure_ports.keys().filter_map(Result::ok).collect();
        for port in stale_unsure {
            let _ = self.unsure_ports.remove(&port);
        }
        let mut report = WalkReport {
            started_ns: crate::tracker::monotonic_ns(),
            ..WalkReport::default()
        };
        let mut failed = BTreeSet::new();
        for (inode, path) in namespaces {
            let link_id = program
                .attach()
                .context("cannot attach the iter/tcp iterator")?;
            let link = program
                .take_link(link_id)
                .context("cannot take the iterator link")?;
            // The iterator walks the namespace of whoever creates its file: do that inside.
            let walked = netns::run_in(inode, &path, move || -> Result<()> {
                let mut file = link.into_file().context("cannot create the iterator")?;
                let mut sink = Vec::new();
                file.read_to_end(&mut sink).context("the iterator failed")?;
                Ok(())
            });
            match walked {
                Ok(()) => {
                    report.walked.insert(inode);
                }
                Err(error) => {
                    report.failed += 1;
                    failed.insert(inode);
                    warn!(
                        "cannot walk network namespace {inode} ({}): {error:#}",
                        path.display()
                    );
                }
            }
        }
        // A namespace whose processes just exited is gone, and so are its connections;
        // one that is still there was not walked, and its counts are not vouched for. Only
        // a complete scan says which are gone: after an incomplete one every namespace not
        // walked stays doubted (`Doubt::NamespaceUnwalked`).
        match netns::all_namespaces() {
            Ok(still_there) => failed.retain(|inode| still_there.contains_key(inode)),
            Err(problem) if !failed.is_empty() => warn!(
                "{problem:#}: the {} network namespace(s) not walked stay doubted",
                failed.len()
            ),
            Err(_) => {}
        }
        let unsure = self.unsure_ports.keys().filter_map(Result::ok).collect();
        report.vouches = Some((snapshot, failed, unsure));
        Ok(report)
    }

    /// Finds and repairs state changes the handler missed: walks the open sockets (which
    /// counts missed opens), then drops the tracked sockets of walked namespaces that the
    /// walk did not find open and that were not tracked after it began (missed closes).
    pub fn repair(&mut self) -> Result<RepairReport> {
        let opens_before = self.maps.repair_count(repair::OPENS_FOUND)?;
        let closes_before = self.maps.repair_count(repair::CLOSES_FOUND)?;
        let mut walk = self.walk()?;
        let mut stale = Vec::new();
        for entry in self.sockets.iter() {
            // Entries come and go while we read: a vanished one is simply not a candidate.
            let Ok((sk, entry)) = entry else { continue };
            if entry.audited_ns < walk.started_ns
                && entry.tracked_ns < walk.started_ns
                && walk.walked.contains(&entry.key.netns)
            {
                stale.push(sk);
            }
        }
        self.forget_stale(&stale, walk.started_ns)?;
        // Only now are the missed closes before the walk un-counted too: vouch after the
        // sweep, not after the walk (a count in between is still too high).
        if let Some((snapshot, failed, unsure)) = walk.vouches.take() {
            self.maps.vouch(snapshot, failed, unsure);
        }
        Ok(RepairReport {
            opens_found: self.maps.repair_count(repair::OPENS_FOUND)? - opens_before,
            closes_found: self.maps.repair_count(repair::CLOSES_FOUND)? - closes_before,
        })
    }

    /// Whether this kernel can walk the open sockets (seeding and repairs).
    pub const fn can_walk(&self) -> bool {
        self.walker_problem.is_none()
    }

    /// Why this kernel cannot walk the open sockets, if it cannot.
    pub fn walker_problem(&self) -> Option<&str> {
        self.walker_problem.as_deref()
    }
}

/// The kernel function an `iter/tcp` program's BTF id names (aya's `Iter::load("tcp")`
/// looks up `bpf_iter_` + the target).
pub(super) const ITER_TCP: &str = "bpf_iter_tcp";

/// The walker: `iter/tcp`, run at start and for repairs.
const WALKER: &str = "seed_established_tcp";

/// Loads the walker and the forgetter; they need Linux >= 5.9 (iter/tcp) and >= 5.10
/// (running a raw tracepoint program on demand).
pub(super) fn load_walker(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<()> {
    let walker: &mut Iter = ebpf
        .program_mut(WALKER)
        .context("the eBPF object has no walker")?
        .try_into()
        .context("the walker is not an iterator")?;
    walker
        .load("tcp", btf)
        .context("cannot load the iter/tcp walker (Linux >= 5.9 needed)")?;
    let forget: &mut RawTracePoint = ebpf
        .program_mut(FORGETTER)
        .context("the eBPF object has no forget_stale_socket")?
        .try_into()
        .context("forget_stale_socket is not a raw tracepoint")?;
    forget.load().context("cannot load forget_stale_socket")?;
    Ok(())
}

/// What a walk did.
#[derive(Clone, Debug, Default)]
pub struct WalkReport {
    /// CLOCK_MONOTONIC when the walk began.
    pub started_ns: u64,
    /// Inodes of the network namespaces walked.
    pub walked: HashSet<u32>,
    /// Namespaces that could not be walked.
    pub failed: usize,
    /// What the walk vouches for once its caller has finished with it (the counters at its
    /// start, the namespaces it could not enter, the ports of open sockets it could not call
    /// passive or not).
    pub vouches: Option<(super::maps::Snapshot, BTreeSet<u32>, BTreeSet<u16>)>,
}

/// What a repair found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    pub opens_found: u64,
    pub closes_found: u64,
}
