//! The kustomize base and every overlay under deploy/kubernetes/overlays/, rendered with
//! `kubectl kustomize` and validated with `kubernetes-validate --strict`, then checked for
//! what each promises: one port everywhere (and not node_exporter's 9100), Linux nodes
//! only, a startup probe, scrape annotations on the pods only, the SELinux and AppArmor
//! settings, and each overlay's own change.
//!
//! `DRAIN_AGENT_KUBECTL` picks another kubectl (the overlays are written for kustomize
//! v2.0.3, Debian 12's kubectl 1.20, as well as current ones). A tool that is not installed
//! skips its test loudly, or fails it when `DRAIN_AGENT_REQUIRE_KERNEL=1` (CI).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use common::deploy::{
    deploy, kubernetes_validate, monitors_reach_agent, run, text_of, tool_available, yaml_documents,
};
use serde_json::Value;

fn kubernetes_dir() -> PathBuf {
    deploy("kubernetes")
}

fn kubectl() -> String {
    std::env::var("DRAIN_AGENT_KUBECTL").unwrap_or_else(|_| "kubectl".to_owned())
}

/// The base and every overlay directory, by name ("base", "overlays/port", …).
fn kustomizations() -> Vec<(String, PathBuf)> {
    let mut dirs = vec![("base".to_owned(), kubernetes_dir().join("base"))];
    let mut overlays: Vec<(String, PathBuf)> = fs::read_dir(kubernetes_dir().join("overlays"))
        .expect("deploy/kubernetes/overlays")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.join("kustomization.yaml").is_file())
        .map(|path| {
            let name = format!(
                "overlays/{}",
                path.file_name().expect("name").to_string_lossy()
            );
            (name, path)
        })
        .collect();
    overlays.sort();
    assert!(overlays.len() >= 5, "overlays: {overlays:?}");
    dirs.extend(overlays);
    dirs
}

/// `kubectl kustomize dir`, written to a file (for kubernetes-validate) and parsed.
struct Rendered {
    name: String,
    file: tempfile::NamedTempFile,
    documents: Vec<Value>,
}

fn render(name: &str, dir: &Path) -> Rendered {
    let output = run(Command::new(kubectl()).arg("kustomize").arg(dir));
    assert!(
        output.status.success(),
        "kubectl kustomize {name}: {}",
        text_of(&output)
    );
    let file = tempfile::Builder::new()
        .prefix("drain-agent-kustomize-")
        .suffix(".yaml")
        .tempfile()
        .expect("temporary file");
    fs::write(file.path(), &output.stdout).expect("write rendered");
    let documents = yaml_documents(name, file.path()).expect("python3 with PyYAML");
    Rendered {
        name: name.to_owned(),
        file,
        documents,
    }
}

fn find<'a>(rendered: &'a Rendered, kind: &str) -> &'a Value {
    let found: Vec<&Value> = rendered
        .documents
        .iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "{}: one {kind}", rendered.name);
    found[0]
}

fn has(rendered: &Rendered, kind: &str) -> bool {
    rendered.documents.iter().any(|d| d["kind"] == kind)
}

/// The container's environment variables, in order: (name, value or null).
fn env_list(container: &Value) -> Vec<(&str, &Value)> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().expect("env name"), e))
        .collect()
}

/// Everything the DaemonSet says about its port: the listen address (DRAIN_AGENT_LISTEN,
/// which `run` and the `probe` of the startup and readiness probes both read), the
/// liveness probe's port, the scrape annotation (when present) and the Service's port.
fn agent_port(rendered: &Rendered) -> u16 {
    let daemonset = find(rendered, "DaemonSet");
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let name = &rendered.name;
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        !args.contains(&"--listen"),
        "{name}: the address is DRAIN_AGENT_LISTEN's, for the probe too"
    );
    let env = env_list(container);
    let at = |wanted: &str| {
        env.iter()
            .position(|(n, _)| *n == wanted)
            .unwrap_or_else(|| panic!("{name}: env {wanted}"))
    };
    // $(HOST_IP) is expanded only from a variable defined before.
    assert!(
        at("HOST_IP") < at("DRAIN_AGENT_LISTEN"),
        "{name}: env order"
    );
    let listen = env[at("DRAIN_AGENT_LISTEN")].1["value"]
        .as_str()
        .expect("DRAIN_AGENT_LISTEN value");
    let port: u16 = listen
        .strip_prefix("$(HOST_IP):")
        .expect("DRAIN_AGENT_LISTEN $(HOST_IP):PORT")
        .parse()
        .expect("port");
    // No container port: with hostNetwork it would become a hostPort, and the scheduler
    // would keep the upgrade's surge pod (maxSurge) off the node.
    assert!(container["ports"].is_null(), "{name}: no container port");
    assert_eq!(
        container["livenessProbe"]["httpGet"]["port"], port,
        "{name}: livenessProbe"
    );
    // Startup and readiness: only this pod's own agent may pass them (an upgrade's other
    // agent shares the address): `drain-agent probe` with the pod's UID as the instance;
    // readiness also waits for the agent to serve in the pods (`--ready`, tests/handover.rs).
    assert_eq!(
        env[at("DRAIN_AGENT_INSTANCE")].1["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.uid",
        "{name}: the instance is the pod's UID"
    );
    for (probe, command) in [
        ("startupProbe", serde_json::json!(["/drain-agent", "probe"])),
        (
            "readinessProbe",
            serde_json::json!(["/drain-agent", "probe", "--ready"]),
        ),
    ] {
        assert!(container[probe]["httpGet"].is_null(), "{name}: {probe}");
        assert_eq!(
            container[probe]["exec"]["command"], command,
            "{name}: {probe}"
        );
        assert!(
            container[probe]["timeoutSeconds"].as_u64().unwrap_or(1) >= 3,
            "{name}: {probe} outlasts the probe's 2 s"
        );
    }
    let annotations = &daemonset["spec"]["template"]["metadata"]["annotations"];
    if let Some(scraped) = annotations["prometheus.io/port"].as_str() {
        assert_eq!(scraped, port.to_string(), "{name}: scrape annotation");
    }
    let service = find(rendered, "Service");
    assert_eq!(service["spec"]["ports"][0]["port"], port, "{name}: Service");
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"], port,
        "{name}: Service"
    );
    // A prometheus-operator monitor scrapes the agents: what the operator keeps of the
    // targets it discovers, not the port number written in it.
    if let Err(problem) = monitors_reach_agent(&rendered.documents, port) {
        panic!("{name}: {problem}");
    }
    port
}

#[test]
fn every_overlay_renders_and_validates() {
    let test = "every_overlay_renders_and_validates";
    if !tool_available(test, &kubectl(), &["kustomize", "--help"])
        || !tool_available(test, "kubernetes-validate", &["--version"])
        || !tool_available(test, "python3", &["-c", "import yaml"])
    {
        return;
    }
    for (name, dir) in kustomizations() {
        let rendered = render(&name, &dir);
        // The oldest release still common in managed clusters, and the newest the tool knows.
        for version in ["1.29.0", "1.37.0"] {
            let passed = kubernetes_validate(rendered.file.path(), version);
            assert!(passed >= 4, "{name}: {passed} documents validated");
        }
        println!("{name}: renders, validates against 1.29 and 1.37");
    }
}

#[test]
fn every_overlay_keeps_the_agents_promises() {
    let test = "every_overlay_keeps_the_agents_promises";
    if !tool_available(test, &kubectl(), &["kustomize", "--help"])
        || !tool_available(test, "python3", &["-c", "import yaml"])
    {
        return;
    }
    let rendered: Vec<Rendered> = kustomizations()
        .iter()
        .map(|(name, dir)| render(name, dir))
        .collect();
    for output in &rendered {
        let name = &output.name;
        let port = agent_port(output);
        assert_ne!(port, 9100, "{name}: 9100 is node_exporter's port");

        // One namespace, and it exists.
        let namespace = find(output, "Namespace")["metadata"]["name"]
            .as_str()
            .expect("Namespace name")
            .to_owned();
        for document in &output.documents {
            if document["kind"] != "Namespace" {
                assert_eq!(
                    document["metadata"]["namespace"], namespace,
                    "{name}: {} in the agent's namespace",
                    document["kind"]
                );
            }
        }
        if has(output, "ServiceMonitor") {
            assert_eq!(
                find(output, "ServiceMonitor")["spec"]["namespaceSelector"]["matchNames"],
                serde_json::json!([namespace]),
                "{name}: the ServiceMonitor looks in the agent's namespace"
            );
        }

        let pod = &find(output, "DaemonSet")["spec"]["template"];
        let spec = &pod["spec"];
        let container = &spec["containers"][0];
        assert_eq!(
            spec["nodeSelector"]["kubernetes.io/os"], "linux",
            "{name}: Linux nodes only"
        );
        let startup = &container["startupProbe"];
        assert!(startup["exec"]["command"].is_array(), "{name}");
        let budget = startup["periodSeconds"].as_u64().unwrap_or(10)
            * startup["failureThreshold"].as_u64().unwrap_or(3);
        assert!(budget >= 30, "{name}: {budget} s to start");
        assert!(
            container["livenessProbe"]["initialDelaySeconds"].is_null(),
            "{name}: the startup probe replaces the liveness probe's delay"
        );
        assert_eq!(
            container["securityContext"]["seLinuxOptions"]["type"], "spc_t",
            "{name}"
        );
        assert_ne!(container["securityContext"]["privileged"], true, "{name}");
        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(
            annotations["container.apparmor.security.beta.kubernetes.io/drain-agent"], "unconfined",
            "{name}"
        );

        // Scrape annotations in one place: the pods, never the Service.
        let service = find(output, "Service");
        let service_keys: BTreeSet<&str> = service["metadata"]["annotations"]
            .as_object()
            .map(|a| a.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert!(
            !service_keys.iter().any(|k| k.starts_with("prometheus.io/")),
            "{name}: the Service carries scrape annotations too"
        );
        let pod_scraped = annotations["prometheus.io/scrape"] == "true";
        // With the ServiceMonitor, the annotations go (no double scrape).
        let monitors = monitors_reach_agent(&output.documents, agent_port(output))
            .unwrap_or_else(|problem| panic!("{name}: {problem}"));
        assert_ne!(
            pod_scraped,
            monitors > 0,
            "{name}: exactly one way to be scraped"
        );
    }

    let by_name = |name: &str| {
        rendered
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let base = by_name("base");
    let base_port = agent_port(base);
    let base_image =
        find(base, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    assert_eq!(
        base_image,
        format!("localhost/drain-agent:{}", env!("CARGO_PKG_VERSION"))
    );
    // The example application asks the agent inside its own pod: the port the base's
    // --pod-listen serves there (its node listener, `base_port`, is not for hooks).
    let args = find(base, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let pod_listen = args
        .iter()
        .position(|arg| arg == "--pod-listen")
        .and_then(|at| args.get(at + 1))
        .and_then(|value| value.as_str())
        .expect("the base DaemonSet runs with --pod-listen");
    let pod_port = pod_listen.rsplit(':').next().expect("a port");
    assert_ne!(
        pod_port,
        base_port.to_string(),
        "pod and node listeners differ"
    );
    let example = std::fs::read_to_string(kubernetes_dir().join("example-app.yaml")).expect("read");
    assert!(
        example.contains("httpGet:") && example.contains(&format!("port: {pod_port}")),
        "example-app.yaml's preStop does not ask the in-pod listener on port {pod_port}"
    );

    let port = by_name("overlays/port");
    assert_ne!(agent_port(port), base_port, "overlays/port moves the port");

    let namespace = by_name("overlays/namespace");
    assert_ne!(
        find(namespace, "Namespace")["metadata"]["name"],
        find(base, "Namespace")["metadata"]["name"]
    );

    let image = by_name("overlays/image");
    let image_name =
        &find(image, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_ne!(*image_name, base_image, "overlays/image sets the image");

    let selector = by_name("overlays/node-selector");
    let node_selector = &find(selector, "DaemonSet")["spec"]["template"]["spec"]["nodeSelector"];
    assert_eq!(node_selector["kubernetes.io/arch"], "amd64");
    assert_eq!(node_selector["kubernetes.io/os"], "linux");

    // The ServiceMonitor scrapes the Service's port (agent_port checked where it leads).
    let monitor = by_name("overlays/servicemonitor");
    assert_eq!(
        monitors_reach_agent(&monitor.documents, base_port),
        Ok(1),
        "overlays/servicemonitor"
    );
    assert!(
        !has(monitor, "PodMonitor"),
        "a PodMonitor scrapes no port-less pod"
    );
    assert!(!has(base, "ServiceMonitor"), "the base needs no CRD");
}
