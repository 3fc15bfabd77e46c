//! Closing connections at a drain's deadline (`Kernel::close_connections`), with each
//! method, against real sockets: in this test's network namespace and in one made for it.
//! Each test opens a loopback listener with three connections, closes two of them by their
//! two ends, and checks that exactly those two clients read a reset, that the third still
//! carries data both ways, that `ss` no longer shows the two, and that the handler
//! un-counted them.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::Mutex,
    time::Duration,
};

use common::{Netns, kernel_available};
use drain_agent::{
    drain_rule::Peer,
    kernel::{Kernel, destroy::CloseMethod},
    sys::netns,
    tracker::{Counts as _, Filter},
};

/// One loaded `Kernel` at a time: each parses the kernel's BTF (tens of MiB).
static ONE_KERNEL_AT_A_TIME: Mutex<()> = Mutex::new(());

fn load_kernel() -> Kernel {
    common::small_kernel(None, true)
}

/// A listener on 127.0.0.1 and three connections to it: (client, server end) pairs.
struct Connections {
    port: u16,
    pairs: Vec<(TcpStream, TcpStream)>,
}

impl Connections {
    fn open() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let pairs = (0..3)
            .map(|_| {
                let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                let (server, _) = listener.accept().expect("accept");
                client
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                server
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                (client, server)
            })
            .collect();
        // The listener may go: established connections do not need it.
        Self { port, pairs }
    }

    /// The first two connections, as the agent's answers name them.
    fn victims(&self) -> Vec<Peer> {
        self.pairs[..2]
            .iter()
            .map(|(client, server)| Peer {
                remote: client.local_addr().expect("addr"),
                local: server.local_addr().expect("addr"),
                age_ms: None,
                idle_ms: 0,
                recv_queue: 0,
                send_queue: 0,
                awaiting_reply: false,
                busy: false,
            })
            .collect()
    }

    fn client_ports(&self) -> Vec<u16> {
        self.pairs
            .iter()
            .map(|(client, _)| client.local_addr().expect("addr").port())
            .collect()
    }

    /// The two victims' clients read a reset; the third connection still works both ways.
    fn check(&mut self) {
        for (client, _) in &mut self.pairs[..2] {
            let mut buf = [0u8; 16];
            let error = client.read(&mut buf).expect_err("a reset, not data or EOF");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        }
        let (client, server) = &mut self.pairs[2];
        client.write_all(b"ping").expect("client writes");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).expect("server reads");
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").expect("server writes");
        client.read_exact(&mut buf).expect("client reads");
        assert_eq!(&buf, b"pong");
    }
}

/// Client ports of the connections `ss` shows on local port `port` (any state but
/// time-wait and closed), run in the named namespace when given.
fn ss_remote_ports(port: u16, netns: Option<&str>) -> Vec<u16> {
    let filter = format!("( sport = :{port} )");
    let rows = common::ss::ss(
        netns,
        &[
            "-Htn",
            "state",
            "connected",
            "exclude",
            "time-wait",
            &filter,
        ],
    );
    rows.lines()
        // The peer is the last column (there is no process column without -p).
        .filter_map(|line| line.split_whitespace().last()?.parse::<SocketAddr>().ok())
        .map(|peer| peer.port())
        .collect()
}

/// The port's active total in the kernel maps.
fn counted(kernel: &Kernel, port: u16) -> u64 {
    kernel
        .maps()
        .port_state(port)
        .expect("read the totals")
        .expect("kernel maps have totals")
        .active
}

/// Opens three connections (in `namespace` when given), closes two with `method`, and
/// checks the clients, `ss` and the handler's count.
fn close_two_of_three(method: CloseMethod, namespace: Option<&Netns>) {
    let _one = ONE_KERNEL_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut kernel = load_kernel();
    if method == CloseMethod::Bpf {
        assert!(
            kernel.can_close_with_bpf(),
            "bpf_sock_destroy() should work on this kernel: {:?}",
            kernel.bpf_close_problem()
        );
    }
    let mut connections = match namespace {
        Some(namespace) => namespace.run_in(Connections::open),
        None => Connections::open(),
    };
    let name = namespace.map(|namespace| namespace.name.as_str());
    let ports = connections.client_ports();
    let mut before = ss_remote_ports(connections.port, name);
    before.sort_unstable();
    let mut expected = ports.clone();
    expected.sort_unstable();
    assert_eq!(before, expected, "ss before the close");
    // The handler counted the three (loaded before they were opened).
    assert_eq!(counted(&kernel, connections.port), 3);

    // In the made namespace, scope the filter to it; in ours, leave it unscoped: every
    // namespace of the host is then walked.
    let filter = Filter {
        port: connections.port,
        addr: None,
        netns: namespace
            .map(|namespace| netns::inode_of(Path::new(&namespace.path())).expect("netns inode")),
    };
    let closed = kernel
        .close_connections(&filter, &connections.victims(), method)
        .expect("close");
    assert_eq!(closed, 2, "{method:?}");

    connections.check();
    let after = ss_remote_ports(connections.port, name);
    assert_eq!(after, vec![ports[2]], "ss after the close");
    // The handler saw the two move to CLOSE and un-counted them.
    assert_eq!(counted(&kernel, connections.port), 1);

    // Nothing is left to close: a second call closes nothing.
    let again = kernel
        .close_connections(&filter, &connections.victims(), method)
        .expect("close again");
    assert_eq!(again, 0, "{method:?}");
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn bpf_closes_exactly_the_targets() {
    if !kernel_available("bpf_closes_exactly_the_targets") {
        return;
    }
    close_two_of_three(CloseMethod::Bpf, None);
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn netlink_closes_exactly_the_targets() {
    if !kernel_available("netlink_closes_exactly_the_targets") {
        return;
    }
    close_two_of_three(CloseMethod::Netlink, None);
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn bpf_closes_exactly_the_targets_in_another_namespace() {
    if !kernel_available("bpf_closes_exactly_the_targets_in_another_namespace") {
        return;
    }
    let namespace = Netns::new("close-bpf");
    close_two_of_three(CloseMethod::Bpf, Some(&namespace));
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn netlink_closes_exactly_the_targets_in_another_namespace() {
    if !kernel_available("netlink_closes_exactly_the_targets_in_another_namespace") {
        return;
    }
    let namespace = Netns::new("close-nl");
    close_two_of_three(CloseMethod::Netlink, Some(&namespace));
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn targets_outside_the_scope_are_left_alone() {
    if !kernel_available("targets_outside_the_scope_are_left_alone") {
        return;
    }
    let _one = ONE_KERNEL_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut kernel = load_kernel();
    let mut connections = Connections::open();
    let other_port = Filter::port(connections.port.wrapping_add(1));
    for method in [CloseMethod::Bpf, CloseMethod::Netlink] {
        let closed = kernel
            .close_connections(&other_port, &connections.victims(), method)
            .expect("close");
        assert_eq!(closed, 0, "{method:?}");
    }
    // All three still carry data.
    for (client, server) in &mut connections.pairs {
        client.write_all(b"x").expect("write");
        let mut buf = [0u8; 1];
        server.read_exact(&mut buf).expect("read");
    }
}
