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
//! holds it, so no uid is its holder's), until the deadline.

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
/// someone else); nothing has been sent to it.
pub(super) fn check(stream: &TcpStream, owners: ServerOwners, deadline: Instant) -> Result<()> {
    let ServerOwners::Agent { agent_uid } = owners else {
        return Ok(());
    };
    let canonical = |end: SocketAddr| SocketAddr::new(canonical_addr(end.ip()), end.port());
    let server = canonical(stream.peer_addr().context("the server's address")?);
    let client = canonical(stream.local_addr().context("this end's address")?);
    let me = rustix::process::geteuid().as_raw();
    // Whether the server's address is this namespace's, read once when first needed.
    let mut server_here: Option<bool> = None;
    let mut pause = Duration::from_millis(1);
    loop {
        let found = sockdiag::find_one(server, client).with_context(|| {
            format!("cannot tell whose socket the server at {server} is (sock_diag)")
        })?;
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
            None => {
                let here = match server_here {
                    Some(here) => here,
                    None => *server_here.insert(is_this_namespaces(server.ip())?),
                };
                if !here {
                    // Another namespace's server (or one behind address translation).
                    return Ok(());
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

    use super::*;

    const NOBODY: u32 = 65_534;

    /// A listener on a free loopback port whose sockets are `nobody`'s (made on a thread
    /// whose fsuid is that user's), and the means to accept one connection there as it.
    fn nobodys_listener() -> (SocketAddr, std::sync::mpsc::Sender<()>) {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (accept_tx, accept_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            // SAFETY: setfsuid is per thread; it changes whose sockets this thread makes.
            unsafe { libc::setfsuid(NOBODY) };
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            ready_tx
                .send(listener.local_addr().expect("addr"))
                .expect("ready");
            let mut held = Vec::new();
            while accept_rx.recv().is_ok() {
                held.push(listener.accept().expect("accept"));
            }
        });
        (ready_rx.recv().expect("ready"), accept_tx)
    }

    /// The server end names its holder only once a process holds it: a connection in
    /// `nobody`'s listen queue is never taken for the agent's (a kernel that reports such
    /// a socket as root's must not make it the agent), and once `nobody` accepted it, it
    /// is refused by name. Root's own server is the agent's.
    #[test]
    #[ignore = "kernel test: needs root (setfsuid); run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn only_a_server_socket_held_by_root_or_this_user_is_the_agent() {
        let agents = ServerOwners::Agent { agent_uid: None };
        let (address, accept) = nobodys_listener();
        let stream = TcpStream::connect(address).expect("connect");
        let started = Instant::now();
        let problem = check(&stream, agents, started + Duration::from_millis(300))
            .expect_err("an unaccepted connection is nobody's yet");
        assert!(
            format!("{problem:#}").contains("has not accepted"),
            "{problem:#}"
        );
        assert!(started.elapsed() < Duration::from_millis(400));
        accept.send(()).expect("accept");
        let problem = check(&stream, agents, Instant::now() + Duration::from_secs(2))
            .expect_err("nobody's server");
        assert!(
            format!("{problem:#}").contains(&format!("uid {NOBODY}'s")),
            "{problem:#}"
        );
        let named = ServerOwners::Agent {
            agent_uid: Some(NOBODY),
        };
        check(&stream, named, Instant::now() + Duration::from_secs(2)).expect("--agent-uid");
        check(&stream, ServerOwners::Anyone, Instant::now()).expect("anyone's");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let _accepted = listener.accept().expect("accept");
        check(&ours, agents, Instant::now() + Duration::from_secs(2)).expect("root's server");
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
