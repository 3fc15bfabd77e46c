//! Listeners an upgrade hands over: every listener of the agent that has a fixed address
//! (the node's `--listen`, `--agent-check-listen`, the in-pod ones of the fallback that
//! binds, and the agent's socket in each pod that the in-pod port is steered to) is bound
//! with `SO_REUSEPORT`, so the next agent binds the same address while this one still
//! serves (the kernel spreads new connections over both by hash; a steered pod's socket
//! gets only what its own agent's `sk_lookup` program assigns), and the group carries the
//! program of `kernel/reuseport.rs`, so when this agent closes its listener the connections
//! queued on it move to the next agent's instead of being reset.
//!
//! Both need the agents to run as the same user (the kernel only groups sockets of one
//! uid, net/core/sock_reuseport.c via `inet_csk_bind_conflict()`), which the shipped units
//! and the DaemonSet do. An agent of a version that did not set `SO_REUSEPORT` makes the
//! bind fail with `EADDRINUSE` until it stops: the node's listeners are then retried for up
//! to [`BIND_RETRY_FOR`] (the old agent is about to stop), the in-pod ones on every rescan
//! (`http/pods/`). An address held by another program fails the start at once.
//!
//! The same rule lets a pod's application share an in-pod socket of the agent when it runs
//! as the agents' user (root) and sets `SO_REUSEPORT` (nginx's `reuseport`, HAProxy, many Go
//! servers): the agent's bind would join its group, or sit beside its wildcard. So
//! [`Handover::bind_pod`] looks at who holds the address before binding and once bound
//! ([`holder_of`]), and gives the socket up where an application does. An application
//! that binds with `SO_REUSEPORT` *after* that is let in by the kernel all the same: see
//! `http/pods/` for the window left.

use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};

use crate::kernel::reuseport::MigrateProgram;

/// How long a node listener's address may be held by a process that does not share it
/// before the start fails: an older agent that is being replaced stops within its grace.
pub const BIND_RETRY_FOR: Duration = Duration::from_secs(60);
const BIND_RETRY_EVERY: Duration = Duration::from_millis(200);

/// The accept backlog (tokio's and most servers' default).
const BACKLOG: i32 = 1024;

/// A non-blocking TCP listener on `addr` in the calling thread's namespace, in the
/// `SO_REUSEPORT` group of that address ([`Handover::bind`]).
fn listening_in_group(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let socket: OwnedFd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    // As std and tokio do: a restart binds even with connections in TIME_WAIT.
    sockopt::set_socket_reuseaddr(&socket, true)?;
    sockopt::set_socket_reuseport(&socket, true)?;
    // `[::]` takes IPv4 too, whatever `net.ipv6.bindv6only` says: then no other program
    // can listen on the port beside it, and its IPv4 connections are its own
    // (`kernel/maps.rs` `not_the_agents`).
    if let SocketAddr::V6(v6) = addr
        && v6.ip().is_unspecified()
    {
        sockopt::set_ipv6_v6only(&socket, false)?;
    }
    rustix::net::bind(&socket, &addr)?;
    rustix::net::listen(&socket, BACKLOG)?;
    Ok(socket)
}

/// Binds listeners that share their address with the next agent.
#[derive(Debug)]
pub struct Handover {
    /// `None`: the kernel refused the program (older than 5.14, or no CAP_BPF); listeners
    /// are still shared, but the connections queued on this agent's are reset at its close.
    migrate: Option<MigrateProgram>,
}

impl Handover {
    /// Loads the migrate program once; says at INFO why not when it cannot.
    pub fn new() -> Self {
        let migrate = match MigrateProgram::load() {
            Ok(program) => Some(program),
            Err(problem) => {
                info!(
                    "{problem:#}: listeners are shared with the next agent (SO_REUSEPORT) but connections queued on this agent's at its stop are reset, not handed over"
                );
                None
            }
        };
        Self { migrate }
    }

    /// Whether closed listeners hand their queued connections over (for tests and logs).
    pub fn migrates(&self) -> bool {
        self.migrate.is_some()
    }

    /// A non-blocking listener on `addr` in the calling thread's network namespace, in the
    /// `SO_REUSEPORT` group of that address, with the migrate program attached.
    pub fn bind(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        let socket = listening_in_group(addr)?;
        Ok(self.attach(socket, addr))
    }

    /// [`Handover::bind`] for a listener in a pod, in the calling thread's namespace (root's,
    /// shared with other agents as before): `Ok(None)` where an application (anything but an
    /// agent) holds `addr` or a wildcard covering it, looked at before binding and again
    /// once bound, before the migrate program is attached (attached in an application's
    /// group, it would replace that group's program). An application's `SO_REUSEPORT`
    /// socket, as root, does not make the bind fail: the agent's would join its group, or
    /// sit beside its wildcard and take its loopback connections. Where the socket tables
    /// cannot be read, `unknown` stands for who holds it (the fallback: an application, as
    /// before; the steered socket: nobody, served as before).
    pub fn bind_pod(
        &self,
        addr: SocketAddr,
        unknown: Holder,
    ) -> std::io::Result<Option<std::net::TcpListener>> {
        if holder_of(addr).unwrap_or(unknown) == Holder::Application {
            return Ok(None);
        }
        let socket = listening_in_group(addr)?;
        // An application that bound between the look and the bind: its socket is in the
        // agent's group or beside it now.
        if holder_besides(addr, &socket).unwrap_or(unknown) == Holder::Application {
            return Ok(None);
        }
        Ok(Some(self.attach(socket, addr)))
    }

    /// `socket`, listening on `addr`, with the migrate program attached.
    fn attach(&self, socket: OwnedFd, addr: SocketAddr) -> std::net::TcpListener {
        if let Some(migrate) = &self.migrate
            && let Err(problem) = migrate.attach(socket.as_fd())
        {
            warn!("{addr}: {problem:#}; connections queued on it at the agent's stop may be reset");
        }
        std::net::TcpListener::from(socket)
    }

    /// [`Handover::bind`] for a listener of the node (`what` names its flag), as a tokio
    /// listener. An address in use by a socket that does not share it (an agent of an older
    /// version, being replaced) is retried for up to [`BIND_RETRY_FOR`], said once at WARN;
    /// one an application holds unshared is a start-up error, and one it shares
    /// (`SO_REUSEPORT`) is said at WARN.
    pub async fn bind_node(&self, addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
        Ok(self.bind_node_after(addr, what, || ()).await?.0)
    }

    /// [`Handover::bind_node`] for the node's `--listen`, with the cookies of the listeners
    /// that were on `addr` just before the bind (`metrics_turn.rs`: while one of them
    /// listens, this agent leaves `/metrics` to it), or why they could not be read.
    pub async fn bind_node_looking(
        &self,
        addr: SocketAddr,
        what: &str,
    ) -> Result<(tokio::net::TcpListener, Result<Vec<u64>>)> {
        self.bind_node_after(addr, what, || {
            crate::http::metrics_turn::earlier_listeners(addr)
        })
        .await
    }

    /// [`Handover::bind_node`], calling `look` just before each attempt to bind: what the
    /// last one found comes with the listener.
    async fn bind_node_after<T>(
        &self,
        addr: SocketAddr,
        what: &str,
        mut look: impl FnMut() -> T,
    ) -> Result<(tokio::net::TcpListener, T)> {
        let started = tokio::time::Instant::now();
        let mut told = false;
        let (listener, found) = loop {
            let found = look();
            match listening_in_group(addr) {
                Ok(socket) => {
                    // Bound: in a group of its own, an agent's (an upgrade), or beside an
                    // application that set `SO_REUSEPORT` too (Envoy by default, nginx's
                    // `reuseport`), which the bind does not refuse: on the very address the
                    // kernel splits the application's new connections between it and the
                    // agent's API; under its wildcard the agent's exact address takes the
                    // application's connections to it. Said at WARN, not refused: the holder
                    // is told from an agent by its process's name (`holder_of`), and an
                    // upgrade's older agent under another name, or one this agent cannot see
                    // (no host PID namespace), must not stop the start.
                    if holder_besides(addr, &socket)
                        .is_ok_and(|holder| holder == Holder::Application)
                    {
                        warn!(
                            "{addr} ({what}) is shared with or covered by a listener of a program that is not a drain-agent (SO_REUSEPORT, or one this agent cannot identify): connections meant for it may reach the agent's API; choose another address"
                        );
                        // Not in an application's group (the exact address, a subset of
                        // what covers it): the program would replace the group's and hand
                        // the application's queued connections to the agent at its close.
                        if holder_besides_exactly(addr, &socket)
                            .is_ok_and(|holder| holder == Holder::Application)
                        {
                            break (std::net::TcpListener::from(socket), found);
                        }
                    }
                    break (self.attach(socket, addr), found);
                }
                // Waited for only while the holder is an agent (an older version being
                // replaced): another program on the address (node_exporter on 9100) is a
                // start-up error at once, naming the address.
                Err(problem)
                    if problem.kind() == std::io::ErrorKind::AddrInUse
                        && started.elapsed() < BIND_RETRY_FOR
                        && holder_of(addr).is_ok_and(|holder| holder != Holder::Application) =>
                {
                    if !told {
                        warn!(
                            "{addr} ({what}) is in use by a socket that does not share it: an agent of an older version being replaced? retrying for up to {BIND_RETRY_FOR:?}"
                        );
                        told = true;
                    }
                    tokio::time::sleep(BIND_RETRY_EVERY).await;
                }
                Err(problem) => {
                    return Err(problem).with_context(|| {
                        format!(
                            "cannot listen on {addr} ({what}; another program there? choose another address)"
                        )
                    });
                }
            }
        };
        if told {
            info!(
                "{addr} ({what}) is free again: listening after {:?}",
                started.elapsed()
            );
        }
        let listener = tokio::net::TcpListener::from_std(listener)
            .with_context(|| format!("cannot register the listener on {addr}"))?;
        Ok((listener, found))
    }
}

/// Who listens on an address already, in the calling thread's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    Nobody,
    /// Only drain-agent processes (an agent beside this one, of this version or older).
    Agents,
    /// Something else (an application) too.
    Application,
}

/// Who holds listeners whose address conflicts with `addr` (the same address, or either one
/// unspecified) in the calling thread's network namespace: the socket tables name the
/// listeners' inodes, `/proc/PID/fd` who holds them, and a holder whose `comm` is
/// `drain-agent` is an agent. The in-pod fallback binds only where nobody or agents listen
/// (an application that set `SO_REUSEPORT` too, as the agent's user, would otherwise share
/// its port with the agent), and retries where an older agent holds the address unshared.
pub fn holder_of(addr: SocketAddr) -> Result<Holder> {
    holder_except(addr, None, Overlap::Covering)
}

/// [`holder_of`] but for `own` (the agent's socket just bound there): its own socket is
/// not looked for in `/proc`, so where nobody else listens no process is.
pub fn holder_besides(addr: SocketAddr, own: &OwnedFd) -> Result<Holder> {
    holder_except(addr, Some(own_inode(own)?), Overlap::Covering)
}

/// [`holder_besides`] among the listeners on exactly `addr`: those of `own`'s
/// `SO_REUSEPORT` group.
fn holder_besides_exactly(addr: SocketAddr, own: &OwnedFd) -> Result<Holder> {
    holder_except(addr, Some(own_inode(own)?), Overlap::Exact)
}

fn own_inode(own: &OwnedFd) -> Result<u64> {
    Ok(rustix::fs::fstat(own)
        .context("cannot stat the agent's socket")?
        .st_ino)
}

/// Which listeners on the port [`holder_except`] looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Overlap {
    /// The same address, or either one unspecified.
    Covering,
    /// The same address only.
    Exact,
}

fn holder_except(addr: SocketAddr, own: Option<u64>, overlap: Overlap) -> Result<Holder> {
    use crate::sys::sockdiag::{Query, query, state};
    let conflicts = |ip: std::net::IpAddr| {
        ip == addr.ip()
            || (overlap == Overlap::Covering && (ip.is_unspecified() || addr.ip().is_unspecified()))
    };
    let mut inodes: std::collections::BTreeSet<u64> = query(&Query {
        local_port: addr.port(),
        states: state::bit(state::LISTEN),
        with_info: false,
    })?
    .into_iter()
    .filter(|socket| conflicts(socket.local.ip()))
    .map(|socket| u64::from(socket.inode))
    .filter(|inode| Some(*inode) != own)
    .collect();
    if inodes.is_empty() {
        return Ok(Holder::Nobody);
    }
    let processes = std::fs::read_dir("/proc").context("cannot read /proc")?;
    for process in processes.flatten() {
        let pid = process.path();
        let is_agent = std::fs::read_to_string(pid.join("comm"))
            .is_ok_and(|comm| comm.trim_end() == "drain-agent");
        if !is_agent {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(pid.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let inode = std::fs::read_link(fd.path()).ok().and_then(|target| {
                target
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            });
            if let Some(inode) = inode {
                inodes.remove(&inode);
            }
        }
    }
    Ok(if inodes.is_empty() {
        Holder::Agents
    } else {
        Holder::Application
    })
}

impl Default for Handover {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the agent's stop is: its listeners and the pod manager watch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopPhase {
    Serving,
    /// SIGTERM came: listeners closed (handed over), waiters answered as usual.
    HandingOver,
    /// `--shutdown-grace` is over: the waiters left are answered `agent_shutdown`.
    AnsweringRest,
}

/// Resolves once `phases` reaches `phase` (or its sender is gone: the agent is stopping).
pub async fn reached(mut phases: tokio::sync::watch::Receiver<StopPhase>, phase: StopPhase) {
    let _ = phases.wait_for(|now| *now >= phase).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn an_applications_listener_is_told_apart_from_nobody() {
        // The socket tables are read where the modules are there (not in every build
        // sandbox); where they are not, the test is skipped, or fails in CI.
        if let Err(problem) = crate::sys::sockdiag::check_readable() {
            crate::test_skip::skip(
                "an_applications_listener_is_told_apart_from_nobody",
                &format!("{problem:#}"),
            );
            return;
        }
        // This test process is not a drain-agent: its listener is an application's.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
        assert_eq!(
            holder_of(at([127, 0, 0, 1])).ok(),
            Some(Holder::Application)
        );
        assert_eq!(holder_of(at([0, 0, 0, 0])).ok(), Some(Holder::Application));
        // Another address on the same port does not conflict.
        assert_eq!(holder_of(at([127, 0, 0, 2])).ok(), Some(Holder::Nobody));
        drop(listener);
        assert_eq!(holder_of(at([127, 0, 0, 1])).ok(), Some(Holder::Nobody));
    }

    /// An application's listener with `SO_REUSEPORT` (this test process is not a
    /// drain-agent; root, the agents' user) does not make a pod listener's bind fail, on its
    /// address or on one its wildcard covers: [`Handover::bind_pod`] gives the socket up
    /// there, and binds where nobody listens (its own socket not taken for another's).
    #[test]
    #[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn a_pods_listener_is_given_up_beside_an_applications_reuseport_listener() {
        let test = "a_pods_listener_is_given_up_beside_an_applications_reuseport_listener";
        if let Err(problem) = crate::sys::sockdiag::check_readable() {
            crate::test_skip::skip(test, &format!("{problem:#}"));
            return;
        }
        let handover = Handover { migrate: None };
        let application = listening_in_group("0.0.0.0:0".parse().expect("addr")).expect("bind");
        let port = rustix::net::getsockname(&application)
            .ok()
            .and_then(|addr| SocketAddr::try_from(addr).ok())
            .expect("addr")
            .port();
        for addr in [
            SocketAddr::from(([0, 0, 0, 0], port)),
            SocketAddr::from(([127, 0, 0, 1], port)),
        ] {
            assert!(
                handover
                    .bind_pod(addr, Holder::Nobody)
                    .expect("bind")
                    .is_none(),
                "{addr}"
            );
        }
        drop(application);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let first = handover.bind_pod(addr, Holder::Application).expect("bind");
        assert!(first.is_some(), "nobody else holds {addr}");
        drop(first);
    }

    #[test]
    fn listeners_of_one_address_share_it() {
        let handover = Handover { migrate: None };
        let first = handover
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let addr = first.local_addr().expect("addr");
        let second = handover
            .bind(addr)
            .expect("a second listener on the same address");
        // A listener that does not share it cannot join.
        assert_eq!(
            std::net::TcpListener::bind(addr)
                .map_err(|e| e.kind())
                .err(),
            Some(std::io::ErrorKind::AddrInUse)
        );
        drop((first, second));
    }
}
