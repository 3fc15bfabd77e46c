//! drain-agent's kernel side: count the inbound TCP connections of every local endpoint.
//!
//! One handler, three ways to reach it (the agent attaches the first that loads, see
//! ARCHITECTURE.md): a BTF tracepoint, the classic tracepoint and a raw tracepoint, all on
//! `sock:inet_sock_set_state`, which the kernel fires from `tcp_set_state()` and
//! `inet_sk_set_state()` *before* it stores the new state (net/ipv4/tcp.c,
//! net/ipv4/af_inet.c). A fourth program, a `iter/tcp` BPF iterator, seeds the maps with the
//! connections that were already established when the agent started.
//!
//! Exactly-once: the per-socket map `SOCKETS` is the source of truth. A count goes up only
//! when a socket's insert (`BPF_NOEXIST`) succeeds, and down only when its delete succeeds,
//! so no interleaving of events, seeding or CPUs can count a socket twice or go negative.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core::intrinsics::atomic_xadd is the only atomic add that compiles for BPF"
)]

use core::{ffi::c_void, intrinsics::AtomicOrdering, ptr};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, RingBuf, SockHash},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use drain_agent_common::{
    AF_INET, AF_INET6, ConnCounts, ConnEvent, ConnKey, DurationHistogram, FORGET_BATCH,
    IPPROTO_TCP, KernelOffsets, OFFSET_UNKNOWN, OWN_STEERED, PORT_COUNT, PortTotals, SOCK_UNSCOPED,
    STARTED_UNKNOWN, SockEntry, TRACKED_PORT_WORDS, Transition, WATCHED_WORDS, classify, crossing,
    duration_bucket, error_index, event_kind, is_active, netns_port_key, repair, tcp_state,
    tracked_port_byte, watched_bit,
};

// Map sizes below are defaults; the agent sets the real ones at load time from its flags.

/// Tracked sockets, keyed by the socket's kernel address. Not preallocated: memory is
/// charged to the agent's cgroup, and a preallocated map would charge its full size at start.
/// `--preallocate-sockets` clears the flag before loading (the agent's `kernel::prealloc`).
/// Either way a deleted element may be reused at once (since Linux 6.1 the default map frees
/// to a per-CPU cache, `bpf_mem_cache_free()`): nothing here relies on a freed entry's copy
/// staying intact, see [`forget_stale_socket`].
#[map]
static SOCKETS: HashMap<u64, SockEntry> = HashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

/// Counters per endpoint. The programs never delete entries; the agent reclaims idle ones
/// by the rule written at [`is_retiring`], which no concurrent open can slip through.
#[map]
static COUNTS: HashMap<ConnKey, ConnCounts> = HashMap::with_max_entries(16_384, 0);

/// Endpoints the agent is reclaiming right now. An open on one of them is counted in its
/// port's totals only ([`SOCK_UNSCOPED`]) and never touches its `COUNTS` entry.
#[map]
static RETIRING: HashMap<ConnKey, u8> = HashMap::with_max_entries(4_096, 0);

/// One bit per port with an endpoint in `RETIRING` (set by the agent first): the common
/// open path costs one array load, not a hash lookup.
#[map]
static RETIRING_PORTS: Array<u64> = Array::with_max_entries(WATCHED_WORDS, 0);

/// The agent's own listening endpoints, by `netns_port_key`: connections to the agent's
/// API are not the services' and take no slot. `OWN_PORTS` is the bitmap in front of it.
#[map]
static OWN_ENDPOINTS: HashMap<u64, u8> = HashMap::with_max_entries(1_024, 0);

#[map]
static OWN_PORTS: Array<u64> = Array::with_max_entries(WATCHED_WORDS, 0);

/// Kernel-side histogram of how long tracked connections stayed active, per local port
/// (not per endpoint: bounded by the port space however many addresses come and go).
#[map]
static DURATIONS: HashMap<u32, DurationHistogram> =
    HashMap::with_max_entries(PORT_COUNT, BPF_F_NO_PREALLOC);

/// Listening (netns, port) pairs, filled by the seeding iterator: a socket found already
/// established is *passive* when its local port has a listener in its namespace.
#[map]
static LISTENERS: HashMap<u64, u8> = HashMap::with_max_entries(16_384, 0);

/// Local ports of open sockets a walk found untracked with no listener on their port. Such a
/// socket may be inbound all the same: a service that closed its listener keeps serving
/// the connections it has (nginx, Go's `Shutdown`, Envoy, HAProxy drain so), and an agent
/// started (or restarted) then never saw their opens. The walk cannot tell, so it does not
/// count them and the agent confirms answers for these ports with the socket tables (too
/// high at worst: outbound sockets bound to the port count there too), never a silent zero.
/// The agent clears it before each walk and reads it after; one entry per port at most.
#[map]
static UNSURE_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// Per-port totals over all namespaces and addresses, indexed by port: an unscoped
/// `/drained?port=P` is one lookup, however many endpoints there are.
#[map]
static PORT_TOTALS: Array<PortTotals> = Array::with_max_entries(PORT_COUNT, 0);

/// One byte per port, set (never cleared) when a socket on it is first tracked, so that a
/// close of a socket never tracked (every client end, every outbound connection) is answered
/// by a 64 KiB array that stays in cache; the per-port totals it used to read are 2 MiB, and
/// a random ephemeral port missed the cache there. A byte, not a bit: byte stores from two
/// CPUs cannot undo each other, where a read-modify-write of a shared word could (and an
/// atomic OR needs Linux 5.12).
#[map]
static TRACKED_PORTS: Array<[u8; 8]> = Array::with_max_entries(TRACKED_PORT_WORDS, 0);

/// One bit per port that somebody is waiting on (set by the agent). Zero-crossing events
/// are written only for these: with nobody waiting, the hot path never wakes the agent.
#[map]
static WATCHED_PORTS: Array<u64> = Array::with_max_entries(WATCHED_WORDS, 0);

/// Wake-ups for the agent: one record per tracked open and close on a watched port.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Missed state changes that walks found and repaired, indexed by `repair`.
#[map]
static REPAIRS: Array<u64> = Array::with_max_entries(repair::COUNT, 0);

/// Addresses of sockets whose entries the agent is about to drop with
/// [`forget_stale_socket`], set by the agent before it runs it and removed right after.
/// While an address is here the handler's close leaves its entry alone (see
/// [`being_forgotten`]): the forgetter is then the only one who may remove it.
#[map]
static FORGETTING: HashMap<u64, u8> = HashMap::with_max_entries(FORGET_BATCH, 0);

/// `[0]` is non-zero while `FORGETTING` has entries (the agent sets it first and clears it
/// last): the common close path costs one array load, not a hash lookup.
#[map]
static FORGETTING_NOW: Array<u64> = Array::with_max_entries(1, 0);

/// Failure counters, indexed by `error_index`. Nothing is dropped silently.
#[map]
static ERRORS: Array<u64> = Array::with_max_entries(error_index::COUNT, 0);

/// Field offsets of the running kernel, from its BTF; written by the agent at load time.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
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
static POD_PORT: u16 = 0;

/// Application listeners on `POD_PORT`, keyed by the socket's kernel address, valued by its
/// namespace inode: the exactly-once record behind `POD_LISTEN_COUNTS` (a count goes up
/// only when an insert succeeds or cannot be made, down only when a delete succeeds).
#[map]
static POD_LISTENERS: HashMap<u64, u32> = HashMap::with_max_entries(16_384, BPF_F_NO_PREALLOC);

/// Listening sockets on `POD_PORT` per namespace inode (IPv4 and IPv6, any address).
/// Never deleted: a namespace's inode is freed only after its last socket, so its last
/// listener's close has brought the count back to 0, and the inode allocator
/// (`proc_alloc_inum()`, an IDA handing out the lowest free number) keeps the set of keys
/// as small as the set of namespaces alive at once.
#[map]
static POD_LISTEN_COUNTS: HashMap<u32, i64> = HashMap::with_max_entries(16_384, BPF_F_NO_PREALLOC);

/// The agent's listening socket in each pod namespace, by namespace inode: what that
/// namespace's `sk_lookup` program assigns (the agent builds one small program per
/// namespace, `kernel/steer.rs`; none of this object's programs use the map).
#[map]
static POD_SOCKETS: SockHash<u32> = SockHash::with_max_entries(16_384, 0);

const EEXIST: i32 = 17;

/// Handler errors: nothing to do but count them (a BPF program has nobody to return them to).
#[derive(Clone, Copy)]
enum Error {
    ReadFailed,
}

// ---------------------------------------------------------------------------------------
// The three attach points. Each only extracts (sk, oldstate, newstate) from its context.
// ---------------------------------------------------------------------------------------

/// `tp_btf/inet_sock_set_state`: args are the tracepoint's `TP_PROTO(const struct sock *sk,
/// const int oldstate, const int newstate)` (include/trace/events/sock.h).
///
/// Here the verifier knows `sk` is a `struct sock *`, so the socket is read with plain
/// loads it checks against the kernel's BTF ([`BtfLoads`]), not with helper calls.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    on_state_change::<BtfLoads>(old_state, new_state, || Ok(ctx.arg::<u64>(0)));
    0
}

/// `raw_tp/inet_sock_set_state`: the same TP_PROTO arguments, as `u64 args[]`.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_raw(ctx: RawTracePointContext) -> i32 {
    let old_state = ctx.arg::<u64>(1) as i32;
    let new_state = ctx.arg::<u64>(2) as i32;
    on_state_change::<ProbeReads>(old_state, new_state, || read_ctx_u64(ctx.as_ptr(), 0));
    0
}

/// Classic `tracepoint/sock/inet_sock_set_state`. The record layout is TP_STRUCT__entry of
/// include/trace/events/sock.h after the 8-byte common header:
/// `const void *skaddr` @8, `int oldstate` @16, `int newstate` @20 (stable since 4.16; the
/// agent checks these offsets against tracefs' `format` file before attaching).
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state_tp(ctx: TracePointContext) -> i32 {
    const SKADDR: usize = 8;
    const OLDSTATE: usize = 16;
    const NEWSTATE: usize = 20;
    let record = ctx.as_ptr().cast::<u8>();
    // SAFETY: the offsets lie inside the record (checked by the verifier too).
    let (old_state, new_state) = unsafe {
        (
            ptr::read_unaligned(record.add(OLDSTATE).cast::<i32>()),
            ptr::read_unaligned(record.add(NEWSTATE).cast::<i32>()),
        )
    };
    on_state_change::<ProbeReads>(old_state, new_state, || {
        // SAFETY: as above.
        Ok(unsafe { ptr::read_unaligned(record.add(SKADDR).cast::<u64>()) })
    });
    0
}

/// Reads a context slot through `bpf_probe_read_kernel`, so that the verifier sees a plain
/// number rather than a typed kernel pointer: the field offsets we add to it come from a
/// global and are not constants, and typed pointers only take constant offsets.
#[inline(always)]
fn read_ctx_u64(ctx: *mut c_void, index: usize) -> Result<u64, Error> {
    // SAFETY: the context holds at least `index + 1` u64 arguments (TP_PROTO has three).
    unsafe { bpf_probe_read_kernel(ctx.cast::<u64>().add(index)) }.map_err(|_| Error::ReadFailed)
}

#[inline(always)]
fn on_state_change<M: KernelMemory>(
    old_state: i32,
    new_state: i32,
    sk: impl FnOnce() -> Result<u64, Error>,
) {
    // Most transitions (SYN_SENT, LISTEN, TIME_WAIT, …) change nothing: leave before
    // touching the socket or any map.
    let transition = classify(old_state, new_state);
    if transition == Transition::Unchanged {
        // Listeners (classify leaves LISTEN unchanged): the in-pod port's, counted per
        // namespace. Connections' opens and closes never get here.
        if new_state == tcp_state::LISTEN {
            if let Err(error) = try_on_listen::<M>(sk) {
                // A listener that may be on the in-pod port went uncounted: steer nowhere.
                count_error(error);
                count_error_at(error_index::POD_LISTEN_COUNT_FAILED);
            }
        } else if old_state == tcp_state::LISTEN
            && let Err(error) = try_on_unlisten(sk)
        {
            // Not un-counted: too high, never too low.
            count_error(error);
        }
        return;
    }
    if let Err(error) = try_on_state_change::<M>(transition, sk) {
        count_error(error);
    }
}

#[inline(always)]
fn try_on_state_change<M: KernelMemory>(
    transition: Transition,
    sk: impl FnOnce() -> Result<u64, Error>,
) -> Result<(), Error> {
    let sk = sk()?;
    match transition {
        Transition::Open => {
            let offsets = kernel_offsets();
            if !is_tcp::<M>(sk, &offsets)? {
                return Ok(());
            }
            let key = read_key::<M>(sk, &offsets)?;
            let peer = read_peer::<M>(sk, &offsets)?;
            track_open(sk, key, peer, false);
        }
        Transition::Close => {
            // Most closes are of sockets never tracked (every client end, every outbound
            // connection). A port with no tracked connection ever is not marked in
            // `TRACKED_PORTS`: one load from a small array answers, where a miss in the big
            // socket map costs a lookup.
            // On a move to CLOSE the kernel has already released the port (`inet_put_port()`
            // zeroes `inet_num` before `inet_sk_state_store()` fires the tracepoint): port 0
            // tells nothing, so look the socket up.
            // SAFETY: one field of the read-only global (not the whole struct: hot path).
            let skc_num = unsafe { ptr::read_volatile(&raw const KERNEL_OFFSETS.skc_num) };
            let port = M::read::<u16>(sk, skc_num)?;
            if port == 0 || port_ever_tracked(port) {
                track_close(sk, true);
            }
        }
        Transition::Unchanged => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Application listeners on the in-pod port (`--pod-listen` with `sk_lookup`).
// ---------------------------------------------------------------------------------------

/// CLOSE → LISTEN: `inet_csk_listen_start()` (net/ipv4/inet_connection_sock.c) calls
/// `inet_sk_state_store(sk, TCP_LISTEN)`, which fires the tracepoint (net/ipv4/af_inet.c),
/// *before* `get_port()` validates the port and `hash()` puts the socket in the listening
/// hash; if either fails it calls `inet_sk_set_state(sk, TCP_CLOSE)`, which fires it again.
/// So the count goes up before the socket can take a connection and comes back down on a
/// failed `listen()`: too high for a moment, never too low. `inet_listen()` holds the
/// socket lock throughout, as a walk does ([`seed_pod_listeners`]).
///
/// `skc_num` is the bound port at this point (`bind()` set it). A socket that calls
/// `listen()` without `bind()` reads 0 here and gets an ephemeral port from `get_port()`:
/// it is not counted, which matters only if the in-pod port lies inside
/// `ip_local_port_range` (ARCHITECTURE.md says so; the default range starts at 32768).
#[inline(always)]
fn try_on_listen<M: KernelMemory>(sk: impl FnOnce() -> Result<u64, Error>) -> Result<(), Error> {
    let pod_port = pod_port();
    if pod_port == 0 {
        return Ok(());
    }
    let sk = sk()?;
    // SAFETY: one field of the read-only global.
    let skc_num = unsafe { ptr::read_volatile(&raw const KERNEL_OFFSETS.skc_num) };
    if M::read::<u16>(sk, skc_num)? != pod_port {
        return Ok(());
    }
    let offsets = kernel_offsets();
    // An MPTCP listener stores LISTEN on its own socket and then listens on a TCP subflow
    // socket (net/mptcp/protocol.c `mptcp_listen()`): the subflow is the one counted.
    if !is_tcp::<M>(sk, &offsets)? {
        return Ok(());
    }
    let netns = read_netns::<M>(sk, &offsets)?;
    pod_listener_open(sk, netns, false);
    Ok(())
}

/// LISTEN → CLOSE: `tcp_close()` / `tcp_disconnect()` call `tcp_set_state(sk, TCP_CLOSE)`,
/// which unhashes the socket and releases its port (`inet_put_port()` zeroes `inet_num`,
/// so the port cannot be read here) before `inet_sk_state_store()` fires the tracepoint
/// (net/ipv4/tcp.c). So the socket is looked up by its address; listener closes are rare.
#[inline(always)]
fn try_on_unlisten(sk: impl FnOnce() -> Result<u64, Error>) -> Result<(), Error> {
    if pod_port() == 0 {
        return Ok(());
    }
    pod_listener_close(sk()?);
    Ok(())
}

/// Counts the listener `sk` of namespace `netns` unless it is counted already.
#[inline(always)]
fn pod_listener_open(sk: u64, netns: u32, found_by_walk: bool) {
    match POD_LISTENERS.insert(sk, netns, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // A walk found the handler's entry (both hold the socket's lock): counted once.
        Err(error) if error == -EEXIST && found_by_walk => return,
        // The handler's listen found the address taken: a dead listener's entry whose close
        // was missed. Take the entry over and count this one: the dead one's count stays
        // (too high, never too low).
        Err(error) if error == -EEXIST => {
            if POD_LISTENERS.insert(sk, netns, 0).is_err() {
                count_error_at(error_index::POD_LISTENER_MAP_FULL);
            }
        }
        // No room: counted all the same, and never un-counted (no entry to delete).
        Err(_) => count_error_at(error_index::POD_LISTENER_MAP_FULL),
    }
    add_pod_listeners(netns, 1);
}

/// Un-counts the listener `sk` if it is counted.
#[inline(always)]
fn pod_listener_close(sk: u64) {
    // SAFETY: the value is copied out at once; the socket's state changes are serialised by
    // its lock, and walks only insert, so nobody else removes the entry in between.
    let Some(netns) = (unsafe { POD_LISTENERS.get(sk) }).copied() else {
        return;
    };
    if POD_LISTENERS.remove(sk).is_ok() {
        add_pod_listeners(netns, -1);
    }
}

#[inline(always)]
fn add_pod_listeners(netns: u32, delta: i64) {
    let count = match POD_LISTEN_COUNTS.get_ptr_mut(netns) {
        Some(count) => count,
        None => {
            // Another CPU may create it first: BPF_NOEXIST keeps theirs.
            let _ = POD_LISTEN_COUNTS.insert(netns, 0, u64::from(BPF_NOEXIST));
            match POD_LISTEN_COUNTS.get_ptr_mut(netns) {
                Some(count) => count,
                None => {
                    // The `sk_lookup` programs read this counter and stop steering.
                    count_error_at(error_index::POD_LISTEN_COUNT_FAILED);
                    return;
                }
            }
        }
    };
    // SAFETY: a pointer into a map value that is never deleted.
    unsafe {
        add_active(count, delta);
    }
}

/// Whether an application listens on the in-pod port in `netns` (as far as counted).
#[inline(always)]
fn app_listens(netns: u32) -> bool {
    // SAFETY: the map value is plain data, read once.
    unsafe { POD_LISTEN_COUNTS.get(netns) }.is_some_and(|count| *count != 0)
}

#[inline(always)]
fn pod_port() -> u16 {
    // SAFETY: a read-only global the loader filled in; volatile so the 0 default is not
    // folded in.
    unsafe { ptr::read_volatile(&raw const POD_PORT) }
}

/// `iter/tcp`, run by the agent in one pod namespace before it attaches that namespace's
/// `sk_lookup` program: counts the listeners on the in-pod port that began listening before
/// the handler was attached. Exactly once with the handler: both insert into
/// `POD_LISTENERS` with `BPF_NOEXIST` under the socket's lock (`bpf_iter_tcp_seq_show()`
/// takes `lock_sock_fast()`, `inet_listen()` `lock_sock()`), and a socket closed before
/// the walk reaches it is unhashed and skipped. Every walk (`seed_established_tcp`) does
/// the same for the listeners it passes, so a listener the seed could not see (one whose
/// `listen()` passed its tracepoint before the handler was attached and reached the
/// listening hash only after the seed passed its bucket) is counted by the next walk.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn seed_pod_listeners(ctx: *mut c_void) -> i32 {
    if let Err(error) = try_seed_pod_listeners(ctx) {
        // A listener that may be on the in-pod port went uncounted: steer nowhere.
        count_error(error);
        count_error_at(error_index::POD_LISTEN_COUNT_FAILED);
    }
    0
}

#[inline(always)]
fn try_seed_pod_listeners(ctx: *mut c_void) -> Result<(), Error> {
    let sk = read_ctx_u64(ctx, 1)?;
    if sk == 0 {
        return Ok(());
    }
    let offsets = kernel_offsets();
    let state = i32::from(ProbeReads::read::<u8>(sk, offsets.skc_state)?);
    if state != tcp_state::LISTEN {
        return Ok(());
    }
    let port = ProbeReads::read::<u16>(sk, offsets.skc_num)?;
    seed_pod_listener(sk, port, &offsets)
}

/// A walk's part for one listening socket on `port`. A socket that cannot be read may be an
/// uncounted listener on the in-pod port: then every `sk_lookup` program stops steering.
#[inline(always)]
fn seed_pod_listener(sk: u64, port: u16, offsets: &KernelOffsets) -> Result<(), Error> {
    let pod_port = pod_port();
    if pod_port == 0 || port != pod_port {
        return Ok(());
    }
    let netns = match is_tcp::<ProbeReads>(sk, offsets) {
        Ok(false) => return Ok(()),
        Ok(true) => read_netns::<ProbeReads>(sk, offsets),
        Err(error) => Err(error),
    };
    match netns {
        Ok(netns) => {
            pod_listener_open(sk, netns, true);
            Ok(())
        }
        Err(error) => {
            count_error_at(error_index::POD_LISTEN_COUNT_FAILED);
            Err(error)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Walks: connections established before the agent started, and repairs.
// ---------------------------------------------------------------------------------------

/// `iter/tcp` (aya-ebpf 0.2 has no `#[iter]` attribute, so the section is set by hand).
/// The agent runs it at start (seeding) and again whenever the handler may have missed a
/// state change (see `drain_agent_common::repair`).
///
/// The context is `struct bpf_iter__tcp { meta, sk_common, uid }` (net/ipv4/tcp_ipv4.c); it
/// walks the listening sockets first, then the established ones, of the network namespace
/// that created the iterator. `bpf_iter_tcp_seq_show()` holds the socket lock
/// (`lock_sock_fast`) while this runs and skips unhashed sockets, so the state we read cannot
/// change under us: a socket that closes during the walk is seen closed (skipped), or its
/// close runs after our insert and removes it. Counted once or not at all, never twice.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn seed_established_tcp(ctx: *mut c_void) -> i32 {
    if let Err(error) = try_seed_established_tcp(ctx) {
        count_error(error);
    }
    0
}

#[inline(always)]
fn try_seed_established_tcp(ctx: *mut c_void) -> Result<(), Error> {
    let sk = read_ctx_u64(ctx, 1)?;
    if sk == 0 {
        // The last call of a walk has no socket.
        return Ok(());
    }
    let offsets = kernel_offsets();
    let state = i32::from(ProbeReads::read::<u8>(sk, offsets.skc_state)?);
    if state == tcp_state::LISTEN {
        let netns = read_netns::<ProbeReads>(sk, &offsets)?;
        let port = ProbeReads::read::<u16>(sk, offsets.skc_num)?;
        // A full map means a pre-existing passive socket of this port could be taken for an
        // outbound one and go uncounted: the agent must not vouch for counts until a walk
        // has recorded every listener (it clears the map before each walk).
        if LISTENERS.insert(netns_port_key(netns, port), 1, 0).is_err() {
            count_error_at(error_index::LISTENER_MAP_FULL);
        }
        seed_pod_listener(sk, port, &offsets)?;
    } else if is_active(state) {
        let key = read_key::<ProbeReads>(sk, &offsets)?;
        let peer = read_peer::<ProbeReads>(sk, &offsets)?;
        // A tracked socket found open is live whether or not its port still has a
        // listener: a service that closed its listener keeps serving the connections it
        // has (graceful shutdown, one-shot servers). The listener only decides whether an
        // *untracked* socket was opened passively (an inbound connection) at all.
        match SOCKETS.get_ptr_mut(sk) {
            // Tracked: stamp it as seen open by this walk.
            // SAFETY: a pointer into the live map value; the socket lock is held.
            Some(entry) if unsafe { (*entry).key } == key => unsafe {
                ptr::write_volatile(ptr::addr_of_mut!((*entry).audited_ns), bpf_ktime_get_ns());
            },
            // The address belongs to an earlier socket whose close was missed: un-count
            // that one, and count this one if it is passive.
            Some(_) => {
                if track_close(sk, false) {
                    count_repair(repair::CLOSES_FOUND);
                }
                seed_untracked(sk, key, peer);
            }
            // Untracked: found by seeding, or its open was missed.
            None => seed_untracked(sk, key, peer),
        }
    }
    Ok(())
}

/// Drops the entry of a socket whose close was missed. Not attached: the agent runs it with
/// `BPF_PROG_TEST_RUN`, args `[sk, walk_started_ns]`, for entries the last walk neither
/// found open nor saw made. It checks that again here, against the live entry.
///
/// Why its look-up and its delete act on the same entry. It holds no socket lock (the
/// socket is dead), so without more, another remover could act at the same address in
/// between: the close of a newer socket there (an outbound one, which the handler lets
/// remove what it finds, see `track_close`) drops the entry and un-counts the dead
/// socket, the memory is reused by a passive socket whose open inserts a fresh entry, and
/// our delete would drop *that* one and un-count the dead socket a second time: a count
/// one too low and nothing doubted. So the agent first puts the address in `FORGETTING`
/// and waits for an RCU grace period (every handler run is one; `kernel::forget`): after
/// it, no handler run that missed the mark is still running, and every later close at the
/// address leaves the entry alone ([`being_forgotten`]). An open there cannot insert while
/// the entry exists (`BPF_NOEXIST`), and walks run one at a time with this program (the
/// agent's walker). So between our look-up and our delete nobody else removes or replaces
/// the entry, and the copy we take cannot be torn by the element's memory being reused
/// (the hash map reuses a deleted element at once since Linux 6.1, kernel/bpf/hashtab.c
/// `htab_elem_free()` → `bpf_mem_cache_free()`).
#[raw_tracepoint(tracepoint = "forget_stale_socket")]
pub fn forget_stale_socket(ctx: RawTracePointContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    let walk_started_ns = ctx.arg::<u64>(1);
    // SAFETY: the entry is copied out at once.
    let Some(entry) = (unsafe { SOCKETS.get(sk) }).copied() else {
        return 0;
    };
    if entry.audited_ns >= walk_started_ns || entry.tracked_ns >= walk_started_ns {
        return 0;
    }
    if track_close(sk, false) {
        count_repair(repair::CLOSES_FOUND);
        return 1;
    }
    0
}

/// An open socket the walk found untracked: counted when its port has a listener (then it
/// was opened passively); otherwise its port is marked unsure ([`UNSURE_PORTS`]).
#[inline(always)]
fn seed_untracked(sk: u64, key: ConnKey, peer: Peer) {
    if has_listener(&key) {
        if track_open(sk, key, peer, true) {
            count_repair(repair::OPENS_FOUND);
        }
    } else if UNSURE_PORTS.insert(key.port, 1, 0).is_err() {
        // Cannot happen (a slot per port); if it did, nothing would be vouched for.
        count_error_at(error_index::LISTENER_MAP_FULL);
    }
}

/// Whether the walk saw a listener on the key's (namespace, port): a socket found open
/// there was opened passively (ephemeral client ports never collide with listeners).
#[inline(always)]
fn has_listener(key: &ConnKey) -> bool {
    // SAFETY: the map value is plain data; we only test for its presence.
    unsafe { LISTENERS.get(netns_port_key(key.netns, key.port)) }.is_some()
}

// ---------------------------------------------------------------------------------------
// Closing connections at a drain's deadline (issue 12).
// ---------------------------------------------------------------------------------------

/// The connections to close, written by the agent right before it runs `destroy_sockets`
/// and removed right after (the agent's `kernel::destroy`). Empty between runs.
#[map]
static DESTROY_TARGETS: HashMap<drain_agent_common::DestroyKey, u8> =
    HashMap::with_max_entries(DESTROY_BATCH, 0);

/// How many targets one run takes; the agent writes larger sets in batches of this size.
const DESTROY_BATCH: u32 = 1_024;

/// `[0]`: sockets `destroy_sockets` destroyed; `[1]`: destroys the kernel refused; `[2]`:
/// targets left alone because they are not tracked inbound connections ([`tracked_as`]).
#[map]
static DESTROYED: Array<u64> = Array::with_max_entries(3, 0);

/// `DESTROYED` slots.
const DESTROYED_OK: u32 = 0;
const DESTROY_REFUSED: u32 = 1;
const DESTROY_NOT_TRACKED: u32 = 2;

unsafe extern "C" {
    /// The kfunc `int bpf_sock_destroy(struct sock_common *sock)` (net/core/filter.c,
    /// Linux 6.5): calls the protocol's `diag_destroy` (`tcp_abort()` for TCP) with
    /// `ECONNABORTED`, the same abort `SOCK_DESTROY` (`ss -K`) does: the peer gets a RST,
    /// the owner sees the error on its next call. Allowed only in BPF iterators
    /// (`tracing_iter_filter`), and safe in the tcp one, which holds the socket's lock while
    /// the program runs (`bpf_iter_tcp_seq_show()` takes `lock_sock_fast()`); `tcp_abort()`
    /// skips its own `lock_sock()` when called from BPF (`has_current_bpf_ctx()`, 6.5).
    /// `KF_TRUSTED_ARGS`: the argument must be the iterator's own, unmodified socket pointer.
    /// aya 0.14 cannot link this call; the agent does (drain-agent/src/kernel/destroy.rs).
    fn bpf_sock_destroy(sock: *mut c_void) -> i32;
}

/// `iter/tcp`, run by the agent in one network namespace at a time when a drain's deadline
/// passes: destroys each ESTABLISHED or CLOSE_WAIT socket whose two ends are in
/// `DESTROY_TARGETS` *and* that is a tracked inbound connection ([`tracked_as`]): never an
/// outbound socket that happens to use the drained port as its local port. Safe against
/// races for the same reasons as the walker above: the socket lock is held, and unhashed
/// sockets are skipped, so the state we test is the state we destroy. The handler sees the
/// socket move to CLOSE and un-counts it as usual.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn destroy_sockets(ctx: *mut c_void) -> i32 {
    if let Err(error) = try_destroy_sockets(ctx) {
        count_error(error);
    }
    0
}

#[inline(always)]
fn try_destroy_sockets(ctx: *mut c_void) -> Result<(), Error> {
    // A plain load, not `bpf_probe_read_kernel`: the verifier types `bpf_iter__tcp.sk_common`
    // (offset 8) as a trusted `struct sock_common *` or NULL (net/ipv4/tcp_ipv4.c,
    // `tcp_reg_info`), which is what the kfunc takes; a probe read would make it a number.
    // SAFETY: the context is `struct bpf_iter__tcp`, whose second member is the socket.
    let sk = unsafe { ptr::read_volatile(ctx.cast::<u64>().add(1)) };
    if sk == 0 {
        // The last call of a walk has no socket.
        return Ok(());
    }
    let offsets = kernel_offsets();
    let state = i32::from(BtfLoads::read::<u8>(sk, offsets.skc_state)?);
    if !is_active(state) {
        return Ok(());
    }
    let local = read_key::<BtfLoads>(sk, &offsets)?;
    let remote = read_peer::<BtfLoads>(sk, &offsets)?;
    let target = drain_agent_common::DestroyKey {
        family: local.family,
        local_port: local.port,
        remote_port: remote.port,
        _pad: 0,
        local_addr: local.addr,
        remote_addr: remote.addr,
    };
    // SAFETY: the value is plain data; we only test for its presence.
    if unsafe { DESTROY_TARGETS.get(target) }.is_none() {
        return Ok(());
    }
    if !tracked_as(sk, &local, &remote) {
        // An outbound connection from the drained port, or one the agent never tracked:
        // not the drain's to close, whatever user space asked.
        count_destroyed(DESTROY_NOT_TRACKED);
        return Ok(());
    }
    // SAFETY: `sk` is the iterator's socket, locked for the duration of this program.
    let result = unsafe { bpf_sock_destroy(sk as *mut c_void) };
    count_destroyed(if result == 0 {
        DESTROYED_OK
    } else {
        DESTROY_REFUSED
    });
    Ok(())
}

/// Whether the socket at `sk` is tracked, as the connection (`local`, `remote`) it is now:
/// the proof `destroy_sockets` asks for before destroying it.
///
/// `SOCKETS` is keyed by the socket's kernel address, as the handler keys it: the
/// tracepoint's `sk` is a `struct sock *`, the iterator's `sk_common` a `struct sock_common
/// *`, and `__sk_common` is the first member of `struct sock` (include/net/sock.h): the same
/// address (the walker keys by it too). An entry is made only by a passive open
/// (`SYN_RECV` → `ESTABLISHED`/`CLOSE_WAIT`, see `classify`; an active open goes
/// `SYN_SENT` → `ESTABLISHED` and is never inserted), or by a walk that found the socket
/// open on a port with a listener in its namespace (seeding, repairs).
///
/// Why the entry cannot change under us for this socket: `bpf_iter_tcp_seq_show()`
/// (net/ipv4/tcp_ipv4.c) holds the socket lock (`lock_sock_fast()`) while this program
/// runs, and every state change of a TCP socket runs under that lock (`tcp_set_state()` in
/// process context owns it; in softirq it holds the spinlock, and defers to the backlog
/// while the socket is owned), so the handler's insert (at the open) and delete (at the
/// close) for *this* socket cannot run meanwhile, nor can a walk's (same lock). The sweep's
/// `forget_stale_socket` deletes without the lock, but only an entry no walk found open
/// since it began, i.e. a dead socket's: not this live one's (a walk stamps it). The
/// address cannot belong to another live socket.
///
/// What the entry does not prove, so it is compared with the socket: a skipped close leaves
/// a dead socket's entry at an address the allocator may give to any new socket (see
/// `track_open`). Comparing the whole entry (namespace, local address and port, remote
/// address and port) leaves only a dead connection with this very four-tuple in this
/// namespace, whose close the kernel skipped and no walk has swept yet. And a socket a
/// walk judged passive by its port's listener: an outbound socket bound to a port that
/// has a listener looks the same to a walk (it is counted too, the safe side for drains).
#[inline(always)]
fn tracked_as(sk: u64, local: &ConnKey, remote: &Peer) -> bool {
    // SAFETY: the entry is copied out at once (plain data).
    match unsafe { SOCKETS.get(sk) }.copied() {
        Some(entry) => {
            entry.key == *local
                && entry.remote_family == remote.family
                && entry.remote_port == remote.port
                && entry.remote == remote.addr
        }
        None => false,
    }
}

#[inline(always)]
fn count_destroyed(slot: u32) {
    if let Some(counter) = DESTROYED.get_ptr_mut(slot) {
        // SAFETY: a pointer into the array map's value.
        unsafe { atomic_add_u64(counter, 1) };
    }
}

// ---------------------------------------------------------------------------------------
// The exactly-once bookkeeping.
// ---------------------------------------------------------------------------------------

/// Counts `sk` under `key` if it is not tracked yet; true when it was counted now.
///
/// Where it is counted: always in the port's totals (an array: its memory is never freed,
/// so port-only answers stay exact whatever happens to the hash maps), and under its
/// endpoint in `COUNTS` unless that is impossible (map full) or forbidden (the endpoint is
/// being reclaimed); then the socket is marked [`SOCK_UNSCOPED`] and counted in the port's
/// `unscoped` total instead, so the agent knows scoped answers on this port need checking.
#[inline(always)]
fn track_open(sk: u64, key: ConnKey, peer: Peer, found_by_walk: bool) -> bool {
    if is_own_endpoint(&key) {
        return false;
    }
    // SAFETY: a BPF helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // Decide the endpoint counters *before* the socket entry exists: the entry's flags
    // are written once, with the insert, and the close reads them.
    let counts = if is_retiring(&key) {
        None
    } else {
        let counts = counts_of(&key);
        if counts.is_none() {
            count_error_at(error_index::COUNT_MAP_FULL);
        }
        counts
    };
    // A socket found by a walk was established at some unknown time before.
    let started_ns = if found_by_walk { STARTED_UNKNOWN } else { now };
    let entry = SockEntry {
        key,
        flags: if counts.is_some() { 0 } else { SOCK_UNSCOPED },
        started_ns,
        tracked_ns: now,
        audited_ns: 0,
        remote: peer.addr,
        remote_port: peer.port,
        remote_family: peer.family,
        _pad: 0,
    };
    match SOCKETS.insert(sk, entry, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // A walk found it tracked meanwhile: it holds the socket's lock, as the handler
        // does, so this is the handler's own entry (counted once).
        Err(error) if error == -EEXIST && found_by_walk => return false,
        // The handler's open found the address taken. Not by this socket: a socket opens
        // passively once, and before its open is stored no walk can see it active (the
        // tracepoint fires before `tcp_set_state()` stores ESTABLISHED, under the lock a
        // walk takes). So the entry is a dead socket's whose close the kernel skipped, at
        // an address the allocator gave to this new one. It cannot be replaced here
        // without racing `forget_stale_socket`, which may be removing it without this
        // socket's lock; so this connection is not counted, and the port is marked like a
        // full map's: the agent does not vouch for it until a walk has repaired both (the
        // walk finds this socket open under a foreign entry and swaps them).
        Err(error) if error == -EEXIST => {
            lose_connection(key.port, error_index::ADDRESS_TAKEN);
            return false;
        }
        Err(_) => {
            // Cannot track it at all: the port's `lost` tells the agent not to vouch for
            // this port until a walk has found every open socket of it tracked.
            lose_connection(key.port, error_index::SOCKET_MAP_FULL);
            return false;
        }
    }
    let endpoint_now = counts.map(|counts| {
        // SAFETY: `counts` points into a map value that lives while this program runs
        // (and is not reclaimed meanwhile: see `is_retiring`).
        unsafe {
            atomic_add_u64(ptr::addr_of_mut!((*counts).opened), 1);
            ptr::write_volatile(ptr::addr_of_mut!((*counts).last_change_ns), now);
            add_active(ptr::addr_of_mut!((*counts).active), 1)
        }
    });
    mark_port_tracked(key.port);
    let port_now = add_port_total(key.port, 1, counts.is_none(), now);
    // After both counters moved (see `emit_event` for why both).
    emit_event(
        key,
        peer,
        event_kind::OPEN,
        crossed(endpoint_now == Some(1), port_now == Some(1)),
        now,
    );
    true
}

/// A connection on `port` that could not be tracked, for the reason `error`: counted in the
/// port's `lost`, which the agent compares with its value at the last walk.
#[inline(always)]
fn lose_connection(port: u16, error: u32) {
    count_error_at(error);
    if let Some(total) = PORT_TOTALS.get_ptr_mut(u32::from(port)) {
        // SAFETY: a pointer into the array map's value.
        unsafe { atomic_add_u64(ptr::addr_of_mut!((*total).lost), 1) };
    }
}

/// Un-counts `sk` if it is tracked; true when it was un-counted now. `closed_now` says the
/// close is happening now (so its duration is known), not found out later by a walk.
#[inline(always)]
fn track_close(sk: u64, closed_now: bool) -> bool {
    // SAFETY: the entry is copied out at once; state changes of one socket are serialised
    // by its lock, so nobody else removes it between here and our own remove.
    let Some(entry) = (unsafe { SOCKETS.get(sk) }).copied() else {
        // Not tracked: an outbound connection, or one the agent could not track.
        return false;
    };
    // Only the handler's closes (`closed_now`) can race the forgetter; walks run one at a
    // time with it. Checked only here, where an entry exists: most closes have none.
    if closed_now && being_forgotten(sk) {
        // The entry is left to the forgetter. If it was this socket's own, it is now a dead
        // socket's entry, and the repair walk this counter asks for drops it (a count too
        // high until then, never too low).
        count_error_at(error_index::CLOSE_DEFERRED);
        return false;
    }
    if SOCKETS.remove(sk).is_err() {
        return false;
    }
    // SAFETY: a BPF helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let unscoped = entry.flags & SOCK_UNSCOPED != 0;
    let mut endpoint_now = None;
    if !unscoped {
        match COUNTS.get_ptr_mut(entry.key) {
            // SAFETY: as in `track_open`; the endpoint cannot be reclaimed while this
            // socket is counted in it (its `active` is at least 1 until the add below).
            Some(counts) => unsafe {
                atomic_add_u64(ptr::addr_of_mut!((*counts).closed), 1);
                ptr::write_volatile(ptr::addr_of_mut!((*counts).last_change_ns), now);
                endpoint_now = Some(add_active(ptr::addr_of_mut!((*counts).active), -1));
            },
            None => count_error_at(error_index::COUNT_MISSING),
        }
    }
    let port_now = add_port_total(entry.key.port, -1, unscoped, now);
    let peer = Peer {
        addr: entry.remote,
        port: entry.remote_port,
        family: entry.remote_family,
    };
    emit_event(
        entry.key,
        peer,
        event_kind::CLOSE,
        crossed(endpoint_now == Some(0), port_now == Some(0)),
        now,
    );
    if closed_now && entry.started_ns != STARTED_UNKNOWN {
        record_duration(entry.key.port, now.saturating_sub(entry.started_ns));
    }
    true
}

/// Whether the agent is about to drop the entry at the socket address `sk` (see
/// [`forget_stale_socket`]). The agent marks the address before its grace period, so a
/// close that runs after the grace period finds the mark.
#[inline(always)]
fn being_forgotten(sk: u64) -> bool {
    match FORGETTING_NOW.get(0) {
        Some(now) if *now != 0 => {}
        _ => return false,
    }
    // SAFETY: the map value is plain data; we only test for its presence.
    unsafe { FORGETTING.get(sk) }.is_some()
}

/// Whether the agent is reclaiming `key`'s endpoint counters right now.
///
/// The reclaim rule (the agent's side is `kernel::reclaim`): the agent (1) sets the port's
/// bit in `RETIRING_PORTS` and puts the key in `RETIRING`, (2) waits for an RCU grace
/// period (`membarrier(MEMBARRIER_CMD_GLOBAL)` calls `synchronize_rcu()`; every run of
/// these programs is an RCU read-side critical section: tracepoints run their probes with
/// preemption disabled, `__bpf_trace_run()` and `bpf_iter_run_prog()` take
/// `rcu_read_lock()`), (3) reads the entry and deletes it only if `active` is 0, (4) takes
/// the key out of `RETIRING`. After (2), no open that missed the mark is still running, and
/// every later open sees the mark and does not touch `COUNTS[key]`; a close touches it only
/// for a socket counted in it, which keeps `active` above 0 until that close's last write.
/// So a deleted entry is one no program holds or will take a pointer to: no open is lost
/// and no write lands in freed (or reused) memory.
#[inline(always)]
fn is_retiring(key: &ConnKey) -> bool {
    let (word, mask) = watched_bit(key.port);
    match RETIRING_PORTS.get(word) {
        Some(bits) if bits & mask != 0 => {}
        _ => return false,
    }
    // SAFETY: the map value is plain data; we only test for its presence.
    unsafe { RETIRING.get(key) }.is_some()
}

/// Whether `key` is one of the agent's own listening endpoints.
///
/// A steered pod endpoint ([`OWN_STEERED`]) is the agent's only while no application
/// listens on that port in its namespace. A connection steered to the agent's socket keeps
/// the packet's destination as its local address and port (the request socket is built
/// from the packet, `inet_reqsk_alloc()` → `ir_num = ntohs(th->dest)`), so it is keyed
/// under the in-pod port like an application's. Decided once, at the open (the socket
/// entry remembers it): an application that starts listening between the agent's SYN and
/// its handshake's end gets that one agent connection counted (too high, never too low);
/// one that stops listening meanwhile leaves its half-open connection uncounted, but that
/// one never opens: a child queued on a closed listener is aborted
/// (`inet_csk_reqsk_queue_add()` checks LISTEN under the queue lock, `inet_csk_listen_stop()`
/// aborts what was queued).
#[inline(always)]
fn is_own_endpoint(key: &ConnKey) -> bool {
    let (word, mask) = watched_bit(key.port);
    match OWN_PORTS.get(word) {
        Some(bits) if bits & mask != 0 => {}
        _ => return false,
    }
    // SAFETY: the map value is plain data, copied out at once.
    match unsafe { OWN_ENDPOINTS.get(netns_port_key(key.netns, key.port)) }.copied() {
        None => false,
        Some(OWN_STEERED) => !app_listens(key.netns),
        Some(_) => true,
    }
}

#[inline(always)]
fn count_repair(index: u32) {
    if let Some(counter) = REPAIRS.get_ptr_mut(index) {
        // SAFETY: a pointer into the array map's value.
        unsafe { atomic_add_u64(counter, 1) };
    }
}

/// Whether a socket on `port` was ever tracked: `track_open` marks the port in
/// `TRACKED_PORTS` before any close of the same socket can run (both hold its lock). An
/// entry that cannot be read counts as tracked (the close then looks the socket up).
#[inline(always)]
fn port_ever_tracked(port: u16) -> bool {
    let (entry, byte) = tracked_port_byte(port);
    TRACKED_PORTS
        .get(entry)
        .is_none_or(|bytes| bytes.get(byte).is_none_or(|marked| *marked != 0))
}

/// Marks `port` in `TRACKED_PORTS` (see [`port_ever_tracked`]).
#[inline(always)]
fn mark_port_tracked(port: u16) {
    let (entry, byte) = tracked_port_byte(port);
    if let Some(bytes) = TRACKED_PORTS.get_ptr_mut(entry)
        // SAFETY: a pointer into the array map's value, which lives as long as the map.
        && let Some(marked) = unsafe { (*bytes).get_mut(byte) }
        // Stored once: a store on every open would bounce the cache line between CPUs.
        && *marked == 0
    {
        // SAFETY: as above; a single byte store.
        unsafe { ptr::write_volatile(marked, 1) };
    }
}

/// Adds `delta` to the port's active total (and to its unscoped total when `unscoped`);
/// returns the active total read right after.
#[inline(always)]
fn add_port_total(port: u16, delta: i64, unscoped: bool, now: u64) -> Option<i64> {
    let total = PORT_TOTALS.get_ptr_mut(u32::from(port))?;
    // SAFETY: a pointer into the array map's value, which lives as long as the map.
    unsafe {
        ptr::write_volatile(ptr::addr_of_mut!((*total).last_change_ns), now);
        if unscoped {
            add_active(ptr::addr_of_mut!((*total).unscoped), delta);
        }
        Some(add_active(ptr::addr_of_mut!((*total).active), delta))
    }
}

/// The counters of `key`, created on first use.
#[inline(always)]
fn counts_of(key: &ConnKey) -> Option<*mut ConnCounts> {
    if let Some(counts) = COUNTS.get_ptr_mut(key) {
        return Some(counts);
    }
    // Another CPU may create it first: BPF_NOEXIST keeps theirs, and we use whichever won.
    let _ = COUNTS.insert(key, ConnCounts::default(), u64::from(BPF_NOEXIST));
    COUNTS.get_ptr_mut(key)
}

#[inline(always)]
fn record_duration(port: u16, duration_ns: u64) {
    let port = u32::from(port);
    let histogram = match DURATIONS.get_ptr_mut(port) {
        Some(histogram) => histogram,
        None => {
            let _ = DURATIONS.insert(port, DurationHistogram::default(), u64::from(BPF_NOEXIST));
            match DURATIONS.get_ptr_mut(port) {
                Some(histogram) => histogram,
                None => {
                    count_error_at(error_index::HISTOGRAM_FAILED);
                    return;
                }
            }
        }
    };
    let bucket = duration_bucket(duration_ns);
    // SAFETY: `histogram` points into a live map value; `bucket` is in range by construction
    // of `duration_bucket` and re-checked for the verifier.
    unsafe {
        if let Some(slot) = (*histogram).buckets.get_mut(bucket) {
            atomic_add_u64(slot, 1);
        }
        atomic_add_u64(ptr::addr_of_mut!((*histogram).sum_ns), duration_ns);
    }
}

#[inline(always)]
fn crossed(endpoint: bool, port: bool) -> u8 {
    (if endpoint { crossing::ENDPOINT } else { 0 }) | (if port { crossing::PORT } else { 0 })
}

/// Tells the agent about a tracked open or close on a watched port, and whether the
/// endpoint's count or the port's total moved between 0 and 1 (`crossing`).
///
/// Written only after *both* counters changed: a port-only waiter reads the port total,
/// a scoped waiter the endpoint counts, and each must find the change already made when
/// the event wakes it (writing the event between the two adds lost about 1 wake-up in 150
/// on slow vCPUs: the agent read the port total before it was lowered and slept on).
/// Each counter's last decrement reads the 0 it leaves (see `add_active`), so whichever
/// count a waiter reads, the change that brought it to 0 is followed by an event.
/// Every open and close is sent (not only crossings) so that waiters with a quiet window
/// or ignored sources see each arrival and its peer; only while somebody waits on the port.
#[inline(always)]
fn emit_event(key: ConnKey, peer: Peer, kind: u8, crossing: u8, now: u64) {
    // Only ports somebody waits on. The agent sets a port's bit *before* it reads the
    // count it waits on, and we test the bit *after* our atomic add (a full barrier): either
    // its read sees our change, or we see its bit. No wake-up is lost.
    let (word, mask) = watched_bit(key.port);
    match WATCHED_PORTS.get(word) {
        Some(bits) if bits & mask != 0 => {}
        _ => return,
    }
    let event = ConnEvent {
        key,
        remote: peer.addr,
        remote_port: peer.port,
        remote_family: peer.family,
        kind,
        crossing,
        _pad: 0,
        at_ns: now,
    };
    if EVENTS.output::<ConnEvent>(event, 0).is_err() {
        count_error_at(error_index::EVENT_LOST);
    }
}

// ---------------------------------------------------------------------------------------
// Reading the socket.
// ---------------------------------------------------------------------------------------

#[inline(always)]
fn kernel_offsets() -> KernelOffsets {
    // SAFETY: a read-only global the loader filled in; volatile so the compiler does not
    // fold the zero defaults in.
    unsafe { ptr::read_volatile(&KERNEL_OFFSETS) }
}

/// How the handler reads kernel memory at `base + offset`.
trait KernelMemory {
    fn read<T: Copy>(base: u64, offset: u32) -> Result<T, Error>;

    /// A `struct in6_addr`, as bytes.
    #[inline(always)]
    fn read_in6_addr(base: u64, offset: u32) -> Result<[u8; 16], Error> {
        // Word by word: `in6_addr` is a union whose `u6_addr32[4]` a checked load may name.
        let mut addr = [0u8; 16];
        for (i, chunk) in addr.chunks_exact_mut(4).enumerate() {
            let word = Self::read::<u32>(base, offset + 4 * i as u32)?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ok(addr)
    }
}

/// `bpf_probe_read_kernel`: for pointers the verifier knows nothing about (raw and classic
/// tracepoints, the iterator). A bad address is an error, not a fault.
struct ProbeReads;

impl KernelMemory for ProbeReads {
    #[inline(always)]
    fn read<T: Copy>(base: u64, offset: u32) -> Result<T, Error> {
        // SAFETY: the helper checks the address.
        unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }
            .map_err(|_| Error::ReadFailed)
    }

    #[inline(always)]
    fn read_in6_addr(base: u64, offset: u32) -> Result<[u8; 16], Error> {
        Self::read::<[u8; 16]>(base, offset)
    }
}

/// Plain loads through pointers whose BTF type the verifier knows (`tp_btf` arguments and
/// the pointers loaded through them). The verifier checks each load against the kernel's
/// BTF; it can, because the offsets come from `KERNEL_OFFSETS`, a frozen read-only map whose
/// values it treats as constants. The loads become exception-handled `PROBE_MEM` loads: a
/// nanosecond or two each, where a helper call costs tens.
struct BtfLoads;

impl KernelMemory for BtfLoads {
    #[inline(always)]
    fn read<T: Copy>(base: u64, offset: u32) -> Result<T, Error> {
        // SAFETY: the verifier only accepts this load if `base + offset` is a field of type
        // T (by size) of the BTF type `base` points to; a fault reads as zero.
        Ok(unsafe { ptr::read_volatile((base + u64::from(offset)) as *const T) })
    }
}

/// `inet_sock_set_state` also fires for non-TCP inet sockets on some kernels (DCCP used
/// `inet_sk_set_state()`); only TCP is ours.
#[inline(always)]
fn is_tcp<M: KernelMemory>(sk: u64, offsets: &KernelOffsets) -> Result<bool, Error> {
    if offsets.sk_protocol == OFFSET_UNKNOWN {
        return Ok(true);
    }
    Ok(M::read::<u16>(sk, offsets.sk_protocol)? == IPPROTO_TCP)
}

#[inline(always)]
fn read_netns<M: KernelMemory>(sk: u64, offsets: &KernelOffsets) -> Result<u32, Error> {
    // sk->__sk_common.skc_net.net->ns.inum
    let net = M::read::<u64>(sk, offsets.skc_net)?;
    M::read::<u32>(net, offsets.net_ns_inum)
}

#[inline(always)]
fn read_key<M: KernelMemory>(sk: u64, offsets: &KernelOffsets) -> Result<ConnKey, Error> {
    let mut key = ConnKey {
        netns: read_netns::<M>(sk, offsets)?,
        family: M::read::<u16>(sk, offsets.skc_family)?,
        port: M::read::<u16>(sk, offsets.skc_num)?,
        addr: [0; 16],
    };
    if key.family == AF_INET6 {
        let v6 = M::read_in6_addr(sk, offsets.skc_v6_rcv_saddr)?;
        if is_v4_mapped(&v6) {
            // An IPv6 listener accepting an IPv4 client: count it as the IPv4 it is.
            key.family = AF_INET;
            key.addr[..4].copy_from_slice(&v6[12..]);
        } else {
            key.addr = v6;
        }
    } else {
        key.family = AF_INET;
        let v4 = M::read::<u32>(sk, offsets.skc_rcv_saddr)?;
        key.addr[..4].copy_from_slice(&v4.to_ne_bytes());
    }
    Ok(key)
}

/// The other end of a connection.
#[derive(Clone, Copy)]
struct Peer {
    addr: [u8; 16],
    port: u16,
    family: u16,
}

#[inline(always)]
fn read_peer<M: KernelMemory>(sk: u64, offsets: &KernelOffsets) -> Result<Peer, Error> {
    let family = M::read::<u16>(sk, offsets.skc_family)?;
    // skc_dport is big-endian (__be16).
    let port = u16::from_be(M::read::<u16>(sk, offsets.skc_dport)?);
    let mut peer = Peer {
        addr: [0; 16],
        port,
        family: AF_INET,
    };
    if family == AF_INET6 {
        let v6 = M::read_in6_addr(sk, offsets.skc_v6_daddr)?;
        if is_v4_mapped(&v6) {
            peer.addr[..4].copy_from_slice(&v6[12..]);
        } else {
            peer.addr = v6;
            peer.family = AF_INET6;
        }
    } else {
        let v4 = M::read::<u32>(sk, offsets.skc_daddr)?;
        peer.addr[..4].copy_from_slice(&v4.to_ne_bytes());
    }
    Ok(peer)
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|byte| *byte == 0) && addr[10] == 0xff && addr[11] == 0xff
}

// ---------------------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------------------

/// Adds `delta` to the active count atomically and returns the count read right after.
///
/// The BPF instruction set before v3 has no fetch-and-add, and aya-build fixes the CPU to
/// `generic`, so the add and the read are two steps. That is enough for the wake-ups: a
/// socket's close always follows its open (both run under the socket lock), so the count
/// never goes negative, and whenever a count settles at 0 the *last* add was a decrement
/// whose read comes after every add and sees the 0, so at least one "reached zero" event is
/// written. Concurrent changes may add spurious events; the agent re-reads the count on each.
///
/// # Safety
/// `active` points into a live map value.
#[inline(always)]
unsafe fn add_active(active: *mut i64, delta: i64) -> i64 {
    // SAFETY: the caller's pointer is valid; volatile so the read is not folded into the add.
    unsafe {
        core::intrinsics::atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(active, delta);
        ptr::read_volatile(active)
    }
}

#[inline(always)]
unsafe fn atomic_add_u64(target: *mut u64, value: u64) {
    // SAFETY: the caller passes a pointer into a map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(target, value);
    }
}

#[inline(always)]
fn count_error(error: Error) {
    match error {
        Error::ReadFailed => count_error_at(error_index::READ_FAILED),
    }
}

#[inline(always)]
fn count_error_at(index: u32) {
    if let Some(counter) = ERRORS.get_ptr_mut(index) {
        // SAFETY: a pointer into the array map's value.
        unsafe { atomic_add_u64(counter, 1) };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // BPF programs cannot panic (the verifier rejects unbounded loops); this is unreachable.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
