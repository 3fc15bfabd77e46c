//! A real Prometheus server for the tests: its own port and temporary storage, queried over
//! its HTTP API; stopped and its directory removed on drop, also when the test fails.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use drain_agent::cli::client::AgentUrl;
use tempfile::TempDir;

use super::{child::Guard, free_port, http::get_url, temp_dir};

/// The Debian package's binary.
pub const PROMETHEUS: &str = "/usr/bin/prometheus";

pub struct Prometheus {
    /// Declared before `dir`: the server stops before its storage is removed.
    process: Guard,
    dir: TempDir,
    url: AgentUrl,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`) every second, as job `drain-agent`.
    pub fn start(target: &str) -> Self {
        let dir = temp_dir("drain-agent-prometheus-");
        fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: drain-agent\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus config");
        Self::start_in(dir)
    }

    /// Runs with the configuration `dir`/prometheus.yml (and what it refers to there);
    /// storage in `dir`/data, log in `dir`/prometheus.log.
    pub fn start_in(dir: TempDir) -> Self {
        let log = fs::File::create(dir.path().join("prometheus.log")).expect("prometheus log");
        let port = free_port();
        let process = Guard::spawn(
            "prometheus (Debian package prometheus)",
            Command::new(PROMETHEUS)
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )
        .grace(Duration::from_secs(10));
        let mut prometheus = Self {
            process,
            dir,
            url: AgentUrl::parse(&format!("http://127.0.0.1:{port}")).expect("url"),
        };
        prometheus.wait_ready(Duration::from_secs(30));
        prometheus
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn wait_ready(&mut self, limit: Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.process.try_status() {
                panic!(
                    "prometheus exited ({status}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            if let Ok((200, _)) = self.get("/-/ready") {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "prometheus not ready after {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        get_url(&self.url, path, Duration::from_secs(10))
    }

    /// The end of Prometheus's log, for failure messages.
    pub fn log(&self) -> String {
        let text = fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// An instant query: `None` for an empty result, else the one series' value.
    pub fn query(&self, promql: &str) -> anyhow::Result<Option<String>> {
        let encoded: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let (status, body) = self.get(&format!("/api/v1/query?query={encoded}"))?;
        anyhow::ensure!(status == 200, "status {status}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body)?;
        anyhow::ensure!(json["status"] == "success", "{body}");
        let result = json["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("no result array: {body}"))?;
        match result.as_slice() {
            [] => Ok(None),
            [series] => Ok(series["value"][1].as_str().map(str::to_owned)),
            _ => anyhow::bail!("{} series, expected one: {body}", result.len()),
        }
    }

    /// Queries until `promql` answers `expected`; fails after `limit` with the last answer
    /// and the scrape target's state. Returns how long it took.
    pub fn wait_for(&self, promql: &str, expected: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let answer = self.query(promql);
            if matches!(&answer, Ok(Some(value)) if value == expected) {
                return started.elapsed();
            }
            if started.elapsed() > limit {
                let targets = self.get("/api/v1/targets").map(|(_, body)| body);
                panic!(
                    "prometheus: {promql} did not become {expected} within {limit:?}; last answer: \
                     {answer:?}\ntargets: {targets:?}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
