//! What the server allows its clients (see the module documentation of `http::server`):
//! the checked [`ServerLimits`], `/drained` waiters per source (the caller where it is
//! identified, else its address), and the gate of the connections served beyond the cap.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Result, ensure};
use axum::{
    extract::{ConnectInfo, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::{
    addr::canonical_addr,
    http::{api::too_many, authority::Caller},
    metrics::{DrainResult, Metrics},
};

/// What the server allows its clients; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Open HTTP connections at most (lowered to stay below the open-file limit).
    pub max_connections: usize,
    /// Time for a client to send a complete request head.
    pub header_timeout: Duration,
    /// Time an answer may make no write progress before the connection is dropped.
    pub write_timeout: Duration,
    /// `/drained` requests in progress at once per source (a local user, a pod, else an IP
    /// address); more get 429.
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
    pub(super) fn check(&self) -> Result<()> {
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

/// Whose `/drained` requests count together against `--max-waiters-per-source`, and which
/// a place in the reserve is the first of. A caller the node listener identified
/// (`identify.rs`, which runs before these limits) is counted as who it is, not by its
/// address: a local user can bind every address of 127.0.0.0/8, and a pod may have several.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    /// A process on the node, by its socket's owner (the kernel's word, not the caller's).
    User(u32),
    /// Processes on the node whose socket's owner the tables could not tell: all of them
    /// one source (root's among them, which then get a `429` rather than wait unanswered
    /// behind another user's).
    UnknownUser,
    /// A pod, by its network namespace, whichever of its addresses it calls from.
    Pod(u32),
    /// The node (root, a bearer token), anyone else, and every caller of a listener that
    /// identifies nobody before its limits (the pod listeners: only the pod and root reach
    /// them): by address. Root's processes are told apart by address as before: the
    /// kubelet's hooks from the node's address and `drain-agent wait` from 127.0.0.1 are
    /// not one source, and no other user's requests count against either.
    Address(IpAddr),
}

impl Source {
    /// Whose `request` is; `None` for a request not from [`serve`](super::serve) (no peer
    /// address), which is not limited here.
    fn of(request: &Request) -> Option<Self> {
        let extensions = request.extensions();
        let peer = extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| canonical_addr(peer.ip()))?;
        Some(match extensions.get::<Caller>() {
            Some(Caller::LocalUser { uid: Some(uid) }) => Self::User(*uid),
            Some(Caller::LocalUser { uid: None }) => Self::UnknownUser,
            Some(Caller::Pod { netns }) => Self::Pod(*netns),
            Some(Caller::Node | Caller::Remote) | None => Self::Address(peer),
        })
    }
}

/// How a `429` names the source: the caller itself, nothing else.
impl fmt::Display for Source {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(uid) => write!(formatter, "uid {uid} on this node"),
            Self::UnknownUser => formatter.write_str("local users this agent cannot tell apart"),
            Self::Pod(netns) => write!(formatter, "network namespace {netns}"),
            Self::Address(addr) => write!(formatter, "{addr}"),
        }
    }
}

/// Counts `/drained` requests in progress per [`Source`].
#[derive(Clone)]
pub(super) struct SourceLimiter {
    max: usize,
    waiting: Arc<Mutex<HashMap<Source, usize>>>,
    /// Where a `/drained` turned away here is counted `rejected`, as the handler counts the
    /// `--max-waiters` and per-owner ones: the alert on that count must see every `429` a
    /// hook gets.
    metrics: Arc<Metrics>,
}

impl SourceLimiter {
    pub(super) fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            max,
            waiting: Arc::default(),
            metrics,
        }
    }

    /// `/drained` requests of `source` in progress now.
    fn count(&self, source: Source) -> usize {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&source)
            .copied()
            .unwrap_or(0)
    }

    fn try_acquire(&self, source: Source) -> Option<SourcePermit> {
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
    source: Source,
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

/// A request extension: the request came on a connection served beyond the cap.
#[derive(Clone, Copy, Debug)]
pub(super) struct BeyondCap;

/// Middleware, after the caller is identified (where a listener does: see [`Source`]):
///
/// - on a connection beyond the cap ([`BeyondCap`]), `/healthz`, and a `/drained` of a
///   source with none in progress, go on; everything else is `429` with `Retry-After`, and
///   the connection closes after the answer (its place is for the next one);
/// - at most `max` `/drained` requests in progress per [`Source`]; more get `429`.
///
/// Every `/drained` answered `429` here is counted [`DrainResult::Rejected`], as the
/// handler counts its own `429`s; other routes' are not `/drained` answers.
pub(super) async fn limit_waiters(
    State(limiter): State<SourceLimiter>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let waiter = path == "/drained";
    let source = Source::of(&request);
    if request.extensions().get::<BeyondCap>().is_some() {
        let first_of_its_source = waiter && source.is_some_and(|at| limiter.count(at) == 0);
        if path != "/healthz" && !first_of_its_source {
            // Only a `/drained` is a drain request turned away; any other route's `429`
            // here is its caller's to see (the metric counts `/drained` answers).
            if waiter {
                limiter.metrics.drain_request(DrainResult::Rejected, None);
            }
            return (
                [(axum::http::header::CONNECTION, "close")],
                too_many(
                    "every HTTP connection the agent allows (--http-max-connections) has a request in progress; retry later",
                ),
            )
                .into_response();
        }
    }
    let Some(source) = source.filter(|_| waiter) else {
        return next.run(request).await;
    };
    let Some(_permit) = limiter.try_acquire(source) else {
        limiter.metrics.drain_request(DrainResult::Rejected, None);
        return too_many(format!(
            "{} /drained requests from {source} are in progress already \
             (--max-waiters-per-source); retry later",
            limiter.max
        ));
    };
    next.run(request).await
}
