//! Who a pod listener bound beyond loopback answers: loopback (the pod itself) and the
//! node's own addresses.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::StatusCode,
    middleware::Next,
    response::Response,
};

use crate::{addr::canonical_addr, http::api::error};

/// Callers a listener beyond loopback answers besides loopback: the node's addresses.
#[derive(Clone, Default)]
pub(super) struct NodeAddresses(Arc<RwLock<BTreeSet<IpAddr>>>);

impl NodeAddresses {
    fn allows(&self, peer: IpAddr) -> bool {
        let peer = canonical_addr(peer);
        peer.is_loopback()
            || self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&peer)
    }

    pub(super) fn set(&self, addresses: BTreeSet<IpAddr>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = addresses;
    }
}

/// Middleware of listeners bound beyond loopback: loopback (the pod itself) and the node's
/// own addresses (the kubelet's `httpGet`) only; anyone else (other pods, other hosts)
/// gets 403.
pub(super) async fn node_or_loopback_only(
    State(node): State<NodeAddresses>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    match peer {
        Some(peer) if node.allows(peer) => next.run(request).await,
        Some(peer) => error(
            StatusCode::FORBIDDEN,
            format!(
                "{peer} may not ask here: this listener inside a pod answers the pod itself (localhost) and its node only"
            ),
        ),
        None => error(StatusCode::FORBIDDEN, "unknown caller"),
    }
}
