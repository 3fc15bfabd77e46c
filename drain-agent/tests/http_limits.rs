//! The HTTP server's limits, end to end through the real agent binary: idle sockets under a
//! low open-file limit, a client that pipelines and never reads, and `drain-agent wait`
//! against agents that do not answer.
//!
//! `DRAIN_AGENT_TEST_BINARY=/path/to/drain-agent` runs these against another build (to show
//! that an older agent fails them).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use common::{child::Guard, free_port, kernel_available, wait_until};
use drain_agent::cli::client::AgentUrl;

fn binary() -> PathBuf {
    common::agent_binary()
}

/// The agent started through `prlimit --nofile=<nofile>` (soft:hard), as a systemd unit
/// without `LimitNOFILE=` would start it; stopped and reaped on drop.
struct LimitedAgent {
    process: Guard,
    port: u16,
    url: AgentUrl,
}

impl LimitedAgent {
    fn start(nofile: Option<&str>) -> Self {
        let port = free_port();
        let mut command = match nofile {
            Some(limits) => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={limits}"))
                    .arg("--")
                    .arg(binary());
                command
            }
            None => Command::new(binary()),
        };
        let state = common::private_state(&mut command);
        let mut process = Guard::spawn(
            "drain-agent",
            command
                .args(["run", "--listen", &format!("127.0.0.1:{port}")])
                // Nothing pinned: tests run in parallel on one kernel (tests/pinned.rs pins).
                .arg("--no-pin")
                // The bounds below are the HTTP server's own (--http-shutdown-timeout), not
                // the hand-over's grace for waiters (tests/handover.rs).
                .args(["--shutdown-grace", "0s"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .keep(state);
        let stderr = process.child_mut().stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
            }
        });
        let agent = Self {
            process,
            port,
            url: AgentUrl::parse(&format!("http://127.0.0.1:{port}")).expect("url"),
        };
        let started = Instant::now();
        while !matches!(agent.get("/healthz", Duration::from_secs(2)), Ok((200, _))) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "agent not healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn get(&self, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
        common::http::get_url(&self.url, path, timeout)
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Open file descriptors of the agent now.
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(Iterator::count)
            .unwrap_or(0)
    }

    /// SIGTERM; the exit status and how long the exit took (killed after `limit`).
    fn stop(&mut self, limit: Duration) -> (Option<ExitStatus>, Duration) {
        self.process.stop_within(limit)
    }
}

/// Opens `count` connections to `port` and sends nothing on them.
fn idle_connections(port: u16, count: usize) -> Vec<TcpStream> {
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    (0..count)
        .filter_map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok())
        .collect()
}

fn answers_despite_idle_sockets(test: &str, nofile: &str) {
    if !kernel_available(test) {
        return;
    }
    let agent = LimitedAgent::start(Some(nofile));
    let idle = idle_connections(agent.port, 1100);
    println!(
        "{test}: {} idle connections open, the agent has {} fds open",
        idle.len(),
        agent.open_fds()
    );
    let started = Instant::now();
    let health = agent.get("/healthz", Duration::from_secs(5));
    let health_took = started.elapsed();
    let started = Instant::now();
    let drained = agent.get(
        &format!("/drained?port={}&timeout=0", free_port()),
        Duration::from_secs(5),
    );
    let drained_took = started.elapsed();
    println!("{test}: /healthz took {health_took:?}, /drained took {drained_took:?}");
    let fds = agent.open_fds();
    println!("{test}: the agent has {fds} fds open");
    assert!(
        matches!(health, Ok((200, _))),
        "/healthz under {nofile}: {health:?}"
    );
    assert!(
        matches!(drained, Ok((200, _))),
        "/drained under {nofile}: {drained:?}"
    );
    assert!(health_took < Duration::from_secs(2), "{health_took:?}");
    assert!(drained_took < Duration::from_secs(2), "{drained_took:?}");
    assert!(fds < 1024, "{fds} fds open");
    drop(idle);
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn health_and_drained_answer_with_1100_idle_sockets_at_a_soft_fd_limit_of_1024() {
    answers_despite_idle_sockets(
        "health_and_drained_answer_with_1100_idle_sockets_at_a_soft_fd_limit_of_1024",
        "1024:20000",
    );
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn health_and_drained_answer_with_1100_idle_sockets_at_a_hard_fd_limit_of_1024() {
    answers_despite_idle_sockets(
        "health_and_drained_answer_with_1100_idle_sockets_at_a_hard_fd_limit_of_1024",
        "1024:1024",
    );
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn sigterm_exits_in_bounded_time_with_a_client_that_pipelines_and_never_reads() {
    let test = "sigterm_exits_in_bounded_time_with_a_client_that_pipelines_and_never_reads";
    if !kernel_available(test) {
        return;
    }
    let mut agent = LimitedAgent::start(None);
    let greedy = TcpStream::connect(("127.0.0.1", agent.port)).expect("connect");
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
        agent.port
    );
    let pipelined = request.repeat(3000);
    let writer = {
        let mut greedy = greedy.try_clone().expect("clone");
        std::thread::spawn(move || {
            greedy
                .set_write_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            // Fails once the agent drops the connection; that is fine.
            let _ = greedy.write_all(pipelined.as_bytes());
        })
    };
    // Wait until the agent is stuck writing answers the client does not read: its send
    // queue is full, i.e. non-empty and no longer growing.
    let started = Instant::now();
    let (mut last, mut same) = (0, 0);
    while same < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the agent's send queue did not fill up (last {last} bytes)"
        );
        std::thread::sleep(Duration::from_millis(50));
        let queued = common::ss::send_queue_max(agent.port);
        same = if queued > 0 && queued == last {
            same + 1
        } else {
            0
        };
        last = queued;
    }
    println!("{test}: the agent has {last} bytes queued to a client that does not read");
    let (status, took) = agent.stop(Duration::from_secs(30));
    println!("{test}: the agent exited {took:?} after SIGTERM ({status:?})");
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let _ = greedy.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
}

/// Runs `drain-agent wait --port 8080 --timeout <timeout> --agent <url>`; the exit code and
/// how long it took.
fn wait_against(url: &str, timeout: &str) -> (Option<i32>, Duration) {
    let started = Instant::now();
    let output = Command::new(binary())
        .args([
            "wait",
            "--port",
            "8080",
            "--timeout",
            timeout,
            "--agent",
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run drain-agent wait");
    let took = started.elapsed();
    eprintln!("{}", String::from_utf8_lossy(&output.stderr).trim());
    (output.status.code(), took)
}

#[test]
fn wait_keeps_its_deadline_against_an_agent_that_accepts_but_never_answers() {
    // Connections complete through the backlog; nothing is ever read or written, as with a
    // stopped agent or one out of file descriptors.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let (code, took) = wait_against(&format!("http://127.0.0.1:{port}"), "3s");
    println!("wait --timeout 3s against a silent agent: exit {code:?} after {took:?}");
    assert!(matches!(code, Some(1 | 2)), "exit {code:?}");
    assert!(
        // Generous: a busy machine took 3.76 s (start-up and the last read's bound).
        took >= Duration::from_secs(3) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    drop(silent);
}

#[test]
fn wait_keeps_its_deadline_when_nobody_listens() {
    let port = free_port();
    let (code, took) = wait_against(&format!("http://127.0.0.1:{port}"), "2s");
    println!("wait --timeout 2s with nobody listening: exit {code:?} after {took:?}");
    assert_eq!(code, Some(2));
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// With a quiet window, once less is left than `--quiet` the wait cannot end drained and
/// waits out its timeout; when no agent ever answered, it still ends at its deadline with
/// exit 2 (no agent), not 1, and says that `--close-at-timeout` closes nothing then.
#[test]
fn wait_with_quiet_and_nobody_listening_exits_2_at_its_deadline() {
    let port = free_port();
    let started = Instant::now();
    let output = Command::new(binary())
        .args(["wait", "--port", "8080", "--timeout", "2s", "--quiet", "1s"])
        .args([
            "--close-at-timeout",
            "--agent",
            &format!("http://127.0.0.1:{port}"),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run drain-agent wait");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!(
        "wait --quiet 1s with nobody listening: exit {:?} after {took:?}: {stderr}",
        output.status.code()
    );
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");
    assert!(
        stderr.contains("nothing is closed at the deadline"),
        "{stderr}"
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}

/// The message of an agent that could not start on `port` (the tests' start panics with
/// it); `started` is the failure when it did start.
fn refused_start(port: u16, started: &str) -> String {
    match std::panic::catch_unwind(|| common::Agent::start_on(port, &[])) {
        Ok(_) => panic!("{started}"),
        Err(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default(),
    }
}

/// An address already taken (another agent, node_exporter): the agent exits at once with an
/// error naming it, not a hang, and another free port works (what the tests' own start does
/// when another test took the free port it was given).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_taken_listen_address_is_a_clear_error_at_once() {
    let test = "a_taken_listen_address_is_a_clear_error_at_once";
    if !kernel_available(test) {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let started = std::time::Instant::now();
    let message = refused_start(port, "the agent started on a taken port");
    assert!(
        message.contains("(it exited)")
            && message.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && message.contains("Address already in use"),
        "{message}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "noticed after {:?}",
        started.elapsed()
    );
    // deploy/README.md quotes the message (for the default port) word for word.
    let said = message
        .split("cannot listen on ")
        .nth(1)
        .and_then(|rest| rest.split_once("address)"))
        .map(|(said, _)| format!("cannot listen on {said}address)"))
        .expect("the message");
    let quoted = said.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:9100");
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/README.md"),
    )
    .expect("deploy/README.md");
    let readme = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        readme.contains(&quoted),
        "deploy/README.md does not quote the agent's message {quoted:?}"
    );
    let agent = common::Agent::start(&[]);
    assert_ne!(agent.port, port);
}

/// Audit (resources): an application that listens on the agent's address with
/// `SO_REUSEPORT` (Envoy sets it by default, nginx with `reuseport`), as root, did not make
/// the agent's bind fail: the agent joined its group without a word, and the kernel split
/// the application's new connections between it and the agent's API. The agent now says so
/// at start (WARN, naming the address), as for an application's wildcard that the agent's
/// exact address would take loopback connections from. Not a start-up error: the holder is
/// told from an agent by its process's name, and an upgrade's older agent under another name
/// must not stop the new one.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn an_application_sharing_the_listen_address_is_said() {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let test = "an_application_sharing_the_listen_address_is_said";
    if !kernel_available(test) {
        return;
    }
    let listen_reuseport = |addr: &str| {
        let socket = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        sockopt::set_socket_reuseport(&socket, true).expect("SO_REUSEPORT");
        let addr: SocketAddr = addr.parse().expect("address");
        rustix::net::bind(&socket, &addr).expect("bind");
        rustix::net::listen(&socket, 16).expect("listen");
        TcpListener::from(socket)
    };
    let application = listen_reuseport("127.0.0.1:0");
    let port = application.local_addr().expect("addr").port();
    let agent = common::Agent::start_on(port, &[]);
    let said = format!(
        "127.0.0.1:{port} (--listen) is shared with or covered by a listener of a program that is not a drain-agent"
    );
    wait_until("the warning", Duration::from_secs(5), || {
        agent.log_text().contains(&said)
    });
    drop(agent);
    drop(application);
    // Under an application's wildcard the agent's exact address takes the application's
    // loopback connections: said too.
    let wildcard = listen_reuseport("0.0.0.0:0");
    let port = wildcard.local_addr().expect("addr").port();
    let agent = common::Agent::start_on(port, &[]);
    let said = format!("127.0.0.1:{port} (--listen) is shared with or covered by");
    wait_until("the warning", Duration::from_secs(5), || {
        agent.log_text().contains(&said)
    });
    drop(agent);
    // Alone on its address: nothing said.
    let agent = common::Agent::start(&[]);
    assert!(
        !agent.log_text().contains("is shared with"),
        "{}",
        agent.log_text()
    );
    drop(wildcard);
}

/// Audit: `drain_agent_drain_requests_total{result="rejected"}` (README's metrics, and the
/// shipped alert `DrainAgentWaitersRejected`) counted only the `--max-waiters` and
/// per-owner 429s; a hook turned away by `--max-waiters-per-source` was answered 429 and
/// counted nowhere, so the alert never fired for it.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_waiter_over_the_per_source_limit_is_counted_as_rejected() {
    let test = "a_waiter_over_the_per_source_limit_is_counted_as_rejected";
    if !kernel_available(test) {
        return;
    }
    let agent = common::Agent::start(&["--max-waiters-per-source", "1"]);
    // A port that does not drain: one client held open.
    let server = common::Server::start("127.0.0.1:0");
    let _client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    server.wait_accepted(1);
    let wait = format!("/drained?port={}&timeout=60s", server.port);
    // The first waiter of 127.0.0.1 (root's, one source by address) is held.
    let mut held = TcpStream::connect(("127.0.0.1", agent.port)).expect("connect");
    write!(
        held,
        "GET {wait} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
        agent.port
    )
    .expect("send");
    agent.wait_for_waiters(1);
    let rejected = "drain_agent_drain_requests_total{result=\"rejected\"}";
    assert_eq!(agent.metric(rejected), Some(0.0));
    let (status, body) = agent.try_get(&wait).expect("the second waiter is answered");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("--max-waiters-per-source"), "{body}");
    assert_eq!(agent.metric(rejected), Some(1.0));
    drop(held);
}
