//! The agent restarted while a service drains (issue 23): a service that closed its
//! listener and keeps serving its connections (how nginx, Go's `Shutdown`, Envoy and
//! HAProxy drain) must not be answered "drained" by a new agent, which never saw those
//! connections open and finds no listener to call them inbound. On 942aa50 the restarted
//! agent answered `200 drained:true active:0` with 20 connections open.
//! Both ways a restarted agent gets its counts: seeded afresh by its walk (its own pin
//! directory, nothing to adopt) and adopted from the first agent's pins (the same one; the
//! classic tracepoint's attachment is a BPF link that can be pinned only from Linux 5.15,
//! so before that it is seeded either way).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::{Agent, PinDir, kernel_available};

/// Twenty connections to a listener that is then closed: the server ends are kept.
fn served_without_a_listener() -> (u16, Vec<TcpStream>, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let clients: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let servers: Vec<TcpStream> = (0..20)
        .map(|_| listener.accept().expect("accept").0)
        .collect();
    drop(listener);
    (port, clients, servers)
}

/// Whether the running kernel links BPF programs to perf events (`BPF_LINK_TYPE_PERF_EVENT`,
/// Linux 5.15), which makes the classic tracepoint's attachment a link that can be pinned.
fn perf_links() -> bool {
    common::kernel_version().1 >= (5, 15)
}

fn answer(agent: &Agent, port: u16) -> (u16, serde_json::Value) {
    agent.get_json(&format!("/drained?port={port}&timeout=0"))
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_restarted_agent_does_not_call_a_draining_service_drained() {
    if !kernel_available("a_restarted_agent_does_not_call_a_draining_service_drained") {
        return;
    }
    for attach in ["tp-btf", "tracepoint", "raw-tracepoint"] {
        for (kill, adopt) in [(false, false), (true, false), (false, true), (true, true)] {
            let first_pins = PinDir::new();
            let second_pins = PinDir::new();
            let mut agent = Agent::start(&["--attach", attach, "--pin-dir", &first_pins.arg()]);
            let (port, mut clients, mut servers) = served_without_a_listener();
            let (status, body) = answer(&agent, port);
            assert_eq!(
                (status, &body["active"]),
                (503, &20.into()),
                "{attach}: {body}"
            );
            if kill {
                // SAFETY: kill(2) on the agent, a child of this test.
                let killed =
                    unsafe { libc::kill(i32::try_from(agent.pid()).expect("pid"), libc::SIGKILL) };
                assert_eq!(killed, 0);
            }
            agent.stop();
            let pins = if adopt { &first_pins } else { &second_pins };
            let agent = Agent::start(&["--attach", attach, "--pin-dir", &pins.arg()]);
            let adopted = agent.log_text().contains("kernel state adopted");
            assert_eq!(
                adopted,
                adopt && (attach != "tracepoint" || perf_links()),
                "{attach}, kill {kill}, adopt {adopt}: {}",
                agent.log_text()
            );
            let (status, body) = answer(&agent, port);
            assert_eq!(status, 503, "{attach}, kill {kill}: {body}");
            assert_eq!(body["drained"], false, "{attach}, kill {kill}: {body}");
            assert_eq!(body["active"], 20, "{attach}, kill {kill}: {body}");
            // Closes are followed (from the socket tables while the doubt stands).
            clients.truncate(5);
            servers.truncate(5);
            let started = Instant::now();
            loop {
                let (_, body) = answer(&agent, port);
                if body["active"] == 5 {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{attach}: 15 closed, the agent says {body}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(clients);
            drop(servers);
            let (status, body) = agent.get_json(&format!("/drained?port={port}&timeout=10s"));
            assert_eq!(status, 200, "{attach}: {body}");
            eprintln!(
                "{attach}, kill -9 {kill}, adopted {adopted}: 20 held across the restart, then drained"
            );
        }
    }
}
