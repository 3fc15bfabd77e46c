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
//! from inside [`crate::sys::netns::run_in`]. The socket is a plain `libc` netlink socket, opened and
//! closed per call; every length the kernel sends is checked before it is read.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, anyhow, bail};

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
    /// The address family the kernel reported (an IPv4 peer of a dual-stack listener is
    /// `AF_INET6`), and `idiag_if`: both go back into [`destroy`]'s request as they came.
    family: u8,
    interface: u32,
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
    let socket = DiagSocket::open()?;
    let mut found = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let shown = family_name(family);
        socket.dump(q, side, family, &mut found).with_context(|| {
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
    let id = SockId::of(sock)?;
    let socket = DiagSocket::open()?;
    let seq = 1;
    let request = request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &RequestBody {
            family: sock.family,
            states: u32::MAX,
            ext: 0,
            id,
            bytecode: None,
        },
    )?;
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

// ---- netlink and inet_diag wire format ----
//
// include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h. Everything is built and parsed byte by
// byte: host byte order for netlink and inet_diag integers, network order for ports and
// addresses in `struct inet_diag_sockid`.

/// include/uapi/linux/sock_diag.h
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// include/uapi/linux/netlink.h
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH
const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14)); // ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
/// `sizeof(struct nlmsghdr)`, `sizeof(struct nlattr)`.
const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
/// `sizeof(struct inet_diag_sockid)`, `sizeof(struct inet_diag_req_v2)`,
/// `sizeof(struct inet_diag_msg)`.
const SOCKID_LEN: usize = 48;
const REQ_V2_LEN: usize = 8 + SOCKID_LEN;
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// include/uapi/linux/inet_diag.h: request attribute and extension numbers, bytecode ops.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;
const INET_DIAG_BC_D_GE: u8 = 4;
const INET_DIAG_BC_D_LE: u8 = 5;
/// `sizeof(struct inet_diag_bc_op)`.
const BC_OP_LEN: usize = 4;

/// Offsets into `struct tcp_info` (include/uapi/linux/tcp.h). The struct only ever grows:
/// fields past [`TCPI_BASE_LEN`] are read only when the attribute is long enough.
const TCPI_UNACKED: usize = 24;
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_LAST_ACK_RECV: usize = 56;
/// Everything up to and including `tcpi_last_ack_recv` (Linux 2.6 already had it).
const TCPI_BASE_LEN: usize = TCPI_LAST_ACK_RECV + 4;
/// `__u64 tcpi_bytes_acked`, `tcpi_bytes_received` (Linux 4.1).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;
/// `__u32 tcpi_notsent_bytes` (Linux 4.6).
const TCPI_NOTSENT_BYTES: usize = 144;

/// At least 32 KiB, as the kernel's own dump code expects of readers (it sizes dump batches by
/// the reader's buffer, up to 32 KiB); a truncated datagram is an error, never skipped.
const RECV_BUFFER: usize = 64 * 1024;
/// The kernel answers synchronously; this only keeps a wedged kernel from hanging the agent.
// i64 rather than libc::time_t, which the libc crate deprecates on musl (static builds);
// time_t is 64 bits on every target the agent is built for.
const RECV_TIMEOUT_S: i64 = 5;

/// `struct inet_diag_sockid`, in host terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    /// Network byte order; IPv4 uses the first 4 bytes.
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: u64,
}

impl SockId {
    /// The identity the kernel reported for `sock`, rebuilt from its (possibly folded) addresses.
    fn of(sock: &TcpSocket) -> Result<SockId> {
        let address = |addr: SocketAddr| -> Result<[u8; 16]> {
            let mut raw = [0u8; 16];
            match (sock.family as i32, addr.ip()) {
                (libc::AF_INET, IpAddr::V4(v4)) => raw[..4].copy_from_slice(&v4.octets()),
                (libc::AF_INET6, IpAddr::V4(v4)) => raw = v4.to_ipv6_mapped().octets(),
                (libc::AF_INET6, IpAddr::V6(v6)) => raw = v6.octets(),
                (family, ip) => bail!("address {ip} does not fit family {family}"),
            }
            Ok(raw)
        };
        Ok(SockId {
            sport: sock.local.port(),
            dport: sock.remote.port(),
            src: address(sock.local)?,
            dst: address(sock.remote)?,
            interface: sock.interface,
            cookie: sock.cookie,
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sport.to_be_bytes());
        out.extend_from_slice(&self.dport.to_be_bytes());
        out.extend_from_slice(&self.src);
        out.extend_from_slice(&self.dst);
        out.extend_from_slice(&self.interface.to_ne_bytes());
        // `__u32 idiag_cookie[2]`: low half first (net/core/sock_diag.c sock_diag_save_cookie).
        out.extend_from_slice(&(self.cookie as u32).to_ne_bytes());
        out.extend_from_slice(&((self.cookie >> 32) as u32).to_ne_bytes());
    }

    fn read(raw: &[u8]) -> Result<SockId> {
        let cookie_low = u64::from(read_u32(raw, 40)?);
        let cookie_high = u64::from(read_u32(raw, 44)?);
        Ok(SockId {
            sport: u16::from_be_bytes(read_array(raw, 0)?),
            dport: u16::from_be_bytes(read_array(raw, 2)?),
            src: read_array(raw, 4)?,
            dst: read_array(raw, 20)?,
            interface: read_u32(raw, 36)?,
            cookie: cookie_low | cookie_high << 32,
        })
    }
}

/// `struct inet_diag_req_v2` plus its optional bytecode attribute.
struct RequestBody<'a> {
    family: u8,
    states: u32,
    ext: u8,
    id: SockId,
    bytecode: Option<&'a [u8]>,
}

/// One netlink message: `struct nlmsghdr`, `struct inet_diag_req_v2`, attributes.
fn request(kind: u16, flags: u16, seq: u32, body: &RequestBody<'_>) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(NLMSG_HDRLEN + REQ_V2_LEN + 64);
    out.extend_from_slice(&[0; 4]); // nlmsg_len, filled in below
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it in
    out.push(body.family);
    out.push(libc::IPPROTO_TCP as u8);
    out.push(body.ext);
    out.push(0); // pad
    out.extend_from_slice(&body.states.to_ne_bytes());
    body.id.write(&mut out);
    if let Some(bytecode) = body.bytecode {
        let len = u16::try_from(NLA_HDRLEN + bytecode.len()).context("bytecode too long")?;
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        out.extend_from_slice(bytecode);
        out.resize(align4(out.len()), 0);
    }
    let total = u32::try_from(out.len()).context("request too long")?;
    out[..4].copy_from_slice(&total.to_ne_bytes());
    Ok(out)
}

/// inet_diag bytecode accepting exactly local port `port` (net/ipv4/inet_diag.c,
/// `inet_diag_bc_run`): `S_GE port` then `S_LE port`. Each comparison op is followed by an op
/// whose `no` field carries the port; `yes` steps over both, `no` jumps to 4 bytes past the end,
/// which ends the program with len != 0: reject. (`inet_diag_bc_audit` accepts `no` up to
/// `len + 4` for exactly this; `ss` builds the same program.)
fn port_bytecode(port: u16, side: Side) -> [u8; 4 * BC_OP_LEN] {
    let (ge, le) = match side {
        Side::Local => (INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE),
        Side::Remote => (INET_DIAG_BC_D_GE, INET_DIAG_BC_D_LE),
    };
    let op = |code: u8, yes: usize, no: usize| -> [u8; BC_OP_LEN] {
        // All values are below 20; the casts cannot truncate.
        let no = (no as u16).to_ne_bytes();
        [code, yes as u8, no[0], no[1]]
    };
    let operand = {
        let port = port.to_ne_bytes();
        [0, 0, port[0], port[1]]
    };
    let total = 4 * BC_OP_LEN;
    let mut out = [0u8; 4 * BC_OP_LEN];
    let ops = [
        op(ge, 2 * BC_OP_LEN, total + 4),
        operand,
        op(le, 2 * BC_OP_LEN, 2 * BC_OP_LEN + 4),
        operand,
    ];
    for (slot, op) in out.chunks_exact_mut(BC_OP_LEN).zip(ops) {
        slot.copy_from_slice(&op);
    }
    out
}

/// A `NETLINK_SOCK_DIAG` socket; closed on drop.
struct DiagSocket {
    fd: OwnedFd,
}

impl DiagSocket {
    fn open() -> Result<DiagSocket> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error())
                .context("cannot open a NETLINK_SOCK_DIAG socket");
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT_S,
            tv_usec: 0,
        };
        // SAFETY: `fd` is open; the option value points at a timeval of the given size.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error())
                .context("cannot set SO_RCVTIMEO on netlink socket");
        }
        Ok(DiagSocket { fd })
    }

    fn send(&self, message: &[u8]) -> Result<()> {
        // SAFETY: a zeroed sockaddr_nl is valid; nl_pid 0 addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `message` and `kernel` are valid for the lengths passed, for the call.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    message.as_ptr().cast(),
                    message.len(),
                    0,
                    (&raw const kernel).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if sent < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error).context("cannot send netlink request");
            }
            if usize::try_from(sent).ok() != Some(message.len()) {
                bail!(
                    "netlink request sent short: {sent} of {} bytes",
                    message.len()
                );
            }
            return Ok(());
        }
    }

    /// One datagram from the kernel into `buf`; its length.
    fn recv(&self, buf: &mut [u8]) -> Result<usize> {
        loop {
            // SAFETY: a zeroed sockaddr_nl is a valid out-buffer.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: a zeroed msghdr is valid; the pointers are set just below.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_name = (&raw mut from).cast();
            header.msg_namelen = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            header.msg_iov = &raw mut iov;
            header.msg_iovlen = 1;
            // SAFETY: `header` points at `from` and at `iov`, which covers `buf`; all outlive
            // the call and are sized as declared.
            let got = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &raw mut header, 0) };
            if got < 0 {
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        return Err(error).with_context(|| {
                            format!("no answer from the kernel within {RECV_TIMEOUT_S} s")
                        });
                    }
                    _ => return Err(error).context("cannot read netlink answer"),
                }
            }
            if header.msg_flags & libc::MSG_TRUNC != 0 {
                bail!(
                    "netlink answer larger than {} bytes was truncated",
                    buf.len()
                );
            }
            if from.nl_pid != 0 {
                // Not the kernel: unicast to our port id from another process. Ignore it.
                continue;
            }
            return usize::try_from(got).context("negative recvmsg length");
        }
    }

    /// Dumps one family's sockets as the kernel filtered them for `q` into `found`.
    fn dump(&self, q: &Query, side: Side, family: u8, found: &mut Vec<TcpSocket>) -> Result<()> {
        let seq = u32::from(family);
        let bytecode = port_bytecode(q.local_port, side);
        let ext = if q.with_info {
            1 << (INET_DIAG_INFO - 1)
        } else {
            0
        };
        let request = request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            &RequestBody {
                family,
                states: q.states,
                ext,
                id: SockId::default(),
                bytecode: Some(&bytecode),
            },
        )?;
        self.send(&request)?;
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let len = self.recv(&mut buf)?;
            let datagram = buf.get(..len).context("recvmsg length past buffer")?;
            for message in Messages::new(datagram) {
                let message = message?;
                if message.seq != seq {
                    bail!(
                        "netlink answer for sequence {}, expected {seq}",
                        message.seq
                    );
                }
                if message.flags & NLM_F_DUMP_INTR != 0 {
                    bail!("the kernel reports the dump was interrupted (inconsistent); retry");
                }
                match message.kind {
                    NLMSG_DONE => {
                        // The payload, when present, is the dump's final status (int).
                        if let Ok(status) = read_i32(message.payload, 0)
                            && status < 0
                        {
                            return Err(io::Error::from_raw_os_error(-status))
                                .context("kernel ended the dump with an error");
                        }
                        return Ok(());
                    }
                    NLMSG_ERROR => {
                        let errno = error_payload(message.payload)?;
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(errno))
                                .context("kernel refused the inet_diag dump request");
                        }
                    }
                    NLMSG_NOOP => {}
                    NLMSG_OVERRUN => bail!("netlink overrun: answers were lost"),
                    SOCK_DIAG_BY_FAMILY => {
                        let socket = parse_socket(message.payload, q.with_info)
                            .context("malformed inet_diag_msg")?;
                        if socket.family != family {
                            bail!(
                                "asked for {} sockets, the kernel sent {}",
                                family_name(family),
                                family_name(socket.family)
                            );
                        }
                        found.push(socket);
                    }
                    other => bail!("unexpected netlink message type {other}"),
                }
            }
        }
    }

    /// Reads until the `NLMSG_ERROR` answering `seq`; its errno (positive; 0 is an ack).
    fn wait_ack(&self, seq: u32) -> Result<i32> {
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let len = self.recv(&mut buf)?;
            let datagram = buf.get(..len).context("recvmsg length past buffer")?;
            for message in Messages::new(datagram) {
                let message = message?;
                if message.seq != seq {
                    continue;
                }
                match message.kind {
                    NLMSG_ERROR => return error_payload(message.payload),
                    NLMSG_NOOP => {}
                    other => bail!("unexpected netlink message type {other} before the ack"),
                }
            }
        }
    }
}

/// `struct nlmsgerr`'s errno, as a positive number (0: ack).
fn error_payload(payload: &[u8]) -> Result<i32> {
    let error = read_i32(payload, 0).context("NLMSG_ERROR without an error code")?;
    error
        .checked_neg()
        .filter(|errno| *errno >= 0)
        .ok_or_else(|| anyhow!("NLMSG_ERROR with a positive error code {error}"))
}

struct Message<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The netlink messages in one datagram, each length checked.
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(datagram: &'a [u8]) -> Self {
        Messages { rest: datagram }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| -> Result<(Message<'a>, usize)> {
            let len = usize::try_from(read_u32(self.rest, 0)?)?;
            if len < NLMSG_HDRLEN || len > self.rest.len() {
                bail!(
                    "netlink message length {len} outside 16..={} bytes",
                    self.rest.len()
                );
            }
            let message = Message {
                kind: u16::from_ne_bytes(read_array(self.rest, 4)?),
                flags: u16::from_ne_bytes(read_array(self.rest, 6)?),
                seq: read_u32(self.rest, 8)?,
                payload: self
                    .rest
                    .get(NLMSG_HDRLEN..len)
                    .context("netlink payload")?,
            };
            Ok((message, align4(len).min(self.rest.len())))
        })();
        match parsed {
            Ok((message, advance)) => {
                self.rest = self.rest.get(advance..).unwrap_or_default();
                Some(Ok(message))
            }
            Err(error) => {
                self.rest = &[];
                Some(Err(error.context("malformed netlink answer")))
            }
        }
    }
}

/// One `struct inet_diag_msg` and its attributes.
fn parse_socket(payload: &[u8], with_info: bool) -> Result<TcpSocket> {
    if payload.len() < DIAG_MSG_LEN {
        bail!(
            "{} bytes, struct inet_diag_msg needs {DIAG_MSG_LEN}",
            payload.len()
        );
    }
    let family = payload[0];
    let state = payload[1];
    let id = SockId::read(payload.get(4..4 + SOCKID_LEN).context("inet_diag_sockid")?)?;
    let base = 4 + SOCKID_LEN;
    // idiag_expires at base, then rqueue, wqueue, uid, inode.
    let recv_queue = read_u32(payload, base + 4)?;
    let send_queue = read_u32(payload, base + 8)?;
    let uid = read_u32(payload, base + 12)?;
    let inode = read_u32(payload, base + 16)?;
    let address = |raw: [u8; 16], port: u16| -> Result<SocketAddr> {
        let ip = match family as i32 {
            libc::AF_INET => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
            libc::AF_INET6 => {
                let v6 = Ipv6Addr::from(raw);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            }
            other => bail!("address family {other} is neither AF_INET nor AF_INET6"),
        };
        Ok(SocketAddr::new(ip, port))
    };
    let mut info = None;
    if with_info {
        let mut attrs = payload.get(align4(DIAG_MSG_LEN)..).unwrap_or_default();
        while !attrs.is_empty() {
            let len = usize::from(u16::from_ne_bytes(read_array(attrs, 0)?));
            let kind = u16::from_ne_bytes(read_array(attrs, 2)?) & NLA_TYPE_MASK;
            if len < NLA_HDRLEN || len > attrs.len() {
                bail!("attribute length {len} outside 4..={} bytes", attrs.len());
            }
            if kind == INET_DIAG_INFO {
                info = Some(parse_tcp_info(&attrs[NLA_HDRLEN..len]).context("INET_DIAG_INFO")?);
            }
            attrs = attrs.get(align4(len)..).unwrap_or_default();
        }
    }
    Ok(TcpSocket {
        local: address(id.src, id.sport)?,
        remote: address(id.dst, id.dport)?,
        state,
        inode,
        uid,
        cookie: id.cookie,
        recv_queue,
        send_queue,
        info,
        family,
        interface: id.interface,
    })
}

/// The summary fields of a `struct tcp_info` of whatever size this kernel has.
fn parse_tcp_info(raw: &[u8]) -> Result<TcpInfoSummary> {
    if raw.len() < TCPI_BASE_LEN {
        bail!(
            "struct tcp_info of {} bytes, expected at least {TCPI_BASE_LEN}",
            raw.len()
        );
    }
    Ok(TcpInfoSummary {
        last_data_sent_ms: read_u32(raw, TCPI_LAST_DATA_SENT)?,
        last_data_recv_ms: read_u32(raw, TCPI_LAST_DATA_RECV)?,
        last_ack_recv_ms: read_u32(raw, TCPI_LAST_ACK_RECV)?,
        unacked: read_u32(raw, TCPI_UNACKED)?,
        notsent_bytes: read_u32(raw, TCPI_NOTSENT_BYTES).ok(),
        bytes_acked: read_array(raw, TCPI_BYTES_ACKED)
            .ok()
            .map(u64::from_ne_bytes),
        bytes_received: read_array(raw, TCPI_BYTES_RECEIVED)
            .ok()
            .map(u64::from_ne_bytes),
    })
}

fn read_array<const N: usize>(raw: &[u8], at: usize) -> Result<[u8; N]> {
    at.checked_add(N)
        .and_then(|end| raw.get(at..end))
        .and_then(|bytes| bytes.try_into().ok())
        .with_context(|| {
            format!(
                "{N} bytes at offset {at} past the end ({} bytes)",
                raw.len()
            )
        })
}

fn read_u32(raw: &[u8], at: usize) -> Result<u32> {
    read_array(raw, at).map(u32::from_ne_bytes)
}

fn read_i32(raw: &[u8], at: usize) -> Result<i32> {
    read_array(raw, at).map(i32::from_ne_bytes)
}

/// NLMSG_ALIGN / NLA_ALIGN.
const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn family_name(family: u8) -> &'static str {
    match family as i32 {
        libc::AF_INET => "IPv4",
        libc::AF_INET6 => "IPv6",
        _ => "unknown-family",
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
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
    fn connect(
        listener: &TcpListener,
        target: SocketAddr,
        n: usize,
    ) -> Vec<(TcpStream, TcpStream)> {
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
        // SAFETY: plain socket(2), checked below.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: fresh fd owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let off: libc::c_int = 0;
        // SAFETY: valid fd and option buffer of the given size.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&raw const off).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "IPV6_V6ONLY: {}", io::Error::last_os_error());
        // SAFETY: a zeroed sockaddr_in6 is [::]:0.
        let mut any: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        any.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        // SAFETY: valid fd; `any` is a sockaddr_in6 of the given size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const any).cast(),
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        assert_eq!(bound, 0, "bind: {}", io::Error::last_os_error());
        // SAFETY: valid, bound fd.
        assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 16) }, 0);
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
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        if std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1") {
            panic!("{test}: needs root (CAP_NET_ADMIN) and DRAIN_AGENT_REQUIRE_KERNEL=1");
        }
        eprintln!(
            "SKIP {test}: needs root (CAP_NET_ADMIN); set DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead"
        );
        false
    }

    #[test]
    fn bytecode_matches_ss() {
        // Byte for byte what iproute2 6.1 `ss -tn 'sport >= :8080 and sport <= :8080'` sends as
        // INET_DIAG_REQ_BYTECODE (seen with strace): S_GE yes=8 no=20, {port}, S_LE yes=8 no=12,
        // {port}. (`sport = :8080` makes ss send an S_COND hostcond instead.)
        let port = 8080u16.to_ne_bytes();
        let twenty = 20u16.to_ne_bytes();
        let twelve = 12u16.to_ne_bytes();
        let expected = [
            2, 8, twenty[0], twenty[1], 0, 0, port[0], port[1], //
            3, 8, twelve[0], twelve[1], 0, 0, port[0], port[1],
        ];
        assert_eq!(port_bytecode(8080, Side::Local), expected);
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn tcp_info_offsets_match_libc() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(libc::tcp_info, tcpi_unacked), TCPI_UNACKED);
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_last_data_sent),
            TCPI_LAST_DATA_SENT
        );
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_last_data_recv),
            TCPI_LAST_DATA_RECV
        );
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_last_ack_recv),
            TCPI_LAST_ACK_RECV
        );
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_bytes_acked),
            TCPI_BYTES_ACKED
        );
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_bytes_received),
            TCPI_BYTES_RECEIVED
        );
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_notsent_bytes),
            TCPI_NOTSENT_BYTES
        );
    }

    #[test]
    fn short_or_odd_answers_are_errors_not_panics() {
        assert!(parse_socket(&[0; DIAG_MSG_LEN - 1], false).is_err());
        let mut msg = vec![0u8; DIAG_MSG_LEN];
        msg[0] = libc::AF_INET as u8;
        assert!(parse_socket(&msg, false).is_ok());
        // An attribute claiming more bytes than there are.
        msg.extend_from_slice(&[200, 0, 2, 0]);
        assert!(parse_socket(&msg, true).is_err());
        // tcp_info too short for the base fields; then only the base fields: optionals None.
        assert!(parse_tcp_info(&[0; TCPI_BASE_LEN - 1]).is_err());
        let base = parse_tcp_info(&[0; TCPI_BASE_LEN]).expect("base tcp_info");
        assert_eq!((base.notsent_bytes, base.bytes_acked), (None, None));
        // Netlink headers with impossible lengths.
        for datagram in [
            &[1u8, 2, 3][..],
            &[8, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            let first = Messages::new(datagram).next().expect("one item");
            assert!(first.is_err());
        }
    }

    #[test]
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
        let socket = DiagSocket::open().expect("open");
        let mut raw = Vec::new();
        socket
            .dump(&q, Side::Local, libc::AF_INET as u8, &mut raw)
            .expect("dump");
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

    #[test]
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
}
