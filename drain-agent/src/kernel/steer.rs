//! `--pod-listen` without taking the port: an `sk_lookup` program per pod namespace
//! steers connections for the in-pod port to the agent's own socket there, only while no
//! application listens on that port in that namespace.
//!
//! The agent's socket in a pod namespace is bound to loopback at one fixed port,
//! `--pod-socket-port` (29100 by default): `127.0.0.1:29100`; `[::1]:29100` for
//! `--pod-listen [::1]:PORT`; `[::]:29100`, dual-stack, for `[::]:PORT`, since a socket
//! bound to `::1` is IPv6-only. That port is taken in every pod, on every address (a
//! listener on any address of a port conflicts with an application's `bind()` of the
//! wildcard on it, `inet_csk_bind_conflict()`): no address the agent could bind leaves an
//! application's port free, so the port is one the operator knows and keeps free. A port
//! the kernel picked (`:0`) came from `ip_local_port_range` (32768–60999), where servers
//! do bind fixed ports (gRPC's 50051, MySQL X's 33060), and the socket is made as soon as
//! the pod's namespace appears, before its application starts: about once in 28,000 pods
//! the application's own `bind()` failed and its container crash-looped. A pod where the
//! port is in use already is not served (`http/pods/`, `socket_port_taken`). The sockets
//! of two agents (an upgrade) share the port (`SO_REUSEPORT`); each program assigns its
//! agent's socket with `BPF_SK_LOOKUP_F_NO_REUSEPORT`, so the kernel does not pick another
//! socket of that group (net/ipv4/inet_hashtables.c `inet_lookup_run_sk_lookup()`).
//!
//! Why one program per namespace, assembled here: an `sk_lookup` program cannot find out
//! which namespace it runs in. Its context (`struct bpf_sk_lookup`) has no namespace, its
//! `sk` is NULL until a socket is assigned, and `bpf_get_netns_cookie()` is refused for
//! this program type (net/core/filter.c `sk_lookup_func_proto()` does not offer it; Linux
//! 6.18's verifier: "program of this type cannot use helper bpf_get_netns_cookie#122").
//! A netns link carries no cookie either. aya 0.14 loads a program of the object once, so
//! the namespace's inode is written into each namespace's program as a constant: a few
//! dozen instructions, loaded with `BPF_PROG_LOAD` and attached with `BPF_LINK_CREATE` to
//! the namespace's file (Linux >= 5.9; CAP_NET_ADMIN over the namespace, kernel/bpf/
//! net_namespace.c `netns_bpf_link_create()`). The maps are the object's.
//!
//! The program, for a TCP connection to the in-pod port on the `--pod-listen` address:
//! if the namespace's `POD_LISTEN_COUNTS` entry is non-zero (an application listens on the
//! port, IPv4 or IPv6, any address), or `ERRORS[POD_LISTEN_COUNT_FAILED]` is (a count
//! could not be kept somewhere), it returns `SK_PASS` without assigning: the kernel's
//! normal lookup finds the application (net/ipv4/inet_hashtables.c runs `sk_lookup`
//! before the listening hash, `inet_lookup_run_sk_lookup()`). Otherwise it assigns the
//! agent's socket from `POD_SOCKETS[inode]` (`bpf_sk_assign()`, which checks protocol and
//! family, net/core/filter.c `bpf_sk_lookup_assign()`) and returns `SK_PASS`.
//!
//! Two agents (an upgrade: the new one starts while the old one still runs): each attaches
//! its own program, with its own socket map, to the namespace. The programs of a namespace
//! run in attach order, each seeing the socket the ones before selected, and the last
//! selection stands (include/linux/filter.h `BPF_PROG_SK_LOOKUP_RUN_ARRAY`); without a flag,
//! `bpf_sk_assign()` refuses to override a selection (`-EEXIST`, net/core/filter.c
//! `bpf_sk_lookup_assign()`). The agent assigns with `BPF_SK_LOOKUP_F_REPLACE`: the program
//! attached last, the new agent's, serves at once, and the old agent's socket gets no new
//! connection. If the later program finds no socket of its agent (its socket closed: the
//! socket map drops a closed socket), it assigns nothing and the earlier selection stands.
//! The old agent stops by detaching its link first (once another program is attached to
//! the namespace, `SteerLink::others_attached`, or after 2 s: `http/pods/`), then accepting
//! what is already queued
//! on its socket (a connection is steered at its SYN: one steered before the detach may
//! still complete its handshake onto the old socket), and only then closing it
//! (`http/pods/`); what it could not accept meanwhile (every connection slot busy) moves at
//! the close to the new agent's socket, since the group carries the migrate program
//! (`kernel/reuseport.rs`, bound by `http/handover.rs`): no connection is refused or reset
//! while one agent remains.

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, SockHash};
use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_prog_type};
use drain_agent_common::{IPPROTO_TCP, error_index};

use super::raw::{self, ProgramKind, bpf, zeroed_attr};

// BPF instruction encodings (include/uapi/linux/bpf.h, bpf_common.h).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const LDX_DW: u8 = 0x79; // BPF_LDX | BPF_MEM | BPF_DW
const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW (two slots)
const MOV64_K: u8 = 0xb7;
const MOV64_X: u8 = 0xbf;
const ADD64_K: u8 = 0x07;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const PSEUDO_MAP_FD: u8 = 1;
/// Helper ids (`enum bpf_func_id`).
const MAP_LOOKUP_ELEM: i32 = 1;
const SK_RELEASE: i32 = 86;
const SK_ASSIGN: i32 = 124;
/// `enum sk_action`.
const SK_PASS: i32 = 1;
/// `BPF_SK_LOOKUP_F_REPLACE` and `BPF_SK_LOOKUP_F_NO_REUSEPORT` (include/uapi/linux/bpf.h).
const SK_LOOKUP_F_REPLACE: i32 = 1;
const SK_LOOKUP_F_NO_REUSEPORT: i32 = 2;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const CTX: u8 = 6;
const SOCK: u8 = 7;
const FP: u8 = 10;

/// `struct bpf_sk_lookup` (include/uapi/linux/bpf.h; these offsets are the same since 5.9).
const FAMILY: i16 = 8;
const PROTOCOL: i16 = 12;
const LOCAL_IP4: i16 = 40;
const LOCAL_IP6: i16 = 44;
const LOCAL_PORT: i16 = 60;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;

/// Stack slots: the namespace inode (the key of both per-namespace maps), the error index.
const NETNS_SLOT: i16 = -4;
const ERROR_SLOT: i16 = -8;

/// A jump target, resolved when the program is finished.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    NoApp,
    Out,
}

/// A straight-line assembler with forward jumps to [`Label`]s.
#[derive(Default)]
struct Asm {
    insns: Vec<u64>,
    labels: Vec<(Label, usize)>,
    jumps: Vec<(usize, Label)>,
}

impl Asm {
    fn insn(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        // struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }, little endian.
        self.insns.push(
            u64::from(code)
                | (u64::from(dst | (src << 4)) << 8)
                | (u64::from(off as u16) << 16)
                | (u64::from(imm as u32) << 32),
        );
    }

    fn jump(&mut self, code: u8, dst: u8, imm: i32, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.insn(code, dst, 0, 0, imm);
    }

    fn label(&mut self, label: Label) {
        self.labels.push((label, self.insns.len()));
    }

    fn load_map(&mut self, dst: u8, map: BorrowedFd<'_>) {
        self.insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, map.as_raw_fd());
        self.insn(0, 0, 0, 0, 0);
    }

    /// `r0 = bpf_map_lookup_elem(map, fp + slot)`.
    fn lookup(&mut self, map: BorrowedFd<'_>, slot: i16) {
        self.load_map(R1, map);
        self.insn(MOV64_X, R2, FP, 0, 0);
        self.insn(ADD64_K, R2, 0, 0, i32::from(slot));
        self.insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM);
    }

    fn finish(mut self) -> Result<Vec<u64>> {
        for (at, to) in std::mem::take(&mut self.jumps) {
            let target = self
                .labels
                .iter()
                .find(|(label, _)| *label == to)
                .map(|(_, at)| *at)
                .context("a jump to a missing label")?;
            let offset = i16::try_from(target as i64 - at as i64 - 1).context("jump too far")?;
            let insn = self
                .insns
                .get_mut(at)
                .context("a jump out of the program")?;
            *insn = (*insn & !(0xffff << 16)) | (u64::from(offset as u16) << 16);
        }
        Ok(self.insns)
    }
}

/// The maps a pod namespace's program reads.
pub struct SteerMaps<'a> {
    pub counts: BorrowedFd<'a>,
    pub errors: BorrowedFd<'a>,
    pub sockets: BorrowedFd<'a>,
}

/// The program of the namespace `netns` for connections to `target` (see the module doc).
fn program(target: SocketAddr, netns: u32, maps: &SteerMaps<'_>) -> Result<Vec<u64>> {
    let mut asm = Asm::default();
    asm.insn(MOV64_X, CTX, R1, 0, 0);
    asm.insn(LDX_W, R2, CTX, LOCAL_PORT, 0);
    asm.jump(JNE_K, R2, i32::from(target.port()), Label::Out);
    asm.insn(LDX_W, R2, CTX, PROTOCOL, 0);
    asm.jump(JNE_K, R2, i32::from(IPPROTO_TCP), Label::Out);
    match target {
        SocketAddr::V4(v4) => {
            asm.insn(LDX_W, R2, CTX, FAMILY, 0);
            asm.jump(JNE_K, R2, AF_INET, Label::Out);
            if !v4.ip().is_unspecified() {
                // Network byte order in memory, read as a native u32.
                asm.insn(LDX_W, R2, CTX, LOCAL_IP4, 0);
                asm.jump(JNE_K, R2, i32::from_ne_bytes(v4.ip().octets()), Label::Out);
            }
        }
        SocketAddr::V6(v6) => {
            // `[::]` takes both families (the agent's `[::]:0` socket is dual-stack).
            if !v6.ip().is_unspecified() {
                asm.insn(LDX_W, R2, CTX, FAMILY, 0);
                asm.jump(JNE_K, R2, AF_INET6, Label::Out);
                for (i, word) in v6.ip().octets().chunks_exact(4).enumerate() {
                    let word: [u8; 4] = word.try_into().context("an IPv6 word")?;
                    asm.insn(LDX_W, R2, CTX, LOCAL_IP6 + 4 * i as i16, 0);
                    asm.jump(JNE_K, R2, i32::from_ne_bytes(word), Label::Out);
                }
            }
        }
    }
    // The namespace's count of application listeners on the port.
    asm.insn(ST_W, FP, 0, NETNS_SLOT, netns as i32);
    asm.lookup(maps.counts, NETNS_SLOT);
    asm.jump(JEQ_K, R0, 0, Label::NoApp);
    asm.insn(LDX_DW, R1, R0, 0, 0);
    asm.jump(JNE_K, R1, 0, Label::Out);
    asm.label(Label::NoApp);
    // A count somewhere could not be kept: steer nowhere.
    asm.insn(
        ST_W,
        FP,
        0,
        ERROR_SLOT,
        error_index::POD_LISTEN_COUNT_FAILED as i32,
    );
    asm.lookup(maps.errors, ERROR_SLOT);
    asm.jump(JEQ_K, R0, 0, Label::Out);
    asm.insn(LDX_DW, R1, R0, 0, 0);
    asm.jump(JNE_K, R1, 0, Label::Out);
    // The agent's socket in this namespace (a reference the program must release).
    asm.lookup(maps.sockets, NETNS_SLOT);
    asm.jump(JEQ_K, R0, 0, Label::Out);
    asm.insn(MOV64_X, SOCK, R0, 0, 0);
    asm.insn(MOV64_X, R1, CTX, 0, 0);
    asm.insn(MOV64_X, R2, SOCK, 0, 0);
    // REPLACE: a socket another agent's program (attached earlier) assigned is overridden,
    // so the newest agent serves (see the module doc, "Two agents"). NO_REUSEPORT: this
    // socket, not one the kernel would pick from its SO_REUSEPORT group (the agents share
    // `--pod-socket-port`, net/ipv4/inet_hashtables.c `inet_lookup_run_sk_lookup()`).
    asm.insn(
        MOV64_K,
        R3,
        0,
        0,
        SK_LOOKUP_F_REPLACE | SK_LOOKUP_F_NO_REUSEPORT,
    );
    asm.insn(CALL, 0, 0, 0, SK_ASSIGN);
    asm.insn(MOV64_X, R1, SOCK, 0, 0);
    asm.insn(CALL, 0, 0, 0, SK_RELEASE);
    asm.label(Label::Out);
    asm.insn(MOV64_K, R0, 0, 0, SK_PASS);
    asm.insn(EXIT, 0, 0, 0, 0);
    asm.finish()
}

/// `BPF_PROG_LOAD` of an `sk_lookup` program.
fn load(insns: &[u64]) -> Result<OwnedFd> {
    raw::load(
        &ProgramKind {
            prog_type: bpf_prog_type::BPF_PROG_TYPE_SK_LOOKUP,
            attach_type: bpf_attach_type::BPF_SK_LOOKUP,
            name: b"pod_port_steer",
            what: "an sk_lookup program (Linux >= 5.9 needed)",
        },
        insns,
    )
}

/// `BPF_LINK_CREATE`: `program` on the namespace `netns`; detached when the link is closed
/// (or when the namespace goes: netns links do not hold their namespace).
fn attach(program: BorrowedFd<'_>, netns: BorrowedFd<'_>) -> Result<OwnedFd> {
    let mut attr = zeroed_attr();
    attr.link_create.__bindgen_anon_1.prog_fd =
        u32::try_from(program.as_raw_fd()).context("bad program fd")?;
    attr.link_create.__bindgen_anon_2.target_fd =
        u32::try_from(netns.as_raw_fd()).context("bad namespace fd")?;
    attr.link_create.attach_type = bpf_attach_type::BPF_SK_LOOKUP as u32;
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map_err(|error| {
        let hint = if error.raw_os_error() == Some(libc::EPERM) {
            " (CAP_NET_ADMIN needed)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot attach an sk_lookup program to a network namespace{hint}: {error}")
    })
}

/// One pod namespace's program and link: dropping it detaches the program.
pub struct SteerLink {
    _link: OwnedFd,
    _program: OwnedFd,
    /// The namespace (a file of it), to ask which programs are attached there, and for the
    /// pod manager's checks of the count there (`http/pods/recount.rs`). Held no longer than
    /// the agent's socket there, which holds the namespace anyway.
    netns: Arc<File>,
}

impl SteerLink {
    /// The namespace the program is attached to (a file of it).
    pub fn namespace(&self) -> Arc<File> {
        Arc::clone(&self.netns)
    }

    /// Whether another `sk_lookup` program than this one is attached to the namespace: an
    /// agent beside this one (an upgrade's next) serves the in-pod port there.
    /// `BPF_PROG_QUERY` (CAP_NET_ADMIN, as the attach) for at most two program ids: more
    /// is `ENOSPC`, which says as much.
    pub fn others_attached(&self) -> Result<bool> {
        let mut ids = [0_u32; 2];
        let mut attr = zeroed_attr();
        attr.query.__bindgen_anon_1.target_fd =
            u32::try_from(self.netns.as_raw_fd()).context("bad namespace fd")?;
        attr.query.attach_type = bpf_attach_type::BPF_SK_LOOKUP as u32;
        attr.query.prog_ids = ids.as_mut_ptr() as u64;
        attr.query.__bindgen_anon_2.prog_cnt = 2;
        match raw::bpf_call(bpf_cmd::BPF_PROG_QUERY, &mut attr) {
            Ok(_) => Ok(ids.iter().filter(|id| **id != 0).count() > 1),
            Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => Ok(true),
            Err(error) => Err(anyhow::anyhow!(
                "cannot list the sk_lookup programs of a network namespace: {error}"
            )),
        }
    }
}

/// The in-pod port's steering: the maps and the target, set up at load.
pub(super) struct Steering {
    pub(super) counts: OwnedFd,
    pub(super) errors: OwnedFd,
    pub(super) sockets: SockHash<MapData, u32>,
}

impl Steering {
    fn maps(&self) -> SteerMaps<'_> {
        SteerMaps {
            counts: self.counts.as_fd(),
            errors: self.errors.as_fd(),
            sockets: self.sockets.fd().as_fd(),
        }
    }

    /// Whether this kernel and these privileges allow it: a program is loaded and attached
    /// to the agent's own namespace for a moment (for a port-0 target, which no connection
    /// has, so it steers nothing meanwhile).
    pub(super) fn probe(&self) -> Result<()> {
        let insns = program(SocketAddr::from(([127, 0, 0, 1], 0)), 0, &self.maps())?;
        let program = load(&insns)?;
        let own = File::open("/proc/self/ns/net").context("cannot open the own namespace")?;
        drop(attach(program.as_fd(), own.as_fd())?);
        Ok(())
    }

    /// Registers `socket` as the agent's in namespace `netns` and attaches that namespace's
    /// program (file `netns_file`) for connections to `target`.
    pub(super) fn steer(
        &mut self,
        target: SocketAddr,
        netns: u32,
        netns_file: &File,
        socket: BorrowedFd<'_>,
    ) -> Result<SteerLink> {
        self.sockets
            .insert(netns, socket, 0)
            .context("cannot register the agent's socket for sk_lookup")?;
        let insns = program(target, netns, &self.maps())?;
        let program = load(&insns)?;
        let link = attach(program.as_fd(), netns_file.as_fd())?;
        let netns = netns_file
            .try_clone()
            .context("cannot keep the namespace's file")?;
        Ok(SteerLink {
            _link: link,
            _program: program,
            netns: Arc::new(netns),
        })
    }

    /// Whether the kernel side counts an application listener on the in-pod port in `netns`
    /// (`POD_LISTEN_COUNTS[netns]` is not 0: the namespace's program steers nothing).
    pub(super) fn counted(&self, netns: u32) -> Result<bool> {
        Ok(raw::map_lookup_u32_i64(self.counts.as_fd(), netns)
            .context("cannot read the count of the in-pod port's listeners")?
            .is_some_and(|count| count != 0))
    }

    /// Forgets the agent's socket of `netns` (its close removes it too).
    pub(super) fn unsteer(&mut self, netns: u32) {
        let _ = self.sockets.remove(&netns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_their_labels() {
        let mut asm = Asm::default();
        asm.jump(JEQ_K, R0, 0, Label::Out);
        asm.insn(MOV64_K, R0, 0, 0, 7);
        asm.label(Label::Out);
        asm.insn(EXIT, 0, 0, 0, 0);
        let insns = asm.finish().expect("assembled");
        // The jump skips one instruction: off = 1.
        assert_eq!((insns[0] >> 16) & 0xffff, 1);
    }

    #[test]
    fn a_missing_label_is_an_error() {
        let mut asm = Asm::default();
        asm.jump(JEQ_K, R0, 0, Label::NoApp);
        assert!(asm.finish().is_err());
    }
}
