//! Making a pod listener's socket on a thread inside the pod's namespace: the agent's
//! own socket with the in-pod port steered to it, or (without `sk_lookup`) the in-pod
//! address bound there.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, Result};

use super::{OwnEndpoints, SteeredPort};
use crate::{
    http::handover::{Handover, Holder, holder_of},
    sys::netns,
};

/// A socket of the agent's on loopback at `socket_port` in the namespace at `path` (checked
/// to be `inode`), and the in-pod port steered to it. The socket is bound by `handover`, as
/// the node's listeners are: at the agent's stop the connections queued on it move to the
/// next agent's socket there instead of being reset.
pub(super) fn open_steered(
    path: &Path,
    inode: u32,
    addr: SocketAddr,
    socket_port: u16,
    endpoints: &dyn OwnEndpoints,
    handover: &Arc<Handover>,
) -> Result<(std::net::TcpListener, SteeredPort), Bind> {
    let (listener, netns_file) = socket_in(path, inode, addr, socket_port, handover)?;
    let steered = endpoints
        .steer(addr, inode, &netns_file, listener.as_fd())
        .map_err(Bind::Steer)?;
    Ok((listener, steered))
}

/// Why a bind failed.
pub(super) enum Bind {
    /// An application holds the address in that namespace (skip it for good).
    InUse,
    /// An agent of an older version holds it without `SO_REUSEPORT`, which this one cannot
    /// share (retry on each rescan).
    AgentThere,
    /// An application holds the agent's socket port (`--pod-socket-port`) at this address
    /// in that namespace: not served (skip it for good, WARN).
    SocketPortTaken(SocketAddr),
    /// Anything else (retry later).
    Failed(anyhow::Error),
    /// The socket is made, the steering failed (retry later, WARN).
    Steer(anyhow::Error),
}

/// Binds `addr` on a thread inside the namespace at `path`, checking that it is still the
/// namespace `inode` (a PID may have been reused since the scan).
/// The listener is in the address's `SO_REUSEPORT` group (`handover.rs`): another agent's
/// listener there is shared, not a conflict. Where an application holds the address or a
/// wildcard covering it, before the bind or once bound ([`Handover::bind_pod`]; also one
/// that set `SO_REUSEPORT`, whose group the agent's bind would join), the pod is skipped.
pub(super) fn bind_in(
    path: &Path,
    inode: u32,
    addr: SocketAddr,
    handover: &Arc<Handover>,
) -> Result<std::net::TcpListener, Bind> {
    let handover = Arc::clone(handover);
    let result = netns::run_in(inode, path, move || {
        // An application keeps the port for good, agents share it, and an older agent that
        // does not share it is retried. Unknown (the socket tables unreadable): an
        // application's.
        match handover.bind_pod(addr, Holder::Application) {
            Ok(Some(listener)) => Ok(Ok(listener)),
            Ok(None) => Ok(Err(Holder::Application)),
            Err(problem) if problem.kind() == std::io::ErrorKind::AddrInUse => {
                // Taken between the look and the bind: look again.
                Ok(Err(holder_of(addr).unwrap_or(Holder::Application)))
            }
            Err(problem) => Err(problem).with_context(|| format!("cannot listen on {addr}")),
        }
    });
    match result {
        Ok(Ok(listener)) => Ok(listener),
        Ok(Err(Holder::Application)) => Err(Bind::InUse),
        // An agent's listener that does not share the address, or one gone meanwhile.
        Ok(Err(Holder::Agents | Holder::Nobody)) => Err(Bind::AgentThere),
        Err(problem) => Err(Bind::Failed(problem)),
    }
}

/// The agent's socket for a steered in-pod port: made on a thread inside the namespace at
/// `path` (checked to still be `inode`), on loopback at `socket_port` (`--pod-socket-port`;
/// see `kernel/steer.rs` for why a fixed port), with the namespace's file for the
/// `sk_lookup` link. It is in the `SO_REUSEPORT` group of its address, so the next agent of
/// an upgrade (the same user) makes its own beside it; each agent's program assigns its own
/// socket with `BPF_SK_LOOKUP_F_NO_REUSEPORT`, so the group never spreads the steered
/// connections. The group carries the migrate program (`handover.rs`): a connection steered
/// here that waits in its accept queue when the agent closes it at its stop (every
/// connection slot busy, `--pod-http-max-connections` and the reserve) moves to the next
/// agent's socket; without it, it was reset. The port in use by anything else is
/// [`Bind::SocketPortTaken`] (looked at before the bind and once bound,
/// [`Handover::bind_pod`]: an application's `SO_REUSEPORT` socket there, as root, does not
/// make the bind fail, and the agent's socket would join its group or sit beside its
/// wildcard), by an older agent's socket that does not share it [`Bind::AgentThere`].
fn socket_in(
    path: &Path,
    inode: u32,
    addr: SocketAddr,
    socket_port: u16,
    handover: &Arc<Handover>,
) -> Result<(std::net::TcpListener, File), Bind> {
    let local = match addr.ip() {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::LOCALHOST, socket_port)),
        // `[::]` takes IPv4 too, and a socket bound to `::1` is IPv6-only (binding a
        // specific IPv6 address sets `sk_ipv6only`, net/ipv6/af_inet6.c), which
        // `bpf_sk_assign()` refuses for IPv4: dual-stack on all addresses, as `[::]:9100`
        // itself was (callers beyond loopback and the node get 403 there too).
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, socket_port))
        }
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::LOCALHOST, socket_port)),
    };
    let handover = Arc::clone(handover);
    let made = netns::run_in(inode, path, move || {
        let own = Path::new("/proc/thread-self/ns/net");
        let netns_file = File::open(own).context("cannot open the namespace's file")?;
        // Unknown (the socket tables unreadable): served, as before the look was made,
        // but a port the bind finds taken is an application's.
        Ok(match handover.bind_pod(local, Holder::Nobody) {
            Ok(Some(listener)) => Ok((listener, netns_file)),
            Ok(None) => Err(Bind::SocketPortTaken(local)),
            Err(problem) if problem.kind() == std::io::ErrorKind::AddrInUse => {
                Err(match holder_of(local).unwrap_or(Holder::Application) {
                    Holder::Application => Bind::SocketPortTaken(local),
                    // An older agent's socket without SO_REUSEPORT, or one gone meanwhile.
                    Holder::Agents | Holder::Nobody => Bind::AgentThere,
                })
            }
            Err(problem) => Err(Bind::Failed(
                anyhow::Error::new(problem).context(format!("cannot listen on {local}")),
            )),
        })
    });
    made.unwrap_or_else(|problem| Err(Bind::Failed(problem)))
}
