//! `cargo xtask`: the developer's front door. Every command installs what it needs first
//! (idempotently), so the README's two commands work on a fresh machine.

mod bench;
mod dist;
mod e2e;
mod kernels;
mod setup;
mod systemd;
#[cfg(test)]
mod test_skip;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test drain-agent")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the prerequisites (idempotent): the pinned nightly with rust-src, bpf-linker
    /// 0.10, and what the tests use: rustfmt and clippy, the Debian packages (apt, as root),
    /// the PyPI linters in a virtual environment, target/pytools.
    Setup(setup::SetupArgs),
    /// Set up, then build the agent in release mode.
    Build,
    /// Set up, build, and run the agent (as root); arguments after `--` go to the agent.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Set up, then check formatting and lints and run every test: unit, kernel, end-to-end.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// Set up, build, and benchmark the agent (as root): kernel cost, churn overhead, answer
    /// cost against `ss`, wake-up latency, footprint. Writes bench/RESULTS.md and results.json.
    Bench(bench::BenchArgs),
    /// Set up, then build what a release ships into target/dist: the static (musl) binary
    /// with its checksum, shell completions, man pages, and the OCI image (buildah).
    Dist(dist::DistArgs),
    /// Set up, then run the rolling deploy behind nginx under load (as root): with
    /// drain-agent, without a drain, and with a fixed sleep; print the summary table.
    E2e,
    /// Boot the agent's release build under qemu on Debian's cloud kernels (default: the
    /// oldest, 6.1, 6.12 and the newest; `--all`: every series) and check it on each.
    Kernels(kernels::KernelsArgs),
    /// Boot a Debian rootfs with systemd as PID 1 (systemd-nspawn, as root), install the agent
    /// and the example app with their units from deploy/systemd/, and check them under systemd:
    /// the start, the example app's drain-before-SIGTERM stop, the drop-in that moves the listener,
    /// and the example app's stop with the agent moved.
    Systemd(systemd::SystemdArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("xtask: {problem:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Task::Setup(args) => setup::setup(&args),
        Task::Build => {
            setup::setup(&setup::SetupArgs::toolchain_only())?;
            cargo(&["build", "--release", "--package", "drain-agent"])
        }
        Task::Run { agent_args } => {
            setup::setup(&setup::SetupArgs::toolchain_only())?;
            cargo(&["build", "--release", "--package", "drain-agent"])?;
            let binary = workspace_root().join("target/release/drain-agent");
            let mut command = if is_root() {
                Command::new(&binary)
            } else {
                eprintln!(
                    "xtask: the agent needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN); using sudo"
                );
                let mut sudo = Command::new("sudo");
                sudo.arg(&binary);
                sudo
            };
            command.arg("run").args(&agent_args);
            status(&mut command)
        }
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Bench(args) => bench::bench(&args),
        Task::E2e => e2e::run(),
        Task::Kernels(args) => kernels::kernels(&args),
        Task::Dist(args) => dist::dist(&args),
        Task::Systemd(args) => systemd::systemd(&args),
    }
}

/// Lints on both targets, then the test suite.
fn test(extra: &[String]) -> Result<()> {
    setup::setup(&setup::SetupArgs::default())?;
    // The dist and image tests run what `cargo xtask dist` ships (the image needs root).
    dist::dist(&dist::DistArgs {
        no_image: !is_root(),
        ..Default::default()
    })?;
    if std::env::var_os("DRAIN_AGENT_REQUIRE_KERNEL").is_none() && !is_root() {
        eprintln!(
            "xtask: not root: kernel and end-to-end tests will be SKIPPED (set DRAIN_AGENT_REQUIRE_KERNEL=1 to make that an error)"
        );
    }
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "drain-agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    clippy_ebpf()?;
    run_tests_with_summary(
        Command::new(cargo_binary())
            .args(test_args(extra))
            .current_dir(workspace_root()),
    )
}

/// `cargo test` with the caller's arguments, running the ignored tests too: the kernel
/// tests carry `#[ignore]` so that a plain `cargo test` (an editor, a contributor without
/// root) reports them as not run instead of passed; here they run, and one that cannot
/// (no root, no BTF) prints its `SKIP` line or, with `DRAIN_AGENT_REQUIRE_KERNEL=1`, fails.
fn test_args(extra: &[String]) -> Vec<String> {
    let mut args = vec!["test".to_owned()];
    args.extend(extra.iter().cloned());
    // Arguments after `--` go to the test binaries; add ours there.
    if !extra.iter().any(|arg| arg == "--") {
        args.push("--".to_owned());
    }
    args.push("--include-ignored".to_owned());
    args
}

/// Runs `cargo test`, passing its output through, and ends with one line that adds up every
/// test binary's `test result:` line: `xtask-test: N passed, N failed, N skipped`. One word
/// and a colon before the counts, alone on its line: the plain closing line that CI reads
/// (with two words, `xtask test:`, it was not one, and CI counted from libtest's lines, in
/// which every skip is a pass).
fn run_tests_with_summary(command: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};

    let shown = format!("{command:?}");
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    let mut summary = TestSummary::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read cargo test's output")?;
        println!("{line}");
        summary.read_line(&line);
    }
    let exit = child.wait().context("cargo test did not finish")?;
    println!("{}", summary.closing_line());
    if !exit.success() {
        bail!("{shown} failed ({exit})");
    }
    if summary.passed() == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// What the `cargo test` output says, added up. A test that cannot run here (no root, no
/// BTF, a tool missing) returns early and so counts as passed in libtest's `test result:`
/// line; it prints `SKIP <name>: <why>` first, and is counted here as skipped instead.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestSummary {
    /// `passed` summed over the `test result:` lines, skips included.
    passed_or_skipped: u64,
    failed: u64,
    ignored: u64,
    /// `SKIP` lines seen.
    skipped: u64,
}

impl TestSummary {
    fn read_line(&mut self, line: &str) {
        if let Some(result) = line.strip_prefix("test result: ") {
            self.passed_or_skipped += count_before(result, "passed");
            self.failed += count_before(result, "failed");
            self.ignored += count_before(result, "ignored");
        } else if is_skip_line(line) {
            self.skipped += 1;
        }
    }

    fn passed(&self) -> u64 {
        self.passed_or_skipped.saturating_sub(self.skipped)
    }

    fn closing_line(&self) -> String {
        format!(
            "xtask-test: {} passed, {} failed, {} skipped",
            self.passed(),
            self.failed,
            self.ignored + self.skipped
        )
    }
}

/// `SKIP name: why`, at the start of a line or — with one test thread, where libtest has
/// written `test name ... ` already — right after that.
fn is_skip_line(line: &str) -> bool {
    let rest = line.strip_prefix("SKIP ").or_else(|| {
        line.starts_with("test ")
            .then(|| line.split_once(" ... SKIP "))?
            .map(|(_, rest)| rest)
    });
    rest.and_then(|rest| rest.split_once(": "))
        .is_some_and(|(name, _)| !name.is_empty() && !name.contains(char::is_whitespace))
}

/// In `ok. 39 passed; 0 failed; 1 ignored; …`, the number before `word`.
fn count_before(result: &str, word: &str) -> u64 {
    result
        .split(';')
        .filter_map(|part| {
            let mut words = part.split_whitespace().rev();
            (words.next() == Some(word)).then(|| words.next()?.parse::<u64>().ok())?
        })
        .sum()
}

/// Clippy for the eBPF crate, on its own target and toolchain.
fn clippy_ebpf() -> Result<()> {
    status(
        Command::new("rustup")
            .args([
                "run",
                setup::EBPF_TOOLCHAIN,
                "cargo",
                "clippy",
                "--release",
                "--package",
                "drain-agent-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            // Keep the BPF build's artefacts apart from the host build's.
            .env(
                "CARGO_TARGET_DIR",
                workspace_root().join("target/ebpf-clippy"),
            )
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .current_dir(workspace_root().join("drain-agent-ebpf")),
    )
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

pub fn cargo_binary() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn cargo(args: &[&str]) -> Result<()> {
    status(
        Command::new(cargo_binary())
            .args(args)
            .current_dir(workspace_root()),
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, failing with its command line when it fails.
pub fn status(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let exit = command
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !exit.success() {
        bail!("{shown} failed ({exit})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary_of(output: &str) -> TestSummary {
        let mut summary = TestSummary::default();
        for line in output.lines() {
            summary.read_line(line);
        }
        summary
    }

    #[test]
    fn skipped_kernel_tests_count_as_skipped_not_passed() {
        let output = "\
running 3 tests
SKIP counts_ipv4: kernel test cannot run (not running as root); set DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead
test counts_ipv4 ... ok
test only_the_listening_side_counts ... SKIP only_the_listening_side_counts: kernel test cannot run (not running as root)
ok
test parses ... ok

test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

running 40 tests
test result: ok. 39 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.20s
";
        let summary = summary_of(output);
        assert_eq!(
            summary,
            TestSummary {
                passed_or_skipped: 42,
                failed: 0,
                ignored: 1,
                skipped: 2,
            }
        );
        assert_eq!(
            summary.closing_line(),
            "xtask-test: 40 passed, 0 failed, 3 skipped"
        );
    }

    #[test]
    fn failures_and_lines_that_only_mention_skip_are_told_apart() {
        let output = "\
[agent] SKIP nothing here
note: SKIP in the middle: not a skip line
SKIP : no name
test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.00s
";
        let summary = summary_of(output);
        assert_eq!(summary.skipped, 0);
        assert_eq!(
            summary.closing_line(),
            "xtask-test: 5 passed, 2 failed, 0 skipped"
        );
    }

    #[test]
    fn the_ignored_kernel_tests_run_with_or_without_a_filter() {
        let strings = |args: &[&str]| args.iter().map(|arg| (*arg).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            test_args(&[]),
            strings(&["test", "--", "--include-ignored"])
        );
        assert_eq!(
            test_args(&strings(&["-p", "drain-agent", "--test", "tracking"])),
            strings(&[
                "test",
                "-p",
                "drain-agent",
                "--test",
                "tracking",
                "--",
                "--include-ignored"
            ])
        );
        assert_eq!(
            test_args(&strings(&["--test", "close", "--", "--test-threads=1"])),
            strings(&[
                "test",
                "--test",
                "close",
                "--",
                "--test-threads=1",
                "--include-ignored"
            ])
        );
    }

    /// Found by an audit: skips written with `eprintln!` (standard error, which libtest
    /// captures and the summary never reads), `println!("skipped: …")` (captured) or
    /// `SKIP: …` (no test named) were counted as passed. The line of each skip helper —
    /// xtask's own (`test_skip`), drain-agent's crate (src/test_skip.rs, the same words) and
    /// its tests/common `report_skip` (behind `kernel_available`, `tool_available`,
    /// `dist_binary`, HAProxy's `available`, image.rs) — counts as skipped, not passed, on
    /// a line of its own and after libtest's `test NAME ... ` (one test thread).
    #[test]
    fn each_skip_helpers_line_counts_as_skipped_not_passed() {
        let lines = [
            test_skip::skip_line(
                "each_reference_records_real_connections_and_drops_them",
                "kernel test cannot run (not running as root)",
            ),
            // drain-agent/src/test_skip.rs `skip`.
            "SKIP an_applications_listener_is_told_apart_from_nobody: the kernel's socket \
             tables (inet_diag) cannot be read: Operation not permitted (os error 1); set \
             DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead"
                .to_owned(),
            "SKIP a_state_directory_another_user_owns_is_refused: chown needs root; set \
             DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead"
                .to_owned(),
            // drain-agent/tests/common `report_skip`, from `tool_available` and `dist_binary`.
            "SKIP the_granted_capabilities_are_enough_to_steer: `setpriv` is not installed; \
             run `cargo xtask setup` (set DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead)"
                .to_owned(),
            "SKIP the_static_binary_runs: target/dist/x86_64-unknown-linux-musl/\
             drain-agent is missing; run `cargo xtask dist` (set DRAIN_AGENT_REQUIRE_KERNEL=1 \
             to fail instead)"
                .to_owned(),
        ];
        for line in &lines {
            let name = line
                .strip_prefix("SKIP ")
                .and_then(|rest| rest.split_once(": "))
                .map(|(name, _)| name)
                .expect("a test name");
            for shown in [line.clone(), format!("test {name} ... {line}")] {
                let summary = summary_of(&format!(
                    "running 2 tests\n{shown}\nok\ntest other ... ok\n\n\
                     test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n"
                ));
                assert_eq!(
                    (summary.passed(), summary.skipped),
                    (1, 1),
                    "one passed, one skipped: {shown}"
                );
            }
        }
        // What the audit found: lines the summary cannot tell from a pass.
        let summary = summary_of(
            "SKIP: the socket tables cannot be read here\nskipped: chown needs root\n\
             test result: ok. 2 passed; 0 failed; 0 ignored;\n",
        );
        assert_eq!((summary.passed(), summary.skipped), (2, 0));
    }

    #[test]
    fn the_closing_line_is_the_plain_one_ci_reads() {
        // `N passed, N failed, N skipped` alone on its line, after one word and a colon.
        let line = TestSummary::default().closing_line();
        let (word, counts) = line.split_once(": ").expect("a colon");
        assert!(!word.contains(char::is_whitespace), "{line}");
        assert_eq!(counts, "0 passed, 0 failed, 0 skipped");
    }

    #[test]
    fn more_skips_than_passes_never_underflow() {
        let summary =
            summary_of("SKIP a: x\nSKIP b: y\ntest result: ok. 1 passed; 0 failed; 0 ignored;\n");
        assert_eq!(summary.passed(), 0);
        assert_eq!(
            summary.closing_line(),
            "xtask-test: 0 passed, 0 failed, 2 skipped"
        );
    }
}
