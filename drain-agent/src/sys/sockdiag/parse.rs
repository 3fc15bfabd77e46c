//! Reading the kernel's answers: one `struct inet_diag_msg` (include/uapi/linux/inet_diag.h)
//! with its attributes, and the few `struct tcp_info` fields the agent looks at. Every length
//! the kernel sends is checked before it is read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, Result, bail};

use super::{
    TcpInfoSummary, TcpSocket,
    request::{INET_DIAG_INFO, INET_DIAG_SKV6ONLY},
    sockid::{SOCKID_LEN, SockId},
};
use crate::sys::netlink::wire::{Attributes, align4, read_array, read_u32};

/// `sizeof(struct inet_diag_msg)`.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// Offsets into `struct tcp_info` (include/uapi/linux/tcp.h). The struct only ever grows:
/// fields past [`TCPI_BASE_LEN`] are read only when the attribute is long enough.
const TCPI_UNACKED: usize = 24;
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_LAST_ACK_RECV: usize = 56;
/// Everything up to and including `tcpi_last_ack_recv` (Linux 2.6 already had it).
const TCPI_BASE_LEN: usize = TCPI_LAST_ACK_RECV + 4;
/// `__u64 tcpi_bytes_acked`, `tcpi_bytes_received` (Linux 4.1).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;
/// `__u32 tcpi_notsent_bytes`, `tcpi_data_segs_out` (Linux 4.6).
const TCPI_NOTSENT_BYTES: usize = 144;
const TCPI_DATA_SEGS_OUT: usize = 156;

/// One `struct inet_diag_msg` and its attributes.
pub(super) fn parse_socket(payload: &[u8], with_info: bool) -> Result<TcpSocket> {
    if payload.len() < DIAG_MSG_LEN {
        bail!(
            "{} bytes, struct inet_diag_msg needs {DIAG_MSG_LEN}",
            payload.len()
        );
    }
    let family = payload[0];
    let state = payload[1];
    let id = SockId::read(payload.get(4..4 + SOCKID_LEN).context("inet_diag_sockid")?)?;
    let base = 4 + SOCKID_LEN;
    // idiag_expires at base, then rqueue, wqueue, uid, inode.
    let recv_queue = read_u32(payload, base + 4)?;
    let send_queue = read_u32(payload, base + 8)?;
    let uid = read_u32(payload, base + 12)?;
    let inode = read_u32(payload, base + 16)?;
    let address = |raw: [u8; 16], port: u16| -> Result<SocketAddr> {
        let ip = match family as i32 {
            libc::AF_INET => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
            libc::AF_INET6 => {
                let v6 = Ipv6Addr::from(raw);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            }
            other => bail!("address family {other} is neither AF_INET nor AF_INET6"),
        };
        Ok(SocketAddr::new(ip, port))
    };
    let mut info = None;
    let mut v6only = None;
    // The kernel sends INET_DIAG_SKV6ONLY for every IPv6 socket listening or closed
    // (`inet_diag_msg_attrs_fill`), asked or not.
    let v6_listener = family == libc::AF_INET6 as u8 && state == super::state::LISTEN;
    if with_info || v6_listener {
        let attributes = payload.get(align4(DIAG_MSG_LEN)..).unwrap_or_default();
        for attribute in Attributes::new(attributes) {
            let (kind, value) = attribute?;
            if kind == INET_DIAG_INFO && with_info {
                info = Some(parse_tcp_info(value).context("INET_DIAG_INFO")?);
            } else if kind == INET_DIAG_SKV6ONLY && v6_listener {
                let &[flag] = value else {
                    bail!("INET_DIAG_SKV6ONLY of {} bytes, expected 1", value.len());
                };
                v6only = Some(flag != 0);
            }
        }
    }
    Ok(TcpSocket {
        local: address(id.src, id.sport)?,
        remote: address(id.dst, id.dport)?,
        state,
        inode,
        uid,
        cookie: id.cookie,
        recv_queue,
        send_queue,
        info,
        v6only,
        family,
        interface: id.interface,
    })
}

/// The summary fields of a `struct tcp_info` of whatever size this kernel has.
fn parse_tcp_info(raw: &[u8]) -> Result<TcpInfoSummary> {
    if raw.len() < TCPI_BASE_LEN {
        bail!(
            "struct tcp_info of {} bytes, expected at least {TCPI_BASE_LEN}",
            raw.len()
        );
    }
    Ok(TcpInfoSummary {
        last_data_sent_ms: read_u32(raw, TCPI_LAST_DATA_SENT)?,
        last_data_recv_ms: read_u32(raw, TCPI_LAST_DATA_RECV)?,
        last_ack_recv_ms: read_u32(raw, TCPI_LAST_ACK_RECV)?,
        unacked: read_u32(raw, TCPI_UNACKED)?,
        notsent_bytes: read_u32(raw, TCPI_NOTSENT_BYTES).ok(),
        bytes_acked: read_array(raw, TCPI_BYTES_ACKED)
            .ok()
            .map(u64::from_ne_bytes),
        bytes_received: read_array(raw, TCPI_BYTES_RECEIVED)
            .ok()
            .map(u64::from_ne_bytes),
        data_segs_out: read_u32(raw, TCPI_DATA_SEGS_OUT).ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_env = "gnu")]
    #[test]
    fn tcp_info_offsets_match_libc() {
        use std::mem::offset_of;
        macro_rules! same_offsets {
            ($($field:ident = $ours:expr),* $(,)?) => {
                $(assert_eq!(offset_of!(libc::tcp_info, $field), $ours, stringify!($field));)*
            };
        }
        same_offsets!(
            tcpi_unacked = TCPI_UNACKED,
            tcpi_last_data_sent = TCPI_LAST_DATA_SENT,
            tcpi_last_data_recv = TCPI_LAST_DATA_RECV,
            tcpi_last_ack_recv = TCPI_LAST_ACK_RECV,
            tcpi_bytes_acked = TCPI_BYTES_ACKED,
            tcpi_bytes_received = TCPI_BYTES_RECEIVED,
            tcpi_notsent_bytes = TCPI_NOTSENT_BYTES,
            tcpi_data_segs_out = TCPI_DATA_SEGS_OUT,
        );
    }

    #[test]
    fn short_or_odd_answers_are_errors_not_panics() {
        assert!(parse_socket(&[0; DIAG_MSG_LEN - 1], false).is_err());
        let mut msg = vec![0u8; DIAG_MSG_LEN];
        msg[0] = libc::AF_INET as u8;
        assert!(parse_socket(&msg, false).is_ok());
        // An attribute claiming more bytes than there are.
        msg.extend_from_slice(&[200, 0, 2, 0]);
        assert!(parse_socket(&msg, true).is_err());
        // tcp_info too short for the base fields; then only the base fields: optionals None.
        assert!(parse_tcp_info(&[0; TCPI_BASE_LEN - 1]).is_err());
        let base = parse_tcp_info(&[0; TCPI_BASE_LEN]).expect("base tcp_info");
        assert_eq!(
            (base.notsent_bytes, base.bytes_acked, base.data_segs_out),
            (None, None, None)
        );
    }
}
