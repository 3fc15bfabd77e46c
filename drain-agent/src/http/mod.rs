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
pub mod metrics_turn;
pub mod pod_scope;
pub mod pods;
pub mod ready;
pub mod server;
mod status;

use std::sync::Arc;

use axum::{
    Router,
    extract::Request,
    http::StatusCode,
    middleware::Next,
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
#[derive(Clone)]
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
    /// Whether this agent answers `/metrics` or an older one beside it does
    /// (`metrics_turn.rs`).
    pub metrics_turn: Arc<metrics_turn::MetricsTurn>,
}

/// The agent's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let routes = Router::new()
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
        .with_state(state);
    // axum answers a route asked with a method it does not have itself, and sets its `Allow`
    // header outside every layer of the routes: the answer is made JSON around them all.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn(method_not_allowed))
}

/// axum's own `405` (a route asked with a method it does not have: `POST /drained`,
/// `GET /drain`) has an empty body: made `{"error": "..."}` naming the method and the ones
/// the route has, as every error answer of the agent ([`api::ErrorBody`]), keeping axum's
/// `Allow` header. Any other answer passes unchanged.
async fn method_not_allowed(request: Request, next: Next) -> Response {
    use axum::{body::HttpBody as _, http::header::ALLOW};
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED
        || response.body().size_hint().exact() != Some(0)
    {
        return response;
    }
    let allow = response.headers().get(ALLOW).cloned();
    let allowed = allow
        .as_ref()
        .and_then(|value| value.to_str().ok())
        .map(|value| value.split(',').collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let mut answer = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {path}; it takes: {allowed}"),
    );
    if let Some(allow) = allow {
        answer.headers_mut().insert(ALLOW, allow);
    }
    answer
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
