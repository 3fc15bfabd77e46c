//! A `/drained` waiter's one wait: the outcome of its drain. A waiter whose caller may
//! control the scope joins the drain of that scope (starting one if none is in progress);
//! one that may not (an observer), a pure query (`timeout=0`) and one past the drain limit
//! wait unrecorded, on the same tracker wait a drain runs. Either way the drains own the
//! deadline, the close at the deadline (`on_timeout=close`), the final recount and the list
//! of the connections left; the handler only renders [`Answer`].

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    drain::{DrainEnd, DrainSpec, Drains, JoinError, Membership, StartedBy, owner::Owner},
    tracker::{ANSWER_LIST_BUDGET, DrainOutcome, REPORT_BUDGET, Tracker, WaitError},
};

/// How long past its drain's deadline a waiter waits for the drain's outcome: a paced
/// close at the deadline takes its time. `drain-agent wait` waits as long (and its margin)
/// for the answer to a request that asked for the close (`cli/client/wait.rs`).
pub const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// What a `/drained` request asks for.
#[derive(Clone, Debug)]
pub struct Ask {
    /// The drain it starts or joins (or, unrecorded, waits as).
    pub spec: DrainSpec,
    /// Its caller, when it may control the scope: it joins the scope's drain (a `timeout`
    /// above 0), as this starter. `None`: it only waits.
    pub control: Option<StartedBy>,
    /// `peers=true`: a not-drained answer to a pure query lists the connections left too
    /// (a waiter's answer has them already).
    pub peers: bool,
    /// Whose share of `--max-waiters` it takes ([`Tracker::admit`]): its scope's owner;
    /// `None` for the node (root, a bearer token) and its port-wide scopes.
    pub share: Option<Owner>,
    /// `continues=true`: one slice of a longer wait, whose deadline is not the hook's
    /// ([`Drains::join`]).
    pub continues: bool,
}

/// A waiter's answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub outcome: DrainOutcome,
    /// Connections the agent closed at the deadline (`on_timeout=close`).
    pub closed: Option<u64>,
    /// The drain the waiter joined or started.
    pub drain: Option<u64>,
    /// Not drained because the agent is stopping: the hook should ask the next agent (a
    /// 503 that must not look like a timeout).
    pub shutdown: bool,
    /// Why a waiter that could control its scope joined no drain and waited unrecorded.
    pub unrecorded: Option<Unrecorded>,
}

/// Why a `/drained` waiter whose caller controls the scope waited unrecorded: its answer
/// still counts, but no drain ran for it (no `/health` gate, no close at the deadline, no
/// record in `/drains`). The answer says so (`unrecorded`), for the hook to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unrecorded {
    /// As many drains as the node allows (`--max-waiters`) were in progress.
    DrainLimit,
    /// As many drains of the scope's owner as one owner may have
    /// ([`crate::drain::owner::RUNNING_PER_OWNER`]) were in progress.
    OwnerLimit,
    /// The scope's drain had taken its verdict and was slow to end.
    Ending,
}

impl Unrecorded {
    /// What it means for the hook, in its words (`drain-agent wait` prints it).
    pub const fn meaning(self) -> &'static str {
        match self {
            Self::DrainLimit => {
                "no drain was recorded for it (as many drains as the node allows, --max-waiters, were in progress): no /health gate, nothing closed at the deadline"
            }
            Self::OwnerLimit => {
                "no drain was recorded for it (its namespace or address had as many drains in progress as one owner may): no /health gate, nothing closed at the deadline"
            }
            Self::Ending => {
                "no drain was recorded for it (the scope's last drain was slow to end): no /health gate, nothing closed at the deadline"
            }
        }
    }
}

/// Why a waiter got no answer.
#[derive(Debug)]
pub enum Unanswered {
    /// The drain in progress of this scope has other settings (named, with its id).
    Conflict(u64, String),
    /// The wait could not start (too many waiters) or the counts could not be read.
    Wait(WaitError),
}

impl From<WaitError> for Unanswered {
    fn from(problem: WaitError) -> Self {
        Self::Wait(problem)
    }
}

impl Ask {
    /// A pure query (`timeout=0`): answered at once with the count, it starts, joins and
    /// waits for nothing, and is counted apart from the waits
    /// ([`crate::metrics::DrainResult::Query`]).
    pub fn is_query(&self) -> bool {
        self.spec.timeout.is_zero()
    }

    /// The answer to this `/drained` request: its one wait. A client that resets its
    /// connection drops this future (`http/server` `reset_by_client`; a FIN alone, a
    /// half-close or a close, does not: it is answered), and with it the [`Membership`],
    /// whose drop ends a drain no one waits for any more.
    pub async fn answer(self, drains: &Arc<Drains>) -> Result<Answer, Unanswered> {
        let tracker = drains.tracker.as_ref();
        if self.control.is_some() {
            // A drain this waiter joins or starts: the one a gone agent was asked for, if any.
            drains.catch_up().await;
        }
        // The waiter's place first, then its drain: a waiter refused (`429`: its owner's
        // share or `--max-waiters` full) has started and joined nothing. Joined first, it
        // started the scope's drain, and its membership's drop ended that `abandoned` at
        // once: a record in `/drains` and the journal, a log line, the drain metrics and the
        // scope's `/health` gated for that instant, for a request refused for overload.
        // Neither step depends on the other: the place is the same (`self.share`) whatever
        // the join finds, and the join awaits nothing (the place counts from the join on)
        // except a scope's drain that is ending, which this request does wait for. Given
        // back once the wait is over, before the listing, as before.
        let slot = tracker.admit(self.share)?;
        let (membership, unrecorded) = match self.member(drains).await? {
            Joined::Drain(membership) => (Some(membership), None),
            Joined::Unrecorded(why) => (None, why),
        };
        let (mut outcome, closed) = match &membership {
            Some(membership) => await_drain(tracker, &self.spec, membership).await?,
            None => {
                let outcome = tracker
                    .wait_for_drain(&self.spec.filter, self.spec.timeout, &self.spec.rule)
                    .await?;
                (outcome, None)
            }
        };
        drop(slot);
        if self.peers && outcome.peers.is_empty() {
            // A pure query asked for the list (a waiter's answer has it already); a waiter
            // that joined a drain lists by the rule it was judged by.
            let rule = membership.as_ref().map_or_else(
                || self.spec.rule.clone(),
                |membership| membership.rule_for(&self.spec),
            );
            tracker
                .list_remaining(&self.spec.filter, &rule, &mut outcome, REPORT_BUDGET)
                .await;
        }
        Ok(Answer {
            shutdown: !outcome.drained && tracker.shutting_down(),
            drain: membership.as_ref().map(Membership::id),
            outcome,
            closed,
            unrecorded,
        })
    }

    /// The drain this request joins, or none: its caller only observes, it is a pure
    /// query, or as many drains as allowed (the node's, or its owner's) are in progress
    /// (the waiter still waits, unrecorded, and its answer says why: a stop hook must not
    /// fail). The same when the scope's drain has taken its verdict and is slow to end: the
    /// waiter waits on its own count, never that verdict.
    async fn member(&self, drains: &Arc<Drains>) -> Result<Joined, Unanswered> {
        let Some(by) = self.control.filter(|_| !self.is_query()) else {
            return Ok(Joined::Unrecorded(None));
        };
        let why = match drains.join(self.spec.clone(), by, self.continues).await {
            Ok((membership, _)) => return Ok(Joined::Drain(membership)),
            Err(JoinError::Conflict(id, difference)) => {
                return Err(Unanswered::Conflict(id, difference));
            }
            Err(JoinError::Full) => Unrecorded::DrainLimit,
            Err(JoinError::OwnerFull(..)) => Unrecorded::OwnerLimit,
            Err(JoinError::Ending(_)) => Unrecorded::Ending,
        };
        Ok(Joined::Unrecorded(Some(why)))
    }
}

/// What a waiter joined: a drain, or none (why, if it could control the scope).
enum Joined {
    Drain(Membership),
    Unrecorded(Option<Unrecorded>),
}

/// A waiter's answer from the drain it joined. The drain owns the deadline, the close at
/// the deadline and the final recount: a waiter whose deadline is the drain's (or later)
/// gets the drain's outcome; one whose deadline comes first is answered then, with the
/// count at that moment. A drain that ended without draining (its timeout, a cancel)
/// before this waiter's own deadline leaves it waiting, as an observer, until then. Where
/// it judges for itself it judges by the drain's rule, but for the settings it named
/// ([`Membership::rule_for`]): never by its own defaults for what it left to the drain.
async fn await_drain(
    tracker: &Tracker,
    spec: &DrainSpec,
    membership: &Membership,
) -> Result<(DrainOutcome, Option<u64>), WaitError> {
    let started = tokio::time::Instant::now();
    let own_deadline = started + spec.timeout;
    // Of the drain's deadline: the drain's own may change while this waiter waits (a drain
    // handed over to a POSTed one at an upgrade's take-over).
    let until = |deadline: tokio::time::Instant| {
        if deadline <= own_deadline {
            // Bounded: a paced close at the deadline takes its time, and the agent may be
            // shutting down.
            deadline + CLOSE_WAIT
        } else {
            own_deadline
        }
    };
    let final_outcome = membership.outcome(until).await;
    let waited = |mut outcome: DrainOutcome| {
        outcome.waited = started.elapsed();
        outcome
    };
    match final_outcome {
        // Not a drained verdict from before it asked (`Membership::takes`).
        Some(done)
            if membership.takes(&done)
                && (done.outcome.drained
                    || matches!(
                        done.result,
                        DrainEnd::ClosedAtDeadline | DrainEnd::AgentShutdown
                    )
                    || tokio::time::Instant::now() >= own_deadline) =>
        {
            Ok((waited(done.outcome.clone()), done.closed))
        }
        Some(_) => {
            // The drain ended undrained (or drained from reads before it asked): an
            // observer's wait for the rest of this waiter's time, its quiet window counted
            // from now.
            let rule = membership.rule_for(spec);
            let left = own_deadline.saturating_duration_since(tokio::time::Instant::now());
            let outcome = tracker.wait_for_drain(&spec.filter, left, &rule).await?;
            Ok((waited(outcome), None))
        }
        None => {
            // This waiter's deadline came first: the count now, asked like any answer (a
            // quiet window, counted from now, is not met: the drain runs on, undecided).
            let rule = membership.rule_for(spec);
            let mut outcome = tracker
                .wait_for_drain(&spec.filter, Duration::ZERO, &rule)
                .await?;
            tracker
                .list_remaining(&spec.filter, &rule, &mut outcome, ANSWER_LIST_BUDGET)
                .await;
            Ok((waited(outcome), None))
        }
    }
}
