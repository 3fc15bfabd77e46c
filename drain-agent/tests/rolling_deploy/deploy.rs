//! Runs deploy/examples/rolling-deploy.sh against a [`Stack`], the way a user would, and
//! records when each of its steps happened.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    common::child::Guard,
    stack::{Stack, examples_dir},
};

/// What the deploy waits for between taking a backend out of nginx and stopping it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// Baseline (a): nothing; the backend is killed at once.
    None,
    /// Baseline (b): a fixed sleep, as deploys do today.
    Sleep(Duration),
    /// `drain-agent wait --port P --settle …`, then SIGTERM.
    Agent,
}

impl Drain {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "no drain",
            Self::Sleep(_) => "fixed sleep",
            Self::Agent => "drain-agent",
        }
    }

    /// The signal that stops the old backend. Without a drain the stop is immediate
    /// (SIGKILL): what happens to in-flight requests when nothing drains — neither the deploy
    /// nor the application. After a drain, SIGTERM.
    pub fn stop_signal(self) -> &'static str {
        match self {
            Self::None => "KILL",
            Self::Sleep(_) | Self::Agent => "TERM",
        }
    }

    fn env(self) -> (&'static str, String) {
        match self {
            Self::None => ("none", String::new()),
            Self::Sleep(pause) => ("sleep", format!("{}", pause.as_secs_f64())),
            Self::Agent => ("agent", String::new()),
        }
    }
}

/// The settle time the deploy asks drain-agent for.
pub const QUIET: &str = "200ms";

/// A step the script logged (`rolling-deploy: TIME STEP BACKEND …`), and when we read it.
#[derive(Clone, Debug)]
pub struct Step {
    pub at: Instant,
    pub name: String,
    pub backend: String,
}

pub struct DeployRun {
    pub elapsed: Duration,
    pub steps: Vec<Step>,
}

impl DeployRun {
    /// When step `name` began for the backend on `port`.
    pub fn step_at(&self, name: &str, port: u16) -> Instant {
        let backend = Stack::backend_addr(port);
        self.steps
            .iter()
            .find(|step| step.name == name && step.backend == backend)
            .unwrap_or_else(|| panic!("the deploy logged no {name} step for {backend}"))
            .at
    }
}

/// Runs the deploy script to its end (at most 2 minutes); panics if it fails.
pub fn run(stack: &mut Stack, drain: Drain, agent_url: &str) -> DeployRun {
    let (mode, sleep) = drain.env();
    let backends = stack.backend_ports.map(Stack::backend_addr).join(" ");
    let mut command = Command::new("bash");
    command
        .arg(examples_dir().join("rolling-deploy.sh"))
        .env("BACKENDS", backends)
        .env("UPSTREAM_CONF", stack.conf_path())
        .env("NGINX_CMD", stack.nginx_command())
        .env("NGINX_PID_FILE", stack.nginx_pid_file())
        .env("DRAIN", mode)
        .env("DRAIN_SLEEP", sleep)
        .env("DRAIN_AGENT", crate::common::agent_binary())
        .env("DRAIN_AGENT_URL", agent_url)
        .env("DRAIN_TIMEOUT", "30s")
        .env("DRAIN_QUIET", QUIET)
        .env("STOP_SIGNAL", drain.stop_signal())
        .env("BACKEND_RUN_DIR", stack.run_dir())
        .env(
            "BACKEND_START_CMD",
            format!("{} --app-version v2", stack.backend_binary.display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let group = stack
        .deploy
        .insert(Guard::spawn_group("rolling-deploy.sh", &mut command).stop_signal(None));
    let steps = Arc::new(Mutex::new(Vec::new()));
    let stdout = group.child_mut().stdout.take().expect("script stdout");
    let sink = Arc::clone(&steps);
    let stdout_reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let at = Instant::now();
            eprintln!("[deploy] {line}");
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["rolling-deploy:", _time, name, backend, ..] = words.as_slice() {
                let step = Step {
                    at,
                    name: (*name).to_owned(),
                    backend: (*backend).to_owned(),
                };
                sink.lock().expect("steps").push(step);
            }
        }
    });
    let stderr = group.child_mut().stderr.take().expect("script stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[deploy!] {line}");
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let status = group.wait_for(Duration::from_secs(120));
    let elapsed = started.elapsed();
    let Some(status) = status else {
        panic!(
            "the deploy ({}) did not finish within 2 minutes",
            drain.name()
        );
    };
    stdout_reader.join().expect("stdout reader");
    let stderr = stderr_reader.join().expect("stderr reader");
    assert!(
        status.success(),
        "the deploy ({}) failed: {status}\n{stderr}\nnginx error log:\n{}",
        drain.name(),
        stack.nginx_error_log()
    );
    let steps = steps.lock().expect("steps").clone();
    DeployRun { elapsed, steps }
}
