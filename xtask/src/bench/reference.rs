//! Reference programs: what the simplest per-socket bookkeeping costs on this host.
//!
//! An absolute per-event goal (the earlier ≤ 150 ns net, with thousands of cold sockets) says
//! nothing about whether the host can meet it at all: on a virtual machine a cache line the
//! kernel's own TCP work has evicted costs a nested page walk and a memory read. So the goals
//! are ratios to these programs, measured in the same run. They do
//! the least any design that keeps per-socket state in a BPF map must do, on the same
//! tracepoint, and the benchmark drives them through the handler's own phases
//! (`kernel::measure_phases`), so their per-kind costs read side by side with the handler's:
//!
//! - [`Reference::Line`]: at a passive open, store the socket's address in one 64-byte
//!   slot of a 4 MiB array (the size of the socket map's bucket array at the default
//!   `--max-connections`), chosen by a multiplicative hash of the address; at a close, clear
//!   the slot if it holds this socket. One random cache line per tracked event and no
//!   collision handling: a lower bound, not a usable design.
//! - [`Reference::Hash`]: at a passive open, insert the socket's address (`BPF_NOEXIST`)
//!   with an all-zero value the size of the agent's `SockEntry` into a hash map of the
//!   socket map's size, default flags or preallocated; at a close, delete it. The socket
//!   map's own operations with nothing around them.
//! - [`Reference::Timed`]: [`Reference::Hash`] (default flags) plus what a connection's
//!   duration needs and nothing else: the clock read at the open (stored in the value), and
//!   at the close a lookup of the entry, a second clock read and the subtraction before the
//!   delete. The least any design that measures how long connections last does, so the
//!   hot-churn goal can be read against it (the agent's duration histograms, its idle rule's
//!   clock and its events' times all come from these two reads).
//!
//! - [`Reference::Counted`]: [`Reference::Timed`] plus the one thing a drain of *one*
//!   endpoint needs on top of a socket map: a counter per endpoint, in a preallocated hash
//!   map keyed like the agent's `COUNTS` (24 bytes, 16,384 entries), looked up (created on
//!   first use) and atomically incremented at the open, looked up and atomically
//!   decremented at the close. Its key is a stand-in (it reads nothing from the socket): two
//!   bits of the socket's address pick one of four endpoints, as the hot churn's four
//!   threads each use a port of their own. The least any design that answers per endpoint
//!   (`/drained?port=P&netns=N`, a pod's own drain) and measures durations does, so the
//!   hot-churn goal can be read against what the handler must do, not only against a bare
//!   map.
//!
//! The four above classify transitions as the handler does
//! (`drain_agent_common::classify`): an open is `SYN_RECV` → `ESTABLISHED`/`CLOSE_WAIT`, a
//! close leaves those two states; every other run returns before touching memory. The empty program ([`EmptyProgram`]) is the floor.
//!
//! - [`Reference::SocketMap`]: the minimal socket-keyed map a drain needs, as a `bpftrace`
//!   one-liner keeps it (`@s[skaddr] = nsecs` on `SYN_RECV` → `ESTABLISHED`,
//!   `delete(@s[skaddr])` whenever a socket leaves `ESTABLISHED`, the client ends' deletes
//!   missing): a u64 → u64 hash map of the agent's socket-map size, default flags
//!   (`BPF_F_NO_PREALLOC`, as the agent's `SOCKETS` by default) or preallocated (as
//!   `--preallocate-sockets`, and as bpftrace's own maps). The 10k-cold section
//!   (`cold.rs`) compares the handler with it.
//!
//! They are written as BPF instructions here (a few dozen, with a small assembler) rather
//! than built with the agent's eBPF crate: they are the benchmark's, not the agent's, and
//! must not change when the agent does.

use std::{
    collections::BTreeMap,
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, bail};
use aya_obj::generated::{bpf_attr, bpf_cmd};
use serde::Serialize;

use super::sys::{self, ProgStats};

/// The tracepoint every program here attaches to (as a raw tracepoint: `u64 args[]` =
/// `TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)`).
const TRACEPOINT: &str = "inet_sock_set_state";

/// `SOCKETS`' default size (`--max-connections`), and so its bucket array: 262,144 buckets
/// of 16 bytes (kernel/bpf/hashtab.c `struct bucket`) = 4 MiB.
const SOCKET_MAP_ENTRIES: u32 = 262_144;
/// Slots of [`Reference::Line`]'s array: 4 MiB of 64-byte lines.
const LINE_SLOTS_LOG2: u32 = 16;
const LINE_BYTES: u32 = 64;
/// `size_of::<drain_agent_common::SockEntry>()` (the key 24, two u64, the peer 16 + 8).
const SOCK_ENTRY_BYTES: u32 = 64;
/// `size_of::<drain_agent_common::ConnKey>()` and `ConnCounts`, and `COUNTS`' size.
const ENDPOINT_KEY_BYTES: u32 = 24;
const ENDPOINT_VALUE_BYTES: u32 = 32;
const ENDPOINT_ENTRIES: u32 = 16_384;
/// [`Reference::Counted`]'s endpoint: bits 12–13 of the socket's address (below them, a
/// TCP socket's slab object of about 2 KiB leaves little to choose from).
const ENDPOINT_SHIFT: i32 = 12;
const ENDPOINTS: i32 = 4;

/// What a reference program does per tracked event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reference {
    /// One 64-byte slot of a 4 MiB array, by a hash of the socket's address.
    Line,
    /// A hash map keyed by the socket's address, `SOCKETS`' size.
    Hash { preallocated: bool },
    /// [`Reference::Hash`] (default flags) with a duration: the clock at the open into the
    /// value; at the close a lookup, the clock again and the subtraction, then the delete.
    Timed,
    /// [`Reference::Timed`] with a counter per endpoint (24-byte key, as `COUNTS`), atomically
    /// added to at the open and the close.
    Counted,
    /// `map[sk] = now` at a passive open, `delete(map[sk])` when a socket leaves
    /// ESTABLISHED: what a bpftrace one-liner does (not in [`Reference::ALL`]: the kernel
    /// section's phases do not run it).
    SocketMap { preallocated: bool },
}

impl Reference {
    pub const ALL: [Reference; 4] = [
        Reference::Line,
        Reference::Hash {
            preallocated: false,
        },
        Reference::Hash { preallocated: true },
        Reference::Timed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reference::Line => "one line of a 4 MiB array",
            Reference::Hash {
                preallocated: false,
            } => "hash map insert/delete (default flags)",
            Reference::Hash { preallocated: true } => "hash map insert/delete (preallocated)",
            Reference::Timed => {
                "hash map insert/delete with a duration (two clock reads, a lookup)"
            }
            Reference::Counted => {
                "the same with a duration and an endpoint counter (two more lookups, two atomic adds)"
            }
            Reference::SocketMap {
                preallocated: false,
            } => "minimal socket-keyed map (default flags)",
            Reference::SocketMap { preallocated: true } => {
                "minimal socket-keyed map (preallocated)"
            }
        }
    }
}

// BPF instruction classes and operations used below (include/uapi/linux/bpf.h, bpf_common.h).
const LDX_DW: u8 = 0x79; // BPF_LDX | BPF_MEM | BPF_DW
const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
const STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
const ST_DW: u8 = 0x7a; // BPF_ST | BPF_MEM | BPF_DW
const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW, imm BPF_ADD (0): *(dst + off) += src
const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW (two slots)
const MOV64_K: u8 = 0xb7;
const MOV64_X: u8 = 0xbf;
const ADD64_K: u8 = 0x07;
const MUL64_X: u8 = 0x2f;
const SUB64_X: u8 = 0x1f;
const RSH64_K: u8 = 0x77;
const AND64_K: u8 = 0x57;
const JA: u8 = 0x05;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JNE_X: u8 = 0x5d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const PSEUDO_MAP_FD: u8 = 1;
const MAP_LOOKUP_ELEM: i32 = 1;
const MAP_UPDATE_ELEM: i32 = 2;
const MAP_DELETE_ELEM: i32 = 3;
const KTIME_GET_NS: i32 = 5;
const BPF_ANY: i32 = 0;
const BPF_NOEXIST: i32 = 1;

// Registers: r1 the context, then the helpers' arguments; r6-r8 are kept across calls.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const SK: u8 = 6;
const OLD: u8 = 7;
const NEW: u8 = 8;
/// [`timed_program`]'s open time, kept across the close's clock call.
const OPENED: u8 = 9;
const FP: u8 = 10;

/// TCP states (include/net/tcp_states.h).
const ESTABLISHED: i32 = 1;
const SYN_RECV: i32 = 3;
const CLOSE_WAIT: i32 = 8;

/// A jump target, resolved when the program is finished.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Label {
    NewActive,
    Open,
    /// [`counted_program`]: the open's endpoint counter exists.
    Count,
    Close,
    /// [`counted_program`]: the close's socket entry is deleted.
    Delete,
    Out,
}

/// A straight-line BPF assembler with forward jumps to [`Label`]s.
#[derive(Default)]
struct Asm {
    insns: Vec<u64>,
    labels: BTreeMap<Label, usize>,
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

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.insn(code, dst, src, 0, imm);
    }

    fn label(&mut self, label: Label) {
        self.labels.insert(label, self.insns.len());
    }

    fn load_map(&mut self, dst: u8, map: &OwnedFd) {
        self.insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, map.as_raw_fd());
        self.insn(0, 0, 0, 0, 0);
    }

    fn load_imm64(&mut self, dst: u8, value: u64) {
        self.insn(LD_IMM64, dst, 0, 0, value as u32 as i32);
        self.insn(0, 0, 0, 0, (value >> 32) as u32 as i32);
    }

    fn finish(mut self) -> Result<Vec<u64>> {
        for (at, to) in std::mem::take(&mut self.jumps) {
            let target = *self.labels.get(&to).context("a jump to a missing label")?;
            let offset = i16::try_from(target as i64 - at as i64 - 1).context("jump too far")?;
            let insn = &mut self.insns[at];
            *insn = (*insn & !(0xffff << 16)) | (u64::from(offset as u16) << 16);
        }
        Ok(self.insns)
    }
}

/// r6 = sk, r7 = oldstate, r8 = newstate, from the tracepoint's `u64 args[]`.
fn load_args(asm: &mut Asm) {
    asm.insn(LDX_DW, SK, R1, 0, 0);
    asm.insn(LDX_DW, OLD, R1, 8, 0);
    asm.insn(LDX_DW, NEW, R1, 16, 0);
}

/// The part every reference shares: load (sk, oldstate, newstate), classify like the
/// handler and branch to [`Label::Open`] or [`Label::Close`], else return at once.
fn classify(asm: &mut Asm) {
    load_args(asm);
    asm.jump(JEQ_K, NEW, 0, ESTABLISHED, Label::NewActive);
    asm.jump(JEQ_K, NEW, 0, CLOSE_WAIT, Label::NewActive);
    // The new state is not active: a close if the old one was.
    asm.jump(JEQ_K, OLD, 0, ESTABLISHED, Label::Close);
    asm.jump(JEQ_K, OLD, 0, CLOSE_WAIT, Label::Close);
    asm.jump(JA, 0, 0, 0, Label::Out);
    asm.label(Label::NewActive);
    asm.jump(JNE_K, OLD, 0, SYN_RECV, Label::Out);
    asm.jump(JA, 0, 0, 0, Label::Open);
}

fn epilogue(asm: &mut Asm) {
    asm.label(Label::Out);
    asm.insn(MOV64_K, R0, 0, 0, 0);
    asm.insn(EXIT, 0, 0, 0, 0);
}

/// r0 = &slot[hash(sk)] of the line array, or to [`Label::Out`] if the lookup fails.
fn line_slot(asm: &mut Asm, map: &OwnedFd) {
    // Fibonacci hashing: the top bits of sk × 2^64/φ.
    asm.load_imm64(R2, 0x9E37_79B9_7F4A_7C15);
    asm.insn(MOV64_X, R3, SK, 0, 0);
    asm.insn(MUL64_X, R3, R2, 0, 0);
    asm.insn(RSH64_K, R3, 0, 0, (64 - LINE_SLOTS_LOG2) as i32);
    asm.insn(STX_W, FP, R3, -4, 0);
    asm.load_map(R1, map);
    asm.insn(MOV64_X, R2, FP, 0, 0);
    asm.insn(ADD64_K, R2, 0, 0, -4);
    asm.insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM);
    asm.jump(JEQ_K, R0, 0, 0, Label::Out);
}

fn line_program(map: &OwnedFd) -> Result<Vec<u64>> {
    let mut asm = Asm::default();
    classify(&mut asm);
    asm.label(Label::Open);
    line_slot(&mut asm, map);
    asm.insn(STX_DW, R0, SK, 0, 0);
    asm.jump(JA, 0, 0, 0, Label::Out);
    asm.label(Label::Close);
    line_slot(&mut asm, map);
    asm.insn(LDX_DW, R1, R0, 0, 0);
    asm.jump(JNE_X, R1, SK, 0, Label::Out);
    asm.insn(ST_DW, R0, 0, 0, 0);
    epilogue(&mut asm);
    asm.finish()
}

/// r1 = the map, r2 = &key, the key being the socket's address at fp − 8.
fn map_and_key(asm: &mut Asm, map: &OwnedFd) {
    asm.insn(STX_DW, FP, SK, -8, 0);
    asm.load_map(R1, map);
    asm.insn(MOV64_X, R2, FP, 0, 0);
    asm.insn(ADD64_K, R2, 0, 0, -8);
}

/// `map[sk] = *(fp + value)` with `flags`, then to [`Label::Out`]; the value is on the stack.
fn update(asm: &mut Asm, map: &OwnedFd, value: i16, flags: i32) {
    map_and_key(asm, map);
    asm.insn(MOV64_X, R3, FP, 0, 0);
    asm.insn(ADD64_K, R3, 0, 0, i32::from(value));
    asm.insn(MOV64_K, R4, 0, 0, flags);
    asm.insn(CALL, 0, 0, 0, MAP_UPDATE_ELEM);
    asm.jump(JA, 0, 0, 0, Label::Out);
}

/// [`Label::Close`]: `delete(map[sk])`, then the epilogue.
fn delete_and_finish(mut asm: Asm, map: &OwnedFd) -> Result<Vec<u64>> {
    asm.label(Label::Close);
    map_and_key(&mut asm, map);
    asm.insn(CALL, 0, 0, 0, MAP_DELETE_ELEM);
    epilogue(&mut asm);
    asm.finish()
}

fn hash_program(map: &OwnedFd) -> Result<Vec<u64>> {
    let value = -8 - SOCK_ENTRY_BYTES as i16;
    let mut asm = Asm::default();
    classify(&mut asm);
    asm.label(Label::Open);
    for offset in (value..-8).step_by(8) {
        asm.insn(ST_DW, FP, 0, offset, 0);
    }
    update(&mut asm, map, value, BPF_NOEXIST);
    delete_and_finish(asm, map)
}

/// [`hash_program`] with a duration: at the open the clock goes into the value's first word;
/// at the close the entry is looked up, the clock read again and the open's time subtracted
/// (kept on the stack, as a histogram would take it), then the entry deleted.
fn timed_program(map: &OwnedFd) -> Result<Vec<u64>> {
    let value = -8 - SOCK_ENTRY_BYTES as i16;
    let mut asm = Asm::default();
    classify(&mut asm);
    asm.label(Label::Open);
    clock_into_value(&mut asm, value);
    update(&mut asm, map, value, BPF_NOEXIST);
    asm.label(Label::Close);
    duration_at_close(&mut asm, map);
    map_and_key(&mut asm, map);
    asm.insn(CALL, 0, 0, 0, MAP_DELETE_ELEM);
    epilogue(&mut asm);
    asm.finish()
}

/// r1 = the endpoint map, r2 = &key, the key being [`Reference::Counted`]'s stand-in
/// endpoint of the socket at fp − 96 (24 bytes: the endpoint's number, then zeros).
fn endpoint_key(asm: &mut Asm, map: &OwnedFd) {
    asm.insn(MOV64_X, R1, SK, 0, 0);
    asm.insn(RSH64_K, R1, 0, 0, ENDPOINT_SHIFT);
    asm.insn(AND64_K, R1, 0, 0, ENDPOINTS - 1);
    asm.insn(STX_DW, FP, R1, ENDPOINT_KEY, 0);
    asm.insn(ST_DW, FP, 0, ENDPOINT_KEY + 8, 0);
    asm.insn(ST_DW, FP, 0, ENDPOINT_KEY + 16, 0);
    asm.load_map(R1, map);
    asm.insn(MOV64_X, R2, FP, 0, 0);
    asm.insn(ADD64_K, R2, 0, 0, i32::from(ENDPOINT_KEY));
}

/// Where [`endpoint_key`] puts the key, and [`counted_program`] a new endpoint's zero value.
const ENDPOINT_KEY: i16 = -96;
const ENDPOINT_ZERO: i16 = ENDPOINT_KEY - ENDPOINT_VALUE_BYTES as i16;

/// [`timed_program`] with an endpoint counter: after the open's insert succeeds, the
/// endpoint's counter is looked up (inserted with `BPF_NOEXIST` and looked up again on its
/// first use, as the agent's `counts_of`) and 1 added to it atomically; the close, after
/// the duration, looks the counter up again and adds −1 before the delete.
fn counted_program(sockets: &OwnedFd, endpoints: &OwnedFd) -> Result<Vec<u64>> {
    let value = -8 - SOCK_ENTRY_BYTES as i16;
    let mut asm = Asm::default();
    classify(&mut asm);
    asm.label(Label::Open);
    clock_into_value(&mut asm, value);
    map_and_key(&mut asm, sockets);
    asm.insn(MOV64_X, R3, FP, 0, 0);
    asm.insn(ADD64_K, R3, 0, 0, i32::from(value));
    asm.insn(MOV64_K, R4, 0, 0, BPF_NOEXIST);
    asm.insn(CALL, 0, 0, 0, MAP_UPDATE_ELEM);
    // Not inserted: not counted (the handler's exactly-once rule).
    asm.jump(JNE_K, R0, 0, 0, Label::Out);
    endpoint_key(&mut asm, endpoints);
    asm.insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM);
    asm.jump(JNE_K, R0, 0, 0, Label::Count);
    for offset in (ENDPOINT_ZERO..ENDPOINT_KEY).step_by(8) {
        asm.insn(ST_DW, FP, 0, offset, 0);
    }
    endpoint_key(&mut asm, endpoints);
    asm.insn(MOV64_X, R3, FP, 0, 0);
    asm.insn(ADD64_K, R3, 0, 0, i32::from(ENDPOINT_ZERO));
    asm.insn(MOV64_K, R4, 0, 0, BPF_NOEXIST);
    asm.insn(CALL, 0, 0, 0, MAP_UPDATE_ELEM);
    endpoint_key(&mut asm, endpoints);
    asm.insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM);
    asm.jump(JEQ_K, R0, 0, 0, Label::Out);
    asm.label(Label::Count);
    asm.insn(MOV64_K, R1, 0, 0, 1);
    asm.insn(ATOMIC_DW, R0, R1, 0, 0);
    asm.jump(JA, 0, 0, 0, Label::Out);
    asm.label(Label::Close);
    duration_at_close(&mut asm, sockets);
    endpoint_key(&mut asm, endpoints);
    asm.insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM);
    asm.jump(JEQ_K, R0, 0, 0, Label::Delete);
    asm.insn(MOV64_K, R1, 0, 0, -1);
    asm.insn(ATOMIC_DW, R0, R1, 0, 0);
    asm.label(Label::Delete);
    map_and_key(&mut asm, sockets);
    asm.insn(CALL, 0, 0, 0, MAP_DELETE_ELEM);
    epilogue(&mut asm);
    asm.finish()
}

/// A socket entry's value on the stack at fp + `value`: the clock, then zeros.
fn clock_into_value(asm: &mut Asm, value: i16) {
    asm.insn(CALL, 0, 0, 0, KTIME_GET_NS);
    asm.insn(STX_DW, FP, R0, value, 0);
    for offset in (value + 8..-8).step_by(8) {
        asm.insn(ST_DW, FP, 0, offset, 0);
    }
}

/// The close's duration: the socket's entry looked up (to [`Label::Out`] if there is none),
/// the clock read again and the open's time subtracted, kept at fp − 16 as a histogram
/// would take it.
fn duration_at_close(asm: &mut Asm, map: &OwnedFd) {
    map_and_key(asm, map);
    asm.insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM);
    asm.jump(JEQ_K, R0, 0, 0, Label::Out);
    asm.insn(LDX_DW, OPENED, R0, 0, 0);
    asm.insn(CALL, 0, 0, 0, KTIME_GET_NS);
    asm.insn(SUB64_X, R0, OPENED, 0, 0);
    asm.insn(STX_DW, FP, R0, -16, 0);
}

/// The bpftrace one-liner's program: `if (old == SYN_RECV && new == ESTABLISHED)
/// @s[sk] = nsecs; else if (old == ESTABLISHED) delete(@s[sk]);`. Not `classify`: the
/// one-liner knows nothing of CLOSE_WAIT (a server end the client closed first leaves
/// ESTABLISHED for CLOSE_WAIT, which is where its entry goes).
fn socket_map_program(map: &OwnedFd) -> Result<Vec<u64>> {
    let mut asm = Asm::default();
    load_args(&mut asm);
    asm.jump(JEQ_K, OLD, 0, ESTABLISHED, Label::Close);
    asm.jump(JNE_K, OLD, 0, SYN_RECV, Label::Out);
    asm.jump(JNE_K, NEW, 0, ESTABLISHED, Label::Out);
    asm.label(Label::Open);
    asm.insn(CALL, 0, 0, 0, KTIME_GET_NS);
    asm.insn(STX_DW, FP, R0, -16, 0);
    // bpftrace's map assignment: insert or overwrite.
    update(&mut asm, map, -16, BPF_ANY);
    delete_and_finish(asm, map)
}

fn bpf_attr_zeroed() -> bpf_attr {
    // SAFETY: a C union of integers and arrays; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// `BPF_MAP_CREATE`.
fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    entries: u32,
    flags: u32,
) -> Result<OwnedFd> {
    let mut attr = bpf_attr_zeroed();
    // The members BPF_MAP_CREATE reads (writing a union field is safe).
    attr.__bindgen_anon_1.map_type = map_type;
    attr.__bindgen_anon_1.key_size = key_size;
    attr.__bindgen_anon_1.value_size = value_size;
    attr.__bindgen_anon_1.max_entries = entries;
    attr.__bindgen_anon_1.map_flags = flags;
    let fd = sys::bpf(
        bpf_cmd::BPF_MAP_CREATE as libc::c_long,
        (&raw mut attr).cast(),
        size_of::<bpf_attr>(),
    )
    .context("bpf BPF_MAP_CREATE")?;
    // SAFETY: a new fd from the kernel, owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).context("fd out of range")?) })
}

/// Loads `insns` as a raw tracepoint program named `name` and attaches it to the
/// tracepoint. Returns (program id, program fd, link fd).
fn load_and_attach(name: &str, insns: &[u64]) -> Result<(u32, OwnedFd, OwnedFd)> {
    let mut log = vec![0u8; 64 * 1024];
    let license = c"GPL";
    let mut attr = bpf_attr_zeroed();
    // SAFETY: writing the members BPF_PROG_LOAD reads; the pointers outlive the call.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = aya_obj::generated::bpf_prog_type::BPF_PROG_TYPE_RAW_TRACEPOINT as u32;
        load.insn_cnt = u32::try_from(insns.len()).context("too many instructions")?;
        load.insns = insns.as_ptr() as u64;
        load.license = license.as_ptr() as u64;
        load.log_level = 1;
        load.log_size = u32::try_from(log.len()).context("log size")?;
        load.log_buf = log.as_mut_ptr() as u64;
        for (to, from) in load.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *to = from as libc::c_char;
        }
    }
    let fd = match sys::bpf(
        bpf_cmd::BPF_PROG_LOAD as libc::c_long,
        (&raw mut attr).cast(),
        size_of::<bpf_attr>(),
    ) {
        Ok(fd) => fd,
        Err(error) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "cannot load the reference program {name} (bpf BPF_PROG_LOAD): {error}\n{}",
                String::from_utf8_lossy(&log[..end])
            );
        }
    };
    // SAFETY: a new fd from the kernel, owned here.
    let prog = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).context("fd out of range")?) };
    let tracepoint = CString::new(TRACEPOINT).context("tracepoint name")?;
    let mut attr = bpf_attr_zeroed();
    // The members BPF_RAW_TRACEPOINT_OPEN reads.
    attr.raw_tracepoint.name = tracepoint.as_ptr() as u64;
    attr.raw_tracepoint.prog_fd = u32::try_from(prog.as_raw_fd()).context("negative fd")?;
    let fd = sys::bpf(
        bpf_cmd::BPF_RAW_TRACEPOINT_OPEN as libc::c_long,
        (&raw mut attr).cast(),
        size_of::<bpf_attr>(),
    )
    .with_context(|| {
        format!("cannot attach the reference program {name} (bpf BPF_RAW_TRACEPOINT_OPEN)")
    })?;
    // SAFETY: as above.
    let link = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).context("fd out of range")?) };
    let id = sys::raw_prog_info(prog.as_fd())
        .with_context(|| format!("cannot read the reference program {name}"))?
        .id;
    Ok((id, prog, link))
}

/// A program that does nothing (`r0 = 0; exit`) attached to the tracepoint: with BPF
/// statistics on, its mean run time is the floor of the measurement (the dispatch and the
/// statistics' own clock reads), to read the handler's numbers against. Detached on drop.
pub struct EmptyProgram {
    id: u32,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl EmptyProgram {
    pub fn attach() -> Result<Self> {
        let mut asm = Asm::default();
        epilogue(&mut asm);
        let (id, prog, link) = load_and_attach("bench_empty", &asm.finish()?)?;
        Ok(Self {
            id,
            _prog: prog,
            _link: link,
        })
    }

    pub fn stats(&self) -> Result<ProgStats> {
        sys::prog_stats(self.id)
    }
}

/// The keys of a hash map with u64 keys.
pub fn count_keys(map: BorrowedFd<'_>) -> Result<u64> {
    let mut held = 0;
    each_key::<8>(map, |_| {
        held += 1;
        Ok(())
    })?;
    Ok(held)
}

/// Each key of a hash map with `N`-byte keys, in turn (`BPF_MAP_GET_NEXT_KEY` from the start).
fn each_key<const N: usize>(
    map: BorrowedFd<'_>,
    mut each: impl FnMut(&[u8; N]) -> Result<()>,
) -> Result<()> {
    let mut key = [0u8; N];
    let mut next = [0u8; N];
    let mut first = true;
    loop {
        let mut attr = bpf_attr_zeroed();
        // The members BPF_MAP_GET_NEXT_KEY reads; a null key starts the walk.
        attr.__bindgen_anon_2.map_fd = u32::try_from(map.as_raw_fd()).context("negative fd")?;
        attr.__bindgen_anon_2.key = if first { 0 } else { key.as_ptr() as u64 };
        attr.__bindgen_anon_2.__bindgen_anon_1.next_key = next.as_mut_ptr() as u64;
        match sys::bpf(
            bpf_cmd::BPF_MAP_GET_NEXT_KEY as libc::c_long,
            (&raw mut attr).cast(),
            size_of::<bpf_attr>(),
        ) {
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(error) => return Err(error).context("bpf BPF_MAP_GET_NEXT_KEY"),
        }
        each(&next)?;
        key = next;
        first = false;
    }
}

/// `BPF_MAP_LOOKUP_ELEM`: the value of `key` in `map`, into `value`.
fn lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> Result<()> {
    let mut attr = bpf_attr_zeroed();
    // The members BPF_MAP_LOOKUP_ELEM reads; the pointers outlive the call.
    attr.__bindgen_anon_2.map_fd = u32::try_from(map.as_raw_fd()).context("negative fd")?;
    attr.__bindgen_anon_2.key = key.as_ptr() as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = value.as_mut_ptr() as u64;
    sys::bpf(
        bpf_cmd::BPF_MAP_LOOKUP_ELEM as libc::c_long,
        (&raw mut attr).cast(),
        size_of::<bpf_attr>(),
    )
    .context("bpf BPF_MAP_LOOKUP_ELEM")?;
    Ok(())
}

/// A hash map's flags: none (preallocated, the kernel's default) or `BPF_F_NO_PREALLOC`.
pub fn map_flags(preallocated: bool) -> u32 {
    if preallocated {
        0
    } else {
        aya_obj::generated::BPF_F_NO_PREALLOC
    }
}

/// A [`Reference`] program with its map, attached to the tracepoint; detached on drop.
pub struct ReferenceProgram {
    reference: Reference,
    id: u32,
    map: OwnedFd,
    /// [`Reference::Counted`]'s endpoint counters.
    endpoints: Option<OwnedFd>,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl ReferenceProgram {
    pub fn attach(reference: Reference) -> Result<Self> {
        Self::attach_sized(reference, SOCKET_MAP_ENTRIES)
    }

    /// As [`ReferenceProgram::attach`], with the hash maps sized `entries` (the agent's
    /// socket map's `max_entries`, for a like-for-like comparison).
    pub fn attach_sized(reference: Reference, entries: u32) -> Result<Self> {
        use aya_obj::generated::bpf_map_type::{BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH};
        let mut endpoints = None;
        // A socket-keyed map of `SockEntry`-sized values, `SOCKETS`' size.
        let socket_map = |preallocated: bool| {
            create_map(
                BPF_MAP_TYPE_HASH as u32,
                8,
                SOCK_ENTRY_BYTES,
                entries,
                map_flags(preallocated),
            )
        };
        let (map, insns) = match reference {
            Reference::Line => {
                let map = create_map(
                    BPF_MAP_TYPE_ARRAY as u32,
                    4,
                    LINE_BYTES,
                    1 << LINE_SLOTS_LOG2,
                    0,
                )?;
                let insns = line_program(&map)?;
                (map, insns)
            }
            Reference::Hash { preallocated } => {
                let map = socket_map(preallocated)?;
                let insns = hash_program(&map)?;
                (map, insns)
            }
            Reference::Timed => {
                let map = socket_map(false)?;
                let insns = timed_program(&map)?;
                (map, insns)
            }
            Reference::Counted => {
                let map = socket_map(false)?;
                let counts = create_map(
                    BPF_MAP_TYPE_HASH as u32,
                    ENDPOINT_KEY_BYTES,
                    ENDPOINT_VALUE_BYTES,
                    ENDPOINT_ENTRIES,
                    map_flags(true),
                )?;
                let insns = counted_program(&map, &counts)?;
                endpoints = Some(counts);
                (map, insns)
            }
            Reference::SocketMap { preallocated } => {
                let map = create_map(
                    BPF_MAP_TYPE_HASH as u32,
                    8,
                    8,
                    entries,
                    map_flags(preallocated),
                )?;
                let insns = socket_map_program(&map)?;
                (map, insns)
            }
        };
        let (id, prog, link) = load_and_attach("bench_ref", &insns)?;
        Ok(Self {
            reference,
            id,
            map,
            endpoints,
            _prog: prog,
            _link: link,
        })
    }

    pub fn stats(&self) -> Result<ProgStats> {
        sys::prog_stats(self.id)
    }

    /// Sockets the map holds now: the hash map's keys, or the array's non-empty slots.
    pub fn held(&self) -> Result<u64> {
        match self.reference {
            Reference::Line => {
                let mut held = 0;
                let mut value = [0u8; LINE_BYTES as usize];
                for slot in 0u32..1 << LINE_SLOTS_LOG2 {
                    lookup(self.map.as_fd(), &slot.to_ne_bytes(), &mut value)?;
                    if value[..8] != [0; 8] {
                        held += 1;
                    }
                }
                Ok(held)
            }
            Reference::Hash { .. }
            | Reference::Timed
            | Reference::Counted
            | Reference::SocketMap { .. } => count_keys(self.map.as_fd()),
        }
    }

    /// Checks, after the phase that opened `n` connections, that the program recorded
    /// them: a reference that silently did nothing would look like a cheap host. The array
    /// loses sockets whose slots collide (about n²/2m of them), so it must hold at least 80 %.
    /// More than `n` is other passive opens on the host meanwhile, not an error.
    pub fn check_opened(&self, n: u64) -> Result<()> {
        let held = self.held()?;
        let enough = match self.reference {
            Reference::Line => held * 5 >= n * 4,
            Reference::Hash { .. }
            | Reference::Timed
            | Reference::Counted
            | Reference::SocketMap { .. } => held >= n,
        };
        // Other passive opens on the host may come and go between the two reads: the
        // counters are held to the same bound as the sockets, not to their exact number.
        if let Some(counted) = self.endpoint_total()?
            && counted < i64::try_from(n).unwrap_or(i64::MAX)
        {
            bail!(
                "the reference program ({}) counts {counted} connections in its endpoints after {n} passive opens",
                self.reference.label()
            );
        }
        if !enough {
            bail!(
                "the reference program ({}) holds {held} sockets after {n} passive opens",
                self.reference.label()
            );
        }
        Ok(())
    }

    /// Checks, after the `n` connections closed, that the program dropped them (a few
    /// other connections of the host may still be held).
    pub fn check_closed(&self, n: u64) -> Result<()> {
        let held = self.held()?;
        if held * 10 > n {
            bail!(
                "the reference program ({}) still holds {held} sockets after {n} connections closed",
                self.reference.label()
            );
        }
        if let Some(counted) = self.endpoint_total()?
            && (counted < 0 || counted.unsigned_abs() * 10 > n)
        {
            bail!(
                "the reference program ({}) still counts {counted} connections in its endpoints after {n} connections closed",
                self.reference.label()
            );
        }
        Ok(())
    }

    /// [`Reference::Counted`]'s endpoint counters added up (`None` for the others): the
    /// sockets it holds, if every open and close was counted.
    fn endpoint_total(&self) -> Result<Option<i64>> {
        let Some(endpoints) = &self.endpoints else {
            return Ok(None);
        };
        let mut total = 0i64;
        each_key::<{ ENDPOINT_KEY_BYTES as usize }>(endpoints.as_fd(), |key| {
            let mut value = [0u8; ENDPOINT_VALUE_BYTES as usize];
            lookup(endpoints.as_fd(), key, &mut value)?;
            let mut active = [0u8; 8];
            active.copy_from_slice(&value[..8]);
            total += i64::from_ne_bytes(active);
            Ok(())
        })?;
        Ok(Some(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_their_labels() {
        let mut asm = Asm::default();
        asm.jump(JA, 0, 0, 0, Label::Out); // 0 → 3: offset 2
        asm.load_imm64(R2, 1); // 1, 2
        asm.label(Label::Out);
        asm.insn(EXIT, 0, 0, 0, 0); // 3
        let insns = asm.finish().unwrap();
        assert_eq!(insns.len(), 4);
        assert_eq!(insns[0] & 0xff, u64::from(JA));
        assert_eq!((insns[0] >> 16) as u16 as i16, 2);
        assert_eq!(insns[3], u64::from(EXIT));
    }

    #[test]
    fn instructions_are_encoded_as_the_kernel_reads_them() {
        let mut asm = Asm::default();
        asm.insn(STX_DW, FP, SK, -8, 0); // *(u64 *)(r10 - 8) = r6
        asm.insn(MOV64_K, R4, 0, 0, -1);
        let insns = asm.finish().unwrap();
        assert_eq!(insns[0].to_le_bytes(), [0x7b, 0x6a, 0xf8, 0xff, 0, 0, 0, 0]);
        assert_eq!(
            insns[1].to_le_bytes(),
            [0xb7, 0x04, 0, 0, 0xff, 0xff, 0xff, 0xff]
        );
    }

    /// Each reference loads, runs on real connections, records each passive open and
    /// drops it at the close: the work it is a reference for is really done.
    #[test]
    #[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn each_reference_records_real_connections_and_drops_them() {
        if !sys::root_or_skip("each_reference_records_real_connections_and_drops_them") {
            return;
        }
        let _serial = sys::KERNEL_TEST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _stats = sys::Sysctl::set("kernel.bpf_stats_enabled", "1").unwrap();
        const N: u64 = 300;
        let all = Reference::ALL.into_iter().chain([
            Reference::Counted,
            Reference::SocketMap {
                preallocated: false,
            },
            Reference::SocketMap { preallocated: true },
        ]);
        for reference in all {
            let program = ReferenceProgram::attach(reference).unwrap();
            let before = program.stats().unwrap();
            let pairs = super::super::net::open_for_test(N);
            program.check_opened(N).unwrap();
            let held = program.held().unwrap();
            assert!(held <= N + 50, "{reference:?}: {held} held after {N} opens");
            pairs.close_gracefully();
            // The server ends leave ESTABLISHED for CLOSE_WAIT → LAST_ACK when the client's
            // FIN arrives and they close; all of it happens within the close calls.
            std::thread::sleep(std::time::Duration::from_millis(100));
            program.check_closed(N).unwrap();
            let runs = program.stats().unwrap().since(&before).run_cnt;
            assert!(
                runs >= 4 * N,
                "{reference:?}: only {runs} runs for {N} connections"
            );
        }
    }

    #[test]
    fn the_value_size_is_the_agents_socket_entry() {
        assert_eq!(
            SOCK_ENTRY_BYTES as usize,
            size_of::<drain_agent_common::SockEntry>()
        );
        assert_eq!(
            ENDPOINT_KEY_BYTES as usize,
            size_of::<drain_agent_common::ConnKey>()
        );
        assert_eq!(
            ENDPOINT_VALUE_BYTES as usize,
            size_of::<drain_agent_common::ConnCounts>()
        );
    }
}
