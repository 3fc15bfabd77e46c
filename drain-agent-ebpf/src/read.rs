//! Reading the socket (and the programs' contexts): the two ways to load kernel memory
//! and the socket's fields the programs key by.

use core::{ffi::c_void, ptr};

use aya_ebpf::helpers::bpf_probe_read_kernel;
use drain_agent_common::{AF_INET, AF_INET6, ConnKey, IPPROTO_TCP, KernelOffsets, OFFSET_UNKNOWN};

use crate::{count::Error, maps::KERNEL_OFFSETS};

/// Reads a context slot through `bpf_probe_read_kernel`, so that the verifier sees a plain
/// number rather than a typed kernel pointer: the field offsets we add to it come from a
/// global and are not constants, and typed pointers only take constant offsets.
#[inline(always)]
pub(crate) fn read_ctx_u64(ctx: *mut c_void, index: usize) -> Result<u64, Error> {
    // SAFETY: the context holds at least `index + 1` u64 arguments (TP_PROTO has three).
    unsafe { bpf_probe_read_kernel(ctx.cast::<u64>().add(index)) }.map_err(|_| Error::ReadFailed)
}

#[inline(always)]
pub(crate) fn kernel_offsets() -> KernelOffsets {
    // SAFETY: a read-only global the loader filled in; volatile so the compiler does not
    // fold the zero defaults in.
    unsafe { ptr::read_volatile(&KERNEL_OFFSETS) }
}

/// How the handler reads kernel memory at `base + offset`.
pub(crate) trait KernelMemory {
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
pub(crate) struct ProbeReads;

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
pub(crate) struct BtfLoads;

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
pub(crate) fn is_tcp<M: KernelMemory>(sk: u64, offsets: &KernelOffsets) -> Result<bool, Error> {
    if offsets.sk_protocol == OFFSET_UNKNOWN {
        return Ok(true);
    }
    Ok(M::read::<u16>(sk, offsets.sk_protocol)? == IPPROTO_TCP)
}

#[inline(always)]
pub(crate) fn read_netns<M: KernelMemory>(sk: u64, offsets: &KernelOffsets) -> Result<u32, Error> {
    // sk->__sk_common.skc_net.net->ns.inum
    let net = M::read::<u64>(sk, offsets.skc_net)?;
    M::read::<u32>(net, offsets.net_ns_inum)
}

#[inline(always)]
pub(crate) fn read_key<M: KernelMemory>(
    sk: u64,
    offsets: &KernelOffsets,
) -> Result<ConnKey, Error> {
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
pub(crate) struct Peer {
    pub(crate) addr: [u8; 16],
    pub(crate) port: u16,
    pub(crate) family: u16,
}

#[inline(always)]
pub(crate) fn read_peer<M: KernelMemory>(sk: u64, offsets: &KernelOffsets) -> Result<Peer, Error> {
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
