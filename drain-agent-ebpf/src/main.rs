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
//!
//! One module per program: [`state_change`] (the handler behind its three attach points),
//! [`pod_listen`] (listeners on the in-pod port, and the iterator that seeds them), [`walk`]
//! (the seeding and repair iterator, and the forgetter of dead sockets' entries), [`destroy`]
//! (the iterator that closes connections at a drain's deadline). What they share: [`maps`]
//! (every map and the globals the loader fills in), [`track`] (the exactly-once bookkeeping),
//! [`read`] (reading the socket), [`count`] (atomic adds and the error counters).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core::intrinsics::atomic_xadd is the only atomic add that compiles for BPF"
)]

mod count;
mod destroy;
mod maps;
mod pod_listen;
mod read;
mod state_change;
mod track;
mod walk;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // BPF programs cannot panic (the verifier rejects unbounded loops); this is unreachable.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
