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

/// The pid in a pid file.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The pids in every pid file of `dir` (where the deploy scripts record their backends).
pub fn pids_in(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| read_pid(&entry.path()))
        .collect()
}

/// A test process killed outright (SIGKILL, a CI timeout) never runs its drop guards: the
/// next run removes what it left. Each directory of the temp dir named `PREFIX<pid>-…`
/// whose run is gone: the process group led by the pid in `DIR/LEADER_PID_FILE` (if its
/// command line names `program`: pid files outlive their process), the backends of
/// `DIR/run/`, then the directory.
pub fn remove_leftovers_of_killed_runs(prefix: &str, leader_pid_file: &str, program: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(prefix)
            // The first number: `PID-TAG-…`, or `TAG-PID` as older runs named them.
            .and_then(|rest| rest.split('-').find_map(|part| part.parse::<u32>().ok()))
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue; // that run is alive
        }
        let dir = entry.path();
        if let Some(leader) = read_pid(&dir.join(leader_pid_file)) {
            let cmdline = std::fs::read(format!("/proc/{leader}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(program) {
                // SAFETY: killpg on the group our server led (started with its own group).
                unsafe { libc::killpg(leader, libc::SIGKILL) };
            }
        }
        for pid in pids_in(&dir.join("run")) {
            kill_backend(pid);
        }
        eprintln!("removed the leftovers of a killed run: {}", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Waits (2 s at most) until no thread of process `pid` is runnable, twice in a row: each
/// has reached its blocking point (an accept, a read, a request's sleep), so whatever it
/// counts on the way there — a request answered, a connection closed — is counted. A
/// starved thread that has written an answer but not yet counted it shows as `R`.
pub fn wait_until_settled(pid: u32) {
    let runnable = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|task| {
                std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                    // `pid (comm) STATE …`: comm may hold spaces, so after the last ')'.
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('R'))
                })
            })
    };
    let started = Instant::now();
    let mut quiet = 0;
    while quiet < 2 && started.elapsed() < Duration::from_secs(2) {
        if runnable() {
            quiet = 0;
        } else {
            quiet += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
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
