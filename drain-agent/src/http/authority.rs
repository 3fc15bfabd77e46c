//! Who may do what (SECURITY.md): every request has a [`Caller`], and the handlers ask it
//! before they read or change anything.
//!
//! *Observing* is waiting on and reading counts; *control* is starting a drain (which flips
//! `/health` and the agent-check answer), cancelling one, and closing connections.
//!
//! | caller | how it is known | observes | controls |
//! |---|---|---|---|
//! | [`Caller::Node`] | its socket in the node's tables is root's; or a configured bearer token | everything | everything |
//! | [`Caller::LocalUser`] | its socket in the node's tables is another user's | the node's own namespace; of the drains, those it started | ports whose sockets there are all its own |
//! | [`Caller::Pod`] | a pod listener (loopback; from a node address, a socket of root's there: `http/pods/callers.rs`); or on the node listener, a source address of exactly one pod namespace | its namespace | its namespace |
//! | [`Caller::Remote`] | anyone else | `/metrics`, `/healthz`, `/health` | nothing |
//!
//! A request that reaches a handler without a caller (no identification layer ran) is
//! [`Caller::Remote`]: the rules fail closed.

use std::{convert::Infallible, sync::Arc};

use axum::{extract::FromRequestParts, http::request::Parts};

pub use crate::drain::owner::{PortOwners, SocketTableOwners};
use crate::{
    drain::{
        DrainRecord, StartedBy,
        owner::{Holding, holding},
    },
    http::api::ApiError,
    http::pod_scope::{PodScope, Scoped, confine, hide_namespaces},
    sys::{netns::ProcessPaths, pod_addresses::PodAddresses},
    tracker::Filter,
};

/// Who is asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Root on this node, or the holder of a configured bearer token: everything.
    Node,
    /// A process of another user on this node, in the node's own network namespace.
    /// `None`: its socket was found but the tables could not say whose it is.
    LocalUser { uid: Option<u32> },
    /// A pod on this node: its own network namespace only.
    Pod { netns: u32 },
    /// Anyone else.
    Remote,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if let Some(scope) = parts.extensions.get::<PodScope>() {
            return Ok(Self::Pod { netns: scope.netns });
        }
        Ok(parts
            .extensions
            .get::<Self>()
            .copied()
            .unwrap_or(Self::Remote))
    }
}

/// What the rules need to know about the node.
pub struct Authority {
    pub pods: Arc<PodAddresses>,
    pub owners: Arc<dyn PortOwners>,
}

/// The text of every refusal of a local user's `addr=` that is not the node's: the same for
/// a pod's address and for one nobody holds, so that it tells nothing about either.
pub const NODE_ADDRESSES_ONLY: &str = "addr: a local user may name only an address of this node's own network namespace (its interfaces' or loopback); ask as root for others (SECURITY.md)";

/// The text of every refusal of a remote caller.
pub const REMOTE_RULE: &str = "this agent answers /metrics, /healthz and /health to callers that are neither this node nor a pod on it; everything else needs a bearer token the agent was configured with (--auth-token-file); see SECURITY.md";

impl Caller {
    /// Refuses a caller that may not observe anything beyond the public endpoints.
    pub fn observer(self) -> Result<Self, ApiError> {
        match self {
            Self::Remote => Err(ApiError::Forbidden(REMOTE_RULE.into())),
            other => Ok(other),
        }
    }

    /// Parses a request (`parse`) and confines it to what this caller may ask about: a pod's
    /// namespace, the node's namespace (and its addresses, loopback included) for a local
    /// user, unchanged for the node. A remote
    /// caller is refused before `parse` runs: a parse error could say something about the
    /// host, and a parse can cost a scan of every process in /proc (`netns=INODE`) or the
    /// opening of a namespace file (`netns=PATH`), which a caller who may ask nothing must
    /// not be able to make the agent do.
    pub async fn confine<T: Scoped>(
        self,
        authority: &Authority,
        parse: impl FnOnce(ProcessPaths) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let caller = self.observer()?;
        let parsed = parse(caller.process_paths());
        match caller {
            Self::Node => parsed,
            Self::Pod { netns } => {
                confine(Some(&PodScope { netns }), &authority.pods, parsed).await
            }
            Self::LocalUser { .. } => {
                let own = authority.pods.own_netns();
                let other = || {
                    ApiError::Forbidden(format!(
                        "netns: a local user may ask about this node's own network namespace only ({own}); ask as root for others (SECURITY.md)"
                    ))
                };
                // Whether another namespace (or namespace file) exists is not a local user's
                // to learn here: a missing or refused one is answered as one that exists.
                let mut parsed = parsed.map_err(|problem| hide_namespaces(problem, other))?;
                let filter = parsed.filter_mut();
                if filter.netns.is_some_and(|asked| asked != own) {
                    return Err(other());
                }
                // An address of another namespace (a pod's IP) would count nothing here,
                // yet a drain of it is labelled with it in the public /metrics, as that
                // pod's. One answer for every such address, a pod's or nobody's.
                // While the node's addresses are not known (no read of them worked yet, or
                // the last one failed), the agent's failure: 503, asked again, where a 403
                // ends `drain-agent wait` at once. Why went to the log when the read failed.
                if let Some(addr) = filter.addr {
                    match authority.pods.node_holds(addr).await {
                        Some(true) => {}
                        Some(false) => {
                            return Err(ApiError::Forbidden(NODE_ADDRESSES_ONLY.into()));
                        }
                        None => return Err(ApiError::namespaces_unreadable("addr", None)),
                    }
                }
                filter.netns = Some(own);
                Ok(parsed)
            }
            Self::Remote => Err(ApiError::Forbidden(REMOTE_RULE.into())),
        }
    }

    /// Whose `/proc/PID/ns/net` this caller may name in `netns=`: the node any process's; a
    /// local user its own processes' only, any other being answered as a missing one (the
    /// answer would tell whether a PID runs and whether it is in the node's namespace, which
    /// it may not open itself, nor under `hidepid=2` see); a pod none (the PID is one of the
    /// agent's PID namespace: for a pod that names its own namespace it would tell which
    /// host PIDs are its; leaving `netns` out names it).
    pub fn process_paths(self) -> ProcessPaths {
        match self {
            Self::Node => ProcessPaths::Any,
            Self::LocalUser { uid: Some(uid) } => ProcessPaths::OwnedBy(uid),
            Self::LocalUser { uid: None } | Self::Pod { .. } | Self::Remote => ProcessPaths::None,
        }
    }

    /// Whether this caller may control `filter` (confined already): start a drain of it
    /// (and so gate its `/health`), cancel it, close its connections. `Ok`: who it is, as a
    /// drain it starts records it.
    pub async fn may_control(
        self,
        authority: &Authority,
        filter: &Filter,
    ) -> Result<StartedBy, ApiError> {
        match self {
            Self::Node => Ok(StartedBy::Node),
            Self::Pod { .. } => Ok(StartedBy::Pod),
            Self::Remote => Err(ApiError::Forbidden(REMOTE_RULE.into())),
            Self::LocalUser { uid: None } => Err(ApiError::Forbidden(
                "cannot tell which user is calling (the socket tables could not be read): only root controls drains now".into(),
            )),
            Self::LocalUser { uid: Some(uid) } => {
                let port = filter.port;
                match holding(&authority.owners, port, uid).await {
                    Ok(Holding::Own) => Ok(StartedBy::LocalUser { uid }),
                    Ok(Holding::Nobody) => Err(ApiError::Forbidden(format!(
                        "port {port}: nothing listens or is connected on it in this node's namespace, so no user owns it; a local user controls only ports its own sockets hold (SECURITY.md)"
                    ))),
                    Ok(Holding::Others) => Err(ApiError::Forbidden(format!(
                        "port {port}: sockets of another user are on it; uid {uid} controls only ports whose sockets are all its own (SECURITY.md)"
                    ))),
                    Err(problem) => Err(ApiError::Forbidden(format!(
                        "port {port}: cannot read who owns it ({problem:#}); only root controls drains now"
                    ))),
                }
            }
        }
    }

    /// Whether `record` may be shown to this caller: the node sees every drain, a pod those
    /// of its namespace (whoever started them), a local user those it started. Its scope
    /// is not enough for a local user: every local user's drains are of the node's
    /// namespace, and a record names the clients still connected at its end.
    pub fn sees(self, record: &DrainRecord) -> bool {
        match self {
            Self::Node => true,
            Self::Pod { netns: own } => record.netns == Some(own),
            Self::LocalUser { uid: Some(uid) } => {
                record.started_by == Some(StartedBy::LocalUser { uid })
            }
            Self::LocalUser { uid: None } | Self::Remote => false,
        }
    }

    /// Node-wide data (`/advice`): the node and its local users, not pods.
    pub fn node_wide(self) -> Result<(), ApiError> {
        match self {
            Self::Node | Self::LocalUser { .. } => Ok(()),
            Self::Pod { .. } => Err(ApiError::Forbidden(
                "node-wide data is served to this node's own callers only, not to a pod (SECURITY.md)".into(),
            )),
            Self::Remote => Err(ApiError::Forbidden(REMOTE_RULE.into())),
        }
    }
}
