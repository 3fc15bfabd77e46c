//! The drain rule in real traffic, against the real agent and real sockets: a connection
//! with unread data or unacknowledged data is busy, one silent for the idle bar is idle,
//! probe traffic from an ignored source neither holds the drain nor restarts the quiet
//! window, and a streaming response is busy for its whole life.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use common::{Agent, kernel_available};

/// A client connection from `source` (a loopback address) to `port`, and the accepted end.
fn connect_from(source: &str, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let port = listener.local_addr().expect("addr").port();
    let target = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
    let socket = common::connect_from(source.parse().expect("ip"), target).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    (socket, accepted)
}

fn drained(agent: &Agent, query: &str) -> (u16, serde_json::Value, Duration) {
    let started = Instant::now();
    let (status, body) = agent.get_json(&format!("/drained?{query}"));
    (status, body, started.elapsed())
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn queued_data_is_busy_and_silence_is_idle() {
    if !kernel_available("queued_data_is_busy_and_silence_is_idle") {
        return;
    }
    let agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();

    // 1. Unread data in the server's receive queue: busy, however long.
    let (mut client, server_end) = connect_from("127.0.0.1", &listener);
    client.write_all(&[7; 100]).expect("write");
    let (status, body, _) = drained(&agent, &format!("port={port}&idle=200ms&timeout=700ms"));
    assert_eq!(
        (status, &body["busy"]),
        (503, &serde_json::json!(1)),
        "{body}"
    );
    assert_eq!(body["peers"][0]["recv_queue"], 100, "{body}");
    drop(client);
    drop(server_end);

    // 2. A peer that does not read while the server writes: data unacknowledged or unsent.
    let (client, mut server_end) = connect_from("127.0.0.1", &listener);
    server_end.set_nonblocking(true).expect("nonblocking");
    let mut sent = 0usize;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        match server_end.write(&[1; 65_536]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(sent > 0);
    let (status, body, _) = drained(&agent, &format!("port={port}&idle=200ms&timeout=700ms"));
    assert_eq!(
        (status, &body["busy"]),
        (503, &serde_json::json!(1)),
        "{body}"
    );
    assert!(
        body["peers"][0]["send_queue"].as_u64().unwrap_or(0) > 0,
        "{body}"
    );
    drop(client);
    drop(server_end);

    // 3. Silent for the bar: idle. Drained with the option (after the bar), not without.
    let (client, server_end) = connect_from("127.0.0.1", &listener);
    let (status, body, took) = drained(&agent, &format!("port={port}&idle=1s&timeout=10s"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["idle"], &body["busy"]),
        (&serde_json::json!(1), &serde_json::json!(0))
    );
    assert!(
        took >= Duration::from_millis(700),
        "turned idle at {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "woken when it turned idle, not later: {took:?}"
    );
    let (status, body, _) = drained(&agent, &format!("port={port}&timeout=500ms"));
    assert_eq!(status, 503, "strict by default: {body}");
    println!("idle after {took:?}; strict answer: {body}");
    drop(client);
    drop(server_end);
}

/// A slow first request on a new connection is busy, not idle. The client sends its
/// request microseconds after its handshake; the kernel stamps the accepted socket's last
/// send and last receive with the tick it was created in (`tcp_create_openreq_child`), and
/// the request nearly always arrives in that same tick. A server that has not answered yet
/// has sent nothing, so the two times stay equal: compared alone they said "not awaiting a
/// reply", and an idle drain answered drained while the request was still being worked on.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_first_request_read_and_not_answered_is_busy() {
    if !kernel_available("a_first_request_read_and_not_answered_is_busy") {
        return;
    }
    let agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let request = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n";
    // The request goes out right after the handshake, as a client's does.
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.write_all(request).expect("request");
    let (mut server_end, _) = listener.accept().expect("accept");
    // The server reads the whole request (its receive queue is empty) and never answers.
    let mut read = vec![0; request.len()];
    server_end.read_exact(&mut read).expect("read the request");

    let (status, body, took) = drained(&agent, &format!("port={port}&idle=1s&timeout=3s"));
    assert_eq!(
        (status, &body["busy"], &body["idle"]),
        (503, &serde_json::json!(1), &serde_json::json!(0)),
        "a request read and not answered was taken for idle after {took:?}: {body}"
    );
    let (status, body) = agent.get_json(&format!("/connections?port={port}&peers=true"));
    assert_eq!(status, 200, "{body}");
    let peer = &body["endpoints"][0]["peers"][0];
    assert_eq!(
        (
            &peer["recv_queue"],
            &peer["send_queue"],
            &peer["awaiting_reply"],
            &peer["busy"]
        ),
        (
            &serde_json::json!(0),
            &serde_json::json!(0),
            &serde_json::json!(true),
            &serde_json::json!(true)
        ),
        "{body}"
    );

    // Once answered, and silent for the bar, the same connection is idle (a keep-alive
    // connection between requests).
    server_end
        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .expect("answer");
    let mut answer = [0; 64];
    let n = client.read(&mut answer).expect("read the answer");
    assert!(answer[..n].starts_with(b"HTTP/1.1 204"));
    let (status, body, _) = drained(&agent, &format!("port={port}&idle=1s&timeout=5s"));
    assert_eq!(
        (status, &body["idle"], &body["busy"]),
        (200, &serde_json::json!(1), &serde_json::json!(0)),
        "{body}"
    );
    drop(client);
    drop(server_end);
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn an_ignored_source_neither_holds_the_drain_nor_restarts_the_quiet_window() {
    if !kernel_available("an_ignored_source_neither_holds_the_drain_nor_restarts_the_quiet_window")
    {
        return;
    }
    let agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // A probe connection from the "node" address, held open.
    let (_probe, _probe_end) = connect_from("127.0.0.5", &listener);
    let query = format!("port={port}&quiet=1s&ignore=127.0.0.5/32&timeout=10s");
    // Probes keep arriving during the window: they do not restart it.
    let prober = {
        let listener = listener.try_clone().expect("clone");
        thread::spawn(move || {
            for _ in 0..8 {
                let pair = connect_from("127.0.0.5", &listener);
                drop(pair);
                thread::sleep(Duration::from_millis(150));
            }
        })
    };
    let (status, body, took) = drained(&agent, &query);
    prober.join().expect("prober");
    assert_eq!(status, 200, "{body}");
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(
        took < Duration::from_millis(1_800),
        "probes restarted the window: {took:?}"
    );
    // A real arrival half-way does restart it.
    let arriving = {
        let listener = listener.try_clone().expect("clone");
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(500));
            let pair = connect_from("127.0.0.1", &listener);
            thread::sleep(Duration::from_millis(100));
            drop(pair);
        })
    };
    let (status, body, took) = drained(&agent, &query);
    arriving.join().expect("arrival");
    assert_eq!(status, 200, "{body}");
    assert!(
        took >= Duration::from_millis(1_500),
        "the arrival restarts the window: {took:?}"
    );
    println!("quiet window: {took:?} with a real arrival half-way");
}

/// A chunked response that writes a piece every second for `seconds`.
fn stream_for(mut stream: TcpStream, seconds: u64) {
    let mut request = [0; 1024];
    let _ = stream.read(&mut request);
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..seconds {
        let _ = stream.write_all(b"6\r\npiece\n\r\n");
        thread::sleep(Duration::from_secs(1));
    }
    let _ = stream.write_all(b"0\r\n\r\n");
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_long_streaming_response_is_busy_for_its_whole_life() {
    if !kernel_available("a_long_streaming_response_is_busy_for_its_whole_life") {
        return;
    }
    const STREAM: u64 = 20;
    let agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream_for(stream, STREAM);
    });
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client
        .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let reader = thread::spawn(move || {
        let mut body = Vec::new();
        let _ = client.read_to_end(&mut body);
        body
    });
    let started = Instant::now();
    // With and without the idle option, the drain waits for the stream to end. Two scopes
    // (the port, and the port at 127.0.0.1): one scope's drain has one rule, and a waiter
    // naming another gets 409.
    let idle = thread::spawn({
        let url = agent.url.clone();
        move || {
            let url = drain_agent::cli::client::AgentUrl::parse(&url).expect("url");
            let answer = drain_agent::cli::client::get(
                &url,
                &format!("/drained?port={port}&addr=127.0.0.1&idle=2s&timeout=60s"),
                Duration::from_secs(70),
            )
            .expect("answer");
            (answer.status, Instant::now())
        }
    });
    let (status, body, _) = drained(&agent, &format!("port={port}&timeout=60s"));
    let strict_at = started.elapsed();
    let (idle_status, idle_at) = idle.join().expect("idle waiter");
    let idle_at = idle_at.duration_since(started);
    server.join().expect("server");
    let body_bytes = reader.join().expect("reader");
    assert_eq!(status, 200, "{body}");
    assert_eq!(idle_status, 200);
    assert!(
        body_bytes.ends_with(b"0\r\n\r\n"),
        "the stream ran to its end"
    );
    for (arm, at) in [("strict", strict_at), ("idle=2s", idle_at)] {
        assert!(
            at >= Duration::from_secs(STREAM - 1),
            "{arm}: drained after {at:?}, while the stream was still sending"
        );
    }
    println!("streaming {STREAM} s: strict drained at {strict_at:?}, idle=2s at {idle_at:?}");
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn connections_with_peers_lists_who_is_still_connected() {
    if !kernel_available("connections_with_peers_lists_who_is_still_connected") {
        return;
    }
    let agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (client, _server_end) = connect_from("127.0.0.7", &listener);
    let client_addr: SocketAddr = client.local_addr().expect("addr");
    thread::sleep(Duration::from_millis(300));
    let (status, body) = agent.get_json(&format!("/connections?port={port}&peers=true"));
    assert_eq!(status, 200, "{body}");
    let peer = &body["endpoints"][0]["peers"][0];
    assert_eq!(peer["remote"], client_addr.to_string(), "{body}");
    assert!(peer["age_ms"].as_u64().unwrap_or(0) >= 250, "{body}");
    assert!(peer["idle_ms"].as_u64().unwrap_or(0) >= 250, "{body}");
    // `wait` names them in its progress and its last line.
    let output = std::process::Command::new(common::agent_binary())
        .args([
            "wait",
            "--port",
            &port.to_string(),
            "--timeout",
            "2500ms",
            "--progress",
            "1s",
        ])
        .env("DRAIN_AGENT_URL", &agent.url)
        .output()
        .expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{port}: 1 active")) && stderr.contains(&client_addr.to_string()),
        "{stderr}"
    );
    assert!(
        stderr.lines().count() >= 2,
        "progress lines and the last line: {stderr}"
    );
    println!("{stderr}");
    drop(client);
}

/// `wait --timeout 2s --quiet 2s` on a port nothing holds: a quiet window as long as the
/// timeout is allowed (only a longer one is a 400), so the wait ends at about 2 s, drained
/// or not (the window and the deadline end together), never refused. `wait` used to ask
/// for what was left of its timeout a few microseconds after it started, 1999 ms, and the
/// agent refused `quiet=2000ms` at once (exit 2).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn wait_with_quiet_as_long_as_its_timeout_is_not_refused() {
    if !kernel_available("wait_with_quiet_as_long_as_its_timeout_is_not_refused") {
        return;
    }
    let agent = Agent::start(&[]);
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let started = Instant::now();
    let output = std::process::Command::new(common::agent_binary())
        .args(["wait", "--port", &port.to_string()])
        .args(["--timeout", "2s", "--quiet", "2s", "--agent", &agent.url])
        .output()
        .expect("wait");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!(
        "wait --timeout 2s --quiet 2s: exit {:?} after {took:?}: {}{stderr}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(matches!(output.status.code(), Some(0 | 1)), "{stderr}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}
