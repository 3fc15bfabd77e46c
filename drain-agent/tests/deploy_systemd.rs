//! The systemd units (deploy/systemd/) checked with systemd-analyze and against what the
//! agent needs, and the stop hooks of the examples (the unit's ExecStop= and the
//! Deployment's preStop) run against the real agent.
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
    collections::BTreeSet,
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::deploy::{
    agent_capabilities, deploy, flag_value, read, run, text_of, tool_available, unit_directives,
    unit_value, unit_values,
};
use drain_agent::duration::parse_duration;

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
    let dir = common::temp_dir("drain-agent-deploy-systemd-");
    let units = units_for_verify(dir.path());
    let output = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units));
    let text = text_of(&output);
    // verify exits 0 on an unknown directive or a bad value ("…, ignoring."): any message
    // about our units is a failure.
    let complaints: Vec<&str> = text
        .lines()
        .filter(|line| {
            line.contains(&*dir.path().to_string_lossy())
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
        // net: setns() into pods; mnt: one thread's private mount namespace at start, in
        // which the kernel BTF reads empty for aya's default parse (kernel/btf.rs).
        ("RestrictNamespaces", "net mnt"),
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

    // systemd's own score of the sandbox (0 = locked down, 10 = none): 2.9 now. Fails when any
    // change loosens it. (2.8 until `RestrictNamespaces=` allowed `mnt` for one thread's private
    // mount namespace at start, which takes the agent's peak memory from ~40 to ~13 MiB; the
    // agent already holds CAP_SYS_ADMIN, so it gains no power from it.)
    if !tool_available(test, "systemd-analyze", &["--version"]) {
        return;
    }
    let dir = common::temp_dir("drain-agent-deploy-security-");
    let units = units_for_verify(dir.path());
    let output = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=29", "--no-pager"])
        .arg(&units[0]));
    let text = text_of(&output);
    assert!(output.status.success(), "exposure above 2.9:\n{text}");
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
