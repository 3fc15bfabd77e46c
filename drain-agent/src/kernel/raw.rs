//! Programs the agent assembles itself (`steer.rs`, `reuseport.rs`) are loaded with the
//! raw `bpf()` syscall: aya 0.14 loads the programs of its object once, and these are a
//! few instructions each, built at run time. The shared pieces: the syscall (also for
//! `pin.rs`'s pins and object lookups), a zeroed `bpf_attr`, and `BPF_PROG_LOAD` with the
//! verifier's last line in the error.

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};

/// The `bpf()` syscall; its return value as the kernel gave it (an fd for some commands).
pub(super) fn bpf_call(command: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
    // SAFETY: the bpf syscall with a valid attr of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// The `bpf()` syscall for a command that returns a new fd, owned by the caller.
pub(super) fn bpf(command: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    let rc = bpf_call(command, attr)?;
    let fd = i32::try_from(rc).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: a new fd from the kernel, owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn zeroed_attr() -> bpf_attr {
    // SAFETY: a C union of integers and arrays; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// What to load: the program's type, expected attach type and name (for `bpftool prog`).
pub(super) struct ProgramKind {
    pub prog_type: bpf_prog_type,
    pub attach_type: bpf_attach_type,
    pub name: &'static [u8],
    /// Said in the error when the load fails ("an sk_lookup program (Linux >= 5.9 needed)").
    pub what: &'static str,
}

/// `BPF_PROG_LOAD` of `insns`; a refusal names the verifier's last line.
pub(super) fn load(kind: &ProgramKind, insns: &[u64]) -> Result<OwnedFd> {
    // BPF_OBJ_NAME_LEN (16) with its NUL: a longer name is refused with EINVAL.
    anyhow::ensure!(kind.name.len() < 16, "program name too long");
    let mut log = vec![0u8; 16 * 1024];
    let license = c"GPL";
    let mut attr = zeroed_attr();
    // SAFETY: writing the members BPF_PROG_LOAD reads; the pointers outlive the call.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = kind.prog_type as u32;
        load.expected_attach_type = kind.attach_type as u32;
        load.insn_cnt = u32::try_from(insns.len()).context("too many instructions")?;
        load.insns = insns.as_ptr() as u64;
        load.license = license.as_ptr() as u64;
        load.log_level = 1;
        load.log_size = u32::try_from(log.len()).context("log size")?;
        load.log_buf = log.as_mut_ptr() as u64;
        for (to, from) in load.prog_name.iter_mut().zip(kind.name.iter()) {
            *to = *from as libc::c_char;
        }
    }
    match bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(error) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let verifier = String::from_utf8_lossy(&log[..end]);
            let last = verifier.lines().rev().find(|line| !line.trim().is_empty());
            bail!(
                "cannot load {}: {error}{}",
                kind.what,
                last.map(|line| format!(" ({line})")).unwrap_or_default()
            )
        }
    }
}
