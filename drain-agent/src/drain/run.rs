//! One drain's run, from start to record: its wait (the tracker's), its deadline, the close
//! at the deadline (`on_timeout=close`) and the recount after it, then the record: the
//! history, the held gate, the journal, the log line and the metrics.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use crate::{
    drain::{
        DURATION_BUCKETS, DrainEnd, DrainRecord, Drains, Final, GATE_HOLD, HISTORY, OnTimeout,
        StartedBy,
        gate::{AtEnd, Held},
        lock, namespace,
        owner::{self, Holding, Owner},
        registry::Running,
        unix_ms,
    },
    drain_rule::DrainRule,
    tracker::{DrainOutcome, Filter, REPORT_BUDGET, WaitError},
};

/// A namespace's drain ends once its inode is another namespace's (`namespace.rs`): how a
/// running drain finds out.
impl Drains {
    /// Whether `drain`'s inode is another namespace's now (it has another cookie than at the
    /// start), or was found to be by a request for its scope
    /// ([`Running::mark_replaced`]): the drain is over. Never for a drain
    /// of no one namespace, nor when nothing can be told.
    pub(super) async fn namespace_replaced(&self, drain: &Running) -> bool {
        if drain.is_replaced() {
            return true;
        }
        let (Some(inode), Some(namespaces)) = (drain.spec.filter.netns, &self.namespaces) else {
            return false;
        };
        let now = namespace::now_of(namespaces, inode).await;
        let replaced = now.replaces(drain.netns_cookie);
        if replaced {
            drain.mark_replaced();
            log::info!(
                "drain {}: its network namespace {inode} is another one now (the inode was reused): no connection of the one it started in can remain; ended drained, nothing closed, none of the new namespace's listeners kept",
                lock(&drain.record).id,
            );
        }
        replaced
    }

    /// Resolves once `drain`'s namespace is replaced ([`Drains::namespace_replaced`]),
    /// checked at once (a drain restored after a restart: its pod may have gone meanwhile)
    /// and then every [`NAMESPACE_RECHECK`](namespace::NAMESPACE_RECHECK), or at once when a request for its scope finds
    /// it replaced. Never for a drain of no one namespace, nor for one without a cookie from
    /// its start (a request checks only a drain with one).
    ///
    pub(super) async fn namespace_lost(&self, drain: &Running) {
        let mut marked = drain.replaced.subscribe();
        // Without a cookie at its start nothing can ever show it replaced
        // (`NamespaceNow::replaces`): no look, no thread, no scan.
        if drain.spec.filter.netns.is_none()
            || self.namespaces.is_none()
            || drain.netns_cookie.is_none()
        {
            return std::future::pending().await;
        }
        loop {
            if self.namespace_replaced(drain).await {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(namespace::NAMESPACE_RECHECK) => {}
                // The sender lives as long as `drain`: an error never comes.
                _ = marked.wait_for(|replaced| *replaced) => {}
            }
        }
    }
}

/// How long a close at a drain's deadline waits for the seeding walk (the first walk of the
/// sockets after a start on fresh kernel state: it begins within 3 s,
/// `repair::SEED_AFTER_AT_MOST`, and takes milliseconds per network namespace, seconds with
/// hundreds of pods): until it has ended, the connections open before the start are not
/// tracked and cannot be closed. A failed seeding is retried every 5 s: the bound allows one.
pub const CLOSE_SEED_WAIT: Duration = Duration::from_secs(10);

/// How often a local user's drain in progress checks that no other user's sockets are on
/// its port ([`Drains::owner_lost`]): a port another user took is back in rotation within
/// this; one socket-table query per local user's drain each time.
pub const OWNER_RECHECK: Duration = Duration::from_secs(5);

impl Drains {
    /// One drain, from start to record.
    pub(super) async fn run(self: Arc<Self>, drain: Arc<Running>) {
        let spec = drain.spec.clone();
        let mut cancel = drain.cancel.subscribe();
        let started = drain.started;
        // Its own deadline: for a drain resumed after a restart, what was left of it.
        let left = drain
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        let by = lock(&drain.record).started_by;
        // A namespace's drain whose inode is another namespace's now (a new pod: another
        // cookie) is over (`namespace.rs`): checked while it waits, after, and before it
        // closes anything. It ends drained (no connection of its namespace can remain),
        // closes nothing more, and keeps no listener of the namespace there now.
        let mut lost = false;
        let waited = tokio::select! {
            outcome = self.tracker.wait_for_verdict(&spec.filter, left, &spec.rule) => Ok(outcome),
            end = cancel.wait_for(Option::is_some) => Err(end.ok().and_then(|end| *end).unwrap_or(DrainEnd::Cancelled)),
            end = self.owner_lost(&drain, by) => Err(end),
            () = self.namespace_lost(&drain) => {
                lost = true;
                Err(DrainEnd::Drained)
            }
        };
        // When the reads of the verdict began (`Final::asked_by`): a member that asked later
        // does not take a drained one (`Membership::takes`). None: not a verdict of the
        // counts, about every member.
        let mut asked_by = None;
        let waited = waited.map(|wait| {
            wait.map(|(outcome, read_began)| {
                asked_by = Some(read_began);
                outcome
            })
        });
        // A drained wait is the verdict (the checks below can only turn it for the members
        // that joined by now: a namespace replaced, a port another user's): taken at once.
        // A request from now on waits for this drain's end and starts the scope's next
        // drain, rather than join it while the checks run (a thread entering the namespace,
        // a socket-table query) and get "drained" about a time before it asked. One that
        // joined between the start of the verdict's last read and now does not take it
        // either (`Membership::takes`).
        if matches!(&waited, Ok(Ok(outcome)) if outcome.drained) {
            self.decide(&drain);
        }
        if waited.is_ok() && !self.tracker.shutting_down() {
            lost = self.namespace_replaced(&drain).await;
        }
        // A close at the deadline first waits for the seeding walk (see `await_seeding`; a
        // cancel meanwhile ends the drain as before its deadline). Then a local user's drain
        // acts on its scope (closes, lists the clients left, holds the gate) only if the
        // port is still its own (`still_owned`).
        let id = lock(&drain.record).id;
        let waited = match waited {
            Ok(Ok(outcome)) if !lost && !self.tracker.shutting_down() => {
                let seeded = if !outcome.drained && spec.on_timeout == OnTimeout::Close {
                    self.await_seeding(id, &mut cancel).await
                } else {
                    Ok(())
                };
                match seeded {
                    Ok(()) => self
                        .still_owned(id, spec.filter.port, by, outcome.drained)
                        .await
                        .map(|()| Ok(outcome)),
                    Err(end) => Err(end),
                }
            }
            Ok(Err(problem)) if !lost && !self.tracker.shutting_down() => self
                .still_owned(id, spec.filter.port, by, false)
                .await
                .map(|()| Err(problem)),
            other => other,
        };
        let mut closed = 0;
        let (result, outcome) = match waited {
            _ if lost => (DrainEnd::Drained, namespace_gone(started)),
            Err(end) => (end, self.not_drained(&spec.filter, started, None).await),
            Ok(Ok(outcome)) => {
                {
                    let mut record = lock(&drain.record);
                    record.first_zero_after_ms = outcome
                        .first_zero
                        .map(|at| u64::try_from(at.as_millis()).unwrap_or(u64::MAX));
                    record.late_arrivals = outcome.arrivals;
                    record.peers_at_end = outcome.peers.clone();
                }
                if outcome.drained {
                    (DrainEnd::Drained, outcome)
                } else if self.tracker.shutting_down() {
                    (DrainEnd::AgentShutdown, outcome)
                } else if spec.on_timeout == OnTimeout::Close {
                    // After the seeding walk's wait: the namespace may be another by now.
                    if self.namespace_replaced(&drain).await {
                        lost = true;
                    }
                    if lost {
                        (DrainEnd::Drained, namespace_gone(started))
                    } else {
                        self.close_at_deadline(
                            &drain,
                            outcome,
                            &mut closed,
                            &mut lost,
                            &mut asked_by,
                        )
                        .await
                    }
                } else if drain.only_slices_wait() {
                    // Its deadline is none of its waiters' hooks': each asks again, and
                    // its next slice starts the scope's next drain.
                    (DrainEnd::Continued, outcome)
                } else {
                    (DrainEnd::Timeout, outcome)
                }
            }
            Ok(Err(problem)) => {
                let why = match problem {
                    WaitError::TooManyWaiters(max) => format!("{max} waiters already"),
                    WaitError::OwnerFull(owner, max) => {
                        format!("{owner} has {max} waiters already")
                    }
                    WaitError::Source(source) => {
                        crate::logging::in_general("cannot read the connection counts", &source)
                    }
                };
                (
                    DrainEnd::Timeout,
                    self.not_drained(&spec.filter, started, Some(why)).await,
                )
            }
        };
        if lost {
            // Whoever the wait listed is the namespace there now's, or nobody.
            lock(&drain.record).peers_at_end.clear();
        }
        // The verdict is taken: a request arriving from now on waits for this drain to end
        // and starts a fresh one, rather than get an answer about a time before it asked.
        // Ended drained by its namespace replaced: about every member (none of the
        // namespace's connections is left), as any verdict not of the counts.
        let asked_by = asked_by
            .filter(|_| !lost)
            .unwrap_or_else(tokio::time::Instant::now);
        if !self.decide(&drain) {
            // Handed over (`Running::hand_over`): the POSTed drain that replaced it has its
            // scope, its waiters and the record. Ended for a `DELETE` waiting on it, which
            // goes on to that drain.
            log::info!(
                "drain {} gave its scope and waiters to the POSTed drain restored for it: no record of its own",
                lock(&drain.record).id
            );
            drain.finished.send_replace(Some(Arc::new(Final {
                result,
                outcome,
                closed: None,
                asked_by,
            })));
            return;
        }
        let record = {
            let mut record = lock(&drain.record);
            record.result = Some(result);
            record.ended_ms = Some(unix_ms());
            record.closed_by_agent = closed;
            record.wait_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            record.clone()
        };
        // The listeners now (the gate waits for a new one): every one on the port in the
        // scope's namespaces (`Drains::end_listeners`), a netlink query per namespace, off
        // the async workers, which are answering the drain's waiters meanwhile. A read that
        // fails is kept as such (`AtEnd::Unknown`): it never reopens the gate.
        let listeners = match record.result {
            Some(result) if result.holds_the_gate() && self.closer.is_some() => {
                let (drains, filter) = (Arc::clone(&self), spec.filter.clone());
                let read = tokio::task::spawn_blocking(move || drains.end_listeners(&filter));
                let read = read.await;
                // A namespace gone, or another one now (whose listeners the read may have
                // found: a new pod's, which must reopen the gate), has none of its own: as
                // for a namespace gone at the end (`end_listeners`), an empty set. Checked
                // after the read, so the read was of the drain's namespace if it still is.
                if lost || self.namespace_replaced(&drain).await {
                    AtEnd::Read(HashSet::new())
                } else {
                    AtEnd::of(match read {
                        Ok(Some(read)) => read,
                        Ok(None) => Ok(Vec::new()),
                        Err(problem) => Err(anyhow::anyhow!("the listener read failed: {problem}")),
                    })
                }
            }
            _ => AtEnd::Read(HashSet::new()),
        };
        // The record is on disk before any waiter gets the answer (`Final` is sent last).
        if let Some(journal) = &self.journal {
            let (journal, line) = (Arc::clone(journal), record.clone());
            let written = tokio::task::spawn_blocking(move || journal.append(&line)).await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(problem)) => log::warn!("cannot write the drain journal: {problem:#}"),
                Err(problem) => log::warn!("the drain journal writer failed: {problem}"),
            }
        }
        self.finish(&spec.filter, record, listeners);
        // Ended (and its gate held, if it holds one). A POSTed drain is saved after the
        // answer, which then does not wait for a second sync: a crash in between resumes the
        // drain, which ends again. A drain only `/drained` waiters started is not resumed
        // (`restore_saved`: its waiters went with the process), so its end is saved first:
        // a crash between the answer and the save would leave the hook answered and the
        // scope's gate forgotten, its `/health` 200 while the service stops.
        let resumable = drain.posted.load(Ordering::Acquire);
        if !resumable {
            self.save().await;
        }
        drain.finished.send_replace(Some(Arc::new(Final {
            result,
            outcome,
            closed: (spec.on_timeout == OnTimeout::Close && result == DrainEnd::ClosedAtDeadline)
                .then_some(closed),
            asked_by,
        })));
        if resumable {
            self.save().await;
        }
    }

    /// Before a close at the deadline: waits until the seeding walk has counted the
    /// connections open before the start (at most [`CLOSE_SEED_WAIT`]), or the drain is
    /// cancelled (`Err`, its end). On fresh kernel state only the connections the handler
    /// tracks can be closed (`kernel/destroy/`), and those open before the start are
    /// tracked once that walk has counted them: a drain restored past its deadline reaches
    /// its close at once, before the walk, and closed nothing. Past the bound it closes
    /// what is tracked, and says why the rest stays open.
    async fn await_seeding(
        &self,
        id: u64,
        cancel: &mut tokio::sync::watch::Receiver<Option<DrainEnd>>,
    ) -> Result<(), DrainEnd> {
        tokio::select! {
            seeded = self.tracker.seeded(CLOSE_SEED_WAIT) => {
                if !seeded && !self.tracker.shutting_down() {
                    log::warn!(
                        "drain {id}: the seeding walk has not counted the connections open before the agent started after {CLOSE_SEED_WAIT:?}: closing those it tracks; the others stay open"
                    );
                }
                Ok(())
            }
            end = cancel.wait_for(Option::is_some) => {
                Err(end.ok().and_then(|end| *end).unwrap_or(DrainEnd::Cancelled))
            }
        }
    }

    /// Resolves (`NotOwned`) once another user's sockets are on the port of a local user's
    /// drain, checked every [`OWNER_RECHECK`]: the drain must not keep a port that is no
    /// longer its starter's out of rotation until its deadline. Only a clear answer ends it
    /// (a failed read, or no socket left, as when its service exits at the end of a drain
    /// about to succeed, is checked again at its end: [`Drains::still_owned`]). Never for
    /// other starters.
    async fn owner_lost(&self, drain: &Running, by: Option<StartedBy>) -> DrainEnd {
        let (Some(StartedBy::LocalUser { uid }), Some(owners)) = (by, &self.port_owners) else {
            return std::future::pending().await;
        };
        let port = drain.spec.filter.port;
        loop {
            tokio::time::sleep(OWNER_RECHECK).await;
            if let Ok(Holding::Others) = owner::holding(owners, port, uid).await {
                log::warn!(
                    "drain {}: another user's sockets are on port {port}, which uid {uid} drains: ended, nothing closed, no gate held",
                    lock(&drain.record).id
                );
                return DrainEnd::NotOwned;
            }
        }
    }

    /// Before a local user's drain acts at its end (closes what is left, names the clients
    /// left, holds the gate): whether the port's sockets are still all its starter's, as
    /// when it started (`http/authority.rs`). Not `drained`: they must be (a read that fails
    /// counts as not). `drained` (its gate is what a stopping service needs, and none of
    /// another user's clients is left to name): only another user's sockets on the port
    /// count against it; none left is its service gone, as after a drain. `Err(NotOwned)`
    /// when not; always `Ok` for other starters.
    async fn still_owned(
        &self,
        id: u64,
        port: u16,
        by: Option<StartedBy>,
        drained: bool,
    ) -> Result<(), DrainEnd> {
        let Some(StartedBy::LocalUser { uid }) = by else {
            return Ok(());
        };
        let why = match &self.port_owners {
            None if drained => return Ok(()),
            None => "whose they are cannot be read here".to_owned(),
            Some(owners) => match owner::holding(owners, port, uid).await {
                Ok(Holding::Own) => return Ok(()),
                Ok(Holding::Nobody) | Err(_) if drained => return Ok(()),
                Ok(Holding::Others) => "another user's are on it".to_owned(),
                Ok(Holding::Nobody) => "none are left".to_owned(),
                Err(problem) => format!("they cannot be read: {problem:#}"),
            },
        };
        log::warn!(
            "drain {id}: port {port}'s sockets are no longer all uid {uid}'s, who started it ({why}): ended, nothing closed, no gate held"
        );
        Err(DrainEnd::NotOwned)
    }

    /// A not-drained outcome with the count now (a drain that ended before its wait did),
    /// read off the async workers (a scope's count is a pass over the endpoint map).
    async fn not_drained(
        &self,
        filter: &Filter,
        started: tokio::time::Instant,
        unknown: Option<String>,
    ) -> DrainOutcome {
        let waited = started.elapsed();
        let active = self.tracker.active_off_runtime(filter).await.unwrap_or(0);
        DrainOutcome::counted(false, active, waited, unknown)
    }

    /// `on_timeout=close` at the deadline (the seeding walk waited for, the port still its
    /// starter's): names whom the close cuts, closes them, and counts what is left. `lost`
    /// is set if the drain's namespace went, or was replaced, while it closed: then it
    /// ended drained ([`namespace_gone`]), and closed nothing of the namespace there now.
    /// `asked_by` is set to when the recount's read began (`Final::asked_by`).
    async fn close_at_deadline(
        &self,
        drain: &Running,
        outcome: DrainOutcome,
        closed: &mut u64,
        lost: &mut bool,
        asked_by: &mut Option<tokio::time::Instant>,
    ) -> (DrainEnd, DrainOutcome) {
        let (spec, started) = (&drain.spec, drain.started);
        if outcome.peers.is_empty() {
            // The deadline's list missed its budget (a busy node): the record
            // still names whom the close cuts. The answer waits for the close
            // anyway, so the list may take a report's budget.
            let mut listed = outcome.clone();
            self.tracker
                .list_remaining(&spec.filter, &spec.rule, &mut listed, REPORT_BUDGET)
                .await;
            lock(&drain.record).peers_at_end = listed.peers;
        }
        match self.close_remaining(drain).await {
            Closing::Done(count) => *closed = count,
            Closing::NamespaceLost(count) => {
                // Those closed before it went: the drain's own namespace's.
                *closed = count;
                *lost = true;
                return (DrainEnd::Drained, namespace_gone(started));
            }
        }
        // Drained only if nothing is left now: a close that failed must not turn
        // into a "drained". Asked like any answer (doubts confirmed), without the
        // quiet window, which the deadline has ended.
        let now_rule = DrainRule {
            quiet: Duration::ZERO,
            ..spec.rule.clone()
        };
        let after = match self
            .tracker
            .wait_for_verdict(&spec.filter, Duration::ZERO, &now_rule)
            .await
        {
            Ok((after, read_began)) => {
                *asked_by = Some(read_began);
                DrainOutcome {
                    waited: started.elapsed(),
                    ..after
                }
            }
            Err(_) => outcome,
        };
        (DrainEnd::ClosedAtDeadline, after)
    }

    /// Closes what is left of `drain`'s scope: idle connections first, then the rest,
    /// paced. A namespace's drain checks before each round (a second apart) that its
    /// namespace is still the one it started in: never closes a new pod's connections
    /// ([`Closing::NamespaceLost`]).
    async fn close_remaining(&self, drain: &Running) -> Closing {
        let spec = &drain.spec;
        let Some(closer) = self.closer.clone() else {
            log::warn!("cannot close connections: this agent has no way to close sockets");
            return Closing::Done(0);
        };
        let mut peers = match self.tracker.remaining(&spec.filter).await {
            Ok(peers) => peers,
            Err(problem) => {
                log::warn!("cannot list the connections to close: {problem:#}");
                return Closing::Done(0);
            }
        };
        // Ignored sources (probes) never held the drain: leave them. Idle ones first:
        // closing them loses nothing in flight.
        peers.retain(|peer| !spec.rule.ignores(peer.remote.ip()));
        peers.sort_by_key(|peer| peer.busy);
        let batch = if spec.pace == 0 {
            peers.len().max(1)
        } else {
            spec.pace as usize
        };
        let mut closed = 0;
        for (round, chunk) in peers.chunks(batch).enumerate() {
            if round > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if self.namespace_replaced(drain).await {
                return Closing::NamespaceLost(closed);
            }
            let (closer, filter, chunk) =
                (Arc::clone(&closer), spec.filter.clone(), chunk.to_vec());
            match tokio::task::spawn_blocking(move || closer.close(&filter, &chunk)).await {
                Ok(Ok(count)) => closed += count,
                Ok(Err(problem)) => log::warn!("cannot close connections: {problem:#}"),
                Err(problem) => log::warn!("closing failed: {problem}"),
            }
        }
        Closing::Done(closed)
    }

    /// Moves an ended drain to the history, the journal, the log and the metrics.
    pub(super) fn finish(&self, filter: &Filter, record: DrainRecord, listeners: AtEnd) {
        if record.result.is_some_and(DrainEnd::holds_the_gate) {
            let mut held = lock(&self.held);
            if held.len() >= self.held_max && !held.contains_key(filter) {
                // Bounded: a hold of the owner holding the most goes (its soonest-ending),
                // never one of an owner holding fewer than this scope's: one pod ending
                // many drains evicts its own gates, not another pod's (`owner::evictee`).
                if let Some(evicted) = owner::evictee(
                    &held,
                    |scope, _| Owner::of(scope),
                    |hold| hold.until,
                    Owner::of(filter),
                ) {
                    held.remove(&evicted);
                }
            }
            held.insert(
                filter.clone(),
                Held {
                    listeners,
                    until: tokio::time::Instant::now() + GATE_HOLD,
                    reads_from: self.listener_reads.mark(),
                },
            );
        }
        if record.result == Some(DrainEnd::AgentShutdown) {
            // Still draining as far as the load balancer is concerned: the stop ended the
            // wait, not the drain (it resumes at the next start).
            lock(&self.interrupted).insert(filter.clone());
        }
        // Before it leaves `running`: a take-over merging meanwhile sees it either running
        // (kept as it is) or noted (not started again).
        self.note_end(&record);
        {
            // Only if the scope's drain is still this one: a drain restored for the scope
            // meanwhile (an upgrade's take-over, `Drains::restore_saved`) stays.
            let mut running = lock(&self.running);
            if running.get(filter).is_some_and(|drain| {
                let now = lock(&drain.record);
                now.id == record.id && now.started_ms == record.started_ms
            }) {
                running.remove(filter);
            }
        }
        log::info!(
            "drain {} ended: result={} port={} waited_ms={} active_at_start={} late_arrivals={} left={} closed_by_agent={}",
            record.id,
            record.result.map_or("-", DrainEnd::label),
            record.port,
            record.wait_ms,
            record.active_at_start,
            record.late_arrivals,
            record.peers_at_end.len(),
            record.closed_by_agent
        );
        // Read before the lock: a namespace's drain is labelled by its endpoints' address.
        let endpoints = if self.needs_endpoints(&record) {
            self.tracker.snapshot().unwrap_or_default()
        } else {
            Vec::new()
        };
        let scope = self.scope_labels(&record, &endpoints);
        {
            let mut stats = lock(&self.stats);
            if let Some(result) = record.result {
                *stats.ended.entry(result).or_default() += 1;
                if let Some(scope) = scope {
                    stats.count_scope(scope, Owner::of(filter), result, std::time::Instant::now());
                }
            }
            let seconds = record.wait_ms as f64 / 1000.0;
            for (bound, count) in DURATION_BUCKETS.iter().zip(stats.buckets.iter_mut()) {
                if seconds <= *bound {
                    *count += 1;
                }
            }
            stats.count += 1;
            stats.sum_seconds += seconds;
        }
        let mut history = lock(&self.history);
        history.push_back(record);
        while history.len() > HISTORY {
            history.pop_front();
        }
    }
}

/// How a close at the deadline went ([`Drains::close_remaining`]), with how many it closed.
enum Closing {
    Done(u64),
    /// Stopped: another namespace has the drain's inode now (its own is freed).
    NamespaceLost(u64),
}

/// The outcome of a namespace's drain whose inode is another namespace's now: no
/// connection of its namespace can remain (a socket holds its namespace), whatever the
/// count of the inode says (the new namespace's connections).
fn namespace_gone(started: tokio::time::Instant) -> DrainOutcome {
    DrainOutcome::counted(true, 0, started.elapsed(), None)
}
