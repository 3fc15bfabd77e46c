//! `GET /connections`: the endpoints with active connections, and with `peers=true` each
//! one's connections; for the node asking about every namespace, each port's total too
//! (what the rows must add up to: connections counted for their port only are in none).

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};

use crate::{
    http::{
        AppState,
        api::{ConnectionsBody, EndpointRow, PortTotal, error},
        authority::Caller,
        extract::{Confined, ConnectionsQuery},
    },
    logging::in_general,
    tracker::Filter,
};

/// `GET /connections[?port=P][&addr=IP][&netns=N][&peers=true]`: endpoints with active
/// connections, and with `peers=true` each one's connections (peer, age, idle, queues).
pub(super) async fn connections(
    State(state): State<Arc<AppState>>,
    Confined(caller, (scope, port, with_peers)): Confined<ConnectionsQuery>,
) -> Response {
    let (addr, netns) = (scope.addr, scope.netns);
    let mut endpoints = match state.tracker.snapshot_off_runtime().await {
        Ok(endpoints) => endpoints,
        Err(problem) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                in_general("cannot read the connection counts", &problem),
            );
        }
    };
    // The port totals count every namespace and address: the node's, asking for all.
    let port_totals = if caller == Caller::Node && addr.is_none() && netns.is_none() {
        let tracker = Arc::clone(&state.tracker);
        let read = endpoints.clone();
        let totals = match tokio::task::spawn_blocking(move || tracker.port_totals(&read)).await {
            Ok(Ok(totals)) => totals,
            Ok(Err(problem)) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    in_general("cannot read the connection counts", &problem),
                );
            }
            Err(problem) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the read of the counts did not finish: {problem}"),
                );
            }
        };
        Some(
            totals
                .into_iter()
                .filter(|&(total_port, active)| active > 0 && port.is_none_or(|p| p == total_port))
                .map(|(port, active)| PortTotal {
                    port,
                    active,
                    outside_ports: !state.metrics.exports_port(port),
                })
                .collect(),
        )
    } else {
        None
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
                // Told already: the tracker makes a listing's error what answers may say
                // (`logging::told`), the detail logged.
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
    let body = ConnectionsBody {
        endpoints: rows,
        outside_ports: port.is_some_and(|port| !state.metrics.exports_port(port)),
        port_totals,
    };
    (StatusCode::OK, Json(body)).into_response()
}
