//! `drain-agent probe`, the DaemonSet's startup and readiness probe, against two real agents
//! on one `--listen` (an upgrade's overlap: both in the address's `SO_REUSEPORT` group, each
//! new connection hashed to either). The probe of agent B passes only while B itself serves
//! and is healthy, never on A's `200`; an `httpGet /healthz` of that address passes on
//! whichever agent it reaches.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{process::Command, time::Duration};

use common::{Agent, agent_binary, free_port, kernel_available, wait_until};

/// `drain-agent probe --listen 127.0.0.1:PORT --instance NAME`: whether it passed, and what
/// it said.
fn probe(port: u16, instance: &str) -> (bool, String) {
    let output = Command::new(agent_binary())
        .args([
            "probe",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--instance",
            instance,
            "--within",
            "2s",
        ])
        .env_remove("DRAIN_AGENT_LISTEN")
        .env_remove("DRAIN_AGENT_INSTANCE")
        .output()
        .expect("run drain-agent probe");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    match output.status.code() {
        Some(0) => (true, said),
        Some(1) => (false, said),
        other => panic!("probe exit status {other:?}: {said}"),
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_probe_passes_on_its_own_agent_only() {
    if !kernel_available("the_probe_passes_on_its_own_agent_only") {
        return;
    }
    let port = free_port();
    let a = Agent::start_on(port, &["--instance", "agent-a"]);
    // B is not running: A answers every connection with 200 (what the kubelet's httpGet
    // probe of B's pod would take for B's), and B's probe fails.
    let (status, _) = a.try_get("/healthz").expect("A answers");
    assert_eq!(status, 200);
    let (passed, said) = probe(port, "agent-b");
    assert!(!passed, "B's probe passed on A's answers: {said}");
    assert!(said.contains("answer(s) from other agents"), "{said}");
    let (passed, said) = probe(port, "agent-a");
    assert!(passed, "{said}");

    // B serves beside A: B's probe reaches B (fresh connections until one is hashed to it),
    // every time; A's still reaches A.
    let mut b = Agent::start_on(port, &["--instance", "agent-b", "--shutdown-grace", "0s"]);
    wait_until("B serves", Duration::from_secs(30), || {
        b.log_text().contains("serving on http://")
    });
    for round in 0..10 {
        let (passed, said) = probe(port, "agent-b");
        assert!(passed, "round {round}: {said}");
        assert!(said.contains("\"status\":\"ok\""), "{said}");
        let (passed, said) = probe(port, "agent-a");
        assert!(passed, "round {round}: {said}");
    }

    // B hangs (stopped): its listener stays in the group, A still answers 200 to the
    // connections hashed to it, and B's probe fails.
    // SAFETY: signals to a child of this test.
    unsafe { libc::kill(b.pid() as i32, libc::SIGSTOP) };
    let (passed, said) = probe(port, "agent-b");
    // SAFETY: as above.
    unsafe { libc::kill(b.pid() as i32, libc::SIGCONT) };
    assert!(!passed, "a hung B passed: {said}");
    let (passed, said) = probe(port, "agent-b");
    assert!(passed, "B resumed: {said}");

    // B gone: its probe fails while A serves on.
    assert!(b.stop().success());
    let (passed, said) = probe(port, "agent-b");
    assert!(!passed, "B's probe passed after B exited: {said}");
    let (passed, said) = probe(port, "agent-a");
    assert!(passed, "{said}");
    drop(a);
}
