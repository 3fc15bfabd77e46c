//! The wait for a drain, as decisions: a [`Waiter`] takes what one look at the scope found
//! (a [`Pass`]: the count, its doubts, the time, and what the socket tables said when it
//! asked) and says what to do next (a [`Step`]): ask the socket tables, list the
//! connections, read the kernel's count of lost events, answer, or sleep until a time. It
//! does no I/O and reads no clock, so it is tested on a fake clock like
//! [`crate::drain_rule::decide`]; `Tracker::wait` only gathers the inputs and carries the
//! steps out.
//!
//! Never answers drained from a count it cannot vouch for (see [`Doubt`]): a zero from the
//! maps is drained only when the scope has no doubt, or when the socket tables confirm it;
//! a doubts read that fails is a doubt; a list that cannot be made is an unknown, not a
//! zero. Nor does a quiet window end over events the kernel lost that it has not
//! accounted for ([`Step::CountLosses`]).

use std::time::Duration;

use tokio::time::Instant;

use super::{source::Filter, wake::Heard};
use crate::{
    doubt::{Doubt, describe},
    drain_rule::{Decision, DrainRule, Peer, Remaining, decide},
};

/// The answer to "is it drained?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainOutcome {
    pub drained: bool,
    pub active: u64,
    pub waited: Duration,
    /// Set when the count could not be vouched for and the kernel's socket tables could
    /// not settle it either: why the answer is "not drained" although the count is 0.
    pub unknown: Option<String>,
    /// Of `active`, the connections idle and busy by the request's `idle` bar (1 s when it
    /// has none), when the connections were looked at one by one.
    pub idle: Option<u64>,
    pub busy: Option<u64>,
    /// The first [`PEERS_SHOWN`] remaining connections, when not drained.
    pub peers: Vec<Peer>,
    /// When the count was first seen at zero, after the request.
    pub first_zero: Option<Duration>,
    /// Connections that arrived (from sources not ignored) after the request.
    pub arrivals: u64,
}

impl DrainOutcome {
    /// An outcome of counts alone: nothing looked at one by one, no peer, no arrival.
    pub fn counted(drained: bool, active: u64, waited: Duration, unknown: Option<String>) -> Self {
        Self {
            drained,
            active,
            waited,
            unknown,
            idle: None,
            busy: None,
            peers: Vec::new(),
            first_zero: None,
            arrivals: 0,
        }
    }
}

/// How many remaining connections a not-drained answer lists.
pub const PEERS_SHOWN: usize = 10;

/// How long a doubted waiter waits before it asks the socket tables again: connections
/// the maps missed send no events when they close, so this one case looks periodically.
pub(super) const CONFIRM_RETRY: Duration = Duration::from_millis(250);
/// Not longer: a connection whose open the kernel skipped sends no event when it closes, so
/// this is how late such a close can be answered (until the next walk counts it).
pub(super) const CONFIRM_RETRY_MAX: Duration = Duration::from_millis(250);

/// After a waiter starts, its count is read once more this much later, whatever happens:
/// on CPUs where the kernel's atomic add is not a full barrier, a change racing with the
/// waiter's arrival might otherwise go unannounced. One look, not polling.
pub(super) const ARRIVAL_RECHECK: Duration = Duration::from_millis(50);

/// What one look at the scope found so far. The shell fills in `tables` and `peers` when a
/// [`Step`] asks for them, and the clock and `stopping` before every [`Waiter::judge`].
#[derive(Clone, Debug)]
pub(super) struct Pass {
    /// The waiter's clock (deadline, wake-ups).
    pub now: Instant,
    /// CLOCK_MONOTONIC now, the clock of the kernel's event times (the quiet window).
    pub now_ns: u64,
    /// The agent is shutting down: answer at once, with no list.
    pub stopping: bool,
    /// The maps' count of the scope.
    pub count: u64,
    /// The scope's doubts, read once a pass, *after* the count: a zero is judged against
    /// the doubts of the same read. A read that failed (its error) is a doubt too.
    pub doubts: Result<Vec<Doubt>, String>,
    /// The kernel skipped runs since the wait began: one may be this scope's close.
    pub skipped: bool,
    /// The socket tables' count, once asked ([`Step::Confirm`]).
    pub tables: Option<Result<u64, String>>,
    /// The connections one by one for the rule, once listed ([`Step::ListPeers`]).
    pub peers: Option<Result<Vec<Peer>, String>>,
    /// The kernel's count of lost events, once read ([`Step::CountLosses`]; the error says
    /// what an answer may say).
    pub lost_events: Option<Result<u64, String>>,
}

impl Pass {
    /// Whether the scope's counts cannot be vouched for in this pass.
    pub(super) fn in_doubt(&self) -> bool {
        self.skipped
            || self
                .doubts
                .as_ref()
                .map_or(true, |doubts| !doubts.is_empty())
    }
}

/// What a pass concluded (also what the waiter logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Judgment {
    /// The count the answer gives: the socket tables' when they were asked and differ.
    pub active: u64,
    /// `active` came from the socket tables.
    pub from_tables: bool,
    pub in_doubt: bool,
    pub decision: Decision,
    /// Why a zero could not be vouched for (or the connections not listed).
    pub unknown: Option<String>,
}

impl Judgment {
    /// One pass of a waiter, in the debug log.
    pub(super) fn log(&self, filter: &Filter, started: Instant) {
        log::debug!(
            "waiter on port {} at {} ms: {} active{}{}, {:?}{}",
            filter.port,
            started.elapsed().as_millis(),
            self.active,
            if self.from_tables {
                " (socket tables)"
            } else {
                ""
            },
            if self.in_doubt { ", in doubt" } else { "" },
            self.decision,
            self.unknown
                .as_deref()
                .map(|why| format!(" (unknown: {why})"))
                .unwrap_or_default()
        );
    }
}

/// What the waiter does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Count the scope in the socket tables, then judge again.
    Confirm,
    /// List the scope's connections for the rule (a fresh pass), then judge again.
    ListPeers,
    /// Read the kernel's count of lost events ([`super::Vouch::lost_events`]), then judge
    /// again: the last look before a drained answer that depends on hearing arrivals.
    CountLosses,
    /// Answer now; with `list`, first look up who is still connected (a report, best
    /// effort, within the answer's small budget).
    Answer {
        judgment: Judgment,
        list: bool,
        waited: Duration,
    },
    /// Sleep until `until`, a zero crossing of the port, an event that concerns the
    /// waiter ([`Waiter::wakes_on`]) or shutdown; then look again.
    Sleep { judgment: Judgment, until: Instant },
}

/// One wait's state: what it heard and when it looks again.
pub(super) struct Waiter<'a> {
    filter: &'a Filter,
    rule: &'a DrainRule,
    started: Instant,
    /// CLOCK_MONOTONIC when the port was watched: the request's quiet window starts here,
    /// once arrivals are announced.
    started_ns: u64,
    deadline: Instant,
    /// `timeout` zero: a pure query, answered at once without a list unless asked.
    at_once: bool,
    last_arrival_ns: Option<u64>,
    /// The kernel's count of lost events that this waiter has accounted for: every loss it
    /// counts happened before the request, or before the quiet window's current start.
    /// None: not known (the read at the start failed), so any count read is a loss.
    lost_seen: Option<u64>,
    arrivals: u64,
    first_zero: Option<Duration>,
    /// The one extra look after the start ([`ARRIVAL_RECHECK`]); None once done.
    recheck_at: Option<Instant>,
    confirm_retry: Duration,
}

impl<'a> Waiter<'a> {
    pub(super) fn new(
        filter: &'a Filter,
        rule: &'a DrainRule,
        started: Instant,
        started_ns: u64,
        timeout: Duration,
        lost_events: Option<u64>,
    ) -> Self {
        Self {
            filter,
            rule,
            started,
            started_ns,
            deadline: started + timeout,
            at_once: timeout.is_zero(),
            last_arrival_ns: None,
            lost_seen: lost_events,
            arrivals: 0,
            first_zero: None,
            recheck_at: Some(started + ARRIVAL_RECHECK),
            confirm_retry: CONFIRM_RETRY,
        }
    }

    /// Takes in an event of the port: an arrival in scope, from a source not ignored, after
    /// the request restarts the quiet window. Fell behind on the scope's events (they
    /// cannot be told apart then), or the kernel lost events (of any scope): an arrival now
    /// as far as the window goes (a longer window, never shorter); a loss this
    /// waiter accounted for already (read at its start, or at a look before it answered:
    /// [`Step::CountLosses`]) is not heard again.
    pub(super) fn hear(&mut self, heard: Heard) {
        let at_ns = match heard {
            Heard::Event(event) => {
                if !(event.opened
                    && event.at_ns >= self.started_ns
                    && self
                        .filter
                        .matches_parts(event.netns, event.addr, event.port)
                    && !self.rule.ignores(event.remote))
                {
                    return;
                }
                self.arrivals += 1;
                event.at_ns
            }
            Heard::Missed { count, at_ns } => {
                self.arrivals += count;
                at_ns
            }
            // Not counted (it may have been none, or another port's), but the window
            // restarts: an arrival may have gone unheard.
            Heard::Lost(notice) => {
                if self.lost_seen.is_some_and(|seen| notice.lost <= seen) {
                    return;
                }
                self.lost_seen = Some(notice.lost);
                notice.at_ns
            }
        };
        self.restart_window(at_ns);
    }

    /// The quiet window counts from `at_ns` or later.
    fn restart_window(&mut self, at_ns: u64) {
        self.last_arrival_ns = Some(self.last_arrival_ns.map_or(at_ns, |at| at.max(at_ns)));
    }

    /// Whether what it heard while asleep is worth a look now. An event outside the scope
    /// never is: it moves no count of the scope and is no arrival in it (the port's channel
    /// tells a waiter only its scope's events; this says so again). Events matter to the
    /// decision with a quiet window or a look at each connection; otherwise they are only
    /// counted (arrivals, for the drain's record), and a zero crossing wakes the waiter.
    /// In doubt, a count may move without a crossing, so every event is a reason to look.
    /// Events missed or lost may have been the scope's: a reason to look, as an event.
    pub(super) fn wakes_on(&self, heard: &Heard, in_doubt: bool) -> bool {
        if let Heard::Event(event) = heard
            && !self
                .filter
                .matches_parts(event.netns, event.addr, event.port)
        {
            return false;
        }
        !self.rule.quiet.is_zero() || self.rule.needs_peers() || in_doubt
    }

    /// The decision of one pass, from what it found so far. Called again after each
    /// [`Step::Confirm`], [`Step::ListPeers`] or [`Step::CountLosses`] with the answer
    /// filled in.
    pub(super) fn judge(&mut self, pass: &Pass) -> Step {
        let rule = self.rule;
        // The kernel skipped runs that may be this scope's, or the scope has other doubts
        // (a full map left connections untracked, a namespace unwalked, ...): until a walk
        // vouches for the counts again, a count may be too high or too low and the closes
        // of its connections may move it without a zero crossing (or not at all), so no
        // event can be relied on to wake this waiter: it asks the socket tables itself,
        // every CONFIRM_RETRY_MAX. A doubts read that fails is a doubt too.
        let in_doubt = pass.in_doubt();
        let mut active = pass.count;
        let mut from_tables = false;
        if pass.count > 0 && !rule.needs_peers() && in_doubt {
            // A skipped close leaves a count too high (the safe side) until the next walk,
            // a skipped or untracked open one too low: the socket tables' count is the
            // count now, either way (an error leaves the maps' count).
            match &pass.tables {
                None => return Step::Confirm,
                Some(Ok(open)) if *open != pass.count => {
                    active = *open;
                    from_tables = true;
                }
                Some(_) => {}
            }
        }
        if active == 0 && self.first_zero.is_none() {
            self.first_zero = Some(pass.now.saturating_duration_since(self.started));
        }
        let mut unknown = None;
        let mut doubted = false;
        // The rule looks at each connection: its list (from the socket tables) decides.
        let rule_looks = rule.needs_peers() && active > 0;
        let mut listed = None;
        if rule_looks {
            match &pass.peers {
                None => return Step::ListPeers,
                Some(Ok(list)) => listed = Some(list.as_slice()),
                Some(Err(problem)) => {
                    unknown = Some(format!("cannot list the remaining connections: {problem}"));
                    doubted = true;
                }
            }
        }
        let since_request = Duration::from_nanos(pass.now_ns.saturating_sub(self.started_ns));
        let since_arrival = self
            .last_arrival_ns
            .map(|at| Duration::from_nanos(pass.now_ns.saturating_sub(at)));
        let wait = Decision::Wait { recheck_in: None };
        let mut decision = if unknown.is_some() {
            wait
        } else {
            let remaining = listed.map_or(Remaining::Count(active), Remaining::Peers);
            decide(rule, since_request, since_arrival, &remaining)
        };
        // A drained decision from the maps' count must be vouched for; one from the socket
        // tables (the rule's list, or a count they gave) already is. Without doubts it is;
        // with doubts, the kernel's socket tables decide.
        if decision == Decision::Drained && !rule_looks && !from_tables {
            match &pass.doubts {
                Err(problem) => {
                    doubted = true;
                    unknown = Some(problem.clone());
                    decision = wait;
                }
                Ok(doubts) if doubts.is_empty() => {}
                Ok(doubts) => match &pass.tables {
                    None => return Step::Confirm,
                    Some(Ok(0)) => {}
                    // The socket tables show connections the maps missed.
                    Some(Ok(open)) => {
                        doubted = true;
                        active = *open;
                        decision = wait;
                        if rule.needs_peers() {
                            // Judge them one by one (a list that fails leaves it waiting).
                            match &pass.peers {
                                None => return Step::ListPeers,
                                Some(Ok(list)) => {
                                    decision = decide(
                                        rule,
                                        since_request,
                                        since_arrival,
                                        &Remaining::Peers(list),
                                    );
                                }
                                Some(Err(_)) => {}
                            }
                        }
                    }
                    // Neither the maps nor the socket tables can say.
                    Some(Err(problem)) => {
                        doubted = true;
                        unknown = Some(format!(
                            "{} (and the socket tables could not be read: {problem})",
                            describe(doubts)
                        ));
                        decision = wait;
                    }
                },
            }
        }
        // A quiet window hears arrivals only as the kernel's events, and an event the kernel
        // could not send (its ring buffer was full) is never heard: the ring reader notices
        // the loss at its next poll, up to a second later, and a window that ended before
        // then would answer drained over an arrival nobody heard. So a drained answer under
        // a quiet window first reads the kernel's count of lost events (one lookup): a loss
        // this waiter has not accounted for restarts the window now. Only the window
        // depends on hearing: the counts, the socket tables and the rule's list
        // (`ignore`, `idle`) are read afresh whatever was lost.
        if decision == Decision::Drained && !rule.quiet.is_zero() {
            match &pass.lost_events {
                None => return Step::CountLosses,
                Some(Ok(lost)) => {
                    if self.lost_seen.is_none_or(|seen| *lost > seen) {
                        self.lost_seen = Some(*lost);
                        self.restart_window(pass.now_ns);
                        decision = Decision::Wait {
                            recheck_in: Some(rule.quiet),
                        };
                    }
                }
                Some(Err(problem)) => {
                    doubted = true;
                    unknown = Some(problem.clone());
                    decision = wait;
                }
            }
        }
        let drained = decision == Decision::Drained;
        if in_doubt && !drained {
            doubted = true;
        }
        let judgment = Judgment {
            active,
            from_tables,
            in_doubt,
            decision,
            unknown,
        };
        let now = pass.now;
        if drained || now >= self.deadline || pass.stopping {
            // At shutdown every waiter is answered at once, with no list: a list is a pass
            // over the socket tables, and the answer only says "ask the next agent". A
            // waiter's answer says who is still connected, with their ages (best effort);
            // a pure query only when asked (`peers=true`, see `Tracker::listed`).
            let list = !drained && active > 0 && !self.at_once && !pass.stopping;
            return Step::Answer {
                judgment,
                list,
                waited: now.saturating_duration_since(self.started),
            };
        }
        // Woken by the kernel otherwise; by the clock only when time alone changes the
        // answer (the window ends, a silent connection turns idle, data in flight), when in
        // doubt (no event can be relied on) and for the one look after the start.
        let mut until = self.deadline;
        if let Decision::Wait {
            recheck_in: Some(wait),
        } = decision
        {
            until = until.min(now + wait);
        }
        if doubted {
            until = until.min(now + self.confirm_retry);
            self.confirm_retry = (self.confirm_retry * 2).min(CONFIRM_RETRY_MAX);
        }
        match self.recheck_at {
            Some(at) if at <= now => self.recheck_at = None,
            Some(at) => until = until.min(at),
            None => {}
        }
        Step::Sleep { judgment, until }
    }

    /// The answer, from a pass's judgment and the list of remaining connections it has
    /// (the answer's report, else the rule's own look).
    pub(super) fn outcome(
        &self,
        judgment: Judgment,
        list: Option<Vec<Peer>>,
        waited: Duration,
    ) -> DrainOutcome {
        let drained = judgment.decision == Decision::Drained;
        let (idle, busy) = idle_and_busy(list.as_deref());
        let mut shown = list.unwrap_or_default();
        if drained {
            shown.clear();
        }
        shown.truncate(PEERS_SHOWN);
        DrainOutcome {
            drained,
            active: peers_or(judgment.active, idle, busy),
            waited,
            unknown: judgment.unknown,
            idle,
            busy,
            peers: shown,
            first_zero: self.first_zero,
            arrivals: self.arrivals,
        }
    }
}

/// How many of `list` are idle and busy (None without a list).
pub(super) fn idle_and_busy(list: Option<&[Peer]>) -> (Option<u64>, Option<u64>) {
    list.map_or((None, None), |list| {
        let busy = list.iter().filter(|peer| peer.busy).count() as u64;
        (Some(list.len() as u64 - busy), Some(busy))
    })
}

/// The active count of an answer: the connections looked at one by one when they were
/// (the socket tables' truth), else the maps' count.
fn peers_or(count: u64, idle: Option<u64>, busy: Option<u64>) -> u64 {
    match (idle, busy) {
        (Some(idle), Some(busy)) => idle + busy,
        _ => count,
    }
}

#[cfg(test)]
#[path = "waiter_tests.rs"]
mod tests;
