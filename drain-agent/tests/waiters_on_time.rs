//! Waiters are answered at their timeout, also when there are many of them and the cores
//! are busy: 1,000 `/drained?timeout=5s` waiters on one port that never drains, from 16
//! loopback sources (each under the per-source limit), while two threads of this test
//! spin on both cores, against the shipped (release) binary. It prints when the answers
//! came, as the clients saw them and as the agent counted its own wait. No answer may come
//! early (before 5 s − 100 ms: the timeout is the caller's), and none late by more than
//! 500 ms (a generous bound for a timed test on a shared 2-core machine; the target of
//! 100 ms is what the printed distribution is read against: before the shared list and the
//! batched identification, the median answer was 1.1–5 s late).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Agent, Server, kernel_available};

const WAITERS: usize = 1_000;
const SOURCES: usize = 16;
const TIMEOUT: Duration = Duration::from_secs(5);
/// An answer before `TIMEOUT - EARLY` would cut the caller's timeout short.
const EARLY: Duration = Duration::from_millis(100);
/// Generous: the target is 100 ms (see the printed distribution).
const LATE: Duration = Duration::from_millis(500);

/// One waiter: connect from `source`, send the request, read the whole answer. Returns the
/// status, the time from the request's last byte written to the answer's end, and the
/// answer. Run as a task of one thread that only waits on sockets, so an answer's arrival is
/// seen when it arrives (a thousand blocked threads waking on busy cores would measure their
/// own scheduling).
async fn wait_once(source: SocketAddr, agent: SocketAddr, path: String) -> (u16, Duration, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(source).expect("bind the source");
    let mut stream = socket.connect(agent).await.expect("connect to the agent");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
    let sent = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    let took = sent.elapsed();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, took, answer)
}

fn percentile(sorted: &[Duration], per_cent: usize) -> Duration {
    sorted[(sorted.len() - 1) * per_cent / 100]
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_thousand_waiters_are_answered_at_their_timeout_on_busy_cores() {
    if !kernel_available("a_thousand_waiters_are_answered_at_their_timeout_on_busy_cores") {
        return;
    }
    // The shipped (release) binary: what users run, and what the time is asked of (the
    // debug build spends most of the answers' time in its own checks).
    let test = "a_thousand_waiters_are_answered_at_their_timeout_on_busy_cores";
    let Some(binary) = common::dist_binary(test) else {
        return;
    };
    let agent = Agent::start_binary_on_a_free_port(
        &binary,
        &["--http-max-connections", "1100", "--max-waiters", "1100"],
    );
    let agent_addr: SocketAddr = format!("127.0.0.1:{}", agent.port).parse().unwrap();
    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    // The service never drains: one connection stays open throughout.
    let _held = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    server.wait_accepted(1);
    agent.expect_active(port, 1);

    // Both cores busy for the whole wait.
    let spinning = Arc::new(AtomicBool::new(true));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let spinning = Arc::clone(&spinning);
            std::thread::spawn(move || {
                let mut x = 0_u64;
                while spinning.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005) + 1);
                }
            })
        })
        .collect();

    let path = format!("/drained?port={port}&timeout=5s");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let answers: Vec<_> = runtime.block_on(async {
        let waiters: Vec<_> = (0..WAITERS)
            .map(|index| {
                let source: SocketAddr = format!("127.0.0.{}:0", 2 + index % SOURCES)
                    .parse()
                    .unwrap();
                tokio::spawn(wait_once(source, agent_addr, path.clone()))
            })
            .collect();
        let mut answers = Vec::new();
        for waiter in waiters {
            answers.push(waiter.await.expect("waiter"));
        }
        answers
    });
    spinning.store(false, Ordering::Relaxed);
    for spinner in spinners {
        spinner.join().expect("spinner");
    }

    let mut times: Vec<Duration> = answers.iter().map(|(_, took, _)| *took).collect();
    times.sort();
    println!(
        "{WAITERS} waiters, timeout 5 s, 2 busy cores: answered after min {:?}, p1 {:?}, p50 {:?}, p99 {:?}, max {:?}",
        times[0],
        percentile(&times, 1),
        percentile(&times, 50),
        percentile(&times, 99),
        times[times.len() - 1]
    );
    let mut waited: Vec<u64> = answers
        .iter()
        .filter_map(|(_, _, answer)| {
            let body = answer.split("\r\n\r\n").nth(1)?;
            serde_json::from_str::<serde_json::Value>(body).ok()?["waited_ms"].as_u64()
        })
        .collect();
    waited.sort_unstable();
    if !waited.is_empty() {
        println!(
            "the agent's own waited_ms: min {}, p50 {}, max {}",
            waited[0],
            waited[waited.len() / 2],
            waited[waited.len() - 1]
        );
    }
    let mut slowest: Vec<(Duration, u64)> = answers
        .iter()
        .map(|(_, took, answer)| {
            let waited = answer
                .split("\r\n\r\n")
                .nth(1)
                .and_then(|body| serde_json::from_str::<serde_json::Value>(body).ok())
                .and_then(|body| body["waited_ms"].as_u64())
                .unwrap_or(0);
            (*took, waited)
        })
        .collect();
    slowest.sort();
    println!(
        "slowest five (seen by the client, waited by the agent): {:?}",
        &slowest[slowest.len().saturating_sub(5)..]
    );
    let wrong: Vec<_> = answers
        .iter()
        .filter(|(status, _, answer)| *status != 503 || !answer.contains("\"drained\":false"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {WAITERS} answers were not a not-drained 503, e.g. {:?}",
        wrong.len(),
        wrong.first()
    );
    let late: Vec<_> = times
        .iter()
        .filter(|took| **took < TIMEOUT - EARLY || **took > TIMEOUT + LATE)
        .collect();
    assert!(
        late.is_empty(),
        "{} of {WAITERS} answers came outside 4.9–5.5 s, e.g. {:?}",
        late.len(),
        late.last()
    );
}
