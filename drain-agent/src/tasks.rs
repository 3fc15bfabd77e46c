//! The agent's background tasks (the event reader, the skipped-run watch, the repair task),
//! watched: when one ends or panics the agent no longer wakes waiters at a close, or no
//! longer repairs counts, so it stops. It logs at ERROR which task ended and how, stops as
//! at SIGTERM but without the grace (`agent::process::stop_in_phases`: listeners closed,
//! every waiter answered `agent_shutdown` with `Retry-After`, so `drain-agent wait` asks
//! the next agent) and exits 1 ([`TaskWatch::outcome`]): systemd's `Restart=on-failure`, or
//! the container runtime, restarts it. Nothing else would: systemd has no probe, and the
//! kubelet's liveness probe would stop it with SIGTERM, through the whole grace.
//!
//! Until the stop has closed the listeners, `/healthz` answers 503 naming the task: a
//! layer around the routers (the node listener's and every pod listener's, whose
//! `/healthz` is the node's), not a change to the routes: the tasks belong to `agent`.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Result, bail};

use axum::{
    Json, Router,
    extract::Request,
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse as _, Response},
};
use log::error;
use serde_json::json;
use tokio::{
    sync::watch,
    task::{AbortHandle, JoinHandle},
};

/// Names and fates of the tasks that have ended (empty while all run).
#[derive(Clone, Debug)]
pub struct TaskWatch {
    ended: Arc<Mutex<Vec<String>>>,
    /// How many have ended (counted after `ended` has them): the agent's stop waits on it.
    count: Arc<watch::Sender<usize>>,
}

impl Default for TaskWatch {
    fn default() -> Self {
        Self {
            ended: Arc::default(),
            count: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl TaskWatch {
    /// Watches `task`, called `name` in logs and in `/healthz`. The returned handle aborts
    /// it (at shutdown); an aborted task is not reported.
    pub fn watch<T: Send + 'static>(&self, name: &'static str, task: JoinHandle<T>) -> AbortHandle {
        let abort = task.abort_handle();
        let ended = Arc::clone(&self.ended);
        let count = Arc::clone(&self.count);
        tokio::spawn(async move {
            let fate = match task.await {
                Ok(_) => "ended".to_owned(),
                Err(problem) if problem.is_cancelled() => return,
                Err(problem) => format!("panicked: {problem}"),
            };
            error!(
                "the {name} {fate}: the agent stops (its waiters answered agent_shutdown) and exits 1, to be restarted"
            );
            ended
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(format!("the {name} {fate}"));
            count.send_modify(|count| *count += 1);
        });
        abort
    }

    /// Resolves once a watched task has ended (at once if one has), with what ended first.
    pub async fn first_end(&self) -> String {
        let mut count = self.count.subscribe();
        // Never closed: `self` holds the sender.
        let _ = count.wait_for(|count| *count > 0).await;
        self.ended().into_iter().next().unwrap_or_default()
    }

    /// An error naming what has ended, if anything has: the agent then exits 1.
    pub fn outcome(&self) -> Result<()> {
        let ended = self.ended();
        if ended.is_empty() {
            return Ok(());
        }
        bail!(
            "stopped because {}: exiting 1, for the supervisor to restart the agent",
            ended.join("; ")
        )
    }

    /// What has ended, in order.
    pub fn ended(&self) -> Vec<String> {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `router` with `/healthz` answering 503 `{"status":"failed","error":…,"tasks":[…]}`
    /// once a watched task has ended; every other route is unchanged.
    pub fn guard_healthz<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Router<S> {
        let watch = self.clone();
        router.layer(axum::middleware::from_fn(
            move |request: Request, next: Next| {
                let watch = watch.clone();
                async move {
                    let ended = watch.ended();
                    if request.uri().path() == "/healthz" && !ended.is_empty() {
                        return failed(&ended);
                    }
                    next.run(request).await
                }
            },
        ))
    }
}

fn failed(ended: &[String]) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "failed",
            "error": ended.join("; "),
            "tasks": ended,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::{body::Body, routing::get};
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    async fn healthz(router: &Router) -> (StatusCode, serde_json::Value) {
        let response = router
            .clone()
            .oneshot(
                Request::get("/healthz")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    #[tokio::test]
    async fn healthz_fails_naming_the_task_that_ended() {
        let watch = TaskWatch::default();
        let router = watch.guard_healthz(
            Router::new()
                .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
                .route("/other", get(|| async { "other" })),
        );
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        watch.watch(
            "event reader",
            tokio::spawn(async move {
                let _ = wait.await;
            }),
        );
        let repair = watch.watch("repair task", tokio::spawn(std::future::pending::<()>()));
        assert_eq!(healthz(&router).await.0, StatusCode::OK);

        // Aborted at shutdown: not a failure (the agent exits 0).
        repair.abort();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(healthz(&router).await.0, StatusCode::OK);
        assert!(watch.outcome().is_ok());

        release.send(()).expect("send");
        let started = std::time::Instant::now();
        let (status, body) = loop {
            let (status, body) = healthz(&router).await;
            if status != StatusCode::OK || started.elapsed() > Duration::from_secs(5) {
                break (status, body);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "failed");
        assert_eq!(body["tasks"], json!(["the event reader ended"]));

        // Other routes still answer.
        let response = router
            .clone()
            .oneshot(Request::get("/other").body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_panic_is_reported_as_one() {
        let watch = TaskWatch::default();
        watch.watch("repair task", tokio::spawn(async { panic!("boom") }));
        let started = std::time::Instant::now();
        while watch.ended().is_empty() && started.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ended = watch.ended();
        assert_eq!(ended.len(), 1);
        assert!(
            ended[0].starts_with("the repair task panicked"),
            "{ended:?}"
        );
    }
}
