//! Readiness, apart from health: `GET /healthz?ready=true` (what `drain-agent probe
//! --ready`, the DaemonSet's readiness probe, asks) answers `503` while the agent's first
//! round of pod listeners (`--pod-listen`) is still being opened, and `/healthz`'s own
//! answer once it has been.
//!
//! Why: in an upgrade the old agent is stopped once the new pod is Ready, and at its stop
//! it detaches its steering in every pod (`http/pods/`). A new agent Ready as soon as its
//! node listener served (its pod listeners open 8 at a time, a program load under the
//! kernel's lock each) left the pods it had not reached yet with no listener on the in-pod
//! port: a kubelet's `httpGet` preStop there was refused, never retried. Plain `/healthz`
//! (liveness, the startup probe) is not held: a slow first round must not get the agent
//! restarted, which would only start the round over.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    extract::{RawQuery, State},
    http::StatusCode,
    response::{IntoResponse as _, Response},
};

use crate::http::{
    AppState,
    api::{ApiError, error, parse_flag, parse_query},
    status,
};

/// The query of `/healthz` that asks for readiness too ([`healthz`]); the one definition
/// the server and `drain-agent probe --ready` share.
pub const READY_QUERY: &str = "ready=true";

/// Why the agent is not ready yet (the `error` of the `503`).
pub const NOT_READY: &str = "not ready: the pod listeners (--pod-listen) of the network namespaces found at the start are still being opened";

/// Whether the agent is ready: shared by the node's and the pods' routers and the pod
/// listener manager, which says when its first round is done. Once ready, it stays ready.
#[derive(Clone, Debug)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Ready from the start (nothing to wait for: no `--pod-listen`).
    pub fn ready() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    /// Ready once [`Readiness::set_ready`] is called (by the pod listener manager).
    pub fn after_first_round() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }

    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Whether `query` asks for readiness (`ready=true`; `ready=false` or none: health only).
/// Any other parameter, or `ready` twice, is a `400` naming it, as on every route: ignored,
/// a misspelt `readiness=true` passed before the agent was ready.
fn asks_ready(query: Option<&str>) -> Result<bool, ApiError> {
    parse_flag(&parse_query(query, &["ready"])?, "ready")
}

/// `GET /healthz`: the agent's health ([`status::healthz`]); with `?ready=true`, first
/// `503` while it is not ready.
pub(super) async fn healthz(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Response {
    match asks_ready(query.as_deref()) {
        Err(problem) => return problem.into_response(),
        Ok(true) if !state.ready.is_ready() => {
            return error(StatusCode::SERVICE_UNAVAILABLE, NOT_READY);
        }
        Ok(_) => {}
    }
    status::healthz(State(state)).await
}
