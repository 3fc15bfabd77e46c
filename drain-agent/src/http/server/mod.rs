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
//!   A connection with its first request received and not read yet, or accepted within
//!   250 ms, is not idle: a burst of 600 hooks evicted 87 of its own before their requests
//!   were read, each an early EOF or a reset (`tests/overload.rs`). A connection answered
//!   before is idle whatever it sent since while no request of it is in a handler, the
//!   quiet ones first: a client pipelining requests and reading its answers slowly leaves
//!   them unread (hyper reads nothing while it writes an answer with a request left in its
//!   buffer), and held every slot that way, past the write timeout (a segment read every
//!   few seconds is progress); its answer is cut short. Why not "stop accepting until one frees": new connections would queue in the
//!   kernel's backlog behind the idle ones, and a stop hook would wait for idle sockets to
//!   time out. Why not "accept and close at once": anyone holding `max_connections` idle
//!   sockets would shut everyone else out. Evicting the oldest idle one lets a well-behaved
//!   client in at once.
//! - **Overload answers, never resets.** When every connection under the cap has a request in
//!   progress (blocked `/drained` waiters), a new connection is still served, on one of
//!   [`overflow_reserve`] connections kept beyond the cap (their file descriptors count
//!   beside [`RESERVED_FDS`], as the cap's do: [`connection_descriptors`]): `/healthz` (the liveness probe) is answered there as usual, and so
//!   is a `/drained` from a source (as below) that has none in progress (a pod's own hook,
//!   whoever holds the rest); anything else gets `429` with `Retry-After` and the connection is
//!   closed after the answer. A connection keeps the place it was let in (`slots.rs`
//!   `Place`), and one that takes the place of an idle one takes its place too: while every
//!   connection under the cap is busy, the place of an idle one in the reserve is beyond
//!   the cap (an idle one under the cap goes first, of the same idleness). It counted as
//!   under the cap whatever it replaced, and a pod with its first waiter in the reserve
//!   swapped a kept-alive connection there for one that let its every `/drained` in: one
//!   pod filled the reserve. A place under the cap that frees is the next one's, under the
//!   cap. When the reserve is full too, the server stops accepting until
//!   a connection ends or turns idle: new connections wait in the kernel's listen backlog
//!   (refused or reset by nobody) instead of being closed unanswered. A connection accepted
//!   on a stale look (an idle connection got a request meanwhile) waits for a place; if the
//!   stop comes first it is served beyond the reserve by the same gate, not closed unread.
//!   A stop while waiting ends the accept loop: the completed `shutdown` is never polled
//!   again (an `async fn` panics when resumed after completion).
//! - **Header-read timeout**: a connection that has not sent a complete request head within
//!   [`ServerLimits::header_timeout`] (first request, or the next one on a kept-alive
//!   connection) is closed.
//! - **Request-head size**: at most [`MAX_REQUEST_HEAD`] bytes and [`MAX_HEADERS`] header
//!   lines; a larger head is answered `431` and the connection closed, so an unfinished
//!   head holds at most that much of the agent's memory.
//! - **Write timeout**: a connection whose answer makes no progress for
//!   [`ServerLimits::write_timeout`] (a client that does not read) is dropped.
//! - **`/drained` waiters per source** ([`ServerLimits::max_waiters_per_source`]): more get
//!   429, so one client cannot use up the agent-wide `--max-waiters` nor the connections. A
//!   source is the caller where the listener identified it before the limits (`front` of
//!   [`serve_handing_over`]: the node listener's local users by their socket's owner, pods by
//!   their namespace), else the IP address: a local user can bind every address of
//!   127.0.0.0/8, and by address it filled the cap and then the reserve, one "first" waiter
//!   per address, keeping root's stop hook in the backlog.
//! - **Bounded shutdown**: once `shutdown` resolves, the listener is closed, open connections
//!   are asked to finish (hyper's graceful shutdown: answers in progress are written, idle
//!   connections closed; a connection whose first request is still on its way is waited
//!   for first, since hyper closes one it has read nothing from) and whatever is left after [`ServerLimits::shutdown_timeout`] is
//!   dropped. For an upgrade ([`serve_handing_over`]) the requests in progress first get
//!   their usual answers for the agent's `--shutdown-grace`; the bound counts from its end.

mod accept;
mod limits;
mod slots;
mod write_timeout;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Result;
use axum::{Router, extract::ConnectInfo, middleware::from_fn_with_state};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use log::{debug, info, warn};
use tokio::{net::TcpListener, task::JoinSet};
use tower::ServiceExt as _;

pub use self::{
    accept::Acceptor, limits::ServerLimits, slots::FIRST_REQUEST_GRACE, write_timeout::WriteTimeout,
};
use self::{
    limits::{BeyondCap, SourceLimiter, limit_waiters},
    slots::{Activity, Busy, Place, Slots, reset_by_client},
};
use crate::{metrics::Metrics, sys::fdlimit};

/// File descriptors kept free for everything but HTTP connections (eBPF maps, programs and
/// links, the runtime, namespace files while seeding): the connection cap is lowered so that
/// it and its overflow reserve ([`connection_descriptors`]) stay this far below the
/// open-file limit.
pub const RESERVED_FDS: u64 = 128;

/// The largest request head (request line and headers) the server reads, and the most
/// it buffers from a connection. hyper's default (~400 KiB) let an unauthenticated client
/// make the agent hold that much per connection while a head stays unfinished (who is
/// calling is checked only once the head is read): 512 connections were ~200 MiB, past
/// the DaemonSet's memory limit. The longest legal request the agent's clients send — a
/// `/drained` with every parameter at its longest, form-encoded (64 IPv6 CIDRs in
/// `ignore`), and a scraper's headers with a 2 KiB token — is about 7.2 KiB
/// (`the_longest_legal_request_is_served`). A longer head is answered `431` and the
/// connection closed. At least hyper's minimum, 8 KiB.
pub const MAX_REQUEST_HEAD: usize = 16 << 10;

/// The most header lines a request may have (hyper's default is 100); more are answered
/// `431`. The kubelet, HAProxy, Prometheus and `drain-agent wait` send fewer than 10.
pub const MAX_HEADERS: usize = 32;

/// The local address of the connection a request came on (a request extension, beside the
/// peer's `ConnectInfo<SocketAddr>`): who is calling is told from both ends (`identify.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);

/// Serves `app` on `listener` until `shutdown` resolves, then shuts down within
/// `limits.shutdown_timeout`. Each request carries the peer address as
/// `ConnectInfo<SocketAddr>` and the connection's local address as [`LocalAddr`]. Nothing
/// runs before the server's limits: they count `/drained` requests by address. A
/// `/drained` the limits answer `429` is counted in `metrics` as
/// [`DrainResult::Rejected`](crate::metrics::DrainResult::Rejected).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    serve_handing_over(
        listener,
        app,
        Ok,
        limits,
        metrics,
        shutdown,
        std::future::ready(()),
    )
    .await
}

/// [`serve`] for a hand-over: once `stop_accepting` resolves the listener is closed (its
/// queued connections go to the next agent's listener, `handover.rs`), and the requests in
/// progress get their usual answers until `grace_over` resolves (the agent then answers its
/// waiters `agent_shutdown`); whatever is still open [`ServerLimits::shutdown_timeout`] after
/// that is dropped. Returns as soon as no connection is left.
///
/// `front` wraps `app` with the server's limits inside: what it adds runs first on every
/// request, beyond the cap too. The node listener identifies its caller there
/// (`identify.rs`), so that the `/drained` limits count a local user or a pod as one source
/// whatever address it calls from (ARCHITECTURE.md, "Waiters per source").
pub async fn serve_handing_over(
    listener: TcpListener,
    app: Router,
    front: impl FnOnce(Router) -> Result<Router>,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
    stop_accepting: impl Future<Output = ()>,
    grace_over: impl Future<Output = ()>,
) -> Result<()> {
    let shutdown = stop_accepting;
    limits.check()?;
    let cap = connection_cap(limits.max_connections);
    let reserve = overflow_reserve(cap);
    // One app for every connection: those beyond the cap are marked ([`BeyondCap`]) and
    // gated by the same middleware, after whatever `front` adds.
    let app = front(app.layer(from_fn_with_state(
        SourceLimiter::new(limits.max_waiters_per_source, metrics),
        limit_waiters,
    )))?;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // A client's FIN after its request is not a hang-up: HTTP/1.0 clients that
        // half-close (busybox `nc` in a preStop hook) wait for their answer. hyper's default
        // took it for an unfinished exchange and dropped the request unanswered (a
        // `/drained` waiter's drain ended `abandoned`, its hook stopped the container at
        // once). hyper then reads nothing while a request is in a handler: a client that
        // resets is seen by `reset_by_client`, one that closes is answered and the write
        // fails.
        .half_close(true)
        .header_read_timeout(limits.header_timeout)
        // hyper reads no more than this into its buffer and answers 431 when the head is
        // not complete in it: the bound on an unfinished head and on a complete one alike.
        .max_buf_size(MAX_REQUEST_HEAD)
        .max_headers(MAX_HEADERS);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Slots::default());
    let mut tasks = JoinSet::new();
    let mut acceptor = Acceptor::default();
    let mut shutdown = std::pin::pin!(shutdown);
    // Every wait on `shutdown` below leaves this loop once it completes: a completed
    // `shutdown` must not be polled again (an `async fn` or block panics "resumed after
    // completion", which on the node listener exited the agent).
    'serve: loop {
        // Cap and reserve full of busy connections: leave new ones in the listen backlog
        // until one ends or turns idle (it is then evicted), rather than close them.
        while !slots.has_room(cap + reserve) {
            tokio::select! {
                biased;
                () = shutdown.as_mut() => break 'serve,
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
            break 'serve;
        };
        // The look before the accept can be stale (an idle connection got a request
        // meanwhile; a connection counts as idle until its first request arrives): this one
        // then waits, accepted, for a place. At a stop it is served beyond the reserve, as
        // an overload (its descriptor is open already, and no other is accepted after it),
        // and answered like the others rather than closed unread (a reset).
        let (place, stopping) = loop {
            if let Some(place) = slots.admit(cap, reserve) {
                if place == Place::BeyondCap {
                    debug!(
                        "{peer}: served beyond the cap, {cap} connections have requests in progress"
                    );
                }
                break (place, false);
            }
            tokio::select! {
                biased;
                () = shutdown.as_mut() => {
                    debug!("{peer}: served beyond the reserve, accepted just before the stop");
                    break (Place::BeyondCap, true);
                }
                () = slots.freed.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        };
        let beyond_cap = place == Place::BeyondCap;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().map(LocalAddr);
        let socket = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let io = WriteTimeout::new(stream, limits.write_timeout);
        let activity = Arc::new(Activity::new(io.blocked()));
        let service = {
            let app = app.clone();
            let activity = Arc::clone(&activity);
            service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                if let Some(local) = local {
                    request.extensions_mut().insert(local);
                }
                if beyond_cap {
                    request.extensions_mut().insert(BeyondCap);
                }
                let busy = Busy::new(Arc::clone(&activity));
                let app = app.clone();
                async move {
                    // A client that resets its connection went away: its request's future
                    // is dropped (a `/drained` waiter leaves its drain) and the connection
                    // ends (see `half_close` above).
                    let answered = tokio::select! {
                        biased;
                        response = app.oneshot(request) => {
                            let Ok(response) = response;
                            Ok(response)
                        }
                        problem = reset_by_client(socket) => Err(problem),
                    };
                    drop(busy);
                    answered
                }
            })
        };
        let io = TokioIo::new(io);
        let connection = graceful.watch(builder.serve_connection(io, service));
        slots.open_slot(&mut tasks, activity, socket, place, async move {
            if let Err(problem) = connection.await {
                debug!("{peer}: connection ended: {problem}");
            }
        });
        if stopping {
            break 'serve;
        }
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
/// an eighth of the cap, from 4 to 64.
pub fn overflow_reserve(cap: usize) -> usize {
    (cap / 8).clamp(4, 64)
}

/// The descriptors a server with the connection cap `cap` may hold for its connections:
/// the cap and its [`overflow_reserve`], beside [`RESERVED_FDS`]. The one count of them, for
/// the cap ([`connection_cap`]) and the pod listeners' budget alike.
pub fn connection_descriptors(cap: usize) -> u64 {
    u64::try_from(cap.saturating_add(overflow_reserve(cap))).unwrap_or(u64::MAX)
}

/// The connection cap: `wanted`, lowered so that it and its reserve stay [`RESERVED_FDS`]
/// below the open-file limit ([`connection_descriptors`]).
fn connection_cap(wanted: usize) -> usize {
    let limit = match fdlimit::soft_limit() {
        Ok(limit) => limit,
        Err(problem) => {
            warn!("{problem:#}; keeping --http-max-connections {wanted}");
            return wanted;
        }
    };
    let cap = cap_within(limit, wanted);
    if cap < wanted {
        warn!(
            "--http-max-connections {wanted} lowered to {cap}: the open-file limit is {limit} \
             and {RESERVED_FDS} are kept for the rest of the agent, beside the cap and its \
             reserve of {} (raise LimitNOFILE)",
            overflow_reserve(cap)
        );
    }
    cap
}

/// [`connection_cap`] under the open-file limit `limit`: `wanted`, or less so that the
/// cap's [`connection_descriptors`] (its reserve's too) and [`RESERVED_FDS`] fit; at least 1.
fn cap_within(limit: u64, wanted: usize) -> usize {
    let room = limit.saturating_sub(RESERVED_FDS);
    if connection_descriptors(wanted) <= room {
        return wanted;
    }
    // The reserve grows with the cap: the room's own reserve is at least the lowered cap's.
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    room.saturating_sub(overflow_reserve(room)).max(1)
}

#[cfg(test)]
mod tests;
