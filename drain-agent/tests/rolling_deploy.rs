//! Proof under load: a rolling deploy of two backends behind nginx, driven by
//! deploy/examples/rolling-deploy.sh, loses no request when it waits on drain-agent — and the
//! same deploy without a drain does, in the same run; a fixed sleep is slower.
//!
//! Real parts on loopback: nginx (Debian package), two `e2e-backend` processes, the real agent,
//! and a load generator (keep-alive clients, fast requests and slow streamed ones of 0.5–3 s)
//! running through the whole deploy. `cargo xtask e2e` runs this and prints the table.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;
#[path = "rolling_deploy/deploy.rs"]
mod deploy;
#[path = "rolling_deploy/load.rs"]
mod load;
#[path = "rolling_deploy/processes.rs"]
mod processes;
#[path = "rolling_deploy/report.rs"]
mod report;
#[path = "rolling_deploy/stack.rs"]
mod stack;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Agent, child::Guard, kernel_available, wait_until};
use deploy::Drain;
use load::{Load, LoadConfig, Outcome};
use report::ArmResult;
use stack::{Stack, http_get};

/// The fixed sleep of baseline (b): longer than the longest request (3 s), as people pick it.
const FIXED_SLEEP: Duration = Duration::from_secs(5);
/// Load before the deploy starts (every slow client has a request in flight), and after.
const WARM_UP: Duration = Duration::from_millis(1500);
const COOL_DOWN: Duration = Duration::from_secs(1);

fn load_config(target: SocketAddr) -> LoadConfig {
    LoadConfig {
        target,
        fast_clients: 4,
        fast_pause: Duration::from_millis(2),
        // Enough that each backend serves several slow requests at any moment.
        slow_clients: 12,
        slow_ms: (500, 3000),
        max_requests: 200_000,
        max_duration: Duration::from_secs(90),
    }
}

/// One arm: fresh backends and nginx, load through the whole deploy, then the numbers.
fn run_arm(drain: Drain, agent: &Agent) -> ArmResult {
    eprintln!("=== rolling deploy, {} ===", drain.name());
    let mut stack = Stack::start(&drain.name().replace(' ', "-"));
    let load = Load::start(&load_config(stack.nginx_addr()));
    std::thread::sleep(WARM_UP);
    let deploy = deploy::run(&mut stack, drain, &agent.url);
    let deploy_ended = Instant::now();
    std::thread::sleep(COOL_DOWN);
    let records = load.finish();

    // The deploy really happened: every request sent after it was answered by a v2 backend.
    let after: Vec<_> = records
        .iter()
        .filter(|r| r.started > deploy_ended && r.outcome == Outcome::Ok)
        .collect();
    assert!(!after.is_empty(), "no request answered after the deploy");
    for record in after {
        assert_eq!(
            record.backend_version(),
            Some("v2"),
            "answered after the deploy by {:?}",
            record.backend
        );
    }
    for port in stack.backend_ports {
        let health = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/health");
        assert_eq!(
            health,
            Some((200, "ok v2\n".to_owned())),
            "backend {port} after the deploy"
        );
    }

    // Re-sent requests hid nothing: their first attempt never reached nginx (not in its
    // access log), while every request that counted did.
    // nginx writes a request's line after the answer's last byte: the load's last requests
    // (the ones `finish` waited for) can be answered a moment before their lines are there.
    // Read again until every answered request's line is, at most 5 s (a request nginx never
    // saw still fails below).
    let answered: Vec<&String> = records
        .iter()
        .filter(|record| record.outcome == Outcome::Ok)
        .filter_map(|record| record.attempts.last())
        .collect();
    let mut seen_by_nginx = stack.nginx_request_ids();
    let reading = Instant::now();
    while answered.iter().any(|rid| !seen_by_nginx.contains(*rid))
        && reading.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(50));
        seen_by_nginx = stack.nginx_request_ids();
    }
    for record in &records {
        let (last, earlier) = record.attempts.split_last().expect("an attempt");
        for attempt in earlier {
            assert!(
                !seen_by_nginx.contains(attempt),
                "request {attempt} was re-sent although nginx had read it: {record:?}"
            );
        }
        assert!(
            record.outcome != Outcome::Ok || seen_by_nginx.contains(last),
            "request {last} answered but not in nginx's access log"
        );
    }

    for failure in records.iter().filter(|r| r.outcome != Outcome::Ok).take(5) {
        eprintln!(
            "{}: failed: {:?} {:?} from {:?}, {:?} after it started",
            drain.name(),
            failure.kind,
            failure.outcome,
            failure.backend,
            failure.ended - failure.started
        );
    }
    ArmResult::new(
        drain,
        &records,
        &deploy,
        stack.backend_ports,
        stack.shutdown_reports(),
    )
}

/// Writes the table where `cargo xtask e2e` asked for it (`DRAIN_AGENT_E2E_SUMMARY`).
fn publish(summary: &str) {
    eprintln!("\n{summary}");
    if let Some(path) = std::env::var_os("DRAIN_AGENT_E2E_SUMMARY") {
        std::fs::write(&path, summary).expect("write the summary");
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn rolling_deploy_with_the_agent_loses_no_request() {
    if !kernel_available("rolling_deploy_with_the_agent_loses_no_request") {
        return;
    }
    let agent = Agent::start(&[]);
    let results = [
        run_arm(Drain::Agent, &agent),
        run_arm(Drain::Sleep(FIXED_SLEEP), &agent),
        run_arm(Drain::None, &agent),
    ];
    let summary = format!("{}\n{}", report::table(&results), report::notes(&results));
    publish(&summary);
    let [with_agent, with_sleep, without_drain] = &results;

    // With the agent: thousands of requests, slow ones in flight at every drain, none lost.
    assert!(
        with_agent.sent() >= 3000,
        "only {} requests sent",
        with_agent.sent()
    );
    for backend in &with_agent.backends {
        assert!(
            backend.slow_in_flight_at_drain > 0,
            "no slow request was in flight on backend {} when its drain began",
            backend.port
        );
        assert_eq!(
            backend.in_flight_at_stop, 0,
            "requests in flight when backend {} was stopped",
            backend.port
        );
    }
    assert_eq!(
        with_agent.failures.total(),
        0,
        "requests failed with the agent: {:?}",
        with_agent.failures
    );
    // …and the old backends had nothing left at SIGTERM, idle keep-alive connections
    // included: the drain, not the backend's own graceful stop, kept every request.
    assert_eq!(with_agent.shutdowns.len(), 2, "{:?}", with_agent.shutdowns);
    for report in &with_agent.shutdowns {
        assert_eq!(
            (report.in_flight, report.open_connections),
            (0, 0),
            "{report:?}"
        );
    }

    // Without a drain the same deploy cuts requests: the test is sensitive.
    assert!(
        without_drain.failures.total() > 0,
        "the deploy without a drain lost nothing: the test proves nothing"
    );

    // Shorter than the fixed sleep, which is longer than the longest request.
    assert!(
        with_agent.deploy_time < with_sleep.deploy_time,
        "agent deploy {:?} not shorter than fixed-sleep deploy {:?}",
        with_agent.deploy_time,
        with_sleep.deploy_time
    );
}

/// The keep-alive decision, nginx's half: nginx's idle upstream keep-alive connections to a
/// backend marked `down` are closed by the reload itself (old workers close idle connections
/// when told to stop, and keep none while exiting), so a drain ends without the backend doing
/// anything — and until then, drain-agent counts them as open.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn reload_releases_idle_upstream_keepalive_connections() {
    if !kernel_available("reload_releases_idle_upstream_keepalive_connections") {
        return;
    }
    let agent = Agent::start(&[]);
    let stack = Stack::start("keepalive");
    let [port, _] = stack.backend_ports;
    // A few requests through nginx leave idle keep-alive connections to both backends.
    for _ in 0..8 {
        assert_eq!(
            http_get(stack.nginx_addr(), "/fast?bytes=10").map(|a| a.0),
            Some(200)
        );
    }
    wait_until(
        "the agent to see nginx's idle connections",
        Duration::from_secs(5),
        || agent.active(port) > 0,
    );
    let (_, idle) = agent.get_json(&format!("/drained?port={port}&timeout=0"));
    assert_eq!(
        idle["drained"], false,
        "idle keep-alive connections count as open: {idle}"
    );

    // Mark it down and reload, as the deploy script does (with its own functions).
    let script = stack::examples_dir().join("rolling-deploy.sh");
    let marked = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && set_backend_state 127.0.0.1:{port} down && reload_nginx",
            script.display()
        ))
        .env("UPSTREAM_CONF", stack.conf_path())
        .env("NGINX_CMD", stack.nginx_command())
        .env("NGINX_PID_FILE", stack.nginx_pid_file())
        .status()
        .expect("run the script's functions");
    assert!(marked.success(), "mark down and reload failed");
    let started = Instant::now();
    let (status, body) = agent.get_json(&format!("/drained?port={port}&timeout=5s"));
    assert_eq!(
        status, 200,
        "idle connections not released by the reload: {body}"
    );
    eprintln!(
        "idle upstream keep-alive connections released {:?} after the reload",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "released only after {:?}",
        started.elapsed()
    );
    // The backend did nothing: it never got a signal, and still has no connection.
    assert!(stack.shutdown_reports().is_empty());
}

/// The keep-alive decision, the backend's half: on SIGTERM it closes idle keep-alive
/// connections at once, finishes requests in flight and then closes their connections,
/// refuses new connections, and exits 0. (No kernel needed.)
#[test]
fn backend_stops_gracefully_on_sigterm() {
    let port = common::free_port();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut backend = Guard::spawn_group(
        "e2e-backend",
        Command::new(processes::backend_binary())
            .args(["--listen", &address.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .stop_signal(None);
    wait_until("the backend", Duration::from_secs(10), || {
        http_get(address, "/health").is_some()
    });

    // An idle keep-alive connection (one request answered, connection kept).
    let mut idle = TcpStream::connect(address).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(idle, "GET /fast?bytes=5 HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut answer = [0; 512];
    let read = idle.read(&mut answer).expect("answer");
    assert!(String::from_utf8_lossy(&answer[..read]).ends_with("\r\n\r\nabcde"));
    // A slow request in flight.
    let mut slow = TcpStream::connect(address).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        slow,
        "GET /slow?ms=1500&bytes=1000 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .expect("send");
    // In flight once its answer has begun: the head goes out with the first piece at once.
    let mut whole = vec![0; 4096];
    let first = slow.read(&mut whole).expect("the slow answer begins");
    assert!(first > 0, "the slow request's connection closed");
    whole.truncate(first);

    // The backend's own counts (reported at the signal) must be up to date: a thread starved
    // by the deploys running beside this test may have answered without counting it yet.
    processes::wait_until_settled(backend.pid());
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(backend.pid() as i32, libc::SIGTERM) };
    let signalled = Instant::now();
    // The idle connection is closed at once.
    assert_eq!(
        idle.read(&mut answer).expect("end of file"),
        0,
        "idle connection not closed"
    );
    assert!(
        signalled.elapsed() < Duration::from_millis(500),
        "idle connection closed late"
    );
    // New connections are refused.
    wait_until("the listener to close", Duration::from_secs(2), || {
        TcpStream::connect(address).is_err()
    });
    // The slow request still completes, whole; then the backend closes the connection
    // (read_to_end sees its end of file).
    slow.read_to_end(&mut whole).expect("slow answer");
    let text = String::from_utf8_lossy(&whole);
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(head.contains("Content-Length: 1000"), "{head}");
    assert_eq!(body.len(), 1000);
    assert!(
        signalled.elapsed() >= Duration::from_millis(1000),
        "answer cut short"
    );

    let status = backend
        .wait_for(Duration::from_secs(5))
        .expect("backend exited");
    assert!(status.success(), "{status}");
    let mut log = String::new();
    backend
        .child_mut()
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log)
        .expect("log");
    assert!(
        log.contains("shutdown signal=SIGTERM in_flight=1 open_connections=2"),
        "{log}"
    );
    // The idle connection, plus any probe connection the listener accepted before it
    // closed (the check above races with the shutdown); none aborted.
    let idle_closed = log
        .split("idle_keepalive_closed=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse::<u32>().ok());
    assert!(idle_closed.is_some_and(|count| count >= 1), "{log}");
    assert!(log.contains("aborted=0"), "{log}");
}
