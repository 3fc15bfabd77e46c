//! Listeners an upgrade hands over: every listener of the agent that has a fixed address
//! (the node's `--listen`, `--agent-check-listen`, the in-pod ones of the fallback that
//! binds) is bound with `SO_REUSEPORT`, so the next agent binds the same address while this
//! one still serves (the kernel spreads new connections over both by hash), and the group
//! carries the program of `kernel/reuseport.rs`, so when this agent closes its listener the
//! connections queued on it move to the next agent's instead of being reset.
//!
//! Both need the agents to run as the same user (the kernel only groups sockets of one
//! uid, net/core/sock_reuseport.c via `inet_csk_bind_conflict()`), which the shipped units
//! and the DaemonSet do. An agent of a version that did not set `SO_REUSEPORT` makes the
//! bind fail with `EADDRINUSE` until it stops: the node's listeners are then retried for up
//! to [`BIND_RETRY_FOR`] (the old agent is about to stop), the in-pod ones on every rescan
//! (`pods.rs`).

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
        rustix::net::bind(&socket, &addr)?;
        rustix::net::listen(&socket, BACKLOG)?;
        if let Some(migrate) = &self.migrate
            && let Err(problem) = migrate.attach(socket.as_fd())
        {
            warn!("{addr}: {problem:#}; connections queued on it at the agent's stop may be reset");
        }
        Ok(std::net::TcpListener::from(socket))
    }

    /// [`Handover::bind`] for a listener of the node (`what` names its flag), as a tokio
    /// listener. An address in use by a socket that does not share it (an agent of an older
    /// version, being replaced) is retried for up to [`BIND_RETRY_FOR`], said once at WARN.
    pub async fn bind_node(&self, addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
        let started = tokio::time::Instant::now();
        let mut told = false;
        let listener = loop {
            match self.bind(addr) {
                Ok(listener) => break listener,
                Err(problem)
                    if problem.kind() == std::io::ErrorKind::AddrInUse
                        && started.elapsed() < BIND_RETRY_FOR =>
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
        tokio::net::TcpListener::from_std(listener)
            .with_context(|| format!("cannot register the listener on {addr}"))
    }
}

/// Whether a listener on `port` in the calling thread's network namespace belongs to a
/// drain-agent process (an agent of an older version, which did not share it): the socket
/// tables name the listeners' inodes, `/proc/PID/fd` who holds them. A bind that failed
/// with `EADDRINUSE` is retried for such a holder (it stops soon), never for an application.
pub fn held_by_an_agent(port: u16) -> Result<bool> {
    use crate::sockdiag::{Query, query, state};
    let inodes: std::collections::BTreeSet<u64> = query(&Query {
        local_port: port,
        states: state::bit(state::LISTEN),
        with_info: false,
    })?
    .into_iter()
    .map(|socket| u64::from(socket.inode))
    .filter(|inode| *inode != 0)
    .collect();
    if inodes.is_empty() {
        return Ok(false);
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
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|text| text.strip_prefix("socket:["))
                .and_then(|text| text.strip_suffix(']'))
                .and_then(|text| text.parse::<u64>().ok());
            if inode.is_some_and(|inode| inodes.contains(&inode)) {
                return Ok(true);
            }
        }
    }
    Ok(false)
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
