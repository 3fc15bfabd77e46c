//! The one guard for processes a test starts: on drop (also when the test panics) it sends
//! the process its stop signal, waits a bounded time, then SIGKILLs it and reaps it, so no
//! test leaves a process or a zombie behind.

use std::{
    process::{Child, Command, ExitStatus},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// How long a stopped process gets to exit before SIGKILL, unless told otherwise.
const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// A child process, stopped and reaped on drop.
pub struct Guard {
    name: String,
    child: Child,
    /// Sent first when stopping (`None`: straight to SIGKILL).
    stop_signal: Option<i32>,
    /// How long the stop signal has before SIGKILL.
    grace: Duration,
    /// The child leads its own process group: SIGKILL goes to the whole group, so that
    /// what it started (workers, processes of a script) goes too.
    group: bool,
    status: Option<ExitStatus>,
    /// What lives as long as the process (its temporary state directory).
    _kept: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl Guard {
    /// Spawns `command`; stopped with SIGTERM and [`DEFAULT_GRACE`].
    pub fn spawn(name: &str, command: &mut Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            stop_signal: Some(libc::SIGTERM),
            grace: DEFAULT_GRACE,
            group: false,
            status: None,
            _kept: Vec::new(),
        }
    }

    /// Keeps `thing` (a temporary directory the process uses) until the guard is dropped.
    #[must_use]
    pub fn keep(mut self, thing: impl std::any::Any + Send + Sync) -> Self {
        self._kept.push(Box::new(thing));
        self
    }

    /// Spawns `command` leading a new process group, with this test process as the reaper
    /// of its orphans: processes it starts and leaves (a script's backends) are reparented
    /// here and reaped instead of lingering as zombies.
    pub fn spawn_group(name: &str, command: &mut Command) -> Self {
        use std::os::unix::process::CommandExt as _;
        become_subreaper();
        let mut guard = Self::spawn(name, command.process_group(0));
        guard.group = true;
        guard
    }

    /// The signal sent first when stopping (`None`: SIGKILL at once).
    pub fn stop_signal(mut self, signal: Option<i32>) -> Self {
        self.stop_signal = signal;
        self
    }

    /// How long the stop signal has before SIGKILL.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status, if the process has exited (reaped here). Never panics: it runs in
    /// `drop`, also while a failed test unwinds.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if started.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends the stop signal and waits up to the grace time; then SIGKILL (the group's, for
    /// a group) and reap. Returns the status if the process exited by itself in time, and
    /// how long the stop took.
    pub fn stop(&mut self) -> (Option<ExitStatus>, Duration) {
        self.stop_within(self.grace)
    }

    /// [`Guard::stop`] with another grace time (a test that measures the stop).
    pub fn stop_within(&mut self, grace: Duration) -> (Option<ExitStatus>, Duration) {
        let started = Instant::now();
        let mut exited = self.try_status();
        if exited.is_none()
            && let Some(signal) = self.stop_signal
        {
            // SAFETY: kill on our own child's pid, not reaped yet (try_status above).
            unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
            exited = self.wait_for(grace);
        }
        let took = started.elapsed();
        self.kill();
        (exited, took)
    }

    /// SIGKILL (the whole group, for a group), then reap.
    fn kill(&mut self) {
        if self.group {
            // SAFETY: killpg on the process group created for this child; whatever is
            // left in it (workers, processes the leader started) goes.
            unsafe { libc::killpg(self.pid() as libc::pid_t, libc::SIGKILL) };
        } else if self.try_status().is_none() {
            let _ = self.child.kill();
        }
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
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

/// `count` network namespaces as a root container makes them (or, unprivileged, any local
/// user): a user namespace mapping root, a network namespace inside it, loopback up; each
/// held by a process until its guard drops.
pub fn user_owned_namespaces(count: usize) -> Vec<Guard> {
    (0..count)
        .map(|n| {
            Guard::spawn(
                &format!("unshare --user --map-root-user --net ({n})"),
                Command::new("unshare").args([
                    "--user",
                    "--map-root-user",
                    "--net",
                    "sh",
                    "-c",
                    "ip link set lo up && exec sleep 120",
                ]),
            )
        })
        .collect()
}
