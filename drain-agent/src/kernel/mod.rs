//! The kernel side, from user space: load the programs, pick how to attach, seed the
//! connections that already exist, and read the maps. Dropping [`Kernel`] detaches it all.

pub mod attach;
pub mod btf;
pub mod destroy;
pub mod events;
mod forget;
pub mod maps;
pub mod pin;
mod prealloc;
mod raw;
mod rcu;
pub mod reclaim;
pub mod reuseport;
mod source;
pub mod steer;
pub mod walk;

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, RingBuf},
};
use drain_agent_common::{ConnCounts, ConnEvent, ConnKey, SockEntry, netns_port_key, watched_bit};
use log::{debug, info, warn};

use self::attach::{TRACEPOINT_CATEGORY, TRACEPOINT_NAME, attach};
use self::btf::{Btf, LoadingBtf, VMLINUX_BTF, Wanted};
use self::pin::{Adoptable, PinDir, Publication};
use self::walk::load_walker;
pub use self::{
    attach::AttachMethod,
    maps::KernelMaps,
    pin::{KernelState, Origin},
    reclaim::{RECLAIM_IDLE, ReclaimReport},
    walk::{RepairReport, WalkReport},
};

/// The eBPF object, built by build.rs from drain-agent-ebpf and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drain-agent"));

/// Sizes and choices made at load time.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// Capacity of the per-socket map: connections tracked at once.
    pub max_connections: u32,
    /// Capacity of the per-endpoint maps: (netns, address, port) keys.
    pub max_endpoints: u32,
    /// Attach only this way (default: the first of [`AttachMethod::ALL`] that works).
    pub attach: Option<AttachMethod>,
    /// Connections open before start are not counted by a walk at start.
    pub no_seed: bool,
    /// Reserve the per-socket map's memory at start (`prealloc`).
    pub preallocate_sockets: bool,
    /// The in-pod port of `--pod-listen` (0: none): application listeners on it are counted
    /// per namespace, and the port is steered to the agent where there are none (`steer`).
    pub pod_port: u16,
    /// Where the handler's link and the counting maps are pinned (`pin`), adopted from an
    /// earlier agent and left for the next one; `None`: nothing outlives the agent.
    pub pin_dir: Option<PathBuf>,
}

/// The choices besides the object's bytes that make a pinned layout unfit for this agent:
/// map sizes and flags, how the handler is attached, what it counts (the in-pod port, the
/// kernel's field offsets).
fn layout_facts(options: &KernelOptions, offsets: &drain_agent_common::KernelOffsets) -> String {
    format!(
        "max_connections={} max_endpoints={} preallocate_sockets={} attach={} pod_port={} offsets={offsets:?}",
        options.max_connections,
        options.max_endpoints,
        options.preallocate_sockets,
        options.attach.map_or("any", AttachMethod::name),
        options.pod_port,
    )
}

/// The loaded and attached programs, and the maps the agent reads.
pub struct Kernel {
    /// Owns the programs and their links; dropping it detaches them.
    ebpf: Ebpf,
    attach: AttachMethod,
    maps: Arc<KernelMaps>,
    events: Option<RingBuf<MapData>>,
    /// Every tracked socket, for the sweep after a walk.
    sockets: HashMap<MapData, u64, SockEntry>,
    /// The walker's listener map, emptied before each walk.
    listeners: HashMap<MapData, u64, u8>,
    /// Ports of open sockets a walk could not call passive or not, emptied before each walk.
    unsure_ports: HashMap<MapData, u16, u8>,
    /// A second handle on the endpoint counters, to delete reclaimed ones.
    counts: HashMap<MapData, ConnKey, ConnCounts>,
    retiring: HashMap<MapData, ConnKey, u8>,
    retiring_ports: Array<MapData, u64>,
    /// Addresses whose dead sockets' entries are being dropped, and the flag in front.
    forgetting: HashMap<MapData, u64, u8>,
    forgetting_now: Array<MapData, u64>,
    own_endpoints: HashMap<MapData, u64, u8>,
    own_ports: Array<MapData, u64>,
    /// Why walks cannot run on this kernel, if they cannot.
    walker_problem: Option<String>,
    /// Why no RCU grace period can be waited for here, if it cannot (`rcu`): then idle
    /// endpoints are not reclaimed and missed closes are not swept.
    no_grace_period: Option<String>,
    /// The `bpf_sock_destroy()` iterator's maps, and whether it loaded.
    closer: destroy::Closer,
    /// Capacity of the endpoint map (reclaim pressure).
    max_endpoints: u32,
    /// The in-pod port's `sk_lookup` steering, or why it cannot be used here.
    steering: Result<steer::Steering, String>,
    /// The agent's own fd on the handler's link (none for an adopted handler, whose pin
    /// holds it, nor for the classic tracepoint's perf link, kept inside `ebpf`): closing
    /// it detaches the handler unless it is pinned.
    #[expect(
        dead_code,
        reason = "held for its drop: closing it detaches an unpinned handler"
    )]
    handler_link: Option<OwnedFd>,
    /// Where the counting state came from, and whether it is pinned.
    state: Arc<KernelState>,
    /// This agent's handler and shared maps, until they are pinned (`take_ownership`).
    publication: Option<Publication>,
    /// A pin directory was asked for.
    pin_wanted: bool,
    /// Tells a thread waiting for the pin directory's lock to give up (`Drop`).
    pin_stop: Arc<AtomicBool>,
    /// The pin directory, its lock held, once this agent owns it.
    pin_lock: Arc<Mutex<Option<PinDir>>>,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // A thread still waiting for the lock must not pin (and so keep attached) a handler
        // whose agent has let go of it.
        self.pin_stop.store(true, Ordering::Relaxed);
    }
}

/// Attaches the handler with the first method of `asked` (all of them, in order, when
/// `None`) that works.
fn attach_first(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    asked: Option<AttachMethod>,
) -> Result<(AttachMethod, Option<OwnedFd>)> {
    let candidates: Vec<AttachMethod> = match asked {
        Some(method) => vec![method],
        None => AttachMethod::ALL.to_vec(),
    };
    let mut failures = Vec::new();
    for method in candidates {
        match attach(ebpf, btf, method) {
            Ok(link) => {
                info!("attached to {TRACEPOINT_CATEGORY}:{TRACEPOINT_NAME} with {method}");
                return Ok((method, link));
            }
            Err(error) => {
                let why = one_line(&error);
                warn!("cannot attach with {method}: {why}");
                failures.push(format!("{method}: {why}"));
            }
        }
    }
    Err(anyhow!(
        "cannot attach to the {TRACEPOINT_CATEGORY}:{TRACEPOINT_NAME} tracepoint (Linux >= 4.16 needed) in any way: {}",
        failures.join("; ")
    ))
}

/// The kernel types the loader looks up by id: the `tp_btf` handler's tracepoint, the
/// `iter/tcp` programs' target, the kfunc of [`destroy`].
fn loading_btf(btf: &Btf) -> Result<LoadingBtf> {
    let tracepoint = format!("btf_trace_{TRACEPOINT_NAME}");
    btf.loading_btf(&[
        Wanted::Typedef(&tracepoint),
        Wanted::Func(walk::ITER_TCP),
        Wanted::Func(destroy::KFUNC),
    ])
}

impl Kernel {
    /// Loads the programs and attaches the state-change handler (not yet seeded), or, with
    /// a pin directory (`pin`), adopts the handler and maps an earlier agent pinned there.
    pub fn load(options: &KernelOptions) -> Result<Self> {
        ensure!(
            options.max_connections > 0,
            "--max-connections must be at least 1"
        );
        ensure!(
            options.max_endpoints > 0,
            "--max-endpoints must be at least 1"
        );
        raise_memlock_limit();
        // The kernel's BTF is read once, for the field offsets and the ids the loader
        // needs, and dropped before loading (see `Btf::loading_btf`).
        let (offsets, loading) = Btf::from_file(Path::new(VMLINUX_BTF))
            .and_then(|btf| Ok((btf.kernel_offsets()?, loading_btf(&btf)?)))
            .context("cannot find socket field offsets in the kernel's BTF (is CONFIG_DEBUG_INFO_BTF set?)")?;
        debug!("kernel offsets: {offsets:?}");
        let pins = match &options.pin_dir {
            Some(dir) => PinDir::open(
                dir,
                pin::layout_name(EBPF_OBJECT, &layout_facts(options, &offsets)),
            )?,
            None => None,
        };
        let held = pins.as_ref().map(PinDir::try_lock).transpose()?;
        let mut adopted = None;
        if let (Some(pins), Some(true)) = (&pins, held) {
            match pins.adoptable() {
                Some(found) => {
                    match Self::load_from(options, &offsets, loading.clone().build()?, Some(&found))
                    {
                        Ok(kernel) => {
                            info!(
                                "kernel state adopted from {}: the pinned handler kept counting while no agent ran (attached with {}); a repair walk checks it before it is vouched for",
                                found.dir.display(),
                                found.method
                            );
                            adopted = Some(kernel);
                        }
                        Err(problem) => warn!(
                            "kernel state made new: cannot adopt the pinned state at {} ({problem:#}); it is replaced once this agent's handler is attached",
                            found.dir.display()
                        ),
                    }
                }
                None => info!("kernel state made new: {}", pins.why_not_adopted()),
            }
        }
        let mut kernel = match adopted {
            Some(kernel) => kernel,
            None => Self::load_from(options, &offsets, loading.build()?, None)?,
        };
        kernel.take_ownership(pins, held.unwrap_or(false))?;
        Ok(kernel)
    }

    /// What happens to the pin directory once the state is loaded (see `pin`): the lock
    /// holder keeps what it adopted or pins what it made, and removes every other layout
    /// (only now, with its handler in place); an agent that found the lock held pins its
    /// state when the other agent is gone.
    fn take_ownership(&mut self, pins: Option<PinDir>, held: bool) -> Result<()> {
        let Some(pins) = pins else {
            if self.pin_wanted {
                // `PinDir::open` said why.
                return Ok(());
            }
            info!(
                "kernel state made new and not pinned (--no-pin): counting stops when the agent stops"
            );
            return Ok(());
        };
        if held {
            match self.publication.take() {
                // Adopted: the pins are in place already.
                None if self.state.origin == Origin::Adopted => {}
                None => warn!(
                    "kernel state is not pinned: the handler attached with {} has no link that can be pinned; counting stops when the agent stops",
                    self.attach
                ),
                Some(publication) => match pins.publish(&publication) {
                    Ok(()) => {
                        self.state = Arc::new(KernelState::new(Origin::New, true));
                        info!("kernel state pinned at {}", pins.layout_display());
                    }
                    Err(problem) => warn!(
                        "kernel state is not pinned (counting stops when the agent stops): {problem:#}"
                    ),
                },
            }
            // Whatever this agent pinned, other layouts are stale, and its handler is in place.
            pins.remove_others();
            *self.pin_lock.lock().unwrap_or_else(PoisonError::into_inner) = Some(pins);
            return Ok(());
        }
        let Some(publication) = self.publication.take() else {
            warn!(
                "kernel state is not pinned: the handler attached with {} has no link that can be pinned; counting stops when the agent stops",
                self.attach
            );
            return Ok(());
        };
        info!(
            "kernel state made new, not pinned for now: another agent holds {} (an upgrade's overlap); this agent counts with state of its own and pins it there when that agent is gone",
            pins.root_display()
        );
        pin::publish_when_free(
            pins,
            publication,
            Arc::clone(&self.state),
            Arc::clone(&self.pin_stop),
            Arc::clone(&self.pin_lock),
        )
    }

    fn load_from(
        options: &KernelOptions,
        offsets: &drain_agent_common::KernelOffsets,
        aya_btf: aya::Btf,
        adopt: Option<&Adoptable>,
    ) -> Result<Self> {
        let mut object = destroy::link_kfuncs(EBPF_OBJECT, &aya_btf)?;
        if options.preallocate_sockets {
            prealloc::preallocate(object.bytes_mut(), "SOCKETS")?;
        }
        // No target BTF: the programs have no CO-RE relocations (offsets are a global).
        let mut loader = btf::loader_without_kernel_btf();
        loader
            .btf(None)
            .override_global("KERNEL_OFFSETS", offsets, true)
            .override_global("POD_PORT", &options.pod_port, true)
            .map_max_entries("SOCKETS", options.max_connections)
            .map_max_entries("COUNTS", options.max_endpoints)
            .map_max_entries("LISTENERS", options.max_endpoints);
        if let Some(found) = adopt {
            // aya opens a map pinned at the path instead of making one (`map_pin_path`);
            // `PinDir::adoptable` checked that every one is there.
            for name in pin::SHARED_MAPS {
                loader.map_pin_path(name, found.dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(object.bytes())
            .context("cannot load the eBPF object (is the agent running as root, or with CAP_BPF and CAP_PERFMON?)")?;
        let shared_maps = pin::SHARED_MAPS
            .into_iter()
            .map(|name| Ok((name, any_map_fd(&ebpf, name)?)))
            .collect::<Result<Vec<_>>>()?;
        let shared_ids = shared_maps
            .iter()
            .map(|(_, fd)| pin::map_id(fd.as_fd()))
            .collect::<Result<Vec<_>>>()?;
        // The object's global data (`.rodata`: the offsets, the in-pod port) is per program
        // load; a handler may use it besides the shared maps.
        let data_maps = ebpf
            .maps()
            .filter(|(name, _)| name.starts_with('.'))
            .count();

        let (attach, handler, handler_link) = match adopt {
            Some(found) => {
                // The pinned link keeps the earlier agent's handler attached and counting
                // into the adopted maps: no second handler is attached.
                let handler = pin::obj_get(&found.dir.join(pin::program_pin(found.method)))?;
                pin::check_handler_maps(handler.as_fd(), &shared_ids, data_maps)
                    .context("the pinned handler does not count into the pinned maps")?;
                (found.method, handler, None)
            }
            None => {
                let (attach, link) = attach_first(&mut ebpf, &aya_btf, options.attach)?;
                let handler = ebpf
                    .program(attach.program())
                    .context("the handler is not loaded")?
                    .fd()
                    .context("the handler has no fd")?
                    .as_fd()
                    .try_clone_to_owned()
                    .context("cannot duplicate the handler's fd")?;
                (attach, handler, link)
            }
        };
        let publication = match (&handler_link, adopt) {
            (Some(link), None) if options.pin_dir.is_some() => {
                match pin::check_handler_maps(handler.as_fd(), &shared_ids, data_maps) {
                    Ok(()) => Some(Publication {
                        maps: shared_maps,
                        handler: handler
                            .try_clone()
                            .context("cannot duplicate the handler's fd")?,
                        link: link
                            .try_clone()
                            .context("cannot duplicate the handler's link")?,
                        method: attach,
                    }),
                    Err(problem) => {
                        warn!("kernel state is not pinned: {problem:#}");
                        None
                    }
                }
            }
            _ => None,
        };

        let counts_map = ebpf
            .take_map("COUNTS")
            .context("the eBPF object has no map COUNTS")?;
        let aya::maps::Map::HashMap(counts_data) = &counts_map else {
            bail!("map COUNTS has an unexpected type");
        };
        let counts_writer = HashMap::try_from(aya::maps::Map::HashMap(second_handle(counts_data)?))
            .context("cannot open the endpoint map twice")?;
        let counts: HashMap<MapData, ConnKey, ConnCounts> =
            HashMap::try_from(counts_map).context("map COUNTS has an unexpected type")?;
        let walker_problem = load_walker(&mut ebpf, &aya_btf)
            .err()
            .map(|problem| format!("{problem:#}"));
        if let Some(problem) = &walker_problem {
            warn!(
                "connections open before start cannot be counted, nor missed changes repaired: {problem}"
            );
        }
        let no_grace_period = rcu::unavailable();
        if let Some(problem) = &no_grace_period {
            warn!(
                "{problem}: idle endpoint counters are not reclaimed (a full endpoint map counts for the port only), and a close the kernel skipped keeps its count one too high (drains wait for their deadline)"
            );
        }
        let closer = destroy::load_closer(&mut ebpf, &aya_btf, object.problem)?;
        let pod_seeder = if options.pod_port == 0 {
            Err("no --pod-listen".to_owned())
        } else {
            load_pod_seeder(&mut ebpf, &aya_btf).map_err(|problem| format!("{problem:#}"))
        };
        // Every program that needed a kernel type id is loaded.
        drop(aya_btf);
        let sockets_map = ebpf
            .take_map("SOCKETS")
            .context("the eBPF object has no map SOCKETS")?;
        let aya::maps::Map::HashMap(sockets_data) = &sockets_map else {
            bail!("map SOCKETS has an unexpected type");
        };
        let sockets_reader =
            HashMap::try_from(aya::maps::Map::HashMap(second_handle(sockets_data)?))
                .context("cannot open the socket map twice")?;
        let sockets: HashMap<MapData, u64, SockEntry> =
            HashMap::try_from(sockets_map).context("map SOCKETS has an unexpected type")?;
        // The steering programs read ERRORS too (taken into `maps` below).
        let errors_fd = map_fd(&ebpf, "ERRORS");
        let origin = if adopt.is_some() {
            Origin::Adopted
        } else {
            Origin::New
        };
        let maps = KernelMaps {
            counts,
            sockets: sockets_reader,
            durations: take_map(&mut ebpf, "DURATIONS")?,
            errors: take_map(&mut ebpf, "ERRORS")?,
            port_totals: take_map(&mut ebpf, "PORT_TOTALS")?,
            watched_ports: Mutex::new(take_map(&mut ebpf, "WATCHED_PORTS")?),
            repairs: take_map(&mut ebpf, "REPAIRS")?,
            handler,
            seeding_opens: AtomicU64::new(0),
            handler_skipped: AtomicU64::new(0),
            vouched: Mutex::default(),
            walks: AtomicU64::new(0),
            reclaimed: Mutex::default(),
            no_walker: walker_problem.is_some(),
            not_seeded: options.no_seed,
            adopted: adopt.is_some(),
        };
        let events = take_map(&mut ebpf, "EVENTS")?;
        let steering = pod_seeder.and_then(|()| {
            let made = || -> Result<steer::Steering> {
                let steering = steer::Steering {
                    counts: map_fd(&ebpf, "POD_LISTEN_COUNTS")?,
                    errors: errors_fd?,
                    sockets: take_map(&mut ebpf, "POD_SOCKETS")?,
                };
                steering.probe()?;
                Ok(steering)
            };
            made().map_err(|problem| format!("{problem:#}"))
        });
        let mut kernel = Self {
            listeners: take_map(&mut ebpf, "LISTENERS")?,
            unsure_ports: take_map(&mut ebpf, "UNSURE_PORTS")?,
            counts: counts_writer,
            retiring: take_map(&mut ebpf, "RETIRING")?,
            retiring_ports: take_map(&mut ebpf, "RETIRING_PORTS")?,
            forgetting: take_map(&mut ebpf, "FORGETTING")?,
            forgetting_now: take_map(&mut ebpf, "FORGETTING_NOW")?,
            own_endpoints: take_map(&mut ebpf, "OWN_ENDPOINTS")?,
            own_ports: take_map(&mut ebpf, "OWN_PORTS")?,
            ebpf,
            attach,
            maps: Arc::new(maps),
            events: Some(events),
            sockets,
            walker_problem,
            no_grace_period,
            closer,
            max_endpoints: options.max_endpoints,
            steering,
            handler_link,
            state: Arc::new(KernelState::new(origin, adopt.is_some())),
            publication,
            pin_wanted: options.pin_dir.is_some(),
            pin_stop: Arc::default(),
            pin_lock: Arc::default(),
        };
        if adopt.is_some() {
            // A failed pod listener count stops steering for good, in the maps: adopting
            // them would keep it stopped across restarts. New state counts afresh.
            ensure!(
                kernel
                    .maps
                    .error_count(drain_agent_common::error_index::POD_LISTEN_COUNT_FAILED)?
                    == 0,
                "a pod listener count failed in it (steering stopped for good)"
            );
            kernel.clear_dead_agents_marks()?;
        }
        Ok(kernel)
    }

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

    /// The iterator that counts a pod namespace's listeners on the in-pod port
    /// (`seed_pod_listeners`): run it with [`count_pod_listeners`] inside the namespace
    /// *without* holding the kernel's lock (it walks the whole TCP hash, 1–8 ms per
    /// namespace: 300 pods opened after a restart waited on each other's walks), then
    /// [`Kernel::steer_pod_port`].
    pub fn pod_listener_seeder(&mut self) -> Result<aya::programs::iter::IterLink> {
        self.steering
            .as_ref()
            .map_err(|problem| anyhow!("{problem}"))?;
        let seeder: &mut aya::programs::Iter = self
            .ebpf
            .program_mut(POD_SEEDER)
            .context("the eBPF object has no pod listener seeder")?
            .try_into()
            .context("the pod listener seeder is not an iterator")?;
        let link_id = seeder
            .attach()
            .context("cannot attach the iter/tcp iterator")?;
        seeder
            .take_link(link_id)
            .context("cannot take the iterator link")
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

    /// Forgets the agent's socket in `netns` (after its link was dropped).
    pub fn unsteer_pod_port(&mut self, netns: u32) {
        if let Ok(steering) = self.steering.as_mut() {
            steering.unsteer(netns);
        }
    }

    /// Leaves connections to the agent's own listener at `port` in the namespace `netns`
    /// uncounted: they are not a service's, and must not take a slot.
    pub fn ignore_own_endpoint(&mut self, netns: u32, port: u16) -> Result<()> {
        self.ignore_own_endpoint_as(netns, port, drain_agent_common::OWN_BOUND)
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
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(problem) => Err(problem).context("cannot forget an own endpoint"),
        }
    }

    /// Where the counting state came from (adopted or new), and whether it is pinned.
    pub fn state(&self) -> Arc<KernelState> {
        Arc::clone(&self.state)
    }

    /// Clears what a killed agent may have left marked in the adopted maps, before this
    /// agent uses them. Each clearing is the step the dead agent would have taken last, and
    /// each is exact whenever it runs:
    /// - `FORGETTING_NOW`, then `FORGETTING` (a sweep's step 4, `forget`): the dead agent's
    ///   forgetter ran synchronously in its process, so none runs any more; a mark only made
    ///   a close leave its entry to a walk (`close_deferred`: too high, never too low), and
    ///   the repair walk at adoption sweeps such entries.
    /// - `RETIRING`, then `RETIRING_PORTS` (a reclaim's step 4, `reclaim`): an open that saw
    ///   a mark counted its socket for the port only, and its close undoes exactly that; an
    ///   entry the dead agent deleted was deleted after its grace period at `active` 0.
    /// - `OWN_ENDPOINTS`: the dead agent's listeners closed with it; its marks would hide
    ///   the connections of an application that listens there later (a count too low).
    ///   This agent marks its own listeners again as it opens them. A connection accepted
    ///   at such an endpoint before this clearing is untracked: the repair walk at adoption
    ///   counts it (open, untracked, with a listener), and until that walk every answer is
    ///   confirmed with the socket tables ([`crate::doubt::Doubt::AdoptedUnwalked`]).
    ///   `OWN_PORTS` stays: a bit there only sends the handler to look up `OWN_ENDPOINTS`.
    /// - `WATCHED_PORTS`: the dead agent's waiters are gone; their bits would only fill the
    ///   ring buffer with events nobody waits for. (The buffer itself is read on by this
    ///   agent: events already in it make waiters re-read, which is harmless.)
    fn clear_dead_agents_marks(&mut self) -> Result<()> {
        self.forgetting_now
            .set(0, 0, 0)
            .context("cannot clear FORGETTING_NOW")?;
        let marked: Vec<u64> = self.forgetting.keys().filter_map(Result::ok).collect();
        for sk in marked {
            let _ = self.forgetting.remove(&sk);
        }
        let retiring: Vec<ConnKey> = self.retiring.keys().filter_map(Result::ok).collect();
        for key in retiring {
            let _ = self.retiring.remove(&key);
        }
        for word in 0..drain_agent_common::WATCHED_WORDS {
            self.retiring_ports
                .set(word, 0, 0)
                .context("cannot clear RETIRING_PORTS")?;
        }
        let own: Vec<u64> = self.own_endpoints.keys().filter_map(Result::ok).collect();
        for key in own {
            let _ = self.own_endpoints.remove(&key);
        }
        let mut watched = self
            .maps
            .watched_ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for word in 0..drain_agent_common::WATCHED_WORDS {
            watched
                .set(word, 0, 0)
                .context("cannot clear WATCHED_PORTS")?;
        }
        Ok(())
    }

    /// How the handler is attached.
    pub const fn attach_method(&self) -> AttachMethod {
        self.attach
    }

    /// The maps, for the tracker.
    pub fn maps(&self) -> Arc<KernelMaps> {
        Arc::clone(&self.maps)
    }

    /// The ring buffer of zero-crossing events (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Runs of the attached handler the kernel skipped so far (`recursion_misses`: the
    /// handler was already running on that CPU, interrupted by a softirq). Each may be a
    /// missed open or close; [`Kernel::repair`] finds those.
    pub fn handler_skipped_runs(&self) -> Result<u64> {
        self.maps.handler_skipped_runs()
    }

    /// State changes the handler could not record so far: its skipped runs, passive opens
    /// that found their address held by a dead socket's entry (the aftermath of a skipped
    /// close), and closes left for a walk during a sweep (`forget`). Each is repaired by
    /// the next walk.
    pub fn missed_changes(&self) -> Result<u64> {
        Ok(self
            .maps
            .handler_skipped_runs()?
            .saturating_add(self.maps.addresses_taken()?)
            .saturating_add(self.maps.closes_deferred()?))
    }
}

/// The `iter/tcp` program that counts a pod namespace's listeners on the in-pod port.
const POD_SEEDER: &str = "seed_pod_listeners";

/// Runs the pod listener seeder (`link`, from [`Kernel::pod_listener_seeder`]) in the
/// namespace `netns` (its file `netns_file`): the iterator walks the namespace of whoever
/// creates its file, so that is done inside.
pub fn count_pod_listeners(
    link: aya::programs::iter::IterLink,
    netns: u32,
    netns_file: &std::fs::File,
) -> Result<()> {
    let namespace = netns_file
        .try_clone()
        .context("cannot duplicate the namespace file")?;
    crate::sys::netns::run_in_file(namespace, format!("{netns}"), move || -> Result<()> {
        let mut file = link.into_file().context("cannot create the iterator")?;
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut sink).context("the iterator failed")?;
        Ok(())
    })
    .with_context(|| format!("cannot count the listeners of network namespace {netns}"))
}

fn load_pod_seeder(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<()> {
    let seeder: &mut aya::programs::Iter = ebpf
        .program_mut(POD_SEEDER)
        .context("the eBPF object has no pod listener seeder")?
        .try_into()
        .context("the pod listener seeder is not an iterator")?;
    seeder
        .load("tcp", btf)
        .context("cannot load the iter/tcp pod listener seeder (Linux >= 5.9 needed)")
}

/// A map's fd of its own (for programs built outside the object, `steer`).
fn map_fd(ebpf: &Ebpf, name: &str) -> Result<std::os::fd::OwnedFd> {
    let map = ebpf
        .map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    let data = match map {
        aya::maps::Map::HashMap(data) | aya::maps::Map::Array(data) => data,
        _ => bail!("map {name} has an unexpected type"),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("cannot duplicate map {name}'s fd"))
}

/// A map's fd of its own, whatever its type (to pin it, `pin`).
fn any_map_fd(ebpf: &Ebpf, name: &str) -> Result<OwnedFd> {
    let map = ebpf
        .map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    let data = match map {
        aya::maps::Map::HashMap(data)
        | aya::maps::Map::Array(data)
        | aya::maps::Map::RingBuf(data) => data,
        _ => bail!("map {name} has an unexpected type"),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("cannot duplicate map {name}'s fd"))
}

/// Opens a second, independently owned handle on a map (the same kernel object).
fn second_handle(map: &MapData) -> Result<MapData> {
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate a map fd")?;
    MapData::from_fd(fd).context("cannot open the map again")
}

/// `bpf_prog_info.recursion_misses` of a loaded program (Linux >= 5.12; 0 before).
fn recursion_misses(program: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
    Ok(raw::prog_info(program, &mut [])?.recursion_misses)
}

impl Kernel {
    /// Hands the heap that only loading and seeding needed (the loader's copy of the kernel
    /// types, dropped at the end of [`Kernel::load`]; the seeding walk's buffers) back to the
    /// system.
    pub fn release_load_time_memory(&mut self) {
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free heap pages; no pointers are invalidated.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// An attach failure as one log line. A verifier rejection carries the verifier's whole log
/// (often hundreds of lines); its last lines say why (the failing instruction, an unknown
/// helper), so only those are kept.
fn one_line(error: &anyhow::Error) -> String {
    let text = format!("{error:#}");
    let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
    let first = lines.next().unwrap_or_default().to_owned();
    let rest: Vec<&str> = lines.collect();
    let tail = &rest[rest.len().saturating_sub(3)..];
    if tail.is_empty() {
        first
    } else {
        format!("{first} … {}", tail.join(" / "))
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the cgroup.
fn raise_memlock_limit() {
    let unlimited = rustix::process::Rlimit {
        current: None,
        maximum: None,
    };
    if let Err(problem) = rustix::process::setrlimit(rustix::process::Resource::Memlock, unlimited)
    {
        debug!("cannot raise RLIMIT_MEMLOCK ({problem}); not needed on Linux >= 5.11");
    }
}

/// Parses one ring-buffer record.
pub fn parse_event(bytes: &[u8]) -> Option<ConnEvent> {
    if bytes.len() < std::mem::size_of::<ConnEvent>() {
        return None;
    }
    // SAFETY: length checked; ConnEvent is plain data, any bit pattern is valid.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ConnEvent>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attach_failure_is_one_line_with_the_verifiers_last_lines() {
        let error = anyhow!(
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: (79) r1 = *(u64 *)(r1 +0)\n1: (85) call bpf_x#212\nunknown func bpf_x#212\nprocessed 2 insns\n"
        );
        let line = one_line(&error);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.ends_with("1: (85) call bpf_x#212 / unknown func bpf_x#212 / processed 2 insns"),
            "{line}"
        );
        assert_eq!(one_line(&anyhow!("no BTF")), "no BTF");
    }
    use crate::kernel::maps::key_addr;
    use drain_agent_common::AF_INET;
    use std::net::{IpAddr, Ipv6Addr};

    #[test]
    fn keys_become_addresses() {
        let mut key = ConnKey {
            family: AF_INET,
            ..ConnKey::default()
        };
        key.addr[..4].copy_from_slice(&[10, 0, 0, 7]);
        assert_eq!(key_addr(&key), "10.0.0.7".parse::<IpAddr>().expect("ip"));
        key.family = drain_agent_common::AF_INET6;
        key.addr = "fd00::1".parse::<Ipv6Addr>().expect("ip").octets();
        assert_eq!(key_addr(&key), "fd00::1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn short_events_are_ignored() {
        assert!(parse_event(&[0; 8]).is_none());
        assert!(parse_event(&[0; std::mem::size_of::<ConnEvent>()]).is_some());
    }
}
