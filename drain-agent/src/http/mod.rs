//! The HTTP API (see the README's "HTTP API"): the router, and thin handlers over the
//! [`Tracker`] and the [`Drains`], one file per endpoint family; their parameters and
//! callers arrive through the extractors of `extract.rs`.

pub mod agentcheck;
pub mod api;
pub mod authority;
mod connections;
mod drained;
mod drains;
pub mod extract;
pub mod handover;
pub mod identify;
pub mod pod_scope;
pub mod pods;
pub mod ready;
pub mod server;
mod status;

use std::sync::Arc;

use axum::{
    Router,
    http::StatusCode,
    response::Response,
    routing::{get, post},
};

pub use crate::http::api::WaitLimits;
use crate::{
    drain::Drains,
    http::{api::error, authority::Authority},
    metrics::Metrics,
    tracker::Tracker,
};

/// Everything the handlers need.
pub struct AppState {
    pub tracker: Arc<Tracker>,
    pub limits: WaitLimits,
    pub metrics: Arc<Metrics>,
    pub drains: Arc<Drains>,
    /// Who may do what (`authority.rs`).
    pub authority: Arc<Authority>,
    /// Whether the in-pod port's steering stopped for good (`pods/`): `/healthz` says so.
    pub pod_steering: pods::SteeringStop,
    /// Whether `/healthz?ready=true` passes (`ready.rs`).
    pub ready: ready::Readiness,
}

/// The agent's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/drained", get(drained::drained))
        .route(
            "/drain",
            post(drains::start_drain).delete(drains::cancel_drain),
        )
        .route("/drains", get(drains::list_drains))
        .route("/health", get(drains::health))
        .route("/advice", get(status::advice))
        .route("/healthz", get(ready::healthz))
        .route("/connections", get(connections::connections))
        .route("/metrics", get(status::metrics))
        .fallback(not_found)
        .with_state(state)
}

/// The header of every answer on the node listener that names the agent answering
/// (`run --instance`): two agents share the address during an upgrade, and
/// `drain-agent probe` must know which one it reached.
pub const INSTANCE_HEADER: &str = "drain-agent-instance";

/// `router` with every answer naming `instance` ([`INSTANCE_HEADER`]): the routes' answers,
/// refusals and errors alike, so a probe knows whose answer it has whatever it says.
pub fn naming_instance<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    instance: &str,
) -> anyhow::Result<Router<S>> {
    use anyhow::Context as _;
    let value = axum::http::HeaderValue::from_str(instance)
        .with_context(|| format!("the instance name {instance:?} cannot be sent in a header"))?;
    Ok(router.layer(axum::middleware::map_response(
        move |mut response: Response| {
            let value = value.clone();
            async move {
                response.headers_mut().insert(INSTANCE_HEADER, value);
                response
            }
        },
    )))
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint (try /drained?port=P, /drain, /drains, /health?port=P, /connections, /metrics or /healthz)",
    )
}

#[cfg(test)]
mod tests;
