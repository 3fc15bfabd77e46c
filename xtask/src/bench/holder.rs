//! Holding more sockets than one process may open.
//!
//! The hard `RLIMIT_NOFILE` can be low (20,000 here) and raising it needs CAP_SYS_RESOURCE,
//! which a container may not have; 100k connections are 200k sockets. So the benchmark
//! forks small holder processes: it establishes connections in batches, hands both ends to
//! a holder over a unix socket (`SCM_RIGHTS`), and closes its own copies. A holder keeps
//! what it receives until the socket to it closes, then resets every connection (no
//! TIME_WAIT left behind) and exits; or, told so first ([`HeldConnections::close_gracefully`]),
//! closes them the usual way, each client end before its server end.

use std::{
    net::{Ipv4Addr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::net::Pairs;

/// Sockets one holder keeps (below a 20,000 fd limit, with room for stdio and the like).
const PER_HOLDER: usize = 18_000;
/// File descriptors per message (the kernel's limit is 253).
const PER_MESSAGE: usize = 200;

struct Holder {
    pid: libc::pid_t,
    socket: Option<OwnedFd>,
    held: usize,
}

impl Holder {
    fn spawn() -> Result<Self> {
        let mut ends = [0; 2];
        // SAFETY: valid out-array of two fds.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                ends.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("socketpair()");
        }
        // SAFETY: fresh fds from socketpair, owned here.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        // Allocated before the fork: the child must not allocate (the parent may have
        // other threads holding the allocator's locks).
        let mut store: Vec<RawFd> = Vec::with_capacity(PER_HOLDER);
        // SAFETY: fork; the child only makes syscalls and writes into `store`'s
        // preallocated space, then leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork()");
        }
        if pid == 0 {
            let socket = theirs.into_raw_fd();
            hold(socket, &mut store);
        }
        drop(theirs);
        Ok(Self {
            pid,
            socket: Some(ours),
            held: 0,
        })
    }

    fn send(&mut self, fds: &[RawFd]) -> Result<()> {
        let socket = self.socket.as_ref().context("holder already closed")?;
        for chunk in fds.chunks(PER_MESSAGE) {
            send_fds(socket.as_raw_fd(), chunk)?;
        }
        self.held += fds.len();
        Ok(())
    }

    /// Tells the holder to close its connections gracefully (FIN, no reset) when it is
    /// finished: a message with no fds and [`GRACEFUL`] as its byte.
    fn graceful(&mut self) -> Result<()> {
        let socket = self.socket.as_ref().context("holder already closed")?;
        let byte = [GRACEFUL];
        // SAFETY: a valid fd and buffer of the length given.
        let sent = unsafe { libc::send(socket.as_raw_fd(), byte.as_ptr().cast(), 1, 0) };
        if sent != 1 {
            return Err(std::io::Error::last_os_error())
                .context("cannot tell a holder to close gracefully (send)");
        }
        Ok(())
    }

    /// Closes the socket (the holder closes its connections and exits) and reaps it.
    fn finish(&mut self) {
        if self.socket.take().is_none() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut status = 0;
            // SAFETY: our own child.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if rc != 0 || Instant::now() > deadline {
                if rc == 0 {
                    // SAFETY: our own, unreaped child.
                    unsafe {
                        libc::kill(self.pid, libc::SIGKILL);
                        libc::waitpid(self.pid, &mut status, 0);
                    }
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The byte of the message that asks a holder to close without resets (other messages carry
/// `b'f'` and fds).
const GRACEFUL: u8 = b'g';

/// The holder's life: receive fds until EOF, then close them all (reset, unless told to
/// close gracefully) and exit.
fn hold(socket: RawFd, store: &mut Vec<RawFd>) -> ! {
    // Drop everything inherited (the parent's connections, listeners, agent pipes) so
    // that the parent's closes still close.
    // SAFETY: close_range on fds this process does not use; `socket` is kept.
    unsafe {
        if socket > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (socket - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (socket + 1) as u32, u32::MAX, 0u32);
    }
    let mut graceful = false;
    loop {
        let mut received = [0 as RawFd; PER_MESSAGE];
        match receive_fds(socket, &mut received) {
            None => break,
            Some((_, GRACEFUL)) => graceful = true,
            Some((count, _)) => {
                for fd in &received[..count] {
                    if store.len() < store.capacity() {
                        store.push(*fd);
                    }
                }
            }
        }
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // In the order received: each batch's client ends came before its server ends.
    for fd in store.iter() {
        // SAFETY: fds we received and own; a valid linger struct.
        unsafe {
            if !graceful {
                libc::setsockopt(
                    *fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            libc::close(*fd);
        }
    }
    // SAFETY: leaving the forked child without running the parent's destructors.
    unsafe { libc::_exit(0) }
}

/// Room for PER_MESSAGE fds in a control message, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64 + PER_MESSAGE * 4]);

fn send_fds(socket: RawFd, fds: &[RawFd]) -> Result<()> {
    let mut byte = [b'f'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = ControlBuffer([0; 64 + PER_MESSAGE * 4]);
    let data_len = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.0.as_mut_ptr().cast();
    message.msg_controllen = space;
    // SAFETY: the control buffer holds `space` bytes (checked below), and CMSG_* walk
    // within it.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&raw const message);
        if header.is_null() || space > control.0.len() {
            bail!("control buffer too small");
        }
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(data_len) as usize;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(header).cast::<RawFd>(),
            fds.len(),
        );
        if libc::sendmsg(socket, &raw const message, 0) < 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot hand sockets to a holder (sendmsg)");
        }
    }
    Ok(())
}

/// Receives one message's fds into `out` and says how many, with the message's byte; `None`
/// on EOF or error.
fn receive_fds(socket: RawFd, out: &mut [RawFd; PER_MESSAGE]) -> Option<(usize, u8)> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = ControlBuffer([0; 64 + PER_MESSAGE * 4]);
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.0.as_mut_ptr().cast();
    message.msg_controllen = control.0.len();
    // SAFETY: valid message buffers.
    let read = unsafe { libc::recvmsg(socket, &raw mut message, libc::MSG_CMSG_CLOEXEC) };
    if read <= 0 {
        return None;
    }
    let mut count = 0;
    // SAFETY: CMSG_* walk the control data the kernel filled in.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&raw const message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let fds = (bytes / size_of::<RawFd>()).min(PER_MESSAGE - count);
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(header).cast::<RawFd>(),
                    out.as_mut_ptr().add(count),
                    fds,
                );
                count += fds;
            }
            header = libc::CMSG_NXTHDR(&raw const message, header);
        }
    }
    Some((count, byte[0]))
}

/// Established connections held by holder processes.
#[derive(Default)]
pub struct HeldConnections {
    holders: Vec<Holder>,
    count: usize,
}

impl HeldConnections {
    pub fn len(&self) -> usize {
        self.count
    }

    /// Adds `count` connections to `listener` (bound to 0.0.0.0), spread over
    /// `destinations`.
    pub fn add(
        &mut self,
        listener: &TcpListener,
        destinations: &[Ipv4Addr],
        count: usize,
        deadline: Instant,
    ) -> Result<()> {
        let mut left = count;
        while left > 0 {
            if self.holders.last().is_none_or(|h| h.held + 2 > PER_HOLDER) {
                self.holders.push(Holder::spawn()?);
            }
            let holder = self.holders.last_mut().context("no holder")?;
            let room = (PER_HOLDER - holder.held) / 2;
            let batch = left.min(room).min(4_000);
            let mut pairs = Pairs::default();
            // Rotate the destinations so batches do not all start at the first one.
            let offset = self.count % destinations.len().max(1);
            let mut rotated = destinations.to_vec();
            rotated.rotate_left(offset);
            pairs.establish(listener, &rotated, batch, deadline)?;
            let fds: Vec<RawFd> = pairs
                .clients
                .iter()
                .map(|s| s.as_raw_fd())
                .chain(pairs.servers.iter().map(|s| s.as_raw_fd()))
                .collect();
            holder.send(&fds)?;
            // Our copies go; the holder's keep the connections open.
            drop(pairs);
            self.count += batch;
            left -= batch;
        }
        Ok(())
    }

    /// Closes every connection the usual way, client end first (the holders exit one after
    /// the other; the client ends are left in TIME_WAIT).
    pub fn close_gracefully(mut self) -> Result<()> {
        for holder in &mut self.holders {
            holder.graceful()?;
        }
        for holder in &mut self.holders {
            holder.finish();
        }
        Ok(())
    }

    /// Resets every connection (the holders exit).
    pub fn close(mut self) {
        for holder in &mut self.holders {
            holder.finish();
        }
    }
}
