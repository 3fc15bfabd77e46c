//! `cargo xtask`: the developer's front door. Every command installs what it needs first
//! (idempotently), so the README's two commands work on a fresh machine.

mod bench;
mod dist;
mod e2e;
mod setup;

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
    /// Install the prerequisites: the pinned nightly with rust-src, bpf-linker 0.10, and
    /// the Debian packages the tests use (idempotent; apt only as root).
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
        Task::Dist(args) => dist::dist(&args),
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
    let mut args = vec!["test".to_owned()];
    args.extend(extra.iter().cloned());
    run_tests_with_summary(
        Command::new(cargo_binary())
            .args(&args)
            .current_dir(workspace_root()),
    )
}

/// Runs `cargo test`, passing its output through, and ends with one line that adds up every
/// test binary's `test result:` line: `xtask test: N passed, N failed, N skipped`.
fn run_tests_with_summary(command: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};

    let shown = format!("{command:?}");
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    let mut totals = [0u64; 3];
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read cargo test's output")?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            for (total, word) in totals.iter_mut().zip(["passed", "failed", "ignored"]) {
                *total += count_before(result, word);
            }
        }
    }
    let exit = child.wait().context("cargo test did not finish")?;
    let [passed, failed, ignored] = totals;
    println!("xtask test: {passed} passed, {failed} failed, {ignored} skipped");
    if !exit.success() {
        bail!("{shown} failed ({exit})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
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
