//! Section 3: how long "how many connections does port P have?" takes with many connections
//! on the host, asked three ways: the agent's `/drained?port=P&timeout=0`, `ss` (what a
//! script runs today), and parsing `/proc/net/tcp{,6}` (what older tools do).
//!
//! All connections go to one listener on 0.0.0.0:P through several loopback addresses
//! (each gives a full range of ephemeral ports). Methods are sampled in turn, so that
//! background load hits them alike.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{
    Foreign, Plan,
    agent::{self, Agent},
    holder::HeldConnections,
    kernel::{self, SeedCost},
    net,
    stats::Summary,
    sys,
};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Level {
    pub connections: usize,
    /// The host's TCP sockets while this level was measured (all processes).
    pub host_tcp: sys::TcpSockets,
    /// What each method counted (they must agree).
    pub agent_count: u64,
    pub ss_count: u64,
    pub proc_count: u64,
    /// Fresh TCP connection per request (as curl in a hook).
    pub drained: Summary,
    /// The same request on one kept-alive connection: the agent's answer alone.
    pub drained_keepalive: Summary,
    pub ss: Summary,
    pub proc_net_tcp: Summary,
    /// Samples whose count was not N (a /proc/net/tcp read is not an atomic snapshot: sockets
    /// that other processes open and close meanwhile can make lines repeat or go missing).
    pub agent_wrong: usize,
    pub ss_wrong: usize,
    pub proc_wrong: usize,
    pub ss_over_agent_p50: f64,
    pub ss_over_agent_p99: f64,
    pub proc_over_agent_p50: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct AnswerCost {
    pub levels: Vec<Level>,
    pub establish_per_second: f64,
    pub memory_idle: sys::Memory,
    pub memory_loaded: sys::Memory,
    pub loaded_connections: usize,
    pub rss_breakdown_idle_kib: Vec<(String, u64)>,
    pub map_memory_idle_bytes: u64,
    pub map_memory_loaded_bytes: u64,
    pub seed: Option<SeedCost>,
}

pub fn run(
    plan: &Plan,
    binary: &Path,
    log_dir: &Path,
    foreign: &mut Foreign,
) -> Result<AnswerCost> {
    let biggest = plan.answer_levels.iter().copied().max().unwrap_or(0);
    let mut result = AnswerCost::default();
    let listener = net::listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    let port = net::local_port(&listener)?;
    // 100k connections need ~4 ephemeral ranges (28k ports each); take some spare.
    let destinations =
        net::loopback_destinations(u8::try_from(biggest / 20_000 + 2).unwrap_or(50).min(50));

    // TIME_WAIT sockets left by earlier churns (for 60 s) would be walked by ss and /proc
    // too: let them expire first (bounded).
    let waited = Instant::now();
    while sys::tcp_sockets().time_wait > 1_000 && waited.elapsed() < Duration::from_secs(65) {
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "bench: [answer] {} sockets in TIME_WAIT (waited {:.0} s for them to expire)",
        sys::tcp_sockets().time_wait,
        waited.elapsed().as_secs_f64()
    );
    let agent = Agent::start(binary, log_dir, &plan.agent(None, false))?;
    foreign.check(&agent)?;
    std::thread::sleep(Duration::from_secs(1));
    result.memory_idle = sys::memory(agent.pid())?;
    result.rss_breakdown_idle_kib = sys::rss_by_mapping(agent.pid())?;
    result.map_memory_idle_bytes = sys::map_memory_bytes(agent.pid())?;

    // More sockets than one process may hold: holder processes keep them.
    let mut pairs = HeldConnections::default();
    let mut establish_time = Duration::ZERO;
    let outcome = (|| -> Result<()> {
        for &target in &plan.answer_levels {
            let started = Instant::now();
            let missing = target.saturating_sub(pairs.len());
            pairs.add(
                &listener,
                &destinations,
                missing,
                started + Duration::from_secs(180),
            )?;
            establish_time += started.elapsed();
            eprintln!("bench: [answer] {target} connections established");
            // Let the accept-side work settle before timing anything.
            std::thread::sleep(Duration::from_millis(500));
            let level = measure_level(plan, &agent, port, target)?;
            eprintln!(
                "bench: [answer] {target}: /drained p50 {:.3} ms p99 {:.3} ms; ss p50 {:.1} ms; /proc/net/tcp p50 {:.1} ms",
                level.drained.p50_ms,
                level.drained.p99_ms,
                level.ss.p50_ms,
                level.proc_net_tcp.p50_ms
            );
            result.levels.push(level);
        }
        result.memory_loaded = sys::memory(agent.pid())?;
        result.map_memory_loaded_bytes = sys::map_memory_bytes(agent.pid())?;
        result.loaded_connections = pairs.len();
        eprintln!(
            "bench: [answer] seeding a second agent with {} connections open",
            pairs.len()
        );
        result.seed = Some(kernel::measure_seed(
            plan,
            binary,
            log_dir,
            port,
            pairs.len(),
        )?);
        Ok(())
    })();
    if establish_time > Duration::ZERO {
        result.establish_per_second = pairs.len() as f64 / establish_time.as_secs_f64();
    }
    pairs.close();
    foreign.check(&agent)?;
    agent.stop()?;
    outcome?;
    Ok(result)
}

fn measure_level(plan: &Plan, agent: &Agent, port: u16, connections: usize) -> Result<Level> {
    let mut level = Level {
        connections,
        host_tcp: sys::tcp_sockets(),
        agent_count: agent.active(port)?,
        ss_count: ss_count(port)?,
        proc_count: proc_count(port)?,
        ..Level::default()
    };
    if level.agent_count != connections as u64 {
        bail!(
            "the agent counts {} connections, {connections} are open",
            level.agent_count
        );
    }
    let path = format!("/drained?port={port}&timeout=0");
    let mut drained = Vec::new();
    let mut keepalive = Vec::new();
    let mut ss = Vec::new();
    let mut proc = Vec::new();
    let started = Instant::now();
    // One round: several agent answers (they are short), one ss, one /proc read.
    for round in 0..plan.answer_rounds {
        if round >= plan.answer_min_rounds && started.elapsed() > plan.answer_budget {
            break;
        }
        for _ in 0..plan.drained_per_round {
            let t0 = Instant::now();
            let response = agent::get(agent.addr, &path, Duration::from_secs(10))?;
            drained.push(t0.elapsed());
            if response.status != 503 && connections > 0 {
                bail!(
                    "/drained answered {} with {connections} connections open",
                    response.status
                );
            }
        }
        // A connection per round, made before the timing: the agent closes a kept-alive
        // connection idle for its header timeout (5 s), and a round's `ss` and /proc reads
        // at 100k connections on a busy machine can take that long.
        let mut persistent = agent::KeepAlive::connect(agent.addr)?;
        for _ in 0..plan.drained_per_round {
            let t0 = Instant::now();
            let response = persistent.get(&path)?;
            keepalive.push(t0.elapsed());
            if agent::drained_active(&response.body)? != connections as u64 {
                level.agent_wrong += 1;
            }
        }
        let (counted, elapsed) = ss_count_timed(port)?;
        ss.push(elapsed);
        let (counted_proc, elapsed) = proc_count_timed(port)?;
        proc.push(elapsed);
        level.ss_wrong += usize::from(counted != connections as u64);
        level.proc_wrong += usize::from(counted_proc != connections as u64);
    }
    level.drained = Summary::of(&drained);
    level.drained_keepalive = Summary::of(&keepalive);
    level.ss = Summary::of(&ss);
    level.proc_net_tcp = Summary::of(&proc);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    level.ss_over_agent_p50 = ratio(level.ss.p50_ms, level.drained.p50_ms);
    level.ss_over_agent_p99 = ratio(level.ss.p99_ms, level.drained.p99_ms);
    level.proc_over_agent_p50 = ratio(level.proc_net_tcp.p50_ms, level.drained.p50_ms);
    Ok(level)
}

/// `ss -Htn state established '( sport = :P )'`, lines counted: the usual way. The time
/// covers starting ss and collecting its output (counting the lines is not timed: this
/// benchmark is a debug build).
pub fn ss_count_timed(port: u16) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let output = Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .context("cannot run ss (package iproute2)")?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        bail!("ss failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let lines = bytecount(&output.stdout, b'\n');
    Ok((lines, elapsed))
}

pub fn ss_count(port: u16) -> Result<u64> {
    Ok(ss_count_timed(port)?.0)
}

fn bytecount(bytes: &[u8], wanted: u8) -> u64 {
    bytes.iter().filter(|b| **b == wanted).count() as u64
}

/// Established sockets with local port `port` in `/proc/net/tcp` and `/proc/net/tcp6`,
/// counted by `awk` (as scripts do; compiled, so a fair lower bound), process start
/// included.
pub fn proc_count_timed(port: u16) -> Result<(u64, Duration)> {
    let program = format!(
        "$4 == \"01\" && substr($2, length($2) - 4) == \":{port:04X}\" {{ n++ }} END {{ print n + 0 }}"
    );
    let started = Instant::now();
    let output = Command::new("awk")
        .arg(&program)
        .args(["/proc/net/tcp", "/proc/net/tcp6"])
        .output()
        .context("cannot run awk")?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        bail!("awk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let count = text
        .trim()
        .parse()
        .with_context(|| format!("awk printed {text:?}"))?;
    Ok((count, elapsed))
}

pub fn proc_count(port: u16) -> Result<u64> {
    Ok(proc_count_timed(port)?.0)
}
