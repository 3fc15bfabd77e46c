//! The Prometheus configuration and alert rules (deploy/prometheus/) and the Grafana
//! dashboard (deploy/grafana/) checked with promtool, against the metrics the real agent
//! exports, and in a real Prometheus scraping it.
//!
//! A linter that is not installed skips its test loudly, or fails it when
//! `DRAIN_AGENT_REQUIRE_KERNEL=1` (CI); `cargo xtask setup` installs them all.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{
    deploy::{deploy, identifiers, read, run, text_of, tool_available},
    prometheus::{PROMETHEUS, Prometheus},
};
use serde_json::Value;

/// The PromQL expressions of a Grafana dashboard: panel targets and query variables.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {:?}: a target without expr", panel["title"]));
            queries.push((
                panel["title"].as_str().unwrap_or("?").to_owned(),
                expr.to_owned(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if variable["type"] == "query" {
            let query = variable["query"]["query"]
                .as_str()
                .or_else(|| variable["query"].as_str())
                .expect("variable query");
            queries.push((format!("variable {}", variable["name"]), query.to_owned()));
        }
    }
    queries
}

/// The `expr:` values of a Prometheus rules file: inline, or a `|`/`>` block below it.
fn rule_expressions(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let block: Vec<&str> = lines[index + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join(" ").trim().to_owned());
        } else {
            exprs.push(value.trim_matches(['"', '\'']).to_owned());
        }
    }
    exprs
}

fn read_dashboard() -> Value {
    let path = deploy("grafana/drain-agent.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Grafana's variables replaced by values Prometheus understands.
fn expand_grafana(expr: &str, instance: &str, rate_interval: &str) -> String {
    let expanded = expr
        .replace("$__rate_interval", rate_interval)
        .replace("$__interval", rate_interval)
        .replace("$__range", "5m")
        .replace("$instance", &instance.replace('.', "\\\\."))
        .replace("$job", "drain-agent")
        .replace("$port", ".*");
    assert!(
        !expanded.contains('$'),
        "unknown Grafana variable in {expr:?}"
    );
    expanded
}

/// A copy of a Prometheus config whose `kubernetes_sd_configs` blocks are static targets,
/// for a promtool built without Kubernetes discovery (Debian's).
fn without_kubernetes_sd(text: &str) -> String {
    let mut out = Vec::new();
    let mut skipping: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(block) = skipping {
            if line.trim().is_empty() || indent > block {
                continue;
            }
            skipping = None;
        }
        if line.trim_start().starts_with("kubernetes_sd_configs:") {
            out.push(format!(
                "{}static_configs: [{{targets: [\"127.0.0.1:9100\"]}}]",
                " ".repeat(indent)
            ));
            skipping = Some(indent);
            continue;
        }
        out.push(line.to_owned());
    }
    out.join("\n") + "\n"
}

#[test]
fn prometheus_files_pass_promtool() {
    let test = "prometheus_files_pass_promtool";
    if !tool_available(test, "promtool", &["--version"]) {
        return;
    }
    let dir = deploy("prometheus");
    let output = run(Command::new("promtool")
        .args(["check", "rules", "drain-agent-rules.yml"])
        .current_dir(&dir));
    assert!(
        output.status.success(),
        "promtool check rules:\n{}",
        text_of(&output)
    );
    // When each alert fires (and when it does not), on made-up series.
    let output = run(Command::new("promtool")
        .args(["test", "rules", "drain-agent-rules.test.yml"])
        .current_dir(&dir));
    assert!(
        output.status.success(),
        "promtool test rules:\n{}",
        text_of(&output)
    );

    let output = run(Command::new("promtool")
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir));
    assert!(
        output.status.success(),
        "promtool check config prometheus.yml:\n{}",
        text_of(&output)
    );

    let output = run(Command::new("promtool")
        .args(["check", "config", "prometheus-kubernetes.yml"])
        .current_dir(&dir));
    if !output.status.success()
        && text_of(&output).contains("field kubernetes_sd_configs not found")
    {
        eprintln!(
            "NOTE {test}: this promtool has no Kubernetes discovery (Debian builds it without); \
             checking prometheus-kubernetes.yml with static targets in its place"
        );
        let temp = common::temp_dir("drain-agent-deploy-promtool-");
        fs::copy(
            dir.join("drain-agent-rules.yml"),
            temp.path().join("drain-agent-rules.yml"),
        )
        .expect("copy rules");
        let config = read(&dir.join("prometheus-kubernetes.yml"));
        fs::write(
            temp.path().join("prometheus-kubernetes.yml"),
            without_kubernetes_sd(&config),
        )
        .expect("write");
        let output = run(Command::new("promtool")
            .args(["check", "config", "prometheus-kubernetes.yml"])
            .current_dir(temp.path()));
        assert!(
            output.status.success(),
            "promtool check config prometheus-kubernetes.yml:\n{}",
            text_of(&output)
        );
    } else {
        assert!(
            output.status.success(),
            "promtool check config prometheus-kubernetes.yml:\n{}",
            text_of(&output)
        );
    }
}

#[test]
fn grafana_dashboard_is_importable() {
    let dashboard = read_dashboard();
    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    assert!(
        dashboard.get("id").is_none_or(Value::is_null),
        "no instance-specific id"
    );

    let variables: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| (v["name"].as_str().expect("variable name"), v))
        .collect();
    assert_eq!(variables["datasource"]["type"], "datasource");
    assert_eq!(variables["datasource"]["query"], "prometheus");
    let port_query = variables["port"]["query"]["query"]
        .as_str()
        .expect("port query");
    assert!(
        port_query.starts_with("label_values(drain_agent_connections_active")
            && port_query.ends_with(", port)"),
        "{port_query}"
    );

    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].is_u64(), "panel {id}: gridPos.{key}");
        }
        if panel["type"] == "row" {
            continue;
        }
        titles.push(panel["title"].as_str().expect("title").to_owned());
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {id} uses the datasource variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        for target in targets {
            assert!(target["refId"].is_string(), "panel {id}: refId");
            let expr = target["expr"].as_str().expect("expr");
            for variable in ["$instance", "$port", "$job"] {
                if expr.contains(variable) {
                    assert!(
                        variables.contains_key(&variable[1..]),
                        "{variable} is not a dashboard variable"
                    );
                }
            }
        }
    }
    let queries = dashboard_queries(&dashboard);
    for needed in [
        "drain_agent_connections_active",
        "drain_agent_connections_opened_total",
        "drain_agent_connections_closed_total",
        "drain_agent_connection_duration_seconds_bucket",
        "drain_agent_drain_requests_total",
        "drain_agent_drain_wait_seconds_bucket",
        "drain_agent_tracking_errors_total",
    ] {
        assert!(
            queries
                .iter()
                .any(|(_, q)| identifiers(q, "drain_agent_").contains(needed)),
            "no panel shows {needed}"
        );
    }
    for quantile in ["0.5", "0.99"] {
        assert!(
            queries.iter().any(
                |(_, q)| q.contains(&format!("histogram_quantile({quantile},"))
                    && q.contains("drain_agent_connection_duration_seconds_bucket")
                    && q.contains("by (port, le)")
            ),
            "no per-port p{quantile} connection duration"
        );
    }

    // Every query is valid PromQL: promtool parses them as recording rules.
    let test = "grafana_dashboard_is_importable";
    if !tool_available(test, "promtool", &["--version"]) {
        return;
    }
    let temp = common::temp_dir("drain-agent-deploy-dashboard-");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, (_, expr)) in queries.iter().enumerate() {
        let expr = expand_grafana(expr, "127.0.0.1:9100", "1m");
        // label_values() is Grafana's, not PromQL: check the selector inside it.
        let expr = match expr.strip_prefix("label_values(") {
            Some(inner) => inner
                .rsplit_once(',')
                .expect("label_values(selector, label)")
                .0
                .to_owned(),
            None => expr,
        };
        let quoted = serde_json::to_string(&expr).expect("quote");
        rules.push_str(&format!(
            "      - record: dashboard:query_{index}\n        expr: {quoted}\n"
        ));
    }
    let path = temp.path().join("dashboard-rules.yml");
    fs::write(&path, &rules).expect("write");
    let output = run(Command::new("promtool").args(["check", "rules"]).arg(&path));
    assert!(
        output.status.success(),
        "dashboard queries that are not PromQL:\n{}\n{rules}",
        text_of(&output)
    );
}

/// Makes every metric family show up: connections to a port, closed (durations) and open,
/// and /drained answers both ways.
fn exercise(agent: &common::Agent) -> (common::Server, TcpStream) {
    let server = common::Server::start("127.0.0.1:0");
    let clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connect"))
        .collect();
    server.wait_accepted(3);
    agent.expect_active(server.port, 3);
    let (status, _) = agent.get_json(&format!("/drained?port={}&timeout=0", server.port));
    assert_eq!(status, 503, "not drained while connections are open");
    drop(clients);
    server.close_all();
    let (status, body) = agent.get_json(&format!("/drained?port={}&timeout=5s", server.port));
    assert_eq!(status, 200, "{body}");
    // One connection stays open, so the active gauge has a non-zero series.
    let kept = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    server.wait_accepted(1);
    (server, kept)
}

/// Sample names in the text format (`x_bucket`, `x_sum`, `x_count` for histograms) and the
/// family names from `# TYPE` (for prose that names a histogram by its family).
fn exported_names(metrics: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut samples = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.insert(rest.split_whitespace().next().expect("family").to_owned());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).expect("sample line");
            samples.insert(line[..end].to_owned());
        }
    }
    families.extend(samples.iter().cloned());
    (samples, families)
}

/// The files this test owns under deploy/ (deploy/examples belongs to the end-to-end tests).
fn all_deploy_files() -> Vec<PathBuf> {
    let mut files = vec![deploy("README.md"), deploy("Dockerfile")];
    let mut dirs: Vec<PathBuf> = ["systemd", "kubernetes", "grafana", "prometheus"]
        .iter()
        .map(|dir| deploy(dir))
        .collect();
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn dashboard_and_alerts_name_only_exported_metrics() {
    let test = "dashboard_and_alerts_name_only_exported_metrics";
    if !common::kernel_available(test) {
        return;
    }
    // With in-pod listeners on (limited to namespaces that do not exist), so that their
    // gauge is exported too.
    let pod_listen = format!("127.0.0.1:{}", common::free_port());
    let agent = common::Agent::start(&[
        "--pod-listen",
        &pod_listen,
        "--pod-netns-prefix",
        "da-no-such-namespace-",
    ]);
    let _server = exercise(&agent);
    let (status, metrics) = agent.try_get("/metrics").expect("scrape");
    assert_eq!(status, 200);
    let (samples, families) = exported_names(&metrics);
    for family in [
        "drain_agent_connection_duration_seconds",
        "drain_agent_drain_wait_seconds",
    ] {
        for suffix in ["_bucket", "_sum", "_count"] {
            assert!(
                samples.contains(&format!("{family}{suffix}")),
                "{family}{suffix} not exported:\n{metrics}"
            );
        }
    }

    // PromQL: only sample names select anything.
    let mut queries: Vec<(String, String)> = dashboard_queries(&read_dashboard())
        .into_iter()
        .map(|(panel, q)| (format!("dashboard panel {panel}"), q))
        .collect();
    let rules = rule_expressions(&read(&deploy("prometheus/drain-agent-rules.yml")));
    assert_eq!(rules.len(), 6, "{rules:?}");
    queries.extend(rules.into_iter().map(|q| ("alert rule".to_owned(), q)));
    for (place, query) in &queries {
        for prefix in ["drain_agent_", "process_"] {
            for name in identifiers(query, prefix) {
                assert!(
                    samples.contains(&name),
                    "{place}: {name} is not exported by the agent ({query})"
                );
            }
        }
    }
    // Prose and examples (README, rule tests, comments) too.
    for file in all_deploy_files() {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for name in identifiers(&text, "drain_agent_") {
            assert!(
                families.contains(&name),
                "{}: {name} is not a metric the agent exports",
                file.display()
            );
        }
    }
}

fn prometheus_get(prometheus: &Prometheus, path: &str) -> Value {
    let (_, body) = prometheus
        .get(path)
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Every series an instant query answers (`Prometheus::query` wants one at most).
fn prometheus_query(prometheus: &Prometheus, query: &str) -> Value {
    let encoded: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
    let answer = prometheus_get(prometheus, &format!("/api/v1/query?query={encoded}"));
    assert_eq!(answer["status"], "success", "{query}: {answer}");
    answer["data"]["result"].clone()
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn dashboard_and_alert_queries_work_in_a_real_prometheus() {
    let test = "dashboard_and_alert_queries_work_in_a_real_prometheus";
    if !common::kernel_available(test) || !tool_available(test, PROMETHEUS, &["--version"]) {
        return;
    }
    let agent = common::Agent::start(&[]);
    let instance = format!("127.0.0.1:{}", agent.port);

    // The example configuration, pointed at this agent and scraping every second.
    let temp = common::temp_dir("drain-agent-deploy-prometheus-");
    let config = read(&deploy("prometheus/prometheus.yml"));
    for expected in [
        "127.0.0.1:9100",
        "scrape_interval: 15s",
        "evaluation_interval: 15s",
    ] {
        assert!(
            config.contains(expected),
            "prometheus.yml no longer has {expected:?}: update this test"
        );
    }
    let config = config
        .replace("127.0.0.1:9100", &instance)
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    fs::write(temp.path().join("prometheus.yml"), config).expect("write config");
    fs::copy(
        deploy("prometheus/drain-agent-rules.yml"),
        temp.path().join("drain-agent-rules.yml"),
    )
    .expect("copy rules");
    let started = Instant::now();
    let prometheus = Prometheus::start_in(temp);
    let up_query = format!("up{{job=\"drain-agent\", instance=\"{instance}\"}} == 1");
    loop {
        if !prometheus_query(&prometheus, &up_query)
            .as_array()
            .expect("result")
            .is_empty()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "Prometheus never scraped the agent:\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Traffic between scrapes, so rates and histograms have something to show.
    std::thread::sleep(Duration::from_secs(2));
    let _server = exercise(&agent);
    std::thread::sleep(Duration::from_secs(4));

    for (panel, query) in dashboard_queries(&read_dashboard()) {
        let query = expand_grafana(&query, &instance, "30s");
        let query = match query.strip_prefix("label_values(") {
            Some(inner) => inner
                .rsplit_once(',')
                .expect("label_values(selector, label)")
                .0
                .to_owned(),
            None => query,
        };
        let result = prometheus_query(&prometheus, &query);
        assert!(
            !result.as_array().expect("result").is_empty(),
            "dashboard panel {panel:?}: no data for {query}\n(is a label or metric name wrong?)"
        );
    }

    // Every alert rule loaded and evaluated without error; none fires for a healthy agent.
    let started = Instant::now();
    loop {
        let rules = prometheus_get(&prometheus, "/api/v1/rules");
        let all: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules").iter())
            .collect();
        assert_eq!(all.len(), 6, "rules loaded: {rules}");
        let evaluated = all.iter().all(|r| r["health"] == "ok");
        if evaluated {
            for rule in &all {
                assert_eq!(
                    rule["state"], "inactive",
                    "alert {} fires for a healthy agent: {rule}",
                    rule["name"]
                );
            }
            break;
        }
        let broken: Vec<&&Value> = all.iter().filter(|r| r["health"] == "err").collect();
        assert!(broken.is_empty(), "rules that fail to evaluate: {broken:?}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "rules never evaluated: {rules}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
