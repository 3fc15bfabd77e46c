//! The handlers' extractors: a request's parameters parsed, confined to what its caller may
//! ask about ([`Caller::confine`]) and, where it changes something, checked against what
//! the caller may control. Each owns its rejection (an [`ApiError`], and for `/drained` the
//! metrics result too), so a handler starts with what it may act on.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    extract::FromRequestParts,
    http::request::Parts,
    response::{IntoResponse, Response},
};

use crate::{
    drain::{StartedBy, owner::Owner, waiter::Ask},
    http::{
        AppState,
        api::{
            ApiError, Asking, CONNECTION_PARAMETERS, DrainRequest, OnTimeout, WaitLimits,
            parse_addr, parse_drain_parameters, parse_drain_request, parse_peers_flag, parse_port,
            parse_query, parse_scope, parse_scope_request,
        },
        authority::Caller,
        pod_scope::Scoped,
    },
    metrics::DrainResult,
    sys::netns::ProcessPaths,
    tracker::Filter,
};

/// The caller of a request (never refused: [`Caller::Remote`] when unknown).
async fn caller(parts: &mut Parts, state: &Arc<AppState>) -> Caller {
    match Caller::from_request_parts(parts, state).await {
        Ok(caller) => caller,
        Err(never) => match never {},
    }
}

/// Parameters a request's query carries, with a scope to confine.
pub trait Params: Scoped + Sized + Send {
    /// `processes`: whose `/proc/PID/ns/net` the caller may name ([`Caller::process_paths`]).
    fn parse(
        query: Option<&str>,
        limits: WaitLimits,
        processes: ProcessPaths,
    ) -> Result<Self, ApiError>;

    /// What is checked once the scope is confined (before, a pod would learn about
    /// other namespaces from the error, and its scope would not be its namespace yet).
    fn check(&self, _: &WaitLimits) -> Result<(), ApiError> {
        Ok(())
    }
}

impl Params for DrainRequest {
    fn parse(
        query: Option<&str>,
        limits: WaitLimits,
        processes: ProcessPaths,
    ) -> Result<Self, ApiError> {
        parse_drain_request(query, limits, processes)
    }

    fn check(&self, limits: &WaitLimits) -> Result<(), ApiError> {
        limits.check_own_port(&self.filter)
    }
}

/// `DELETE /drain`: a scope.
impl Params for Filter {
    fn parse(
        query: Option<&str>,
        _: WaitLimits,
        processes: ProcessPaths,
    ) -> Result<Self, ApiError> {
        parse_scope_request(query, processes)
    }

    fn check(&self, limits: &WaitLimits) -> Result<(), ApiError> {
        limits.check_own_port(self)
    }
}

/// `/connections`: a scope (port 0: every port), the port asked for, and `peers=true`.
pub type ConnectionsQuery = (Filter, Option<u16>, bool);

impl Params for ConnectionsQuery {
    fn parse(
        query: Option<&str>,
        _: WaitLimits,
        processes: ProcessPaths,
    ) -> Result<Self, ApiError> {
        let values = parse_query(query, &CONNECTION_PARAMETERS)?;
        let port = values
            .get("port")
            .map(|text| parse_port(text))
            .transpose()?;
        let (addr, netns) = parse_scope(&values)?;
        let peers = parse_peers_flag(&values)?;
        let netns = netns.resolve(processes)?;
        let scope = Filter {
            port: port.unwrap_or(0),
            addr,
            netns,
        };
        Ok((scope, port, peers))
    }
}

/// `POST /drain`: a drain request, which needs a timeout.
pub struct Posted(pub DrainRequest);

impl Scoped for Posted {
    fn filter_mut(&mut self) -> &mut Filter {
        &mut self.0.filter
    }
}

impl Params for Posted {
    fn parse(
        query: Option<&str>,
        limits: WaitLimits,
        processes: ProcessPaths,
    ) -> Result<Self, ApiError> {
        parse_drain_parameters(query, limits, Asking::Drain, processes).map(Self)
    }

    fn check(&self, limits: &WaitLimits) -> Result<(), ApiError> {
        limits.check_own_port(&self.0.filter)
    }
}

/// A request's parameters, confined to its caller's scope; the caller beside them.
pub struct Confined<T>(pub Caller, pub T);

impl<T: Params> FromRequestParts<Arc<AppState>> for Confined<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let caller = caller(parts, state).await;
        let query = parts.uri.query();
        let params = caller
            .confine(&state.authority, |processes| {
                T::parse(query, state.limits, processes)
            })
            .await?;
        params.check(&state.limits)?;
        Ok(Self(caller, params))
    }
}

/// [`Confined`], and its caller may control the scope (start, cancel, close): who it is, as
/// a drain it starts records it.
pub struct Controlled<T>(pub StartedBy, pub T);

impl<T: Params> FromRequestParts<Arc<AppState>> for Controlled<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Confined(caller, mut params) = Confined::<T>::from_request_parts(parts, state).await?;
        let by = caller
            .may_control(&state.authority, params.filter_mut())
            .await?;
        Ok(Self(by, params))
    }
}

/// A caller that may observe (anything beyond the public endpoints).
pub struct Observer(pub Caller);

impl FromRequestParts<Arc<AppState>> for Observer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        caller(parts, state).await.observer().map(Self)
    }
}

/// A caller that may read node-wide data (`/advice`).
pub struct NodeWide;

impl FromRequestParts<Arc<AppState>> for NodeWide {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        caller(parts, state).await.node_wide().map(|()| Self)
    }
}

/// A request that names no parameters.
pub struct NoParams;

impl<S: Send + Sync> FromRequestParts<S> for NoParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query(), &[]).map(|_| Self)
    }
}

/// `/health?port=P[&addr=IP]`: asked by anyone (a load balancer), not confined; `pod` is
/// the asking pod's namespace, which `Drains::resolve` asks about unless `addr` names
/// another pod.
pub struct HealthQuery {
    pub port: u16,
    pub addr: Option<std::net::IpAddr>,
    pub pod: Option<u32>,
}

impl<S: Send + Sync> FromRequestParts<S> for HealthQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let values = parse_query(parts.uri.query(), &["port", "addr"])?;
        let port = values
            .get("port")
            .map(|text| parse_port(text))
            .transpose()?
            .ok_or_else(|| ApiError::BadRequest("missing parameter \"port\"".into()))?;
        let addr = values
            .get("addr")
            .map(|text| parse_addr(text).map_err(ApiError::BadRequest))
            .transpose()?;
        let pod = match Caller::from_request_parts(parts, state).await {
            Ok(Caller::Pod { netns }) => Some(netns),
            Ok(_) => None,
            Err(never) => match never {},
        };
        Ok(Self { port, addr, pod })
    }
}

/// `settle` is deprecated: warn once per agent run, not per request.
static SETTLE_WARNED: AtomicBool = AtomicBool::new(false);

/// A `/drained` request, confined, with whether it joins its scope's drain: a waiter with
/// a timeout whose caller may control the scope does (the load balancer is told, the
/// drain recorded); otherwise it only observes, and may not ask for connections to be
/// closed. `timeout=0` stays a pure query. A refusal is recorded as an invalid request.
pub struct Waiter(pub Ask);

impl FromRequestParts<Arc<AppState>> for Waiter {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let refused = |problem: ApiError| {
            state.metrics.drain_request(DrainResult::Invalid, None);
            problem.into_response()
        };
        let Confined(caller, request) = Confined::<DrainRequest>::from_request_parts(parts, state)
            .await
            .map_err(refused)?;
        if request.deprecated_settle && !SETTLE_WARNED.swap(true, Ordering::Relaxed) {
            log::warn!(
                "a /drained request used settle=, which is now quiet= (counted from the request, not from the last change); settle will be removed"
            );
        }
        let control = if request.timeout.is_zero() {
            None
        } else {
            match caller.may_control(&state.authority, &request.filter).await {
                Ok(by) => Some(by),
                Err(problem) if request.on_timeout == OnTimeout::Close => {
                    return Err(refused(problem));
                }
                Err(_) => None,
            }
        };
        // After the authority's check: a caller that may not control the scope learns
        // nothing about the agent from this.
        if control.is_some() {
            request
                .check_close(state.drains.close_unavailable())
                .map_err(refused)?;
        }
        // One owner's waiters never fill the node's limit (INVARIANTS.md "Shared limits");
        // the node's only meets the node's limit, as before owners.
        let owner = Owner::of(&request.filter);
        let share = (caller != Caller::Node && owner.limited()).then_some(owner);
        Ok(Self(Ask {
            spec: request.spec(),
            control,
            peers: request.peers,
            share,
            continues: request.continues,
        }))
    }
}
