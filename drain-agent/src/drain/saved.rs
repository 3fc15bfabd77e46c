//! What `--state-dir` keeps of the drains across a restart (the layout of `drains.json`),
//! and the glue to the [`StateFile`](crate::drain::state_file::StateFile): saving, restoring at start-up, taking over from the
//! agent that wrote it (an upgrade).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    drain::{
        DrainRecord, DrainSpec, Drains, Given,
        gate::{Asked, AtEnd, Held},
        listener_reads::Serial,
        lock,
        owner::Owner,
        registry::{Running, scope_text},
        state_file::{
            FILE_NAME, Found, Lasting, MAX_BYTES, NEXT_FILE_NAME, Role, Stamp, StateFile,
            Unreadable, Which, Written,
        },
        unix_ms,
    },
    drain_rule::{Cidr, DrainRule},
    metric_labels::MetricLabels,
    tracker::Filter,
};

/// Whether [`Drains::save`] left the drains and gates as they are now on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Saved {
    /// On disk, or nothing to keep there (no state file).
    Yes,
    /// Not written: the agent is stopping, and what is on disk stays (to resume at the next
    /// start). A change made now would not be on disk: `POST` and `DELETE /drain` refuse it.
    Stopping,
    /// Not on disk (the write failed, or a third agent keeps them in memory only): they
    /// would not survive a restart of the agent. Said on the answer and in the metrics.
    No,
}

/// What `--state-dir` keeps across a restart: the drains `POST /drain` started that are in
/// progress, and the scopes held out of rotation after their drains. The drains in progress
/// that only `/drained` waiters started are there too, marked ([`SavedDrain::waiters_only`]):
/// for the other agent of an upgrade's overlap to gate their scopes while they run, never
/// to be resumed.
///
/// In the next agent's file (`drains.next.json`, an upgrade's overlap) it is that agent's own:
/// drains POSTed to it (or its waiters started), gates its drains left, and what `DELETE
/// /drain` ended there of the state it restored (`cancelled`, `released`; never in the state
/// file itself).
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedDrains {
    drains: Vec<SavedDrain>,
    held: Vec<SavedHold>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cancelled: Vec<DrainIdentity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    released: Vec<ReleasedGate>,
}

/// How long after its deadline a drain may still be closing what is left
/// (`on_timeout=close`: the wait for the seeding walk, then `pace` a second) before its gate
/// is held: allowed for in the file's `until_ms`.
const CLOSING_ALLOWANCE: Duration = Duration::from_secs(60);

/// The file's `until_ms` (the forward-compatibility rule, ARCHITECTURE.md): the last hold's
/// end, or a drain's deadline, its close and the hold after it.
impl Lasting for SavedDrains {
    fn lasts_until_ms(&self) -> u64 {
        let after_a_drain = millis(CLOSING_ALLOWANCE + crate::drain::GATE_HOLD);
        let drains = self
            .drains
            .iter()
            .map(|drain| drain.deadline_ms.saturating_add(after_a_drain));
        let held = self.held.iter().map(|hold| hold.until_ms);
        drains.chain(held).max().unwrap_or(0)
    }
}

/// What the state may take of the file: [`MAX_BYTES`] (past it nothing is written, and a
/// restart reads no more), less room for the envelope around it (`version`, `until_ms`).
const STATE_ROOM: u64 = MAX_BYTES - 1024;

/// The length of `value` as the file encodes it (JSON); `u64::MAX` if it cannot be.
fn encoded_len(value: &impl Serialize) -> u64 {
    serde_json::to_vec(value).map_or(u64::MAX, |data| {
        u64::try_from(data.len()).unwrap_or(u64::MAX)
    })
}

impl SavedDrains {
    /// How many of its drains only `/drained` waiters started.
    fn waiters_drains(&self) -> usize {
        self.drains
            .iter()
            .filter(|drain| drain.waiters_only)
            .count()
    }

    /// Adds `waiters_drains` (drains only `/drained` waiters started), oldest first, while
    /// the state stays within `room` bytes encoded: they only gate the other agent of an
    /// overlap, and must never take the file past its limit, which would leave every POSTed
    /// drain and held gate unsaved. Their number is bounded as every drain's is (the node's
    /// `--max-waiters`, an owner's `RUNNING_PER_OWNER`); this bounds their bytes. Returns
    /// how many were left out.
    fn add_waiters_drains(&mut self, mut waiters_drains: Vec<SavedDrain>, room: u64) -> usize {
        if waiters_drains.is_empty() {
            return 0;
        }
        let mut left = room.saturating_sub(encoded_len(self));
        waiters_drains.sort_by_key(|drain| (drain.record.started_ms, drain.record.id));
        let all = waiters_drains.len();
        for drain in waiters_drains {
            // With the comma before it.
            let size = encoded_len(&drain).saturating_add(1);
            if size > left {
                break;
            }
            left -= size;
            self.drains.push(drain);
        }
        all - self.waiters_drains()
    }
}

/// A drain in progress: its record and everything its spec needs.
#[derive(Debug, Serialize, Deserialize)]
struct SavedDrain {
    record: DrainRecord,
    /// Unix time in milliseconds when it ends (at a restart it resumes with what is left).
    deadline_ms: u64,
    timeout_ms: u64,
    quiet_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ignore: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idle_ms: Option<u64>,
    pace: u32,
    given: SavedGiven,
    /// The cookie of its namespace when it started (a namespace's drain, on a kernel with
    /// cookies): restored, it ends at once if the inode is another namespace's by then
    /// (`namespace.rs`). Optional and left out when unknown, so the file keeps its version:
    /// an older agent ignores it (nothing there denies unknown fields), and a file without
    /// it (an older agent's) is restored checking only that the namespace still exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns_cookie: Option<u64>,
    /// Started by `/drained` waiters only (no `POST` asked for it): kept so that the other
    /// agent of an upgrade's overlap answers its scope "draining" while it runs
    /// ([`Drains::writers_gate`], [`Drains::beside_gate`]: a pod's preStop hook waiting on
    /// one agent while the other answers `/health`), and never resumed, taken over or folded
    /// in: its waiters are its agent's and end with it (without them it would have ended
    /// `abandoned`); the next agent that owns the file writes it again without it
    /// ([`Drains::restore`], a take-over, a fold-in). Left out when false, so the file keeps its version: an agent before
    /// this one ignores it (nothing in the layout denies unknown fields) and takes such a
    /// drain for a POSTed one — its gate answers "draining" for it, and at its start it
    /// resumes it to its deadline (with its `on_timeout`, as its waiters asked): more out of
    /// rotation, never less.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    waiters_only: bool,
    /// A namespace's drain: the addresses that may be that pod's as this agent read them at
    /// the save ([`PodAddresses::addresses_of`]: its own, and those it gave up lately). The
    /// next agent takes them as maybe that namespace's while the drain and the hold after
    /// it could gate ([`Drains::keep_pod_addresses`]): its fresh map never saw an address
    /// that left the pod before its start, and a question about it was asked in the node's
    /// namespace, "not draining". Left out when empty, so the file keeps its version: an
    /// older agent ignores it (nothing in the layout denies unknown fields), and a file
    /// without it (an older agent's) is restored as before.
    ///
    /// [`PodAddresses::addresses_of`]: crate::sys::pod_addresses::PodAddresses::addresses_of
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    addresses: Vec<IpAddr>,
}

/// [`Given`] on disk.
#[derive(Debug, Serialize, Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one flag per setting a request can name, as `Given`"
)]
struct SavedGiven {
    on_timeout: bool,
    quiet: bool,
    ignore: bool,
    idle: bool,
    pace: bool,
}

/// A scope held out of rotation after its drain.
#[derive(Debug, Serialize, Deserialize)]
struct SavedHold {
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<u32>,
    /// Cookies of the listeners when the drain ended (a socket's cookie never changes):
    /// every one on `port` in the namespaces the scope names (`netns`; without it, every
    /// namespace's), whatever its address ([`Drains::end_listeners`]) — what every release
    /// has saved and compares with those namespaces' listeners; this one compares only the
    /// scope's own with them ([`Drains::scope_listeners`]). `[]` for a namespace gone at
    /// the end. `null` only when that read failed ([`AtEnd::Unknown`], rare: a failed
    /// netlink read; no listener reopens the gate until a read succeeds). An agent before
    /// this one cannot read `null`: it takes the file for unreadable and fails closed
    /// (every scope gated), never reopens the gate at the first listener as it would have
    /// with the `[]` it wrote then.
    listeners: Option<Vec<u64>>,
    /// Unix time in milliseconds when the hold ends.
    until_ms: u64,
    /// A namespace's hold: the addresses that may be that pod's, as
    /// [`SavedDrain::addresses`] (left out when empty; an older agent ignores it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    addresses: Vec<IpAddr>,
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A hold's end `until` as the file keeps it: Unix time in milliseconds, from the clocks
/// read once per save (`now`, `now_ms`).
fn saved_end(until: tokio::time::Instant, now: tokio::time::Instant, now_ms: u64) -> u64 {
    now_ms.saturating_add(millis(until.saturating_duration_since(now)))
}

/// The addresses that may be each namespace's, as read for a save ([`Drains::save`]): those
/// of the namespaces its drains and holds are scoped by.
type PodAddressesNow = HashMap<u32, Vec<IpAddr>>;

/// `scope`'s pod addresses in `addresses` (none for a scope of no namespace).
fn addresses_of(scope: &Filter, addresses: &PodAddressesNow) -> Vec<IpAddr> {
    scope
        .netns
        .and_then(|netns| addresses.get(&netns))
        .cloned()
        .unwrap_or_default()
}

impl SavedDrain {
    fn of(
        drain: &Running,
        now: tokio::time::Instant,
        now_ms: u64,
        addresses: &PodAddressesNow,
    ) -> Self {
        let (spec, deadline) = (&drain.spec, drain.deadline);
        Self {
            addresses: addresses_of(&spec.filter, addresses),
            netns_cookie: drain.netns_cookie,
            waiters_only: !drain.posted.load(Ordering::Acquire),
            record: DrainRecord {
                // A drain reaching its end has its result set while it is still running (its
                // end's listener read and journal line come first): a save meanwhile would
                // write it, and an older agent cannot read a result newer than itself
                // (`continued`), failing closed on the whole file. No restore reads a
                // running drain's result: a resumed drain ends again.
                result: None,
                ..lock(&drain.record).clone()
            },
            deadline_ms: now_ms.saturating_add(millis(deadline.saturating_duration_since(now))),
            timeout_ms: millis(spec.timeout),
            quiet_ms: millis(spec.rule.quiet),
            ignore: spec.rule.ignore.iter().map(ToString::to_string).collect(),
            idle_ms: spec.rule.idle.map(millis),
            pace: spec.pace,
            given: SavedGiven {
                on_timeout: spec.given.on_timeout,
                quiet: spec.given.quiet,
                ignore: spec.given.ignore,
                idle: spec.given.idle,
                pace: spec.given.pace,
            },
        }
    }

    /// The drain's spec again; `None` when a setting cannot be read.
    fn spec(&self) -> Option<DrainSpec> {
        let ignore = self
            .ignore
            .iter()
            .map(|cidr| Cidr::from_saved(cidr).ok())
            .collect::<Option<Vec<_>>>()?;
        Some(DrainSpec {
            filter: Filter {
                port: self.record.port,
                addr: self.record.addr,
                netns: self.record.netns,
            },
            timeout: Duration::from_millis(self.timeout_ms),
            rule: DrainRule {
                quiet: Duration::from_millis(self.quiet_ms),
                ignore,
                idle: self.idle_ms.map(Duration::from_millis),
            },
            on_timeout: self.record.on_timeout,
            pace: self.pace,
            given: Given {
                on_timeout: self.given.on_timeout,
                quiet: self.given.quiet,
                ignore: self.given.ignore,
                idle: self.given.idle,
                pace: self.given.pace,
            },
        })
    }
}

impl Drains {
    /// The drains and gates to keep across a restart, as they are now; `None` once the agent
    /// is stopping (drains end then as `agent_shutdown`, and must stay on disk to resume).
    ///
    /// For [`Role::Next`] (beside the writer): only what is this agent's own, and the cancels
    /// of what it restored ([`Overlap`]); the writer's file has the rest.
    ///
    /// The drains only `/drained` waiters started come last, and only within the file's
    /// limit ([`SavedDrains::add_waiters_drains`]): never at the cost of a POSTed drain or
    /// a held gate.
    fn saved(&self, role: Role, addresses: &PodAddressesNow) -> Option<SavedDrains> {
        if self.tracker.shutting_down() {
            return None;
        }
        let now_ms = unix_ms();
        let now = tokio::time::Instant::now();
        let overlap = lock(&self.overlap);
        let theirs = overlap.as_ref().filter(|_| role == Role::Next);
        let (waiters_drains, drains): (Vec<_>, Vec<_>) = lock(&self.running)
            .values()
            .filter(|drain| {
                theirs.is_none_or(|overlap| {
                    !overlap
                        .drains
                        .contains(&DrainIdentity::of(&lock(&drain.record)))
                })
            })
            .map(|drain| SavedDrain::of(drain, now, now_ms, addresses))
            .partition(|drain| drain.waiters_only);
        let held = lock(&self.held)
            .iter()
            .filter(|(_, hold)| hold.until > now)
            .filter(|(scope, hold)| {
                theirs.is_none_or(|overlap| {
                    overlap
                        .gates
                        .get(*scope)
                        .is_none_or(|(_, until)| *until != hold.until)
                })
            })
            .map(|(scope, hold)| SavedHold {
                port: scope.port,
                addr: scope.addr,
                netns: scope.netns,
                listeners: match &hold.listeners {
                    AtEnd::Read(cookies) => Some(cookies.iter().copied().collect()),
                    AtEnd::Unknown => None,
                },
                until_ms: saved_end(hold.until, now, now_ms),
                addresses: addresses_of(scope, addresses),
            })
            .collect();
        let (cancelled, released) = theirs.map_or_else(Default::default, |overlap| {
            (
                overlap.cancelled.iter().cloned().collect(),
                overlap.released.iter().cloned().collect(),
            )
        });
        let mut saved = SavedDrains {
            drains,
            held,
            cancelled,
            released,
        };
        let left_out = saved.add_waiters_drains(waiters_drains, STATE_ROOM);
        if left_out > 0 {
            log::warn!(
                "{left_out} drain(s) only /drained waiters started are not saved (the state file would pass {MAX_BYTES} bytes): during an upgrade's overlap the other agent's /health and agent-check do not see them"
            );
        }
        Some(saved)
    }

    /// Writes the state file (if any) and syncs it: called before `POST /drain` and
    /// `DELETE /drain` are answered, and when a drain ends. A failure is logged, counted
    /// ([`Drains::unsaved`]) and returned, for the answer to say: the drain goes on, but
    /// would not survive a restart.
    pub async fn save(self: &Arc<Self>) -> Saved {
        let Some(file) = self.state.clone() else {
            return Saved::Yes;
        };
        let mut addresses = PodAddressesNow::new();
        if let Some(pods) = &self.pods {
            // Read again if stale (at most once per `HIT_REFRESH`), not under a lock.
            for netns in self.scoped_namespaces() {
                addresses.insert(netns, pods.addresses_of(netns).await);
            }
        }
        let drains = Arc::clone(self);
        let written = tokio::task::spawn_blocking(move || {
            file.write_with(|role| drains.saved(role, &addresses))
        })
        .await;
        match written {
            Ok(written) => Self::saved_as(written),
            Err(problem) => {
                log::warn!("the state file writer failed: {problem}");
                Saved::No
            }
        }
    }

    /// [`Drains::save`] on this thread: at start-up ([`Drains::restore`]), which reads the
    /// files on it too.
    fn save_here(&self, file: &StateFile) -> Saved {
        let addresses: PodAddressesNow = self.pods.as_ref().map_or_else(Default::default, |pods| {
            self.scoped_namespaces()
                .into_iter()
                .map(|netns| (netns, pods.addresses_of_as_read(netns)))
                .collect()
        });
        Self::saved_as(file.write_with(|role| self.saved(role, &addresses)))
    }

    /// The namespaces the drains in progress and the held gates are scoped by: the pods
    /// whose addresses a save keeps with them ([`SavedDrain::addresses`]).
    fn scoped_namespaces(&self) -> HashSet<u32> {
        let mut namespaces: HashSet<u32> = lock(&self.running)
            .keys()
            .filter_map(|scope| scope.netns)
            .collect();
        namespaces.extend(lock(&self.held).keys().filter_map(|scope| scope.netns));
        namespaces
    }

    /// [`Drains::keep_pod_addresses`] of the other agent's file just read (an upgrade's
    /// overlap: a drain or hold made there after this agent started).
    fn keep_looked_addresses(&self, looked: &Looked) {
        if let Looked::Read(_, saved, _) = looked {
            self.keep_pod_addresses(saved);
        }
    }

    /// The addresses `saved` keeps with its namespaces' drains and holds
    /// ([`SavedDrain::addresses`]), taken as maybe those namespaces' for as long as each
    /// could gate (a drain: to its deadline, its close and the hold after it; a hold: to its
    /// end), at most `FORMER_KEPT` from now ([`PodAddresses::keep_former`]). Whatever is
    /// restored of it: such an address only makes a question about it be asked in that
    /// namespace too, never gates by itself.
    ///
    /// [`PodAddresses::keep_former`]: crate::sys::pod_addresses::PodAddresses::keep_former
    fn keep_pod_addresses(&self, saved: &SavedDrains) {
        let Some(pods) = &self.pods else {
            return;
        };
        let now_ms = unix_ms();
        let now = tokio::time::Instant::now();
        let after_a_drain = millis(CLOSING_ALLOWANCE + crate::drain::GATE_HOLD);
        let drains = saved.drains.iter().map(|drain| {
            (
                drain.record.netns,
                drain.netns_cookie,
                &drain.addresses,
                drain.deadline_ms.saturating_add(after_a_drain),
            )
        });
        let held = saved
            .held
            .iter()
            .map(|hold| (hold.netns, None, &hold.addresses, hold.until_ms));
        for (netns, cookie, addresses, until_ms) in drains.chain(held) {
            if let Some(netns) = netns
                && !addresses.is_empty()
                && until_ms > now_ms
            {
                let until = now + Duration::from_millis(until_ms - now_ms);
                pods.keep_former(netns, cookie, addresses, until);
            }
        }
    }

    /// What a write of the state says of the drains: a failure logged.
    fn saved_as(written: anyhow::Result<Written>) -> Saved {
        match written {
            Ok(Written::OnDisk) => Saved::Yes,
            Ok(Written::Nothing) => Saved::Stopping,
            // Warned at start (`StateFile::open`).
            Ok(Written::InMemoryOnly) => Saved::No,
            Err(problem) => {
                log::warn!("cannot save the drains (they will not survive a restart): {problem:#}");
                Saved::No
            }
        }
    }

    /// Whether the drains and gates as they are now are not in `--state-dir` (the last save
    /// failed, or this is a third agent beside two), and how many saves since the start did
    /// not reach the disk: `drain_agent_drains_unsaved` and
    /// `drain_agent_drain_save_failures_total`.
    pub fn unsaved(&self) -> (bool, u64) {
        self.state
            .as_ref()
            .map_or((false, 0), |file| file.unsaved())
    }

    /// Drains whose record could not be written to the journal since the start
    /// (`drain_agent_journal_write_failures_total`).
    pub fn unjournaled(&self) -> u64 {
        self.journal
            .as_ref()
            .map_or(0, |journal| journal.failed_appends())
    }

    /// At start-up: the drains POSTed before the last stop resume with their own deadlines
    /// (waiters of `/drained` are gone with the old process: a drain only they started would
    /// have ended `abandoned`, so none is resumed, though the file has them for the overlap's
    /// gates), and held gates stay held until their hold
    /// ends, a new listener appears, or `DELETE /drain`. Ids go on after the restored ones.
    /// Beside an agent that still writes the file (an upgrade), what is restored is noted
    /// for the take-over ([`Overlap`]).
    ///
    /// A `drains.next.json` a crashed agent left (its lock free) is taken over: its cancels
    /// hold (what they ended is not restored), its own drains and gates join.
    ///
    /// A file this agent owns now (the state file for the writer, a `drains.next.json` left
    /// by a gone agent) that lists drains only `/drained` waiters started is written again at
    /// once without them: their waiters were the agent's that saved them, gone, and nothing
    /// else may rewrite the file for days on a quiet node, while the other agent of the next
    /// upgrade's overlap (and an older agent after a rollback, which resumes them) reads them.
    /// The writer's file read beside it is that agent's, live: left as it is.
    pub fn restore(self: &Arc<Self>) {
        let Some(file) = &self.state else {
            return;
        };
        match file.set_aside_until_ms() {
            Ok(Some(until_ms)) => self.fail_closed(
                until_ms,
                &format!(
                    "a state file set aside earlier in {} (one this agent cannot read)",
                    file.path().parent().unwrap_or(file.path()).display()
                ),
            ),
            Ok(None) => {}
            Err(problem) => log::warn!("{problem:#}"),
        }
        let left = self.next_left(file).unwrap_or_default();
        let mut ended = Overlap {
            cancelled: left.cancelled.iter().cloned().collect(),
            released: left.released.iter().cloned().collect(),
            ..Overlap::default()
        };
        // The writer owns the file: one it cannot read is set aside before its first save.
        // Beside the writer it is that agent's, read only (`writers_gate` fails closed).
        let saved = if file.is_writer() {
            self.owned_state(file)
        } else {
            file.read::<SavedDrains>()
        };
        let mut gone_waiters = left.waiters_drains();
        if let Some(saved) = saved {
            if file.is_writer() {
                gone_waiters += saved.waiters_drains();
            }
            let restored = self.restore_saved(saved, Some(&ended));
            ended.drains = restored.drains;
            ended.gates = restored.gates;
        }
        if !left.drains.is_empty() || !left.held.is_empty() {
            log::info!("taking over what the agent beside the last writer kept (it has gone)");
            self.restore_saved(left, Some(&ended));
        }
        if !file.is_writer() {
            *lock(&self.overlap) = Some(ended);
        }
        // After the overlap is noted: beside the writer, only this agent's own is written.
        if gone_waiters > 0 && self.save_here(file) == Saved::Yes {
            log::info!(
                "{gone_waiters} drain(s) only /drained waiters of a gone agent started are no longer in {}",
                match file.role() {
                    Role::Next => NEXT_FILE_NAME,
                    Role::Writer | Role::Neither => FILE_NAME,
                }
            );
        }
    }

    /// Once the agent that wrote the state file has gone (an upgrade: `StateFile`): its last
    /// state is merged with this agent's, and this agent writes from now on.
    ///
    /// The merge: what that agent saved after this one started (drains POSTed to it
    /// meanwhile, gates it held) joins this agent's, scopes this agent has a POSTed drain of kept
    /// as they are (a drain only waiters started gives way to a POSTed one), and of two holds
    /// of a scope the later end kept;
    /// what this agent restored at its start and that agent no longer has (it
    /// ended or cancelled them meanwhile) ends here too; and what was cancelled here
    /// meanwhile ([`Drains::note_cancel`]), or restored at start and ended here since
    /// ([`Drains::note_end`]), is not brought back.
    pub async fn take_over_state(self: &Arc<Self>) {
        let Some(file) = self.state.clone() else {
            return;
        };
        if file.is_writer() {
            // A crashed agent's `drains.next.json`, restored at start: in the state, then
            // gone (before a request's `catch_up` could fold it in a second time).
            {
                let _one_at_a_time = self.folding.lock().await;
                if self.next_left(&file).is_some() {
                    self.save().await;
                }
                self.retire_next(&file);
            }
            self.fold_in_orphans(&file).await;
            return;
        }
        let waiter = Arc::clone(&file);
        match tokio::task::spawn_blocking(move || waiter.wait_for_lock()).await {
            Ok(Ok(())) => {}
            Ok(Err(problem)) => {
                log::warn!(
                    "{problem:#}: the drains are not saved (they will not survive a restart)"
                );
                return;
            }
            Err(problem) => {
                log::warn!("the state file's lock waiter failed: {problem}");
                return;
            }
        }
        // Nothing written between the lock and here: the file is that agent's last state.
        // One that cannot be read now (a later release's, at a rollback) ends nothing here
        // and is set aside, not written over: every scope gated while it could gate.
        let snapshot = lock(&self.overlap).clone().unwrap_or_default();
        let saved = self.owned_state(&file);
        if let Some(saved) = &saved {
            self.end_what_the_other_agent_ended(saved, &snapshot).await;
        }
        {
            // Under the lock `note_cancel` takes: a `DELETE` is either noted before the
            // restore, which then skips what it ended, or comes after it and ends it here.
            let mut live = lock(&self.overlap);
            let overlap = live.take().unwrap_or_default();
            if let Some(saved) = saved {
                self.restore_saved(saved, Some(&overlap));
            }
        }
        {
            // This agent's own `drains.next.json` is in the state file once saved; until it
            // is retired, a request's `catch_up` must not take it for a gone agent's.
            let _one_at_a_time = self.folding.lock().await;
            file.start_writing();
            self.save().await;
            self.retire_next(&file);
        }
        self.fold_in_orphans(&file).await;
    }

    /// The writer, until the agent stops: every [`ORPHAN_CHECK`], a `drains.next.json`
    /// whose agent has gone (crashed, or stopped while this one runs on: an upgrade rolled
    /// back) is folded in at once, not left until the next start. Its cancels end what they
    /// ended here (the drain or gate it had restored from this agent's file), its own drains
    /// and gates join (scopes this agent has a POSTed drain of already stay as they are; a
    /// drain of the scope only waiters started gives way; of two holds of a scope the later
    /// end is kept). A request about
    /// drains does not wait for this check: it folds the file in first ([`Drains::catch_up`]).
    async fn fold_in_orphans(self: &Arc<Self>, file: &StateFile) {
        loop {
            tokio::time::sleep(ORPHAN_CHECK).await;
            if self.tracker.shutting_down() {
                return;
            }
            if let Err(problem) = self.fold_in_orphan(file).await {
                log::warn!("{problem:#}");
            }
        }
    }

    /// Before a request reads or changes the drains or the gates (`POST`/`DELETE /drain`,
    /// `/drains`, a `/drained` waiter, `/health`, the agent-check): a `drains.next.json` whose
    /// agent has gone is folded in now. Else an upgrade rolled back would answer from the old
    /// agent's state alone until the writer's next check: the scope whose drain was POSTed
    /// to the gone agent in rotation, a `DELETE` of that drain answered 404 and undone by the
    /// fold-in, a hook's `/drained` starting a drain without the POSTed settings.
    ///
    /// The writer also looks at the `drains.next.json` of an agent beside it that runs (an
    /// upgrade's overlap): what that agent keeps out of rotation is out of rotation in this
    /// one's answers too ([`Drains::look_beside`], [`Drains::beside_gate`]).
    ///
    /// Costs one `lstat`, on a blocking thread, when there is no such file, which is always
    /// outside an upgrade.
    pub async fn catch_up(self: &Arc<Self>) {
        let Some(file) = &self.state else {
            return;
        };
        if !file.is_writer() {
            // Beside the writer: its file looked at before the question is resolved, for
            // the pod addresses kept with its drains and holds (`keep_looked_addresses`:
            // an address that left its pod before this agent started names it here too).
            if lock(&self.overlap).is_some() {
                let last = lock(&self.writer_view).read;
                let looked =
                    WriterView::look(last, file, Which::State, tokio::time::Instant::now());
                self.keep_looked_addresses(&looked);
                let reads_from = self.listener_reads.mark();
                lock(&self.writer_view).apply(looked, Which::State, reads_from);
            }
            return;
        }
        if !self.look_beside(file).await {
            return;
        }
        match self.fold_in_orphan(file).await {
            // Folded in: what it kept is this agent's own now, and the file gone.
            Ok(true) => {
                self.look_beside(file).await;
            }
            Ok(false) => {}
            // Said by the periodic check, every 2 s, not at every request.
            Err(problem) => log::debug!("{problem:#}"),
        }
    }

    /// One look for a `drains.next.json` whose agent has gone, folded in if there is one
    /// (true). An error: its lock could not be tried (nothing folded in, nothing changed).
    async fn fold_in_orphan(self: &Arc<Self>, file: &StateFile) -> anyhow::Result<bool> {
        let _one_at_a_time = self.folding.lock().await;
        if !file.take_orphaned_next()? {
            return Ok(false);
        }
        if let Some(left) = self.next_left(file) {
            log::info!(
                "folding in what an agent beside this one kept in {} (it has gone)",
                file.path().display()
            );
            self.fold_in(left).await;
            self.save().await;
        }
        self.retire_next(file);
        Ok(true)
    }

    /// A gone agent's `drains.next.json`, into this writer's state (see
    /// [`Drains::fold_in_orphans`]).
    async fn fold_in(self: &Arc<Self>, left: SavedDrains) {
        for cancelled in &left.cancelled {
            self.end_if_running(cancelled, "was cancelled on the agent beside this one")
                .await;
        }
        let now_ms = unix_ms();
        let now = tokio::time::Instant::now();
        lock(&self.held).retain(|scope, hold| {
            let until_ms = saved_end(hold.until, now, now_ms);
            !left
                .released
                .iter()
                .any(|released| released.is(scope, until_ms))
        });
        self.restore_saved(left, Some(&Overlap::default()));
    }

    /// Ends the drain `identity` names if it is the one running for its scope (not a later
    /// one of the same scope), logging `why`.
    async fn end_if_running(&self, identity: &DrainIdentity, why: &str) {
        let scope = identity.scope();
        let same = lock(&self.running)
            .get(&scope)
            .is_some_and(|drain| DrainIdentity::of(&lock(&drain.record)) == *identity);
        if same && let Some(record) = self.cancel(&scope).await {
            log::info!(
                "drain {} {why}: ended here too, {}",
                record.id,
                scope_text(&scope)
            );
        }
    }

    /// The state file, read by the agent that owns it (the writer at its start, or at the
    /// take-over): one it cannot read is set aside and fails closed ([`Drains::fail_closed`]).
    fn owned_state(&self, file: &StateFile) -> Option<SavedDrains> {
        match file.read_owned::<SavedDrains>() {
            Found::Nothing => None,
            Found::State(saved) => Some(saved),
            Found::Unreadable(unreadable) => {
                self.unreadable_found(&unreadable);
                None
            }
        }
    }

    /// `drains.next.json` while this agent holds its lock: one it cannot read is set aside
    /// (never written over, nor removed unread) and fails closed.
    fn next_left(&self, file: &StateFile) -> Option<SavedDrains> {
        match file.read_next::<SavedDrains>() {
            Found::Nothing => None,
            Found::State(left) => Some(left),
            Found::Unreadable(unreadable) => {
                self.unreadable_found(&unreadable);
                None
            }
        }
    }

    /// A state file this agent cannot read: said at ERROR, and every scope gated until it
    /// could no longer gate.
    fn unreadable_found(&self, unreadable: &Unreadable) {
        let version = unreadable
            .version
            .map_or_else(|| "unknown".to_owned(), |version| version.to_string());
        let at = if unreadable.set_aside {
            "moved aside to"
        } else {
            "left at"
        };
        self.fail_closed(
            unreadable.until_ms,
            &format!(
                "a state file this agent cannot read ({}; version {version}, this agent reads {}), {at} {}: its drains and gates are not restored (a rollback from a later release?)",
                unreadable.problem,
                crate::drain::state_file::VERSION,
                unreadable.path.display()
            ),
        );
    }

    /// Every scope answers "draining" (`/health`, the agent-check) until `until_ms` (Unix
    /// ms), for `why`; said at ERROR. A later end than one already set wins.
    fn fail_closed(&self, until_ms: u64, why: &str) {
        let now_ms = unix_ms();
        let left = Duration::from_millis(until_ms.saturating_sub(now_ms));
        if left.is_zero() {
            log::warn!("{why}: nothing in it gates any more");
            return;
        }
        log::error!(
            "{why}: every scope is answered \"draining\" on /health and the agent-check for {left:?}, until nothing in it could still gate (drain_agent_state_unreadable is 1 meanwhile)"
        );
        let until = tokio::time::Instant::now() + left;
        let mut failing = lock(&self.unreadable_until);
        if failing.is_none_or(|now| now < until) {
            *failing = Some(until);
        }
    }

    /// Whether a state file this agent could not read still gates every scope
    /// (`drain_agent_state_unreadable`).
    pub fn failing_closed(&self) -> bool {
        lock(&self.unreadable_until).is_some_and(|until| tokio::time::Instant::now() < until)
    }

    /// [`StateFile::retire_next`], logged when it fails (the file is then folded in again
    /// by the next agent: nothing lost, a cancel's drain ended twice at worst).
    fn retire_next(&self, file: &StateFile) {
        if let Err(problem) = file.retire_next() {
            log::warn!("{problem:#}");
        }
    }

    /// The merge's second part (see [`Drains::take_over_state`]): drains and gates restored
    /// at start that the other agent's last state no longer has.
    async fn end_what_the_other_agent_ended(&self, saved: &SavedDrains, overlap: &Overlap) {
        let still_there: HashSet<DrainIdentity> =
            saved.drains.iter().map(SavedDrain::identity).collect();
        for restored in overlap.drains.difference(&still_there) {
            self.end_if_running(
                restored,
                "was ended by the agent before this one during the upgrade (cancelled or over; its record is in that agent's journal)",
            )
            .await;
        }
        let held_there: HashSet<Filter> = saved.held.iter().map(SavedHold::scope).collect();
        let mut held = lock(&self.held);
        for (scope, (_, until)) in &overlap.gates {
            if !held_there.contains(scope)
                && held.get(scope).is_some_and(|hold| hold.until == *until)
            {
                held.remove(scope);
                log::info!(
                    "the /health gate of {} was released by the agent before this one during the upgrade: released here too",
                    scope_text(scope)
                );
            }
        }
    }

    /// Restores `saved`'s drains and gates, never a drain only `/drained` waiters started
    /// ([`SavedDrain::waiters_only`]). Beside `overlap` (the take-over, a fold-in): not
    /// for scopes this agent has a POSTed drain of already (of two holds of a scope, the later
    /// end is kept), nor what was cancelled
    /// here meanwhile. A drain of the scope only `/drained` waiters started gives way to a
    /// saved POSTed one ([`Running::hand_over`]: its waiters wait on that one). Returns what
    /// it restored.
    fn restore_saved(self: &Arc<Self>, saved: SavedDrains, overlap: Option<&Overlap>) -> Overlap {
        self.keep_pod_addresses(&saved);
        let path = self
            .state
            .as_ref()
            .map_or_else(String::new, |file| file.path().display().to_string());
        let now_ms = unix_ms();
        let now = tokio::time::Instant::now();
        let mut restored = Overlap::default();
        {
            let mut held = lock(&self.held);
            for hold in saved.held {
                if hold.until_ms <= now_ms {
                    continue;
                }
                let scope = hold.scope();
                let until = now + Duration::from_millis(hold.until_ms - now_ms);
                if overlap.is_some_and(|overlap| {
                    overlap
                        .released
                        .iter()
                        .any(|released| released.is(&scope, hold.until_ms))
                }) {
                    continue;
                }
                // Two holds of one scope (the take-over, a fold-in: this agent's own, or its
                // copy restored at its start, and the other agent's): the later end wins,
                // listeners and all, as the later drain's end is the later one. Before,
                // this agent's was kept whatever its end (even one already over, which only
                // a covering question removes): a `drain-agent wait` whose last slice ended
                // `drained` on the other agent was back in rotation at the end of an
                // earlier slice's hold, up to 5 minutes early.
                match held.get(&scope) {
                    Some(kept) if kept.until >= until => continue,
                    Some(_) => {}
                    None if held.len() >= self.held_max => continue,
                    None => {}
                }
                held.insert(
                    scope.clone(),
                    Held {
                        listeners: hold.at_end(),
                        until,
                        reads_from: self.listener_reads.mark(),
                    },
                );
                restored.gates.insert(scope, (hold.until_ms, until));
            }
        }
        // The waiters of a drain only they started were the saving agent's (gone, or still
        // answering them beside this one): without them it is no drain to resume.
        let mut waiters_drains = 0_usize;
        for drain in saved.drains {
            if drain.waiters_only {
                waiters_drains += 1;
                continue;
            }
            let Some(spec) = drain.spec() else {
                log::warn!(
                    "{path}: drain {} has settings this agent cannot read: not resumed",
                    drain.record.id
                );
                continue;
            };
            let identity = drain.identity();
            if overlap.is_some_and(|overlap| {
                overlap.cancelled.contains(&identity) || overlap.ended.contains(&identity)
            }) {
                continue;
            }
            let id = drain.record.id;
            let ran_for = Duration::from_millis(now_ms.saturating_sub(drain.record.started_ms));
            let left = Duration::from_millis(drain.deadline_ms.saturating_sub(now_ms));
            let resumed = Running::new(
                spec.clone(),
                now.checked_sub(ran_for).unwrap_or(now),
                now + left,
                drain.record,
                drain.netns_cookie,
                true,
                false,
            );
            let existing = {
                let mut running = lock(&self.running);
                let existing = running.get(&spec.filter).cloned();
                if let Some(existing) = &existing
                    && overlap.is_some()
                {
                    // Beside this agent's own drain of the scope (the take-over, a fold-in):
                    // a POSTed one stays as it is. One only `/drained` waiters started gives
                    // way (unless its verdict is taken: it ends on its own, its waiters get
                    // that verdict, and the drain restored here has the scope after it).
                    if existing.posted.load(Ordering::Acquire) {
                        drop(running);
                        differs_from_kept(&path, existing, &spec, id);
                        continue;
                    }
                    // Its waiters follow the restored drain only where they could have joined
                    // it: no setting they named differs (a join naming another one is a 409,
                    // and a looser rule, no `quiet` or an `idle`, would answer them drained
                    // by a rule they did not ask for). Otherwise the restored drain has the
                    // scope and theirs ends on its own, by their rule.
                    //
                    // Two drains of one namespace's scope with different cookies: the inode
                    // was another namespace's at each start, and the one of the earlier start
                    // is freed (a live namespace keeps its inode). That drain is over
                    // (`namespace.rs`), and no waiter of the namespace there now is handed to
                    // it, nor kept on it: it ends drained at once, the other has the scope.
                    if of_two_namespaces(existing, &resumed) {
                        if lock(&resumed.record).started_ms <= lock(&existing.record).started_ms {
                            resumed.mark_replaced();
                            drop(running);
                            log::info!(
                                "drain {id} of {}, POSTed to another agent, was of a network namespace replaced since (the inode was reused): ended drained; drain {} (of the namespace there now) keeps the scope",
                                scope_text(&spec.filter),
                                lock(&existing.record).id,
                            );
                            self.next_id.fetch_max(id + 1, Ordering::Relaxed);
                            self.launch(resumed);
                            restored.drains.insert(identity);
                            continue;
                        }
                        existing.mark_replaced();
                    } else if spec.conflict(&existing.spec).is_none() {
                        existing.hand_over(&resumed);
                    }
                }
                running.insert(spec.filter.clone(), Arc::clone(&resumed));
                existing
            };
            self.next_id.fetch_max(id + 1, Ordering::Relaxed);
            if let Some(existing) = existing {
                if existing.handed_over() {
                    // A POSTed drain wins over one only `/drained` waiters started: its
                    // deadline, its close at the deadline and its gate were asked for, the
                    // waiters' drain would end at their timeout or as they leave. They wait
                    // on it now (`Membership` follows the hand-over).
                    log::info!(
                        "drain {} of {} (started by /drained waiters here) gives way to drain {id}, POSTed to another agent: its waiters wait on that one",
                        lock(&existing.record).id,
                        scope_text(&spec.filter)
                    );
                } else if overlap.is_some() {
                    log::info!(
                        "drain {} of {} (started by /drained waiters here) is ending on its own: drain {id}, POSTed to another agent, has the scope from now on",
                        lock(&existing.record).id,
                        scope_text(&spec.filter)
                    );
                } else {
                    log::warn!("{path}: two drains of one scope; the later one kept");
                }
            }
            log::info!(
                "drain {id} resumed after a restart: {} {left:?} left",
                scope_text(&spec.filter)
            );
            self.launch(resumed);
            restored.drains.insert(identity);
        }
        log::info!(
            "restored {} drain(s) in progress and {} held /health gate(s) from {path}{}",
            restored.drains.len(),
            restored.gates.len(),
            if waiters_drains == 0 {
                String::new()
            } else {
                format!(
                    " ({waiters_drains} drain(s) only /drained waiters of the agent that saved them started are not resumed: their waiters were that agent's)"
                )
            }
        );
        restored
    }

    /// A drain that ended here (`record`, its end set), noted while another agent writes the
    /// state file if it is one this agent restored at its start: the take-over does not start
    /// it again from that agent's last file. An end at this agent's stop is no end of the
    /// drain (it resumes at the next start).
    pub(super) fn note_end(&self, record: &DrainRecord) {
        if record.result == Some(crate::drain::DrainEnd::AgentShutdown) {
            return;
        }
        let mut overlap = lock(&self.overlap);
        let Some(overlap) = overlap.as_mut() else {
            return;
        };
        let identity = DrainIdentity::of(record);
        if overlap.drains.contains(&identity) {
            overlap.ended.insert(identity);
        }
    }

    /// A `DELETE /drain` of `scope`, noted while another agent writes the state file (an
    /// upgrade's overlap): the take-over does not bring back the drain or the gate it ended.
    /// Called before the cancel, with the drain and gate it is about to end.
    pub(super) fn note_cancel(&self, scope: &Filter) {
        let mut overlap = lock(&self.overlap);
        let Some(overlap) = overlap.as_mut() else {
            return;
        };
        if let Some(drain) = lock(&self.running).get(scope) {
            let identity = DrainIdentity::of(&lock(&drain.record));
            // Bounded per owner: a pod that posts and cancels in a loop for the whole
            // overlap (up to the old agent's --shutdown-grace) forgets its own oldest
            // cancels, never another owner's; the most a forgotten one costs is its own
            // drain brought back at the take-over.
            let owner = Owner::of(&identity.scope());
            let own = overlap
                .cancelled
                .iter()
                .filter(|noted| Owner::of(&noted.scope()) == owner);
            if own.clone().count() >= CANCELLED_PER_OWNER
                && let Some(oldest) = own
                    .min_by_key(|noted| (noted.started_ms, noted.id))
                    .cloned()
            {
                overlap.cancelled.remove(&oldest);
            }
            overlap.cancelled.insert(identity);
        }
        if let Some((until_ms, until)) = overlap.gates.get(scope)
            && lock(&self.held)
                .get(scope)
                .is_some_and(|hold| hold.until == *until)
        {
            overlap.released.insert(ReleasedGate::of(scope, *until_ms));
        }
    }
}

/// How old a read of another agent's file may be before it is read again even though its
/// [`Stamp`] is the same (a freed inode reused by the next write, within the file system's
/// timestamp granularity, with the same size): at most one read a second for that.
const WRITER_VIEW_FRESH: Duration = Duration::from_secs(1);

/// What another agent's file says is out of rotation, as this agent last read it: the
/// writer's state file beside it (an upgrade's overlap: [`Drains::writers_gate`]), or, for
/// the writer, the `drains.next.json` of the agent started beside it
/// ([`Drains::beside_gate`]).
#[derive(Default)]
pub(super) struct WriterView {
    /// The file last read, and when; `None`: never read.
    read: Option<(Option<Stamp>, tokio::time::Instant)>,
    seen: Seen,
}

/// The other agent's file as last read.
#[derive(Default)]
enum Seen {
    /// No file: nothing there is out of rotation.
    #[default]
    Nothing,
    /// Its drains in progress and its held gates, and the first listener read that may
    /// reopen them: one that started after the file was read, so after their drains ended
    /// (`listener_reads.rs`).
    Read {
        drains: Vec<DrainIdentity>,
        held: Vec<SavedHold>,
        reads_from: Serial,
    },
    /// It could not be read: whether a scope is out of rotation there cannot be vouched for.
    Unreadable,
}

/// What one look at the other agent's file found (the file I/O of [`WriterView::refresh`],
/// done without the view's lock).
enum Looked {
    /// The same file as the last read, which is fresh: nothing to read.
    Same,
    /// No file.
    Nothing(tokio::time::Instant),
    Read(Stamp, SavedDrains, tokio::time::Instant),
    Unreadable(Option<Stamp>, anyhow::Error, tokio::time::Instant),
}

/// What a [`Seen`] says of a question.
enum Verdict {
    /// Out of rotation.
    Gated,
    /// Out of rotation if one of these gates (scope, listeners when its drain ended) is not
    /// reopened by a new listener, read by a listener read numbered above the second.
    Holds(Vec<(Filter, AtEnd)>, Serial),
}

impl Seen {
    /// How many drains the file says run that are not among `ours` (drains this agent runs
    /// too) and whose port `labels` exports; 1 for a file that cannot be read.
    fn running_besides(&self, ours: &HashSet<DrainIdentity>, labels: &MetricLabels) -> u64 {
        match self {
            Self::Nothing => 0,
            Self::Unreadable => 1,
            Self::Read { drains, .. } => {
                let running = drains
                    .iter()
                    .filter(|drain| !ours.contains(*drain) && labels.exports_port(drain.port))
                    .count();
                u64::try_from(running).unwrap_or(u64::MAX)
            }
        }
    }

    /// Whether the file says `asked` is out of rotation: a drain of it in progress (other
    /// than those `ended` says ended here), or a gate held after one (other than those
    /// `released` says were released here). An unreadable file gates every question.
    fn verdict(
        &self,
        asked: &Asked,
        ended: impl Fn(&DrainIdentity) -> bool,
        released: impl Fn(&SavedHold) -> bool,
    ) -> Verdict {
        match self {
            Self::Nothing => Verdict::Holds(Vec::new(), 0),
            Self::Unreadable => Verdict::Gated,
            Self::Read {
                drains,
                held,
                reads_from,
            } => {
                if drains
                    .iter()
                    .any(|drain| asked.covered_by(&drain.scope()) && !ended(drain))
                {
                    return Verdict::Gated;
                }
                let now_ms = unix_ms();
                Verdict::Holds(
                    held.iter()
                        .filter(|hold| hold.until_ms > now_ms && asked.covered_by(&hold.scope()))
                        .filter(|hold| !released(hold))
                        .map(|hold| (hold.scope(), hold.at_end()))
                        .collect(),
                    *reads_from,
                )
            }
        }
    }
}

impl Drains {
    /// Beside the state file's writer (an upgrade's overlap, until the take-over): whether
    /// the writer's file says what is asked is out of rotation — a drain of it in progress
    /// (POSTed, or started by `/drained` waiters there), or a gate held after one that no
    /// new listener has reopened — other than what a
    /// `DELETE /drain` sent to this agent ended ([`Overlap`]'s `cancelled` and `released`).
    /// Read only: this agent neither runs nor ends what is there.
    ///
    /// Without it, the drains POSTed to the writer after this agent started were unknown
    /// here: once the writer closed its listeners at SIGTERM every `/health` and agent-check
    /// reached this agent, which answered "not draining" although the file said otherwise.
    /// So were, until the file kept them too, the drains a pod's preStop hook started there
    /// with a `/drained` (the README's `httpGet`), while the hook still waited there.
    ///
    /// One `lstat` per question; the file is read again only when it changed (or the last
    /// read is [`WRITER_VIEW_FRESH`] old). A file that cannot be read gates every question:
    /// "not draining" is never said unvouched (as a held gate whose listeners cannot be read
    /// stays held).
    pub(super) async fn writers_gate(&self, asked: &Asked) -> bool {
        let Some(file) = &self.state else {
            return false;
        };
        let (cancelled, released) = match lock(&self.overlap).as_ref() {
            Some(overlap) => (overlap.cancelled.clone(), overlap.released.clone()),
            // The writer, or the take-over has merged the writer's last state: all of it is
            // in this agent's own drains and gates.
            None => return false,
        };
        let verdict = {
            let mut view = lock(&self.writer_view);
            let now = tokio::time::Instant::now();
            let looked = WriterView::look(view.read, file, Which::State, now);
            self.keep_looked_addresses(&looked);
            view.apply(looked, Which::State, self.listener_reads.mark());
            view.seen.verdict(
                asked,
                |drain| cancelled.contains(drain),
                |hold| {
                    released
                        .iter()
                        .any(|gate| gate.is(&hold.scope(), hold.until_ms))
                },
            )
        };
        self.holds_stand(verdict).await
    }

    /// For the state file's writer during an upgrade's overlap: whether the agent started
    /// beside it keeps what is asked out of rotation in its `drains.next.json` — a drain
    /// POSTed to it or started there by `/drained` waiters, or a gate held after one that
    /// no new listener has reopened — as last
    /// read by [`Drains::look_beside`] (which every question's [`Drains::catch_up`] calls).
    /// Read only: this agent neither runs nor ends what is there; the take-over merges it.
    ///
    /// Without it, a drain POSTed to the new agent (a pod's preStop hook, the listeners'
    /// hash sending it there) was "not draining" on the old agent, which answered its share
    /// of the node's `/health` and agent-check questions until its stop: HAProxy flapped.
    /// A file that cannot be read gates every question. Not while this agent holds the
    /// file's lock (then the file is its own, or a gone agent's it folds in).
    pub(super) async fn beside_gate(&self, asked: &Asked) -> bool {
        let Some(file) = &self.state else {
            return false;
        };
        if !file.is_writer() || file.holds_next_lock() {
            return false;
        }
        let verdict = lock(&self.beside_view)
            .seen
            .verdict(asked, |_| false, |_| false);
        self.holds_stand(verdict).await
    }

    /// Whether `verdict` gates: as `Drains::gated` reopens its own holds, a listener of the
    /// scope ([`Drains::scope_listeners`]) the drain did not see is a new instance;
    /// listeners that cannot be read keep the gate, and so does a hold whose listeners were
    /// not read at its end ([`AtEnd::Unknown`]: this view is read only, it learns nothing).
    /// The listeners are read as for this agent's own holds: off the workers, shared by the
    /// questions, by a read that started after the file was read.
    async fn holds_stand(&self, verdict: Verdict) -> bool {
        let (holds, reads_from) = match verdict {
            Verdict::Gated => return true,
            Verdict::Holds(holds, reads_from) => (holds, reads_from),
        };
        for (scope, listeners) in holds {
            if listeners == AtEnd::Unknown {
                return true;
            }
            let reopened = self
                .scope_listeners(&scope, reads_from)
                .await
                .is_some_and(|read| read.is_ok_and(|now| listeners.new_among(&now)));
            if !reopened {
                return true;
            }
        }
        false
    }

    /// For the state file's writer: looks at `drains.next.json` (an agent started beside
    /// this one writes it during an upgrade's overlap) for [`Drains::beside_gate`], on a
    /// blocking thread (an `lstat`, and a read when it changed or the last read is
    /// [`WRITER_VIEW_FRESH`] old; at most `MAX_BYTES`), one look at a time. True when the
    /// file is there. A look that fails leaves the view unreadable: every scope gated.
    pub(super) async fn look_beside(self: &Arc<Self>, file: &Arc<StateFile>) -> bool {
        let _one_at_a_time = self.beside_looking.lock().await;
        let last = lock(&self.beside_view).read;
        let now = tokio::time::Instant::now();
        let looking = Arc::clone(file);
        let looked =
            tokio::task::spawn_blocking(move || WriterView::look(last, &looking, Which::Next, now))
                .await
                .unwrap_or_else(|problem| {
                    Looked::Unreadable(
                        None,
                        anyhow::anyhow!("the look at {NEXT_FILE_NAME} failed: {problem}"),
                        now,
                    )
                });
        self.keep_looked_addresses(&looked);
        let reads_from = self.listener_reads.mark();
        let mut view = lock(&self.beside_view);
        view.apply(looked, Which::Next, reads_from);
        !matches!(view.seen, Seen::Nothing)
    }
}

impl Drains {
    /// The drains in progress on the other agent of an upgrade's overlap, as its file in
    /// `--state-dir` says (`drain_agent_other_agent_drains_in_progress`): beside the writer,
    /// the writer's `drains.json` (the view [`Drains::writers_gate`] reads); for the writer,
    /// the `drains.next.json` of the agent started beside it ([`Drains::beside_gate`]'s).
    /// POSTed drains and those only `/drained` waiters started alike (their hooks wait on
    /// that agent); not those this agent runs too (a POSTed drain it restored), which
    /// `drain_in_progress` shows already, nor those of ports the metrics leave out
    /// (`--ports`), as for this agent's own. A file that cannot be read counts 1: which
    /// drains run there cannot be vouched for, and "none" is never said unvouched (kured's
    /// alert must not go silent). 0 outside an overlap.
    ///
    /// Without it, once the old agent of an upgrade closed its listeners at SIGTERM (its
    /// `/metrics` with them) while its hooks' drains ran on for up to its `--shutdown-grace`,
    /// scrapes reached only the new agent, whose metrics showed none of them:
    /// `DrainAgentDrainsInProgress` went silent and kured could reboot the node mid-drain.
    ///
    /// Looks at the file first, as a question does (an `lstat`, and a read when it changed
    /// or the last read is [`WRITER_VIEW_FRESH`] old; at most `MAX_BYTES`): a node nobody
    /// asks about between scrapes is counted as it is now, not as last asked. Blocking file
    /// I/O, no lock held meanwhile: called off the async workers (the scrape's render runs
    /// on a blocking thread).
    pub fn other_agents_drains(&self) -> u64 {
        let Some(file) = &self.state else {
            return 0;
        };
        let ours: HashSet<DrainIdentity> = self.list().0.iter().map(DrainIdentity::of).collect();
        let mut counted = 0_u64;
        if lock(&self.overlap).is_some() {
            // Looked at outside the view's lock: a question looks again before it answers
            // whenever the file changed since the read applied last.
            let last = lock(&self.writer_view).read;
            let looked = WriterView::look(last, file, Which::State, tokio::time::Instant::now());
            self.keep_looked_addresses(&looked);
            let reads_from = self.listener_reads.mark();
            let mut view = lock(&self.writer_view);
            view.apply(looked, Which::State, reads_from);
            counted += view.seen.running_besides(&ours, &self.metric_labels);
        }
        if file.is_writer() && !file.holds_next_lock() {
            // One look at a time, as `look_beside`'s; while one is under way its view is
            // as fresh as this one would be.
            if let Ok(_one_at_a_time) = self.beside_looking.try_lock() {
                let last = lock(&self.beside_view).read;
                let looked = WriterView::look(last, file, Which::Next, tokio::time::Instant::now());
                self.keep_looked_addresses(&looked);
                let reads_from = self.listener_reads.mark();
                lock(&self.beside_view).apply(looked, Which::Next, reads_from);
            }
            counted = counted.saturating_add(
                lock(&self.beside_view)
                    .seen
                    .running_besides(&ours, &self.metric_labels),
            );
        }
        counted
    }
}

impl WriterView {
    /// Looks at `which` file: read again if it changed since the `last` read (or that read
    /// is old). File I/O: no lock held.
    fn look(
        last: Option<(Option<Stamp>, tokio::time::Instant)>,
        file: &StateFile,
        which: Which,
        now: tokio::time::Instant,
    ) -> Looked {
        let stamp = match file.stamp(which) {
            Ok(stamp) => stamp,
            Err(problem) => return Looked::Unreadable(None, problem, now),
        };
        if let Some((last, at)) = last
            && last == stamp
            && now.saturating_duration_since(at) < WRITER_VIEW_FRESH
        {
            return Looked::Same;
        }
        if stamp.is_none() {
            return Looked::Nothing(now);
        }
        match file.read_stamped::<SavedDrains>(which) {
            Ok(Some((stamp, saved))) => Looked::Read(stamp, saved, now),
            Ok(None) => Looked::Nothing(now),
            Err(problem) => Looked::Unreadable(stamp, problem, now),
        }
    }

    /// Takes in what a [`WriterView::look`] found; `reads_from`: a listener read mark
    /// taken after the look (only later reads may reopen the holds read).
    fn apply(&mut self, looked: Looked, which: Which, reads_from: Serial) {
        match looked {
            Looked::Same => {}
            Looked::Nothing(now) => {
                self.read = Some((None, now));
                self.seen = Seen::Nothing;
            }
            Looked::Read(stamp, saved, now) => {
                self.read = Some((Some(stamp), now));
                self.seen = Seen::Read {
                    drains: saved.drains.iter().map(SavedDrain::identity).collect(),
                    held: saved.held,
                    reads_from,
                };
            }
            Looked::Unreadable(stamp, problem, now) => {
                self.unreadable(stamp, now, &problem, which);
            }
        }
    }

    /// The file could not be read: said once per version of it.
    fn unreadable(
        &mut self,
        stamp: Option<Stamp>,
        now: tokio::time::Instant,
        problem: &anyhow::Error,
        which: Which,
    ) {
        if !matches!(self.seen, Seen::Unreadable) || self.read.is_none_or(|(last, _)| last != stamp)
        {
            let whose = match which {
                Which::State => "the agent writing the state file",
                Which::Next => "the agent started beside this one (an upgrade)",
            };
            log::warn!(
                "{problem:#}: this agent cannot tell which scopes {whose} drains; /health and the agent-check answer \"draining\" for every port until it can"
            );
        }
        self.read = Some((stamp, now));
        self.seen = Seen::Unreadable;
    }
}

/// A POSTed drain of `spec`'s scope, saved by another agent as `id`, is not resumed: this
/// agent's `kept`, POSTed here, goes on (as before). Said when their settings differ, as
/// the caller of the one not resumed asked for others.
fn differs_from_kept(path: &str, kept: &Running, spec: &DrainSpec, id: u64) {
    let named = DrainSpec {
        given: Given {
            on_timeout: true,
            quiet: true,
            ignore: true,
            idle: true,
            pace: true,
        },
        ..spec.clone()
    };
    let difference = kept.spec.conflict(&named).or_else(|| {
        (kept.spec.timeout != spec.timeout)
            .then(|| format!("timeout={:?} (saved {:?})", kept.spec.timeout, spec.timeout))
    });
    if let Some(difference) = difference {
        log::warn!(
            "{path}: drain {id} of {}, POSTed to another agent, is not resumed: drain {} POSTed here drains the scope with other settings: {difference}",
            scope_text(&spec.filter),
            lock(&kept.record).id
        );
    }
}

/// One drain, across agents: its scope, id and start (ids are each agent's own count).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(super) struct DrainIdentity {
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<u32>,
    id: u64,
    started_ms: u64,
}

impl DrainIdentity {
    fn of(record: &DrainRecord) -> Self {
        Self {
            port: record.port,
            addr: record.addr,
            netns: record.netns,
            id: record.id,
            started_ms: record.started_ms,
        }
    }

    fn scope(&self) -> Filter {
        Filter {
            port: self.port,
            addr: self.addr,
            netns: self.netns,
        }
    }
}

/// A restored gate that `DELETE /drain` released: its scope and the file's end of its hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(super) struct ReleasedGate {
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<u32>,
    until_ms: u64,
}

/// How often the writer looks for a `drains.next.json` whose agent has gone.
const ORPHAN_CHECK: Duration = Duration::from_secs(2);

/// How much later a saved hold of a released gate's scope may end and still be that gate.
/// A hold's end is saved as wall-clock milliseconds computed anew at every save (from the
/// agent's monotonic deadline), so one hold's `until_ms` moves by a millisecond or so between
/// two saves; a new hold, made by a drain that ended after the release, ends `GATE_HOLD`
/// after that end, later than this.
const SAME_HOLD_SLACK_MS: u64 = 1_000;

impl ReleasedGate {
    fn of(scope: &Filter, until_ms: u64) -> Self {
        Self {
            port: scope.port,
            addr: scope.addr,
            netns: scope.netns,
            until_ms,
        }
    }

    /// Whether a saved hold of `scope` ending at `until_ms` is this released gate.
    fn is(&self, scope: &Filter, until_ms: u64) -> bool {
        self.port == scope.port
            && self.addr == scope.addr
            && self.netns == scope.netns
            && until_ms <= self.until_ms.saturating_add(SAME_HOLD_SLACK_MS)
    }
}

impl SavedDrain {
    fn identity(&self) -> DrainIdentity {
        DrainIdentity::of(&self.record)
    }
}

impl SavedHold {
    /// The listeners when its drain ended, as the gate compares them.
    fn at_end(&self) -> AtEnd {
        self.listeners.as_ref().map_or(AtEnd::Unknown, |cookies| {
            AtEnd::Read(cookies.iter().copied().collect())
        })
    }

    fn scope(&self) -> Filter {
        Filter {
            port: self.port,
            addr: self.addr,
            netns: self.netns,
        }
    }
}

#[cfg(test)]
impl Drains {
    /// The scopes of the cancels noted in this agent's overlap.
    pub(super) fn noted_cancels(&self) -> Vec<Filter> {
        lock(&self.overlap)
            .as_ref()
            .map(|overlap| overlap.cancelled.iter().map(DrainIdentity::scope).collect())
            .unwrap_or_default()
    }
}

/// Cancels one owner ([`Owner`]) may have noted during an overlap ([`Drains::note_cancel`]):
/// each is kept in memory and written to the next agent's file at every save, so a loop of
/// `POST` and `DELETE` would grow both for as long as the overlap lasts. A pod has at most
/// [`RUNNING_PER_OWNER`](super::owner::RUNNING_PER_OWNER) drains at once; this is several
/// times that.
pub(super) const CANCELLED_PER_OWNER: usize = 256;

/// An upgrade's overlap, from this agent's side: what it restored at its start from the
/// state file another agent still writes, and what it cancelled since. Kept until the
/// take-over ([`Drains::take_over_state`]), which needs both to merge that agent's last
/// state without undoing a cancel sent to either agent.
#[derive(Clone, Debug, Default)]
pub(super) struct Overlap {
    /// Drains restored at start.
    drains: HashSet<DrainIdentity>,
    /// Gates restored at start: the file's end of the hold, and this agent's.
    gates: HashMap<Filter, (u64, tokio::time::Instant)>,
    /// Drains `DELETE /drain` ended here.
    cancelled: HashSet<DrainIdentity>,
    /// Drains restored at start that then ended here (drained, timed out, closed at their
    /// deadline, cancelled): the other agent's last file may still have them (an agent that
    /// stops writes nothing), and they must not run again. A subset of `drains`, so bounded
    /// as it is (by what the file held).
    ended: HashSet<DrainIdentity>,
    /// Restored gates `DELETE /drain` released here.
    released: HashSet<ReleasedGate>,
}

/// Whether `a` and `b`, drains of one scope, started in different namespaces given the same
/// inode (both cookies known, and different).
fn of_two_namespaces(a: &Running, b: &Running) -> bool {
    matches!((a.netns_cookie, b.netns_cookie), (Some(a), Some(b)) if a != b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A drain as saved: `ignore` sources in its rule (each as long as an IPv6 one).
    fn saved_drain(id: u64, waiters_only: bool, ignore: usize) -> SavedDrain {
        SavedDrain {
            record: DrainRecord {
                id,
                port: 8080,
                addr: None,
                netns: None,
                started_ms: 1_000 + id,
                first_zero_after_ms: None,
                ended_ms: None,
                result: None,
                active_at_start: 1,
                late_arrivals: 0,
                peers_at_end: Vec::new(),
                closed_by_agent: 0,
                wait_ms: 0,
                on_timeout: crate::drain::OnTimeout::Keep,
                started_by: None,
            },
            deadline_ms: 2_000,
            timeout_ms: 600_000,
            quiet_ms: 0,
            ignore: vec!["2001:db8::/128".to_owned(); ignore],
            idle_ms: None,
            addresses: Vec::new(),
            pace: 0,
            given: SavedGiven {
                on_timeout: false,
                quiet: false,
                ignore: ignore > 0,
                idle: false,
                pace: false,
            },
            netns_cookie: None,
            waiters_only,
        }
    }

    /// The drains only waiters started are saved after everything else and only within the
    /// file's limit, oldest first: a flood of them never takes the file past it (which
    /// would leave the POSTed drains and held gates unsaved) nor pushes a POSTed drain out.
    /// They are written marked; a POSTed drain is written as before, and a file without the
    /// mark (an older agent's) reads as POSTed.
    #[test]
    fn waiters_drains_are_saved_within_the_files_limit_after_the_rest() {
        let mut state = SavedDrains {
            drains: vec![saved_drain(1, false, 64)],
            ..SavedDrains::default()
        };
        let posted = encoded_len(&state);
        let one = encoded_len(&saved_drain(2, true, 64)) + 1;
        // Room for two of the three, not three.
        let room = posted + 2 * one + one / 2;
        let waiting = vec![
            saved_drain(4, true, 64),
            saved_drain(2, true, 64),
            saved_drain(3, true, 64),
        ];
        assert_eq!(state.add_waiters_drains(waiting, room), 1);
        let ids: Vec<_> = state.drains.iter().map(|drain| drain.record.id).collect();
        assert_eq!(
            ids,
            [1, 2, 3],
            "the POSTed one, then the oldest waiters' ones"
        );
        assert!(encoded_len(&state) <= room);
        // No room left beside the rest: none is added, the POSTed drain stays.
        let mut full = SavedDrains {
            drains: vec![saved_drain(1, false, 64)],
            ..SavedDrains::default()
        };
        assert_eq!(
            full.add_waiters_drains(vec![saved_drain(2, true, 0)], posted),
            1
        );
        assert_eq!(full.drains.len(), 1);
        // As written: marked, and read back so.
        let mut marked = SavedDrains::default();
        assert_eq!(
            marked.add_waiters_drains(vec![saved_drain(2, true, 0)], STATE_ROOM),
            0
        );
        let text = serde_json::to_string(&marked).expect("json");
        assert!(text.contains(r#""waiters_only":true"#), "{text}");
        let back: SavedDrains = serde_json::from_str(&text).expect("read");
        assert!(back.drains[0].waiters_only);
        let posted = serde_json::to_string(&saved_drain(1, false, 0)).expect("json");
        assert!(!posted.contains("waiters_only"), "{posted}");
        let older: SavedDrain = serde_json::from_str(&posted).expect("read");
        assert!(!older.waiters_only);
    }

    /// A hold's saved end moves by a millisecond between two saves of the same hold (it is
    /// computed anew from the monotonic deadline): still the released gate. A hold of the
    /// same scope made later, or another scope's, is not.
    #[test]
    fn a_released_gate_is_recognised_across_saves_of_its_hold() {
        let scope = Filter {
            port: 8080,
            addr: None,
            netns: None,
        };
        let released = ReleasedGate::of(&scope, 1_000_000);
        assert!(released.is(&scope, 1_000_000));
        assert!(
            released.is(&scope, 1_000_001),
            "the next save of the same hold"
        );
        assert!(released.is(&scope, 999_999));
        assert!(
            !released.is(&scope, 1_000_000 + millis(crate::drain::GATE_HOLD)),
            "a hold made by a drain that ended later"
        );
        let other = Filter {
            port: 8081,
            ..scope.clone()
        };
        assert!(!released.is(&other, 1_000_000));
        let pod = Filter {
            netns: Some(4_026_532_000),
            ..scope
        };
        assert!(!released.is(&pod, 1_000_000));
    }
}
