//! The hot churn side by side, in rounds: the agent's `tp_btf` handler, the bare hash map
//! reference (default flags, like the agent's socket map), the same map with a duration
//! (`Reference::Timed`), that with an endpoint counter (`Reference::Counted`: the least a
//! design that answers per endpoint does), and the empty program (the floor), each over the
//! same churn (connect, accept, close the client, close the server; every map hot).
//!
//! Why rounds: on a shared VM the bare map's churn swings several-fold between runs (84 to
//! 437 ns per connection over nine runs of one pass each), far more than the 1.3× the goal
//! is about, while the runs of one program seconds apart agree. So the programs take turns
//! in short rounds, the order reversed every other round, and each ratio is taken within a
//! round, net of that round's floor; the median of the round ratios is reported with a
//! distribution-free interval, as the throughput goals are.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    Foreign, Plan,
    agent::Agent,
    cold::{ATTACH, Running},
    kernel::Phase,
    net::{self, ChurnKind, ChurnLimit},
    pairs::MEDIAN_COVERAGE,
    reference::{EmptyProgram, Reference, ReferenceProgram},
    stats::{median, median_interval},
    sys,
};

/// What runs on the tracepoint in one round's churn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Program {
    /// The agent, `--attach tp-btf --no-seed`.
    Agent,
    /// The bench's hash map insert/delete, default flags.
    Bare,
    /// The same with a connection's duration (`Reference::Timed`).
    Timed,
    /// The same with a duration and an endpoint counter (`Reference::Counted`).
    Counted,
    /// `r0 = 0; exit`.
    Empty,
}

impl Program {
    const ALL: [Program; 5] = [
        Program::Agent,
        Program::Bare,
        Program::Timed,
        Program::Counted,
        Program::Empty,
    ];

    pub fn label(self) -> String {
        match self {
            Program::Agent => format!("the agent's handler ({ATTACH})"),
            Program::Bare => Reference::Hash {
                preallocated: false,
            }
            .label()
            .to_owned(),
            Program::Timed => Reference::Timed.label().to_owned(),
            Program::Counted => Reference::Counted.label().to_owned(),
            Program::Empty => "empty program (the floor)".to_owned(),
        }
    }

    fn start(
        self,
        plan: &Plan,
        binary: &Path,
        log_dir: &Path,
        foreign: &mut Foreign,
    ) -> Result<Running> {
        Ok(match self {
            Program::Agent => {
                let agent = Agent::start(binary, log_dir, &plan.agent(Some(ATTACH), true))?;
                foreign.check(&agent)?;
                Running::Agent(agent)
            }
            Program::Bare => Running::Reference(ReferenceProgram::attach(Reference::Hash {
                preallocated: false,
            })?),
            Program::Timed => Running::Reference(ReferenceProgram::attach(Reference::Timed)?),
            Program::Counted => Running::Reference(ReferenceProgram::attach(Reference::Counted)?),
            Program::Empty => Running::Empty(EmptyProgram::attach()?),
        })
    }
}

/// One program's churn in one round.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub round: usize,
    pub program: Program,
    pub churn: Phase,
}

/// `of` ÷ `to`, ns per connection net of the same round's floor, round by round.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRatio {
    pub of: Program,
    pub to: Program,
    pub ratios: Vec<f64>,
    pub median: f64,
    /// (low, high, coverage) for the median; `None` with too few rounds.
    pub interval: Option<(f64, f64, f64)>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct HotRounds {
    pub attach: String,
    pub rounds: usize,
    pub connections_per_round: u64,
    pub samples: Vec<Sample>,
    /// Median over the rounds of each program's ns per connection, net of the round's floor
    /// (`Program::ALL` order; the floor's own entry is its gross ns per run).
    pub median_net_ns_per_connection: Vec<(Program, f64)>,
    pub ratios: Vec<RoundRatio>,
    /// The agent's count left after its churns (0: no close missed).
    pub miscounted: u64,
}

impl HotRounds {
    pub fn ratio(&self, of: Program, to: Program) -> Option<&RoundRatio> {
        self.ratios.iter().find(|r| r.of == of && r.to == to)
    }

    pub fn median_net(&self, program: Program) -> Option<f64> {
        self.median_net_ns_per_connection
            .iter()
            .find(|(p, _)| *p == program)
            .map(|(_, ns)| *ns)
    }

    pub fn sample(&self, round: usize, program: Program) -> Option<&Phase> {
        self.samples
            .iter()
            .find(|s| s.round == round && s.program == program)
            .map(|s| &s.churn)
    }

    /// `program`'s ns per connection in `round`, net of that round's floor.
    pub fn net(&self, round: usize, program: Program) -> Option<f64> {
        let floor = self.sample(round, Program::Empty)?.mean_ns;
        Some(self.sample(round, program)?.net_ns_per_connection(floor))
    }

    /// The ratios and medians, from the samples.
    fn summarise(&mut self) {
        let rounds = || 0..self.rounds;
        self.median_net_ns_per_connection = Program::ALL
            .iter()
            .map(|&program| {
                let values: Vec<f64> = if program == Program::Empty {
                    rounds()
                        .filter_map(|r| self.sample(r, program).map(|p| p.mean_ns))
                        .collect()
                } else {
                    rounds().filter_map(|r| self.net(r, program)).collect()
                };
                (program, median(&values))
            })
            .collect();
        self.ratios = [
            (Program::Agent, Program::Bare),
            (Program::Timed, Program::Bare),
            (Program::Agent, Program::Timed),
            (Program::Counted, Program::Bare),
            (Program::Agent, Program::Counted),
        ]
        .into_iter()
        .map(|(of, to)| {
            let ratios: Vec<f64> = rounds()
                .filter_map(|r| match (self.net(r, of), self.net(r, to)) {
                    (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                    _ => None,
                })
                .collect();
            RoundRatio {
                of,
                to,
                median: median(&ratios),
                interval: median_interval(&ratios, MEDIAN_COVERAGE),
                ratios,
            }
        })
        .collect();
    }
}

pub fn run(plan: &Plan, binary: &Path, log_dir: &Path, foreign: &mut Foreign) -> Result<HotRounds> {
    let _stats = sys::Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    let mut hot = HotRounds {
        attach: ATTACH.to_owned(),
        rounds: plan.hot_rounds,
        connections_per_round: plan.hot_connections,
        ..HotRounds::default()
    };
    let limit = ChurnLimit {
        connections: plan.hot_connections,
        time: plan.churn_time_limit,
    };
    for round in 0..plan.hot_rounds {
        let mut order = Program::ALL.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for program in order {
            let running = program
                .start(plan, binary, log_dir, foreign)
                .with_context(|| format!("hot churn round {round}: {}", program.label()))?;
            let s0 = running.stats()?;
            let report = net::churn(ChurnKind::Accepted, plan.churn_threads, limit)?;
            let s1 = running.stats()?;
            let mut churn = Phase::new(
                "churn: connect, accept, close client, close server",
                report.connections,
                &s1.since(&s0),
            );
            match &running {
                Running::Agent(agent) => {
                    let left = agent.left_active(&report.ports)?;
                    hot.miscounted += left;
                    churn = churn.miscounted(left);
                }
                Running::Reference(reference) => reference.check_closed(report.connections)?,
                Running::Empty(_) | Running::Bpftrace(_) => {}
            }
            if let Running::Agent(agent) = running {
                agent.stop()?;
            }
            eprintln!(
                "bench: [kernel] hot round {round}, {}: {:.1} ns/run, {:.2} runs/connection",
                program.label(),
                churn.mean_ns,
                churn.runs_per_connection
            );
            hot.samples.push(Sample {
                round,
                program,
                churn,
            });
        }
    }
    hot.summarise();
    if let (Some(agent_bare), Some(timed_bare), Some(counted_bare), Some(agent_counted)) = (
        hot.ratio(Program::Agent, Program::Bare),
        hot.ratio(Program::Timed, Program::Bare),
        hot.ratio(Program::Counted, Program::Bare),
        hot.ratio(Program::Agent, Program::Counted),
    ) {
        eprintln!(
            "bench: [kernel] hot churn over {} rounds: the handler {:.2}× the bare map, the bare map with a duration {:.2}× it, with a duration and an endpoint counter {:.2}× it; the handler {:.2}× the last (medians of round ratios, net of each round's floor)",
            hot.rounds,
            agent_bare.median,
            timed_bare.median,
            counted_bare.median,
            agent_counted.median
        );
    }
    Ok(hot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: usize, program: Program, mean_ns: f64) -> Sample {
        Sample {
            round,
            program,
            churn: Phase {
                connections: 1,
                mean_ns,
                runs_per_connection: 10.0,
                ..Phase::default()
            },
        }
    }

    /// Each round's ratio is net of that round's own floor, and a round that misses a
    /// program is left out rather than paired with another round's sample.
    #[test]
    fn ratios_are_taken_within_a_round_net_of_its_floor() {
        let mut hot = HotRounds {
            rounds: 3,
            samples: vec![
                sample(0, Program::Empty, 50.0),
                sample(0, Program::Agent, 110.0),
                sample(0, Program::Bare, 80.0),
                sample(0, Program::Timed, 90.0),
                sample(0, Program::Counted, 100.0),
                // A slower round: everything doubles, the floor too.
                sample(1, Program::Empty, 100.0),
                sample(1, Program::Agent, 220.0),
                sample(1, Program::Bare, 160.0),
                sample(1, Program::Timed, 180.0),
                sample(1, Program::Counted, 200.0),
                // The bare map's churn failed in this round.
                sample(2, Program::Empty, 50.0),
                sample(2, Program::Agent, 500.0),
                sample(2, Program::Timed, 90.0),
            ],
            ..HotRounds::default()
        };
        hot.summarise();
        let agent_bare = hot.ratio(Program::Agent, Program::Bare).expect("ratio");
        assert_eq!(agent_bare.ratios, vec![2.0, 2.0]);
        assert_eq!(agent_bare.median, 2.0);
        let timed_bare = hot.ratio(Program::Timed, Program::Bare).expect("ratio");
        assert_eq!(timed_bare.ratios, vec![4.0 / 3.0, 4.0 / 3.0]);
        let agent_timed = hot.ratio(Program::Agent, Program::Timed).expect("ratio");
        assert_eq!(agent_timed.ratios, vec![1.5, 1.5, 11.25]);
        assert_eq!(agent_timed.median, 1.5);
        // Round 2 has no endpoint-counter sample: its ratios leave the round out.
        let agent_counted = hot.ratio(Program::Agent, Program::Counted).expect("ratio");
        assert_eq!(agent_counted.ratios, vec![1.2, 1.2]);
        let counted_bare = hot.ratio(Program::Counted, Program::Bare).expect("ratio");
        assert_eq!(counted_bare.ratios, vec![5.0 / 3.0, 5.0 / 3.0]);
        assert_eq!(hot.median_net(Program::Empty), Some(50.0));
        assert_eq!(hot.median_net(Program::Agent), Some(1200.0));
    }
}
