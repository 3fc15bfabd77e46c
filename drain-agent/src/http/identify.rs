//! Who is calling on the node listener: the middleware that gives each request its
//! [`Caller`] (the rules are in `authority.rs`; SECURITY.md says why each).
//!
//! 1. `Authorization: Bearer T` (the scheme in any case) with a token from
//!    `--auth-token-file`: [`Caller::Node`]. A wrong token is `401`, whatever else the
//!    caller is. Another scheme (a scraper's `Basic`) is no token: the caller is told as
//!    below.
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
    http::server::LocalAddr,
};

/// The client ends of connections to the agent, from the node's tables.
pub trait ClientSockets: Send + Sync + 'static {
    /// The owner (uid) of this namespace's socket whose local end is `client` and remote end
    /// `server`, if there is one that can be waiting for an answer.
    fn owner_of(&self, client: SocketAddr, server: SocketAddr) -> Result<Option<u32>>;
}

/// The real one: one sock_diag lookup of the client's own socket, by its two ends, on the
/// calling thread (in the node's namespace). A lookup, not a dump: a dump walks every
/// established socket of the host whatever its filter, which made each request cost 3 ms
/// with none and 45 ms with 100k connections (the bench's `/drained`).
pub struct SocketTables;

impl ClientSockets for SocketTables {
    fn owner_of(&self, client: SocketAddr, server: SocketAddr) -> Result<Option<u32>> {
        owner_in(&crate::sys::sockdiag::find_one, client, server)
    }
}

/// One lookup of this namespace's socket by its local and remote ends
/// (`sockdiag::find_one`; a fake in the tests).
type Lookup<'a> =
    &'a dyn Fn(SocketAddr, SocketAddr) -> Result<Option<crate::sys::sockdiag::TcpSocket>>;

/// [`SocketTables::owner_of`] with the lookup given. Only a full socket a process holds
/// names an owner (`TcpSocket::owner`): not a time-wait one, which the kernel reports as
/// root's. The kernel answers "no such socket" too when it cannot look (a host without the
/// `inet_diag`/`tcp_diag` modules, a supported degraded mode): when the client's end is
/// missing, the agent's own end of the connection, there while the request is served,
/// tells which. Missing too, the tables cannot be read: an error (a loopback caller may
/// then observe, [`Identify::caller`]), not a caller from elsewhere.
fn owner_in(lookup: Lookup<'_>, client: SocketAddr, server: SocketAddr) -> Result<Option<u32>> {
    if let Some(socket) = lookup(client, server)? {
        return Ok(socket.owner());
    }
    if lookup(server, client)?.is_none() {
        bail!(
            "the socket tables cannot be read here: neither end of the connection {client} -> {server} is in them (are the inet_diag and tcp_diag modules loaded?)"
        );
    }
    Ok(None)
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
}

impl Identify {
    /// Who is calling from `peer` on the connection to `server`, with `bearer` if given.
    pub async fn caller(
        &self,
        peer: SocketAddr,
        server: Option<SocketAddr>,
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
            match client_owner(&self.sockets, peer, server).await {
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

/// The owner of the caller's own socket in the node's tables: the client end `peer` of the
/// connection to `server`, both as this agent's socket sees them (IPv4-mapped addresses
/// taken as IPv4: the tables are asked in both families). `None`: no such socket that can
/// be waiting for an answer (the connection was translated on its way, or comes from
/// another namespace or host). The node listener ([`Identify::caller`]) and the pod
/// listeners (`http/pods/callers.rs`) both ask here.
///
/// The lookup is a netlink request: it runs on a blocking thread, not on the runtime's
/// workers, and is bounded by the netlink socket's receive timeout (`sys/netlink`). Every
/// thread of the agent but the short-lived ones that enter a pod's namespace
/// (`netns::run_in`, threads of their own) is in the node's namespace, so the tables asked
/// are the node's.
pub async fn client_owner(
    sockets: &Arc<dyn ClientSockets>,
    peer: SocketAddr,
    server: SocketAddr,
) -> Result<Option<u32>> {
    let sockets = Arc::clone(sockets);
    let client = SocketAddr::new(canonical_addr(peer.ip()), peer.port());
    let server = SocketAddr::new(canonical_addr(server.ip()), server.port());
    tokio::task::spawn_blocking(move || sockets.owner_of(client, server))
        .await
        .map_err(|problem| anyhow::anyhow!("the socket lookup failed: {problem}"))
        .and_then(|found| found)
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
    let bearer = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| bearer_token(value.as_bytes()))
        .map(<[u8]>::to_vec);
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
    match identify.caller(peer, server, bearer.as_deref()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(problem) => problem.into_response(),
    }
}

/// The token of an `Authorization` header whose scheme is `Bearer`, in any case (RFC 7235:
/// schemes are case-insensitive), after one or more spaces; empty when none follows (a
/// bearer token that is not one the agent accepts). `None` for another scheme: a scraper's
/// `Basic` credentials, or a proxy's, are not meant for this agent, and their caller is
/// told as if it had sent no `Authorization` (sending none is always open to it, so nothing
/// is gained by it). Before, any header not exactly `Bearer …` was an empty token: `401` on
/// every endpoint, `/metrics` and `/healthz` too.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"Bearer";
    let (scheme, rest) = value.split_at_checked(SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    match rest.first() {
        None => Some(rest),
        Some(b' ') => Some(rest.trim_ascii_start()),
        // Another scheme that starts with these letters (`Bearerish …`).
        Some(_) => None,
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

    /// Found by a review: on a host without the `inet_diag`/`tcp_diag` modules the kernel
    /// answers every lookup "no such socket", so root's `drain-agent wait` on loopback was
    /// taken for a remote caller (`403`, the stop hook gave up at once). Neither end found
    /// is tables that cannot be read (a loopback caller then observes); the agent's own end
    /// found is a caller from elsewhere (the next test, on a real socket).
    #[test]
    fn unreadable_tables_are_no_caller_from_elsewhere() {
        let client: SocketAddr = "127.0.0.1:40000".parse().expect("client");
        let server: SocketAddr = "127.0.0.1:9100".parse().expect("server");
        let nothing = |_: SocketAddr, _: SocketAddr| Ok(None);
        let problem = owner_in(&nothing, client, server).expect_err("unreadable");
        assert!(format!("{problem:#}").contains("inet_diag"), "{problem:#}");
    }

    /// The other half of the above: the agent's own end found (a real socket, read from
    /// this host's tables) and the client's not is a caller from elsewhere. Where the
    /// tables cannot be read it is skipped (it was left out without a word), or fails in CI.
    #[test]
    fn the_agents_end_alone_found_is_a_caller_from_elsewhere() {
        let test = "the_agents_end_alone_found_is_a_caller_from_elsewhere";
        let client: SocketAddr = "127.0.0.1:40000".parse().expect("client");
        let server: SocketAddr = "127.0.0.1:9100".parse().expect("server");
        // A real socket for the agent's end: this test's own connection.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (_accepted, _) = listener.accept().expect("accept");
        let Some(ours) = crate::test_skip::socket_of_or_skip(test, &stream) else {
            return;
        };
        let agents_end_only =
            |local: SocketAddr, _: SocketAddr| Ok((local == server).then(|| ours.clone()));
        assert_eq!(
            owner_in(&agents_end_only, client, server).expect("lookup"),
            None
        );
    }

    /// The tables answer `uid` as the owner of every client end asked about, or fail.
    struct Sockets(Mutex<Option<Result<Option<u32>>>>, SocketAddr, SocketAddr);

    impl ClientSockets for Sockets {
        fn owner_of(&self, client: SocketAddr, server: SocketAddr) -> Result<Option<u32>> {
            match self.0.lock().expect("lock").take() {
                Some(Ok(Some(uid))) if (client, server) == (self.1, self.2) => Ok(Some(uid)),
                Some(Ok(_)) | None => Ok(None),
                Some(Err(problem)) => Err(problem),
            }
        }
    }

    struct Pods;

    impl AddressSource for Pods {
        fn read(&self) -> Result<BTreeMap<u32, crate::sys::pod_addresses::Namespace>> {
            Ok(BTreeMap::from([(
                7,
                vec!["10.1.0.7".parse::<IpAddr>().expect("ip")].into(),
            )]))
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
                .caller(at(peer), server, None)
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
            who.caller(remote, None, Some(b"0123456789abcdef0123"))
                .await
                .ok(),
            Some(Caller::Node)
        );
        for wrong in [&b"0123456789abcdef0124"[..], b"0123456789abcdef012", b""] {
            assert!(matches!(
                who.caller(remote, None, Some(wrong)).await,
                Err(ApiError::Unauthorized(_))
            ));
        }
        // Without a token file, any token is wrong.
        assert!(matches!(
            identify(Ok(None), None)
                .caller(remote, None, Some(b"0123456789abcdef0123"))
                .await,
            Err(ApiError::Unauthorized(_))
        ));
    }

    /// The scheme in any case, then the token; another scheme is no bearer token at all
    /// (the caller is told as without the header); `Bearer` with nothing after it is an
    /// empty one (`401`). Before, all but `Bearer …` exactly were empty tokens.
    #[test]
    fn only_the_bearer_scheme_in_any_case_carries_a_token() {
        for (value, token) in [
            (&b"Bearer tok"[..], Some(&b"tok"[..])),
            (b"bearer tok", Some(b"tok")),
            (b"BEARER tok", Some(b"tok")),
            (b"Bearer   tok", Some(b"tok")),
            (b"Bearer", Some(b"")),
            (b"Bearer ", Some(b"")),
            (b"Basic cHJvbWV0aGV1czpzZWNyZXQ=", None),
            (b"Bearerish tok", None),
            (b"Digest username=\"x\"", None),
            (b"", None),
        ] {
            assert_eq!(bearer_token(value), token, "{}", value.escape_ascii());
        }
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

    /// The real tables: a client's own open socket names its owner. A client that closed at
    /// once leaves a time-wait socket at the same ends, which the kernel reports in its
    /// substate (`FIN_WAIT2`) with uid 0: it names no owner (taken as the caller's, it made
    /// anyone root).
    #[test]
    #[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn the_tables_name_an_open_clients_owner_and_no_time_wait_ones() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(server).expect("connect");
        let (_accepted, _) = listener.accept().expect("accept");
        let ends = client.local_addr().expect("addr");
        // SAFETY: geteuid cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        assert_eq!(
            SocketTables.owner_of(ends, server).expect("lookup"),
            Some(me)
        );
        // Closed by the client only: an orphan in FIN_WAIT2 becomes a time-wait socket.
        drop(client);
        let started = std::time::Instant::now();
        let time_wait = loop {
            let found = crate::sys::sockdiag::find_one(ends, server).expect("lookup");
            if let Some(found) = found.filter(|found| {
                found.inode == 0 && found.state == crate::sys::sockdiag::state::FIN_WAIT2
            }) {
                break found;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "no time-wait socket at {ends}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(time_wait.uid, 0, "what the kernel reports for it");
        assert_eq!(SocketTables.owner_of(ends, server).expect("lookup"), None);
    }
}
