//! Whose server `get` is about to talk to. The agent's node listener is an unprivileged
//! port (`127.0.0.1:9100` by default): while the agent is down (its restart, a crash) any
//! local user may bind it and answer root's stop hook "drained". So before a request, and
//! the bearer token it may carry, goes out, the server's end of the connection is looked up
//! in this process's network namespace (one sock_diag lookup by both ends: the agent's own
//! lookup of its callers, `sys::sockdiag::find_one`, and its rule of which sockets name an
//! owner, `TcpSocket::owner`), and the request goes only to a socket of root, of this
//! process's effective user, or of `--agent-uid`.
//!
//! A server end the tables do not hold is in another namespace (a pod calling the node
//! listener at `$HOST_IP`) or behind address translation, and is taken as before, unless
//! the server's address is this namespace's own (loopback, or an interface's): then the
//! server is here, and its end is only not there *yet* (a handshake its side has not
//! finished: with SYN cookies, as a listener with a backlog of 0 gets, its socket is made
//! when the client's last ACK arrives, which may be after `connect` returned). Such a
//! connection is looked up again, as is one its listener has not accepted yet (no process
//! holds it, so no uid is its holder's), until the deadline (`get`'s, or a shorter one when
//! the host has another address to try). When the client's own end is
//! missing too, the tables cannot be read here (no `inet_diag`/`tcp_diag` modules: the
//! kernel then answers every lookup "no such socket"): the server is asked unverified,
//! with a warning, unless the request carries a bearer token, which is then not sent
//! (SECURITY.md, "Whom the clients trust"). A lookup that fails stops only a server at this
//! namespace's own address.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    addr::canonical_addr,
    sys::{ifaddrs, sockdiag},
};

/// Whose server sockets `get` sends its request to, when they are in this process's own
/// network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerOwners {
    /// An agent's: root's, this process's effective user's, or `agent_uid`'s (`--agent-uid`,
    /// an agent run as another user).
    Agent { agent_uid: Option<u32> },
    /// Anyone's: for servers that are not agents (the tests' nginx, whose workers run as
    /// `nobody`).
    Anyone,
}

/// The longest pause between two lookups of a connection the server has not taken yet
/// (the first pause is 1 ms: an agent accepts at once).
const MAX_PAUSE: Duration = Duration::from_millis(20);

/// Checks, by `deadline`, whose socket the server end of `stream` is. An error says why
/// the server is not taken for the agent (naming its address, and the uid of a socket of
/// someone else); nothing has been sent to it. `token`: whether the request carries a
/// bearer token (never sent to a server that cannot be verified).
pub(super) fn check(
    stream: &TcpStream,
    owners: ServerOwners,
    token: bool,
    deadline: Instant,
) -> Result<()> {
    let ServerOwners::Agent { agent_uid } = owners else {
        return Ok(());
    };
    let canonical = |end: SocketAddr| SocketAddr::new(canonical_addr(end.ip()), end.port());
    let ends = Ends {
        server: canonical(stream.peer_addr().context("the server's address")?),
        client: canonical(stream.local_addr().context("this end's address")?),
    };
    check_ends(
        ends,
        agent_uid,
        token,
        deadline,
        &sockdiag::find_one,
        is_this_namespaces,
    )
}

/// The two ends of the connection to the server, as this namespace's tables name them.
#[derive(Clone, Copy, Debug)]
struct Ends {
    server: SocketAddr,
    client: SocketAddr,
}

/// One lookup of this namespace's socket by its local and remote ends
/// ([`sockdiag::find_one`]; a fake in the tests).
type Lookup<'a> = &'a dyn Fn(SocketAddr, SocketAddr) -> Result<Option<sockdiag::TcpSocket>>;

/// Said once per process when the tables cannot be read (the client asks again and again).
static UNVERIFIED_SAID: std::sync::Once = std::sync::Once::new();

/// [`check`] of `ends`, with the table lookup and the "is this address ours" question given.
fn check_ends(
    Ends { server, client }: Ends,
    agent_uid: Option<u32>,
    token: bool,
    deadline: Instant,
    lookup: Lookup<'_>,
    ours: fn(IpAddr) -> Result<bool>,
) -> Result<()> {
    let me = rustix::process::geteuid().as_raw();
    // Whether the server's address is this namespace's, read once when first needed.
    let mut server_here: Option<bool> = None;
    let mut here = || -> Result<bool> {
        Ok(match server_here {
            Some(here) => here,
            None => *server_here.insert(ours(server.ip())?),
        })
    };
    let mut pause = Duration::from_millis(1);
    loop {
        let found = match lookup(server, client) {
            Ok(found) => found,
            // Another namespace's server is asked as before, whatever the lookup says.
            Err(_) if !here()? => return Ok(()),
            Err(problem) => {
                return Err(problem).with_context(|| {
                    format!(
                        "cannot tell whose socket the server at {server} is (sock_diag); nothing was sent to it"
                    )
                });
            }
        };
        let pending = match found {
            Some(socket) => match socket.owner() {
                Some(uid) if uid == 0 || uid == me || Some(uid) == agent_uid => return Ok(()),
                Some(uid) => bail!(
                    "the server at {server} is not the agent: its socket is uid {uid}'s, not {}; nothing was sent to it",
                    trusted(me, agent_uid)
                ),
                // Still its listener's (a request socket, or one in the accept queue): no
                // process holds it yet.
                None if matches!(
                    socket.state,
                    sockdiag::state::ESTABLISHED | sockdiag::state::SYN_RECV
                ) =>
                {
                    "its listener has not accepted the connection"
                }
                None => bail!(
                    "the server at {server} closed the connection before its owner could be told"
                ),
            },
            // Another namespace's server (or one behind address translation).
            None if !here()? => return Ok(()),
            None => {
                // This end is always in the tables while the connection is open: when it
                // is missing too, the tables cannot be read here (the kernel answers a
                // lookup as "no such socket" when the `inet_diag`/`tcp_diag` modules are
                // not loaded), and waiting will not change that.
                let own = lookup(client, server).with_context(|| {
                    format!(
                        "cannot tell whose socket the server at {server} is (sock_diag); nothing was sent to it"
                    )
                })?;
                if own.is_none() {
                    return unverifiable(server, token);
                }
                "its socket is not in this namespace's tables, though its address is this namespace's"
            }
        };
        if Instant::now() + pause >= deadline {
            bail!("cannot tell whose socket the server at {server} is in time: {pending}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// A server at this namespace's own address when this namespace's socket tables cannot be
/// read (SECURITY.md, "Whom the clients trust"): asked unverified, as before the check
/// existed and as the agent itself runs on such a host, with a warning; but a bearer token
/// is not sent to it.
fn unverifiable(server: SocketAddr, token: bool) -> Result<()> {
    const WHY: &str = "this network namespace's socket tables cannot be read (the kernel's inet_diag and tcp_diag modules are not loaded)";
    if token {
        bail!(
            "cannot tell whose socket the server at {server} is: {WHY}; the bearer token is not sent to a server that cannot be verified, so nothing was sent to it"
        );
    }
    UNVERIFIED_SAID.call_once(|| {
        eprintln!(
            "drain-agent: WARNING: cannot tell whose socket the server at {server} is: {WHY}; asking it unverified (any local user who holds that address while the agent is down could answer)"
        );
    });
    Ok(())
}

/// Whether `ip` is an address of this network namespace: loopback, or an interface's.
fn is_this_namespaces(ip: IpAddr) -> Result<bool> {
    Ok(ip.is_loopback()
        || ifaddrs::local_addresses()
            .context("cannot read this network namespace's addresses")?
            .contains(&ip))
}

/// Whose sockets are taken for the agent's, in words.
fn trusted(me: u32, agent_uid: Option<u32>) -> String {
    let mut names = vec!["root's".to_owned()];
    if me != 0 {
        names.push(format!("this user's (uid {me})"));
    }
    match agent_uid {
        Some(uid) if uid != 0 && uid != me => names.push(format!("uid {uid}'s (--agent-uid)")),
        Some(_) => {}
        None => {
            return format!(
                "{} (an agent run as another user is named with --agent-uid)",
                names.join(" or ")
            );
        }
    }
    names.join(" or ")
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::{
        super::testing::{NOBODY, nobodys_listener},
        *,
    };

    /// The server end names its holder only once a process holds it: a connection in
    /// `nobody`'s listen queue is never taken for the agent's (a kernel that reports such
    /// a socket as root's must not make it the agent), and once `nobody` accepted it, it
    /// is refused by name. Root's own server is the agent's.
    #[test]
    #[ignore = "kernel test: needs root (setfsuid); run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn only_a_server_socket_held_by_root_or_this_user_is_the_agent() {
        let agents = ServerOwners::Agent { agent_uid: None };
        let (address, accept) = nobodys_listener(SocketAddr::from(([127, 0, 0, 1], 0)));
        let stream = TcpStream::connect(address).expect("connect");
        let started = Instant::now();
        let problem = check(&stream, agents, false, started + Duration::from_millis(300))
            .expect_err("an unaccepted connection is nobody's yet");
        assert!(
            format!("{problem:#}").contains("has not accepted"),
            "{problem:#}"
        );
        assert!(started.elapsed() < Duration::from_millis(400));
        accept.send(()).expect("accept");
        let problem = check(
            &stream,
            agents,
            false,
            Instant::now() + Duration::from_secs(2),
        )
        .expect_err("nobody's server");
        assert!(
            format!("{problem:#}").contains(&format!("uid {NOBODY}'s")),
            "{problem:#}"
        );
        let named = ServerOwners::Agent {
            agent_uid: Some(NOBODY),
        };
        check(
            &stream,
            named,
            false,
            Instant::now() + Duration::from_secs(2),
        )
        .expect("--agent-uid");
        check(&stream, ServerOwners::Anyone, true, Instant::now()).expect("anyone's");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let _accepted = listener.accept().expect("accept");
        check(&ours, agents, true, Instant::now() + Duration::from_secs(2)).expect("root's server");
    }

    fn ends(server: &str) -> Ends {
        Ends {
            server: server.parse().expect("server"),
            client: "127.0.0.1:40000".parse().expect("client"),
        }
    }

    /// Tables that hold neither end: a host without the `inet_diag`/`tcp_diag` modules,
    /// where the kernel answers every lookup "no such socket".
    fn unreadable(_: SocketAddr, _: SocketAddr) -> Result<Option<sockdiag::TcpSocket>> {
        Ok(None)
    }

    fn failing(_: SocketAddr, _: SocketAddr) -> Result<Option<sockdiag::TcpSocket>> {
        bail!("cannot open a NETLINK_SOCK_DIAG socket")
    }

    /// The agent at its own-interface or loopback address on a host whose tables cannot be
    /// read (a supported, degraded mode) is asked at once, unverified, without a token;
    /// with a token, the client says so at once, not after its whole timeout.
    #[test]
    fn unreadable_tables_are_told_at_once_and_get_no_token() {
        let agents = None;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(2);
        check_ends(
            ends("127.0.0.1:9100"),
            agents,
            false,
            deadline,
            &unreadable,
            is_this_namespaces,
        )
        .expect("asked unverified");
        let problem = check_ends(
            ends("127.0.0.1:9100"),
            agents,
            true,
            deadline,
            &unreadable,
            is_this_namespaces,
        )
        .expect_err("no token to an unverified server");
        assert!(format!("{problem:#}").contains("inet_diag"), "{problem:#}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }

    /// A lookup that fails stops only a server at this namespace's own address: one in
    /// another namespace (a pod calling `$HOST_IP`) is asked as before.
    #[test]
    fn a_failed_lookup_stops_only_a_server_at_our_own_address() {
        let deadline = Instant::now() + Duration::from_secs(1);
        check_ends(
            ends("192.0.2.1:19700"),
            None,
            true,
            deadline,
            &failing,
            is_this_namespaces,
        )
        .expect("another namespace's server");
        let problem = check_ends(
            ends("127.0.0.1:9100"),
            None,
            false,
            deadline,
            &failing,
            is_this_namespaces,
        )
        .expect_err("fail closed here");
        assert!(
            format!("{problem:#}").contains("NETLINK_SOCK_DIAG"),
            "{problem:#}"
        );
    }

    #[test]
    fn loopback_is_this_namespaces_and_a_documentation_address_is_not() {
        for here in ["127.0.0.1", "127.0.0.53", "::1"] {
            assert!(
                is_this_namespaces(here.parse().expect("ip")).expect("addresses"),
                "{here}"
            );
        }
        assert!(!is_this_namespaces("192.0.2.1".parse().expect("ip")).expect("addresses"));
    }
}
