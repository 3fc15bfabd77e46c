//! Application listeners on the in-pod port (`--pod-listen` with `sk_lookup`): the
//! handler's listen and unlisten, and the `iter/tcp` program that seeds them per namespace.

use core::{ffi::c_void, ptr};

use aya_ebpf::bindings::BPF_NOEXIST;
use drain_agent_common::{
    KernelOffsets, OWN_SEEDING, OWN_STEERED, error_index, netns_port_key, tcp_state,
};

use crate::{
    count::{EEXIST, Error, add_active, count_error, count_error_at},
    maps::{KERNEL_OFFSETS, OWN_ENDPOINTS, POD_LISTEN_COUNTS, POD_LISTENERS, POD_PORT},
    read::{KernelMemory, ProbeReads, is_tcp, kernel_offsets, read_ctx_u64, read_netns},
};

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
/// `ip_local_port_range` (INVARIANTS.md, "The in-pod port"; the default range starts at 32768).
#[inline(always)]
pub(crate) fn try_on_listen<M: KernelMemory>(
    sk: impl FnOnce() -> Result<u64, Error>,
) -> Result<(), Error> {
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
pub(crate) fn try_on_unlisten(sk: impl FnOnce() -> Result<u64, Error>) -> Result<(), Error> {
    if pod_port() == 0 {
        return Ok(());
    }
    pod_listener_close(sk()?);
    Ok(())
}

/// Counts the listener `sk` of namespace `netns` unless it is counted already, or unless
/// the agent does not serve `netns` ([`served`]).
#[inline(always)]
fn pod_listener_open(sk: u64, netns: u32, found_by_walk: bool) {
    if !served(netns) {
        return;
    }
    match POD_LISTENERS.insert(sk, netns, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // A walk found an entry of this namespace at the socket's address: the handler's (or
        // an earlier walk's) for this very listener (both hold the socket's lock), counted
        // once; or a dead listener's of the same namespace whose close was missed, which
        // already stands for one listener there. Either way not counted again.
        Err(error) if error == -EEXIST && found_by_walk && recorded_in(sk, netns) => return,
        // The address is taken by a dead listener's entry of *another* namespace (a socket's
        // namespace never changes, so it is not this listener's), whose close was missed, or
        // the handler's listen found it taken. Since listeners are counted only in served
        // namespaces, a listener that began before its namespace was served is counted by
        // a walk alone: the walk must take the entry over too, or the count stays too low
        // and the application's port goes to the agent. The dead one's count stays (too
        // high, never too low).
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

/// Whether the agent serves the in-pod port in `netns`: marked [`OWN_SEEDING`] or
/// [`OWN_STEERED`] in `OWN_ENDPOINTS`. Listeners are counted in those namespaces only, so
/// that `POD_LISTEN_COUNTS` holds an entry for no namespace but those the agent served: a
/// listener in any other namespace (any local user can make one, `unshare -Urn`) made an
/// entry that was never deleted, and a user who made ~16,384 of them, each on a fresh
/// inode, filled the map; the next insert failed and stopped every pod's steering for
/// good (`POD_LISTEN_COUNT_FAILED`). One hash lookup, on a listen (rare).
///
/// Exact with the seed, since the agent serves a namespace in this order
/// (`agent/kernel_side.rs`, `KernelEndpoints::steer`): (1) it writes the `OWN_SEEDING`
/// mark; (2) it waits for an RCU grace period (`kernel/rcu.rs`): every handler run that
/// began before the mark was visible has ended, and every later one sees it; (3) it runs
/// the namespace's seed walk ([`seed_pod_listeners`]), which counts what is in the
/// listening hash; (4) it marks `OWN_STEERED` and attaches the `sk_lookup` program. A
/// `listen()` whose tracepoint saw the mark is counted by the handler; one whose
/// tracepoint did not ended that run before (3) began, so its socket is in the listening
/// hash before the walk reaches its bucket (counted by the seed; both insert into
/// `POD_LISTENERS` with `BPF_NOEXIST`, so once) or reaches it a few microseconds after the
/// tracepoint, after the walk passed its bucket: the one gap, the same as before
/// (INVARIANTS.md), closed by the next walk. A namespace no longer served keeps its entries:
/// a close still un-counts (it looks the socket up in `POD_LISTENERS`, whatever the mark),
/// a listen meanwhile is not counted, and serving it again runs (1)–(4) again, whose seed
/// counts what the handler missed: never too low.
#[inline(always)]
fn served(netns: u32) -> bool {
    // SAFETY: the map value is plain data, copied out at once.
    let mark = unsafe { OWN_ENDPOINTS.get(netns_port_key(netns, pod_port())) }.copied();
    matches!(mark, Some(OWN_SEEDING | OWN_STEERED))
}

/// Whether `POD_LISTENERS` holds `sk` under the namespace `netns`.
#[inline(always)]
fn recorded_in(sk: u64, netns: u32) -> bool {
    // SAFETY: the value is plain data, copied out at once.
    unsafe { POD_LISTENERS.get(sk) }.is_some_and(|owner| *owner == netns)
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
pub(crate) fn app_listens(netns: u32) -> bool {
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
/// the handler counted them (before it was attached, or before the namespace was marked
/// served, [`served`]). Exactly once with the handler: both insert into
/// `POD_LISTENERS` with `BPF_NOEXIST` under the socket's lock (`bpf_iter_tcp_seq_show()`
/// takes `lock_sock_fast()`, `inet_listen()` `lock_sock()`), and a socket closed before
/// the walk reaches it is unhashed and skipped. Every walk (`seed_established_tcp`) does
/// the same for the listeners it passes, so a listener the seed could not see (one whose
/// `listen()` passed its tracepoint before the handler was attached and reached the
/// listening hash only after the seed passed its bucket) is counted by the next walk. The
/// agent runs it again in a namespace whose count is 0 while its socket tables show a
/// listener on the port (one a skipped handler run missed: drain-agent's
/// `http/pods/recount.rs`).
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
pub(crate) fn seed_pod_listener(sk: u64, port: u16, offsets: &KernelOffsets) -> Result<(), Error> {
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
