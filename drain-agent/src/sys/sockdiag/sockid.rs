//! `struct inet_diag_sockid` (include/uapi/linux/inet_diag.h): a socket's identity, in an
//! answer and again in a `SOCK_DESTROY` request. Ports and addresses are in network byte
//! order, the interface and the cookie in host order.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, bail};

use super::TcpSocket;
use crate::sys::netlink::wire::{read_array, read_u32};

/// `sizeof(struct inet_diag_sockid)`.
pub(super) const SOCKID_LEN: usize = 48;

/// `struct inet_diag_sockid`, in host terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct SockId {
    pub(super) sport: u16,
    pub(super) dport: u16,
    /// Network byte order; IPv4 uses the first 4 bytes.
    pub(super) src: [u8; 16],
    pub(super) dst: [u8; 16],
    pub(super) interface: u32,
    pub(super) cookie: u64,
}

impl SockId {
    /// The identity the kernel reported for `sock`, rebuilt from its (possibly folded) addresses.
    pub(super) fn of(sock: &TcpSocket) -> Result<SockId> {
        Ok(SockId {
            interface: sock.interface,
            cookie: sock.cookie,
            ..Self::of_ends(sock.family, sock.local, sock.remote)?
        })
    }

    /// The identity of the socket with local end `local` and remote end `remote` in
    /// `family`, by addresses only (`INET_DIAG_NOCOOKIE`: the kernel then checks no cookie).
    pub(super) fn of_ends(family: u8, local: SocketAddr, remote: SocketAddr) -> Result<SockId> {
        let address = |addr: SocketAddr| -> Result<[u8; 16]> {
            let mut raw = [0u8; 16];
            match (i32::from(family), addr.ip()) {
                (libc::AF_INET, IpAddr::V4(v4)) => raw[..4].copy_from_slice(&v4.octets()),
                (libc::AF_INET6, IpAddr::V4(v4)) => raw = v4.to_ipv6_mapped().octets(),
                (libc::AF_INET6, IpAddr::V6(v6)) => raw = v6.octets(),
                (family, ip) => bail!("address {ip} does not fit family {family}"),
            }
            Ok(raw)
        };
        Ok(SockId {
            sport: local.port(),
            dport: remote.port(),
            src: address(local)?,
            dst: address(remote)?,
            interface: 0,
            cookie: u64::MAX,
        })
    }

    pub(super) fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sport.to_be_bytes());
        out.extend_from_slice(&self.dport.to_be_bytes());
        out.extend_from_slice(&self.src);
        out.extend_from_slice(&self.dst);
        out.extend_from_slice(&self.interface.to_ne_bytes());
        // `__u32 idiag_cookie[2]`: low half first (net/core/sock_diag.c sock_diag_save_cookie).
        out.extend_from_slice(&(self.cookie as u32).to_ne_bytes());
        out.extend_from_slice(&((self.cookie >> 32) as u32).to_ne_bytes());
    }

    pub(super) fn read(raw: &[u8]) -> Result<SockId> {
        let cookie_low = u64::from(read_u32(raw, 40)?);
        let cookie_high = u64::from(read_u32(raw, 44)?);
        Ok(SockId {
            sport: u16::from_be_bytes(read_array(raw, 0)?),
            dport: u16::from_be_bytes(read_array(raw, 2)?),
            src: read_array(raw, 4)?,
            dst: read_array(raw, 20)?,
            interface: read_u32(raw, 36)?,
            cookie: cookie_low | cookie_high << 32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_and_read_back_unchanged() {
        let id = SockId {
            sport: 8080,
            dport: 40_000,
            src: [1; 16],
            dst: [2; 16],
            interface: 3,
            cookie: 0x1234_5678_9abc_def0,
        };
        let mut raw = Vec::new();
        id.write(&mut raw);
        assert_eq!(raw.len(), SOCKID_LEN);
        assert_eq!(&raw[..2], &8080u16.to_be_bytes(), "ports in network order");
        assert_eq!(SockId::read(&raw).expect("read"), id);
    }
}
