//! The loaded kernel as the other rooms see it: the close method asked for, checked against
//! what this kernel loaded, and the own-endpoint map and port steering of the pod listeners
//! ([`OwnEndpoints`]).

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Result, ensure};
use log::{info, warn};
use rustix::thread::CapabilitySet;

use crate::{
    cli::CloseArg,
    http::pods::{OwnEndpoints, SteeredPort},
    kernel::{Kernel, OwnEndpoint, destroy::CloseMethod},
};

/// The close method asked for, checked against what this kernel loaded.
pub fn close_method(asked: CloseArg, kernel: &Kernel) -> Result<CloseMethod> {
    Ok(match asked {
        CloseArg::Netlink => CloseMethod::Netlink,
        CloseArg::Auto if kernel.can_close_with_bpf() => CloseMethod::Bpf,
        CloseArg::Auto => {
            if let Some(problem) = kernel.bpf_close_problem() {
                info!("bpf_sock_destroy is not available ({problem}); closing through netlink");
            }
            CloseMethod::Netlink
        }
        CloseArg::BpfSockDestroy => {
            ensure!(
                kernel.can_close_with_bpf(),
                "--close-method bpf-sock-destroy: not available on this kernel: {}",
                kernel.bpf_close_problem().unwrap_or("unknown reason")
            );
            CloseMethod::Bpf
        }
    })
}

/// Why connections cannot be closed with `method` by this process, if they cannot
/// (`asked`: the `--close-method` that chose it, to say why this method).
///
/// The netlink method's `SOCK_DESTROY` is refused by the kernel's `sock_diag_destroy()`
/// unless the caller has `CAP_NET_ADMIN` over the socket's network namespace: without it in
/// the agent's effective set every close fails (`EPERM`). The namespaces it closes in, the
/// host's and its pods', are the initial user namespace's or its descendants', where the
/// agent's own set is what counts. `bpf_sock_destroy()` checks no capability of its own
/// (loading and running the iterator takes `CAP_BPF` and `CAP_PERFMON`, which the start
/// already needed): [`CloseMethod::Bpf`] has no such problem.
pub fn close_problem(method: CloseMethod, asked: CloseArg) -> Option<String> {
    match method {
        CloseMethod::Bpf => None,
        CloseMethod::Netlink => match rustix::thread::capabilities(None) {
            Ok(sets) => netlink_problem(sets.effective.contains(CapabilitySet::NET_ADMIN), asked),
            // capget() on this thread does not fail on Linux: should it, the closes will
            // say what the kernel thinks, as before.
            Err(errno) => {
                warn!(
                    "cannot read the agent's capabilities ({errno}): whether connections can be closed through netlink is not known until one is"
                );
                None
            }
        },
    }
}

/// The netlink method's problem, given whether `CAP_NET_ADMIN` is effective.
fn netlink_problem(net_admin: bool, asked: CloseArg) -> Option<String> {
    if net_admin {
        return None;
    }
    let why_netlink = match asked {
        CloseArg::Netlink => "as --close-method netlink asks",
        CloseArg::Auto | CloseArg::BpfSockDestroy => {
            "bpf_sock_destroy() is not usable on this kernel (Linux < 6.5)"
        }
    };
    Some(format!(
        "connections are closed through netlink SOCK_DESTROY ({why_netlink}), which needs CAP_NET_ADMIN, and the agent does not have it (grant CAP_NET_ADMIN: deploy/README.md)"
    ))
}

/// The kernel's own-endpoint map, for the pod listeners.
pub struct KernelEndpoints(pub Arc<Mutex<Kernel>>);

impl OwnEndpoints for KernelEndpoints {
    fn ignore(&self, netns: u32, addr: std::net::SocketAddr) -> Result<OwnEndpoint> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ignore_own_endpoint(netns, addr)
    }

    fn forget(&self, own: OwnEndpoint) -> Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget_own_endpoint(own)
    }

    fn steering_problem(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .steering_problem()
            .map(str::to_owned)
    }

    fn steering_stopped(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .steering_stopped()
    }

    fn steer(
        &self,
        target: std::net::SocketAddr,
        netns: u32,
        netns_file: &std::fs::File,
        socket: std::os::fd::BorrowedFd<'_>,
    ) -> Result<SteeredPort> {
        let lock = || self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Listeners on the in-pod port are counted only in namespaces marked served: mark
        // this one (`OWN_SEEDING`, a registration of its own: a late forget of an earlier
        // listener on this inode leaves it alone), wait until every handler run sees the
        // mark, then count the listeners from before (the eBPF side's `pod_listen::served`
        // says why this order counts each once, never too low).
        let (own, seed) = lock().pod_listener_seeder(netns, target.port())?;
        // The wait and the walk of the whole TCP hash: not under the lock, which every
        // other pod being opened (and the walks) need.
        let counted = crate::kernel::count_pod_listeners(seed, netns, netns_file);
        let mut kernel = lock();
        // Before the program is attached: the first steered connection is the agent's.
        let steered = counted
            .and_then(|()| kernel.ignore_steered_endpoint(&own))
            .and_then(|()| kernel.steer_pod_port(target, &own, netns_file, socket));
        match steered {
            Ok(link) => Ok(SteeredPort { link, own }),
            Err(problem) => {
                let _ = kernel.forget_own_endpoint(own);
                Err(problem)
            }
        }
    }

    fn handler_skips(&self) -> Result<Option<u64>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handler_skips()
    }

    fn pod_listeners_counted(&self, netns: u32) -> Result<bool> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pod_listeners_counted(netns)
    }

    fn recount_pod_listeners(&self, netns: u32, netns_file: &std::fs::File) -> Result<()> {
        let seeder = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pod_listener_reseeder()?;
        // Not under the lock, as in `steer`.
        crate::kernel::count_pod_listeners(seeder, netns, netns_file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without CAP_NET_ADMIN the netlink method cannot close anything, and the problem says
    /// so and why that method; with it, or with `bpf_sock_destroy()`, there is none.
    #[test]
    fn netlink_without_net_admin_is_a_problem() {
        for asked in [CloseArg::Auto, CloseArg::Netlink] {
            let problem = netlink_problem(false, asked).expect("a problem");
            assert!(problem.contains("CAP_NET_ADMIN"), "{problem}");
            assert!(problem.contains("SOCK_DESTROY"), "{problem}");
            assert_eq!(netlink_problem(true, asked), None);
        }
        assert!(
            netlink_problem(false, CloseArg::Netlink)
                .is_some_and(|problem| problem.contains("--close-method netlink"))
        );
        assert_eq!(close_problem(CloseMethod::Bpf, CloseArg::Auto), None);
    }
}
