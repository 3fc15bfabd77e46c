//! A connection's socket shared between hyper (which reads and writes it) and its slot
//! (which asks how much it has received and not read yet: [`unread_bytes`]).
//!
//! The slot holds a [`Weak`] reference: the socket still closes as soon as the connection
//! ends (hyper drops its [`SharedStream`]), and the slot can never ask a descriptor number
//! that was closed and reused by a newer socket meanwhile.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// A [`TcpStream`] behind an [`Arc`], read and written the way tokio's own `AsyncRead`
/// and `AsyncWrite` for it do: wait for readiness, try, and on `WouldBlock` (which clears
/// the readiness) wait again.
pub struct SharedStream(Arc<TcpStream>);

impl SharedStream {
    pub fn new(stream: TcpStream) -> Self {
        Self(Arc::new(stream))
    }

    /// The socket for its slot; gone once the connection ended.
    pub fn weak(&self) -> Weak<TcpStream> {
        Arc::downgrade(&self.0)
    }
}

/// Bytes received on the socket and not read yet (`FIONREAD`, i.e. `SIOCINQ` for TCP). A
/// connection that ended meanwhile (its slot goes next) reads as nothing pending, as does
/// a failed ioctl: at worst a connection about to go anyway is taken for idle.
pub fn unread_bytes(socket: &Weak<TcpStream>) -> usize {
    socket
        .upgrade()
        .and_then(|stream| rustix::io::ioctl_fionread(&*stream).ok())
        .and_then(|pending| usize::try_from(pending).ok())
        .unwrap_or(0)
}

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(read) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(problem) if problem.kind() == io::ErrorKind::WouldBlock => {}
                Err(problem) => return Poll::Ready(Err(problem)),
            }
        }
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(problem) if problem.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(problem) if problem.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Nothing is buffered here (as for tokio's `TcpStream`).
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shuts the write side down (as tokio's `TcpStream` does).
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            rustix::net::shutdown(&*self.0, rustix::net::Shutdown::Write).map_err(io::Error::from),
        )
    }
}
