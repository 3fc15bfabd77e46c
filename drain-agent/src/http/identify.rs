//! Who is calling on the node listener: the middleware that gives each request its
//! [`Caller`] (the rules are in `authority.rs`; SECURITY.md says why each).
//!
//! 1. `Authorization: Bearer T` with a token from `--auth-token-file`: [`Caller::Node`]. A
//!    wrong token is `401`, whatever else the caller is.
//! 2. The caller's own socket in this network namespace's tables (the client end of this
//!    very connection: local address = the request's peer, remote = the listener's
//!    address): a process on the node. Root's is [`Caller::Node`], another user's
//!    [`Caller::LocalUser`]. The kernel says whose the socket is (`sock_i_uid()`); a
//!    caller cannot choose that, unlike anything it sends.
//! 3. A source address that belongs to exactly one pod namespace on this node
//!    (`pod_addresses.rs`): [`Caller::Pod`]. A pod calling the node's address from its
//!    own namespace arrives with its own address (its client socket is not in the node's
//!    tables).
//! 4. Anyone else: [`Caller::Remote`].

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use axum::{
    extract::{ConnectInfo, Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::{IntoResponse as _, Response},
};

use crate::{
    addr::canonical_addr,
    http::api::ApiError,
    http::authority::{Authority, Caller},
    http::server::{AcceptedAt, LocalAddr},
    tracker::shared_lists::Batched,
};

/// The client ends of connections to the agent, from the node's tables.
pub trait ClientSockets: Send + Sync + 'static {
    /// Every socket in this namespace's tables whose remote port is `server_port`: its
    /// local end, its remote end and its owner's uid.
    fn clients_of(&self, server_port: u16) -> Result<Vec<ClientEnd>>;
}

/// One client socket: (local end, remote end, owner uid).
pub type ClientEnd = (SocketAddr, SocketAddr, u32);

/// The real one: a sock_diag dump of every socket whose remote port is the server's, on
/// the calling thread (in the node's namespace). One dump answers every request that
/// arrived before it began (`Batched`): a sock_diag dump walks the whole established hash
/// table, whatever its filter, so a dump per request made a thousand hooks arriving
/// together wait seconds.
pub struct SocketTables;

impl ClientSockets for SocketTables {
    fn clients_of(&self, server_port: u16) -> Result<Vec<ClientEnd>> {
        use crate::sys::sockdiag::{query_remote_port, state};
        let states = state::bit(state::ESTABLISHED)
            | state::bit(state::CLOSE_WAIT)
            | state::bit(state::FIN_WAIT1)
            | state::bit(state::FIN_WAIT2);
        Ok(query_remote_port(server_port, states)?
            .into_iter()
            .map(|socket| (socket.local, socket.remote, socket.uid))
            .collect())
    }
}

/// Bearer tokens from `--auth-token-file`: one per line; blank lines and `#` comments are
/// skipped; each at least [`MIN_TOKEN_LEN`] bytes.
#[derive(Default)]
pub struct Tokens(Vec<Vec<u8>>);

/// Shorter tokens are refused at start: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

impl Tokens {
    pub fn read(path: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --auth-token-file {}", path.display()))?;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.mode() & 0o077 != 0
        {
            log::warn!(
                "--auth-token-file {} can be read by other users (mode {:o}); make it 0600",
                path.display(),
                meta.mode() & 0o777
            );
        }
        let mut tokens = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.len() < MIN_TOKEN_LEN {
                bail!(
                    "--auth-token-file {}: the token on line {} is shorter than {MIN_TOKEN_LEN} characters",
                    path.display(),
                    number + 1
                );
            }
            tokens.push(line.as_bytes().to_vec());
        }
        if tokens.is_empty() {
            bail!("--auth-token-file {} holds no token", path.display());
        }
        Ok(Self(tokens))
    }

    /// Whether `given` is one of the tokens; the comparison takes the same time wherever
    /// the first difference is.
    pub fn accepts(&self, given: &[u8]) -> bool {
        self.0
            .iter()
            .fold(false, |found, token| found | same_bytes(token, given))
    }
}

fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let mut difference = u8::from(a.len() != b.len());
    for (index, byte) in a.iter().enumerate() {
        difference |= byte ^ b.get(index).copied().unwrap_or(!byte);
    }
    difference == 0
}

/// The middleware's state.
#[derive(Clone)]
pub struct Identify {
    pub authority: Arc<Authority>,
    pub sockets: Arc<dyn ClientSockets>,
    pub tokens: Option<Arc<Tokens>>,
    /// One dump of the client ends for the requests of the same moment.
    pub batches: Arc<Batched<u16, Vec<ClientEnd>>>,
}

impl Identify {
    /// Who is calling from `peer` on the connection to `server` (accepted at `accepted`),
    /// with `bearer` if given.
    pub async fn caller(
        &self,
        peer: SocketAddr,
        server: Option<SocketAddr>,
        accepted: tokio::time::Instant,
        bearer: Option<&[u8]>,
    ) -> Result<Caller, ApiError> {
        if let Some(given) = bearer {
            return match &self.tokens {
                Some(tokens) if tokens.accepts(given) => Ok(Caller::Node),
                _ => Err(ApiError::Unauthorized(
                    "the bearer token is not one this agent accepts".into(),
                )),
            };
        }
        if let Some(server) = server {
            let sockets = Arc::clone(&self.sockets);
            let clients = self
                .batches
                .get(&server.port(), accepted, || async move {
                    tokio::task::spawn_blocking(move || sockets.clients_of(server.port()))
                        .await
                        .map_err(|problem| format!("{problem}"))?
                        .map_err(|problem| format!("{problem:#}"))
                })
                .await;
            let client = SocketAddr::new(canonical_addr(peer.ip()), peer.port());
            let server = SocketAddr::new(canonical_addr(server.ip()), server.port());
            let found = clients.map_err(anyhow::Error::msg).map(|clients| {
                clients
                    .iter()
                    .find(|(local, remote, _)| *local == client && *remote == server)
                    .map(|(_, _, uid)| *uid)
            });
            match found {
                Ok(Some(0)) => return Ok(Caller::Node),
                Ok(Some(uid)) => return Ok(Caller::LocalUser { uid: Some(uid) }),
                Ok(None) => {}
                // The tables cannot be read: a loopback caller is on this node, but whose
                // it is cannot be told; it may observe, and control nothing.
                Err(problem) if is_loopback(peer.ip()) => {
                    log::debug!("cannot tell who calls from {peer}: {problem:#}");
                    return Ok(Caller::LocalUser { uid: None });
                }
                Err(problem) => log::debug!("cannot tell who calls from {peer}: {problem:#}"),
            }
        }
        Ok(match self.authority.pods.owner(peer.ip()).await {
            Some(netns) => Caller::Pod { netns },
            None => Caller::Remote,
        })
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    canonical_addr(ip).is_loopback()
}

/// The middleware of the node listener: puts the request's [`Caller`] into its extensions.
pub async fn identify(
    State(identify): State<Identify>,
    mut request: Request,
    next: Next,
) -> Response {
    let bearer = request.headers().get(AUTHORIZATION).map(|value| {
        value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .unwrap_or_default()
            .to_vec()
    });
    let Some(ConnectInfo(peer)) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied()
    else {
        // Not from the server (no peer): nobody known.
        request.extensions_mut().insert(Caller::Remote);
        return next.run(request).await;
    };
    let server = request
        .extensions()
        .get::<LocalAddr>()
        .map(|LocalAddr(local)| *local);
    // A connection not from the server (tests) was accepted, at the latest, now.
    let accepted = request
        .extensions()
        .get::<AcceptedAt>()
        .map_or_else(tokio::time::Instant::now, |AcceptedAt(at)| *at);
    match identify
        .caller(peer, server, accepted, bearer.as_deref())
        .await
    {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(problem) => problem.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Mutex};

    use super::*;
    use crate::{
        http::authority::PortOwners,
        sys::pod_addresses::{AddressSource, PodAddresses},
    };

    /// The tables answer `uid` as the owner of every client end asked about, or fail.
    struct Sockets(Mutex<Option<Result<Option<u32>>>>, SocketAddr, SocketAddr);

    impl ClientSockets for Sockets {
        fn clients_of(&self, _: u16) -> Result<Vec<ClientEnd>> {
            match self.0.lock().expect("lock").take() {
                Some(Ok(Some(uid))) => Ok(vec![(self.1, self.2, uid)]),
                Some(Ok(None)) | None => Ok(Vec::new()),
                Some(Err(problem)) => Err(problem),
            }
        }
    }

    struct Pods;

    impl AddressSource for Pods {
        fn read(&self) -> BTreeMap<u32, Vec<IpAddr>> {
            BTreeMap::from([(7, vec!["10.1.0.7".parse().expect("ip")])])
        }
    }

    struct NoOwners;

    impl PortOwners for NoOwners {
        fn owners(&self, _: u16) -> Result<Vec<u32>> {
            Ok(Vec::new())
        }
    }

    fn identify(answer: Result<Option<u32>>, tokens: Option<Tokens>) -> Identify {
        identify_for(answer, tokens, at("127.0.0.1:40000"), at("10.0.0.1:19700"))
    }

    fn identify_for(
        answer: Result<Option<u32>>,
        tokens: Option<Tokens>,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Identify {
        Identify {
            authority: Arc::new(Authority {
                pods: Arc::new(PodAddresses::new(1, Arc::new(Pods))),
                owners: Arc::new(NoOwners),
            }),
            sockets: Arc::new(Sockets(Mutex::new(Some(answer)), client, server)),
            tokens: tokens.map(Arc::new),
            batches: Arc::default(),
        }
    }

    fn at(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    #[tokio::test]
    async fn callers_are_told_by_their_socket_then_their_address() {
        let server = Some(at("10.0.0.1:19700"));
        let cases = [
            (Ok(Some(0)), "127.0.0.1:40000", Caller::Node),
            (
                Ok(Some(1000)),
                "127.0.0.1:40000",
                Caller::LocalUser { uid: Some(1000) },
            ),
            (
                Err(anyhow::anyhow!("no inet_diag")),
                "127.0.0.1:40000",
                Caller::LocalUser { uid: None },
            ),
            (Ok(None), "10.1.0.7:40000", Caller::Pod { netns: 7 }),
            (Ok(None), "203.0.113.5:40000", Caller::Remote),
            // Unreadable tables do not make a remote address local.
            (
                Err(anyhow::anyhow!("no inet_diag")),
                "203.0.113.5:40000",
                Caller::Remote,
            ),
        ];
        for (answer, peer, expected) in cases {
            let caller = identify(answer, None)
                .caller(at(peer), server, tokio::time::Instant::now(), None)
                .await
                .expect("caller");
            assert_eq!(caller, expected, "{peer}");
        }
    }

    #[tokio::test]
    async fn a_configured_token_is_the_node_and_a_wrong_one_is_401() {
        let tokens = Tokens(vec![b"0123456789abcdef0123".to_vec()]);
        let who = identify(Ok(None), Some(tokens));
        let remote = at("203.0.113.5:40000");
        assert_eq!(
            who.caller(
                remote,
                None,
                tokio::time::Instant::now(),
                Some(b"0123456789abcdef0123")
            )
            .await
            .ok(),
            Some(Caller::Node)
        );
        for wrong in [&b"0123456789abcdef0124"[..], b"0123456789abcdef012", b""] {
            assert!(matches!(
                who.caller(remote, None, tokio::time::Instant::now(), Some(wrong))
                    .await,
                Err(ApiError::Unauthorized(_))
            ));
        }
        // Without a token file, any token is wrong.
        assert!(matches!(
            identify(Ok(None), None)
                .caller(
                    remote,
                    None,
                    tokio::time::Instant::now(),
                    Some(b"0123456789abcdef0123")
                )
                .await,
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn token_files_refuse_short_or_missing_tokens() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# ops\n\nshort\n").expect("write");
        assert!(Tokens::read(&path).is_err());
        std::fs::write(&path, "# only comments\n").expect("write");
        assert!(Tokens::read(&path).is_err());
        std::fs::write(&path, "0123456789abcdef-ops\n  fedcba9876543210-ci  \n").expect("write");
        let tokens = Tokens::read(&path).expect("tokens");
        assert!(tokens.accepts(b"fedcba9876543210-ci"));
        assert!(!tokens.accepts(b"fedcba9876543210-c"));
    }
}
