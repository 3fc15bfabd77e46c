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
    programs::{Iter, RawTracePoint, iter::IterLink},
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
        let walked = walk_each(
            namespaces,
            |inode, path| {
                let link = iterator_link(program, "the iter/tcp iterator")?;
                // The iterator walks the namespace of whoever creates its file: do that
                // inside.
                netns::run_in(inode, path, move || run_iterator(link, "the iterator"))
            },
            netns::all_namespaces,
        );
        report.failed = walked.failed.len();
        report.walked = walked.walked;
        let failed = walked.failed;
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

/// `program` (an `iter/tcp` iterator, `what` in errors) attached, its link taken: run it with
/// [`run_iterator`] in the namespace to walk.
pub(super) fn iterator_link(program: &mut Iter, what: &str) -> Result<IterLink> {
    let link_id = program
        .attach()
        .with_context(|| format!("cannot attach {what}"))?;
    program
        .take_link(link_id)
        .context("cannot take the iterator link")
}

/// Runs the iterator of `link` (`what` in errors) to its end in the calling thread's network
/// namespace: the iterator walks the namespace of whoever creates its file.
pub(super) fn run_iterator(link: IterLink, what: &str) -> Result<()> {
    let mut file = link.into_file().context("cannot create the iterator")?;
    let mut sink = Vec::new();
    file.read_to_end(&mut sink)
        .with_context(|| format!("{what} failed"))?;
    Ok(())
}

/// What [`walk_each`] did: the namespaces walked, and those not walked that are still
/// there (their counts are not vouched for).
#[derive(Debug, Default, PartialEq, Eq)]
struct Walked {
    walked: HashSet<u32>,
    failed: BTreeSet<u32>,
}

/// Walks each of `namespaces` (inode, and a path to it) with `walk`, then asks `rescan`
/// which are still there. A namespace whose walk failed and that is gone (its processes
/// exited) is gone with its connections. One still there was reached through a path that
/// went away (the process it was found through exited between the scan and the walk, while
/// another process or a pin keeps the namespace): it is walked once more through the path
/// the rescan found, so that a short-lived process in a pod does not leave the pod's counts
/// doubted until the next walk (on a busy node, every walk). Only a complete rescan says
/// which are gone: after an incomplete one every namespace not walked stays doubted
/// (`Doubt::NamespaceUnwalked`).
fn walk_each(
    namespaces: impl IntoIterator<Item = (u32, std::path::PathBuf)>,
    mut walk: impl FnMut(u32, &std::path::Path) -> Result<()>,
    rescan: impl FnOnce() -> Result<std::collections::BTreeMap<u32, std::path::PathBuf>>,
) -> Walked {
    let mut done = Walked::default();
    let mut tried = std::collections::HashMap::new();
    for (inode, path) in namespaces {
        match walk(inode, &path) {
            Ok(()) => {
                done.walked.insert(inode);
            }
            Err(error) => {
                warn!(
                    "cannot walk network namespace {inode} ({}): {error:#}",
                    path.display()
                );
                done.failed.insert(inode);
                tried.insert(inode, path);
            }
        }
    }
    if done.failed.is_empty() {
        return done;
    }
    let still_there = match rescan() {
        Ok(still_there) => still_there,
        Err(problem) => {
            warn!(
                "{problem:#}: the {} network namespace(s) not walked stay doubted",
                done.failed.len()
            );
            return done;
        }
    };
    done.failed.retain(|inode| still_there.contains_key(inode));
    let again: Vec<(u32, std::path::PathBuf)> = done
        .failed
        .iter()
        .filter_map(|inode| {
            let path = still_there.get(inode)?;
            (tried.get(inode) != Some(path)).then(|| (*inode, path.clone()))
        })
        .collect();
    for (inode, path) in again {
        match walk(inode, &path) {
            Ok(()) => {
                done.failed.remove(&inode);
                done.walked.insert(inode);
                info!(
                    "walked network namespace {inode} through {} (its first path went away)",
                    path.display()
                );
            }
            Err(error) => warn!(
                "cannot walk network namespace {inode} ({}) either: {error:#}",
                path.display()
            ),
        }
    }
    done
}

/// What a repair found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    pub opens_found: u64,
    pub closes_found: u64,
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        path::{Path, PathBuf},
    };

    use super::*;

    /// Seen in a CI run: a namespace found through a process that exited between the scan
    /// and the walk, kept alive by another one, was not walked, and its counts stayed doubted
    /// (`/healthz` degraded, `status` exit 1) until the next walk. It is walked once more
    /// through the path the second scan finds; one whose path is the same is not asked again,
    /// one that is gone is gone, and after an incomplete scan every one not walked stays.
    #[test]
    fn a_namespace_whose_path_went_away_is_walked_through_another() {
        let found = || {
            vec![
                (7, PathBuf::from("/proc/10/ns/net")),
                (8, PathBuf::from("/proc/11/ns/net")),
                (9, PathBuf::from("/proc/12/ns/net")),
                (6, PathBuf::from("/proc/13/ns/net")),
            ]
        };
        let mut asked = Vec::new();
        let walk = |asked: &mut Vec<PathBuf>, _: u32, path: &Path| -> Result<()> {
            asked.push(path.to_owned());
            match path.to_str() {
                Some("/proc/12/ns/net" | "/proc/20/ns/net") => Ok(()),
                _ => bail!("No such file or directory"),
            }
        };
        let done = walk_each(
            found(),
            |inode, path| walk(&mut asked, inode, path),
            || {
                Ok(BTreeMap::from([
                    (7, PathBuf::from("/proc/20/ns/net")),
                    (8, PathBuf::from("/proc/11/ns/net")),
                    (9, PathBuf::from("/proc/12/ns/net")),
                ]))
            },
        );
        assert_eq!(done.walked, HashSet::from([7, 9]));
        assert_eq!(
            done.failed,
            BTreeSet::from([8]),
            "6 is gone; 8 is there and not walked"
        );
        assert_eq!(
            asked.len(),
            5,
            "8 is not asked again through the same path: {asked:?}"
        );
        let incomplete = walk_each(
            found(),
            |inode, path| walk(&mut Vec::new(), inode, path),
            || bail!("out of descriptors"),
        );
        assert_eq!(incomplete.failed, BTreeSet::from([6, 7, 8]));
    }
}
