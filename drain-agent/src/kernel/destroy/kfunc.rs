//! Linking the `destroy_sockets` program's call to the kfunc `bpf_sock_destroy()`.
//!
//! aya 0.14 cannot link a kfunc call: it only knows calls to functions inside the object,
//! and fails the *whole* object on the call to the extern symbol ("error relocating
//! function": `UnknownFunction { address: 2624, caller_name: "destroy_sockets" }`).
//! So [`link_kfuncs`] does what libbpf does for `__ksym` externs, on a copy of the object
//! before aya sees it: each `call` relocated against `bpf_sock_destroy` becomes a
//! `BPF_PSEUDO_KFUNC_CALL` whose immediate is the function's id in the running kernel's BTF.

use anyhow::{Context as _, Result, bail, ensure};
use aya_obj::btf::BtfKind;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

/// The kfunc it calls.
pub(in crate::kernel) const KFUNC: &str = "bpf_sock_destroy";

/// The eBPF object with its kfunc calls linked; `problem` says why they could not be.
pub(in crate::kernel) struct LinkedObject {
    /// Holds the object's bytes at `start`, its first 8-byte aligned address (the ELF
    /// reader needs aligned headers). Never resized, so its bytes never move.
    buffer: Vec<u8>,
    start: usize,
    len: usize,
    pub problem: Option<String>,
}

impl LinkedObject {
    pub fn bytes(&self) -> &[u8] {
        &self.buffer[self.start..self.start + self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buffer[self.start..self.start + self.len]
    }
}

/// Rewrites every call to [`KFUNC`] in `object` into a kfunc call the kernel resolves
/// (`src_reg = BPF_PSEUDO_KFUNC_CALL`, `imm` = the function's BTF id in vmlinux, `off` = 0
/// for vmlinux), as libbpf does for `__ksym` externs (`bpf_object__relocate_data`,
/// `RELO_EXTERN_CALL`). Where the kernel has no such function (before 6.5), the calls get
/// id 0 (libbpf's value for a missing weak kfunc): aya still loads the rest of the object,
/// and `destroy_sockets` is not loaded (the verifier would refuse it).
pub(in crate::kernel) fn link_kfuncs(object: &[u8], btf: &aya::Btf) -> Result<LinkedObject> {
    match btf.id_by_type_name_kind(KFUNC, BtfKind::Func) {
        Ok(id) => link_kfunc_calls(object, id, None),
        Err(error) => link_kfunc_calls(
            object,
            0,
            Some(format!(
                "the kernel has no kfunc {KFUNC} (Linux >= 6.5 needed): {error}"
            )),
        ),
    }
}

/// Points every call to [`KFUNC`] in a copy of `object` at BTF id `btf_id`.
fn link_kfunc_calls(object: &[u8], btf_id: u32, problem: Option<String>) -> Result<LinkedObject> {
    // Up to 7 bytes before the first 8-byte aligned address.
    let mut buffer = vec![0u8; object.len() + 7];
    let start = buffer.as_ptr().align_offset(8);
    ensure!(start < 8, "cannot align the eBPF object");
    buffer[start..start + object.len()].copy_from_slice(object);
    let imm = i32::try_from(btf_id).context("BTF id out of range")?;
    let calls = kfunc_calls(object)?;
    if calls.is_empty() {
        bail!("the eBPF object has no call to {KFUNC}");
    }
    let mut linked = LinkedObject {
        buffer,
        start,
        len: object.len(),
        problem,
    };
    let bytes = linked.bytes_mut();
    for offset in calls {
        let insn = bytes
            .get_mut(offset..offset + 8)
            .context("a kfunc call lies outside the object")?;
        // `struct bpf_insn` (little-endian object): code, dst_reg:4|src_reg:4, off, imm.
        if insn[0] != BPF_JMP_CALL {
            bail!(
                "the instruction relocated against {KFUNC} is not a call (code {:#x})",
                insn[0]
            );
        }
        insn[1] = (BPF_PSEUDO_KFUNC_CALL << 4) | (insn[1] & 0x0f);
        insn[2..4].copy_from_slice(&0i16.to_le_bytes());
        insn[4..8].copy_from_slice(&imm.to_le_bytes());
    }
    Ok(linked)
}

/// `BPF_JMP | BPF_CALL` (include/uapi/linux/bpf_common.h, bpf.h).
const BPF_JMP_CALL: u8 = 0x85;

/// include/uapi/linux/bpf.h
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;

/// File offsets of the instructions relocated against [`KFUNC`].
fn kfunc_calls(object: &[u8]) -> Result<Vec<usize>> {
    let file = object::File::parse(object).context("cannot parse the eBPF object")?;
    let mut calls = Vec::new();
    for section in file.sections() {
        let Some((start, _)) = section.file_range() else {
            continue;
        };
        for (offset, relocation) in section.relocations() {
            let RelocationTarget::Symbol(index) = relocation.target() else {
                continue;
            };
            let symbol = file
                .symbol_by_index(index)
                .context("a relocation names a missing symbol")?;
            if symbol.name() == Ok(KFUNC) && symbol.is_undefined() {
                let at = start
                    .checked_add(offset)
                    .and_then(|at| usize::try_from(at).ok())
                    .context("relocation offset out of range")?;
                calls.push(at);
            }
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use aya::programs::Iter;

    use super::*;
    use crate::kernel::{
        EBPF_OBJECT,
        destroy::{DESTROYER, load_closer},
    };

    #[test]
    fn the_object_calls_the_kfunc_once_as_an_extern_call() {
        let calls = kfunc_calls(EBPF_OBJECT).expect("parse the object");
        assert_eq!(calls.len(), 1, "{calls:?}");
        let insn = &EBPF_OBJECT[calls[0]..calls[0] + 8];
        // `call -1` against the undefined symbol, as LLVM leaves an extern call; the regs
        // byte says `src_reg = BPF_PSEUDO_CALL` (1).
        assert_eq!(insn, [0x85, 0x10, 0, 0, 0xff, 0xff, 0xff, 0xff]);

        let linked = link_kfunc_calls(EBPF_OBJECT, 4242, None).expect("link");
        let insn = &linked.bytes()[calls[0]..calls[0] + 8];
        assert_eq!(insn[..4], [0x85, 0x20, 0, 0]);
        assert_eq!(
            i32::from_le_bytes(insn[4..].try_into().expect("4 bytes")),
            4242
        );
        // Nothing else moved.
        let changed = EBPF_OBJECT
            .iter()
            .zip(linked.bytes())
            .filter(|(a, b)| a != b)
            .count();
        assert!(changed <= 5, "{changed} bytes changed");
        assert_eq!(linked.bytes().len(), EBPF_OBJECT.len());
    }

    /// What a kernel without the kfunc gets: aya loads the object (the other programs work),
    /// and only `destroy_sockets` is refused, by the verifier.
    #[test]
    #[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn without_the_kfunc_the_rest_of_the_object_still_loads() {
        if !rustix::process::geteuid().is_root() {
            crate::test_skip::skip(
                "without_the_kfunc_the_rest_of_the_object_still_loads",
                "needs root (BPF)",
            );
            return;
        }
        let btf = aya::Btf::from_sys_fs().expect("kernel BTF");
        let offsets = crate::kernel::btf::Btf::from_file(std::path::Path::new(
            crate::kernel::btf::VMLINUX_BTF,
        ))
        .and_then(|btf| btf.kernel_offsets())
        .expect("offsets");
        // Id 0 is what libbpf writes for a missing weak kfunc: the verifier accepts it only
        // in dead code (here 6.18 stops at the call's unset R0).
        let linked =
            link_kfunc_calls(EBPF_OBJECT, 0, Some("no kfunc".into())).expect("link with id 0");
        let mut ebpf = aya::EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("KERNEL_OFFSETS", &offsets, true)
            .load(linked.bytes())
            .expect("aya loads the object");
        let closer = load_closer(&mut ebpf, &btf, None).expect("maps");
        let problem = closer
            .problem
            .expect("the verifier refuses a call to BTF id 0");
        assert!(
            problem.contains(&format!("cannot load {DESTROYER}")),
            "{problem}"
        );
        let walker: &mut Iter = ebpf
            .program_mut("seed_established_tcp")
            .expect("walker")
            .try_into()
            .expect("iterator");
        walker.load("tcp", &btf).expect("the walker still loads");
    }
}
