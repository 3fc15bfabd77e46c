//! Overload never locks out (issue 23): 600 waiters parked on the node listener from 10
//! sources (60 each, under the per-source limit of 64) at the default limits (512
//! connections and a reserve of 64 beyond them). Before, every new connection was reset:
//! the DaemonSet's liveness probe, other pods' hooks, `drain-agent wait`. Now the
//! liveness probe and a new source's hook are answered at once from the reserve, a pod's
//! hook on its own listener is untouched, and what is beyond the limits gets `429` with
//! `Retry-After`: none is reset or left without an answer.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{Agent, Server, free_port, kernel_available, pod::Pod, wait_until};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PARKED: usize = 600;
const SOURCES: usize = 10;

/// What became of one request.
#[derive(Debug, PartialEq, Eq, Clone, Copy, PartialOrd, Ord)]
enum Fate {
    /// Answered with this status.
    Status(u16),
    /// Closed or reset without a status line.
    NoAnswer,
    /// Still waiting when the test stopped looking (a parked waiter: the wanted fate).
    Waiting,
}

/// Sends `path` from `source` and reads the status line, waiting at most `patience`.
async fn ask(source: SocketAddr, agent: SocketAddr, path: String, patience: Duration) -> Fate {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(source).expect("bind the source");
    let Ok(mut stream) = socket.connect(agent).await else {
        return Fate::NoAnswer;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Fate::NoAnswer;
    }
    let mut head = [0u8; 12];
    match tokio::time::timeout(patience, stream.read_exact(&mut head)).await {
        Err(_) => Fate::Waiting,
        Ok(Err(problem)) => {
            eprintln!("no answer: {problem}");
            Fate::NoAnswer
        }
        Ok(Ok(_)) => std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|code| code.parse().ok())
            .map_or(Fate::NoAnswer, Fate::Status),
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn six_hundred_parked_waiters_lock_out_neither_the_probe_nor_a_hook() {
    if !kernel_available("six_hundred_parked_waiters_lock_out_neither_the_probe_nor_a_hook") {
        return;
    }
    let pid = std::process::id();
    let pod = Pod::new(&format!("ov{pid}-a"), 61);
    let pod_port = free_port();
    let agent = Agent::start(&[
        "--pod-listen",
        &format!("0.0.0.0:{pod_port}"),
        "--pod-netns-prefix",
        &format!("da-ov{pid}-"),
    ]);
    wait_until("the pod's listener", Duration::from_secs(10), || {
        agent.metric("drain_agent_pod_listeners{state=\"listening\"}") == Some(1.0)
    });
    let agent_addr: SocketAddr = format!("127.0.0.1:{}", agent.port).parse().unwrap();
    // A service that never drains, for the parked waiters.
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    let _held = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    server.wait_accepted(1);
    // The pod's own service, with nothing open: its hook drains at once.
    let pod_service = free_port();
    let _pod_server = pod.listen(pod_service);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let parked: Vec<_> = (0..PARKED)
            .map(|index| {
                let source: SocketAddr = format!("127.0.0.{}:0", 2 + index % SOURCES)
                    .parse()
                    .unwrap();
                tokio::spawn(ask(
                    source,
                    agent_addr,
                    format!("/drained?port={port}&timeout=60s"),
                    Duration::from_secs(8),
                ))
            })
            .collect();
        // Let them arrive and park.
        tokio::time::sleep(Duration::from_secs(3)).await;

        let started = Instant::now();
        let probe = ask(
            "127.0.0.1:0".parse().unwrap(),
            agent_addr,
            "/healthz".into(),
            Duration::from_secs(5),
        )
        .await;
        let probe_took = started.elapsed();
        let started = Instant::now();
        let hook = ask(
            "127.0.0.200:0".parse().unwrap(),
            agent_addr,
            format!("/drained?port={pod_service}&addr={}&timeout=5s", pod.ip),
            Duration::from_secs(5),
        )
        .await;
        let hook_took = started.elapsed();
        // The pod's hook on its in-pod listener, from inside the pod.
        let started = Instant::now();
        let in_pod = pod.netns.run_in(move || {
            common::http::get(
                common::http::loopback(pod_port),
                &format!("/drained?port={pod_service}&timeout=5s"),
                Duration::from_secs(5),
            )
            .map(|(status, _)| status)
        });
        let in_pod_took = started.elapsed();

        let mut fates = Vec::new();
        for waiter in parked {
            fates.push(waiter.await.expect("waiter"));
        }
        let mut counted = std::collections::BTreeMap::<Fate, usize>::new();
        for fate in &fates {
            *counted.entry(*fate).or_default() += 1;
        }
        println!(
            "{PARKED} waiters from {SOURCES} sources: {counted:?}; /healthz {probe:?} in {probe_took:?}, \
             a new source's hook {hook:?} in {hook_took:?}, the pod's own hook {in_pod:?} in {in_pod_took:?}"
        );
        assert_eq!(probe, Fate::Status(200), "the liveness probe");
        assert!(probe_took < Duration::from_secs(1), "{probe_took:?}");
        assert_eq!(hook, Fate::Status(200), "a new source's hook (its service is drained)");
        assert!(hook_took < Duration::from_secs(1), "{hook_took:?}");
        assert_eq!(in_pod.expect("the pod's own listener"), 200);
        assert!(in_pod_took < Duration::from_secs(1), "{in_pod_took:?}");
        assert_eq!(
            counted.get(&Fate::NoAnswer),
            None,
            "no waiter may be reset or closed unanswered"
        );
        let refused = counted.get(&Fate::Status(429)).copied().unwrap_or(0);
        let waiting = counted.get(&Fate::Waiting).copied().unwrap_or(0);
        assert_eq!(
            refused + waiting,
            PARKED,
            "each one parked or told 429: {counted:?}"
        );
        assert!(waiting >= 512, "the cap's worth parked: {counted:?}");
    });
}
