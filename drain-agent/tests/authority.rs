//! Who may do what (issue 22, SECURITY.md), against the real agent listening beyond
//! loopback as the DaemonSet does (`--listen 0.0.0.0:P`), with real callers:
//! - "another node": a network namespace the agent cannot find (made by a thread of this
//!   test that left the host's namespace; nothing names it), on its own subnet;
//! - pods on this node: named namespaces on veth pairs (`common::pod`);
//! - a local user: `curl` run as uid 65534 (`nobody`), and a service of that user.
//!
//! Each case failed on 942aa50: the remote caller drained and reset every pod's
//! connections and read their clients, a pod's drain reset the other pod's, `nobody`
//! reset a root service's connections.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::{
    agent_binary,
    child::Guard,
    free_port,
    http::curl,
    kernel_available,
    pod::{Pod, connect},
    run,
};

const NOBODY: u32 = 65_534;

/// The agent as the DaemonSet runs it: reachable from every address of the node.
fn start_agent(port: u16) -> Guard {
    start_agent_with(port, &[])
}

fn start_agent_with(port: u16, extra: &[&str]) -> Guard {
    let mut command = Command::new(agent_binary());
    let state = common::private_state(&mut command);
    let agent = Guard::spawn(
        "drain-agent",
        command
            .args(["run", "--listen", &format!("0.0.0.0:{port}")])
            // Nothing pinned: tests run in parallel on one kernel (tests/pinned.rs pins).
            .arg("--no-pin")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
    .keep(state);
    let started = Instant::now();
    while curl(
        None,
        None,
        "GET",
        &format!("http://127.0.0.1:{port}/healthz"),
    )
    .0 != 200
    {
        assert!(started.elapsed() < Duration::from_secs(30), "agent not up");
        thread::sleep(Duration::from_millis(100));
    }
    agent
}

type Work = Box<dyn FnOnce() + Send>;

/// "Another node": a namespace that no process and no name holds (a thread of this test
/// left the host's; the agent's `/proc/*/ns/net` scan sees only main threads), joined to
/// the host by a veth pair on 10.214.`subnet`.0/30: host `.1`, remote `.2`. Its requests
/// are made on that thread (a `curl` in it would be a process the agent can find).
struct Remote {
    host_link: String,
    work: Option<mpsc::Sender<Work>>,
}

impl Remote {
    fn new(subnet: u8) -> Self {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (work_tx, work_rx) = mpsc::channel::<Work>();
        thread::spawn(move || {
            // SAFETY: unshare affects this thread only (CLONE_NEWNET, no CLONE_THREAD games).
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            ready_tx.send(tid).expect("send");
            for work in work_rx {
                work();
            }
        });
        let tid = ready_rx.recv().expect("tid");
        let path = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
        let tag = std::process::id() % 100_000;
        let host_link = format!("dar{tag}h");
        let remote_link = format!("dar{tag}r");
        let _ = Command::new("ip")
            .args(["link", "del", &host_link])
            .output();
        run(
            "ip",
            &[
                "link",
                "add",
                &host_link,
                "type",
                "veth",
                "peer",
                "name",
                &remote_link,
            ],
        );
        run("ip", &["link", "set", &remote_link, "netns", &path]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.214.{subnet}.1/30"),
                "dev",
                &host_link,
            ],
        );
        run("ip", &["link", "set", &host_link, "up"]);
        let inside = |args: &[&str]| {
            let mut full = vec![format!("--net={path}"), "ip".into()];
            full.extend(args.iter().map(ToString::to_string));
            let full: Vec<&str> = full.iter().map(String::as_str).collect();
            run("nsenter", &full);
        };
        inside(&[
            "addr",
            "add",
            &format!("10.214.{subnet}.2/30"),
            "dev",
            &remote_link,
        ]);
        inside(&["link", "set", &remote_link, "up"]);
        inside(&["link", "set", "lo", "up"]);
        Self {
            host_link,
            work: Some(work_tx),
        }
    }

    /// One HTTP/1.1 request from the remote's thread: the status and the body.
    fn request(&self, method: &str, url: &str, header: Option<&str>) -> (u16, String) {
        let rest = url.strip_prefix("http://").expect("http url");
        let (host, path) = rest.split_at(rest.find('/').expect("path"));
        let text = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{}\r\n",
            header.map(|line| format!("{line}\r\n")).unwrap_or_default()
        );
        let host = host.to_owned();
        let (answer_tx, answer_rx) = mpsc::channel();
        self.work
            .as_ref()
            .expect("thread")
            .send(Box::new(move || {
                let mut stream = TcpStream::connect(&host).expect("connect from the remote");
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .expect("timeout");
                stream.write_all(text.as_bytes()).expect("send");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                let _ = answer_tx.send(answer);
            }))
            .expect("send work");
        let answer = answer_rx.recv().expect("answer");
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
        drop(self.work.take());
    }
}

/// Whether `stream` is still open: a read finds neither an end nor a reset (the servers
/// here send nothing unasked).
fn alive(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut byte = [0_u8; 1];
    match stream.read(&mut byte) {
        Err(problem) => matches!(
            problem.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        // An end (0) or unasked data: not the quiet open connection these tests hold.
        Ok(0 | 1..) => false,
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn callers_beyond_the_node_and_its_pods_read_metrics_and_health_only() {
    if !kernel_available("callers_beyond_the_node_and_its_pods_read_metrics_and_health_only") {
        return;
    }
    let api = free_port();
    let _agent = start_agent(api);
    let port = free_port();
    let pod_a = Pod::new("aua", 31);
    let server_a = pod_a.listen(port);
    let _clients = connect(&pod_a.ip, port, 3, &server_a);
    let remote = Remote::new(41);
    let node = |path: &str| format!("http://10.214.41.1:{api}{path}");
    for (method, path) in [
        (
            "POST",
            format!("/drain?port={port}&timeout=1s&on_timeout=close"),
        ),
        ("GET", format!("/drained?port={port}&timeout=1s")),
        ("DELETE", format!("/drain?port={port}")),
        ("GET", "/connections?peers=true".to_owned()),
        ("GET", "/drains".to_owned()),
        ("GET", "/advice".to_owned()),
    ] {
        let (status, body) = remote.request(method, &node(&path), None);
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert!(body.contains("SECURITY.md"), "{body}");
    }
    for path in ["/metrics", "/healthz", &format!("/health?port={port}")] {
        let (status, body) = remote.request("GET", &node(path), None);
        assert_eq!(status, 200, "{path}: {body}");
    }
    // A token, when none was configured, is 401.
    let (status, body) = remote.request(
        "POST",
        &node(&format!("/drain?port={port}&timeout=1s")),
        Some("Authorization: Bearer 0123456789abcdef0123"),
    );
    assert_eq!(status, 401, "{body}");
    // Nothing changed: the pod's connections are all there after the 1 s a drain asked.
    thread::sleep(Duration::from_millis(1500));
    let (status, body) = curl(None, None, "GET", &format!("http://127.0.0.1:{api}/drains"));
    assert_eq!(status, 200);
    assert!(body.contains("\"in_progress\":[]"), "{body}");
    assert!(!body.contains("closed_at_deadline"), "{body}");
    let (_, body) = curl(
        None,
        None,
        "GET",
        &format!("http://127.0.0.1:{api}/drained?port={port}&timeout=0"),
    );
    assert!(body.contains("\"active\":3"), "{body}");
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_pod_on_the_node_drains_and_closes_its_own_connections_only() {
    if !kernel_available("a_pod_on_the_node_drains_and_closes_its_own_connections_only") {
        return;
    }
    let api = free_port();
    let _agent = start_agent(api);
    let port = free_port();
    let pod_a = Pod::new("aub", 32);
    let pod_b = Pod::new("auc", 33);
    let server_a = pod_a.listen(port);
    let server_b = pod_b.listen(port);
    let mut clients_a = connect(&pod_a.ip, port, 3, &server_a);
    let mut clients_b = connect(&pod_b.ip, port, 3, &server_b);
    // Pod A calls the node's address (its gateway) from its own address.
    let node_from_a = |path: &str| format!("http://10.213.32.1:{api}{path}");
    let (status, body) = curl(
        Some(&pod_a.netns.path()),
        None,
        "POST",
        &node_from_a(&format!("/drain?port={port}&timeout=1s&on_timeout=close")),
    );
    assert_eq!(status, 201, "{body}");
    // Its scope is its own namespace, whatever it asked.
    let (status, body) = curl(
        Some(&pod_a.netns.path()),
        None,
        "GET",
        &node_from_a(&format!(
            "/drained?port={port}&timeout=0&netns=/proc/1/ns/net"
        )),
    );
    assert_eq!(status, 400, "{body}");
    let health = |query: &str| {
        curl(
            None,
            None,
            "GET",
            &format!("http://127.0.0.1:{api}/health?{query}"),
        )
        .0
    };
    // The node's port and pod B's stay in rotation while A drains.
    assert_eq!(health(&format!("port={port}")), 200);
    assert_eq!(health(&format!("port={port}&addr={}", pod_b.ip)), 200);
    assert_eq!(health(&format!("port={port}&addr={}", pod_a.ip)), 503);
    // Pod B asking about A's address (a proxy pod checking its backend) is told A's drain,
    // as anyone else is; about itself, its own.
    let from_b = |query: &str| {
        curl(
            Some(&pod_b.netns.path()),
            None,
            "GET",
            &format!("http://10.213.33.1:{api}/health?{query}"),
        )
        .0
    };
    assert_eq!(from_b(&format!("port={port}&addr={}", pod_a.ip)), 503);
    assert_eq!(from_b(&format!("port={port}")), 200);
    thread::sleep(Duration::from_millis(2500));
    for client in &mut clients_a {
        assert!(
            !alive(client),
            "pod A's connection was closed at its deadline"
        );
    }
    for client in &mut clients_b {
        assert!(alive(client), "pod B's connection is untouched");
    }
    assert_eq!(health(&format!("port={port}")), 200);
    assert_eq!(health(&format!("port={port}&addr={}", pod_b.ip)), 200);
    // Pod B cannot see or cancel A's drains.
    let (status, body) = curl(
        Some(&pod_b.netns.path()),
        None,
        "GET",
        &format!("http://10.213.33.1:{api}/drains"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"recent\":[]"), "{body}");
}

/// A service of user `nobody` on `port`: its listener and the connections it accepts
/// are that user's (the socket's owner is the creating thread's fsuid). Echoes.
fn nobodys_service(port: u16) {
    let (ready_tx, ready_rx) = mpsc::channel();
    thread::spawn(move || {
        // SAFETY: setfsuid is per thread; it changes whose sockets this thread makes.
        unsafe { libc::setfsuid(NOBODY) };
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
        ready_tx.send(()).expect("ready");
        for stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || echo(stream));
        }
    });
    ready_rx.recv().expect("ready");
}

fn echo(mut stream: TcpStream) {
    let mut buffer = [0_u8; 64];
    while let Ok(read) = stream.read(&mut buffer) {
        if read == 0 || stream.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_local_user_drains_its_own_port_and_cannot_close_anothers() {
    if !kernel_available("a_local_user_drains_its_own_port_and_cannot_close_anothers") {
        return;
    }
    let api = free_port();
    let _agent = start_agent(api);
    let url = |path: &str| format!("http://127.0.0.1:{api}{path}");
    // Root's service, with three clients.
    let roots = free_port();
    let listener = TcpListener::bind(("127.0.0.1", roots)).expect("bind");
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || echo(stream));
        }
    });
    let mut clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", roots)).expect("connect"))
        .collect();
    let (status, body) = curl(
        None,
        Some(NOBODY),
        "POST",
        &url(&format!("/drain?port={roots}&timeout=1s&on_timeout=close")),
    );
    assert_eq!(status, 403, "{body}");
    let (status, body) = curl(
        None,
        Some(NOBODY),
        "GET",
        &url(&format!(
            "/drained?port={roots}&timeout=1s&on_timeout=close"
        )),
    );
    assert_eq!(status, 403, "{body}");
    // Waiting observes: answered at its timeout, no drain, root's port not gated.
    let (status, body) = curl(
        None,
        Some(NOBODY),
        "GET",
        &url(&format!("/drained?port={roots}&timeout=1s")),
    );
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains("\"drain\""), "{body}");
    assert_eq!(
        curl(None, None, "GET", &url(&format!("/health?port={roots}"))).0,
        200
    );
    thread::sleep(Duration::from_millis(500));
    for client in &mut clients {
        assert!(alive(client), "root's connections are untouched");
    }
    // nobody's own service: its stop hook drains it (the systemd example with User=).
    let own = free_port();
    nobodys_service(own);
    let client = TcpStream::connect(("127.0.0.1", own)).expect("connect");
    let closer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(700));
        drop(client);
    });
    let (status, body) = curl(
        None,
        Some(NOBODY),
        "GET",
        &url(&format!("/drained?port={own}&timeout=10s")),
    );
    closer.join().expect("closer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"drain\""), "its own drain: {body}");
    // Root controls everything.
    let (status, body) = curl(
        None,
        None,
        "POST",
        &url(&format!("/drain?port={roots}&timeout=5s")),
    );
    assert_eq!(status, 201, "{body}");
    let (status, _) = curl(None, None, "DELETE", &url(&format!("/drain?port={roots}")));
    assert_eq!(status, 200);
}

/// Audit (local user's addr=): `nobody`, owning a port on the node, could `POST
/// /drain?port=P&addr=<pod B's IP>&timeout=5m` (201), and the public /metrics showed a drain
/// of pod B's address (which the per-pod recording rule attributes to B). A local user's
/// `addr=` must be an address of the node's own namespace; any other gets one `403` naming
/// `addr`, whether or not a pod holds it.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_local_user_names_only_the_nodes_own_addresses() {
    if !kernel_available("a_local_user_names_only_the_nodes_own_addresses") {
        return;
    }
    let api = free_port();
    let _agent = start_agent(api);
    let url = |path: &str| format!("http://127.0.0.1:{api}{path}");
    let pod_b = Pod::new("aue", 37);
    let own = free_port();
    nobodys_service(own);
    let post = |addr: &str| {
        curl(
            None,
            Some(NOBODY),
            "POST",
            &url(&format!("/drain?port={own}&addr={addr}&timeout=5m")),
        )
    };
    let (status, pods) = post(&pod_b.ip);
    assert_eq!(status, 403, "{pods}");
    assert!(pods.contains("addr"), "{pods}");
    // An address nobody holds: the same answer.
    let (status, nobodys) = post("10.213.37.99");
    assert_eq!((status, &nobodys), (403, &pods));
    let (_, metrics) = curl(None, None, "GET", &url("/metrics"));
    assert!(
        !metrics.contains(&format!("addr=\"{}\"", pod_b.ip)),
        "{metrics}"
    );
    // Its own namespace's: loopback, and the node's end of the pod's link (nothing is
    // connected there: each drains at once).
    for addr in ["127.0.0.1", "10.213.37.1"] {
        let (status, body) = post(addr);
        assert_eq!(status, 201, "{addr}: {body}");
    }
}

/// `GET path` to the agent on 127.0.0.1:`api`, from `source`, as `uid`, sent and left
/// open: the socket is made on a thread whose fsuid is `uid`, so the kernel records it as
/// that user's (what the agent looks up), whatever address it binds.
fn send_as(uid: u32, source: &str, api: u16, path: &str) -> TcpStream {
    let source: std::net::SocketAddr = format!("{source}:0").parse().expect("source");
    let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    thread::spawn(move || {
        // SAFETY: setfsuid is per thread; it changes whose sockets this thread makes.
        unsafe { libc::setfsuid(uid) };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind(source).expect("bind the source");
            socket
                .connect(([127, 0, 0, 1], api).into())
                .await
                .expect("connect")
        });
        let stream = stream.into_std().expect("std stream");
        stream.set_nonblocking(false).expect("blocking");
        (&stream).write_all(request.as_bytes()).expect("send");
        stream
    })
    .join()
    .expect("the user's thread")
}

/// The status of the answer on `stream` within `patience`; `None`: none came.
fn status_within(stream: &mut TcpStream, patience: Duration) -> Option<u16> {
    stream.set_read_timeout(Some(patience)).expect("timeout");
    let mut head = [0_u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Audit (shared limits): `--max-waiters-per-source` and the reserve's "first of its
/// source" went by address, and a local user may bind every address of 127.0.0.0/8:
/// `nobody` filled the cap (4 waiters from each of 2 addresses, here) and the reserve
/// (one "first" waiter from each of 4 more), and root's stop hook then waited in the
/// listen backlog, answered by nobody. The agent now identifies the caller before those
/// limits: `nobody` is one source whatever its addresses, and root's hook is answered.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_user_on_many_loopback_addresses_cannot_keep_roots_hook_waiting() {
    if !kernel_available("a_user_on_many_loopback_addresses_cannot_keep_roots_hook_waiting") {
        return;
    }
    let api = free_port();
    // A cap of 8 connections (a reserve of 4 beyond it), 4 waiters per source.
    let _agent = start_agent_with(
        api,
        &[
            "--http-max-connections",
            "8",
            "--max-waiters-per-source",
            "4",
        ],
    );
    // A port that never drains (root's service, one client held), for nobody's waiters.
    let busy = free_port();
    let listener = TcpListener::bind(("127.0.0.1", busy)).expect("bind");
    let _held = TcpStream::connect(("127.0.0.1", busy)).expect("connect");
    let _accepted = listener.accept().expect("accept");
    let wait = format!("/drained?port={busy}&timeout=60s");
    let mut users = Vec::new();
    for (address, count) in [
        ("127.0.1.1", 4),
        ("127.0.1.2", 4),
        ("127.0.2.1", 1),
        ("127.0.2.2", 1),
        ("127.0.2.3", 1),
        ("127.0.2.4", 1),
    ] {
        for _ in 0..count {
            users.push(send_as(NOBODY, address, api, &wait));
        }
    }
    thread::sleep(Duration::from_secs(1));
    // Root's stop hook, for a port with nothing open: drained at once.
    let mut root = send_as(
        0,
        "127.0.0.1",
        api,
        &format!("/drained?port={}&timeout=5s", free_port()),
    );
    let status = status_within(&mut root, Duration::from_secs(5));
    assert_eq!(
        status,
        Some(200),
        "root's hook behind nobody's waiters from 6 loopback addresses"
    );
    // Nobody has 4 waiters, its per-source limit; the rest were told 429.
    let mut refused = 0;
    for user in &mut users {
        match status_within(user, Duration::from_millis(200)) {
            Some(429) => refused += 1,
            None => {}
            other => panic!("nobody's waiter answered {other:?}"),
        }
    }
    assert_eq!(refused, users.len() - 4, "all but 4 of nobody's refused");
}

/// A local user's port ownership was checked only when its drain started. While root's
/// service on a port restarted, `nobody` bound it, `POST`ed an `on_timeout=close` drain and
/// went; root's service came back on the port, stayed out of rotation until the drain's
/// deadline, and then had its connections reset. Now the drain sees another user's sockets
/// on the port (within its 5 s recheck) and ends `not_owned`: the port back in rotation,
/// nothing closed.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_local_users_drain_lets_go_of_a_port_root_takes_back() {
    if !kernel_available("a_local_users_drain_lets_go_of_a_port_root_takes_back") {
        return;
    }
    let api = free_port();
    let _agent = start_agent(api);
    let url = |path: &str| format!("http://127.0.0.1:{api}{path}");
    let port = free_port();
    let (listener_tx, listener_rx) = mpsc::channel();
    thread::spawn(move || {
        // SAFETY: setfsuid is per thread; it changes whose sockets this thread makes.
        unsafe { libc::setfsuid(NOBODY) };
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
        listener_tx.send(listener).expect("send");
    });
    let nobodys = listener_rx.recv().expect("nobody's listener");
    // Its quiet window is its whole timeout: it cannot drain before its deadline.
    let (status, body) = curl(
        None,
        Some(NOBODY),
        "POST",
        &url(&format!(
            "/drain?port={port}&timeout=10s&quiet=10s&on_timeout=close"
        )),
    );
    assert_eq!(status, 201, "{body}");
    let started = Instant::now();
    drop(nobodys);
    // Root's service is back, with a client.
    let roots = TcpListener::bind(("127.0.0.1", port)).expect("root binds the port again");
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (served, _) = roots.accept().expect("accept");
    thread::spawn(move || echo(served));
    let mut ended = String::new();
    while started.elapsed() < Duration::from_secs(9) {
        let (_, body) = curl(None, None, "GET", &url("/drains"));
        if body.contains("\"not_owned\"") {
            ended = body;
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ended.contains("\"in_progress\":[]"),
        "nobody's drain still holds root's port: {ended}"
    );
    assert_eq!(
        curl(None, None, "GET", &url(&format!("/health?port={port}"))).0,
        200,
        "root's port back in rotation"
    );
    // Past the drain's deadline: root's connection is untouched.
    thread::sleep(Duration::from_secs(11).saturating_sub(started.elapsed()));
    assert!(alive(&mut client), "root's connection was closed");
    let (_, body) = curl(None, None, "GET", &url("/drains"));
    assert!(body.contains("\"closed_by_agent\":0"), "{body}");
}

/// A `GET` whose client went away left its 10-minute drain (and the port's gate) running.
/// Gone: it reset its connection (`SO_LINGER` 0, as a killed client with data unread does);
/// a FIN alone is a client that half-closed and waits for its answer (below).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_drain_whose_only_client_left_is_gone_within_a_second() {
    if !kernel_available("a_drain_whose_only_client_left_is_gone_within_a_second") {
        return;
    }
    let api = free_port();
    let _agent = start_agent(api);
    let url = |path: &str| format!("http://127.0.0.1:{api}{path}");
    let port = free_port();
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _accepted = listener.accept().expect("accept");
    let mut waiter = TcpStream::connect(("127.0.0.1", api)).expect("connect");
    write!(
        waiter,
        "GET /drained?port={port}&timeout=10m HTTP/1.1\r\nHost: agent\r\n\r\n"
    )
    .expect("send");
    thread::sleep(Duration::from_secs(1));
    let (_, body) = curl(None, None, "GET", &url("/drains"));
    assert!(!body.contains("\"in_progress\":[]"), "{body}");
    rustix::net::sockopt::set_socket_linger(&waiter, Some(Duration::ZERO)).expect("SO_LINGER");
    drop(waiter);
    thread::sleep(Duration::from_millis(1000));
    let (_, body) = curl(None, None, "GET", &url("/drains"));
    assert!(body.contains("\"in_progress\":[]"), "{body}");
    assert!(body.contains("\"abandoned\""), "{body}");
    assert_eq!(
        curl(None, None, "GET", &url(&format!("/health?port={port}"))).0,
        200
    );
}

/// A hook that half-closes after its request (busybox `nc` in an alpine preStop does, when
/// its stdin ends) waits for its answer: its FIN is not a hang-up. It was: hyper saw the
/// EOF and dropped the request at once, unanswered, its drain ended `abandoned`, and `nc`
/// exited 0 — the container stopped with its connections open.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_hook_that_half_closes_after_its_request_gets_its_answer() {
    if !kernel_available("a_hook_that_half_closes_after_its_request_gets_its_answer") {
        return;
    }
    let api = free_port();
    let _agent = start_agent(api);
    let url = |path: &str| format!("http://127.0.0.1:{api}{path}");
    let port = free_port();
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _accepted = listener.accept().expect("accept");
    let started = Instant::now();
    let mut hook = TcpStream::connect(("127.0.0.1", api)).expect("connect");
    write!(hook, "GET /drained?port={port}&timeout=3s HTTP/1.0\r\n\r\n").expect("send");
    hook.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    hook.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = hook.read_to_string(&mut answer);
    let took = started.elapsed();
    assert!(
        answer.starts_with("HTTP/1.0 503"),
        "after {took:?}: {answer:?}"
    );
    assert!(took >= Duration::from_millis(2500), "{took:?}: {answer:?}");
    let (_, body) = curl(None, None, "GET", &url("/drains"));
    assert!(!body.contains("\"abandoned\""), "{body}");
    assert!(body.contains("\"timeout\""), "{body}");
}

/// Control from beyond the node is opt-in, with a bearer token from `--auth-token-file`.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_configured_token_gives_a_remote_caller_the_nodes_authority() {
    if !kernel_available("a_configured_token_gives_a_remote_caller_the_nodes_authority") {
        return;
    }
    let api = free_port();
    let tokens = common::temp_dir("tokens");
    let token_file = tokens.path().join("tokens");
    std::fs::write(
        &token_file,
        "# the deploy pipeline\nfedcba9876543210-pipeline\n",
    )
    .expect("write");
    let _agent = start_agent_with(
        api,
        &["--auth-token-file", token_file.to_str().expect("utf-8")],
    );
    let port = free_port();
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _accepted = listener.accept().expect("accept");
    let remote = Remote::new(42);
    let node = |path: &str| format!("http://10.214.42.1:{api}{path}");
    let drain = node(&format!("/drain?port={port}&timeout=30s"));
    assert_eq!(remote.request("POST", &drain, None).0, 403);
    let (status, body) = remote.request(
        "POST",
        &drain,
        Some("Authorization: Bearer fedcba9876543210-pipelinX"),
    );
    assert_eq!(status, 401, "{body}");
    let (status, body) = remote.request(
        "POST",
        &drain,
        Some("Authorization: Bearer fedcba9876543210-pipeline"),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = remote.request(
        "GET",
        &node(&format!("/connections?port={port}&peers=true")),
        Some("Authorization: Bearer fedcba9876543210-pipeline"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"remote\""), "{body}");
}

/// One request of a recipe: its method, its URL with the recipe's placeholders, and the
/// `Authorization` header line that follows it, if any.
struct RecipeRequest {
    method: String,
    url: String,
    authorization: Option<String>,
}

/// The requests deploy/recipes/README.md gives for grafana/rollout-operator, as written
/// (the lines of its code blocks that start with a method and an `http://` URL).
fn rollout_operator_recipe() -> Vec<RecipeRequest> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/recipes/README.md"),
    )
    .expect("deploy/recipes/README.md");
    let start = text
        .find("**rollout-operator's `prepare-downscale`**")
        .expect("the rollout-operator recipe");
    let section = &text[start..];
    let section = &section[..section.find("\n- **").unwrap_or(section.len())];
    let mut requests: Vec<RecipeRequest> = Vec::new();
    for line in section.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix("Authorization: ") {
            requests
                .last_mut()
                .expect("a header after its request")
                .authorization = Some(format!("Authorization: {header}"));
        } else if let Some((method, url)) = line.split_once(' ')
            && ["GET", "POST", "DELETE"].contains(&method)
            && url.starts_with("http://")
        {
            requests.push(RecipeRequest {
                method: method.to_owned(),
                url: url.to_owned(),
                authorization: None,
            });
        }
    }
    requests
}

/// deploy/recipes/README.md, rollout-operator: the operator's own POST to the pod (from
/// the operator's pod address) is refused by the pod listener, so the recipe has the pod
/// start its own drain on its loopback, or something holding a node token call the node
/// listener. Each request of the recipe runs here as written (the DaemonSet's ports and the
/// example's 8080 replaced by this test's), and does what the recipe says.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_rollout_operator_recipe_drains_the_pod() {
    if !kernel_available("the_rollout_operator_recipe_drains_the_pod") {
        return;
    }
    let requests = rollout_operator_recipe();
    let methods: Vec<(&str, bool)> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.authorization.is_some()))
        .collect();
    assert_eq!(
        methods,
        [("POST", false), ("DELETE", false), ("POST", true)],
        "the recipe's requests: the pod's drain, its cancel, the node's with a token"
    );
    let pid = std::process::id();
    let api = free_port();
    let pod_port = free_port();
    let tokens = common::temp_dir("tokens");
    let token_file = tokens.path().join("tokens");
    std::fs::write(&token_file, "rollout-automation-0123456789\n").expect("write");
    let prefix = format!("da-rop{pid}");
    let pod = Pod::new(&format!("rop{pid}a"), 61);
    // The operator's pod: neither the pod nor the node, wired to the pod directly.
    let operator = common::Netns::new(&format!("rox{pid}"));
    let (pod_side, operator_side) = (
        format!("dr{}p", pid % 100_000),
        format!("dr{}o", pid % 100_000),
    );
    run(
        "ip",
        &[
            "-n",
            &pod.netns.name,
            "link",
            "add",
            &pod_side,
            "type",
            "veth",
            "peer",
            "name",
            &operator_side,
            "netns",
            &operator.name,
        ],
    );
    run(
        "ip",
        &[
            "-n",
            &pod.netns.name,
            "addr",
            "add",
            "10.213.62.1/30",
            "dev",
            &pod_side,
        ],
    );
    run(
        "ip",
        &["-n", &pod.netns.name, "link", "set", &pod_side, "up"],
    );
    run(
        "ip",
        &[
            "-n",
            &operator.name,
            "addr",
            "add",
            "10.213.62.2/30",
            "dev",
            &operator_side,
        ],
    );
    run(
        "ip",
        &["-n", &operator.name, "link", "set", &operator_side, "up"],
    );
    let _agent = start_agent_with(
        api,
        &[
            "--pod-listen",
            &format!("0.0.0.0:{pod_port}"),
            "--pod-netns-prefix",
            &prefix,
            "--auth-token-file",
            token_file.to_str().expect("utf-8"),
            "--shutdown-grace",
            "0s",
        ],
    );
    let inside = Some(pod.netns.path());
    let started = Instant::now();
    while curl(
        inside.as_deref(),
        None,
        "GET",
        &format!("http://127.0.0.1:{pod_port}/healthz"),
    )
    .0 != 200
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no pod listener"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let port = free_port();
    let server = pod.listen(port);
    let _clients = connect(&pod.ip, port, 2, &server);
    let health = || {
        curl(
            None,
            None,
            "GET",
            &format!("http://127.0.0.1:{api}/health?port={port}&addr={}", pod.ip),
        )
        .0
    };
    assert_eq!(health(), 200);

    // What the operator itself does: a POST to the pod's address from its own pod.
    let (status, body) = curl(
        Some(&operator.path()),
        None,
        "POST",
        &format!("http://10.213.62.1:{pod_port}/drain?port={port}&timeout=60s"),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(health(), 200, "the refused call changed nothing");

    let remote = Remote::new(63);
    let concrete = |url: &str| {
        url.replace(":9100/", &format!(":{pod_port}/"))
            .replace(":19700/", &format!(":{api}/"))
            .replace("port=8080", &format!("port={port}"))
            .replace("<node IP>", "10.214.63.1")
            .replace("<pod IP>", &pod.ip)
    };
    // The pod's own drain, on its loopback: started, then joined (idempotent).
    let start = &requests[0];
    let url = concrete(&start.url);
    let (status, body) = curl(inside.as_deref(), None, &start.method, &url);
    assert_eq!(status, 201, "{url}: {body}");
    assert_eq!(health(), 503, "the pod is out of rotation");
    let (status, body) = curl(inside.as_deref(), None, &start.method, &url);
    assert_eq!(status, 200, "{url} again: {body}");
    // Cancelled the same way: back in rotation.
    let cancel = &requests[1];
    let url = concrete(&cancel.url);
    let (status, body) = curl(inside.as_deref(), None, &cancel.method, &url);
    assert_eq!(status, 200, "{url}: {body}");
    assert_eq!(health(), 200, "back in rotation");
    // The node listener with a token, from another host.
    let node = &requests[2];
    let url = concrete(&node.url);
    let header = node
        .authorization
        .as_deref()
        .expect("a token")
        .replace("<token>", "rollout-automation-0123456789");
    assert_eq!(remote.request(&node.method, &url, None).0, 403, "no token");
    let (status, body) = remote.request(&node.method, &url, Some(&header));
    assert_eq!(status, 201, "{url}: {body}");
    assert_eq!(health(), 503, "the pod is out of rotation");
    // The pod's own readiness probe (on its listener) agrees: the drain of its address is
    // its own.
    let (status, body) = curl(
        inside.as_deref(),
        None,
        "GET",
        &format!("http://127.0.0.1:{pod_port}/health?port={port}"),
    );
    assert_eq!(status, 503, "the pod's readiness probe: {body}");
}

/// A server of user `nobody` on 127.0.0.1:`port` that answers every request as an agent
/// whose port 8080 drained (the real contract type), and keeps what it was sent. It
/// accepts on its own thread, whose fsuid is `nobody`: the accepted sockets are that
/// user's, as a local user's listener on the agent's address would be.
fn nobodys_fake_agent(port: u16) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use drain_agent::http::api::DrainedBody;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    let kept = std::sync::Arc::clone(&seen);
    thread::spawn(move || {
        // SAFETY: setfsuid is per thread; it changes whose sockets this thread makes.
        unsafe { libc::setfsuid(NOBODY) };
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
        ready_tx.send(()).expect("ready");
        let body = serde_json::to_string(&DrainedBody {
            port: 8080,
            drained: true,
            active: 0,
            waited_ms: 0,
            unknown: None,
            idle: None,
            busy: None,
            peers: Vec::new(),
            drain: None,
            unrecorded: None,
            closed: None,
            reason: None,
        })
        .expect("json");
        for mut stream in listener.incoming().map_while(Result::ok) {
            stream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            let mut request = Vec::new();
            let mut buffer = [0_u8; 4096];
            while !request.windows(4).any(|end| end == b"\r\n\r\n") {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(read) => request.extend_from_slice(&buffer[..read]),
                }
            }
            if request.is_empty() {
                continue;
            }
            kept.lock()
                .expect("lock")
                .push(String::from_utf8_lossy(&request).into_owned());
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    ready_rx.recv().expect("ready");
    seen
}

/// While the agent is down (its 2 s restart, a crash), its address is an unprivileged
/// port any local user may bind. `nobody` did, and answered root's stop hook
/// (`drain-agent wait`, run by systemd's `ExecStop=`) "drained": `wait` exited 0 with
/// connections open, and sent nobody the bearer token of its `--token-file`. The client
/// now looks up the server's end of its connection (the agent's own sock_diag lookup)
/// before it sends anything: a socket of another user is not the agent, and is treated
/// as an agent out of reach (exit 2 at the timeout), nothing sent.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_local_user_on_the_agents_address_is_not_the_agent() {
    if !kernel_available("a_local_user_on_the_agents_address_is_not_the_agent") {
        return;
    }
    let port = free_port();
    let seen = nobodys_fake_agent(port);
    let tokens = common::temp_dir("tokens");
    let token_file = tokens.path().join("token");
    std::fs::write(&token_file, "root-hook-token-0123456789\n").expect("write");
    let started = Instant::now();
    let output = Command::new(agent_binary())
        .args(["wait", "--port", "8080", "--timeout", "3s", "--agent"])
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--token-file")
        .arg(&token_file)
        .env_remove("DRAIN_AGENT_UID")
        .stdin(Stdio::null())
        .output()
        .expect("run drain-agent wait");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let seen = seen.lock().expect("lock").clone();
    assert!(
        seen.iter()
            .all(|request| !request.contains("root-hook-token")),
        "nobody was sent root's token: {seen:?}"
    );
    assert_eq!(
        output.status.code(),
        Some(2),
        "nobody's answer ended the wait (stdout {:?}, stderr {stderr:?})",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(seen.is_empty(), "nobody was sent requests: {seen:?}");
    assert!(
        stderr.contains("uid 65534") && stderr.contains(&format!("127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(
        took >= Duration::from_millis(2900),
        "waited out its timeout: {took:?}"
    );
    // An agent run as that user is named with --agent-uid: its answer is taken.
    let output = Command::new(agent_binary())
        .args(["wait", "--port", "8080", "--timeout", "3s", "--agent"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["--agent-uid", &NOBODY.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("run drain-agent wait");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
