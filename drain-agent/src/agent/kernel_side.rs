//! The loaded kernel as the other rooms see it: the close method asked for, checked against
//! what this kernel loaded, and the own-endpoint map and port steering of the pod listeners
//! ([`OwnEndpoints`]).

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Result, ensure};
use log::info;

use crate::{
    cli::CloseArg,
    http::pods::OwnEndpoints,
    kernel::{Kernel, destroy::CloseMethod},
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

/// The kernel's own-endpoint map, for the pod listeners.
pub struct KernelEndpoints(pub Arc<Mutex<Kernel>>);

impl OwnEndpoints for KernelEndpoints {
    fn ignore(&self, netns: u32, addr: std::net::SocketAddr) -> Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ignore_own_endpoint(netns, addr)
    }

    fn forget(&self, netns: u32, port: u16) -> Result<()> {
        let mut kernel = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kernel.unsteer_pod_port(netns);
        kernel.forget_own_endpoint(netns, port)
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
    ) -> Result<crate::kernel::steer::SteerLink> {
        let lock = || self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Before the program is attached: the first steered connection is the agent's.
        let seeder = {
            let mut kernel = lock();
            kernel.ignore_steered_endpoint(netns, target.port())?;
            kernel.pod_listener_seeder()
        };
        // The count of the namespace's listeners walks the whole TCP hash: not under the
        // lock, which every other pod being opened (and the walks) need.
        let counted =
            seeder.and_then(|link| crate::kernel::count_pod_listeners(link, netns, netns_file));
        let mut kernel = lock();
        let steered =
            counted.and_then(|()| kernel.steer_pod_port(target, netns, netns_file, socket));
        if steered.is_err() {
            kernel.unsteer_pod_port(netns);
            let _ = kernel.forget_own_endpoint(netns, target.port());
        }
        steered
    }
}
