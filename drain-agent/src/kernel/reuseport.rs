//! Listeners that hand over without a reset: every listener of the agent (the node's
//! `--listen`, `--agent-check-listen`, the in-pod ones, bound or steered to) is a member of a
//! `SO_REUSEPORT` group, so the next agent of an upgrade binds the same address while this
//! one still serves, and this program is attached to the group.
//!
//! Why a program at all: when a listener of a group closes, the connections in its accept
//! queue and its half-open requests are reset (net/ipv4/inet_connection_sock.c
//! `inet_csk_listen_stop()` sends them away with the listener) unless
//! `reuseport_migrate_sock()` (net/core/sock_reuseport.c) finds them another listener of
//! the group. It does when the group's program was loaded with the expected attach type
//! `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (Linux >= 5.14), whatever `net.ipv4.tcp_migrate_req`
//! says; without a program that sysctl decides, and it is 0 by default. The program is
//! `return SK_PASS` without a selection: for a new connection and for a migrating one
//! alike, `reuseport_migrate_sock()` / `reuseport_select_sock()` then pick a listener by
//! the connection's hash, as without a program (`bpf_run_sk_reuseport()` returns no
//! socket, and the caller falls back to `reuseport_select_sock_by_hash()`).
//!
//! The group holds the program (`sock_reuseport.prog`), not the socket that attached it:
//! the last agent to attach replaces it with its own copy, which is the same two
//! instructions.

use std::os::fd::{AsRawFd as _, BorrowedFd, OwnedFd};

use anyhow::{Context as _, Result};
use aya_obj::generated::{bpf_attach_type, bpf_prog_type};

use super::raw::{self, ProgramKind};

/// `BPF_ALU64 | BPF_MOV | BPF_K` and `BPF_JMP | BPF_EXIT` (include/uapi/linux/bpf.h).
const MOV64_K: u64 = 0xb7;
const EXIT: u64 = 0x95;
/// `enum sk_action`.
const SK_PASS: u64 = 1;

/// The loaded program; attach it to each listener with [`MigrateProgram::attach`].
#[derive(Debug)]
pub struct MigrateProgram(OwnedFd);

impl MigrateProgram {
    /// Loads `r0 = SK_PASS; exit` as an `sk_reuseport` program that may migrate (Linux
    /// >= 5.14; older kernels refuse the expected attach type).
    pub fn load() -> Result<Self> {
        // struct bpf_insn, little endian: code | dst:4 src:4 | off:16 | imm:32.
        let insns = [MOV64_K | (SK_PASS << 32), EXIT];
        raw::load(
            &ProgramKind {
                prog_type: bpf_prog_type::BPF_PROG_TYPE_SK_REUSEPORT,
                attach_type: bpf_attach_type::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
                name: b"handover_pass",
                what: "an sk_reuseport program that migrates (Linux >= 5.14 needed)",
            },
            &insns,
        )
        .map(Self)
    }

    /// Attaches the program to the `SO_REUSEPORT` group of `listener` (a listening socket
    /// bound with `SO_REUSEPORT`): from then on, a listener of that group that closes hands
    /// its queued connections to another one.
    pub fn attach(&self, listener: BorrowedFd<'_>) -> Result<()> {
        let fd: libc::c_int = self.0.as_raw_fd();
        // SAFETY: setsockopt with a pointer to an int of the size given.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_REUSEPORT_EBPF,
                std::ptr::from_ref(&fd).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot attach the sk_reuseport program (SO_ATTACH_REUSEPORT_EBPF)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_return_sk_pass() {
        // mov64 r0, 1: code 0xb7, dst 0, imm 1.
        assert_eq!(MOV64_K | (SK_PASS << 32), 0x0000_0001_0000_00b7);
    }
}
