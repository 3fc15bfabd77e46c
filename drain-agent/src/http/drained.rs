//! `GET /drained?port=P[&timeout=T]…`: one wait, on the outcome of the request's drain
//! ([`crate::drain::waiter`]), and the answer rendered: 200 drained, 503 not (with
//! `Retry-After` when the agent stops), 409, 429 or 500 when there is no answer.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::{
    drain::waiter::{Answer, Unanswered},
    http::{
        AppState,
        api::{AnswerReason, ApiError, DrainedBody, SHUTDOWN_RETRY_AFTER, error, too_many},
        extract::Waiter,
    },
    metrics::{DrainResult, Metrics},
    tracker::WaitError,
};

pub(super) async fn drained(State(state): State<Arc<AppState>>, Waiter(ask): Waiter) -> Response {
    let port = ask.spec.filter.port;
    let query = ask.is_query();
    let continues = ask.continues;
    // A client that resets its connection while it waits drops this future (a FIN alone
    // does not: `http/server` `reset_by_client`): the guard still records the request.
    let abandoned = AbandonedGuard(Some(Arc::clone(&state.metrics)));
    let answer = ask.answer(&state.drains).await;
    abandoned.disarm();
    let (result, problem) = match answer {
        Ok(answer) => return render(&state.metrics, port, query, continues, answer),
        Err(Unanswered::Conflict(id, difference)) => (
            DrainResult::Invalid,
            ApiError::Conflict(format!(
                "drain {id} of this scope is in progress with {difference}: wait with its settings, or cancel it first"
            ))
            .into_response(),
        ),
        Err(Unanswered::Wait(WaitError::TooManyWaiters(max))) => (
            DrainResult::Rejected,
            too_many(
                format!("{max} requests are waiting already (--max-waiters); retry later"),
            ),
        ),
        Err(Unanswered::Wait(WaitError::OwnerFull(owner, limit))) => (
            // The caller's own namespace only: other tenants are not its to count or name.
            DrainResult::Rejected,
            too_many(
                format!(
                    "{owner} has {limit} /drained requests waiting, the per-owner limit of waiters (the waiters of one pod's namespace, or of this node's local users, count together; see README \"Shared limits\"); retry later"
                ),
            ),
        ),
        Err(Unanswered::Wait(WaitError::Source(source))) => (
            DrainResult::Error,
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                crate::logging::in_general("cannot read the connection counts", &source),
            ),
        ),
    };
    state.metrics.drain_request(result, None);
    problem
}

/// A waiter's answer: recorded, and 200 or 503 with its body. A pure query's (`query`:
/// `timeout=0`) is counted as one, drained or not, and is no wait: a hook's progress lines
/// and a script's looks are neither drains that timed out nor waits of 0 s. A slice of a
/// longer wait (`continues`) that ran out is counted `continued`, with no wait time: its
/// hook asks again, and has not timed out.
fn render(metrics: &Metrics, port: u16, query: bool, continues: bool, answer: Answer) -> Response {
    let Answer {
        outcome,
        closed,
        drain,
        shutdown,
        unrecorded,
    } = answer;
    if query {
        metrics.drain_request(DrainResult::Query, None);
    } else {
        let result = if outcome.drained {
            DrainResult::Drained
        } else if shutdown {
            DrainResult::AgentShutdown
        } else if continues {
            DrainResult::Continued
        } else {
            DrainResult::Timeout
        };
        let waited = (result != DrainResult::Continued).then_some(outcome.waited);
        metrics.drain_request(result, waited);
    }
    let status = if outcome.drained {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = DrainedBody {
        port,
        drained: outcome.drained,
        active: outcome.active,
        waited_ms: u64::try_from(outcome.waited.as_millis()).unwrap_or(u64::MAX),
        unknown: outcome.unknown,
        idle: outcome.idle,
        busy: outcome.busy,
        peers: outcome.peers,
        drain,
        unrecorded,
        closed,
        reason: shutdown.then_some(AnswerReason::AgentShutdown),
    };
    if shutdown {
        // The hook should ask the next agent, and a 503 must not look like a timeout.
        return (
            status,
            [(header::RETRY_AFTER, SHUTDOWN_RETRY_AFTER)],
            Json(body),
        )
            .into_response();
    }
    (status, Json(body)).into_response()
}

/// Records a `/drained` request whose client went away before its answer.
struct AbandonedGuard(Option<Arc<Metrics>>);

impl AbandonedGuard {
    /// The answer came: nothing to record here.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbandonedGuard {
    fn drop(&mut self) {
        if let Some(metrics) = self.0.take() {
            metrics.drain_request(DrainResult::Abandoned, None);
        }
    }
}
