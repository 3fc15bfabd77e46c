use super::{owner::Owner, *};
use crate::tracker::fake::{FakeSource, endpoint};

fn registry(active: u64) -> (Arc<FakeSource>, Arc<Tracker>, Arc<Drains>) {
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, active)]);
    let tracker = Arc::new(Tracker::new(source.clone(), 16));
    let drains = Arc::new(Drains::new(Arc::clone(&tracker), None, None, None, 4));
    (source, tracker, drains)
}

/// The listeners read at a drain's end: these cookies.
fn read(cookies: &[u64]) -> gate::AtEnd {
    gate::AtEnd::Read(cookies.iter().copied().collect())
}

fn spec(timeout: Duration) -> DrainSpec {
    DrainSpec {
        filter: Filter::port(8080),
        timeout,
        rule: DrainRule::default(),
        on_timeout: OnTimeout::Keep,
        pace: 0,
        given: Given::default(),
    }
}

/// A registry keeping its drains in `dir` (what `--state-dir` does).
fn saving_registry(
    active: u64,
    dir: &std::path::Path,
) -> (Arc<FakeSource>, Arc<Tracker>, Arc<Drains>) {
    let source = Arc::new(FakeSource::default());
    // 8081 busy too: the drain only waiters join must still run when it is saved.
    source.set(vec![
        endpoint("127.0.0.1", 8080, active),
        endpoint("127.0.0.1", 8081, active),
    ]);
    let tracker = Arc::new(Tracker::new(source.clone(), 16));
    let drains = Arc::new(
        Drains::new(Arc::clone(&tracker), None, None, None, 4)
            .with_state_file(StateFile::open(dir).expect("state file")),
    );
    (source, tracker, drains)
}

/// An upgrade's overlap: the state file's writer (`old`, as at its start in
/// `take_over_state`: the next file's lock let go), and an agent started beside it that
/// restored from its file (`new`). Returns the old agent's tracker, `old` and `new`.
fn overlapping_registries(dir: &std::path::Path) -> (Arc<Tracker>, Arc<Drains>, Arc<Drains>) {
    let (_, old_tracker, old) = writing_registry(dir);
    let (_, _, new) = registry_beside(dir);
    (old_tracker, old, new)
}

/// The first half of [`overlapping_registries`]: the state file's writer, as at its start.
fn writing_registry(dir: &std::path::Path) -> (Arc<FakeSource>, Arc<Tracker>, Arc<Drains>) {
    let (source, tracker, drains) = saving_registry(2, dir);
    drains
        .state
        .as_ref()
        .expect("state file")
        .retire_next()
        .expect("nothing to retire");
    (source, tracker, drains)
}

/// The second half of [`overlapping_registries`]: an agent started beside the writer, having
/// restored from its file.
fn registry_beside(dir: &std::path::Path) -> (Arc<FakeSource>, Arc<Tracker>, Arc<Drains>) {
    let (source, tracker, drains) = saving_registry(2, dir);
    drains.restore();
    (source, tracker, drains)
}

/// The old agent's ids run ahead of the new one's (each agent counts its own), so that a
/// drain of each is told apart by id: one drain (of port 9090) posted and cancelled.
async fn spend_an_id(old: &Arc<Drains>) {
    let spent = DrainSpec {
        filter: Filter::port(9090),
        ..spec(Duration::from_secs(600))
    };
    old.post(spent, StartedBy::Node).await.expect("room");
    old.cancel(&Filter::port(9090)).await;
}

/// The old agent of an overlap stops (what it saved stays on disk) and goes, its lock with
/// it; returns once `new` has taken over as the state file's writer.
async fn old_agent_goes(old_tracker: &Tracker, old: Arc<Drains>, new: &Drains) {
    old_tracker.begin_shutdown();
    old.wait_all_ended(Duration::from_secs(5)).await;
    for _ in 0..500 {
        if Arc::strong_count(&old) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        Arc::strong_count(&old),
        1,
        "the old agent's drain task still runs"
    );
    drop(old);
    let state = Arc::clone(new.state.as_ref().expect("state file"));
    for _ in 0..500 {
        if state.is_writer() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(state.is_writer(), "the new agent took over");
}

/// A restart resumes the POSTed drains and held gates, not a drain only `/drained` waiters
/// started: the file has that one too (for the other agent of an upgrade's overlap to gate
/// its scope), marked, and its waiters went with the agent.
#[tokio::test]
async fn posted_drains_and_held_gates_are_restored_and_joined_ones_are_not() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, stopping, drains) = saving_registry(2, dir.path());
    let mut posted = spec(Duration::from_secs(600));
    posted.rule.ignore = vec!["10.0.0.0/8".parse().expect("cidr")];
    posted.given.ignore = true;
    let (record, _) = drains
        .post(posted.clone(), StartedBy::Node)
        .await
        .expect("room");
    let joined = DrainSpec {
        filter: Filter::port(8081),
        ..spec(Duration::from_secs(600))
    };
    let (membership, _) = drains
        .join(joined, StartedBy::Node, false)
        .await
        .expect("room");
    // A gate held after a drain of 9090 that ran its course.
    drains.finish(
        &Filter::port(9090),
        DrainRecord {
            result: Some(DrainEnd::Drained),
            port: 9090,
            ..record.clone()
        },
        read(&[7]),
    );
    drains.save().await;
    let on_disk = std::fs::read_to_string(dir.path().join(state_file::FILE_NAME)).expect("file");
    assert_eq!(
        on_disk.matches(r#""waiters_only":true"#).count(),
        1,
        "the waiters' drain is saved, marked: {on_disk}"
    );
    // The agent stops: its waiters are answered and gone, its drains end `agent_shutdown`
    // (nothing is written any more), and its lock goes with it.
    stopping.begin_shutdown();
    drop(membership);
    drains.wait_all_ended(Duration::from_secs(5)).await;
    for _ in 0..500 {
        if Arc::strong_count(&drains) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(Arc::strong_count(&drains), 1, "a drain task still runs");
    drop(drains);
    assert_eq!(
        std::fs::read_to_string(dir.path().join(state_file::FILE_NAME)).expect("file"),
        on_disk,
        "nothing written at the stop"
    );

    let (_, tracker, restored) = saving_registry(2, dir.path());
    assert!(restored.state.as_ref().expect("state file").is_writer());
    restored.restore();
    // The waiters' drain went with the agent that waited on it: the restart writes the file
    // without it at once. Before, it stayed until some later drain changed the file, and
    // the next upgrade's agent, beside this one, answered "draining" for its scope.
    {
        let (_, beside_tracker, beside) = registry_beside(dir.path());
        assert!(
            !beside.gated(&node(8081)).await,
            "beside the writer: a drain whose waiters are gone"
        );
        assert!(beside.gated(&node(8080)).await, "the POSTed drain");
        beside_tracker.begin_shutdown();
        beside.wait_all_ended(Duration::from_secs(5)).await;
    }
    let rewritten = std::fs::read_to_string(dir.path().join(state_file::FILE_NAME)).expect("file");
    assert!(
        !rewritten.contains(r#""waiters_only":true"#),
        "the gone waiters' drain is still saved: {rewritten}"
    );
    let (running, _) = restored.list();
    assert_eq!(running.len(), 1, "only the POSTed drain: {running:?}");
    assert_eq!((running[0].id, running[0].port), (record.id, 8080));
    assert_eq!(running[0].started_ms, record.started_ms);
    assert!(restored.gated(&node(8080)).await && restored.gated(&node(9090)).await);
    assert!(!restored.gated(&node(8081)).await);
    // Its settings came back: a request naming other ones conflicts.
    let mut other = spec(Duration::from_secs(600));
    other.given.ignore = true;
    assert!(matches!(
        restored.post(other, StartedBy::Node).await,
        Err(JoinError::Conflict(id, _)) if id == record.id
    ));
    assert!(
        matches!(restored.post(posted, StartedBy::Node).await, Ok((again, false)) if again.id == record.id)
    );
    // Stopping writes nothing: what is on disk resumes at the next start.
    tracker.begin_shutdown();
    restored.release(&Filter::port(9090));
    restored.save().await;
    let (_, _, again) = saving_registry(2, dir.path());
    again.restore();
    assert!(again.gated(&node(9090)).await);
    assert_eq!(again.list().0.len(), 1);
}

/// The agent beside the writer (an upgrade's overlap) stops with a drain only `/drained`
/// waiters started there in its `drains.next.json` (nothing is written at a stop), and no
/// take-over follows. The agent started beside the writer next takes that file over and
/// writes it without that drain at once: before, the entry stayed until its first save, and
/// the writer, reading the file, answered "draining" for the scope meanwhile.
#[tokio::test]
async fn a_gone_agents_waiters_drains_leave_the_next_file_it_left() {
    let dir = tempfile::tempdir().expect("dir");
    let next_file = dir.path().join(state_file::NEXT_FILE_NAME);
    let (_, _, writer) = writing_registry(dir.path());
    {
        let (_, tracker, first) = registry_beside(dir.path());
        let joined = DrainSpec {
            filter: Filter::port(8081),
            ..spec(Duration::from_secs(600))
        };
        let (membership, created) = first
            .join(joined, StartedBy::Node, false)
            .await
            .expect("room");
        assert!(created);
        let left = std::fs::read_to_string(&next_file).expect("next file");
        assert!(left.contains(r#""waiters_only":true"#), "{left}");
        tracker.begin_shutdown();
        drop(membership);
        first.wait_all_ended(Duration::from_secs(5)).await;
        for _ in 0..500 {
            if Arc::strong_count(&first) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(Arc::strong_count(&first), 1, "the drain's task still runs");
        assert_eq!(
            std::fs::read_to_string(&next_file).expect("next file"),
            left,
            "nothing written at the stop"
        );
    }
    let (_, _, second) = registry_beside(dir.path());
    assert_eq!(
        second.state.as_ref().expect("state file").role(),
        state_file::Role::Next
    );
    writer.catch_up().await;
    assert!(
        !writer.gated(&node(8081)).await,
        "the writer: a drain whose waiters are gone"
    );
    let rewritten = std::fs::read_to_string(&next_file).expect("next file");
    assert!(
        !rewritten.contains(r#""waiters_only":true"#),
        "the gone waiters' drain is still saved: {rewritten}"
    );
}

/// Audit (files and clients): a drain only `/drained` waiters started was answered before its
/// end was saved. The agent dying in between (`kill -9`, the OOM killer) left a file with the
/// drain still running, marked waiters-only, which the next start does not resume: the gate
/// the end holds was lost, and `/health` said 200 for a scope whose stop hook had just been
/// answered. Now such a drain's end is on disk before its waiters hear it.
#[tokio::test(start_paused = true)]
async fn a_waiters_drain_is_saved_ended_before_its_waiter_hears() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, _, drains) = saving_registry(2, dir.path());
    let (membership, _) = drains
        .join(spec(Duration::from_secs(1)), StartedBy::Node, false)
        .await
        .expect("room");
    let end = membership
        .outcome(|deadline| deadline + Duration::from_secs(5))
        .await
        .expect("an end");
    assert_eq!(end.result, DrainEnd::Timeout);
    // The agent dies as the answer leaves: the next start finds the file as it is now.
    let crashed = tempfile::tempdir().expect("dir");
    std::fs::copy(
        dir.path().join(state_file::FILE_NAME),
        crashed.path().join(state_file::FILE_NAME),
    )
    .expect("the state file");
    let (_, _, restarted) = saving_registry(2, crashed.path());
    restarted.restore();
    assert!(
        restarted.gated(&node(8080)).await,
        "the hook was answered, and the restart forgot the scope's gate: {}",
        std::fs::read_to_string(crashed.path().join(state_file::FILE_NAME)).expect("file")
    );
}

/// Audit (second look): a drain's end is set in its record while it is still among the
/// running ones (the end's listener read and journal line come first), and a save by any
/// other drain meanwhile wrote that record with its result. `continued` is new: the
/// previous release cannot read a file that has it (it fails closed on the whole file:
/// every scope gated, its POSTed drains not resumed at a rollback's take-over). A running
/// drain is saved with no result (no restore reads it: a resumed drain ends again).
#[tokio::test(start_paused = true)]
async fn a_running_drain_is_saved_without_the_end_it_is_reaching() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, _, drains) = saving_registry(2, dir.path());
    drains
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    {
        let running = lock(&drains.running);
        let drain = running.get(&Filter::port(8080)).expect("running");
        lock(&drain.record).result = Some(DrainEnd::Continued);
    }
    assert_eq!(drains.save().await, Saved::Yes);
    let on_disk = std::fs::read_to_string(dir.path().join(state_file::FILE_NAME)).expect("file");
    assert!(
        !on_disk.contains("continued") && !on_disk.contains(r#""result""#),
        "{on_disk}"
    );
}

/// What `/health?port=P` asks on the node (the node's namespace is 0 here).
fn node(port: u16) -> Asked {
    Asked {
        port,
        addr: None,
        netns: 0,
        whole_namespace: false,
    }
}

#[tokio::test(start_paused = true)]
async fn starting_is_idempotent_and_the_gate_follows_the_drain() {
    let (source, tracker, drains) = registry(2);
    assert!(!drains.gated(&node(8080)).await);
    let (first, created) = drains
        .post(spec(Duration::from_secs(60)), StartedBy::Node)
        .await
        .expect("room");
    assert!(created);
    let (again, created) = drains
        .post(spec(Duration::from_secs(60)), StartedBy::Node)
        .await
        .expect("room");
    assert!(!created);
    assert_eq!(first.id, again.id);
    assert_eq!(first.active_at_start, 2);
    assert!(drains.gated(&node(8080)).await && !drains.gated(&node(8081)).await);
    source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
    tracker.notify_port(8080);
    let record = drains
        .wait_ended(&Filter::port(8080), Duration::from_secs(5))
        .await
        .expect("record");
    assert_eq!(record.result, Some(DrainEnd::Drained));
    // Drained: the port stays out of rotation until a new instance listens (no kernel
    // here to ask) or it is released.
    assert!(drains.gated(&node(8080)).await);
    // DELETE /drain with no drain in progress: nothing cancelled, the gate released.
    assert!(drains.cancel(&Filter::port(8080)).await.is_none());
    assert!(!drains.gated(&node(8080)).await);
    let (running, ended) = drains.list();
    assert!(running.is_empty());
    assert_eq!(ended[0].id, first.id);
    assert_eq!(drains.stats().ended.get(&DrainEnd::Drained), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn cancel_and_timeout_are_recorded() {
    let (_, _, drains) = registry(1);
    let (started, _) = drains
        .post(spec(Duration::from_secs(3600)), StartedBy::Node)
        .await
        .expect("room");
    let record = drains.cancel(&Filter::port(8080)).await.expect("cancelled");
    assert_eq!(
        (record.id, record.result),
        (started.id, Some(DrainEnd::Cancelled))
    );
    assert!(!drains.gated(&node(8080)).await);
    assert!(drains.cancel(&Filter::port(8080)).await.is_none());
    drains
        .post(spec(Duration::from_secs(2)), StartedBy::Node)
        .await
        .expect("room");
    let record = drains
        .wait_ended(&Filter::port(8080), Duration::from_secs(10))
        .await
        .expect("record");
    assert_eq!(record.result, Some(DrainEnd::Timeout));
    assert_eq!(record.closed_by_agent, 0);
    assert_eq!(drains.list().1.len(), 2);
}

/// Issue 22: a `GET` whose client went away after 1 s left a 10-minute drain running,
/// gating the port for 10 minutes. Now the drain lives while one of its waiters waits.
#[tokio::test(start_paused = true)]
async fn a_drain_whose_only_waiter_left_ends_at_once_and_a_posted_one_does_not() {
    let (_, _, drains) = registry(1);
    let (first, created) = drains
        .join(spec(Duration::from_secs(600)), StartedBy::Node, false)
        .await
        .expect("room");
    assert!(created);
    let (second, _) = drains
        .join(spec(Duration::from_secs(600)), StartedBy::Node, false)
        .await
        .expect("room");
    assert_eq!(first.id(), second.id());
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(first);
    tokio::task::yield_now().await;
    assert!(drains.gated(&node(8080)).await, "one waiter is still there");
    drop(second);
    let record = drains
        .wait_ended(&Filter::port(8080), Duration::from_secs(1))
        .await;
    // Ended (or already gone from the running set) within a second.
    assert!(record.is_none_or(|record| record.result == Some(DrainEnd::Abandoned)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(drains.list().0.is_empty());
    assert_eq!(drains.list().1[0].result, Some(DrainEnd::Abandoned));
    assert!(
        !drains.gated(&node(8080)).await,
        "an abandoned drain holds no gate"
    );
    // A POST keeps it running whoever waits.
    let (waiter, _) = drains
        .join(spec(Duration::from_secs(600)), StartedBy::Node, false)
        .await
        .expect("room");
    drains
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    drop(waiter);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(drains.list().0.len(), 1);
}

/// Issue 22: a request with other settings silently joined a drain in progress (a
/// close request answered `on_timeout: keep`). Named settings that differ are refused.
#[tokio::test(start_paused = true)]
async fn a_request_whose_settings_differ_is_refused_naming_the_difference() {
    let (source, _, drains) = registry(1);
    drains
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    let close = DrainSpec {
        on_timeout: OnTimeout::Close,
        given: Given {
            on_timeout: true,
            ..Given::default()
        },
        ..spec(Duration::from_secs(3))
    };
    match drains.post(close.clone(), StartedBy::Node).await {
        Err(JoinError::Conflict(_, text)) => {
            assert!(text.contains("on_timeout=keep (asked close)"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        drains.join(close, StartedBy::Node, false).await,
        Err(JoinError::Conflict(..))
    ));
    // Settings not named take the drain's: the plain hook joins.
    assert!(
        drains
            .join(spec(Duration::from_secs(3)), StartedBy::Node, false)
            .await
            .is_ok()
    );
    let quiet = DrainSpec {
        rule: DrainRule {
            quiet: Duration::from_secs(5),
            ..DrainRule::default()
        },
        given: Given {
            quiet: true,
            ..Given::default()
        },
        ..spec(Duration::from_secs(30))
    };
    assert!(matches!(
        drains.post(quiet, StartedBy::Node).await,
        Err(JoinError::Conflict(..))
    ));
    // An ignore list is a set of sources: the drain's list in another order, or with a
    // source repeated, is the same list and joins (before: 409 "a different ignore list",
    // and `wait` exited 2); one source more or less is another list.
    let ignoring = |list: &str| DrainSpec {
        filter: Filter::port(8081),
        rule: DrainRule {
            ignore: crate::drain_rule::parse_cidrs(list).expect("cidrs"),
            ..DrainRule::default()
        },
        given: Given {
            ignore: true,
            ..Given::default()
        },
        ..spec(Duration::from_secs(600))
    };
    source.set(vec![
        endpoint("127.0.0.1", 8080, 1),
        endpoint("127.0.0.1", 8081, 1),
    ]);
    let (ignored, _) = drains
        .post(ignoring("10.0.0.0/8,fd00::7"), StartedBy::Node)
        .await
        .expect("room");
    for same in ["fd00::7,10.0.0.0/8", "10.0.0.0/8,fd00::7,10.0.0.0/8"] {
        match drains.join(ignoring(same), StartedBy::Node, false).await {
            Ok((membership, created)) => {
                assert_eq!((membership.id(), created), (ignored.id, false), "{same}");
            }
            Err(problem) => panic!("{same}: {problem:?}"),
        }
    }
    for other in ["10.0.0.0/8", "10.0.0.0/8,fd00::7,fd00::8"] {
        assert!(
            matches!(
                drains.join(ignoring(other), StartedBy::Node, false).await,
                Err(JoinError::Conflict(id, ref text)) if id == ignored.id && text == "a different ignore list"
            ),
            "{other}"
        );
    }
}

/// A `/drained` waiter whose caller controls the scope, asking with `timeout` and
/// nothing else named (a stop hook's `wait --timeout`).
fn plain_hook(timeout: Duration) -> waiter::Ask {
    waiter::Ask {
        spec: spec(timeout),
        control: Some(StartedBy::Node),
        peers: false,
        share: None,
        continues: false,
    }
}

/// A short connection to 8080 opened now (the load balancer still sending).
fn arrival_now(tracker: &Tracker) {
    tracker.publish(crate::tracker::ConnectionEvent {
        netns: 4_026_531_840,
        addr: "127.0.0.1".parse().expect("ip"),
        port: 8080,
        remote: "10.0.0.9".parse().expect("ip"),
        opened: true,
        crossing: false,
        at_ns: crate::tracker::monotonic_ns(),
    });
}

/// A POSTed drain of 8080 with a quiet window and `timeout`.
fn quiet_drain(quiet: Duration, timeout: Duration) -> DrainSpec {
    let mut posted = spec(timeout);
    posted.rule.quiet = quiet;
    posted.given.quiet = true;
    posted
}

/// Audit (joined waiters): a waiter that joined a drain in progress and named no `quiet`
/// was judged by its own default (quiet 0) once its own deadline came first: a stop hook's
/// `wait --timeout 1s` joining `POST /drain?quiet=2s` was answered 200 drained at its
/// deadline (count 0) while the drain ran on, its quiet window not met (an arrival at
/// 0.5 s). Settings it does not name are the drain's: 503, as for a hook naming quiet=2s.
#[tokio::test(start_paused = true)]
async fn a_joined_waiter_whose_deadline_comes_first_is_judged_by_the_drains_rule() {
    let (_, tracker, drains) = registry(0);
    let (posted, _) = drains
        .post(
            quiet_drain(Duration::from_secs(2), Duration::from_secs(600)),
            StartedBy::Node,
        )
        .await
        .expect("room");
    let hook = tokio::spawn({
        let drains = Arc::clone(&drains);
        async move { plain_hook(Duration::from_secs(1)).answer(&drains).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    arrival_now(&tracker);
    let answer = hook.await.expect("task").expect("answer");
    assert_eq!(answer.drain, Some(posted.id), "{answer:?}");
    assert!(
        !answer.outcome.drained,
        "answered drained by its own quiet=0 while the drain's window was not met: {answer:?}"
    );
    assert_eq!(answer.outcome.waited, Duration::from_secs(1));
    let (running, _) = drains.list();
    assert_eq!(running.len(), 1, "the drain runs on: {running:?}");
}

/// Audit (joined waiters): a joined waiter whose drain ended without draining (its timeout)
/// before the waiter's own deadline waits on as an observer, and did so by its own rule:
/// named no `quiet`, it was answered drained at the first zero, right as the drain ended
/// `timeout` for its quiet window. It waits by the drain's rule: no answer before the
/// window, counted from then, is over.
#[tokio::test(start_paused = true)]
async fn a_joined_waiter_outliving_its_undrained_drain_keeps_the_drains_rule() {
    let (_, tracker, drains) = registry(0);
    let (posted, _) = drains
        .post(
            quiet_drain(Duration::from_secs(2), Duration::from_secs(2)),
            StartedBy::Node,
        )
        .await
        .expect("room");
    let hook = tokio::spawn({
        let drains = Arc::clone(&drains);
        async move { plain_hook(Duration::from_secs(3)).answer(&drains).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    arrival_now(&tracker);
    let record = drains
        .wait_ended(&Filter::port(8080), Duration::from_secs(5))
        .await
        .expect("record");
    assert_eq!(
        (record.id, record.result),
        (posted.id, Some(DrainEnd::Timeout))
    );
    let answer = hook.await.expect("task").expect("answer");
    assert_eq!(answer.drain, Some(posted.id), "{answer:?}");
    // 1 s was left after the drain's end, less than its 2 s quiet window.
    assert!(
        !answer.outcome.drained,
        "answered drained by its own quiet=0 after the drain ended undrained: {answer:?}"
    );
    assert_eq!(answer.outcome.waited, Duration::from_secs(3));
}

/// Issue 22: a pod's drain of its own port flipped the node-wide `/health?port=P` and
/// agent-check for 5 minutes. A drain gates only what it covers.
#[tokio::test(start_paused = true)]
async fn one_scopes_drain_never_gates_another() {
    let (_, _, drains) = registry(1);
    let pod_a = Filter {
        port: 8080,
        addr: None,
        netns: Some(7),
    };
    let pod_b_addr: IpAddr = "10.1.0.8".parse().expect("ip");
    let pod_a_addr: IpAddr = "10.1.0.7".parse().expect("ip");
    drains
        .post(
            DrainSpec {
                filter: pod_a.clone(),
                ..spec(Duration::from_secs(600))
            },
            StartedBy::Node,
        )
        .await
        .expect("room");
    let a_inside = Asked {
        port: 8080,
        addr: None,
        netns: 7,
        whole_namespace: true,
    };
    let a_by_addr = Asked {
        port: 8080,
        addr: Some(pod_a_addr),
        netns: 7,
        whole_namespace: false,
    };
    let b_inside = Asked {
        netns: 8,
        ..a_inside
    };
    let b_by_addr = Asked {
        addr: Some(pod_b_addr),
        netns: 8,
        ..a_by_addr
    };
    assert!(drains.gated(&a_inside).await && drains.gated(&a_by_addr).await);
    assert!(!drains.gated(&node(8080)).await, "the node's port");
    assert!(
        !drains.gated(&b_inside).await && !drains.gated(&b_by_addr).await,
        "pod B"
    );
    // Pod A's hook on the node listener drains {addr, netns}: its own /health sees it.
    drains.cancel(&pod_a).await.expect("cancelled");
    drains
        .post(
            DrainSpec {
                filter: Filter {
                    addr: Some(pod_a_addr),
                    ..pod_a.clone()
                },
                ..spec(Duration::from_secs(600))
            },
            StartedBy::Node,
        )
        .await
        .expect("room");
    assert!(drains.gated(&a_inside).await && drains.gated(&a_by_addr).await);
    assert!(!drains.gated(&node(8080)).await && !drains.gated(&b_inside).await);
    // A node-wide drain covers every pod's port.
    drains
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert!(drains.gated(&node(8080)).await && drains.gated(&b_by_addr).await);
}

/// CI, under load: a forced close's record had no `peers_at_end` (the deadline's list took
/// over its 20 ms budget), so nobody could tell whom the close cut. The record names them.
#[tokio::test]
async fn a_forced_close_records_whom_it_cut_even_when_the_list_is_slow() {
    let (source, _, drains) = registry(1);
    let peer = crate::tracker::fake::peer("10.0.0.2:5000", "127.0.0.1:8080");
    // Slower than an answer's budget (20 ms), well within a report's.
    *source.listed.lock().expect("lock") = Some((Duration::from_millis(80), vec![peer.clone()]));
    let close = DrainSpec {
        on_timeout: OnTimeout::Close,
        ..spec(Duration::from_millis(100))
    };
    let (record, _) = drains.post(close, StartedBy::Node).await.expect("room");
    let started = std::time::Instant::now();
    let ended = loop {
        if let Some(ended) = drains
            .list()
            .1
            .into_iter()
            .find(|ended| ended.id == record.id)
        {
            break ended;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the drain did not end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(ended.result, Some(DrainEnd::ClosedAtDeadline), "{ended:?}");
    let cut: Vec<_> = ended.peers_at_end.iter().map(|cut| cut.remote).collect();
    assert_eq!(cut, vec![peer.remote], "{ended:?}");
}

/// An upgrade rolled back: the agent beside the writer kept a gate in `drains.next.json` and
/// has gone. The writer's agent-check (HAProxy) answers from it at once, as `/health` does:
/// before, it said "ready" until the writer's periodic check folded the file in.
#[tokio::test]
async fn the_agent_check_answers_from_what_a_gone_agent_beside_the_writer_kept() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, _, writer) = saving_registry(0, dir.path());
    // As at the writer's start (`take_over_state`): the lock of the next file let go.
    writer
        .state
        .as_ref()
        .expect("state file")
        .retire_next()
        .expect("nothing to retire");
    {
        let (_, _, beside) = saving_registry(0, dir.path());
        let (record, _) = beside
            .post(spec(Duration::from_secs(600)), StartedBy::Node)
            .await
            .expect("room");
        beside.finish(
            &Filter::port(9090),
            DrainRecord {
                result: Some(DrainEnd::Drained),
                port: 9090,
                ..record
            },
            read(&[7]),
        );
        beside.cancel(&Filter::port(8080)).await;
        beside.save().await;
        assert!(dir.path().join(state_file::NEXT_FILE_NAME).exists());
        // `beside` goes here, its locks with it, once its drain's task (which saves after
        // the end) has let go of it.
        for _ in 0..500 {
            if Arc::strong_count(&beside) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(Arc::strong_count(&beside), 1, "the drain's task still runs");
    }
    let gate: Arc<dyn PortGate> = Arc::new(Arc::clone(&writer));
    assert!(gate.draining(9090, None).await, "the gone agent's gate");
    assert!(!gate.draining(8080, None).await);
    assert!(!dir.path().join(state_file::NEXT_FILE_NAME).exists());
}

/// `DELETE /drain` while the drain is ending on its own (drained, its record being written
/// to the journal): the gate that end holds is released too. Before, the cancel released the
/// gate first and the drain's end held it right after: the scope stayed out of rotation for
/// `GATE_HOLD` (5 min), though the caller was answered 200.
#[tokio::test]
async fn a_cancel_racing_a_drains_own_end_still_puts_the_scope_back_in_rotation() {
    let dir = tempfile::tempdir().expect("dir");
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
    let tracker = Arc::new(Tracker::new(source, 16));
    let journal = Journal::open(&dir.path().join("drains.jsonl"), 1 << 20).expect("journal");
    let drains = Arc::new(Drains::new(tracker, None, Some(journal), None, 4));
    for round in 0..20 {
        drains
            .post(spec(Duration::from_secs(600)), StartedBy::Node)
            .await
            .expect("room");
        // The drain runs until it writes its record (nothing is open: drained at once).
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        drains.cancel(&Filter::port(8080)).await;
        assert!(
            !drains.gated(&node(8080)).await,
            "round {round}: out of rotation after DELETE"
        );
    }
}

/// A closer whose `listeners()` says it was entered, then blocks until released: it holds a
/// drain between its verdict and its end (the listeners are read after the verdict).
struct HeldCloser {
    entered: std::sync::mpsc::SyncSender<()>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
    /// When each `close` was called, and with how many targets.
    closes: Mutex<Vec<(std::time::Instant, usize)>>,
}

impl HeldCloser {
    fn new() -> (
        Arc<Self>,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::SyncSender<()>,
    ) {
        let (entered, entered_rx) = std::sync::mpsc::sync_channel(4);
        let (release_tx, release) = std::sync::mpsc::sync_channel(4);
        let closer = Arc::new(Self {
            entered,
            release: Mutex::new(release),
            closes: Mutex::default(),
        });
        (closer, entered_rx, release_tx)
    }
}

impl Closer for HeldCloser {
    fn close(&self, _filter: &Filter, targets: &[Peer]) -> anyhow::Result<u64> {
        lock(&self.closes).push((std::time::Instant::now(), targets.len()));
        Ok(targets.len() as u64)
    }

    fn listeners(&self, _filter: &Filter) -> anyhow::Result<Vec<u64>> {
        let _ = self.entered.send(());
        let _ = lock(&self.release).recv_timeout(Duration::from_secs(10));
        Ok(Vec::new())
    }

    fn unavailable(&self) -> Option<&str> {
        None
    }
}

/// Audit (drain lifecycle): a waiter that joined a drain between its "drained" verdict and
/// its end (while its listeners were read and its record written) got that verdict, though
/// a connection had opened before it asked. A request that arrives after the verdict waits
/// for that drain to end and then starts (or joins) a fresh one.
#[tokio::test]
async fn a_waiter_arriving_after_a_drains_verdict_does_not_get_it() {
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
    let tracker = Arc::new(Tracker::new(source.clone(), 16));
    let (closer, entered, release) = HeldCloser::new();
    let drains = Arc::new(Drains::new(
        Arc::clone(&tracker),
        Some(closer as Arc<dyn Closer>),
        None,
        None,
        4,
    ));
    let ask = |timeout| waiter::Ask {
        spec: spec(timeout),
        control: Some(StartedBy::Node),
        peers: false,
        share: None,
        continues: false,
    };
    let answer = |ask: waiter::Ask| {
        let drains = Arc::clone(&drains);
        tokio::spawn(async move { ask.answer(&drains).await })
    };
    let first = answer(ask(Duration::from_secs(5)));
    // A's drain decided "drained" (nothing open) and reads the listeners now.
    tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(10)))
        .await
        .expect("task")
        .expect("the drain never read the listeners");
    // A connection opens; B asks.
    source.set(vec![endpoint("127.0.0.1", 8080, 1)]);
    tracker.notify_port(8080);
    let second = answer(ask(Duration::from_millis(300)));
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    // A's end, and then B's drain's (a timeout holds the gate too: listeners read again).
    release.send(()).expect("release");
    release.send(()).expect("release");
    let first = first.await.expect("task").expect("answer");
    assert!(first.outcome.drained, "A's verdict: {first:?}");
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("B answered")
        .expect("task")
        .expect("answer");
    assert!(
        !second.outcome.drained,
        "B asked while a connection was open and got the old verdict: {second:?}"
    );
    assert_eq!(second.outcome.active, 1, "{second:?}");
    assert_ne!(second.drain, first.drain, "B joined the decided drain");
}

/// A one-shot hold for a fake's blocking call: the first call after [`OneHold::arm`] says
/// it was entered, then blocks until released; every other call passes.
#[derive(Default)]
struct OneHold(
    Mutex<
        Option<(
            std::sync::mpsc::SyncSender<()>,
            std::sync::mpsc::Receiver<()>,
        )>,
    >,
);

impl OneHold {
    /// Arms it: the receiver hears the held call enter, the sender releases it.
    fn arm(
        &self,
    ) -> (
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::SyncSender<()>,
    ) {
        let (entered, entered_rx) = std::sync::mpsc::sync_channel(1);
        let (release, release_rx) = std::sync::mpsc::sync_channel(1);
        *lock(&self.0) = Some((entered, release_rx));
        (entered_rx, release)
    }

    /// In the fake's call: blocks there if armed (once).
    fn pass(&self) {
        let held = lock(&self.0).take();
        if let Some((entered, release)) = held {
            let _ = entered.send(());
            let _ = release.recv_timeout(Duration::from_secs(10));
        }
    }
}

/// Waits (off the async workers) until a held call was entered.
async fn entered(entered: std::sync::mpsc::Receiver<()>) {
    tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(10)))
        .await
        .expect("task")
        .expect("the held call was never entered");
}

/// [`FakeNamespaces`] whose next look, once armed, blocks: a drain's check of its
/// namespace after its wait (a thread entering the namespace) taking its time.
#[derive(Default)]
struct HeldNamespaces {
    namespaces: FakeNamespaces,
    hold: OneHold,
}

impl namespace::Namespaces for HeldNamespaces {
    fn now(&self, inode: u32) -> namespace::NamespaceNow {
        self.hold.pass();
        self.namespaces.now(inode)
    }
}

/// Port 8080's sockets all uid 1000's; the next look, once armed, blocks: a local user's
/// drain's check of its port after its wait (a socket-table query) taking its time.
#[derive(Default)]
struct HeldOwners(OneHold);

impl owner::PortOwners for HeldOwners {
    fn owners(&self, _port: u16) -> anyhow::Result<Vec<u32>> {
        self.0.pass();
        Ok(vec![1000])
    }
}

/// A was answered drained; B, which asked while a connection was open, was not, and saw it.
fn a_got_drained_b_waited(first: &waiter::Answer, second: &waiter::Answer) {
    assert!(first.outcome.drained, "A's verdict: {first:?}");
    assert!(
        !second.outcome.drained,
        "B asked while a connection was open and got A's verdict: {second:?}"
    );
    assert_eq!(second.outcome.active, 1, "{second:?}");
}

/// Two `/drained` waiters of one scope: A's drain reaches "drained" (its count set to 0),
/// `arm`ed then (a hold: its entered, its release), holds the drain between the start of
/// its wait's last read and its end, a connection opens, and B asks meanwhile. Returns A's
/// and B's answers.
async fn a_late_waiter(
    source: &Arc<FakeSource>,
    drains: &Arc<Drains>,
    ask: impl Fn(Duration) -> waiter::Ask,
    active: impl Fn(u64) -> Vec<crate::tracker::Endpoint>,
    arm: impl FnOnce() -> (
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::SyncSender<()>,
    ),
) -> (waiter::Answer, waiter::Answer) {
    let answer = |ask: waiter::Ask| {
        let drains = Arc::clone(drains);
        tokio::spawn(async move { ask.answer(&drains).await })
    };
    let first = answer(ask(Duration::from_secs(5)));
    // A's drain waits (its start's looks done).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (held, release) = arm();
    source.set(active(0));
    drains.tracker.notify_port(8080);
    entered(held).await;
    // A connection opens; B asks.
    source.set(active(1));
    drains.tracker.notify_port(8080);
    let second = answer(ask(Duration::from_millis(300)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    release.send(()).expect("release");
    let first = first.await.expect("task").expect("answer");
    let second = tokio::time::timeout(Duration::from_secs(15), second)
        .await
        .expect("B answered")
        .expect("task")
        .expect("answer");
    (first, second)
}

/// Audit (drain lifecycle): a pod's drain, its wait over ("drained"), looks whether its
/// namespace is still the one it started in before it takes its verdict; a waiter of the
/// same pod and port that asked meanwhile joined it and was answered "drained", active 0,
/// with its connection open. A request arriving after the wait's verdict waits for that
/// drain to end and gets a drain of its own.
#[tokio::test]
async fn a_pods_waiter_arriving_while_its_drain_checks_the_namespace_does_not_get_the_verdict() {
    let namespaces = Arc::new(HeldNamespaces::default());
    lock(&namespaces.namespaces.0).insert(7, Some(100));
    let pod = |active| {
        vec![crate::tracker::Endpoint {
            netns: 7,
            ..endpoint("10.1.0.7", 8080, active)
        }]
    };
    let source = Arc::new(FakeSource::default());
    source.set(pod(1));
    let closer = Arc::new(ClosesCounted::default());
    lock(&closer.listeners.listening).insert(7, vec![1]);
    let drains = Arc::new(
        Drains::new(
            Arc::new(Tracker::new(source.clone(), 16)),
            Some(closer as Arc<dyn Closer>),
            None,
            None,
            4,
        )
        .with_namespaces(Arc::clone(&namespaces) as Arc<dyn namespace::Namespaces>),
    );
    let ask = |timeout| waiter::Ask {
        spec: DrainSpec {
            filter: Filter {
                netns: Some(7),
                ..Filter::port(8080)
            },
            ..spec(timeout)
        },
        control: Some(StartedBy::Pod),
        peers: false,
        share: None,
        continues: false,
    };
    let arm = || namespaces.hold.arm();
    let (first, second) = a_late_waiter(&source, &drains, ask, pod, arm).await;
    a_got_drained_b_waited(&first, &second);
    assert_ne!(second.drain, first.drain, "B joined the decided drain");
}

/// The same for a local user's drain, which looks whose its port's sockets are before it
/// takes its verdict.
#[tokio::test]
async fn a_local_users_waiter_arriving_while_its_drain_checks_the_port_does_not_get_the_verdict() {
    let owners = Arc::new(HeldOwners::default());
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, 1)]);
    let (closer, _entered, release_listeners) = HeldCloser::new();
    for _ in 0..4 {
        release_listeners.send(()).expect("release");
    }
    let drains = Arc::new(
        Drains::new(
            Arc::new(Tracker::new(source.clone(), 16)),
            Some(closer as Arc<dyn Closer>),
            None,
            None,
            4,
        )
        .with_port_owners(Arc::clone(&owners) as Arc<dyn owner::PortOwners>),
    );
    let ask = |timeout| waiter::Ask {
        control: Some(StartedBy::LocalUser { uid: 1000 }),
        ..plain_hook(timeout)
    };
    let node = |active| vec![endpoint("127.0.0.1", 8080, active)];
    let arm = || owners.0.arm();
    let (first, second) = a_late_waiter(&source, &drains, ask, node, arm).await;
    a_got_drained_b_waited(&first, &second);
    assert_ne!(second.drain, first.drain, "B joined the decided drain");
}

/// The verdict's last read itself: it took the count (0) and was still reading (its doubts)
/// when a connection opened and B asked, joining the drain before its wait returned. B
/// got "drained" with its connection open. A drained verdict goes only to the waiters that
/// asked before the reads it was judged by began; B waits on its own count.
#[tokio::test]
async fn a_waiter_arriving_during_the_verdicts_read_does_not_get_it() {
    let (source, _tracker, drains) = registry(1);
    // The next read (the one after the count is set to 0) holds once it took the count.
    let arm = || {
        let hold = OneHold::default();
        let armed = hold.arm();
        *lock(&source.after_next_read) = Some(Box::new(move |_: &FakeSource| hold.pass()));
        armed
    };
    let node = |active| vec![endpoint("127.0.0.1", 8080, active)];
    let (first, second) = a_late_waiter(&source, &drains, plain_hook, node, arm).await;
    a_got_drained_b_waited(&first, &second);
}

/// Audit (drain lifecycle): a restored `on_timeout=close` drain whose deadline passed while
/// no agent ran closed at once, before the seeding walk had counted the connections open
/// before the start. On fresh kernel state only tracked connections can be closed: it
/// closed none, recorded `closed_at_deadline`, and the connections stayed open. The close
/// at a deadline waits until the seeding has ended.
#[tokio::test]
async fn a_close_at_the_deadline_waits_for_the_seeding_walk() {
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, 1)]);
    *lock(&source.doubts) = vec![crate::doubt::Doubt::Seeding];
    let peer = crate::tracker::fake::peer("10.0.0.2:5000", "127.0.0.1:8080");
    *lock(&source.listed) = Some((Duration::ZERO, vec![peer]));
    let tracker = Arc::new(Tracker::new(source.clone(), 16));
    let (closer, _entered, release) = HeldCloser::new();
    // Its listeners() answers at once here.
    for _ in 0..4 {
        release.send(()).expect("release");
    }
    let drains = Arc::new(Drains::new(
        Arc::clone(&tracker),
        Some(Arc::clone(&closer) as Arc<dyn Closer>),
        None,
        None,
        4,
    ));
    let close = DrainSpec {
        on_timeout: OnTimeout::Close,
        ..spec(Duration::from_millis(50))
    };
    let (record, _) = drains.post(close, StartedBy::Node).await.expect("room");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        lock(&closer.closes).is_empty(),
        "closed before the seeding walk ended: {:?}",
        lock(&closer.closes)
    );
    assert_eq!(drains.list().0.len(), 1, "still in progress");
    let seeded_at = std::time::Instant::now();
    lock(&source.doubts).clear();
    tracker.walk_ended();
    let ended = drains
        .wait_ended(&Filter::port(8080), Duration::from_secs(5))
        .await
        .expect("record");
    assert_eq!(ended.id, record.id);
    assert_eq!(ended.result, Some(DrainEnd::ClosedAtDeadline), "{ended:?}");
    assert_eq!(ended.closed_by_agent, 1, "{ended:?}");
    let closes = lock(&closer.closes).clone();
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert!(closes[0].0 >= seeded_at, "closed before the seeding ended");
}

/// A drain of `port` inside namespace `netns` (a pod's) that stays in progress: its quiet
/// window outlasts the test.
fn pod_spec(netns: u32, port: u16) -> DrainSpec {
    DrainSpec {
        filter: Filter {
            port,
            addr: None,
            netns: Some(netns),
        },
        rule: DrainRule {
            quiet: Duration::from_secs(600),
            ..DrainRule::default()
        },
        ..spec(Duration::from_secs(600))
    }
}

/// Audit (shared caps): at most `--max-waiters` drains ran at once across every scope, so
/// pod 7 posting drains on many ports of its own got pod 8's `POST /drain` a 429 (and its
/// `/drained` an unrecorded wait: no gate, no close). Pod 7 now runs out of its own share.
#[tokio::test(start_paused = true)]
async fn one_pod_filling_its_drains_leaves_room_for_another_pod() {
    let source = Arc::new(FakeSource::default());
    let tracker = Arc::new(Tracker::new(source, 64));
    // The node allows 4 drains at once, one owner 2.
    let drains = Arc::new(Drains::new(tracker, None, None, None, 4).with_limits(2, 16));
    let mut accepted = 0;
    for port in 1..=16 {
        match drains.post(pod_spec(7, port), StartedBy::Node).await {
            Ok(_) => accepted += 1,
            Err(JoinError::Full | JoinError::OwnerFull(..)) => {}
            Err(other) => panic!("pod 7's drain of {port}: {other:?}"),
        }
    }
    let (record, created) = drains
        .post(pod_spec(8, 8080), StartedBy::Node)
        .await
        .expect("pod 8's drain refused after pod 7 filled its share");
    assert!(created && record.netns == Some(8));
    assert_eq!(accepted, 2, "pod 7 ran more than its share");
    // Refused naming its own limit, not the node's.
    assert!(matches!(
        drains.post(pod_spec(7, 100), StartedBy::Node).await,
        Err(JoinError::OwnerFull(Owner::Netns(7), 2))
    ));
    // The node's port-wide scopes have only the node's limit.
    drains
        .post(
            DrainSpec {
                filter: Filter::port(1),
                ..pod_spec(0, 1)
            },
            StartedBy::Node,
        )
        .await
        .expect("the node's drain");
    assert!(matches!(
        drains
            .post(
                DrainSpec {
                    filter: Filter::port(2),
                    ..pod_spec(0, 2)
                },
                StartedBy::Node
            )
            .await,
        Err(JoinError::Full)
    ));
    assert_eq!(drains.list().0.len(), 4);
    // A waiter past its owner's share waits unrecorded, and its answer says why.
    let ask = waiter::Ask {
        spec: DrainSpec {
            timeout: Duration::from_millis(50),
            ..pod_spec(7, 100)
        },
        control: Some(StartedBy::Node),
        peers: false,
        share: Some(Owner::Netns(7)),
        continues: false,
    };
    let answer = ask.answer(&drains).await.expect("answer");
    assert_eq!(
        (answer.drain, answer.unrecorded),
        (None, Some(waiter::Unrecorded::OwnerLimit))
    );
}

/// Audit (shared caps): at most `HELD_MAX` gates were held after drains, and at the limit
/// the one ending soonest went: pod 7 ending many short drains evicted pod 8's gate, and
/// `/health` for pod 8 said 200 while it stopped. At the limit a gate now goes from the
/// owner holding the most: pod 7 evicts its own.
#[tokio::test(start_paused = true)]
async fn one_pod_ending_many_drains_never_evicts_another_pods_gate() {
    let source = Arc::new(FakeSource::default());
    let tracker = Arc::new(Tracker::new(source, 64));
    let drains = Arc::new(Drains::new(tracker, None, None, None, 4).with_limits(2, 4));
    let ended = |netns: u32, port: u16| {
        let record = DrainRecord {
            id: u64::from(port),
            port,
            addr: None,
            netns: Some(netns),
            started_ms: 0,
            first_zero_after_ms: Some(0),
            ended_ms: Some(0),
            result: Some(DrainEnd::Drained),
            active_at_start: 0,
            late_arrivals: 0,
            peers_at_end: Vec::new(),
            closed_by_agent: 0,
            wait_ms: 0,
            on_timeout: OnTimeout::Keep,
            started_by: Some(StartedBy::Pod),
        };
        (pod_spec(netns, port).filter, record)
    };
    let pod = |netns: u32, port: u16| Asked {
        port,
        addr: None,
        netns,
        whole_namespace: true,
    };
    // Pod 8's drain ended first: its hold ends soonest.
    let (scope, record) = ended(8, 8080);
    drains.finish(&scope, record, read(&[]));
    for port in 1..=12 {
        tokio::time::advance(Duration::from_secs(1)).await;
        let (scope, record) = ended(7, port);
        drains.finish(&scope, record, read(&[]));
    }
    assert!(
        drains.gated(&pod(8, 8080)).await,
        "pod 7's drains evicted pod 8's gate"
    );
    // Pod 7 kept its newest gates, within the limit.
    assert!(drains.gated(&pod(7, 12)).await && !drains.gated(&pod(7, 1)).await);
    assert_eq!(lock(&drains.held).len(), 4);
    // The node's gate, held before pod 7 went on, stays too.
    drains.finish(
        &Filter::port(9090),
        DrainRecord {
            netns: None,
            ..ended(7, 9090).1
        },
        read(&[]),
    );
    for port in 13..=20 {
        tokio::time::advance(Duration::from_secs(1)).await;
        let (scope, record) = ended(7, port);
        drains.finish(&scope, record, read(&[]));
    }
    assert!(drains.gated(&node(9090)).await && drains.gated(&pod(8, 8080)).await);
    assert!(drains.gated(&pod(7, 20)).await);
}

/// A drain of `netns`'s `port` asked for its `addr`, ended with `result`: its scope and
/// record, as `finish` takes them.
fn ended_at(netns: u32, addr: &str, port: u16, result: DrainEnd) -> (Filter, DrainRecord) {
    let addr: IpAddr = addr.parse().expect("addr");
    let record = DrainRecord {
        id: u64::from(port),
        port,
        addr: Some(addr),
        netns: Some(netns),
        started_ms: 0,
        first_zero_after_ms: None,
        ended_ms: Some(0),
        result: Some(result),
        active_at_start: 0,
        late_arrivals: 0,
        peers_at_end: Vec::new(),
        closed_by_agent: 0,
        wait_ms: 0,
        on_timeout: OnTimeout::Keep,
        started_by: Some(StartedBy::Pod),
    };
    let scope = Filter {
        port,
        addr: Some(addr),
        netns: Some(netns),
    };
    (scope, record)
}

/// Audit (monitoring integrity): the metrics count ended drains by scope for at most
/// `SCOPES_MAX` scopes, and past it the oldest went, whoever's it was: pod 7 ending 300
/// instant drains on ports of its own pushed pod 8's `timeout` out of
/// `drain_agent_scope_drains_total` before a scrape, and `DrainAgentDrainsCutShort` never
/// fired. Past the limit a scope now goes from the owner counting the most: pod 7's own.
#[tokio::test]
async fn one_pod_ending_many_drains_never_pushes_another_pods_scope_out_of_the_metrics() {
    let (_, _, drains) = registry(0);
    let (scope, record) = ended_at(8, "10.0.0.8", 8080, DrainEnd::Timeout);
    drains.finish(&scope, record, read(&[]));
    // Strictly older than every scope of pod 7's.
    std::thread::sleep(Duration::from_millis(2));
    for port in 1..=300 {
        let (scope, record) = ended_at(7, "10.0.0.7", port, DrainEnd::Drained);
        drains.finish(&scope, record, read(&[]));
    }
    let stats = drains.stats();
    assert_eq!(stats.by_scope.len(), SCOPES_MAX);
    let counted = |port: u16, addr: &str, result: DrainEnd| {
        stats
            .by_scope
            .get(&(port, Some(addr.parse().expect("addr"))))
            .and_then(|ends| ends.ended.get(&result).copied())
    };
    assert_eq!(
        counted(8080, "10.0.0.8", DrainEnd::Timeout),
        Some(1),
        "pod 7's drains pushed pod 8's timeout out"
    );
    // Pod 7 keeps its newest.
    assert_eq!(counted(300, "10.0.0.7", DrainEnd::Drained), Some(1));
    assert_eq!(counted(1, "10.0.0.7", DrainEnd::Drained), None);
}

/// With `--metrics-labels port` a scope is a port, which every pod may drain in its own
/// namespace: pod 7 ending one drain on pod 8's port does not make that scope pod 7's to
/// push out. A scope two owners' drains ended in is the node's.
#[tokio::test]
async fn by_port_a_scope_two_pods_share_is_pushed_out_by_neither() {
    let source = Arc::new(FakeSource::default());
    let tracker = Arc::new(Tracker::new(source, 16));
    let drains = Arc::new(
        Drains::new(tracker, None, None, None, 4).with_metric_labels(MetricLabels {
            ports: None,
            labels: crate::metric_labels::ConnectionLabels::Port,
        }),
    );
    let (scope, record) = ended_at(8, "10.0.0.8", 8080, DrainEnd::Timeout);
    drains.finish(&scope, record, read(&[]));
    let (scope, record) = ended_at(7, "10.0.0.7", 8080, DrainEnd::Drained);
    drains.finish(&scope, record, read(&[]));
    std::thread::sleep(Duration::from_millis(2));
    for port in 1..=300 {
        let (scope, record) = ended_at(7, "10.0.0.7", port, DrainEnd::Drained);
        drains.finish(&scope, record, read(&[]));
    }
    let stats = drains.stats();
    assert_eq!(stats.by_scope.len(), SCOPES_MAX);
    let shared = stats
        .by_scope
        .get(&(8080, None))
        .expect("port 8080 is still counted");
    assert_eq!(shared.ended.get(&DrainEnd::Timeout), Some(&1));
    assert_eq!(shared.owner, Owner::Node);
    // No address in any scope.
    assert!(stats.by_scope.keys().all(|(_, addr)| addr.is_none()));
}

/// Audit (upgrade overlap): a drain POSTed to the old agent (saved in the state file) and a
/// `/drained` waiter's drain of the same scope started on the new agent meanwhile. At the
/// take-over the POSTed drain wins: its id, deadline, `on_timeout=close` and gate, and the
/// waiter already joined waits on it. Before, the take-over skipped every scope the new agent
/// had a drain of: the POSTed drain was gone, and the waiters' drain ended as they left
/// (`abandoned`, no gate), so nothing closed at the 10-minute deadline and the scope went
/// back in rotation.
#[tokio::test]
async fn a_posted_drain_taken_over_wins_over_a_waiters_drain_of_its_scope() {
    let dir = tempfile::tempdir().expect("dir");
    let (old_tracker, old, new) = overlapping_registries(dir.path());
    let take_over = tokio::spawn({
        let new = Arc::clone(&new);
        async move { new.take_over_state().await }
    });
    spend_an_id(&old).await;
    // After the new agent started: POSTed to the old one (10 minutes, close at the end).
    let posted = DrainSpec {
        on_timeout: OnTimeout::Close,
        given: Given {
            on_timeout: true,
            ..Given::default()
        },
        ..spec(Duration::from_secs(600))
    };
    let (record, _) = old.post(posted, StartedBy::Node).await.expect("room");
    assert_eq!(old.save().await, Saved::Yes);
    // A stop hook's `/drained?timeout=60s` reaches the new agent: a drain of its own.
    let (membership, created) = new
        .join(spec(Duration::from_secs(60)), StartedBy::Node, false)
        .await
        .expect("room");
    assert!(created, "the new agent started its own drain of the scope");
    assert_ne!(membership.id(), record.id);
    // The old agent stops (what it saved stays on disk) and goes, its lock with it.
    old_agent_goes(&old_tracker, old, &new).await;
    // Its save after the merge.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        membership.id(),
        record.id,
        "the waiter waits on the POSTed drain"
    );
    // The waiter leaves (its client went away, or it was answered).
    drop(membership);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (running, _) = new.list();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(
        (running[0].id, running[0].started_ms, running[0].on_timeout),
        (record.id, record.started_ms, OnTimeout::Close),
        "the drain of the scope is the POSTed one: {running:?}"
    );
    assert!(new.gated(&node(8080)).await);
    // And it is what the new agent keeps on disk.
    let on_disk = std::fs::read_to_string(dir.path().join(state_file::FILE_NAME)).expect("file");
    assert!(
        on_disk.contains(&format!("\"started_ms\":{}", record.started_ms)),
        "{on_disk}"
    );
    take_over.abort();
}

/// Audit (upgrade overlap): beside the agent writing the state file, `/health` and the
/// agent-check answer from what that file says too (read only): a drain POSTed to the writer
/// after this agent started gates its scope here, a cancel sent to the writer reopens it, a
/// cancel sent here holds here, and a file that cannot be read gates every scope. Before, this
/// agent answered "not draining" for the writer's drain.
#[tokio::test]
async fn beside_the_writer_the_gate_answers_from_the_writers_file_too() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, old, new) = overlapping_registries(dir.path());
    let gate: Arc<dyn PortGate> = Arc::new(Arc::clone(&new));
    assert!(!gate.draining(8080, None).await);
    old.post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert_eq!(old.save().await, Saved::Yes);
    assert!(
        gate.draining(8080, None).await,
        "the writer's drain, POSTed after this agent started"
    );
    assert!(!gate.draining(8081, None).await, "another scope");
    assert!(new.list().0.is_empty(), "nothing of it runs here");
    old.cancel(&Filter::port(8080)).await;
    assert_eq!(old.save().await, Saved::Yes);
    assert!(!gate.draining(8080, None).await, "cancelled on the writer");
    // A drain this agent restored and then cancelled stays cancelled here, though the
    // writer's file still has it (a cancel sent here during the overlap).
    old.post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert_eq!(old.save().await, Saved::Yes);
    let (_, _, third) = saving_registry(2, dir.path());
    third.restore();
    assert!(third.gated(&node(8080)).await);
    third.cancel(&Filter::port(8080)).await;
    assert!(
        !third.gated(&node(8080)).await,
        "the cancel sent here holds here"
    );
    // A file that cannot be read: no scope is vouched for.
    std::fs::write(dir.path().join(state_file::FILE_NAME), b"not json").expect("write");
    assert!(new.gated(&node(8081)).await, "an unreadable writer's file");
}

/// Whether `drains` answers `asked` "not draining" within 5 s (after `catch_up`, as a
/// question does): an ended drain's save follows its end.
async fn reopens_within_seconds(drains: &Arc<Drains>, asked: &Asked) -> bool {
    for _ in 0..500 {
        drains.catch_up().await;
        if !drains.gated(asked).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Audit (upgrade overlap): a drain only `/drained` waiters started (the README's preStop
/// `httpGet /drained?...`) was not in its agent's file, which kept POSTed drains only: the
/// other agent's gate answered "not draining" for the scope while its hook still waited,
/// both ways (the writer's `drains.json` read beside it, the `drains.next.json` of the agent
/// beside it read by the writer). Now its start and its end are saved, and the other agent
/// gates from it while it runs, without running it.
#[tokio::test]
async fn a_drain_only_waiters_started_gates_the_other_agent_while_it_runs() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, old, new) = overlapping_registries(dir.path());
    // A hook's `/drained` reaches the writer: no save asked for but the join's own.
    let (membership, created) = old
        .join(spec(Duration::from_secs(600)), StartedBy::Node, false)
        .await
        .expect("room");
    assert!(created);
    assert!(
        new.gated(&node(8080)).await,
        "beside the writer: the writer's waiters' drain"
    );
    assert!(!new.gated(&node(8081)).await, "another scope");
    assert!(new.list().0.is_empty(), "nothing of it runs here");
    // Its waiter leaves: it ends (abandoned, no hold), and so does the gate beside.
    drop(membership);
    assert!(
        reopens_within_seconds(&new, &node(8080)).await,
        "after its end"
    );

    // The other way round: a hook's `/drained` reaches the agent beside the writer.
    let beside = DrainSpec {
        filter: Filter::port(8081),
        ..spec(Duration::from_secs(600))
    };
    let (membership, created) = new
        .join(beside, StartedBy::Node, false)
        .await
        .expect("room");
    assert!(created);
    old.catch_up().await;
    assert!(
        old.gated(&node(8081)).await,
        "the writer: the waiters' drain of the agent beside it"
    );
    assert!(old.list().0.is_empty(), "nothing of it runs on the writer");
    drop(membership);
    assert!(
        reopens_within_seconds(&old, &node(8081)).await,
        "after its end"
    );
}

/// `scope`'s drain (port 8080 or 8081, all of its connections on 127.0.0.1) at that address.
fn at_loopback(port: u16) -> DrainSpec {
    DrainSpec {
        filter: Filter {
            addr: Some(std::net::Ipv4Addr::LOCALHOST.into()),
            ..Filter::port(port)
        },
        ..spec(Duration::from_secs(600))
    }
}

/// Whether [`Drains::other_agents_drains`] of `drains` comes to `wanted` within 5 s: an
/// ended drain's save follows its end.
async fn other_agents_drains_come_to(drains: &Drains, wanted: u64) -> bool {
    for _ in 0..500 {
        if drains.other_agents_drains() == wanted {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Audit (upgrade overlap, kured): at SIGTERM the old agent closes its listeners, `/metrics`
/// with them, while its hooks' drains run on for up to its `--shutdown-grace`; scrapes reach
/// only the new agent, whose `drain_in_progress` shows its own drains alone.
/// `DrainAgentDrainsInProgress` went silent and kured could reboot the node mid-drain. Now
/// each agent counts the drains the other agent's file says run (the writer's beside it;
/// the one beside it, for the writer), POSTed or waiters' alike, less those it runs itself
/// (a POSTed drain it restored), and at least 1 while that file cannot be read.
#[tokio::test]
async fn each_agent_of_an_overlap_counts_the_other_agents_drains() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, _, old) = writing_registry(dir.path());
    // Before the new agent starts: a POSTed drain it restores, and runs too.
    old.post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert_eq!(old.save().await, Saved::Yes);
    let (_, _, new) = registry_beside(dir.path());
    assert_eq!(new.list().0.len(), 1, "restored here");
    assert_eq!(new.other_agents_drains(), 0, "that one runs here too");
    assert_eq!(old.other_agents_drains(), 0);
    // After: one POSTed to the writer, one a hook's `/drained` started there.
    let posted = DrainSpec {
        filter: Filter::port(8081),
        ..spec(Duration::from_secs(600))
    };
    old.post(posted, StartedBy::Node).await.expect("room");
    assert_eq!(old.save().await, Saved::Yes);
    let (membership, created) = old
        .join(at_loopback(8080), StartedBy::Node, false)
        .await
        .expect("room");
    assert!(created);
    assert_eq!(
        new.other_agents_drains(),
        2,
        "the writer's drains that do not run here"
    );
    // The other way round: a drain POSTed to the agent beside the writer.
    new.post(at_loopback(8081), StartedBy::Node)
        .await
        .expect("room");
    assert_eq!(new.save().await, Saved::Yes);
    assert_eq!(old.other_agents_drains(), 1, "the writer counts it");
    // The writer's drains end: none left there that does not run here.
    old.cancel(&Filter::port(8081)).await;
    assert_eq!(old.save().await, Saved::Yes);
    drop(membership);
    assert!(
        other_agents_drains_come_to(&new, 0).await,
        "after the writer's drains ended: {}",
        new.other_agents_drains()
    );
    // A file that cannot be read: never a silent 0.
    std::fs::write(dir.path().join(state_file::FILE_NAME), b"not json").expect("write");
    assert!(
        new.other_agents_drains() >= 1,
        "an unreadable writer's file"
    );
    std::fs::write(dir.path().join(state_file::NEXT_FILE_NAME), b"not json").expect("write");
    assert!(old.other_agents_drains() >= 1, "an unreadable file beside");
}

/// Audit (overlap): during an upgrade's overlap every `DELETE /drain` noted the drain it
/// ended (so that the take-over does not bring it back), with no bound: a pod posting and
/// cancelling in a loop for the whole overlap (up to the old agent's `--shutdown-grace`, 10
/// minutes in the DaemonSet) grew the list in memory and in the next agent's file, written
/// at every save. Now each owner keeps at most `CANCELLED_PER_OWNER`: the looping pod
/// forgets its own oldest, never another pod's.
#[tokio::test]
async fn cancels_noted_during_an_overlap_are_bounded_per_owner() {
    use super::saved::CANCELLED_PER_OWNER;
    let dir = tempfile::tempdir().expect("dir");
    let (_, _old, new) = overlapping_registries(dir.path());
    let cycle = |netns: u32, port: u16| {
        let new = Arc::clone(&new);
        async move {
            new.post(pod_spec(netns, port), StartedBy::Node)
                .await
                .expect("room");
            new.cancel(&pod_spec(netns, port).filter).await;
            new.wait_all_ended(Duration::from_secs(5)).await;
        }
    };
    cycle(8, 8080).await;
    for round in 0..CANCELLED_PER_OWNER + 5 {
        cycle(7, 10_000 + u16::try_from(round).expect("port")).await;
    }
    let noted = new.noted_cancels();
    let of = |netns: u32| {
        noted
            .iter()
            .filter(|scope| scope.netns == Some(netns))
            .count()
    };
    assert_eq!(of(8), 1, "the other pod's cancel is kept");
    assert_eq!(of(7), CANCELLED_PER_OWNER, "{} noted", noted.len());
}

/// Audit (drain lifecycle): a `POST /drain` that came right after a `DELETE` of its scope,
/// before the cancelled drain's own task had seen the cancel, joined that drain and was
/// answered with it ("in progress"); the drain then ended as cancelled, and the scope was
/// neither draining nor gated: the POST was lost. A drain being cancelled is now never
/// joined: the POST waits for it to end and starts the scope's next drain.
#[tokio::test]
async fn a_post_right_after_a_cancel_starts_a_new_drain() {
    let (_, _, drains) = registry(2);
    let (first, _) = drains
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    // The DELETE runs up to its wait for the drain's end (polled once, on this task: the
    // drain's own task has not run since).
    let scope = Filter::port(8080);
    let cancel = drains.cancel(&scope);
    tokio::pin!(cancel);
    tokio::select! {
        biased;
        _ = &mut cancel => panic!("the cancel cannot end before the drain's task runs"),
        () = std::future::ready(()) => {}
    }
    let (second, created) = drains
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    let cancelled = cancel.await.expect("a drain was cancelled");
    assert_eq!(cancelled.id, first.id);
    assert!(
        created && second.id != first.id,
        "the POST joined the drain being cancelled: {second:?}"
    );
    assert!(
        drains.gated(&node(8080)).await,
        "the new drain holds the scope"
    );
}

/// Review of the take-over (9836c92): a waiters' drain gave way to a POSTed drain of its
/// scope whatever their settings, and its waiters then got the POSTed drain's verdict: a
/// waiter that asked for a 5 s quiet window was answered by a drain without one (drained at
/// the first zero, with the load balancer still sending). A POSTed drain takes the waiters
/// over only where they could have joined it (no setting they named differs, as for a
/// join); otherwise it has the scope and the waiters' drain ends on its own, by their rule.
#[tokio::test]
async fn a_posted_drain_of_other_settings_does_not_take_the_waiters_over() {
    let dir = tempfile::tempdir().expect("dir");
    let (old_tracker, old, new) = overlapping_registries(dir.path());
    let take_over = tokio::spawn({
        let new = Arc::clone(&new);
        async move { new.take_over_state().await }
    });
    spend_an_id(&old).await;
    // POSTed to the old agent, with no quiet window.
    let (record, _) = old
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert_eq!(old.save().await, Saved::Yes);
    // A stop hook asks the new agent for a 5 s quiet window.
    let mut quiet = spec(Duration::from_secs(60));
    quiet.rule.quiet = Duration::from_secs(5);
    quiet.given.quiet = true;
    let (membership, created) = new.join(quiet, StartedBy::Node, false).await.expect("room");
    assert!(created);
    let own = membership.id();
    old_agent_goes(&old_tracker, old, &new).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        membership.id(),
        own,
        "the waiter still waits by its own settings, not on the POSTed drain {}",
        record.id
    );
    // The POSTed drain has the scope (its gate, its record).
    let (running, _) = new.list();
    assert!(
        running.iter().any(|drain| drain.id == record.id),
        "{running:?}"
    );
    assert!(new.gated(&node(8080)).await);
    drop(membership);
    take_over.abort();
}

/// Audit (agent stop): once the grace of a stop ended (`Tracker::begin_shutdown`), every
/// drain in progress ends `agent_shutdown` (kept on disk, to resume at the next start) and
/// left the registry, and `agent_shutdown` holds no gate: the agent-check, which answers
/// until the process exits, said `ready` for the scope mid-drain and HAProxy put the server
/// back in rotation for the last seconds of every restart. Now such a scope stays out of
/// rotation until the process exits.
#[tokio::test(start_paused = true)]
async fn a_drain_the_agents_stop_ended_keeps_its_scope_out_of_rotation() {
    let (_, tracker, drains) = registry(2);
    drains
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert!(drains.gated(&node(8080)).await);
    tracker.begin_shutdown();
    let record = drains
        .wait_ended(&Filter::port(8080), Duration::from_secs(5))
        .await
        .expect("record");
    assert_eq!(record.result, Some(DrainEnd::AgentShutdown));
    assert!(drains.list().0.is_empty(), "no drain in progress any more");
    assert!(
        drains.gated(&node(8080)).await,
        "a drain the stop interrupted: still out of rotation"
    );
    let gate: Arc<dyn PortGate> = Arc::new(Arc::clone(&drains));
    assert!(gate.draining(8080, None).await, "the agent-check's answer");
    assert!(!drains.gated(&node(8081)).await, "another scope");
}

/// Audit (upgrade overlap): the writer (the old agent) answered `/health` and the
/// agent-check from its own drains only, and a drain POSTed to the agent started beside it
/// (kept in that agent's `drains.next.json`) was "not draining" there: with checks spread
/// over both agents on the node's address, HAProxy flapped. Now the writer gates from that
/// file too (read only): a drain there, a gate held there, and a file that cannot be read.
#[tokio::test]
async fn the_writer_gates_from_what_the_agent_beside_it_keeps() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, old, new) = overlapping_registries(dir.path());
    let gate: Arc<dyn PortGate> = Arc::new(Arc::clone(&old));
    assert!(!gate.draining(8080, None).await);
    let (record, _) = new
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert_eq!(new.save().await, Saved::Yes);
    assert!(dir.path().join(state_file::NEXT_FILE_NAME).exists());
    assert!(
        gate.draining(8080, None).await,
        "the drain POSTed to the agent beside the writer"
    );
    old.catch_up().await;
    assert!(old.gated(&node(8080)).await, "what /health answers");
    assert!(!gate.draining(8081, None).await, "another scope");
    assert!(old.list().0.is_empty(), "nothing of it runs on the writer");
    new.cancel(&Filter::port(8080)).await;
    assert_eq!(new.save().await, Saved::Yes);
    assert!(
        !gate.draining(8080, None).await,
        "cancelled where it was POSTed"
    );
    // A gate the agent beside holds after its drain of 9090 ran its course.
    new.finish(
        &Filter::port(9090),
        DrainRecord {
            result: Some(DrainEnd::Drained),
            port: 9090,
            ..record
        },
        read(&[7]),
    );
    assert_eq!(new.save().await, Saved::Yes);
    assert!(gate.draining(9090, None).await, "the gate held beside");
    // A file that cannot be read: no scope is vouched for.
    std::fs::write(dir.path().join(state_file::NEXT_FILE_NAME), b"not json").expect("write");
    assert!(gate.draining(8081, None).await, "an unreadable file beside");
}

/// Audit (take-over): a drain the new agent restored at its start and that then ended here
/// (drained) was launched again at the take-over, from the old agent's last file (which
/// still had it: an agent stopping writes nothing): it gated the scope again and counted,
/// or closed at its deadline, the connections of the service's new instance. The merge
/// now skips what was restored at start and ended here, as it skips what was cancelled.
#[tokio::test]
async fn a_restored_drain_that_ended_here_is_not_started_again_at_the_take_over() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, old_tracker, old) = writing_registry(dir.path());
    let (record, _) = old
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert_eq!(old.save().await, Saved::Yes);
    let (new_source, _, new) = registry_beside(dir.path());
    assert_eq!(new.list().0.len(), 1, "restored at start");
    let take_over = tokio::spawn({
        let new = Arc::clone(&new);
        async move { new.take_over_state().await }
    });
    // The restored copy drains here (the old instance's connections have gone) ...
    new_source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
    for _ in 0..500 {
        if new.list().0.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (running, ended) = new.list();
    assert!(running.is_empty(), "{running:?}");
    assert_eq!(
        (ended[0].id, ended[0].result),
        (record.id, Some(DrainEnd::Drained))
    );
    // ... and the service's new instance has connections of its own.
    new_source.set(vec![endpoint("127.0.0.1", 8080, 2)]);
    // The old agent stops with the drain still in its file, and goes.
    old_agent_goes(&old_tracker, old, &new).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (running, _) = new.list();
    assert!(
        running.is_empty(),
        "the drain that ended here runs again: {running:?}"
    );
    take_over.abort();
}

/// A state file as a later release writes it (a version this one cannot read), with a drain
/// in progress (`on_timeout=close`) and a held gate.
const NEWER_STATE: &str = r#"{"version":2,"state":{"drains":[{"record":{"id":7,"port":8080,"started_ms":1,"active_at_start":2,"late_arrivals":0,"closed_by_agent":0,"wait_ms":0,"on_timeout":"close"},"deadline_ms":99999999999999}],"held":[{"port":9090,"listeners":[1],"until_ms":99999999999999}],"gates_v2":[]}}"#;

/// The files in `dir` holding exactly `content`.
fn files_holding(dir: &std::path::Path, content: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|entry| {
            let path = entry.expect("entry").path();
            (std::fs::read(&path).ok()? == content.as_bytes())
                .then(|| path.file_name()?.to_str().map(str::to_owned))
                .flatten()
        })
        .collect()
}

/// Audit (rollback): a later release's state file (a newer version) was overwritten at the
/// take-over of the release rolled back to: it could not read it, restored nothing, and its
/// first save replaced it — every drain in progress (`on_timeout=close` included) and every
/// held gate gone, the scopes back in rotation. Now the file is set aside, never
/// overwritten, and every scope is answered "draining" until anything in it could still
/// gate.
#[tokio::test]
async fn a_newer_versions_state_file_is_set_aside_at_the_take_over_and_every_scope_gated() {
    let dir = tempfile::tempdir().expect("dir");
    let (old_tracker, old, new) = overlapping_registries(dir.path());
    let take_over = tokio::spawn({
        let new = Arc::clone(&new);
        async move { new.take_over_state().await }
    });
    // The old agent is the later release: its last state is a version 2 file.
    std::fs::write(dir.path().join(state_file::FILE_NAME), NEWER_STATE).expect("write");
    assert!(
        new.gated(&node(8081)).await,
        "beside it, an unreadable file gates"
    );
    old_agent_goes(&old_tracker, old, &new).await;
    // Its save after the take-over.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(new.save().await, Saved::Yes);
    let kept = files_holding(dir.path(), NEWER_STATE);
    assert_eq!(kept.len(), 1, "the newer file is gone or overwritten");
    assert_ne!(kept[0], state_file::FILE_NAME, "set aside, not in the way");
    assert!(
        new.gated(&node(8080)).await
            && new.gated(&node(9090)).await
            && new.gated(&node(8081)).await,
        "every scope is draining while the newer file could still gate"
    );
    take_over.abort();
}

/// Audit (rollback, restart): a newer version's `drains.json` found at the start of the
/// writer was ignored, then overwritten by the first save. It is set aside and every scope
/// gated.
#[tokio::test]
async fn a_newer_versions_file_found_at_start_is_set_aside_and_gates() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join(state_file::FILE_NAME), NEWER_STATE).expect("write");
    let (_, _, writer) = saving_registry(2, dir.path());
    writer.restore();
    let take_over = tokio::spawn({
        let writer = Arc::clone(&writer);
        async move { writer.take_over_state().await }
    });
    writer
        .post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert_eq!(writer.save().await, Saved::Yes);
    assert_eq!(files_holding(dir.path(), NEWER_STATE).len(), 1, "at start");
    assert!(writer.gated(&node(8081)).await, "at start: every scope");
    take_over.abort();
}

/// The same for a newer version's `drains.next.json` that a gone agent left: the writer's
/// fold-in deleted it unread.
#[tokio::test]
async fn a_newer_versions_next_file_is_set_aside_at_the_fold_in_and_gates() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, _, writer) = writing_registry(dir.path());
    let next = r#"{"version":2,"state":{"drains":[],"held":[{"port":9191,"listeners":[],"until_ms":99999999999999}]}}"#;
    std::fs::write(dir.path().join(state_file::NEXT_FILE_NAME), next).expect("write");
    writer.catch_up().await;
    assert_eq!(
        files_holding(dir.path(), next).len(),
        1,
        "the gone agent's newer file is deleted unread"
    );
    assert!(writer.gated(&node(9191)).await && writer.gated(&node(8081)).await);
}

/// Who started a drain (`started_by`, what `/drains` shows a local user by) is kept where
/// the record is: in the state file (a restored drain is still its starter's) and in the
/// journal (an ended one too). A record written before the field existed still loads, as
/// one whose starter is unknown, and the field is left out when unknown: the state file's
/// version stays, and an older agent reading a newer file ignores a field it does not know.
#[tokio::test]
async fn who_started_a_drain_survives_a_restart_and_old_records_still_load() {
    let dir = tempfile::tempdir().expect("dir");
    let user = StartedBy::LocalUser { uid: 1000 };
    let (_, _, drains) = saving_registry(2, dir.path());
    let (record, _) = drains
        .post(spec(Duration::from_secs(600)), user)
        .await
        .expect("room");
    assert_eq!(record.started_by, Some(user));
    drains.save().await;
    let (_, _, restored) = saving_registry(2, dir.path());
    restored.restore();
    let (running, _) = restored.list();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].started_by, Some(user), "{running:?}");

    let line = serde_json::to_value(&record).expect("json");
    assert_eq!(
        line["started_by"],
        serde_json::json!({"kind": "local_user", "uid": 1000})
    );
    let mut old = line.clone();
    old.as_object_mut().expect("object").remove("started_by");
    let old: DrainRecord = serde_json::from_value(old).expect("an older agent's record");
    assert_eq!(old.started_by, None);
    assert!(
        serde_json::to_value(&old)
            .expect("json")
            .get("started_by")
            .is_none()
    );
    let journal_path = dir.path().join("drains.jsonl");
    let journal = Journal::open(&journal_path, 1 << 20).expect("journal");
    journal.append(&record).expect("append");
    let back = Journal::open(&journal_path, 1 << 20)
        .expect("journal")
        .read_records::<DrainRecord>(HISTORY);
    assert_eq!(back, [record]);
}

/// Whose port 8080's sockets are, as the test sets it (a service restarting: another user
/// binds the port, then root's service has it again).
struct SwitchingOwners(Mutex<Vec<u32>>);

impl owner::PortOwners for SwitchingOwners {
    fn owners(&self, port: u16) -> anyhow::Result<Vec<u32>> {
        Ok(if port == 8080 {
            lock(&self.0).clone()
        } else {
            Vec::new()
        })
    }
}

/// A registry with a closer that records its closes, a client left on 8080 (listed at
/// the deadline), and whose 8080 is as `owners` says.
fn closing_registry(
    owners: &Arc<SwitchingOwners>,
) -> (Arc<FakeSource>, Arc<HeldCloser>, Arc<Drains>) {
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, 1)]);
    let peer = crate::tracker::fake::peer("10.0.0.2:5000", "127.0.0.1:8080");
    *lock(&source.listed) = Some((Duration::ZERO, vec![peer]));
    let tracker = Arc::new(Tracker::new(source.clone(), 16));
    let (closer, _entered, release) = HeldCloser::new();
    // Its listeners() answers at once here.
    for _ in 0..4 {
        release.send(()).expect("release");
    }
    let drains = Arc::new(
        Drains::new(
            tracker,
            Some(Arc::clone(&closer) as Arc<dyn Closer>),
            None,
            None,
            4,
        )
        .with_port_owners(Arc::clone(owners) as Arc<dyn owner::PortOwners>),
    );
    (source, closer, drains)
}

/// A local user's port ownership was checked only when its drain started: uid 1000 bound
/// 8080 while root's service restarted, POSTed `on_timeout=close` and went; root's
/// service came back, and at the deadline the drain closed root's connections (and held
/// root's port out of rotation after). Before it acts at its end, a local user's drain
/// checks again that the port's sockets are all its own; if not, it closes nothing,
/// holds no gate, and its record says `not_owned`. While they stay its own, it closes.
#[tokio::test]
async fn a_local_users_drain_closes_nothing_once_its_port_is_another_users() {
    let user = StartedBy::LocalUser { uid: 1000 };
    let close = DrainSpec {
        on_timeout: OnTimeout::Close,
        ..spec(Duration::from_millis(200))
    };
    for taken in [true, false] {
        let owners = Arc::new(SwitchingOwners(Mutex::new(vec![1000])));
        let (_source, closer, drains) = closing_registry(&owners);
        drains.post(close.clone(), user).await.expect("room");
        if taken {
            // uid 1000's service is gone; root's is back on the port.
            *lock(&owners.0) = vec![0, 0];
        }
        let ended = drains
            .wait_ended(&Filter::port(8080), Duration::from_secs(10))
            .await
            .expect("record");
        let closes = lock(&closer.closes).clone();
        if taken {
            assert!(closes.is_empty(), "closed root's connections: {closes:?}");
            assert_eq!(ended.result, Some(DrainEnd::NotOwned), "{ended:?}");
            assert_eq!(ended.closed_by_agent, 0, "{ended:?}");
            assert!(ended.peers_at_end.is_empty(), "root's clients: {ended:?}");
            assert!(
                !drains.gated(&node(8080)).await,
                "root's port held out of rotation"
            );
        } else {
            assert_eq!(closes.len(), 1, "its own connection: {closes:?}");
            assert_eq!(ended.result, Some(DrainEnd::ClosedAtDeadline), "{ended:?}");
        }
    }
}

/// The same drain gated root's port until its deadline (`/health` 503 for its whole
/// timeout, 10 minutes in the report): a local user's drain in progress checks every
/// [`run::OWNER_RECHECK`] whether another user's sockets are on its port, and ends `not_owned`
/// (no gate held) when they are.
#[tokio::test(start_paused = true)]
async fn a_local_users_drain_ends_when_another_user_takes_its_port() {
    let owners = Arc::new(SwitchingOwners(Mutex::new(vec![1000])));
    let (_source, closer, drains) = closing_registry(&owners);
    let close = DrainSpec {
        on_timeout: OnTimeout::Close,
        ..spec(Duration::from_secs(600))
    };
    drains
        .post(close, StartedBy::LocalUser { uid: 1000 })
        .await
        .expect("room");
    tokio::time::sleep(run::OWNER_RECHECK * 2).await;
    assert!(
        drains.gated(&node(8080)).await,
        "its own port, out of rotation"
    );
    *lock(&owners.0) = vec![0, 1000];
    let ended = drains
        .wait_ended(&Filter::port(8080), run::OWNER_RECHECK * 2)
        .await
        .expect("record");
    assert_eq!(ended.result, Some(DrainEnd::NotOwned), "{ended:?}");
    assert!(
        !drains.gated(&node(8080)).await,
        "root's port out of rotation"
    );
    assert!(lock(&closer.closes).is_empty());
}

/// A local user's drain that drained keeps its gate when its service has gone from the
/// port (what a stop hook drains for), and holds none when another user's sockets are on it.
#[tokio::test]
async fn a_local_users_drained_drain_holds_its_gate_only_while_no_other_user_is_on_its_port() {
    for (owners_now, gated) in [(vec![], true), (vec![1000], true), (vec![0], false)] {
        let owners = Arc::new(SwitchingOwners(Mutex::new(owners_now.clone())));
        let (source, _closer, drains) = closing_registry(&owners);
        source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
        drains
            .post(
                spec(Duration::from_secs(60)),
                StartedBy::LocalUser { uid: 1000 },
            )
            .await
            .expect("room");
        let ended = drains
            .wait_ended(&Filter::port(8080), Duration::from_secs(10))
            .await
            .expect("record");
        let result = if gated {
            DrainEnd::Drained
        } else {
            DrainEnd::NotOwned
        };
        assert_eq!(ended.result, Some(result), "{owners_now:?}: {ended:?}");
        assert_eq!(drains.gated(&node(8080)).await, gated, "{owners_now:?}");
    }
}

/// A closer whose `listeners()` fails the first time (a netlink read failing at a drain's
/// end), then sees the one listener that was there all along (cookie 1): the application's
/// own, still running.
#[derive(Default)]
struct FlakyListeners {
    reads: std::sync::atomic::AtomicUsize,
}

impl Closer for FlakyListeners {
    fn close(&self, _filter: &Filter, targets: &[Peer]) -> anyhow::Result<u64> {
        Ok(targets.len() as u64)
    }

    fn listeners(&self, _filter: &Filter) -> anyhow::Result<Vec<u64>> {
        if self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            anyhow::bail!("the socket tables cannot be read now");
        }
        Ok(vec![1])
    }

    fn unavailable(&self) -> Option<&str> {
        None
    }
}

/// Audit (held gates, fail open): when the listeners could not be read at a drain's end,
/// the gate was held with none, and the next read took the application's own listener,
/// still running, for a new instance: the port was back in rotation at the first question.
/// A failed read at the end never reopens: a listener is new only against a set read.
#[tokio::test(start_paused = true)]
async fn a_failed_listener_read_at_a_drains_end_never_reopens_its_gate() {
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
    let tracker = Arc::new(Tracker::new(source, 16));
    let closer = Arc::new(FlakyListeners::default());
    let drains = Arc::new(Drains::new(
        tracker,
        Some(Arc::clone(&closer) as Arc<dyn Closer>),
        None,
        None,
        4,
    ));
    drains
        .post(spec(Duration::from_secs(60)), StartedBy::Node)
        .await
        .expect("room");
    let record = drains
        .wait_ended(&Filter::port(8080), Duration::from_secs(5))
        .await
        .expect("record");
    assert_eq!(record.result, Some(DrainEnd::Drained));
    for question in 0..3 {
        assert!(
            drains.gated(&node(8080)).await,
            "question {question}: the application's own listener reopened the gate"
        );
    }
    assert!(
        closer.reads.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the gate never looked at the listeners"
    );
}

/// The same across a restart: a gate held with its listeners unread is kept so
/// (`"listeners":null`), and the next agent does not take the application's listener for a
/// new instance either.
#[tokio::test(start_paused = true)]
async fn a_gate_held_with_its_listeners_unread_stays_so_across_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let registry = |closer: FlakyListeners| {
        let source = Arc::new(FakeSource::default());
        source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
        Arc::new(
            Drains::new(
                Arc::new(Tracker::new(source, 16)),
                Some(Arc::new(closer) as Arc<dyn Closer>),
                None,
                None,
                4,
            )
            .with_state_file(StateFile::open(dir.path()).expect("state file")),
        )
    };
    let drains = registry(FlakyListeners::default());
    drains
        .post(spec(Duration::from_secs(60)), StartedBy::Node)
        .await
        .expect("room");
    drains
        .wait_ended(&Filter::port(8080), Duration::from_secs(5))
        .await
        .expect("record");
    drains.save().await;
    let saved = std::fs::read_to_string(dir.path().join("drains.json")).expect("state file");
    assert!(saved.contains(r#""listeners":null"#), "{saved}");
    drop(drains);

    // The next agent's reads all succeed, and see the application's listener.
    let again = registry(FlakyListeners {
        reads: std::sync::atomic::AtomicUsize::new(1),
    });
    again.restore();
    for question in 0..3 {
        assert!(
            again.gated(&node(8080)).await,
            "question {question}: the application's own listener reopened the restored gate"
        );
    }
}

/// Listening sockets by namespace, as a test sets them; asked without a namespace, every
/// namespace's (what the kernel side answered for a scope of an address alone, and what an
/// agent before the address's namespace was told answers for it). Ignores `filter.addr`.
#[derive(Default)]
struct ListenersByNetns {
    listening: Mutex<HashMap<u32, Vec<u64>>>,
    /// Namespaces gone: asked about one, the read fails with [`NamespaceGone`].
    gone: Mutex<Vec<u32>>,
    /// How many of the next reads fail (a netlink read failing).
    failing: std::sync::atomic::AtomicUsize,
}

impl Closer for ListenersByNetns {
    fn close(&self, _filter: &Filter, targets: &[Peer]) -> anyhow::Result<u64> {
        Ok(targets.len() as u64)
    }

    fn listeners(&self, filter: &Filter) -> anyhow::Result<Vec<u64>> {
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .failing
            .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
            .is_ok()
        {
            anyhow::bail!("the socket tables cannot be read now");
        }
        if let Some(netns) = filter.netns
            && lock(&self.gone).contains(&netns)
        {
            return Err(anyhow::Error::new(crate::closer::NamespaceGone(netns))
                .context("cannot enter the namespace"));
        }
        let by_netns = lock(&self.listening);
        Ok(match filter.netns {
            Some(netns) => by_netns.get(&netns).cloned().unwrap_or_default(),
            None => by_netns.values().flatten().copied().collect(),
        })
    }

    fn unavailable(&self) -> Option<&str> {
        None
    }
}

/// Namespaces' addresses as a test sets them (the node is namespace 1).
#[derive(Default)]
struct SetAddresses(Mutex<std::collections::BTreeMap<u32, Vec<std::net::IpAddr>>>);

impl crate::sys::pod_addresses::AddressSource for SetAddresses {
    fn read(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<u32, crate::sys::pod_addresses::Namespace>> {
        Ok(lock(&self.0)
            .iter()
            .map(|(&inode, addresses)| (inode, addresses.clone().into()))
            .collect())
    }
}

/// Audit (held gates): a root drain scoped `addr=<pod A's IP>` held its gate after it ended
/// until a listener appeared on the port in any namespace: pod B's put A back in rotation.
/// Only listeners in the namespace holding A's address count; while the address names no
/// one namespace for sure, none does.
#[tokio::test(start_paused = true)]
async fn only_the_listeners_of_a_scopes_address_reopen_its_gate() {
    let a: std::net::IpAddr = "10.1.0.7".parse().expect("ip");
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("10.1.0.7", 8080, 0)]);
    let addresses = Arc::new(SetAddresses::default());
    lock(&addresses.0).insert(7, vec![a]);
    lock(&addresses.0).insert(8, vec!["10.1.0.8".parse().expect("ip")]);
    let pods = Arc::new(crate::sys::pod_addresses::PodAddresses::new(
        1,
        Arc::clone(&addresses) as Arc<dyn crate::sys::pod_addresses::AddressSource>,
    ));
    let closer = Arc::new(ListenersByNetns::default());
    lock(&closer.listening).insert(7, vec![1]);
    let drains = Arc::new(Drains::new(
        Arc::new(Tracker::new(source, 16)),
        Some(Arc::clone(&closer) as Arc<dyn Closer>),
        None,
        Some(pods),
        4,
    ));
    let scope = Filter {
        addr: Some(a),
        ..Filter::port(8080)
    };
    // `/health?port=8080&addr=10.1.0.7` from the node.
    let health_gated = |drains: Arc<Drains>| async move {
        let question = drains.resolve(8080, Some(a), None).await;
        drains.gated_any(&question).await
    };
    drain_to_the_end(&drains, &scope).await;
    assert!(health_gated(Arc::clone(&drains)).await);
    // Pod B (namespace 8) listens on 8080: not A's.
    lock(&closer.listening).insert(8, vec![2]);
    // A question takes a listener read of the last `LISTENERS_FRESH`: ask after it.
    tokio::time::advance(crate::drain::LISTENERS_FRESH).await;
    assert!(
        health_gated(Arc::clone(&drains)).await,
        "pod B's listener put pod A back in rotation"
    );
    // A new instance in A: back in rotation.
    lock(&closer.listening).insert(7, vec![1, 3]);
    tokio::time::advance(crate::drain::LISTENERS_FRESH).await;
    assert!(!health_gated(Arc::clone(&drains)).await);

    // Drained again; then namespace 8 takes A's address too: it names no one namespace, and
    // no listener can be told to be A's.
    drain_to_the_end(&drains, &scope).await;
    lock(&addresses.0).insert(8, vec!["10.1.0.8".parse().expect("ip"), a]);
    tokio::time::advance(crate::sys::pod_addresses::HIT_REFRESH).await;
    lock(&closer.listening).insert(7, vec![1, 3, 4]);
    lock(&closer.listening).insert(8, vec![2, 5]);
    assert!(
        health_gated(Arc::clone(&drains)).await,
        "a listener reopened the gate of an address two namespaces hold"
    );
}

/// The saved hold of `dir`'s state file (its one held gate): its `listeners`, as written.
fn saved_listeners(dir: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("drains.json")).expect("state file");
    let saved: serde_json::Value = serde_json::from_str(&text).expect("json");
    let held = saved["state"]["held"].as_array().expect("held gates");
    assert_eq!(held.len(), 1, "{text}");
    held[0]["listeners"].clone()
}

/// A registry on `dir` with `closer` and, when given, the pods' addresses.
fn gate_registry(
    dir: &std::path::Path,
    closer: &Arc<ListenersByNetns>,
    addresses: Option<&Arc<SetAddresses>>,
) -> Arc<Drains> {
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("10.1.0.7", 8080, 0)]);
    let pods = addresses.map(|addresses| {
        Arc::new(crate::sys::pod_addresses::PodAddresses::new(
            1,
            Arc::clone(addresses) as Arc<dyn crate::sys::pod_addresses::AddressSource>,
        ))
    });
    Arc::new(
        Drains::new(
            Arc::new(Tracker::new(source, 16)),
            Some(Arc::clone(closer) as Arc<dyn Closer>),
            None,
            pods,
            4,
        )
        .with_state_file(StateFile::open(dir).expect("state file")),
    )
}

/// Posts a drain of `scope` and waits for it to end drained.
async fn drain_to_the_end(drains: &Arc<Drains>, scope: &Filter) {
    drains
        .post(
            DrainSpec {
                filter: scope.clone(),
                ..spec(Duration::from_secs(60))
            },
            StartedBy::Node,
        )
        .await
        .expect("room");
    let record = drains
        .wait_ended(scope, Duration::from_secs(5))
        .await
        .expect("record");
    assert_eq!(record.result, Some(DrainEnd::Drained));
}

/// Pod A (namespace 7, 10.1.0.7) listening with cookie 1 and pod B (namespace 8) with
/// cookie 2, both on 8080.
fn two_pods_listening() -> (std::net::IpAddr, Arc<SetAddresses>, Arc<ListenersByNetns>) {
    let a: std::net::IpAddr = "10.1.0.7".parse().expect("ip");
    let addresses = Arc::new(SetAddresses::default());
    lock(&addresses.0).insert(7, vec![a]);
    lock(&addresses.0).insert(8, vec!["10.1.0.8".parse().expect("ip")]);
    let closer = Arc::new(ListenersByNetns::default());
    lock(&closer.listening).insert(7, vec![1]);
    lock(&closer.listening).insert(8, vec![2]);
    (a, addresses, closer)
}

/// Audit (state-file compatibility): the saved listeners of a held `addr=<pod IP>` scope
/// were narrowed to the pod's own, but an agent of an earlier release (a rollback, or the
/// writer of an upgrade's overlap reading `drains.next.json`) compares them with every
/// namespace's listeners on the port: pod B's, running all along, looked new and put pod A
/// back in rotation there. What is saved is every listener on the port in the namespaces
/// the scope names (here all), as before; the narrowed check still holds with it.
#[tokio::test(start_paused = true)]
async fn a_held_addr_gate_saves_every_namespaces_listeners_as_an_older_agent_reads_them() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, addresses, closer) = two_pods_listening();
    let scope = Filter {
        addr: Some(a),
        ..Filter::port(8080)
    };
    let drains = gate_registry(dir.path(), &closer, Some(&addresses));
    drain_to_the_end(&drains, &scope).await;
    drains.save().await;
    let mut saved: Vec<u64> = serde_json::from_value(saved_listeners(dir.path()))
        .expect("listeners an older agent can read");
    saved.sort_unstable();
    assert_eq!(saved, [1, 2], "pod B's listener is not in the saved hold");
    // This agent still reopens only for a new listener of A's.
    let question = drains.resolve(8080, Some(a), None).await;
    assert!(drains.gated_any(&question).await);
    drop(drains);

    // An agent of an earlier release restoring it: no address map, every namespace's
    // listeners on the port for the scope.
    let older = gate_registry(dir.path(), &closer, None);
    older.restore();
    let asked = Asked {
        port: 8080,
        addr: Some(a),
        netns: 7,
        whole_namespace: false,
    };
    assert!(
        older.gated(&asked).await,
        "pod B's listener, there all along, reopened the restored gate"
    );
    lock(&closer.listening).insert(7, vec![1, 3]);
    // A question takes a listener read of the last `LISTENERS_FRESH`: ask after it.
    tokio::time::advance(crate::drain::LISTENERS_FRESH).await;
    assert!(
        !older.gated(&asked).await,
        "a new instance did not reopen it"
    );
}

/// Audit (state-file compatibility): an `addr=` drain ending after its pod gave up the
/// address (it names no one namespace for `FORMER_KEPT`) was saved `"listeners":null`,
/// which an agent of an earlier release cannot read: it failed closed for every scope of
/// the node. Its listeners are read as every namespace's, which needs no address.
#[tokio::test(start_paused = true)]
async fn an_addr_drain_ending_after_its_pod_gave_up_the_address_saves_its_listeners() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, addresses, closer) = two_pods_listening();
    let scope = Filter {
        addr: Some(a),
        ..Filter::port(8080)
    };
    let drains = gate_registry(dir.path(), &closer, Some(&addresses));
    // The address was read as A's, then A gives it up.
    assert!(
        !drains
            .gated_any(&drains.resolve(8080, Some(a), None).await)
            .await
    );
    lock(&addresses.0).insert(7, Vec::new());
    tokio::time::advance(crate::sys::pod_addresses::HIT_REFRESH).await;
    drain_to_the_end(&drains, &scope).await;
    drains.save().await;
    let listeners = saved_listeners(dir.path());
    assert!(!listeners.is_null(), "saved \"listeners\":null");
    let mut saved: Vec<u64> = serde_json::from_value(listeners).expect("listeners");
    saved.sort_unstable();
    assert_eq!(saved, [1, 2]);
    assert!(
        drains
            .gated_any(&drains.resolve(8080, Some(a), None).await)
            .await
    );
}

/// Audit (state-file compatibility): a pod's drain (its namespace) ending after the pod's
/// namespace was gone was saved `"listeners":null`. Nothing listens in a gone namespace: an
/// empty set is saved, and the gate stays held (its namespace's listeners cannot be read).
#[tokio::test(start_paused = true)]
async fn a_pods_drain_ending_after_its_namespace_went_saves_no_listeners() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, _, closer) = two_pods_listening();
    lock(&closer.gone).push(7);
    let scope = Filter {
        netns: Some(7),
        ..Filter::port(8080)
    };
    let drains = gate_registry(dir.path(), &closer, None);
    drain_to_the_end(&drains, &scope).await;
    drains.save().await;
    assert_eq!(saved_listeners(dir.path()), serde_json::json!([]));
    let asked = Asked {
        port: 8080,
        addr: None,
        netns: 7,
        whole_namespace: true,
    };
    assert!(drains.gated(&asked).await);
}

/// A failed read at an `addr=` drain's end (`"listeners":null`): the first read that
/// succeeds is taken for the end's, and it is what the end would have read — every
/// namespace's listeners on the port — so the file saved after it reads for an agent of an
/// earlier release as the end's would have (pod B's listener in it, not new).
#[tokio::test(start_paused = true)]
async fn listeners_learned_after_a_failed_read_at_the_end_are_saved_as_the_ends() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, addresses, closer) = two_pods_listening();
    closer.failing.store(1, std::sync::atomic::Ordering::SeqCst);
    let scope = Filter {
        addr: Some(a),
        ..Filter::port(8080)
    };
    let drains = gate_registry(dir.path(), &closer, Some(&addresses));
    drain_to_the_end(&drains, &scope).await;
    let question = drains.resolve(8080, Some(a), None).await;
    assert!(drains.gated_any(&question).await, "the first read after it");
    drains.save().await;
    let mut saved: Vec<u64> = serde_json::from_value(saved_listeners(dir.path()))
        .expect("listeners an older agent can read");
    saved.sort_unstable();
    assert_eq!(saved, [1, 2], "pod B's listener is not in the saved hold");
    assert!(drains.gated_any(&question).await);
    lock(&closer.listening).insert(7, vec![1, 3]);
    // A question takes a listener read of the last `LISTENERS_FRESH`: ask after it.
    tokio::time::advance(crate::drain::LISTENERS_FRESH).await;
    assert!(
        !drains.gated_any(&question).await,
        "a new instance did not reopen it"
    );
}

/// A question about a held gate takes a listener read of the last `LISTENERS_FRESH` (shared
/// by the questions, `listener_reads.rs`), but only one that started after the hold was
/// made: a read from before a drain's end may hold a listener gone at that end, which
/// would look new to the hold and put the scope back in rotation at once.
#[tokio::test(start_paused = true)]
async fn a_listener_read_from_before_a_drains_end_never_reopens_its_gate() {
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
    let closer = Arc::new(ListenersByNetns::default());
    lock(&closer.listening).insert(1, vec![1]);
    let drains = Arc::new(Drains::new(
        Arc::new(Tracker::new(source, 16)),
        Some(Arc::clone(&closer) as Arc<dyn Closer>),
        None,
        None,
        4,
    ));
    let scope = Filter::port(8080);
    drain_to_the_end(&drains, &scope).await;
    // A new instance listens (cookie 2): back in rotation, by a read kept for a while.
    lock(&closer.listening).insert(1, vec![2]);
    tokio::time::advance(crate::drain::LISTENERS_FRESH).await;
    assert!(!drains.gated(&node(8080)).await, "the new instance");
    // It is stopped in turn: it stops listening, and its drain ends.
    lock(&closer.listening).insert(1, Vec::new());
    drain_to_the_end(&drains, &scope).await;
    assert!(
        drains.gated(&node(8080)).await,
        "a read from before the drain's end (listener 2 in it) reopened its gate"
    );
}

/// Found by an audit: a drain's start read its scope's count (for a pod's scope, a pass over
/// the whole endpoint map) under the registry's lock, on an async worker: the health hooks
/// (`gated`, which take that lock) waited for the read. The count is read first, on a
/// blocking thread, and the lock is taken after it.
#[tokio::test]
async fn a_drains_start_reads_its_count_outside_the_registrys_lock() {
    let (source, _tracker, drains) = registry(0);
    source.set(vec![crate::tracker::Endpoint {
        netns: 7,
        ..endpoint("127.0.0.1", 8080, 2)
    }]);
    *source.read_takes.lock().expect("lock") = Duration::from_millis(300);
    let posting = {
        let drains = Arc::clone(&drains);
        tokio::spawn(async move {
            drains
                .post(pod_spec(7, 8080), StartedBy::Node)
                .await
                .map(|(record, _)| record.active_at_start)
                .map_err(|problem| format!("{problem:?}"))
        })
    };
    // A health hook on a thread of its own, asked while the count is being read.
    let hook = {
        let (drains, source) = (Arc::clone(&drains), Arc::clone(&source));
        let runtime = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            while source
                .reads_running
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            let asked = std::time::Instant::now();
            (runtime.block_on(drains.gated(&node(9090))), asked.elapsed())
        })
    };
    let (gated, took) = tokio::task::spawn_blocking(move || hook.join().expect("hook"))
        .await
        .expect("join");
    assert!(!gated);
    assert!(
        took < Duration::from_millis(100),
        "a health hook waited {took:?} for a drain's start"
    );
    assert_eq!(
        posting.await.expect("join"),
        Ok(2),
        "the count at the start"
    );
}

/// Network namespaces as a test sets them: each inode's cookie (`None`: a kernel without
/// cookies); an inode not there is gone. `.1` counts the looks.
#[derive(Default)]
struct FakeNamespaces(
    Mutex<HashMap<u32, Option<u64>>>,
    std::sync::atomic::AtomicUsize,
);

impl namespace::Namespaces for FakeNamespaces {
    fn now(&self, inode: u32) -> namespace::NamespaceNow {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match lock(&self.0).get(&inode) {
            Some(cookie) => namespace::NamespaceNow::Is(*cookie),
            None => namespace::NamespaceNow::Gone,
        }
    }
}

/// Pod X's namespace 7 (cookie 100) with one client on 8080 (listed at the deadline), its
/// listener cookie 1; a closer that records its closes; drains kept in `dir`.
fn pod_registry(
    dir: &std::path::Path,
    namespaces: &Arc<FakeNamespaces>,
) -> (
    Arc<ListenersByNetns>,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<Drains>,
) {
    let source = Arc::new(FakeSource::default());
    source.set(vec![crate::tracker::Endpoint {
        netns: 7,
        ..endpoint("10.1.0.7", 8080, 1)
    }]);
    let peer = crate::tracker::fake::peer("10.0.0.2:5000", "10.1.0.7:8080");
    *lock(&source.listed) = Some((Duration::ZERO, vec![peer]));
    let closer = Arc::new(ClosesCounted::default());
    lock(&closer.listeners.listening).insert(7, vec![1]);
    let drains = Arc::new(
        Drains::new(
            Arc::new(Tracker::new(source, 16)),
            Some(Arc::clone(&closer) as Arc<dyn Closer>),
            None,
            None,
            4,
        )
        .with_state_file(StateFile::open(dir).expect("state file"))
        .with_namespaces(Arc::clone(namespaces) as Arc<dyn namespace::Namespaces>),
    );
    let closer_listeners = Arc::clone(&closer.listeners);
    (closer_listeners, Arc::clone(&closer.closed), drains)
}

/// [`ListenersByNetns`] counting the connections it is asked to close.
#[derive(Default)]
struct ClosesCounted {
    listeners: Arc<ListenersByNetns>,
    closed: Arc<std::sync::atomic::AtomicU64>,
}

impl Closer for ClosesCounted {
    fn close(&self, _filter: &Filter, targets: &[Peer]) -> anyhow::Result<u64> {
        let count = targets.len() as u64;
        self.closed
            .fetch_add(count, std::sync::atomic::Ordering::SeqCst);
        Ok(count)
    }

    fn listeners(&self, filter: &Filter) -> anyhow::Result<Vec<u64>> {
        self.listeners.listeners(filter)
    }

    fn unavailable(&self) -> Option<&str> {
        None
    }
}

fn pod_x_close_spec() -> DrainSpec {
    DrainSpec {
        filter: Filter {
            netns: Some(7),
            ..Filter::port(8080)
        },
        on_timeout: OnTimeout::Close,
        ..spec(Duration::from_secs(600))
    }
}

/// What pod Y, in namespace 7 now, asks about itself.
fn pod_y_asks() -> Asked {
    Asked {
        port: 8080,
        addr: None,
        netns: 7,
        whole_namespace: true,
    }
}

/// Audit (security, inode reuse): pod X's `on_timeout=close` drain of namespace 7 was saved,
/// the agent restarted while X was deleted, and pod Y got inode 7. The drain was resumed
/// from `drains.json` as X's and, past its deadline, reset Y's connections, kept Y out of
/// rotation and held the gate with Y's own listener taken for "there at the end". Restored
/// now, a drain whose namespace has another cookie ends drained at once: nothing closed,
/// Y's listener reopens the gate, and Y's own drain starts (no 409).
#[tokio::test]
async fn a_pods_drain_restored_after_its_namespace_was_replaced_ends_and_closes_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let namespaces = Arc::new(FakeNamespaces::default());
    lock(&namespaces.0).insert(7, Some(100));
    let (_, _, x_agent) = pod_registry(dir.path(), &namespaces);
    let (record, _) = x_agent
        .post(pod_x_close_spec(), StartedBy::Pod)
        .await
        .expect("room");
    x_agent.save().await;
    // The agent stops (what is on disk stays) and lets go of the state file.
    x_agent.tracker.begin_shutdown();
    x_agent.wait_all_ended(Duration::from_secs(5)).await;
    drop(x_agent);
    let path = dir.path().join("drains.json");
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("state file")).expect("json");
    let drain = &mut saved["state"]["drains"][0];
    assert_eq!(drain["netns_cookie"], serde_json::json!(100), "{drain}");
    // Past its deadline while the agent was down.
    drain["deadline_ms"] = serde_json::json!(unix_ms() - 1000);
    std::fs::write(&path, saved.to_string()).expect("write");

    // X is gone; Y has inode 7 (another cookie), listening with cookie 9.
    lock(&namespaces.0).insert(7, Some(200));
    let (listeners, closed, restarted) = pod_registry(dir.path(), &namespaces);
    lock(&listeners.listening).insert(7, vec![9]);
    restarted.restore();
    let ended = restarted
        .wait_ended(&pod_x_close_spec().filter, Duration::from_secs(5))
        .await
        .expect("X's drain ended");
    assert_eq!(ended.id, record.id);
    assert_eq!(ended.result, Some(DrainEnd::Drained), "{ended:?}");
    assert_eq!(ended.closed_by_agent, 0, "{ended:?}");
    assert_eq!(closed.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(
        !restarted.gated(&pod_y_asks()).await,
        "Y kept out of rotation"
    );
    let (_, created) = restarted
        .post(pod_x_close_spec(), StartedBy::Pod)
        .await
        .expect("Y's own drain");
    assert!(created);
}

/// Audit (security, inode reuse): pod X's drain of namespace 7 kept running after X was
/// deleted (its count stayed above 0: a missed close), and pod Y, given inode 7, was
/// counted in it, gated by it, and would have been reset at X's deadline. A running drain
/// whose namespace has another cookie ends drained within a second, closes nothing, and
/// keeps none of Y's listeners as its end's. One whose namespace the scan does not find
/// runs on: the scan proves nothing freed (a namespace alive where it cannot look, with
/// its connections, would be a false "drained").
#[tokio::test]
async fn a_running_pods_drain_ends_when_its_namespace_is_replaced() {
    let dir = tempfile::tempdir().expect("dir");
    let namespaces = Arc::new(FakeNamespaces::default());
    lock(&namespaces.0).insert(7, Some(100));
    let (listeners, closed, drains) = pod_registry(dir.path(), &namespaces);
    let (record, _) = drains
        .post(pod_x_close_spec(), StartedBy::Pod)
        .await
        .expect("room");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(drains.list().0.len(), 1, "X's drain in progress");
    lock(&namespaces.0).insert(7, Some(200));
    lock(&listeners.listening).insert(7, vec![9]);
    let ended = drains
        .wait_ended(&pod_x_close_spec().filter, Duration::from_secs(5))
        .await
        .expect("X's drain ended");
    assert_eq!(ended.id, record.id);
    assert_eq!(ended.result, Some(DrainEnd::Drained), "{ended:?}");
    assert_eq!(closed.load(std::sync::atomic::Ordering::SeqCst), 0);
    drains.save().await;
    assert_eq!(saved_listeners(dir.path()), serde_json::json!([]));
    assert!(!drains.gated(&pod_y_asks()).await, "Y kept out of rotation");

    // Not found rather than replaced: runs on.
    drains
        .post(pod_x_close_spec(), StartedBy::Pod)
        .await
        .expect("room");
    lock(&namespaces.0).remove(&7);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        drains.list().0.len(),
        1,
        "a drain ended on a scan's miss (its namespace may be alive where the scan cannot look)"
    );
}

/// Where the kernel has no cookies, a drain of a namespace that still exists runs on (an
/// inode reused cannot be told: SECURITY.md), and the state file holds no cookie.
#[tokio::test]
async fn without_cookies_a_pods_drain_runs_while_its_namespace_exists() {
    let dir = tempfile::tempdir().expect("dir");
    let namespaces = Arc::new(FakeNamespaces::default());
    lock(&namespaces.0).insert(7, None);
    let (_, _, drains) = pod_registry(dir.path(), &namespaces);
    drains
        .post(pod_x_close_spec(), StartedBy::Pod)
        .await
        .expect("room");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(drains.list().0.len(), 1, "still in progress");
    drains.save().await;
    let text = std::fs::read_to_string(dir.path().join("drains.json")).expect("state file");
    assert!(!text.contains("netns_cookie"), "{text}");
}

/// A pod's drain an older agent saved (no `netns_cookie`) resumes and runs on, as before,
/// whatever its inode is now: whose it is cannot be told without the cookie at its start,
/// and a scan's miss proves nothing freed.
#[tokio::test]
async fn an_older_agents_saved_pod_drain_resumes_as_before() {
    let dir = tempfile::tempdir().expect("dir");
    let namespaces = Arc::new(FakeNamespaces::default());
    lock(&namespaces.0).insert(7, Some(100));
    let (_, _, old) = pod_registry(dir.path(), &namespaces);
    old.post(pod_x_close_spec(), StartedBy::Pod)
        .await
        .expect("room");
    old.save().await;
    old.tracker.begin_shutdown();
    old.wait_all_ended(Duration::from_secs(5)).await;
    drop(old);
    let path = dir.path().join("drains.json");
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("state file")).expect("json");
    saved["state"]["drains"][0]
        .as_object_mut()
        .expect("drain")
        .remove("netns_cookie")
        .expect("a cookie saved");
    std::fs::write(&path, saved.to_string()).expect("write");

    lock(&namespaces.0).insert(7, Some(200));
    let (_, closed, restarted) = pod_registry(dir.path(), &namespaces);
    restarted.restore();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(restarted.list().0.len(), 1, "resumed, and running");
    lock(&namespaces.0).remove(&7);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(restarted.list().0.len(), 1, "still running, not found");
    assert_eq!(closed.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Audit (wasted work): a drain of a namespace whose cookie was not known at its start (a
/// kernel before 5.14, a namespace that could not be read then) can never be found
/// replaced, yet it looked at its namespace every second (a thread entering it, and a
/// `/proc` scan whenever the inode was not found) for as long as it ran: up to
/// `--max-waiters` drains for up to `--max-timeout`. It looks once, at its start.
#[tokio::test]
async fn a_pods_drain_without_a_cookie_does_not_look_at_its_namespace_again() {
    let dir = tempfile::tempdir().expect("dir");
    let namespaces = Arc::new(FakeNamespaces::default());
    lock(&namespaces.0).insert(7, None);
    let (_, _, drains) = pod_registry(dir.path(), &namespaces);
    drains
        .post(pod_x_close_spec(), StartedBy::Pod)
        .await
        .expect("room");
    let at_start = namespaces.1.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(drains.list().0.len(), 1, "still in progress");
    let looks = namespaces.1.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        looks <= at_start + 1,
        "{looks} looks at the namespace ({at_start} by the start)"
    );
}

/// Review (inode reuse, a join): pod X's drain of namespace 7 runs; X goes and pod Y gets
/// inode 7, and before X's drain's next check (a second apart) Y's `/drained` joins it, as
/// the drain of its scope. X's drain then ended drained (its namespace replaced) and Y's
/// waiter was answered "drained" with Y's connection open. A request now reads the cookie
/// of the inode before it joins: X's drain ends, and Y waits on a drain of its own.
#[tokio::test]
async fn a_waiter_of_a_new_namespace_does_not_join_the_replaced_ones_drain() {
    let dir = tempfile::tempdir().expect("dir");
    let namespaces = Arc::new(FakeNamespaces::default());
    lock(&namespaces.0).insert(7, Some(100));
    let (_, closed, drains) = pod_registry(dir.path(), &namespaces);
    let (record, _) = drains
        .post(pod_x_close_spec(), StartedBy::Pod)
        .await
        .expect("room");
    // Past the drain's first check (at its start).
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Y has inode 7 now, with its connection (the fake's count of namespace 7 is 1).
    lock(&namespaces.0).insert(7, Some(200));
    let (membership, created) = drains
        .join(pod_x_close_spec(), StartedBy::Pod, false)
        .await
        .expect("room");
    let outcome = membership
        .outcome(|_| tokio::time::Instant::now() + Duration::from_secs(2))
        .await;
    assert!(
        outcome.as_ref().is_none_or(|done| !done.outcome.drained),
        "Y's waiter was answered drained: {outcome:?}"
    );
    assert!(created, "Y's waiter joined X's drain");
    assert_ne!(membership.id(), record.id);
    let ended = drains
        .list()
        .1
        .into_iter()
        .find(|ended| ended.id == record.id)
        .expect("X's drain ended");
    assert_eq!(ended.result, Some(DrainEnd::Drained), "{ended:?}");
    assert_eq!(closed.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Review (inode reuse, the take-over): pod X's drain of namespace 7 POSTed to the old agent
/// (saved with X's cookie); during the upgrade's overlap X goes, pod Y gets inode 7, and Y's
/// `/drained` starts a waiters' drain on the new agent. The take-over handed Y's waiters to
/// X's drain, restored: that one ended drained at once (its namespace replaced) and Y's
/// waiter was answered "drained" with Y's connection open. Drains of two namespaces are
/// never handed over: X's ends drained, Y's waiter waits on its own drain.
#[tokio::test]
async fn a_taken_over_drain_of_a_replaced_namespace_gets_no_waiter_of_the_new_one() {
    let dir = tempfile::tempdir().expect("dir");
    let namespaces = Arc::new(FakeNamespaces::default());
    lock(&namespaces.0).insert(7, Some(100));
    let (_, _, old) = pod_registry(dir.path(), &namespaces);
    old.state
        .as_ref()
        .expect("state file")
        .retire_next()
        .expect("nothing to retire");
    let (_, closed, new) = pod_registry(dir.path(), &namespaces);
    new.restore();
    let take_over = tokio::spawn({
        let new = Arc::clone(&new);
        async move { new.take_over_state().await }
    });
    spend_an_id(&old).await;
    let (record, _) = old
        .post(pod_x_close_spec(), StartedBy::Pod)
        .await
        .expect("room");
    assert_eq!(old.save().await, Saved::Yes);
    // X goes; Y has inode 7, with its connection, and asks the new agent.
    lock(&namespaces.0).insert(7, Some(200));
    let (membership, created) = new
        .join(pod_x_close_spec(), StartedBy::Pod, false)
        .await
        .expect("room");
    assert!(created);
    let old_tracker = Arc::clone(&old.tracker);
    old_agent_goes(&old_tracker, old, &new).await;
    let outcome = membership
        .outcome(|_| tokio::time::Instant::now() + Duration::from_secs(2))
        .await;
    assert!(
        outcome.as_ref().is_none_or(|done| !done.outcome.drained),
        "Y's waiter was answered drained: {outcome:?}"
    );
    assert_ne!(membership.id(), record.id, "Y's waiter waits on X's drain");
    let ended = new
        .list()
        .1
        .into_iter()
        .find(|ended| ended.id == record.id)
        .expect("X's drain ended");
    assert_eq!(ended.result, Some(DrainEnd::Drained), "{ended:?}");
    let (running, _) = new.list();
    assert_eq!(
        running.iter().map(|drain| drain.id).collect::<Vec<_>>(),
        vec![membership.id()],
        "Y's drain has the scope"
    );
    assert_eq!(closed.load(std::sync::atomic::Ordering::SeqCst), 0);
    take_over.abort();
}

/// A stop hook's `/drained` waiter asking `timeout`, with `continues=true` when it is one
/// slice of a longer wait (`drain-agent wait` over `--max-timeout`).
fn slice_hook(timeout: Duration, continues: bool) -> waiter::Ask {
    waiter::Ask {
        continues,
        ..plain_hook(timeout)
    }
}

/// The results of `drains`' ended drains, oldest first.
fn ended_results(drains: &Drains) -> Vec<Option<DrainEnd>> {
    drains
        .list()
        .1
        .iter()
        .rev()
        .map(|record| record.result)
        .collect()
}

/// Audit (slices): `drain-agent wait --timeout 25m` asks in slices of 10 minutes (the
/// agent's `--max-timeout`), each a waiter's drain of its own. Each slice that ran out
/// ended its drain `timeout`: recorded, journaled, counted in `drains_total` and the scope's
/// `scope_drains_total{result="timeout"}`, so `DrainAgentDrainsCutShort` fired and the Argo
/// template aborted the rollout although the pod drained in time (here in the second
/// slice). A slice asks `continues=true`: its drain ends `continued`, which still keeps the
/// scope out of rotation until the next slice's drain, and nothing says `timeout`.
#[tokio::test(start_paused = true)]
async fn a_wait_asked_in_slices_records_its_slices_continued_not_timeout() {
    let dir = tempfile::tempdir().expect("dir");
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, 1)]);
    let tracker = Arc::new(Tracker::new(source.clone(), 16));
    let journal_path = dir.path().join("drains.jsonl");
    let journal = Journal::open(&journal_path, 1 << 20).expect("journal");
    let drains = Arc::new(Drains::new(
        Arc::clone(&tracker),
        None,
        Some(journal),
        None,
        4,
    ));
    let first = slice_hook(Duration::from_secs(600), true)
        .answer(&drains)
        .await
        .expect("answer");
    assert!(!first.outcome.drained, "{first:?}");
    assert_eq!(ended_results(&drains), [Some(DrainEnd::Continued)]);
    assert!(
        drains.gated(&node(8080)).await,
        "between the slices the scope stays out of rotation"
    );
    // The last slice: the wait's own deadline. The port drains 5 minutes into it.
    let last = tokio::spawn({
        let drains = Arc::clone(&drains);
        async move {
            slice_hook(Duration::from_secs(600), false)
                .answer(&drains)
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(300)).await;
    source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
    tracker.notify_port(8080);
    let last = last.await.expect("task").expect("answer");
    assert!(last.outcome.drained, "{last:?}");
    assert_eq!(
        ended_results(&drains),
        [Some(DrainEnd::Continued), Some(DrainEnd::Drained)]
    );
    let stats = drains.stats();
    assert_eq!(stats.ended.get(&DrainEnd::Timeout), None, "{stats:?}");
    assert_eq!(stats.ended.get(&DrainEnd::Continued), Some(&1), "{stats:?}");
    assert_eq!(stats.ended.get(&DrainEnd::Drained), Some(&1), "{stats:?}");
    let scope = stats.by_scope.get(&(8080, None)).expect("the scope's ends");
    assert_eq!(scope.ended.get(&DrainEnd::Timeout), None, "{scope:?}");
    assert_eq!(scope.ended.get(&DrainEnd::Continued), Some(&1), "{scope:?}");
    let journaled = std::fs::read_to_string(&journal_path).expect("journal");
    assert!(
        journaled.contains(r#""result":"continued""#)
            && !journaled.contains(r#""result":"timeout""#),
        "{journaled}"
    );
}

/// A slice's drain ends `continued` only when every waiter still attached at its deadline
/// asked `continues`: one hook whose own deadline it is (no `continues`) makes it a
/// `timeout`, as does a `POST` (a drain that lives until its own timeout).
#[tokio::test(start_paused = true)]
async fn a_drain_with_a_waiter_whose_deadline_it_is_still_times_out() {
    let (_, _, drains) = registry(1);
    let waiters = [true, false].map(|continues| {
        let drains = Arc::clone(&drains);
        tokio::spawn(async move {
            slice_hook(Duration::from_secs(60), continues)
                .answer(&drains)
                .await
        })
    });
    for waiter in waiters {
        let answer = waiter.await.expect("task").expect("answer");
        assert!(!answer.outcome.drained, "{answer:?}");
    }
    assert_eq!(ended_results(&drains), [Some(DrainEnd::Timeout)]);
    // A slice joining a POSTed drain: the drain's deadline is the POST's.
    drains
        .post(spec(Duration::from_secs(60)), StartedBy::Node)
        .await
        .expect("room");
    let answer = slice_hook(Duration::from_secs(60), true)
        .answer(&drains)
        .await
        .expect("answer");
    assert!(!answer.outcome.drained, "{answer:?}");
    assert_eq!(
        ended_results(&drains),
        [Some(DrainEnd::Timeout), Some(DrainEnd::Timeout)]
    );
    assert_eq!(drains.stats().ended.get(&DrainEnd::Continued), None);
}

/// Audit (gates across an upgrade): a `drain-agent wait` longer than `--max-timeout` ends
/// one slice `continued` on the old agent (its gate held 5 minutes); the new agent starts
/// and restores a copy of that hold; the next slice ends `drained` on the old agent 270 s
/// later (held until 570 s). At the take-over the new agent kept its own copy (ending at
/// 300 s) and skipped the old agent's later hold: the scope was back in rotation 30 s after
/// the hook was told "drained". The later end is kept.
#[tokio::test(start_paused = true)]
async fn the_take_over_keeps_the_later_of_two_holds_of_a_scope() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, old_tracker, old) = writing_registry(dir.path());
    let (_, first) = ended_at(0, "127.0.0.1", 8080, DrainEnd::Continued);
    old.finish(&Filter::port(8080), first, read(&[]));
    assert_eq!(old.save().await, Saved::Yes);
    // The new agent starts beside it: a copy of that hold, until 300 s.
    let (_, _, new) = registry_beside(dir.path());
    assert!(new.gated(&node(8080)).await);
    tokio::time::advance(Duration::from_secs(270)).await;
    let (_, second) = ended_at(0, "127.0.0.1", 8080, DrainEnd::Drained);
    old.finish(&Filter::port(8080), second, read(&[]));
    assert_eq!(old.save().await, Saved::Yes);
    // The old agent goes; the new one takes over.
    old_tracker.begin_shutdown();
    assert_eq!(Arc::strong_count(&old), 1, "the old agent runs no task");
    drop(old);
    let take_over = tokio::spawn({
        let new = Arc::clone(&new);
        async move { new.take_over_state().await }
    });
    let state = Arc::clone(new.state.as_ref().expect("state file"));
    for _ in 0..500 {
        if state.is_writer() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(state.is_writer(), "the new agent took over");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Past the first hold's end (300 s), well before the second's (570 s).
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(
        new.gated(&node(8080)).await,
        "the later hold was dropped at the take-over: {}",
        std::fs::read_to_string(dir.path().join(state_file::FILE_NAME)).expect("file")
    );
    take_over.abort();
}

/// Listener 1 on every scope; the next read, once armed, blocks.
#[derive(Default)]
struct HeldListenerRead(OneHold);

impl Closer for HeldListenerRead {
    fn close(&self, _filter: &Filter, targets: &[Peer]) -> anyhow::Result<u64> {
        Ok(targets.len() as u64)
    }

    fn listeners(&self, _filter: &Filter) -> anyhow::Result<Vec<u64>> {
        self.0.pass();
        Ok(vec![1])
    }

    fn unavailable(&self) -> Option<&str> {
        None
    }
}

/// Audit (gates during the take-over): a question looked at the running drains, then at
/// its covering hold (its listener read taking its time), then at the writer's file
/// (`writers_gate`). The take-over ran meanwhile: the old agent's drain (POSTed to it) moved
/// into this agent's running drains, after the question had looked there, and the overlap
/// was gone, so `writers_gate` said nothing either. The hold reopened (a new listener): the
/// question was answered "not draining" once while the old agent's drain ran.
#[tokio::test]
async fn a_question_during_the_take_over_sees_the_old_agents_drain() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, old_tracker, old) = writing_registry(dir.path());
    let closer = Arc::new(HeldListenerRead::default());
    let source = Arc::new(FakeSource::default());
    source.set(vec![endpoint("127.0.0.1", 8080, 2)]);
    let new = Arc::new(
        Drains::new(
            Arc::new(Tracker::new(source, 16)),
            Some(Arc::clone(&closer) as Arc<dyn Closer>),
            None,
            None,
            4,
        )
        .with_state_file(StateFile::open(dir.path()).expect("state file")),
    );
    new.restore();
    // A hold of this agent's that a new listener (1) reopens.
    let (_, record) = ended_at(0, "127.0.0.1", 8080, DrainEnd::Drained);
    new.finish(&Filter::port(8080), record, read(&[]));
    let take_over = tokio::spawn({
        let new = Arc::clone(&new);
        async move { new.take_over_state().await }
    });
    spend_an_id(&old).await;
    old.post(spec(Duration::from_secs(600)), StartedBy::Node)
        .await
        .expect("room");
    assert_eq!(old.save().await, Saved::Yes);
    let (entered_read, release) = closer.0.arm();
    let question = tokio::spawn({
        let new = Arc::clone(&new);
        async move { new.gated(&node(8080)).await }
    });
    // Asked in the old order (running drains, holds, the writer's file) it waits in the
    // hold's listener read now; the writer's file looked at first, it is answered already.
    let in_the_read =
        tokio::task::spawn_blocking(move || entered_read.recv_timeout(Duration::from_secs(2)))
            .await
            .expect("task")
            .is_ok();
    assert!(in_the_read || question.is_finished(), "the question hangs");
    old_agent_goes(&old_tracker, old, &new).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(new.list().0.len(), 1, "the old agent's drain runs here now");
    release.send(()).expect("release");
    assert!(
        question.await.expect("question"),
        "asked while the old agent's drain ran, answered not draining"
    );
    take_over.abort();
}
