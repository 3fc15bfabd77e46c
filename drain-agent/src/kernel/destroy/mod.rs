//! Closing the connections left at a drain's deadline, in every namespace of its scope.
//!
//! Two ways, both ending in the kernel's `tcp_abort()` (the peer gets a RST, the owner sees
//! `ECONNABORTED` on its next call):
//! - [`CloseMethod::Bpf`]: the `destroy_sockets` `iter/tcp` program calls the kfunc
//!   `bpf_sock_destroy()` (Linux >= 6.5) on each socket whose two ends are in
//!   `DESTROY_TARGETS` and that has its own entry in `SOCKETS` (a tracked inbound
//!   connection). One pass over the namespace's sockets closes a whole batch, under each
//!   socket's lock.
//! - [`CloseMethod::Netlink`]: `SOCK_DESTROY` over `NETLINK_SOCK_DIAG`, one request per
//!   socket, like `ss -K` (needs `CONFIG_INET_DIAG_DESTROY`).
//!
//! Only tracked inbound connections of the scope are ever closed. A drained port is also
//! the local port of any outbound socket bound to it (`bind()` before `connect()`, the
//! client end of a loopback pair): the socket tables list those on the port too, and
//! closing by local port would abort them. So [`Kernel::close_connections`] keeps only
//! the targets that the maps track in that namespace with both ends as given (the only guard
//! of the netlink method), and `destroy_sockets` checks the socket's own `SOCKETS` entry
//! again under its lock.
//!
//! The kfunc call is linked by the agent (aya 0.14 cannot): `kfunc.rs`.

mod kfunc;

use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::Iter,
};
use drain_agent_common::{AF_INET, AF_INET6, DestroyKey};
use log::{info, warn};

pub(super) use self::kfunc::{KFUNC, link_kfuncs};
use super::{
    Kernel,
    maps::{Tracked, canonical, namespaces_of},
};
use crate::{
    drain_rule::Peer,
    sys::netns,
    sys::sockdiag::{self, Query, state},
    tracker::Filter,
};

/// How to close connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseMethod {
    /// `bpf_sock_destroy()` from the `destroy_sockets` iterator (Linux >= 6.5).
    Bpf,
    /// `SOCK_DESTROY` over `NETLINK_SOCK_DIAG`, one socket at a time (`ss -K`).
    Netlink,
}

/// The iterator that destroys the targets.
const DESTROYER: &str = "destroy_sockets";
/// `DESTROY_BATCH` of the eBPF side: the capacity of `DESTROY_TARGETS`.
const BATCH: usize = 1_024;
/// `DESTROYED` slots (as in the eBPF program).
const DESTROYED_OK: u32 = 0;
const DESTROY_REFUSED: u32 = 1;
const DESTROY_NOT_TRACKED: u32 = 2;

/// The iterator's maps, and why it cannot run (if it cannot).
pub(super) struct Closer {
    targets: HashMap<MapData, DestroyKey, u8>,
    destroyed: Array<MapData, u64>,
    problem: Option<String>,
}

/// Takes the iterator's maps and loads it, unless `problem` (from [`link_kfuncs`]) already
/// says it cannot work; a verifier refusal is kept as the reason, with its log.
pub(super) fn load_closer(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    problem: Option<String>,
) -> Result<Closer> {
    let targets = super::take_map(ebpf, "DESTROY_TARGETS")?;
    let destroyed = super::take_map(ebpf, "DESTROYED")?;
    let problem = problem.or_else(|| {
        let program: &mut Iter = match ebpf.program_mut(DESTROYER).map(TryInto::try_into) {
            Some(Ok(program)) => program,
            Some(Err(error)) => return Some(format!("{DESTROYER} is not an iterator: {error}")),
            None => return Some(format!("the eBPF object has no {DESTROYER}")),
        };
        program
            .load("tcp", btf)
            .err()
            .map(|error| format!("cannot load {DESTROYER}: {error:#}"))
    });
    match &problem {
        None => info!("connections can be closed with bpf_sock_destroy()"),
        Some(problem) => {
            warn!("connections will be closed with SOCK_DESTROY (netlink) only: {problem}");
        }
    }
    Ok(Closer {
        targets,
        destroyed,
        problem,
    })
}

/// Connections to close, as both sides name them: (local, remote), canonical addresses.
type Wanted = HashSet<(SocketAddr, SocketAddr)>;

impl Kernel {
    /// Whether [`CloseMethod::Bpf`] works on this kernel.
    pub const fn can_close_with_bpf(&self) -> bool {
        self.closer.problem.is_none()
    }

    /// Why [`CloseMethod::Bpf`] does not work here, if it does not.
    pub fn bpf_close_problem(&self) -> Option<&str> {
        self.closer.problem.as_deref()
    }

    /// Closes the given connections of one scope (each identified by local and remote address), in every namespace of the scope; returns how many were closed.
    ///
    /// Only tracked inbound connections are closed: a target is closed in a namespace of the
    /// scope only if the maps track a connection there with these two ends (so never an
    /// outbound socket whose local port is the filter's port, never one the agent did not
    /// count), and only while it is ESTABLISHED or CLOSE_WAIT. Targets outside the filter
    /// (its port, and its address if it has one) are ignored. A target has no namespace:
    /// the same two ends tracked in two namespaces of the scope are both closed.
    /// A namespace that cannot be entered fails the call (after the others were done),
    /// unless it vanished meanwhile, taking its connections with it.
    pub fn close_connections(
        &mut self,
        filter: &Filter,
        targets: &[Peer],
        method: CloseMethod,
    ) -> Result<u64> {
        let wanted: Wanted = targets
            .iter()
            .map(|peer| (canonical(peer.local), canonical(peer.remote)))
            .filter(|(local, _)| {
                local.port() == filter.port && filter.addr.is_none_or(|addr| addr == local.ip())
            })
            .collect();
        if wanted.is_empty() {
            return Ok(0);
        }
        if method == CloseMethod::Bpf
            && let Some(problem) = &self.closer.problem
        {
            bail!("cannot close connections with bpf_sock_destroy(): {problem}");
        }
        // Read once, before any close: a connection the handler tracks now stays tracked
        // until it closes. The netlink method has no other guard.
        let tracked = self
            .maps
            .tracked(filter)
            .context("cannot read the tracked connections")?;
        let anywhere: Wanted = tracked
            .keys()
            .map(|(_, local, remote)| (*local, *remote))
            .collect();
        let untracked = wanted.difference(&anywhere).count();
        if untracked > 0 {
            info!(
                "left {untracked} of {} connections on port {} open: not tracked inbound connections of the scope (outbound ones from that port, or never counted)",
                wanted.len(),
                filter.port
            );
        }
        let mut closed = 0;
        let mut failed = BTreeSet::new();
        for (inode, path) in namespaces_of(filter)? {
            let here = tracked_in(&wanted, &tracked, inode);
            if here.is_empty() {
                continue;
            }
            let result = match method {
                CloseMethod::Bpf => self.close_with_bpf(inode, &path, &here),
                CloseMethod::Netlink => close_with_netlink(inode, path.clone(), filter.port, &here),
            };
            match result {
                Ok(count) => closed += count,
                // A namespace that is gone has no connections left (a complete scan says so).
                Err(_) if netns::is_gone(inode) => {}
                Err(error) => {
                    warn!(
                        "cannot close connections in network namespace {inode} ({}): {error:#}",
                        path.display()
                    );
                    failed.insert(inode);
                }
            }
        }
        if !failed.is_empty() {
            bail!(
                "closed {closed} connections, but not in network namespaces {failed:?} (see the log)"
            );
        }
        Ok(closed)
    }

    /// Runs `destroy_sockets` in one namespace, batch by batch; returns how many it closed.
    fn close_with_bpf(
        &mut self,
        inode: u32,
        path: &std::path::Path,
        wanted: &Wanted,
    ) -> Result<u64> {
        let keys: Vec<DestroyKey> = wanted
            .iter()
            .filter_map(|(local, remote)| destroy_key(*local, *remote))
            .collect();
        let before = self.destroyed(DESTROYED_OK)?;
        let refused_before = self.destroyed(DESTROY_REFUSED)?;
        let not_tracked_before = self.destroyed(DESTROY_NOT_TRACKED)?;
        for batch in keys.chunks(BATCH) {
            self.clear_targets();
            let run = self.run_destroyer(inode, path, batch);
            // Never leave targets behind for the next run, whatever happened.
            self.clear_targets();
            run?;
        }
        let refused = self.destroyed(DESTROY_REFUSED)? - refused_before;
        if refused > 0 {
            warn!(
                "bpf_sock_destroy() refused {refused} sockets in {}",
                path.display()
            );
        }
        let not_tracked = self.destroyed(DESTROY_NOT_TRACKED)? - not_tracked_before;
        if not_tracked > 0 {
            info!(
                "{DESTROYER} left {not_tracked} sockets in {} open: not tracked inbound connections",
                path.display()
            );
        }
        Ok(self.destroyed(DESTROYED_OK)? - before)
    }

    /// Runs `destroy_sockets` on `targets` (local, remote) in the namespace at `path`
    /// *without* the user-space filter of [`Kernel::close_connections`]: only the
    /// program's own check stands between the targets and `bpf_sock_destroy()`. For the
    /// tests that show that check holds by itself; returns how many sockets it closed.
    #[doc(hidden)]
    pub fn close_with_bpf_unfiltered(
        &mut self,
        path: &std::path::Path,
        targets: &[(SocketAddr, SocketAddr)],
    ) -> Result<u64> {
        if let Some(problem) = &self.closer.problem {
            bail!("cannot close connections with bpf_sock_destroy(): {problem}");
        }
        let wanted: Wanted = targets
            .iter()
            .map(|(local, remote)| (canonical(*local), canonical(*remote)))
            .collect();
        let inode = netns::inode_of(path)?;
        self.close_with_bpf(inode, path, &wanted)
    }

    fn run_destroyer(
        &mut self,
        inode: u32,
        path: &std::path::Path,
        batch: &[DestroyKey],
    ) -> Result<()> {
        for key in batch {
            self.closer
                .targets
                .insert(key, 1, 0)
                .context("cannot write a close target")?;
        }
        let program: &mut Iter = self
            .ebpf
            .program_mut(DESTROYER)
            .with_context(|| format!("the eBPF object has no {DESTROYER}"))?
            .try_into()
            .with_context(|| format!("{DESTROYER} is not an iterator"))?;
        let link = super::walk::iterator_link(program, DESTROYER)?;
        // The iterator walks the namespace of whoever creates its file: do that inside.
        netns::run_in(inode, path, move || {
            super::walk::run_iterator(link, DESTROYER)
        })
    }

    fn clear_targets(&mut self) {
        let stale: Vec<DestroyKey> = self.closer.targets.keys().filter_map(Result::ok).collect();
        for key in stale {
            let _ = self.closer.targets.remove(&key);
        }
    }

    fn destroyed(&self, slot: u32) -> Result<u64> {
        self.closer
            .destroyed
            .get(&slot, 0)
            .context("cannot read the DESTROYED counters")
    }
}

/// The wanted connections tracked in the namespace `inode`: the only ones to close there.
fn tracked_in(wanted: &Wanted, tracked: &Tracked, inode: u32) -> Wanted {
    wanted
        .iter()
        .filter(|(local, remote)| tracked.contains_key(&(inode, *local, *remote)))
        .copied()
        .collect()
}

/// `SOCK_DESTROY` for each wanted connection on `port` in the namespace at `path`.
fn close_with_netlink(inode: u32, path: PathBuf, port: u16, wanted: &Wanted) -> Result<u64> {
    let wanted = wanted.clone();
    netns::run_in(inode, &path, move || -> Result<u64> {
        let sockets = sockdiag::query(&Query {
            local_port: port,
            states: state::bit(state::ESTABLISHED) | state::bit(state::CLOSE_WAIT),
            with_info: false,
        })?;
        let mut closed = 0;
        for socket in sockets
            .iter()
            .filter(|socket| wanted.contains(&(canonical(socket.local), canonical(socket.remote))))
        {
            match sockdiag::destroy(socket) {
                Ok(()) => closed += 1,
                // Closed between the dump and now: nothing left to do.
                Err(error) if is_enoent(&error) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(closed)
    })
}

fn is_enoent(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|cause| cause.raw_os_error() == Some(libc::ENOENT))
}

/// The map key of a connection; `None` when the two ends are of different families (no
/// such TCP connection exists).
fn destroy_key(local: SocketAddr, remote: SocketAddr) -> Option<DestroyKey> {
    let mut key = DestroyKey {
        local_port: local.port(),
        remote_port: remote.port(),
        ..DestroyKey::default()
    };
    match (local.ip(), remote.ip()) {
        (IpAddr::V4(local), IpAddr::V4(remote)) => {
            key.family = AF_INET;
            key.local_addr[..4].copy_from_slice(&local.octets());
            key.remote_addr[..4].copy_from_slice(&remote.octets());
        }
        (IpAddr::V6(local), IpAddr::V6(remote)) => {
            key.family = AF_INET6;
            key.local_addr = local.octets();
            key.remote_addr = remote.octets();
        }
        _ => return None,
    }
    Some(key)
}

/// The drains' [`crate::closer::Closer`]: closes through the kernel with the chosen method
/// (`bpf_sock_destroy` where it loaded, else netlink), and finds listeners for the gate.
pub struct KernelCloser {
    pub kernel: std::sync::Arc<std::sync::Mutex<Kernel>>,
    pub maps: std::sync::Arc<super::KernelMaps>,
    pub method: CloseMethod,
    /// Why `method` cannot close anything with the agent's capabilities
    /// (`agent::kernel_side::close_problem`), if it cannot.
    pub unavailable: Option<String>,
}

impl crate::closer::Closer for KernelCloser {
    fn close(&self, filter: &Filter, targets: &[Peer]) -> Result<u64> {
        let mut kernel = self
            .kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        kernel.close_connections(filter, targets, self.method)
    }

    fn listeners(&self, filter: &Filter) -> Result<Vec<u64>> {
        self.maps.listeners(filter)
    }

    fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fold_v4_mapped_addresses() {
        let local = canonical("[::ffff:10.0.0.1]:80".parse().expect("addr"));
        let remote = canonical("[::ffff:10.0.0.2]:5000".parse().expect("addr"));
        let key = destroy_key(local, remote).expect("same family");
        assert_eq!(key.family, AF_INET);
        assert_eq!(key.local_port, 80);
        assert_eq!(key.remote_port, 5000);
        assert_eq!(key.local_addr[..4], [10, 0, 0, 1]);
        assert_eq!(key.remote_addr[..4], [10, 0, 0, 2]);
        assert!(key.local_addr[4..].iter().all(|b| *b == 0));
        let v6 = destroy_key(
            "[fd00::1]:80".parse().expect("addr"),
            "[fd00::2]:1".parse().expect("addr"),
        )
        .expect("same family");
        assert_eq!(v6.family, AF_INET6);
        assert!(
            destroy_key(
                "10.0.0.1:80".parse().expect("addr"),
                "[fd00::2]:1".parse().expect("addr")
            )
            .is_none()
        );
    }
}
