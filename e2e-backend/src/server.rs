//! The accept loop and one thread per connection, with keep-alive and a graceful stop:
//! on shutdown, stop accepting, close idle keep-alive connections at once, finish the requests
//! in flight (answering them with `Connection: close`), then return.

use std::{
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    http::{self, Parsed, Request},
    routes::{self, Answer},
    shutdown::{Shutdown, Wakeup, wait_readable},
};

/// An idle keep-alive connection is closed after this long (nginx's own default is 60 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client has this long to finish sending a request it has started.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters shared by all connections.
#[derive(Default)]
pub struct Stats {
    /// Requests being answered now.
    pub in_flight: AtomicU64,
    /// Of those, streamed (`/slow`) answers: a test takes a backend out of rotation while
    /// one is in flight (`GET /stats` shows it).
    pub streaming: AtomicU64,
    /// Requests answered completely.
    pub served: AtomicU64,
    /// Idle keep-alive connections closed because of shutdown.
    pub idle_closed: AtomicU64,
    /// Answers cut short because the client went away.
    pub aborted: AtomicU64,
    /// Open connections, with a condition variable to wait for zero.
    open: Mutex<u64>,
    all_closed: Condvar,
}

impl Stats {
    pub fn open_connections(&self) -> u64 {
        *self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn connection_opened(&self) {
        *self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
    }

    fn connection_closed(&self) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *open = open.saturating_sub(1);
        if *open == 0 {
            self.all_closed.notify_all();
        }
    }

    /// Waits until no connection is open, at most `limit`; returns how many still are.
    pub fn wait_all_closed(&self, limit: Duration) -> u64 {
        let open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (open, _) = self
            .all_closed
            .wait_timeout_while(open, limit, |open| *open > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *open
    }
}

/// What every connection thread needs.
pub struct Context {
    pub shutdown: Arc<Shutdown>,
    pub stats: Arc<Stats>,
    /// The `X-Backend` header: `ADDRESS VERSION`.
    pub identity: String,
    pub version: String,
}

/// Accepts connections until shutdown is requested, then closes the listener (new
/// connections are refused from then on) and returns.
pub fn accept_until_shutdown(listener: TcpListener, context: &Arc<Context>) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context("cannot make the listener non-blocking")?;
    loop {
        match wait_readable(listener.as_raw_fd(), Some(&context.shutdown), None)
            .context("poll on the listener")?
        {
            Wakeup::Shutdown => return Ok(()),
            Wakeup::Timeout | Wakeup::Readable => {}
        }
        match listener.accept() {
            Ok((stream, _)) => start_connection(stream, context),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            // ECONNABORTED and friends: that one connection is gone; keep accepting.
            Err(error) => eprintln!("{}: accept: {error}", context.identity),
        }
    }
}

fn start_connection(stream: TcpStream, context: &Arc<Context>) {
    context.stats.connection_opened();
    let context = Arc::clone(context);
    let spawned = std::thread::Builder::new()
        .name("connection".into())
        .spawn(move || {
            if let Err(error) = serve_connection(stream, &context) {
                // Resets and timeouts are a client's business; say so and move on.
                eprintln!("{}: connection: {error}", context.identity);
            }
            context.stats.connection_closed();
        });
    if let Err(error) = spawned {
        eprintln!("cannot start a connection thread: {error}");
    }
}

/// Serves requests on one connection until the client closes it, asks to close it, it idles
/// too long, or shutdown finds it idle.
fn serve_connection(mut stream: TcpStream, context: &Context) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let Some(request) = next_request(&mut stream, &mut buffer, context)? else {
            return Ok(());
        };
        context.stats.in_flight.fetch_add(1, Ordering::SeqCst);
        let answered = answer(&mut stream, &request, context);
        context.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        match answered {
            Ok(keep_open) => {
                context.stats.served.fetch_add(1, Ordering::SeqCst);
                if !keep_open {
                    return Ok(());
                }
            }
            Err(error) => {
                context.stats.aborted.fetch_add(1, Ordering::SeqCst);
                return Err(error);
            }
        }
    }
}

/// Reads the next request head (and discards its body). `None`: the connection is over —
/// the client closed it, it idled out, or shutdown found it idle (nothing of a new request
/// received yet).
fn next_request(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    context: &Context,
) -> io::Result<Option<Request>> {
    let mut started = None::<Instant>;
    loop {
        match http::parse_head(buffer) {
            Parsed::Complete(request, used) => {
                buffer.drain(..used);
                discard_body(stream, buffer, request.body_len)?;
                return Ok(Some(request));
            }
            Parsed::Invalid(problem) => {
                let body = format!("{problem}\n");
                let mut out = http::response_head(400, body.len(), &context.identity, true);
                out.extend_from_slice(body.as_bytes());
                stream.write_all(&out)?;
                return Ok(None);
            }
            Parsed::Incomplete => {}
        }
        let idle = buffer.is_empty();
        // While idle, shutdown wakes us; once a request has begun, we read it to the end.
        let (watch_shutdown, limit) = if idle {
            (Some(context.shutdown.as_ref()), IDLE_TIMEOUT)
        } else {
            let begun = *started.get_or_insert_with(Instant::now);
            (None, REQUEST_TIMEOUT.saturating_sub(begun.elapsed()))
        };
        if idle && context.shutdown.requested() {
            context.stats.idle_closed.fetch_add(1, Ordering::SeqCst);
            return Ok(None);
        }
        match wait_readable(stream.as_raw_fd(), watch_shutdown, Some(limit))? {
            Wakeup::Shutdown => {
                context.stats.idle_closed.fetch_add(1, Ordering::SeqCst);
                return Ok(None);
            }
            Wakeup::Timeout => return Ok(None),
            Wakeup::Readable => {}
        }
        let mut chunk = [0; 4096];
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

fn discard_body(stream: &mut TcpStream, buffer: &mut Vec<u8>, body_len: usize) -> io::Result<()> {
    let buffered = body_len.min(buffer.len());
    buffer.drain(..buffered);
    let mut left = (body_len - buffered) as u64;
    if left > 0 {
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        left -= io::copy(&mut (&mut *stream).take(left), &mut io::sink())?;
        stream.set_read_timeout(None)?;
        if left > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "request body cut short",
            ));
        }
    }
    Ok(())
}

/// Writes the answer. `Ok(true)`: the connection may serve another request.
fn answer(stream: &mut TcpStream, request: &Request, context: &Context) -> io::Result<bool> {
    // Decided when the head is written: a request that arrives during shutdown is still
    // answered, and told that the connection ends.
    let close = !request.keep_alive || context.shutdown.requested();
    match routes::route(request, &context.version) {
        Answer::Whole { status, body } => {
            let mut out = http::response_head(status, body.len(), &context.identity, close);
            out.extend_from_slice(&body);
            stream.write_all(&out)?;
        }
        Answer::Streamed { bytes, over } => {
            let head = http::response_head(200, bytes, &context.identity, close);
            context.stats.streaming.fetch_add(1, Ordering::SeqCst);
            let written = write_streamed(stream, head, bytes, over);
            context.stats.streaming.fetch_sub(1, Ordering::SeqCst);
            written?;
        }
        Answer::Stats => {
            let body = format!(
                "in_flight {} streaming {}\n",
                context.stats.in_flight.load(Ordering::SeqCst),
                context.stats.streaming.load(Ordering::SeqCst)
            );
            let mut out = http::response_head(200, body.len(), &context.identity, close);
            out.extend_from_slice(body.as_bytes());
            stream.write_all(&out)?;
        }
    }
    stream.flush()?;
    Ok(!close && !context.shutdown.requested())
}

fn write_streamed(
    stream: &mut TcpStream,
    head: Vec<u8>,
    bytes: usize,
    over: Duration,
) -> io::Result<()> {
    let start = Instant::now();
    let mut sent = 0;
    let mut head = Some(head);
    for (at, len) in routes::stream_plan(bytes, over) {
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        // The head goes out together with the first piece, in one write.
        let mut out = head.take().unwrap_or_default();
        out.extend_from_slice(&routes::body_bytes(sent, len));
        stream.write_all(&out)?;
        sent += len;
    }
    Ok(())
}
