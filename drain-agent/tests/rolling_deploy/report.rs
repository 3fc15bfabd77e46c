//! What one arm of the comparison measured, and the summary table.

use std::time::{Duration, Instant};

use crate::{
    deploy::{DeployRun, Drain},
    load::{Kind, Outcome, Record},
    stack::ShutdownReport,
};

/// Failed requests, by how they failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failures {
    /// Could not connect to nginx, or the connection broke before an answer head.
    pub connection: usize,
    /// nginx answered 5xx (502: no backend answered).
    pub server_error: usize,
    /// Other non-200 answers.
    pub other_status: usize,
    /// 200, but the body stopped short (the backend died while streaming it).
    pub truncated: usize,
    pub timeout: usize,
}

impl Failures {
    pub fn total(&self) -> usize {
        self.connection + self.server_error + self.other_status + self.truncated + self.timeout
    }
}

/// One backend's replacement, as seen from outside.
#[derive(Clone, Debug)]
pub struct BackendStep {
    pub port: u16,
    /// Slow requests this backend was serving when the wait ("drain" step) began: started
    /// before, ended after, answered by this backend.
    pub slow_in_flight_at_drain: usize,
    /// Requests (any kind) of this backend still in flight when it was stopped.
    pub in_flight_at_stop: usize,
    /// From "drain" to "stop": how long the deploy waited.
    pub waited: Duration,
}

#[derive(Clone, Debug)]
pub struct ArmResult {
    pub drain: Drain,
    pub fast: usize,
    pub slow: usize,
    pub failures: Failures,
    pub failed_by_kind: (usize, usize),
    pub retried: usize,
    pub backends: Vec<BackendStep>,
    pub deploy_time: Duration,
    /// The old backends' own `shutdown` lines (none after SIGKILL).
    pub shutdowns: Vec<ShutdownReport>,
}

impl ArmResult {
    pub fn new(
        drain: Drain,
        records: &[Record],
        deploy: &DeployRun,
        ports: [u16; 2],
        shutdowns: Vec<ShutdownReport>,
    ) -> Self {
        let mut failures = Failures::default();
        let mut failed_by_kind = (0, 0);
        for record in records {
            match &record.outcome {
                Outcome::Ok => continue,
                Outcome::Connect(_) | Outcome::Connection(_) => failures.connection += 1,
                Outcome::Status(code) if *code >= 500 => failures.server_error += 1,
                Outcome::Status(_) => failures.other_status += 1,
                Outcome::Truncated { .. } => failures.truncated += 1,
                Outcome::Timeout => failures.timeout += 1,
            }
            match record.kind {
                Kind::Fast => failed_by_kind.0 += 1,
                Kind::Slow => failed_by_kind.1 += 1,
            }
        }
        let backends = ports
            .iter()
            .map(|&port| {
                let drain_at = deploy.step_at("drain", port);
                let stop_at = deploy.step_at("stop", port);
                BackendStep {
                    port,
                    slow_in_flight_at_drain: in_flight(records, port, drain_at, Some(Kind::Slow)),
                    in_flight_at_stop: in_flight(records, port, stop_at, None),
                    waited: stop_at.saturating_duration_since(drain_at),
                }
            })
            .collect();
        Self {
            drain,
            fast: records.iter().filter(|r| r.kind == Kind::Fast).count(),
            slow: records.iter().filter(|r| r.kind == Kind::Slow).count(),
            failures,
            failed_by_kind,
            retried: records.iter().filter(|r| r.retried).count(),
            backends,
            deploy_time: deploy.elapsed,
            shutdowns,
        }
    }

    pub fn sent(&self) -> usize {
        self.fast + self.slow
    }
}

/// Requests answered by the backend on `port` that were in flight at `at`.
fn in_flight(records: &[Record], port: u16, at: Instant, kind: Option<Kind>) -> usize {
    records
        .iter()
        .filter(|r| kind.is_none_or(|k| r.kind == k))
        .filter(|r| r.backend_port() == Some(port) && r.backend_version() == Some("v1"))
        .filter(|r| r.started < at && r.ended > at)
        .count()
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// The summary, as a Markdown table.
pub fn table(results: &[ArmResult]) -> String {
    let mut out = String::from(
        "| deploy | wait before stop | stop | requests (fast / slow) | failed (fast / slow) | connection errors | 5xx | truncated | slow in flight at drain start | in flight at stop | waits | deploy time |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for result in results {
        let wait = match result.drain {
            Drain::None => "none".to_owned(),
            Drain::Sleep(pause) => format!("sleep {}", seconds(pause)),
            Drain::Agent => format!("drain-agent wait (quiet {})", crate::deploy::QUIET),
        };
        let per_backend = |f: &dyn Fn(&BackendStep) -> String| {
            result
                .backends
                .iter()
                .map(f)
                .collect::<Vec<_>>()
                .join(" / ")
        };
        out.push_str(&format!(
            "| {} | {wait} | SIG{} | {} ({} / {}) | **{}** ({} / {}) | {} | {} | {} | {} | {} | {} | {} |\n",
            result.drain.name(),
            result.drain.stop_signal(),
            result.sent(),
            result.fast,
            result.slow,
            result.failures.total(),
            result.failed_by_kind.0,
            result.failed_by_kind.1,
            result.failures.connection,
            result.failures.server_error,
            result.failures.truncated,
            per_backend(&|b| b.slow_in_flight_at_drain.to_string()),
            per_backend(&|b| b.in_flight_at_stop.to_string()),
            per_backend(&|b| seconds(b.waited)),
            seconds(result.deploy_time),
        ));
    }
    out
}

/// Notes under the table: retries, and what the backends said when stopped.
pub fn notes(results: &[ArmResult]) -> String {
    let mut out = String::new();
    for result in results {
        let shutdowns = result
            .shutdowns
            .iter()
            .map(|s| {
                format!(
                    "in_flight={} open_connections={}",
                    s.in_flight, s.open_connections
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push_str(&format!(
            "- {}: {} request(s) re-sent once because nginx closed the client connection under them unread (a reload closes the old workers' idle connections; nginx never read the first try: checked in its access log); old backends at SIGTERM: {}\n",
            result.drain.name(),
            result.retried,
            if shutdowns.is_empty() { "(killed, no report)".to_owned() } else { shutdowns },
        ));
    }
    out
}
