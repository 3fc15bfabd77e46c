//! Rounds without and with the agent, in pairs whose order flips every pair (A B, B A, …)
//! so that drifting background load hits both sides alike; ratios are taken within a pair
//! and summarised by their median with a distribution-free interval. Used by the loopback
//! churn (section 2) and nginx (section 7).

use std::{path::Path, time::Duration};

use anyhow::Result;
use serde::Serialize;

use super::{
    Foreign, Plan,
    agent::Agent,
    stats::{median, median_interval},
    sys,
};

/// The coverage asked of the interval reported around each median pair ratio.
pub const MEDIAN_COVERAGE: f64 = 0.95;

/// One round: the load for a fixed time, with the agent or without.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Round {
    pub pair: usize,
    pub with_agent: bool,
    /// Work done: connections (section 2) or requests (section 7).
    pub done: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub errors: u64,
    /// CPU time of the benchmark's own load threads during the round.
    pub load_cpu_ms: f64,
    /// CPU time of the server when it is a process of its own (nginx: master and workers).
    pub server_cpu_ms: f64,
    /// Agent user + system CPU time during the round (attached rounds only).
    pub agent_cpu_ms: Option<f64>,
    /// What the agent still counted on the load's ports after the round, every connection
    /// to them closed (attached rounds only): closes it missed.
    pub left_active: Option<u64>,
}

impl Round {
    /// CPU µs per unit of work: the load, the server and the agent.
    pub fn cpu_us(&self) -> f64 {
        (self.load_cpu_ms + self.server_cpu_ms + self.agent_cpu_ms.unwrap_or(0.0)) * 1000.0
            / self.done.max(1) as f64
    }

    /// The agent's part of `cpu_us`.
    pub fn agent_cpu_us(&self) -> f64 {
        self.agent_cpu_ms.unwrap_or(0.0) * 1000.0 / self.done.max(1) as f64
    }
}

/// Runs `pairs` pairs of rounds, `round(pair, with_agent)` each, logs each as
/// `bench: [tag] pair P with agent: … units/s …`, and returns them in order (without, with)
/// per pair.
pub fn alternate(
    tag: &str,
    unit: &str,
    pairs: usize,
    mut round: impl FnMut(usize, bool) -> Result<Round>,
) -> Result<Vec<Round>> {
    let mut rounds = Vec::with_capacity(2 * pairs);
    for pair in 0..pairs {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut done: [Option<Round>; 2] = [None, None];
        for with_agent in order {
            let round = round(pair, with_agent)?;
            eprintln!(
                "bench: [{tag}] pair {pair} {}: {:.0} {unit}s/s, {:.1} µs CPU/{unit}, {} errors{}",
                if with_agent {
                    "with agent   "
                } else {
                    "without agent"
                },
                round.per_second,
                round.cpu_us(),
                round.errors,
                match (round.agent_cpu_ms, round.left_active) {
                    (Some(ms), Some(left)) =>
                        format!(" (agent {ms:.0} ms; {left} left counted after all closed)"),
                    _ => String::new(),
                }
            );
            done[usize::from(with_agent)] = Some(round);
        }
        rounds.extend(done.into_iter().flatten());
    }
    Ok(rounds)
}

/// The two rounds of `pair`, (without, with).
pub fn pair_of(rounds: &[Round], pair: usize) -> Option<(&Round, &Round)> {
    let find = |with: bool| {
        rounds
            .iter()
            .find(|r| r.pair == pair && r.with_agent == with)
    };
    Some((find(false)?, find(true)?))
}

/// How many pairs `rounds` hold.
pub fn pairs_in(rounds: &[Round]) -> usize {
    rounds.iter().map(|r| r.pair).max().map_or(0, |p| p + 1)
}

/// The pair ratios of rounds and their medians.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Paired {
    /// with ÷ without throughput, per pair.
    pub pair_ratios: Vec<f64>,
    pub median_ratio: f64,
    /// A 95 % (or more) interval for the median pair ratio: (low, high, coverage); `None`
    /// with too few pairs for that coverage.
    pub ratio_interval: Option<(f64, f64, f64)>,
    pub median_without_per_second: f64,
    pub median_with_per_second: f64,
    /// without ÷ with CPU per unit of work, per pair (what the ratio would be on a
    /// CPU-bound machine nobody else uses).
    pub pair_cpu_ratios: Vec<f64>,
    pub median_cpu_ratio: f64,
    pub cpu_ratio_interval: Option<(f64, f64, f64)>,
    pub median_cpu_us_without: f64,
    pub median_cpu_us_with: f64,
}

impl Paired {
    pub fn of(rounds: &[Round]) -> Self {
        let mut result = Self::default();
        for pair in 0..pairs_in(rounds) {
            let Some((without, with)) = pair_of(rounds, pair) else {
                continue;
            };
            if without.per_second > 0.0 {
                result
                    .pair_ratios
                    .push(with.per_second / without.per_second);
            }
            if with.cpu_us() > 0.0 {
                result
                    .pair_cpu_ratios
                    .push(without.cpu_us() / with.cpu_us());
            }
        }
        let of = |with: bool, value: fn(&Round) -> f64| {
            median(
                &rounds
                    .iter()
                    .filter(|r| r.with_agent == with)
                    .map(value)
                    .collect::<Vec<_>>(),
            )
        };
        result.median_ratio = median(&result.pair_ratios);
        result.ratio_interval = median_interval(&result.pair_ratios, MEDIAN_COVERAGE);
        result.median_cpu_ratio = median(&result.pair_cpu_ratios);
        result.cpu_ratio_interval = median_interval(&result.pair_cpu_ratios, MEDIAN_COVERAGE);
        result.median_without_per_second = of(false, |r| r.per_second);
        result.median_with_per_second = of(true, |r| r.per_second);
        result.median_cpu_us_without = of(false, Round::cpu_us);
        result.median_cpu_us_with = of(true, Round::cpu_us);
        result
    }
}

/// The agent of one round (none in a round without it): started before the load, its CPU
/// time read around the load, stopped after.
pub struct RoundAgent {
    agent: Option<Agent>,
    cpu_before: Option<f64>,
}

impl RoundAgent {
    /// Starts the agent (default options) if `with_agent`, notes other agents' handlers,
    /// and lets start-up work settle the same way for both kinds of round.
    pub fn start(
        plan: &Plan,
        binary: &Path,
        log_dir: &Path,
        foreign: &mut Foreign,
        with_agent: bool,
    ) -> Result<Self> {
        let agent = if with_agent {
            let agent = Agent::start(binary, log_dir, &plan.agent(None, false))?;
            foreign.check(&agent)?;
            Some(agent)
        } else {
            foreign.check_without_agent()?;
            None
        };
        std::thread::sleep(Duration::from_millis(300));
        let cpu_before = agent
            .as_ref()
            .map(|a| sys::cpu_time_ms(a.pid()))
            .transpose()?;
        Ok(Self { agent, cpu_before })
    }

    /// The agent's CPU ms since `start`, and what it still counts on `ports` (all closed by
    /// now: anything else is a close it missed); stops it. `None`s without an agent.
    pub fn finish(self, ports: &[u16]) -> Result<(Option<f64>, Option<u64>)> {
        let Some(agent) = self.agent else {
            return Ok((None, None));
        };
        let cpu = sys::cpu_time_ms(agent.pid())? - self.cpu_before.unwrap_or(0.0);
        let left = agent.left_active(ports)?;
        agent.stop()?;
        Ok((Some(cpu), Some(left)))
    }
}
