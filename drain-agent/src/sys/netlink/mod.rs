//! A netlink socket to the kernel, opened and closed per call: send a request, read the
//! answer of a dump (multipart, until `NLMSG_DONE`) or the ack of a command. Through
//! `rustix` (no `unsafe` here); the bytes themselves are built and read in [`wire`].
//!
//! Used for the socket tables (`NETLINK_SOCK_DIAG`, [`crate::sys::sockdiag`]) and the
//! interface addresses (`NETLINK_ROUTE`, [`crate::sys::ifaddrs`]); both run in the calling
//! thread's network namespace (the socket's, fixed when it is opened).

pub mod wire;

use std::{io, ops::ControlFlow, os::fd::OwnedFd, time::Duration};

use anyhow::{Context as _, Result, bail};
use rustix::{
    io::Errno,
    net::{
        AddressFamily, RecvAncillaryBuffer, RecvFlags, ReturnFlags, SendFlags, SocketFlags,
        SocketType, netlink, sockopt,
    },
};

use self::wire::{
    Message, Messages, NLM_F_DUMP_INTR, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN,
    error_payload, read_i32,
};

/// At least 32 KiB, as the kernel's own dump code expects of readers (it sizes dump batches by
/// the reader's buffer, up to 32 KiB); a truncated datagram is an error, never skipped.
const RECV_BUFFER: usize = 64 * 1024;
/// The kernel answers synchronously; this only keeps a wedged kernel from hanging the agent.
const RECV_TIMEOUT_S: u64 = 5;

/// The netlink families the agent speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `NETLINK_SOCK_DIAG`: the socket tables (inet_diag).
    SockDiag,
    /// `NETLINK_ROUTE`: links and addresses.
    Route,
}

impl Protocol {
    /// The protocol number for socket(2); `NETLINK_ROUTE` is 0, which rustix spells `None`.
    fn number(self) -> Option<rustix::net::Protocol> {
        match self {
            Protocol::SockDiag => Some(netlink::SOCK_DIAG),
            Protocol::Route => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Protocol::SockDiag => "NETLINK_SOCK_DIAG",
            Protocol::Route => "NETLINK_ROUTE",
        }
    }
}

/// How a dump ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Dump {
    /// `NLMSG_DONE`: every message was handed over.
    Complete,
    /// A message carried `NLM_F_DUMP_INTR`: the table changed while the kernel walked it, so
    /// the answer may be inconsistent. Reading stopped there; the socket must not be reused
    /// for another dump (the rest of this one may still be queued).
    Interrupted,
}

/// A netlink socket; closed on drop.
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    pub fn open(protocol: Protocol) -> Result<Socket> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            protocol.number(),
        )
        .map_err(io::Error::from)
        .with_context(|| format!("cannot open a {} socket", protocol.name()))?;
        sockopt::set_socket_timeout(
            &fd,
            sockopt::Timeout::Recv,
            Some(Duration::from_secs(RECV_TIMEOUT_S)),
        )
        .map_err(io::Error::from)
        .context("cannot set SO_RCVTIMEO on netlink socket")?;
        Ok(Socket { fd })
    }

    /// Sends one request to the kernel (port id 0), whole.
    pub fn send(&self, message: &[u8]) -> Result<()> {
        let kernel = netlink::SocketAddrNetlink::new(0, 0);
        loop {
            let sent = match rustix::net::sendto(&self.fd, message, SendFlags::empty(), &kernel) {
                Ok(sent) => sent,
                Err(Errno::INTR) => continue,
                Err(error) => {
                    return Err(io::Error::from(error)).context("cannot send netlink request");
                }
            };
            if sent != message.len() {
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
            let mut iov = [io::IoSliceMut::new(buf)];
            let got = match rustix::net::recvmsg(
                &self.fd,
                &mut iov,
                &mut RecvAncillaryBuffer::default(),
                RecvFlags::empty(),
            ) {
                Ok(got) => got,
                Err(Errno::INTR) => continue,
                Err(error) => {
                    let error = io::Error::from(error);
                    if error.kind() == io::ErrorKind::WouldBlock {
                        return Err(error).with_context(|| {
                            format!("no answer from the kernel within {RECV_TIMEOUT_S} s")
                        });
                    }
                    return Err(error).context("cannot read netlink answer");
                }
            };
            if got.flags.contains(ReturnFlags::TRUNC) {
                bail!(
                    "netlink answer larger than {} bytes was truncated",
                    buf.len()
                );
            }
            let sender = got
                .address
                .and_then(|address| netlink::SocketAddrNetlink::try_from(address).ok())
                .map_or(0, |address| address.pid());
            if sender != 0 {
                // Not the kernel: unicast to our port id from another process. Ignore it.
                continue;
            }
            return Ok(got.bytes);
        }
    }

    /// Sends the dump request `request` (sequence number `seq`) and hands each message of
    /// the answer to `each`, except netlink's own: `NLMSG_NOOP` is skipped, `NLMSG_DONE` ends
    /// the dump (its payload, when present, is the dump's final status: negative is an
    /// error), `NLMSG_ERROR` with an errno is the kernel refusing the request, `NLMSG_OVERRUN`
    /// (answers lost) and a message of another sequence are errors. `what` names the dump
    /// in errors.
    pub fn dump(
        &self,
        request: &[u8],
        seq: u32,
        what: &str,
        mut each: impl FnMut(&Message<'_>) -> Result<()>,
    ) -> Result<Dump> {
        self.send(request)?;
        self.read_until(|message| {
            if message.seq != seq {
                bail!(
                    "netlink answer for sequence {}, expected {seq}",
                    message.seq
                );
            }
            if message.flags & NLM_F_DUMP_INTR != 0 {
                return Ok(ControlFlow::Break(Dump::Interrupted));
            }
            match message.kind {
                NLMSG_DONE => {
                    if let Ok(status) = read_i32(message.payload, 0)
                        && status < 0
                    {
                        return Err(io::Error::from_raw_os_error(-status))
                            .context("kernel ended the dump with an error");
                    }
                    return Ok(ControlFlow::Break(Dump::Complete));
                }
                NLMSG_ERROR => {
                    let errno = error_payload(message.payload)?;
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(errno))
                            .with_context(|| format!("kernel refused the {what} dump request"));
                    }
                }
                NLMSG_NOOP => {}
                NLMSG_OVERRUN => bail!("netlink overrun: answers were lost"),
                _ => each(&message)?,
            }
            Ok(ControlFlow::Continue(()))
        })
    }

    /// Sends `request` (sequence number `seq`, not a dump) and hands the kernel's one answer to
    /// `answer`: its first message other than netlink's own, or `Err(errno)` when the kernel
    /// refused it (`NLMSG_ERROR`, errno positive).
    pub fn ask<T>(
        &self,
        request: &[u8],
        seq: u32,
        mut answer: impl FnMut(Result<&Message<'_>, i32>) -> Result<T>,
    ) -> Result<T> {
        self.send(request)?;
        self.read_until(|message| {
            if message.seq != seq {
                return Ok(ControlFlow::Continue(()));
            }
            match message.kind {
                NLMSG_NOOP => Ok(ControlFlow::Continue(())),
                NLMSG_ERROR => answer(Err(error_payload(message.payload)?)).map(ControlFlow::Break),
                NLMSG_OVERRUN => bail!("netlink overrun: answers were lost"),
                _ => answer(Ok(&message)).map(ControlFlow::Break),
            }
        })
    }

    /// Reads until the `NLMSG_ERROR` answering `seq`; its errno (positive; 0 is an ack).
    pub fn wait_ack(&self, seq: u32) -> Result<i32> {
        self.read_until(|message| {
            if message.seq != seq {
                return Ok(ControlFlow::Continue(()));
            }
            match message.kind {
                NLMSG_ERROR => error_payload(message.payload).map(ControlFlow::Break),
                NLMSG_NOOP => Ok(ControlFlow::Continue(())),
                other => bail!("unexpected netlink message type {other} before the ack"),
            }
        })
    }

    /// Reads datagrams from the kernel and hands their messages, in order, to `each` until
    /// it breaks with the answer; a malformed message is an error.
    fn read_until<T>(
        &self,
        mut each: impl FnMut(Message<'_>) -> Result<ControlFlow<T>>,
    ) -> Result<T> {
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let len = self.recv(&mut buf)?;
            let datagram = buf.get(..len).context("recvmsg length past buffer")?;
            for message in Messages::new(datagram) {
                if let ControlFlow::Break(answer) = each(message?)? {
                    return Ok(answer);
                }
            }
        }
    }
}
