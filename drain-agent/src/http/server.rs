//! The HTTP server loop: accepts connections and runs hyper on them, with the limits
//! `axum::serve` does not have. The agent answers stop hooks; a client that holds sockets
//! open, trickles headers, never reads its answers or blocks many `/drained` requests must
//! not be able to keep the hooks of everyone else from being answered, nor the agent from
//! exiting.
//!
//! - **Connection cap** ([`ServerLimits::max_connections`], kept below the open-file limit
//!   so `accept` does not run out of file descriptors). At the cap, a new connection takes
//!   the place of the *oldest idle* connection (one with no request in a handler and none
//!   on its way: kept alive between requests, or holding a socket silent), which is closed.
//!   A connection with received bytes not read yet, or accepted within 250 ms, is not
//!   idle: a burst of 600 hooks evicted 87 of its own before their requests were read, each
//!   an early EOF or a reset (`tests/overload.rs`). Why not "stop accepting until one frees": new connections would queue in the
//!   kernel's backlog behind the idle ones, and a stop hook would wait for idle sockets to
//!   time out. Why not "accept and close at once": anyone holding `max_connections` idle
//!   sockets would shut everyone else out. Evicting the oldest idle one lets a well-behaved
//!   client in at once.
//! - **Overload answers, never resets.** When every connection under the cap has a request in
//!   progress (blocked `/drained` waiters), a new connection is still served, on one of
//!   [`overflow_reserve`] connections kept beyond the cap (their file descriptors come out of
//!   [`RESERVED_FDS`]): `/healthz` (the liveness probe) is answered there as usual, and so
//!   is a `/drained` from a source that has none in progress (a pod's own hook, whoever
//!   holds the rest); anything else gets `429` with `Retry-After` and the connection is
//!   closed after the answer. When the reserve is full too, the server stops accepting until
//!   a connection ends or turns idle: new connections wait in the kernel's listen backlog
//!   (refused or reset by nobody) instead of being closed unanswered.
//! - **Header-read timeout**: a connection that has not sent a complete request head within
//!   [`ServerLimits::header_timeout`] (first request, or the next one on a kept-alive
//!   connection) is closed.
//! - **Write timeout**: a connection whose answer makes no progress for
//!   [`ServerLimits::write_timeout`] (a client that does not read) is dropped.
//! - **`/drained` waiters per source IP** ([`ServerLimits::max_waiters_per_source`]): more
//!   get 429, so one client cannot use up the agent-wide `--max-waiters`.
//! - **Bounded shutdown**: once `shutdown` resolves, the listener is closed, open connections
//!   are asked to finish (hyper's graceful shutdown: answers in progress are written, idle
//!   connections closed; a connection whose first request is still on its way is waited
//!   for first, since hyper closes one it has read nothing from) and whatever is left after [`ServerLimits::shutdown_timeout`] is
//!   dropped. For an upgrade ([`serve_handing_over`]) the requests in progress first get
//!   their usual answers for the agent's `--shutdown-grace`; the bound counts from its end.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Result, ensure};
use axum::{
    Json, Router,
    extract::{ConnectInfo, Request, State},
    http::StatusCode,
    middleware::{Next, from_fn_with_state},
    response::{IntoResponse, Response},
};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use log::{debug, info, warn};
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinSet},
    time::{Instant, Sleep},
};
use tower::ServiceExt as _;

use crate::{addr::canonical_addr, sys::fdlimit};

/// File descriptors kept free for everything but HTTP connections (eBPF maps, programs and
/// links, the runtime, namespace files while seeding): the connection cap is lowered to
/// stay this far below the open-file limit.
const RESERVED_FDS: u64 = 128;

/// How long to pause accepting after an accept error that is not about one connection
/// (EMFILE, ENFILE, ENOBUFS...): retrying at once would spin, and the error is not fatal.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What the server allows its clients; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Open HTTP connections at most (lowered to stay below the open-file limit).
    pub max_connections: usize,
    /// Time for a client to send a complete request head.
    pub header_timeout: Duration,
    /// Time an answer may make no write progress before the connection is dropped.
    pub write_timeout: Duration,
    /// `/drained` requests in progress at once per source IP address; more get 429.
    pub max_waiters_per_source: usize,
    /// Time open connections get to finish after shutdown begins.
    pub shutdown_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_waiters_per_source: 64,
            shutdown_timeout: Duration::from_secs(3),
        }
    }
}

impl ServerLimits {
    fn check(&self) -> Result<()> {
        ensure!(
            self.max_connections > 0,
            "--http-max-connections must be at least 1"
        );
        ensure!(
            !self.header_timeout.is_zero(),
            "--http-header-timeout must be longer than 0"
        );
        ensure!(
            !self.write_timeout.is_zero(),
            "--http-write-timeout must be longer than 0"
        );
        ensure!(
            self.max_waiters_per_source > 0,
            "--max-waiters-per-source must be at least 1"
        );
        Ok(())
    }
}

/// The local address of the connection a request came on (a request extension, beside the
/// peer's `ConnectInfo<SocketAddr>`): who is calling is told from both ends (`identify.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);

/// When the connection a request came on was accepted (a request extension): its client's
/// socket was in the kernel's tables by then (`identify.rs` reads them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptedAt(pub Instant);

/// Serves `app` on `listener` until `shutdown` resolves, then shuts down within
/// `limits.shutdown_timeout`. Each request carries the peer address as
/// `ConnectInfo<SocketAddr>` and the connection's local address as [`LocalAddr`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    serve_handing_over(listener, app, limits, shutdown, std::future::ready(())).await
}

/// [`serve`] for a hand-over: once `stop_accepting` resolves the listener is closed (its
/// queued connections go to the next agent's listener, `handover.rs`), and the requests in
/// progress get their usual answers until `grace_over` resolves (the agent then answers its
/// waiters `agent_shutdown`); whatever is still open [`ServerLimits::shutdown_timeout`] after
/// that is dropped. Returns as soon as no connection is left.
pub async fn serve_handing_over(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    stop_accepting: impl Future<Output = ()>,
    grace_over: impl Future<Output = ()>,
) -> Result<()> {
    let shutdown = stop_accepting;
    limits.check()?;
    let cap = connection_cap(limits.max_connections);
    let reserve = overflow_reserve(cap);
    let limiter = SourceLimiter::new(limits.max_waiters_per_source);
    let app = app.layer(from_fn_with_state(
        limiter.clone(),
        limit_waiters_per_source,
    ));
    // Beyond the cap: the same routes behind a gate that lets only what must not wait in.
    let overflow_app = app
        .clone()
        .layer(from_fn_with_state(limiter, overflow_only));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Slots::default());
    let mut tasks = JoinSet::new();
    let mut acceptor = Acceptor::default();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Cap and reserve full of busy connections: leave new ones in the listen backlog
        // until one ends or turns idle (it is then evicted), rather than close them.
        while !slots.has_room(cap + reserve) {
            tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                () = slots.freed.notified() => {}
                // A connection that turned idle sends no notification: look again.
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let accepted = acceptor
            .next(&listener, shutdown.as_mut(), || {
                format!(
                    "cannot accept HTTP connections ({} open, cap {cap})",
                    slots.open()
                )
            })
            .await;
        // Reap finished connection tasks (their slots are freed by their guards already).
        while tasks.try_join_next().is_some() {}
        let Some((stream, peer)) = accepted else {
            break;
        };
        let accepted_at = Instant::now();
        // The look before the accept can be stale (a connection counts as idle until its
        // first request arrives): this one then waits, accepted, for a place.
        let app = loop {
            if slots.make_room(cap) {
                break Some(app.clone());
            }
            if slots.make_room(cap + reserve) {
                debug!(
                    "{peer}: served beyond the cap, {cap} connections have requests in progress"
                );
                break Some(overflow_app.clone());
            }
            tokio::select! {
                biased;
                () = shutdown.as_mut() => break None,
                () = slots.freed.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        };
        let Some(app) = app else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().map(LocalAddr);
        let accepted_at = AcceptedAt(accepted_at);
        let activity = Arc::new(Activity::default());
        let service = {
            let app = app.clone();
            let activity = Arc::clone(&activity);
            service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                if let Some(local) = local {
                    request.extensions_mut().insert(local);
                }
                request.extensions_mut().insert(accepted_at);
                let busy = Busy::new(Arc::clone(&activity));
                let app = app.clone();
                async move {
                    let response = app.oneshot(request).await;
                    drop(busy);
                    response
                }
            })
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let io = TokioIo::new(WriteTimeout::new(stream, limits.write_timeout));
        let connection = graceful.watch(builder.serve_connection(io, service));
        slots.open_slot(&mut tasks, activity, fd, async move {
            if let Err(problem) = connection.await {
                debug!("{peer}: connection ended: {problem}");
            }
        });
    }
    // Stop accepting: new connections go to another listener of the address's group (the
    // next agent) or, with none, are refused from here on.
    drop(listener);
    let open = slots.open();
    if open > 0 {
        info!(
            "{open} HTTP connection(s) open: answered as usual until the shutdown grace ends, then within {:?}",
            limits.shutdown_timeout
        );
    }
    // hyper's graceful shutdown closes a connection it has read nothing from yet, and a
    // client accepted just before the stop may not have sent its request: wait until every
    // connection has a request read or is idle by the cap's rule (nothing on its way).
    slots.settle().await;
    // Idle kept-alive connections close now; the others after their answers.
    let finished = graceful.shutdown();
    let bound = async {
        grace_over.await;
        tokio::time::sleep(limits.shutdown_timeout).await;
    };
    let timed_out = tokio::select! {
        () = finished => false,
        () = bound => true,
    };
    if timed_out {
        warn!(
            "dropping {} HTTP connection(s) still open {:?} after shutdown began",
            slots.open(),
            limits.shutdown_timeout
        );
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Connections kept beyond `cap` for what must not wait (see the module documentation):
/// an eighth of the cap, from 4 to 64 (at most half of [`RESERVED_FDS`]).
pub fn overflow_reserve(cap: usize) -> usize {
    (cap / 8).clamp(4, 64)
}

/// The connection cap: `wanted`, lowered to stay [`RESERVED_FDS`] below the open-file limit.
fn connection_cap(wanted: usize) -> usize {
    let limit = match fdlimit::soft_limit() {
        Ok(limit) => limit,
        Err(problem) => {
            warn!("{problem:#}; keeping --http-max-connections {wanted}");
            return wanted;
        }
    };
    let room = usize::try_from(limit.saturating_sub(RESERVED_FDS))
        .unwrap_or(usize::MAX)
        .max(1);
    if wanted > room {
        warn!(
            "--http-max-connections {wanted} lowered to {room}: the open-file limit is {limit} \
             and {RESERVED_FDS} are kept for the rest of the agent (raise LimitNOFILE)"
        );
        room
    } else {
        wanted
    }
}

/// The accept loop's error handling, shared by every listener of the agent (HTTP here, the
/// agent-check protocol in [`crate::http::agentcheck`]).
#[derive(Default)]
pub struct Acceptor {
    logged_at: Option<Instant>,
}

impl Acceptor {
    /// The next connection of `listener`, or None once `shutdown` completes. An error about
    /// one connection (reset before it was taken) is skipped; any other (EMFILE and friends)
    /// is not fatal, but retrying at once would spin: it pauses ACCEPT_ERROR_PAUSE and is
    /// logged, with `what()`, at most every 10 s.
    pub async fn next<F: Future<Output = ()>>(
        &mut self,
        listener: &TcpListener,
        mut shutdown: Pin<&mut F>,
        what: impl Fn() -> String,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.as_mut() => return None,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok(pair) => return Some(pair),
                Err(problem) if is_per_connection(&problem) => {}
                Err(problem) => {
                    if self
                        .logged_at
                        .is_none_or(|at| at.elapsed() > Duration::from_secs(10))
                    {
                        warn!("{}: {problem} (pausing {ACCEPT_ERROR_PAUSE:?})", what());
                        self.logged_at = Some(Instant::now());
                    }
                    tokio::select! {
                        biased;
                        () = shutdown.as_mut() => return None,
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    }
                }
            }
        }
    }
}

/// Accept errors that concern one connection only (retry at once).
fn is_per_connection(problem: &io::Error) -> bool {
    matches!(
        problem.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// The open connections, oldest first, and whether each has a request in a handler.
#[derive(Default)]
struct Slots {
    open: Mutex<SlotMap>,
    /// Notified when a connection ends.
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct SlotMap {
    next_id: u64,
    slots: BTreeMap<u64, Slot>,
}

struct Slot {
    activity: Arc<Activity>,
    opened: Instant,
    /// The connection's socket (see [`unread_bytes`]).
    fd: std::os::fd::RawFd,
    abort: AbortHandle,
}

/// A connection that has sent no request within this long after it was accepted is idle,
/// whatever it sent: a client trickling its request head, or holding a socket silent.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// A connection accepted this recently is not idle even with nothing received yet: a
/// client writes its request right after it connects, and the agent may accept it first.
const CONNECT_GRACE: Duration = Duration::from_millis(250);

/// What a connection is doing, for the cap.
#[derive(Default)]
struct Activity {
    /// Requests in a handler now.
    in_flight: AtomicUsize,
    /// Requests started so far.
    requests: AtomicUsize,
}

impl Slot {
    /// Idle, evictable: no request in a handler, and none on its way — nothing received
    /// and not read yet, and not accepted within [`CONNECT_GRACE`]; or no request at all
    /// within [`FIRST_REQUEST_GRACE`]. A burst of hooks at the cap must not evict its own
    /// members before their requests are read (600 at once lost 87 that way, each an early
    /// EOF or a reset: `tests/overload.rs`); sockets held silent are evicted at once.
    fn idle(&self) -> bool {
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            return false;
        }
        let age = self.opened.elapsed();
        let asked = self.activity.requests.load(Ordering::Acquire) > 0;
        if !asked && age >= FIRST_REQUEST_GRACE {
            return true;
        }
        if !asked && age < CONNECT_GRACE {
            return false;
        }
        unread_bytes(self.fd) == 0
    }
}

/// Bytes received on the socket `fd` and not read yet (`FIONREAD`, i.e. `SIOCINQ` for
/// TCP). A descriptor closed meanwhile (its connection ended; its slot goes next) reads
/// as nothing pending, and a number reused by a newer socket only makes this look busy:
/// both at worst keep a connection that is about to go anyway.
fn unread_bytes(fd: std::os::fd::RawFd) -> usize {
    let mut pending: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which lives for the call; any
    // descriptor number is safe to pass (a closed one fails with EBADF).
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut pending) };
    if rc == 0 {
        usize::try_from(pending).unwrap_or(0)
    } else {
        0
    }
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotMap> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self) -> usize {
        self.lock().slots.len()
    }

    /// Resolves once no connection has its first request on its way (each has one read, or
    /// is idle by [`Slot::idle`]), which is at most [`FIRST_REQUEST_GRACE`] after the last
    /// accept.
    async fn settle(&self) {
        loop {
            let waiting =
                self.lock().slots.values().any(|slot| {
                    slot.activity.requests.load(Ordering::Acquire) == 0 && !slot.idle()
                });
            if !waiting {
                return;
            }
            tokio::select! {
                () = self.freed.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }

    /// Whether a connection could be taken in under `limit` (now, or by evicting an idle one).
    fn has_room(&self, limit: usize) -> bool {
        let map = self.lock();
        map.slots.len() < limit || map.slots.values().any(Slot::idle)
    }

    /// Whether one more connection fits under `cap`, closing the oldest idle one if needed.
    fn make_room(&self, cap: usize) -> bool {
        let victim = {
            let mut map = self.lock();
            if map.slots.len() < cap {
                return true;
            }
            let Some(id) = map
                .slots
                .iter()
                .find(|(_, slot)| slot.idle())
                .map(|(id, _)| *id)
            else {
                return false;
            };
            map.slots.remove(&id)
        };
        if let Some(victim) = victim {
            // Dropping the connection's future closes its socket.
            victim.abort.abort();
        }
        true
    }

    /// Runs a connection task that holds a slot until it ends (or is aborted).
    fn open_slot(
        self: &Arc<Self>,
        tasks: &mut JoinSet<()>,
        activity: Arc<Activity>,
        fd: std::os::fd::RawFd,
        work: impl Future<Output = ()> + Send + 'static,
    ) {
        // Held while spawning, so the task's guard cannot remove the slot before it exists.
        let mut map = self.lock();
        let id = map.next_id;
        map.next_id += 1;
        let guard = SlotGuard {
            slots: Arc::clone(self),
            id,
        };
        let abort = tasks.spawn(async move {
            let _guard = guard;
            work.await;
        });
        map.slots.insert(
            id,
            Slot {
                activity,
                opened: Instant::now(),
                fd,
                abort,
            },
        );
    }
}

/// Frees a connection's slot when its task ends or is aborted.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.lock().slots.remove(&self.id);
        self.slots.freed.notify_waiters();
    }
}

/// Marks a connection busy (not evictable) while one of its requests is in a handler.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.requests.fetch_add(1, Ordering::AcqRel);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts `/drained` requests in progress per source address.
#[derive(Clone)]
struct SourceLimiter {
    max: usize,
    waiting: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl SourceLimiter {
    fn new(max: usize) -> Self {
        Self {
            max,
            waiting: Arc::default(),
        }
    }

    /// `/drained` requests of `source` in progress now.
    fn count(&self, source: IpAddr) -> usize {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&source)
            .copied()
            .unwrap_or(0)
    }

    fn try_acquire(&self, source: IpAddr) -> Option<SourcePermit> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let count = waiting.entry(source).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourcePermit {
            limiter: self.clone(),
            source,
        })
    }
}

/// One `/drained` request in progress; released when the request ends or is dropped.
struct SourcePermit {
    limiter: SourceLimiter,
    source: IpAddr,
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        let mut waiting = self
            .limiter
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = waiting.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(&self.source);
            }
        }
    }
}

/// Middleware of the connections beyond the cap: `/healthz`, and a `/drained` from a source
/// with none in progress, go on; everything else is `429` with `Retry-After`, and the
/// connection closes after the answer (its place is for the next one).
async fn overflow_only(
    State(limiter): State<SourceLimiter>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| canonical_addr(peer.ip()));
    let first_of_its_source = path == "/drained" && source.is_some_and(|at| limiter.count(at) == 0);
    if path == "/healthz" || first_of_its_source {
        return next.run(request).await;
    }
    (
        StatusCode::TOO_MANY_REQUESTS,
        [
            (axum::http::header::RETRY_AFTER, "1"),
            (axum::http::header::CONNECTION, "close"),
        ],
        Json(json!({
            "error": "every HTTP connection the agent allows (--http-max-connections) has a request in progress; retry later"
        })),
    )
        .into_response()
}

/// Middleware: at most `max` `/drained` requests in progress per source IP (IPv4-mapped
/// IPv6 folded to IPv4); more get 429. Requests without `ConnectInfo` (not from [`serve`])
/// are not limited here.
async fn limit_waiters_per_source(
    State(limiter): State<SourceLimiter>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() != "/drained" {
        return next.run(request).await;
    }
    let Some(ConnectInfo(peer)) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied()
    else {
        return next.run(request).await;
    };
    let source = canonical_addr(peer.ip());
    let Some(_permit) = limiter.try_acquire(source) else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({
                "error": format!(
                    "{} /drained requests from {source} are in progress already \
                     (--max-waiters-per-source); retry later",
                    limiter.max
                )
            })),
        )
            .into_response();
    };
    next.run(request).await
}

/// An I/O object whose writes fail with `TimedOut` after `limit` without progress: a client
/// that stops reading cannot hold its connection (and the agent's shutdown) forever.
pub struct WriteTimeout<T> {
    inner: T,
    limit: Duration,
    /// Armed while a write is pending; reset when one makes progress.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<T> WriteTimeout<T> {
    pub fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            armed: false,
        }
    }

    /// Passes a ready result through (progress: disarm); on pending, arms the timer and
    /// fails once it fires.
    fn guard<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.armed = false;
            return poll;
        }
        let deadline = Instant::now() + self.limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if !self.armed {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        if timer.as_mut().poll(cx).is_ready() {
            self.armed = false;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {:?}", self.limit),
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.guard(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpSocket, TcpStream},
        sync::{Notify, oneshot},
        task::JoinHandle,
    };

    use super::*;

    /// A test app: `/healthz` answers at once, `/drained` blocks until released (and
    /// counts the requests that reached it), `/big` answers 256 KiB.
    struct TestServer {
        addr: SocketAddr,
        entered: Arc<AtomicUsize>,
        release: Arc<Notify>,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<Result<()>>,
    }

    fn limits() -> ServerLimits {
        ServerLimits {
            header_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            ..ServerLimits::default()
        }
    }

    async fn start(limits: ServerLimits) -> TestServer {
        let entered = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let app = {
            let entered = Arc::clone(&entered);
            let release = Arc::clone(&release);
            Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route("/big", get(|| async { "x".repeat(256 << 10) }))
                .route(
                    "/drained",
                    get(move || {
                        let release = Arc::clone(&release);
                        entered.fetch_add(1, Ordering::SeqCst);
                        async move {
                            release.notified().await;
                            "released"
                        }
                    }),
                )
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, limits, async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            entered,
            release,
            stop: Some(stop),
            task,
        }
    }

    impl TestServer {
        /// Waits until `count` requests reached `/drained`.
        async fn wait_entered(&self, count: usize) {
            tokio::time::timeout(Duration::from_secs(5), async {
                while self.entered.load(Ordering::SeqCst) < count {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("requests reached the handler");
        }

        /// Begins shutdown; returns how long `serve` took to return.
        async fn stop(mut self) -> Duration {
            let started = Instant::now();
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("serve returned")
                .expect("task")
                .expect("serve");
            started.elapsed()
        }
    }

    async fn send(stream: &mut TcpStream, path: &str) {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .expect("send");
    }

    /// Reads until EOF (or a reset); the text read.
    async fn read_all(stream: &mut TcpStream) -> String {
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
            .await
            .expect("the server closed the connection");
        String::from_utf8_lossy(&raw).into_owned()
    }

    /// `GET path` with `Connection: close` from `source`; the status line and body.
    async fn request_from(addr: SocketAddr, source: &str, path: &str) -> String {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{source}:0").parse().expect("source"))
            .expect("bind source");
        let mut stream = socket.connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("send");
        read_all(&mut stream).await
    }

    async fn request(addr: SocketAddr, path: &str) -> String {
        request_from(addr, "127.0.0.1", path).await
    }

    /// Whether the server closed `stream` (EOF or reset) within a short time.
    async fn closed_by_server(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_cap_a_new_client_replaces_the_oldest_idle_connection() {
        let server = start(ServerLimits {
            max_connections: 4,
            ..limits()
        })
        .await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(server.addr).await.expect("connect"));
        }
        // Silent past the connect grace: idle.
        tokio::time::sleep(CONNECT_GRACE + Duration::from_millis(100)).await;
        let answer = request(server.addr, "/healthz").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        // 4 idle + 1 client through a cap of 4: the oldest idle one was closed.
        for (i, stream) in idle.iter_mut().enumerate() {
            assert_eq!(closed_by_server(stream).await, i < 1, "connection {i}");
        }
        server.stop().await;
    }

    /// Connections whose requests are on their way are not idle: a burst at the cap does
    /// not evict its own members (600 hooks at once lost 87 that way, `tests/overload.rs`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_just_accepted_is_not_evicted_before_its_request() {
        let server = start(ServerLimits {
            max_connections: 2,
            ..limits()
        })
        .await;
        let mut early = Vec::new();
        for _ in 0..2 {
            early.push(TcpStream::connect(server.addr).await.expect("connect"));
        }
        // A third client, at the cap: served from the reserve, nobody evicted.
        let answer = request(server.addr, "/healthz").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        for stream in &mut early {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .await
                .expect("send");
            let answer = read_all(stream).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_with_requests_in_progress_are_not_evicted() {
        let server = start(ServerLimits {
            max_connections: 2,
            ..limits()
        })
        .await;
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(server.addr).await.expect("connect");
            send(&mut stream, "/drained").await;
            waiters.push(stream);
        }
        server.wait_entered(2).await;
        // Full of busy connections: the liveness probe is still answered (beyond the cap),
        // a third waiter of the same source gets 429 with Retry-After (issue 23: it got an
        // empty reply), and another source's first waiter is taken in.
        let answer = request(server.addr, "/healthz").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let answer = request(server.addr, "/drained").await;
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        let mut other = {
            let socket = TcpSocket::new_v4().expect("socket");
            socket
                .bind("127.0.0.2:0".parse().expect("source"))
                .expect("bind source");
            socket.connect(server.addr).await.expect("connect")
        };
        send(&mut other, "/drained").await;
        server.wait_entered(3).await;
        server.release.notify_waiters();
        waiters.push(other);
        for stream in &mut waiters {
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.expect("answer");
            assert_eq!(&head, b"HTTP/1.1 200");
        }
        server.stop().await;
    }

    /// With the cap and the reserve full of waiters, new connections wait in the backlog and
    /// are answered once a place frees: none is closed unanswered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_the_reserve_connections_wait_and_are_never_reset() {
        let server = start(ServerLimits {
            max_connections: 2,
            ..limits()
        })
        .await;
        // 2 under the cap and 4 in the reserve, each from its own source.
        let mut waiters = Vec::new();
        for index in 0..(2 + overflow_reserve(2)) {
            let socket = TcpSocket::new_v4().expect("socket");
            socket
                .bind(format!("127.0.1.{}:0", index + 1).parse().expect("source"))
                .expect("bind source");
            let mut stream = socket.connect(server.addr).await.expect("connect");
            send(&mut stream, "/drained").await;
            waiters.push(stream);
            server.wait_entered(index + 1).await;
        }
        let late = tokio::spawn({
            let addr = server.addr;
            async move { request(addr, "/healthz").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !late.is_finished(),
            "it waits (in the backlog, or accepted)"
        );
        server.release.notify_waiters();
        let answer = late.await.expect("join");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_and_trickling_clients_are_closed_after_the_header_timeout() {
        let server = start(ServerLimits {
            header_timeout: Duration::from_millis(300),
            ..limits()
        })
        .await;
        let started = Instant::now();
        let mut silent = TcpStream::connect(server.addr).await.expect("connect");
        let mut trickling = TcpStream::connect(server.addr).await.expect("connect");
        trickling.write_all(b"GET /healthz HT").await.expect("send");
        read_all(&mut silent).await;
        read_all(&mut trickling).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // A client that sends its request in time is answered.
        let answer = request(server.addr, "/healthz").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drained_requests_are_limited_per_source_address() {
        let server = start(ServerLimits {
            max_waiters_per_source: 2,
            ..limits()
        })
        .await;
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(server.addr).await.expect("connect");
            send(&mut stream, "/drained").await;
            waiters.push(stream);
        }
        server.wait_entered(2).await;
        let refused = request(server.addr, "/drained?port=1").await;
        assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
        let body = refused.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(body).expect("json body");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains("--max-waiters-per-source"), "{message}");
        assert!(message.contains("127.0.0.1"), "{message}");
        // Other endpoints and other sources are not limited.
        assert!(
            request(server.addr, "/healthz")
                .await
                .starts_with("HTTP/1.1 200")
        );
        let other = tokio::spawn(request_from(server.addr, "127.0.0.2", "/drained"));
        server.wait_entered(3).await;
        // A finished request frees its place.
        server.release.notify_waiters();
        assert!(other.await.expect("other").starts_with("HTTP/1.1 200"));
        let mut head = [0u8; 12];
        waiters[0].read_exact(&mut head).await.expect("answer");
        let again = tokio::spawn(request(server.addr, "/drained"));
        server.wait_entered(4).await;
        server.release.notify_waiters();
        assert!(again.await.expect("again").starts_with("HTTP/1.1 200"));
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_lets_answers_in_progress_finish() {
        let server = start(limits()).await;
        let mut waiter = TcpStream::connect(server.addr).await.expect("connect");
        send(&mut waiter, "/drained").await;
        server.wait_entered(1).await;
        let idle = TcpStream::connect(server.addr).await.expect("connect");
        let release = Arc::clone(&server.release);
        let addr = server.addr;
        let stopping = tokio::spawn(server.stop());
        // The listener closes; the waiter's answer, given now, still arrives.
        tokio::time::timeout(Duration::from_secs(5), async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the listener closed");
        release.notify_waiters();
        let answer = read_all(&mut waiter).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("released"), "{answer}");
        let took = stopping.await.expect("stop");
        assert!(took < Duration::from_secs(3), "{took:?}");
        drop(idle);
    }

    /// A client accepted just before the stop whose request arrives just after it is
    /// answered, not closed unread (hyper's graceful shutdown closes a connection it has
    /// read nothing from: an upgrade's probe got `Broken pipe` that way, 1 in 43,567).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_arriving_right_after_the_stop_is_answered() {
        let server = start(limits()).await;
        let mut late = TcpStream::connect(server.addr).await.expect("connect");
        // Accepted, nothing sent yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopping = tokio::spawn(server.stop());
        tokio::time::sleep(Duration::from_millis(50)).await;
        late.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let answer = read_all(&mut late).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with("ok"), "{answer:?}");
        let took = stopping.await.expect("stop");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    /// A hand-over: the listener closes at once, an answer in progress is still written
    /// long after `shutdown_timeout` while the grace lasts, and the bound applies from the
    /// grace's end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hand_over_keeps_answers_in_progress_for_the_grace() {
        let release = Arc::new(Notify::new());
        let app = {
            let release = Arc::clone(&release);
            Router::new()
                .route(
                    "/drained",
                    get(move || {
                        let release = Arc::clone(&release);
                        async move {
                            release.notified().await;
                            "released"
                        }
                    }),
                )
                .route("/forever", get(std::future::pending::<&'static str>))
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let (end_grace, grace_ended) = oneshot::channel::<()>();
        let limits = ServerLimits {
            shutdown_timeout: Duration::from_millis(200),
            ..limits()
        };
        let task = tokio::spawn(serve_handing_over(
            listener,
            app,
            limits,
            async move {
                let _ = stopped.await;
            },
            async move {
                let _ = grace_ended.await;
            },
        ));
        let mut first = TcpStream::connect(addr).await.expect("connect");
        send(&mut first, "/drained").await;
        let mut second = TcpStream::connect(addr).await.expect("connect");
        send(&mut second, "/forever").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the listener closed");
        // Well past shutdown_timeout, within the grace: answered as usual.
        tokio::time::sleep(Duration::from_millis(600)).await;
        release.notify_one();
        let answer = read_all(&mut first).await;
        assert!(answer.ends_with("released"), "{answer}");
        // The grace ends: what is left is dropped after shutdown_timeout.
        let ended = Instant::now();
        let _ = end_grace.send(());
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returned")
            .expect("task")
            .expect("serve");
        let took = ended.elapsed();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(!read_all(&mut second).await.contains("HTTP/1.1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_is_bounded_when_a_client_does_not_read() {
        let server = start(ServerLimits {
            shutdown_timeout: Duration::from_millis(500),
            ..limits()
        })
        .await;
        let mut greedy = TcpStream::connect(server.addr).await.expect("connect");
        let pipelined = "GET /big HTTP/1.1\r\nHost: test\r\n\r\n".repeat(100);
        greedy.write_all(pipelined.as_bytes()).await.expect("send");
        // Another connection is answered: the server is running and past the greedy accept.
        assert!(
            request(server.addr, "/healthz")
                .await
                .starts_with("HTTP/1.1 200")
        );
        let took = server.stop().await;
        println!("serve returned {took:?} after shutdown began");
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // Dropped: what was sent reads out, then the connection ends.
        read_all(&mut greedy).await;
    }

    #[tokio::test(start_paused = true)]
    async fn writes_fail_after_the_write_timeout_without_progress() {
        let (writer, mut reader) = tokio::io::duplex(64);
        let mut writer = WriteTimeout::new(writer, Duration::from_secs(10));
        let started = Instant::now();
        let problem = writer
            .write_all(&[0; 1024])
            .await
            .expect_err("nobody reads");
        assert_eq!(problem.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        // Slow progress (64 bytes every 6 s) is progress: no timeout over 24 s.
        let (writer, mut slow) = tokio::io::duplex(64);
        let mut writer = WriteTimeout::new(writer, Duration::from_secs(10));
        let draining = tokio::spawn(async move {
            let mut buffer = [0u8; 64];
            let mut total = 0;
            while total < 256 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                total += slow.read(&mut buffer).await.expect("read");
            }
            total
        });
        writer.write_all(&[0; 256]).await.expect("slow reader");
        assert_eq!(draining.await.expect("reader"), 256);
        let mut sink = [0u8; 64];
        assert_eq!(reader.read(&mut sink).await.expect("read"), 64);
    }
}
