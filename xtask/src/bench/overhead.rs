//! Section 2: loopback connection churn with the agent attached vs not, in interleaved
//! rounds (A B, B A, A B, …) so that drifting background load hits both sides alike.
//!
//! Two variants: every churned port drains between connections (its count goes 0 → 1 → 0,
//! so the kernel side writes two ring-buffer events per connection and the agent wakes up
//! for them), and every port stays busy (one connection held open on it: no events).
//! Besides throughput, each round records the CPU time spent per connection (the churn's
//! threads, plus the agent's) — less sensitive to other tenants than wall-clock rates.

use std::{path::Path, time::Duration};

use anyhow::Result;
use serde::Serialize;

use super::{
    Foreign, Plan,
    agent::Agent,
    net::{self, ChurnKind, ChurnLimit},
    stats::{median, median_interval},
    sys,
};

/// The coverage asked of the interval reported around each median pair ratio.
pub const MEDIAN_COVERAGE: f64 = 0.95;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Round {
    pub pair: usize,
    pub with_agent: bool,
    pub connections: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub errors: u64,
    /// CPU time of the churning process during the round.
    pub churn_cpu_ms: f64,
    /// Agent user + system CPU time during the round (attached rounds only).
    pub agent_cpu_ms: Option<f64>,
    /// Connections the agent still counted on the churn's ports after they all closed
    /// (attached rounds only): closes it missed.
    pub left_active: Option<u64>,
}

impl Round {
    /// CPU µs per connection, churn plus agent.
    fn cpu_us_per_connection(&self) -> f64 {
        (self.churn_cpu_ms + self.agent_cpu_ms.unwrap_or(0.0)) * 1000.0
            / self.connections.max(1) as f64
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Variant {
    pub name: String,
    pub rounds: Vec<Round>,
    /// with ÷ without throughput, per pair.
    pub pair_ratios: Vec<f64>,
    pub median_ratio: f64,
    /// A 95 % (or more) interval for the median pair ratio: (low, high, coverage); `None`
    /// with too few pairs for that coverage.
    pub ratio_interval: Option<(f64, f64, f64)>,
    pub median_without_per_second: f64,
    pub median_with_per_second: f64,
    /// without ÷ with CPU per connection, per pair (what the ratio would be on a CPU-bound
    /// machine nobody else uses).
    pub pair_cpu_ratios: Vec<f64>,
    pub median_cpu_ratio: f64,
    pub cpu_ratio_interval: Option<(f64, f64, f64)>,
    pub median_cpu_us_without: f64,
    pub median_cpu_us_with: f64,
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
    let mut result = Variant {
        name: name.to_owned(),
        ..Variant::default()
    };
    for pair in 0..plan.ab_pairs {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut rounds: [Option<Round>; 2] = [None, None];
        for with_agent in order {
            let round = round(plan, binary, log_dir, pair, with_agent, foreign, kind)?;
            eprintln!(
                "bench: [overhead] {name}, pair {pair} {}: {:.0} connections/s, {:.1} µs CPU/connection{}",
                if with_agent {
                    "with agent   "
                } else {
                    "without agent"
                },
                round.per_second,
                round.cpu_us_per_connection(),
                round
                    .agent_cpu_ms
                    .map(|ms| format!(
                        " (agent {ms:.0} ms; {} left counted after all closed)",
                        round.left_active.unwrap_or(0)
                    ))
                    .unwrap_or_default()
            );
            rounds[usize::from(with_agent)] = Some(round);
        }
        if let [Some(without), Some(with)] = rounds {
            if without.per_second > 0.0 {
                result
                    .pair_ratios
                    .push(with.per_second / without.per_second);
            }
            let with_cpu = with.cpu_us_per_connection();
            if with_cpu > 0.0 {
                result
                    .pair_cpu_ratios
                    .push(without.cpu_us_per_connection() / with_cpu);
            }
            result.rounds.push(without);
            result.rounds.push(with);
        }
    }
    let of = |with: bool, value: fn(&Round) -> f64| -> f64 {
        median(
            &result
                .rounds
                .iter()
                .filter(|r| r.with_agent == with)
                .map(value)
                .collect::<Vec<_>>(),
        )
    };
    for round in result.rounds.iter().filter(|r| r.with_agent) {
        result.left_active += round.left_active.unwrap_or(0);
        result.attached_connections += round.connections;
    }
    result.median_ratio = median(&result.pair_ratios);
    result.ratio_interval = median_interval(&result.pair_ratios, MEDIAN_COVERAGE);
    result.cpu_ratio_interval = median_interval(&result.pair_cpu_ratios, MEDIAN_COVERAGE);
    result.median_without_per_second = of(false, |r| r.per_second);
    result.median_with_per_second = of(true, |r| r.per_second);
    result.median_cpu_ratio = median(&result.pair_cpu_ratios);
    result.median_cpu_us_without = of(false, Round::cpu_us_per_connection);
    result.median_cpu_us_with = of(true, Round::cpu_us_per_connection);
    result.agent_cpu_ms_per_1k_connections = of(true, |r| {
        r.agent_cpu_ms.unwrap_or(0.0) * 1000.0 / r.connections.max(1) as f64
    });
    result.agent_cpu_percent_of_core = of(true, |r| {
        r.agent_cpu_ms.unwrap_or(0.0) / (r.seconds * 1000.0) * 100.0
    });
    Ok(result)
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
    let agent = if with_agent {
        let agent = Agent::start(binary, log_dir, &plan.agent(None, false))?;
        foreign.check(&agent)?;
        Some(agent)
    } else {
        foreign.check_without_agent()?;
        None
    };
    // Let start-up work settle the same way for both.
    std::thread::sleep(Duration::from_millis(300));
    let agent_before = agent
        .as_ref()
        .map(|a| sys::cpu_time_ms(a.pid()))
        .transpose()?;
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
    let agent_cpu_ms = match (&agent, agent_before) {
        (Some(agent), Some(before)) => Some(sys::cpu_time_ms(agent.pid())? - before),
        _ => None,
    };
    let left_active = agent
        .as_ref()
        .map(|a| a.left_active(&report.ports))
        .transpose()?;
    if let Some(agent) = agent {
        agent.stop()?;
    }
    Ok(Round {
        left_active,
        pair,
        with_agent,
        connections: report.connections,
        seconds: report.elapsed.as_secs_f64(),
        per_second: report.per_second(),
        errors: report.errors,
        churn_cpu_ms,
        agent_cpu_ms,
    })
}
