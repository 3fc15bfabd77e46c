//! A forced close touches only tracked inbound connections of the drain's scope (issue 22,
//! item 4): never an outbound socket whose local port happens to be the drained port.
//!
//! Each test opens, on loopback in this test's network namespace, a dual-stack listener on
//! a port P (`[::]:P`, `SO_REUSEPORT`) with two IPv4 clients (the server ends spelled
//! `::ffff:127.0.0.1` by the socket tables) and two IPv6 clients; and three outbound
//! connections whose local port is P, each the client end of a loopback pair with another
//! listener (a port Q of its own): an IPv4 socket bound to `127.0.0.1:P`, an IPv6 one bound to `[::1]:P`,
//! and an IPv6 socket bound to `[::ffff:127.0.0.1]:P` (IPv4-mapped). The socket tables list
//! all seven on local port P; the agent tracked the four inbound ones.
//!
//! Through the real agent, with each close method: `POST /drain?port=P&timeout=1s&
//! on_timeout=close` must reset exactly the four inbound clients, and leave the three
//! outbound connections open and carrying data both ways; the remaining connections the
//! agent lists (`/connections?peers=true`, the drain's `peers_at_end`) are the four. And
//! in-process, `destroy_sockets` is given the outbound ones as targets directly (no
//! user-space filter): its own check leaves them alone; and `Kernel::close_connections`
//! given them as targets closes none with either method (the netlink method's only guard).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use common::{Agent, kernel_available};
use drain_agent::{
    drain_rule::Peer,
    kernel::{Kernel, destroy::CloseMethod},
    sys::netns,
    tracker::Filter,
};

/// A TCP socket of `local`'s family with `SO_REUSEADDR` and `SO_REUSEPORT`, bound to
/// `local`; `v6only` for an IPv6 socket (false: dual-stack).
fn bound_socket(local: SocketAddr, v6only: bool) -> OwnedFd {
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket has no preconditions; the descriptor is checked, then owned.
    let fd = unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    };
    let on: libc::c_int = 1;
    let mut options = vec![
        (libc::SOL_SOCKET, libc::SO_REUSEADDR, on),
        (libc::SOL_SOCKET, libc::SO_REUSEPORT, on),
    ];
    if local.is_ipv6() {
        options.push((
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            libc::c_int::from(v6only),
        ));
    }
    for (level, name, value) in options {
        // SAFETY: setsockopt on our open socket with an int of the size given.
        let done = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(done, 0, "setsockopt: {}", io::Error::last_os_error());
    }
    let (storage, length) = sockaddr(local);
    // SAFETY: bind on our open socket with a sockaddr of the length given.
    let done = unsafe { libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), length) };
    assert_eq!(done, 0, "bind {local}: {}", io::Error::last_os_error());
    fd
}

fn sockaddr(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let length = match address {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, length as libc::socklen_t)
}

/// A listener on `local` (`SO_REUSEPORT`, so outbound sockets may bind its port too).
fn listener(local: SocketAddr, v6only: bool) -> TcpListener {
    let fd = bound_socket(local, v6only);
    // SAFETY: listen on our bound socket.
    let done = unsafe { libc::listen(fd.as_raw_fd(), 64) };
    assert_eq!(done, 0, "listen: {}", io::Error::last_os_error());
    TcpListener::from(fd)
}

/// A connection from `local` (bound first, its port reused) to `remote`.
fn connect_from(local: SocketAddr, remote: SocketAddr) -> TcpStream {
    let fd = bound_socket(local, false);
    let (storage, length) = sockaddr(remote);
    // SAFETY: connect on our open socket with a sockaddr of the length given.
    let done = unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), length) };
    assert_eq!(
        done,
        0,
        "connect {local} -> {remote}: {}",
        io::Error::last_os_error()
    );
    TcpStream::from(fd)
}

fn with_timeouts(stream: TcpStream) -> TcpStream {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
}

/// A connection seen from both ends: (the end that connected, the accepted end).
type Pair = (TcpStream, TcpStream);

/// The connections of one test: inbound on P, outbound from P.
struct Setup {
    port: u16,
    /// Connected to the listener on P (two IPv4, two IPv6).
    inbound: Vec<Pair>,
    /// Outbound from local port P to the other listeners (IPv4, IPv6, IPv4-mapped IPv6).
    outbound: Vec<Pair>,
    /// (local, remote) of each outbound connection, as its own socket named them.
    outbound_ends: Vec<(SocketAddr, SocketAddr)>,
    _listeners: Vec<TcpListener>,
}

impl Setup {
    fn open() -> Self {
        let main = listener("[::]:0".parse().expect("addr"), false);
        let port = main.local_addr().expect("addr").port();
        let other_v4 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let other_v6 = TcpListener::bind("[::1]:0").expect("bind");
        // Another one for the IPv4-mapped socket: from the same local end to `other_v4`
        // it would be the IPv4 socket's four-tuple.
        let other_mapped = TcpListener::bind("127.0.0.1:0").expect("bind");
        let accept = |listener: &TcpListener, client: TcpStream| -> Pair {
            let (server, _) = listener.accept().expect("accept");
            (with_timeouts(client), with_timeouts(server))
        };
        let inbound = ["127.0.0.1", "127.0.0.1", "::1", "::1"]
            .into_iter()
            .map(|host| {
                let client = TcpStream::connect((host, port)).expect("connect");
                accept(&main, client)
            })
            .collect();
        let to = |listener: &TcpListener| listener.local_addr().expect("addr");
        let outbound = [
            (format!("127.0.0.1:{port}"), &other_v4),
            (format!("[::1]:{port}"), &other_v6),
            (format!("[::ffff:127.0.0.1]:{port}"), &other_mapped),
        ]
        .into_iter()
        .map(|(local, listener)| {
            let mut remote = to(listener);
            if local.starts_with("[::ffff:") {
                // An IPv6 socket reaches an IPv4 address through its mapped spelling.
                remote = format!("[::ffff:127.0.0.1]:{}", remote.port())
                    .parse()
                    .expect("addr");
            }
            let client = connect_from(local.parse().expect("addr"), remote);
            assert_eq!(client.local_addr().expect("addr").port(), port);
            accept(listener, client)
        })
        .collect::<Vec<Pair>>();
        let outbound_ends = outbound
            .iter()
            .map(|(client, _)| {
                (
                    client.local_addr().expect("addr"),
                    client.peer_addr().expect("addr"),
                )
            })
            .collect();
        Self {
            port,
            inbound,
            outbound,
            outbound_ends,
            _listeners: vec![main, other_v4, other_v6, other_mapped],
        }
    }

    /// Local ports of the inbound clients: the remote ports of the server ends on P.
    fn inbound_client_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .inbound
            .iter()
            .map(|(client, _)| client.local_addr().expect("addr").port())
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Every outbound connection still carries a byte each way.
    fn check_outbound_open(&mut self, context: &str) {
        for ((client, server), (local, remote)) in self.outbound.iter_mut().zip(&self.outbound_ends)
        {
            let ends = format!("{local} -> {remote}");
            client
                .write_all(b"o")
                .unwrap_or_else(|e| panic!("{context}: outbound {ends}: write: {e}"));
            let mut byte = [0u8; 1];
            server
                .read_exact(&mut byte)
                .unwrap_or_else(|e| panic!("{context}: outbound {ends}: the far end reads: {e}"));
            server.write_all(b"i").expect("the far end writes");
            client
                .read_exact(&mut byte)
                .unwrap_or_else(|e| panic!("{context}: outbound {ends}: read: {e}"));
            assert_eq!(&byte, b"i");
        }
    }

    /// Every inbound client reads a reset (or, at worst, end of stream): closed.
    fn check_inbound_closed(&mut self, context: &str) {
        for (client, _) in &mut self.inbound {
            let mut buf = [0u8; 16];
            match client.read(&mut buf) {
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
                Ok(0) => {}
                other => panic!("{context}: an inbound client read {other:?}, not a reset"),
            }
        }
    }
}

fn post(agent: &Agent, path: &str) -> (u16, serde_json::Value) {
    common::http::curl_json("POST", &format!("{}{path}", agent.url))
}

/// Remote ports of a list of peers (`{"remote": "ip:port", ...}`), sorted.
fn remote_ports(peers: &serde_json::Value) -> Vec<u16> {
    let mut ports: Vec<u16> = peers
        .as_array()
        .unwrap_or_else(|| panic!("a list of peers: {peers}"))
        .iter()
        .map(|peer| {
            peer["remote"]
                .as_str()
                .and_then(|remote| remote.parse::<SocketAddr>().ok())
                .unwrap_or_else(|| panic!("a remote address: {peer}"))
                .port()
        })
        .collect();
    ports.sort_unstable();
    ports
}

/// The agent with `--close-method method`; a forced close of port P at a 1 s deadline.
fn forced_close_leaves_outbound_connections(method: &str) {
    let agent = Agent::start(&["--close-method", method]);
    let mut setup = Setup::open();
    let port = setup.port;
    // The socket tables list all seven on local port P; the agent counts the four inbound.
    assert_eq!(
        common::ss::ss_count(port, None),
        7,
        "ss: 4 inbound + 3 outbound"
    );
    agent.expect_active(port, 4);
    let inbound_ports = setup.inbound_client_ports();
    let (status, connections) = agent.get_json(&format!("/connections?port={port}&peers=true"));
    assert_eq!(status, 200, "{connections}");
    // Every endpoint's connections (the IPv4 and the IPv6 one).
    let listed: Vec<serde_json::Value> = connections["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("endpoints: {connections}"))
        .iter()
        .filter_map(|endpoint| endpoint["peers"].as_array())
        .flatten()
        .cloned()
        .collect();
    let listed = serde_json::Value::Array(listed);

    let started = Instant::now();
    let (status, record) = post(
        &agent,
        &format!("/drain?port={port}&timeout=1s&on_timeout=close"),
    );
    assert_eq!(status, 201, "{record}");
    let ended = loop {
        let (_, drains) = agent.get_json("/drains");
        if let Some(ended) = drains["recent"]
            .as_array()
            .and_then(|recent| recent.iter().find(|drain| drain["id"] == record["id"]))
        {
            break ended.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the drain did not end: {drains}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    assert_eq!(ended["result"], "closed_at_deadline", "{ended}");
    // The sockets first: what the finding was about.
    setup.check_inbound_closed(method);
    setup.check_outbound_open(method);
    assert_eq!(
        common::ss::ss_count(port, None),
        3,
        "ss: the 3 outbound remain"
    );
    agent.expect_active(port, 0);
    assert_eq!(
        ended["closed_by_agent"], 4,
        "{method}: the four inbound connections closed, nothing else: {ended}"
    );
    // What the agent showed as the connections left.
    assert_eq!(
        remote_ports(&listed),
        inbound_ports,
        "/connections?peers=true lists the inbound connections only: {connections}"
    );
    assert_eq!(
        remote_ports(&ended["peers_at_end"]),
        inbound_ports,
        "peers left at the end are the inbound connections only: {ended}"
    );
    println!(
        "{method}: drain ended {took:?} after it started: 4 inbound reset, 3 outbound from port {port} open"
    );
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn bpf_forced_close_leaves_outbound_connections_from_the_port() {
    if !kernel_available("bpf_forced_close_leaves_outbound_connections_from_the_port") {
        return;
    }
    forced_close_leaves_outbound_connections("bpf-sock-destroy");
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn netlink_forced_close_leaves_outbound_connections_from_the_port() {
    if !kernel_available("netlink_forced_close_leaves_outbound_connections_from_the_port") {
        return;
    }
    forced_close_leaves_outbound_connections("netlink");
}

fn load_kernel() -> Kernel {
    common::small_kernel(None, true)
}

/// Each guard on its own, in-process: `Kernel::close_connections` given the outbound
/// connections as targets (as the old listing named them) closes none, with either method;
/// and `destroy_sockets` given them directly (no user-space filter) leaves them alone by its
/// own check, while an inbound one given the same way is closed.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn each_guard_alone_leaves_outbound_connections() {
    if !kernel_available("each_guard_alone_leaves_outbound_connections") {
        return;
    }
    let mut kernel = load_kernel();
    assert!(
        kernel.can_close_with_bpf(),
        "bpf_sock_destroy() should work on this kernel: {:?}",
        kernel.bpf_close_problem()
    );
    let mut setup = Setup::open();
    let ours = netns::inode_of(Path::new("/proc/self/ns/net")).expect("our netns");
    let path = netns::all_namespaces()
        .expect("scan")
        .remove(&ours)
        .expect("our namespace is found");
    let outbound = setup.outbound_ends.clone();
    let as_peers: Vec<Peer> = outbound
        .iter()
        .map(|(local, remote)| Peer {
            remote: *remote,
            local: *local,
            age_ms: None,
            idle_ms: 0,
            recv_queue: 0,
            send_queue: 0,
            awaiting_reply: false,
            busy: false,
        })
        .collect();
    for method in [CloseMethod::Netlink, CloseMethod::Bpf] {
        let closed = kernel
            .close_connections(&Filter::port(setup.port), &as_peers, method)
            .expect("close");
        assert_eq!(closed, 0, "{method:?}: outbound targets {outbound:?}");
        setup.check_outbound_open(&format!("{method:?} given outbound targets"));
    }
    let closed = kernel
        .close_with_bpf_unfiltered(&path, &outbound)
        .expect("run the iterator");
    assert_eq!(
        closed, 0,
        "outbound targets {outbound:?} must be left alone"
    );
    setup.check_outbound_open("iterator given outbound targets");
    // The positive control: an inbound connection named the same way is closed.
    let (client, server) = &setup.inbound[0];
    let inbound = (
        server.local_addr().expect("addr"),
        server.peer_addr().expect("addr"),
    );
    let (mut client, _server) = (client.try_clone().expect("clone"), server);
    let closed = kernel
        .close_with_bpf_unfiltered(&path, &[inbound])
        .expect("run the iterator");
    assert_eq!(closed, 1, "the inbound target {inbound:?} is closed");
    let mut buf = [0u8; 1];
    let reset = client.read(&mut buf);
    assert!(
        matches!(&reset, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{reset:?}"
    );
}
