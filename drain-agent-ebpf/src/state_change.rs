//! The handler of `sock:inet_sock_set_state` behind its three attach points (BTF, raw and
//! classic tracepoint): opens and closes of connections, and listeners on the in-pod port.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use drain_agent_common::{Transition, classify, error_index, tcp_state};

use crate::{
    count::{Error, count_error, count_error_at},
    maps::KERNEL_OFFSETS,
    pod_listen::{try_on_listen, try_on_unlisten},
    read::{
        BtfLoads, KernelMemory, ProbeReads, is_tcp, kernel_offsets, read_ctx_u64, read_key,
        read_peer,
    },
    track::{port_ever_tracked, track_close, track_open},
};

// The three attach points. Each only extracts (sk, oldstate, newstate) from its context.

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
