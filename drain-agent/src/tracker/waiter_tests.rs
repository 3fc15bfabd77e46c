//! The waiter's decisions on a fake clock: times are values, nothing sleeps.

use super::*;
use crate::{drain_rule::parse_cidrs, tracker::wake::Heard};

const MS: fn(u64) -> Duration = Duration::from_millis;
const START_NS: u64 = 1_000_000_000;

/// A waiter on port 80 with `timeout`, started at `start`.
fn waiter<'a>(
    filter: &'a Filter,
    rule: &'a DrainRule,
    start: Instant,
    timeout: Duration,
) -> Waiter<'a> {
    Waiter::new(filter, rule, start, START_NS, timeout, Some(0))
}

/// A fresh pass at `after` the start: the maps count `count`, no doubt, no event lost.
fn pass(start: Instant, after: Duration, count: u64) -> Pass {
    Pass {
        now: start + after,
        now_ns: START_NS + u64::try_from(after.as_nanos()).expect("ns"),
        stopping: false,
        count,
        doubts: Ok(Vec::new()),
        skipped: false,
        tables: None,
        peers: None,
        lost_events: Some(Ok(0)),
    }
}

fn judgment(active: u64, decision: Decision) -> Judgment {
    Judgment {
        active,
        from_tables: false,
        in_doubt: false,
        decision,
        unknown: None,
    }
}

const WAIT: Decision = Decision::Wait { recheck_in: None };

fn sleep_until(step: &Step) -> Instant {
    match step {
        Step::Sleep { until, .. } => *until,
        other => panic!("not a sleep: {other:?}"),
    }
}

fn answer(step: Step) -> (Judgment, bool, Duration) {
    match step {
        Step::Answer {
            judgment,
            list,
            waited,
        } => (judgment, list, waited),
        other => panic!("not an answer: {other:?}"),
    }
}

fn arrival(at_ns: u64, remote: &str) -> Heard {
    Heard::Event(crate::tracker::ConnectionEvent {
        netns: 7,
        addr: "127.0.0.1".parse().expect("ip"),
        port: 80,
        remote: remote.parse().expect("ip"),
        opened: true,
        crossing: false,
        at_ns,
    })
}

#[test]
fn a_vouched_zero_is_drained_at_once() {
    let (filter, rule, start) = (Filter::port(80), DrainRule::default(), Instant::now());
    let mut waiter = waiter(&filter, &rule, start, MS(5000));
    let (judged, list, waited) = answer(waiter.judge(&pass(start, MS(3), 0)));
    assert_eq!(judged, judgment(0, Decision::Drained));
    assert!(!list);
    assert_eq!(waited, MS(3));
    let outcome = waiter.outcome(judged, None, waited);
    assert!(outcome.drained);
    assert_eq!(outcome.first_zero, Some(MS(3)));
}

#[test]
fn a_count_sleeps_until_the_one_recheck_then_until_the_deadline() {
    let (filter, rule, start) = (Filter::port(80), DrainRule::default(), Instant::now());
    let mut waiter = waiter(&filter, &rule, start, MS(5000));
    let first = waiter.judge(&pass(start, MS(0), 2));
    assert_eq!(sleep_until(&first), start + ARRIVAL_RECHECK);
    // Woken by the recheck: no more clock wake-ups but the deadline (events wake it).
    let second = waiter.judge(&pass(start, ARRIVAL_RECHECK, 2));
    assert_eq!(sleep_until(&second), start + MS(5000));
    let event = arrival(START_NS, "127.0.0.9");
    assert!(
        !waiter.wakes_on(&event, false),
        "strict rule: crossings only"
    );
    assert!(waiter.wakes_on(&event, true), "in doubt every event counts");
    // At the deadline: not drained, and the answer lists who is left.
    let (judged, list, waited) = answer(waiter.judge(&pass(start, MS(5000), 2)));
    assert_eq!(judged, judgment(2, WAIT));
    assert!(list);
    assert_eq!(waited, MS(5000));
}

#[test]
fn a_zero_timeout_and_a_shutdown_answer_at_once_without_a_list() {
    let (filter, rule, start) = (Filter::port(80), DrainRule::default(), Instant::now());
    let (_, list, waited) =
        answer(waiter(&filter, &rule, start, Duration::ZERO).judge(&pass(start, MS(0), 3)));
    assert_eq!((list, waited), (false, Duration::ZERO));
    let stopping = Pass {
        stopping: true,
        ..pass(start, MS(10), 3)
    };
    let (judged, list, _) = answer(waiter(&filter, &rule, start, MS(5000)).judge(&stopping));
    assert_eq!((judged.active, list), (3, false));
}

#[test]
fn a_doubted_zero_is_drained_only_when_the_socket_tables_confirm_it() {
    let (filter, rule, start) = (Filter::port(80), DrainRule::default(), Instant::now());
    let doubted = Pass {
        doubts: Ok(vec![Doubt::ConnectionsLost { port: 80 }]),
        ..pass(start, MS(100), 0)
    };
    let mut waiter = waiter(&filter, &rule, start, MS(5000));
    assert_eq!(waiter.judge(&doubted), Step::Confirm);
    // Confirmed: drained.
    let confirmed = Pass {
        tables: Some(Ok(0)),
        ..doubted.clone()
    };
    assert!(answer(waiter.judge(&confirmed)).0.decision == Decision::Drained);
    // The tables show two the maps missed: not drained, their count, asked again soon.
    let busy = Pass {
        tables: Some(Ok(2)),
        ..doubted.clone()
    };
    let step = waiter.judge(&busy);
    assert_eq!(sleep_until(&step), doubted.now + CONFIRM_RETRY);
    let Step::Sleep { judgment, .. } = step else {
        unreachable!()
    };
    assert_eq!((judgment.active, judgment.decision), (2, WAIT));
    // The tables cannot be read: unknown, with both reasons; at the deadline not drained.
    let unreadable = Pass {
        tables: Some(Err("no netlink".into())),
        ..pass(start, MS(5000), 0)
    };
    let unreadable = Pass {
        doubts: doubted.doubts.clone(),
        ..unreadable
    };
    let (judged, list, _) = answer(waiter.judge(&unreadable));
    assert_eq!(judged.decision, WAIT);
    assert!(!list, "nothing to list at zero");
    let why = judged.unknown.expect("a reason");
    assert!(
        why.contains("port 80") && why.contains("no netlink"),
        "{why}"
    );
}

#[test]
fn a_failed_doubts_read_is_a_doubt() {
    let (filter, rule, start) = (Filter::port(80), DrainRule::default(), Instant::now());
    let unread = Pass {
        doubts: Err("cannot read the totals".into()),
        ..pass(start, MS(100), 0)
    };
    let mut waiter = waiter(&filter, &rule, start, MS(5000));
    let step = waiter.judge(&unread);
    assert_eq!(sleep_until(&step), unread.now + CONFIRM_RETRY);
    let Step::Sleep { judgment, .. } = step else {
        unreachable!()
    };
    assert!(judgment.in_doubt);
    assert_eq!(judgment.unknown.as_deref(), Some("cannot read the totals"));
}

#[test]
fn a_doubted_count_is_the_socket_tables_count() {
    let (filter, rule, start) = (Filter::port(80), DrainRule::default(), Instant::now());
    // Skipped runs since the start: in doubt even if the doubts are empty now.
    let skipped = Pass {
        skipped: true,
        ..pass(start, MS(1), 2)
    };
    let mut waiter = waiter(&filter, &rule, start, MS(5000));
    assert_eq!(waiter.judge(&skipped), Step::Confirm);
    // The tables say 0: drained on their word (they vouch), first zero noted.
    let (judged, _, _) = answer(waiter.judge(&Pass {
        tables: Some(Ok(0)),
        ..skipped.clone()
    }));
    assert!(judged.from_tables && judged.decision == Decision::Drained);
    // The tables say 200: that is the count; an error leaves the maps' count.
    let mut other = Waiter::new(&filter, &rule, start, START_NS, MS(5000), Some(0));
    let Step::Sleep { judgment, .. } = other.judge(&Pass {
        tables: Some(Ok(200)),
        ..skipped.clone()
    }) else {
        panic!("sleeps")
    };
    assert_eq!((judgment.active, judgment.from_tables), (200, true));
    let Step::Sleep { judgment, .. } = other.judge(&Pass {
        tables: Some(Err("no netlink".into())),
        ..skipped
    }) else {
        panic!("sleeps")
    };
    assert_eq!((judgment.active, judgment.from_tables), (2, false));
}

#[test]
fn a_rule_that_looks_at_each_connection_lists_them_and_fails_closed() {
    let rule = DrainRule {
        idle: Some(MS(1000)),
        ..DrainRule::default()
    };
    let (filter, start) = (Filter::port(80), Instant::now());
    let mut waiter = waiter(&filter, &rule, start, MS(5000));
    let busy = pass(start, MS(1), 1);
    assert_eq!(waiter.judge(&busy), Step::ListPeers);
    assert!(waiter.wakes_on(&arrival(START_NS, "127.0.0.9"), false));
    let Step::Sleep { judgment, .. } = waiter.judge(&Pass {
        peers: Some(Err("netlink refused".into())),
        ..busy.clone()
    }) else {
        panic!("sleeps")
    };
    assert_eq!(
        judgment.unknown.as_deref(),
        Some("cannot list the remaining connections: netlink refused")
    );
    // Listed with nobody left (they closed meanwhile): drained by the tables' word.
    let (judged, _, _) = answer(waiter.judge(&Pass {
        peers: Some(Ok(Vec::new())),
        ..busy
    }));
    assert_eq!(judged.decision, Decision::Drained);
}

#[test]
fn the_quiet_window_restarts_on_arrivals_in_scope_not_ignored() {
    let rule = DrainRule {
        quiet: MS(300),
        ignore: parse_cidrs("10.9.0.0/16").expect("cidr"),
        ..DrainRule::default()
    };
    let (filter, start) = (Filter::port(80), Instant::now());
    let mut waiter = waiter(&filter, &rule, start, MS(5000));
    // Nothing connected: still waits the window from the request.
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(0), 0))),
        start + ARRIVAL_RECHECK
    );
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(100), 0))),
        start + MS(300)
    );
    // An ignored source, an arrival before the request, another port: no restart.
    waiter.hear(arrival(START_NS + 150_000_000, "10.9.0.1"));
    waiter.hear(arrival(START_NS - 1, "127.0.0.9"));
    let Heard::Event(elsewhere) = arrival(START_NS + 150_000_000, "127.0.0.9") else {
        unreachable!()
    };
    waiter.hear(Heard::Event(crate::tracker::ConnectionEvent {
        port: 81,
        ..elsewhere
    }));
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(200), 0))),
        start + MS(300)
    );
    // A real arrival at 150 ms: the window ends at 450 ms.
    waiter.hear(arrival(START_NS + 150_000_000, "127.0.0.9"));
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(300), 0))),
        start + MS(450)
    );
    // Fallen behind at 400 ms: counted as arrivals then (a longer window, never shorter).
    waiter.hear(Heard::Missed {
        count: 3,
        at_ns: START_NS + 400_000_000,
    });
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(450), 0))),
        start + MS(700)
    );
    let (judged, _, _) = answer(waiter.judge(&pass(start, MS(700), 0)));
    assert_eq!(judged.decision, Decision::Drained);
    assert_eq!(waiter.outcome(judged, None, MS(700)).arrivals, 4);
}

/// A pass at `after` the start that has not read the kernel's count of lost events yet.
fn unread_losses(start: Instant, after: Duration, count: u64) -> Pass {
    Pass {
        lost_events: None,
        ..pass(start, after, count)
    }
}

fn lost(at_ns: u64, lost: u64) -> Heard {
    Heard::Lost(crate::tracker::wake::LostNotice { at_ns, lost })
}

#[test]
fn a_quiet_window_reads_the_lost_events_before_it_answers_drained() {
    let rule = DrainRule {
        quiet: MS(300),
        ..DrainRule::default()
    };
    let (filter, start) = (Filter::port(80), Instant::now());
    // Two lost before the request (read at the start): no arrival in the window.
    let mut waiter = Waiter::new(&filter, &rule, start, START_NS, MS(5000), Some(2));
    // Not drained yet: nothing to read.
    assert_eq!(
        sleep_until(&waiter.judge(&unread_losses(start, MS(100), 0))),
        start + MS(300)
    );
    // Drained by the window, but first the count of lost events.
    assert_eq!(
        waiter.judge(&unread_losses(start, MS(300), 0)),
        Step::CountLosses
    );
    // One lost since the start, that nobody told this waiter of: the window restarts now.
    let moved = Pass {
        lost_events: Some(Ok(3)),
        ..pass(start, MS(300), 0)
    };
    let Step::Sleep { judgment, until } = waiter.judge(&moved) else {
        panic!("not drained")
    };
    assert_eq!(until, start + MS(600));
    assert_eq!(
        judgment.decision,
        Decision::Wait {
            recheck_in: Some(MS(300))
        }
    );
    // The ring reader's poll notices the same loss later: accounted for, no restart.
    waiter.hear(lost(START_NS + 450_000_000, 3));
    let still = Pass {
        lost_events: Some(Ok(3)),
        ..pass(start, MS(600), 0)
    };
    let (judged, _, _) = answer(waiter.judge(&still));
    assert_eq!(judged.decision, Decision::Drained);
    // Not an arrival: there may have been none.
    assert_eq!(waiter.outcome(judged, None, MS(600)).arrivals, 0);
}

#[test]
fn a_loss_noticed_by_the_poll_restarts_the_window_once() {
    let rule = DrainRule {
        quiet: MS(300),
        ..DrainRule::default()
    };
    let (filter, start) = (Filter::port(80), Instant::now());
    let mut waiter = Waiter::new(&filter, &rule, start, START_NS, MS(5000), Some(2));
    // A notice of losses from before the start: nothing to restart.
    waiter.hear(lost(START_NS + 100_000_000, 2));
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(100), 0))),
        start + MS(300)
    );
    // A new loss, noticed at 200 ms: the window ends at 500 ms.
    waiter.hear(lost(START_NS + 200_000_000, 4));
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(300), 0))),
        start + MS(500)
    );
    // Read again before the answer, unchanged: drained.
    let (judged, _, _) = answer(waiter.judge(&Pass {
        lost_events: Some(Ok(4)),
        ..pass(start, MS(500), 0)
    }));
    assert_eq!(judged.decision, Decision::Drained);
}

#[test]
fn an_unknown_count_of_lost_events_never_answers_drained() {
    let rule = DrainRule {
        quiet: MS(300),
        ..DrainRule::default()
    };
    let (filter, start) = (Filter::port(80), Instant::now());
    // The read at the start failed: the first count read is a loss.
    let mut waiter = Waiter::new(&filter, &rule, start, START_NS, MS(5000), None);
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(300), 0))),
        start + MS(600)
    );
    let (judged, _, _) = answer(waiter.judge(&pass(start, MS(600), 0)));
    assert_eq!(judged.decision, Decision::Drained);
    // A read that fails: not drained, and the answer says why (asked again soon).
    let mut waiter = waiter_at(&filter, &rule, start);
    let failed = Pass {
        lost_events: Some(Err("cannot read whether the kernel lost events".into())),
        ..pass(start, MS(300), 0)
    };
    let Step::Sleep { judgment, until } = waiter.judge(&failed) else {
        panic!("not drained")
    };
    assert_eq!(until, start + MS(300) + CONFIRM_RETRY);
    assert_eq!(
        judgment.unknown.as_deref(),
        Some("cannot read whether the kernel lost events")
    );
    let (judged, _, _) = answer(waiter.judge(&Pass {
        now: start + MS(5000),
        ..failed
    }));
    assert_eq!(judged.decision, WAIT);
    assert!(judged.unknown.is_some());
}

/// A waiter on port 80, five seconds, nothing lost at its start.
fn waiter_at<'a>(filter: &'a Filter, rule: &'a DrainRule, start: Instant) -> Waiter<'a> {
    waiter(filter, rule, start, MS(5000))
}

#[test]
fn only_a_quiet_window_reads_the_lost_events() {
    let (filter, start) = (Filter::port(80), Instant::now());
    // Without a window no answer depends on hearing arrivals: the count, the socket tables
    // and the rule's list are read afresh whatever the kernel lost.
    let idle = DrainRule {
        idle: Some(MS(1000)),
        ignore: parse_cidrs("10.9.0.0/16").expect("cidr"),
        ..DrainRule::default()
    };
    for rule in [DrainRule::default(), idle.clone()] {
        let (judged, _, _) =
            answer(waiter_at(&filter, &rule, start).judge(&unread_losses(start, MS(1), 0)));
        assert_eq!(judged.decision, Decision::Drained, "{rule:?}");
        let mut waiter = waiter_at(&filter, &rule, start);
        let left = unread_losses(start, MS(1), 1);
        if rule.needs_peers() {
            assert_eq!(waiter.judge(&left), Step::ListPeers);
            let listed = Pass {
                peers: Some(Ok(vec![crate::tracker::fake::peer(
                    "10.9.0.1:4000",
                    "127.0.0.1:80",
                )])),
                ..left
            };
            assert_eq!(answer(waiter.judge(&listed)).0.decision, Decision::Drained);
        }
    }
    // With a window, the rule's list comes first, the count of lost events last.
    let rule = DrainRule {
        quiet: MS(300),
        ..idle
    };
    let mut waiter = waiter_at(&filter, &rule, start);
    let left = unread_losses(start, MS(300), 1);
    assert_eq!(waiter.judge(&left), Step::ListPeers);
    let listed = Pass {
        peers: Some(Ok(vec![crate::tracker::fake::peer(
            "10.9.0.1:4000",
            "127.0.0.1:80",
        )])),
        ..left
    };
    assert_eq!(waiter.judge(&listed), Step::CountLosses);
    let counted = Pass {
        lost_events: Some(Ok(0)),
        ..listed
    };
    assert_eq!(answer(waiter.judge(&counted)).0.decision, Decision::Drained);
}

#[test]
fn an_answer_counts_and_shows_the_list_it_has() {
    let (filter, rule, start) = (Filter::port(80), DrainRule::default(), Instant::now());
    let peer = |busy| Peer {
        remote: "10.0.0.2:5000".parse().expect("addr"),
        local: "10.0.0.1:80".parse().expect("addr"),
        age_ms: None,
        idle_ms: 0,
        recv_queue: 0,
        send_queue: 0,
        awaiting_reply: false,
        busy,
    };
    let waiter = waiter(&filter, &rule, start, MS(5000));
    let list: Vec<Peer> = (0..12).map(|n| peer(n < 5)).collect();
    let outcome = waiter.outcome(judgment(3, WAIT), Some(list), MS(5000));
    // The tables' list is the truth: 12 left (the maps said 3), the first 10 shown.
    assert_eq!(
        (
            outcome.active,
            outcome.busy,
            outcome.idle,
            outcome.peers.len()
        ),
        (12, Some(5), Some(7), PEERS_SHOWN)
    );
    let drained = waiter.outcome(
        judgment(0, Decision::Drained),
        Some(vec![peer(false)]),
        MS(1),
    );
    assert!(drained.peers.is_empty());
}

/// Found by an audit: a waiter scoped to one pod's namespace woke (and re-read its count, a
/// pass over the whole endpoint map) on every event of its port number, other pods' too.
/// Another namespace's event neither wakes it nor restarts its window, even in doubt; its
/// own do, and so do events missed or lost (they may have been its own).
#[test]
fn an_event_outside_the_scope_neither_wakes_nor_restarts_the_window() {
    let rule = DrainRule {
        quiet: MS(300),
        ..DrainRule::default()
    };
    let filter = Filter {
        netns: Some(7),
        ..Filter::port(80)
    };
    let start = Instant::now();
    let mut waiter = waiter(&filter, &rule, start, MS(5000));
    let own = arrival(START_NS + 150_000_000, "127.0.0.9");
    let Heard::Event(event) = own else {
        unreachable!()
    };
    let other_pod = Heard::Event(crate::tracker::ConnectionEvent {
        netns: 8,
        crossing: true,
        ..event
    });
    for in_doubt in [false, true] {
        assert!(
            !waiter.wakes_on(&other_pod, in_doubt),
            "in doubt: {in_doubt}"
        );
    }
    waiter.hear(other_pod);
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(200), 0))),
        start + MS(300)
    );
    let missed = Heard::Missed {
        count: 2_000,
        at_ns: START_NS + 100_000_000,
    };
    for heard in [own, missed, lost(START_NS + 100_000_000, 1)] {
        assert!(waiter.wakes_on(&heard, false), "{heard:?}");
    }
    waiter.hear(own);
    assert_eq!(
        sleep_until(&waiter.judge(&pass(start, MS(300), 0))),
        start + MS(450)
    );
    let (judged, _, _) = answer(waiter.judge(&pass(start, MS(450), 0)));
    assert_eq!(judged.decision, Decision::Drained);
    assert_eq!(waiter.outcome(judged, None, MS(450)).arrivals, 1);
}
