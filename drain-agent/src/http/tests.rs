use std::time::Duration;

use crate::{drain::Drains, sys::netns};

use axum::body::Body;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use super::*;
use crate::{
    http::agentcheck::Reply,
    http::authority::PortOwners,
    sys::pod_addresses::{AddressSource, Namespace, PodAddresses},
    tracker::fake::{FakeSource, endpoint},
};
use crate::{
    http::authority::{Authority, Caller},
    metrics::Metrics,
    tracker::Tracker,
};
use axum::http::{StatusCode, header};

const LIMITS: WaitLimits = WaitLimits {
    default_timeout: Duration::from_secs(30),
    max_timeout: Duration::from_secs(300),
    own_port: Some(9100),
    own_netns: Some(1),
};

/// A test app over `endpoints` (also the pod listeners' router tests', `pods/manager.rs`).
pub(super) fn app(endpoints: Vec<crate::tracker::Endpoint>) -> (Arc<FakeSource>, Arc<AppState>) {
    app_with(endpoints, None)
}

/// [`app`], its drains saved in `state_dir` when given (`--state-dir`).
fn app_with(
    endpoints: Vec<crate::tracker::Endpoint>,
    state_dir: Option<&std::path::Path>,
) -> (Arc<FakeSource>, Arc<AppState>) {
    app_built(endpoints, state_dir, |drains| drains)
}

/// [`app_with`], its registry set up by `build` (other limits).
fn app_built(
    endpoints: Vec<crate::tracker::Endpoint>,
    state_dir: Option<&std::path::Path>,
    build: impl FnOnce(Drains) -> Drains,
) -> (Arc<FakeSource>, Arc<AppState>) {
    app_made(endpoints, state_dir, |tracker| tracker, build)
}

/// [`app_built`], its tracker (8 waiters at most) set up by `made` (other limits).
fn app_made(
    endpoints: Vec<crate::tracker::Endpoint>,
    state_dir: Option<&std::path::Path>,
    made: impl FnOnce(Tracker) -> Tracker,
    build: impl FnOnce(Drains) -> Drains,
) -> (Arc<FakeSource>, Arc<AppState>) {
    app_full(
        endpoints,
        state_dir,
        None,
        made,
        build,
        Arc::new(TwoPods),
        1,
    )
}

/// [`app_built`] whose drains close connections with `closer`.
fn app_closing(
    endpoints: Vec<crate::tracker::Endpoint>,
    state_dir: Option<&std::path::Path>,
    closer: Option<Arc<dyn crate::closer::Closer>>,
    build: impl FnOnce(Drains) -> Drains,
) -> (Arc<FakeSource>, Arc<AppState>) {
    app_full(
        endpoints,
        state_dir,
        closer,
        |tracker| tracker,
        build,
        Arc::new(TwoPods),
        1,
    )
}

/// [`app_built`], the namespaces' addresses read from `addresses`.
fn app_addressed(
    endpoints: Vec<crate::tracker::Endpoint>,
    state_dir: Option<&std::path::Path>,
    build: impl FnOnce(Drains) -> Drains,
    addresses: Arc<dyn AddressSource>,
) -> (Arc<FakeSource>, Arc<AppState>) {
    app_full(
        endpoints,
        state_dir,
        None,
        |tracker| tracker,
        build,
        addresses,
        1,
    )
}

/// Every test app: drains closing with `closer`, the tracker set up by `made`, the
/// registry by `build`, the namespaces' addresses from `addresses`, the node's own
/// namespace the inode `node_netns`.
fn app_full(
    endpoints: Vec<crate::tracker::Endpoint>,
    state_dir: Option<&std::path::Path>,
    closer: Option<Arc<dyn crate::closer::Closer>>,
    made: impl FnOnce(Tracker) -> Tracker,
    build: impl FnOnce(Drains) -> Drains,
    addresses: Arc<dyn AddressSource>,
    node_netns: u32,
) -> (Arc<FakeSource>, Arc<AppState>) {
    let source = Arc::new(FakeSource::default());
    source.set(endpoints);
    let tracker = Arc::new(made(Tracker::new(source.clone(), 8)));
    let metrics = Arc::new(
        Metrics::new(
            tracker.clone(),
            None,
            crate::metrics::ConnectionLabels::Port,
            "test",
            false,
        )
        .expect("metrics"),
    );
    let pods = Arc::new(PodAddresses::new(node_netns, addresses));
    let owners: Arc<dyn PortOwners> = Arc::new(Owners);
    let mut drains = Drains::new(tracker.clone(), closer, None, Some(Arc::clone(&pods)), 8)
        .with_port_owners(Arc::clone(&owners))
        .with_metric_labels(metrics.labels().clone());
    if let Some(dir) = state_dir {
        drains = drains
            .with_state_file(crate::drain::state_file::StateFile::open(dir).expect("state dir"));
    }
    let drains = Arc::new(build(drains));
    metrics
        .register_drains(drains.clone())
        .expect("drain metrics");
    let state = Arc::new(AppState {
        tracker,
        limits: LIMITS,
        metrics,
        drains,
        authority: Arc::new(Authority { pods, owners }),
        pod_steering: crate::http::pods::SteeringStop::default(),
        ready: crate::http::ready::Readiness::ready(),
        metrics_turn: Arc::new(crate::http::metrics_turn::MetricsTurn::alone()),
    });
    (source, state)
}

/// Two pods: namespace 7 (10.1.0.7) and 8 (10.1.0.8); the node is namespace 1.
struct TwoPods;

impl AddressSource for TwoPods {
    fn read(&self) -> anyhow::Result<std::collections::BTreeMap<u32, Namespace>> {
        Ok(std::collections::BTreeMap::from([
            (
                7,
                vec!["10.1.0.7".parse::<std::net::IpAddr>().expect("ip")].into(),
            ),
            (
                8,
                vec!["10.1.0.8".parse::<std::net::IpAddr>().expect("ip")].into(),
            ),
        ]))
    }
}

/// Namespaces whose addresses a test changes (the node is namespace 1), each with a cookie
/// of its own.
struct Addresses(std::sync::Mutex<(std::collections::BTreeMap<u32, Namespace>, u64)>);

impl Addresses {
    fn new(namespaces: &[(u32, &[&str])]) -> Arc<Self> {
        let this = Arc::new(Self(std::sync::Mutex::default()));
        for (netns, addresses) in namespaces {
            this.set(*netns, addresses);
        }
        this
    }

    /// Namespace `netns`'s addresses are `addresses` now (a new namespace if none was).
    fn set(&self, netns: u32, addresses: &[&str]) {
        let addresses = addresses
            .iter()
            .map(|text| text.parse().expect("ip"))
            .collect();
        let (namespaces, cookies) = &mut *self.0.lock().expect("lock");
        let namespace = namespaces.entry(netns).or_insert_with(|| {
            *cookies += 1;
            Namespace {
                cookie: Some(*cookies),
                addresses: Vec::new(),
            }
        });
        namespace.addresses = addresses;
    }

    /// Namespace `netns` is gone and a new one has its inode (the kernel hands the lowest
    /// free inode out again), with `addresses`.
    fn replace(&self, netns: u32, addresses: &[&str]) {
        self.0.lock().expect("lock").0.remove(&netns);
        self.set(netns, addresses);
    }
}

impl AddressSource for Addresses {
    fn read(&self) -> anyhow::Result<std::collections::BTreeMap<u32, Namespace>> {
        Ok(self.0.lock().expect("lock").0.clone())
    }
}

/// Port 8080's sockets are uid 1000's; 9090's are uid 1000's and root's.
/// Port 8080's sockets are uid 1000's; 9090's are uid 1000's and root's; 7071's uid 1001's.
struct Owners;

impl PortOwners for Owners {
    fn owners(&self, port: u16) -> anyhow::Result<Vec<u32>> {
        Ok(match port {
            8080 => vec![1000, 1000],
            7071 => vec![1001],
            9090 => vec![1000, 0],
            _ => Vec::new(),
        })
    }
}

async fn request(
    state: &Arc<AppState>,
    method: &str,
    uri: &str,
) -> (StatusCode, serde_json::Value) {
    request_as(state, Caller::Node, method, uri).await
}

async fn request_as(
    state: &Arc<AppState>,
    caller: Caller,
    method: &str,
    uri: &str,
) -> (StatusCode, serde_json::Value) {
    let response = response_as(state, caller, method, uri).await;
    (response.status(), body_of(response).await)
}

/// The status of `GET uri` asked by `caller`.
async fn status_as(state: &Arc<AppState>, caller: Caller, uri: &str) -> StatusCode {
    request_as(state, caller, "GET", uri).await.0
}

/// The whole answer, headers too.
async fn response_as(
    state: &Arc<AppState>,
    caller: Caller,
    method: &str,
    uri: &str,
) -> axum::response::Response {
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .expect("request");
    request.extensions_mut().insert(caller);
    router(state.clone())
        .oneshot(request)
        .await
        .expect("response")
}

/// A response's body as JSON; one that is not JSON (the metrics): the text, as a string.
async fn body_of(response: axum::response::Response) -> serde_json::Value {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Asserts an error answer: its status, and a text its message contains.
#[track_caller]
fn refused(answer: (StatusCode, serde_json::Value), status: StatusCode, text: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    let message = answer.1["error"].as_str().unwrap_or_default();
    assert!(message.contains(text), "{message}");
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

/// A `POST` or `DELETE /drain` whose drains cannot be saved in `--state-dir` (here a
/// directory stands where the file is written first; in life a full or read-only disk) is
/// still carried out and answered, with a `Warning` that it would not survive a restart,
/// and the metrics say so until a save reaches the disk again. Before, only the log did:
/// the caller was told 201 and a restart dropped the drain and its `/health` gate.
#[tokio::test]
async fn drains_that_cannot_be_saved_are_answered_with_a_warning_and_counted() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, state) = app_with(
        vec![
            endpoint("127.0.0.1", 8080, 1),
            endpoint("127.0.0.1", 8081, 1),
        ],
        Some(dir.path()),
    );
    let unsaved_metrics = |state: &Arc<AppState>| {
        let metrics = state.metrics.render().expect("metrics");
        let value = |name: &str| {
            metrics
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{name} in {metrics}"))
                .to_owned()
        };
        (
            value("drain_agent_drains_unsaved"),
            value("drain_agent_drain_save_failures_total"),
        )
    };
    let warning = |response: &axum::response::Response| {
        response
            .headers()
            .get(header::WARNING)
            .map(|value| value.to_str().expect("ascii").to_owned())
    };
    let send = |method: &'static str, uri: &'static str| {
        let state = Arc::clone(&state);
        async move {
            let mut request = axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .expect("request");
            request.extensions_mut().insert(Caller::Node);
            router(state).oneshot(request).await.expect("response")
        }
    };

    let saved = send("POST", "/drain?port=8080&timeout=4m").await;
    assert_eq!(saved.status(), StatusCode::CREATED);
    assert_eq!(warning(&saved), None);
    assert_eq!(unsaved_metrics(&state), ("0".into(), "0".into()));

    let blocker = dir
        .path()
        .join(format!("{}.tmp", crate::drain::state_file::FILE_NAME));
    std::fs::create_dir_all(blocker.join("inside")).expect("blocker");
    let unsaved = send("POST", "/drain?port=8081&timeout=4m").await;
    assert_eq!(unsaved.status(), StatusCode::CREATED, "still started");
    assert_eq!(warning(&unsaved).as_deref(), Some(api::UNSAVED_WARNING));
    assert_eq!(
        get(&state, "/health?port=8081").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (flag, failures) = unsaved_metrics(&state);
    assert_eq!(flag, "1");
    assert!(failures.parse::<u64>().expect("count") >= 1, "{failures}");
    let cancelled = send("DELETE", "/drain?port=8081").await;
    assert_eq!(cancelled.status(), StatusCode::OK, "still cancelled");
    assert_eq!(warning(&cancelled).as_deref(), Some(api::UNSAVED_WARNING));
    assert_eq!(get(&state, "/health?port=8081").await.0, StatusCode::OK);

    std::fs::remove_dir_all(&blocker).expect("blocker gone");
    let cancelled = send("DELETE", "/drain?port=8080").await;
    assert_eq!(cancelled.status(), StatusCode::OK);
    assert_eq!(warning(&cancelled), None);
    let (flag, failures) = unsaved_metrics(&state);
    assert_eq!(flag, "0", "saved again");
    assert!(failures.parse::<u64>().expect("count") >= 2, "{failures}");
}

#[tokio::test]
async fn bad_drain_requests_are_400_and_change_nothing() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    for (method, uri, expected) in [
        ("POST", "/drain", "missing parameter \"port\""),
        ("POST", "/drain?port=8080&timeout=0", "timeout"),
        ("POST", "/drain?port=8080&on_timeout=explode", "on_timeout"),
        ("POST", "/drain?port=8080&pace=-1", "pace"),
        (
            "POST",
            "/drain?port=8080&timeout=5m&pace=50",
            "pace: it paces the closing at the timeout",
        ),
        ("POST", "/drain?port=8080&ignore=10.0.0.0/99", "ignore"),
        // Address bits beyond the prefix: `$HOST_IP/32` on an IPv6 node was read as a /32
        // of IPv6 (every client ignored, drained at once with clients connected).
        (
            "POST",
            "/drain?port=8080&ignore=2600:1f14:ab:cd00::5/32",
            "ignore: \"2600:1f14:ab:cd00::5/32\" has address bits set beyond its prefix",
        ),
        (
            "GET",
            "/drained?port=8080&timeout=0&ignore=10.1.2.3/8",
            "ignore: \"10.1.2.3/8\" has address bits set beyond its prefix",
        ),
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

/// An `ignore` list had no limit: one request (hyper takes a ~64 KB URI) kept ~6,000
/// CIDRs in a drain, copied into the state file in `--state-dir`, and a few hundred such
/// drains made every later save fail (over the 16 MiB a restart reads) and cost more
/// memory than the agent is given. Over [`MAX_IGNORE`] entries is a 400 naming `ignore`
/// and the limit, on every route that takes the list, and starts nothing.
#[tokio::test(start_paused = true)]
async fn an_ignore_list_over_the_limit_is_400_and_starts_no_drain() {
    use crate::drain_rule::MAX_IGNORE;
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    let list = |count: usize| vec!["10.0.0.1/32"; count].join(",");
    let over = list(MAX_IGNORE + 1);
    for (method, uri) in [
        ("POST", format!("/drain?port=8080&timeout=1m&ignore={over}")),
        (
            "GET",
            format!("/drained?port=8080&timeout=1s&ignore={over}"),
        ),
        ("GET", format!("/drained?port=8080&timeout=0&ignore={over}")),
    ] {
        refused(
            request(&state, method, &uri).await,
            StatusCode::BAD_REQUEST,
            &format!("ignore: at most {MAX_IGNORE}"),
        );
    }
    let (_, drains) = get(&state, "/drains").await;
    assert_eq!(drains["in_progress"].as_array().map(Vec::len), Some(0));
    assert_eq!(drains["recent"].as_array().map(Vec::len), Some(0));
    assert_eq!(get(&state, "/health?port=8080").await.0, StatusCode::OK);
    // At the limit it is taken.
    let uri = format!("/drain?port=8080&timeout=1m&ignore={}", list(MAX_IGNORE));
    let (status, body) = request(&state, "POST", &uri).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
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

/// `drain_agent_drain_requests_total` of `result` and `drain_agent_drain_wait_seconds_count`,
/// as `/metrics` renders them now.
fn drain_request_metrics(state: &Arc<AppState>, result: &str) -> (u64, u64) {
    let metrics = state.metrics.render().expect("metrics");
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a count in {metrics}"))
    };
    (
        value(&format!(
            "drain_agent_drain_requests_total{{result=\"{result}\"}}"
        )),
        value("drain_agent_drain_wait_seconds_count"),
    )
}

/// Audit: every not-drained `/drained` answer was counted `result="timeout"` with a wait
/// sample, pure queries (`timeout=0`) too. `drain-agent wait` sends one every `--progress`
/// (5 s) and, waiting out, every second: one stop hook that waited 17 s for one connection
/// counted three timeouts and one drained, `DrainAgentDrainsTimingOut` fired for drains
/// that never timed out, and the wait histogram filled with zeros. A query is counted
/// `result="query"`, drained or not, and is no wait.
#[tokio::test(start_paused = true)]
async fn a_pure_query_is_neither_a_timed_out_drain_nor_a_wait() {
    let (source, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    // The queries of a hook's progress lines, and of a wait that waits out its timeout.
    for uri in [
        "/drained?port=8080&timeout=0",
        "/drained?port=8080&timeout=0&peers=true",
        "/drained?port=8080&timeout=0ms&peers=true",
    ] {
        let (status, body) = get(&state, uri).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {body}");
    }
    assert_eq!(drain_request_metrics(&state, "timeout"), (0, 0));
    assert_eq!(drain_request_metrics(&state, "query").0, 3);
    // A real wait that runs out is one timeout and one wait.
    let (status, _) = get(&state, "/drained?port=8080&timeout=1s").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(drain_request_metrics(&state, "timeout"), (1, 1));
    // A query that finds the port drained is no drain either: the drained count (and the
    // alert's share) is of the waits.
    source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
    let (status, _) = get(&state, "/drained?port=8080&timeout=0").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(drain_request_metrics(&state, "drained"), (0, 1));
    assert_eq!(drain_request_metrics(&state, "query").0, 4);
    let (status, _) = get(&state, "/drained?port=8080&timeout=5s").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(drain_request_metrics(&state, "drained"), (1, 2));
    assert_eq!(drain_request_metrics(&state, "timeout").0, 1);
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
    let exists = crate::sys::netns::all_namespaces()
        .expect("scan")
        .contains_key(&4_026_531_840);
    assert_eq!(status == StatusCode::NOT_FOUND, !exists);
    // An inode that is no network namespace is not "drained": it is not found.
    let answer = get(&state, "/drained?port=8080&timeout=0&netns=1").await;
    refused(answer, StatusCode::NOT_FOUND, "inode 1");
}

/// Found by an audit: out of descriptors the namespace scan found no namespace, so a
/// `netns=INODE` that exists was answered `404` "unknown", which `drain-agent wait` takes
/// as a refusal and stops waiting (a pod's `preStop` let it stop undrained). Unknown only to
/// a complete scan: otherwise `503`, asked again.
#[test]
fn an_inode_is_unknown_only_to_a_complete_scan() {
    netns::without_descriptors::run_child("http::tests::netns_without_descriptors_child");
}

/// The child of [`an_inode_is_unknown_only_to_a_complete_scan`]: nothing unless started
/// by it.
#[test]
#[ignore = "run in a process of its own by an_inode_is_unknown_only_to_a_complete_scan"]
fn netns_without_descriptors_child() {
    if !netns::without_descriptors::is_child() {
        return;
    }
    let own = netns::inode_of(std::path::Path::new("/proc/self/ns/net")).expect("own netns");
    let query = format!("port=8080&timeout=0&netns={own}");
    assert!(api::parse_drain_request(Some(&query), LIMITS, netns::ProcessPaths::Any).is_ok());
    let held = netns::without_descriptors::exhaust();
    let parsed = api::parse_drain_request(Some(&query), LIMITS, netns::ProcessPaths::Any);
    drop(held);
    match parsed {
        // Said in general terms: the scan's chain (host paths, PIDs) goes to the log.
        Err(api::ApiError::Unavailable(message)) => {
            assert_eq!(message, format!("netns: {}", api::NAMESPACES_UNREADABLE));
        }
        Err(other) => panic!("expected 503, got {other:?}"),
        Ok(_) => panic!("expected 503, got a parsed request"),
    }
}

/// Found by an audit: out of descriptors, the open of a `netns=` path failed (EMFILE) and
/// was answered as a refused path, `400` (a pod's and a local user's answer to it too), which
/// `drain-agent wait --netns /run/netns/…` takes as a refusal and stops waiting: the hook
/// ended undrained, where the inode form got `503` and was asked again. The agent's want of
/// descriptors is `503` for a path too, to every caller, whether the file exists or not.
#[test]
fn a_netns_path_is_unavailable_not_refused_without_descriptors() {
    netns::without_descriptors::run_child("http::tests::netns_path_without_descriptors_child");
}

/// The child of [`a_netns_path_is_unavailable_not_refused_without_descriptors`]: nothing
/// unless started by it.
#[test]
#[ignore = "run in a process of its own by a_netns_path_is_unavailable_not_refused_without_descriptors"]
fn netns_path_without_descriptors_child() {
    if !netns::without_descriptors::is_child() {
        return;
    }
    // Everything that needs a descriptor is made before they run out.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    let own = netns::inode_of(std::path::Path::new("/proc/self/ns/net")).expect("own netns");
    let existing = format!("/proc/{}/ns/net", std::process::id());
    let query = format!("port=8080&timeout=0&netns={existing}");
    let parsed = api::parse_drain_request(Some(&query), LIMITS, netns::ProcessPaths::Any)
        .expect("a namespace path");
    assert_eq!(parsed.filter.netns, Some(own));
    let mut held = netns::without_descriptors::exhaust();
    // With one descriptor free (the second run), the path is looked up as ever; then that
    // one is taken too.
    if let Ok(spare) = std::fs::File::open("/dev/null") {
        drop(spare);
        let parsed = api::parse_drain_request(Some(&query), LIMITS, netns::ProcessPaths::Any);
        assert_eq!(parsed.map(|parsed| parsed.filter.netns), Ok(Some(own)));
        held.push(std::fs::File::open("/dev/null").expect("the one free descriptor"));
    }
    let parsed = api::parse_drain_request(Some(&query), LIMITS, netns::ProcessPaths::Any);
    let missing = "/run/netns/drain-agent-test-no-such-namespace";
    let pod = Caller::Pod { netns: 7 };
    let answers = runtime.block_on(async {
        let mut answers = Vec::new();
        for caller in [Caller::Node, Caller::LocalUser { uid: Some(1000) }, pod] {
            for path in [existing.as_str(), missing] {
                let uri = format!("/drained?port=8080&timeout=0&netns={path}");
                answers.push((
                    (caller, path),
                    request_as(&state, caller, "GET", &uri).await,
                ));
            }
        }
        answers
    });
    // A pod may name no process's namespace file: refused before anything is opened.
    let (answers, pods_process): (Vec<_>, Vec<_>) = answers
        .into_iter()
        .partition(|((caller, path), _)| *caller != pod || *path == missing);
    for (asked, answer) in &pods_process {
        assert_eq!(
            *answer,
            (
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": crate::http::pod_scope::OTHER_NETNS })
            ),
            "{asked:?}"
        );
    }
    drop(held);
    match parsed {
        Err(api::ApiError::Unavailable(message)) => {
            assert_eq!(message, format!("netns: {}", api::NAMESPACES_UNREADABLE));
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // The same answer for every caller and path: it tells nothing of which files exist.
    for (asked, (status, body)) in &answers {
        assert_eq!(
            *status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{asked:?}: {body}"
        );
        assert_eq!(
            body["error"],
            format!("netns: {}", api::NAMESPACES_UNREADABLE),
            "{asked:?}"
        );
    }
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
        // Found by an audit: settings that cannot take effect were taken silently (a pure
        // query closes nothing; a pace without the close paces nothing, yet a later request
        // with another was refused 409 over it).
        (
            "/drained?port=8080&timeout=0&on_timeout=close",
            "on_timeout: a pure query",
        ),
        (
            "/drained?port=8080&timeout=5s&pace=50",
            "pace: it paces the closing at the timeout",
        ),
        (
            "/drained?port=8080&timeout=5s&on_timeout=keep&pace=50",
            "pace: it paces the closing at the timeout",
        ),
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

/// Audit (docs-lie): `quiet` longer than `timeout` is a 400 (README), but `timeout=0` was
/// let through: `/drained?port=8080&timeout=0&quiet=5s` was accepted and could only answer
/// 503 (its window counts from the request, which is answered at once), with nothing
/// drained or not about it. Now it is refused naming `quiet`, as for any other timeout; a
/// pure query with no quiet window (what `wait` polls with) is still answered.
#[tokio::test]
async fn a_quiet_window_on_a_pure_query_is_refused_naming_quiet() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 0)]);
    for (method, uri, expected) in [
        ("GET", "/drained?port=8080&timeout=0&quiet=5s", "quiet: 5s"),
        (
            "GET",
            "/drained?port=8080&quiet=1ms&timeout=0",
            "quiet: 1ms",
        ),
        (
            "GET",
            "/drained?port=8080&timeout=0ms&settle=5s",
            "settle: 5s",
        ),
        (
            "GET",
            "/drained?port=8080&timeout=0&quiet=5s&peers=true",
            "quiet: 5s",
        ),
    ] {
        let (status, body) = request(&state, method, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(expected) && message.contains("could only be 503"),
            "{method} {uri}: {message}"
        );
    }
    // Audit (a second look): a POST is no pure query, and what is wrong with it is its
    // timeout; it was told to leave the quiet window out, and then got the timeout's 400.
    let (status, body) = request(&state, "POST", "/drain?port=8080&timeout=0&quiet=5s").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["error"], "timeout: a drain needs a timeout above 0",
        "{body}"
    );
    // Nothing was started, and a pure query without a window is answered.
    assert!(state.drains.list().0.is_empty());
    for uri in [
        "/drained?port=8080&timeout=0",
        "/drained?port=8080&timeout=0&quiet=0s",
        "/drained?port=8080&timeout=0&peers=true&idle=1s",
    ] {
        let (status, body) = get(&state, uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        assert_eq!(body["drained"], true, "{uri}: {body}");
    }
}

/// `addr=0.0.0.0` (or `::`, a multicast or the broadcast address) names no connection's
/// local address: the count at it is always 0, so `/drained` answered 200 drained at once
/// with clients connected, and a drain with `on_timeout=close` closed nothing. Such an
/// address is refused wherever `addr=` is taken, naming the parameter.
#[tokio::test]
async fn an_address_no_connection_can_have_is_refused() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 2)]);
    let addrs = [
        "0.0.0.0",
        "::",
        "::ffff:0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "::ffff:224.0.0.1",
        "255.255.255.255",
        "ff02::1",
    ];
    for addr in addrs {
        for caller in [Caller::Node, Caller::Pod { netns: 7 }] {
            for (method, route) in [
                ("GET", "/drained?port=8080&timeout=0"),
                ("GET", "/drained?port=8080&timeout=1m&on_timeout=close"),
                ("POST", "/drain?port=8080&timeout=1m&on_timeout=close"),
                ("DELETE", "/drain?port=8080"),
                ("GET", "/connections?port=8080"),
                ("GET", "/health?port=8080"),
            ] {
                let uri = format!("{route}&addr={addr}");
                refused(
                    request_as(&state, caller, method, &uri).await,
                    StatusCode::BAD_REQUEST,
                    "is not an address a connection can have",
                );
            }
        }
        let (_, body) = get(&state, &format!("/drained?port=8080&addr={addr}&timeout=0")).await;
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.starts_with("addr: "), "{message}");
        assert!(message.contains("leave addr out"), "{message}");
    }
    // The folded spelling is named as the agent compares it.
    refused(
        get(&state, "/drained?port=8080&addr=::ffff:0.0.0.0&timeout=0").await,
        StatusCode::BAD_REQUEST,
        "addr: 0.0.0.0 is not",
    );
    // Nothing was started, and the connections are still counted.
    let (status, body) = get(&state, "/drained?port=8080&timeout=0").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["active"], 2);
    assert_eq!(get(&state, "/health?port=8080").await.0, StatusCode::OK);
}

/// Audit (ready before serving in the pods): the readiness probe passed on `/healthz` as
/// soon as the node listener served, while the first round of pod listeners was still being
/// opened; an upgrade's old agent then stopped and detached its steering in pods this one
/// did not serve yet. `/healthz?ready=true` (`drain-agent probe --ready`) is `503` until
/// the pod listener manager says the round is done; plain `/healthz` (liveness, the startup
/// probe) is not held.
#[tokio::test]
async fn healthz_is_not_ready_until_the_first_round_of_pod_listeners_is_open() {
    use crate::http::ready::{NOT_READY, READY_QUERY, Readiness};
    let (_, app_state) = app(vec![]);
    let ready = Readiness::after_first_round();
    let state = Arc::new(AppState {
        ready: ready.clone(),
        ..(*app_state).clone()
    });
    let readiness = format!("/healthz?{READY_QUERY}");
    let (status, body) = get(&state, &readiness).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], NOT_READY);
    for live in ["/healthz", "/healthz?ready=false"] {
        let (status, body) = get(&state, live).await;
        assert_eq!(
            (status, &body["status"]),
            (StatusCode::OK, &"ok".into()),
            "{live}"
        );
    }
    let (status, body) = get(&state, "/healthz?ready=yes").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Found by an audit: other parameters were ignored, so a probe that misspelt the one
    // it meant passed before the agent was ready. Each is a 400 naming it, as on every
    // route (README), and so on /metrics.
    for (uri, named) in [
        (
            "/healthz?readiness=true",
            "unknown parameter \"readiness\" (known: ready)",
        ),
        ("/healthz?ready=true&x=1", "unknown parameter \"x\""),
        (
            "/healthz?ready=false&ready=false",
            "parameter \"ready\" is given more than once",
        ),
        (
            "/metrics?format=json",
            "unknown parameter \"format\" (this path takes none)",
        ),
    ] {
        refused(get(&state, uri).await, StatusCode::BAD_REQUEST, named);
    }
    ready.set_ready();
    let (status, body) = get(&state, &readiness).await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &"ok".into()),
        "{body}"
    );
}

/// Audit (docs-lie): a route asked with a method it does not have (`POST /drained`,
/// `GET /drain`) got axum's bare `405` with an empty body, where every error answer is
/// `{"error": "..."}`. It names the method and the allowed ones, and keeps axum's `Allow`.
#[tokio::test]
async fn a_wrong_method_is_a_json_405_naming_it() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    for (caller, method, uri, allowed) in [
        (Caller::Node, "POST", "/drained?port=8080", "GET,HEAD"),
        (Caller::Node, "GET", "/drain?port=8080", "POST,DELETE"),
        (Caller::Node, "PUT", "/healthz", "GET,HEAD"),
        (
            Caller::Pod { netns: 7 },
            "DELETE",
            "/health?port=8080",
            "GET,HEAD",
        ),
        (Caller::Remote, "PATCH", "/metrics", "GET,HEAD"),
    ] {
        let response = response_as(&state, caller, method, uri).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{uri}");
        assert_eq!(
            response
                .headers()
                .get(header::ALLOW)
                .map(|value| value.as_bytes()),
            Some(allowed.as_bytes()),
            "{method} {uri}"
        );
        let body = body_of(response).await;
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(method), "{method} {uri}: {body}");
        for method in allowed.split(',') {
            assert!(message.contains(method), "{method} {uri}: {body}");
        }
    }
    // It changed nothing: no drain was started.
    let (status, body) = get(&state, "/drains").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["in_progress"], serde_json::json!([]), "{body}");
}

#[tokio::test]
async fn unknown_paths_are_404_and_health_is_200() {
    let (source, state) = app(vec![]);
    refused(
        get(&state, "/drainz?port=1").await,
        StatusCode::NOT_FOUND,
        "/drained",
    );
    let (status, body) = get(&state, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    source
        .broken
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, _) = get(&state, "/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let answer = get(&state, "/drained?port=1&timeout=0").await;
    refused(
        answer,
        StatusCode::INTERNAL_SERVER_ERROR,
        "cannot read the connection counts",
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
    refused(
        get(&state, "/connections?port=1&port=2").await,
        StatusCode::BAD_REQUEST,
        "more than once",
    );
}

/// Found by an audit: `/connections` read the whole endpoint map on an async worker (two
/// system calls an entry, up to `--max-endpoints`): a slow read held the agent's other
/// requests (`/healthz` among them). Read on a blocking thread; one worker here.
#[tokio::test]
async fn a_slow_read_of_the_connections_never_holds_the_async_worker() {
    let (source, state) = app(vec![endpoint("127.0.0.1", 8080, 3)]);
    *source.read_takes.lock().expect("lock") = Duration::from_millis(300);
    let beside = tokio::spawn(async {
        let started = std::time::Instant::now();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        started.elapsed()
    });
    tokio::task::yield_now().await;
    let (status, body) = get(&state, "/connections").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["endpoints"][0]["active"], 3);
    let took = beside.await.expect("join");
    assert!(
        took < Duration::from_millis(100),
        "a task beside /connections took {took:?} for 10 ms of sleeps"
    );
}

/// Issue 22: anyone who could reach the node listener drained, gated and closed every
/// pod's port and read every pod's clients. A remote caller now gets the public
/// endpoints only, and nothing it asks changes anything.
#[tokio::test(start_paused = true)]
async fn a_remote_caller_reads_metrics_and_health_only_and_changes_nothing() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    for (method, uri) in [
        ("GET", "/drained?port=8080&timeout=1s"),
        ("GET", "/drained?port=8080&timeout=0"),
        ("GET", "/drained?port=nonsense"),
        ("POST", "/drain?port=8080&timeout=1s&on_timeout=close"),
        ("DELETE", "/drain?port=8080"),
        ("GET", "/connections?peers=true"),
        ("GET", "/drains"),
        ("GET", "/advice"),
    ] {
        let (status, body) = request_as(&state, Caller::Remote, method, uri).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("SECURITY.md"),
            "{body}"
        );
    }
    for uri in ["/metrics", "/healthz", "/health?port=8080"] {
        let (status, body) = request_as(&state, Caller::Remote, "GET", uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
    }
    let (_, drains) = get(&state, "/drains").await;
    assert_eq!(drains["in_progress"].as_array().map(Vec::len), Some(0));
    assert_eq!(get(&state, "/health?port=8080").await.0, StatusCode::OK);
}

/// How many times [`Counted`] was parsed.
static COUNTED_PARSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A scope whose parse is counted: a parse can cost a scan of every process in /proc
/// (`netns=INODE`) or opening a namespace file (`netns=PATH`).
struct Counted(crate::tracker::Filter);

impl crate::http::pod_scope::Scoped for Counted {
    fn filter_mut(&mut self) -> &mut crate::tracker::Filter {
        &mut self.0
    }
}

impl crate::http::extract::Params for Counted {
    fn parse(
        query: Option<&str>,
        _: WaitLimits,
        processes: netns::ProcessPaths,
    ) -> Result<Self, api::ApiError> {
        COUNTED_PARSES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        api::parse_scope_request(query, processes).map(Self)
    }
}

/// A remote caller's query was parsed before it was refused: `netns=INODE` scanned every
/// process in /proc on one of the runtime's two worker threads, for a caller who gets a
/// 403 whatever it asks. It is now refused before its input is parsed, with the same
/// answer as before; the callers who may ask still have theirs parsed.
#[tokio::test]
async fn a_remote_caller_is_refused_before_its_query_is_parsed() {
    use crate::http::extract::{Confined, Controlled};
    use axum::extract::FromRequestParts as _;
    use std::sync::atomic::Ordering;
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    let parts = |caller: Caller| {
        let (mut parts, ()) = axum::http::Request::builder()
            .uri("/drain?port=8080&netns=4026531840")
            .body(())
            .expect("request")
            .into_parts();
        parts.extensions.insert(caller);
        parts
    };
    let forbidden = Err(api::ApiError::Forbidden(
        crate::http::authority::REMOTE_RULE.into(),
    ));
    let confined = Confined::<Counted>::from_request_parts(&mut parts(Caller::Remote), &state)
        .await
        .map(|_| ());
    assert_eq!(confined, forbidden);
    let controlled = Controlled::<Counted>::from_request_parts(&mut parts(Caller::Remote), &state)
        .await
        .map(|_| ());
    assert_eq!(controlled, forbidden);
    assert_eq!(
        COUNTED_PARSES.load(Ordering::SeqCst),
        0,
        "parsed for a remote caller"
    );
    // The counter counts: the node's query is parsed (whatever the answer here).
    let _ = Confined::<Counted>::from_request_parts(&mut parts(Caller::Node), &state).await;
    assert_eq!(COUNTED_PARSES.load(Ordering::SeqCst), 1);
    // Through the router: the same 403 as before, on every route that parses a scope.
    for (method, uri) in [
        ("GET", "/drained?port=8080&timeout=0&netns=4026531840"),
        ("POST", "/drain?port=8080&timeout=1m&netns=/run/netns/x"),
        ("DELETE", "/drain?port=8080&netns=1"),
        ("GET", "/connections?netns=1"),
    ] {
        let (status, body) = request_as(&state, Caller::Remote, method, uri).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri}: {body}");
        assert_eq!(body["error"], crate::http::authority::REMOTE_RULE);
    }
}

/// Issue 22: as user `nobody`, a drain with `on_timeout=close` reset a root service's
/// connections. A local user controls only ports whose sockets are all its own, in
/// the node's own namespace; it may still wait on any port there.
#[tokio::test(start_paused = true)]
async fn a_local_user_controls_only_its_own_ports() {
    // The node's namespace is 1 here.
    let on_node = |port| crate::tracker::Endpoint {
        netns: 1,
        ..endpoint("127.0.0.1", port, 1)
    };
    let (_, state) = app(vec![on_node(8080), on_node(9090)]);
    let user = Caller::LocalUser { uid: Some(1000) };
    let other = Caller::LocalUser { uid: Some(1001) };
    let (status, body) = request_as(&state, user, "POST", "/drain?port=8080&timeout=1m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["netns"], 1, "confined to the node's namespace: {body}");
    for (caller, method, uri) in [
        (other, "DELETE", "/drain?port=8080"),
        (user, "POST", "/drain?port=9090&timeout=1m"),
        (
            user,
            "GET",
            "/drained?port=9090&timeout=1s&on_timeout=close",
        ),
        (user, "POST", "/drain?port=7070&timeout=1m"),
        (
            Caller::LocalUser { uid: None },
            "POST",
            "/drain?port=8080&timeout=1m",
        ),
        (user, "GET", "/drained?port=8080&timeout=0&netns=4026531840"),
    ] {
        let (status, body) = request_as(&state, caller, method, uri).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{caller:?} {method} {uri}: {body}"
        );
    }
    // Waiting on another user's port observes: no drain starts, nothing is gated.
    let (status, body) = request_as(&state, user, "GET", "/drained?port=9090&timeout=1s").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.get("drain").is_none(), "{body}");
    let (_, drains) = get(&state, "/drains").await;
    assert_eq!(drains["in_progress"].as_array().map(Vec::len), Some(1));
    assert_eq!(get(&state, "/health?port=9090").await.0, StatusCode::OK);
    // Its own drain gates the node's port (the node's namespace is the one it drains).
    assert_eq!(
        get(&state, "/health?port=8080").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (status, _) = request_as(&state, user, "DELETE", "/drain?port=8080").await;
    assert_eq!(status, StatusCode::OK);
}

/// Audit (local user's addr=): a local user's scope was confined to the node's namespace
/// by `netns=` only: uid 1000, owning 8080 there, could `POST /drain?port=8080&addr=<pod
/// B's IP>` (201), and the public /metrics showed a drain of pod B (the per-pod rule
/// attributes it to B). Its `addr=` must now be an address of the node's namespace or
/// loopback; any other is one `403` naming `addr`, a pod's or nobody's alike.
#[tokio::test(start_paused = true)]
async fn a_local_users_addr_is_an_address_of_the_nodes_namespace() {
    let on_node = |port| crate::tracker::Endpoint {
        netns: 1,
        ..endpoint("127.0.0.1", port, 1)
    };
    let addresses = Addresses::new(&[(1, &["192.168.0.10"]), (7, &["10.1.0.7"])]);
    let (_, state) = app_addressed(vec![on_node(8080)], None, |drains| drains, addresses);
    let user = Caller::LocalUser { uid: Some(1000) };
    let mut refusals = Vec::new();
    for uri in [
        "/drain?port=8080&timeout=1m&addr=10.1.0.7",
        "/drain?port=8080&timeout=1m&addr=10.9.9.9",
        "/drain?port=8080&timeout=1m&addr=::ffff:10.1.0.7",
    ] {
        let (status, body) = request_as(&state, user, "POST", uri).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}: {body}");
        refusals.push(body);
    }
    let (status, body) = request_as(
        &state,
        user,
        "GET",
        "/drained?port=8080&timeout=0&addr=10.1.0.7",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    refusals.push(body);
    // One answer, naming addr: whether an address is a pod's is not told.
    for body in &refusals {
        assert_eq!(body, &refusals[0]);
    }
    assert_eq!(
        refusals[0]["error"],
        crate::http::authority::NODE_ADDRESSES_ONLY
    );
    let (_, drains) = get(&state, "/drains").await;
    assert_eq!(drains["in_progress"].as_array().map(Vec::len), Some(0));
    // The node's own addresses and loopback are its namespace's.
    for addr in ["192.168.0.10", "127.0.0.2"] {
        let (status, body) = request_as(
            &state,
            user,
            "POST",
            &format!("/drain?port=8080&timeout=1m&addr={addr}"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{addr}: {body}");
    }
}

/// Namespaces that cannot be read (out of descriptors): every scan is incomplete, with a
/// host path and a PID in its chain, as `netns::all_namespaces` says it.
#[derive(Default)]
struct Unreadable {
    reads: std::sync::atomic::AtomicUsize,
}

impl Unreadable {
    fn problem() -> anyhow::Error {
        anyhow::anyhow!("cannot open network namespace /proc/4242/ns/net: Too many open files")
            .context("cannot read /run/netns/blue")
            .context(crate::sys::netns::IncompleteScan)
    }
}

impl AddressSource for Unreadable {
    fn read(&self) -> anyhow::Result<std::collections::BTreeMap<u32, Namespace>> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(Self::problem())
    }

    fn read_in(&self, _: u32) -> anyhow::Result<std::collections::BTreeSet<std::net::IpAddr>> {
        Err(Self::problem())
    }
}

/// Found by a review: while the namespaces could not be read, a local user's `addr=` of
/// the node was refused (`403`, which ends `drain-agent wait` at once: the service stopped
/// undrained), as the node's addresses were taken for none, and each question read them
/// again. It is `503` (asked again), the reads are bounded, and the answer names no host
/// path.
#[tokio::test(start_paused = true)]
async fn a_local_users_addr_is_unavailable_while_the_namespaces_cannot_be_read() {
    let on_node = crate::tracker::Endpoint {
        netns: 1,
        ..endpoint("127.0.0.1", 8080, 1)
    };
    let source = Arc::new(Unreadable::default());
    let (_, state) = app_addressed(vec![on_node], None, |drains| drains, source.clone());
    let user = Caller::LocalUser { uid: Some(1000) };
    for _ in 0..20 {
        let (status, body) = request_as(
            &state,
            user,
            "GET",
            "/drained?port=8080&timeout=0&addr=192.168.0.10",
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(!body.to_string().contains("/proc/"), "{body}");
    }
    let reads = source.reads.load(std::sync::atomic::Ordering::Relaxed);
    assert!(reads <= 1, "{reads} reads for 20 questions");
}

/// Found by a review: a pod's `addr=` while its namespace's addresses could not be read
/// was `503` with the scan's error chain in the body: host paths and PIDs
/// (`/proc/4242/ns/net`, `/run/netns/…`). The body says what is wrong in general terms;
/// the detail goes to the agent's log.
#[tokio::test]
async fn an_unreadable_namespace_is_told_without_host_paths() {
    let (_, state) = app_addressed(
        vec![endpoint("127.0.0.1", 8080, 1)],
        None,
        |drains| drains,
        Arc::new(Unreadable::default()),
    );
    let pod = Caller::Pod { netns: 7 };
    let (status, body) = request_as(
        &state,
        pod,
        "GET",
        "/drained?port=8080&timeout=0&addr=10.1.0.7",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let text = body.to_string();
    assert!(
        !text.contains("/proc/") && !text.contains("/run/netns/") && !text.contains("4242"),
        "{text}"
    );
    assert!(text.contains("network namespaces"), "{text}");
}

/// What a namespace that cannot be opened says (out of descriptors), as
/// `netns::open_checked` and `netns::all_namespaces` say it: a host path and a PID.
const HOST_CHAIN: &str = "cannot find every network namespace: cannot open network namespace /proc/4242/ns/net: Too many open files";

/// Whether `text` names the host's paths or processes.
fn names_the_host(text: &str) -> bool {
    text.contains("/proc/") || text.contains("4242") || text.contains("/run/netns/")
}

/// Found by a review: a pod's `GET /connections?peers=true` whose listing failed was `500`
/// with the error chain in the body: host paths and PIDs (`/proc/4242/ns/net`). The body
/// says what failed in general terms; the detail goes to the agent's log.
#[tokio::test]
async fn a_failed_listing_is_told_without_host_paths() {
    let (source, state) = app(vec![crate::tracker::Endpoint {
        netns: 7,
        ..endpoint("10.1.0.7", 8080, 1)
    }]);
    *source.unlisted.lock().expect("lock") = HOST_CHAIN.into();
    let (status, body) = request_as(
        &state,
        Caller::Pod { netns: 7 },
        "GET",
        "/connections?port=8080&peers=true",
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let text = body.to_string();
    assert!(!names_the_host(&text), "{text}");
    assert!(text.contains("cannot list the connections"), "{text}");
}

/// Found by a review: a `/drained` question whose counts could not be read was `500` with
/// the error chain in the body. It says what failed in general terms.
#[tokio::test]
async fn unreadable_counts_are_told_without_host_paths() {
    let (source, state) = app(vec![crate::tracker::Endpoint {
        netns: 7,
        ..endpoint("10.1.0.7", 8080, 1)
    }]);
    *source.why_broken.lock().expect("lock") = HOST_CHAIN.into();
    source
        .broken
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for uri in ["/drained?port=8080&timeout=0", "/connections?port=8080"] {
        let (status, body) = request_as(&state, Caller::Pod { netns: 7 }, "GET", uri).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{uri}: {body}");
        assert!(!names_the_host(&body.to_string()), "{uri}: {body}");
    }
}

/// Found by a review: a drain whose counts could not be read ended with the error chain as
/// its `unknown`, which its waiters' answers show (a pod's own). It says what failed in
/// general terms.
#[tokio::test(start_paused = true)]
async fn a_drain_that_cannot_read_its_counts_is_told_without_host_paths() {
    let (source, state) = app(vec![crate::tracker::Endpoint {
        netns: 7,
        ..endpoint("10.1.0.7", 8080, 1)
    }]);
    let pod = Caller::Pod { netns: 7 };
    let (status, body) = request_as(&state, pod, "POST", "/drain?port=8080&timeout=1m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let waiter = tokio::spawn({
        let state = Arc::clone(&state);
        async move { request_as(&state, pod, "GET", "/drained?port=8080&timeout=1m").await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    *source.why_broken.lock().expect("lock") = HOST_CHAIN.into();
    source
        .broken
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (_, body) = waiter.await.expect("answered");
    assert_eq!(body["drain"], 1, "{body}");
    let unknown = body["unknown"].as_str().unwrap_or_default();
    assert!(
        unknown.contains("cannot read the connection counts"),
        "{body}"
    );
    assert!(!names_the_host(&body.to_string()), "{body}");
}

/// Found by a review: a `/drained` answer whose confirmation with the socket tables failed
/// said why in `unknown` with the whole error chain: host paths and PIDs. It says what
/// failed in general terms; the detail goes to the agent's log.
#[tokio::test]
async fn a_failed_confirmation_is_told_without_host_paths() {
    let (source, state) = app(vec![crate::tracker::Endpoint {
        netns: 7,
        ..endpoint("10.1.0.7", 8080, 0)
    }]);
    *source.doubts.lock().expect("lock") = vec![crate::doubt::Doubt::SocketMapFull];
    *source.confirmed.lock().expect("lock") = Err(HOST_CHAIN.into());
    let (status, body) = request_as(
        &state,
        Caller::Pod { netns: 7 },
        "GET",
        "/drained?port=8080&timeout=0",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let unknown = body["unknown"].as_str().unwrap_or_default();
    assert!(
        unknown.contains("socket tables could not be read"),
        "{body}"
    );
    assert!(!names_the_host(&body.to_string()), "{body}");
}

/// `/drains` showed a local user every record of the node's namespace: another user's
/// timed-out drain with the addresses of its clients (`peers_at_end`), and root's drains
/// that named the node's namespace. A local user sees the drains it started only; root sees
/// all; a pod its namespace's.
#[tokio::test(start_paused = true)]
async fn a_local_user_sees_only_its_own_drain_records() {
    let on_node = |port| crate::tracker::Endpoint {
        netns: 1,
        ..endpoint("127.0.0.1", port, 1)
    };
    let (source, state) = app(vec![on_node(8080), on_node(7071), on_node(9090)]);
    let client = crate::tracker::fake::peer("192.0.2.10:5000", "127.0.0.1:8080");
    *source.listed.lock().expect("lock") = Some((Duration::ZERO, vec![client]));
    let (a, b) = (
        Caller::LocalUser { uid: Some(1000) },
        Caller::LocalUser { uid: Some(1001) },
    );
    for (caller, uri) in [
        (a, "/drain?port=8080&timeout=1s"),
        (b, "/drain?port=7071&timeout=1m"),
    ] {
        let (status, body) = request_as(&state, caller, "POST", uri).await;
        assert_eq!(status, StatusCode::CREATED, "{caller:?} {uri}: {body}");
    }
    // Root's drain of the node's own namespace by name (`netns=` naming it: here the
    // registry directly, the test's node namespace being no real one).
    state
        .drains
        .post(
            crate::drain::DrainSpec {
                filter: crate::tracker::Filter {
                    port: 9090,
                    addr: None,
                    netns: Some(1),
                },
                timeout: Duration::from_secs(60),
                rule: crate::drain_rule::DrainRule::default(),
                on_timeout: crate::drain::OnTimeout::Keep,
                pace: 0,
                given: crate::drain::Given::default(),
            },
            crate::drain::StartedBy::Node,
        )
        .await
        .expect("room");
    // A's drain times out with its client still connected: its record names that client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, all) = get(&state, "/drains").await;
    let ended = all["recent"][0].clone();
    assert_eq!(ended["port"], 8080, "{all}");
    assert_eq!(ended["result"], "timeout", "{all}");
    assert!(
        !ended["peers_at_end"].as_array().expect("peers").is_empty(),
        "{all}"
    );
    let ports = |drains: &serde_json::Value| {
        let mut ports: Vec<u64> = ["in_progress", "recent"]
            .iter()
            .flat_map(|list| drains[list].as_array().cloned().unwrap_or_default())
            .filter_map(|record| record["port"].as_u64())
            .collect();
        ports.sort_unstable();
        ports
    };
    assert_eq!(ports(&all), [7071, 8080, 9090], "root sees all: {all}");
    for (caller, own) in [
        (a, vec![8080]),
        (b, vec![7071]),
        (Caller::LocalUser { uid: None }, vec![]),
        (Caller::Pod { netns: 7 }, vec![]),
    ] {
        let (status, seen) = request_as(&state, caller, "GET", "/drains").await;
        assert_eq!(status, StatusCode::OK, "{seen}");
        assert_eq!(ports(&seen), own, "{caller:?}: {seen}");
    }
}

/// A local user was told which namespace files exist: a path to another namespace that
/// exists was 403 (another namespace), a missing one 400 (refused path). Whatever it
/// names outside the node's own namespace — there or not, an inode or a path, refused for
/// its form — it now gets one answer, as a pod does; the node is still told precisely.
#[tokio::test]
async fn a_local_user_cannot_tell_which_namespaces_exist() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    // The node's namespace is 1 here, so this process's real one is "another namespace".
    let existing = format!("/proc/{}/ns/net", std::process::id());
    let existing_inode = netns::inode_of(std::path::Path::new(&existing))
        .expect("own netns")
        .to_string();
    let missing = "/run/netns/drain-agent-test-no-such-namespace";
    let asked = [
        existing.as_str(),
        existing_inode.as_str(),
        missing,
        "/proc/4294967295/ns/net",
        "1",
        "/proc/1/ns/mnt",
        "/root",
    ];
    // A parameter refused after `netns` was resolved answered for an existing namespace
    // only ("timeout: …"); a missing one was refused first: every other parameter is
    // checked before the namespace is looked up.
    let (user, pod) = (
        Caller::LocalUser { uid: Some(1000) },
        Caller::Pod { netns: 7 },
    );
    for (caller, method, route, status) in [
        (
            user,
            "GET",
            "/drained?port=8080&timeout=0",
            StatusCode::FORBIDDEN,
        ),
        (
            user,
            "POST",
            "/drain?port=8080&timeout=1m",
            StatusCode::FORBIDDEN,
        ),
        (user, "GET", "/connections?port=8080", StatusCode::FORBIDDEN),
        (
            pod,
            "GET",
            "/drained?port=8080&timeout=0",
            StatusCode::BAD_REQUEST,
        ),
        (
            pod,
            "POST",
            "/drain?port=8080&timeout=1m",
            StatusCode::BAD_REQUEST,
        ),
        (
            pod,
            "GET",
            "/connections?port=8080",
            StatusCode::BAD_REQUEST,
        ),
        (pod, "DELETE", "/drain?port=8080", StatusCode::BAD_REQUEST),
    ]
    .into_iter()
    .chain([user, pod].into_iter().flat_map(|caller| {
        [
            ("GET", "/drained?port=8080&timeout=bogus"),
            ("GET", "/drained?port=8080&timeout=0&quiet=bogus"),
            ("GET", "/drained?port=8080&timeout=1m&quiet=2m"),
            ("GET", "/drained?port=8080&timeout=0&ignore=nope"),
            ("GET", "/drained?port=8080&timeout=0&idle=bogus"),
            ("GET", "/drained?port=8080&timeout=0&on_timeout=maybe"),
            ("GET", "/drained?port=8080&timeout=0&pace=x"),
            ("GET", "/drained?port=8080&timeout=0&peers=x"),
            ("POST", "/drain?port=8080&timeout=1m&pace=x"),
            ("GET", "/connections?port=8080&peers=x"),
        ]
        .map(|(method, route)| (caller, method, route, StatusCode::BAD_REQUEST))
    })) {
        let mut answers = Vec::new();
        for netns in asked {
            let uri = format!("{route}&netns={netns}");
            answers.push(request_as(&state, caller, method, &uri).await);
        }
        let (answer_status, body) = &answers[0];
        assert_eq!(
            *answer_status, status,
            "{caller:?} {method} {route}: {body}"
        );
        for (netns, answer) in asked.iter().zip(&answers) {
            assert_eq!(
                answer, &answers[0],
                "{caller:?} {method} {route}&netns={netns}"
            );
        }
    }
    // The node is told precisely.
    let node = |netns: &str| {
        let (state, uri) = (
            state.clone(),
            format!("/drained?port=8080&timeout=0&netns={netns}"),
        );
        async move { request(&state, "GET", &uri).await }
    };
    let (status, body) = node(&existing).await;
    assert!(
        status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
        "{body}"
    );
    refused(
        node(missing).await,
        StatusCode::BAD_REQUEST,
        netns::REFUSED_PATH,
    );
    refused(node("1").await, StatusCode::NOT_FOUND, "inode 1");
}

/// Found by an audit: a local user learnt whether a host PID exists and whether it is in the
/// node's namespace. The agent (root) opened `/proc/PID/ns/net` for it: a process of the
/// node's namespace was `200`, a missing PID `403`, though the user may open no other
/// user's namespace file (`ptrace` read access) and under `hidepid=2` not even see the PID.
/// A pod had the same oracle for PIDs in its own namespace (`200` against `400`). The node's
/// namespace here is this process's real one (root's, as the agent's is).
#[tokio::test]
async fn a_process_path_tells_a_confined_caller_nothing_about_other_users_processes() {
    let node = netns::inode_of(std::path::Path::new("/proc/self/ns/net")).expect("own netns");
    let (_, state) = app_full(
        vec![endpoint("127.0.0.1", 8080, 1)],
        None,
        None,
        |tracker| tracker,
        |drains| drains,
        Arc::new(TwoPods),
        node,
    );
    // This process is root's (or the test runner's) and in the node's namespace; the
    // other PID does not exist.
    let ours = format!("/proc/{}/ns/net", std::process::id());
    let missing = "/proc/4294967295/ns/net";
    for (caller, status) in [
        (
            Caller::LocalUser {
                uid: Some(u32::MAX - 1),
            },
            StatusCode::FORBIDDEN,
        ),
        (Caller::LocalUser { uid: None }, StatusCode::FORBIDDEN),
        (Caller::Pod { netns: node }, StatusCode::BAD_REQUEST),
    ] {
        for route in ["/connections?port=8080", "/drained?port=8080&timeout=0"] {
            let process = request_as(&state, caller, "GET", &format!("{route}&netns={ours}")).await;
            let nobody =
                request_as(&state, caller, "GET", &format!("{route}&netns={missing}")).await;
            assert_eq!(process.0, status, "{caller:?} {route}: {}", process.1);
            assert_eq!(process, nobody, "{caller:?} {route}");
        }
    }
    // The node is answered about any process.
    let (status, body) = request(
        &state,
        "GET",
        &format!("/connections?port=8080&netns={ours}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A local user about its own processes: a child of this test run as that user.
    if rustix::process::geteuid().is_root() {
        use std::os::unix::process::CommandExt as _;
        let uid = 4242;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .uid(uid)
            .gid(uid)
            .spawn()
            .expect("spawn sleep as another user");
        let path = format!("/proc/{}/ns/net", child.id());
        let user = Caller::LocalUser { uid: Some(uid) };
        let own = request_as(
            &state,
            user,
            "GET",
            &format!("/connections?port=8080&netns={path}"),
        )
        .await;
        let other = request_as(
            &state,
            Caller::LocalUser { uid: Some(uid + 1) },
            "GET",
            &format!("/connections?port=8080&netns={path}"),
        )
        .await;
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
        assert_eq!(own.0, StatusCode::OK, "{}", own.1);
        assert_eq!(other.0, StatusCode::FORBIDDEN, "{}", other.1);
    }
}

/// Found by an audit: the node listener refused its own port number whatever the scope,
/// though the kernel leaves uncounted only the connections of the namespace where the agent
/// listens on it (`is_own_endpoint`: by namespace and port). A pod whose application serves
/// on that number (19700, the DaemonSet's node port) asking through the node listener was
/// refused (`400`), which `drain-agent wait` takes as the end: the pod stopped undrained. So
/// was root naming another namespace (`--netns /run/netns/X --port 9100`).
#[tokio::test]
async fn the_agents_own_port_is_refused_only_where_the_agent_listens_on_it() {
    // Another namespace for the node to name: this process's real one (the node's is 1 here).
    let other = netns::inode_of(std::path::Path::new("/proc/self/ns/net")).expect("own netns");
    let (_, state) = app(vec![
        crate::tracker::Endpoint {
            netns: 7,
            ..endpoint("10.1.0.7", 9100, 1)
        },
        crate::tracker::Endpoint {
            netns: other,
            ..endpoint("10.2.0.1", 9100, 1)
        },
        crate::tracker::Endpoint {
            netns: 1,
            ..endpoint("127.0.0.1", 9100, 1)
        },
    ]);
    let pod = Caller::Pod { netns: 7 };
    for (caller, uri) in [
        (pod, "/drained?port=9100&timeout=0".to_owned()),
        (
            Caller::Node,
            format!("/drained?port=9100&timeout=0&netns={other}"),
        ),
    ] {
        let (status, body) = request_as(&state, caller, "GET", &uri).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{caller:?} {uri}: {body}"
        );
        assert_eq!(body["active"], 1, "{caller:?} {uri}: {body}");
    }
    let (status, body) = request_as(&state, pod, "GET", "/connections?port=9100").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = request_as(&state, pod, "POST", "/drain?port=9100&timeout=1m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = request_as(&state, pod, "DELETE", "/drain?port=9100").await;
    assert!(status.is_success(), "{body}");
    // Where the agent listens on it (the node's namespace, 1 here, a local user's scope),
    // or every namespace: refused, as ever.
    for (caller, method, uri) in [
        (Caller::Node, "GET", "/drained?port=9100&timeout=0"),
        (
            Caller::Node,
            "GET",
            "/drained?port=9100&timeout=0&addr=10.1.0.7",
        ),
        (Caller::Node, "POST", "/drain?port=9100&timeout=1m"),
        (Caller::Node, "DELETE", "/drain?port=9100"),
        (
            Caller::LocalUser { uid: Some(1000) },
            "GET",
            "/drained?port=9100&timeout=0",
        ),
        (
            Caller::LocalUser { uid: Some(1000) },
            "DELETE",
            "/drain?port=9100",
        ),
    ] {
        refused(
            request_as(&state, caller, method, uri).await,
            StatusCode::BAD_REQUEST,
            "port: 9100 is the agent's own API port",
        );
    }
}

/// Issue 22: a pod's drain of its own port flipped the node-wide `/health?port=P`, and a
/// pod could cancel another pod's drain. Pods act on their own namespace only.
#[tokio::test(start_paused = true)]
async fn a_pods_drain_is_its_own() {
    let (_, state) = app(vec![crate::tracker::Endpoint {
        netns: 7,
        ..endpoint("10.1.0.7", 8080, 1)
    }]);
    let (a, b) = (Caller::Pod { netns: 7 }, Caller::Pod { netns: 8 });
    let (status, body) = request_as(&state, a, "POST", "/drain?port=8080&timeout=5m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["netns"], 7);
    let health = |caller, uri: &'static str| status_as(&state, caller, uri);
    assert_eq!(
        health(a, "/health?port=8080").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(health(b, "/health?port=8080").await, StatusCode::OK);
    assert_eq!(
        health(Caller::Node, "/health?port=8080").await,
        StatusCode::OK
    );
    assert_eq!(
        health(Caller::Node, "/health?port=8080&addr=10.1.0.7").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        health(Caller::Remote, "/health?port=8080&addr=10.1.0.8").await,
        StatusCode::OK
    );
    // Pod B neither sees nor cancels it.
    let (status, _) = request_as(&state, b, "DELETE", "/drain?port=8080").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, listed) = request_as(&state, b, "GET", "/drains").await;
    assert_eq!(listed["in_progress"].as_array().map(Vec::len), Some(0));
    let (status, _) = request_as(&state, a, "DELETE", "/drain?port=8080").await;
    assert_eq!(status, StatusCode::OK);
}

/// Found by an audit: a pod asking `/health?port=8080` about itself (its readiness probe) was
/// not covered by the node's drain of its address (`POST /drain?port=8080&addr=<pod IP>`,
/// what token automation sends): that scope names no namespace, and only a drain inside the
/// pod's namespace counted. The agent-check and `/health?addr=` said drain while the pod's
/// own probe said 200, so Kubernetes kept it in its endpoints. Now an address the pod holds
/// (as `addr=` questions resolve it) counts as the pod's: the three questions agree.
#[tokio::test(start_paused = true)]
async fn the_nodes_drain_of_a_pods_address_covers_the_pods_own_question() {
    let (_, state) = app(vec![crate::tracker::Endpoint {
        netns: 7,
        ..endpoint("10.1.0.7", 8080, 1)
    }]);
    let (status, body) = request(&state, "POST", "/drain?port=8080&addr=10.1.0.7&timeout=5m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let health = |caller, uri: &'static str| status_as(&state, caller, uri);
    let (a, b) = (Caller::Pod { netns: 7 }, Caller::Pod { netns: 8 });
    assert_eq!(
        crate::http::agentcheck::reply_for(b"8080 10.1.0.7\n", &state.drains).await,
        Reply::Drain
    );
    assert_eq!(
        health(Caller::Remote, "/health?port=8080&addr=10.1.0.7").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        health(a, "/health?port=8080").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "the pod's own readiness question"
    );
    assert_eq!(
        health(a, "/health?port=8080&addr=10.1.0.7").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Audit: asked with its loopback (its own, as README says), it was answered 200.
    assert_eq!(
        health(a, "/health?port=8080&addr=127.0.0.1").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "the pod's own question by its loopback"
    );
    // Another pod, and the node's port, are not in it.
    assert_eq!(health(b, "/health?port=8080").await, StatusCode::OK);
    assert_eq!(
        health(Caller::Node, "/health?port=8080").await,
        StatusCode::OK
    );
    assert_eq!(health(a, "/health?port=8081").await, StatusCode::OK);
}

/// Found by an audit: a pod asking `/health?port=8080&addr=<pod B's IP>` (an ingress or
/// HAProxy pod on the node checking a backend at the node listener) was answered about its
/// own namespace, never B's: 200 while B drained, where anyone else (a remote load
/// balancer, the agent-check) was told 503. `/health` is public (SECURITY.md "Callers"):
/// an address that is not the asking pod's is asked about as anyone asks it.
#[tokio::test(start_paused = true)]
async fn a_pod_asking_about_another_pods_address_is_told_that_pods_drain() {
    let (_, state) = app(vec![crate::tracker::Endpoint {
        netns: 8,
        ..endpoint("10.1.0.8", 8080, 1)
    }]);
    let (a, b) = (Caller::Pod { netns: 7 }, Caller::Pod { netns: 8 });
    let (status, body) = request_as(&state, b, "POST", "/drain?port=8080&timeout=5m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let health = |caller, uri: &'static str| status_as(&state, caller, uri);
    assert_eq!(
        crate::http::agentcheck::reply_for(b"8080 10.1.0.8\n", &state.drains).await,
        Reply::Drain
    );
    assert_eq!(
        health(Caller::Remote, "/health?port=8080&addr=10.1.0.8").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        health(a, "/health?port=8080&addr=10.1.0.8").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "pod A asking about B"
    );
    // A itself (its own address, loopback, no address) is not draining.
    for own in [
        "/health?port=8080",
        "/health?port=8080&addr=10.1.0.7",
        "/health?port=8080&addr=127.0.0.1",
    ] {
        assert_eq!(health(a, own).await, StatusCode::OK, "{own}");
    }
    // A's own loopback is still A's: A's drain covers it.
    let (status, body) = request_as(&state, a, "POST", "/drain?port=8080&timeout=5m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        health(a, "/health?port=8080&addr=127.0.0.1").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// Issue 22: a waiter with `timeout=3s` that joined a 10-minute drain hung for 30 s (here
/// 5 minutes, the test's maximum).
/// Each waiter is answered at its own timeout, whatever drain it joined.
#[tokio::test(start_paused = true)]
async fn a_waiter_is_answered_at_its_own_timeout_whatever_drain_it_joined() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 2)]);
    let (status, _) = request(
        &state,
        "POST",
        "/drain?port=8080&timeout=5m&on_timeout=close",
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let started = tokio::time::Instant::now();
    let (status, body) = get(&state, "/drained?port=8080&timeout=3s&on_timeout=close").await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        waited >= Duration::from_secs(3) && waited <= Duration::from_millis(3100),
        "{waited:?}"
    );
    assert!(
        body["drain"].as_u64().is_some(),
        "it joined the drain: {body}"
    );
    assert_eq!(body["active"], 2);
    // A differing named setting is refused, naming it; the drain is unchanged.
    refused(
        get(&state, "/drained?port=8080&timeout=3s&on_timeout=keep").await,
        StatusCode::CONFLICT,
        "on_timeout=close (asked keep)",
    );
    let (status, _) = request(&state, "POST", "/drain?port=8080&timeout=1m&quiet=5s").await;
    assert_eq!(status, StatusCode::CONFLICT);
}

/// Issue 23: on SIGTERM the waiting hooks got a 503 that looked exactly like a
/// timeout's. A shutdown answer says so and asks to retry.
#[tokio::test]
async fn a_shutdown_answer_says_so_and_asks_to_retry() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    let waiter = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut request = axum::http::Request::builder()
                .uri("/drained?port=8080&timeout=30s")
                .body(Body::empty())
                .expect("request");
            request.extensions_mut().insert(Caller::Node);
            router(state).oneshot(request).await.expect("response")
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    state.tracker.begin_shutdown();
    let response = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("answered at once")
        .expect("join");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let body = body_of(response).await;
    assert_eq!(body["reason"], "agent_shutdown", "{body}");
    assert_eq!(body["drained"], false);
    // A timeout's answer has no reason.
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    let (_, body) = get(&state, "/drained?port=8080&timeout=0").await;
    assert!(body.get("reason").is_none(), "{body}");
}

/// Audit (drain lifecycle): with a shutdown grace of 0, requests already on their way are
/// served after SIGTERM, when nothing is written to `--state-dir` any more. A `DELETE` was
/// answered as done (200 or, releasing a held gate, 404; no `Warning`) while `drains.json`
/// still listed the drain or the gate, which the next agent resumed; a `POST` was answered
/// 201 and never written. Now both change nothing and answer 503 with `Retry-After`, like a
/// `/drained` answered at a stop: ask the next agent.
#[tokio::test]
async fn drain_changes_while_the_agent_stops_are_refused_with_retry_after() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, state) = app_with(
        vec![
            endpoint("127.0.0.1", 8080, 1),
            endpoint("127.0.0.1", 8081, 1),
            endpoint("127.0.0.1", 8082, 0),
        ],
        Some(dir.path()),
    );
    let (status, posted) = request(&state, "POST", "/drain?port=8080&timeout=4m").await;
    assert_eq!(status, StatusCode::CREATED, "{posted}");
    // 8082 drains at once: its gate is held.
    let (status, posted) = request(&state, "POST", "/drain?port=8082&timeout=4m").await;
    assert_eq!(status, StatusCode::CREATED, "{posted}");
    state
        .drains
        .wait_ended(&crate::tracker::Filter::port(8082), Duration::from_secs(5))
        .await;
    state.tracker.begin_shutdown();
    // 8080's drain ends as agent_shutdown (it stays on disk, to resume).
    state.drains.wait_all_ended(Duration::from_secs(5)).await;
    let (_, before) = get(&state, "/drains").await;
    let file = dir.path().join(crate::drain::state_file::FILE_NAME);
    let on_disk = std::fs::read(&file).expect("state file");
    for (method, uri) in [
        ("DELETE", "/drain?port=8080"),
        ("DELETE", "/drain?port=8082"),
        ("POST", "/drain?port=8081&timeout=4m"),
        ("POST", "/drain?port=8080&timeout=4m"),
    ] {
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .expect("request");
        request.extensions_mut().insert(Caller::Node);
        let response = router(state.clone())
            .oneshot(request)
            .await
            .expect("response");
        let status = response.status();
        let retry = response.headers().get(header::RETRY_AFTER).cloned();
        let body = body_of(response).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {uri}: {body}"
        );
        assert_eq!(retry.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
        assert_eq!(body["reason"], "agent_shutdown", "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("stopping"),
            "{body}"
        );
    }
    let (_, after) = get(&state, "/drains").await;
    assert_eq!(before, after, "nothing changed");
    assert_eq!(std::fs::read(&file).expect("state file"), on_disk);
    assert_eq!(
        get(&state, "/health?port=8082").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "the held gate stays"
    );
    assert_eq!(get(&state, "/health?port=8081").await.0, StatusCode::OK);
}

/// Audit (shared caps): pod 7 posting drains on many ports of its own filled the node's
/// drain limit: pod 8's `POST /drain` got 429 and its `/drained` waited unrecorded. Pod 7
/// now gets the 429, naming its own limit, and pod 8 is still served.
#[tokio::test(start_paused = true)]
async fn a_pod_past_its_share_of_drains_gets_429_naming_the_per_owner_limit() {
    // The node allows 8 drains at once, one owner 2.
    let (_, state) = app_built(Vec::new(), None, |drains| drains.with_limits(2, 16));
    let (a, b) = (Caller::Pod { netns: 7 }, Caller::Pod { netns: 8 });
    for port in 1..=2 {
        let uri = format!("/drain?port={port}&timeout=5m&quiet=4m");
        let (status, body) = request_as(&state, a, "POST", &uri).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let refused_post = request_as(&state, a, "POST", "/drain?port=3&timeout=5m&quiet=4m").await;
    refused(
        refused_post,
        StatusCode::TOO_MANY_REQUESTS,
        "network namespace 7 has 2 drains in progress, the per-owner limit",
    );
    // Its stop hook is still answered, unrecorded, and told so.
    let (status, body) = request_as(&state, a, "GET", "/drained?port=3&timeout=1s").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["unrecorded"], "owner_limit", "{body}");
    assert!(body.get("drain").is_none(), "{body}");
    // Pod 8's drains are its own to start.
    let (status, body) = request_as(&state, b, "POST", "/drain?port=3&timeout=5m&quiet=4m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = request_as(&state, b, "GET", "/drained?port=4&timeout=1s").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["drain"].is_u64() && body.get("unrecorded").is_none(),
        "{body}"
    );
}

/// Audit (shared limits): `--max-waiters` was the node's alone, not split by owner: pods
/// parking many `/drained` waiters filled it, and another pod's stop hook (the kubelet's
/// `httpGet`, which does not retry) got 429, its drain ended and its container was killed
/// with live connections. One owner's waiters now take at most its share; the 429 names
/// the caller's own namespace and the per-owner limit.
#[tokio::test]
async fn a_pod_parking_waiters_never_fills_the_nodes_waiter_limit() {
    // The node allows 8 waiters at once, one owner 3.
    let (_, state) = app_made(
        vec![crate::tracker::Endpoint {
            netns: 7,
            ..endpoint("10.1.0.7", 8080, 1)
        }],
        None,
        |tracker| tracker.with_waiters_per_owner(3),
        |drains| drains,
    );
    let (a, b) = (Caller::Pod { netns: 7 }, Caller::Pod { netns: 8 });
    // Pod 7 parks as many waiters as it can on its busy port, up to the node's limit.
    let mut parked = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..8 {
        let before = state.tracker.waiters();
        let waiter = tokio::spawn({
            let state = state.clone();
            async move { request_as(&state, a, "GET", "/drained?port=8080&timeout=5m").await }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while state.tracker.waiters() == before && !waiter.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("parked or answered");
        if waiter.is_finished() {
            refusals.push(waiter.await.expect("join"));
        } else {
            parked.push(waiter);
        }
    }
    // Pod 8's stop hook is admitted (its port has nothing open: drained at once).
    let (status, body) = request_as(&state, b, "GET", "/drained?port=9000&timeout=10s").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "pod 8's /drained with pod 7 holding {} waiters: {body}",
        parked.len()
    );
    assert_eq!(parked.len(), 3, "pod 7's share");
    assert_eq!(refusals.len(), 5);
    for answer in refusals {
        refused(
            answer,
            StatusCode::TOO_MANY_REQUESTS,
            "network namespace 7 has 3 /drained requests waiting, the per-owner limit",
        );
    }
    for waiter in parked {
        waiter.abort();
    }
}

/// Audit (a refused waiter left a phantom drain): a `/drained` refused with `429` had
/// joined its scope's drain before asking for its waiter's place, so it started one, and
/// dropping its membership ended it `abandoned`: a record in `/drains` and the journal, a
/// log line, `drains_total{result="abandoned"}`, and the scope's `/health` gated for that
/// instant. A waiter now takes its place first: past either limit (its owner's, the
/// node's) the `429` changes nothing.
#[tokio::test]
async fn a_waiter_refused_429_starts_no_drain() {
    // The node allows 8 waiters at once, one owner 3.
    let (_, state) = app_made(
        vec![crate::tracker::Endpoint {
            netns: 7,
            ..endpoint("10.1.0.7", 8080, 1)
        }],
        None,
        |tracker| tracker.with_waiters_per_owner(3),
        |drains| drains,
    );
    let pod = Caller::Pod { netns: 7 };
    // Parks a waiter of `caller` on its busy port 8080 (pod 7's, or the node's scope).
    let park = |caller: Caller, parked: &mut Vec<tokio::task::JoinHandle<_>>| {
        let state = Arc::clone(&state);
        let before = state.tracker.waiters();
        let waiter = tokio::spawn({
            let state = Arc::clone(&state);
            async move { request_as(&state, caller, "GET", "/drained?port=8080&timeout=5m").await }
        });
        parked.push(waiter);
        async move {
            tokio::time::timeout(Duration::from_secs(5), async {
                while state.tracker.waiters() == before {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("parked");
        }
    };
    let no_record_of = |port: u16| {
        let state = Arc::clone(&state);
        async move {
            let (status, drains) = get(&state, "/drains").await;
            assert_eq!(status, StatusCode::OK, "{drains}");
            for list in ["in_progress", "recent"] {
                let records = drains[list].as_array().expect("a list");
                assert!(
                    records.iter().all(|record| record["port"] != port),
                    "a drain of port {port} in {list}: {drains}"
                );
            }
        }
    };
    let mut parked = Vec::new();
    for _ in 0..3 {
        park(pod, &mut parked).await;
    }
    // Past its owner's share.
    refused(
        request_as(&state, pod, "GET", "/drained?port=8081&timeout=1m").await,
        StatusCode::TOO_MANY_REQUESTS,
        "network namespace 7 has 3 /drained requests waiting, the per-owner limit",
    );
    no_record_of(8081).await;
    // Past the node's limit (the node has no share: only `--max-waiters`).
    for _ in 0..5 {
        park(Caller::Node, &mut parked).await;
    }
    refused(
        request_as(&state, Caller::Node, "GET", "/drained?port=8082&timeout=1m").await,
        StatusCode::TOO_MANY_REQUESTS,
        "8 requests are waiting already (--max-waiters)",
    );
    no_record_of(8082).await;
    let metrics = state.metrics.render().expect("metrics");
    assert!(
        metrics.contains("drain_agent_drains_total{result=\"abandoned\"} 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("port=\"8081\"") && !metrics.contains("port=\"8082\""),
        "{metrics}"
    );
    for waiter in parked {
        waiter.abort();
    }
}

/// Every answer names the agent that gave it (`drain-agent probe` tells two agents on one
/// address apart by it): `/healthz` healthy or not, and a 404.
#[tokio::test]
async fn every_answer_names_the_instance() {
    let (source, state) = app(vec![]);
    let app = naming_instance(router(state), "pod-uid-1").expect("a header value");
    let instance = |response: &axum::response::Response| {
        response
            .headers()
            .get(INSTANCE_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let call = |uri: &'static str| {
        let app = app.clone();
        async move {
            app.oneshot(
                axum::http::Request::get(uri)
                    .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                        [127, 0, 0, 1],
                        40_000,
                    ))))
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("answer")
        }
    };
    let healthy = call("/healthz").await;
    assert_eq!(healthy.status(), StatusCode::OK);
    assert_eq!(instance(&healthy).as_deref(), Some("pod-uid-1"));
    source
        .broken
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let broken = call("/healthz").await;
    assert_eq!(broken.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(instance(&broken).as_deref(), Some("pod-uid-1"));
    let missing = call("/nowhere").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(instance(&missing).as_deref(), Some("pod-uid-1"));
    assert!(naming_instance(Router::<()>::new(), "bad\nname").is_err());
}

/// A scrape reads every endpoint (syscalls on the kernel's maps, here a read that takes a
/// second): on the runtime's workers it held up every other answer, hooks' included, and
/// anyone who reaches the node listener may scrape. On a one-thread runtime, `/healthz` asked
/// while a scrape renders is answered at once.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_scrape_does_not_hold_up_other_answers() {
    let (source, state) = app(vec![endpoint("10.0.0.1", 8080, 1)]);
    *source.after_next_read.lock().expect("lock") = Some(Box::new(|_| {
        std::thread::sleep(Duration::from_millis(1500));
    }));
    let started = std::time::Instant::now();
    let scrape = tokio::spawn({
        let state = Arc::clone(&state);
        async move {
            let (status, body) = request_as(&state, Caller::Remote, "GET", "/metrics").await;
            (status, body, started.elapsed())
        }
    });
    // The scrape starts (and reads) first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, body) = request(&state, "GET", "/healthz").await;
    let answered = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, metrics, scraped) = scrape.await.expect("scrape");
    assert_eq!(status, StatusCode::OK, "{metrics}");
    assert!(
        scraped >= Duration::from_millis(1500),
        "the scrape did not take the slow read: {scraped:?}"
    );
    assert!(
        answered < Duration::from_millis(1000),
        "/healthz waited {answered:?} for a scrape"
    );
}

/// A closer that cannot close anything here (the netlink method without CAP_NET_ADMIN).
struct CannotClose;

impl crate::closer::Closer for CannotClose {
    fn close(
        &self,
        _filter: &crate::tracker::Filter,
        _targets: &[crate::drain_rule::Peer],
    ) -> anyhow::Result<u64> {
        anyhow::bail!("SOCK_DESTROY: Operation not permitted")
    }

    fn listeners(&self, _filter: &crate::tracker::Filter) -> anyhow::Result<Vec<u64>> {
        Ok(Vec::new())
    }

    fn unavailable(&self) -> Option<&str> {
        Some("closing through netlink SOCK_DESTROY needs CAP_NET_ADMIN")
    }
}

/// An agent that cannot close refuses every request that would close at a deadline (422,
/// saying why; nothing started, so no gate), says why on /healthz, and still takes drains
/// that do not close. Before, it accepted them and recorded `closed_at_deadline` with the
/// connections left open.
#[tokio::test]
async fn a_close_that_cannot_happen_is_refused() {
    let (_, state) = app_closing(
        vec![endpoint("127.0.0.1", 8080, 1)],
        None,
        Some(Arc::new(CannotClose)),
        |drains| drains,
    );
    refused(
        request(
            &state,
            "POST",
            "/drain?port=8080&timeout=1m&on_timeout=close",
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "CAP_NET_ADMIN",
    );
    refused(
        get(&state, "/drained?port=8080&timeout=1s&on_timeout=close").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "no drain started",
    );
    let (status, drains) = get(&state, "/drains").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(drains["in_progress"], serde_json::json!([]), "{drains}");
    assert_eq!(drains["recent"], serde_json::json!([]), "{drains}");
    assert_eq!(get(&state, "/health?port=8080").await.0, StatusCode::OK);
    let (status, health) = get(&state, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert!(
        health["close_unavailable"]
            .as_str()
            .is_some_and(|why| why.contains("CAP_NET_ADMIN")),
        "{health}"
    );
    // A pure query closes nothing: asking it to is refused for that, whether or not closing
    // is available; a drain that keeps its connections is taken.
    refused(
        get(&state, "/drained?port=8080&timeout=0&on_timeout=close").await,
        StatusCode::BAD_REQUEST,
        "on_timeout: a pure query",
    );
    let (status, body) = request(&state, "POST", "/drain?port=8080&timeout=1m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// What a load balancer is told about `addr`'s port 8080: `/health` (its status and
/// `draining`) and the agent-check answer.
async fn lb_view(state: &Arc<AppState>, addr: &str) -> (StatusCode, serde_json::Value, Reply) {
    let (status, body) = request_as(
        state,
        Caller::Remote,
        "GET",
        &format!("/health?port=8080&addr={addr}"),
    )
    .await;
    let line = format!("8080 {addr}\n");
    let reply = crate::http::agentcheck::reply_for(line.as_bytes(), &state.drains).await;
    (status, body, reply)
}

/// Found by an audit: an address held by two namespaces named nobody, so a question about
/// pod A's address was asked in the node's namespace and missed A's drain (its scope is A's
/// namespace). A neighbour that gave itself A's address (a local user's `unshare -Urn` with
/// a dummy interface, a pod with `CAP_NET_ADMIN`) made `/health?port=8080&addr=A` answer
/// 200 and the agent-check `ready` (which also clears MAINT) while A drained: the load
/// balancer kept sending to a stopping pod. Now the question is asked in every namespace
/// holding the address, and any drain there gates it.
#[tokio::test(start_paused = true)]
async fn a_neighbour_holding_a_pods_address_does_not_put_the_draining_pod_back() {
    let addresses = Addresses::new(&[(7, &["10.1.0.7"]), (8, &["10.1.0.8"])]);
    let (_, state) = app_addressed(
        vec![crate::tracker::Endpoint {
            netns: 7,
            ..endpoint("10.1.0.7", 8080, 1)
        }],
        None,
        |drains| drains,
        addresses.clone(),
    );
    let a = Caller::Pod { netns: 7 };
    let (status, body) = request_as(&state, a, "POST", "/drain?port=8080&timeout=5m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body, reply) = lb_view(&state, "10.1.0.7").await;
    assert_eq!(
        (status, reply),
        (StatusCode::SERVICE_UNAVAILABLE, Reply::Drain),
        "{body}"
    );
    // Namespace 9 gives itself A's address.
    addresses.set(9, &["10.1.0.7"]);
    tokio::time::advance(crate::sys::pod_addresses::HIT_REFRESH).await;
    let (status, body, reply) = lb_view(&state, "10.1.0.7").await;
    assert_eq!(
        (status, reply),
        (StatusCode::SERVICE_UNAVAILABLE, Reply::Drain),
        "{body}"
    );
    assert_eq!(body["draining"], true, "{body}");
    // Pod B, and the neighbour's own address, are not in A's drain.
    addresses.set(9, &["10.1.0.7", "10.1.0.9"]);
    tokio::time::advance(crate::sys::pod_addresses::MISS_REFRESH).await;
    for other in ["10.1.0.8", "10.1.0.9"] {
        let (status, body, reply) = lb_view(&state, other).await;
        assert_eq!(
            (status, reply),
            (StatusCode::OK, Reply::Ready),
            "{other}: {body}"
        );
    }
    // A's own drain goes on gating after the neighbour leaves.
    addresses.set(9, &[]);
    tokio::time::advance(crate::sys::pod_addresses::MISS_REFRESH).await;
    let (status, _, reply) = lb_view(&state, "10.1.0.7").await;
    assert_eq!(
        (status, reply),
        (StatusCode::SERVICE_UNAVAILABLE, Reply::Drain)
    );
}

/// Found with the audit above: an address that named pod A and names no namespace now (A's
/// namespace lost it, or went away, while its drain or the gate after it held) was asked
/// in the node's namespace: 200 and `ready` while A was stopping. It is still asked in A's
/// namespace until it names a pod again (or `FORMER_KEPT` passes); a pod it names then is
/// believed.
#[tokio::test(start_paused = true)]
async fn an_address_that_left_a_draining_pod_keeps_it_out_of_rotation() {
    let addresses = Addresses::new(&[(7, &["10.1.0.7"]), (8, &["10.1.0.8"])]);
    let (_, state) = app_addressed(
        vec![crate::tracker::Endpoint {
            netns: 7,
            ..endpoint("10.1.0.7", 8080, 1)
        }],
        None,
        |drains| drains,
        addresses.clone(),
    );
    let a = Caller::Pod { netns: 7 };
    let (status, body) = request_as(&state, a, "POST", "/drain?port=8080&timeout=5m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(lb_view(&state, "10.1.0.7").await.2, Reply::Drain);
    addresses.set(7, &[]);
    tokio::time::advance(crate::sys::pod_addresses::HIT_REFRESH).await;
    let (status, body, reply) = lb_view(&state, "10.1.0.7").await;
    assert_eq!(
        (status, reply),
        (StatusCode::SERVICE_UNAVAILABLE, Reply::Drain),
        "{body}"
    );
    // Given to pod 8 alone: pod 8's question, which A's drain does not cover.
    addresses.set(8, &["10.1.0.8", "10.1.0.7"]);
    tokio::time::advance(crate::sys::pod_addresses::MISS_REFRESH).await;
    let (status, body, reply) = lb_view(&state, "10.1.0.7").await;
    assert_eq!((status, reply), (StatusCode::OK, Reply::Ready), "{body}");
}

/// Found by an audit: pods are known by their network namespace's inode, and the kernel
/// gives a freed inode to the next namespace (the lowest free one). Pod A (inode 7, address
/// A) was deleted while the node drained A's address (`POST /drain?port=8080&addr=A`, the
/// documented recipe); pod B started on inode 7 with address B. A, kept as maybe inode 7's
/// for 10 minutes, counted as B's own: B's readiness question (`/health?port=8080` on its
/// pod listener) was 503 while that drain ran and for the 5-minute hold after it, while
/// `/health?addr=B` and the agent-check about B said ready. An address a namespace held
/// until lately is its own only while the inode is still that namespace (its cookie); the
/// same namespace giving A up while draining stays out of rotation, as before.
#[tokio::test(start_paused = true)]
async fn a_new_pod_on_a_deleted_pods_inode_is_not_gated_by_its_address() {
    let a: std::net::IpAddr = "10.1.0.7".parse().expect("ip");
    for held in [false, true] {
        for replaced in [false, true] {
            let case = format!("gate held: {held}, namespace replaced: {replaced}");
            let addresses = Addresses::new(&[(7, &["10.1.0.7"]), (8, &["10.1.0.8"])]);
            let (_, state) = app_addressed(
                vec![crate::tracker::Endpoint {
                    netns: 7,
                    ..endpoint("10.1.0.7", 8080, if held { 0 } else { 1 })
                }],
                None,
                |drains| drains,
                addresses.clone(),
            );
            let (status, body) =
                request(&state, "POST", "/drain?port=8080&addr=10.1.0.7&timeout=5m").await;
            assert_eq!(status, StatusCode::CREATED, "{case}: {body}");
            if held {
                let scope = crate::tracker::Filter {
                    addr: Some(a),
                    ..crate::tracker::Filter::port(8080)
                };
                let record = state
                    .drains
                    .wait_ended(&scope, Duration::from_secs(5))
                    .await
                    .expect("the drain");
                assert_eq!(
                    record.result,
                    Some(crate::drain::DrainEnd::Drained),
                    "{case}"
                );
            }
            let pod = Caller::Pod { netns: 7 };
            assert_eq!(
                status_as(&state, pod, "/health?port=8080").await,
                StatusCode::SERVICE_UNAVAILABLE,
                "{case}: pod A's own question"
            );
            if replaced {
                addresses.replace(7, &["10.1.0.9"]);
            } else {
                addresses.set(7, &["10.1.0.9"]);
            }
            tokio::time::advance(crate::sys::pod_addresses::HIT_REFRESH).await;
            let own = status_as(&state, pod, "/health?port=8080").await;
            if replaced {
                assert_eq!(own, StatusCode::OK, "{case}: pod B's readiness question");
            } else {
                assert_eq!(
                    own,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{case}: pod A, whose address left it while it drained"
                );
            }
            let (status, body, reply) = lb_view(&state, "10.1.0.9").await;
            assert_eq!(
                (status, reply),
                (StatusCode::OK, Reply::Ready),
                "{case}: {body}"
            );
            // A itself stays out of rotation (it may still be inode 7's, fail closed).
            let (status, body, reply) = lb_view(&state, "10.1.0.7").await;
            assert_eq!(
                (status, reply),
                (StatusCode::SERVICE_UNAVAILABLE, Reply::Drain),
                "{case}: {body}"
            );
        }
    }
}
/// A state file this agent cannot read (a later release's: a rollback) is moved aside at
/// start, not written over, and every port answers `/health` 503 while it could still gate;
/// the metrics say so.
#[tokio::test]
async fn an_unreadable_state_file_gates_every_port_and_is_said_in_the_metrics() {
    let dir = tempfile::tempdir().expect("dir");
    let newer = r#"{"version":2,"state":{"drains":[]}}"#;
    std::fs::write(dir.path().join(crate::drain::state_file::FILE_NAME), newer).expect("write");
    let (_, state) = app_with(vec![endpoint("127.0.0.1", 8080, 1)], Some(dir.path()));
    state.drains.restore();
    assert_eq!(
        get(&state, "/health?port=8080").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let metrics = state.metrics.render().expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|line| line == "drain_agent_state_unreadable 1"),
        "{metrics}"
    );
    let set_aside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("drains.json.unreadable-v2-at-"))
        .collect();
    assert_eq!(set_aside.len(), 1, "{set_aside:?}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join(&set_aside[0])).expect("kept"),
        newer
    );
}

/// Audit (authorization schemes): an `Authorization` header that was not exactly
/// `Bearer …` was taken as an empty bearer token, `401` on every endpoint, so Prometheus
/// scraping `/metrics` with `basic_auth` (or behind a proxy that adds it) was refused, and
/// `bearer TOKEN` (schemes are case-insensitive, RFC 7235) was refused too. Another scheme
/// is now no token at all (the caller is told as without the header); `bearer` in any case
/// is a bearer token.
#[tokio::test]
async fn another_authorization_scheme_is_no_token_and_bearer_is_any_case() {
    use crate::http::identify::{ClientSockets, Identify, Tokens, identify};

    /// The caller is not on the node.
    struct NotOnTheNode;
    impl ClientSockets for NotOnTheNode {
        fn owner_of(
            &self,
            _: std::net::SocketAddr,
            _: std::net::SocketAddr,
        ) -> anyhow::Result<Option<u32>> {
            Ok(None)
        }
    }

    let (_, state) = app(vec![endpoint("10.0.0.1", 8080, 1)]);
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("tokens");
    std::fs::write(&file, "0123456789abcdef-ops\n").expect("write");
    let who = Identify {
        authority: Arc::clone(&state.authority),
        sockets: Arc::new(NotOnTheNode),
        tokens: Some(Arc::new(Tokens::read(&file).expect("tokens"))),
    };
    let app = router(state).layer(axum::middleware::from_fn_with_state(who, identify));
    let call = |uri: &'static str, authorization: Option<String>| {
        let app = app.clone();
        async move {
            let mut request = axum::http::Request::get(uri);
            if let Some(value) = authorization {
                request = request.header(header::AUTHORIZATION, value);
            }
            let request = request
                .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                    [203, 0, 113, 5],
                    40_000,
                ))))
                .body(Body::empty())
                .expect("request");
            let response = app.oneshot(request).await.expect("answer");
            (response.status(), body_of(response).await)
        }
    };
    let basic = || Some("Basic cHJvbWV0aGV1czpzZWNyZXQ=".to_owned());
    // A scraper with basic auth is a remote caller, as without the header.
    for uri in ["/metrics", "/healthz", "/health?port=8080"] {
        let (status, body) = call(uri, basic()).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
    }
    let (status, body) = call("/drains", basic()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // A listed token is the node's, whatever the scheme's case.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let value = format!("{scheme} 0123456789abcdef-ops");
        let (status, body) = call("/drains", Some(value.clone())).await;
        assert_eq!(status, StatusCode::OK, "{value}: {body}");
    }
    // A bearer token that is not listed (or none after the scheme) is still `401`.
    for value in ["bearer 0123456789abcdef-opz", "Bearer ", "bearer"] {
        let (status, body) = call("/metrics", Some(value.to_owned())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{value}: {body}");
    }
}

/// Audit (overload): of the agent's `429`s only the one beyond the connection cap said when
/// to ask again; the handlers' (`--max-waiters`, an owner's share of waiters or drains) had
/// no `Retry-After`, so a client could only guess. Every `429` now carries it.
#[tokio::test]
async fn every_429_says_when_to_ask_again() {
    let (_, state) = app_made(
        vec![crate::tracker::Endpoint {
            netns: 7,
            ..endpoint("10.1.0.7", 8080, 1)
        }],
        None,
        |tracker| tracker.with_waiters_per_owner(1),
        |drains| drains.with_limits(1, 16),
    );
    let pod = Caller::Pod { netns: 7 };
    let waiter = tokio::spawn({
        let state = Arc::clone(&state);
        async move { request_as(&state, pod, "GET", "/drained?port=8080&timeout=5m").await }
    });
    tokio::time::timeout(Duration::from_secs(5), async {
        while state.tracker.waiters() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("parked");
    for (method, uri) in [
        // Past the pod's share of waiters.
        ("GET", "/drained?port=8081&timeout=1m"),
        // Past its share of drains (its waiter's drain holds the one).
        ("POST", "/drain?port=8082&timeout=1m"),
    ] {
        let response = response_as(&state, pod, method, uri).await;
        assert_eq!(
            response.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{method} {uri}"
        );
        assert_eq!(
            response
                .headers()
                .get(axum::http::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok()),
            Some("1"),
            "{method} {uri}"
        );
    }
    waiter.abort();
}

/// Audit (old kernels): a limit of the kernel (no walker; the classic tracepoint before 6.7;
/// walks without the socket lock before 5.15) holds for good, and every answer is confirmed
/// with the socket tables for it: the answers are right. Shown as `degraded`, it set
/// `drain_agent_degraded` on every such node for good, so `DrainAgentDegraded` fired and never
/// resolved, and a real fault there (a full map) could not be told from it. It is now named
/// apart: `/healthz` stays `ok` and lists it, and its own gauge says so.
#[tokio::test]
async fn a_limit_of_the_kernel_is_shown_apart_from_degraded() {
    let (source, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    *source.doubts.lock().expect("lock") = vec![crate::doubt::Doubt::WalkUnlocked];
    let (status, body) = get(&state, "/healthz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    assert!(
        body["kernel_limits"][0]
            .as_str()
            .is_some_and(|reason| reason.contains("5.15")),
        "{body}"
    );
    let metrics = state.metrics.render().expect("metrics");
    assert!(metrics.contains("drain_agent_degraded 0"), "{metrics}");
    assert!(
        metrics.contains("drain_agent_kernel_limited 1"),
        "{metrics}"
    );
    // A real fault beside it is still degraded.
    *source.doubts.lock().expect("lock") = vec![
        crate::doubt::Doubt::WalkUnlocked,
        crate::doubt::Doubt::SocketMapFull,
    ];
    let (_, body) = get(&state, "/healthz").await;
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["reasons"].as_array().map(Vec::len), Some(1), "{body}");
}

/// A closer whose `listeners()` takes `delay` (a scan of every namespace on a loaded node)
/// and sees one listener (cookie 1), counting its reads.
struct SlowListeners {
    delay: Duration,
    reads: std::sync::atomic::AtomicUsize,
}

impl SlowListeners {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            delay,
            reads: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl crate::closer::Closer for SlowListeners {
    fn close(
        &self,
        _filter: &crate::tracker::Filter,
        targets: &[crate::drain_rule::Peer],
    ) -> anyhow::Result<u64> {
        Ok(targets.len() as u64)
    }

    fn listeners(&self, _filter: &crate::tracker::Filter) -> anyhow::Result<Vec<u64>> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(self.delay);
        Ok(vec![1])
    }

    fn unavailable(&self) -> Option<&str> {
        None
    }
}

/// An app whose drains read the listeners with `closer`, port 8080 drained to the end: its
/// gate held (the end's read done).
async fn held_on_8080(closer: &Arc<SlowListeners>) -> Arc<AppState> {
    let (_, state) = app_closing(
        vec![endpoint("127.0.0.1", 8080, 0)],
        None,
        Some(Arc::clone(closer) as Arc<dyn crate::closer::Closer>),
        |drains| drains,
    );
    let (status, posted) = request(&state, "POST", "/drain?port=8080&timeout=1m").await;
    assert_eq!(status, StatusCode::CREATED, "{posted}");
    let record = state
        .drains
        .wait_ended(&crate::tracker::Filter::port(8080), Duration::from_secs(5))
        .await
        .expect("the drain ended");
    assert_eq!(record.result, Some(crate::drain::DrainEnd::Drained));
    state
}

/// Audit (held gates): a question about a held gate (`/health`, the agent-check: public)
/// read the scope's listeners (a scan of /proc, a thread per namespace, a sock_diag dump)
/// on the async worker answering it, with the registry's `held` lock held: every other
/// answer on that worker waited, the liveness probe's `/healthz` included (2 workers, a 2 s
/// probe timeout). On a one-thread runtime, `/healthz` asked while a held gate's question
/// reads its listeners (here a read that takes a second) is answered at once.
#[tokio::test(flavor = "current_thread")]
async fn a_held_gates_listener_read_does_not_hold_up_other_answers() {
    let closer = SlowListeners::new(Duration::from_secs(1));
    let state = held_on_8080(&closer).await;
    let at_end = closer.reads();
    let started = std::time::Instant::now();
    let health = tokio::spawn({
        let state = Arc::clone(&state);
        async move { get(&state, "/health?port=8080").await }
    });
    // The question starts (and reads) first.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let healthz = tokio::time::timeout(Duration::from_millis(200), get(&state, "/healthz")).await;
    let answered = started.elapsed();
    let (status, body) = healthz.expect("/healthz answered within 200 ms");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        answered < Duration::from_millis(200),
        "/healthz waited {answered:?} for a held gate's listener read"
    );
    let (status, body) = health.await.expect("question");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        closer.reads(),
        at_end + 1,
        "the question read the listeners"
    );
}

/// Audit (held gates): every question about a held gate read the listeners again, so a
/// flood of `/health` or agent-check questions was a flood of scans. Questions asked
/// together share one read, and a read of the last [`crate::drain::LISTENERS_FRESH`]
/// answers for its scope: at most one read per scope per interval.
#[tokio::test(flavor = "current_thread")]
async fn questions_about_a_held_gate_share_one_listener_read() {
    let closer = SlowListeners::new(Duration::from_millis(100));
    let state = held_on_8080(&closer).await;
    let at_end = closer.reads();
    let questions: Vec<_> = (0..20)
        .map(|question| {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                if question % 2 == 0 {
                    get(&state, "/health?port=8080").await.0 == StatusCode::SERVICE_UNAVAILABLE
                } else {
                    crate::http::agentcheck::reply_for(b"8080\n", &state.drains).await
                        == Reply::Drain
                }
            })
        })
        .collect();
    for question in questions {
        assert!(question.await.expect("question"), "the gate is held");
    }
    assert_eq!(
        closer.reads() - at_end,
        1,
        "20 questions asked together, one read"
    );
    // Within the interval, the read answers again; past it, a question reads again.
    assert_eq!(
        get(&state, "/health?port=8080").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(closer.reads() - at_end, 1);
    tokio::time::sleep(crate::drain::LISTENERS_FRESH).await;
    assert_eq!(
        get(&state, "/health?port=8080").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(closer.reads() - at_end, 2);
}

/// Found by an audit: a connection counted for its port only (opened while its endpoint was
/// reclaimed, or with the endpoint map full) is in no `/connections` row until it closes,
/// and nothing in the answer said so: `status` showed "(no open inbound connections)" and
/// exited 0. The node's answer carries every port's total to check the rows against; a
/// caller confined to a namespace gets none (they count every namespace).
#[tokio::test]
async fn connections_carry_the_port_totals_to_the_node_only() {
    let (source, state) = app(Vec::new());
    source.port_only.lock().expect("lock").insert(8080, 1);
    let (status, body) = get(&state, "/connections").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["endpoints"].as_array().map(Vec::len),
        Some(0),
        "{body}"
    );
    assert_eq!(
        body["port_totals"],
        serde_json::json!([{"port": 8080, "active": 1}]),
        "{body}"
    );
    let (_, body) = get(&state, "/connections?port=443").await;
    assert_eq!(body["port_totals"], serde_json::json!([]), "{body}");
    for caller in [
        Caller::Pod { netns: 7 },
        Caller::LocalUser { uid: Some(1000) },
    ] {
        let (status, body) = request_as(&state, caller, "GET", "/connections").await;
        assert_eq!(status, StatusCode::OK, "{caller:?}: {body}");
        assert!(body.get("port_totals").is_none(), "{caller:?}: {body}");
    }
    let (_, body) = get(&state, "/connections?netns=1").await;
    assert!(body.get("port_totals").is_none(), "{body}");
}

/// `continues=true` says a `/drained` waiter is one slice of a longer wait, whose deadline
/// is not the hook's. It makes no sense on a pure query (`timeout=0` starts and waits for
/// nothing), beside `on_timeout=close` (a slice's deadline is not the wait's: closing
/// there would reset clients before the timeout), nor on `POST /drain` (a POSTed drain's
/// deadline is its own): each is a `400` naming it, starting nothing.
#[tokio::test]
async fn continues_is_refused_where_it_makes_no_sense() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    for (method, uri, expected) in [
        (
            "GET",
            "/drained?port=8080&timeout=0&continues=true",
            "continues: a pure query (timeout=0)",
        ),
        (
            "GET",
            "/drained?port=8080&timeout=5s&on_timeout=close&continues=true",
            "continues: a slice of a longer wait never closes",
        ),
        (
            "POST",
            "/drain?port=8080&timeout=5s&continues=true",
            "continues: only for /drained",
        ),
        (
            "GET",
            "/drained?port=8080&timeout=5s&continues=yes",
            "continues: \"yes\" is neither true nor false",
        ),
    ] {
        refused(
            request(&state, method, uri).await,
            StatusCode::BAD_REQUEST,
            expected,
        );
    }
    assert!(state.drains.list().0.is_empty() && state.drains.list().1.is_empty());
    // `continues=false` is the default, and says nothing against the rest.
    let (status, body) = request(
        &state,
        "POST",
        "/drain?port=8080&timeout=5s&continues=false",
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Audit (slices): a slice of `drain-agent wait` (`continues=true`) that ran out was
/// counted `drain_requests_total{result="timeout"}` and its drain
/// `drains_total{result="timeout"}`: the alerts read a hook that went on waiting as one that
/// gave up. Both are `continued` now, and the scope stays out of rotation.
#[tokio::test]
async fn a_slice_that_runs_out_is_counted_continued() {
    let (_, state) = app(vec![endpoint("127.0.0.1", 8080, 1)]);
    let (status, body) = get(&state, "/drained?port=8080&timeout=1s&continues=true").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["drained"], false, "{body}");
    let (_, drains) = get(&state, "/drains").await;
    assert_eq!(drains["recent"][0]["result"], "continued", "{drains}");
    assert_eq!(
        get(&state, "/health?port=8080").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "the hook still waits: the scope stays out of rotation"
    );
    let metrics = state.metrics.render().expect("metrics");
    for line in [
        "drain_agent_drain_requests_total{result=\"continued\"} 1",
        "drain_agent_drain_requests_total{result=\"timeout\"} 0",
        "drain_agent_drains_total{result=\"continued\"} 1",
        "drain_agent_drains_total{result=\"timeout\"} 0",
        "drain_agent_drain_wait_seconds_count 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

/// The listeners on the node address as a test sets them, by cookie; `None`: the socket
/// tables cannot be read.
#[derive(Default)]
struct Listeners(std::sync::Mutex<Option<Vec<u64>>>);

impl Listeners {
    fn set(&self, cookies: Option<Vec<u64>>) {
        *self.0.lock().expect("listeners") = cookies;
    }
}

impl crate::http::metrics_turn::ListenerTable for Listeners {
    fn listeners_on(&self, _: std::net::SocketAddr) -> anyhow::Result<Vec<u64>> {
        self.0
            .lock()
            .expect("listeners")
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no socket tables here"))
    }
}

/// `app`'s state with the `/metrics` turn of an agent that bound its node listener when
/// `earlier` listened on its address, reading `table`.
fn with_turn(
    app_state: &Arc<AppState>,
    earlier: Vec<u64>,
    table: &Arc<Listeners>,
) -> Arc<AppState> {
    Arc::new(AppState {
        metrics_turn: Arc::new(crate::http::metrics_turn::MetricsTurn::after(
            "127.0.0.1:9090".parse().expect("addr"),
            earlier,
            Arc::clone(table) as Arc<dyn crate::http::metrics_turn::ListenerTable>,
        )),
        ..(**app_state).clone()
    })
}

/// Audit (metrics during an overlap): both agents of an upgrade answered `/metrics`, and
/// Prometheus's scrapes alternated between their counters. An agent that bound beside an
/// older listener (cookie 7) answers `503` with `Retry-After` while that one listens, and
/// `200` once it has closed (for good: the tables are not read again); a listener bound
/// after this agent's (cookie 11) never makes it yield; tables that cannot be read leave
/// the metrics served.
#[tokio::test]
async fn metrics_are_left_to_the_older_agent_while_it_listens() {
    use crate::http::{metrics_turn::RETRY_AFTER, status::OLDER_AGENT_SERVES};
    let (_, app_state) = app(vec![]);
    let table = Arc::new(Listeners::default());
    // The new agent of an overlap: 7 (the old agent's) listened before its own (9).
    let state = with_turn(&app_state, vec![7], &table);
    table.set(Some(vec![7, 9]));
    let response = response_as(&state, Caller::Node, "GET", "/metrics").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok()),
        Some(RETRY_AFTER)
    );
    assert_eq!(body_of(response).await["error"], OLDER_AGENT_SERVES);
    // Unreadable tables: served.
    table.set(None);
    let (status, body) = get(&state, "/metrics").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    table.set(Some(vec![7, 9]));
    assert_eq!(
        get(&state, "/metrics").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // The old agent closed its listener (at its SIGTERM): this one serves, and goes on
    // serving whoever binds later.
    table.set(Some(vec![9]));
    let (status, body) = get(&state, "/metrics").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.as_str()
            .is_some_and(|text| text.contains("drain_agent_")),
        "{body}"
    );
    table.set(Some(vec![9, 11]));
    assert_eq!(get(&state, "/metrics").await.0, StatusCode::OK);
    // The old agent of an overlap (nothing listened before it) serves beside a newer one.
    let old = with_turn(&app_state, Vec::new(), &table);
    table.set(Some(vec![7, 9]));
    assert_eq!(get(&old, "/metrics").await.0, StatusCode::OK);
    // Other endpoints are answered by both.
    assert_eq!(get(&state, "/healthz").await.0, StatusCode::OK);
}

/// Audit (gates across a restart): pod A's drain (its hook's `POST /drain` on its own
/// listener, scoped by its namespace), A's address gone from its namespace meanwhile (its
/// sandbox removed), then the agent restarts or an upgrade's new agent starts beside it.
/// The link from the address to A's namespace was in memory only (`FORMER_KEPT`): the next
/// agent's fresh map never saw 10.1.0.7, so `/health?addr=10.1.0.7` was asked in the node's
/// namespace, 200 and `ready` (HAProxy clears DRAIN), while the restored drain, or the gate
/// held after it, still ran for A. The pod's addresses are saved with its drains and holds,
/// and taken as maybe its after the restore for as long as those could gate.
#[tokio::test(start_paused = true)]
async fn an_address_that_left_a_draining_pod_keeps_it_out_of_rotation_after_a_restart() {
    for held in [false, true] {
        for restart in [false, true] {
            let case = format!("gate held: {held}, restart (else overlap): {restart}");
            let dir = tempfile::tempdir().expect("dir");
            let endpoints = vec![crate::tracker::Endpoint {
                netns: 7,
                ..endpoint("10.1.0.7", 8080, if held { 0 } else { 1 })
            }];
            let addresses = Addresses::new(&[(7, &["10.1.0.7"]), (8, &["10.1.0.8"])]);
            let (_, first) = app_addressed(
                endpoints.clone(),
                Some(dir.path()),
                |drains| drains,
                addresses.clone(),
            );
            let a = Caller::Pod { netns: 7 };
            let (status, body) = request_as(&first, a, "POST", "/drain?port=8080&timeout=5m").await;
            assert_eq!(status, StatusCode::CREATED, "{case}: {body}");
            if held {
                first.drains.wait_all_ended(Duration::from_secs(5)).await;
                let (running, ended) = first.drains.list();
                assert!(running.is_empty(), "{case}: {running:?}");
                assert_eq!(
                    ended.first().and_then(|record| record.result),
                    Some(crate::drain::DrainEnd::Drained),
                    "{case}"
                );
            }
            assert_eq!(lb_view(&first, "10.1.0.7").await.2, Reply::Drain, "{case}");
            addresses.set(7, &[]);
            tokio::time::advance(crate::sys::pod_addresses::HIT_REFRESH).await;
            let (status, body, reply) = lb_view(&first, "10.1.0.7").await;
            assert_eq!(
                (status, reply),
                (StatusCode::SERVICE_UNAVAILABLE, Reply::Drain),
                "{case}: before: {body}"
            );
            let kept = if restart {
                first.tracker.begin_shutdown();
                first.drains.wait_all_ended(Duration::from_secs(5)).await;
                drop(first);
                None
            } else {
                Some(first)
            };
            let fresh = Addresses::new(&[(7, &[]), (8, &["10.1.0.8"])]);
            let (_, second) = app_addressed(endpoints, Some(dir.path()), |drains| drains, fresh);
            second.drains.restore();
            let (status, body, reply) = lb_view(&second, "10.1.0.7").await;
            assert_eq!(
                (status, reply),
                (StatusCode::SERVICE_UNAVAILABLE, Reply::Drain),
                "{case}: {body}; {}",
                std::fs::read_to_string(dir.path().join(crate::drain::state_file::FILE_NAME))
                    .expect("file")
            );
            assert_eq!(body["draining"], true, "{case}: {body}");
            // Pod 8 is not in A's drain.
            let (status, body, reply) = lb_view(&second, "10.1.0.8").await;
            assert_eq!(
                (status, reply),
                (StatusCode::OK, Reply::Ready),
                "{case}: {body}"
            );
            drop(kept);
        }
    }
}

/// The same beside the writer of an upgrade's overlap, for a drain POSTed to the writer
/// after this agent started (never restored here, read from the writer's file): the pod's
/// addresses kept with it name the pod here too, from the question that reads the file.
#[tokio::test(start_paused = true)]
async fn an_address_that_left_a_pod_draining_on_the_other_agent_keeps_it_out_of_rotation() {
    let dir = tempfile::tempdir().expect("dir");
    let endpoints = vec![crate::tracker::Endpoint {
        netns: 7,
        ..endpoint("10.1.0.7", 8080, 1)
    }];
    let addresses = Addresses::new(&[(7, &["10.1.0.7"]), (8, &["10.1.0.8"])]);
    let (_, first) = app_addressed(
        endpoints.clone(),
        Some(dir.path()),
        |drains| drains,
        addresses.clone(),
    );
    let fresh = Addresses::new(&[(7, &[]), (8, &["10.1.0.8"])]);
    let (_, second) = app_addressed(endpoints, Some(dir.path()), |drains| drains, fresh);
    second.drains.restore();
    let a = Caller::Pod { netns: 7 };
    let (status, body) = request_as(&first, a, "POST", "/drain?port=8080&timeout=5m").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(lb_view(&first, "10.1.0.7").await.2, Reply::Drain);
    addresses.set(7, &[]);
    tokio::time::advance(crate::sys::pod_addresses::HIT_REFRESH).await;
    assert_eq!(lb_view(&first, "10.1.0.7").await.2, Reply::Drain);
    let (status, body, reply) = lb_view(&second, "10.1.0.7").await;
    assert_eq!(
        (status, reply),
        (StatusCode::SERVICE_UNAVAILABLE, Reply::Drain),
        "{body}"
    );
    assert_eq!(lb_view(&second, "10.1.0.8").await.2, Reply::Ready);
}
