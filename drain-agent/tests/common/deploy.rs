//! Helpers of the deployment-file tests (`deploy_*.rs`): the files under deploy/, the linters
//! that check them (a missing one skips its test loudly, or fails it when
//! `DRAIN_AGENT_REQUIRE_KERNEL=1`), systemd units, YAML, metric names.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde_json::Value;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn deploy(relative: &str) -> PathBuf {
    workspace().join("deploy").join(relative)
}

pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub fn required() -> bool {
    std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1")
}

/// Where the tests run `program` from: the project's own virtual environment
/// (`target/pytools/bin/`, into which `cargo xtask setup` installs the PyPI linters
/// kubernetes-validate and hadolint; its python3 has PyYAML) when it is there, else PATH.
pub fn tool(program: &str) -> PathBuf {
    let own = workspace().join("target/pytools/bin").join(program);
    if own.is_file() {
        own
    } else {
        PathBuf::from(program)
    }
}

/// Whether `program args` runs and succeeds (`program` found by [`tool`]). When it does
/// not: with `DRAIN_AGENT_REQUIRE_KERNEL=1` the test fails, otherwise it prints a loud SKIP.
pub fn tool_available(test: &str, program: &str, args: &[&str]) -> bool {
    let works = Command::new(tool(program))
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
    super::report_skip(
        test,
        &format!(
            "`{program}` is not installed; run `cargo xtask setup` \
             (set DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead)"
        ),
    );
    false
}

pub fn run(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

pub fn text_of(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `key = value` lines of a systemd unit, with their section, in order.
pub fn unit_directives(text: &str) -> Vec<(String, String, String)> {
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
pub fn unit_values(
    directives: &[(String, String, String)],
    section: &str,
    key: &str,
) -> Vec<String> {
    directives
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

pub fn unit_value(directives: &[(String, String, String)], section: &str, key: &str) -> String {
    let values = unit_values(directives, section, key);
    assert_eq!(
        values.len(),
        1,
        "[{section}] {key}= should be set once: {values:?}"
    );
    values[0].clone()
}

/// The value after `flag` in a command line.
pub fn flag_value<'a>(words: &[&'a str], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| *w == flag)
        .and_then(|i| words.get(i + 1).copied())
}

/// Every YAML document of `path` as JSON, through Python's PyYAML (which kubernetes-validate
/// brings along). None, after a loud SKIP, when it is not installed.
pub fn yaml_documents(test: &str, path: &Path) -> Option<Vec<Value>> {
    if !tool_available(test, "python3", &["-c", "import yaml"]) {
        return None;
    }
    let output = run(Command::new(tool("python3"))
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

/// `(INSTRUCTION, arguments)` of a Dockerfile, continuation lines joined, comments dropped.
pub fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
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

/// `kubernetes-validate --strict` of `file` against Kubernetes `version`: panics naming what
/// it found wrong, and returns how many documents it validated. prometheus-operator's
/// ServiceMonitor is a custom resource with no schema in the tool: its warning is allowed
/// (the tests check it by hand: [`monitors_reach_agent`]).
pub fn kubernetes_validate(file: &Path, version: &str) -> usize {
    let output = run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", version])
        .arg(file));
    let text = text_of(&output);
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("INFO"))
        .filter(|l| {
            !(l.starts_with("WARN") && l.contains("Couldn't find schema for kind ServiceMonitor"))
        })
        .collect();
    assert!(
        output.status.success() && problems.is_empty(),
        "{} against Kubernetes {version}:\n{text}",
        file.display()
    );
    text.lines()
        .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
        .count()
}

/// Identifiers starting with `prefix` (`drain_agent_`, `process_`) in `text`, whole words only.
pub fn identifiers(text: &str, prefix: &str) -> BTreeSet<String> {
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

/// What the agent needs, as Kubernetes spells capabilities (without `CAP_`): NET_ADMIN for
/// closing at a deadline through netlink on Linux < 6.5 (`tests/close_capabilities.rs`).
pub fn agent_capabilities() -> BTreeSet<String> {
    ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"]
        .iter()
        .map(|c| (*c).to_owned())
        .collect()
}

/// What a supervisor's stop timeout keeps beyond the agent's longest stop
/// (`drain_agent::agent::longest_stop`): the sub-second settles it does not count, and a
/// loaded node's slowness.
pub const STOP_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// `drain-agent run`'s settings for a deployment's command line (after `run`) and the
/// `DRAIN_AGENT_*` variables it sets, parsed by the agent's own parser: the defaults are the
/// agent's, not copies. A variable is turned into the flag that reads it, so this process's
/// environment plays no part; one that no flag reads fails the test.
pub fn run_args(flags: &[&str], environment: &[(&str, &str)]) -> drain_agent::cli::RunArgs {
    use clap::{CommandFactory as _, Parser as _};
    let command = drain_agent::cli::Cli::command();
    let run = command.find_subcommand("run").expect("the run subcommand");
    let mut words: Vec<String> = vec!["drain-agent".into(), "run".into()];
    for (name, value) in environment {
        let flag = run
            .get_arguments()
            .find(|arg| arg.get_env().is_some_and(|env| env == *name))
            .and_then(|arg| arg.get_long())
            .unwrap_or_else(|| panic!("no flag of `run` reads {name}"));
        words.push(format!("--{flag}={value}"));
    }
    words.extend(flags.iter().map(|word| (*word).to_owned()));
    match drain_agent::cli::Cli::try_parse_from(&words) {
        Ok(drain_agent::cli::Cli {
            command: Some(drain_agent::cli::Command::Run(args)),
            ..
        }) => *args,
        Ok(other) => panic!("{words:?} is not `run`: {other:?}"),
        Err(problem) => panic!("{words:?}: {problem}"),
    }
}

/// Labels a `matchLabels` selector asks for, all present in `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|wanted| !wanted.is_empty() && wanted.iter().all(|(k, v)| &labels[k] == v))
}

/// Whether a monitor's `namespaceSelector` looks in `namespace` (none: its own namespace).
fn looks_in(monitor: &Value, namespace: &Value) -> bool {
    let selector = &monitor["spec"]["namespaceSelector"];
    if selector["any"] == true {
        return true;
    }
    match selector["matchNames"].as_array() {
        Some(names) => names.contains(namespace),
        None => &monitor["metadata"]["namespace"] == namespace,
    }
}

/// Every prometheus-operator monitor (PodMonitor, ServiceMonitor) among `documents`, checked
/// the way the operator turns it into scrape targets, against the agent's DaemonSet
/// listening on `agent_port`: how many there are, or what keeps one from scraping the
/// agents.
///
/// The operator keeps only the discovered targets whose port matches the monitor's: a
/// PodMonitor's `port`/`targetPort` must be a `containerPort` of the pods (a
/// `__meta_kubernetes_pod_container_port_*` keep rule), which the agent's pods never
/// declare (with hostNetwork it would become a hostPort); a ServiceMonitor's `port` must
/// name a port of a Service that selects the pods, and that port's `targetPort` must be the
/// agent's (a number: there is no named container port to resolve a name).
pub fn monitors_reach_agent(documents: &[Value], agent_port: u16) -> Result<usize, String> {
    let daemonset = documents
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "drain-agent")
        .ok_or("no DaemonSet drain-agent")?;
    let namespace = &daemonset["metadata"]["namespace"];
    let pod_labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    let container_ports: Vec<&Value> = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .collect();
    let mut monitors = 0;
    for monitor in documents {
        let kind = monitor["kind"].as_str().unwrap_or_default();
        let name = format!("{kind} {}", monitor["metadata"]["name"]);
        let spec = &monitor["spec"];
        match kind {
            "PodMonitor" => {
                if !looks_in(monitor, namespace)
                    || !selects(&spec["selector"]["matchLabels"], pod_labels)
                {
                    return Err(format!("{name} does not select the agent's pods"));
                }
                let endpoints = spec["podMetricsEndpoints"]
                    .as_array()
                    .ok_or(format!("{name}: no endpoints"))?;
                for endpoint in endpoints {
                    let declared = container_ports.iter().any(|p| {
                        (endpoint["port"].is_string() && p["name"] == endpoint["port"])
                            || (endpoint["targetPort"].is_string()
                                && p["name"] == endpoint["targetPort"])
                            || (endpoint["targetPort"].is_u64()
                                && p["containerPort"] == endpoint["targetPort"])
                            || (endpoint["portNumber"].is_u64()
                                && p["containerPort"] == endpoint["portNumber"])
                    });
                    if !declared {
                        return Err(format!(
                            "{name}: endpoint {endpoint} names no containerPort of the agent's pods \
                             (they declare {container_ports:?}): prometheus-operator keeps no target"
                        ));
                    }
                }
            }
            "ServiceMonitor" => {
                if !looks_in(monitor, namespace) {
                    return Err(format!("{name} does not look in namespace {namespace}"));
                }
                let services: Vec<&Value> = documents
                    .iter()
                    .filter(|s| {
                        s["kind"] == "Service"
                            && &s["metadata"]["namespace"] == namespace
                            && selects(&spec["selector"]["matchLabels"], &s["metadata"]["labels"])
                    })
                    .collect();
                if services.is_empty() {
                    return Err(format!(
                        "{name} selects no Service in namespace {namespace}"
                    ));
                }
                let endpoints = spec["endpoints"]
                    .as_array()
                    .ok_or(format!("{name}: no endpoints"))?;
                for service in services {
                    let service_name = &service["metadata"]["name"];
                    if !selects(&service["spec"]["selector"], pod_labels) {
                        return Err(format!(
                            "Service {service_name}'s selector does not match the agent's pods ({pod_labels})"
                        ));
                    }
                    for endpoint in endpoints {
                        if !endpoint["targetPort"].is_null() {
                            return Err(format!(
                                "{name}: targetPort selects by container port, which the agent's pods do not declare: name the Service's port"
                            ));
                        }
                        let port = service["spec"]["ports"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|p| endpoint["port"].is_string() && p["name"] == endpoint["port"])
                            .ok_or(format!(
                                "{name}: port {} is no port of Service {service_name}",
                                endpoint["port"]
                            ))?;
                        if port["targetPort"] != agent_port {
                            return Err(format!(
                                "{name}: Service {service_name}'s port {} goes to {}, the agent listens on {agent_port}",
                                endpoint["port"], port["targetPort"]
                            ));
                        }
                    }
                    // The alert rules select job="drain-agent": the jobLabel's value on the Service.
                    if let Some(job_label) = spec["jobLabel"].as_str() {
                        if service["metadata"]["labels"][job_label] != "drain-agent" {
                            return Err(format!(
                                "{name}: jobLabel {job_label} is not drain-agent on Service {service_name}"
                            ));
                        }
                    } else if service_name != "drain-agent" {
                        return Err(format!(
                            "{name}: job would be {service_name}, not drain-agent"
                        ));
                    }
                }
            }
            _ => continue,
        }
        monitors += 1;
    }
    Ok(monitors)
}
