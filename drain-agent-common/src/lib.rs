//! Types shared by the drain-agent eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]` plain data (it crosses the kernel/user boundary through
//! BPF maps and the ring buffer) plus the one pure rule of the project, [`classify`]: which
//! TCP state transition opens or closes a *tracked connection*. The rule is unit-tested on
//! the host and compiled unchanged into the BPF program.
#![no_std]

/// TCP states, as numbered in the kernel's `include/net/tcp_states.h`.
///
/// The `sock:inet_sock_set_state` tracepoint reports `oldstate`/`newstate` with these values.
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const FIN_WAIT2: i32 = 5;
    pub const TIME_WAIT: i32 = 6;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
    pub const LISTEN: i32 = 10;
    pub const CLOSING: i32 = 11;
    pub const NEW_SYN_RECV: i32 = 12;
}

/// Address families (`include/linux/socket.h`).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP` (`include/uapi/linux/in.h`).
pub const IPPROTO_TCP: u16 = 6;

/// What a state transition means for the connection count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A passively opened socket became active: count it (once).
    Open,
    /// An active socket left ESTABLISHED/CLOSE_WAIT: stop counting it (if it was counted).
    Close,
    /// Nothing changes for the count.
    Unchanged,
}

/// A socket is *active* while the application may still be serving it: ESTABLISHED, or
/// CLOSE_WAIT (the peer sent FIN, but our side still holds the socket and may still write).
#[inline(always)]
pub const fn is_active(state: i32) -> bool {
    state == tcp_state::ESTABLISHED || state == tcp_state::CLOSE_WAIT
}

/// The state rule: old state, new state → +1 / 0 / −1.
///
/// * Open: `SYN_RECV → ESTABLISHED` is the passive open (someone connected *to* us; the
///   child socket is created in SYN_RECV by `inet_csk_clone_lock()`). `SYN_RECV → CLOSE_WAIT`
///   is the same for a TCP Fast Open child whose first segment already carried FIN
///   (`tcp_fin()` moves SYN_RECV straight to CLOSE_WAIT). Active opens go
///   `SYN_SENT → ESTABLISHED` and are never counted.
/// * Close: any move from an active state to a non-active one (FIN_WAIT1 when we close
///   first, LAST_ACK after CLOSE_WAIT, CLOSE on RST or abort). It only un-counts a socket that
///   was counted; the caller's per-socket map decides that.
#[inline(always)]
pub const fn classify(old_state: i32, new_state: i32) -> Transition {
    if is_active(new_state) {
        if old_state == tcp_state::SYN_RECV {
            Transition::Open
        } else {
            Transition::Unchanged
        }
    } else if is_active(old_state) {
        Transition::Close
    } else {
        Transition::Unchanged
    }
}

/// What the connections are counted by: one listening endpoint in one network namespace.
///
/// `addr` holds an IPv4 address in its first 4 bytes (rest zero) when `family == AF_INET`;
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are folded to IPv4 before they get here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ConnKey {
    /// Inode number of the socket's network namespace (`net->ns.inum`).
    pub netns: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Local port, host byte order.
    pub port: u16,
    /// Local address, network byte order.
    pub addr: [u8; 16],
}

/// Per-key counters, updated with atomic adds by the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnCounts {
    /// Tracked connections open now.
    pub active: i64,
    /// Tracked connections opened (seeded ones included) since the agent started.
    pub opened: u64,
    /// Tracked connections closed since the agent started.
    pub closed: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last open or close, written just before
    /// the count changes: how long a drained endpoint has been at zero (`settle`).
    pub last_change_ns: u64,
}

/// Per-port totals over every namespace and address: what an unscoped `/drained?port=P`
/// reads, with one lookup (the `PORT_TOTALS` array is indexed by port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortTotals {
    /// Tracked connections open now on this port, in every namespace and on every address
    /// (scoped and [unscoped](SOCK_UNSCOPED) ones alike): exact whatever happens to the
    /// per-endpoint map, because array elements are never freed.
    pub active: i64,
    /// As [`ConnCounts::last_change_ns`], for the port.
    pub last_change_ns: u64,
    /// Of `active`, the connections counted only here, not under their endpoint (the
    /// endpoint map was full, or the endpoint was being reclaimed): while this is above 0,
    /// answers scoped to an address or namespace on this port cannot be vouched for.
    pub unscoped: i64,
    /// Connections on this port that could not be tracked at all (the per-socket map was
    /// full, or a dead socket's entry held the address: `error_index::ADDRESS_TAKEN`), ever. Only grows: the agent compares it with the value at its last walk.
    pub lost: u64,
}

/// Entries of the `PORT_TOTALS` array: one per port number.
pub const PORT_COUNT: u32 = 65_536;

/// Entries of the `WATCHED_PORTS` bitmap: one bit per port, 64 ports per entry.
pub const WATCHED_WORDS: u32 = PORT_COUNT / 64;

/// Entries of the `TRACKED_PORTS` array: one byte per port, eight to an entry.
pub const TRACKED_PORT_WORDS: u32 = PORT_COUNT / 8;

/// Where a port's byte lives in the `TRACKED_PORTS` array: (entry, byte in it, 0 to 7).
#[inline(always)]
pub const fn tracked_port_byte(port: u16) -> (u32, usize) {
    ((port / 8) as u32, (port % 8) as usize)
}

/// Where a port's bit lives in the `WATCHED_PORTS` bitmap: (entry, mask).
#[inline(always)]
pub const fn watched_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1u64 << (port % 64))
}

/// Key of the `LISTENERS` and `OWN_ENDPOINTS` maps: a (network namespace inode, port) pair.
#[inline(always)]
pub const fn netns_port_key(netns: u32, port: u16) -> u64 {
    ((netns as u64) << 16) | port as u64
}

/// Values of `OWN_ENDPOINTS`: the agent's listener holds the (namespace, port) itself
/// (the node listener; a pod listener bound the old way), so every connection there is
/// the agent's.
pub const OWN_BOUND: u8 = 1;
/// The agent's pod listener sits elsewhere and the `sk_lookup` program steers the
/// in-pod port to it only while no application listens on that port in the namespace:
/// a connection there is the agent's only while the namespace's `POD_LISTEN_COUNTS` is 0.
pub const OWN_STEERED: u8 = 2;
/// The agent is about to steer the in-pod port in the namespace: its listeners on that
/// port are counted in `POD_LISTEN_COUNTS` (as under [`OWN_STEERED`]), but no connection
/// there is the agent's yet (the `sk_lookup` program is not attached). Listeners on the
/// in-pod port are counted only in namespaces marked [`OWN_SEEDING`] or [`OWN_STEERED`]:
/// the ones the agent serves.
pub const OWN_SEEDING: u8 = 3;

/// Entries of the `FORGETTING` map: socket addresses whose stale entries one round of the
/// agent's sweep drops (larger sweeps take several rounds).
pub const FORGET_BATCH: u32 = 4_096;

/// Start time of a socket the agent found already established (its real start is unknown):
/// what [`SockEntry::started_ns`] says for one.
pub const STARTED_UNKNOWN: u64 = 0;

/// [`SockEntry::flags`]: the socket is counted in its port's totals only, not under its
/// endpoint (see [`PortTotals::unscoped`]); its close un-counts it the same way.
pub const SOCK_UNSCOPED: u32 = 1;

/// [`SockEntry::flags`]: a walk found the socket already established, so when it started
/// is unknown (its `tracked_ns` is when the walk found it).
pub const SOCK_FOUND_BY_WALK: u32 = 2;

/// Value of the per-socket map: which key a tracked socket counts under, and since when.
///
/// 64 bytes, on purpose: a hash map element is a 48-byte header, the 8-byte key and this,
/// 120 bytes, which the kernel's BPF allocator serves from its 128-byte class (two cache
/// lines; `bpf_mem_alloc_init()`'s size classes). Every open writes the element cold and
/// every close reads it cold: at 80 bytes (the 192-byte class, three lines) the insert and
/// the close's lookup each cost one more cache miss. Hence one timestamp for the start and
/// the tracking (a flag says when the start is unknown) and 32-bit flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockEntry {
    pub key: ConnKey,
    /// When the entry was made (by the handler at the passive open, or by a walk), from
    /// `bpf_ktime_get_ns()`: the connection's start too, unless [`SOCK_FOUND_BY_WALK`].
    pub tracked_ns: u64,
    /// When a walk last found the socket still open ([`repair`]); 0 before any walk.
    pub audited_ns: u64,
    /// The peer's address (network byte order; IPv4 in the first 4 bytes when
    /// `remote_family` is `AF_INET`, IPv4-mapped IPv6 folded like [`ConnKey::addr`]).
    pub remote: [u8; 16],
    /// The peer's port, host byte order.
    pub remote_port: u16,
    pub remote_family: u16,
    /// [`SOCK_UNSCOPED`], [`SOCK_FOUND_BY_WALK`]. Written once, at the insert, never changed.
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<SockEntry>() == 64);

impl SockEntry {
    /// When the connection started (`bpf_ktime_get_ns()`), or [`STARTED_UNKNOWN`] for one a
    /// walk found already established.
    #[inline(always)]
    pub fn started_ns(&self) -> u64 {
        if self.flags & SOCK_FOUND_BY_WALK != 0 {
            STARTED_UNKNOWN
        } else {
            self.tracked_ns
        }
    }
}

/// Repairs of missed state changes.
///
/// The kernel skips a BPF program that is already running on the CPU (a softirq
/// interrupting the handler in task context: `recursion_misses` in `bpf_prog_info`), so a
/// state change can go unseen. The agent then walks the open sockets again: a walk counts
/// open passive sockets it finds untracked (a missed open), stamps `audited_ns` on tracked
/// ones it finds open, and afterwards the agent asks `forget_stale_socket` to drop entries
/// that were neither stamped nor made since the walk began (a missed close).
pub mod repair {
    /// Indices of the `REPAIRS` array map.
    pub const OPENS_FOUND: u32 = 0;
    pub const CLOSES_FOUND: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Ring-buffer record, written for every tracked open and close on a port somebody waits
/// on (the agent's `WATCHED_PORTS` bitmap).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEvent {
    pub key: ConnKey,
    /// The peer (see [`SockEntry::remote`]).
    pub remote: [u8; 16],
    pub remote_port: u16,
    pub remote_family: u16,
    /// [`event_kind::OPEN`] or [`event_kind::CLOSE`].
    pub kind: u8,
    /// [`crossing::ENDPOINT`] | [`crossing::PORT`]: which counts moved between 0 and 1.
    pub crossing: u8,
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` of the change.
    pub at_ns: u64,
}

/// [`ConnEvent::kind`].
pub mod event_kind {
    pub const OPEN: u8 = 1;
    pub const CLOSE: u8 = 2;
}

/// [`ConnEvent::crossing`] bits.
pub mod crossing {
    /// The endpoint's count moved between 0 and 1.
    pub const ENDPOINT: u8 = 1;
    /// The port's total moved between 0 and 1.
    pub const PORT: u8 = 2;
}

/// Number of buckets of the kernel-side connection-duration histogram: upper bounds
/// [`DURATION_BUCKETS_MS`], plus one overflow bucket.
pub const DURATION_BUCKET_COUNT: usize = 14;
/// Upper bounds (milliseconds) of the connection-duration buckets, 1 ms to 1 h.
pub const DURATION_BUCKETS_MS: [u64; DURATION_BUCKET_COUNT - 1] = [
    1, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 30_000, 60_000, 300_000, 3_600_000,
];

/// Index of the bucket a duration falls in (the last index is "over 1 h"): the first bound
/// `b` (ms) with `ceil(duration_ns / 10^6) <= b`.
///
/// Compared in nanoseconds, without the division (this runs at every tracked close, and a
/// 64-bit divide is the slowest instruction there): for an integer `b`, `ceil(x) <= b` ⇔
/// `x <= b`, so the test is `duration_ns <= b * 10^6`, exactly (the largest product,
/// 3.6 × 10^12, is far inside `u64`).
#[inline(always)]
pub const fn duration_bucket(duration_ns: u64) -> usize {
    let mut i = 0;
    while i < DURATION_BUCKETS_MS.len() {
        if duration_ns <= DURATION_BUCKETS_MS[i] * 1_000_000 {
            return i;
        }
        i += 1;
    }
    DURATION_BUCKETS_MS.len()
}

/// Per-port duration histogram (kernel-side): count per bucket and the sum of durations.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DurationHistogram {
    pub buckets: [u64; DURATION_BUCKET_COUNT],
    pub sum_ns: u64,
}

/// Indices of the `ERRORS` array map: things the programs could not do, never silent.
pub mod error_index {
    /// The per-socket map was full: a connection could not be tracked.
    pub const SOCKET_MAP_FULL: u32 = 0;
    /// The per-key count map was full: a connection could not be counted.
    pub const COUNT_MAP_FULL: u32 = 1;
    /// The ring buffer was full: a zero-crossing event was lost.
    pub const EVENT_LOST: u32 = 2;
    /// Reading socket fields with `bpf_probe_read_kernel` failed.
    pub const READ_FAILED: u32 = 3;
    /// A histogram update failed.
    pub const HISTOGRAM_FAILED: u32 = 4;
    /// A walk could not record a listener: a pre-existing passive socket of that
    /// (namespace, port) may be taken for an outbound one and not counted.
    pub const LISTENER_MAP_FULL: u32 = 5;
    /// A tracked socket's close found no counters for its endpoint (cannot happen by the
    /// reclaim rule; counted so that it would be seen).
    pub const COUNT_MISSING: u32 = 6;
    /// A passive open found its socket's address still holding the entry of a dead socket
    /// whose close the kernel skipped: the connection could not be tracked until a walk.
    pub const ADDRESS_TAKEN: u32 = 7;
    /// A tracked socket closed at an address the agent was dropping a dead socket's entry
    /// from, or its entry could not be removed (the map's bucket lock busy in a nested run,
    /// before Linux 6.7): its entry was left for the next repair walk (a count too high
    /// until then).
    pub const CLOSE_DEFERRED: u32 = 8;
    /// An application's listener on the in-pod port could not get its entry in
    /// `POD_LISTENERS`: it is counted all the same and never un-counted (its namespace's
    /// count stays too high, so the agent keeps out of that port there: never too low).
    pub const POD_LISTENER_MAP_FULL: u32 = 9;
    /// A namespace's count of application listeners on the in-pod port could not be
    /// created or changed, or a socket that may be such a listener could not be read:
    /// every `sk_lookup` program stops steering (it reads this counter; never too low).
    pub const POD_LISTEN_COUNT_FAILED: u32 = 10;
    pub const COUNT: u32 = 11;
    /// Metric label of each index.
    pub const NAMES: [&str; COUNT as usize] = [
        "socket_map_full",
        "count_map_full",
        "event_lost",
        "read_failed",
        "histogram_failed",
        "listener_map_full",
        "count_missing",
        "address_taken",
        "close_deferred",
        "pod_listener_map_full",
        "pod_listen_count_failed",
    ];
}

/// Field offsets inside kernel structs, read from the running kernel's BTF by the agent and
/// handed to the programs as a read-only global (aya 0.14 has no CO-RE for Rust programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelOffsets {
    /// `struct sock_common`: `skc_family` (u16).
    pub skc_family: u32,
    /// `skc_state` (u8).
    pub skc_state: u32,
    /// `skc_num` (u16, local port in host byte order).
    pub skc_num: u32,
    /// `skc_rcv_saddr` (__be32, local IPv4 address).
    pub skc_rcv_saddr: u32,
    /// `skc_v6_rcv_saddr` (struct in6_addr, local IPv6 address).
    pub skc_v6_rcv_saddr: u32,
    /// `skc_net` (possible_net_t, whose first field is `struct net *net`).
    pub skc_net: u32,
    /// `struct net`: `ns.inum` (unsigned int).
    pub net_ns_inum: u32,
    /// `struct sock`: `sk_protocol` (u16); [`OFFSET_UNKNOWN`] when it is a bitfield.
    pub sk_protocol: u32,
    /// `skc_daddr` (__be32, the peer's IPv4 address).
    pub skc_daddr: u32,
    /// `skc_v6_daddr` (struct in6_addr, the peer's IPv6 address).
    pub skc_v6_daddr: u32,
    /// `skc_dport` (__be16, the peer's port).
    pub skc_dport: u32,
}

/// Marks an offset the running kernel does not provide as a plain field.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

/// One connection the agent wants closed by the `destroy_sockets` iterator: both ends,
/// IPv4-mapped IPv6 folded to IPv4 (as in [`ConnKey`]), addresses in network byte order,
/// ports in host byte order. No namespace: the iterator walks one namespace per run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DestroyKey {
    /// `AF_INET` or `AF_INET6` (of both ends, after folding).
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

#[cfg(feature = "user")]
mod user {
    use super::{
        ConnCounts, ConnEvent, ConnKey, DestroyKey, DurationHistogram, KernelOffsets, PortTotals,
        SockEntry,
    };

    // SAFETY: all of these are #[repr(C)] structs of integers and byte arrays with no padding
    // holes that could leak or hold invalid values; any bit pattern is valid.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: as above: #[repr(C)] plain data, every bit pattern valid.
    unsafe impl aya::Pod for ConnCounts {}
    // SAFETY: as above: #[repr(C)] plain data, every bit pattern valid.
    unsafe impl aya::Pod for SockEntry {}
    // SAFETY: as above: #[repr(C)] plain data, every bit pattern valid.
    unsafe impl aya::Pod for ConnEvent {}
    // SAFETY: as above: #[repr(C)] plain data, every bit pattern valid.
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: as above: #[repr(C)] plain data, every bit pattern valid.
    unsafe impl aya::Pod for DurationHistogram {}
    // SAFETY: as above: #[repr(C)] plain data, every bit pattern valid.
    unsafe impl aya::Pod for PortTotals {}
    // SAFETY: as above: #[repr(C)] plain data (explicit padding field), every bit pattern valid.
    unsafe impl aya::Pod for DestroyKey {}
}

#[cfg(test)]
mod tests {
    use super::tcp_state::*;
    use super::*;

    const ALL: [i32; 12] = [
        ESTABLISHED,
        SYN_SENT,
        SYN_RECV,
        FIN_WAIT1,
        FIN_WAIT2,
        TIME_WAIT,
        CLOSE,
        CLOSE_WAIT,
        LAST_ACK,
        LISTEN,
        CLOSING,
        NEW_SYN_RECV,
    ];

    #[test]
    fn passive_open_counts() {
        assert_eq!(classify(SYN_RECV, ESTABLISHED), Transition::Open);
        assert_eq!(classify(SYN_RECV, CLOSE_WAIT), Transition::Open);
    }

    #[test]
    fn active_open_never_counts() {
        assert_eq!(classify(SYN_SENT, ESTABLISHED), Transition::Unchanged);
        assert_eq!(classify(CLOSE, SYN_SENT), Transition::Unchanged);
    }

    #[test]
    fn half_close_by_peer_stays_active() {
        assert_eq!(classify(ESTABLISHED, CLOSE_WAIT), Transition::Unchanged);
    }

    #[test]
    fn every_way_out_of_an_active_state_closes() {
        for old in [ESTABLISHED, CLOSE_WAIT] {
            for new in ALL.into_iter().filter(|s| !is_active(*s)) {
                assert_eq!(classify(old, new), Transition::Close, "{old} -> {new}");
            }
        }
    }

    #[test]
    fn transitions_between_inactive_states_change_nothing() {
        for old in ALL.into_iter().filter(|s| !is_active(*s)) {
            for new in ALL.into_iter().filter(|s| !is_active(*s)) {
                assert_eq!(classify(old, new), Transition::Unchanged, "{old} -> {new}");
            }
        }
    }

    #[test]
    fn only_syn_recv_opens() {
        for old in ALL {
            for new in ALL {
                let opens = classify(old, new) == Transition::Open;
                assert_eq!(opens, old == SYN_RECV && is_active(new), "{old} -> {new}");
            }
        }
    }

    /// The bucket without the division is the bucket of the rounded-up milliseconds, at
    /// every bound, around it, and at spread-out values.
    #[test]
    fn duration_bucket_is_the_rounded_up_milliseconds_bucket() {
        fn by_ms(duration_ns: u64) -> usize {
            let ms_ceil = duration_ns.div_ceil(1_000_000);
            DURATION_BUCKETS_MS
                .iter()
                .position(|bound| ms_ceil <= *bound)
                .unwrap_or(DURATION_BUCKETS_MS.len())
        }
        let check = |ns: u64| assert_eq!(duration_bucket(ns), by_ms(ns), "{ns} ns");
        for ns in [0, 1, u64::MAX, u64::MAX - 1] {
            check(ns);
        }
        for bound in DURATION_BUCKETS_MS {
            let ns = bound * 1_000_000;
            for near in [
                ns - 1_000_000,
                ns - 1,
                ns,
                ns + 1,
                ns + 999_999,
                ns + 1_000_000,
            ] {
                check(near);
            }
        }
        // A spread of other values (a fixed LCG: the same ones every run).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            check(x >> (x % 40));
        }
    }

    #[test]
    fn duration_buckets_are_upper_bounds() {
        assert_eq!(duration_bucket(0), 0);
        assert_eq!(duration_bucket(1_000_000), 0);
        assert_eq!(duration_bucket(1_000_001), 1);
        assert_eq!(duration_bucket(5_000_000), 1);
        assert_eq!(duration_bucket(999_000_000), 6);
        assert_eq!(
            duration_bucket(3_600_000_000_000),
            DURATION_BUCKET_COUNT - 2
        );
        assert_eq!(duration_bucket(u64::MAX), DURATION_BUCKET_COUNT - 1);
    }

    #[test]
    fn every_port_has_its_own_watched_bit() {
        assert_eq!(watched_bit(0), (0, 1));
        assert_eq!(watched_bit(63), (0, 1 << 63));
        assert_eq!(watched_bit(64), (1, 1));
        assert_eq!(watched_bit(u16::MAX), (WATCHED_WORDS - 1, 1 << 63));
        assert_eq!(tracked_port_byte(0), (0, 0));
        assert_eq!(tracked_port_byte(8081), (1010, 1));
        assert_eq!(tracked_port_byte(u16::MAX), (TRACKED_PORT_WORDS - 1, 7));
    }

    #[test]
    fn shared_types_have_no_padding() {
        assert_eq!(core::mem::size_of::<ConnKey>(), 24);
        assert_eq!(core::mem::size_of::<ConnCounts>(), 32);
        assert_eq!(core::mem::size_of::<SockEntry>(), 64);
        assert_eq!(core::mem::size_of::<PortTotals>(), 32);
        assert_eq!(core::mem::size_of::<ConnEvent>(), 56);
    }
}
