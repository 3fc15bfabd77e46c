//! The deployment files (deploy/) checked with the tools that consume them: systemd-analyze,
//! kubernetes-validate, hadolint, promtool and a real Prometheus scraping the real agent.
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
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use drain_agent::{
    client::{AgentUrl, get},
    duration::parse_duration,
};
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn deploy(relative: &str) -> PathBuf {
    workspace().join("deploy").join(relative)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn required() -> bool {
    std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1")
}

/// Whether `program args` runs and succeeds. When it does not: with
/// `DRAIN_AGENT_REQUIRE_KERNEL=1` the test fails, otherwise it prints a loud SKIP.
fn tool_available(test: &str, program: &str, args: &[&str]) -> bool {
    let works = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|output| output.status.success());
    if works {
        return true;
    }
    assert!(
        !required(),
        "{test}: `{program} {}` does not work here (`cargo xtask setup` installs it) and \
         DRAIN_AGENT_REQUIRE_KERNEL=1",
        args.join(" ")
    );
    eprintln!(
        "SKIP {test}: `{program}` is not installed; run `cargo xtask setup` \
         (set DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead)"
    );
    false
}

fn run(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn text_of(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "drain-agent-deploy-{tag}-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGTERM, then SIGKILL) on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `key = value` lines of a systemd unit, with their section, in order.
fn unit_directives(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut directives = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a directive: {line:?}"));
        directives.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    directives
}

/// Every value of `key` in `section`.
fn unit_values(directives: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    directives
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

fn unit_value(directives: &[(String, String, String)], section: &str, key: &str) -> String {
    let values = unit_values(directives, section, key);
    assert_eq!(
        values.len(),
        1,
        "[{section}] {key}= should be set once: {values:?}"
    );
    values[0].clone()
}

/// systemd's time spans as these units use them: `45s`, `2min`, `1min 30s`, plain seconds.
fn systemd_seconds(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    for part in text.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let number: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("time span {text:?}"));
        total += match &part[digits.len()..] {
            "" | "s" | "sec" => Duration::from_secs(number),
            "min" | "m" => Duration::from_secs(number * 60),
            "ms" | "msec" => Duration::from_millis(number),
            other => panic!("time span {text:?}: unit {other:?}"),
        };
    }
    total
}

/// The value after `flag` in a command line.
fn flag_value<'a>(words: &[&'a str], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| *w == flag)
        .and_then(|i| words.get(i + 1).copied())
}

/// Every YAML document of `path` as JSON, through Python's PyYAML (which kubernetes-validate
/// brings along). None, after a loud SKIP, when it is not installed.
fn yaml_documents(test: &str, path: &Path) -> Option<Vec<Value>> {
    if !tool_available(test, "python3", &["-c", "import yaml"]) {
        return None;
    }
    let output = run(Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
         json.dump(docs, sys.stdout)",
        )
        .arg(path));
    assert!(
        output.status.success(),
        "{}: not YAML: {}",
        path.display(),
        text_of(&output)
    );
    Some(serde_json::from_slice(&output.stdout).expect("python printed JSON"))
}

/// Identifiers starting with `prefix` (`drain_agent_`, `process_`) in `text`, whole words only.
fn identifiers(text: &str, prefix: &str) -> BTreeSet<String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = BTreeSet::new();
    let mut rest = text;
    let mut offset = 0;
    while let Some(at) = rest.find(prefix) {
        let start = offset + at;
        let before = text[..start].chars().next_back();
        let word: String = text[start..].chars().take_while(|c| is_word(*c)).collect();
        if !before.is_some_and(is_word) {
            found.insert(word.clone());
        }
        offset = start + word.len().max(1);
        rest = &text[offset..];
    }
    found
}

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

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

/// The units as installed, copied into `dir` with the binaries they name pointed at ones
/// that exist here (systemd-analyze verify checks that executables exist).
fn units_for_verify(dir: &Path) -> Vec<PathBuf> {
    let agent = common::agent_binary();
    let mut paths = Vec::new();
    for name in ["drain-agent.service", "example-app.service"] {
        let text = read(&deploy("systemd").join(name));
        assert!(
            text.contains("/usr/local/bin/drain-agent "),
            "{name} runs /usr/local/bin/drain-agent"
        );
        let mut text = text.replace(
            "/usr/local/bin/drain-agent ",
            &format!("{} ", agent.display()),
        );
        if name == "example-app.service" {
            assert!(
                text.contains("/usr/local/bin/example-app "),
                "the example app's placeholder binary"
            );
            text = text.replace("/usr/local/bin/example-app ", "/bin/true ");
        }
        let path = dir.join(name);
        fs::write(&path, text).expect("write unit");
        paths.push(path);
    }
    paths
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let test = "systemd_units_pass_systemd_analyze_verify";
    if !tool_available(test, "systemd-analyze", &["--version"]) {
        return;
    }
    let dir = TempDir::new("systemd");
    let units = units_for_verify(&dir.0);
    let output = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units));
    let text = text_of(&output);
    // verify exits 0 on an unknown directive or a bad value ("…, ignoring."): any message
    // about our units is a failure.
    let complaints: Vec<&str> = text
        .lines()
        .filter(|line| {
            line.contains(&*dir.0.to_string_lossy())
                || line.contains("drain-agent.service")
                || line.contains("example-app.service")
        })
        .collect();
    assert!(
        output.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {:?}\n{text}",
        output.status
    );
    if !text.trim().is_empty() {
        eprintln!("systemd-analyze verify (about other units):\n{text}");
    }
}

#[test]
fn systemd_agent_unit_is_least_privilege() {
    let test = "systemd_agent_unit_is_least_privilege";
    let text = read(&deploy("systemd/drain-agent.service"));
    let unit = unit_directives(&text);
    assert_eq!(
        unit_value(&unit, "Service", "ExecStart"),
        "/usr/local/bin/drain-agent run --listen 127.0.0.1:9100"
    );
    assert_eq!(unit_value(&unit, "Service", "Restart"), "on-failure");
    let capabilities: BTreeSet<String> = unit_value(&unit, "Service", "CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        capabilities,
        agent_capabilities()
            .iter()
            .map(|c| format!("CAP_{c}"))
            .collect(),
        "the capabilities the agent needs, and no more"
    );
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        // Seeding reads /proc/*/ns/net of every process and enters those namespaces.
        ("ProtectProc", "default"),
        ("ProcSubset", "all"),
        ("RestrictNamespaces", "net"),
    ] {
        assert_eq!(unit_value(&unit, "Service", key), value, "{key}=");
    }
    for forbidden in [
        "PrivateNetwork",
        "PrivateUsers",
        "DynamicUser",
        "User",
        "SecureBits",
    ] {
        assert!(
            unit_values(&unit, "Service", forbidden).is_empty(),
            "{forbidden}= breaks the agent"
        );
    }
    let syscalls = unit_value(&unit, "Service", "SystemCallFilter");
    for needed in ["bpf", "perf_event_open", "mount"] {
        assert!(
            syscalls.split_whitespace().any(|s| s == needed),
            "SystemCallFilter= lacks {needed}"
        );
    }

    // systemd's own score of the sandbox (0 = locked down, 10 = none): 2.8 now. Fails when any
    // change loosens it.
    if !tool_available(test, "systemd-analyze", &["--version"]) {
        return;
    }
    let dir = TempDir::new("security");
    let units = units_for_verify(&dir.0);
    let output = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=28", "--no-pager"])
        .arg(&units[0]));
    let text = text_of(&output);
    assert!(output.status.success(), "exposure above 2.8:\n{text}");
    assert!(text.contains("Overall exposure level"), "{text}");
}

#[test]
fn systemd_example_app_drains_before_sigterm() {
    let text = read(&deploy("systemd/example-app.service"));
    let unit = unit_directives(&text);
    for key in ["After", "Wants"] {
        let values = unit_values(&unit, "Unit", key).join(" ");
        assert!(
            values
                .split_whitespace()
                .any(|u| u == "drain-agent.service"),
            "{key}= must name drain-agent.service (the agent stops after the app drains)"
        );
    }
    let stops = unit_values(&unit, "Service", "ExecStop");
    let wait_at = stops
        .iter()
        .position(|line| line.contains("drain-agent wait"))
        .expect("an ExecStop= line runs `drain-agent wait`");
    assert!(
        wait_at > 0,
        "the load balancer must be told first: an ExecStop= line before the wait"
    );
    let words: Vec<&str> = stops[wait_at].split_whitespace().collect();
    assert!(
        flag_value(&words, "--port").is_some(),
        "the wait names its port"
    );
    let timeout =
        parse_duration(flag_value(&words, "--timeout").expect("--timeout")).expect("timeout");
    let stop_budget = systemd_seconds(&unit_value(&unit, "Service", "TimeoutStopSec"));
    assert!(
        stop_budget >= timeout + Duration::from_secs(10),
        "TimeoutStopSec= ({stop_budget:?}) must leave the app time to exit after a {timeout:?} drain"
    );
    assert_eq!(unit_value(&unit, "Service", "KillSignal"), "SIGTERM");
}

// ---------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------

/// The complete manifests as written: the kustomize base's resources, the PodMonitor (of
/// overlays/podmonitor) and the example application. Patches and kustomizations are not
/// manifests; drain-agent/tests/kustomize.rs renders and validates every overlay.
fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(deploy("kubernetes/base"))
        .expect("deploy/kubernetes/base")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter(|path| !path.ends_with("kustomization.yaml"))
        .chain([
            deploy("kubernetes/overlays/podmonitor/podmonitor.yaml"),
            deploy("kubernetes/example-app.yaml"),
        ])
        .collect();
    files.sort();
    assert!(files.len() >= 5, "manifests: {files:?}");
    files
}

/// What the agent needs, as Kubernetes spells capabilities (without `CAP_`).
fn agent_capabilities() -> BTreeSet<String> {
    ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]
        .iter()
        .map(|c| (*c).to_owned())
        .collect()
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let test = "kubernetes_manifests_validate_against_the_schemas";
    if !tool_available(test, "kubernetes-validate", &["--version"]) {
        return;
    }
    // The oldest release still common in managed clusters, and the newest the tool knows.
    for version in ["1.29.0", "1.37.0"] {
        for file in kubernetes_files() {
            let output = run(Command::new("kubernetes-validate")
                .args(["--strict", "--kubernetes-version", version])
                .arg(&file));
            let text = text_of(&output);
            let passed = text
                .lines()
                .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
                .count();
            // prometheus-operator's PodMonitor is a custom resource: no schema ships with the
            // tool (kubernetes_manifests_agree_with_each_other checks it by hand).
            let problems: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("INFO"))
                .filter(|l| {
                    !(l.starts_with("WARN")
                        && l.contains("Couldn't find schema for kind PodMonitor"))
                })
                .collect();
            assert!(
                output.status.success() && problems.is_empty(),
                "{} against Kubernetes {version}:\n{text}",
                file.display()
            );
            let custom = text.contains("kind PodMonitor");
            assert!(
                passed > 0 || custom,
                "{}: nothing validated:\n{text}",
                file.display()
            );
        }
    }
}

fn find_kind<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn env_field_ref<'a>(container: &'a Value, name: &str) -> &'a str {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
        .unwrap_or_else(|| panic!("env {name} from a fieldRef"))
}

#[test]
fn kubernetes_manifests_agree_with_each_other() {
    let test = "kubernetes_manifests_agree_with_each_other";
    let mut documents = Vec::new();
    for file in kubernetes_files() {
        let Some(docs) = yaml_documents(test, &file) else {
            return;
        };
        documents.extend(docs);
    }

    // The agent: on every node, in the host's network and PID namespaces, unprivileged but
    // for the capabilities it uses.
    let daemonset = find_kind(&documents, "DaemonSet", "drain-agent");
    let namespace = daemonset["metadata"]["namespace"]
        .as_str()
        .expect("namespace");
    assert_eq!(namespace, "drain-agent");
    find_kind(&documents, "Namespace", namespace);
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(
        pod["hostPID"], true,
        "seeding reads /proc/PID/ns/net of every process"
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .expect("tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let agent = &containers[0];
    let security = &agent["securityContext"];
    assert_ne!(security["privileged"], true, "capabilities, not privileged");
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let added: BTreeSet<String> = security["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("capability").to_owned())
        .collect();
    assert_eq!(
        added,
        agent_capabilities(),
        "the same capabilities as the systemd unit"
    );
    // The API server refuses allowPrivilegeEscalation: false together with CAP_SYS_ADMIN.
    assert_ne!(security["allowPrivilegeEscalation"], false);
    assert_eq!(env_field_ref(agent, "HOST_IP"), "status.hostIP");
    let args: Vec<&str> = agent["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    assert_eq!(args.first(), Some(&"run"));
    let listen = flag_value(&args, "--listen").expect("--listen");
    let agent_port: u16 = listen
        .strip_prefix("$(HOST_IP):")
        .expect("--listen $(HOST_IP):PORT")
        .parse()
        .expect("port");
    let port_entry = &agent["ports"][0];
    assert_eq!(port_entry["containerPort"], agent_port);
    let port_name = port_entry["name"].as_str().expect("port name");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["path"], "/healthz", "{probe}");
        let port = &agent[probe]["httpGet"]["port"];
        assert!(
            *port == port_name || *port == agent_port,
            "{probe} port {port}"
        );
    }
    for resources in ["requests", "limits"] {
        assert!(
            agent["resources"][resources]["memory"].is_string(),
            "resources.{resources}.memory"
        );
    }
    let mounts: BTreeMap<&str, &Value> = agent["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| (m["mountPath"].as_str().expect("mountPath"), m))
        .collect();
    for path in ["/sys/kernel/btf", "/run/netns"] {
        assert_eq!(
            mounts.get(path).map(|m| &m["readOnly"]),
            Some(&Value::Bool(true)),
            "{path} mounted read-only"
        );
    }
    assert_eq!(
        mounts["/run/netns"]["mountPropagation"], "HostToContainer",
        "namespaces named later show up"
    );

    // Discovery: the Service and the PodMonitor select the agent's pods and port.
    let labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    let service = find_kind(&documents, "Service", "drain-agent");
    for (key, value) in service["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(&labels[key], value, "Service selector {key}");
    }
    assert_eq!(service["spec"]["ports"][0]["port"], agent_port);
    let monitor = find_kind(&documents, "PodMonitor", "drain-agent");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&labels[key], value, "PodMonitor selector {key}");
    }
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], port_name);
    // The alert rules select job="drain-agent".
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(labels[job_label], "drain-agent");

    // The example application: preStop is an httpGet to the agent's listener inside the
    // pod (--pod-listen), nothing in the image.
    let pod_listen = flag_value(&args, "--pod-listen").expect("--pod-listen");
    let pod_port: u16 = pod_listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("--pod-listen ADDR:PORT");
    assert_ne!(
        pod_port, agent_port,
        "the node listener is off the pod port"
    );
    let deployment = find_kind(&documents, "Deployment", "example-app");
    let pod = &deployment["spec"]["template"]["spec"];
    let app = &pod["containers"][0];
    let hook = &app["lifecycle"]["preStop"]["httpGet"];
    assert_eq!(
        hook["port"], pod_port,
        "the hook calls the agent inside the pod"
    );
    let path = hook["path"].as_str().expect("an httpGet preStop path");
    let query = path
        .strip_prefix("/drained?")
        .expect("the hook asks /drained");
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert!(
        !params.contains_key("addr") && !params.contains_key("netns"),
        "inside the pod the scope is the pod already: {path}"
    );
    let app_port: u16 = params["port"].parse().expect("port");
    assert!(
        app["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["containerPort"] == app_port),
        "the preStop port {app_port} is the container's"
    );
    let timeout = parse_duration(&params["timeout"]).expect("timeout");
    let grace = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace period"),
    );
    assert!(
        grace >= timeout + Duration::from_secs(10),
        "terminationGracePeriodSeconds ({grace:?}) must cover the {timeout:?} drain and the app's exit"
    );
}

// ---------------------------------------------------------------------------------------
// Container image
// ---------------------------------------------------------------------------------------

/// `(INSTRUCTION, arguments)` of a Dockerfile, continuation lines joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(start) = trimmed.strip_suffix('\\') {
            pending.push_str(start);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (keyword, rest) = pending
            .split_once(char::is_whitespace)
            .unwrap_or((&pending, ""));
        instructions.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
        pending.clear();
    }
    instructions
}

/// `const NAME: &str = "value";` in a Rust source file.
fn rust_const(path: &Path, name: &str) -> String {
    let text = read(path);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("const {name}: &str = ")))
        .unwrap_or_else(|| panic!("{} defines no {name}", path.display()));
    line.split('"').nth(1).expect("string constant").to_owned()
}

#[test]
fn dockerfile_builds_like_xtask_setup() {
    let test = "dockerfile_builds_like_xtask_setup";
    let path = deploy("Dockerfile");
    let instructions = dockerfile_instructions(&read(&path));
    let toolchain = rust_const(&workspace().join("xtask/src/setup.rs"), "EBPF_TOOLCHAIN");
    assert_eq!(
        toolchain,
        rust_const(&workspace().join("drain-agent/build.rs"), "EBPF_TOOLCHAIN"),
        "xtask and build.rs pin the same nightly"
    );
    let linker = rust_const(
        &workspace().join("xtask/src/setup.rs"),
        "BPF_LINKER_VERSION",
    );

    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stages.len(), 2, "a builder and a runtime stage");
    let builder = &instructions[stages[0]..stages[1]];
    let runtime = &instructions[stages[1]..];
    let builder_from = &builder[0].1;
    assert!(
        builder_from.starts_with("rust:") && builder_from.ends_with(" AS builder"),
        "FROM rust:… AS builder, not {builder_from:?}"
    );
    // The binary is static (musl): the runtime needs no C library, nor any base image.
    assert_eq!(runtime[0].1, "scratch", "the runtime stage is FROM scratch");

    let runs: Vec<String> = builder
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, r)| r.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let script = runs.join(" && ");
    let target = rust_const(&workspace().join("xtask/src/setup.rs"), "STATIC_TARGET");
    for expected in [
        format!("rustup toolchain install {toolchain} --profile minimal --component rust-src"),
        format!("cargo install bpf-linker@{linker} --locked"),
        format!("rustup target add {target}"),
        // The binary built as `cargo xtask dist` builds it outside Docker.
        "cargo xtask dist --no-image".to_owned(),
        format!("cp target/dist/{target}/drain-agent /drain-agent"),
    ] {
        assert!(
            script.contains(&expected),
            "the builder should run `{expected}`:\n{script}"
        );
    }

    // The whole workspace is copied in (cargo reads every member's manifest), less what
    // deploy/Dockerfile.dockerignore leaves out: build output and history, nothing the
    // build reads.
    let copies: Vec<&String> = builder
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        copies,
        [". ."],
        "the builder copies the workspace with COPY . ."
    );
    let ignored: Vec<String> = read(&deploy("Dockerfile.dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for needed in ["target", ".git"] {
        assert!(
            ignored.iter().any(|p| p == needed),
            "the build context should leave out {needed}/"
        );
    }
    let manifest = read(&workspace().join("Cargo.toml"));
    let members = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    let read_by_build =
        members
            .split('"')
            .skip(1)
            .step_by(2)
            .chain(["Cargo.toml", "Cargo.lock", ".cargo"]);
    for path in read_by_build {
        assert!(
            workspace().join(path).exists(),
            "{path} is in the workspace"
        );
        for pattern in &ignored {
            let pattern = pattern.trim_start_matches("**/").trim_end_matches('/');
            assert!(
                path != pattern && !path.starts_with(&format!("{pattern}/")) && pattern != "*",
                "Dockerfile.dockerignore pattern {pattern:?} leaves out {path}, which the build reads"
            );
        }
    }

    let copy_binary = runtime
        .iter()
        .find(|(k, a)| k == "COPY" && a.starts_with("--from=builder"))
        .expect("the runtime copies the binary from the builder");
    assert!(copy_binary.1.ends_with(" /drain-agent"), "{copy_binary:?}");
    let entrypoint = runtime
        .iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .expect("ENTRYPOINT");
    let entrypoint: Vec<String> =
        serde_json::from_str(&entrypoint.1).expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(entrypoint, ["/drain-agent"]);
    assert!(
        !runtime.iter().any(|(k, _)| k == "RUN"),
        "the runtime stage holds the binary alone"
    );

    if tool_available(test, "hadolint", &["--version"]) {
        let output = run(Command::new("hadolint")
            .args(["--no-color", "--failure-threshold", "style"])
            .arg(&path));
        assert!(output.status.success(), "hadolint:\n{}", text_of(&output));
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus and Grafana, without the agent
// ---------------------------------------------------------------------------------------

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
        let temp = TempDir::new("promtool");
        fs::copy(
            dir.join("drain-agent-rules.yml"),
            temp.0.join("drain-agent-rules.yml"),
        )
        .expect("copy rules");
        let config = read(&dir.join("prometheus-kubernetes.yml"));
        fs::write(
            temp.0.join("prometheus-kubernetes.yml"),
            without_kubernetes_sd(&config),
        )
        .expect("write");
        let output = run(Command::new("promtool")
            .args(["check", "config", "prometheus-kubernetes.yml"])
            .current_dir(&temp.0));
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
    let temp = TempDir::new("dashboard");
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
    let path = temp.0.join("dashboard-rules.yml");
    fs::write(&path, &rules).expect("write");
    let output = run(Command::new("promtool").args(["check", "rules"]).arg(&path));
    assert!(
        output.status.success(),
        "dashboard queries that are not PromQL:\n{}\n{rules}",
        text_of(&output)
    );
}

// ---------------------------------------------------------------------------------------
// Against the real agent (root)
// ---------------------------------------------------------------------------------------

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

fn prometheus_get(port: u16, path: &str) -> Value {
    let url = AgentUrl::parse(&format!("http://127.0.0.1:{port}")).expect("url");
    let response =
        get(&url, path, Duration::from_secs(20)).unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
    serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("GET {path}: {e}: {}", response.body))
}

fn prometheus_query(port: u16, query: &str) -> Value {
    let encoded: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
    let answer = prometheus_get(port, &format!("/api/v1/query?query={encoded}"));
    assert_eq!(answer["status"], "success", "{query}: {answer}");
    answer["data"]["result"].clone()
}

/// A `sleep` of user nobody in a network namespace of its own (no name under /run/netns),
/// holding one established inbound connection to 127.0.0.1:`port` there: a container's
/// process, as the agent finds it through /proc/PID/ns/net.
fn spawn_foreign_holder(port: u16) -> Running {
    use std::os::unix::process::CommandExt as _;
    let mut command = Command::new("sleep");
    command.arg("120").stdin(Stdio::null());
    // SAFETY: between fork and exec the closure makes raw system calls only, on memory it
    // owns; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return fail();
            }
            let control = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            let mut request: libc::ifreq = std::mem::zeroed();
            for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
                *slot = *byte as libc::c_char;
            }
            request.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if control < 0 || libc::ioctl(control, libc::SIOCSIFFLAGS, &request) != 0 {
                return fail();
            }
            let address = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                },
                sin_zero: [0; 8],
            };
            let pointer = (&raw const address).cast::<libc::sockaddr>();
            let length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let listener = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let client = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if listener < 0
                || client < 0
                || libc::bind(listener, pointer, length) != 0
                || libc::listen(listener, 4) != 0
                || libc::connect(client, pointer, length) != 0
                || libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut()) < 0
            {
                return fail();
            }
            // The sockets stay open across exec (no close-on-exec); then drop root.
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return fail();
            }
            Ok(())
        });
    }
    Running(command.spawn().expect("start the holder"))
}

/// Starts the agent under `setpriv` with only `capabilities` (uid 0, no new privileges, as
/// the systemd unit runs it) and returns its /connections once it is healthy.
fn connections_with_capabilities(capabilities: &BTreeSet<String>) -> Value {
    let port = common::free_port();
    let bounding: Vec<String> = capabilities
        .iter()
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect();
    let mut child = Running(
        Command::new("setpriv")
            .arg(format!("--bounding-set=-all,{}", bounding.join(",")))
            .arg("--no-new-privs")
            .arg(common::agent_binary())
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent under setpriv"),
    );
    let url = AgentUrl::parse(&format!("http://127.0.0.1:{port}")).expect("url");
    let started = Instant::now();
    loop {
        if get(&url, "/healthz", Duration::from_secs(2)).is_ok_and(|r| r.status == 200) {
            break;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            let mut log = String::new();
            if let Some(mut stderr) = child.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
            }
            panic!("the agent with only {capabilities:?} exited ({status}):\n{log}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "agent with {capabilities:?} never healthy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let response = get(&url, "/connections", Duration::from_secs(10)).expect("/connections");
    serde_json::from_str(&response.body).expect("JSON")
}

/// The capabilities the unit and the DaemonSet grant are enough for everything the agent
/// does, seeding included: it counts a connection that was open before it started, in a
/// namespace that only another user's process holds. And CAP_SYS_PTRACE is there for a
/// reason: without it, that namespace is missed.
#[test]
fn agent_works_with_only_the_granted_capabilities() {
    let test = "agent_works_with_only_the_granted_capabilities";
    if !common::kernel_available(test) || !tool_available(test, "setpriv", &["--version"]) {
        return;
    }
    let unit = unit_directives(&read(&deploy("systemd/drain-agent.service")));
    let granted: BTreeSet<String> = unit_value(&unit, "Service", "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    let port = 18_089;
    let holder = spawn_foreign_holder(port);
    let netns = {
        let path = format!("/proc/{}/ns/net", holder.0.id());
        let started = Instant::now();
        loop {
            // Until exec, the child still shows the parent's namespace and owner.
            let metadata = fs::metadata(&path).expect("holder's namespace");
            let owner = std::os::unix::fs::MetadataExt::uid(
                &fs::metadata(format!("/proc/{}", holder.0.id())).expect("proc"),
            );
            let comm =
                fs::read_to_string(format!("/proc/{}/comm", holder.0.id())).unwrap_or_default();
            if owner == 65534 && comm.trim() == "sleep" {
                break std::os::unix::fs::MetadataExt::ino(&metadata);
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "holder did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let seeded = |connections: &Value| {
        connections["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .any(|e| e["port"] == port && e["netns"] == netns && e["active"] == 1)
    };

    let connections = connections_with_capabilities(&granted);
    assert!(
        seeded(&connections),
        "with {granted:?} the agent did not count the connection in namespace {netns}: {connections}"
    );
    let mut fewer = granted.clone();
    assert!(fewer.remove("SYS_PTRACE"), "CAP_SYS_PTRACE is granted");
    let connections = connections_with_capabilities(&fewer);
    assert!(
        !seeded(&connections),
        "without CAP_SYS_PTRACE the agent still found namespace {netns}: drop the capability \
         from deploy/ (systemd unit, DaemonSet, README)"
    );
    drop(holder);
}

/// The stop hooks as written in the example unit and the example Deployment (only the port
/// changed), run against the real agent: they block while a connection is open and exit 0
/// once it has closed and no connection has arrived for the quiet window since they began.
#[test]
fn example_stop_hooks_wait_for_the_drain() {
    let test = "example_stop_hooks_wait_for_the_drain";
    if !common::kernel_available(test) {
        return;
    }
    let agent = common::Agent::start(&[]);
    let server = common::Server::start("127.0.0.1:0");
    let client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    server.wait_accepted(1);
    agent.expect_active(server.port, 1);
    let port = server.port.to_string();
    let binary = common::agent_binary();

    let unit = unit_directives(&read(&deploy("systemd/example-app.service")));
    let stop = unit_values(&unit, "Service", "ExecStop")
        .into_iter()
        .find(|l| l.contains("drain-agent wait"))
        .expect("ExecStop wait");
    let mut words: Vec<String> = stop
        .trim_start_matches(['-', '@', '+', '!', ':'])
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(words[0], "/usr/local/bin/drain-agent");
    let port_at = words.iter().position(|w| w == "--port").expect("--port") + 1;
    words[port_at] = port.clone();
    let quiet = parse_duration(
        flag_value(
            &words.iter().map(String::as_str).collect::<Vec<_>>(),
            "--quiet",
        )
        .expect("--quiet"),
    )
    .expect("quiet");
    let hooks_started = Instant::now();
    let systemd_hook = Command::new(&binary)
        .args(&words[1..])
        .env("DRAIN_AGENT_URL", &agent.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the ExecStop= wait");

    // The httpGet preStop, found in the text (no YAML parser needed), sent as the kubelet
    // sends it. Here to the node listener: the same handler; what the listener inside the
    // pod adds (the pod's scope) is tested in tests/pod_listen.rs.
    let text = read(&deploy("kubernetes/example-app.yaml"));
    let hook_path = text
        .lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix("path: /drained?"))
        .map(|query| {
            format!(
                "/drained?{}",
                query.replace("port=8080", &format!("port={port}"))
            )
        })
        .expect("preStop: httpGet: path: /drained?…");
    let agent_port = agent.port;
    let kubernetes_hook = std::thread::spawn(move || {
        common::http::get(
            common::http::loopback(agent_port),
            &hook_path,
            Duration::from_secs(60),
        )
        .expect("the httpGet hook is answered")
    });

    let mut systemd_hook = systemd_hook;
    std::thread::sleep(Duration::from_millis(1500));
    let early = systemd_hook.try_wait().expect("try_wait");
    assert!(
        early.is_none(),
        "systemd ExecStop returned ({early:?}) while a connection was open"
    );
    assert!(
        !kubernetes_hook.is_finished(),
        "the Kubernetes preStop returned while a connection was open"
    );
    drop(client);
    server.close_all();
    let closed = Instant::now();
    let output = systemd_hook
        .wait_with_output()
        .unwrap_or_else(|e| panic!("systemd ExecStop: {e}"));
    assert!(
        output.status.success(),
        "systemd ExecStop did not exit 0: {:?}\n{}",
        output.status,
        text_of(&output)
    );
    let (status, body) = kubernetes_hook.join().expect("preStop thread");
    assert_eq!(status, 200, "the Kubernetes preStop: {body}");
    // 100 ms of slack for the kernel's and the test's clocks.
    assert!(
        hooks_started.elapsed() + Duration::from_millis(100) >= quiet,
        "the hooks returned {:?} after they began, before the {quiet:?} quiet window",
        hooks_started.elapsed()
    );
    println!(
        "both hooks answered {:?} after the close, {:?} after they began",
        closed.elapsed(),
        hooks_started.elapsed()
    );
}

#[test]
fn dashboard_and_alert_queries_work_in_a_real_prometheus() {
    let test = "dashboard_and_alert_queries_work_in_a_real_prometheus";
    if !common::kernel_available(test) || !tool_available(test, "prometheus", &["--version"]) {
        return;
    }
    let agent = common::Agent::start(&[]);
    let instance = format!("127.0.0.1:{}", agent.port);

    // The example configuration, pointed at this agent and scraping every second.
    let temp = TempDir::new("prometheus");
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
    fs::write(temp.0.join("prometheus.yml"), config).expect("write config");
    fs::copy(
        deploy("prometheus/drain-agent-rules.yml"),
        temp.0.join("drain-agent-rules.yml"),
    )
    .expect("copy rules");
    let port = common::free_port();
    let log = fs::File::create(temp.0.join("prometheus.log")).expect("log");
    let _prometheus = Running(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                temp.0.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                temp.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let prometheus_log = || fs::read_to_string(temp.0.join("prometheus.log")).unwrap_or_default();
    let up_query = format!("up{{job=\"drain-agent\", instance=\"{instance}\"}} == 1");
    let started = Instant::now();
    loop {
        let ready = AgentUrl::parse(&format!("http://127.0.0.1:{port}"))
            .and_then(|url| get(&url, "/-/ready", Duration::from_secs(2)))
            .is_ok_and(|r| r.status == 200);
        if ready
            && !prometheus_query(port, &up_query)
                .as_array()
                .expect("result")
                .is_empty()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "Prometheus never scraped the agent:\n{}",
            prometheus_log()
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
        let result = prometheus_query(port, &query);
        assert!(
            !result.as_array().expect("result").is_empty(),
            "dashboard panel {panel:?}: no data for {query}\n(is a label or metric name wrong?)"
        );
    }

    // Every alert rule loaded and evaluated without error; none fires for a healthy agent.
    let started = Instant::now();
    loop {
        let rules = prometheus_get(port, "/api/v1/rules");
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
