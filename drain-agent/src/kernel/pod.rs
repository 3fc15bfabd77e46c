//! The in-pod port (`--pod-listen`): the agent's own endpoints left uncounted, the
//! `iter/tcp` seeder that counts a pod namespace's application listeners, and the
//! `sk_lookup` steering of the port to the agent where there are none (`steer`).

use std::{net::SocketAddr, sync::PoisonError};

use anyhow::{Context as _, Result, anyhow};
use aya::Ebpf;
use drain_agent_common::{netns_port_key, watched_bit};

use super::{Kernel, steer};

impl Kernel {
    /// Why the in-pod port cannot be steered with `sk_lookup` here (then pod listeners bind
    /// it themselves, the old way), or `None` when it can.
    pub fn steering_problem(&self) -> Option<&str> {
        self.steering.as_ref().err().map(String::as_str)
    }

    /// Whether the `sk_lookup` programs stopped steering because a listener on the in-pod
    /// port may have gone uncounted (`error_index::POD_LISTEN_COUNT_FAILED`; for good).
    pub fn steering_stopped(&self) -> bool {
        self.steering.is_ok()
            && self
                .maps
                .error_count(drain_agent_common::error_index::POD_LISTEN_COUNT_FAILED)
                .is_ok_and(|count| count > 0)
    }

    /// Starts counting the listeners on the in-pod port `port` of the namespace `netns`:
    /// marks it served (`OWN_SEEDING`: the handler counts its listeners from now on, and
    /// only in namespaces so marked) and returns the seed that counts the listeners from
    /// before (`seed_pod_listeners`): run it with [`count_pod_listeners`] inside the
    /// namespace *without* holding the kernel's lock (it waits for a grace period, then
    /// walks the whole TCP hash, 1–8 ms per namespace: 300 pods opened after a restart
    /// waited on each other's walks), then [`Kernel::ignore_steered_endpoint`] and
    /// [`Kernel::steer_pod_port`]. If any step fails, [`Kernel::forget_own_endpoint`].
    pub fn pod_listener_seeder(&mut self, netns: u32, port: u16) -> Result<PodSeed> {
        self.steering
            .as_ref()
            .map_err(|problem| anyhow!("{problem}"))?;
        // Before the mark: with no grace period to wait for, the seed could miss a listener
        // whose listen() ran before the mark for as long as that run is preempted.
        let grace = self.grace_periods()?.try_clone()?;
        self.ignore_own_endpoint_as(netns, port, drain_agent_common::OWN_SEEDING)?;
        self.attach_pod_seeder(grace)
    }

    /// [`Kernel::pod_listener_seeder`] for a namespace served already (its mark stays:
    /// `OWN_STEERED`, the handler counts its listeners and the agent's connections there are
    /// its own): the pod manager's recount after a skipped handler run
    /// (`http/pods/recount.rs`). The seed cannot count a listener twice (`POD_LISTENERS`).
    pub fn pod_listener_reseeder(&mut self) -> Result<PodSeed> {
        self.steering
            .as_ref()
            .map_err(|problem| anyhow!("{problem}"))?;
        let grace = self.grace_periods()?.try_clone()?;
        self.attach_pod_seeder(grace)
    }

    /// The pod listener seed's iterator, attached, with `grace` to wait on before it runs.
    fn attach_pod_seeder(&mut self, grace: super::rcu::GracePeriods) -> Result<PodSeed> {
        let seeder: &mut aya::programs::Iter = self
            .ebpf
            .program_mut(POD_SEEDER)
            .context("the eBPF object has no pod listener seeder")?
            .try_into()
            .context("the pod listener seeder is not an iterator")?;
        let link = super::walk::iterator_link(seeder, "the iter/tcp iterator")?;
        Ok(PodSeed { link, grace })
    }

    /// Steers the in-pod port of the namespace `netns` (its file `netns_file`) to `socket`,
    /// the agent's listener there, while no application listens on that port there. Call it
    /// after [`count_pod_listeners`] counted the listeners that began before the handler was
    /// attached, so the count is never too low when the program starts reading it. Dropping
    /// the link detaches the program.
    pub fn steer_pod_port(
        &mut self,
        target: std::net::SocketAddr,
        netns: u32,
        netns_file: &std::fs::File,
        socket: std::os::fd::BorrowedFd<'_>,
    ) -> Result<steer::SteerLink> {
        self.steering
            .as_mut()
            .map_err(|problem| anyhow!("{problem}"))?
            .steer(target, netns, netns_file, socket)
    }

    /// Whether the kernel side counts an application listener on the in-pod port in `netns`
    /// now (then its program steers nothing there).
    pub fn pod_listeners_counted(&self, netns: u32) -> Result<bool> {
        self.steering
            .as_ref()
            .map_err(|problem| anyhow!("{problem}"))?
            .counted(netns)
    }

    /// Runs of the attached handler the kernel skipped so far, or `None` where this kernel
    /// does not count them all (`Doubt::SkipsUnseen`: the classic tracepoint before 6.7).
    pub fn handler_skips(&self) -> Result<Option<u64>> {
        if self
            .maps
            .old_kernel_doubts()
            .contains(&crate::doubt::Doubt::SkipsUnseen)
        {
            return Ok(None);
        }
        self.maps.handler_skipped_runs().map(Some)
    }

    /// Forgets the agent's socket in `netns` (after its link was dropped).
    pub fn unsteer_pod_port(&mut self, netns: u32) {
        if let Ok(steering) = self.steering.as_mut() {
            steering.unsteer(netns);
        }
    }

    /// Leaves connections to the agent's own listener bound at `addr` in the namespace
    /// `netns` uncounted: they are not a service's, and must not take a slot. The map marks
    /// the port, not the address: the address is kept for the answers about that port,
    /// which doubt the count while another program uses the port there
    /// ([`KernelMaps::own_port_shared`](super::maps::KernelMaps::own_port_shared)).
    pub fn ignore_own_endpoint(&mut self, netns: u32, addr: SocketAddr) -> Result<()> {
        // Known before the first connection goes uncounted.
        self.maps
            .own_bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((netns, addr.port()), addr);
        self.ignore_own_endpoint_as(netns, addr.port(), drain_agent_common::OWN_BOUND)
    }

    /// [`Kernel::ignore_own_endpoint`] for a port steered to the agent (`steer`): its
    /// connections are the agent's only while no application listens on it there.
    pub fn ignore_steered_endpoint(&mut self, netns: u32, port: u16) -> Result<()> {
        self.ignore_own_endpoint_as(netns, port, drain_agent_common::OWN_STEERED)
    }

    fn ignore_own_endpoint_as(&mut self, netns: u32, port: u16, how: u8) -> Result<()> {
        self.own_endpoints
            .insert(netns_port_key(netns, port), how, 0)
            .context("cannot record the agent's own endpoint")?;
        let (word, mask) = watched_bit(port);
        let bits = self.own_ports.get(&word, 0).context("own-ports bitmap")?;
        self.own_ports
            .set(word, bits | mask, 0)
            .context("own-ports bitmap")?;
        Ok(())
    }

    /// Counts connections to `port` in `netns` again (a pod listener there is closed). The
    /// port's bit in the own-ports bitmap stays: it only sends the handler to look.
    pub fn forget_own_endpoint(&mut self, netns: u32, port: u16) -> Result<()> {
        match self.own_endpoints.remove(&netns_port_key(netns, port)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(problem) => return Err(problem).context("cannot forget an own endpoint"),
        }
        self.maps
            .own_bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(netns, port));
        Ok(())
    }
}

/// The `iter/tcp` program that counts a pod namespace's listeners on the in-pod port.
const POD_SEEDER: &str = "seed_pod_listeners";

/// A pod namespace's listener count, started ([`Kernel::pod_listener_seeder`]): the seed
/// walk, and what to wait on before it.
pub struct PodSeed {
    link: aya::programs::iter::IterLink,
    grace: super::rcu::GracePeriods,
}

/// Runs the pod listener seeder (`seed`, from [`Kernel::pod_listener_seeder`]) in the
/// namespace `netns` (its file `netns_file`): the iterator walks the namespace of whoever
/// creates its file, so that is done inside. First it waits for a grace period: every
/// handler run that missed the namespace's mark has then ended, and the `listen()` it ran
/// for is in the listening hash before the walk passes its bucket, or at most microseconds
/// after (the one gap, INVARIANTS.md: counted by the next walk; the eBPF side's `served`
/// says why the count is otherwise exact).
pub fn count_pod_listeners(seed: PodSeed, netns: u32, netns_file: &std::fs::File) -> Result<()> {
    let PodSeed { link, grace } = seed;
    grace
        .wait()
        .context("cannot wait for the handler to see the namespace served")?;
    let namespace = netns_file
        .try_clone()
        .context("cannot duplicate the namespace file")?;
    crate::sys::netns::run_in_file(namespace, format!("{netns}"), move || {
        super::walk::run_iterator(link, "the iterator")
    })
    .with_context(|| format!("cannot count the listeners of network namespace {netns}"))
}

pub(super) fn load_pod_seeder(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<()> {
    let seeder: &mut aya::programs::Iter = ebpf
        .program_mut(POD_SEEDER)
        .context("the eBPF object has no pod listener seeder")?
        .try_into()
        .context("the pod listener seeder is not an iterator")?;
    seeder
        .load("tcp", btf)
        .context("cannot load the iter/tcp pod listener seeder (Linux >= 5.9 needed)")
}
