//! Section 4: from the last `close()` to the waiter's answer.
//!
//! A waiter blocks in `GET /drained?port=P&timeout=10s` while one connection to P is open;
//! then the server closes its (tracked) end of it, and we time from just before that
//! `close()` to the waiter's complete answer. Next to it, pollers that look with `ss` every
//! 100 ms (the usual in-app sketch's period) or every 1 s (Istio's): a poller that has been
//! running all along looks next at a uniformly random moment within its period after the
//! close, so each trial sleeps a random phase in [0, period), then polls until `ss` shows
//! the port empty.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{
    Foreign, Plan,
    agent::{self, Agent},
    answer::ss_count,
    net,
    stats::{Rng, Summary},
};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Wakeup {
    pub agent: Summary,
    /// Trials dropped because the waiter had not started waiting before the close.
    pub agent_not_parked: usize,
    pub poll_100ms: Summary,
    pub poll_1s: Summary,
    pub poll_check: String,
}

/// How long a waiter gets to reach the agent and block before the close.
const PARK: Duration = Duration::from_millis(25);

pub fn run(plan: &Plan, binary: &Path, log_dir: &Path, foreign: &mut Foreign) -> Result<Wakeup> {
    let listener = net::listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    let port = net::local_port(&listener)?;
    let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let agent = Agent::start(binary, log_dir, &plan.agent(None, false))?;
    foreign.check(&agent)?;
    let mut result = Wakeup {
        poll_check: "ss -Htn state established '( sport = :P )'".to_owned(),
        ..Wakeup::default()
    };

    let mut samples = Vec::new();
    let path = format!("/drained?port={port}&timeout=10s");
    for _ in 0..plan.wake_trials {
        let client = TcpStream::connect(target).context("connect")?;
        let (server, _) = listener.accept().context("accept")?;
        let pending = agent::send(agent.addr, &path, Duration::from_secs(15))?;
        std::thread::sleep(PARK);
        let t0 = Instant::now();
        drop(server);
        let response = pending.finish()?;
        let elapsed = t0.elapsed();
        net::reset_on_close(&client);
        drop(client);
        if response.status != 200 {
            bail!("the waiter got {}: {}", response.status, response.body);
        }
        let value: serde_json::Value =
            serde_json::from_str(&response.body).context("waiter body")?;
        let waited_ms = value["waited_ms"].as_u64().unwrap_or(0);
        if waited_ms + 5 < PARK.as_millis() as u64 {
            // It answered without having waited: it was not blocked when the close came.
            result.agent_not_parked += 1;
            continue;
        }
        samples.push(elapsed);
    }
    result.agent = Summary::of(&samples);
    eprintln!(
        "bench: [wakeup] agent p50 {:.3} ms p99 {:.3} ms ({} trials)",
        result.agent.p50_ms, result.agent.p99_ms, result.agent.n
    );
    foreign.check(&agent)?;
    agent.stop()?;

    let mut rng = Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    for (period, trials) in [
        (Duration::from_millis(100), plan.poll_100ms_trials),
        (Duration::from_secs(1), plan.poll_1s_trials),
    ] {
        let mut samples = Vec::new();
        for _ in 0..trials {
            let client = TcpStream::connect(target).context("connect")?;
            let (server, _) = listener.accept().context("accept")?;
            let t0 = Instant::now();
            drop(server);
            std::thread::sleep(period.mul_f64(rng.unit()));
            let mut seen = false;
            for _ in 0..20 {
                if ss_count(port)? == 0 {
                    seen = true;
                    break;
                }
                std::thread::sleep(period);
            }
            let elapsed = t0.elapsed();
            net::reset_on_close(&client);
            drop(client);
            if !seen {
                bail!("the poller never saw port {port} drained");
            }
            samples.push(elapsed);
        }
        let summary = Summary::of(&samples);
        eprintln!(
            "bench: [wakeup] polling every {period:?}: p50 {:.1} ms p99 {:.1} ms ({} trials)",
            summary.p50_ms, summary.p99_ms, summary.n
        );
        if period < Duration::from_secs(1) {
            result.poll_100ms = summary;
        } else {
            result.poll_1s = summary;
        }
    }
    Ok(result)
}
