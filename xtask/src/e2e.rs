//! `cargo xtask e2e`: the proof under load. Runs drain-agent/tests/rolling_deploy.rs — a rolling
//! deploy of two backends behind nginx, with drain-agent and with two baselines (no drain, a
//! fixed sleep), under load — and prints the summary table the test wrote.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{cargo_binary, is_root, setup, status, workspace_root};

/// Where the test writes its table (it reads the path from `DRAIN_AGENT_E2E_SUMMARY`).
const SUMMARY: &str = "target/e2e/rolling-deploy.md";

pub fn run() -> Result<()> {
    setup::setup(&setup::SetupArgs::default())?;
    if !is_root() {
        bail!(
            "the end-to-end test loads eBPF programs and runs nginx: run `cargo xtask e2e` as root"
        );
    }
    let summary = workspace_root().join(SUMMARY);
    prepare(&summary)?;
    status(
        Command::new(cargo_binary())
            .args([
                "test",
                "--package",
                "drain-agent",
                "--test",
                "rolling_deploy",
            ])
            .args(["--", "--nocapture", "--test-threads=1"])
            // Fail, never skip, if the kernel side cannot run.
            .env("DRAIN_AGENT_REQUIRE_KERNEL", "1")
            .env("DRAIN_AGENT_E2E_SUMMARY", &summary)
            .current_dir(workspace_root()),
    )?;
    let table = std::fs::read_to_string(&summary)
        .with_context(|| format!("the test wrote no summary at {}", summary.display()))?;
    println!("\nRolling deploy behind nginx, under load (also in {SUMMARY}):\n\n{table}");
    Ok(())
}

/// Makes the summary's directory and removes a previous run's table, so a stale one is never
/// shown.
fn prepare(summary: &Path) -> Result<()> {
    if let Some(dir) = summary.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::remove_file(summary) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("cannot remove {}", summary.display())),
    }
}
