//! Pods on one node, simulated: network namespaces with their own IPs on veth pairs, each
//! listening on the same port, clients in the host namespace. A pod's drain must see only
//! its own connections. Also `drain-agent wait` and `status` against the real agent.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use common::{
    Agent, Server, agent_binary, free_port, kernel_available,
    pod::{Pod, connect},
};

fn wait_command(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new(agent_binary())
        .arg("wait")
        .args(args)
        .output()
        .expect("run drain-agent wait");
    (output, started.elapsed())
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exit code")
}

fn assert_exit(output: &Output, expected: i32) {
    assert_eq!(
        code(output),
        expected,
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn pods_on_one_port_drain_apart() {
    if !kernel_available("pods_on_one_port_drain_apart") {
        return;
    }
    let agent = Agent::start(&[]);
    let port = free_port();
    let pod_a = Pod::new("poda", 1);
    let pod_b = Pod::new("podb", 2);
    let server_a = pod_a.listen(port);
    let server_b = pod_b.listen(port);
    let clients_a = connect(&pod_a.ip, port, 3, &server_a);
    let clients_b = connect(&pod_b.ip, port, 5, &server_b);

    let count = |query: &str| {
        let (_, body) = agent.get_json(&format!("/drained?port={port}&timeout=0{query}"));
        body["active"].as_u64().expect("active")
    };
    assert_eq!(count(&format!("&addr={}", pod_a.ip)), 3, "pod A by IP");
    assert_eq!(count(&format!("&addr={}", pod_b.ip)), 5, "pod B by IP");
    assert_eq!(
        count(&format!("&netns={}", pod_a.netns.path())),
        3,
        "pod A by netns path"
    );
    assert_eq!(
        count(&format!("&netns={}", pod_b.netns.path())),
        5,
        "pod B by netns path"
    );
    assert_eq!(count(""), 8, "unscoped: the whole node");
    let (_, listing) = agent.get_json(&format!("/connections?port={port}"));
    assert_eq!(
        listing["endpoints"].as_array().expect("endpoints").len(),
        2,
        "{listing}"
    );

    // `status` shows both pods in a table.
    let status = Command::new(agent_binary())
        .args(["status", "--agent", &agent.url])
        .output()
        .expect("status");
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{table}");
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.trim_start().starts_with("PORT")),
        "{table}"
    );
    assert!(
        table.contains(&pod_a.ip) && table.contains(&pod_b.ip),
        "{table}"
    );

    // Pod B's preStop waits while pod A drains: B is still busy, so it gives up (1).
    let addr_b = pod_b.ip.clone();
    let (output, _) = wait_command(&[
        "--port",
        &port.to_string(),
        "--addr",
        &addr_b,
        "--timeout",
        "500ms",
        "--agent",
        &agent.url,
    ]);
    assert_exit(&output, 1);
    assert!(String::from_utf8_lossy(&output.stderr).contains(": 5 active"));

    // Pod A's preStop blocks until A's connections close, then exits 0 at once.
    let url = agent.url.clone();
    let addr_a = pod_a.ip.clone();
    let waiting = thread::spawn(move || {
        wait_command(&[
            "--port",
            &port.to_string(),
            "--addr",
            &addr_a,
            "--timeout",
            "20s",
            "--agent",
            &url,
        ])
    });
    // The preStop's request has reached the agent and blocks there.
    agent.wait_for_waiters(1);
    assert!(!waiting.is_finished(), "wait returned while pod A was busy");
    drop(clients_a);
    server_a.close_all();
    let (output, took) = waiting.join().expect("wait thread");
    assert_exit(&output, 0);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(count(&format!("&addr={}", pod_a.ip)), 0);
    assert_eq!(
        count(&format!("&addr={}", pod_b.ip)),
        5,
        "B untouched by A's drain"
    );
    assert_eq!(count(""), 5);

    drop(clients_b);
    server_b.close_all();
    assert_eq!(count(""), 0);
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn wait_exit_codes_against_the_real_agent() {
    if !kernel_available("wait_exit_codes_against_the_real_agent") {
        return;
    }
    // Usage errors: 2, without asking anybody.
    for bad in [
        vec!["--port", "0"],
        vec!["--port", "80", "--timeout", "soon"],
        vec!["--port", "80", "--agent", "ftp://x"],
    ] {
        let (output, _) = wait_command(&bad);
        assert_eq!(
            code(&output),
            2,
            "{bad:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // Nobody listening where the agent should be: 2 after the timeout, with a clear message.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (output, took) = wait_command(&["--port", "80", "--timeout", "1s", "--agent", &nowhere]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(code(&output), 2, "{stderr}");
    assert!(stderr.contains("agent unreachable"), "{stderr}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );

    // An agent that comes up while `wait` is retrying (e.g. restarting) is found in time.
    let agent_port = free_port();
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    let url = format!("http://127.0.0.1:{agent_port}");
    let waiting = {
        let url = url.clone();
        thread::spawn(move || {
            wait_command(&[
                "--port",
                &port.to_string(),
                "--timeout",
                "30s",
                "--agent",
                &url,
            ])
        })
    };
    // The scenario, not synchronisation: the agent is away for a while (`wait` retries
    // every 250 ms meanwhile), then comes up.
    thread::sleep(Duration::from_millis(700));
    let agent = Agent::start_on(agent_port, &[]);
    let (output, _) = waiting.join().expect("wait thread");
    assert_exit(&output, 0);

    // Busy port, short timeout: 1. Then drained: 0. Bad request relayed: 2.
    let clients = connect("127.0.0.1", port, 2, &server);
    let (output, _) = wait_command(&[
        "--port",
        &port.to_string(),
        "--timeout",
        "300ms",
        "--agent",
        &agent.url,
    ]);
    assert_exit(&output, 1);
    drop(clients);
    server.close_all();
    let (output, _) = wait_command(&[
        "--port",
        &port.to_string(),
        "--timeout",
        "5s",
        "--agent",
        &agent.url,
    ]);
    assert_exit(&output, 0);
    assert!(String::from_utf8_lossy(&output.stdout).contains("drained"));
    let (output, _) = wait_command(&[
        "--port",
        &port.to_string(),
        "--netns",
        "/etc/hostname",
        "--timeout",
        "5s",
        "--agent",
        &agent.url,
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(code(&output), 2, "{stderr}");
    assert!(stderr.contains("netns"), "{stderr}");
}

/// A stop hook with a wrong `--netns` (an inode no namespace has) is refused by the agent
/// with 404, and `wait` ends at once with exit 2 (a usage error): asking again cannot
/// change the answer. Before, every status but 400, 401, 403, 409 and 422 was retried
/// until the timeout and then exited 1, "not drained within 10s: agent answered 404".
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn wait_for_an_unknown_netns_inode_is_refused_at_once() {
    if !kernel_available("wait_for_an_unknown_netns_inode_is_refused_at_once") {
        return;
    }
    let unknown = 1;
    assert!(
        !drain_agent::sys::netns::all_namespaces()
            .expect("scan")
            .contains_key(&unknown),
        "inode {unknown} is a network namespace here"
    );
    let agent = Agent::start(&[]);
    let (output, took) = wait_command(&[
        "--port",
        "8080",
        "--netns",
        &unknown.to_string(),
        "--timeout",
        "10s",
        "--agent",
        &agent.url,
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!(
        "wait --netns {unknown} --timeout 10s: exit {:?} after {took:?}: {stderr}",
        output.status.code()
    );
    assert_eq!(code(&output), 2, "{stderr}");
    assert!(
        stderr.contains("refused") && stderr.contains("404") && stderr.contains("inode 1"),
        "{stderr}"
    );
    assert!(
        took < Duration::from_secs(3),
        "refused at once, not after its timeout: {took:?}"
    );
}

/// Audit (held gates): after a root drain scoped `addr=<pod A's IP>` ended, its gate was
/// reopened by a listener on the port in any namespace: pod B's (a rolling update's
/// replacement) put A back in rotation while A was stopping. Only a listener that can take
/// connections to A's address (bound to it, or to its family's wildcard, in the namespace
/// that holds it) is a new instance of A.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn another_pods_listener_does_not_reopen_a_pods_held_gate() {
    if !kernel_available("another_pods_listener_does_not_reopen_a_pods_held_gate") {
        return;
    }
    let agent = Agent::start(&[]);
    let port = free_port();
    let pod_a = Pod::new("glc", 81);
    let pod_b = Pod::new("gld", 82);
    // A's listener, held here (no connection is made): closed when dropped.
    let listening =
        move |bind: String| move || std::net::TcpListener::bind(&bind).expect("bind in pod A");
    let server_a = pod_a.netns.run_in(listening(format!("0.0.0.0:{port}")));
    let health = || {
        common::http::curl(
            None,
            None,
            "GET",
            &format!("{}/health?port={port}&addr={}", agent.url, pod_a.ip),
        )
        .0
    };
    assert_eq!(health(), 200, "A in rotation before its drain");

    let (status, body) = common::http::curl_json(
        "POST",
        &format!(
            "{}/drain?port={port}&addr={}&timeout=2s",
            agent.url, pod_a.ip
        ),
    );
    assert_eq!(status, 201, "{body}");
    let id = body["id"].clone();
    common::wait_until("A's drain ends", Duration::from_secs(20), || {
        let (_, drains) = agent.get_json("/drains");
        drains["recent"]
            .as_array()
            .expect("recent")
            .iter()
            .any(|record| record["id"] == id && record["result"] == "drained")
    });
    assert_eq!(health(), 503, "A's gate is held after its drain");

    // B (another pod, same port) starts listening: not a new instance of A.
    let _server_b = pod_b.listen(port);
    for _ in 0..5 {
        assert_eq!(health(), 503, "B's listener put A back in rotation");
        thread::sleep(Duration::from_millis(200));
    }

    // A new instance of A, on [::] (dual-stack: it takes A's IPv4 address): back in rotation.
    drop(server_a);
    let _new_a = pod_a.netns.run_in(listening(format!("[::]:{port}")));
    common::wait_until(
        "A's new instance puts A back in rotation",
        Duration::from_secs(10),
        || health() == 200,
    );
}
