//! Walks: the `iter/tcp` program that seeds connections established before the agent
//! started and repairs missed state changes, and the forgetter of dead sockets' entries.

use core::{ffi::c_void, ptr};

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::raw_tracepoint, programs::RawTracePointContext};
use drain_agent_common::{
    ConnKey, SockEntry, error_index, is_active, netns_port_key, repair, tcp_state,
};

use crate::{
    count::{Error, count_error, count_error_at, count_repair},
    maps::{LISTENERS, SOCKETS, UNSURE_PORTS},
    pod_listen::seed_pod_listener,
    read::{
        KernelMemory as _, Peer, ProbeReads, kernel_offsets, read_ctx_u64, read_key, read_netns,
        read_peer,
    },
    track::{track_close, track_open},
};

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
///
/// Only from Linux 5.15 (commit 04c7820b776f, "bpf: tcp: Bpf iter batching and
/// lock_sock"). Before, this runs under the ehash bucket's spinlock only, which a close from
/// ESTABLISHED or CLOSE_WAIT does not take: the handler can un-track a socket on another CPU
/// between our read of its state and our insert, and the walk tracks it again (a count too
/// high until a later walk), or with a stale entry and a reused address un-count an endpoint
/// twice (too low). The agent doubts every count there once a walk has run
/// (`Doubt::WalkUnlocked`): answers are confirmed with the socket tables.
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
            // Tracked: stamp it as seen open by this walk. The same local endpoint is not
            // enough to call the entry this socket's: a dead socket of the same service
            // (its close skipped) leaves its entry at an address the allocator soon gives
            // to the service's next inbound socket, whose open then found it taken. A
            // connection's peer never changes, so the whole four-tuple tells them apart;
            // stamped, the dead entry would keep its peer and start, and this connection
            // would be missing from the peers the agent reports and closes.
            // SAFETY: a pointer into the live map value; the socket lock is held. (Before
            // 5.15 it is not, and a racing close may remove the entry meanwhile: the element
            // stays map memory under RCU, and a stamp on a reused one keeps a dead entry for
            // one more walk, a count too high. The counts are doubted there, see above.)
            Some(entry) if unsafe { is_entry_of(&*entry, &key, &peer) } => unsafe {
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

/// Whether `entry` is the one the handler made for a socket with this local endpoint and
/// peer (both read the same way, by [`read_key`] and [`read_peer`]).
#[inline(always)]
fn is_entry_of(entry: &SockEntry, key: &ConnKey, peer: &Peer) -> bool {
    entry.key == *key
        && entry.remote == peer.addr
        && entry.remote_port == peer.port
        && entry.remote_family == peer.family
}

/// Drops the entry of a socket whose close was missed. Not attached: the agent runs it with
/// `BPF_PROG_TEST_RUN`, args `[sk, walk_started_ns]`, for entries the last walk neither
/// found open nor saw made. It checks that again here, against the live entry.
///
/// Why its look-up and its delete act on the same entry. It holds no socket lock (the socket is
/// dead), so without more, another remover could act at the same address in between: the close of a
/// newer socket there (an outbound one, which the handler lets remove what it finds, see
/// `track_close`) drops the entry and un-counts the dead socket, the memory is reused by a passive
/// socket whose open inserts a fresh entry, and our delete would drop *that* one and un-count the
/// dead socket a second time: a count one too low and nothing doubted. So the agent first puts the
/// address in `FORGETTING` and waits for an RCU grace period (every handler run is one;
/// `kernel::forget`): after it, no handler run that missed the mark is still running, and every
/// later close at the address leaves the entry alone
/// ([`being_forgotten`](crate::track::being_forgotten)). An open there cannot insert while the
/// entry exists (`BPF_NOEXIST`), and walks run one at a time with this program (the agent's
/// walker). So between our look-up and our delete nobody else removes or replaces the entry, and
/// the copy we take cannot be torn by the element's memory being reused (the hash map reuses a
/// deleted element at once since Linux 6.1, kernel/bpf/hashtab.c `htab_elem_free()` →
/// `bpf_mem_cache_free()`).
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
