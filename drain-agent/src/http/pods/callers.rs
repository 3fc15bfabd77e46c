//! Who a pod listener bound beyond loopback answers (SECURITY.md): loopback (the pod
//! itself) and root of the node, calling from one of the node's own addresses (the
//! kubelet's `httpGet` hook connects from the node's namespace to the pod's IP).
//!
//! Loopback is the pod only at both ends of the connection. A proxy in the pod that
//! intercepts inbound traffic (a service mesh's sidecar in REDIRECT mode: Istio's opens its
//! upstream from 127.0.0.6 to the original destination, the pod's address) relays a caller
//! from anywhere from a loopback address to an address beyond loopback: such a connection is
//! refused, and its answer says how to exclude the port from the interception. A process of
//! the pod calling `localhost` is loopback at both ends; one calling the pod's own address
//! comes from that address, not loopback, and is refused as from elsewhere.
//!
//! A node address alone says only that the caller is *on* the node: any user there, or a
//! hostNetwork pod of another tenant, calls from the same addresses. So such a caller is
//! told the way the node listener tells local callers (`identify.rs`): by the owner of its
//! own socket in the node's namespace (the client end of this very connection), which the
//! kernel records and no caller chooses. Root's is answered with the pod's rights, as the
//! kubelet's; another user's, or a socket the tables do not hold (a connection translated
//! on its way from elsewhere) or cannot be read, gets `403` before anything is parsed.

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

use crate::{
    addr::canonical_addr,
    http::api::error,
    http::identify::{ClientSockets, client_owner},
    http::server::LocalAddr,
};

/// The node's own addresses: a caller from one of them is in the node's namespace.
#[derive(Clone, Default)]
pub(super) struct NodeAddresses(Arc<RwLock<BTreeSet<IpAddr>>>);

impl NodeAddresses {
    fn contains(&self, peer: IpAddr) -> bool {
        self.0
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

/// The state of [`pod_or_node_root_only`].
#[derive(Clone)]
pub(super) struct NodeCallers {
    pub(super) addresses: NodeAddresses,
    /// The node's socket tables, where a caller from a node address has its socket.
    pub(super) sockets: Arc<dyn ClientSockets>,
}

/// Why a caller is refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Neither loopback nor a node address: another pod, another host.
    Elsewhere(IpAddr),
    /// From loopback to an address beyond it: relayed by a proxy in the pod for a caller
    /// from anywhere.
    Relayed,
    /// From a node address, with a socket of a user other than root.
    NotRoot,
    /// From a node address, with no socket of its own in the node's tables that can be
    /// read: whose it is cannot be told.
    Unidentified,
    /// No peer address, or no local address for a loopback peer (not from the server).
    Unknown,
}

impl Refusal {
    /// The answer's text: what the rule is, nothing about the host (not whose the socket
    /// is, not why the tables could not be read).
    fn text(&self) -> String {
        match self {
            Self::Elsewhere(peer) => format!(
                "{peer} may not ask here: this listener inside a pod answers the pod itself (localhost) and root on its node only (SECURITY.md)"
            ),
            Self::Relayed => "this connection came from loopback to an address of the pod beyond loopback: a proxy in the pod that intercepts inbound traffic (a service mesh's sidecar) relayed it, so it is not the pod's own call. This listener inside a pod answers the pod itself (localhost) and root on its node only: exclude this port from the proxy's inbound interception (Istio: the pod annotation traffic.sidecar.istio.io/excludeInboundPorts; Linkerd: config.linkerd.io/skip-inbound-ports) (SECURITY.md)".into(),
            Self::NotRoot => "this listener inside a pod answers a caller from its node only as root (the kubelet): this connection's socket on the node is another user's. A local user asks the node listener about its own ports (SECURITY.md)".into(),
            Self::Unidentified => "this listener inside a pod answers a caller from its node only as root (the kubelet), and this connection's own socket could not be found in the node's network namespace to tell whose it is (SECURITY.md)".into(),
            Self::Unknown => "unknown caller".into(),
        }
    }
}

impl NodeCallers {
    /// Whether the caller at `peer`, connected to `server` (this listener's end), is the pod
    /// itself or root of the node.
    async fn admit(
        &self,
        peer: Option<SocketAddr>,
        server: Option<SocketAddr>,
    ) -> Result<(), Refusal> {
        let Some(peer) = peer else {
            return Err(Refusal::Unknown);
        };
        let ip = canonical_addr(peer.ip());
        if ip.is_loopback() {
            // Loopback at both ends never left the pod's namespace: this is the pod. From
            // loopback to the pod's address (its local end, as the caller addressed it, also
            // when steered) is a proxy of the pod's relaying a caller from anywhere.
            let Some(server) = server else {
                return Err(Refusal::Unknown);
            };
            return if canonical_addr(server.ip()).is_loopback() {
                Ok(())
            } else {
                Err(Refusal::Relayed)
            };
        }
        if !self.addresses.contains(ip) {
            return Err(Refusal::Elsewhere(ip));
        }
        let Some(server) = server else {
            return Err(Refusal::Unidentified);
        };
        match client_owner(&self.sockets, peer, server).await {
            Ok(Some(0)) => Ok(()),
            Ok(Some(_)) => Err(Refusal::NotRoot),
            Ok(None) => Err(Refusal::Unidentified),
            Err(problem) => {
                log::debug!("cannot tell who calls a pod listener from {peer}: {problem:#}");
                Err(Refusal::Unidentified)
            }
        }
    }
}

/// Middleware of listeners bound beyond loopback: the pod itself (loopback at both ends)
/// and root of the node (a node address, and a socket of root's in the node's tables)
/// only; anyone else gets `403` and nothing is read or changed.
pub(super) async fn pod_or_node_root_only(
    State(callers): State<NodeCallers>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer);
    let server = request
        .extensions()
        .get::<LocalAddr>()
        .map(|LocalAddr(local)| *local);
    match callers.admit(peer, server).await {
        Ok(()) => next.run(request).await,
        Err(refusal) => error(StatusCode::FORBIDDEN, refusal.text()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use anyhow::Result;

    use super::*;

    /// The node's tables: the answer for the one connection they hold, nothing for others.
    struct Sockets {
        client: SocketAddr,
        server: SocketAddr,
        answer: Mutex<Option<Result<Option<u32>>>>,
    }

    impl ClientSockets for Sockets {
        fn owner_of(&self, client: SocketAddr, server: SocketAddr) -> Result<Option<u32>> {
            if (client, server) != (self.client, self.server) {
                return Ok(None);
            }
            self.answer.lock().expect("lock").take().unwrap_or(Ok(None))
        }
    }

    fn at(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    /// A pod listener's callers where the node is 10.1.0.1 and fd00::1, the pod 10.1.0.2
    /// and fd00::2, and the tables hold the connection `client` → `server` with `answer`.
    fn callers(client: &str, server: &str, answer: Result<Option<u32>>) -> NodeCallers {
        let addresses = NodeAddresses::default();
        addresses.set(BTreeSet::from([
            "10.1.0.1".parse().expect("ip"),
            "fd00::1".parse().expect("ip"),
        ]));
        NodeCallers {
            addresses,
            sockets: Arc::new(Sockets {
                client: at(client),
                server: at(server),
                answer: Mutex::new(Some(answer)),
            }),
        }
    }

    /// (the caller's ends, the ends the tables hold, their answer, the admission).
    type Case = (
        (&'static str, &'static str),
        (&'static str, &'static str),
        Result<Option<u32>>,
        Result<(), Refusal>,
    );

    #[tokio::test]
    async fn node_callers_are_told_by_their_socket_on_the_node() {
        let v4 = ("10.1.0.1:40000", "10.1.0.2:9100");
        // A dual-stack listener sees IPv4 callers IPv4-mapped; the tables are asked in IPv4.
        let mapped = ("[::ffff:10.1.0.1]:40000", "[::ffff:10.1.0.2]:9100");
        let v6 = ("[fd00::1]:40000", "[fd00::2]:9100");
        let cases: [Case; 8] = [
            (v4, v4, Ok(Some(0)), Ok(())),
            (mapped, v4, Ok(Some(0)), Ok(())),
            (v6, v6, Ok(Some(0)), Ok(())),
            (v4, v4, Ok(Some(65_534)), Err(Refusal::NotRoot)),
            (v6, v6, Ok(Some(1000)), Err(Refusal::NotRoot)),
            // Not in the tables: translated on its way from elsewhere.
            (v4, v4, Ok(None), Err(Refusal::Unidentified)),
            (
                v4,
                v4,
                Err(anyhow::anyhow!("no inet_diag")),
                Err(Refusal::Unidentified),
            ),
            // The tables hold root's socket at other ends: not this caller's.
            (
                ("10.1.0.1:40001", "10.1.0.2:9100"),
                v4,
                Ok(Some(0)),
                Err(Refusal::Unidentified),
            ),
        ];
        for ((peer, server), (client, held), answer, expected) in cases {
            let admitted = callers(client, held, answer)
                .admit(Some(at(peer)), Some(at(server)))
                .await;
            assert_eq!(admitted, expected, "{peer} -> {server}");
        }
    }

    #[tokio::test]
    async fn the_pod_itself_and_strangers_need_no_lookup() {
        let anything = ("10.1.0.1:40000", "10.1.0.2:9100");
        // Tables that would make anyone root: never asked for these callers.
        let node = || callers(anything.0, anything.1, Ok(Some(0)));
        for (pod, server) in [
            ("127.0.0.1:40000", "127.0.0.1:9100"),
            // Loopback at both ends, whoever it is: a relay to localhost is not told from
            // the pod (SECURITY.md, "A proxy in the pod").
            ("127.0.0.6:40000", "127.0.0.1:9100"),
            ("[::1]:40000", "[::1]:9100"),
            ("[::ffff:127.0.0.1]:40000", "[::ffff:127.0.0.1]:9100"),
            ("[::ffff:127.0.0.1]:40000", "127.0.0.1:9100"),
        ] {
            assert_eq!(
                node().admit(Some(at(pod)), Some(at(server))).await,
                Ok(()),
                "{pod} -> {server}"
            );
        }
        let stranger: SocketAddr = at("10.1.0.6:40000");
        assert_eq!(
            node().admit(Some(stranger), Some(at(anything.1))).await,
            Err(Refusal::Elsewhere(stranger.ip()))
        );
        assert_eq!(node().admit(None, None).await, Err(Refusal::Unknown));
        // A node address without this listener's end cannot be looked up.
        assert_eq!(
            node().admit(Some(at(anything.0)), None).await,
            Err(Refusal::Unidentified)
        );
    }

    /// Audit: a proxy in the pod (a service mesh's sidecar in REDIRECT mode) relays a
    /// caller from anywhere from loopback (Istio: 127.0.0.6) to the pod's address, and every
    /// loopback caller was the pod. Loopback is the pod at both ends only.
    #[tokio::test]
    async fn loopback_relayed_to_the_pods_address_is_not_the_pod() {
        let anything = ("10.1.0.1:40000", "10.1.0.2:9100");
        // Tables that would make anyone root: never asked for these callers.
        let node = || callers(anything.0, anything.1, Ok(Some(0)));
        for (peer, server) in [
            ("127.0.0.6:40000", "10.1.0.2:9100"),
            ("127.0.0.1:40000", "10.1.0.2:9100"),
            ("[::1]:40000", "[fd00::2]:9100"),
            ("[::ffff:127.0.0.6]:40000", "[::ffff:10.1.0.2]:9100"),
            ("[::ffff:127.0.0.6]:40000", "10.1.0.2:9100"),
            ("[::1]:40000", "[::ffff:10.1.0.2]:9100"),
        ] {
            assert_eq!(
                node().admit(Some(at(peer)), Some(at(server))).await,
                Err(Refusal::Relayed),
                "{peer} -> {server}"
            );
        }
        // A loopback caller whose connection's local end is not known cannot be told.
        assert_eq!(
            node().admit(Some(at("127.0.0.1:40000")), None).await,
            Err(Refusal::Unknown)
        );
    }

    #[test]
    fn refusals_say_the_rule_and_nothing_of_the_host() {
        for refusal in [Refusal::NotRoot, Refusal::Unidentified] {
            let text = refusal.text();
            assert!(text.contains("only as root"), "{text}");
            assert!(!text.chars().any(|c| c.is_ascii_digit()), "{text}");
        }
        let text = Refusal::Relayed.text();
        for says in ["proxy", "excludeInboundPorts", "skip-inbound-ports"] {
            assert!(text.contains(says), "{text}");
        }
        assert!(!text.chars().any(|c| c.is_ascii_digit()), "{text}");
    }
}
