//! The inet_diag requests (include/uapi/linux/sock_diag.h, inet_diag.h): a filtered dump
//! of one family's TCP sockets, and `SOCK_DESTROY` of one socket.

use anyhow::Result;

use super::{
    Query, Side, TcpSocket,
    sockid::{SOCKID_LEN, SockId},
};
use crate::sys::netlink::wire::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_HDRLEN, Request};

/// include/uapi/linux/sock_diag.h
pub(super) const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `sizeof(struct inet_diag_req_v2)`.
const REQ_V2_LEN: usize = 8 + SOCKID_LEN;
/// include/uapi/linux/inet_diag.h: request attribute and extension numbers, bytecode ops.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
pub(super) const INET_DIAG_INFO: u16 = 2;
/// The attribute saying whether an IPv6 listener is IPv6-only (`IPV6_V6ONLY`).
pub(super) const INET_DIAG_SKV6ONLY: u16 = 11;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;
const INET_DIAG_BC_D_GE: u8 = 4;
const INET_DIAG_BC_D_LE: u8 = 5;
/// `sizeof(struct inet_diag_bc_op)`.
const BC_OP_LEN: usize = 4;

/// `SOCK_DIAG_BY_FAMILY` dump of `family`'s TCP sockets in `q.states` whose port on `side`
/// is `q.local_port` (filtered in the kernel by [`port_bytecode`]).
pub(super) fn dump(q: &Query, side: Side, family: u8, seq: u32) -> Result<Vec<u8>> {
    let bytecode = port_bytecode(q.local_port, side);
    let ext = if q.with_info {
        1 << (INET_DIAG_INFO - 1)
    } else {
        0
    };
    request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &RequestBody {
            family,
            states: q.states,
            ext,
            id: SockId::default(),
            bytecode: Some(&bytecode),
        },
    )
}

/// `SOCK_DIAG_BY_FAMILY` of the one socket `id` (not a dump): the kernel looks it up in its
/// hash tables (`inet_diag_find_one_icsk()`), whatever their size.
pub(super) fn exact(family: u8, id: SockId, seq: u32) -> Result<Vec<u8>> {
    request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST,
        seq,
        &RequestBody {
            family,
            states: u32::MAX,
            ext: 0,
            id,
            bytecode: None,
        },
    )
}

/// `SOCK_DESTROY` of `sock`, by the identity and family the kernel reported for it.
pub(super) fn destroy(sock: &TcpSocket, seq: u32) -> Result<Vec<u8>> {
    let id = SockId::of(sock)?;
    request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &RequestBody {
            family: sock.family,
            states: u32::MAX,
            ext: 0,
            id,
            bytecode: None,
        },
    )
}

/// `struct inet_diag_req_v2` plus its optional bytecode attribute.
struct RequestBody<'a> {
    family: u8,
    states: u32,
    ext: u8,
    id: SockId,
    bytecode: Option<&'a [u8]>,
}

/// One netlink message: `struct nlmsghdr`, `struct inet_diag_req_v2`, attributes.
fn request(kind: u16, flags: u16, seq: u32, body: &RequestBody<'_>) -> Result<Vec<u8>> {
    let mut out = Request::new(kind, flags, seq, NLMSG_HDRLEN + REQ_V2_LEN + 64);
    let mut req = Vec::with_capacity(REQ_V2_LEN);
    req.push(body.family);
    req.push(libc::IPPROTO_TCP as u8);
    req.push(body.ext);
    req.push(0); // pad
    req.extend_from_slice(&body.states.to_ne_bytes());
    body.id.write(&mut req);
    out.push(&req);
    if let Some(bytecode) = body.bytecode {
        out.attribute(INET_DIAG_REQ_BYTECODE, bytecode)?;
    }
    out.finish()
}

/// inet_diag bytecode accepting exactly local port `port` (net/ipv4/inet_diag.c,
/// `inet_diag_bc_run`): `S_GE port` then `S_LE port`. Each comparison op is followed by an op
/// whose `no` field carries the port; `yes` steps over both, `no` jumps to 4 bytes past the end,
/// which ends the program with len != 0: reject. (`inet_diag_bc_audit` accepts `no` up to
/// `len + 4` for exactly this; `ss` builds the same program.)
fn port_bytecode(port: u16, side: Side) -> [u8; 4 * BC_OP_LEN] {
    let (ge, le) = match side {
        Side::Local => (INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE),
        Side::Remote => (INET_DIAG_BC_D_GE, INET_DIAG_BC_D_LE),
    };
    let op = |code: u8, yes: usize, no: usize| -> [u8; BC_OP_LEN] {
        // All values are below 20; the casts cannot truncate.
        let no = (no as u16).to_ne_bytes();
        [code, yes as u8, no[0], no[1]]
    };
    let operand = {
        let port = port.to_ne_bytes();
        [0, 0, port[0], port[1]]
    };
    let total = 4 * BC_OP_LEN;
    let mut out = [0u8; 4 * BC_OP_LEN];
    let ops = [
        op(ge, 2 * BC_OP_LEN, total + 4),
        operand,
        op(le, 2 * BC_OP_LEN, 2 * BC_OP_LEN + 4),
        operand,
    ];
    for (slot, op) in out.chunks_exact_mut(BC_OP_LEN).zip(ops) {
        slot.copy_from_slice(&op);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytecode_matches_ss() {
        // Byte for byte what iproute2 6.1 `ss -tn 'sport >= :8080 and sport <= :8080'` sends as
        // INET_DIAG_REQ_BYTECODE (seen with strace): S_GE yes=8 no=20, {port}, S_LE yes=8 no=12,
        // {port}. (`sport = :8080` makes ss send an S_COND hostcond instead.)
        let port = 8080u16.to_ne_bytes();
        let twenty = 20u16.to_ne_bytes();
        let twelve = 12u16.to_ne_bytes();
        let expected = [
            2, 8, twenty[0], twenty[1], 0, 0, port[0], port[1], //
            3, 8, twelve[0], twelve[1], 0, 0, port[0], port[1],
        ];
        assert_eq!(port_bytecode(8080, Side::Local), expected);
    }

    #[test]
    fn a_dump_request_is_header_request_and_bytecode() {
        let q = Query {
            local_port: 8080,
            states: 1 << 1,
            with_info: true,
        };
        let raw = dump(&q, Side::Remote, libc::AF_INET6 as u8, 10).expect("request");
        // nlmsghdr (16), inet_diag_req_v2 (56), nlattr (4) and 16 bytes of bytecode.
        assert_eq!(raw.len(), NLMSG_HDRLEN + REQ_V2_LEN + 4 + 16);
        assert_eq!(&raw[..4], &(raw.len() as u32).to_ne_bytes());
        assert_eq!(&raw[4..6], &SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert_eq!(&raw[6..8], &(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        assert_eq!(&raw[8..12], &10u32.to_ne_bytes());
        assert_eq!(
            &raw[16..20],
            &[libc::AF_INET6 as u8, libc::IPPROTO_TCP as u8, 1 << 1, 0],
            "family, protocol, INET_DIAG_INFO asked for, pad"
        );
        assert_eq!(&raw[20..24], &(1u32 << 1).to_ne_bytes());
        assert_eq!(&raw[72..74], &20u16.to_ne_bytes());
        assert_eq!(&raw[74..76], &INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        assert_eq!(raw[76..], port_bytecode(8080, Side::Remote));
    }
}
