//! The agent's own state: `GET /healthz` (can it count?), `GET /metrics` (Prometheus) and
//! `GET /advice` (how long connections last, the timeout to pick).

use std::sync::Arc;

use crate::http::{
    AppState,
    api::{HealthStatus, HealthzBody, error},
    extract::{NoParams, NodeWide},
    metrics_turn::{RETRY_AFTER, Turn},
    pod_scope::{PodScope, node_only},
};
use axum::{
    Json,
    extract::{Extension, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

/// `200 ok`, `200 degraded` with the reasons (the agent serves, but some answers need the
/// socket tables or say "unknown", or the in-pod port is steered to it in no pod:
/// [`SteeringStop`](crate::http::pods::SteeringStop)), or `503` when the maps cannot be
/// read; `kernel_limits` names the kernel's limits (every answer confirmed with the socket
/// tables), whatever the status.
pub(super) async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.tracker.check_health() {
        Ok(()) => {
            let doubts = state.tracker.health_doubts();
            let mut reasons: Vec<String> = doubts
                .iter()
                .filter(|doubt| doubt.degrades_health())
                .map(ToString::to_string)
                .collect();
            // Not a doubt about a count (`drain_agent_degraded` stays 0 for it): pods' hooks
            // to the in-pod port are refused (`drain_agent_pod_listeners{state="stopped"}`).
            if state.pod_steering.stopped() {
                reasons.push(crate::http::pods::SteeringStop::REASON.to_owned());
            }
            let status = if reasons.is_empty() {
                HealthStatus::Ok
            } else {
                HealthStatus::Degraded
            };
            let body = HealthzBody {
                status,
                attach: state.metrics.attach_method().to_owned(),
                reasons,
                // Limits of this kernel: every answer is confirmed with the socket tables
                // for them (right, each a little slower); not a fault the status should raise.
                kernel_limits: doubts
                    .iter()
                    .filter(|doubt| doubt.kernel_limit())
                    .map(ToString::to_string)
                    .collect(),
                // Not a fault of the counts (the status stays): drains that close at their
                // deadline are refused, and this says why.
                close_unavailable: state.drains.close_unavailable().map(ToString::to_string),
                // Serving while the first walk counts what was open before the start (or
                // checks adopted counts): answers are confirmed with the socket tables
                // meanwhile (not a fault).
                seeding: doubts.iter().any(|doubt| {
                    matches!(
                        doubt,
                        crate::doubt::Doubt::Seeding | crate::doubt::Doubt::AdoptedUnwalked
                    )
                }),
            };
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(problem) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{problem:#}")),
    }
}

/// `GET /advice`: per port, how long connections last and the drain timeout to pick.
pub(super) async fn advice(
    State(state): State<Arc<AppState>>,
    NodeWide: NodeWide,
    NoParams: NoParams,
) -> Response {
    match state.tracker.durations() {
        Ok(histograms) => {
            let mut advice = crate::drain::advice::advise(&histograms);
            advice.retain(|port| state.metrics.exports_port(port.port));
            (StatusCode::OK, Json(advice)).into_response()
        }
        Err(problem) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the duration histograms: {problem:#}"),
        ),
    }
}

/// The `503` of `/metrics` while an older agent beside this one answers it.
pub const OLDER_AGENT_SERVES: &str = "another agent on this node (an upgrade's older one) listens on this address and answers /metrics until it stops; this one answers once it has";

/// `GET /metrics`: public on the node listener (Prometheus, wherever it runs: no client
/// addresses are in it); not served inside a pod (node-wide data), nor while an older
/// agent listens on the same address (`metrics_turn.rs`: `503` with `Retry-After`).
pub(super) async fn metrics(
    State(state): State<Arc<AppState>>,
    scope: Option<Extension<PodScope>>,
    // A scraper's `params:` are refused (400 naming the first), not ignored: the answer
    // would be the same whatever they ask.
    NoParams: NoParams,
) -> Response {
    if scope.is_some() {
        return node_only();
    }
    // An upgrade's overlap: the older agent answers until it closes its listener, so that
    // scrapes do not alternate between two agents' counters.
    if state.metrics_turn.now().await == Turn::Older {
        let mut answer = error(StatusCode::SERVICE_UNAVAILABLE, OLDER_AGENT_SERVES);
        answer.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from_static(RETRY_AFTER),
        );
        return answer;
    }
    match state.metrics.render_off_runtime().await {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(problem) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render metrics: {problem:#}"),
        ),
    }
}
