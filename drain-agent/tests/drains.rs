//! The whole drain against the real agent: the `/health` gate, the deadline enforced by
//! closing what is left (and not without asking), and one correct record per drain in
//! `/drains` and in the journal, also across an agent restart.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    io::Read as _,
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, Server, kernel_available};

fn post(agent: &Agent, path: &str) -> (u16, serde_json::Value) {
    request(agent, "POST", path)
}

fn request(agent: &Agent, method: &str, path: &str) -> (u16, serde_json::Value) {
    common::http::curl_json(method, &format!("{}{path}", agent.url))
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_health_gate_follows_the_drain_within_milliseconds() {
    if !kernel_available("the_health_gate_follows_the_drain_within_milliseconds") {
        return;
    }
    let agent = Agent::start(&[]);
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    server.wait_accepted(1);
    assert_eq!(agent.get_json(&format!("/health?port={port}")).0, 200);
    let (status, record) = post(&agent, &format!("/drain?port={port}&timeout=5m"));
    let started = Instant::now();
    assert_eq!(status, 201, "{record}");
    let (status, body) = agent.get_json(&format!("/health?port={port}"));
    let flipped = started.elapsed();
    assert_eq!((status, &body["draining"]), (503, &serde_json::json!(true)));
    assert!(flipped < Duration::from_millis(200), "{flipped:?}");
    let (status, again) = post(&agent, &format!("/drain?port={port}&timeout=5m"));
    assert_eq!((status, &again["id"]), (200, &record["id"]), "idempotent");
    let (status, cancelled) = request(&agent, "DELETE", &format!("/drain?port={port}"));
    let cancelled_at = Instant::now();
    assert_eq!(
        (status, &cancelled["result"]),
        (200, &serde_json::json!("cancelled"))
    );
    assert_eq!(agent.get_json(&format!("/health?port={port}")).0, 200);
    println!(
        "/health: 503 {flipped:?} after the drain started, 200 {:?} after it was cancelled",
        cancelled_at.elapsed()
    );
}

fn wait_output(agent: &Agent, args: &[&str]) -> std::process::Output {
    Command::new(common::agent_binary())
        .arg("wait")
        .args(args)
        .env("DRAIN_AGENT_URL", &agent.url)
        .output()
        .expect("wait")
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_deadline_closes_what_is_left_only_when_asked() {
    if !kernel_available("the_deadline_closes_what_is_left_only_when_asked") {
        return;
    }
    let agent = Agent::start(&[]);
    let server = Server::start("127.0.0.1:0");
    let port = server.port.to_string();
    let mut client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    server.wait_accepted(1);

    // Without the deadline action: 503 / exit 1, nothing closed.
    let output = wait_output(&agent, &["--port", &port, "--timeout", "1500ms"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let still_open = matches!(client.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut);
    assert!(still_open, "nothing is closed without --close-at-timeout");

    // With it: the drain ends at the timeout, the client sees a reset, the stop proceeds.
    let started = Instant::now();
    let output = wait_output(
        &agent,
        &["--port", &port, "--timeout", "1500ms", "--close-at-timeout"],
    );
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(stdout.contains("closed 1 connection"), "{stdout}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let reset = client.read(&mut byte);
    assert!(
        matches!(&reset, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client sees a reset: {reset:?}"
    );
    agent.expect_active(server.port, 0);
    let (_, drains) = agent.get_json("/drains");
    let recent = drains["recent"].as_array().expect("recent");
    assert_eq!(recent.len(), 2, "{drains}");
    assert_eq!(recent[0]["result"], "closed_at_deadline");
    assert_eq!(recent[0]["closed_by_agent"], 1);
    assert_eq!(recent[0]["active_at_start"], 1);
    assert_eq!(recent[1]["result"], "timeout");
    assert_eq!(recent[1]["closed_by_agent"], 0);
    println!("closed at the deadline after {took:?}: {stdout}");
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn every_drain_is_on_record_also_across_a_restart() {
    if !kernel_available("every_drain_is_on_record_also_across_a_restart") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("drains.jsonl");
    let journal_arg = journal.to_str().expect("path").to_owned();
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    let (record_id, agent_port) = {
        let agent = Agent::start(&["--journal", &journal_arg]);
        let first = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let second = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        server.wait_accepted(2);
        agent.expect_active(port, 2);
        let waiter = {
            let url = agent.url.clone();
            std::thread::spawn(move || {
                let url = drain_agent::cli::client::AgentUrl::parse(&url).expect("url");
                drain_agent::cli::client::get(
                    &url,
                    &format!("/drained?port={port}&timeout=20s&quiet=300ms"),
                    Duration::from_secs(30),
                )
                .expect("answer")
            })
        };
        agent.wait_for_waiters(1);
        // One late arrival while draining, then everything closes.
        let late = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        server.wait_accepted(3);
        drop((first, second, late));
        server.close_all();
        let answer = waiter.join().expect("waiter");
        assert_eq!(answer.status, 200, "{}", answer.body);
        let body: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
        // The drain ends with the answer; its record moves to `recent` right after.
        common::wait_until("the drain's record", Duration::from_secs(5), || {
            agent.get_json("/drains").1["recent"][0]["id"] == body["drain"]
        });
        let (_, drains) = agent.get_json("/drains");
        let record = drains["recent"][0].clone();
        assert_eq!(record["id"], body["drain"], "{drains}");
        assert_eq!(record["result"], "drained");
        assert_eq!(record["active_at_start"], 2);
        assert_eq!(record["late_arrivals"], 1);
        assert!(record["first_zero_after_ms"].is_u64(), "{record}");
        let metrics = agent.try_get("/metrics").expect("metrics").1;
        assert!(
            metrics.contains("drain_agent_drains_total{result=\"drained\"} 1"),
            "{metrics}"
        );
        (record["id"].as_u64().expect("id"), agent.port)
    };
    // The journal holds exactly that record, one JSON object per line.
    let text = std::fs::read_to_string(&journal).expect("journal");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["id"], record_id);
    // A new agent reads it back, and numbers its next drain after it.
    let agent = Agent::start(&["--journal", &journal_arg]);
    assert_ne!(agent.port, 0);
    let _ = agent_port;
    let (_, drains) = agent.get_json("/drains");
    assert_eq!(drains["recent"][0]["id"], record_id, "{drains}");
    let (status, next) = post(&agent, &format!("/drain?port={port}&timeout=1s"));
    assert_eq!(status, 201);
    assert!(next["id"].as_u64().expect("id") > record_id);
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn status_advises_a_timeout_from_history() {
    if !kernel_available("status_advises_a_timeout_from_history") {
        return;
    }
    let agent = Agent::start(&[]);
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    for _ in 0..5 {
        let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        server.wait_accepted(1);
        std::thread::sleep(Duration::from_millis(20));
        drop(client);
        server.close_all();
    }
    common::wait_until("closes counted", Duration::from_secs(5), || {
        agent.get_json("/advice").1.as_array().is_some_and(|ports| {
            ports
                .iter()
                .any(|p| p["port"] == port && p["connections"] == 5)
        })
    });
    let output = Command::new(common::agent_binary())
        .arg("status")
        .env("DRAIN_AGENT_URL", &agent.url)
        .output()
        .expect("status");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains(&format!("{port}: 5 closed"))
            && stdout.contains("drain --timeout 5s; terminationGracePeriodSeconds >= 20"),
        "{stdout}"
    );
    println!("{stdout}");
}

/// Both ways of closing at the deadline, through the agent: `bpf_sock_destroy()` (chosen
/// by default where the kernel has it) and the netlink fallback (forced with a flag).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn both_close_methods_close_at_the_deadline() {
    if !kernel_available("both_close_methods_close_at_the_deadline") {
        return;
    }
    for (flag, expected) in [("auto", "Bpf"), ("netlink", "Netlink")] {
        let agent = Agent::start(&["--close-method", flag]);
        // The log is read by a thread of its own: wait for the line, bounded.
        let line = format!("connections closed at a deadline use {expected}");
        common::wait_until(&line, Duration::from_secs(5), || {
            agent.log_text().contains(&line)
        });
        let server = Server::start("127.0.0.1:0");
        let mut client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        server.wait_accepted(1);
        let output = wait_output(
            &agent,
            &[
                "--port",
                &server.port.to_string(),
                "--timeout",
                "1s",
                "--close-at-timeout",
            ],
        );
        assert_eq!(output.status.code(), Some(0), "{flag}: {output:?}");
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        let reset = client.read(&mut byte);
        assert!(
            matches!(&reset, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{flag}: {reset:?}"
        );
        let (_, drains) = agent.get_json("/drains");
        assert_eq!(
            drains["recent"][0]["closed_by_agent"], 1,
            "{flag}: {drains}"
        );
        println!("{flag}: closed with {expected}");
    }
}

/// Issue 22: a waiter that joined a longer drain was answered at the drain's pace, not its
/// own (a `timeout=3s` preStop hung 30 s), and a close request silently joined a drain that
/// keeps (its close dropped). Each waiter is answered at its own timeout; a request whose
/// named settings differ gets 409 naming them; `drain-agent wait` stops on it (exit 2).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_waiter_is_answered_at_its_own_timeout_and_a_conflicting_close_is_refused() {
    if !kernel_available(
        "a_waiter_is_answered_at_its_own_timeout_and_a_conflicting_close_is_refused",
    ) {
        return;
    }
    let agent = Agent::start(&[]);
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    server.wait_accepted(1);
    let (status, body) = post(&agent, &format!("/drain?port={port}&timeout=10m"));
    assert_eq!(status, 201, "{body}");
    let mut late = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (status, body) = agent.get_json(&format!("/drained?port={port}&timeout=3s"));
        let waited = started.elapsed();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["drain"], 1, "it joined the 10-minute drain: {body}");
        late.push(waited);
    }
    eprintln!("timeout=3s waiters in a 10-minute drain answered after {late:?}");
    for waited in &late {
        assert!(
            *waited >= Duration::from_secs(3) && *waited <= Duration::from_millis(3100),
            "{late:?}"
        );
    }
    let (status, body) =
        agent.get_json(&format!("/drained?port={port}&timeout=3s&on_timeout=close"));
    assert_eq!(status, 409, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("on_timeout=keep (asked close)"),
        "{message}"
    );
    let (status, _) = post(
        &agent,
        &format!("/drain?port={port}&timeout=1s&on_timeout=close"),
    );
    assert_eq!(status, 409);
    let output = Command::new(common::agent_binary())
        .args(["wait", "--port", &port.to_string(), "--timeout", "3s"])
        .args(["--close-at-timeout", "--agent", &agent.url])
        .output()
        .expect("wait");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("409"),
        "{output:?}"
    );
    // Nothing was closed, and the drain is the one posted.
    assert_eq!(agent.active(port), 1);
    let (_, body) = agent.get_json("/drains");
    assert_eq!(body["in_progress"][0]["on_timeout"], "keep", "{body}");
}

/// Audit (slices): `drain-agent wait` over 10 minutes asks in slices; each slice that ran
/// out ended its drain `timeout` (`drains_total`, `/drains`, the journal), so the alerts
/// read a hook that went on waiting as one cut short. A slice says `continues=true`: its
/// drain ends `continued`, the scope stays out of rotation, and the next request (the
/// wait's last, without it) ends `drained` when the client goes.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_slice_of_a_longer_wait_ends_continued_not_timeout() {
    if !kernel_available("a_slice_of_a_longer_wait_ends_continued_not_timeout") {
        return;
    }
    let agent = Agent::start(&[]);
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    server.wait_accepted(1);
    let (status, body) = agent.get_json(&format!("/drained?port={port}&timeout=1s&continues=true"));
    assert_eq!((status, &body["drained"]), (503, &serde_json::json!(false)));
    assert_eq!(
        agent.get_json(&format!("/health?port={port}")).0,
        503,
        "between the slices the scope stays out of rotation"
    );
    // The last request waits; the connection closes meanwhile.
    let (status, body) = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            server.close_all();
        });
        agent.get_json(&format!("/drained?port={port}&timeout=10s"))
    });
    drop(client);
    assert_eq!(status, 200, "{body}");
    let (_, drains) = agent.get_json("/drains");
    let results: Vec<_> = drains["recent"]
        .as_array()
        .expect("recent")
        .iter()
        .map(|record| record["result"].clone())
        .collect();
    assert_eq!(results, ["drained", "continued"], "{drains}");
    for (line, expected) in [
        ("drain_agent_drains_total{result=\"continued\"}", 1.0),
        ("drain_agent_drains_total{result=\"timeout\"}", 0.0),
        (
            "drain_agent_drain_requests_total{result=\"continued\"}",
            1.0,
        ),
        ("drain_agent_drain_requests_total{result=\"timeout\"}", 0.0),
    ] {
        assert_eq!(agent.metric(line), Some(expected), "{line}");
    }
}
