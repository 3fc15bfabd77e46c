//! Processes the test starts: each in its own process group, stopped, killed and reaped on
//! drop — also when the test panics. The test process is made a child subreaper, so that
//! processes started by the deploy script (the new backends) are reparented to it when the
//! script exits, and can be reaped here instead of lingering as zombies.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// A child process leading its own process group.
pub struct Group {
    name: String,
    child: Child,
    /// Sent to the leader first on drop (then, after a grace period, SIGKILL to the group).
    polite_signal: Option<i32>,
    reaped: Option<ExitStatus>,
}

impl Group {
    /// Spawns `command` in a new process group.
    pub fn spawn(name: &str, command: &mut Command, polite_signal: Option<i32>) -> Self {
        use std::os::unix::process::CommandExt as _;
        become_subreaper();
        let child = command
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            polite_signal,
            reaped: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits up to `limit` for the leader to exit.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if self.reaped.is_none() {
                self.reaped = self
                    .child
                    .try_wait()
                    .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name));
            }
            if self.reaped.is_some() || started.elapsed() >= limit {
                return self.reaped;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let pid = self.pid() as i32;
        if self.reaped.is_none()
            && let Some(signal) = self.polite_signal
        {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(pid, signal) };
            self.wait_for(Duration::from_secs(5));
        }
        // Whatever is left in the group (workers, processes the leader started): gone.
        // SAFETY: killpg on the process group we created for this child.
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        if self.reaped.is_none() {
            let _ = self.child.wait();
        }
    }
}

/// Makes this process the reaper of its descendants' orphans (once).
pub fn become_subreaper() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
        let result = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(result, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
    });
}

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
