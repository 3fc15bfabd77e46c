//! Section 1: what each run of the eBPF handler costs, from the kernel's own statistics
//! (`kernel.bpf_stats_enabled=1`: `run_time_ns / run_cnt` per program).
//!
//! The kernel keeps one pair of counters per program, not per event kind. To split the cost
//! by kind, the connections are driven through phases in which the number of each kind of
//! run is known by construction (every connection is one passive open on the server side,
//! and each of its two sockets leaves the active states exactly once):
//!
//! | phase | tracked opens | tracked closes | closes of untracked sockets | other (early return) |
//! |---|---|---|---|---|
//! | close N connections opened before the agent attached | 0 | 0 | 2N | rest |
//! | open N connections | N | 0 | 0 | rest |
//! | close those N | 0 | N | N (client side) | rest |
//! | N connects refused by RST (SYN_SENT → CLOSE only) | 0 | 0 | 0 | all |
//!
//! "rest" is the phase's `run_cnt` minus the known kinds. The refused phase gives the cost of
//! an early return; subtracting that from the other phases gives the rest.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    Plan,
    agent::Agent,
    net::{self, ChurnKind, ChurnLimit, Pairs},
    reference::{EmptyProgram, Reference, ReferenceProgram},
    stats::median,
    sys::{self, ProgStats},
};

/// The three ways the agent attaches, and the name of the program each uses.
pub const ATTACH_METHODS: [(&str, &str); 3] = [
    ("tp-btf", "inet_sock_set_state_btf"),
    ("tracepoint", "inet_sock_set_state_tp"),
    ("raw-tracepoint", "inet_sock_set_state_raw"),
];

/// Names as the kernel keeps them (15 bytes).
pub const HANDLER_PREFIX: &str = "inet_sock_set_s";
pub const SEED_PREFIX: &str = "seed_establishe";

#[derive(Clone, Debug, Default, Serialize)]
pub struct Phase {
    pub phase: String,
    pub connections: u64,
    pub runs: u64,
    pub run_time_ns: u64,
    pub runs_per_connection: f64,
    pub mean_ns: f64,
    /// Runs the kernel skipped because the program was already running on that CPU (an
    /// event nested inside another, e.g. a softirq interrupting the handler).
    pub recursion_misses: u64,
    /// Connections still counted active when all of the phase's connections were closed
    /// (or not counted when they were all open): events the agent missed.
    pub miscounted: u64,
}

impl Phase {
    /// Run time per connection, net of `floor` ns per run: what the program added to each.
    pub fn net_ns_per_connection(&self, floor: f64) -> f64 {
        (self.mean_ns - floor) * self.runs_per_connection
    }

    pub(super) fn new(phase: &str, connections: u64, delta: &ProgStats) -> Self {
        Self {
            phase: phase.to_owned(),
            connections,
            runs: delta.run_cnt,
            run_time_ns: delta.run_time_ns,
            runs_per_connection: if connections == 0 {
                0.0
            } else {
                delta.run_cnt as f64 / connections as f64
            },
            mean_ns: delta.mean_ns(),
            recursion_misses: delta.recursion_misses,
            miscounted: 0,
        }
    }

    pub(super) fn miscounted(mut self, miscounted: u64) -> Self {
        self.miscounted = miscounted;
        self
    }
}

/// One repetition of the four phases, and the per-kind costs solved from it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseSet {
    pub phases: Vec<Phase>,
    pub early_return_ns: f64,
    pub untracked_close_ns: f64,
    pub tracked_open_ns: f64,
    pub tracked_close_ns: f64,
}

/// One attach method's numbers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MethodCost {
    pub attach: String,
    pub program: String,
    /// The churn (connect, accept, close the client, close the server) with the program
    /// attached.
    pub churn: Phase,
    pub churn_per_second: f64,
    /// The same churn with one connection held open on each port: the counts never reach
    /// zero, so no ring-buffer events are written.
    pub churn_anchored: Phase,
    /// (churn − anchored churn) run time per zero-crossing event (2 per churned connection).
    pub zero_crossing_event_ns: f64,
    pub repetitions: Vec<PhaseSet>,
    #[serde(flatten)]
    pub costs: KindCosts,
    /// Mean over the untracked runs, weighted as they occur in the churn.
    pub untracked_mean_ns: f64,
    pub recursion_misses: u64,
    /// Sum of the phases' and churns' `miscounted`.
    pub miscounted: u64,
    /// Runs, over the phases and churns (for the misses' share).
    pub runs: u64,
}

/// Mean ns per run, by kind: medians over the repetitions of the phases.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindCosts {
    pub early_return_ns: f64,
    pub untracked_close_ns: f64,
    pub tracked_open_ns: f64,
    pub tracked_close_ns: f64,
    /// Mean over the tracked runs (one open and one close per connection).
    pub tracked_mean_ns: f64,
}

impl KindCosts {
    fn median_of(repetitions: &[PhaseSet]) -> Self {
        let of = |value: fn(&PhaseSet) -> f64| {
            median(&repetitions.iter().map(value).collect::<Vec<_>>())
        };
        let tracked_open_ns = of(|r| r.tracked_open_ns);
        let tracked_close_ns = of(|r| r.tracked_close_ns);
        Self {
            early_return_ns: of(|r| r.early_return_ns),
            untracked_close_ns: of(|r| r.untracked_close_ns),
            tracked_open_ns,
            tracked_close_ns,
            tracked_mean_ns: (tracked_open_ns + tracked_close_ns) / 2.0,
        }
    }
}

/// A reference program's numbers (see `reference`): the same phases as the handler's.
#[derive(Clone, Debug, Serialize)]
pub struct ReferenceCost {
    pub reference: Reference,
    pub label: String,
    pub repetitions: Vec<PhaseSet>,
    #[serde(flatten)]
    pub costs: KindCosts,
    /// The handler's churn (connect, accept, close both ends) with the reference instead:
    /// the same maps kept hot.
    pub churn: Phase,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelCost {
    /// An empty program (`r0 = 0; exit`) on the same tracepoint over a churn: what the
    /// statistics report for doing nothing (dispatch + the clock reads of the statistics).
    pub floor: Phase,
    pub methods: Vec<MethodCost>,
    /// What the simplest per-socket bookkeeping costs on this host, in the same phases
    /// (measured once per run, not again for a baseline).
    pub references: Vec<ReferenceCost>,
}

/// Measures the floor, each attach method of the agent `binary`, and (`with_references`)
/// the reference programs.
pub fn run(
    plan: &Plan,
    binary: &Path,
    log_dir: &Path,
    foreign: &mut super::Foreign,
    with_references: bool,
) -> Result<KernelCost> {
    let _stats = sys::Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    let mut cost = KernelCost {
        floor: measure_floor(plan)?,
        ..KernelCost::default()
    };
    eprintln!(
        "bench: [kernel] measurement floor (empty program): {:.1} ns/run",
        cost.floor.mean_ns
    );
    for (attach, program) in ATTACH_METHODS {
        eprintln!("bench: [kernel] {attach}");
        let method = measure_method(plan, binary, log_dir, attach, program, foreign)
            .with_context(|| format!("kernel cost with --attach {attach}"))?;
        eprintln!(
            "bench: [kernel] {attach}: {:.1} ns/run over the churn ({:.2} runs/connection, {} recursion misses, {} left counted; anchored: {:.1} ns/run, {} misses, {} left counted; {:.0} ns per zero-crossing event); open {:.0} ns, close {:.0} ns, untracked close {:.0} ns, early return {:.0} ns",
            method.churn.mean_ns,
            method.churn.runs_per_connection,
            method.churn.recursion_misses,
            method.churn.miscounted,
            method.churn_anchored.mean_ns,
            method.churn_anchored.recursion_misses,
            method.churn_anchored.miscounted,
            method.zero_crossing_event_ns,
            method.costs.tracked_open_ns,
            method.costs.tracked_close_ns,
            method.costs.untracked_close_ns,
            method.costs.early_return_ns
        );
        cost.methods.push(method);
    }
    if with_references {
        for reference in Reference::ALL {
            let measured = measure_reference(plan, reference)
                .with_context(|| format!("reference program: {}", reference.label()))?;
            eprintln!(
                "bench: [kernel] reference, {}: open {:.0} ns, close {:.0} ns, untracked close {:.0} ns, early return {:.0} ns; churn {:.1} ns/run",
                measured.label,
                measured.costs.tracked_open_ns,
                measured.costs.tracked_close_ns,
                measured.costs.untracked_close_ns,
                measured.costs.early_return_ns,
                measured.churn.mean_ns
            );
            cost.references.push(measured);
        }
    }
    Ok(cost)
}

/// What the phases measure: the agent's handler, or a reference program.
trait Subject {
    fn stats(&self) -> Result<ProgStats>;
    /// After the phase that opened `n` connections to `port`.
    fn check_opened(&self, port: u16, n: u64) -> Result<()>;
    /// After the phase that closed them.
    fn check_closed(&self, n: u64) -> Result<()>;
    fn stop(self) -> Result<()>;
}

impl Subject for Agent {
    fn stats(&self) -> Result<ProgStats> {
        self.prog_stats(HANDLER_PREFIX)
    }

    fn check_opened(&self, port: u16, n: u64) -> Result<()> {
        // Reported, not fatal: `miscounted` in the churns is where the agent's count is judged.
        let counted = self.active(port)?;
        if counted != n {
            eprintln!(
                "bench: [kernel] warning: the agent counts {counted} connections, {n} are open"
            );
        }
        Ok(())
    }

    fn check_closed(&self, _n: u64) -> Result<()> {
        Ok(())
    }

    fn stop(self) -> Result<()> {
        Agent::stop(self)
    }
}

impl Subject for ReferenceProgram {
    fn stats(&self) -> Result<ProgStats> {
        ReferenceProgram::stats(self)
    }

    fn check_opened(&self, _port: u16, n: u64) -> Result<()> {
        ReferenceProgram::check_opened(self, n)
    }

    fn check_closed(&self, n: u64) -> Result<()> {
        ReferenceProgram::check_closed(self, n)
    }

    fn stop(self) -> Result<()> {
        Ok(())
    }
}

fn measure_reference(plan: &Plan, reference: Reference) -> Result<ReferenceCost> {
    let mut repetitions = Vec::new();
    for _ in 0..plan.split_repetitions {
        let (set, _misses) = measure_phases(plan, || ReferenceProgram::attach(reference))?;
        repetitions.push(set);
    }
    let program = ReferenceProgram::attach(reference)?;
    let s0 = program.stats()?;
    let report = net::churn(
        ChurnKind::Accepted,
        plan.churn_threads,
        ChurnLimit {
            connections: plan.churn_connections,
            time: plan.churn_time_limit,
        },
    )?;
    let s1 = program.stats()?;
    program.check_closed(report.connections)?;
    Ok(ReferenceCost {
        reference,
        label: reference.label().to_owned(),
        costs: KindCosts::median_of(&repetitions),
        repetitions,
        churn: Phase::new(
            "churn: connect, accept, close client, close server",
            report.connections,
            &s1.since(&s0),
        ),
    })
}

fn measure_floor(plan: &Plan) -> Result<Phase> {
    let empty = EmptyProgram::attach()?;
    let before = empty.stats()?;
    let report = net::churn(
        ChurnKind::Accepted,
        plan.churn_threads,
        ChurnLimit {
            connections: plan.split_connections as u64,
            time: Duration::from_secs(60),
        },
    )?;
    let after = empty.stats()?;
    Ok(Phase::new(
        "empty program, churn",
        report.connections,
        &after.since(&before),
    ))
}

fn measure_method(
    plan: &Plan,
    binary: &Path,
    log_dir: &Path,
    attach: &'static str,
    program: &str,
    foreign: &mut super::Foreign,
) -> Result<MethodCost> {
    let mut repetitions = Vec::new();
    let mut recursion_misses = 0;
    for _ in 0..plan.split_repetitions {
        let (set, misses) = measure_phases(plan, || {
            let agent = Agent::start(binary, log_dir, &plan.agent(Some(attach), true))?;
            foreign.check(&agent)?;
            Ok(agent)
        })?;
        repetitions.push(set);
        recursion_misses += misses;
    }

    let agent = Agent::start(binary, log_dir, &plan.agent(Some(attach), true))?;
    foreign.check(&agent)?;
    let stats = || agent.prog_stats(HANDLER_PREFIX);
    let limit = ChurnLimit {
        connections: plan.churn_connections,
        time: plan.churn_time_limit,
    };
    let s0 = stats()?;
    let churn_report = net::churn(ChurnKind::Accepted, plan.churn_threads, limit)?;
    let s1 = stats()?;
    let churn = Phase::new(
        "churn: connect, accept, close client, close server",
        churn_report.connections,
        &s1.since(&s0),
    )
    .miscounted(agent.left_active(&churn_report.ports)?);
    let s1 = stats()?;
    let anchored_report = net::churn(ChurnKind::Anchored, plan.churn_threads, limit)?;
    let s2 = stats()?;
    let churn_anchored = Phase::new(
        "the same churn, one connection held open per port (no zero crossings)",
        anchored_report.connections,
        &s2.since(&s1),
    )
    .miscounted(agent.left_active(&anchored_report.ports)?);
    foreign.check(&agent)?;
    recursion_misses += s2.since(&s0).recursion_misses;
    agent.stop()?;

    let costs = KindCosts::median_of(&repetitions);
    // In the churn each connection has 1 tracked open, 1 tracked close, 1 untracked close
    // (the client's) and the rest early returns.
    let early_per_connection = (churn.runs_per_connection - 3.0).max(0.0);
    let untracked_mean_ns = (early_per_connection * costs.early_return_ns
        + costs.untracked_close_ns)
        / (early_per_connection + 1.0);
    let all_phases = || {
        repetitions
            .iter()
            .flat_map(|r| r.phases.iter())
            .chain([&churn, &churn_anchored])
    };
    let miscounted = all_phases().map(|p| p.miscounted).sum();
    let runs = all_phases().map(|p| p.runs).sum();
    let per_connection_ns =
        |phase: &Phase| phase.run_time_ns as f64 / phase.connections.max(1) as f64;
    let zero_crossing_event_ns =
        (per_connection_ns(&churn) - per_connection_ns(&churn_anchored)) / 2.0;
    Ok(MethodCost {
        attach: attach.to_owned(),
        program: program.to_owned(),
        churn_per_second: churn_report.per_second(),
        churn,
        churn_anchored,
        zero_crossing_event_ns,
        repetitions,
        costs,
        untracked_mean_ns,
        recursion_misses,
        miscounted,
        runs,
    })
}

/// The four phases once, with a fresh subject from `start` (the first phase needs
/// connections it never saw open). Returns the set and the recursion misses seen.
fn measure_phases<S: Subject>(
    plan: &Plan,
    start: impl FnOnce() -> Result<S>,
) -> Result<(PhaseSet, u64)> {
    let n = plan.split_connections;
    let deadline = Instant::now() + Duration::from_secs(120);
    let destinations = net::loopback_destinations(4);
    let listener = net::listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;

    // Connections the agent never sees open.
    let mut before = Pairs::default();
    before.establish(&listener, &destinations, n, deadline)?;

    let subject = start()?;
    let stats = || subject.stats();

    let s0 = stats()?;
    before.close_gracefully();
    let s1 = stats()?;
    let untracked_close = Phase::new(
        "close N connections opened before the agent attached",
        n as u64,
        &s1.since(&s0),
    );

    let mut pairs = Pairs::default();
    pairs.establish(&listener, &destinations, n, deadline)?;
    let s2 = stats()?;
    let open = Phase::new("open N connections", n as u64, &s2.since(&s1));
    subject.check_opened(net::local_port(&listener)?, n as u64)?;

    pairs.close_gracefully();
    let s3 = stats()?;
    subject.check_closed(n as u64)?;
    let close = Phase::new(
        "close those N (client first, then server)",
        n as u64,
        &s3.since(&s2),
    );

    let refused_report = net::churn(
        ChurnKind::Refused,
        plan.churn_threads,
        ChurnLimit {
            connections: n as u64,
            time: Duration::from_secs(60),
        },
    )?;
    let s4 = stats()?;
    let refused = Phase::new(
        "N connects refused (RST)",
        refused_report.connections,
        &s4.since(&s3),
    );
    subject.stop()?;

    let n = n as f64;
    let early = refused.mean_ns;
    let rest = |phase: &Phase, known: f64| (phase.runs as f64 - known).max(0.0);
    let untracked_close_ns =
        (untracked_close.run_time_ns as f64 - rest(&untracked_close, 2.0 * n) * early) / (2.0 * n);
    let tracked_open_ns = (open.run_time_ns as f64 - rest(&open, n) * early) / n;
    let tracked_close_ns =
        (close.run_time_ns as f64 - n * untracked_close_ns - rest(&close, 2.0 * n) * early) / n;
    Ok((
        PhaseSet {
            phases: vec![untracked_close, open, close, refused],
            early_return_ns: early,
            untracked_close_ns,
            tracked_open_ns,
            tracked_close_ns,
        },
        s4.since(&s0).recursion_misses,
    ))
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SeedCost {
    pub established_connections: usize,
    pub runs: u64,
    pub run_time_ns: u64,
    pub mean_ns: f64,
    /// From spawning a second agent to its first healthy /healthz (load, attach, seed).
    pub agent_startup_ms: f64,
    /// What that agent counted on the port: the seeded connections.
    pub counted: u64,
}

/// The seeding iterator's cost: a second agent started while `connections` are open on
/// `port` (stats are switched on just for it).
pub fn measure_seed(
    plan: &Plan,
    binary: &Path,
    log_dir: &Path,
    port: u16,
    connections: usize,
) -> Result<SeedCost> {
    let _stats = sys::Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    let agent = Agent::start(binary, log_dir, &plan.agent(None, false))?;
    let seed = agent.prog_stats(SEED_PREFIX)?;
    let counted = agent.active(port)?;
    let startup = agent.startup;
    agent.stop()?;
    Ok(SeedCost {
        established_connections: connections,
        runs: seed.run_cnt,
        run_time_ns: seed.run_time_ns,
        mean_ns: seed.mean_ns(),
        agent_startup_ms: startup.as_secs_f64() * 1000.0,
        counted,
    })
}
