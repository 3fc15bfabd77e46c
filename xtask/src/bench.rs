//! `cargo xtask bench`: the agent's costs, measured on this machine, written to
//! `bench/RESULTS.md` and `bench/results.json`.
//!
//! 1. per-event kernel cost (the kernel's own BPF statistics), split by event kind, and the
//!    hot churn in rounds against the bare hash map (with and without a duration);
//! 2. hot-path overhead: loopback connection churn with the agent attached vs not;
//! 3. answer cost with 10k and 100k established connections, against `ss` and /proc/net/tcp;
//! 4. wake-up latency from the last close to the waiter's answer, against polling;
//! 5. footprint: RSS, CPU during the churn, `/metrics` scrape time with 1,000 ports;
//! 6. the 10k-cold workload side by side with the minimal socket-keyed map (and the real
//!    bpftrace one-liner when installed);
//! 7. a real server: nginx, a new connection per request, with the agent vs without.
//!
//! The machine is shared and small: every comparison is a ratio inside one run, with A/B
//! rounds interleaved and medians taken. Every loop is bounded in count and time; the full
//! run takes about 11 minutes on 2 cores, `--quick` about 2.

mod agent;
mod answer;
mod bpftrace;
mod cold;
mod footprint;
mod holder;
mod hot;
mod kernel;
mod net;
mod nginx;
mod overhead;
mod pairs;
mod reference;
mod report;
mod stats;
mod sys;
mod wakeup;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::{cargo, is_root, setup, workspace_root};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A fast smoke run (about 2 minutes) with small counts; its numbers do not judge the goals.
    #[arg(long)]
    pub quick: bool,
    /// Benchmark this agent binary instead of building target/release/drain-agent.
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// More arguments for every agent the benchmark starts, e.g.
    /// `--agent-arg=--max-connections=32768` (for profiling experiments).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Also measure this build (e.g. the previous design's, `git worktree add` + `cargo build
    /// --release`) in the kernel and overhead sections, each section right after this
    /// build's, and report the two side by side (with their memory at start).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Run only these sections (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Section>,
    /// Where to write RESULTS.md and results.json (default: bench/ for a full run,
    /// target/bench/ for --quick or --only runs).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Section {
    Kernel,
    Overhead,
    Answer,
    Wakeup,
    Footprint,
    /// The 10k-cold workload: the handler vs the minimal socket-keyed map (and bpftrace).
    Reference,
    /// nginx, a new connection per request, with the agent vs without.
    Nginx,
}

/// Counts and time limits of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub quick: bool,
    pub churn_threads: usize,
    /// Connections in each attach method's churn (section 1).
    pub churn_connections: u64,
    pub churn_time_limit: Duration,
    /// The hot churn in rounds (section 1): connections per program and round, and rounds.
    pub hot_connections: u64,
    pub hot_rounds: usize,
    /// N of the per-kind phases (section 1), and how many times they are repeated.
    pub split_connections: usize,
    pub split_repetitions: usize,
    /// A/B pairs per churn variant (section 2).
    pub ab_pairs: usize,
    pub ab_round: Duration,
    pub answer_levels: Vec<usize>,
    pub answer_rounds: usize,
    pub answer_min_rounds: usize,
    pub answer_budget: Duration,
    pub drained_per_round: usize,
    pub wake_trials: usize,
    pub poll_100ms_trials: usize,
    pub poll_1s_trials: usize,
    pub metrics_ports: usize,
    pub scrapes: usize,
    /// Connections of the 10k-cold workload, and its rounds (each program once a round).
    pub cold_connections: usize,
    pub cold_rounds: usize,
    /// nginx: pairs of rounds (without/with the agent), their length, the load generator's
    /// threads, nginx's workers, and a cap on the requests of one round.
    pub nginx_pairs: usize,
    pub nginx_round: Duration,
    pub nginx_threads: usize,
    pub nginx_workers: usize,
    pub nginx_max_requests: u64,
    /// Passed to every agent (`--agent-arg`).
    pub agent_args: Vec<String>,
}

impl Plan {
    fn new(quick: bool, cpus: usize) -> Self {
        // Twice the cores, so the CPUs stay busy while a thread waits in a syscall.
        let churn_threads = (2 * cpus).clamp(2, 16);
        // Enough to keep nginx busy while a thread waits; bounded as the issue asks.
        let nginx_threads = churn_threads.clamp(2, 4);
        let nginx_workers = cpus.clamp(1, 4);
        if quick {
            Self {
                quick,
                churn_threads,
                churn_connections: 10_000,
                churn_time_limit: Duration::from_secs(30),
                hot_connections: 5_000,
                hot_rounds: 3,
                split_connections: 3_000,
                split_repetitions: 1,
                ab_pairs: 2,
                ab_round: Duration::from_secs(1),
                answer_levels: vec![0, 10_000],
                answer_rounds: 15,
                answer_min_rounds: 5,
                answer_budget: Duration::from_secs(8),
                drained_per_round: 10,
                wake_trials: 30,
                poll_100ms_trials: 20,
                poll_1s_trials: 5,
                metrics_ports: 1_000,
                scrapes: 20,
                cold_connections: 5_000,
                cold_rounds: 2,
                nginx_pairs: 3,
                nginx_round: Duration::from_secs(1),
                nginx_threads,
                nginx_workers,
                nginx_max_requests: 1_000_000,
                agent_args: Vec::new(),
            }
        } else {
            Self {
                quick,
                churn_threads,
                churn_connections: 100_000,
                churn_time_limit: Duration::from_secs(120),
                // 11 rounds: the median's 95 % interval is then the 3rd to 9th round
                // ratio (98.8 %); about 4 s a round.
                hot_connections: 30_000,
                hot_rounds: 11,
                split_connections: 8_000,
                split_repetitions: 5,
                // 15 pairs: the median's 95 % interval is then the 4th to 12th pair
                // ratio (with 7 it is the whole range, and one pair's noise here is ±5 %).
                ab_pairs: 15,
                ab_round: Duration::from_secs(3),
                answer_levels: vec![0, 10_000, 100_000],
                answer_rounds: 60,
                answer_min_rounds: 10,
                answer_budget: Duration::from_secs(40),
                drained_per_round: 10,
                wake_trials: 200,
                poll_100ms_trials: 200,
                poll_1s_trials: 200,
                metrics_ports: 1_000,
                scrapes: 50,
                cold_connections: 10_000,
                // 7 rounds: the least for a 95 % interval around the median ratio (the
                // extremes, 98.4 %); about 8 s a round.
                cold_rounds: 7,
                // 13 pairs: the median's interval is then the 3rd to 11th pair ratio (97.8 %);
                // about 7.5 s a pair.
                nginx_pairs: 13,
                nginx_round: Duration::from_secs(3),
                nginx_threads,
                nginx_workers,
                nginx_max_requests: 1_000_000,
                agent_args: Vec::new(),
            }
        }
    }

    /// How sections start the agent: `attach` (default: the agent's choice), seeding or not,
    /// plus `--agent-arg`s.
    fn agent(&self, attach: Option<&'static str>, no_seed: bool) -> agent::AgentOptions {
        agent::AgentOptions {
            attach,
            no_seed,
            extra: self.agent_args.clone(),
        }
    }
}

/// Other drain-agent handlers loaded on the host during the run (other people's tests):
/// they run on every connection we make, with and without our agent.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Foreign {
    pub checks: usize,
    pub max_loaded: usize,
    pub ids_seen: BTreeSet<u32>,
}

impl Foreign {
    fn check(&mut self, agent: &agent::Agent) -> Result<()> {
        let mine = agent.prog_ids()?;
        self.record(&sys::foreign_programs(kernel::HANDLER_PREFIX, &mine)?);
        Ok(())
    }

    fn check_without_agent(&mut self) -> Result<()> {
        self.record(&sys::foreign_programs(
            kernel::HANDLER_PREFIX,
            &BTreeSet::new(),
        )?);
        Ok(())
    }

    fn record(&mut self, found: &[sys::ProgStats]) {
        self.checks += 1;
        self.max_loaded = self.max_loaded.max(found.len());
        self.ids_seen.extend(found.iter().map(|p| p.id));
    }
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub mode: String,
    pub machine: sys::Machine,
    pub plan: Option<Plan>,
    pub duration_s: f64,
    pub other_handlers: Foreign,
    pub kernel: Option<kernel::KernelCost>,
    /// The hot churn of the handler and the bare map (with and without a duration) in
    /// alternating rounds (section 1).
    pub hot: Option<hot::HotRounds>,
    pub overhead: Option<overhead::Overhead>,
    pub answer: Option<answer::AnswerCost>,
    pub wakeup: Option<wakeup::Wakeup>,
    pub metrics: Option<footprint::MetricsScrape>,
    pub cold: Option<cold::ColdCost>,
    pub nginx: Option<nginx::NginxOverhead>,
    /// This build's memory at start, and the baseline's (`--baseline`) measured in turn.
    pub start_memory: Option<sys::Memory>,
    pub baseline: Option<Baseline>,
    pub goals: Vec<report::Goal>,
    /// Sections that failed, with why (the others still ran).
    pub errors: Vec<String>,
}

/// Another build measured in the same run (`--baseline`).
#[derive(Debug, Default, Serialize)]
pub struct Baseline {
    pub binary: String,
    /// `drain-agent --version` of the baseline.
    pub version: String,
    pub start_memory: Option<sys::Memory>,
    pub kernel: Option<kernel::KernelCost>,
    pub overhead: Option<overhead::Overhead>,
}

/// A build's memory once it serves: its peak at start (`VmHWM`) and its RSS then.
fn start_memory(plan: &Plan, binary: &Path, log_dir: &Path) -> Result<sys::Memory> {
    let agent = agent::Agent::start(binary, log_dir, &plan.agent(None, false))?;
    sys::memory(agent.pid())
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and sets sysctls: run it as root");
    }
    let root = workspace_root();
    let binary = match &args.agent {
        Some(binary) => binary.clone(),
        None => {
            setup::setup(&setup::SetupArgs::toolchain_only())?;
            cargo(&["build", "--release", "--package", "drain-agent"])?;
            root.join("target/release/drain-agent")
        }
    };
    let all = args.only.is_empty();
    let out = args.out.clone().unwrap_or_else(|| {
        if all && !args.quick {
            root.join("bench")
        } else {
            root.join("target/bench")
        }
    });
    let log_dir = root.join("target/bench/logs");
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("cannot create {}", log_dir.display()))?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    let started = Instant::now();
    let machine = sys::machine(&root);
    let mut plan = Plan::new(args.quick, machine.cpus);
    plan.agent_args = args.agent_args.clone();
    let wanted = |section: Section| all || args.only.contains(&section);
    let mut results = Results {
        mode: if args.quick {
            "quick".into()
        } else {
            "full".into()
        },
        machine,
        plan: Some(plan.clone()),
        ..Results::default()
    };
    eprintln!(
        "bench: {} run on {} CPUs, kernel {}, commit {}",
        results.mode, results.machine.cpus, results.machine.kernel, results.machine.commit
    );

    let mut foreign = Foreign::default();
    // Sections that count sockets go first: the churns leave up to ~130k sockets in
    // TIME_WAIT for a minute, which `ss` and /proc/net/tcp would have to walk too.
    if wanted(Section::Answer) {
        let outcome = answer::run(&plan, &binary, &log_dir, &mut foreign);
        results.answer = record(&mut results.errors, "answer", outcome);
    }
    if wanted(Section::Wakeup) {
        let outcome = wakeup::run(&plan, &binary, &log_dir, &mut foreign);
        results.wakeup = record(&mut results.errors, "wakeup", outcome);
    }
    if wanted(Section::Footprint) {
        let outcome = footprint::run(&plan, &binary, &log_dir, &mut foreign);
        results.metrics = record(&mut results.errors, "footprint", outcome);
    }
    let mut baseline = args.baseline.as_ref().map(|binary| Baseline {
        binary: binary.display().to_string(),
        version: version_of(binary),
        ..Baseline::default()
    });
    let outcome = start_memory(&plan, &binary, &log_dir);
    results.start_memory = record(&mut results.errors, "start memory", outcome);
    if let (Some(base), Some(path)) = (baseline.as_mut(), args.baseline.as_ref()) {
        let outcome = start_memory(&plan, path, &log_dir);
        base.start_memory = record(&mut results.errors, "baseline start memory", outcome);
    }
    if wanted(Section::Kernel) {
        let outcome = kernel::run(&plan, &binary, &log_dir, &mut foreign, true);
        results.kernel = record(&mut results.errors, "kernel", outcome);
        let outcome = hot::run(&plan, &binary, &log_dir, &mut foreign);
        results.hot = record(&mut results.errors, "hot churn in rounds", outcome);
        if let (Some(base), Some(path)) = (baseline.as_mut(), args.baseline.as_ref()) {
            eprintln!("bench: [kernel] the baseline, {}", path.display());
            let outcome = kernel::run(&plan, path, &log_dir, &mut foreign, false);
            base.kernel = record(&mut results.errors, "baseline kernel", outcome);
        }
    }
    if wanted(Section::Reference) {
        let outcome = cold::run(&plan, &binary, &log_dir, &mut foreign);
        results.cold = record(&mut results.errors, "reference", outcome);
    }
    if wanted(Section::Overhead) {
        let outcome = overhead::run(&plan, &binary, &log_dir, &mut foreign);
        results.overhead = record(&mut results.errors, "overhead", outcome);
        if let (Some(base), Some(path)) = (baseline.as_mut(), args.baseline.as_ref()) {
            eprintln!("bench: [overhead] the baseline, {}", path.display());
            let outcome = overhead::run(&plan, path, &log_dir, &mut foreign);
            base.overhead = record(&mut results.errors, "baseline overhead", outcome);
        }
    }
    if wanted(Section::Nginx) {
        let outcome = nginx::run(&plan, &binary, &log_dir, &mut foreign);
        results.nginx = record(&mut results.errors, "nginx", outcome);
    }
    results.baseline = baseline;
    results.other_handlers = foreign;
    results.duration_s = started.elapsed().as_secs_f64();
    results.goals = report::goals(&results);
    write(&results, &out)?;
    eprintln!(
        "bench: done in {:.0} s; wrote {} and {}",
        results.duration_s,
        out.join("RESULTS.md").display(),
        out.join("results.json").display()
    );
    if !results.errors.is_empty() {
        bail!("some sections failed: {}", results.errors.join("; "));
    }
    Ok(())
}

/// `binary --version`, or why it could not be asked.
fn version_of(binary: &Path) -> String {
    match std::process::Command::new(binary).arg("--version").output() {
        Ok(output) => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        Err(error) => format!("unknown ({error})"),
    }
}

/// Keeps a failed section's error for the report and lets the others run.
fn record<T>(errors: &mut Vec<String>, section: &str, outcome: Result<T>) -> Option<T> {
    match outcome {
        Ok(value) => Some(value),
        Err(error) => {
            eprintln!("bench: section {section} failed: {error:#}");
            errors.push(format!("{section}: {error:#}"));
            None
        }
    }
}

fn write(results: &Results, out: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(results).context("cannot encode the results")?;
    let json_path = out.join("results.json");
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let md_path = out.join("RESULTS.md");
    let previous = std::fs::read_to_string(&md_path).unwrap_or_default();
    let markdown = report::markdown(results, &previous);
    std::fs::write(&md_path, markdown)
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    Ok(())
}
