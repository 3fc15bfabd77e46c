//! The HTTP API (see the README's "HTTP API"): thin handlers over the [`Tracker`].

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::{Extension, RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

pub use crate::api::WaitLimits;
use crate::{
    api::{
        ApiError, CONNECTION_PARAMETERS, ConnectionsBody, DrainResult, DrainedBody, DrainsBody,
        EndpointRow, HealthBody, OnTimeout, error, parse_drain_request, parse_port, parse_query,
        parse_scope, parse_scope_request,
    },
    drain::{DrainEnd, Drains},
    metrics::Metrics,
    pod_scope::{PodScope, confine, node_only},
    tracker::{Filter, Tracker, WaitError},
};

/// The pod scope of a request (`None` on the node listener): see `pod_scope.rs`.
type Scope = Option<Extension<PodScope>>;

fn scope_of(scope: &Scope) -> Option<&PodScope> {
    scope.as_ref().map(|Extension(scope)| scope)
}

/// Everything the handlers need.
pub struct AppState {
    pub tracker: Arc<Tracker>,
    pub limits: WaitLimits,
    pub metrics: Arc<Metrics>,
    pub drains: Arc<Drains>,
}

/// The agent's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/drained", get(drained))
        .route("/drain", post(start_drain).delete(cancel_drain))
        .route("/drains", get(list_drains))
        .route("/health", get(health))
        .route("/advice", get(advice))
        .route("/healthz", get(healthz))
        .route("/connections", get(connections))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint (try /drained?port=P, /drain, /drains, /health?port=P, /connections, /metrics or /healthz)",
    )
}

async fn drained(
    State(state): State<Arc<AppState>>,
    scope: Scope,
    RawQuery(query): RawQuery,
) -> Response {
    let parsed = parse_drain_request(query.as_deref(), state.limits);
    let request = match confine(scope_of(&scope), parsed).await {
        Ok(request) => request,
        Err(problem) => {
            state.metrics.drain_request(DrainResult::Invalid, None);
            return problem.into_response();
        }
    };
    if request.deprecated_settle && !SETTLE_WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "a /drained request used settle=, which is now quiet= (counted from the request, not from the last change); settle will be removed"
        );
    }
    // A waiter with a timeout joins the drain of its scope, starting one if none is in
    // progress: the load balancer is told (/health, agent-check) and the drain is recorded.
    // `timeout=0` stays a pure query.
    // At the drain limit the waiter still waits, unrecorded: a stop hook must not fail.
    let drain = if request.timeout.is_zero() {
        None
    } else {
        state
            .drains
            .start(request.spec())
            .map(|(record, _)| record.id)
    };
    // A client that hangs up drops this future: the guard still records the request.
    let mut abandoned = AbandonedGuard(Some(Arc::clone(&state.metrics)));
    let outcome = state
        .tracker
        .wait_until_drained(&request.filter, request.timeout, &request.rule)
        .await;
    abandoned.0 = None;
    match outcome {
        Ok(mut outcome) => {
            let mut closed = None;
            if !outcome.drained
                && request.on_timeout == OnTimeout::Close
                && drain.is_some()
                && !state.tracker.shutting_down()
            {
                // The drain closes what is left at its deadline: wait for its record.
                if let Some(record) = state.drains.wait_ended(&request.filter, CLOSE_WAIT).await
                    && record.result == Some(DrainEnd::ClosedAtDeadline)
                {
                    closed = Some(record.closed_by_agent);
                    // Drained only if nothing is left now: a close that failed must not turn
                    // into a "drained". Asked like any answer (doubts confirmed), without
                    // the quiet window, which the deadline has ended.
                    let now_rule = crate::drain_rule::DrainRule {
                        quiet: std::time::Duration::ZERO,
                        ..request.rule.clone()
                    };
                    if let Ok(after) = state
                        .tracker
                        .wait_until_drained(&request.filter, std::time::Duration::ZERO, &now_rule)
                        .await
                    {
                        outcome = after;
                    }
                }
            }
            if request.peers && !outcome.drained && outcome.active > 0 && outcome.peers.is_empty() {
                // A pure query asked for the list (a waiter's answer has it already).
                if let Ok((peers, idle, busy)) =
                    state.tracker.listed(&request.filter, &request.rule).await
                {
                    outcome.peers = peers;
                    outcome.idle = outcome.idle.or(idle);
                    outcome.busy = outcome.busy.or(busy);
                }
            }
            let result = if outcome.drained {
                DrainResult::Drained
            } else {
                DrainResult::Timeout
            };
            state.metrics.drain_request(result, Some(outcome.waited));
            let status = if outcome.drained {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = DrainedBody {
                port: request.filter.port,
                drained: outcome.drained,
                active: outcome.active,
                waited_ms: u64::try_from(outcome.waited.as_millis()).unwrap_or(u64::MAX),
                unknown: outcome.unknown,
                idle: outcome.idle,
                busy: outcome.busy,
                peers: outcome.peers,
                drain,
                closed,
            };
            (status, Json(body)).into_response()
        }
        Err(WaitError::TooManyWaiters(max)) => {
            state.metrics.drain_request(DrainResult::Rejected, None);
            error(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{max} requests are waiting already (--max-waiters); retry later"),
            )
        }
        Err(WaitError::Source(source)) => {
            state.metrics.drain_request(DrainResult::Error, None);
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the connection counts: {source:#}"),
            )
        }
    }
}

/// How long a `/drained` answer waits for its drain to close what is left at the deadline.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST /drain?port=P[&addr][&netns][&timeout][&quiet][&ignore][&idle][&on_timeout][&pace]`:
/// starts a drain (201) or returns the one in progress for that scope (200).
async fn start_drain(
    State(state): State<Arc<AppState>>,
    scope: Scope,
    RawQuery(query): RawQuery,
) -> Response {
    let parsed = parse_drain_request(query.as_deref(), state.limits);
    let request = match confine(scope_of(&scope), parsed).await {
        Ok(request) => request,
        Err(problem) => return problem.into_response(),
    };
    if request.timeout.is_zero() {
        return ApiError::BadRequest("timeout: a drain needs a timeout above 0".into())
            .into_response();
    }
    let Some((record, created)) = state.drains.start(request.spec()) else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "as many drains as --max-waiters allows are in progress; retry later",
        );
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(record)).into_response()
}

/// `DELETE /drain?port=P[&addr][&netns]`: cancels the drain of that scope.
async fn cancel_drain(
    State(state): State<Arc<AppState>>,
    scope: Scope,
    RawQuery(query): RawQuery,
) -> Response {
    let parsed = parse_scope_request(query.as_deref(), state.limits);
    let filter = match confine(scope_of(&scope), parsed).await {
        Ok(filter) => filter,
        Err(problem) => return problem.into_response(),
    };
    match state.drains.cancel(&filter).await {
        Some(record) => (StatusCode::OK, Json(record)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no drain of this scope is in progress",
        ),
    }
}

/// `GET /drains`: drains in progress and the last ended ones.
async fn list_drains(
    State(state): State<Arc<AppState>>,
    scope: Scope,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(problem) = parse_query(query.as_deref(), &[]) {
        return problem.into_response();
    }
    let (mut in_progress, mut recent) = state.drains.list();
    if let Some(scope) = scope_of(&scope) {
        in_progress.retain(|record| record.netns == Some(scope.netns));
        recent.retain(|record| record.netns == Some(scope.netns));
    }
    (
        StatusCode::OK,
        Json(DrainsBody {
            in_progress,
            recent,
        }),
    )
        .into_response()
}

/// `GET /health?port=P`: 200 normally, 503 while a drain of P is in progress — a health
/// check for load balancers (AWS target groups, nginx, HAProxy `httpchk`, readiness).
async fn health(
    State(state): State<Arc<AppState>>,
    scope: Scope,
    RawQuery(query): RawQuery,
) -> Response {
    let port = match parse_query(query.as_deref(), &["port"]).and_then(|values| {
        values
            .get("port")
            .map(|text| parse_port(text))
            .transpose()?
            .ok_or_else(|| ApiError::BadRequest("missing parameter \"port\"".into()))
    }) {
        Ok(port) => port,
        Err(problem) => return problem.into_response(),
    };
    let draining = match scope_of(&scope) {
        Some(scope) => state.drains.draining_in(port, scope.netns),
        None => state.drains.draining(port),
    };
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(HealthBody { port, draining })).into_response()
}

/// `GET /advice`: per port, how long connections last and the drain timeout to pick.
async fn advice(
    State(state): State<Arc<AppState>>,
    scope: Scope,
    RawQuery(query): RawQuery,
) -> Response {
    if scope.is_some() {
        return node_only();
    }
    if let Err(problem) = parse_query(query.as_deref(), &[]) {
        return problem.into_response();
    }
    match state.tracker.durations() {
        Ok(histograms) => {
            let mut advice = crate::advice::advise(&histograms);
            advice.retain(|port| state.metrics.exports_port(port.port));
            (StatusCode::OK, Json(advice)).into_response()
        }
        Err(problem) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the duration histograms: {problem:#}"),
        ),
    }
}

/// `settle` is deprecated: warn once per agent run, not per request.
static SETTLE_WARNED: AtomicBool = AtomicBool::new(false);

/// Records a `/drained` request whose client went away before its answer.
struct AbandonedGuard(Option<Arc<Metrics>>);

impl Drop for AbandonedGuard {
    fn drop(&mut self) {
        if let Some(metrics) = self.0.take() {
            metrics.drain_request(DrainResult::Abandoned, None);
        }
    }
}

/// `200 ok`, `200 degraded` with the reasons (the agent serves, but some answers need the
/// socket tables or say "unknown"), or `503` when the maps cannot be read.
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.tracker.check_health() {
        Ok(()) => {
            let reasons: Vec<String> = state
                .tracker
                .health_doubts()
                .iter()
                .filter(|doubt| doubt.degrades_health())
                .map(ToString::to_string)
                .collect();
            let status = if reasons.is_empty() { "ok" } else { "degraded" };
            let mut body = json!({ "status": status, "attach": state.metrics.attach_method() });
            if !reasons.is_empty() {
                body["reasons"] = json!(reasons);
            }
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(problem) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{problem:#}")),
    }
}

/// `GET /connections[?port=P][&addr=IP][&netns=N][&peers=true]`: endpoints with active
/// connections, and with `peers=true` each one's connections (peer, age, idle, queues).
async fn connections(
    State(state): State<Arc<AppState>>,
    scope: Scope,
    RawQuery(query): RawQuery,
) -> Response {
    let parsed = parse_query(query.as_deref(), &CONNECTION_PARAMETERS).and_then(|values| {
        let port = values
            .get("port")
            .map(|text| parse_port(text))
            .transpose()?;
        let (addr, netns) = parse_scope(&values)?;
        let peers = crate::api::parse_peers_flag(&values)?;
        Ok((port, addr, netns, peers))
    });
    let (port, addr, mut netns, with_peers) = match (parsed, scope_of(&scope)) {
        (Ok(parsed), _) => parsed,
        (Err(problem), Some(scope)) => return scope.hide(problem).into_response(),
        (Err(problem), None) => return problem.into_response(),
    };
    if let Some(scope) = scope_of(&scope) {
        match scope.check(addr, netns).await {
            Ok(own) => netns = Some(own),
            Err(problem) => return problem.into_response(),
        }
    }
    let mut endpoints = match state.tracker.snapshot() {
        Ok(endpoints) => endpoints,
        Err(problem) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the connection counts: {problem:#}"),
            );
        }
    };
    endpoints.retain(|e| {
        e.active > 0
            && port.is_none_or(|p| p == e.port)
            && addr.is_none_or(|a| a == e.addr)
            && netns.is_none_or(|n| n == e.netns)
            && state.metrics.exports_port(e.port)
    });
    endpoints.sort_by_key(|e| (e.port, e.netns, e.addr));
    let mut rows = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let peers = if with_peers {
            let filter = Filter {
                port: endpoint.port,
                addr: Some(endpoint.addr),
                netns: Some(endpoint.netns),
            };
            match state.tracker.remaining(&filter).await {
                Ok(peers) => Some(peers),
                Err(problem) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot list the connections: {problem:#}"),
                    );
                }
            }
        } else {
            None
        };
        rows.push(EndpointRow { endpoint, peers });
    }
    (StatusCode::OK, Json(ConnectionsBody { endpoints: rows })).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>, scope: Scope) -> Response {
    if scope.is_some() {
        return node_only();
    }
    match state.metrics.render() {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{drain::Drains, netns};

    use axum::body::Body;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;
    use crate::tracker::fake::{FakeSource, endpoint};

    const LIMITS: WaitLimits = WaitLimits {
        default_timeout: Duration::from_secs(30),
        max_timeout: Duration::from_secs(300),
        own_port: Some(9100),
    };

    fn app(endpoints: Vec<crate::tracker::Endpoint>) -> (Arc<FakeSource>, Arc<AppState>) {
        let source = Arc::new(FakeSource::default());
        source.set(endpoints);
        let tracker = Arc::new(Tracker::new(source.clone(), 8));
        let metrics =
            Arc::new(Metrics::new(tracker.clone(), None, "test", false).expect("metrics"));
        let drains = Arc::new(Drains::new(tracker.clone(), None, None, 8));
        metrics
            .register_drains(drains.clone())
            .expect("drain metrics");
        let state = Arc::new(AppState {
            tracker,
            limits: LIMITS,
            metrics,
            drains,
        });
        (source, state)
    }

    async fn request(
        state: &Arc<AppState>,
        method: &str,
        uri: &str,
    ) -> (StatusCode, serde_json::Value) {
        let response = router(state.clone())
            .oneshot(
                axum::http::Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        // Not JSON (the metrics): the text, as a JSON string.
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        (status, body)
    }

    #[tokio::test]
    async fn a_drain_is_started_once_gates_health_and_is_recorded() {
        let (source, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
        let (status, _) = get(&state, "/health?port=8080").await;
        assert_eq!(status, StatusCode::OK);
        let (status, first) = request(&state, "POST", "/drain?port=8080&timeout=1m").await;
        assert_eq!(status, StatusCode::CREATED, "{first}");
        let (status, again) = request(&state, "POST", "/drain?port=8080&timeout=1m").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(first["id"], again["id"]);
        let (status, body) = get(&state, "/health?port=8080").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["draining"], true);
        // Another port is not gated.
        assert_eq!(get(&state, "/health?port=8081").await.0, StatusCode::OK);
        let (status, body) = request(&state, "DELETE", "/drain?port=8080").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["result"], "cancelled");
        assert_eq!(get(&state, "/health?port=8080").await.0, StatusCode::OK);
        let (status, _) = request(&state, "DELETE", "/drain?port=8080").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // A plain waiter with a timeout joins (here: starts) a drain and names it.
        source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
        let (status, body) = get(&state, "/drained?port=8080&timeout=5s").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["drain"].as_u64().is_some(), "{body}");
        // timeout=0 starts nothing.
        let (_, body) = get(&state, "/drained?port=8080&timeout=0").await;
        assert!(body.get("drain").is_none(), "{body}");
        let (status, body) = get(&state, "/drains").await;
        assert_eq!(status, StatusCode::OK);
        let recent = body["recent"].as_array().expect("recent");
        assert!(!recent.is_empty(), "{body}");
        assert_eq!(recent.last().expect("first drain")["result"], "cancelled");
        let metrics = state.metrics.render().expect("metrics");
        assert!(
            metrics.contains("drain_agent_drains_total{result=\"cancelled\"} 1"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn bad_drain_requests_are_400_and_change_nothing() {
        let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
        for (method, uri, expected) in [
            ("POST", "/drain", "missing parameter \"port\""),
            ("POST", "/drain?port=8080&timeout=0", "timeout"),
            ("POST", "/drain?port=8080&on_timeout=explode", "on_timeout"),
            ("POST", "/drain?port=8080&pace=-1", "pace"),
            ("POST", "/drain?port=8080&ignore=10.0.0.0/99", "ignore"),
            ("POST", "/drain?port=8080&idle=soon", "idle"),
            ("DELETE", "/drain?port=8080&timeout=1s", "unknown parameter"),
            ("GET", "/health", "missing parameter \"port\""),
            ("GET", "/health?port=0", "port"),
            ("GET", "/drains?x=1", "unknown parameter"),
        ] {
            let (status, body) = request(&state, method, uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri}: {body}");
            let message = body["error"].as_str().unwrap_or_default();
            assert!(message.contains(expected), "{method} {uri}: {message}");
        }
        let (_, body) = get(&state, "/drains").await;
        assert_eq!(body["in_progress"].as_array().map(Vec::len), Some(0));
        assert_eq!(get(&state, "/health?port=8080").await.0, StatusCode::OK);
    }

    async fn get(state: &Arc<AppState>, uri: &str) -> (StatusCode, serde_json::Value) {
        request(state, "GET", uri).await
    }

    /// Listing the connections left is a pass over the socket tables (80 ms with 9,000
    /// connections on the port): a pure query pays it only when it asks with `peers=true`.
    /// Found by the answer benchmark: `timeout=0` had gone from 0.36 ms to 57 ms.
    #[tokio::test(start_paused = true)]
    async fn a_pure_query_lists_the_connections_only_when_asked() {
        let (source, state) = app(vec![endpoint("127.0.0.1", 8080, 3)]);
        let lists = || source.peer_lists.load(std::sync::atomic::Ordering::Relaxed);
        let (status, body) = get(&state, "/drained?port=8080&timeout=0").await;
        assert_eq!(
            (status, &body["active"]),
            (StatusCode::SERVICE_UNAVAILABLE, &3.into())
        );
        assert_eq!(lists(), 0);
        let (status, _) = get(&state, "/drained?port=8080&timeout=0&peers=true").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(lists(), 1);
        let (status, body) = get(&state, "/drained?port=8080&timeout=0&peers=yes").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        // A waiter's answer lists them at its deadline (and so may the record of the drain
        // it started).
        let (status, _) = get(&state, "/drained?port=8080&timeout=1s").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(lists() >= 2, "{}", lists());
    }

    /// A close at the deadline that left connections open (here: the agent has no way to
    /// close, so nothing was closed) must not answer drained.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_close_that_closed_nothing_is_not_drained() {
        let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 2)]);
        let (status, body) = get(&state, "/drained?port=8080&timeout=2s&on_timeout=close").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["drained"], false, "{body}");
        assert_eq!(body["active"], 2, "{body}");
        let (_, drains) = get(&state, "/drains").await;
        assert!(
            drains.to_string().contains("closed_at_deadline"),
            "{drains}"
        );
    }

    #[tokio::test]
    async fn drained_port_answers_200() {
        let (_, state) = app(vec![endpoint("127.0.0.1", 9090, 4)]);
        let (status, body) = get(&state, "/drained?port=8080&timeout=0").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["drained"], true);
        assert_eq!(body["active"], 0);
        assert_eq!(body["port"], 8080);
        assert!(body["waited_ms"].is_u64());
    }

    #[tokio::test]
    async fn busy_port_answers_503_with_the_count() {
        let (_, state) = app(vec![
            endpoint("127.0.0.1", 8080, 4),
            endpoint("10.0.0.5", 8080, 2),
        ]);
        let (status, body) = get(&state, "/drained?port=8080&timeout=0").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["drained"], false);
        assert_eq!(body["active"], 6);
        let (_, body) = get(&state, "/drained?port=8080&timeout=0&addr=10.0.0.5").await;
        assert_eq!(body["active"], 2);
        let (_, body) = get(&state, "/drained?port=8080&timeout=0&addr=::ffff:10.0.0.5").await;
        assert_eq!(body["active"], 2);
        // The fake's endpoints live in a namespace that does not exist here: 404, not 0.
        let (status, _) = get(&state, "/drained?port=8080&timeout=0&netns=4026531840").await;
        let exists = crate::netns::all_namespaces().contains_key(&4_026_531_840);
        assert_eq!(status == StatusCode::NOT_FOUND, !exists);
        // An inode that is no network namespace is not "drained": it is not found.
        let (status, body) = get(&state, "/drained?port=8080&timeout=0&netns=1").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("inode 1")
        );
    }

    #[tokio::test]
    async fn bad_input_is_400_naming_the_parameter() {
        let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
        let cases = [
            ("/drained", "missing parameter \"port\""),
            ("/drained?port=", "port: \"\" is not a port"),
            ("/drained?port=abc", "port: \"abc\""),
            ("/drained?port=0", "port: \"0\""),
            ("/drained?port=65536", "port: \"65536\""),
            ("/drained?port=-1", "port: \"-1\""),
            ("/drained?port=80&port=81", "more than once"),
            ("/drained?port=80&prot=1", "unknown parameter \"prot\""),
            ("/drained?port=80&addr=nope", "addr: \"nope\" is not an IP"),
            ("/drained?port=80&timeout=soon", "timeout: "),
            ("/drained?port=80&timeout=1y", "timeout: unknown unit"),
            (
                "/drained?port=80&timeout=6m",
                "longer than the maximum 300s",
            ),
            ("/drained?port=80&settle=10h", "settle: 10h is longer"),
            ("/drained?port=80&netns=abc", netns::REFUSED_PATH),
            ("/drained?port=80&netns=/nonexistent", netns::REFUSED_PATH),
            (
                "/drained?port=80&netns=/proc/self/status",
                netns::REFUSED_PATH,
            ),
            ("/drained?port=80&netns=/proc/1/ns/mnt", netns::REFUSED_PATH),
            ("/drained?port=80&netns=/root", netns::REFUSED_PATH),
            ("/drained?port=9100", "the agent's own API port"),
            (
                "/drained?port=80&timeout=5s&settle=10s",
                "longer than the timeout",
            ),
            ("/drained?port=%ZZ", "port:"),
        ];
        for (uri, expected) in cases {
            let (status, body) = get(&state, uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            let message = body["error"].as_str().unwrap_or_default();
            assert!(message.contains(expected), "{uri}: {message}");
        }
        // Nothing a bad request did changed the answer to a good one.
        let (status, body) = get(&state, "/drained?port=8080&timeout=0").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["active"], 1);
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_health_is_200() {
        let (source, state) = app(vec![]);
        let (status, body) = get(&state, "/drainz?port=1").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("/drained")
        );
        let (status, body) = get(&state, "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        source
            .broken
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (status, _) = get(&state, "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, body) = get(&state, "/drained?port=1&timeout=0").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("broken")
        );
    }

    #[tokio::test]
    async fn a_waiter_answers_when_its_port_drains() {
        let (source, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
        let request = {
            let state = state.clone();
            tokio::spawn(async move { get(&state, "/drained?port=8080&timeout=30s").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!request.is_finished());
        source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
        state.tracker.notify_port(8080);
        let (status, body) = request.await.expect("join");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["drained"], true);
    }

    #[tokio::test]
    async fn connections_lists_active_endpoints() {
        let (_, state) = app(vec![
            endpoint("127.0.0.1", 8080, 3),
            endpoint("127.0.0.1", 9090, 0),
            endpoint("::1", 443, 1),
        ]);
        let (status, body) = get(&state, "/connections").await;
        assert_eq!(status, StatusCode::OK);
        let endpoints = body["endpoints"].as_array().expect("array");
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[0]["port"], 443);
        assert_eq!(endpoints[0]["addr"], "::1");
        assert_eq!(endpoints[1]["port"], 8080);
        assert_eq!(endpoints[1]["active"], 3);
        let (_, body) = get(&state, "/connections?port=443").await;
        assert_eq!(body["endpoints"].as_array().expect("array").len(), 1);
        let (status, body) = get(&state, "/connections?port=x").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().unwrap_or_default().contains("port"));
        let (status, body) = get(&state, "/connections?port=1&port=2").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("more than once")
        );
    }
}
