//! The kernel side, from user space: load the programs, pick how to attach, seed the
//! connections that already exist, and read the maps. Dropping [`Kernel`] detaches it all.

pub mod attach;
pub mod btf;
pub mod budget;
pub mod destroy;
pub mod events;
mod forget;
mod load;
pub mod maps;
mod ownership;
pub mod pin;
mod pod;
mod prealloc;
mod raw;
mod rcu;
pub mod reclaim;
mod reclaimed;
pub mod reuseport;
mod shared_pass;
mod source;
pub mod steer;
pub mod version;
pub mod walk;

use std::{
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, RingBuf},
};
use drain_agent_common::{ConnCounts, ConnEvent, ConnKey, SockEntry};

use self::load::take_map;
use self::pin::{PinDir, Publication};
pub use self::{
    attach::AttachMethod,
    maps::KernelMaps,
    pin::{KernelState, Origin},
    pod::{OwnEndpoint, OwnRegistrations, PodSeed, count_pod_listeners},
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
    /// The latest registration of each own endpoint marked in `own_endpoints`: a forget
    /// undoes its own only (`pod.rs`).
    own_registrations: OwnRegistrations,
    /// Why walks cannot run on this kernel, if they cannot.
    walker_problem: Option<String>,
    /// The RCU grace periods the reclaim and the sweep wait for (`rcu`), or why none can be
    /// waited for here: then idle endpoints are not reclaimed and missed closes are not swept.
    grace_periods: Result<rcu::GracePeriods, String>,
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

impl Kernel {
    /// Where the counting state came from (adopted or new), and whether it is pinned.
    pub fn state(&self) -> Arc<KernelState> {
        Arc::clone(&self.state)
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
    /// missed open or close; [`Kernel::repair`] finds those. Not every skip is counted on
    /// older kernels: see [`recursion_misses`].
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

/// `bpf_prog_info.recursion_misses` of a loaded program (Linux >= 5.12; 0 before). What
/// lands there depends on the attach method and the kernel: tp_btf's and the raw
/// tracepoint's nested runs are skipped and counted from 6.1 (before, they run nested); the
/// classic tracepoint's runs that `trace_call_bpf()` skips (another kprobe or tracepoint
/// program on that CPU, or a `bpf()` map lookup or update there) are counted only from 6.7.
/// Before that the agent cannot see them and doubts every count (`Doubt::SkipsUnseen`,
/// `version::old_kernel_doubts`).
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

    use crate::addr::key_addr;
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
