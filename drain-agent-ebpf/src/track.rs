//! The exactly-once bookkeeping: a socket is counted when its insert into `SOCKETS`
//! succeeds and un-counted when its delete does, with the endpoint, port and event side
//! effects of each.

use core::ptr;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use drain_agent_common::{
    ConnCounts, ConnEvent, ConnKey, DurationHistogram, OWN_SEEDING, OWN_STEERED,
    SOCK_FOUND_BY_WALK, SOCK_UNSCOPED, SockEntry, crossing, duration_bucket, error_index,
    event_kind, netns_port_key, tracked_port_byte, watched_bit,
};

use crate::{
    count::{EEXIST, add_active, atomic_add_u64, count_error_at},
    maps::{
        COUNTS, DURATIONS, EVENTS, FORGETTING, FORGETTING_NOW, OWN_ENDPOINTS, OWN_PORTS,
        PORT_TOTALS, RETIRING, RETIRING_PORTS, SOCKETS, TRACKED_PORTS, WATCHED_PORTS,
    },
    pod_listen::app_listens,
    read::Peer,
};

/// Counts `sk` under `key` if it is not tracked yet; true when it was counted now.
///
/// Where it is counted: always in the port's totals (an array: its memory is never freed,
/// so port-only answers stay exact whatever happens to the hash maps), and under its
/// endpoint in `COUNTS` unless that is impossible (map full) or forbidden (the endpoint is
/// being reclaimed); then the socket is marked [`SOCK_UNSCOPED`] and counted in the port's
/// `unscoped` total instead, so the agent knows scoped answers on this port need checking.
#[inline(always)]
pub(crate) fn track_open(sk: u64, key: ConnKey, peer: Peer, found_by_walk: bool) -> bool {
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
    let entry = SockEntry {
        key,
        tracked_ns: now,
        audited_ns: 0,
        remote: peer.addr,
        remote_port: peer.port,
        remote_family: peer.family,
        flags: (if counts.is_some() { 0 } else { SOCK_UNSCOPED })
            | (if found_by_walk { SOCK_FOUND_BY_WALK } else { 0 }),
    };
    match SOCKETS.insert(sk, entry, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // A walk found it tracked meanwhile: it holds the socket's lock, as the handler
        // does, so this is the handler's own entry (counted once). Before Linux 5.15 the
        // walk does not hold it (see `seed_established_tcp`): the agent doubts the counts
        // there (`Doubt::WalkUnlocked`).
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
            tell_of_an_untracked_arrival(key, peer, now);
            return false;
        }
        Err(_) => {
            // Cannot track it at all: the port's `lost` tells the agent not to vouch for
            // this port until a walk has found every open socket of it tracked.
            lose_connection(key.port, error_index::SOCKET_MAP_FULL);
            if !found_by_walk {
                tell_of_an_untracked_arrival(key, peer, now);
            }
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

/// An arrival the handler could not track is still an arrival: a `quiet` window must hear
/// it, or a load balancer still sending short connections to a port whose map is full would
/// look quiet (the counts say nothing of them, and the socket tables, read between two of
/// them, find none). So it is told as an open (with its peer, for `ignore=`) and no crossing:
/// the counts did not move, and a waiter woken by it only re-reads them. Only for the
/// handler's opens, which happen now; a walk's find happened at some unknown time before.
#[inline(always)]
fn tell_of_an_untracked_arrival(key: ConnKey, peer: Peer, now: u64) {
    emit_event(key, peer, event_kind::OPEN, 0, now);
}

/// Un-counts `sk` if it is tracked; true when it was un-counted now. `closed_now` says the
/// close is happening now (so its duration is known), not found out later by a walk.
#[inline(always)]
pub(crate) fn track_close(sk: u64, closed_now: bool) -> bool {
    // SAFETY: the entry is copied out at once; state changes of one socket are serialised
    // by its lock, so nobody else removes it between here and our own remove. (A walk
    // before Linux 5.15 does not hold that lock: a remove that fails below is someone
    // else's, and the agent doubts the counts there, `Doubt::WalkUnlocked`.)
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
        // Someone else removed it (a walk before Linux 5.15, see above), or the bucket's
        // lock was busy: before Linux 6.7 (d35381aa73f7, "bpf: Fix unnecessary -EBUSY from
        // htab_lock_bucket") `htab_lock_bucket()` raises its per-CPU `map_locked` before it
        // disables interrupts, and a run of this handler nested in that gap (an interrupt's
        // softirq closing another socket; nested runs are not skipped before 6.1) gets
        // -EBUSY for a bucket of the same lock slot. Then the entry stays, counted: a count
        // too high, never too low. Counted as a deferred close so that a repair walk follows
        // within seconds (the agent's `missed_changes`), not the periodic one. Only the
        // handler's closes: a walk's runs one at a time with the forgetter, and a walk
        // asking for another walk on a failed remove could ask for itself for ever.
        if closed_now {
            count_error_at(error_index::CLOSE_DEFERRED);
        }
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
    if closed_now && entry.flags & SOCK_FOUND_BY_WALK == 0 {
        record_duration(entry.key.port, now.saturating_sub(entry.tracked_ns));
    }
    true
}

/// Whether the agent is about to drop the entry at the socket address `sk` (see
/// [`forget_stale_socket`](crate::walk::forget_stale_socket)). The agent marks the address before
/// its grace period, so a close that runs after the grace period finds the mark.
#[inline(always)]
pub(crate) fn being_forgotten(sk: u64) -> bool {
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
/// period (an update of a map of maps from user space calls `synchronize_rcu()`; every run
/// of these programs is an RCU read-side critical section, preemptible or not:
/// `__bpf_trace_run()`, `trace_call_bpf()` and `bpf_iter_run_prog()` take
/// `rcu_read_lock()`), (3) reads the entry and deletes it only if `active` is 0, (4) takes
/// the key out of `RETIRING`. After (2), no open that missed the mark is still running, and
/// every later open sees the mark and does not touch `COUNTS[key]`; a close touches it only
/// for a socket counted in it, which keeps `active` above 0 until that close's last write.
/// So a deleted entry is one no program holds or will take a pointer to: no open is lost
/// and no write lands in freed (or reused) memory.
#[inline(always)]
pub(crate) fn is_retiring(key: &ConnKey) -> bool {
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
/// aborts what was queued). A pod endpoint marked [`OWN_SEEDING`] is not steered yet: no
/// connection there is the agent's.
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
        Some(OWN_SEEDING) => false,
        Some(_) => true,
    }
}

/// Whether a socket on `port` was ever tracked: `track_open` marks the port in
/// `TRACKED_PORTS` before any close of the same socket can run (both hold its lock). An
/// entry that cannot be read counts as tracked (the close then looks the socket up).
#[inline(always)]
pub(crate) fn port_ever_tracked(port: u16) -> bool {
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

/// Adds a closed connection's duration to its port's histogram, on this CPU's copy.
///
/// Plain adds, not atomic ones, and still exact: a per-CPU value is only ever written by a
/// program running on that CPU, and two runs of the handler never overlap on one CPU (the
/// kernel skips a run that would nest in a running one: `bpf_prog_get_recursion_context()`
/// in `__bpf_trace_run()`, counted as `recursion_misses`), and no other program writes
/// this map. So nothing interleaves between a load and its store.
///
/// tp_btf and the raw tracepoint got that check in Linux 6.1 (commit 05b24ff9b2cf, "bpf:
/// Prevent bpf program recursion for raw tracepoint probes"); before, a softirq's run nests
/// in the interrupted one, and one of two adds to the same bucket can be lost. Durations and
/// advice only, never counts (those are atomic adds and map inserts and deletes). The
/// classic tracepoint never nests (`trace_call_bpf()` skips instead).
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
    // SAFETY: `histogram` points into this CPU's copy of a live map value; `bucket` is in
    // range by construction of `duration_bucket` and re-checked for the verifier.
    unsafe {
        if let Some(slot) = (*histogram).buckets.get_mut(bucket) {
            *slot += 1;
        }
        (*histogram).sum_ns += duration_ns;
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
