//! What the server allows its clients (see the module documentation of `http::server`):
//! the checked [`ServerLimits`], `/drained` waiters per source address, and the gate of the
//! connections served beyond the cap.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Result, ensure};
use axum::{
    Json,
    extract::{ConnectInfo, Request, State},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::addr::canonical_addr;

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

/// Counts `/drained` requests in progress per source address.
#[derive(Clone)]
pub(super) struct SourceLimiter {
    max: usize,
    waiting: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl SourceLimiter {
    pub(super) fn new(max: usize) -> Self {
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
pub(super) async fn overflow_only(
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
pub(super) async fn limit_waiters_per_source(
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
