//! The server's tests: limits, eviction, overload answers, timeouts, shutdown.

use std::{
    io,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use axum::routing::get;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
    sync::{Notify, oneshot},
    task::JoinHandle,
};

use super::{slots::CONNECT_GRACE, *};
use tokio::time::Instant;

/// A test app: `/healthz` answers at once, `/drained` blocks until released (and
/// counts the requests that reached it, and those dropped unanswered), `/big` answers
/// 256 KiB.
struct TestServer {
    addr: SocketAddr,
    /// Where the server counts the `/drained` requests its limits turn away.
    metrics: Arc<Metrics>,
    entered: Arc<AtomicUsize>,
    /// `/drained` handlers dropped before they were released (their client went away).
    dropped: Arc<AtomicUsize>,
    release: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

/// The agent's metrics over a fake tracker: the server counts what its limits turn away.
fn metrics() -> Arc<Metrics> {
    let source = Arc::new(crate::tracker::fake::FakeSource::default());
    let tracker = Arc::new(crate::tracker::Tracker::new(source, 8));
    Arc::new(
        Metrics::new(
            tracker,
            None,
            crate::metrics::ConnectionLabels::Port,
            "test",
            false,
        )
        .expect("metrics"),
    )
}

/// `drain_agent_drain_requests_total{result="rejected"}` in `metrics`.
fn rejected(metrics: &Metrics) -> String {
    let text = metrics.render().expect("render");
    text.lines()
        .find(|line| line.starts_with("drain_agent_drain_requests_total{result=\"rejected\"}"))
        .expect("the rejected series is exported")
        .to_owned()
}

fn limits() -> ServerLimits {
    ServerLimits {
        header_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(60),
        ..ServerLimits::default()
    }
}

async fn start(limits: ServerLimits) -> TestServer {
    start_with(limits, Ok).await
}

/// [`start`], the node listener's identification of callers in front of the limits (as
/// the agent serves it): a connection from 127.0.0.1 is root's, any other uid 1000's.
async fn start_identifying(limits: ServerLimits) -> TestServer {
    use crate::http::{
        authority::{Authority, PortOwners},
        identify::{ClientSockets, Identify, identify},
    };
    use crate::sys::pod_addresses::{AddressSource, PodAddresses};

    struct Sockets;
    impl ClientSockets for Sockets {
        fn owner_of(&self, client: SocketAddr, _: SocketAddr) -> Result<Option<u32>> {
            Ok(Some(if client.ip().to_string() == "127.0.0.1" {
                0
            } else {
                1000
            }))
        }
    }
    struct NoPods;
    impl AddressSource for NoPods {
        fn read(
            &self,
        ) -> Result<std::collections::BTreeMap<u32, crate::sys::pod_addresses::Namespace>> {
            Ok(std::collections::BTreeMap::new())
        }
    }
    struct NoOwners;
    impl PortOwners for NoOwners {
        fn owners(&self, _: u16) -> Result<Vec<u32>> {
            Ok(Vec::new())
        }
    }
    let who = Identify {
        authority: Arc::new(Authority {
            pods: Arc::new(PodAddresses::new(1, Arc::new(NoPods))),
            owners: Arc::new(NoOwners),
        }),
        sockets: Arc::new(Sockets),
        tokens: None,
    };
    start_with(limits, move |limited: Router| {
        Ok(limited.layer(from_fn_with_state(who, identify)))
    })
    .await
}

async fn start_with(
    limits: ServerLimits,
    front: impl FnOnce(Router) -> Result<Router> + Send + 'static,
) -> TestServer {
    /// Counts its handler dropped while armed.
    struct Dropped(Option<Arc<AtomicUsize>>);
    impl Dropped {
        fn disarm(mut self) {
            self.0 = None;
        }
    }
    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(dropped) = self.0.take() {
                dropped.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let entered = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let app = {
        let entered = Arc::clone(&entered);
        let dropped = Arc::clone(&dropped);
        let release = Arc::clone(&release);
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/big", get(|| async { "x".repeat(256 << 10) }))
            .route(
                "/drained",
                get(move || {
                    let release = Arc::clone(&release);
                    let guard = Dropped(Some(Arc::clone(&dropped)));
                    entered.fetch_add(1, Ordering::SeqCst);
                    async move {
                        release.notified().await;
                        guard.disarm();
                        "released"
                    }
                }),
            )
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let metrics = metrics();
    let task = tokio::spawn(serve_handing_over(
        listener,
        app,
        front,
        limits,
        Arc::clone(&metrics),
        async move {
            let _ = stopped.await;
        },
        std::future::ready(()),
    ));
    TestServer {
        addr,
        metrics,
        entered,
        dropped,
        release,
        stop: Some(stop),
        task,
    }
}

impl TestServer {
    /// Waits until `count` requests reached `/drained`.
    async fn wait_entered(&self, count: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while self.entered.load(Ordering::SeqCst) < count {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("requests reached the handler");
    }

    /// Begins shutdown; returns how long `serve` took to return.
    async fn stop(mut self) -> Duration {
        let started = Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returned")
            .expect("task")
            .expect("serve");
        started.elapsed()
    }
}

async fn send(stream: &mut TcpStream, path: &str) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("send");
}

/// Reads until EOF (or a reset); the text read.
async fn read_all(stream: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .expect("the server closed the connection");
    String::from_utf8_lossy(&raw).into_owned()
}

/// A connection to `addr` from the loopback address `source`.
async fn connect_from(addr: SocketAddr, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind source");
    socket.connect(addr).await.expect("connect")
}

/// Sends `GET path` with `Connection: close`.
async fn send_closing(stream: &mut TcpStream, path: &str) {
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
}

/// `GET path` with `Connection: close` from `source`; the status line and body.
async fn request_from(addr: SocketAddr, source: &str, path: &str) -> String {
    let mut stream = connect_from(addr, source).await;
    send_closing(&mut stream, path).await;
    read_all(&mut stream).await
}

/// Asserts a `200 OK` answer.
fn assert_ok(answer: &str) {
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// `count` connections from 127.0.0.1, each with a `/drained` request in the handler.
async fn waiters(server: &TestServer, count: usize) -> Vec<TcpStream> {
    let mut waiters = Vec::new();
    for _ in 0..count {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        send(&mut stream, "/drained").await;
        waiters.push(stream);
    }
    server.wait_entered(count).await;
    waiters
}

/// Waits until nothing is accepted on `addr` any more.
async fn wait_listener_closed(addr: SocketAddr) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the listener closed");
}

async fn request(addr: SocketAddr, path: &str) -> String {
    request_from(addr, "127.0.0.1", path).await
}

/// Whether the server closed `stream` (EOF or reset) within a short time.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_new_client_replaces_the_oldest_idle_connection() {
    let server = start(ServerLimits {
        max_connections: 4,
        ..limits()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // Silent past the connect grace: idle.
    tokio::time::sleep(CONNECT_GRACE + Duration::from_millis(100)).await;
    let answer = request(server.addr, "/healthz").await;
    assert_ok(&answer);
    assert!(answer.ends_with("ok"), "{answer}");
    // 4 idle + 1 client through a cap of 4: the oldest idle one was closed.
    for (i, stream) in idle.iter_mut().enumerate() {
        assert_eq!(closed_by_server(stream).await, i < 1, "connection {i}");
    }
    server.stop().await;
}

/// Connections whose requests are on their way are not idle: a burst at the cap does
/// not evict its own members (600 hooks at once lost 87 that way, `tests/overload.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_just_accepted_is_not_evicted_before_its_request() {
    let server = start(ServerLimits {
        max_connections: 2,
        ..limits()
    })
    .await;
    let mut early = Vec::new();
    for _ in 0..2 {
        early.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // A third client, at the cap: served from the reserve, nobody evicted.
    assert_ok(&request(server.addr, "/healthz").await);
    for stream in &mut early {
        send_closing(stream, "/healthz").await;
        let answer = read_all(stream).await;
        assert_ok(&answer);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_requests_in_progress_are_not_evicted() {
    let server = start(ServerLimits {
        max_connections: 2,
        ..limits()
    })
    .await;
    let mut waiters = waiters(&server, 2).await;
    // Full of busy connections: the liveness probe is still answered (beyond the cap),
    // a third waiter of the same source gets 429 with Retry-After (issue 23: it got an
    // empty reply), and another source's first waiter is taken in.
    assert_ok(&request(server.addr, "/healthz").await);
    let answer = request(server.addr, "/drained").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    let mut other = connect_from(server.addr, "127.0.0.2").await;
    send(&mut other, "/drained").await;
    server.wait_entered(3).await;
    server.release.notify_waiters();
    waiters.push(other);
    for stream in &mut waiters {
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.expect("answer");
        assert_eq!(&head, b"HTTP/1.1 200");
    }
    server.stop().await;
}

/// Audit: the `/drained` requests the server's own limits turn away were answered `429` and
/// counted nowhere, so `drain_agent_drain_requests_total{result="rejected"}` (and the
/// alert on it) missed them. Over `--max-waiters-per-source`: counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_over_the_per_source_limit_is_counted_as_rejected() {
    let server = start(ServerLimits {
        max_waiters_per_source: 1,
        ..limits()
    })
    .await;
    let waiters = waiters(&server, 1).await;
    assert!(rejected(&server.metrics).ends_with(" 0"));
    let answer = request(server.addr, "/drained").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(rejected(&server.metrics).ends_with(" 1"));
    // Audit (overload): it said nothing of when to ask again, unlike the 429 beyond the cap.
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    server.release.notify_waiters();
    drop(waiters);
    server.stop().await;
}

/// Beyond the cap, a `/drained` of a source with one in progress is turned away and counted
/// `rejected`; another route turned away there is no `/drained` answer and is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_turned_away_beyond_the_cap_is_counted_as_rejected() {
    let server = start(ServerLimits {
        max_connections: 2,
        ..limits()
    })
    .await;
    let waiters = waiters(&server, 2).await;
    let answer = request(server.addr, "/big").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(rejected(&server.metrics).ends_with(" 0"));
    let answer = request(server.addr, "/drained").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(rejected(&server.metrics).ends_with(" 1"));
    server.release.notify_waiters();
    drop(waiters);
    server.stop().await;
}

/// With the cap and the reserve full of waiters, new connections wait in the backlog and
/// are answered once a place frees: none is closed unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_reserve_connections_wait_and_are_never_reset() {
    let server = start(ServerLimits {
        max_connections: 2,
        ..limits()
    })
    .await;
    // 2 under the cap and 4 in the reserve, each from its own source.
    let mut waiters = Vec::new();
    for index in 0..(2 + overflow_reserve(2)) {
        let mut stream = connect_from(server.addr, &format!("127.0.1.{}", index + 1)).await;
        send(&mut stream, "/drained").await;
        waiters.push(stream);
        server.wait_entered(index + 1).await;
    }
    let late = tokio::spawn({
        let addr = server.addr;
        async move { request(addr, "/healthz").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !late.is_finished(),
        "it waits (in the backlog, or accepted)"
    );
    server.release.notify_waiters();
    let answer = late.await.expect("join");
    assert_ok(&answer);
    server.stop().await;
}

/// Fills the cap (2) and the reserve with `/drained` waiters, each from its own source.
async fn fill_cap_and_reserve(server: &TestServer) -> Vec<TcpStream> {
    let mut waiters = Vec::new();
    for index in 0..(2 + overflow_reserve(2)) {
        let mut stream = connect_from(server.addr, &format!("127.0.1.{}", index + 1)).await;
        send(&mut stream, "/drained").await;
        waiters.push(stream);
        server.wait_entered(index + 1).await;
    }
    waiters
}

/// A stop while the cap and the reserve are full ends the serving: the completed stop
/// future is not polled again by the accept (that panicked "`async fn` resumed after
/// completion" and, on the node listener, exited the agent), and the waiters get their
/// answers as in any stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_the_cap_and_the_reserve_full_ends_the_serving() {
    let server = start(ServerLimits {
        max_connections: 2,
        ..limits()
    })
    .await;
    let mut waiters = fill_cap_and_reserve(&server).await;
    // The loop is waiting for a place (nothing idle, nothing freed).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let release = Arc::clone(&server.release);
    let addr = server.addr;
    let stopping = tokio::spawn(server.stop());
    wait_listener_closed(addr).await;
    release.notify_waiters();
    for stream in &mut waiters {
        let answer = read_all(stream).await;
        assert_ok(&answer);
        assert!(answer.ends_with("released"), "{answer}");
    }
    let took = stopping.await.expect("serve did not panic");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// A connection accepted while the cap and the reserve looked to have room (an idle one),
/// then left waiting for a place (the idle one turned busy), is answered at a stop — as a
/// connection beyond the cap — not closed unanswered (reset, its request unread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waiting_for_a_place_at_the_stop_is_answered() {
    let server = start(ServerLimits {
        max_connections: 2,
        ..limits()
    })
    .await;
    // 5 waiters and one kept-alive connection, idle after its answer.
    let mut waiters = Vec::new();
    for index in 0..(1 + overflow_reserve(2)) {
        let mut stream = connect_from(server.addr, &format!("127.0.1.{}", index + 1)).await;
        send(&mut stream, "/drained").await;
        waiters.push(stream);
        server.wait_entered(index + 1).await;
    }
    let mut kept = connect_from(server.addr, "127.0.2.1").await;
    send(&mut kept, "/healthz").await;
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).await.expect("answer");
    assert_eq!(&head, b"HTTP/1.1 200");
    // Past the connect grace, the answer read: idle, so the loop accepts again.
    tokio::time::sleep(CONNECT_GRACE + Duration::from_millis(200)).await;
    let mut rest = vec![0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(100), kept.read(&mut rest)).await;
    // It turns busy: a late connection is accepted and finds no place.
    send(&mut kept, "/drained").await;
    server.wait_entered(2 + overflow_reserve(2)).await;
    let mut late = connect_from(server.addr, "127.0.3.1").await;
    send_closing(&mut late, "/healthz").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let release = Arc::clone(&server.release);
    let addr = server.addr;
    let stopping = tokio::spawn(server.stop());
    wait_listener_closed(addr).await;
    let answer = read_all(&mut late).await;
    assert_ok(&answer);
    assert!(answer.ends_with("ok"), "{answer:?}");
    release.notify_waiters();
    waiters.push(kept);
    for stream in &mut waiters {
        let answer = read_all(stream).await;
        assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    }
    let took = stopping.await.expect("stop");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// Audit (shared limits): the per-source limit and the reserve's "first of its source"
/// went by address, and a local user may bind every address of 127.0.0.0/8. Uid 1000
/// filled the cap from a few addresses and then the reserve from one more address each
/// ("first of its source"); root's stop hook (`drain-agent wait` from 127.0.0.1) then
/// waited in the listen backlog, answered by nobody, until its deadline. A local user is
/// now one source whatever its addresses, and root's `/drained` is let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_loopback_addresses_of_one_user_do_not_lock_root_out() {
    // More waiters per source than the cap: a connection that comes while one of the
    // reserve's is closing after its answer (idle) takes its place beyond the cap
    // (`a_connection_taking_an_idle_ones_place_in_the_reserve_stays_beyond_the_cap`), so the
    // reserve's rule, not the per-source limit, keeps uid 1000 out of the reserve.
    let server = start_identifying(ServerLimits {
        max_connections: 2,
        max_waiters_per_source: 64,
        ..limits()
    })
    .await;
    // Uid 1000: 2 waiters under the cap, then one from each of 4 more addresses.
    let mut users = Vec::new();
    for index in 0..2 {
        let mut stream = connect_from(server.addr, &format!("127.0.1.{}", index + 1)).await;
        send(&mut stream, "/drained").await;
        users.push(stream);
        server.wait_entered(index + 1).await;
    }
    // Each answered before root comes (a late one would find uid 1000's waiters released),
    // and kept open: a waiter held by a client that went away would be dropped.
    let mut beyond = Vec::new();
    for index in 0..overflow_reserve(2) {
        let mut stream = connect_from(server.addr, &format!("127.0.2.{}", index + 1)).await;
        send_closing(&mut stream, "/drained").await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut answer)).await;
        beyond.push((String::from_utf8_lossy(&answer).into_owned(), stream));
    }
    let mut root = connect_from(server.addr, "127.0.0.1").await;
    send_closing(&mut root, "/drained").await;
    server.wait_entered(3).await;
    // The handler's wait is registered once it is polled, right after it is entered.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.release.notify_waiters();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), root.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        matches!(read, Ok(Ok(_))) && answer.starts_with("HTTP/1.1 200"),
        "root's /drained was not answered ({read:?}): uid 1000's addresses locked it out"
    );
    // Uid 1000's connections beyond the cap were answered 429, not let in as "first".
    for (answer, _) in beyond {
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
    }
    drop(users);
    server.stop().await;
}

/// Audit (reserve): with every connection under the cap busy, a source's second `/drained`
/// is turned away beyond the cap. A connection that took the place of an idle one counted
/// as one under the cap, whichever place the idle one held: a pod whose first waiter was in
/// the reserve kept a connection idle there (a kept-alive `/healthz`), opened another, which
/// evicted it and came in as under the cap, and its second `/drained` entered the wait.
/// Repeated, one pod filled the reserve, and every other caller's first `/drained` waited
/// in the listen backlog. The newcomer now takes the idle one's place: beyond the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_taking_an_idle_ones_place_in_the_reserve_stays_beyond_the_cap() {
    let server = start(ServerLimits {
        max_connections: 2,
        max_waiters_per_source: 64,
        ..limits()
    })
    .await;
    let mut parked = Vec::new();
    for index in 0..2 {
        let mut stream = connect_from(server.addr, &format!("127.0.1.{}", index + 1)).await;
        send(&mut stream, "/drained").await;
        parked.push(stream);
        server.wait_entered(index + 1).await;
    }
    // The cap is busy: the first waiter of 127.0.3.1 is let in, in the reserve.
    let mut first = connect_from(server.addr, "127.0.3.1").await;
    send(&mut first, "/drained").await;
    server.wait_entered(3).await;
    parked.push(first);
    // A kept-alive connection in the reserve, answered and left idle.
    let mut idle = connect_from(server.addr, "127.0.3.1").await;
    send(&mut idle, "/healthz").await;
    let mut answer = Vec::new();
    while !String::from_utf8_lossy(&answer).ends_with("ok") {
        let mut chunk = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut chunk))
            .await
            .expect("the /healthz answer")
            .expect("read");
        assert!(read > 0, "closed before its answer");
        answer.extend_from_slice(&chunk[..read]);
    }
    assert_ok(&String::from_utf8_lossy(&answer));
    tokio::time::sleep(CONNECT_GRACE + Duration::from_millis(100)).await;
    // Another connection of the same source takes its place: still beyond the cap.
    let mut second = connect_from(server.addr, "127.0.3.1").await;
    send_closing(&mut second, "/drained").await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), second.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        matches!(read, Ok(Ok(_))) && answer.starts_with("HTTP/1.1 429"),
        "a second /drained of 127.0.3.1 was let in ({read:?}, {answer:?}): it took the idle \
         connection's place in the reserve as one under the cap"
    );
    assert_eq!(server.entered.load(Ordering::SeqCst), 3);
    assert!(
        closed_by_server(&mut idle).await,
        "the idle one made the room"
    );
    server.release.notify_waiters();
    drop(parked);
    server.stop().await;
}

/// A place under the cap freed while the reserve holds connections goes to the next one:
/// it is served as under the cap (a source's second `/drained` is let in), not turned away
/// as beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_freed_under_the_cap_is_taken_under_the_cap() {
    let server = start(ServerLimits {
        max_connections: 2,
        max_waiters_per_source: 64,
        ..limits()
    })
    .await;
    let mut kept = connect_from(server.addr, "127.0.1.1").await;
    send(&mut kept, "/drained").await;
    server.wait_entered(1).await;
    let mut gone = connect_from(server.addr, "127.0.1.2").await;
    send(&mut gone, "/drained").await;
    server.wait_entered(2).await;
    let mut first = connect_from(server.addr, "127.0.3.1").await;
    send(&mut first, "/drained").await;
    server.wait_entered(3).await;
    // 127.0.1.2 goes away (a reset: a FIN alone is a half-close, still answered): its
    // waiter is dropped and its place under the cap freed.
    gone.set_zero_linger().expect("SO_LINGER 0");
    drop(gone);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = connect_from(server.addr, "127.0.3.1").await;
    send(&mut second, "/drained").await;
    server.wait_entered(4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.release.notify_waiters();
    for stream in [&mut kept, &mut first, &mut second] {
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.expect("answer");
        assert_eq!(&head, b"HTTP/1.1 200");
    }
    server.stop().await;
}

/// Under the cap, a local user's `/drained` requests count together whatever addresses
/// they come from, and the 429 names the user; root's count apart, by address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_requests_of_a_local_user_are_limited_across_its_addresses() {
    let server = start_identifying(ServerLimits {
        max_waiters_per_source: 2,
        ..limits()
    })
    .await;
    let mut parked = Vec::new();
    for index in 0..2 {
        let mut stream = connect_from(server.addr, &format!("127.0.1.{}", index + 1)).await;
        send(&mut stream, "/drained").await;
        parked.push(stream);
        server.wait_entered(index + 1).await;
    }
    let refused = request_from(server.addr, "127.0.1.3", "/drained").await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("uid 1000"), "{refused}");
    assert!(refused.contains("--max-waiters-per-source"), "{refused}");
    for index in 0..2 {
        let mut stream = connect_from(server.addr, "127.0.0.1").await;
        send(&mut stream, "/drained").await;
        parked.push(stream);
        server.wait_entered(3 + index).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.release.notify_waiters();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_clients_are_closed_after_the_header_timeout() {
    let server = start(ServerLimits {
        header_timeout: Duration::from_millis(300),
        ..limits()
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let mut trickling = TcpStream::connect(server.addr).await.expect("connect");
    trickling.write_all(b"GET /healthz HT").await.expect("send");
    read_all(&mut silent).await;
    read_all(&mut trickling).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // A client that sends its request in time is answered.
    assert_ok(&request(server.addr, "/healthz").await);
    server.stop().await;
}

/// The longest request head the agent's clients send, with margin: a `/drained` with every
/// parameter at its longest, form-encoded as HTTP clients do (64 of the longest CIDRs in
/// `ignore`, a 255-byte namespace name), and the headers of a scraper with a 2 KiB token.
fn longest_legal_head() -> String {
    let cidr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128";
    let ignore = vec![cidr; crate::drain_rule::MAX_IGNORE].join(",");
    let netns = format!("/var/run/netns/{}", "n".repeat(255));
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("port", "65535")
        .append_pair("addr", "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")
        .append_pair("netns", &netns)
        .append_pair("timeout", "1h59m59s999ms")
        .append_pair("quiet", "1h59m59s999ms")
        .append_pair("ignore", &ignore)
        .append_pair("idle", "1h59m59s999ms")
        .append_pair("on_timeout", "close")
        .append_pair("pace", "4294967295")
        .append_pair("peers", "true")
        .finish();
    // The query is one the API takes: each parameter once, the list at its longest.
    let values = crate::http::api::parse_query(Some(&query), &crate::http::api::DRAIN_PARAMETERS)
        .expect("a legal query");
    let cidrs = crate::drain_rule::parse_cidrs(&values["ignore"]).expect("legal CIDRs");
    assert_eq!(cidrs.len(), crate::drain_rule::MAX_IGNORE);
    format!(
        "GET /healthz?{query} HTTP/1.1\r\n\
         Host: [ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535\r\n\
         User-Agent: kube-lifecycle/1.33 Prometheus/3.4.0 HAProxy drain-agent/0.1.0\r\n\
         Accept: application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
         application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;\
         escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2\r\n\
         Accept-Encoding: gzip\r\n\
         Authorization: Bearer {}\r\n\
         X-Prometheus-Scrape-Timeout-Seconds: 10\r\n\
         X-Forwarded-For: 2001:db8::1, 2001:db8::2\r\n\
         traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
         Connection: close\r\n\r\n",
        "t".repeat(2048)
    )
}

/// The longest legal request is served, well within the bound on a request head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_legal_request_is_served() {
    let head = longest_legal_head();
    println!("the longest legal request head: {} bytes", head.len());
    assert!(head.len() <= MAX_REQUEST_HEAD / 2, "{} bytes", head.len());
    let server = start(limits()).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("send");
    let answer = read_all(&mut stream).await;
    assert_ok(&answer);
    assert!(answer.ends_with("ok"), "{answer:?}");
    server.stop().await;
}

/// A request head past the bound is refused `431` and the connection closed, whether it
/// is unfinished (the read buffer is full: an unauthenticated client cannot make the agent
/// hold hyper's default ~400 KiB per connection) or has too many header lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_past_the_bound_is_refused_431() {
    let server = start(limits()).await;
    // Exactly the bound, unfinished: all of it is read (nothing left unread that would turn
    // the close into a reset), and no more is waited for.
    let start_of_head = "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: ";
    let unfinished = format!(
        "{start_of_head}{}",
        "a".repeat(MAX_REQUEST_HEAD - start_of_head.len())
    );
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(unfinished.as_bytes()).await.expect("send");
    let answer = read_all(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    // Too many header lines, each short.
    let many: String = (0..=MAX_HEADERS)
        .map(|index| format!("X-H{index}: 1\r\n"))
        .collect();
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: test\r\n{many}\r\n").as_bytes())
        .await
        .expect("send");
    let answer = read_all(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    // Others are still served.
    assert_ok(&request(server.addr, "/healthz").await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_requests_are_limited_per_source_address() {
    let server = start(ServerLimits {
        max_waiters_per_source: 2,
        ..limits()
    })
    .await;
    let mut waiters = waiters(&server, 2).await;
    let refused = request(server.addr, "/drained?port=1").await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    let body = refused.split("\r\n\r\n").nth(1).unwrap_or_default();
    let body: serde_json::Value = serde_json::from_str(body).expect("json body");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains("--max-waiters-per-source"), "{message}");
    assert!(message.contains("127.0.0.1"), "{message}");
    // Other endpoints and other sources are not limited.
    assert!(
        request(server.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let other = tokio::spawn(request_from(server.addr, "127.0.0.2", "/drained"));
    server.wait_entered(3).await;
    // A finished request frees its place.
    server.release.notify_waiters();
    assert!(other.await.expect("other").starts_with("HTTP/1.1 200"));
    let mut head = [0u8; 12];
    waiters[0].read_exact(&mut head).await.expect("answer");
    let again = tokio::spawn(request(server.addr, "/drained"));
    server.wait_entered(4).await;
    server.release.notify_waiters();
    assert!(again.await.expect("again").starts_with("HTTP/1.1 200"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_answers_in_progress_finish() {
    let server = start(limits()).await;
    let mut waiter = TcpStream::connect(server.addr).await.expect("connect");
    send(&mut waiter, "/drained").await;
    server.wait_entered(1).await;
    let idle = TcpStream::connect(server.addr).await.expect("connect");
    let release = Arc::clone(&server.release);
    let addr = server.addr;
    let stopping = tokio::spawn(server.stop());
    // The listener closes; the waiter's answer, given now, still arrives.
    wait_listener_closed(addr).await;
    release.notify_waiters();
    let answer = read_all(&mut waiter).await;
    assert_ok(&answer);
    assert!(answer.ends_with("released"), "{answer}");
    let took = stopping.await.expect("stop");
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(idle);
}

/// A client accepted just before the stop whose request arrives just after it is
/// answered, not closed unread (hyper's graceful shutdown closes a connection it has
/// read nothing from: an upgrade's probe got `Broken pipe` that way, 1 in 43,567).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_arriving_right_after_the_stop_is_answered() {
    let server = start(limits()).await;
    let mut late = TcpStream::connect(server.addr).await.expect("connect");
    // Accepted, nothing sent yet.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_closing(&mut late, "/healthz").await;
    let answer = read_all(&mut late).await;
    assert_ok(&answer);
    assert!(answer.ends_with("ok"), "{answer:?}");
    let took = stopping.await.expect("stop");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// A hand-over: the listener closes at once, an answer in progress is still written
/// long after `shutdown_timeout` while the grace lasts, and the bound applies from the
/// grace's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_keeps_answers_in_progress_for_the_grace() {
    let release = Arc::new(Notify::new());
    let app = {
        let release = Arc::clone(&release);
        Router::new()
            .route(
                "/drained",
                get(move || {
                    let release = Arc::clone(&release);
                    async move {
                        release.notified().await;
                        "released"
                    }
                }),
            )
            .route("/forever", get(std::future::pending::<&'static str>))
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let (end_grace, grace_ended) = oneshot::channel::<()>();
    let limits = ServerLimits {
        shutdown_timeout: Duration::from_millis(200),
        ..limits()
    };
    let task = tokio::spawn(serve_handing_over(
        listener,
        app,
        Ok,
        limits,
        metrics(),
        async move {
            let _ = stopped.await;
        },
        async move {
            let _ = grace_ended.await;
        },
    ));
    let mut first = TcpStream::connect(addr).await.expect("connect");
    send(&mut first, "/drained").await;
    let mut second = TcpStream::connect(addr).await.expect("connect");
    send(&mut second, "/forever").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop.send(());
    wait_listener_closed(addr).await;
    // Well past shutdown_timeout, within the grace: answered as usual.
    tokio::time::sleep(Duration::from_millis(600)).await;
    release.notify_one();
    let answer = read_all(&mut first).await;
    assert!(answer.ends_with("released"), "{answer}");
    // The grace ends: what is left is dropped after shutdown_timeout.
    let ended = Instant::now();
    let _ = end_grace.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returned")
        .expect("task")
        .expect("serve");
    let took = ended.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(!read_all(&mut second).await.contains("HTTP/1.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_a_client_does_not_read() {
    let server = start(ServerLimits {
        shutdown_timeout: Duration::from_millis(500),
        ..limits()
    })
    .await;
    let mut greedy = TcpStream::connect(server.addr).await.expect("connect");
    let pipelined = "GET /big HTTP/1.1\r\nHost: test\r\n\r\n".repeat(100);
    greedy.write_all(pipelined.as_bytes()).await.expect("send");
    // Another connection is answered: the server is running and past the greedy accept.
    assert!(
        request(server.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let took = server.stop().await;
    println!("serve returned {took:?} after shutdown began");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // Dropped: what was sent reads out, then the connection ends.
    read_all(&mut greedy).await;
}

#[tokio::test(start_paused = true)]
async fn writes_fail_after_the_write_timeout_without_progress() {
    let (writer, mut reader) = tokio::io::duplex(64);
    let mut writer = WriteTimeout::new(writer, Duration::from_secs(10));
    let started = Instant::now();
    let problem = writer
        .write_all(&[0; 1024])
        .await
        .expect_err("nobody reads");
    assert_eq!(problem.kind(), io::ErrorKind::TimedOut);
    assert_eq!(started.elapsed(), Duration::from_secs(10));

    // Slow progress (64 bytes every 6 s) is progress: no timeout over 24 s.
    let (writer, mut slow) = tokio::io::duplex(64);
    let mut writer = WriteTimeout::new(writer, Duration::from_secs(10));
    let draining = tokio::spawn(async move {
        let mut buffer = [0u8; 64];
        let mut total = 0;
        while total < 256 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            total += slow.read(&mut buffer).await.expect("read");
        }
        total
    });
    writer.write_all(&[0; 256]).await.expect("slow reader");
    assert_eq!(draining.await.expect("reader"), 256);
    let mut sink = [0u8; 64];
    assert_eq!(reader.read(&mut sink).await.expect("read"), 64);
}

/// A client that pipelines and reads its answers slowly: with a small receive buffer, it
/// sends 100,000 `GET /healthz` at once (answered beyond the cap too; megabytes of answers,
/// more than the kernel's buffers hold) and reads 1 KiB a second — progress, so the write
/// timeout never fires. hyper reads nothing while it writes an answer with requests left in
/// its buffer, so requests stay unread in the kernel the whole time.
fn slow_reader(addr: SocketAddr) -> JoinHandle<()> {
    tokio::spawn(async move {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let (mut reader, mut writer) = socket.connect(addr).await.expect("connect").into_split();
        let pipelined = "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n".repeat(100_000);
        let sending = tokio::spawn(async move {
            let _ = writer.write_all(pipelined.as_bytes()).await;
            // Kept open: a half-close would end the connection after its answers.
            std::future::pending::<()>().await;
        });
        let mut buffer = [0u8; 1024];
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        sending.abort();
    })
}

/// A connection writing an answer to a client that reads it slowly has no request in a
/// handler: it is evicted to make room, and a new client is answered rather than left in
/// the listen backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_do_not_keep_new_connections_in_the_backlog() {
    let server = start(ServerLimits {
        max_connections: 4,
        write_timeout: Duration::from_secs(2),
        ..limits()
    })
    .await;
    // The cap (4) and the reserve (4), every one writing to a slow reader.
    let mut readers = Vec::new();
    for _ in 0..8 {
        readers.push(slow_reader(server.addr));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(CONNECT_GRACE + Duration::from_millis(100)).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), request(server.addr, "/healthz"))
        .await
        .expect("a new client is answered, not left in the listen backlog");
    assert_ok(&answer);
    for reader in readers {
        reader.abort();
    }
    server.stop().await;
}

/// At the cap, a quiet kept-alive connection is closed before an older one that is being
/// answered (its answer would be cut short).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_connections_are_evicted_before_ones_being_answered() {
    let server = start(ServerLimits {
        max_connections: 4,
        ..limits()
    })
    .await;
    // 8 MiB of answers asked for, none read: the answer's writing is blocked.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut unread = socket.connect(server.addr).await.expect("connect");
    let pipelined = "GET /big HTTP/1.1\r\nHost: test\r\n\r\n".repeat(32);
    unread.write_all(pipelined.as_bytes()).await.expect("send");
    tokio::time::sleep(CONNECT_GRACE + Duration::from_millis(100)).await;
    let mut quiet = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        send(&mut stream, "/healthz").await;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.expect("answer");
        assert_eq!(&head, b"HTTP/1.1 200");
        quiet.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut rest = vec![0u8; 1024];
    for stream in &mut quiet {
        let _ = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut rest)).await;
    }
    assert_ok(&request(server.addr, "/healthz").await);
    for (i, stream) in quiet.iter_mut().enumerate() {
        assert_eq!(closed_by_server(stream).await, i < 1, "connection {i}");
    }
    // Still answered: its answers read out and the connection stays open.
    let mut answers = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(1), unread.read_to_end(&mut answers))
        .await
        .is_ok();
    assert!(!ended, "evicted after {} bytes", answers.len());
    server.stop().await;
}

/// Audit (descriptors): the overflow reserve's descriptors were said to come out of
/// [`RESERVED_FDS`], and the pod listeners' budget counted them beside it: a cap lowered to
/// the open-file limit less [`RESERVED_FDS`] left the reserve to take the rest of the
/// agent's. The cap is lowered so that it and its reserve stay [`RESERVED_FDS`] below.
#[test]
fn the_cap_and_its_reserve_stay_below_the_open_file_limit() {
    for limit in [200_u64, 600, 1_024, 20_000] {
        for wanted in [16, 512, 20_000, usize::MAX] {
            let cap = cap_within(limit, wanted);
            assert!(cap <= wanted && cap >= 1, "{limit} {wanted}: {cap}");
            let held = connection_descriptors(cap);
            assert!(
                held + RESERVED_FDS <= limit,
                "under {limit}, a cap of {cap} and its reserve hold {held}"
            );
        }
    }
    // A limit with room keeps what was asked.
    assert_eq!(cap_within(20_000, 512), 512);
    // Fewer descriptors than the reserve itself: still one connection.
    assert_eq!(cap_within(100, 512), 1);
}

/// A client that half-closes after its request (busybox `nc` in a preStop hook does, when
/// its stdin ends) is still answered when the handler finishes: its FIN is not taken for a
/// client gone away, and the handler is not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_is_answered() {
    let server = start(limits()).await;
    let mut client = TcpStream::connect(server.addr).await.expect("connect");
    client
        .write_all(b"GET /drained HTTP/1.0\r\n\r\n")
        .await
        .expect("send");
    server.wait_entered(1).await;
    client.shutdown().await.expect("half-close");
    // hyper sees the FIN while the handler waits.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.release.notify_waiters();
    let answer = read_all(&mut client).await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer:?}");
    assert!(answer.ends_with("released"), "{answer:?}");
    server.stop().await;
}

/// A client that resets its connection while its request waits (`SO_LINGER` 0, or a close
/// with data unread) went away: its handler is dropped at once, not left to its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_while_its_request_waits_is_gone() {
    let server = start(limits()).await;
    let mut client = TcpStream::connect(server.addr).await.expect("connect");
    client
        .write_all(b"GET /drained HTTP/1.0\r\n\r\n")
        .await
        .expect("send");
    server.wait_entered(1).await;
    client.set_zero_linger().expect("SO_LINGER 0");
    drop(client);
    tokio::time::timeout(Duration::from_secs(2), async {
        while server.dropped.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the handler was dropped");
    server.stop().await;
}
