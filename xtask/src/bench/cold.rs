//! The 10k-cold workload, side by side: N connections opened and held, then all closed
//! (client ends first), with the agent's `tp_btf` handler, or the minimal socket-keyed map a
//! drain needs (`reference::Reference::SocketMap`, what a bpftrace one-liner keeps), or an
//! empty program (the floor), or the real bpftrace one-liner when it is installed.
//!
//! The measure is the kernel's `run_time_ns / run_cnt` over the whole workload (every run of
//! the tracepoint, tracked or not), as a user comparing the agent with a bpftrace script
//! reads it. Programs take turns in rounds, the order reversed every other round, and the
//! agent's ratio to the reference is taken within each round (median over rounds).
//! Like for like: the agent's socket map and the reference's have the same size and flags
//! (both read from the running agent), for the agent's default and `--preallocate-sockets`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapInfo;
use serde::Serialize;

use super::{
    Foreign, Plan,
    agent::Agent,
    bpftrace::{self, Bpftrace, Script},
    holder::HeldConnections,
    kernel::HANDLER_PREFIX,
    net,
    pairs::MEDIAN_COVERAGE,
    reference::{EmptyProgram, Reference, ReferenceProgram, map_flags},
    stats::{median, median_interval},
    sys::{self, ProgStats},
};

/// The attach method compared (the agent's default where the kernel has BTF).
pub const ATTACH: &str = "tp-btf";

/// What runs on the tracepoint in one measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Program {
    /// The agent, `--attach tp-btf --no-seed`, with `--preallocate-sockets` or not.
    Agent { preallocate_flag: bool },
    /// The bench's own socket-keyed map program.
    SocketMap { preallocated: bool },
    /// `r0 = 0; exit` (the floor of the measurement).
    Empty,
    /// The real bpftrace one-liner.
    Bpftrace,
    /// bpftrace with an empty probe on the same tracepoint.
    BpftraceEmpty,
}

impl Program {
    pub fn label(self) -> String {
        match self {
            Program::Agent {
                preallocate_flag: false,
            } => format!("the agent's handler ({ATTACH}, default flags)"),
            Program::Agent {
                preallocate_flag: true,
            } => format!("the agent's handler ({ATTACH}, --preallocate-sockets)"),
            Program::SocketMap { preallocated } => {
                Reference::SocketMap { preallocated }.label().to_owned()
            }
            Program::Empty => "empty program (the floor)".to_owned(),
            Program::Bpftrace => "real bpftrace one-liner".to_owned(),
            Program::BpftraceEmpty => "real bpftrace, empty probe".to_owned(),
        }
    }
}

/// One program's measurement in one round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub round: usize,
    pub connections: u64,
    pub runs: u64,
    pub run_time_ns: u64,
    pub mean_ns: f64,
    /// The opening half and the closing half of the workload, ns per run.
    pub open_mean_ns: f64,
    pub close_mean_ns: f64,
    pub recursion_misses: u64,
    /// The agent's count off by this much after the opens plus after the closes.
    pub miscounted: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgramCost {
    pub program: Program,
    pub label: String,
    /// The socket map's flags, as the kernel reports them (`None`: no socket map).
    pub preallocated: Option<bool>,
    pub samples: Vec<Sample>,
    pub median_ns: f64,
}

/// The agent against the reference with the same map flags, round by round.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub agent: Program,
    pub reference: Program,
    pub preallocated: bool,
    pub agent_ns: f64,
    pub reference_ns: f64,
    /// agent ÷ reference ns per run, per round, and the median with its interval.
    pub ratios: Vec<f64>,
    pub median_ratio: f64,
    pub ratio_interval: Option<(f64, f64, f64)>,
    /// The same, each net of that round's empty program.
    pub net_ratios: Vec<f64>,
    pub median_net_ratio: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ColdCost {
    pub connections: usize,
    pub rounds: usize,
    pub attach: String,
    /// The agent's socket map size (the references are made the same size).
    pub socket_map_entries: u32,
    pub floor_ns: f64,
    pub programs: Vec<ProgramCost>,
    pub comparisons: Vec<Comparison>,
    /// bpftrace's version, or why its rows are missing.
    pub bpftrace: String,
}

impl ColdCost {
    pub fn cost(&self, program: Program) -> Option<&ProgramCost> {
        self.programs.iter().find(|p| p.program == program)
    }
}

/// A program attached for one measurement.
pub(super) enum Running {
    Agent(Agent),
    Reference(ReferenceProgram),
    Empty(EmptyProgram),
    Bpftrace(Bpftrace),
}

impl Running {
    pub(super) fn stats(&self) -> Result<ProgStats> {
        match self {
            Running::Agent(agent) => agent.prog_stats(HANDLER_PREFIX),
            Running::Reference(program) => program.stats(),
            Running::Empty(program) => program.stats(),
            Running::Bpftrace(bpftrace) => bpftrace.stats(),
        }
    }

    /// After `n` connections to `port` opened: the program recorded them. Returns how many
    /// the agent miscounts (reported, not fatal: a run the kernel skipped loses an event).
    fn check_opened(&self, port: u16, n: u64) -> Result<u64> {
        match self {
            Running::Agent(agent) => {
                let counted = agent.active(port)?;
                if counted != n {
                    eprintln!(
                        "bench: [reference] warning: the agent counts {counted} connections, {n} are open"
                    );
                }
                Ok(counted.abs_diff(n))
            }
            Running::Reference(program) => program.check_opened(n).map(|()| 0),
            Running::Bpftrace(bpftrace) if bpftrace.preallocated().is_some() => {
                let held = bpftrace.held()?;
                if held < n {
                    bail!("bpftrace's @s holds {held} sockets after {n} passive opens");
                }
                Ok(0)
            }
            Running::Empty(_) | Running::Bpftrace(_) => Ok(0),
        }
    }

    /// After they all closed; returns the agent's count left (as `check_opened`).
    fn check_closed(&self, port: u16, n: u64) -> Result<u64> {
        match self {
            Running::Agent(agent) => {
                let left = agent.left_active(&[port])?;
                if left != 0 {
                    eprintln!(
                        "bench: [reference] warning: the agent still counts {left} connections after all {n} closed"
                    );
                }
                Ok(left)
            }
            Running::Reference(program) => program.check_closed(n).map(|()| 0),
            Running::Bpftrace(bpftrace) => {
                let held = bpftrace.held()?;
                if held * 10 > n {
                    bail!("bpftrace's @s still holds {held} sockets after {n} closed");
                }
                Ok(0)
            }
            Running::Empty(_) => Ok(0),
        }
    }
}

/// The agent's `SOCKETS` map as the kernel describes it (the agent is running).
fn socket_map(agent: &Agent) -> Result<MapInfo> {
    sys::map_ids_of_process(agent.pid())?
        .into_iter()
        .filter_map(|id| MapInfo::from_id(id).ok())
        .find(|info| info.name_as_str() == Some("SOCKETS"))
        .context("the agent holds no BPF map named SOCKETS")
}

fn is_preallocated(info: &MapInfo) -> bool {
    info.map_flags() & map_flags(false) == 0
}

pub fn run(plan: &Plan, binary: &Path, log_dir: &Path, foreign: &mut Foreign) -> Result<ColdCost> {
    let _stats = sys::Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    let start_agent = |preallocate_flag: bool| {
        let mut options = plan.agent(Some(ATTACH), true);
        if preallocate_flag {
            options.extra.push("--preallocate-sockets".to_owned());
        }
        Agent::start(binary, log_dir, &options)
    };
    // What each agent configuration's socket map is: the references are built to match.
    let mut agent_maps = Vec::new();
    for preallocate_flag in [false, true] {
        let agent = start_agent(preallocate_flag)?;
        foreign.check(&agent)?;
        let info = socket_map(&agent)?;
        agent_maps.push((
            Program::Agent { preallocate_flag },
            is_preallocated(&info),
            info.max_entries(),
        ));
        agent.stop()?;
    }
    let entries = agent_maps.iter().map(|m| m.2).max().unwrap_or(262_144);
    // Each agent configuration, then the reference with its flags (once, should both
    // configurations have the same), then the floor.
    let mut programs = Vec::new();
    for &(agent, preallocated, _) in &agent_maps {
        programs.push(agent);
        let reference = Program::SocketMap { preallocated };
        if !programs.contains(&reference) {
            programs.push(reference);
        }
    }
    programs.push(Program::Empty);
    let mut bpftrace_note = match bpftrace::unavailable() {
        Some(reason) => {
            eprintln!("bench: [reference] skipping the real bpftrace rows: {reason}");
            format!("not measured: {reason}")
        }
        None => {
            programs.extend([Program::Bpftrace, Program::BpftraceEmpty]);
            bpftrace::version()
        }
    };
    let n = plan.cold_connections;
    let mut costs: Vec<ProgramCost> = programs
        .iter()
        .map(|&program| ProgramCost {
            program,
            label: program.label(),
            preallocated: match program {
                Program::Agent { preallocate_flag } => agent_maps
                    .iter()
                    .find(|m| m.0 == Program::Agent { preallocate_flag })
                    .map(|m| m.1),
                Program::SocketMap { preallocated } => Some(preallocated),
                _ => None,
            },
            samples: Vec::new(),
            median_ns: 0.0,
        })
        .collect();
    let mut bpftrace_failed = false;
    for round in 0..plan.cold_rounds {
        let mut order: Vec<usize> = (0..costs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let program = costs[index].program;
            let is_bpftrace = matches!(program, Program::Bpftrace | Program::BpftraceEmpty);
            if is_bpftrace && bpftrace_failed {
                continue;
            }
            let running = match program {
                Program::Agent { preallocate_flag } => {
                    let agent = start_agent(preallocate_flag)?;
                    foreign.check(&agent)?;
                    Running::Agent(agent)
                }
                Program::SocketMap { preallocated } => Running::Reference(
                    ReferenceProgram::attach_sized(Reference::SocketMap { preallocated }, entries)?,
                ),
                Program::Empty => Running::Empty(EmptyProgram::attach()?),
                Program::Bpftrace | Program::BpftraceEmpty => {
                    let script = if program == Program::Bpftrace {
                        Script::SocketMap
                    } else {
                        Script::Empty
                    };
                    match Bpftrace::start(script, entries, log_dir) {
                        Ok(bpftrace) => {
                            if let Some(preallocated) = bpftrace.preallocated() {
                                costs[index].preallocated = Some(preallocated);
                            }
                            Running::Bpftrace(bpftrace)
                        }
                        // Never fails the bench: its rows go, with the reason.
                        Err(error) => {
                            eprintln!("bench: [reference] skipping the real bpftrace: {error:#}");
                            bpftrace_note = format!("not measured: {error:#}");
                            bpftrace_failed = true;
                            continue;
                        }
                    }
                }
            };
            let sample = match workload(&running, n, round) {
                Ok(sample) => sample,
                Err(error) if is_bpftrace => {
                    eprintln!("bench: [reference] skipping the real bpftrace: {error:#}");
                    bpftrace_note = format!("not measured: {error:#}");
                    bpftrace_failed = true;
                    continue;
                }
                Err(error) => {
                    return Err(
                        error.context(format!("10k-cold workload with {}", program.label()))
                    );
                }
            };
            eprintln!(
                "bench: [reference] round {round}, {}: {:.1} ns/run ({} runs; open half {:.1}, close half {:.1})",
                program.label(),
                sample.mean_ns,
                sample.runs,
                sample.open_mean_ns,
                sample.close_mean_ns
            );
            costs[index].samples.push(sample);
        }
    }
    if bpftrace_failed {
        costs.retain(|c| !matches!(c.program, Program::Bpftrace | Program::BpftraceEmpty));
    }
    for cost in &mut costs {
        cost.median_ns = median(&cost.samples.iter().map(|s| s.mean_ns).collect::<Vec<_>>());
    }
    let mut result = ColdCost {
        connections: n,
        rounds: plan.cold_rounds,
        attach: ATTACH.to_owned(),
        socket_map_entries: entries,
        floor_ns: 0.0,
        comparisons: Vec::new(),
        bpftrace: bpftrace_note,
        programs: costs,
    };
    result.floor_ns = result.cost(Program::Empty).map_or(0.0, |c| c.median_ns);
    for (agent, preallocated, _) in agent_maps {
        if let Some(comparison) = compare(&result, agent, preallocated) {
            result.comparisons.push(comparison);
        }
    }
    Ok(result)
}

/// The agent's samples against the reference's with the same flags, round by round.
fn compare(cold: &ColdCost, agent: Program, preallocated: bool) -> Option<Comparison> {
    let reference = Program::SocketMap { preallocated };
    let (a, r, e) = (
        cold.cost(agent)?,
        cold.cost(reference)?,
        cold.cost(Program::Empty)?,
    );
    let mut ratios = Vec::new();
    let mut net_ratios = Vec::new();
    for a in &a.samples {
        let in_round = |samples: &[Sample]| samples.iter().find(|s| s.round == a.round).cloned();
        let (Some(r), Some(e)) = (in_round(&r.samples), in_round(&e.samples)) else {
            continue;
        };
        if r.mean_ns > 0.0 {
            ratios.push(a.mean_ns / r.mean_ns);
        }
        if r.mean_ns > e.mean_ns {
            net_ratios.push((a.mean_ns - e.mean_ns) / (r.mean_ns - e.mean_ns));
        }
    }
    Some(Comparison {
        agent,
        reference,
        preallocated,
        agent_ns: a.median_ns,
        reference_ns: r.median_ns,
        median_ratio: median(&ratios),
        ratio_interval: median_interval(&ratios, MEDIAN_COVERAGE),
        median_net_ratio: median(&net_ratios),
        ratios,
        net_ratios,
    })
}

/// Opens `n` connections (held by holder processes: 2n sockets are more than one process
/// may have here), checks the program saw them, closes them all, checks again.
fn workload(running: &Running, n: usize, round: usize) -> Result<Sample> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let destinations = net::loopback_destinations(4);
    let listener = net::listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    let port = net::local_port(&listener)?;
    let mut held = HeldConnections::default();
    let s0 = running.stats()?;
    held.add(&listener, &destinations, n, deadline)?;
    let s1 = running.stats()?;
    let mut miscounted = running.check_opened(port, n as u64)?;
    held.close_gracefully()?;
    let s2 = running.stats()?;
    miscounted += running.check_closed(port, n as u64)?;
    let all = s2.since(&s0);
    Ok(Sample {
        round,
        connections: n as u64,
        runs: all.run_cnt,
        run_time_ns: all.run_time_ns,
        mean_ns: all.mean_ns(),
        open_mean_ns: s1.since(&s0).mean_ns(),
        close_mean_ns: s2.since(&s1).mean_ns(),
        recursion_misses: all.recursion_misses,
        miscounted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(program: Program, rounds: &[(usize, f64)]) -> ProgramCost {
        ProgramCost {
            program,
            label: program.label(),
            preallocated: None,
            samples: rounds
                .iter()
                .map(|&(round, mean_ns)| Sample {
                    round,
                    mean_ns,
                    ..Sample::default()
                })
                .collect(),
            median_ns: median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>()),
        }
    }

    /// Ratios are taken within a round: a round the reference missed is left out, not
    /// paired with another round's sample.
    #[test]
    fn ratios_pair_samples_of_the_same_round() {
        let agent = Program::Agent {
            preallocate_flag: false,
        };
        let cold = ColdCost {
            programs: vec![
                cost(agent, &[(0, 200.0), (1, 300.0), (2, 400.0)]),
                cost(
                    Program::SocketMap {
                        preallocated: false,
                    },
                    &[(0, 100.0), (2, 200.0)],
                ),
                cost(Program::Empty, &[(0, 50.0), (1, 50.0), (2, 50.0)]),
            ],
            ..ColdCost::default()
        };
        let c = compare(&cold, agent, false).expect("a comparison");
        assert_eq!(c.ratios, vec![2.0, 2.0]);
        assert_eq!(c.net_ratios, vec![3.0, 350.0 / 150.0]);
        assert_eq!(c.median_ratio, 2.0);
        assert!(
            compare(&cold, agent, true).is_none(),
            "no preallocated reference"
        );
    }
}
