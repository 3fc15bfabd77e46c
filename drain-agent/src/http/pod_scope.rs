//! The scope of a request that arrived on a listener inside a pod's network namespace
//! (`--pod-listen`): it may ask about that namespace only. The pod listener manager
//! (`http/pods/`) puts a [`PodScope`] into each request's extensions; the handlers'
//! extractors (`extract.rs`, through `Caller::confine`) confine what they parsed with it.
//! On the node listener there is no `PodScope` and nothing changes.
//!
//! The rules (README "HTTP API" → "Inside a pod"):
//! - a `/drained`, `/drain` or `/connections` scope gets `netns=` set to the pod's own
//!   namespace; naming another namespace (or one that does not exist: no probing which
//!   do) is 400, and so is an `addr=` that is not an address of the pod's namespace (503
//!   while the namespace's addresses cannot be read: the agent's failure, asked again);
//! - `/drains` lists only the pod's drains, `/health?port=P` says whether the pod's own
//!   drain of P (or the node's of one of its addresses) is in progress; `/health` is public,
//!   so its `addr=` naming another pod is asked about that pod (`Drains::resolve`);
//! - `/metrics` and `/advice` are node-wide (other pods' ports, and with them what runs
//!   there): 403, served on the node listener only.

use std::net::IpAddr;

use axum::{http::StatusCode, response::Response};

use crate::{
    addr::canonical_addr,
    http::api::{ApiError, DrainRequest, error},
    sys::{netns, pod_addresses::PodAddresses},
    tracker::Filter,
};

/// The namespace a pod listener lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodScope {
    /// Inode of the network namespace.
    pub netns: u32,
}

/// The message of every refused `netns=` on a pod listener, the same whatever the reason.
pub const OTHER_NETNS: &str = "netns: this listener is inside a pod and answers for its own network namespace only (leave netns out)";

/// Something with a scope a pod listener confines.
pub trait Scoped {
    fn filter_mut(&mut self) -> &mut Filter;
}

impl Scoped for Filter {
    fn filter_mut(&mut self) -> &mut Filter {
        self
    }
}

/// A scope with whatever else a request parsed (`/connections`).
impl<A, B> Scoped for (Filter, A, B) {
    fn filter_mut(&mut self) -> &mut Filter {
        &mut self.0
    }
}

impl Scoped for DrainRequest {
    fn filter_mut(&mut self) -> &mut Filter {
        &mut self.filter
    }
}

impl PodScope {
    /// The namespace a request may ask about, given the `addr` and `netns` it named.
    pub async fn check(
        &self,
        pods: &PodAddresses,
        addr: Option<IpAddr>,
        netns: Option<u32>,
    ) -> Result<u32, ApiError> {
        if netns.is_some_and(|asked| asked != self.netns) {
            return Err(ApiError::BadRequest(OTHER_NETNS.into()));
        }
        if let Some(addr) = addr {
            let addr = canonical_addr(addr);
            // The agent's failure (a scan that could not look everywhere, out of
            // descriptors), not the request's: 503, asked again, where a 400 is a refusal
            // that ends `drain-agent wait` at once.
            let own = pods
                .addresses_in(self.netns)
                .await
                .map_err(|problem| ApiError::namespaces_unreadable("addr", Some(&problem)))?;
            if !own.contains(&addr) {
                return Err(ApiError::BadRequest(format!(
                    "addr: {addr} is not an address of this pod's network namespace"
                )));
            }
        }
        Ok(self.netns)
    }

    /// A parse error as a pod sees it: "not found" would tell which namespaces exist.
    pub fn hide(&self, problem: ApiError) -> ApiError {
        hide_namespaces(problem, || ApiError::BadRequest(OTHER_NETNS.into()))
    }
}

/// A parse error as a caller confined to one namespace (a pod, a local user) sees it: an
/// unknown inode (404) or a refused path (whose answer differs from that of a path to a
/// namespace that exists) would tell it which namespaces and namespace files exist, so
/// both become `other`, the answer it gets for naming another namespace that exists.
pub fn hide_namespaces(problem: ApiError, other: impl FnOnce() -> ApiError) -> ApiError {
    match problem {
        ApiError::NotFound(_) => other(),
        ApiError::BadRequest(message) if message == netns::REFUSED_PATH => other(),
        problem => problem,
    }
}

/// Confines a parsed request to the pod's namespace (no scope: unchanged).
pub async fn confine<T: Scoped>(
    scope: Option<&PodScope>,
    pods: &PodAddresses,
    parsed: Result<T, ApiError>,
) -> Result<T, ApiError> {
    let Some(scope) = scope else {
        return parsed;
    };
    let mut parsed = parsed.map_err(|problem| scope.hide(problem))?;
    let filter = parsed.filter_mut();
    filter.netns = Some(scope.check(pods, filter.addr, filter.netns).await?);
    Ok(parsed)
}

/// The answer to a node-wide endpoint asked on a pod listener.
pub fn node_only() -> Response {
    error(
        StatusCode::FORBIDDEN,
        "node-wide data is served on the agent's node listener only, not inside a pod",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by an audit: when the pod's namespace addresses could not be read (out of
    /// descriptors the namespace scan found no namespace: "the namespace is gone"), an
    /// `addr=` on a pod listener was a 400, which `drain-agent wait` takes as a refusal and
    /// stops waiting: the pod stopped undrained. It is 503, asked again.
    #[tokio::test]
    async fn unreadable_addresses_are_no_refusal() {
        // Inode 1 is no namespace: its addresses cannot be read.
        let scope = PodScope { netns: 1 };
        let addr: IpAddr = "10.1.0.7".parse().expect("ip");
        let pods = PodAddresses::new(
            2,
            std::sync::Arc::new(crate::sys::pod_addresses::NamespaceAddresses { own_netns: 2 }),
        );
        match scope.check(&pods, Some(addr), None).await {
            Err(ApiError::Unavailable(message)) => {
                assert!(message.contains("cannot read"), "{message}");
                assert!(!message.contains("namespace is gone"), "{message}");
            }
            other => panic!("expected 503, got {other:?}"),
        }
    }
}
