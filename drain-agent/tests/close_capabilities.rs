//! A close at a drain's deadline through netlink (`SOCK_DESTROY`, the only close method on
//! kernels before 6.5) with the capabilities drain-agent ships: the agent runs under
//! `setpriv` with exactly the systemd unit's `CapabilityBoundingSet=` (the DaemonSet grants
//! the same, `tests/deploy_kubernetes.rs`), as uid 0 with no new privileges, as the unit
//! runs it, and `--close-method netlink` (what `auto` picks without `bpf_sock_destroy()`).
//!
//! The kernel's `sock_diag_destroy()` wants CAP_NET_ADMIN. With the shipped set, a
//! `POST /drain?…&on_timeout=close` must really reset the connection at the deadline. With
//! that set less CAP_NET_ADMIN, the agent must refuse such a drain (422, naming
//! CAP_NET_ADMIN, nothing started), say so on `/healthz`, and `drain-agent wait
//! --close-at-timeout` must fail at once saying why. Never may a drain be recorded
//! `closed_at_deadline` while its connection stays open (what the shipped files did before
//! they granted CAP_NET_ADMIN: `closed_by_agent: 0` and only a WARN in the log).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, kernel_available, report_skip};

/// The capabilities the systemd unit grants, as `setpriv` spells them (`net_admin`).
fn shipped_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/drain-agent.service"),
    )
    .expect("the systemd unit");
    unit.lines()
        .find_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet=")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// A script that runs the agent under `setpriv` with only `capabilities` in its bounding
/// set (so, as uid 0, in its permitted and effective sets too), in `dir`.
fn wrapper(dir: &Path, capabilities: &[String]) -> PathBuf {
    let path = dir.join("drain-agent");
    let bounding: Vec<String> = capabilities.iter().map(|c| format!("+{c}")).collect();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set=-all,{} --no-new-privs {} \"$@\"\n",
            bounding.join(","),
            common::agent_binary().display()
        ),
    )
    .expect("wrapper");
    let status = Command::new("chmod")
        .arg("755")
        .arg(&path)
        .status()
        .expect("chmod");
    assert!(status.success(), "chmod");
    path
}

/// One connection to a loopback listener: (client, server end, the listener's port).
fn connection() -> (TcpStream, TcpStream, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    for stream in [&client, &server] {
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
    }
    (client, server, port)
}

/// Whether the connection still carries data both ways.
fn carries_data(client: &mut TcpStream, server: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4];
    client.write_all(b"ping").is_ok()
        && server.read_exact(&mut buf).is_ok()
        && server.write_all(b"pong").is_ok()
        && client.read_exact(&mut buf).is_ok()
        && &buf == b"pong"
}

fn post(agent: &Agent, path: &str) -> (u16, serde_json::Value) {
    common::http::curl_json("POST", &format!("{}{path}", agent.url))
}

/// The record of drain `id` once it ended (at most 15 s).
fn ended(agent: &Agent, id: &serde_json::Value) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let (_, drains) = agent.get_json("/drains");
        if let Some(ended) = drains["recent"]
            .as_array()
            .and_then(|recent| recent.iter().find(|drain| drain["id"] == *id))
        {
            return ended.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the drain did not end: {drains}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An agent run by `binary` (with `capabilities`) with `--close-method method` closes a
/// connection at a drain's deadline: its client reads a reset, and the record says so.
fn closes_at_the_deadline(binary: &Path, method: &str, capabilities: &[String]) {
    let agent = Agent::start_binary_on_a_free_port(binary, &["--close-method", method]);
    let (mut client, _server, port) = connection();
    agent.expect_active(port, 1);
    let (status, record) = post(
        &agent,
        &format!("/drain?port={port}&timeout=1s&on_timeout=close"),
    );
    assert_eq!(
        status,
        201,
        "{method} with {capabilities:?}: a close at the deadline must be possible: {record}\n{}",
        agent.log_text()
    );
    let ended = ended(&agent, &record["id"]);
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!(
            "{method} with {capabilities:?}: the drain ended {ended} but the client read {other:?}, not a reset: the connection was not closed\n{}",
            agent.log_text()
        ),
    }
    assert_eq!(ended["result"], "closed_at_deadline", "{ended}");
    assert_eq!(ended["closed_by_agent"], 1, "{ended}");
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn netlink_close_works_with_the_shipped_capabilities_or_is_refused() {
    let test = "netlink_close_works_with_the_shipped_capabilities_or_is_refused";
    if !kernel_available(test) {
        return;
    }
    // Fails under DRAIN_AGENT_REQUIRE_KERNEL=1 (CI), else skips loudly.
    if !common::deploy::tool_available(test, "setpriv", &["--version"]) {
        return;
    }
    let shipped = shipped_capabilities();
    let dir = common::temp_dir("drain-agent-close-caps-");

    // With what the unit grants: the drain closes the connection at its deadline.
    closes_at_the_deadline(&wrapper(dir.path(), &shipped), "netlink", &shipped);

    // Without CAP_NET_ADMIN: refused before anything starts, and said at the start and on
    // /healthz.
    let fewer: Vec<String> = shipped
        .iter()
        .filter(|c| *c != "net_admin")
        .cloned()
        .collect();
    let fewer_dir = common::temp_dir("drain-agent-close-caps-");
    let agent = Agent::start_binary_on_a_free_port(
        &wrapper(fewer_dir.path(), &fewer),
        &["--close-method", "netlink"],
    );
    let (mut client, mut server, port) = connection();
    agent.expect_active(port, 1);
    let (status, refused) = post(
        &agent,
        &format!("/drain?port={port}&timeout=1s&on_timeout=close"),
    );
    assert_eq!(
        status, 422,
        "without CAP_NET_ADMIN a netlink close cannot happen and must be refused: {refused}"
    );
    let why = refused["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("CAP_NET_ADMIN") && why.contains("no drain started"),
        "{refused}"
    );
    let (status, refused) =
        agent.get_json(&format!("/drained?port={port}&timeout=1s&on_timeout=close"));
    assert_eq!(status, 422, "{refused}");
    let (_, drains) = agent.get_json("/drains");
    assert_eq!(
        drains["in_progress"],
        serde_json::json!([]),
        "nothing started: {drains}"
    );
    assert_eq!(
        drains["recent"],
        serde_json::json!([]),
        "nothing recorded: {drains}"
    );
    let (status, health) = agent.get_json("/healthz");
    assert_eq!(status, 200, "{health}");
    assert!(
        health["close_unavailable"]
            .as_str()
            .is_some_and(|problem| problem.contains("CAP_NET_ADMIN")),
        "{health}"
    );
    assert!(
        agent.log_text().contains("CAP_NET_ADMIN"),
        "said at the start: {}",
        agent.log_text()
    );
    let started = Instant::now();
    let wait = Command::new(common::agent_binary())
        .args(["wait", "--port", &port.to_string(), "--timeout", "5s"])
        .args(["--close-at-timeout", "--agent", &agent.url])
        .output()
        .expect("drain-agent wait");
    let stderr = String::from_utf8_lossy(&wait.stderr);
    assert_eq!(wait.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused at once, not after its timeout: {stderr}"
    );
    assert!(
        carries_data(&mut client, &mut server),
        "the connection is untouched"
    );
}

/// `bpf_sock_destroy()` (Linux >= 6.5, what `auto` picks there) needs no CAP_NET_ADMIN: the
/// shipped set without it closes at the deadline all the same.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn bpf_close_needs_no_net_admin() {
    let test = "bpf_close_needs_no_net_admin";
    if !kernel_available(test) {
        return;
    }
    if common::kernel_version().1 < (6, 5) {
        report_skip(test, "no bpf_sock_destroy() before Linux 6.5");
        return;
    }
    // Fails under DRAIN_AGENT_REQUIRE_KERNEL=1 (CI), else skips loudly.
    if !common::deploy::tool_available(test, "setpriv", &["--version"]) {
        return;
    }
    let fewer: Vec<String> = shipped_capabilities()
        .into_iter()
        .filter(|c| c != "net_admin")
        .collect();
    let dir = common::temp_dir("drain-agent-close-caps-");
    closes_at_the_deadline(&wrapper(dir.path(), &fewer), "bpf-sock-destroy", &fewer);
}
