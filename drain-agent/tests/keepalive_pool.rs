//! Issue 11 end to end: a real proxy's idle upstream pool, the node's probes and load, and
//! three ways to wait before stopping the backend.
//!
//! Real parts on loopback: HAProxy (Debian package) in front of two `e2e-backend` processes,
//! keeping idle keep-alive connections to them (`http-reuse always`, `pool-purge-delay 60s`);
//! the real agent; a load generator through HAProxy the whole time (keep-alive clients, fast
//! requests and 0.5–2 s slow ones); a probe every second straight to backend A from the
//! "node" address 127.0.0.2. Each arm takes A out of rotation through HAProxy's runtime API
//! (`set server be/s1 state drain`, no reload: a reload would close the idle pool at once
//! and hide the problem; `state maint` closes it too in HAProxy 2.6), waits, then sends A
//! SIGTERM (it finishes what is in flight, closes idle connections and exits):
//!
//! - `sleep`: a fixed 5 s;
//! - `strict`: `drain-agent wait --timeout 15s --quiet 2s --ignore 127.0.0.2/32` — HAProxy's
//!   idle pool holds it to the timeout (exit 1), and `ss` shows the pool still open then;
//! - `idle`: the same with `--idle 1s` — done once arrivals stopped and what is in flight
//!   finished: about the quiet window, or the longest request in flight plus 1 s.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;
#[path = "keepalive_pool/haproxy.rs"]
mod haproxy;
#[allow(
    dead_code,
    reason = "shared with rolling_deploy.rs, which uses more of it"
)]
#[path = "rolling_deploy/load.rs"]
mod load;
#[path = "keepalive_pool/probe.rs"]
mod probe;
#[allow(
    dead_code,
    reason = "shared with rolling_deploy.rs, which uses more of it"
)]
#[path = "rolling_deploy/processes.rs"]
mod processes;
#[allow(
    dead_code,
    reason = "shared with rolling_deploy.rs: only its helpers are used here"
)]
#[path = "rolling_deploy/stack.rs"]
mod stack;

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::child::Guard;
use common::wait_until;
use common::{Agent, free_port, kernel_available};
use haproxy::{Haproxy, ServerLine};
use load::{Kind, Load, LoadConfig, Outcome, Record};
use probe::{Probe, ProbeRecord};
use stack::http_get;

/// The node's address, where the probes come from.
const NODE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const FIXED_SLEEP: Duration = Duration::from_secs(5);
const TIMEOUT: &str = "15s";
const TIMEOUT_SECS: u64 = 15;
const QUIET: &str = "2s";
const IDLE: &str = "1s";
/// Load before the backend is taken out (HAProxy's pool to it fills), and after it stopped.
const WARM_UP: Duration = Duration::from_secs(2);
const COOL_DOWN: Duration = Duration::from_secs(1);
const SLOW_MS: (u64, u64) = (500, 2000);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    Sleep,
    Strict,
    Idle,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Self::Sleep => "sleep",
            Self::Strict => "strict",
            Self::Idle => "idle",
        }
    }

    fn wait_description(self) -> String {
        match self {
            Self::Sleep => format!("`sleep {}`", FIXED_SLEEP.as_secs()),
            Self::Strict => {
                format!("`wait --timeout {TIMEOUT} --quiet {QUIET} --ignore {NODE}/32`")
            }
            Self::Idle => format!(
                "`wait --timeout {TIMEOUT} --quiet {QUIET} --ignore {NODE}/32 --idle {IDLE}`"
            ),
        }
    }
}

/// One `e2e-backend`, its log and pid file in HAProxy's directory (`run/`).
struct Backend {
    port: u16,
    log: PathBuf,
    process: Guard,
}

impl Backend {
    fn start(dir: &Path, port: u16) -> Self {
        let log = dir.join(format!("backend-{port}.log"));
        let out = File::create(&log).expect("backend log");
        let err = out.try_clone().expect("backend log");
        let process = Guard::spawn_group(
            "e2e-backend",
            Command::new(processes::backend_binary())
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--app-version", "v1"])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err),
        )
        .stop_signal(None);
        std::fs::write(
            dir.join("run").join(format!("backend-{port}.pid")),
            format!("{}\n", process.pid()),
        )
        .expect("backend pid file");
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until("the backend", Duration::from_secs(10), || {
            http_get(address, "/health").is_some_and(|(status, _)| status == 200)
        });
        Self { port, log, process }
    }

    /// SIGTERM, then waits for the graceful exit (what is in flight finishes first).
    fn terminate(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.process.pid() as i32, libc::SIGTERM) };
        let status = self
            .process
            .wait_for(Duration::from_secs(10))
            .expect("the backend exits within 10 s of SIGTERM");
        assert!(status.success(), "backend {}: {status}", self.port);
    }

    /// What it logged when told to stop: `(in_flight, open_connections)`.
    fn shutdown_report(&self) -> (u64, u64) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let line = log
            .lines()
            .find(|line| line.contains(": shutdown signal="))
            .unwrap_or_else(|| panic!("backend {} logged no shutdown: {log}", self.port));
        (
            stack::field(line, "in_flight"),
            stack::field(line, "open_connections"),
        )
    }
}

/// How `drain-agent wait` ended.
#[derive(Clone, Debug)]
struct WaitOutcome {
    exit: i32,
    last_line: String,
}

/// `drain-agent wait --port P …` as a stop hook runs it; its progress lines are echoed.
fn run_wait(agent: &Agent, port: u16, arm: Arm) -> WaitOutcome {
    let mut command = Command::new(common::agent_binary());
    command
        .arg("wait")
        .args(["--port", &port.to_string()])
        .args(["--timeout", TIMEOUT, "--quiet", QUIET])
        .args(["--ignore", &format!("{NODE}/32")])
        .args(["--progress", "3s", "--agent", &agent.url]);
    if arm == Arm::Idle {
        command.args(["--idle", IDLE]);
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start drain-agent wait");
    let mut last_line = String::new();
    for line in BufReader::new(child.stderr.take().expect("stderr"))
        .lines()
        .map_while(Result::ok)
    {
        eprintln!("[wait {}] {line}", arm.name());
        last_line = line;
    }
    let status = child.wait().expect("wait for drain-agent wait");
    WaitOutcome {
        exit: status.code().unwrap_or(-1),
        last_line,
    }
}

struct ArmResult {
    arm: Arm,
    fast: usize,
    slow: usize,
    failed: usize,
    /// Slow requests backend A was serving when it was taken out.
    slow_in_flight_at_drain: usize,
    /// Requests of backend A still in flight when it got SIGTERM.
    in_flight_at_stop: usize,
    /// When the last request A answered ended, after A was taken out.
    last_request_end: Duration,
    /// HAProxy's connections to A (`ss`) when it was taken out, and when the wait ended.
    pool_at_drain: usize,
    pool_at_stop: usize,
    /// Probes to A while it drained, and how many got 200.
    probes: (usize, usize),
    drain_time: Duration,
    wait: Option<WaitOutcome>,
    /// What A logged at SIGTERM: requests in flight, connections open.
    shutdown: (u64, u64),
}

fn load_config(target: SocketAddr) -> LoadConfig {
    LoadConfig {
        target,
        fast_clients: 3,
        fast_pause: Duration::from_millis(5),
        slow_clients: 6,
        slow_ms: SLOW_MS,
        max_requests: 200_000,
        max_duration: Duration::from_secs(60),
    }
}

fn in_flight(records: &[Record], port: u16, at: Instant, kind: Option<Kind>) -> usize {
    records
        .iter()
        .filter(|r| kind.is_none_or(|k| r.kind == k))
        .filter(|r| r.backend_port() == Some(port))
        .filter(|r| r.started < at && r.ended > at)
        .count()
}

/// One arm: fresh backends and HAProxy, probes and load throughout, then the numbers.
fn run_arm(arm: Arm, agent: &Agent) -> ArmResult {
    eprintln!("=== keep-alive pool, {} ===", arm.name());
    let dir = Haproxy::prepare_dir(arm.name());
    let mut backends = [free_port(), free_port()].map(|port| Backend::start(&dir, port));
    let port = backends[0].port;
    let servers =
        [("s1", backends[0].port), ("s2", backends[1].port)].map(|(name, port)| ServerLine {
            name: name.into(),
            port,
            options: String::new(),
        });
    let haproxy = Haproxy::start(dir, free_port(), &servers);
    let frontend = SocketAddr::from(([127, 0, 0, 1], haproxy.frontend_port));
    wait_until("HAProxy answering", Duration::from_secs(10), || {
        http_get(frontend, "/fast?bytes=10").is_some_and(|(status, _)| status == 200)
    });

    let probe = Probe::start(
        NODE,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        Duration::from_secs(1),
    );
    let load = Load::start(&load_config(frontend));
    std::thread::sleep(WARM_UP);
    // A streamed answer in flight on A when it is taken out, or the arm proves nothing:
    // asked of A itself, just before.
    let backend_a = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(
        "a slow request in flight on A",
        Duration::from_secs(10),
        || {
            http_get(backend_a, "/stats").is_some_and(|(status, body)| {
                status == 200
                    && body
                        .split_whitespace()
                        .skip_while(|word| *word != "streaming")
                        .nth(1)
                        .and_then(|count| count.parse::<u64>().ok())
                        .is_some_and(|count| count > 0)
            })
        },
    );

    // Out of rotation through the runtime API: no new request goes to A from here on.
    let pool_at_drain = haproxy.connections_to(port);
    let drain_started = Instant::now();
    let answer = haproxy.admin("set server be/s1 state drain");
    assert!(answer.trim().is_empty(), "set server: {answer}");
    assert_eq!(haproxy.server_status("s1"), "DRAIN");
    let wait = match arm {
        Arm::Sleep => {
            std::thread::sleep(FIXED_SLEEP);
            None
        }
        Arm::Strict | Arm::Idle => Some(run_wait(agent, port, arm)),
    };
    let pool_at_stop = haproxy.connections_to(port);
    let stopped_at = Instant::now();
    let drain_time = stopped_at - drain_started;
    backends[0].terminate();
    std::thread::sleep(COOL_DOWN);
    let records = load.finish();
    let probes = probe.finish();

    for failure in records.iter().filter(|r| r.outcome != Outcome::Ok).take(5) {
        eprintln!(
            "{}: failed: {:?} {:?} from {:?}, {:?} after it started",
            arm.name(),
            failure.kind,
            failure.outcome,
            failure.backend,
            failure.ended - failure.started
        );
    }
    let during_drain: Vec<&ProbeRecord> = probes
        .iter()
        .filter(|p| p.at > drain_started && p.at < stopped_at)
        .collect();
    ArmResult {
        arm,
        fast: records.iter().filter(|r| r.kind == Kind::Fast).count(),
        slow: records.iter().filter(|r| r.kind == Kind::Slow).count(),
        failed: records.iter().filter(|r| r.outcome != Outcome::Ok).count(),
        slow_in_flight_at_drain: in_flight(&records, port, drain_started, Some(Kind::Slow)),
        in_flight_at_stop: in_flight(&records, port, stopped_at, None),
        last_request_end: records
            .iter()
            .filter(|r| r.backend_port() == Some(port))
            .map(|r| r.ended.saturating_duration_since(drain_started))
            .max()
            .unwrap_or_default(),
        pool_at_drain,
        pool_at_stop,
        probes: (
            during_drain.len(),
            during_drain.iter().filter(|p| p.ok).count(),
        ),
        drain_time,
        wait,
        shutdown: backends[0].shutdown_report(),
    }
}

fn table(results: &[ArmResult]) -> String {
    let mut out = String::from(
        "| arm | wait before SIGTERM | requests (fast / slow) | failed | slow in flight on A when taken out | A's last request ended | in flight on A at SIGTERM | HAProxy→A connections when taken out / at SIGTERM | probes to A while draining (200) | drain time | wait exit |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let exit = r.wait.as_ref().map_or("—".to_owned(), |w| {
            format!("{}{}", w.exit, if w.exit == 1 { " (timeout)" } else { "" })
        });
        out.push_str(&format!(
            "| {} | {} | {} ({} / {}) | **{}** | {} | {:.1} s | {} | {} / {} | {} ({}) | {:.1} s | {exit} |\n",
            r.arm.name(),
            r.arm.wait_description(),
            r.fast + r.slow,
            r.fast,
            r.slow,
            r.failed,
            r.slow_in_flight_at_drain,
            r.last_request_end.as_secs_f64(),
            r.in_flight_at_stop,
            r.pool_at_drain,
            r.pool_at_stop,
            r.probes.0,
            r.probes.1,
            r.drain_time.as_secs_f64(),
        ));
    }
    out
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn idle_drain_ends_with_the_requests_while_a_strict_one_waits_for_the_pool() {
    if !kernel_available("idle_drain_ends_with_the_requests_while_a_strict_one_waits_for_the_pool")
        || !haproxy::available("keepalive_pool")
    {
        return;
    }
    let started = Instant::now();
    let agent = Agent::start(&[]);
    let results = [
        run_arm(Arm::Sleep, &agent),
        run_arm(Arm::Strict, &agent),
        run_arm(Arm::Idle, &agent),
    ];
    eprintln!("\n{}", table(&results));
    for r in &results {
        eprintln!(
            "- {}: backend A at SIGTERM: in_flight={} open_connections={}{}",
            r.arm.name(),
            r.shutdown.0,
            r.shutdown.1,
            r.wait
                .as_ref()
                .map_or(String::new(), |w| match w.last_line.as_str() {
                    "" => "; wait printed nothing (drained)".to_owned(),
                    line => format!("; wait's last line: {line}"),
                })
        );
    }
    eprintln!("whole test: {:.1} s", started.elapsed().as_secs_f64());
    let [_sleep, strict, idle] = &results;

    // Strict: the idle pool holds the drain to its timeout, and is still open then.
    let wait = strict.wait.as_ref().expect("strict waited");
    assert_eq!(wait.exit, 1, "strict wait did not time out: {wait:?}");
    assert!(
        strict.drain_time >= Duration::from_secs(TIMEOUT_SECS),
        "strict drain ended before its timeout: {:?}",
        strict.drain_time
    );
    assert!(
        strict.pool_at_stop > 0,
        "HAProxy's pool to A was closed when the strict wait ended: the arm proves nothing"
    );
    assert_eq!(strict.in_flight_at_stop, 0);

    // Idle: done with the requests, long before the timeout; nothing lost.
    let wait = idle.wait.as_ref().expect("idle waited");
    assert_eq!(wait.exit, 0, "idle wait did not drain: {wait:?}");
    assert_eq!(idle.failed, 0, "requests failed with the idle drain");
    assert!(
        idle.slow_in_flight_at_drain > 0,
        "no slow request was in flight on A when it was taken out: the arm proves nothing"
    );
    assert_eq!(
        (idle.in_flight_at_stop, idle.shutdown.0),
        (0, 0),
        "requests in flight on A at SIGTERM"
    );
    // The pool was there and idle when the drain ended: A closed it itself.
    assert!(
        idle.pool_at_stop > 0 && idle.shutdown.1 > 0,
        "no idle pool left at SIGTERM: the arm proves nothing"
    );
    // The node's probes reached A during the drain and did not hold it.
    assert!(
        idle.probes.1 > 0,
        "no probe reached A while it drained: {:?}",
        idle.probes
    );
    // The quiet window, or the last request in flight plus the idle bar, whichever ends
    // later (plus the agent's and this machine's reaction time) — far from the timeout.
    assert!(
        idle.drain_time >= Duration::from_secs(2),
        "shorter than the quiet window"
    );
    let expected = idle
        .last_request_end
        .saturating_add(Duration::from_secs(1))
        .max(Duration::from_secs(2));
    assert!(
        idle.drain_time < expected + Duration::from_millis(1500),
        "idle drain took {:?}; quiet window 2 s, A's last request ended after {:?}",
        idle.drain_time,
        idle.last_request_end
    );
}

/// The whole drain behind a real HAProxy whose `agent-check` points at the agent: the
/// backend's stop script is only `drain-agent wait --port P …` followed by its SIGTERM.
/// HAProxy moves the server to DRAIN by itself (no load-balancer step in the script), no
/// request fails; then a client that holds a connection forever is closed at the deadline
/// (`--close-at-timeout`): the drain ends at the timeout, the record says 1 closed by the
/// agent, and the client sees a reset.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn haproxy_takes_the_server_out_by_agent_check_when_the_stop_script_drains() {
    let test = "haproxy_takes_the_server_out_by_agent_check_when_the_stop_script_drains";
    if !kernel_available(test) || !haproxy::available(test) {
        return;
    }
    let agent_check = free_port();
    let agent = Agent::start(&["--agent-check-listen", &format!("127.0.0.1:{agent_check}")]);
    let dir = Haproxy::prepare_dir("agent-check");
    let mut backends = [free_port(), free_port()].map(|port| Backend::start(&dir, port));
    let port = backends[0].port;
    let servers =
        [("s1", backends[0].port), ("s2", backends[1].port)].map(|(name, port)| ServerLine {
            name: name.into(),
            port,
            options: format!(
                "agent-check agent-addr 127.0.0.1 agent-port {agent_check} agent-inter 200ms agent-send \"{port}\\n\""
            ),
        });
    let haproxy = Haproxy::start(dir, free_port(), &servers);
    let frontend = SocketAddr::from(([127, 0, 0, 1], haproxy.frontend_port));
    wait_until("HAProxy answering", Duration::from_secs(10), || {
        http_get(frontend, "/fast?bytes=10").is_some_and(|(status, _)| status == 200)
    });
    // Without `check`, HAProxy shows a serving server as "no check"; the agent's answer
    // ("ready") shows in agent_status.
    wait_until("s1 ready by agent-check", Duration::from_secs(10), || {
        haproxy.server_status("s1") == "no check"
    });
    let load = Load::start(&load_config(frontend));
    std::thread::sleep(WARM_UP);

    // The stop script: drain, then SIGTERM. Nothing else.
    let started = Instant::now();
    let mut wait = Command::new(common::agent_binary())
        .args(["wait", "--port", &port.to_string()])
        .args(["--timeout", "20s", "--quiet", "1s", "--idle", "1s"])
        .args(["--agent", &agent.url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start drain-agent wait");
    let mut saw_drain = None;
    let status = loop {
        if saw_drain.is_none() && haproxy.server_status("s1").starts_with("DRAIN") {
            saw_drain = Some(started.elapsed());
        }
        if let Some(status) = wait.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let drain_time = started.elapsed();
    backends[0].terminate();
    std::thread::sleep(COOL_DOWN);
    let records = load.finish();
    let failed = records.iter().filter(|r| r.outcome != Outcome::Ok).count();
    eprintln!(
        "agent-check drain: {} requests, {failed} failed, HAProxy showed DRAIN after {:?}, drain time {:?}, wait exit {:?}",
        records.len(),
        saw_drain,
        drain_time,
        status.code()
    );
    assert_eq!(status.code(), Some(0), "the drain did not finish");
    let to_drain = saw_drain.expect("HAProxy never showed s1 as DRAIN");
    assert!(to_drain < Duration::from_secs(2), "{to_drain:?}");
    assert_eq!(failed, 0, "requests failed");
    assert!(drain_time < Duration::from_secs(15), "{drain_time:?}");

    // A client that holds a connection to B forever (from its own address, so it is not
    // HAProxy, whose connections come from 127.0.0.1 and are ignored here): closed at the
    // deadline when asked, and B's stop proceeds.
    let port_b = backends[1].port;
    let mut holder = common::connect_from(
        Ipv4Addr::new(127, 0, 0, 9),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port_b),
    )
    .expect("connect to B from 127.0.0.9");
    let started = Instant::now();
    let output = Command::new(common::agent_binary())
        .args(["wait", "--port", &port_b.to_string(), "--timeout", "3s"])
        .args(["--ignore", "127.0.0.1/32", "--close-at-timeout"])
        .args(["--agent", &agent.url])
        .output()
        .expect("wait B");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(stdout.contains("closed 1 connection"), "{stdout}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let mut byte = [0u8; 1];
    holder
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let read = std::io::Read::read(&mut holder, &mut byte);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the holder sees a reset: {read:?}"
    );
    let (_, drains) = agent.get_json("/drains");
    let record = &drains["recent"][0];
    assert_eq!(record["port"], port_b, "{drains}");
    assert_eq!(record["result"], "closed_at_deadline", "{drains}");
    assert_eq!(record["closed_by_agent"], 1, "{drains}");
    backends[1].terminate();
    eprintln!("forever client closed at the deadline after {took:?}: {stdout}");
}
