//! The Kubernetes manifests (deploy/kubernetes/) checked with kubernetes-validate and
//! against each other, and the capabilities they (and the systemd unit) grant tried on the
//! real agent.
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
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    child::Guard,
    deploy::{
        STOP_MARGIN, agent_capabilities, deploy, flag_value, kubernetes_validate,
        monitors_reach_agent, read, run_args, tool_available, unit_directives, unit_value,
        workspace, yaml_documents,
    },
};
use drain_agent::{
    cli::client::{AgentUrl, get},
    duration::parse_duration,
};
use serde_json::Value;

/// The complete manifests as written: the kustomize base's resources, the ServiceMonitor (of
/// overlays/servicemonitor) and the example application. Patches and kustomizations are not
/// manifests; drain-agent/tests/kustomize.rs renders and validates every overlay.
fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(deploy("kubernetes/base"))
        .expect("deploy/kubernetes/base")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter(|path| !path.ends_with("kustomization.yaml"))
        .chain([
            deploy("kubernetes/overlays/servicemonitor/servicemonitor.yaml"),
            deploy("kubernetes/example-app.yaml"),
        ])
        .collect();
    files.sort();
    assert!(files.len() >= 5, "manifests: {files:?}");
    files
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
            let passed = kubernetes_validate(&file, version);
            // A file of custom resources only (the ServiceMonitor) validates nothing.
            let custom = read(&file).contains("kind: ServiceMonitor");
            assert!(
                passed > 0 || custom,
                "{}: nothing validated",
                file.display()
            );
        }
    }
}

/// The check of the monitors fails the shapes that scrape nothing: a PodMonitor on the
/// agent's port-less pods (by number or by name: the overlay this project once shipped), a
/// ServiceMonitor by container port or naming a port the Service does not have, and a
/// Service that selects other pods.
#[test]
fn monitors_that_reach_no_agent_are_refused() {
    let test = "monitors_that_reach_no_agent_are_refused";
    let mut base = Vec::new();
    for file in kubernetes_files() {
        let Some(docs) = yaml_documents(test, &file) else {
            return;
        };
        base.extend(docs);
    }
    let daemonset = find_kind(&base, "DaemonSet", "drain-agent");
    let listen = daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "DRAIN_AGENT_LISTEN")
        .and_then(|e| e["value"].as_str())
        .expect("DRAIN_AGENT_LISTEN");
    let port: u16 = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    assert_eq!(monitors_reach_agent(&base, port), Ok(1), "as shipped");

    let without_monitors = || -> Vec<Value> {
        base.iter()
            .filter(|d| d["kind"] != "ServiceMonitor")
            .cloned()
            .collect()
    };
    let pod_monitor = |endpoint: Value| {
        serde_json::json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": "drain-agent", "namespace": "drain-agent"},
            "spec": {
                "jobLabel": "app.kubernetes.io/name",
                "selector": {"matchLabels": {"app.kubernetes.io/name": "drain-agent"}},
                "namespaceSelector": {"matchNames": ["drain-agent"]},
                "podMetricsEndpoints": [endpoint],
            }
        })
    };
    let service_monitor = |endpoint: Value| {
        serde_json::json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": "drain-agent", "namespace": "drain-agent"},
            "spec": {
                "jobLabel": "app.kubernetes.io/name",
                "selector": {"matchLabels": {"app.kubernetes.io/name": "drain-agent"}},
                "namespaceSelector": {"matchNames": ["drain-agent"]},
                "endpoints": [endpoint],
            }
        })
    };
    let refused = [
        (
            "the old PodMonitor",
            pod_monitor(serde_json::json!({"targetPort": port, "path": "/metrics"})),
        ),
        (
            "a PodMonitor by port name",
            pod_monitor(serde_json::json!({"port": "metrics"})),
        ),
        (
            "a ServiceMonitor by container port",
            service_monitor(serde_json::json!({"targetPort": port})),
        ),
        (
            "a ServiceMonitor of a port the Service lacks",
            service_monitor(serde_json::json!({"port": "http"})),
        ),
    ];
    for (what, monitor) in refused {
        let mut documents = without_monitors();
        documents.push(monitor);
        let answer = monitors_reach_agent(&documents, port);
        assert!(answer.is_err(), "{what} passed: {answer:?}");
        eprintln!("{what}: {}", answer.unwrap_err());
    }
    let mut documents = base.clone();
    let service = documents
        .iter_mut()
        .find(|d| d["kind"] == "Service")
        .expect("the Service");
    service["spec"]["selector"] = serde_json::json!({"app.kubernetes.io/name": "something-else"});
    assert!(
        monitors_reach_agent(&documents, port).is_err(),
        "a Service that selects other pods passed"
    );
    let mut documents = base.clone();
    let service = documents
        .iter_mut()
        .find(|d| d["kind"] == "Service")
        .expect("the Service");
    service["spec"]["ports"][0]["targetPort"] = serde_json::json!(port + 1);
    assert!(
        monitors_reach_agent(&documents, port).is_err(),
        "a Service port leading elsewhere passed"
    );
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
    // The agent's settings from its environment: the listen address (which the probe
    // reads too) and the instance, the pod's UID.
    let literal_env: Vec<(String, String)> = agent["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .filter(|(name, _)| name.starts_with("DRAIN_AGENT_"))
        .map(|(name, value)| (name, value.replace("$(HOST_IP)", "192.0.2.1")))
        .collect();
    assert_eq!(env_field_ref(agent, "DRAIN_AGENT_INSTANCE"), "metadata.uid");
    let listen = literal_env
        .iter()
        .find(|(name, _)| name == "DRAIN_AGENT_LISTEN")
        .map(|(_, value)| value.as_str())
        .expect("DRAIN_AGENT_LISTEN");
    let agent_port: u16 = listen
        .strip_prefix("192.0.2.1:")
        .expect("DRAIN_AGENT_LISTEN $(HOST_IP):PORT")
        .parse()
        .expect("port");
    // No container port (a hostNetwork containerPort becomes a hostPort, which keeps the
    // upgrade's surge pod off the node): the liveness probe names the number.
    assert!(agent["ports"].is_null(), "no container port");
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"], agent_port);
    // Readiness and startup: this pod's own agent only, never the upgrade's other agent on
    // the same address (tests/probe.rs); ready only once it serves in the pods there at its
    // start (tests/handover.rs), which startup does not wait for (its failures restart).
    for (probe, command) in [
        ("startupProbe", serde_json::json!(["/drain-agent", "probe"])),
        (
            "readinessProbe",
            serde_json::json!(["/drain-agent", "probe", "--ready"]),
        ),
    ] {
        assert_eq!(agent[probe]["exec"]["command"], command, "{probe}");
    }
    // The hand-over: the new agent starts beside the old one, which stops once it is ready.
    let rolling = &daemonset["spec"]["updateStrategy"];
    assert_eq!(rolling["type"], "RollingUpdate");
    assert_eq!(rolling["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(rolling["rollingUpdate"]["maxUnavailable"], 0);
    // The stop (ARCHITECTURE.md, "Upgrades and restarts"), with the settings the agent is
    // given here as the agent itself parses them.
    let host_args: Vec<String> = args
        .iter()
        .skip(1)
        .map(|a| a.replace("$(HOST_IP)", "192.0.2.1"))
        .collect();
    let host_args: Vec<&str> = host_args.iter().map(String::as_str).collect();
    let environment: Vec<(&str, &str)> = literal_env
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let run = run_args(&host_args, &environment);
    // Every waiter the old agent of an upgrade holds at its SIGTERM gets its real answer:
    // none can ask for longer than --max-timeout, and the kubelet never retries an httpGet
    // preStop hook that got 503 agent_shutdown (the pod would get SIGTERM mid-drain).
    assert!(
        run.shutdown_grace >= run.max_timeout,
        "--shutdown-grace {:?} must cover the longest hook the agent accepts (--max-timeout {:?})",
        run.shutdown_grace,
        run.max_timeout
    );
    let grace = Duration::from_secs(
        daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    let longest = drain_agent::agent::longest_stop(&run);
    assert!(
        grace >= longest + STOP_MARGIN,
        "terminationGracePeriodSeconds {grace:?} must cover the agent's longest stop ({longest:?}: --shutdown-grace, --http-shutdown-timeout, the drains' records and the exit waits) and {STOP_MARGIN:?} more"
    );
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
    // The pinned kernel state (--pin-dir) lives in the host's bpffs, written by the agent.
    let bpffs = mounts.get("/sys/fs/bpf").expect("/sys/fs/bpf mounted");
    assert_ne!(bpffs["readOnly"], true, "/sys/fs/bpf is written (pins)");
    let bpffs_volume = daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == bpffs["name"])
        .expect("the bpffs volume");
    assert_eq!(bpffs_volume["hostPath"]["path"], "/sys/fs/bpf");

    // Discovery: the Service selects the agent's pods and leads to its port, and the
    // ServiceMonitor scrapes that port (by name) with job="drain-agent", as prometheus-operator
    // keeps its targets.
    let labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    let service = find_kind(&documents, "Service", "drain-agent");
    for (key, value) in service["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(&labels[key], value, "Service selector {key}");
    }
    assert_eq!(service["spec"]["ports"][0]["port"], agent_port);
    find_kind(&documents, "ServiceMonitor", "drain-agent");
    assert_eq!(
        monitors_reach_agent(&documents, agent_port),
        Ok(1),
        "the ServiceMonitor scrapes the agents"
    );

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

    // The docs say what the manifests do: every node listener they name is the DaemonSet's
    // port, and the README's headline Kubernetes hook is the example's httpGet, which needs
    // nothing in the app's image.
    for doc in [deploy("README.md"), workspace().join("README.md")] {
        let text = read(&doc);
        // And an IPv6 node's `[$(HOST_IP)]:PORT`.
        for form in ["$(HOST_IP):", "$(HOST_IP)]:"] {
            for (at, _) in text.match_indices(form) {
                let port: String = text[at + form.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                assert_eq!(
                    port,
                    agent_port.to_string(),
                    "{} names the node listener {form}{port}; the DaemonSet listens on {agent_port}",
                    doc.display()
                );
            }
        }
    }
    let readme = read(&workspace().join("README.md"));
    let headline = readme
        .split("```yaml")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .expect("README.md has a Kubernetes hook in a yaml block");
    let hook_at = |form: &str| headline.find(form).unwrap_or(usize::MAX);
    assert!(
        hook_at("httpGet:") < hook_at("exec:"),
        "README.md's headline hook is the httpGet one:\n{headline}"
    );
    assert!(
        headline.contains(&format!("port: {pod_port}"))
            && headline.contains(&format!("path: {path}")),
        "README.md's headline hook is example-app.yaml's (port {pod_port}, path {path}):\n{headline}"
    );
}

/// A `sleep` of user nobody in a network namespace of its own (no name under /run/netns),
/// holding one established inbound connection to 127.0.0.1:`port` there: a container's
/// process, as the agent finds it through /proc/PID/ns/net.
fn spawn_foreign_holder(port: u16) -> Guard {
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
    Guard::spawn("the holder", &mut command)
}

/// Starts the agent under `setpriv` with only `capabilities` (uid 0, no new privileges, as
/// the systemd unit runs it) and returns its /connections once it is healthy.
fn connections_with_capabilities(capabilities: &BTreeSet<String>) -> Value {
    let port = common::free_port();
    // The agent pins its kernel state as the DaemonSet's does (into a directory of this
    // test's own): pinning must work with these capabilities too.
    let pins = common::PinDir::new();
    let bounding: Vec<String> = capabilities
        .iter()
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect();
    let mut command = Command::new("setpriv");
    let state = common::private_state(&mut command);
    let mut child = Guard::spawn(
        "the agent under setpriv",
        command
            .arg(format!("--bounding-set=-all,{}", bounding.join(",")))
            .arg("--no-new-privs")
            .arg(common::agent_binary())
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--pin-dir")
            .arg(&pins.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .keep(state);
    let url = AgentUrl::parse(&format!("http://127.0.0.1:{port}")).expect("url");
    let started = Instant::now();
    loop {
        // Serving, and the seeding walk (beside it) has ended: the connection open before
        // the start is counted by then.
        if get(&url, "/healthz", Duration::from_secs(2)).is_ok_and(|r| {
            r.status == 200
                && serde_json::from_str::<Value>(&r.body).is_ok_and(|body| body["seeding"] != true)
        }) {
            break;
        }
        if let Some(status) = child.try_status() {
            let mut log = String::new();
            if let Some(mut stderr) = child.child_mut().stderr.take() {
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
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
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
        let path = format!("/proc/{}/ns/net", holder.pid());
        let started = Instant::now();
        loop {
            // Until exec, the child still shows the parent's namespace and owner.
            let metadata = fs::metadata(&path).expect("holder's namespace");
            let owner = std::os::unix::fs::MetadataExt::uid(
                &fs::metadata(format!("/proc/{}", holder.pid())).expect("proc"),
            );
            let comm =
                fs::read_to_string(format!("/proc/{}/comm", holder.pid())).unwrap_or_default();
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
