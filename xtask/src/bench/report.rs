//! The goals and `RESULTS.md`. The "Analysis" section of an existing RESULTS.md is written
//! by hand (profiles, explanations) and kept when the numbers are regenerated.

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    Results,
    cold::{ColdCost, Program},
    hot::{HotRounds, Program as HotProgram},
    nginx::NginxOverhead,
    pairs::{Round, pair_of, pairs_in},
    reference::Reference,
    stats::Summary,
};

/// One goal of the issue and where it stands.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub value: f64,
    pub target: f64,
    pub met: bool,
}

const ANALYSIS_BEGIN: &str = "<!-- analysis:begin (hand-written; kept by cargo xtask bench) -->";
const ANALYSIS_END: &str = "<!-- analysis:end -->";

fn at_most(goal: &str, measured: String, value: f64, target: f64) -> Goal {
    Goal {
        goal: goal.to_owned(),
        measured,
        value,
        target,
        met: value <= target,
    }
}

/// The distribution-free interval around a median pair ratio, as the report writes it.
fn interval_text(interval: Option<(f64, f64, f64)>) -> String {
    match interval {
        Some((low, high, coverage)) => format!(
            "{:.0} % interval for the median {low:.3}–{high:.3}",
            coverage * 100.0
        ),
        None => "too few pairs for an interval".to_owned(),
    }
}

fn at_least(goal: &str, measured: String, value: f64, target: f64) -> Goal {
    Goal {
        goal: goal.to_owned(),
        measured,
        value,
        target,
        met: value >= target,
    }
}

pub fn goals(results: &Results) -> Vec<Goal> {
    let mut goals = Vec::new();
    if let Some(kernel) = &results.kernel
        && let Some(default) = kernel.methods.first()
    {
        // Judged net of the measurement floor (an empty program's cost on this machine).
        let floor = kernel.floor.mean_ns;
        let host = kernel
            .references
            .iter()
            .map(|r| format!("{} {:.0}", r.label, r.costs.tracked_mean_ns - floor))
            .collect::<Vec<_>>()
            .join(", ");
        let host = if host.is_empty() {
            String::new()
        } else {
            format!("; every reference: {host}")
        };
        // The handler's own bookkeeping, judged against the bare hash map (default flags, as
        // the agent's socket map) in the same churn, every map hot: in rounds where they are
        // (one unpaired pass per program cannot resolve 1.3× on a shared VM), else from the
        // single churns of the table.
        if let Some(goal) = results.hot.as_ref().and_then(hot_goal) {
            goals.push(goal);
        } else if let Some(bare) = kernel.references.iter().find(|r| {
            r.reference
                == Reference::Hash {
                    preallocated: false,
                }
        }) {
            let handler = default.churn.net_ns_per_connection(floor);
            let reference = bare.churn.net_ns_per_connection(floor);
            let ratio = if reference > 0.0 {
                handler / reference
            } else {
                f64::INFINITY
            };
            goals.push(at_most(
                HOT_GOAL,
                format!(
                    "{ratio:.2}×: {handler:.0} vs {reference:.0} ns per connection with {}, one pass each (net of the floor {floor:.0}; in the cold phases the tracked mean is {:.0} vs {:.0} ns{host})",
                    default.attach,
                    default.costs.tracked_mean_ns - floor,
                    bare.costs.tracked_mean_ns - floor
                ),
                ratio,
                1.3,
            ));
        }
        let others = kernel.methods[1..]
            .iter()
            .map(|m| format!("{} {:.0}", m.attach, m.untracked_mean_ns - floor))
            .collect::<Vec<_>>()
            .join(", ");
        goals.push(at_most(
            "per-event cost, untracked transitions ≤ floor + 10 ns (mean)",
            format!(
                "floor + {:.0} ns with {} (early return {:.0}, close of an untracked socket {:.0}; floor {floor:.0}); {others}",
                default.untracked_mean_ns - floor,
                default.attach,
                default.costs.early_return_ns - floor,
                default.costs.untracked_close_ns - floor
            ),
            default.untracked_mean_ns - floor,
            10.0,
        ));
    }
    if let Some(cold) = &results.cold {
        goals.extend(cold_goal(cold));
    }
    if let Some(overhead) = &results.overhead {
        let v = &overhead.draining;
        goals.push(at_least(
            "churn throughput with the agent ≥ 0.97 × without",
            format!(
                "{:.3} (median of {} pair ratios, {}; {:.0} vs {:.0} connections/s); by CPU per connection {:.3} ({}); ports kept busy: {:.3} (CPU {:.3})",
                v.paired.median_ratio,
                v.paired.pair_ratios.len(),
                interval_against(v.paired.ratio_interval, 0.97),
                v.paired.median_with_per_second,
                v.paired.median_without_per_second,
                v.paired.median_cpu_ratio,
                interval_text(v.paired.cpu_ratio_interval),
                overhead.busy.paired.median_ratio,
                overhead.busy.paired.median_cpu_ratio
            ),
            v.paired.median_ratio,
            0.97,
        ));
    }
    if let Some(nginx) = &results.nginx {
        goals.push(nginx_goal(nginx));
    }
    if let Some(answer) = &results.answer
        && let Some(level) = answer.levels.iter().max_by_key(|l| l.connections)
    {
        let at = format!("at {} connections", level.connections);
        goals.push(at_most(
            "/drained p99 ≤ 1 ms at 100k connections",
            format!(
                "{:.3} ms {at} (p50 {:.3} ms)",
                level.drained.p99_ms, level.drained.p50_ms
            ),
            level.drained.p99_ms,
            1.0,
        ));
        goals.push(at_least(
            "/drained ≥ 100× faster than ss at 100k connections",
            format!(
                "{:.0}× (p50: {:.1} ms vs {:.3} ms; at p99 {:.0}×) {at}",
                level.ss_over_agent_p50,
                level.ss.p50_ms,
                level.drained.p50_ms,
                level.ss_over_agent_p99
            ),
            level.ss_over_agent_p50,
            100.0,
        ));
    }
    if let Some(wakeup) = &results.wakeup {
        goals.push(at_most(
            "wake-up p99 ≤ 5 ms",
            format!(
                "{:.2} ms (p50 {:.2} ms, {} trials)",
                wakeup.agent.p99_ms, wakeup.agent.p50_ms, wakeup.agent.n
            ),
            wakeup.agent.p99_ms,
            5.0,
        ));
    }
    if let Some(memory) = &results.start_memory {
        let peak = memory.hwm_kib as f64 / 1024.0;
        let baseline = results
            .baseline
            .as_ref()
            .and_then(|base| base.start_memory)
            .map(|base| format!("; the baseline: {}", mib(base.hwm_kib)))
            .unwrap_or_default();
        goals.push(at_most(
            "agent peak RSS at start ≤ 16 MiB",
            format!(
                "{peak:.1} MiB (RSS once serving {}){baseline}",
                mib(memory.rss_kib)
            ),
            peak,
            16.0,
        ));
    }
    if let Some(answer) = &results.answer {
        let mib = answer.memory_loaded.rss_kib as f64 / 1024.0;
        goals.push(at_most(
            "agent RSS ≤ 30 MB with 100k tracked connections",
            format!(
                "{mib:.1} MiB with {} tracked (idle {:.1} MiB)",
                answer.loaded_connections,
                answer.memory_idle.rss_kib as f64 / 1024.0
            ),
            mib,
            30.0,
        ));
    }
    goals
}

/// The interval as `interval_text` writes it, and ", which straddles T" when it contains
/// `target`: one run cannot tell on which side of the goal the ratio lies.
fn interval_against(interval: Option<(f64, f64, f64)>, target: f64) -> String {
    let text = interval_text(interval);
    match interval {
        Some((low, high, _)) if low <= target && target <= high => {
            format!("{text}, which straddles {target}")
        }
        _ => text,
    }
}

const HOT_GOAL: &str = "hot churn per connection ≤ 1.3× the bare hash map reference";

/// The hot churn in rounds: the handler against the bare hash map, and what a duration
/// alone (two clock reads and the close's lookup), then a duration and an endpoint counter
/// (the least a per-endpoint drain needs), cost against the same map.
fn hot_goal(hot: &HotRounds) -> Option<Goal> {
    let agent_bare = hot.ratio(HotProgram::Agent, HotProgram::Bare)?;
    let timed_bare = hot.ratio(HotProgram::Timed, HotProgram::Bare)?;
    let agent_timed = hot.ratio(HotProgram::Agent, HotProgram::Timed)?;
    let counted_bare = hot.ratio(HotProgram::Counted, HotProgram::Bare)?;
    let agent_counted = hot.ratio(HotProgram::Agent, HotProgram::Counted)?;
    let ns = |program| hot.median_net(program).unwrap_or(f64::NAN);
    Some(at_most(
        HOT_GOAL,
        format!(
            "{:.2}× with {} (median of {} round ratios, {}; {:.0} vs {:.0} ns per connection, net of each round's floor, median {:.0} ns per run); the bare map with a duration (two clock reads and the close's lookup) {:.2}× the bare map ({}), and the handler {:.2}× that; with a duration and an endpoint counter (what a per-endpoint drain needs at least) {:.2}× the bare map ({}), and the handler {:.2}× that ({})",
            agent_bare.median,
            hot.attach,
            agent_bare.ratios.len(),
            interval_against(agent_bare.interval, 1.3),
            ns(HotProgram::Agent),
            ns(HotProgram::Bare),
            ns(HotProgram::Empty),
            timed_bare.median,
            interval_against(timed_bare.interval, 1.3),
            agent_timed.median,
            counted_bare.median,
            interval_against(counted_bare.interval, 1.3),
            agent_counted.median,
            interval_text(agent_counted.interval)
        ),
        agent_bare.median,
        1.3,
    ))
}

/// The handler against the minimal socket-keyed map, same flags, 10k cold.
fn cold_goal(cold: &ColdCost) -> Option<Goal> {
    let default = cold.comparisons.iter().find(|c| {
        c.agent
            == Program::Agent {
                preallocate_flag: false,
            }
    })?;
    let others: Vec<String> = cold
        .comparisons
        .iter()
        .filter(|c| !std::ptr::eq(*c, default))
        .map(|c| {
            format!(
                "{}: {:.0} vs {:.0} ns, {:.2}× (net {:.2}×)",
                c.agent.label(),
                c.agent_ns,
                c.reference_ns,
                c.median_ratio,
                c.median_net_ratio
            )
        })
        .collect();
    let bpftrace = match (
        cold.cost(Program::Bpftrace),
        cold.cost(Program::BpftraceEmpty),
    ) {
        (Some(real), Some(empty)) => format!(
            "; the real bpftrace one-liner {:.0} ns per run (its empty probe {:.0})",
            real.median_ns, empty.median_ns
        ),
        _ => format!("; real bpftrace {}", cold.bpftrace),
    };
    Some(at_most(
        "handler ns per run ≤ 1.3× the minimal socket-keyed map reference (10k cold, tp_btf)",
        format!(
            "{:.2}× ({:.0} vs {:.0} ns per run, {} map flags, median of {} round ratios, {}); net of the floor ({:.0} ns) {:.2}×; {}{bpftrace}",
            default.median_ratio,
            default.agent_ns,
            default.reference_ns,
            if default.preallocated {
                "preallocated"
            } else {
                "default"
            },
            default.ratios.len(),
            interval_text(default.ratio_interval),
            cold.floor_ns,
            default.median_net_ratio,
            others.join("; ")
        ),
        default.median_ratio,
        1.3,
    ))
}

/// nginx with a new connection per request: both throughput and CPU per request.
fn nginx_goal(nginx: &NginxOverhead) -> Goal {
    at_least(
        "nginx new-connection-per-request throughput and CPU per request with the agent ≥ 0.99 of without",
        format!(
            "throughput {:.3} (median of {} pair ratios, {}; {:.0} vs {:.0} requests/s); CPU per request {:.3} ({}; {:.1} vs {:.1} µs)",
            nginx.paired.median_ratio,
            nginx.paired.pair_ratios.len(),
            interval_against(nginx.paired.ratio_interval, 0.99),
            nginx.paired.median_with_per_second,
            nginx.paired.median_without_per_second,
            nginx.paired.median_cpu_ratio,
            interval_against(nginx.paired.cpu_ratio_interval, 0.99),
            nginx.paired.median_cpu_us_with,
            nginx.paired.median_cpu_us_without
        ),
        nginx.paired.median_ratio.min(nginx.paired.median_cpu_ratio),
        0.99,
    )
}

fn status(goal: &Goal) -> &'static str {
    if goal.met { "met" } else { "**missed**" }
}

fn row(out: &mut String, cells: &[String]) {
    let _ = writeln!(out, "| {} |", cells.join(" | "));
}

fn header(out: &mut String, cells: &[&str]) {
    let _ = writeln!(out, "| {} |", cells.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(cells.len()));
}

fn p50_p99(summary: &Summary, digits: usize) -> String {
    format!("{:.digits$} / {:.digits$}", summary.p50_ms, summary.p99_ms)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The whole RESULTS.md; `previous` is the file it replaces (its analysis is kept).
pub fn markdown(results: &Results, previous: &str) -> String {
    let mut out = String::new();
    let m = &results.machine;
    let _ = writeln!(out, "# drain-agent benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `cargo xtask bench` ({} run, {:.0} s). Raw numbers: [`results.json`](results.json).\n",
        results.mode, results.duration_s
    );
    header(&mut out, &["", ""]);
    row(&mut out, &["date".into(), m.date_utc.clone()]);
    row(&mut out, &["commit".into(), format!("`{}`", m.commit)]);
    row(&mut out, &["kernel".into(), format!("`{}`", m.kernel)]);
    row(
        &mut out,
        &["CPUs".into(), format!("{} × {}", m.cpus, m.cpu_model)],
    );
    row(
        &mut out,
        &["memory".into(), format!("{:.1} GiB", m.memory_gib)],
    );
    let other = &results.other_handlers;
    row(
        &mut out,
        &[
            "other drain-agent handlers loaded during the run".into(),
            format!(
                "at most {} at once over {} checks ({} distinct: other people's test agents on this shared machine; they run on every connection, with or without ours)",
                other.max_loaded,
                other.checks,
                other.ids_seen.len()
            ),
        ],
    );
    if results.mode == "quick" {
        let _ = writeln!(
            out,
            "\n**Quick run**: small counts for a smoke test; the goals below are judged at the counts it used, not at 100k.\n"
        );
    }
    for error in &results.errors {
        let _ = writeln!(out, "\n**Section failed**: {error}\n");
    }

    let _ = writeln!(out, "\n## Goals\n");
    header(&mut out, &["goal", "measured", "status"]);
    for goal in &results.goals {
        row(
            &mut out,
            &[
                goal.goal.clone(),
                goal.measured.clone(),
                status(goal).into(),
            ],
        );
    }

    baseline_section(&mut out, results);
    kernel_section(&mut out, results);
    overhead_section(&mut out, results);
    answer_section(&mut out, results);
    wakeup_section(&mut out, results);
    footprint_section(&mut out, results);
    if let Some(cold) = &results.cold {
        cold_section(&mut out, cold);
    }
    if let Some(nginx) = &results.nginx {
        nginx_section(&mut out, nginx);
    }

    let _ = writeln!(out, "\n## Analysis\n");
    let kept = previous
        .split_once(ANALYSIS_BEGIN)
        .and_then(|(_, rest)| rest.split_once(ANALYSIS_END))
        .map(|(analysis, _)| analysis.trim().to_owned())
        .unwrap_or_else(|| "(nothing written yet)".to_owned());
    let _ = writeln!(out, "{ANALYSIS_BEGIN}\n\n{kept}\n\n{ANALYSIS_END}");
    out
}

/// This build and the baseline (`--baseline`), measured in turn in the same run.
fn baseline_section(out: &mut String, results: &Results) {
    let Some(base) = &results.baseline else {
        return;
    };
    let _ = writeln!(out, "\n## Side by side with the baseline\n");
    let _ = writeln!(
        out,
        "The baseline is `{}` (`{}`), measured right after this build in each section below, with the same plan. Cells: this build / the baseline; kernel costs in ns per run, net of the measurement floor of each build's own run.\n",
        base.binary, base.version
    );
    header(out, &["measure", "this build", "baseline"]);
    if let (Some(this), Some(that)) = (&results.start_memory, &base.start_memory) {
        row(
            out,
            &[
                "peak RSS at start (`VmHWM` once serving)".into(),
                mib(this.hwm_kib),
                mib(that.hwm_kib),
            ],
        );
        row(
            out,
            &[
                "RSS once serving".into(),
                mib(this.rss_kib),
                mib(that.rss_kib),
            ],
        );
    }
    if let (Some(this), Some(that)) = (&results.kernel, &base.kernel) {
        let net = |value: f64, floor: f64| format!("{:.0}", value - floor);
        for method in &this.methods {
            let Some(other) = that.methods.iter().find(|m| m.attach == method.attach) else {
                continue;
            };
            let (f1, f2) = (this.floor.mean_ns, that.floor.mean_ns);
            for (what, mine, theirs) in [
                (
                    "tracked open",
                    method.costs.tracked_open_ns,
                    other.costs.tracked_open_ns,
                ),
                (
                    "tracked close",
                    method.costs.tracked_close_ns,
                    other.costs.tracked_close_ns,
                ),
                (
                    "tracked mean",
                    method.costs.tracked_mean_ns,
                    other.costs.tracked_mean_ns,
                ),
                (
                    "untracked, weighted",
                    method.untracked_mean_ns,
                    other.untracked_mean_ns,
                ),
                (
                    "hot churn, mean per run",
                    method.churn.mean_ns,
                    other.churn.mean_ns,
                ),
            ] {
                row(
                    out,
                    &[
                        format!("{}: {what}", method.attach),
                        net(mine, f1),
                        net(theirs, f2),
                    ],
                );
            }
        }
    }
    if let (Some(this), Some(that)) = (&results.overhead, &base.overhead) {
        for (what, mine, theirs) in [
            ("churn throughput ratio", &this.draining, &that.draining),
            (
                "churn throughput ratio, ports kept busy",
                &this.busy,
                &that.busy,
            ),
        ] {
            row(
                out,
                &[
                    what.into(),
                    format!(
                        "{:.3} (CPU {:.3})",
                        mine.paired.median_ratio, mine.paired.median_cpu_ratio
                    ),
                    format!(
                        "{:.3} (CPU {:.3})",
                        theirs.paired.median_ratio, theirs.paired.median_cpu_ratio
                    ),
                ],
            );
        }
    }
}

fn kernel_section(out: &mut String, results: &Results) {
    let Some(kernel) = &results.kernel else {
        return;
    };
    let plan = results.plan.as_ref();
    let floor = kernel.floor.mean_ns;
    let _ = writeln!(out, "\n## 1. Per-event kernel cost\n");
    let _ = writeln!(
        out,
        "Mean ns per run of the handler, from the kernel's own statistics (`kernel.bpf_stats_enabled=1`, \
         `run_time_ns / run_cnt` of the agent's program, read with `BPF_OBJ_GET_INFO_BY_FD`; the \
         sysctl is restored afterwards). The agent is started with `--attach` and `--no-seed` for each \
         method.\n\n\
         **Measurement floor.** The kernel times a program with `sched_clock()` before and after it; on \
         this KVM guest that is kvm-clock (`pvclock_clocksource_read_nowd`), which is slow, and part of \
         one read lands inside every measured run. An empty program (`r0 = 0; exit`, loaded by the \
         benchmark) on the same tracepoint over a {}-connection churn measures **{:.1} ns/run** for \
         doing nothing: read every number below against it (\"net\" = minus the floor). The classic \
         tracepoint's cost of building its trace record is outside the program and not counted here; \
         section 2 sees all of it.\n",
        kernel.floor.connections, floor
    );
    let _ = writeln!(
        out,
        "**Churn** ({} connections, {} threads: connect, accept, close the client, close the server; each \
         connection fires the tracepoint on both sockets). Each thread has its own port, so every connection takes its port's count 0 → 1 → 0: two \
         zero crossings (agents before commit 512a7a4 wrote a ring-buffer event for each and woke \
         up; later ones only for ports somebody waits on, none here). The *anchored* churn is the \
         same with one extra connection held open per port, so counts never reach zero; half the \
         difference per connection is what a zero crossing costs the handler.\n",
        plan.map_or(0, |p| p.churn_connections),
        plan.map_or(0, |p| p.churn_threads)
    );
    header(
        out,
        &[
            "attach",
            "program",
            "runs / connection",
            "mean ns / run (net)",
            "anchored: mean ns / run (net)",
            "per zero-crossing event",
            "churn connections/s (stats on)",
            "recursion misses / runs (all phases)",
            "miscounted",
        ],
    );
    for method in &kernel.methods {
        row(
            out,
            &[
                method.attach.clone(),
                format!("`{}`", method.program),
                format!("{:.2}", method.churn.runs_per_connection),
                format!(
                    "{:.1} ({:.1})",
                    method.churn.mean_ns,
                    method.churn.mean_ns - floor
                ),
                format!(
                    "{:.1} ({:.1})",
                    method.churn_anchored.mean_ns,
                    method.churn_anchored.mean_ns - floor
                ),
                format!("{:.0} ns", method.zero_crossing_event_ns),
                format!("{:.0}", method.churn_per_second),
                format!("{} / {}", method.recursion_misses, method.runs),
                method.miscounted.to_string(),
            ],
        );
    }
    let misses: u64 = kernel.methods.iter().map(|m| m.recursion_misses).sum();
    let runs: u64 = kernel.methods.iter().map(|m| m.runs).sum();
    let miscounted: u64 = kernel.methods.iter().map(|m| m.miscounted).sum();
    let _ = writeln!(
        out,
        "\n**Recursion misses.** Over this section the kernel skipped {misses} of {runs} runs \
         ({:.3} %) because the handler was already running on that CPU (`recursion_misses` in \
         `bpf_prog_info`): a state change in a softirq that interrupted the handler running in task \
         context; it happens in the bulk-close phases below, on every attach method. A skipped run is \
         a lost event. After each phase and churn the benchmark checks the agent's count (N after \
         the opens, 0 after the closes): {miscounted} connection(s) were miscounted here, so the \
         skipped runs were untracked transitions this time — but passive opens and RST closes run in \
         softirq context, so they can be the skipped ones (see the analysis).",
        if runs > 0 {
            misses as f64 / runs as f64 * 100.0
        } else {
            0.0
        }
    );
    let _ = writeln!(
        out,
        "\n**By event kind.** The kernel counts per program, not per kind, so the kinds are separated \
         by phases in which the number of each kind is known by construction (each connection is one \
         passive open; each of its two sockets leaves ESTABLISHED/CLOSE_WAIT exactly once), with \
         N = {} connections over 4 loopback addresses, {} time(s) with a fresh agent (medians below):\n",
        plan.map_or(0, |p| p.split_connections),
        plan.map_or(0, |p| p.split_repetitions)
    );
    let _ = writeln!(
        out,
        "1. *close N connections opened before the agent attached*: 2N closes of untracked sockets (a `SOCKETS` lookup that misses), the rest early returns;\n\
         2. *open N connections*: N tracked opens (socket reads, insert into `SOCKETS`, count; \
         the first is a zero crossing), the rest early returns;\n\
         3. *close those N*: N tracked closes (lookup, delete, count, duration histogram; the \
         last is a zero crossing) + N untracked closes (the client ends), the rest early returns;\n\
         4. *N connects refused by RST*: early returns only (`classify()` says Unchanged: CLOSE → SYN_SENT → CLOSE).\n\n\
         Phase 4 gives the early-return cost; subtracting it (and phase 1's result) from phases 2 and 3 gives \
         the rest. Here the sockets are many and cold (N open at once), unlike in the churn. \
         \"Untracked, weighted\" is the mean over the untracked runs as they occur in the churn \
         (per connection: the client's close, and runs/connection − 3 early returns). Values in ns per run, net of the floor in brackets.\n"
    );
    header(
        out,
        &[
            "attach",
            "tracked open",
            "tracked close",
            "tracked mean",
            "early return",
            "untracked close",
            "untracked, weighted",
        ],
    );
    let net = |value: f64| format!("{value:.0} ({:.0})", value - floor);
    // The five per-kind cells every table of this section shows, in its column order.
    let kinds = |name: String, costs: &super::kernel::KindCosts, last: String| {
        [
            name,
            net(costs.tracked_open_ns),
            net(costs.tracked_close_ns),
            net(costs.tracked_mean_ns),
            net(costs.early_return_ns),
            net(costs.untracked_close_ns),
            last,
        ]
    };
    for method in &kernel.methods {
        row(
            out,
            &kinds(
                method.attach.clone(),
                &method.costs,
                net(method.untracked_mean_ns),
            ),
        );
    }
    if !kernel.references.is_empty() {
        let _ = writeln!(
            out,
            "\n**What this host charges for per-socket state.** The same phases, with reference \
             programs in place of the handler (xtask `bench/reference.rs`, a few dozen BPF \
             instructions each, on the same tracepoint, classifying transitions as the handler \
             does): *one line* stores the socket's address in one 64-byte slot of a 4 MiB array \
             (the size of `SOCKETS`' bucket array) at a passive open and clears it at the close, \
             one random cache line per tracked event and nothing else; *hash map* inserts the \
             address with an 80-byte zero value (`BPF_NOEXIST`) into a hash map of `SOCKETS`' size \
             at a passive open and deletes it at the close. No design that keeps per-socket state \
             in a map can do less than the first; the handler's `SOCKETS` does at least the \
             second. Each run checks that the program held the N sockets after the opens and \
             dropped them after the closes. ns per run, net of the floor in brackets:\n"
        );
        header(
            out,
            &[
                "program",
                "tracked open",
                "tracked close",
                "tracked mean",
                "early return",
                "untracked close",
                "churn: per connection, net (runs)",
            ],
        );
        let churn = |phase: &super::kernel::Phase| {
            format!(
                "{:.0} ns ({:.1})",
                phase.net_ns_per_connection(floor),
                phase.runs_per_connection
            )
        };
        if let Some(method) = kernel.methods.first() {
            row(
                out,
                &kinds(
                    format!("the handler, {}", method.attach),
                    &method.costs,
                    churn(&method.churn),
                ),
            );
        }
        for reference in &kernel.references {
            row(
                out,
                &kinds(
                    reference.label.clone(),
                    &reference.costs,
                    churn(&reference.churn),
                ),
            );
        }
        let _ = writeln!(
            out,
            "\nThe last column is the churn of the table above (connect, accept, close both ends; every \
             map hot) with each program: its run time per connection, net of the floor on each run. \
             A connection has one tracked open and one tracked close.\n"
        );
    }
    if let Some(hot) = &results.hot {
        hot_rounds(out, hot);
    }
    let _ = writeln!(out, "\nThe phases behind it:\n");
    header(
        out,
        &[
            "attach",
            "repetition",
            "phase",
            "connections",
            "runs",
            "runs / connection",
            "mean ns / run",
            "recursion misses",
        ],
    );
    for method in &kernel.methods {
        for (index, set) in method.repetitions.iter().enumerate() {
            for phase in &set.phases {
                row(
                    out,
                    &[
                        method.attach.clone(),
                        (index + 1).to_string(),
                        phase.phase.clone(),
                        phase.connections.to_string(),
                        phase.runs.to_string(),
                        format!("{:.2}", phase.runs_per_connection),
                        format!("{:.1}", phase.mean_ns),
                        phase.recursion_misses.to_string(),
                    ],
                );
            }
        }
    }
    if let Some(seed) = results.answer.as_ref().and_then(|a| a.seed.as_ref()) {
        let _ = writeln!(
            out,
            "\n**Seeding** (`iter/tcp`, `seed_established_tcp`): a second agent started with {} connections \
             established ({} sockets, plus listeners) ran the iterator {} times at {:.0} ns per run \
             ({:.1} ms in all), counted {} of them, and answered `/healthz` {:.0} ms after it was spawned.",
            seed.established_connections,
            2 * seed.established_connections,
            seed.runs,
            seed.mean_ns,
            seed.run_time_ns as f64 / 1e6,
            seed.counted,
            seed.agent_startup_ms
        );
    }
}

/// The hot churn in rounds: each program's ns per connection (net of the round's floor)
/// and the ratios taken within each round.
fn hot_rounds(out: &mut String, hot: &HotRounds) {
    let _ = writeln!(
        out,
        "\n**The hot churn in rounds.** The same churn, {} connections per program and round, over \
         {} rounds; the programs take turns in the order the handler ({}, a fresh agent each \
         round), the bare hash map, the bare map with a duration, the same with an endpoint counter \
         (the least a drain of one endpoint needs: a counter per endpoint, looked up and atomically \
         added to at the open and the close), the empty program, reversed every other round. One pass per program, as in the table above, cannot resolve a 1.3× ratio on a \
         shared VM: between runs the bare map's churn alone has swung several-fold. So each ratio is \
         taken within a round, net of that round's own floor, and the goal reads the median of the \
         round ratios with its interval. ns per connection, net of the round's floor (the floor's \
         own column: ns per run):\n",
        hot.connections_per_round, hot.rounds, hot.attach
    );
    header(
        out,
        &[
            "round",
            "the handler",
            "bare hash map",
            "with a duration",
            "and an endpoint counter",
            "floor (ns/run)",
            "handler / bare",
            "duration / bare",
            "handler / duration",
            "counter / bare",
            "handler / counter",
        ],
    );
    let cell = |round: usize, program: HotProgram| {
        let value = if program == HotProgram::Empty {
            hot.sample(round, program)
                .map(|floor| format!("{:.1}", floor.mean_ns))
        } else {
            hot.net(round, program).map(|ns| format!("{ns:.0}"))
        };
        value.unwrap_or_else(|| "—".to_owned())
    };
    let ratio = |round: usize, of: HotProgram, to: HotProgram| match (
        hot.net(round, of),
        hot.net(round, to),
    ) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".to_owned(),
    };
    for round in 0..hot.rounds {
        row(
            out,
            &[
                (round + 1).to_string(),
                cell(round, HotProgram::Agent),
                cell(round, HotProgram::Bare),
                cell(round, HotProgram::Timed),
                cell(round, HotProgram::Counted),
                cell(round, HotProgram::Empty),
                ratio(round, HotProgram::Agent, HotProgram::Bare),
                ratio(round, HotProgram::Timed, HotProgram::Bare),
                ratio(round, HotProgram::Agent, HotProgram::Timed),
                ratio(round, HotProgram::Counted, HotProgram::Bare),
                ratio(round, HotProgram::Agent, HotProgram::Counted),
            ],
        );
    }
    let median = |of, to| {
        hot.ratio(of, to).map_or("—".to_owned(), |r| {
            format!("**{:.2}** ({})", r.median, interval_text(r.interval))
        })
    };
    let ns = |program| {
        hot.median_net(program)
            .map_or("—".to_owned(), |ns| format!("{ns:.0}"))
    };
    row(
        out,
        &[
            "median".to_owned(),
            ns(HotProgram::Agent),
            ns(HotProgram::Bare),
            ns(HotProgram::Timed),
            ns(HotProgram::Counted),
            hot.median_net(HotProgram::Empty)
                .map_or("—".to_owned(), |ns| format!("{ns:.1}")),
            median(HotProgram::Agent, HotProgram::Bare),
            median(HotProgram::Timed, HotProgram::Bare),
            median(HotProgram::Agent, HotProgram::Timed),
            median(HotProgram::Counted, HotProgram::Bare),
            median(HotProgram::Agent, HotProgram::Counted),
        ],
    );
    let _ = writeln!(
        out,
        "\nThe agent still counted {} connection(s) after its rounds' churns had all closed (0: no close missed).\n",
        hot.miscounted
    );
}

fn overhead_section(out: &mut String, results: &Results) {
    let Some(overhead) = &results.overhead else {
        return;
    };
    let _ = writeln!(out, "\n## 2. Hot-path overhead\n");
    let _ = writeln!(
        out,
        "Loopback connection churn, {} threads (each: connect to its own listener on 127.0.0.1, accept, \
         close the client, close the server), {:.0} s per round. Rounds alternate without/with the \
         agent (default attach, started for the round, stopped after), the order flipping every pair; \
         the ratio is with ÷ without within a pair, and the result is the median over pairs. BPF \
         statistics are off here. Each round also records the CPU time per connection (the churning \
         process's threads, plus the agent's): its ratio (without ÷ with) is what throughput would \
         show on a CPU-bound machine that nobody else uses, and it is far less disturbed by other \
         tenants than a wall-clock rate. Two variants: *ports drain between connections* (each connection takes its port 0 → 1 → \
         0, two zero crossings — the goal's scenario; agents before commit 512a7a4 wrote a \
         ring-buffer event for each and woke up), and *ports stay busy* (one more connection held \
         open per port: no zero crossings).\n",
        overhead.threads, overhead.round_seconds
    );
    for variant in [&overhead.draining, &overhead.busy] {
        let _ = writeln!(out, "\n**{}**\n", variant.name);
        pair_table(out, "connection", &variant.rounds);
        let _ = writeln!(
            out,
            "\nMedian throughput ratio **{:.3}** ({}; medians of the rounds themselves: {:.0} with vs {:.0} without connections/s); median CPU \
             ratio **{:.3}** ({}; {:.1} with vs {:.1} without µs per connection). Agent CPU: {:.2} ms per 1,000 \
             connections, {:.1} % of one core during the churn (medians).",
            variant.paired.median_ratio,
            interval_text(variant.paired.ratio_interval),
            variant.paired.median_with_per_second,
            variant.paired.median_without_per_second,
            variant.paired.median_cpu_ratio,
            interval_text(variant.paired.cpu_ratio_interval),
            variant.paired.median_cpu_us_with,
            variant.paired.median_cpu_us_without,
            variant.agent_cpu_ms_per_1k_connections,
            variant.agent_cpu_percent_of_core
        );
        let _ = writeln!(
            out,
            "After each attached round, with every connection closed, the agent still counted {} \
             connection(s) on the churned ports (of {} churned).",
            variant.left_active, variant.attached_connections
        );
    }
}

/// One row per pair of rounds: throughput without and with the agent and their ratio, CPU
/// per `unit` of work without and with (the agent's part) and their ratio (without ÷ with).
fn pair_table(out: &mut String, unit: &str, rounds: &[Round]) {
    header(
        out,
        &[
            "pair",
            &format!("without agent ({unit}s/s)"),
            &format!("with agent ({unit}s/s)"),
            "ratio",
            &format!("CPU µs / {unit} without"),
            &format!("CPU µs / {unit} with (agent's part)"),
            "CPU ratio",
        ],
    );
    for pair in 0..pairs_in(rounds) {
        let Some((without, with)) = pair_of(rounds, pair) else {
            continue;
        };
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.3}", a / b)
            } else {
                String::new()
            }
        };
        row(
            out,
            &[
                pair.to_string(),
                format!("{:.0}", without.per_second),
                format!("{:.0}", with.per_second),
                ratio(with.per_second, without.per_second),
                format!("{:.1}", without.cpu_us()),
                format!("{:.1} ({:.2})", with.cpu_us(), with.agent_cpu_us()),
                ratio(without.cpu_us(), with.cpu_us()),
            ],
        );
    }
}

fn answer_section(out: &mut String, results: &Results) {
    let Some(answer) = &results.answer else {
        return;
    };
    let _ = writeln!(out, "\n## 3. Answer cost at scale\n");
    let _ = writeln!(
        out,
        "N established connections to one listener on 0.0.0.0:P (clients spread over 127.0.0.2, \
         127.0.0.3, …; both ends held by holder processes the benchmark forks, as one process may \
         not hold 200k fds here, so the host has 2N TCP sockets; {:.0} connections/s to set up; \
         TIME_WAIT sockets left by earlier runs are let expire first), counted three ways, sampled in turn (a round: 10 agent answers on \
         fresh connections, 10 on a kept-alive one, one `ss`, one /proc count): the agent's \
         `GET /drained?port=P&timeout=0` on a fresh TCP connection per request (as `curl` in a stop \
         hook; the ratios use these), and on one kept-alive connection (the agent's answer without a \
         TCP handshake); `ss -Htn state established '( sport = :P )'` \
         (process start included, as a script pays it; timed until its output is collected); and \
         `awk` counting the lines of /proc/net/tcp + /proc/net/tcp6 with state 01 and local port P \
         (process start included; compiled awk is a lower bound for the Python exporters that do this). Every \
         answer's count is checked against N; \"wrong\" counts the samples that were off (a /proc/net/tcp \
         read is not an atomic snapshot, so sockets that other processes open and close meanwhile make \
         lines repeat or go missing). Times in ms, p50 / p99.\n",
        answer.establish_per_second
    );
    header(
        out,
        &[
            "connections",
            "host TCP sockets (in use / TIME_WAIT)",
            "/drained",
            "/drained, kept-alive connection",
            "ss",
            "/proc/net/tcp",
            "ss ÷ /drained (p50)",
            "ss ÷ /drained (p99)",
            "/proc ÷ /drained (p50)",
            "samples (agent / ss / proc)",
            "wrong (agent / ss / proc)",
        ],
    );
    for level in &answer.levels {
        row(
            out,
            &[
                level.connections.to_string(),
                format!("{} / {}", level.host_tcp.inuse, level.host_tcp.time_wait),
                p50_p99(&level.drained, 3),
                p50_p99(&level.drained_keepalive, 3),
                p50_p99(&level.ss, 1),
                p50_p99(&level.proc_net_tcp, 1),
                format!("{:.0}×", level.ss_over_agent_p50),
                format!("{:.0}×", level.ss_over_agent_p99),
                format!("{:.0}×", level.proc_over_agent_p50),
                format!(
                    "{} / {} / {}",
                    level.drained.n, level.ss.n, level.proc_net_tcp.n
                ),
                format!(
                    "{} / {} / {}",
                    level.agent_wrong, level.ss_wrong, level.proc_wrong
                ),
            ],
        );
    }
}

fn wakeup_section(out: &mut String, results: &Results) {
    let Some(wakeup) = &results.wakeup else {
        return;
    };
    let _ = writeln!(out, "\n## 4. Wake-up latency\n");
    let _ = writeln!(
        out,
        "A waiter blocks in `GET /drained?port=P&timeout=10s` while one connection to P is open \
         (sent, then 25 ms for it to reach the agent and block); the server closes its end (the \
         tracked socket), and the time runs from just before that `close()` to the waiter's complete \
         answer. Trials whose waiter had not blocked yet are dropped ({} here). The pollers check \
         with `{}`; a poller that has been running all along looks next at a uniformly random moment \
         within its period after the close, so each trial sleeps a random phase in [0, period) and \
         then polls until the port shows empty. Times in ms.\n",
        wakeup.agent_not_parked, wakeup.poll_check
    );
    header(out, &["who notices", "p50", "p99", "mean", "max", "trials"]);
    for (name, summary) in [
        ("drain-agent waiter (ring-buffer wake-up)", &wakeup.agent),
        (
            "polling every 100 ms (the in-app sketch)",
            &wakeup.poll_100ms,
        ),
        ("polling every 1 s (Istio)", &wakeup.poll_1s),
    ] {
        row(
            out,
            &[
                name.into(),
                format!("{:.2}", summary.p50_ms),
                format!("{:.2}", summary.p99_ms),
                format!("{:.2}", summary.mean_ms),
                format!("{:.2}", summary.max_ms),
                summary.n.to_string(),
            ],
        );
    }
}

fn footprint_section(out: &mut String, results: &Results) {
    if results.answer.is_none() && results.overhead.is_none() && results.metrics.is_none() {
        return;
    }
    let _ = writeln!(out, "\n## 5. Footprint\n");
    header(out, &["what", "value"]);
    if let Some(answer) = &results.answer {
        row(
            out,
            &[
                "agent RSS, idle (1 s after start)".into(),
                format!(
                    "{} (anonymous {}, file {}, shmem {}; peak so far {})",
                    mib(answer.memory_idle.rss_kib),
                    mib(answer.memory_idle.rss_anon_kib),
                    mib(answer.memory_idle.rss_file_kib),
                    mib(answer.memory_idle.rss_shmem_kib),
                    mib(answer.memory_idle.hwm_kib)
                ),
            ],
        );
        row(
            out,
            &[
                format!(
                    "agent RSS with {} tracked connections",
                    answer.loaded_connections
                ),
                format!(
                    "{} (anonymous {}, peak {})",
                    mib(answer.memory_loaded.rss_kib),
                    mib(answer.memory_loaded.rss_anon_kib),
                    mib(answer.memory_loaded.hwm_kib)
                ),
            ],
        );
        let top: Vec<String> = answer
            .rss_breakdown_idle_kib
            .iter()
            .take(6)
            .map(|(name, kib)| format!("{name} {}", mib(*kib)))
            .collect();
        row(
            out,
            &["idle RSS by mapping (largest)".into(), top.join(", ")],
        );
        row(
            out,
            &[
                "kernel memory of the agent's BPF maps (not in RSS)".into(),
                format!(
                    "{:.1} MiB idle, {:.1} MiB with {} tracked",
                    answer.map_memory_idle_bytes as f64 / 1048576.0,
                    answer.map_memory_loaded_bytes as f64 / 1048576.0,
                    answer.loaded_connections
                ),
            ],
        );
    }
    if let Some(overhead) = &results.overhead {
        for variant in [&overhead.draining, &overhead.busy] {
            row(
                out,
                &[
                    format!("agent CPU during the churn (section 2, {})", variant.name),
                    format!(
                        "{:.2} ms per 1,000 connections; {:.1} % of one core at {:.0} connections/s",
                        variant.agent_cpu_ms_per_1k_connections,
                        variant.agent_cpu_percent_of_core,
                        variant.paired.median_with_per_second
                    ),
                ],
            );
        }
    }
    if let Some(metrics) = &results.metrics {
        row(
            out,
            &[
                format!(
                    "`/metrics` scrape with {} active ports, p50 / p99",
                    metrics.active_port_series
                ),
                format!(
                    "{} ms ({} scrapes, {:.0} KiB each; idle agent: {} ms)",
                    p50_p99(&metrics.scrape, 2),
                    metrics.scrape.n,
                    metrics.body_bytes as f64 / 1024.0,
                    p50_p99(&metrics.scrape_idle, 2)
                ),
            ],
        );
        row(
            out,
            &[
                format!(
                    "`/drained?timeout=0` with {} endpoints in the maps, p50 / p99",
                    metrics.ports
                ),
                format!("{} ms", p50_p99(&metrics.drained, 3)),
            ],
        );
        row(
            out,
            &[
                "agent RSS after the 1,000-port scrapes".into(),
                mib(metrics.memory_after.rss_kib),
            ],
        );
    }
}

fn cold_section(out: &mut String, cold: &ColdCost) {
    let _ = writeln!(
        out,
        "\n## 6. Side by side with the minimal socket-keyed map (10k cold)\n"
    );
    let _ = writeln!(
        out,
        "{} connections opened (over 4 loopback addresses, held by holder processes) and held, \
         then all closed, client ends first; the measure is `run_time_ns / run_cnt` over every run of \
         the tracepoint in that workload (BPF statistics on), as one would compare the agent with a \
         bpftrace script. Programs take turns, {} rounds, the order reversed every other round; \
         medians over rounds. The agent runs `--attach {} --no-seed`. The *minimal socket-keyed map* \
         (xtask `bench/reference.rs`, BPF instructions on the same tracepoint, as a raw tracepoint) \
         does what a bpftrace one-liner does: `map[sk] = ktime` on SYN_RECV → ESTABLISHED, \
         `delete(map[sk])` whenever a socket leaves ESTABLISHED; a u64 → u64 hash map of the \
         agent's socket-map size ({} entries), with the flags of the agent it is compared with \
         (read from the running agent's `SOCKETS`). The real bpftrace: {}; it attaches through a \
         classic tracepoint, so read it against its own empty probe. Every run checks that the \
         program (or the agent's count) held the N sockets after the opens and dropped them after \
         the closes. ns per run:\n",
        cold.connections, cold.rounds, cold.attach, cold.socket_map_entries, cold.bpftrace
    );
    header(
        out,
        &[
            "program",
            "socket map",
            "ns / run (median)",
            "net of the floor",
            "each round",
            "opening half / closing half (median)",
            "runs / connection",
            "recursion misses",
            "miscounted",
        ],
    );
    for cost in &cold.programs {
        let of = |value: fn(&super::cold::Sample) -> f64| {
            super::stats::median(&cost.samples.iter().map(value).collect::<Vec<_>>())
        };
        row(
            out,
            &[
                cost.label.clone(),
                match cost.preallocated {
                    Some(true) => "preallocated".into(),
                    Some(false) => "`BPF_F_NO_PREALLOC`".into(),
                    None => "".into(),
                },
                format!("{:.1}", cost.median_ns),
                format!("{:.1}", cost.median_ns - cold.floor_ns),
                cost.samples
                    .iter()
                    .map(|s| format!("{:.0}", s.mean_ns))
                    .collect::<Vec<_>>()
                    .join(", "),
                format!(
                    "{:.0} / {:.0}",
                    of(|s| s.open_mean_ns),
                    of(|s| s.close_mean_ns)
                ),
                format!("{:.2}", of(|s| s.runs as f64 / s.connections.max(1) as f64)),
                cost.samples
                    .iter()
                    .map(|s| s.recursion_misses)
                    .sum::<u64>()
                    .to_string(),
                cost.samples
                    .iter()
                    .map(|s| s.miscounted)
                    .sum::<u64>()
                    .to_string(),
            ],
        );
    }
    let _ = writeln!(
        out,
        "\nThe agent ÷ the reference with the same map flags, within each round (net: each minus \
         that round's empty program):\n"
    );
    header(
        out,
        &[
            "agent",
            "reference",
            "ratio (median)",
            "interval",
            "net ratio (median)",
            "each round",
        ],
    );
    for c in &cold.comparisons {
        row(
            out,
            &[
                c.agent.label(),
                c.reference.label(),
                format!("{:.2}×", c.median_ratio),
                interval_text(c.ratio_interval),
                format!("{:.2}×", c.median_net_ratio),
                c.ratios
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ],
        );
    }
}

fn nginx_section(out: &mut String, nginx: &NginxOverhead) {
    let _ = writeln!(
        out,
        "\n## 7. A real server: nginx, a new connection per request\n"
    );
    let _ = writeln!(
        out,
        "{} ({} workers, `return 200 \"ok\"`, access log off, on 4 loopback addresses), and a load \
         generator of {} threads in the benchmark, each opening a new connection per request \
         (HTTP/1.1, `Connection: close`, the answer read to the end and checked), {:.0} s per round. \
         Rounds alternate without/with the agent (default options, started for the round), the \
         order flipping every pair; ratios within a pair, medians over pairs. CPU per request is \
         nginx's (master and workers) plus the load generator's plus the agent's. {} failed \
         requests in all; the agent counted {} connection(s) on nginx's port after its rounds.\n",
        nginx.nginx_version,
        nginx.workers,
        nginx.threads,
        nginx.round_seconds,
        nginx.errors,
        nginx.left_active
    );
    pair_table(out, "request", &nginx.rounds);
    let _ = writeln!(
        out,
        "\nMedian throughput ratio **{:.3}** ({}); median CPU ratio **{:.3}** ({}).",
        nginx.paired.median_ratio,
        interval_text(nginx.paired.ratio_interval),
        nginx.paired.median_cpu_ratio,
        interval_text(nginx.paired.cpu_ratio_interval)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_that_contains_the_goal_says_so() {
        let text = interval_against(Some((0.95, 1.01, 0.96)), 0.97);
        assert_eq!(
            text,
            "96 % interval for the median 0.950–1.010, which straddles 0.97"
        );
        assert!(!interval_against(Some((0.98, 1.01, 0.96)), 0.97).contains("straddles"));
        assert_eq!(
            interval_against(None, 0.97),
            "too few pairs for an interval"
        );
    }
}
