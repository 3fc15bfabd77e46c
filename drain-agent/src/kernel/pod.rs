//! The in-pod port (`--pod-listen`): the agent's own endpoints left uncounted, the
//! `iter/tcp` seeder that counts a pod namespace's application listeners, and the
//! `sk_lookup` steering of the port to the agent where there are none (`steer`).

use std::{collections::BTreeMap, net::SocketAddr, sync::PoisonError};

use anyhow::{Context as _, Result, anyhow, ensure};
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
    /// [`Kernel::steer_pod_port`] with the registration it returns beside the seed. If a
    /// later step fails, [`Kernel::forget_own_endpoint`] (this one undoes its own mark when
    /// it fails).
    pub fn pod_listener_seeder(&mut self, netns: u32, port: u16) -> Result<(OwnEndpoint, PodSeed)> {
        self.steering
            .as_ref()
            .map_err(|problem| anyhow!("{problem}"))?;
        // Before the mark: with no grace period to wait for, the seed could miss a listener
        // whose listen() ran before the mark for as long as that run is preempted.
        let grace = self.grace_periods()?.try_clone()?;
        let endpoint = self.register_own_endpoint(netns, port, drain_agent_common::OWN_SEEDING)?;
        match self.attach_pod_seeder(grace) {
            Ok(seed) => Ok((endpoint, seed)),
            Err(problem) => {
                let _ = self.forget_own_endpoint(endpoint);
                Err(problem)
            }
        }
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

    /// Steers the in-pod port of the namespace of `endpoint` (its file `netns_file`) to
    /// `socket`, the agent's listener there, while no application listens on that port
    /// there. Call it after [`count_pod_listeners`] counted the listeners that began before
    /// the handler was attached, so the count is never too low when the program starts
    /// reading it. Dropping the link detaches the program; [`Kernel::forget_own_endpoint`]
    /// of `endpoint` forgets the socket.
    pub fn steer_pod_port(
        &mut self,
        target: std::net::SocketAddr,
        endpoint: &OwnEndpoint,
        netns_file: &std::fs::File,
        socket: std::os::fd::BorrowedFd<'_>,
    ) -> Result<steer::SteerLink> {
        self.own_registrations.ensure_latest(endpoint)?;
        self.steering
            .as_mut()
            .map_err(|problem| anyhow!("{problem}"))?
            .steer(target, endpoint.netns, netns_file, socket)
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

    /// Leaves connections to the agent's own listener bound at `addr` in the namespace
    /// `netns` uncounted: they are not a service's, and must not take a slot. The map marks
    /// the port, not the address: the address is kept for the answers about that port,
    /// which doubt the count while another program uses the port there
    /// ([`KernelMaps::own_port_shared`](super::maps::KernelMaps::own_port_shared)).
    /// Returns the registration that [`Kernel::forget_own_endpoint`] undoes.
    pub fn ignore_own_endpoint(&mut self, netns: u32, addr: SocketAddr) -> Result<OwnEndpoint> {
        // Known before the first connection goes uncounted.
        self.maps
            .own_bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((netns, addr.port()), addr);
        self.register_own_endpoint(netns, addr.port(), drain_agent_common::OWN_BOUND)
    }

    /// [`Kernel::ignore_own_endpoint`] for a port steered to the agent (`steer`), registered
    /// by [`Kernel::pod_listener_seeder`]: its connections are the agent's only while no
    /// application listens on it there.
    pub fn ignore_steered_endpoint(&mut self, endpoint: &OwnEndpoint) -> Result<()> {
        self.own_registrations.ensure_latest(endpoint)?;
        self.mark_own_endpoint(
            endpoint.netns,
            endpoint.port,
            drain_agent_common::OWN_STEERED,
        )
    }

    /// A new registration of (`netns`, `port`), marked `how`; the mark undone if it fails.
    fn register_own_endpoint(&mut self, netns: u32, port: u16, how: u8) -> Result<OwnEndpoint> {
        let endpoint = self.own_registrations.register(netns, port);
        match self.mark_own_endpoint(netns, port, how) {
            Ok(()) => Ok(endpoint),
            Err(problem) => {
                let _ = self.forget_own_endpoint(endpoint);
                Err(problem)
            }
        }
    }

    fn mark_own_endpoint(&mut self, netns: u32, port: u16, how: u8) -> Result<()> {
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

    /// Undoes `endpoint`'s registration (its listener is closed, its steering link dropped):
    /// connections to its port in its namespace are counted again, and the namespace's
    /// socket for `sk_lookup` is forgotten. The port's bit in the own-ports bitmap stays: it
    /// only sends the handler to look. Nothing is undone when (namespace, port) was
    /// registered again since: this forget came late (it waits for the kernel's lock, which
    /// a walk holds for minutes), the namespace went meanwhile, and its inode is another
    /// namespace's now, served already ([`OwnRegistrations`]).
    pub fn forget_own_endpoint(&mut self, endpoint: OwnEndpoint) -> Result<()> {
        if !self.own_registrations.release(&endpoint) {
            return Ok(());
        }
        let OwnEndpoint { netns, port, .. } = endpoint;
        if let Ok(steering) = self.steering.as_mut() {
            steering.unsteer(netns);
        }
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

/// One registration of the agent's own endpoint in a namespace (its inode) on a port: the
/// mark in `OWN_ENDPOINTS` that leaves its connections uncounted (and, on the in-pod port,
/// has the namespace's listeners counted), and for a steered one the namespace's socket for
/// `sk_lookup`. Made by [`Kernel::ignore_own_endpoint`] and [`Kernel::pod_listener_seeder`],
/// undone by [`Kernel::forget_own_endpoint`], which takes it: one forget each.
#[derive(Debug, PartialEq, Eq)]
pub struct OwnEndpoint {
    netns: u32,
    port: u16,
    /// Which registration of (`netns`, `port`) this is ([`OwnRegistrations`]).
    generation: u64,
}

/// The latest registration of each (namespace, port) that has one: a namespace's inode is
/// reused once it is gone (the kernel hands the lowest free one out again), so a pod
/// listener's forget, which can run minutes after its listener closed, may find the inode
/// served again, another pod's; it undoes only its own registration, never a later one.
/// Kept beside the maps under the kernel's lock, so a check and the change it allows are
/// one step.
#[derive(Debug, Default)]
pub struct OwnRegistrations {
    latest: BTreeMap<(u32, u16), u64>,
    /// Generations handed out so far: each registration gets the next.
    issued: u64,
}

impl OwnRegistrations {
    /// A new registration of (`netns`, `port`), the latest from now on.
    pub fn register(&mut self, netns: u32, port: u16) -> OwnEndpoint {
        self.issued += 1;
        self.latest.insert((netns, port), self.issued);
        OwnEndpoint {
            netns,
            port,
            generation: self.issued,
        }
    }

    /// Whether `endpoint` is its (namespace, port)'s latest registration.
    fn is_latest(&self, endpoint: &OwnEndpoint) -> bool {
        self.latest.get(&(endpoint.netns, endpoint.port)) == Some(&endpoint.generation)
    }

    /// An error unless `endpoint` is its (namespace, port)'s latest registration.
    fn ensure_latest(&self, endpoint: &OwnEndpoint) -> Result<()> {
        ensure!(
            self.is_latest(endpoint),
            "network namespace {}: the agent's own endpoint on port {} was registered again meanwhile",
            endpoint.netns,
            endpoint.port
        );
        Ok(())
    }

    /// Drops `endpoint`'s registration if it is the latest of its (namespace, port), and
    /// says whether it was (then its marks are to be undone; otherwise they are a later
    /// registration's).
    pub fn release(&mut self, endpoint: &OwnEndpoint) -> bool {
        let latest = self.is_latest(endpoint);
        if latest {
            self.latest.remove(&(endpoint.netns, endpoint.port));
        }
        latest
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
