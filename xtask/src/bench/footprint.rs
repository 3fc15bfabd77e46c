//! Section 5 (the part that needs its own set-up): `/metrics` scrape time with 1,000 ports
//! that each have an active connection. Memory and CPU come from sections 2 and 3.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{
    Foreign, Plan,
    agent::{self, Agent},
    net,
    stats::{Summary, sample},
    sys,
};

#[derive(Clone, Debug, Default, Serialize)]
pub struct MetricsScrape {
    pub ports: usize,
    pub scrape_idle: Summary,
    pub scrape: Summary,
    pub body_bytes: usize,
    pub active_port_series: usize,
    /// `/drained?port=P&timeout=0` with that many endpoints in the agent's maps.
    pub drained: Summary,
    pub memory_after: sys::Memory,
}

pub fn run(
    plan: &Plan,
    binary: &Path,
    log_dir: &Path,
    foreign: &mut Foreign,
) -> Result<MetricsScrape> {
    sys::raise_fd_limit(3 * plan.metrics_ports as u64 + 10_000)?;
    let agent = Agent::start(binary, log_dir, &plan.agent(None, false))?;
    foreign.check(&agent)?;
    let timeout = Duration::from_secs(10);
    let scrape_idle = Summary::of(&sample(plan.scrapes, 5, Duration::from_secs(20), || {
        agent::get(agent.addr, "/metrics", timeout).map(drop)
    })?);

    let mut listeners: Vec<TcpListener> = Vec::with_capacity(plan.metrics_ports);
    let mut clients: Vec<TcpStream> = Vec::with_capacity(plan.metrics_ports);
    let mut servers: Vec<TcpStream> = Vec::with_capacity(plan.metrics_ports);
    for _ in 0..plan.metrics_ports {
        let listener = net::listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        let port = net::local_port(&listener)?;
        clients.push(
            TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).context("connect")?,
        );
        servers.push(listener.accept().context("accept")?.0);
        listeners.push(listener);
    }
    let body = agent::get(agent.addr, "/metrics", timeout)?;
    if body.status != 200 {
        bail!("/metrics answered {}", body.status);
    }
    let active_port_series = body
        .body
        .lines()
        .filter(|line| line.starts_with("drain_agent_connections_active{") && !line.ends_with(" 0"))
        .count();
    let scrape = Summary::of(&sample(plan.scrapes, 5, Duration::from_secs(60), || {
        let response = agent::get(agent.addr, "/metrics", timeout)?;
        if response.status != 200 {
            bail!("/metrics answered {}", response.status);
        }
        Ok(())
    })?);
    let port = net::local_port(&listeners[0])?;
    let path = format!("/drained?port={port}&timeout=0");
    let drained = Summary::of(&sample(
        plan.scrapes * 4,
        20,
        Duration::from_secs(20),
        || agent::get(agent.addr, &path, timeout).map(drop),
    )?);
    let memory_after = sys::memory(agent.pid())?;
    for stream in clients.iter().chain(&servers) {
        net::reset_on_close(stream);
    }
    drop(clients);
    drop(servers);
    drop(listeners);
    foreign.check(&agent)?;
    agent.stop()?;
    eprintln!(
        "bench: [footprint] /metrics with {} active ports: p50 {:.2} ms p99 {:.2} ms ({} bytes)",
        active_port_series,
        scrape.p50_ms,
        scrape.p99_ms,
        body.body.len()
    );
    Ok(MetricsScrape {
        ports: plan.metrics_ports,
        scrape_idle,
        scrape,
        body_bytes: body.body.len(),
        active_port_series,
        drained,
        memory_after,
    })
}
