//! The registry's side of a drain: starting one for a scope or joining the one in progress
//! (`POST /drain`, a `/drained` waiter's [`Membership`]), cancelling it, and a drain's
//! shared state while it runs ([`Running`]).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    drain::{
        DrainEnd, DrainRecord, DrainSpec, Drains, Final, JoinError, StartedBy, lock,
        namespace::NamespaceNow, owner::Owner, unix_ms,
    },
    drain_rule::DrainRule,
    tracker::Filter,
};

/// A drain in progress.
pub(super) struct Running {
    pub(super) spec: DrainSpec,
    /// When it started (a drain restored at start-up: as long before as it had run).
    pub(super) started: tokio::time::Instant,
    pub(super) deadline: tokio::time::Instant,
    pub(super) record: Mutex<DrainRecord>,
    /// The cookie of its namespace when it started (`spec.filter.netns`; `None`: no
    /// namespace, or its cookie could not be read): once the namespace has another one,
    /// the inode is another namespace's and the drain is over (`namespace.rs`).
    pub(super) netns_cookie: Option<u64>,
    /// Set once its inode is known to be another namespace's (another cookie): by its own
    /// check, or by a request for its scope that read the cookie there now
    /// ([`Drains::start`]). It then ends drained (`namespace.rs`) and nobody joins it.
    pub(super) replaced: watch::Sender<bool>,
    /// Set to end the drain early: `Cancelled` (`DELETE`) or `Abandoned` (its waiters left).
    pub(super) cancel: watch::Sender<Option<DrainEnd>>,
    pub(super) finished: watch::Sender<Option<Arc<Final>>>,
    /// Started or joined by `POST /drain`: lives until its timeout or `DELETE`, whoever waits.
    pub(super) posted: AtomicBool,
    /// `/drained` waiters attached now.
    waiters: AtomicUsize,
    /// Of [`Running::waiters`], those whose deadline is their hook's own (they did not ask
    /// `continues=true`): while none is attached, a waiters' drain that reaches its
    /// deadline ends [`DrainEnd::Continued`], not `Timeout` ([`Running::only_slices_wait`]).
    final_waiters: AtomicUsize,
    /// Its verdict is taken (set under the registry's lock, see [`Drains::decide`]): it is
    /// ending (its listeners read, its record written) and nobody joins it any more.
    decided: AtomicBool,
    /// A `DELETE` is ending it (set under the registry's lock, see [`Drains::cancel`]):
    /// nobody joins it any more, as for [`Running::decided`], but it may still hand its
    /// scope over to a drain the take-over restored (the `DELETE` then ends that one too).
    cancelling: AtomicBool,
    /// The drain it handed its scope and its waiters to (set once, under the registry's
    /// lock, see [`Running::hand_over`]): a POSTed drain the take-over of an upgrade
    /// restored for the scope this one, started by `/drained` waiters only, was draining.
    moved: watch::Sender<Option<Arc<Running>>>,
}

impl Running {
    /// A drain of `spec` with no waiter attached yet if `posted`, else with one, which asked
    /// `continues` (one slice of a longer wait) or not.
    pub(super) fn new(
        spec: DrainSpec,
        started: tokio::time::Instant,
        deadline: tokio::time::Instant,
        record: DrainRecord,
        netns_cookie: Option<u64>,
        posted: bool,
        continues: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            spec,
            started,
            deadline,
            record: Mutex::new(record),
            netns_cookie,
            replaced: watch::channel(false).0,
            cancel: watch::channel(None).0,
            finished: watch::channel(None).0,
            posted: AtomicBool::new(posted),
            waiters: AtomicUsize::new(usize::from(!posted)),
            final_waiters: AtomicUsize::new(usize::from(!posted && !continues)),
            decided: AtomicBool::new(false),
            cancelling: AtomicBool::new(false),
            moved: watch::channel(None).0,
        })
    }

    /// Under the registry's lock, as `successor` (a POSTed drain of the same scope, restored
    /// by a take-over) replaces this one, started by `/drained` waiters only: its waiters
    /// wait on `successor` from now on (its deadline, its close at the deadline, its gate),
    /// and this one ends without a record of its own ([`Drains::decide`] says so to its
    /// run). Not when its verdict is taken: it ends on its own, its waiters get it
    /// ([`Running::handed_over`] says which).
    pub(super) fn hand_over(&self, successor: &Arc<Self>) {
        if self.decided.load(Ordering::Acquire) {
            return;
        }
        // A `DELETE` ending this one goes on to the successor: nobody joins that either.
        if self.cancelling.load(Ordering::Acquire) {
            successor.cancelling.store(true, Ordering::Release);
        }
        self.moved.send_replace(Some(Arc::clone(successor)));
        // Wakes its run, which then finds it handed over.
        self.end(DrainEnd::Cancelled);
    }

    /// Whether only slices of longer waits wait on it: no `POST` asked for it, and every
    /// `/drained` waiter attached (at least one) asked `continues=true`. Such a drain that
    /// reaches its deadline ends [`DrainEnd::Continued`]: its waiters' hooks ask again.
    pub(super) fn only_slices_wait(&self) -> bool {
        !self.posted.load(Ordering::Acquire)
            && self.waiters.load(Ordering::Acquire) > 0
            && self.final_waiters.load(Ordering::Acquire) == 0
    }

    /// Marks its namespace replaced: its run ends it drained at once (`namespace.rs`).
    pub(super) fn mark_replaced(&self) {
        self.replaced.send_replace(true);
    }

    /// Whether its namespace is known to be replaced ([`Running::mark_replaced`]).
    pub(super) fn is_replaced(&self) -> bool {
        *self.replaced.borrow()
    }

    /// Whether it handed its scope and waiters over ([`Running::hand_over`]).
    pub(super) fn handed_over(&self) -> bool {
        self.moved.borrow().is_some()
    }

    /// Ends the drain early with `end`, unless something ended it already.
    fn end(&self, end: DrainEnd) {
        self.cancel.send_if_modified(|ended| {
            ended.is_none() && {
                *ended = Some(end);
                true
            }
        });
    }
}

/// How long a request for a scope waits for the scope's drain to end once that drain's
/// verdict is taken: the drain then reads the scope's listeners (a netlink query per
/// namespace) and writes its record (an fsync), normally milliseconds. Past it the request
/// is told the drain is still ending ([`JoinError::Ending`]).
pub const ENDING_WAIT: Duration = Duration::from_secs(10);

/// What one look at the registry found for a scope.
enum Started {
    /// The drain started (`true`) or joined.
    Drain(Arc<Running>, bool),
    /// The scope's drain has taken its verdict and is ending.
    Ending(Arc<Running>),
    /// A drain would start, and its count at the start is not read yet: read it (off the
    /// registry's lock and the async workers) and look again.
    Uncounted,
    /// The scope's drain is of a namespace (with its cookie kept) and would be joined, and
    /// the cookie of its inode now is not read yet: read it (off the registry's lock and the
    /// async workers) and look again.
    Unchecked,
}

/// A `/drained` waiter's part in a drain. Dropping it (answered, or the client went away:
/// reset its connection) ends the drain when it was the last waiter of a drain no `POST`
/// asked for.
///
/// The drain it waits on is the one it joined, or the POSTed drain that one handed its
/// waiters to ([`Running::hand_over`]: at an upgrade's take-over).
pub struct Membership {
    pub(super) drain: Arc<Running>,
    /// It asked `continues=true`: one slice of a longer wait ([`Running::only_slices_wait`]).
    continues: bool,
    /// When it asked to join (after its request arrived, before it joined): the verdicts
    /// it takes are about a time after that ([`Membership::takes`]).
    asked: tokio::time::Instant,
}

impl Membership {
    /// The drain this waiter waits on now.
    fn current(&self) -> Arc<Running> {
        let mut drain = Arc::clone(&self.drain);
        loop {
            let next = drain.moved.borrow().clone();
            match next {
                Some(next) => drain = next,
                None => return drain,
            }
        }
    }

    pub fn id(&self) -> u64 {
        lock(&self.current().record).id
    }

    /// Whether `done`, the outcome of the drain it waits on, is this waiter's answer: not
    /// when it is "drained" from reads that began before this waiter asked (`asked_by`).
    ///
    /// Exact: every connection of its caller was open by the time it asked (its request
    /// came after them), which is by `asked`; a read that began at or after `asked` counts
    /// them, so a drained verdict from such reads is about its whole wait. A read that began
    /// before may have missed one opened just before it asked. Such a verdict (the drain
    /// took it while this waiter joined: between its last read's start and
    /// [`Drains::decide`], which a drained wait's verdict takes as the wait returns) is
    /// not its answer: it waits on its own count for the rest of its time, as after a drain
    /// that ended undrained. A verdict that is not "drained" is any member's: it never
    /// answers drained.
    pub fn takes(&self, done: &Final) -> bool {
        !done.outcome.drained || self.asked <= done.asked_by
    }

    /// The rule this waiter, which asked `asked`, judges by when it judges for itself: the
    /// settings it named, those of the drain it waits on now for the rest
    /// ([`DrainSpec::rule_for`]).
    pub fn rule_for(&self, asked: &DrainSpec) -> DrainRule {
        self.current().spec.rule_for(asked)
    }

    /// The drain's outcome, if it ends before `until(its deadline)`. A drain handed over
    /// meanwhile is followed: its successor's deadline and outcome count.
    pub async fn outcome(
        &self,
        until: impl Fn(tokio::time::Instant) -> tokio::time::Instant,
    ) -> Option<Arc<Final>> {
        let mut drain = Arc::clone(&self.drain);
        loop {
            let mut moved = drain.moved.subscribe();
            let next = moved.borrow_and_update().clone();
            if let Some(next) = next {
                drain = next;
                continue;
            }
            let mut finished = drain.finished.subscribe();
            let done = tokio::select! {
                biased;
                Ok(()) = moved.changed() => continue,
                done = tokio::time::timeout_at(until(drain.deadline), finished.wait_for(Option::is_some)) => {
                    done.ok().and_then(|done| done.ok().and_then(|done| done.clone()))
                }
            };
            // A drain handed over ends without a verdict of its own: its successor's counts.
            if drain.handed_over() {
                continue;
            }
            return done;
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if !self.continues {
            self.drain.final_waiters.fetch_sub(1, Ordering::AcqRel);
        }
        let left = self.drain.waiters.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0
            && !self.drain.posted.load(Ordering::Acquire)
            && tokio::time::Instant::now() < self.drain.deadline
        {
            // Nobody waits for it and nobody asked for it to run on its own.
            self.drain.end(DrainEnd::Abandoned);
        }
    }
}

impl Drains {
    /// `POST /drain` by `by`: starts a drain of `spec.filter`, or returns the one in
    /// progress for that scope (`false`), which from now on lives until its timeout or
    /// `DELETE`. A drain joined stays its starter's.
    pub async fn post(
        self: &Arc<Self>,
        spec: DrainSpec,
        by: StartedBy,
    ) -> Result<(DrainRecord, bool), JoinError> {
        let (drain, created) = self.start(spec, true, by, false).await?;
        drain.posted.store(true, Ordering::Release);
        let record = lock(&drain.record).clone();
        Ok((record, created))
    }

    /// A `/drained` waiter with a timeout: joins the drain of its scope, starting one if
    /// none is in progress. The drain lives while a waiter is attached (or a `POST` asked).
    /// `continues`: the waiter is one slice of a longer wait (`continues=true`), whose
    /// deadline is not its hook's ([`Running::only_slices_wait`]).
    ///
    /// A drain it starts is saved before its wait begins (its end is, as every drain's): not
    /// to be resumed, but for the other agent of an upgrade's overlap, whose `/health` and
    /// agent-check read this agent's file (`Drains::writers_gate`, `Drains::beside_gate`)
    /// while a pod's preStop hook waits here. A save that fails is logged and counted; the
    /// waiter waits all the same.
    pub async fn join(
        self: &Arc<Self>,
        spec: DrainSpec,
        by: StartedBy,
        continues: bool,
    ) -> Result<(Membership, bool), JoinError> {
        let asked = tokio::time::Instant::now();
        let (drain, created) = self.start(spec, false, by, continues).await?;
        // Attached first: a waiter gone during the save ends the drain it started.
        let membership = Membership {
            drain,
            continues,
            asked,
        };
        if created {
            self.save().await;
        }
        Ok((membership, created))
    }

    /// The drain of `spec.filter`, started now (`true`) or in progress, with one more
    /// waiter attached unless `posted` (one that asked `continues`, or not). A drain whose
    /// verdict is taken is never joined: its verdict is about a time before this request (a
    /// connection may have opened since).
    /// The request waits for it to end (at most [`ENDING_WAIT`], on its `finished`, not
    /// polling) and then starts or joins the scope's next one.
    async fn start(
        self: &Arc<Self>,
        spec: DrainSpec,
        posted: bool,
        by: StartedBy,
        continues: bool,
    ) -> Result<(Arc<Running>, bool), JoinError> {
        let limit = tokio::time::Instant::now() + ENDING_WAIT;
        // The scope's count, read before the registry's lock is taken: for a scope narrower
        // than a port it is a pass over the whole endpoint map, and the health hooks take
        // that lock. Read only when a drain would start; a record's, not a decision's. So is
        // its namespace's cookie (a namespace's drain), which tells its namespace from a
        // later one given the same inode (`namespace.rs`).
        //
        // A namespace's drain in progress is joined only while its inode is still the
        // namespace it started in: the cookie there now is read first (`checked`). Once the
        // inode is another namespace's (a new pod's), that drain is of a freed namespace
        // and ends drained; a waiter of the new pod joining it would get that "drained"
        // with its own connections open. It is ended now instead (as its own check would
        // within a second) and the request waits for it and starts the scope's next drain.
        let mut active_at_start = None;
        let mut checked = None;
        loop {
            let ending =
                match self.start_now(&spec, posted, continues, by, active_at_start, checked)? {
                    Started::Drain(drain, created) => return Ok((drain, created)),
                    Started::Ending(ending) => ending,
                    Started::Uncounted => {
                        let active = self.tracker.active_off_runtime(&spec.filter).await;
                        let cookie = self.namespace_cookie(&spec.filter).await;
                        active_at_start = Some((active.unwrap_or(0), cookie));
                        continue;
                    }
                    Started::Unchecked => {
                        checked = Some(self.namespace_now(&spec.filter).await);
                        continue;
                    }
                };
            // Read afresh for the scope's next drain.
            active_at_start = None;
            checked = None;
            let mut finished = ending.finished.subscribe();
            let ended = tokio::time::timeout_at(limit, finished.wait_for(Option::is_some)).await;
            if !matches!(ended, Ok(Ok(_))) {
                return Err(JoinError::Ending(lock(&ending.record).id));
            }
        }
    }

    /// [`Drains::start`]'s one look at the registry, under its lock; a drain it starts
    /// records `active_at_start` and keeps its namespace's cookie, read with it (None:
    /// [`Started::Uncounted`], nothing started). A namespace's drain with a cookie is joined
    /// only after `checked` (what its inode is now; None: [`Started::Unchecked`]) tells it
    /// is not another namespace's; if it is, that drain is ended ([`Running::mark_replaced`])
    /// and waited for ([`Started::Ending`]).
    fn start_now(
        self: &Arc<Self>,
        spec: &DrainSpec,
        posted: bool,
        continues: bool,
        by: StartedBy,
        active_at_start: Option<(u64, Option<u64>)>,
        checked: Option<NamespaceNow>,
    ) -> Result<Started, JoinError> {
        let mut running = lock(&self.running);
        if let Some(existing) = running.get(&spec.filter) {
            if existing.decided.load(Ordering::Acquire)
                || existing.cancelling.load(Ordering::Acquire)
                || existing.is_replaced()
            {
                return Ok(Started::Ending(Arc::clone(existing)));
            }
            if existing.netns_cookie.is_some() && self.namespaces.is_some() {
                match checked {
                    None => return Ok(Started::Unchecked),
                    Some(now) if now.replaces(existing.netns_cookie) => {
                        log::info!(
                            "drain {}: a request for its scope found its network namespace to be another one now (the inode was reused): ended drained, and the request gets a drain of its own",
                            lock(&existing.record).id,
                        );
                        existing.mark_replaced();
                        return Ok(Started::Ending(Arc::clone(existing)));
                    }
                    Some(_) => {}
                }
            }
            if let Some(difference) = existing.spec.conflict(spec) {
                return Err(JoinError::Conflict(lock(&existing.record).id, difference));
            }
            // Under the registry's lock, as a take-over looks: a drain a POST joined is a
            // POSTed one from now on, never handed over as a waiters' drain.
            if posted {
                existing.posted.store(true, Ordering::Release);
            } else {
                if !continues {
                    existing.final_waiters.fetch_add(1, Ordering::AcqRel);
                }
                existing.waiters.fetch_add(1, Ordering::AcqRel);
            }
            return Ok(Started::Drain(Arc::clone(existing), false));
        }
        // One owner's drains never fill the node's limit: the others keep room for theirs.
        // Asked first: an owner past its share is told of its own limit.
        let owner = Owner::of(&spec.filter);
        if owner.limited()
            && running
                .keys()
                .filter(|scope| Owner::of(scope) == owner)
                .count()
                >= self.running_per_owner
        {
            return Err(JoinError::OwnerFull(owner, self.running_per_owner));
        }
        if running.len() >= self.max_running {
            return Err(JoinError::Full);
        }
        let Some((active_at_start, netns_cookie)) = active_at_start else {
            return Ok(Started::Uncounted);
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let record = DrainRecord {
            id,
            port: spec.filter.port,
            addr: spec.filter.addr,
            netns: spec.filter.netns,
            started_ms: unix_ms(),
            first_zero_after_ms: None,
            ended_ms: None,
            result: None,
            active_at_start,
            late_arrivals: 0,
            peers_at_end: Vec::new(),
            closed_by_agent: 0,
            wait_ms: 0,
            on_timeout: spec.on_timeout,
            started_by: Some(by),
        };
        let now = tokio::time::Instant::now();
        let drain = Running::new(
            spec.clone(),
            now,
            now + spec.timeout,
            record,
            netns_cookie,
            posted,
            continues,
        );
        running.insert(spec.filter.clone(), Arc::clone(&drain));
        drop(running);
        log::info!(
            "drain {id} started: {} timeout={:?} active={active_at_start}",
            scope_text(&spec.filter),
            spec.timeout
        );
        self.launch(Arc::clone(&drain));
        Ok(Started::Drain(drain, true))
    }

    /// Marks `drain`'s verdict taken: from now on a request for its scope waits for it to
    /// end instead of joining it. Under the registry's lock, so that a request either joined
    /// before or sees the mark. A member that joined after the reads of a drained verdict
    /// began (before the mark) does not take it ([`Membership::takes`]). False when it was
    /// handed over ([`Running::hand_over`]) instead: it ends without a verdict, its
    /// successor has its scope and waiters. Called again (as a drained wait's verdict is
    /// marked at once, and again at the end), it changes nothing.
    pub(super) fn decide(&self, drain: &Running) -> bool {
        let _running = lock(&self.running);
        if drain.handed_over() {
            return false;
        }
        drain.decided.store(true, Ordering::Release);
        true
    }

    /// Cancels the drain of `filter`; its record, or `None` if none is in progress.
    /// The scope's held gate (if any) is released either way: `DELETE /drain` after a drain
    /// ended puts the scope back in rotation (before, it did nothing without a drain in
    /// progress). Released once the drain has ended: a drain that was ending on its own
    /// meanwhile (drained) holds its gate as it ends, and that hold goes too.
    pub async fn cancel(&self, filter: &Filter) -> Option<DrainRecord> {
        self.note_cancel(filter);
        let mut drain = lock(&self.running).get(filter).cloned();
        let mut record = None;
        while let Some(ending) = drain {
            let mut finished = ending.finished.subscribe();
            // Under the registry's lock: a request either joined before the cancel (and is
            // answered "cancelled", as it would have been a moment later) or sees the mark
            // and waits for the scope's next drain; before, a `POST` right after the
            // `DELETE` could join the drain being ended and be answered with it.
            {
                let _running = lock(&self.running);
                ending.cancelling.store(true, Ordering::Release);
            }
            ending.end(DrainEnd::Cancelled);
            // The drain ends at once on cancel; wait for its record.
            let _ = finished.wait_for(Option::is_some).await;
            record = Some(lock(&ending.record).clone());
            // Handed over meanwhile (a take-over restored a POSTed drain of the scope): the
            // scope's drain is that one now, and the cancel is for the scope.
            drain = ending.moved.borrow().clone();
        }
        self.release(filter);
        record
    }

    /// Waits until the drain of `filter` (if one runs) has ended, at most `limit`.
    #[cfg(test)]
    pub async fn wait_ended(&self, filter: &Filter, limit: Duration) -> Option<DrainRecord> {
        let drain = lock(&self.running).get(filter).cloned()?;
        let mut finished = drain.finished.subscribe();
        let _ = tokio::time::timeout(limit, finished.wait_for(Option::is_some)).await;
        let record = lock(&drain.record).clone();
        Some(record)
    }

    /// Waits until no drain is in progress (at shutdown), at most `limit`.
    pub async fn wait_all_ended(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !lock(&self.running).is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `drain` (started now, or resumed after a restart) until it ends, on a task of
    /// its own: it ends whoever waits.
    pub(super) fn launch(self: &Arc<Self>, drain: Arc<Running>) {
        let registry = Arc::clone(self);
        tokio::spawn(async move { registry.run(drain).await });
    }
}

/// A scope as the log lines about drains name it.
pub(super) fn scope_text(filter: &Filter) -> String {
    format!(
        "port={} addr={} netns={}",
        filter.port,
        filter.addr.map_or("-".into(), |addr| addr.to_string()),
        filter.netns.map_or("-".into(), |netns| netns.to_string())
    )
}
