//! The sock_diag questions asked of this kernel: which sockets a query finds (v4, v6 and
//! v4-mapped, by local and by remote port), their queues and `tcp_info`, and `SOCK_DESTROY`.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
    thread::sleep,
    time::{Duration, Instant},
};

use super::*;

const LIVE: u32 = state::bit(state::ESTABLISHED) | state::bit(state::CLOSE_WAIT);

fn live(port: u16, with_info: bool) -> Vec<TcpSocket> {
    query(&Query {
        local_port: port,
        states: LIVE,
        with_info,
    })
    .expect("sock_diag query")
}

/// `n` connections to `listener` at `target`: (client, server end) pairs.
fn connect(listener: &TcpListener, target: SocketAddr, n: usize) -> Vec<(TcpStream, TcpStream)> {
    (0..n)
        .map(|_| {
            let client = TcpStream::connect(target).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            (client, server)
        })
        .collect()
}

/// A listener on [::]:0 with IPV6_V6ONLY off, whatever net.ipv6.bindv6only says.
fn dual_stack_listener() -> TcpListener {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let fd = rustix::net::socket_with(
        AddressFamily::INET6,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socket");
    sockopt::set_ipv6_v6only(&fd, false).expect("IPV6_V6ONLY");
    let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
    rustix::net::bind(&fd, &any).expect("bind");
    rustix::net::listen(&fd, 16).expect("listen");
    TcpListener::from(fd)
}

/// Polls `check` for up to 2 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "timed out: {what}"
        );
        sleep(Duration::from_millis(10));
    }
}

fn by_remote(sockets: &[TcpSocket], remote: SocketAddr) -> &TcpSocket {
    let matching: Vec<_> = sockets.iter().filter(|s| s.remote == remote).collect();
    assert_eq!(
        matching.len(),
        1,
        "one socket with remote {remote}: {sockets:#?}"
    );
    matching[0]
}

fn root_or_skip(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    crate::test_skip::skip(test, "needs root (CAP_NET_ADMIN)");
    false
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn by_remote_port_finds_exactly_the_client_ends() {
    if !root_or_skip("by_remote_port_finds_exactly_the_client_ends") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("addr");
    let pairs = connect(&listener, target, 3);
    let established = state::bit(state::ESTABLISHED);
    let mut found: Vec<_> = query_remote_port(target.port(), established)
        .expect("query")
        .into_iter()
        .map(|socket| (socket.local, socket.remote))
        .collect();
    found.sort();
    let mut expected: Vec<_> = pairs
        .iter()
        .map(|(client, _)| (client.local_addr().expect("addr"), target))
        .collect();
    expected.sort();
    assert_eq!(found, expected, "the client ends, not the server ends");
}

#[test]
fn finds_exactly_the_server_ends_v4_v6_and_v4_mapped() {
    const N: usize = 3;
    let v4 = TcpListener::bind("127.0.0.1:0").expect("bind v4");
    let v6 = TcpListener::bind("[::1]:0").expect("bind v6");
    let dual = dual_stack_listener();
    let v4_addr = v4.local_addr().expect("addr");
    let v6_addr = v6.local_addr().expect("addr");
    let dual_port = dual.local_addr().expect("addr").port();
    let dual_v4_target: SocketAddr = SocketAddr::from((Ipv4Addr::LOCALHOST, dual_port));
    let v4_pairs = connect(&v4, v4_addr, N);
    let v6_pairs = connect(&v6, v6_addr, N);
    let dual_pairs = connect(&dual, dual_v4_target, N);

    for (listener_addr, pairs) in [
        (v4_addr, &v4_pairs),
        (v6_addr, &v6_pairs),
        (dual_v4_target, &dual_pairs),
    ] {
        let found = live(listener_addr.port(), false);
        assert_eq!(found.len(), N, "{listener_addr}: {found:#?}");
        for (client, server) in pairs {
            let client_local = client.local_addr().expect("client addr");
            let socket = by_remote(&found, client_local);
            assert_eq!(socket.local, listener_addr, "{socket:#?}");
            // std reports the dual-stack server end as [::ffff:127.0.0.1]:port; query folds it.
            let server_local = server.local_addr().expect("server addr");
            let folded = match server_local.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(server_local.ip(), IpAddr::V4),
                v4 => v4,
            };
            assert_eq!(socket.local, SocketAddr::new(folded, server_local.port()));
            assert_eq!(socket.state, state::ESTABLISHED);
            assert_ne!(socket.inode, 0);
            assert_ne!(socket.cookie, 0);
            assert_eq!(socket.info, None, "not asked for");
        }
    }
    // The v4 client of the dual-stack listener is folded to IPv4 but keeps the kernel's family.
    let dual_found = live(dual_port, false);
    assert!(
        dual_found
            .iter()
            .all(|s| s.local.is_ipv4() && s.remote.is_ipv4())
    );
    assert!(dual_found.iter().all(|s| s.family == libc::AF_INET6 as u8));

    // Another port's sockets are not returned; the listeners show up only when asked for.
    let v4_found = live(v4_addr.port(), false);
    assert!(v4_found.iter().all(|s| s.local.port() == v4_addr.port()));
    let listening = query(&Query {
        local_port: v6_addr.port(),
        states: state::bit(state::LISTEN),
        with_info: false,
    })
    .expect("query listeners");
    // Only ours: a test running beside this one may listen on the same port number on
    // another address (a port is free per address), and the query is by port.
    let listening: Vec<_> = listening
        .into_iter()
        .filter(|socket| socket.local.ip() == v6_addr.ip())
        .collect();
    assert_eq!(listening.len(), 1, "{listening:#?}");
    assert_eq!(listening[0].local, v6_addr);

    // Half-closed by the client: the server end is in CLOSE_WAIT and still counted.
    v4_pairs[0]
        .0
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let closing_remote = v4_pairs[0].0.local_addr().expect("addr");
    eventually("CLOSE_WAIT on the server end", || {
        by_remote(&live(v4_addr.port(), false), closing_remote).state == state::CLOSE_WAIT
    });
    assert_eq!(live(v4_addr.port(), false).len(), N);
}

#[test]
fn the_kernel_filters_by_port() {
    let wanted = TcpListener::bind("127.0.0.1:0").expect("bind");
    let other = TcpListener::bind("127.0.0.1:0").expect("bind");
    let _wanted_pairs = connect(&wanted, wanted.local_addr().expect("addr"), 2);
    let _other_pairs = connect(&other, other.local_addr().expect("addr"), 2);
    let port = wanted.local_addr().expect("addr").port();
    let q = Query {
        local_port: port,
        // Every state: without the bytecode this would be every TCP socket here, among them
        // the clients and the other listener.
        states: u32::MAX,
        with_info: false,
    };
    let socket = Socket::open(Protocol::SockDiag).expect("open");
    let mut raw = Vec::new();
    dump_family(&socket, &q, Side::Local, libc::AF_INET as u8, &mut raw).expect("dump");
    assert_eq!(raw.len(), 3, "listener and two server ends: {raw:#?}");
    assert!(raw.iter().all(|s| s.local.port() == port), "{raw:#?}");
}

#[test]
fn queues_and_tcp_info_show_busy_and_idle() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut pairs = connect(&listener, listener.local_addr().expect("addr"), 2);
    let (reader_side, writer_side) = pairs.split_at_mut(1);
    let (unread_client, _unread_server) = &mut reader_side[0];
    let (stalled_client, stalled_server) = &mut writer_side[0];
    let unread_remote = unread_client.local_addr().expect("addr");
    let stalled_remote = stalled_client.local_addr().expect("addr");

    // Data the server application has not read.
    unread_client.write_all(&[7; 1000]).expect("write");
    eventually("recv_queue of 1000", || {
        by_remote(&live(port, false), unread_remote).recv_queue == 1000
    });

    // The server writes into a peer that does not read, until its buffer is full.
    stalled_server.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![1u8; 64 * 1024];
    let mut written = 0usize;
    loop {
        match stalled_server.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(written > 0);
    let found = live(port, true);
    let stalled = by_remote(&found, stalled_remote);
    let info = stalled.info.expect("tcp_info asked for");
    eprintln!("stalled writer: written {written}, {stalled:#?}");
    assert!(stalled.send_queue > 0, "{stalled:#?}");
    assert!(
        info.unacked > 0 || info.notsent_bytes.is_some_and(|b| b > 0),
        "{info:#?}"
    );
    assert!(info.bytes_acked.is_some_and(|b| b > 0), "{info:#?}");
    assert!(
        info.notsent_bytes.is_some(),
        "this kernel has tcpi_notsent_bytes"
    );

    // Silence: last_data_recv grows on the socket that received the 1000 bytes.
    let before = by_remote(&live(port, true), unread_remote)
        .info
        .expect("tcp_info");
    assert_eq!(before.bytes_received, Some(1000));
    sleep(Duration::from_millis(300));
    let after = by_remote(&live(port, true), unread_remote)
        .info
        .expect("tcp_info");
    assert!(
        after.last_data_recv_ms >= before.last_data_recv_ms + 250,
        "before {before:#?} after {after:#?}"
    );
    assert!(after.last_data_sent_ms >= 250, "never sent: {after:#?}");
}

/// `tcp_info` of an accepted socket, `ms` after its last data sent and received.
fn info(sent_ms: u32, recv_ms: u32, received: u64, data_segs_out: u32) -> TcpInfoSummary {
    TcpInfoSummary {
        last_data_sent_ms: sent_ms,
        last_data_recv_ms: recv_ms,
        last_ack_recv_ms: recv_ms,
        unacked: 0,
        notsent_bytes: Some(0),
        bytes_acked: Some(0),
        bytes_received: Some(received),
        data_segs_out: Some(data_segs_out),
    }
}

#[test]
fn a_request_read_and_not_answered_is_awaiting_a_reply() {
    // The first request arrived in the tick the socket was created in: both times equal
    // (the socket's creation counts as its last send), nothing sent.
    assert!(info(5_000, 5_000, 40, 0).awaiting_reply());
    // Or in a later tick: received more recently than "sent".
    assert!(info(5_000, 4_990, 40, 0).awaiting_reply());
    // A keep-alive connection with a request after the last response.
    assert!(info(5_000, 3_000, 80, 1).awaiting_reply());
    // Nothing received: a connection the client opened and has not used.
    assert!(!info(5_000, 5_000, 0, 0).awaiting_reply());
    // Answered: the response left after the request, or in the same tick.
    assert!(!info(3_000, 5_000, 40, 1).awaiting_reply());
    assert!(!info(5_000, 5_000, 40, 1).awaiting_reply());
    // A kernel without the counters: the times alone.
    let old = TcpInfoSummary {
        bytes_received: None,
        data_segs_out: None,
        ..info(5_000, 5_000, 40, 0)
    };
    assert!(!old.awaiting_reply());
    assert!(
        TcpInfoSummary {
            last_data_recv_ms: 10,
            ..old
        }
        .awaiting_reply()
    );
}

#[test]
fn a_first_request_sent_with_the_handshake_is_awaiting_until_answered() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let request = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    client.write_all(request).expect("request");
    let remote = client.local_addr().expect("addr");
    let (mut server, _) = listener.accept().expect("accept");
    let mut read = vec![0; request.len()];
    server.read_exact(&mut read).expect("read the request");
    let socket = by_remote(&live(port, true), remote).clone();
    let info = socket.info.expect("tcp_info asked for");
    assert_eq!(
        (socket.recv_queue, socket.send_queue, info.data_segs_out),
        (0, 0, Some(0)),
        "{socket:#?}"
    );
    assert!(info.awaiting_reply(), "{info:#?}");
    server
        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .expect("answer");
    let mut answer = [0; 64];
    let n = client.read(&mut answer).expect("read the answer");
    assert!(answer[..n].starts_with(b"HTTP/1.1 204"));
    eventually("answered, not awaiting", || {
        let socket = by_remote(&live(port, true), remote).clone();
        socket.send_queue == 0 && socket.info.is_some_and(|info| !info.awaiting_reply())
    });
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn destroy_resets_the_peer_and_the_socket_is_gone() {
    if !root_or_skip("destroy_resets_the_peer_and_the_socket_is_gone") {
        return;
    }
    // One plain IPv4 connection and one IPv4 client of a dual-stack listener (destroyed
    // through its AF_INET6, v4-mapped identity).
    let v4 = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dual = dual_stack_listener();
    let dual_target =
        SocketAddr::from((Ipv4Addr::LOCALHOST, dual.local_addr().expect("addr").port()));
    for (listener, target) in [(&v4, v4.local_addr().expect("addr")), (&dual, dual_target)] {
        let mut pairs = connect(listener, target, 2);
        let victim_remote = pairs[0].0.local_addr().expect("addr");
        let survivor_remote = pairs[1].0.local_addr().expect("addr");
        let found = live(target.port(), false);
        let victim = by_remote(&found, victim_remote).clone();

        destroy(&victim).expect("destroy");

        let client = &mut pairs[0].0;
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        let error = client.read(&mut buf).expect_err("reset, not data or EOF");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");

        let after = live(target.port(), false);
        assert!(
            after.iter().all(|s| s.cookie != victim.cookie),
            "{after:#?}"
        );
        by_remote(&after, survivor_remote);

        // A second destroy finds nothing, and says so with the kernel's errno.
        let again = destroy(&victim).expect_err("already gone");
        let errno = again
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error);
        assert_eq!(errno, Some(libc::ENOENT), "{again:#}");
    }
}

/// Whether an IPv6 listener takes IPv4 too (the drains' gate asks which listeners take a
/// pod's IPv4 address: `kernel/maps.rs` `takes_address`): told for each, and for no other.
#[test]
fn an_ipv6_listeners_v6only_is_told() {
    use rustix::net::sockopt;
    let dual = dual_stack_listener();
    let only = {
        let fd = rustix::net::socket_with(
            rustix::net::AddressFamily::INET6,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        sockopt::set_ipv6_v6only(&fd, true).expect("IPV6_V6ONLY");
        rustix::net::bind(&fd, &SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).expect("bind");
        rustix::net::listen(&fd, 16).expect("listen");
        TcpListener::from(fd)
    };
    let v4 = TcpListener::bind("0.0.0.0:0").expect("bind v4");
    let listening = |listener: &TcpListener| {
        let port = listener.local_addr().expect("addr").port();
        let found = query(&Query {
            local_port: port,
            states: state::bit(state::LISTEN),
            with_info: false,
        })
        .expect("sock_diag query");
        assert_eq!(found.len(), 1, "{found:#?}");
        found[0].v6only
    };
    assert_eq!(listening(&dual), Some(false), "dual-stack [::]");
    assert_eq!(listening(&only), Some(true), "IPv6-only [::]");
    assert_eq!(listening(&v4), None, "an IPv4 listener");
}
