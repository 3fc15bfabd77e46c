//! The kernel side, from user space: load the programs, pick how to attach, seed the
//! connections that already exist, and read the maps. Dropping [`Kernel`] detaches it all.

pub mod btf;
pub mod maps;
pub mod reclaim;

use std::{
    collections::{BTreeSet, HashSet},
    fmt, fs,
    io::Read as _,
    os::fd::AsFd as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{
        BtfTracePoint, Iter, RawTracePoint, RawTracePointRunOptions, TestRun as _, TracePoint,
    },
};
use drain_agent_common::{
    ConnCounts, ConnKey, SockEntry, ZeroCrossing, netns_port_key, repair, watched_bit,
};
use log::{debug, info, warn};

use self::btf::{Btf, VMLINUX_BTF};
pub use self::{
    maps::KernelMaps,
    reclaim::{RECLAIM_IDLE, ReclaimReport},
};
use crate::netns;

/// The eBPF object, built by build.rs from drain-agent-ebpf and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drain-agent"));

const TRACEPOINT_CATEGORY: &str = "sock";
const TRACEPOINT_NAME: &str = "inet_sock_set_state";
const TRACEFS: &str = "/sys/kernel/tracing";

/// How the state-change handler is attached, in the order the agent tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMethod {
    /// BTF-enabled tracepoint (`tp_btf`): cheapest; needs no tracefs.
    TpBtf,
    /// Classic tracepoint through tracefs (mounted by the agent if absent).
    Tracepoint,
    /// Raw tracepoint: needs no tracefs; for kernels that refuse tp_btf.
    RawTracepoint,
}

impl AttachMethod {
    pub const ALL: [Self; 3] = [Self::TpBtf, Self::Tracepoint, Self::RawTracepoint];

    /// The name used in logs and in the `attach` metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Self::TpBtf => "tp_btf",
            Self::Tracepoint => "tracepoint",
            Self::RawTracepoint => "raw_tracepoint",
        }
    }

    const fn program(self) -> &'static str {
        match self {
            Self::TpBtf => "inet_sock_set_state_btf",
            Self::Tracepoint => "inet_sock_set_state_tp",
            Self::RawTracepoint => "inet_sock_set_state_raw",
        }
    }
}

impl fmt::Display for AttachMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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
}

/// The loaded and attached programs, and the maps the agent reads.
pub struct Kernel {
    /// Owns the programs and their links; dropping it detaches them.
    ebpf: Ebpf,
    /// The parsed kernel BTF (tens of MiB), needed until seeding; see
    /// [`Kernel::release_load_time_memory`].
    aya_btf: Option<aya::Btf>,
    attach: AttachMethod,
    maps: Arc<KernelMaps>,
    events: Option<RingBuf<MapData>>,
    /// Every tracked socket, for the sweep after a walk.
    sockets: HashMap<MapData, u64, SockEntry>,
    /// The walker's listener map, emptied before each walk.
    listeners: HashMap<MapData, u64, u8>,
    /// A second handle on the endpoint counters, to delete reclaimed ones.
    counts: HashMap<MapData, ConnKey, ConnCounts>,
    retiring: HashMap<MapData, ConnKey, u8>,
    retiring_ports: Array<MapData, u64>,
    own_endpoints: HashMap<MapData, u64, u8>,
    own_ports: Array<MapData, u64>,
    /// Why walks cannot run on this kernel, if they cannot.
    walker_problem: Option<String>,
    /// Capacity of the endpoint map (reclaim pressure).
    max_endpoints: u32,
}

impl Kernel {
    /// Loads the programs and attaches the state-change handler (not yet seeded).
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
        let offsets = Btf::from_file(Path::new(VMLINUX_BTF))
            .and_then(|btf| btf.kernel_offsets())
            .context("cannot find socket field offsets in the kernel's BTF (is CONFIG_DEBUG_INFO_BTF set?)")?;
        debug!("kernel offsets: {offsets:?}");
        let aya_btf = aya::Btf::from_sys_fs().context("cannot read the kernel's BTF")?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global("KERNEL_OFFSETS", &offsets, true)
            .map_max_entries("SOCKETS", options.max_connections)
            .map_max_entries("COUNTS", options.max_endpoints)
            .map_max_entries("LISTENERS", options.max_endpoints)
            .load(EBPF_OBJECT)
            .context("cannot load the eBPF object (is the agent running as root, or with CAP_BPF and CAP_PERFMON?)")?;

        let candidates: Vec<AttachMethod> = match options.attach {
            Some(method) => vec![method],
            None => AttachMethod::ALL.to_vec(),
        };
        let mut failures = Vec::new();
        let mut attached = None;
        for method in candidates {
            match attach(&mut ebpf, &aya_btf, method) {
                Ok(()) => {
                    attached = Some(method);
                    break;
                }
                Err(error) => {
                    let why = one_line(&error);
                    warn!("cannot attach with {method}: {why}");
                    failures.push(format!("{method}: {why}"));
                }
            }
        }
        let attach = attached.ok_or_else(|| {
            anyhow!(
                "cannot attach to the {TRACEPOINT_CATEGORY}:{TRACEPOINT_NAME} tracepoint (Linux >= 4.16 needed) in any way: {}",
                failures.join("; ")
            )
        })?;
        info!("attached to {TRACEPOINT_CATEGORY}:{TRACEPOINT_NAME} with {attach}");

        let handler = ebpf
            .program(attach.program())
            .context("the handler is not loaded")?
            .fd()
            .context("the handler has no fd")?
            .try_clone()
            .context("cannot duplicate the handler's fd")?;
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
        let maps = KernelMaps {
            counts,
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
        };
        let events = take_map(&mut ebpf, "EVENTS")?;
        let sockets = take_map(&mut ebpf, "SOCKETS")?;
        Ok(Self {
            listeners: take_map(&mut ebpf, "LISTENERS")?,
            counts: counts_writer,
            retiring: take_map(&mut ebpf, "RETIRING")?,
            retiring_ports: take_map(&mut ebpf, "RETIRING_PORTS")?,
            own_endpoints: take_map(&mut ebpf, "OWN_ENDPOINTS")?,
            own_ports: take_map(&mut ebpf, "OWN_PORTS")?,
            ebpf,
            aya_btf: Some(aya_btf),
            attach,
            maps: Arc::new(maps),
            events: Some(events),
            sockets,
            walker_problem,
            max_endpoints: options.max_endpoints,
        })
    }

    /// Leaves connections to the agent's own listener at `port` in the namespace `netns`
    /// uncounted: they are not a service's, and must not take a slot.
    pub fn ignore_own_endpoint(&mut self, netns: u32, port: u16) -> Result<()> {
        self.own_endpoints
            .insert(netns_port_key(netns, port), 1, 0)
            .context("cannot record the agent's own endpoint")?;
        let (word, mask) = watched_bit(port);
        let bits = self.own_ports.get(&word, 0).context("own-ports bitmap")?;
        self.own_ports
            .set(word, bits | mask, 0)
            .context("own-ports bitmap")?;
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

    /// Counts the connections that were established before the handler was attached, in
    /// every network namespace, with the `iter/tcp` iterator (see the eBPF side for why this
    /// is exactly-once). Call it once, after [`Kernel::load`].
    pub fn seed_existing_connections(&mut self) -> Result<WalkReport> {
        let report = self.walk()?;
        let found = self.maps.repair_count(repair::OPENS_FOUND)?;
        self.maps.seeding_opens.store(found, Ordering::Relaxed);
        info!(
            "counted {found} connections open before start, in {} network namespaces ({} could not be read)",
            report.walked.len(),
            report.failed
        );
        Ok(report)
    }

    /// Walks the open sockets of every network namespace: counts open passive sockets that
    /// are not tracked and stamps the tracked ones it finds open.
    fn walk(&mut self) -> Result<WalkReport> {
        if let Some(problem) = &self.walker_problem {
            bail!("{problem}");
        }
        let program: &mut Iter = self
            .ebpf
            .program_mut(WALKER)
            .context("the eBPF object has no walker")?
            .try_into()
            .context("the walker is not an iterator")?;
        // Every counter as it is before the walk: what the walk will vouch for.
        let snapshot = self.maps.snapshot()?;
        // Listeners are recorded afresh by each walk (a closed one must not linger, and a
        // full map is then only ever this walk's).
        let stale_listeners: Vec<u64> = self.listeners.keys().filter_map(Result::ok).collect();
        for key in stale_listeners {
            let _ = self.listeners.remove(&key);
        }
        let mut report = WalkReport {
            started_ns: crate::tracker::monotonic_ns(),
            ..WalkReport::default()
        };
        let mut failed = BTreeSet::new();
        for (inode, path) in netns::all_namespaces() {
            let link_id = program
                .attach()
                .context("cannot attach the iter/tcp iterator")?;
            let link = program
                .take_link(link_id)
                .context("cannot take the iterator link")?;
            // The iterator walks the namespace of whoever creates its file: do that inside.
            let walked = netns::run_in(&path, move || -> Result<()> {
                let mut file = link.into_file().context("cannot create the iterator")?;
                let mut sink = Vec::new();
                file.read_to_end(&mut sink).context("the iterator failed")?;
                Ok(())
            });
            match walked {
                Ok(()) => {
                    report.walked.insert(inode);
                }
                Err(error) => {
                    report.failed += 1;
                    failed.insert(inode);
                    warn!(
                        "cannot walk network namespace {inode} ({}): {error:#}",
                        path.display()
                    );
                }
            }
        }
        // A namespace whose processes just exited is gone, and so are its connections;
        // one that is still there was not walked, and its counts are not vouched for.
        let still_there = netns::all_namespaces();
        failed.retain(|inode| still_there.contains_key(inode));
        self.maps.vouch(snapshot, failed);
        Ok(report)
    }

    /// Finds and repairs state changes the handler missed: walks the open sockets (which
    /// counts missed opens), then drops the tracked sockets of walked namespaces that the
    /// walk did not find open and that were not tracked after it began (missed closes).
    pub fn repair(&mut self) -> Result<RepairReport> {
        let opens_before = self.maps.repair_count(repair::OPENS_FOUND)?;
        let closes_before = self.maps.repair_count(repair::CLOSES_FOUND)?;
        let walk = self.walk()?;
        let mut stale = Vec::new();
        for entry in self.sockets.iter() {
            // Entries come and go while we read: a vanished one is simply not a candidate.
            let Ok((sk, entry)) = entry else { continue };
            if entry.audited_ns < walk.started_ns
                && entry.tracked_ns < walk.started_ns
                && walk.walked.contains(&entry.key.netns)
            {
                stale.push(sk);
            }
        }
        let forget: &RawTracePoint = self
            .ebpf
            .program(FORGETTER)
            .context("the eBPF object has no forget_stale_socket")?
            .try_into()
            .context("forget_stale_socket is not a raw tracepoint")?;
        for sk in stale {
            let mut options = RawTracePointRunOptions::new();
            options.args[0] = sk;
            options.args[1] = walk.started_ns;
            forget
                .test_run(options)
                .context("cannot run forget_stale_socket")?;
        }
        Ok(RepairReport {
            opens_found: self.maps.repair_count(repair::OPENS_FOUND)? - opens_before,
            closes_found: self.maps.repair_count(repair::CLOSES_FOUND)? - closes_before,
        })
    }

    /// Whether this kernel can walk the open sockets (seeding and repairs).
    pub const fn can_walk(&self) -> bool {
        self.walker_problem.is_none()
    }

    /// Runs of the attached handler the kernel skipped so far (`recursion_misses`: the
    /// handler was already running on that CPU, interrupted by a softirq). Each may be a
    /// missed open or close; [`Kernel::repair`] finds those.
    pub fn handler_skipped_runs(&self) -> Result<u64> {
        self.maps.handler_skipped_runs()
    }
}

/// The walker: `iter/tcp`, run at start and for repairs.
const WALKER: &str = "seed_established_tcp";
/// Drops one stale entry; run with `BPF_PROG_TEST_RUN`, never attached.
const FORGETTER: &str = "forget_stale_socket";

/// Loads the walker and the forgetter; they need Linux >= 5.9 (iter/tcp) and >= 5.10
/// (running a raw tracepoint program on demand).
fn load_walker(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<()> {
    let walker: &mut Iter = ebpf
        .program_mut(WALKER)
        .context("the eBPF object has no walker")?
        .try_into()
        .context("the walker is not an iterator")?;
    walker
        .load("tcp", btf)
        .context("cannot load the iter/tcp walker (Linux >= 5.9 needed)")?;
    let forget: &mut RawTracePoint = ebpf
        .program_mut(FORGETTER)
        .context("the eBPF object has no forget_stale_socket")?
        .try_into()
        .context("forget_stale_socket is not a raw tracepoint")?;
    forget.load().context("cannot load forget_stale_socket")?;
    Ok(())
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
    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
    use std::os::fd::AsRawFd as _;

    // SAFETY: plain C structs; all-zero is a valid value for both.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The `info` member of the union is the one BPF_OBJ_GET_INFO_BY_FD reads.
    attr.info.bpf_fd = u32::try_from(program.as_raw_fd()).context("bad program fd")?;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = (&raw mut info) as u64;
    // SAFETY: the bpf syscall with a valid attr of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw mut attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_OBJ_GET_INFO_BY_FD");
    }
    Ok(info.recursion_misses)
}

/// What a walk did.
#[derive(Clone, Debug, Default)]
pub struct WalkReport {
    /// CLOCK_MONOTONIC when the walk began.
    pub started_ns: u64,
    /// Inodes of the network namespaces walked.
    pub walked: HashSet<u32>,
    /// Namespaces that could not be walked.
    pub failed: usize,
}

/// What a repair found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    pub opens_found: u64,
    pub closes_found: u64,
}

impl Kernel {
    /// Frees what only loading and seeding needed (the parsed kernel BTF is most of the
    /// agent's memory at start) and hands the freed heap back to the system.
    pub fn release_load_time_memory(&mut self) {
        self.aya_btf = None;
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

fn attach(ebpf: &mut Ebpf, btf: &aya::Btf, method: AttachMethod) -> Result<()> {
    let program = ebpf
        .program_mut(method.program())
        .with_context(|| format!("the eBPF object has no program {}", method.program()))?;
    match method {
        AttachMethod::TpBtf => {
            let program: &mut BtfTracePoint = program.try_into()?;
            program.load(TRACEPOINT_NAME, btf)?;
            program.attach()?;
        }
        AttachMethod::Tracepoint => {
            ensure_tracefs()?;
            check_tracepoint_format()?;
            let program: &mut TracePoint = program.try_into()?;
            program.load()?;
            program.attach(TRACEPOINT_CATEGORY, TRACEPOINT_NAME)?;
        }
        AttachMethod::RawTracepoint => {
            let program: &mut RawTracePoint = program.try_into()?;
            program.load()?;
            program.attach(TRACEPOINT_NAME)?;
        }
    }
    Ok(())
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

/// Mounts tracefs at /sys/kernel/tracing when nothing is there (the classic tracepoint
/// needs it to find the tracepoint's id).
fn ensure_tracefs() -> Result<()> {
    let events = Path::new(TRACEFS).join("events");
    if events.exists() {
        return Ok(());
    }
    if Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    info!("tracefs is not mounted; mounting it at {TRACEFS}");
    let target = std::ffi::CString::new(TRACEFS).context("tracefs path")?;
    let fstype = c"tracefs";
    let source = c"nodev";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot mount tracefs at {TRACEFS}"));
    }
    Ok(())
}

/// The classic tracepoint program reads `skaddr`, `oldstate` and `newstate` at fixed
/// offsets; refuse to attach if this kernel lays the record out differently.
fn check_tracepoint_format() -> Result<()> {
    let path = [TRACEFS, "/sys/kernel/debug/tracing"]
        .iter()
        .map(|root| {
            Path::new(root)
                .join("events")
                .join(TRACEPOINT_CATEGORY)
                .join(TRACEPOINT_NAME)
                .join("format")
        })
        .find(|path| path.exists())
        .context("tracefs has no sock/inet_sock_set_state (Linux >= 4.16 needed)")?;
    let format =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    check_record_offsets(&format)
}

fn check_record_offsets(format: &str) -> Result<()> {
    for (field, expected) in [("skaddr", 8), ("oldstate", 16), ("newstate", 20)] {
        let offset = format
            .lines()
            .find(|line| {
                line.split(';')
                    .next()
                    .is_some_and(|decl| decl.trim_end().ends_with(&format!(" {field}")))
            })
            .and_then(|line| line.split("offset:").nth(1))
            .and_then(|rest| rest.split(';').next())
            .and_then(|number| number.trim().parse::<usize>().ok())
            .with_context(|| format!("tracepoint format has no field {field}"))?;
        if offset != expected {
            bail!("tracepoint field {field} is at offset {offset}, the program expects {expected}");
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the cgroup.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        debug!(
            "cannot raise RLIMIT_MEMLOCK ({}); not needed on Linux >= 5.11",
            std::io::Error::last_os_error()
        );
    }
}

/// Parses one ring-buffer record.
pub fn parse_event(bytes: &[u8]) -> Option<ZeroCrossing> {
    if bytes.len() < std::mem::size_of::<ZeroCrossing>() {
        return None;
    }
    // SAFETY: length checked; ZeroCrossing is plain data, any bit pattern is valid.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ZeroCrossing>()) })
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

    const FORMAT: &str = "name: inet_sock_set_state
ID: 1470
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
";

    #[test]
    fn accepts_the_known_tracepoint_layout() {
        check_record_offsets(FORMAT).expect("known layout");
    }

    #[test]
    fn refuses_a_moved_field() {
        let moved = FORMAT.replace("int newstate;\toffset:20", "int newstate;\toffset:24");
        let error = check_record_offsets(&moved).expect_err("moved field");
        assert!(
            error.to_string().contains("newstate is at offset 24"),
            "{error}"
        );
        let error = check_record_offsets("format:\n").expect_err("no fields");
        assert!(error.to_string().contains("no field skaddr"), "{error}");
    }

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
        assert!(parse_event(&[0; std::mem::size_of::<ZeroCrossing>()]).is_some());
    }
}
