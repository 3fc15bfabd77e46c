//! Loading the kernel side: the programs with their sizes and globals, the handler attached
//! (or an earlier agent's adopted from its pins, `pin`), the walker, the closer and the
//! in-pod port's seeder, and every map taken into [`Kernel`] and [`KernelMaps`].

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64},
    },
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use drain_agent_common::{ConnCounts, ConnKey, SockEntry};
use log::{debug, info, warn};

use super::{
    AttachMethod, EBPF_OBJECT, Kernel, KernelMaps, KernelOptions, KernelState, Origin,
    attach::{TRACEPOINT_CATEGORY, TRACEPOINT_NAME, attach},
    btf::{self, Btf, LoadingBtf, VMLINUX_BTF, Wanted},
    budget, destroy, pin,
    pin::{Adoptable, PinDir, Publication},
    pod::load_pod_seeder,
    prealloc, rcu,
    reclaimed::Reclaimed,
    shared_pass::SharedPasses,
    steer,
    version::{self, warn_of_old_kernel},
    walk::{self, load_walker},
};

/// The choices besides the object's bytes that make a pinned layout unfit for this agent:
/// map sizes and flags, how the handler is attached, what it counts (the in-pod port, the
/// kernel's field offsets).
fn layout_facts(
    options: &KernelOptions,
    offsets: &drain_agent_common::KernelOffsets,
    duration_ports: u32,
) -> String {
    format!(
        "max_connections={} max_endpoints={} duration_ports={duration_ports} preallocate_sockets={} attach={} pod_port={} offsets={offsets:?}",
        options.max_connections,
        options.max_endpoints,
        options.preallocate_sockets,
        options.attach.map_or("any", AttachMethod::name),
        options.pod_port,
    )
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
        let cpus = budget::possible_cpus()?;
        let duration_ports = budget::duration_ports(cpus);
        debug!(
            "duration histograms: room for {duration_ports} ports on {cpus} possible CPUs ({} KiB at most)",
            budget::durations_bytes(duration_ports, cpus) >> 10
        );
        let pins = match &options.pin_dir {
            Some(dir) => PinDir::open(
                dir,
                pin::layout_name(
                    EBPF_OBJECT,
                    &layout_facts(options, &offsets, duration_ports),
                ),
            )?,
            None => None,
        };
        let held = pins.as_ref().map(PinDir::try_lock).transpose()?;
        let mut adopted = None;
        if let (Some(pins), Some(true)) = (&pins, held) {
            match pins.adoptable() {
                Some(found) => {
                    match Self::load_from(
                        options,
                        &offsets,
                        duration_ports,
                        loading.clone().build()?,
                        Some(&found),
                    ) {
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
            None => Self::load_from(options, &offsets, duration_ports, loading.build()?, None)?,
        };
        kernel.take_ownership(pins, held.unwrap_or(false))?;
        Ok(kernel)
    }

    fn load_from(
        options: &KernelOptions,
        offsets: &drain_agent_common::KernelOffsets,
        duration_ports: u32,
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
            .map_max_entries("LISTENERS", options.max_endpoints)
            // Per CPU: sized by the CPU count (`budget`).
            .map_max_entries("DURATIONS", duration_ports);
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

        // Adopted with the counts, or new with them.
        let reclaimed = match adopt {
            Some(found) => Reclaimed::adopt(&found.dir)?,
            None => Reclaimed::new(options.max_endpoints)?,
        };

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
                        maps: shared_maps
                            .into_iter()
                            .chain([(pin::RECLAIMED, reclaimed.map_fd()?)])
                            .collect(),
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
        let kernel_version = version::running();
        warn_of_old_kernel(kernel_version, attach, walker_problem.is_none());
        let grace_periods = rcu::GracePeriods::new().map_err(|problem| format!("{problem:#}"));
        if let Err(problem) = &grace_periods {
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
            tracked_ports: map_fd(&ebpf, "TRACKED_PORTS")?,
            watched_ports: Mutex::new(take_map(&mut ebpf, "WATCHED_PORTS")?),
            repairs: take_map(&mut ebpf, "REPAIRS")?,
            handler,
            seeding_opens: AtomicU64::new(0),
            handler_skipped: AtomicU64::new(0),
            vouched: Mutex::default(),
            walks: AtomicU64::new(0),
            reclaimed: Mutex::new(reclaimed),
            no_walker: walker_problem.is_some(),
            not_seeded: options.no_seed,
            adopted: adopt.is_some(),
            kernel_version: Mutex::new(kernel_version),
            attach,
            // An earlier agent's walks shaped adopted counts.
            walk_began: AtomicBool::new(adopt.is_some()),
            own_bound: Mutex::default(),
            own_port_passes: SharedPasses::default(),
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
            own_registrations: super::OwnRegistrations::default(),
            ebpf,
            attach,
            maps: Arc::new(maps),
            events: Some(events),
            sockets,
            walker_problem,
            grace_periods,
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
        | aya::maps::Map::PerCpuHashMap(data)
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

pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
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
}
