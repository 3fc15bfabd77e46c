//! What `cargo xtask dist` ships: the static musl binary (no shared library at all, so it
//! runs on any distribution), its checksum, completions and man pages — and that this
//! binary does the agent's job like the dynamic build: attach, count a connection, drain.
//!
//! Skips loudly when target/dist is missing (fails with `DRAIN_AGENT_REQUIRE_KERNEL=1`;
//! `cargo xtask test` builds it first).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

#[test]
fn dist_binary_is_static_and_checksummed() {
    let test = "dist_binary_is_static_and_checksummed";
    let Some(binary) = common::dist_binary(test) else {
        return;
    };
    let size = std::fs::metadata(&binary).expect("binary").len();
    println!(
        "{}: {size} bytes ({:.1} MiB)",
        binary.display(),
        size as f64 / 1_048_576.0
    );
    // glibc's ldd says "not a dynamic executable" for a static binary, "statically linked"
    // for a static position-independent one (what Rust's musl target builds).
    let ldd = Command::new("ldd").arg(&binary).output().expect("ldd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    println!("ldd: {}", text.trim());
    assert!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "ldd {}: {text}",
        binary.display()
    );
    // Stripped: no symbol table section (readelf comes with gcc's binutils).
    if let Ok(sections) = Command::new("readelf")
        .args(["--section-headers", "--wide"])
        .arg(&binary)
        .output()
    {
        let sections = String::from_utf8_lossy(&sections.stdout);
        assert!(
            !sections.split_whitespace().any(|word| word == ".symtab"),
            "the binary still has a .symtab:\n{sections}"
        );
    }

    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .expect("--version");
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    println!("{version}");
    assert!(
        version.starts_with(&format!(
            "drain-agent {} (commit ",
            env!("CARGO_PKG_VERSION")
        )),
        "{version}"
    );
    assert!(
        !version.contains("commit unknown"),
        "built in git, the binary should name its commit: {version}"
    );

    let dist = common::dist_dir();
    for (dir, sums) in [
        (binary.parent().expect("dir"), "drain-agent.sha256"),
        (dist.as_path(), "SHA256SUMS"),
    ] {
        let check = Command::new("sha256sum")
            .args(["-c", sums])
            .current_dir(dir)
            .output()
            .expect("sha256sum");
        assert!(
            check.status.success(),
            "{sums}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
    for file in [
        "completions/drain-agent.bash",
        "completions/_drain-agent",
        "completions/drain-agent.fish",
        "man/drain-agent.1",
        "man/drain-agent-wait.1",
    ] {
        let text =
            std::fs::read_to_string(dist.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains("drain-agent"), "{file}");
    }
}

/// The kernel smoke test, on the static binary: it attaches, counts a connection made on
/// the host, and answers a blocked /drained when it closes.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn dist_binary_counts_and_drains() {
    let test = "dist_binary_counts_and_drains";
    if !common::kernel_available(test) {
        return;
    }
    let Some(binary) = common::dist_binary(test) else {
        return;
    };
    let agent = common::Agent::start_binary_on_a_free_port(&binary, &[]);
    let (_, health) = agent.get_json("/healthz");
    println!("static binary healthy: {health}");
    let server = common::Server::start("127.0.0.1:0");
    let client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    server.wait_accepted(1);
    agent.expect_active(server.port, 1);

    let url = agent.url.clone();
    let port = server.port;
    let waiter = std::thread::spawn(move || {
        let url = drain_agent::cli::client::AgentUrl::parse(&url).expect("url");
        let started = Instant::now();
        let answer = drain_agent::cli::client::get(
            &url,
            &format!("/drained?port={port}&timeout=10s"),
            Duration::from_secs(15),
        )
        .expect("/drained");
        (answer, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(client);
    server.close_all();
    let (answer, waited) = waiter.join().expect("waiter");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
    assert_eq!(body["drained"], true, "{body}");
    assert!(waited < Duration::from_secs(5), "drained after {waited:?}");
    println!("static binary: drained {waited:?} after the request");
}

/// The release binary's memory at start: its peak (`VmHWM`) once it serves stays within
/// 16 MiB. aya's loader used to parse the whole kernel BTF for a default the agent never
/// used (36 MiB peak for this binary, 6 MiB once started); the agent now reads only the
/// types it needs (kernel/btf.rs).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn dist_binary_starts_within_16_mib() {
    let test = "dist_binary_starts_within_16_mib";
    if !common::kernel_available(test) {
        return;
    }
    let Some(binary) = common::dist_binary(test) else {
        return;
    };
    let agent = common::Agent::start_binary_on_a_free_port(&binary, &[]);
    let (status, _) = agent.get_json("/healthz");
    assert_eq!(status, 200);
    let proc_status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    let kib = |field: &str| -> u64 {
        proc_status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {proc_status}"))
    };
    let (peak, now) = (kib("VmHWM:"), kib("VmRSS:"));
    println!("static binary: peak RSS {peak} KiB at start, {now} KiB now");
    assert!(peak <= 16 * 1024, "peak RSS {peak} KiB at start");
}

/// The example unit's program ships beside the agent: static, checksummed, and it serves
/// what the unit's comments say and stops gracefully on SIGTERM.
#[test]
fn dist_example_app_is_static_serves_and_stops() {
    let test = "dist_example_app_is_static_serves_and_stops";
    let Some(agent) = common::dist_binary(test) else {
        return;
    };
    let dir = agent.parent().expect("dir");
    let app = dir.join("example-app");
    assert!(app.is_file(), "{} is missing", app.display());
    let check = Command::new("sha256sum")
        .args(["-c", "example-app.sha256"])
        .current_dir(dir)
        .output()
        .expect("sha256sum");
    assert!(check.status.success(), "example-app.sha256 does not check");
    let ldd = Command::new("ldd").arg(&app).output().expect("ldd");
    let text =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    assert!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "ldd example-app: {text}"
    );
    let unit = std::fs::read_to_string(common::deploy::deploy("systemd/example-app.service"))
        .expect("unit");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/example-app --listen"),
        "the unit runs the shipped program"
    );

    let port = common::free_port();
    let mut process = common::child::Guard::spawn(
        "example-app",
        Command::new(&app).args(["--listen", &format!("127.0.0.1:{port}")]),
    );
    let addr = common::http::loopback(port);
    common::wait_until("example-app answering", Duration::from_secs(10), || {
        common::http::get(addr, "/health", Duration::from_secs(2)).is_ok()
    });
    let (status, body) = common::http::get(addr, "/health", Duration::from_secs(2)).expect("get");
    assert_eq!((status, body.trim()), (200, "ok v1"));
    // SAFETY: kill(2) on the child this test started.
    unsafe {
        libc::kill(i32::try_from(process.pid()).expect("pid"), libc::SIGTERM);
    }
    let exited = process
        .wait_for(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(exited.success(), "{exited:?}");
}
