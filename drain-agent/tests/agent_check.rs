//! `drain_agent::http::agentcheck` against a real HAProxy (Debian package): a server line with
//! `agent-check agent-port P agent-inter 200ms agent-send "PORT\n"` pointing at a listener
//! served by `agentcheck::serve` with a gate the test flips. HAProxy's runtime API shows
//! the server going to DRAIN and back; the test measures how long each flip takes to show.
//! Also: a bad `agent-send` changes nothing (an operator's DRAIN stays), and — HAProxy's
//! semantics, documented in the module — `ready` undoes a runtime-API MAINT.
//!
//! No kernel needed: this runs as any user who has HAProxy installed.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;
#[allow(
    dead_code,
    reason = "shared with keepalive_pool.rs, which uses more of it"
)]
#[path = "keepalive_pool/haproxy.rs"]
mod haproxy;
#[allow(
    dead_code,
    reason = "shared with rolling_deploy.rs, which uses more of it"
)]
#[path = "rolling_deploy/processes.rs"]
mod processes;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use drain_agent::{drain::PortGate, http::agentcheck};
use haproxy::{Haproxy, ServerLine};

/// A gate with one switch: is the port draining.
#[derive(Default)]
struct Switch {
    port: u16,
    draining: AtomicBool,
}

impl PortGate for Switch {
    fn draining(
        &self,
        port: u16,
        addr: Option<std::net::IpAddr>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        let draining = addr.is_none() && port == self.port && self.draining.load(Ordering::SeqCst);
        Box::pin(async move { draining })
    }
}

/// `agentcheck::serve` on a runtime of its own; stopped (and awaited) on drop.
struct AgentCheck {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl AgentCheck {
    fn start(gate: Arc<dyn PortGate>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                agentcheck::serve(listener, gate, async {
                    let _ = stopped.await;
                })
                .await
            })
        });
        Self {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for AgentCheck {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
        if let Some(thread) = self.thread.take() {
            let result = thread.join().expect("agent-check thread");
            if !std::thread::panicking() {
                result.expect("agentcheck::serve");
            }
        }
    }
}

/// The status `show stat` gives a server in rotation: the servers have no health check
/// (`check`), so nothing but traffic and agent checks touches them, and HAProxy says
/// "no check" where it would say UP.
const SERVING: &str = "no check";

/// Polls `be/NAME`'s status every 10 ms until it starts with `wanted` (at most `limit`): how
/// long it took. (HAProxy says "DRAIN (agent)" for a forced DRAIN of a server with an agent
/// check, whoever set it: the agent and the runtime API set the same flag.)
fn time_until_status(haproxy: &Haproxy, name: &str, wanted: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status = haproxy.server_status(name);
        if status.starts_with(wanted) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "be/{name} still {status:?}, not {wanted:?}, after {limit:?}: {:?}",
            haproxy.server_stat(name)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn millis(durations: &[Duration]) -> String {
    durations
        .iter()
        .map(|d| format!("{}", d.as_millis()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn haproxy_follows_the_gate_through_agent_checks() {
    if !haproxy::available("haproxy_follows_the_gate_through_agent_checks") {
        return;
    }
    // The servers themselves: plain listeners (no health checks, so nothing connects to
    // them but traffic, of which there is none).
    let app = common::Server::start("127.0.0.1:0");
    let other = common::Server::start("127.0.0.1:0");
    let gate = Arc::new(Switch {
        port: app.port,
        draining: AtomicBool::new(false),
    });
    let agent = AgentCheck::start(Arc::clone(&gate) as Arc<dyn PortGate>);
    let agent_options = |send: &str| {
        format!(
            "agent-check agent-port {} agent-inter 200ms agent-send \"{send}\\n\"",
            agent.port
        )
    };
    let haproxy = Haproxy::start(
        Haproxy::prepare_dir("agent-check"),
        common::free_port(),
        &[
            ServerLine {
                name: "app".into(),
                port: app.port,
                options: agent_options(&app.port.to_string()),
            },
            // A typo in agent-send: the agent must neither drain it nor make it ready.
            ServerLine {
                name: "typo".into(),
                port: other.port,
                options: agent_options(&format!("{}x", other.port)),
            },
        ],
    );
    let limit = Duration::from_secs(3);

    // The agent is asked and answers `ready`: UP.
    time_until_status(&haproxy, "app", SERVING, limit);
    let stat = haproxy.server_stat("app");
    eprintln!(
        "be/app at start: status {:?}, agent_status {:?}, agent_desc {:?}",
        stat["status"], stat["agent_status"], stat["agent_desc"]
    );

    // Flip the gate a few times; each flip shows in HAProxy within a couple of agent-inters.
    let mut to_drain = Vec::new();
    let mut to_ready = Vec::new();
    // Each flip at another point of the 200 ms check cycle (a flip right after a state change
    // would always wait a whole agent-inter).
    for offset in [0, 40, 80, 120, 160] {
        std::thread::sleep(Duration::from_millis(offset));
        gate.draining.store(true, Ordering::SeqCst);
        to_drain.push(time_until_status(&haproxy, "app", "DRAIN", limit));
        if to_drain.len() == 1 {
            let stat = haproxy.server_stat("app");
            eprintln!(
                "be/app drained by the agent: status {:?}, weight {:?}, agent_desc {:?}",
                stat["status"], stat["weight"], stat["agent_desc"]
            );
        }
        std::thread::sleep(Duration::from_millis(200 - offset));
        gate.draining.store(false, Ordering::SeqCst);
        to_ready.push(time_until_status(&haproxy, "app", SERVING, limit));
    }
    to_drain.sort();
    to_ready.sort();
    eprintln!(
        "agent-check flips with agent-inter 200ms, gate flip to HAProxy status (ms, sorted): \
         to DRAIN [{}], back in rotation [{}]",
        millis(&to_drain),
        millis(&to_ready)
    );
    for took in to_drain.iter().chain(&to_ready) {
        assert!(*took < Duration::from_millis(1500), "a flip took {took:?}");
    }

    // A bad request changes nothing: an operator's DRAIN of the server stays DRAIN, and the
    // agent's answer shows as an error in HAProxy.
    let typo = haproxy.server_stat("typo");
    assert_eq!(typo["status"], SERVING, "{typo:?}");
    haproxy.admin("set server be/typo state drain");
    time_until_status(&haproxy, "typo", "DRAIN", limit);
    std::thread::sleep(Duration::from_millis(1000)); // five agent checks
    let typo = haproxy.server_stat("typo");
    assert!(typo["status"].starts_with("DRAIN"), "{typo:?}");
    assert!(
        typo["last_agt"].contains("invalid-request"),
        "the agent's answer is not reported: {typo:?}"
    );
    eprintln!("be/typo after 5 agent checks: {:?}", typo["last_agt"]);
    haproxy.admin("set server be/typo state ready");
    time_until_status(&haproxy, "typo", SERVING, limit);

    // HAProxy's semantics (the module says so): the agent's `ready` clears the forced MAINT
    // that the runtime API sets, so an operator's MAINT on a server with this agent check
    // lasts one agent-inter. `disable agent` first keeps it.
    haproxy.admin("set server be/app state maint");
    let undone = time_until_status(&haproxy, "app", SERVING, limit);
    eprintln!("runtime-API MAINT of be/app undone by the agent's `ready` after {undone:?}");
    haproxy.admin("disable agent be/app");
    haproxy.admin("set server be/app state maint");
    std::thread::sleep(Duration::from_millis(1000));
    let status = haproxy.server_status("app");
    assert!(status.starts_with("MAINT"), "{status}");
}
