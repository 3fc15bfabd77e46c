//! The maps and the read-only globals the loader fills in: every piece of state the
//! programs share with each other and with the agent. Names are the maps' names in the object.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, PerCpuHashMap, RingBuf, SockHash},
};
use drain_agent_common::{
    ConnCounts, ConnKey, DurationHistogram, FORGET_BATCH, KernelOffsets, OFFSET_UNKNOWN,
    PORT_COUNT, PortTotals, SockEntry, TRACKED_PORT_WORDS, WATCHED_WORDS, error_index, repair,
};

// Map sizes below are defaults; the agent sets the real ones at load time from its flags.

/// Tracked sockets, keyed by the socket's kernel address. Not preallocated: memory is
/// charged to the agent's cgroup, and a preallocated map would charge its full size at start.
/// `--preallocate-sockets` clears the flag before loading (the agent's `kernel::prealloc`).
/// Either way a deleted element may be reused at once (since Linux 6.1 the default map frees
/// to a per-CPU cache, `bpf_mem_cache_free()`): nothing here relies on a freed entry's copy
/// staying intact, see [`forget_stale_socket`](crate::walk::forget_stale_socket).
#[map]
pub(crate) static SOCKETS: HashMap<u64, SockEntry> =
    HashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

/// Counters per endpoint. The programs never delete entries; the agent reclaims idle ones by the
/// rule written at [`is_retiring`](crate::track::is_retiring), which no concurrent open can slip
/// through.
#[map]
pub(crate) static COUNTS: HashMap<ConnKey, ConnCounts> = HashMap::with_max_entries(16_384, 0);

/// Endpoints the agent is reclaiming right now. An open on one of them is counted in its port's
/// totals only ([`SOCK_UNSCOPED`](drain_agent_common::SOCK_UNSCOPED)) and never touches its
/// `COUNTS` entry.
#[map]
pub(crate) static RETIRING: HashMap<ConnKey, u8> = HashMap::with_max_entries(4_096, 0);

/// One bit per port with an endpoint in `RETIRING` (set by the agent first): the common
/// open path costs one array load, not a hash lookup.
#[map]
pub(crate) static RETIRING_PORTS: Array<u64> = Array::with_max_entries(WATCHED_WORDS, 0);

/// The agent's own listening endpoints, by `netns_port_key`: connections to the agent's
/// API are not the services' and take no slot. `OWN_PORTS` is the bitmap in front of it.
#[map]
pub(crate) static OWN_ENDPOINTS: HashMap<u64, u8> = HashMap::with_max_entries(1_024, 0);

#[map]
pub(crate) static OWN_PORTS: Array<u64> = Array::with_max_entries(WATCHED_WORDS, 0);

/// Kernel-side histogram of how long tracked connections stayed active, per local port
/// (not per endpoint: bounded by the port space however many addresses come and go).
/// Per CPU: every close adds to a bucket and to the sum, and on a shared value those two
/// atomic adds moved the port's histogram lines between CPUs at every close; the agent sums
/// the CPUs' copies when it reads (see [`record_duration`](crate::track) for why plain adds
/// are exact here).
#[map]
pub(crate) static DURATIONS: PerCpuHashMap<u32, DurationHistogram> =
    PerCpuHashMap::with_max_entries(PORT_COUNT, BPF_F_NO_PREALLOC);

/// Listening (netns, port) pairs, filled by the seeding iterator: a socket found already
/// established is *passive* when its local port has a listener in its namespace.
#[map]
pub(crate) static LISTENERS: HashMap<u64, u8> = HashMap::with_max_entries(16_384, 0);

/// Local ports of open sockets a walk found untracked with no listener on their port. Such a
/// socket may be inbound all the same: a service that closed its listener keeps serving
/// the connections it has (nginx, Go's `Shutdown`, Envoy, HAProxy drain so), and an agent
/// started (or restarted) then never saw their opens. The walk cannot tell, so it does not
/// count them and the agent confirms answers for these ports with the socket tables (too
/// high at worst: outbound sockets bound to the port count there too), never a silent zero.
/// The agent clears it before each walk and reads it after; one entry per port at most.
#[map]
pub(crate) static UNSURE_PORTS: HashMap<u16, u8> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// Per-port totals over all namespaces and addresses, indexed by port: an unscoped
/// `/drained?port=P` is one lookup, however many endpoints there are.
#[map]
pub(crate) static PORT_TOTALS: Array<PortTotals> = Array::with_max_entries(PORT_COUNT, 0);

/// One byte per port, set (never cleared) when a socket on it is first tracked, so that a
/// close of a socket never tracked (every client end, every outbound connection) is answered
/// by a 64 KiB array that stays in cache; the per-port totals it used to read are 2 MiB, and
/// a random ephemeral port missed the cache there. A byte, not a bit: byte stores from two
/// CPUs cannot undo each other, where a read-modify-write of a shared word could (and an
/// atomic OR needs Linux 5.12).
#[map]
pub(crate) static TRACKED_PORTS: Array<[u8; 8]> = Array::with_max_entries(TRACKED_PORT_WORDS, 0);

/// One bit per port that somebody is waiting on (set by the agent). Zero-crossing events
/// are written only for these: with nobody waiting, the hot path never wakes the agent.
#[map]
pub(crate) static WATCHED_PORTS: Array<u64> = Array::with_max_entries(WATCHED_WORDS, 0);

/// Wake-ups for the agent: one record per tracked open and close on a watched port.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Missed state changes that walks found and repaired, indexed by `repair`.
#[map]
pub(crate) static REPAIRS: Array<u64> = Array::with_max_entries(repair::COUNT, 0);

/// Addresses of sockets whose entries the agent is about to drop with
/// [`forget_stale_socket`](crate::walk::forget_stale_socket), set by the agent before it runs it
/// and removed right after. While an address is here the handler's close leaves its entry alone
/// (see [`being_forgotten`](crate::track::being_forgotten)): the forgetter is then the only one who
/// may remove it.
#[map]
pub(crate) static FORGETTING: HashMap<u64, u8> = HashMap::with_max_entries(FORGET_BATCH, 0);

/// `[0]` is non-zero while `FORGETTING` has entries (the agent sets it first and clears it
/// last): the common close path costs one array load, not a hash lookup.
#[map]
pub(crate) static FORGETTING_NOW: Array<u64> = Array::with_max_entries(1, 0);

/// Failure counters, indexed by `error_index`. Nothing is dropped silently.
#[map]
pub(crate) static ERRORS: Array<u64> = Array::with_max_entries(error_index::COUNT, 0);

/// Field offsets of the running kernel, from its BTF; written by the agent at load time.
#[unsafe(no_mangle)]
pub(crate) static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    skc_family: 0,
    skc_state: 0,
    skc_num: 0,
    skc_rcv_saddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    net_ns_inum: 0,
    sk_protocol: OFFSET_UNKNOWN,
    skc_daddr: 0,
    skc_v6_daddr: 0,
    skc_dport: 0,
};

/// The in-pod port of `--pod-listen` (host byte order), 0 without it; written by the agent
/// at load time. Application listeners on this port are counted per namespace
/// (`POD_LISTEN_COUNTS`): the agent's `sk_lookup` programs steer the port to the agent only
/// where that count is 0.
#[unsafe(no_mangle)]
pub(crate) static POD_PORT: u16 = 0;

/// Application listeners on `POD_PORT`, keyed by the socket's kernel address, valued by its
/// namespace inode: the exactly-once record behind `POD_LISTEN_COUNTS` (a count goes up
/// only when an insert succeeds or cannot be made, down only when a delete succeeds).
#[map]
pub(crate) static POD_LISTENERS: HashMap<u64, u32> =
    HashMap::with_max_entries(16_384, BPF_F_NO_PREALLOC);

/// Listening sockets on `POD_PORT` per namespace inode (IPv4 and IPv6, any address).
/// Never deleted: a namespace's inode is freed only after its last socket, so its last
/// listener's close has brought the count back to 0, and the inode allocator
/// (`proc_alloc_inum()`, an IDA handing out the lowest free number) keeps the set of keys
/// as small as the set of namespaces alive at once.
#[map]
pub(crate) static POD_LISTEN_COUNTS: HashMap<u32, i64> =
    HashMap::with_max_entries(16_384, BPF_F_NO_PREALLOC);

/// The agent's listening socket in each pod namespace, by namespace inode: what that
/// namespace's `sk_lookup` program assigns (the agent builds one small program per
/// namespace, `kernel/steer.rs`; none of this object's programs use the map).
#[map]
static POD_SOCKETS: SockHash<u32> = SockHash::with_max_entries(16_384, 0);

/// The connections to close, written by the agent right before it runs `destroy_sockets`
/// and removed right after (the agent's `kernel::destroy`). Empty between runs.
#[map]
pub(crate) static DESTROY_TARGETS: HashMap<drain_agent_common::DestroyKey, u8> =
    HashMap::with_max_entries(DESTROY_BATCH, 0);

/// How many targets one run takes; the agent writes larger sets in batches of this size.
const DESTROY_BATCH: u32 = 1_024;

/// `[0]`: sockets `destroy_sockets` destroyed; `[1]`: destroys the kernel refused; `[2]`: targets
/// left alone because they are not tracked inbound connections
/// ([`tracked_as`](crate::destroy::tracked_as)).
#[map]
pub(crate) static DESTROYED: Array<u64> = Array::with_max_entries(3, 0);
