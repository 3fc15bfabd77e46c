//! Closing connections at a drain's deadline (issue 12): the `iter/tcp` program that
//! destroys tracked inbound connections with the `bpf_sock_destroy` kfunc.

use core::{ffi::c_void, ptr};

use drain_agent_common::{ConnKey, is_active};

use crate::{
    count::{Error, atomic_add_u64, count_error},
    maps::{DESTROY_TARGETS, DESTROYED, SOCKETS},
    read::{BtfLoads, KernelMemory as _, Peer, kernel_offsets, read_key, read_peer},
};

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
pub(crate) fn tracked_as(sk: u64, local: &ConnKey, remote: &Peer) -> bool {
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
