//! The kernel's own per-socket view of TCP, read through `NETLINK_SOCK_DIAG` (inet_diag, the
//! interface `ss` uses), independent of the eBPF counters.
//!
//! What it is for:
//! - confirming a count before answering "drained": a port is only reported drained when this
//!   dump, too, finds no connection on it (fail closed: any error here is an error, never
//!   "zero sockets");
//! - reading whether the remaining connections are idle or busy (queues and `struct tcp_info`
//!   times: last data sent/received, unacknowledged and not-yet-sent bytes);
//! - closing connections at a deadline ([`destroy`], like `ss -K`: the peer gets a RST).
//!
//! Everything runs in the *calling thread's* network namespace; to look into another one, call
//! from inside [`crate::sys::netns::run_in`]. The socket ([`crate::sys::netlink`]) is opened
//! and closed per call; every length the kernel sends is checked before it is read.
//!
//! Here the questions and their answers; the requests are built in `request.rs`, the answers
//! read in `parse.rs`, a socket's identity (both ways) in `sockid.rs`.

mod parse;
mod request;
mod sockid;

use std::{io, net::SocketAddr};

use anyhow::{Context as _, Result, bail};

use crate::sys::netlink::{Dump, Protocol, Socket};

/// TCP states as the kernel numbers them (include/net/tcp_states.h). A [`Query`] takes a
/// bitmask of them: [`bit`]`(ESTABLISHED) | `[`bit`]`(CLOSE_WAIT)`.
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    /// Also selects the kernel's request sockets (`TCP_NEW_SYN_RECV`), which it reports as this.
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;

    /// The query bit for one state.
    pub const fn bit(state: u8) -> u32 {
        1 << state
    }
}

/// What to dump: TCP sockets whose *local* port is `local_port` and whose state is in `states`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub local_port: u16,
    /// Bitmask of `1 << state` (see [`state::bit`]), e.g. ESTABLISHED|CLOSE_WAIT.
    pub states: u32,
    /// Also ask for `struct tcp_info` ([`TcpSocket::info`]).
    pub with_info: bool,
}

/// One TCP socket as the kernel reports it (`struct inet_diag_msg`).
///
/// Only [`query`] makes these; [`destroy`] needs the identity it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, IPv4 peers of a dual-stack listener) are
    /// folded to IPv4, here and in `remote`.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// One of [`state`].
    pub state: u8,
    /// `idiag_inode`: the socket inode (0 for time-wait and request sockets).
    pub inode: u32,
    /// `idiag_uid`: the user that owns the socket (`sock_i_uid()`, in the initial user
    /// namespace's view: the agent asks from there).
    pub uid: u32,
    /// `idiag_cookie`: the kernel's unique socket id (`SO_COOKIE`).
    pub cookie: u64,
    /// `idiag_rqueue`: for a connection, bytes received and not yet read by the application.
    pub recv_queue: u32,
    /// `idiag_wqueue`: for a connection, bytes written and not yet acknowledged by the peer.
    pub send_queue: u32,
    /// From `INET_DIAG_INFO`, when [`Query::with_info`] and the socket has one (time-wait and
    /// request sockets do not).
    pub info: Option<TcpInfoSummary>,
    /// For an IPv6 listener: whether it is IPv6-only (`IPV6_V6ONLY`, `INET_DIAG_SKV6ONLY`);
    /// if not, it takes IPv4 connections too (dual-stack). `None` for any other socket,
    /// or when the kernel did not say.
    pub v6only: Option<bool>,
    /// The address family the kernel reported (an IPv4 peer of a dual-stack listener is
    /// `AF_INET6`), and `idiag_if`: both go back into [`destroy`]'s request as they came.
    family: u8,
    interface: u32,
}

impl TcpSocket {
    /// The uid of the process that holds this socket, when the socket names one: a full
    /// socket with an inode (a process holds it), established or closing. A time-wait
    /// socket comes back from a lookup with its substate (a process that sent and closed at
    /// once leaves one in `FIN_WAIT2`) and uid 0 (`inet_twsk_diag_fill()`): taken as its
    /// owner, it would make anyone root. It has no inode; neither has a socket whose
    /// process closed it, nor a connection its listener has not accepted yet. Both ends of
    /// a connection are told by it: the agent's callers (`http/identify.rs`) and the
    /// servers its client talks to (`cli/client/owner.rs`).
    pub fn owner(&self) -> Option<u32> {
        let states = state::bit(state::ESTABLISHED)
            | state::bit(state::CLOSE_WAIT)
            | state::bit(state::FIN_WAIT1)
            | state::bit(state::FIN_WAIT2);
        (states & state::bit(self.state) != 0 && self.inode != 0).then_some(self.uid)
    }
}

/// The few `struct tcp_info` fields this agent looks at. Times are milliseconds *ago*.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfoSummary {
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Bytes written by the application and not yet sent (Linux 4.6+).
    pub notsent_bytes: Option<u32>,
    /// Bytes the peer acknowledged over the connection's life (Linux 4.1+).
    pub bytes_acked: Option<u64>,
    /// Bytes received over the connection's life (Linux 4.1+).
    pub bytes_received: Option<u64>,
    /// Segments carrying data sent over the connection's life, retransmissions included
    /// (Linux 4.6+).
    pub data_segs_out: Option<u32>,
}

impl TcpInfoSummary {
    /// Whether the peer's data came after this end's last data: for a request/response
    /// protocol, a request the application has read and not answered yet (it may be
    /// working on it with both queues empty, moving no bytes).
    ///
    /// Either of two signs says so:
    /// - data received and none ever sent. The kernel stamps an accepted socket's last send
    ///   and last receive with the tick it was created in (`tcp_create_openreq_child`), and a
    ///   client's first request nearly always arrives in that same tick (1 to 10 ms): until
    ///   the server answers, the two times below stay equal, and compared alone they would
    ///   call a slow first request idle.
    /// - the last data received more recently than the last data sent.
    ///
    /// One tie is left: a later request that arrives in the same tick as the previous
    /// response was sent shows both times equal, and is not told apart from a response sent
    /// after its request (a fast keep-alive exchange, which must turn idle). Such a request
    /// counts as awaiting nothing, and the connection as idle once silent for the bar.
    /// Taking every tie as awaiting would keep a keep-alive connection whose last response
    /// left in the tick of its request busy forever.
    ///
    /// Any data from the peer counts, not only requests: a WebSocket pong or an HTTP/2
    /// WINDOW_UPDATE after a response keeps the connection awaiting (busy) until this end
    /// sends again. That is the fail-closed side: telling them from a request would need the
    /// protocol.
    pub fn awaiting_reply(&self) -> bool {
        let received = self.bytes_received.is_some_and(|bytes| bytes > 0);
        let sent_nothing = self.data_segs_out == Some(0);
        (received && sent_nothing) || self.last_data_recv_ms < self.last_data_sent_ms
    }
}

/// Every TCP socket (IPv4 and IPv6) in the calling thread's network namespace with the given
/// local port and states.
///
/// The kernel filters by port (inet_diag bytecode) and by state; both are checked again here.
pub fn query(q: &Query) -> Result<Vec<TcpSocket>> {
    query_on(q, Side::Local)
}

/// Which end of a socket the port of a [`Query`] is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Local,
    Remote,
}

/// Every TCP socket in the calling thread's network namespace whose *remote* port is
/// `port`, in `states`: e.g. the client ends of every connection to a listener of this
/// namespace, in one pass (the identify batch: `identify.rs`).
pub fn query_remote_port(port: u16, states: u32) -> Result<Vec<TcpSocket>> {
    query_on(
        &Query {
            local_port: port,
            states,
            with_info: false,
        },
        Side::Remote,
    )
}

fn query_on(q: &Query, side: Side) -> Result<Vec<TcpSocket>> {
    let socket = Socket::open(Protocol::SockDiag)?;
    let mut found = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let shown = family_name(family);
        dump_family(&socket, q, side, family, &mut found).with_context(|| {
            format!(
                "inet_diag dump of {shown} TCP sockets on {} port {}",
                if side == Side::Local {
                    "local"
                } else {
                    "remote"
                },
                q.local_port
            )
        })?;
    }
    // Defence in depth: the kernel already filtered by port (bytecode) and state.
    found.retain(|socket| {
        let port = match side {
            Side::Local => socket.local.port(),
            Side::Remote => socket.remote.port(),
        };
        let wanted = port == q.local_port && q.states & state::bit(socket.state) != 0;
        if !wanted {
            log::warn!(
                "inet_diag returned a socket outside the filter (local {}, remote {}, state {}): skipped",
                socket.local,
                socket.remote,
                socket.state
            );
        }
        wanted
    });
    Ok(found)
}

/// The TCP socket of this network namespace whose local end is `local` and remote end
/// `remote`, if there is one: one lookup in the kernel's hash tables, not a dump (a dump
/// walks every established socket whatever its filter: 40 ms at 100k connections).
///
/// An IPv4 end may belong to an IPv4 socket or to an IPv6 one (IPv4-mapped): both are asked.
/// Time-wait and request sockets come back too (with state, uid and inode of their own).
pub fn find_one(local: SocketAddr, remote: SocketAddr) -> Result<Option<TcpSocket>> {
    let socket = Socket::open(Protocol::SockDiag)?;
    let families: &[u8] = if local.is_ipv4() && remote.is_ipv4() {
        &[libc::AF_INET as u8, libc::AF_INET6 as u8]
    } else {
        &[libc::AF_INET6 as u8]
    };
    for (seq, &family) in (1..).zip(families) {
        let request = request::exact(family, sockid::SockId::of_ends(family, local, remote)?, seq)?;
        let found = socket
            .ask(&request, seq, |answer| match answer {
                Ok(message) if message.kind == request::SOCK_DIAG_BY_FAMILY => {
                    parse::parse_socket(message.payload, false)
                        .map(Some)
                        .context("malformed inet_diag_msg")
                }
                Ok(message) => bail!("unexpected netlink message type {}", message.kind),
                Err(libc::ENOENT) => Ok(None),
                Err(errno) => Err(io::Error::from_raw_os_error(errno))
                    .context("the kernel refused the lookup"),
            })
            .with_context(|| {
                format!(
                    "inet_diag lookup of the {} TCP socket {local} -> {remote}",
                    family_name(family)
                )
            })?;
        // Defence in depth: the kernel found it by these ends.
        if let Some(found) = found.filter(|found| found.local == local && found.remote == remote) {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Whether the socket tables can be read here (the `inet_diag` and `tcp_diag` modules, which
/// a host loads on demand): the agent confirms the counts it cannot vouch for with them.
/// Without them such a count waits for the next walk (fail closed, but late).
pub fn check_readable() -> Result<()> {
    query(&Query {
        local_port: 1,
        states: state::bit(state::LISTEN),
        with_info: false,
    })
    .map(drop)
    .context("the kernel's socket tables (inet_diag) cannot be read")
}

/// Closes one socket (`SOCK_DESTROY`, like `ss -K`): the kernel aborts it and the peer gets a
/// RST; the owning process sees `ECONNABORTED` on its next call.
///
/// Needs `CAP_NET_ADMIN` in the socket's network namespace and a kernel built with
/// `CONFIG_INET_DIAG_DESTROY`. A failure carries the kernel's errno as an [`io::Error`] in its
/// chain (`ENOENT`: the socket is already gone, or its identity changed).
pub fn destroy(sock: &TcpSocket) -> Result<()> {
    let seq = 1;
    let request = request::destroy(sock, seq)?;
    let socket = Socket::open(Protocol::SockDiag)?;
    let what = format!(
        "SOCK_DESTROY of TCP {} -> {} (cookie {})",
        sock.local, sock.remote, sock.cookie
    );
    socket.send(&request).with_context(|| what.clone())?;
    let errno = socket.wait_ack(seq).with_context(|| what.clone())?;
    if errno == 0 {
        return Ok(());
    }
    let error = io::Error::from_raw_os_error(errno);
    let why = match errno {
        libc::EOPNOTSUPP => "kernel built without CONFIG_INET_DIAG_DESTROY",
        libc::EPERM | libc::EACCES => "needs CAP_NET_ADMIN in the socket's network namespace",
        libc::ENOENT => "no such socket (already closed, or not this network namespace)",
        _ => "kernel refused",
    };
    Err(anyhow::Error::new(error).context(format!("{what}: {why}")))
}
/// Dumps one family's sockets as the kernel filtered them for `q` into `found`.
fn dump_family(
    socket: &Socket,
    q: &Query,
    side: Side,
    family: u8,
    found: &mut Vec<TcpSocket>,
) -> Result<()> {
    let seq = u32::from(family);
    let request = request::dump(q, side, family, seq)?;
    let dump = socket.dump(&request, seq, "inet_diag", |message| {
        if message.kind != request::SOCK_DIAG_BY_FAMILY {
            bail!("unexpected netlink message type {}", message.kind);
        }
        let socket =
            parse::parse_socket(message.payload, q.with_info).context("malformed inet_diag_msg")?;
        if socket.family != family {
            bail!(
                "asked for {} sockets, the kernel sent {}",
                family_name(family),
                family_name(socket.family)
            );
        }
        found.push(socket);
        Ok(())
    })?;
    if dump == Dump::Interrupted {
        bail!("the kernel reports the dump was interrupted (inconsistent); retry");
    }
    Ok(())
}

fn family_name(family: u8) -> &'static str {
    match family as i32 {
        libc::AF_INET => "IPv4",
        libc::AF_INET6 => "IPv6",
        _ => "unknown-family",
    }
}

#[cfg(test)]
mod tests;
