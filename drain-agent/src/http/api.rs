//! The HTTP contract, in one place: the parameters every endpoint accepts and how they are
//! checked, the answer bodies, the error type and the result labels. The server
//! ([`crate::http`]) and the clients ([`crate::cli::client`]) both use these definitions.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    addr::{connection_addr, no_connection_message},
    drain::{DrainSpec, Given},
    drain_rule::{DrainRule, parse_cidrs},
    duration::{format_duration, parse_duration},
    sys::netns::{self, ProcessPaths},
    tracker::Filter,
};
pub use crate::{
    drain::{DrainRecord, OnTimeout, waiter::Unrecorded},
    drain_rule::Peer,
    tracker::Endpoint,
};

/// The answer of `GET /drained`: 200 when drained, 503 when not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainedBody {
    pub port: u16,
    pub drained: bool,
    pub active: u64,
    pub waited_ms: u64,
    /// Why the agent cannot vouch for the count (the answer is then never "drained").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
    /// Of `active`, idle and busy connections (when they were looked at one by one: with
    /// `idle` or `ignore`, or in a not-drained answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<u64>,
    /// The first remaining connections, in a not-drained answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<Peer>,
    /// The drain this request joined or started (requests with a timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<u64>,
    /// A request that could control its scope but joined no drain says why: it waited
    /// unrecorded (no `/health` gate, no close at the deadline, nothing in `/drains`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrecorded: Option<Unrecorded>,
    /// Connections the agent closed at the deadline (`on_timeout=close`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<u64>,
    /// Why a not-drained answer came before the request's timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<AnswerReason>,
}

/// Why a `/drained` answer came early without "drained".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerReason {
    /// The agent is shutting down (a restart or an upgrade): ask again, the next agent
    /// answers (the answer carries `Retry-After`). Not a timeout.
    AgentShutdown,
}

/// The answer of `GET /health?port=P`: 503 while a drain of the port is in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthBody {
    pub port: u16,
    pub draining: bool,
}

/// The answer of `GET /drains`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainsBody {
    pub in_progress: Vec<DrainRecord>,
    /// Ended drains, newest first (at most the last 200).
    pub recent: Vec<DrainRecord>,
}

/// Every error answer: `{"error": "..."}`, and why it came when that is something a client
/// acts on (`"reason":"agent_shutdown"`: ask again, the next agent answers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<AnswerReason>,
}

/// `Retry-After` (seconds) of an answer given because the agent is stopping
/// ([`AnswerReason::AgentShutdown`]): by then the next agent answers.
pub const SHUTDOWN_RETRY_AFTER: &str = "1";

/// The answer to a request this agent no longer carries out because it is stopping: `503`
/// with [`SHUTDOWN_RETRY_AFTER`] and [`AnswerReason::AgentShutdown`], as a `/drained` answered
/// at a stop. `what` names what was not done.
pub fn stopping(what: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::RETRY_AFTER, SHUTDOWN_RETRY_AFTER)],
        Json(ErrorBody {
            error: format!(
                "the agent is stopping (a restart or an upgrade): {what}; retry, the next agent answers"
            ),
            reason: Some(AnswerReason::AgentShutdown),
        }),
    )
        .into_response()
}

/// The answer of `GET /connections`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsBody {
    pub endpoints: Vec<EndpointRow>,
    /// The query's `port` is outside the agent's `--ports`: its connections are counted
    /// (`/drained` answers for it) but not listed here, so no rows do not mean none open.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outside_ports: bool,
    /// Each port's connections open now (of the query's `port` only, when given), over
    /// every namespace and address, those counted for their port only included (in no
    /// row): what the rows of a port must add up to for the table to be complete. Sent only
    /// to the node (root, or a token) asking with no `addr` or `netns`: they count every
    /// namespace, which a confined caller may not learn about. Absent otherwise, and from
    /// an older agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_totals: Option<Vec<PortTotal>>,
}

/// One port's total in a [`ConnectionsBody`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortTotal {
    pub port: u16,
    /// Connections open now (ports with none are left out).
    pub active: u64,
    /// The port is outside the agent's `--ports`: counted, but in no row.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outside_ports: bool,
}

/// The `status` of a `200` answer of `GET /healthz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Every count can be vouched for (or is confirmed with the socket tables).
    Ok,
    /// Some counts cannot be vouched for, or the in-pod port is steered nowhere: `reasons`.
    Degraded,
}

/// The answer of `GET /healthz` when the maps can be read (`200`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthzBody {
    pub status: HealthStatus,
    /// How the handler is attached (`tp_btf`, …).
    pub attach: String,
    /// Why the status is degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Limits of this kernel: every answer is confirmed with the socket tables for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_limits: Vec<String>,
    /// Why drains that close at their deadline are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_unavailable: Option<String>,
    /// The first walk after a start still runs: connections open before the start are not
    /// all counted in the maps yet (answers are confirmed with the socket tables meanwhile).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seeding: bool,
}

/// One endpoint in `/connections`, with its connections one by one when `peers=true`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<Peer>>,
}

/// The `Warning` header (RFC 7234's code 299, "a persistent warning") of a `POST` or
/// `DELETE /drain` answered while the drains could not be saved in `--state-dir`: the drain
/// (or its cancel) holds while this agent runs, but not across a restart of it.
pub const UNSAVED_WARNING: &str = "299 drain-agent \"not saved in --state-dir: this would not survive a restart of the agent (see its log)\"";

/// A JSON error answer.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// `Retry-After` (seconds) of a `429`: the agent's limits free up as waiters are answered
/// and drains end, and a client asking sooner only adds to the load that filled them.
pub const BUSY_RETRY_AFTER: &str = "1";

/// `429` with [`BUSY_RETRY_AFTER`]: one of the agent's limits turned the request away;
/// `message` names which. Every `429` of the agent is this one answer.
pub fn too_many(message: impl Into<String>) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(axum::http::header::RETRY_AFTER, BUSY_RETRY_AFTER)],
        Json(json!({ "error": message.into() })),
    )
        .into_response()
}

/// Limits on what a client may ask for.
#[derive(Clone, Copy, Debug)]
pub struct WaitLimits {
    /// Used when a request has no `timeout`.
    pub default_timeout: Duration,
    /// The longest `timeout` or `settle` a request may ask for.
    pub max_timeout: Duration,
    /// The agent's own API port: its connections are not counted where the agent listens
    /// on it, so asking about it there is a mistake (it could never drain while the request
    /// itself is open). Elsewhere the port is any application's ([`WaitLimits::check_own_port`]).
    pub own_port: Option<u16>,
    /// The network namespace where the agent listens on `own_port`: the node listener's.
    /// `None`: every namespace a request may ask about (a pod listener, which answers for
    /// the pod's own namespace only, where the agent takes the port).
    pub own_netns: Option<u32>,
}

impl WaitLimits {
    /// Refuses a scope (confined already: a pod's is its own namespace) that takes in the
    /// agent's own port where the agent listens on it. The kernel leaves the agent's
    /// connections uncounted by namespace and port (`is_own_endpoint`), whatever the
    /// address, so a scope of that namespace, or of every namespace, is refused whatever
    /// its `addr`; the port in another namespace is an application's, counted as any.
    pub fn check_own_port(&self, filter: &Filter) -> Result<(), ApiError> {
        let port = filter.port;
        if self.own_port != Some(port) {
            return Ok(());
        }
        match self.own_netns {
            None => Err(ApiError::BadRequest(format!(
                "port: {port} is the agent's own API port, whose connections are not counted"
            ))),
            Some(own) if filter.netns.is_none_or(|asked| asked == own) => {
                Err(ApiError::BadRequest(format!(
                    "port: {port} is the agent's own API port in the node's network namespace ({own}), whose connections there are not counted; name another namespace (netns=) to ask about the port there"
                )))
            }
            Some(_) => Ok(()),
        }
    }
}

/// Why a request is refused; each becomes a status and `{"error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the request names something wrong (the message names the parameter).
    BadRequest(String),
    /// 404: the request names something that does not exist (e.g. an unknown netns).
    NotFound(String),
    /// 401: a bearer token was given and is not one the agent was configured with.
    Unauthorized(String),
    /// 403: this caller may not do this (the message names the rule; SECURITY.md).
    Forbidden(String),
    /// 409: the request's settings differ from those of the drain in progress of its scope.
    Conflict(String),
    /// 422: a well-formed request this agent cannot carry out as it runs (the message says
    /// why): asking again cannot help, changing the request or the agent's setup can.
    CannotDo(String),
    /// 503: the agent cannot tell now (e.g. whether a `netns` inode exists, while it cannot
    /// find every namespace: out of descriptors); asking again may help.
    Unavailable(String),
}

/// The answer while the agent cannot read the network namespaces (a scan that could not
/// look everywhere: out of descriptors), whoever asks: the detail names host paths and
/// processes, and goes to the agent's log ([`ApiError::namespaces_unreadable`]).
pub const NAMESPACES_UNREADABLE: &str =
    "the agent cannot read the network namespaces right now; ask again";

impl ApiError {
    /// 503 for `field` (`"netns"`, `"addr"`) while the namespaces cannot be read:
    /// [`NAMESPACES_UNREADABLE`], the same for every caller; `problem` (why, if this
    /// caller's read found out) goes to the log ([`crate::logging::withheld`]).
    pub fn namespaces_unreadable(field: &str, problem: Option<&anyhow::Error>) -> Self {
        if let Some(problem) = problem {
            crate::logging::withheld(
                &format!("{field}: cannot read the network namespaces (answered 503)"),
                problem,
            );
        }
        Self::Unavailable(format!("{field}: {NAMESPACES_UNREADABLE}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::BadRequest(message) => error(StatusCode::BAD_REQUEST, message),
            Self::NotFound(message) => error(StatusCode::NOT_FOUND, message),
            Self::Unauthorized(message) => (
                [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                error(StatusCode::UNAUTHORIZED, message),
            )
                .into_response(),
            Self::Forbidden(message) => error(StatusCode::FORBIDDEN, message),
            Self::Conflict(message) => error(StatusCode::CONFLICT, message),
            Self::CannotDo(message) => error(StatusCode::UNPROCESSABLE_ENTITY, message),
            Self::Unavailable(message) => error(StatusCode::SERVICE_UNAVAILABLE, message),
        }
    }
}

impl From<String> for ApiError {
    fn from(message: String) -> Self {
        Self::BadRequest(message)
    }
}

/// A parsed `/drained` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainRequest {
    pub filter: Filter,
    pub timeout: Duration,
    pub rule: DrainRule,
    /// The request used the deprecated `settle` (read as `quiet`).
    pub deprecated_settle: bool,
    /// `on_timeout=close|keep`: close what is left at the deadline.
    pub on_timeout: OnTimeout,
    /// `pace=N`: at most N closings per second (0: all at once).
    pub pace: u32,
    /// `peers=true`: a not-drained answer to a pure query (`timeout=0`) lists the remaining
    /// connections too (a waiter's answer always does). Off by default: the list costs a
    /// pass over the kernel's socket tables, which a poller should not pay every time.
    pub peers: bool,
    /// Which drain settings the request named (they must agree with a drain in progress).
    pub given: Given,
    /// `continues=true`: this request is one slice of a longer wait (`drain-agent wait`
    /// asks a wait over `--max-timeout` in slices), so its deadline is not the hook's. A
    /// drain that reaches its deadline with only such waiters attached ends `continued`,
    /// not `timeout` (`DrainEnd::Continued`), and the request is counted `continued`.
    pub continues: bool,
}

impl DrainRequest {
    /// The drain this request starts or joins.
    pub fn spec(&self) -> DrainSpec {
        DrainSpec {
            filter: self.filter.clone(),
            timeout: self.timeout,
            rule: self.rule.clone(),
            on_timeout: self.on_timeout,
            pace: self.pace,
            given: self.given,
        }
    }

    /// Refuses `on_timeout=close` when the agent cannot close connections (`unavailable`:
    /// why, [`crate::drain::Drains::close_unavailable`]): such a drain would end recorded
    /// `closed_at_deadline` with the connections still open. Nothing is started or joined.
    pub fn check_close(&self, unavailable: Option<&str>) -> Result<(), ApiError> {
        match unavailable {
            Some(problem) if self.on_timeout == OnTimeout::Close => {
                Err(ApiError::CannotDo(format!(
                    "on_timeout=close: this agent cannot close connections: {problem}; no drain started or joined (ask with on_timeout=keep to drain without closing)"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The parameters of `/drained`.
pub const DRAIN_PARAMETERS: [&str; 12] = [
    "port",
    "addr",
    "netns",
    "timeout",
    "quiet",
    "ignore",
    "idle",
    "settle",
    "on_timeout",
    "pace",
    "peers",
    "continues",
];
/// The parameters of `DELETE /drain` and `GET /health`: a scope only.
pub const SCOPE_PARAMETERS: [&str; 3] = ["port", "addr", "netns"];
/// The parameters of `/connections`.
pub const CONNECTION_PARAMETERS: [&str; 4] = ["port", "addr", "netns", "peers"];

/// Splits a query into its parameters: each must be one of `known` and appear once.
pub fn parse_query(
    query: Option<&str>,
    known: &[&str],
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !known.contains(&name.as_ref()) {
            return Err(ApiError::BadRequest(if known.is_empty() {
                format!("unknown parameter {name:?} (this path takes none)")
            } else {
                format!("unknown parameter {name:?} (known: {})", known.join(", "))
            }));
        }
        if values.insert(name.to_string(), value.to_string()).is_some() {
            return Err(ApiError::BadRequest(format!(
                "parameter {name:?} is given more than once"
            )));
        }
    }
    Ok(values)
}

/// The optional `addr` and `netns` of a query; `netns` still to be looked up.
pub fn parse_scope(
    values: &BTreeMap<String, String>,
) -> Result<(Option<IpAddr>, Netns<'_>), ApiError> {
    let addr = values
        .get("addr")
        .map(|text| parse_addr(text))
        .transpose()?;
    Ok((addr, Netns(values.get("netns").map(String::as_str))))
}

/// The `netns=` of a query, not looked up yet. Looking it up tells whether a namespace (or
/// namespace file) exists, which a caller confined to one namespace may not learn
/// (SECURITY.md): its answer is the same for every namespace but its own only if nothing
/// else can refuse the request after the lookup. So every parser [`Netns::resolve`]s it
/// last, once every other parameter is known good.
#[must_use = "resolve it, last"]
pub struct Netns<'a>(Option<&'a str>);

impl Netns<'_> {
    /// The inode of the namespace named, if one was: the last step of a parse. `processes`:
    /// whose `/proc/PID/ns/net` the caller may name ([`Caller::process_paths`]).
    ///
    /// [`Caller::process_paths`]: crate::http::authority::Caller::process_paths
    pub fn resolve(self, processes: ProcessPaths) -> Result<Option<u32>, ApiError> {
        self.0.map(|text| parse_netns(text, processes)).transpose()
    }
}

/// Parses the query of `/drained`. Every error names the parameter and what was wrong.
/// What a request of the drain's parameters asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asking {
    /// An answer (`GET /drained`): `timeout=0` makes it a pure query.
    Answer,
    /// A drain (`POST /drain`), which needs a timeout above 0.
    Drain,
}

/// The parameters of `GET /drained` ([`Asking::Answer`]).
pub fn parse_drain_request(
    query: Option<&str>,
    limits: WaitLimits,
    processes: ProcessPaths,
) -> Result<DrainRequest, ApiError> {
    parse_drain_parameters(query, limits, Asking::Answer, processes)
}

/// The parameters of `/drained` or `POST /drain`, checked for what `asking` asks for;
/// `processes` as [`Netns::resolve`] takes it.
pub fn parse_drain_parameters(
    query: Option<&str>,
    limits: WaitLimits,
    asking: Asking,
    processes: ProcessPaths,
) -> Result<DrainRequest, ApiError> {
    let values = parse_query(query, &DRAIN_PARAMETERS)?;
    let port = match values.get("port") {
        None => {
            return Err(ApiError::BadRequest(
                "missing parameter \"port\" (e.g. /drained?port=8080)".into(),
            ));
        }
        Some(text) => parse_port(text)?,
    };
    let (addr, netns) = parse_scope(&values)?;
    let timeout = match values.get("timeout") {
        None => limits.default_timeout,
        Some(text) => parse_limited("timeout", text, limits.max_timeout)?,
    };
    // Before the quiet window's check, whose advice is for pure queries.
    if asking == Asking::Drain && timeout.is_zero() {
        return Err(ApiError::BadRequest(
            "timeout: a drain needs a timeout above 0".into(),
        ));
    }
    if values.contains_key("quiet") && values.contains_key("settle") {
        return Err(ApiError::BadRequest(
            "settle: give quiet only (settle is its deprecated name)".into(),
        ));
    }
    let deprecated_settle = values.contains_key("settle");
    let quiet_name = if deprecated_settle { "settle" } else { "quiet" };
    let quiet = match values.get("quiet").or_else(|| values.get("settle")) {
        None => Duration::ZERO,
        Some(text) => parse_limited(quiet_name, text, limits.max_timeout)?,
    };
    // A pure query (`timeout=0`) too: its window counts from the request, which it answers
    // at once.
    if quiet > timeout {
        return Err(ApiError::BadRequest(format!(
            "{quiet_name}: {} is longer than the timeout {}, so the answer could only be 503{}",
            format_duration(quiet),
            format_duration(timeout),
            if timeout.is_zero() {
                " (timeout=0 answers at once: leave the quiet window out of a pure query)"
            } else {
                ""
            }
        )));
    }
    let ignore = match values.get("ignore") {
        None => Vec::new(),
        Some(text) => parse_cidrs(text).map_err(|problem| format!("ignore: {problem}"))?,
    };
    let idle = values
        .get("idle")
        .map(|text| parse_limited("idle", text, limits.max_timeout))
        .transpose()?;
    let on_timeout = match values.get("on_timeout").map(String::as_str) {
        None | Some("keep") => OnTimeout::Keep,
        Some("close") => OnTimeout::Close,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "on_timeout: {other:?} is neither close nor keep"
            )));
        }
    };
    let pace = match values.get("pace") {
        None => 0,
        Some(text) => text
            .parse::<u32>()
            .map_err(|_| format!("pace: {text:?} is not a number of closings per second"))?,
    };
    check_closing(timeout, on_timeout, values.contains_key("pace"))?;
    let peers = parse_peers_flag(&values)?;
    let continues = parse_flag(&values, "continues")?;
    if continues {
        check_continues(asking, timeout, on_timeout)?;
    }
    let netns = netns.resolve(processes)?;
    Ok(DrainRequest {
        filter: Filter { port, addr, netns },
        timeout,
        rule: DrainRule {
            quiet,
            ignore,
            idle,
        },
        deprecated_settle,
        on_timeout,
        pace,
        peers,
        given: Given {
            on_timeout: values.contains_key("on_timeout"),
            quiet: values.contains_key("quiet") || values.contains_key("settle"),
            ignore: values.contains_key("ignore"),
            idle: values.contains_key("idle"),
            pace: values.contains_key("pace"),
        },
        continues,
    })
}

/// Refuses the settings of the close at the deadline where they cannot take effect: a pure
/// query (`timeout=0`) closes nothing, and `pace` (`pace_given`) paces only a close that
/// `on_timeout=close` asks for. Taken silently, a hook's close would never happen unsaid,
/// and a drain would record a pace it never uses (a later request naming another got `409`
/// over it). The CLI refuses the same (`wait --pace` requires `--close-at-timeout`).
fn check_closing(
    timeout: Duration,
    on_timeout: OnTimeout,
    pace_given: bool,
) -> Result<(), ApiError> {
    if on_timeout == OnTimeout::Close && timeout.is_zero() {
        return Err(ApiError::BadRequest(
            "on_timeout: a pure query (timeout=0) answers at once and closes nothing: leave on_timeout=close out, or give a timeout".into(),
        ));
    }
    if pace_given && on_timeout != OnTimeout::Close {
        return Err(ApiError::BadRequest(
            "pace: it paces the closing at the timeout, which only on_timeout=close asks for: without it nothing is closed (add on_timeout=close, or leave pace out)".into(),
        ));
    }
    Ok(())
}

/// Where `continues=true` makes no sense: a `POST /drain` (a POSTed drain's deadline is its
/// own, whoever waits), a pure query (`timeout=0` starts and waits for nothing), and
/// `on_timeout=close` (a slice's deadline is not the wait's: closing there would reset the
/// clients before the hook's timeout; `drain-agent wait` asks for the close on its last
/// request only, which does not continue).
fn check_continues(
    asking: Asking,
    timeout: Duration,
    on_timeout: OnTimeout,
) -> Result<(), ApiError> {
    let why = if asking == Asking::Drain {
        "only for /drained waiters (a slice of a longer wait): a POSTed drain's deadline is its own"
    } else if timeout.is_zero() {
        "a pure query (timeout=0) is no slice of a wait: leave it out"
    } else if on_timeout == OnTimeout::Close {
        "a slice of a longer wait never closes: on_timeout=close belongs to the request whose deadline is the wait's own, which does not continue"
    } else {
        return Ok(());
    };
    Err(ApiError::BadRequest(format!("continues: {why}")))
}

/// `peers=true|false` (default false), of `/drained` and `/connections`.
pub fn parse_peers_flag(values: &BTreeMap<String, String>) -> Result<bool, ApiError> {
    parse_flag(values, "peers")
}

/// `name=true|false` (default false).
pub fn parse_flag(values: &BTreeMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match values.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "{name}: {other:?} is neither true nor false"
        ))),
    }
}

/// Parses a query that names a scope only (`port`, `addr`, `netns`).
pub fn parse_scope_request(
    query: Option<&str>,
    processes: ProcessPaths,
) -> Result<Filter, ApiError> {
    let values = parse_query(query, &SCOPE_PARAMETERS)?;
    let port = match values.get("port") {
        None => return Err(ApiError::BadRequest("missing parameter \"port\"".into())),
        Some(text) => parse_port(text)?,
    };
    let (addr, netns) = parse_scope(&values)?;
    let netns = netns.resolve(processes)?;
    Ok(Filter { port, addr, netns })
}

pub fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err(format!("port: {text:?} is not a port number (1-65535)")),
    }
}

/// A local address, IPv4-mapped IPv6 folded to IPv4 as the kernel side does; one no
/// connection can have (`0.0.0.0`, `::`, multicast, broadcast) is refused.
pub fn parse_addr(text: &str) -> Result<IpAddr, String> {
    let addr = text
        .parse::<IpAddr>()
        .map_err(|_| format!("addr: {text:?} is not an IP address"))?;
    connection_addr(addr)
        .map_err(|why| format!("addr: {}", no_connection_message("addr", addr, why)))
}

/// `netns` is an inode number of a network namespace that exists, or the path of one in
/// the places where they live. Every refused path gets the same answer. An inode the scan
/// does not find is unknown (`404`, which `drain-agent wait` takes as a refusal and stops
/// waiting) only when the scan looked everywhere: an incomplete one is `503` (asked again),
/// and so is a path the agent could not open for want of descriptors or memory.
fn parse_netns(text: &str, processes: ProcessPaths) -> Result<u32, ApiError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let inode = text.parse::<u32>().map_err(|_| {
            ApiError::BadRequest(format!("netns: {text:?} is not a namespace inode number"))
        })?;
        let found = netns::all_namespaces()
            .map_err(|problem| ApiError::namespaces_unreadable("netns", Some(&problem)))?;
        if !found.contains_key(&inode) {
            return Err(ApiError::NotFound(format!(
                "netns: no network namespace with inode {inode} is known to the agent"
            )));
        }
        return Ok(inode);
    }
    // The agent's want of descriptors or memory is its failure, not the request's: `503`,
    // asked again, where a `400` (a pod's, a local user's answer to it too) is a refusal
    // that ends `drain-agent wait` at once.
    match netns::inode_of_client_path(text, processes) {
        Ok(Some(inode)) => Ok(inode),
        Ok(None) => Err(ApiError::BadRequest(netns::REFUSED_PATH.into())),
        Err(problem) => Err(ApiError::namespaces_unreadable("netns", Some(&problem))),
    }
}

fn parse_limited(name: &str, text: &str, max: Duration) -> Result<Duration, String> {
    let duration = parse_duration(text).map_err(|e| format!("{name}: {e}"))?;
    if duration > max {
        return Err(format!(
            "{name}: {text} is longer than the maximum {} (--max-timeout)",
            format_duration(max)
        ));
    }
    Ok(duration)
}
