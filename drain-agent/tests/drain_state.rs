//! Drains that survive a restart (issue 23): the agent keeps the drains `POST /drain`
//! started and the `/health` gates held after drains in `--state-dir` (drains.json) and
//! resumes them at start-up. On 53847d0 a restart (SIGTERM or `kill -9`) forgot them:
//! `/drains` was empty and `/health` answered 200 while the service was stopping. The state
//! file is trusted for nothing: a link there stops the start.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    io::Read as _,
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Agent, Server, child::Guard, http::curl_json, kernel_available, temp_dir};

/// How the agent goes away.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Term,
    Kill,
}

fn restart(agent: Agent, stop: Stop, state: &Path) -> Agent {
    go(agent, stop);
    Agent::start_with_state_dir(state, &[])
}

/// The agent goes: SIGTERM, or `kill -9` (a crash).
fn go(mut agent: Agent, stop: Stop) {
    if let Stop::Kill = stop {
        // SAFETY: kill(2) on the agent, a child of this test.
        let killed = unsafe { libc::kill(i32::try_from(agent.pid()).expect("pid"), libc::SIGKILL) };
        assert_eq!(killed, 0);
    }
    agent.stop();
}

fn health(agent: &Agent, port: u16) -> u16 {
    agent.get_json(&format!("/health?port={port}")).0
}

/// The drains in progress: (id, port, started_ms) of each.
fn in_progress(agent: &Agent) -> Vec<(u64, u64, u64)> {
    let (status, body) = agent.get_json("/drains");
    assert_eq!(status, 200, "{body}");
    body["in_progress"]
        .as_array()
        .expect("in_progress")
        .iter()
        .map(|drain| {
            (
                drain["id"].as_u64().expect("id"),
                drain["port"].as_u64().expect("port"),
                drain["started_ms"].as_u64().expect("started_ms"),
            )
        })
        .collect()
}

/// The ports of the drains in progress.
fn ports_in_progress(agent: &Agent) -> Vec<u64> {
    in_progress(agent)
        .iter()
        .map(|(_, port, _)| *port)
        .collect()
}

/// Waits (at most `limit`) until `drains.next.json` has left `state`: folded into the state
/// file and removed.
fn wait_next_file_gone(state: &Path, what: &str, limit: Duration) {
    common::wait_until(what, limit, || !state.join("drains.next.json").exists());
}

/// `n` servers on loopback with one connection held open to each (their drains cannot end
/// while the returned streams live).
fn busy_servers(n: usize) -> (Vec<Server>, Vec<TcpStream>) {
    let servers: Vec<Server> = (0..n).map(|_| Server::start("127.0.0.1:0")).collect();
    let held = servers
        .iter()
        .map(|server| TcpStream::connect(("127.0.0.1", server.port)).expect("connect"))
        .collect();
    for server in &servers {
        server.wait_accepted(1);
    }
    (servers, held)
}

/// `POST /drain?port=P&timeout=10m` to `agent`, which starts it (201).
fn post_drain(agent: &Agent, port: u16) {
    let (status, body) = curl_json(
        "POST",
        &format!("{}/drain?port={port}&timeout=10m", agent.url),
    );
    assert_eq!(status, 201, "POST port {port}: {body}");
}

/// `DELETE /drain?port=P` to `agent`: its status.
fn delete_drain(agent: &Agent, port: u16) -> u16 {
    curl_json("DELETE", &format!("{}/drain?port={port}", agent.url)).0
}

/// An upgrade's overlap beside `old`: a new agent on the same state directory, asked to
/// start a drain of `kept` and to cancel the drain of `cancelled` that `old` started (both
/// ports with a connection held open, so neither drain can end on its own).
struct Asked {
    new: Agent,
    kept: u16,
    cancelled: u16,
    _servers: Vec<Server>,
    _held: Vec<TcpStream>,
}

impl Asked {
    fn of_new_agent(old: &Agent, state: &Path) -> Self {
        let (servers, held) = busy_servers(2);
        let (kept, cancelled) = (servers[0].port, servers[1].port);
        post_drain(old, cancelled);
        let new = Agent::start_with_state_dir(state, &[]);
        post_drain(&new, kept);
        assert_eq!(delete_drain(&new, cancelled), 200);
        Self {
            new,
            kept,
            cancelled,
            _servers: servers,
            _held: held,
        }
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_drain_in_progress_survives_a_restart() {
    if !kernel_available("a_drain_in_progress_survives_a_restart") {
        return;
    }
    for stop in [Stop::Term, Stop::Kill] {
        let state = temp_dir("da-drain-state-");
        let server = Server::start("127.0.0.1:0");
        let port = server.port;
        let _clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
            .collect();
        server.wait_accepted(3);
        let agent = Agent::start_with_state_dir(state.path(), &[]);
        let (status, started) = curl_json(
            "POST",
            &format!("{}/drain?port={port}&timeout=10m", agent.url),
        );
        assert_eq!(status, 201, "{started}");
        let id = started["id"].as_u64().expect("id");
        let started_ms = started["started_ms"].as_u64().expect("started_ms");
        assert_eq!(health(&agent, port), 503);

        let agent = restart(agent, stop, state.path());
        assert_eq!(
            in_progress(&agent),
            vec![(id, u64::from(port), started_ms)],
            "{stop:?}: the drain in progress after the restart"
        );
        assert_eq!(
            health(&agent, port),
            503,
            "{stop:?}: /health of the draining port after the restart"
        );
        // Still running, and still ends as drains do.
        let (status, ended) = curl_json("DELETE", &format!("{}/drain?port={port}", agent.url));
        assert_eq!(
            (status, ended["id"].as_u64(), &ended["result"]),
            (200, Some(id), &"cancelled".into()),
            "{stop:?}: {ended}"
        );
        assert_eq!(health(&agent, port), 200);
        let next = curl_json(
            "POST",
            &format!("{}/drain?port={port}&timeout=10m", agent.url),
        )
        .1;
        assert!(
            next["id"].as_u64().expect("id") > id,
            "ids go on after the restored drain: {next}"
        );
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_gate_held_after_a_drain_survives_a_restart_until_released() {
    if !kernel_available("a_gate_held_after_a_drain_survives_a_restart_until_released") {
        return;
    }
    let state = temp_dir("da-drain-state-");
    // A service with nothing left: its drain ends drained at once, and its port stays out of
    // rotation (the stop follows).
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    let agent = Agent::start_with_state_dir(state.path(), &[]);
    let (status, body) = curl_json(
        "POST",
        &format!("{}/drain?port={port}&timeout=1m", agent.url),
    );
    assert_eq!(status, 201, "{body}");
    common::wait_until("the drain to end", Duration::from_secs(10), || {
        in_progress(&agent).is_empty()
    });
    let recent = agent.get_json("/drains").1["recent"][0].clone();
    assert_eq!(recent["result"], "drained", "{recent}");
    assert_eq!(health(&agent, port), 503, "held after the drain");

    let agent = restart(agent, Stop::Kill, state.path());
    assert_eq!(
        health(&agent, port),
        503,
        "held after a kill -9 and restart"
    );
    let agent = restart(agent, Stop::Term, state.path());
    assert_eq!(
        health(&agent, port),
        503,
        "held after a SIGTERM and restart"
    );

    // Released (no drain in progress: 404, but the gate opens), and that survives too.
    let (status, _) = curl_json("DELETE", &format!("{}/drain?port={port}", agent.url));
    assert_eq!(status, 404);
    assert_eq!(health(&agent, port), 200);
    let agent = restart(agent, Stop::Kill, state.path());
    assert_eq!(health(&agent, port), 200, "released before the restart");
}

/// A drain that cannot be saved in `--state-dir` (here a directory stands where the file is
/// written first; in life a full or read-only disk) is still started, and the answer says,
/// with a `Warning` that curl shows, that it would not survive a restart; the metrics say
/// so too. And it is so: after a restart the saved drain is back and the other is not.
/// Before, the answer was a plain 201 and only the log knew.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_drain_that_cannot_be_saved_is_answered_with_a_warning() {
    if !kernel_available("a_drain_that_cannot_be_saved_is_answered_with_a_warning") {
        return;
    }
    let state = temp_dir("da-drain-unsaved-");
    let (servers, _held) = busy_servers(2);
    let (saved, unsaved) = (servers[0].port, servers[1].port);
    let agent = Agent::start_with_state_dir(state.path(), &[]);
    post_drain(&agent, saved);
    assert_eq!(agent.metric("drain_agent_drains_unsaved"), Some(0.0));

    let blocker = state.path().join("drains.json.tmp");
    std::fs::create_dir_all(blocker.join("inside")).expect("blocker");
    let answer = Command::new("curl")
        .args(["-sS", "-i", "-X", "POST"])
        .arg(format!("{}/drain?port={unsaved}&timeout=10m", agent.url))
        .output()
        .expect("curl");
    let answer = String::from_utf8_lossy(&answer.stdout).into_owned();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(
        answer.lines().any(|line| line
            .to_ascii_lowercase()
            .starts_with("warning: 299 drain-agent \"not saved in --state-dir")),
        "{answer}"
    );
    assert_eq!(health(&agent, unsaved), 503, "still draining");
    assert_eq!(agent.metric("drain_agent_drains_unsaved"), Some(1.0));
    assert!(
        agent
            .metric("drain_agent_drain_save_failures_total")
            .is_some_and(|failures| failures >= 1.0)
    );

    std::fs::remove_dir_all(&blocker).expect("blocker gone");
    let agent = restart(agent, Stop::Kill, state.path());
    assert_eq!(
        ports_in_progress(&agent),
        vec![u64::from(saved)],
        "what the warning said: the unsaved drain did not survive"
    );
    assert_eq!(agent.metric("drain_agent_drains_unsaved"), Some(0.0));
}

#[test]
fn a_link_at_the_state_file_stops_the_start() {
    let state = temp_dir("da-drain-state-");
    let victim = state.path().join("victim");
    std::fs::write(&victim, b"not the agent's").expect("victim");
    std::os::unix::fs::symlink(&victim, state.path().join("drains.json")).expect("link");
    let mut agent = Guard::spawn(
        "drain-agent",
        Command::new(common::agent_binary())
            .env("DRAIN_AGENT_STATE_DIR", state.path())
            // Port 0: the start must fail on the state file, never on a taken port.
            .args(["run", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .stop_signal(None);
    let status = agent.wait_for(Duration::from_secs(10));
    if status.is_none() {
        // Started: stopped (and reaped) before its stderr is read to the end.
        agent.stop();
    }
    let mut stderr = String::new();
    agent
        .child_mut()
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(
        status.is_some_and(|status| !status.success()),
        "the agent started with a link at its state file ({status:?}): {stderr}"
    );
    assert!(
        stderr.contains("drains.json") && stderr.contains("symbolic link"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"not the agent's",
        "the link's target was touched"
    );
}

/// Two agents at once (an upgrade, `tests/handover.rs`) share the state directory. Only
/// the one that holds its lock writes; the other takes over, with what the first saved
/// meanwhile, once it has gone. Before, both wrote: the new agent's first write replaced
/// the file with its own drains, and a drain POSTed to the old agent after the new one
/// started was gone once the old one stopped.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn an_upgrade_overlap_loses_no_drain_posted_to_either_agent() {
    if !kernel_available("an_upgrade_overlap_loses_no_drain_posted_to_either_agent") {
        return;
    }
    let state = temp_dir("da-state-overlap-");
    let old = Agent::start_with_state_dir(state.path(), &["--shutdown-grace", "0s"]);
    let new = Agent::start_with_state_dir(state.path(), &[]);
    let (servers, _held) = busy_servers(2);
    let (to_old, to_new) = (&servers[0], &servers[1]);
    // A drain POSTed to each agent while both run.
    post_drain(&old, to_old.port);
    post_drain(&new, to_new.port);
    // The old agent goes; the new one takes over the file.
    go(old, Stop::Term);
    common::wait_until(
        "the new agent writes both drains",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(state.path().join("drains.json")).is_ok_and(|text| {
                text.contains(&format!("\"port\":{}", to_old.port))
                    && text.contains(&format!("\"port\":{}", to_new.port))
            })
        },
    );
    // And a crash of the new one keeps both for the next.
    let after = restart(new, Stop::Kill, state.path());
    let ports = ports_in_progress(&after);
    assert!(
        ports.contains(&u64::from(to_old.port)) && ports.contains(&u64::from(to_new.port)),
        "drains after the overlap and a crash: {ports:?}"
    );
    assert_eq!(health(&after, to_old.port), 503);
    assert_eq!(health(&after, to_new.port), 503);
}

/// During an upgrade's overlap the new agent answers `/health` (and the agent-check) from
/// what the old agent's state file says too: a drain POSTed to the old agent after the new
/// one started, or the gate its end holds, is "draining" on both. Before, the new agent knew
/// only what it had restored at its start and answered 200 for such a scope — flapping with
/// the old agent's 503 by the listeners' hash, and 200 alone once the old agent closed its
/// listeners at SIGTERM (until it exited), so a load balancer put the scope back in rotation
/// while it drained. Read only: the new agent does not run the old one's drain, and a
/// `DELETE` sent to the old agent puts the scope back on both.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_new_agent_answers_health_from_what_the_old_one_was_asked_during_the_overlap() {
    if !kernel_available(
        "the_new_agent_answers_health_from_what_the_old_one_was_asked_during_the_overlap",
    ) {
        return;
    }
    let state = temp_dir("da-state-overlap-health-");
    let old = Agent::start_with_state_dir(state.path(), &["--shutdown-grace", "0s"]);
    let new = Agent::start_with_state_dir(state.path(), &[]);
    let (busy, _held) = busy_servers(1);
    let idle = Server::start("127.0.0.1:0");
    let (draining, held) = (busy[0].port, idle.port);
    assert_eq!(health(&new, draining), 200);
    assert_eq!(health(&new, held), 200);
    // Asked of the old agent only, after the new one started.
    post_drain(&old, draining);
    post_drain(&old, held);
    common::wait_until(
        "the idle port's drain ends and holds its gate",
        Duration::from_secs(10),
        || {
            in_progress(&old)
                .iter()
                .all(|(_, port, _)| *port != u64::from(held))
        },
    );
    assert_eq!(
        health(&new, draining),
        503,
        "the new agent answers for a scope the old agent drains"
    );
    assert_eq!(
        health(&new, held),
        503,
        "the new agent answers for a scope the old agent holds after its drain"
    );
    assert!(
        in_progress(&new).is_empty(),
        "the new agent runs nothing of the old one's"
    );
    // A cancel sent to the old agent puts the scopes back on the new one too.
    assert_eq!(delete_drain(&old, draining), 200);
    assert_eq!(delete_drain(&old, held), 404);
    assert_eq!(health(&new, draining), 200, "after the old agent's DELETE");
    assert_eq!(health(&new, held), 200, "after the old agent's DELETE");
}

/// Audit (upgrade overlap): the same for a drain only a `/drained` waiter started on the old
/// agent, the README's preStop `httpGet` form. Before, the old agent's `drains.json` kept
/// only POSTed drains: once it closed its listeners at SIGTERM (its grace answering the
/// hook, still waiting there), every `/health` reached the new agent, which answered 200 for
/// the scope the hook drained, and a load balancer put the pod back in rotation for the
/// rest of its hook. The new agent still runs nothing of it, then or after the take-over
/// (the old agent killed mid-hook: the file still lists the drain, but its waiter was the
/// old agent's). Its metrics count that drain meanwhile (`other_agent_drains_in_progress`):
/// the old agent's `/metrics` is closed, and kured's alert must not go silent.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_new_agent_answers_health_for_a_drain_the_old_ones_hook_waits_on() {
    if !kernel_available("the_new_agent_answers_health_for_a_drain_the_old_ones_hook_waits_on") {
        return;
    }
    let state = temp_dir("da-state-overlap-waiter-");
    let old = Agent::start_with_state_dir(state.path(), &["--shutdown-grace", "60s"]);
    let new = Agent::start_with_state_dir(state.path(), &[]);
    let (busy, held) = busy_servers(1);
    let draining = busy[0].port;
    assert_eq!(health(&new, draining), 200);
    // A pod's preStop hook, to the old agent: its `/drained` starts the scope's drain.
    let hook = {
        let url = format!("{}/drained?port={draining}&timeout=30s", old.url);
        std::thread::spawn(move || curl_json("GET", &url))
    };
    old.wait_for_waiters(1);
    assert_eq!(
        health(&old, draining),
        503,
        "the old agent drains the scope"
    );
    // The upgrade's SIGTERM: the old agent's listeners close, its hook is still answered.
    // SAFETY: kill(2) on the agent, a child of this test.
    let termed = unsafe { libc::kill(i32::try_from(old.pid()).expect("pid"), libc::SIGTERM) };
    assert_eq!(termed, 0);
    common::wait_until(
        "the old agent closes its listener",
        Duration::from_secs(10),
        || old.try_get("/healthz").is_err(),
    );
    // Scraped before any question reaches the new agent: the metrics look at the file too.
    // Before, only the new agent's own drains showed (none), and kured's alert went silent.
    let other = "drain_agent_other_agent_drains_in_progress ";
    assert_eq!(
        new.metric(other),
        Some(1.0),
        "the old agent's hook's drain, counted by the new one"
    );
    assert_eq!(
        health(&new, draining),
        503,
        "the new agent answers for the scope the old agent's hook drains"
    );
    assert!(
        in_progress(&new).is_empty(),
        "the new agent runs nothing of the old one's"
    );
    // The old agent's file has it, for the new one's gate; not as a drain to resume. The
    // old agent goes with its hook still waiting (killed): the new one takes over and runs
    // no drain of the scope, whose connection is still open (its waiter was the old one's).
    let on_disk = std::fs::read_to_string(state.path().join("drains.json")).expect("state");
    assert!(on_disk.contains(r#""waiters_only":true"#), "{on_disk}");
    let restores = new.log_text().matches("restored ").count();
    go(old, Stop::Kill);
    let _ = hook.join().expect("hook");
    // The take-over merges the old agent's last state (logged as a start's restore is).
    common::wait_until("the new agent takes over", Duration::from_secs(10), || {
        new.log_text().matches("restored ").count() > restores
    });
    assert!(
        in_progress(&new).is_empty(),
        "the waiters' drain is not resumed without its waiter"
    );
    assert_eq!(health(&new, draining), 200, "nothing drains the scope now");
    assert_eq!(
        new.metric(other),
        Some(0.0),
        "nothing drains on another agent"
    );
    drop(held);
}

/// Audit (upgrade overlap), the other way round: the old agent (the state file's writer)
/// answers `/health` (and the agent-check) from what the new agent keeps in
/// `drains.next.json` too: a drain POSTed to the new agent (a pod's preStop hook reaching
/// it by the listeners' hash), or the gate its end holds, is "draining" on both. Before, the
/// old agent answered 200 for such a scope from its own state: with the questions on the
/// node's address spread over both agents, a load balancer flapped. A `DELETE` sent to the
/// new agent puts the scope back on both.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_old_agent_answers_health_from_what_the_new_one_was_asked_during_the_overlap() {
    if !kernel_available(
        "the_old_agent_answers_health_from_what_the_new_one_was_asked_during_the_overlap",
    ) {
        return;
    }
    let state = temp_dir("da-state-overlap-old-health-");
    let old = Agent::start_with_state_dir(state.path(), &["--shutdown-grace", "0s"]);
    let new = Agent::start_with_state_dir(state.path(), &[]);
    let (busy, _held) = busy_servers(1);
    let idle = Server::start("127.0.0.1:0");
    let (draining, held) = (busy[0].port, idle.port);
    assert_eq!(health(&old, draining), 200);
    assert_eq!(health(&old, held), 200);
    // Asked of the new agent only.
    post_drain(&new, draining);
    post_drain(&new, held);
    common::wait_until(
        "the idle port's drain ends and holds its gate",
        Duration::from_secs(10),
        || {
            in_progress(&new)
                .iter()
                .all(|(_, port, _)| *port != u64::from(held))
        },
    );
    assert!(state.path().join("drains.next.json").exists());
    assert_eq!(
        health(&old, draining),
        503,
        "the old agent answers for a scope the new agent drains"
    );
    assert_eq!(
        health(&old, held),
        503,
        "the old agent answers for a scope the new agent holds after its drain"
    );
    assert!(
        in_progress(&old).is_empty(),
        "the old agent runs nothing of the new one's"
    );
    // A cancel sent to the new agent puts the scopes back on the old one too.
    assert_eq!(delete_drain(&new, draining), 200);
    assert_eq!(delete_drain(&new, held), 404);
    assert_eq!(health(&old, draining), 200, "after the new agent's DELETE");
    assert_eq!(health(&old, held), 200, "after the new agent's DELETE");
}

/// A cancel during an upgrade's overlap holds, whichever agent it was sent to, for drains
/// and for the `/health` gates held after them. The new agent restores the old one's drains
/// and gates at its start; before, (a) a `DELETE` sent to the old agent left the new one's
/// copies running (a drain with its deadline's close, a gate answering 503 for 5 minutes),
/// and (b) one sent to the new agent was undone when it took over the old one's file, which
/// still had them.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_cancel_during_an_upgrade_overlap_holds_whichever_agent_got_it() {
    if !kernel_available("a_cancel_during_an_upgrade_overlap_holds_whichever_agent_got_it") {
        return;
    }
    let state = temp_dir("da-state-overlap-cancel-");
    let old = Agent::start_with_state_dir(state.path(), &["--shutdown-grace", "0s"]);
    // Two drains that cannot end (a connection held on each), two gates (drains of idle
    // ports end at once and hold their scopes out of rotation).
    let (busy, _held) = busy_servers(2);
    let idle = [Server::start("127.0.0.1:0"), Server::start("127.0.0.1:0")];
    let ports: Vec<u16> = busy.iter().chain(&idle).map(|server| server.port).collect();
    for port in &ports {
        post_drain(&old, *port);
    }
    for port in &ports[2..] {
        common::wait_until(
            "the idle port's drain holds its gate",
            Duration::from_secs(10),
            || {
                in_progress(&old)
                    .iter()
                    .all(|(_, p, _)| *p != u64::from(*port))
                    && health(&old, *port) == 503
            },
        );
    }
    let new = Agent::start_with_state_dir(state.path(), &[]);
    for port in &ports {
        assert_eq!(
            health(&new, *port),
            503,
            "the new agent restored port {port}"
        );
    }
    // Each agent gets one drain's cancel and one gate's.
    for (agent, port) in [
        (&old, ports[0]),
        (&new, ports[1]),
        (&old, ports[2]),
        (&new, ports[3]),
    ] {
        let (status, body) = curl_json("DELETE", &format!("{}/drain?port={port}", agent.url));
        assert!(
            status == 200 || status == 404,
            "DELETE port {port}: {status} {body}"
        );
        assert_eq!(health(agent, port), 200, "port {port} after its DELETE");
    }
    go(old, Stop::Term);
    common::wait_until(
        "the new agent takes over the state file",
        Duration::from_secs(10),
        // Its restore at start, then the take-over's.
        || new.log_text().matches("held /health gate(s) from").count() >= 2,
    );
    let left = ports_in_progress(&new);
    let gated: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|port| health(&new, *port) != 200)
        .collect();
    assert!(
        left.is_empty() && gated.is_empty(),
        "after the overlap, cancelled drains still in progress: {left:?}; scopes still out of rotation: {gated:?} (of {ports:?})"
    );
    // And what the new agent wrote keeps them cancelled for the next one.
    let after = restart(new, Stop::Term, state.path());
    assert!(in_progress(&after).is_empty());
    for port in &ports {
        assert_eq!(health(&after, *port), 200, "port {port} after a restart");
    }
}

/// The new agent of an upgrade crashes while the old one still runs: what was asked of it
/// meanwhile (a drain POSTed to it, a cancel sent to it) is not lost. It kept them in
/// `drains.next.json`, and the agent started after it takes that file over. Before, they
/// lived in its memory only (it does not write the state file while the old agent does),
/// and the crash lost both: the drain was gone and the cancelled drain came back.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_crash_of_the_new_agent_during_an_upgrade_loses_nothing_asked_of_it() {
    if !kernel_available("a_crash_of_the_new_agent_during_an_upgrade_loses_nothing_asked_of_it") {
        return;
    }
    let state = temp_dir("da-state-overlap-crash-");
    let old = Agent::start_with_state_dir(state.path(), &["--shutdown-grace", "0s"]);
    let asked = Asked::of_new_agent(&old, state.path());
    let (new, kept, cancelled) = (asked.new, asked.kept, asked.cancelled);
    // The new agent crashes; the DaemonSet starts another while the old one still runs.
    let next = restart(new, Stop::Kill, state.path());
    let ports = ports_in_progress(&next);
    assert_eq!(
        ports,
        vec![u64::from(kept)],
        "drains in progress on the agent after the crash (POSTed: {}, cancelled: {})",
        kept,
        cancelled
    );
    assert_eq!(health(&next, kept), 503);
    assert_eq!(health(&next, cancelled), 200);
    // The old one goes; the one left writes the state, and a restart keeps it so.
    go(old, Stop::Term);
    wait_next_file_gone(
        state.path(),
        "the agent left takes over the state file",
        Duration::from_secs(10),
    );
    let after = restart(next, Stop::Term, state.path());
    let ports = ports_in_progress(&after);
    assert_eq!(
        ports,
        vec![u64::from(kept)],
        "after the take-over and a restart"
    );
    assert_eq!(health(&after, cancelled), 200);
}

/// An upgrade rolled back: the new agent goes (here a crash; a stop alike) and the old one
/// runs on, with no agent started after it. What was asked of the new agent is taken up by
/// the old one within seconds: the drain POSTed to the new agent runs on the old one, and
/// the drain cancelled on the new one ends there too. Before, the old agent read the new
/// one's file only at its own next start: meanwhile the POSTed drain ran nowhere (its scope
/// back in rotation while its service stopped) and the cancelled one ran on.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_old_agent_takes_up_what_a_gone_new_agent_was_asked() {
    if !kernel_available("the_old_agent_takes_up_what_a_gone_new_agent_was_asked") {
        return;
    }
    let state = temp_dir("da-state-rollback-");
    let old = Agent::start_with_state_dir(state.path(), &[]);
    let asked = Asked::of_new_agent(&old, state.path());
    let (new, kept, cancelled) = (asked.new, asked.kept, asked.cancelled);
    go(new, Stop::Kill);
    common::wait_until(
        "the old agent takes up the new one's drain and cancel",
        Duration::from_secs(15),
        || {
            ports_in_progress(&old) == vec![u64::from(kept)]
                && health(&old, kept) == 503
                && health(&old, cancelled) == 200
        },
    );
    wait_next_file_gone(
        state.path(),
        "the new agent's file is folded in and removed",
        Duration::from_secs(5),
    );
    // In the state file: a restart keeps the taken-up drain and not the cancelled one.
    let after = restart(old, Stop::Term, state.path());
    let ports = ports_in_progress(&after);
    assert_eq!(ports, vec![u64::from(kept)]);
}

/// An upgrade rolled back, and the old agent asked at once: it answers from what the gone
/// agent was asked, not only after its periodic check (every 2 s). On f856d94 it answered
/// from its own state alone until then: `/health` said 200 for the scope whose drain was
/// POSTed to the new agent (a load balancer sent it new users while its service stopped) and
/// 503 for the one cancelled there, and a `DELETE` of the POSTed drain answered 404 and was
/// undone by the fold-in a moment later (the drain ran on, with its deadline's close).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_rolled_back_upgrade_is_answered_at_once_from_what_the_gone_agent_was_asked() {
    if !kernel_available(
        "a_rolled_back_upgrade_is_answered_at_once_from_what_the_gone_agent_was_asked",
    ) {
        return;
    }
    let state = temp_dir("da-state-rollback-at-once-");
    let old = Agent::start_with_state_dir(state.path(), &[]);
    let asked = Asked::of_new_agent(&old, state.path());
    let (new, kept, cancelled) = (asked.new, asked.kept, asked.cancelled);
    go(new, Stop::Kill);
    // Asked at once, as a load balancer's check or a retrying hook would.
    let at_once = (health(&old, kept), health(&old, cancelled));
    let delete = delete_drain(&old, kept);
    assert_eq!(
        (at_once, delete),
        ((503, 200), 200),
        "((/health of the drain POSTed to the gone agent, of the one cancelled there), DELETE of the POSTed one)"
    );
    // Past the periodic check: the cancel holds, nothing comes back.
    std::thread::sleep(Duration::from_secs(3));
    assert!(in_progress(&old).is_empty(), "{:?}", in_progress(&old));
    assert_eq!((health(&old, kept), health(&old, cancelled)), (200, 200));
    assert!(!state.path().join("drains.next.json").exists());
}

/// Audit (rollback): `kubectl rollout undo` after a release that bumped the state file's
/// version. The release rolled back to cannot read the later one's `drains.json`; at its
/// take-over it used to write over it: every drain in progress and every held gate gone,
/// each port back in rotation. Now the file is moved aside, kept whole, and every port
/// answers `/health` 503 (and the metric says why) while anything in it could still gate —
/// also after a restart.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_rollback_keeps_the_later_releases_state_file_and_gates_every_port() {
    if !kernel_available("a_rollback_keeps_the_later_releases_state_file_and_gates_every_port") {
        return;
    }
    let state = temp_dir("da-state-rollback-");
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    // The later release runs and writes its own layout.
    let later = Agent::start_with_state_dir(state.path(), &[]);
    let newer = format!(
        r#"{{"version":2,"state":{{"drains":[{{"port":{port},"on_timeout":"close"}}],"gates":[]}}}}"#
    );
    std::fs::write(state.path().join("drains.json"), &newer).expect("write");
    // The rollback: this release starts beside it, then takes over when it stops.
    let rolled_back = Agent::start_with_state_dir(state.path(), &[]);
    assert_eq!(health(&rolled_back, port), 503, "beside it: fails closed");
    go(later, Stop::Term);
    common::wait_until(
        "the rolled-back agent takes over",
        Duration::from_secs(20),
        || std::fs::read_to_string(state.path().join("drains.json")).ok() != Some(newer.clone()),
    );
    let kept: Vec<String> = std::fs::read_dir(state.path())
        .expect("dir")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("drains.json.unreadable-v2-at-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read_to_string(state.path().join(&kept[0])).expect("kept"),
        newer
    );
    assert_eq!(health(&rolled_back, port), 503);
    assert_eq!(
        rolled_back.metric("drain_agent_state_unreadable"),
        Some(1.0)
    );
    let other = Server::start("127.0.0.1:0");
    assert_eq!(health(&rolled_back, other.port), 503, "every port");
    // A restart keeps failing closed.
    let after = restart(rolled_back, Stop::Kill, state.path());
    assert_eq!(health(&after, other.port), 503, "after a restart");
    assert_eq!(after.metric("drain_agent_state_unreadable"), Some(1.0));
}

/// A listener in `netns` on `port` and one connection to it from inside (loopback), both
/// sockets of that namespace: (listener, client, accepted).
fn connected_in(netns: &common::Netns, port: u16) -> (std::net::TcpListener, TcpStream, TcpStream) {
    netns.run_in(move || {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        (listener, client, accepted)
    })
}

fn inode_of(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).expect("namespace").ino()
}

/// Audit (security, inode reuse): pod X's `on_timeout=close` drain of its namespace was
/// resumed from `--state-dir` after X was deleted while the agent was down, and pod Y,
/// whose namespace took X's inode, had its connection reset at X's deadline (and its own
/// `POST` joined X's drain). The drain keeps its namespace's cookie: restored onto another
/// namespace, it ends drained and closes nothing.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_pods_drain_restored_onto_a_new_namespace_with_its_inode_closes_nothing() {
    if !kernel_available("a_pods_drain_restored_onto_a_new_namespace_with_its_inode_closes_nothing")
    {
        return;
    }
    let state = temp_dir("da-drain-state-");
    let port = common::free_port();
    let x = common::Netns::new("nsx");
    let x_inode = inode_of(&x.path());
    let x_sockets = connected_in(&x, port);
    let agent = Agent::start_with_state_dir(state.path(), &[]);
    let (status, started) = curl_json(
        "POST",
        &format!(
            "{}/drain?port={port}&netns={}&timeout=6s&on_timeout=close",
            agent.url,
            x.path()
        ),
    );
    assert_eq!(status, 201, "{started}");
    let id = started["id"].as_u64().expect("id");
    // Longer than the agent's stop may take under load (its blocking work is waited for
    // up to 3 s): a deadline reached before the stop closed X's connection there, and
    // nothing was left to restore (a CI run with 2 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    go(agent, Stop::Term);

    // X goes; Y gets its inode (the lowest free one: once X's is given back).
    drop(x_sockets);
    drop(x);
    let mut y = None;
    for attempt in 0..50 {
        let candidate = common::Netns::new(&format!("nsy{attempt}"));
        if inode_of(&candidate.path()) == x_inode {
            y = Some(candidate);
            break;
        }
        drop(candidate);
        std::thread::sleep(Duration::from_millis(100));
    }
    let y = y.expect("a new namespace with X's inode");
    let (_y_listener, mut y_client, _y_accepted) = connected_in(&y, port);
    std::thread::sleep(deadline.saturating_duration_since(std::time::Instant::now()));

    let agent = Agent::start_with_state_dir(state.path(), &[]);
    let mut ended = None;
    for _ in 0..150 {
        let recent = agent.get_json("/drains").1["recent"].clone();
        ended = recent
            .as_array()
            .and_then(|recent| recent.iter().find(|drain| drain["id"] == id).cloned());
        if ended.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ended = ended.expect("X's drain ended");
    assert_eq!(
        (&ended["result"], &ended["closed_by_agent"]),
        (&"drained".into(), &0.into()),
        "{ended}"
    );
    y_client.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0_u8; 1];
    let read = y_client.read(&mut byte);
    assert!(
        matches!(&read, Err(problem) if problem.kind() == std::io::ErrorKind::WouldBlock),
        "Y's connection: {read:?}"
    );
    let (status, own) = curl_json(
        "POST",
        &format!(
            "{}/drain?port={port}&netns={}&timeout=10m&on_timeout=close",
            agent.url,
            y.path()
        ),
    );
    assert_eq!(status, 201, "Y's own drain: {own}");
}
