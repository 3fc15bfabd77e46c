//! The processes of a deploy that the test does not start itself — backends the script
//! started, named by pid files — and the `e2e-backend` binary. The processes the test does
//! start are [`crate::common::child::Guard`]s (each leading its own process group).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

/// Kills `pid` if it is still an `e2e-backend` (pid files can outlive their process), then
/// reaps it if it became our child.
pub fn kill_backend(pid: i32) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("e2e-backend") {
        // SAFETY: kill on a pid that is an e2e-backend this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let mut status = 0;
        // SAFETY: waitpid on one pid, without blocking.
        match unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG) } {
            0 => std::thread::sleep(Duration::from_millis(10)),
            // Reaped, or not our child (someone else reaps it).
            _ => return,
        }
    }
}

/// The `e2e-backend` binary next to the agent's, built first (cargo does nothing if it is
/// up to date). It is another package, so cargo does not build it for this test by itself.
pub fn backend_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let agent = crate::common::agent_binary();
            let profile_dir = agent.parent().expect("agent binary directory");
            let target_dir = profile_dir.parent().expect("target directory");
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .args(["build", "--package", "e2e-backend"])
                .arg("--target-dir")
                .arg(target_dir)
                .current_dir(workspace);
            if profile_dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build for e2e-backend");
            assert!(status.success(), "cargo build --package e2e-backend failed");
            let binary = profile_dir.join("e2e-backend");
            assert!(binary.is_file(), "{} was not built", binary.display());
            binary
        })
        .clone()
}
