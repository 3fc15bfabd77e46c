//! Waiters are answered at their timeout, also when there are many of them and the cores
//! are busy: 1,000 `/drained?timeout=5s` waiters on one port that never drains, from 16
//! loopback sources (each under the per-source limit), while two threads of this test
//! spin on both cores. Every answer must come 5 s ± 100 ms after its request was sent.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Agent, Server, kernel_available};

const WAITERS: usize = 1_000;
const SOURCES: usize = 16;
const TIMEOUT: Duration = Duration::from_secs(5);
const SLACK: Duration = Duration::from_millis(100);

/// One waiter: connect from `source`, send the request, read the whole answer. Returns the
/// status and the time from the request's last byte written to the answer's last byte.
fn wait_once(source: SocketAddr, agent: SocketAddr, path: &str) -> (u16, Duration, String) {
    let mut stream = connect_from(source, agent);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("send");
    let sent = Instant::now();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let took = sent.elapsed();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, took, answer)
}

/// A TCP connection from a given loopback source address (std cannot bind before connect).
fn connect_from(source: SocketAddr, target: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd as _;
    let (SocketAddr::V4(source), SocketAddr::V4(target)) = (source, target) else {
        panic!("IPv4 only");
    };
    let sockaddr = |addr: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns; the addresses live
    // on the stack for the duration of each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let from = sockaddr(source);
        let rc = libc::bind(fd, (&raw const from).cast(), len);
        assert_eq!(rc, 0, "bind {source}: {}", std::io::Error::last_os_error());
        let to = sockaddr(target);
        let rc = libc::connect(fd, (&raw const to).cast(), len);
        assert_eq!(
            rc,
            0,
            "connect {target}: {}",
            std::io::Error::last_os_error()
        );
        stream
    }
}

fn percentile(sorted: &[Duration], per_cent: usize) -> Duration {
    sorted[(sorted.len() - 1) * per_cent / 100]
}

#[test]
fn a_thousand_waiters_are_answered_at_their_timeout_on_busy_cores() {
    if !kernel_available("a_thousand_waiters_are_answered_at_their_timeout_on_busy_cores") {
        return;
    }
    let agent = Agent::start(&["--http-max-connections", "1100", "--max-waiters", "1100"]);
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
    let start = Arc::new(Barrier::new(WAITERS));
    let waiters: Vec<_> = (0..WAITERS)
        .map(|index| {
            let source: SocketAddr = format!("127.0.0.{}:0", 2 + index % SOURCES)
                .parse()
                .unwrap();
            let path = path.clone();
            let start = Arc::clone(&start);
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    start.wait();
                    wait_once(source, agent_addr, &path)
                })
                .expect("thread")
        })
        .collect();
    let answers: Vec<_> = waiters
        .into_iter()
        .map(|waiter| waiter.join().expect("waiter"))
        .collect();
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
        .filter(|took| **took < TIMEOUT - SLACK || **took > TIMEOUT + SLACK)
        .collect();
    assert!(
        late.is_empty(),
        "{} of {WAITERS} answers came outside 5 s ± 100 ms, e.g. {:?}",
        late.len(),
        late.last()
    );
}
