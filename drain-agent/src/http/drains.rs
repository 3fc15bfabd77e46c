//! The drains as things: `POST /drain` starts one, `DELETE /drain` cancels one, `GET
//! /drains` lists them, and `GET /health?port=P` tells a load balancer whether a scope is
//! out of rotation.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::{
    drain::{JoinError, Saved},
    http::{
        AppState,
        api::{
            ApiError, DrainsBody, HealthBody, SHUTDOWN_RETRY_AFTER, UNSAVED_WARNING, error,
            stopping, too_many,
        },
        extract::{Controlled, HealthQuery, NoParams, Observer, Posted},
    },
    tracker::Filter,
};

/// `POST /drain?port=P[&addr][&netns][&timeout][&quiet][&ignore][&idle][&on_timeout][&pace]`:
/// starts a drain (201) or returns the one in progress for that scope (200).
pub(super) async fn start_drain(
    State(state): State<Arc<AppState>>,
    Controlled(by, Posted(request)): Controlled<Posted>,
) -> Response {
    if state.tracker.shutting_down() {
        // Nothing is written to --state-dir any more: a drain started now would be lost.
        return stopping(STOPPING_POST);
    }
    if let Err(refused) = request.check_close(state.drains.close_unavailable()) {
        return refused.into_response();
    }
    state.drains.catch_up().await;
    let (record, created) = match state.drains.post(request.spec(), by).await {
        Ok(started) => started,
        Err(JoinError::Full) => {
            return too_many("as many drains as --max-waiters allows are in progress; retry later");
        }
        Err(JoinError::OwnerFull(owner, limit)) => {
            // Another pod's (or the node's) drains are not this caller's to count or name.
            return too_many(format!(
                "{owner} has {limit} drains in progress, the per-owner limit (the drains of one pod's namespace, or of this node's local users, count together; see README \"Shared limits\"): cancel one or retry later; a /drained of a scope past it waits unrecorded"
            ));
        }
        Err(JoinError::Ending(id)) => {
            // Its verdict is about a time before this request: neither joined nor lost.
            return (
                [(header::RETRY_AFTER, SHUTDOWN_RETRY_AFTER)],
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "drain {id} of this scope has ended and is still writing its record; retry"
                    ),
                ),
            )
                .into_response();
        }
        Err(JoinError::Conflict(id, difference)) => {
            return ApiError::Conflict(format!(
                "drain {id} of this scope is in progress with {difference}: cancel it first, or ask with its settings"
            ))
            .into_response();
        }
    };
    // On disk before the answer: a drain the caller was told about survives a restart.
    let saved = state.drains.save().await;
    if saved == Saved::Stopping {
        // The stop began meanwhile: the drain is in this agent's memory only, which ends.
        return stopping(STOPPING_POST);
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    said_if_unsaved((status, Json(record)).into_response(), saved)
}

/// What a `POST /drain` refused at a stop did not do.
const STOPPING_POST: &str = "no drain started";
/// What a `DELETE /drain` refused at a stop did not do.
const STOPPING_DELETE: &str = "nothing cancelled or released";

/// A drain started or cancelled that is not on disk is still answered (it holds while the
/// agent runs: refusing it would leave the scope in rotation now), with a `Warning` that
/// it would not survive a restart; `drain_agent_drains_unsaved` says it too.
fn said_if_unsaved(mut response: Response, saved: Saved) -> Response {
    if saved == Saved::No {
        response
            .headers_mut()
            .insert(header::WARNING, HeaderValue::from_static(UNSAVED_WARNING));
    }
    response
}

/// `DELETE /drain?port=P[&addr][&netns]`: cancels the drain of that scope. Only the same
/// scope (confined: a pod names its own) or the node cancels.
pub(super) async fn cancel_drain(
    State(state): State<Arc<AppState>>,
    Controlled(_, filter): Controlled<Filter>,
) -> Response {
    if state.tracker.shutting_down() {
        // Nothing is written to --state-dir any more: the drain or gate cancelled now would
        // be resumed by the next agent.
        return stopping(STOPPING_DELETE);
    }
    state.drains.catch_up().await;
    let cancelled = state.drains.cancel(&filter).await;
    // The drain gone and the gate released on disk before the answer.
    let saved = state.drains.save().await;
    if saved == Saved::Stopping {
        // The stop began meanwhile: on disk the drain (or gate) is still there.
        return stopping(STOPPING_DELETE);
    }
    let response = match cancelled {
        Some(record) => (StatusCode::OK, Json(record)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no drain of this scope is in progress (a /health gate held after one is released)",
        ),
    };
    said_if_unsaved(response, saved)
}

/// `GET /drains`: drains in progress and the last ended ones.
pub(super) async fn list_drains(
    State(state): State<Arc<AppState>>,
    Observer(caller): Observer,
    NoParams: NoParams,
) -> Response {
    state.drains.catch_up().await;
    let (mut in_progress, mut recent) = state.drains.list();
    in_progress.retain(|record| caller.sees(record));
    recent.retain(|record| caller.sees(record));
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
/// A pod asks about itself (a drain of one of its addresses included) unless its `addr`
/// names another pod; anyone else about the scope it names (the node's port, or the pod
/// `addr` belongs to). One scope's drain never gates another's.
pub(super) async fn health(
    State(state): State<Arc<AppState>>,
    HealthQuery { port, addr, pod }: HealthQuery,
) -> Response {
    state.drains.catch_up().await;
    let question = state.drains.resolve(port, addr, pod).await;
    let draining = state.drains.gated_any(&question).await;
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(HealthBody { port, draining })).into_response()
}
