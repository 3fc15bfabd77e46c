//! Section 2: loopback connection churn with the agent attached vs not, in interleaved
//! rounds (A B, B A, A B, …) so that drifting background load hits both sides alike.
//!
//! Two variants: every churned port drains between connections (its count goes 0 → 1 → 0,
//! so the kernel side writes two ring-buffer events per connection and the agent wakes up
//! for them), and every port stays busy (one connection held open on it: no events).
//! Besides throughput, each round records the CPU time spent per connection (the churn's
//! threads, plus the agent's) — less sensitive to other tenants than wall-clock rates.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::{
    Foreign, Plan,
    net::{self, ChurnKind, ChurnLimit},
    pairs::{self, Paired, Round, RoundAgent},
    stats::median,
    sys,
};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Variant {
    pub name: String,
    pub rounds: Vec<Round>,
    /// Ratios within pairs (CPU: per connection) and their medians.
    #[serde(flatten)]
    pub paired: Paired,
    /// Agent CPU per 1,000 churned connections (median over attached rounds).
    pub agent_cpu_ms_per_1k_connections: f64,
    /// Agent CPU as a share of one core during the churn (median).
    pub agent_cpu_percent_of_core: f64,
    /// Sum over the attached rounds of `Round::left_active`.
    pub left_active: u64,
    pub attached_connections: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Overhead {
    pub threads: usize,
    pub round_seconds: f64,
    /// Ports drain between connections (the goal's scenario).
    pub draining: Variant,
    /// One connection held open per port.
    pub busy: Variant,
}

pub fn run(plan: &Plan, binary: &Path, log_dir: &Path, foreign: &mut Foreign) -> Result<Overhead> {
    Ok(Overhead {
        threads: plan.churn_threads,
        round_seconds: plan.ab_round.as_secs_f64(),
        draining: variant(plan, binary, log_dir, foreign, ChurnKind::Accepted)?,
        busy: variant(plan, binary, log_dir, foreign, ChurnKind::Anchored)?,
    })
}

fn variant(
    plan: &Plan,
    binary: &Path,
    log_dir: &Path,
    foreign: &mut Foreign,
    kind: ChurnKind,
) -> Result<Variant> {
    let name = if kind == ChurnKind::Anchored {
        "ports stay busy (one connection held open on each)"
    } else {
        "ports drain between connections"
    };
    let tag = format!("overhead, {name}");
    let rounds = pairs::alternate(&tag, "connection", plan.ab_pairs, |pair, with_agent| {
        round(plan, binary, log_dir, pair, with_agent, foreign, kind)
    })?;
    let attached = || rounds.iter().filter(|r| r.with_agent);
    let of_attached = |value: fn(&Round) -> f64| median(&attached().map(value).collect::<Vec<_>>());
    Ok(Variant {
        name: name.to_owned(),
        paired: Paired::of(&rounds),
        agent_cpu_ms_per_1k_connections: of_attached(|r| {
            r.agent_cpu_ms.unwrap_or(0.0) * 1000.0 / r.done.max(1) as f64
        }),
        agent_cpu_percent_of_core: of_attached(|r| {
            r.agent_cpu_ms.unwrap_or(0.0) / (r.seconds * 1000.0) * 100.0
        }),
        left_active: attached().map(|r| r.left_active.unwrap_or(0)).sum(),
        attached_connections: attached().map(|r| r.done).sum(),
        rounds,
    })
}

fn round(
    plan: &Plan,
    binary: &Path,
    log_dir: &Path,
    pair: usize,
    with_agent: bool,
    foreign: &mut Foreign,
    kind: ChurnKind,
) -> Result<Round> {
    let agent = RoundAgent::start(plan, binary, log_dir, foreign, with_agent)?;
    let churn_before = sys::own_cpu_time_ms();
    let report = net::churn(
        kind,
        plan.churn_threads,
        ChurnLimit {
            connections: u64::MAX,
            time: plan.ab_round,
        },
    )?;
    let churn_cpu_ms = sys::own_cpu_time_ms() - churn_before;
    let (agent_cpu_ms, left_active) = agent.finish(&report.ports)?;
    Ok(Round {
        pair,
        with_agent,
        done: report.connections,
        seconds: report.elapsed.as_secs_f64(),
        per_second: report.per_second(),
        errors: report.errors,
        load_cpu_ms: churn_cpu_ms,
        server_cpu_ms: 0.0,
        agent_cpu_ms,
        left_active,
    })
}
