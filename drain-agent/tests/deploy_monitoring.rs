//! The Prometheus configuration and alert rules (deploy/prometheus/) and the Grafana
//! dashboard (deploy/grafana/) checked with promtool, against the metrics the real agent
//! exports, and in a real Prometheus scraping it; the rules that name pods through
//! kube-state-metrics in a real Prometheus scraping the agent and a kube-state-metrics
//! sample, and the recipes (deploy/recipes/).
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

/// The recording rules and alerts joined with kube-state-metrics.
const KUBERNETES_RULES: &str = "drain-agent-kubernetes-rules.yml";

/// The `record:` and `alert:` names of a rules file.
fn recorded_and_alert_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start().trim_start_matches("- ");
            line.strip_prefix("record:")
                .or_else(|| line.strip_prefix("alert:"))
        })
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Recorded series a query names (`level:metric:operations`, the only names with a colon).
fn recorded_names(query: &str) -> BTreeSet<String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    query
        .split(|c: char| !is_word(c))
        .filter(|word| {
            let parts: Vec<&str> = word.split(':').collect();
            parts.len() == 3 && parts.iter().all(|part| !part.is_empty())
        })
        .map(str::to_owned)
        .collect()
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
        .replace("$port", ".*")
        .replace("$namespace", ".*")
        .replace("$pod", ".*")
        .replace("$grace", "30");
    assert!(
        !expanded.contains('$'),
        "unknown Grafana variable in {expr:?}"
    );
    expanded
}

/// A copy of a Prometheus config whose `kubernetes_sd_configs` blocks are `static_configs`
/// (flow-style YAML: `[{targets: [...], labels: {...}}]`), for a promtool or Prometheus
/// built without Kubernetes discovery (Debian's).
fn without_kubernetes_sd(text: &str, static_configs: &str) -> String {
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
                "{}static_configs: {static_configs}",
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
    // The joins with kube-state-metrics: each recording rule and alert on made-up series.
    for args in [
        ["check", "rules", KUBERNETES_RULES],
        ["test", "rules", "drain-agent-kubernetes-rules.test.yml"],
    ] {
        let output = run(Command::new("promtool").args(args).current_dir(&dir));
        assert!(
            output.status.success(),
            "promtool {}:\n{}",
            args.join(" "),
            text_of(&output)
        );
    }
    let tested = read(&dir.join("drain-agent-kubernetes-rules.test.yml"));
    for name in recorded_and_alert_names(&read(&dir.join(KUBERNETES_RULES))) {
        assert!(
            tested.contains(&format!("expr: {name}\n"))
                || tested.contains(&format!("alertname: {name}\n")),
            "{name} has no promtool test"
        );
    }

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
        for rules in ["drain-agent-rules.yml", KUBERNETES_RULES] {
            fs::copy(dir.join(rules), temp.path().join(rules)).expect("copy rules");
        }
        let config = read(&dir.join("prometheus-kubernetes.yml"));
        fs::write(
            temp.path().join("prometheus-kubernetes.yml"),
            without_kubernetes_sd(&config, r#"[{targets: ["127.0.0.1:9100"]}]"#),
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

/// prometheus-kubernetes.yml in a real Prometheus, its pod discovery replaced by static
/// targets that carry what `role: pod` gives an agent's pod (no container port: the
/// address is the bare pod IP, the port only in the annotation): an IPv4 and an IPv6 pod,
/// each served on loopback, are scraped at the annotation's port, and an IPv6 pod IP
/// becomes a bracketed address.
#[test]
fn kubernetes_config_scrapes_ipv4_and_ipv6_pods_in_a_real_prometheus() {
    let test = "kubernetes_config_scrapes_ipv4_and_ipv6_pods_in_a_real_prometheus";
    if !tool_available(test, PROMETHEUS, &["--version"]) {
        return;
    }
    let body = || "# TYPE drain_agent_build_info gauge\ndrain_agent_build_info 1\n".to_owned();
    let v4 = serve_text("127.0.0.1:0", body());
    let v6 = serve_text("[::1]:0", body());
    let pod = |ip: &str, port: u16, node: &str| {
        format!(
            "{{targets: [\"{ip}\"], labels: {{__meta_kubernetes_pod_ip: \"{ip}\", \
             __meta_kubernetes_pod_annotation_prometheus_io_port: \"{port}\", \
             __meta_kubernetes_pod_label_app_kubernetes_io_name: drain-agent, \
             __meta_kubernetes_pod_node_name: {node}}}}}"
        )
    };
    let pods = format!(
        "[{}, {}, {}]",
        pod("127.0.0.1", v4.port(), "node-v4"),
        pod("::1", v6.port(), "node-v6"),
        pod("fd00::5", 19700, "node-far"),
    );
    let dir = deploy("prometheus");
    let temp = common::temp_dir("drain-agent-deploy-pod-addresses-");
    for rules in ["drain-agent-rules.yml", KUBERNETES_RULES] {
        fs::copy(dir.join(rules), temp.path().join(rules)).expect("copy rules");
    }
    let config = read(&dir.join("prometheus-kubernetes.yml"));
    assert!(config.contains("scrape_interval: 15s"), "update this test");
    let config = without_kubernetes_sd(&config, &pods)
        .replace("scrape_interval: 15s", "scrape_interval: 1s");
    fs::write(temp.path().join("prometheus.yml"), config).expect("write config");
    let prometheus = Prometheus::start_in(temp);

    let expected = [
        ("node-v4", format!("127.0.0.1:{}", v4.port()), true),
        ("node-v6", format!("[::1]:{}", v6.port()), true),
        ("node-far", "[fd00::5]:19700".to_owned(), false),
    ];
    let started = Instant::now();
    loop {
        let targets = prometheus_get(&prometheus, "/api/v1/targets");
        let active = targets["data"]["activeTargets"]
            .as_array()
            .expect("activeTargets");
        let found = |node: &str| active.iter().find(|t| t["labels"]["node"] == node);
        let problems: Vec<String> = expected
            .iter()
            .filter_map(|(node, instance, scraped)| {
                let target = found(node);
                let right = target.is_some_and(|t| {
                    t["labels"]["instance"] == instance.as_str()
                        && t["scrapeUrl"] == format!("http://{instance}/metrics")
                        && (!scraped || t["health"] == "up")
                });
                (!right).then(|| format!("{node}: wanted {instance}, got {target:?}"))
            })
            .collect();
        if problems.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "pods scraped at the wrong address:\n{}\ntargets: {targets}\nlog:\n{}",
            problems.join("\n"),
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// deploy/README.md's "Monitoring" names every alert of both rules files and every
/// variable of the dashboard: what a reader installs is what it describes.
#[test]
fn deploy_readme_names_every_alert_and_dashboard_variable() {
    let readme = read(&deploy("README.md"));
    let monitoring = readme
        .split("\n## Monitoring\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("deploy/README.md has a Monitoring section");
    let mut missing = Vec::new();
    for rules in ["drain-agent-rules.yml", KUBERNETES_RULES] {
        let text = read(&deploy(&format!("prometheus/{rules}")));
        for line in text.lines() {
            if let Some(alert) = line.trim_start().strip_prefix("- alert:") {
                let alert = alert.trim();
                if !monitoring.contains(&format!("`{alert}`")) {
                    missing.push(format!("alert {alert} ({rules})"));
                }
            }
        }
    }
    let dashboard = read_dashboard();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(!variables.is_empty());
    for variable in variables {
        let name = variable["name"].as_str().expect("variable name");
        if !monitoring.contains(&format!("`${name}`")) {
            missing.push(format!("dashboard variable ${name}"));
        }
    }
    assert!(
        missing.is_empty(),
        "deploy/README.md's Monitoring does not name {missing:#?}"
    );
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
            for variable in ["$instance", "$port", "$job", "$namespace", "$pod", "$grace"] {
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
        "drain_agent_drain_in_progress",
        "drain_agent_drain_duration_seconds_bucket",
    ] {
        assert!(
            queries
                .iter()
                .any(|(_, q)| identifiers(q, "drain_agent_").contains(needed)),
            "no panel shows {needed}"
        );
    }
    // Series with a colon are recorded: each by a rule of deploy/prometheus/, and the pod
    // panels and variables use them.
    let recorded: BTreeSet<String> =
        recorded_and_alert_names(&read(&deploy(&format!("prometheus/{KUBERNETES_RULES}"))))
            .into_iter()
            .collect();
    for (place, query) in &queries {
        for name in recorded_names(query) {
            assert!(
                recorded.contains(&name),
                "{place}: {name} is recorded by no rule"
            );
        }
    }
    for needed in [
        "namespace_pod_port:drain_agent_connections_active:sum",
        "namespace_pod_port:drain_agent_drain_in_progress:sum",
        "namespace_workload_result:drain_agent_scope_drains_total:increase5m",
    ] {
        assert!(
            queries
                .iter()
                .any(|(_, q)| recorded_names(q).contains(needed)),
            "no panel shows {needed}"
        );
    }
    for variable in ["namespace", "pod", "grace"] {
        assert!(variables.contains_key(variable), "no ${variable} variable");
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
    // One connection stays open, so the active gauge has a non-zero series, and a drain of
    // its address runs (a minute: the test is over by then), so the drains by scope show.
    let kept = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    server.wait_accepted(1);
    let (status, body) = common::http::curl_json(
        "POST",
        &format!(
            "{}/drain?port={}&addr=127.0.0.1&timeout=60s",
            agent.url, server.port
        ),
    );
    assert!((200..300).contains(&status), "POST /drain: {status} {body}");
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
    let mut dirs: Vec<PathBuf> = ["systemd", "kubernetes", "grafana", "prometheus", "recipes"]
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
    assert_eq!(rules.len(), 9, "{rules:?}");
    queries.extend(rules.into_iter().map(|q| ("alert rule".to_owned(), q)));
    let rules = rule_expressions(&read(&deploy(&format!("prometheus/{KUBERNETES_RULES}"))));
    assert_eq!(rules.len(), 11, "{rules:?}");
    queries.extend(rules.into_iter().map(|q| ("kubernetes rule".to_owned(), q)));
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
        // The pod panels need kube-state-metrics: pods_are_named_in_a_real_prometheus.
        if !recorded_names(&query).is_empty() {
            continue;
        }
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
        assert_eq!(all.len(), 9, "rules loaded: {rules}");
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

/// kube-state-metrics as Prometheus sees it, for two pods: `kube_pod_info` (their IPs) and
/// `kube_pod_status_phase`, served over plain HTTP on loopback until the test ends.
fn serve_kube_state_metrics(pods: &[(&str, &str, &str, &str)]) -> String {
    let mut body =
        String::from("# HELP kube_pod_info Information about pod.\n# TYPE kube_pod_info gauge\n");
    for (namespace, pod, ip, owner) in pods {
        body.push_str(&format!(
            "kube_pod_info{{namespace=\"{namespace}\",pod=\"{pod}\",uid=\"uid-{pod}\",host_ip=\"10.0.0.1\",pod_ip=\"{ip}\",node=\"node1\",created_by_kind=\"ReplicaSet\",created_by_name=\"{owner}\",priority_class=\"\",host_network=\"false\"}} 1\n"
        ));
    }
    body.push_str("# HELP kube_pod_status_phase The pods current phase.\n# TYPE kube_pod_status_phase gauge\n");
    for (namespace, pod, _, _) in pods {
        for phase in ["Pending", "Running", "Succeeded", "Failed", "Unknown"] {
            let value = u8::from(phase == "Running");
            body.push_str(&format!(
                "kube_pod_status_phase{{namespace=\"{namespace}\",pod=\"{pod}\",uid=\"uid-{pod}\",phase=\"{phase}\"}} {value}\n"
            ));
        }
    }
    serve_text("127.0.0.1:0", body).to_string()
}

/// Serves `body` as a Prometheus text exposition on `bind` (plain HTTP, any path) until the
/// test ends.
fn serve_text(bind: &str, body: String) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind(bind).expect("listen");
    let address = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            // The request's head, then one answer and close.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match std::io::Read::read(&mut stream, &mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = std::io::Write::write_all(&mut stream, answer.as_bytes());
        }
    });
    address
}

/// The series of an instant query as (labels, value).
fn series(prometheus: &Prometheus, query: &str) -> Vec<(Value, f64)> {
    prometheus_query(prometheus, query)
        .as_array()
        .expect("result")
        .iter()
        .map(|s| {
            let value = s["value"][1]
                .as_str()
                .expect("value")
                .parse()
                .expect("number");
            (s["metric"].clone(), value)
        })
        .collect()
}

/// Queries until `done` holds for the answer; fails after 30 s with the last one.
fn wait_series(
    prometheus: &Prometheus,
    query: &str,
    what: &str,
    done: impl Fn(&[(Value, f64)]) -> bool,
) -> Vec<(Value, f64)> {
    let started = Instant::now();
    loop {
        let answer = series(prometheus, query);
        if done(&answer) {
            return answer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: {query} answered {answer:?}\nlog:\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn pods_are_named_in_a_real_prometheus() {
    let test = "pods_are_named_in_a_real_prometheus";
    if !common::kernel_available(test) || !tool_available(test, PROMETHEUS, &["--version"]) {
        return;
    }
    // Pods A and B, both serving the same port in their own namespaces.
    let pid = std::process::id();
    let pod_a = common::pod::Pod::new(&format!("dm{pid}-a"), 71);
    let pod_b = common::pod::Pod::new(&format!("dm{pid}-b"), 72);
    let port = common::free_port();
    let server_a = pod_a.listen(port);
    let server_b = pod_b.listen(port);
    let agent = common::Agent::start(&[]);
    let ksm = serve_kube_state_metrics(&[
        ("shop", "web-a", &pod_a.ip, "web-a-6d8"),
        ("shop", "web-b", &pod_b.ip, "web-b-7f9"),
    ]);

    // The agent and kube-state-metrics scraped every second, the rules evaluated as often.
    let temp = common::temp_dir("drain-agent-deploy-pods-");
    fs::copy(
        deploy(&format!("prometheus/{KUBERNETES_RULES}")),
        temp.path().join(KUBERNETES_RULES),
    )
    .expect("copy rules");
    fs::write(
        temp.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {KUBERNETES_RULES}\n\
             scrape_configs:\n  - job_name: drain-agent\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n\
             \x20 - job_name: kube-state-metrics\n    honor_labels: true\n    static_configs:\n      - targets: ['{ksm}']\n",
            agent.port
        ),
    )
    .expect("write config");
    let prometheus = Prometheus::start_in(temp);

    // B had a connection (its endpoint shows, at 0); A holds one.
    drop(common::pod::connect(&pod_b.ip, port, 1, &server_b));
    server_b.close_all();
    let _held = common::pod::connect(&pod_a.ip, port, 1, &server_a);
    agent.expect_active(port, 1);

    let per_pod =
        format!("namespace_pod_port:drain_agent_connections_active:sum{{port=\"{port}\"}}");
    let answer = wait_series(
        &prometheus,
        &per_pod,
        "A's connection under A's name",
        |answer| {
            answer
                .iter()
                .any(|(labels, value)| labels["pod"] == "web-a" && *value == 1.0)
                && answer
                    .iter()
                    .any(|(labels, value)| labels["pod"] == "web-b" && *value == 0.0)
        },
    );
    for (labels, value) in &answer {
        assert_eq!(labels["namespace"], "shop", "{answer:?}");
        if labels["pod"] == "web-b" {
            assert_eq!(*value, 0.0, "B's name on A's connection: {answer:?}");
        }
    }
    eprintln!("{per_pod}: {answer:?}");

    // A's drain runs into its timeout (the connection stays): a timeout for A's workload.
    let (status, body) = agent.get_json(&format!(
        "/drained?port={port}&addr={}&timeout=3s",
        pod_a.ip
    ));
    assert_eq!(status, 503, "{body}");
    // And a drain of A in progress now (POSTed: it lives until its timeout).
    let (status, body) = common::http::curl_json(
        "POST",
        &format!(
            "{}/drain?port={port}&addr={}&timeout=120s",
            agent.url, pod_a.ip
        ),
    );
    assert!((200..300).contains(&status), "POST /drain: {status} {body}");
    let in_progress = "namespace_pod_port:drain_agent_drain_in_progress:sum";
    let answer = wait_series(
        &prometheus,
        in_progress,
        "A's drain in progress",
        |answer| answer.len() == 1 && answer[0].0["pod"] == "web-a" && answer[0].1 == 1.0,
    );
    eprintln!("{in_progress}: {answer:?}");
    let timeouts =
        "namespace_workload_result:drain_agent_scope_drains_total:increase5m{result=\"timeout\"}";
    let answer = wait_series(
        &prometheus,
        timeouts,
        "A's timeout for its workload",
        |answer| {
            answer
                .iter()
                .any(|(labels, value)| labels["created_by_name"] == "web-a-6d8" && *value > 0.0)
        },
    );
    assert!(
        answer
            .iter()
            .all(|(labels, _)| labels["created_by_name"] != "web-b-7f9"),
        "{answer:?}"
    );

    // The dashboard's pod panels and variables answer with the pods' names.
    let instance = format!("127.0.0.1:{}", agent.port);
    for (panel, query) in dashboard_queries(&read_dashboard()) {
        if recorded_names(&query).is_empty() {
            continue;
        }
        let query = expand_grafana(&query, &instance, "30s");
        let query = match query.strip_prefix("label_values(") {
            Some(inner) => inner
                .rsplit_once(',')
                .expect("label_values(selector, label)")
                .0
                .to_owned(),
            None => query,
        };
        let answer = wait_series(&prometheus, &query, &format!("panel {panel}"), |answer| {
            !answer.is_empty()
        });
        let text = format!("{answer:?}");
        assert!(
            text.contains("web-a") || text.contains("web-a-6d8"),
            "panel {panel}: {query} names no pod: {text}"
        );
    }

    // kured's alert fires while A's drain runs.
    wait_series(
        &prometheus,
        "ALERTS{alertname=\"DrainAgentDrainsInProgress\", alertstate=\"firing\"}",
        "the alert kured waits on",
        |answer| answer.len() == 1,
    );

    // The Argo Rollouts AnalysisTemplate's query: A's rollout fails, B's passes.
    let Some(docs) =
        common::deploy::yaml_documents(test, &deploy("recipes/argo-rollouts-analysis.yaml"))
    else {
        return;
    };
    let template = docs
        .iter()
        .find(|doc| doc["kind"] == "AnalysisTemplate")
        .expect("an AnalysisTemplate");
    let metric = &template["spec"]["metrics"][0];
    assert_eq!(metric["successCondition"], "result[0] == 0", "{metric}");
    let query = metric["provider"]["prometheus"]["query"]
        .as_str()
        .expect("query");
    for (rollout, fails) in [("web-a", true), ("web-b", false)] {
        let query = query
            .replace("{{args.namespace}}", "shop")
            .replace("{{args.rollout}}", rollout);
        assert!(!query.contains("{{"), "an argument left in {query}");
        let answer = series(&prometheus, &query);
        assert_eq!(answer.len(), 1, "{query}: {answer:?}");
        assert_eq!(
            answer[0].1 > 0.0,
            fails,
            "rollout {rollout}: {query}: {answer:?}"
        );
    }
}

/// The Argo Rollouts AnalysisTemplate's query, its arguments filled in, on made-up series
/// with `promtool test rules` (the recording rules loaded): a rollout whose drains were cut
/// short fails, one whose drains were clean passes, and with nothing measured (no agent
/// scraped, or the rollout's pods not named by kube-state-metrics and the rules) it fails
/// too: no data is not a clean rollout. `sgn` of the answer: 1 and -1 fail
/// `result[0] == 0`, 0 passes.
#[test]
fn argo_analysis_fails_closed_without_measurements() {
    let test = "argo_analysis_fails_closed_without_measurements";
    if !tool_available(test, "promtool", &["--version"]) {
        return;
    }
    let Some(docs) =
        common::deploy::yaml_documents(test, &deploy("recipes/argo-rollouts-analysis.yaml"))
    else {
        return;
    };
    let metric = &docs[0]["spec"]["metrics"][0];
    assert_eq!(metric["successCondition"], "result[0] == 0", "{metric}");
    let query = metric["provider"]["prometheus"]["query"]
        .as_str()
        .expect("query")
        .replace("{{args.namespace}}", "shop")
        .replace("{{args.rollout}}", "web");
    assert!(!query.contains("{{"), "an argument left in {query}");
    let expr = serde_json::to_string(&format!("sgn({query})")).expect("quote");

    let agent = r#"'drain_agent_build_info{job="drain-agent", instance="10.0.0.1:19700", version="0.1.0", attach="tp_btf"}'"#;
    let pod_info = r#"'kube_pod_info{namespace="shop", pod="web-6d8-x1", pod_ip="10.1.0.5", node="n1", created_by_kind="ReplicaSet", created_by_name="web-6d8", host_network="false"}'"#;
    let pod_phase =
        r#"'kube_pod_status_phase{namespace="shop", pod="web-6d8-x1", phase="Running"}'"#;
    // Marks a drain series first scraped at 1, after its drain ended.
    const BORN_AT_ONE: &str = " born at 1";
    let drains = |result: &str| {
        format!(
            r#"'drain_agent_scope_drains_total{{job="drain-agent", instance="10.0.0.1:19700", addr="10.1.0.5", port="8080", result="{result}"}}'"#
        )
    };
    // (what, input series, sgn of the answer at 8m)
    let cases: Vec<(&str, Vec<String>, i32)> = vec![
        ("nothing scraped at all", vec![], -1),
        (
            "the rollout's pods named, no agent scraped",
            vec![pod_info.to_owned(), pod_phase.to_owned()],
            -1,
        ),
        (
            "agents scraped, the rollout's pods not named",
            vec![agent.to_owned()],
            -1,
        ),
        (
            "agents and pods, no drain",
            vec![agent.to_owned(), pod_info.to_owned(), pod_phase.to_owned()],
            0,
        ),
        (
            "a clean drain",
            vec![
                agent.to_owned(),
                pod_info.to_owned(),
                pod_phase.to_owned(),
                drains("drained"),
            ],
            0,
        ),
        (
            "a drain cut short",
            vec![
                agent.to_owned(),
                pod_info.to_owned(),
                pod_phase.to_owned(),
                drains("timeout"),
            ],
            1,
        ),
        // Shorter than a scrape interval: its scope's series is born at 1 (its 0, shown
        // while the drain ran, was never scraped). increase() alone saw nothing of it.
        (
            "a drain cut short that no scrape saw in progress",
            vec![
                agent.to_owned(),
                pod_info.to_owned(),
                pod_phase.to_owned(),
                drains("closed_at_deadline") + BORN_AT_ONE,
            ],
            1,
        ),
    ];
    let mut file =
        format!("rule_files:\n  - {KUBERNETES_RULES}\nevaluation_interval: 1m\ntests:\n");
    for (what, series, sign) in &cases {
        file.push_str(&format!("  # {what}\n  - interval: 1m\n    input_series:"));
        if series.is_empty() {
            file.push_str(" []\n");
        } else {
            file.push('\n');
        }
        for name in series {
            // A drain ended at 5m: inside the 5-minute window of the answer at 8m.
            let (name, values) = if let Some(name) = name.strip_suffix(BORN_AT_ONE) {
                (name, "stale stale stale stale stale 1 1 1 1 1 1")
            } else if name.contains("drains_total") {
                (name.as_str(), "0 0 0 0 0 1 1 1 1 1 1")
            } else {
                (name.as_str(), "1x10")
            };
            file.push_str(&format!(
                "      - series: {name}\n        values: \"{values}\"\n"
            ));
        }
        file.push_str(&format!(
            "    promql_expr_test:\n      - expr: {expr}\n        eval_time: 8m\n        exp_samples:\n          - labels: '{{}}'\n            value: {sign}\n"
        ));
    }
    let temp = common::temp_dir("drain-agent-deploy-argo-");
    fs::copy(
        deploy(&format!("prometheus/{KUBERNETES_RULES}")),
        temp.path().join(KUBERNETES_RULES),
    )
    .expect("copy rules");
    fs::write(temp.path().join("argo.test.yml"), &file).expect("write test");
    let output = run(Command::new("promtool")
        .args(["test", "rules", "argo.test.yml"])
        .current_dir(temp.path()));
    assert!(
        output.status.success(),
        "the AnalysisTemplate's query:\n{}\n{file}",
        text_of(&output)
    );
}

#[test]
fn recipes_parse_and_name_what_the_rules_define() {
    let test = "recipes_parse_and_name_what_the_rules_define";
    let rules = recorded_and_alert_names(&read(&deploy(&format!("prometheus/{KUBERNETES_RULES}"))));
    let mut files: Vec<PathBuf> = fs::read_dir(deploy("recipes"))
        .expect("deploy/recipes")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    for file in &files {
        let Some(docs) = common::deploy::yaml_documents(test, file) else {
            return;
        };
        assert!(!docs.is_empty(), "{}: no document", file.display());
        // Every recorded series or alert a recipe names is one the rules define.
        let text = read(file);
        for name in recorded_names(&text) {
            assert!(
                rules.contains(&name),
                "{}: {name} is defined by no rule",
                file.display()
            );
        }
    }
    // kured blocks on exactly the alert, and only on it.
    let kured =
        common::deploy::yaml_documents(test, &deploy("recipes/kured.yaml")).expect("parsed above");
    let command: Vec<&str> = kured[0]["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_array()
        .expect("kured command")
        .iter()
        .map(|word| word.as_str().expect("word"))
        .collect();
    assert!(
        command.contains(&"--alert-filter-regexp=^DrainAgentDrainsInProgress$"),
        "{command:?}"
    );
    assert!(
        command.contains(&"--alert-filter-match-only=true"),
        "{command:?}"
    );
    assert!(
        command
            .iter()
            .any(|word| word.starts_with("--prometheus-url=")),
        "{command:?}"
    );
    assert!(
        rules
            .iter()
            .any(|name| name == "DrainAgentDrainsInProgress"),
        "{rules:?}"
    );
    let analysis =
        common::deploy::yaml_documents(test, &deploy("recipes/argo-rollouts-analysis.yaml"))
            .expect("parsed above");
    assert_eq!(analysis[0]["apiVersion"], "argoproj.io/v1alpha1");
    assert_eq!(analysis[0]["kind"], "AnalysisTemplate");
    assert_eq!(analysis[0]["spec"]["metrics"][0]["failureLimit"], 0);
}

/// Every panel of the dashboard, rows' nested panels included.
fn dashboard_panels(dashboard: &Value) -> Vec<&Value> {
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    let mut all = Vec::new();
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        all.push(panel);
    }
    all
}

/// The dashboard's tracking-error panels agree with the code and the alert: a panel that
/// says "counts may be off" leaves out `handler_skipped` as `DrainAgentTrackingErrors`
/// does (those skips are repaired: the stat summed them and showed every busy host as
/// off), and the by-reason panel says what every exported reason means (it called
/// `histogram_failed` a failed map read, and left out most reasons).
#[test]
fn dashboard_tracking_errors_agree_with_the_code_and_the_alert() {
    let alerts = read(&deploy("prometheus/drain-agent-rules.yml"));
    let skipped = "reason!=\"handler_skipped\"";
    assert!(
        rule_expressions(&alerts).iter().any(|expr| expr
            .contains("drain_agent_tracking_errors_total")
            && expr.contains(skipped)),
        "DrainAgentTrackingErrors leaves out handler_skipped"
    );
    let dashboard = read_dashboard();
    let panels = dashboard_panels(&dashboard);
    let mut off = 0;
    for panel in &panels {
        let description = panel["description"].as_str().unwrap_or_default();
        if !description.contains("counts may be off") {
            continue;
        }
        off += 1;
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            assert!(
                !expr.contains("drain_agent_tracking_errors_total") || expr.contains(skipped),
                "{:?} says counts may be off but counts handler_skipped: {expr}",
                panel["title"]
            );
        }
    }
    assert!(off > 0, "no panel says when counts may be off");
    let by_reason = panels
        .iter()
        .find(|panel| panel["title"] == "Tracking errors by reason")
        .expect("the dashboard has Tracking errors by reason");
    let description = by_reason["description"].as_str().expect("description");
    let reasons = drain_agent_common::error_index::NAMES
        .into_iter()
        .chain(["handler_skipped"]);
    let missing: Vec<&str> = reasons
        .filter(|reason| !description.contains(reason))
        .collect();
    assert!(
        missing.is_empty(),
        "Tracking errors by reason does not say what {missing:?} mean"
    );
    assert!(
        !description.contains("map reads failed"),
        "histogram_failed is no failed read: {description}"
    );
}

/// The panels that name pods join on `addr`: with `--metrics-labels port` there is none, and
/// the pod row says they are empty then (deploy/README.md says so).
#[test]
fn dashboard_pod_row_says_it_is_empty_by_port() {
    let dashboard = read_dashboard();
    let panels = dashboard_panels(&dashboard);
    let mut joined = 0;
    for panel in &panels {
        let reads_pods = panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|target| target["expr"].as_str())
            .any(|expr| {
                recorded_names(expr)
                    .iter()
                    .any(|name| name.starts_with("namespace_"))
            });
        if !reads_pods {
            continue;
        }
        joined += 1;
        let description = panel["description"].as_str().unwrap_or_default();
        assert!(
            description.contains("--metrics-labels port"),
            "{:?} reads pods joined on addr and does not say it is empty with --metrics-labels port",
            panel["title"]
        );
    }
    assert!(joined >= 3, "only {joined} panels name pods");
    let row = panels
        .iter()
        .find(|panel| {
            panel["type"] == "row"
                && panel["title"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("Pods"))
        })
        .expect("the dashboard has a row of pods");
    assert!(
        row["title"]
            .as_str()
            .is_some_and(|title| title.contains("--metrics-labels port")),
        "the pod row's title: {}",
        row["title"]
    );
}
