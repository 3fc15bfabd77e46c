//! The one door to the raw `bpf()` syscall, for what aya 0.14 does not offer: programs the
//! agent assembles itself (`steer.rs`, `reuseport.rs`: aya loads the programs of its object
//! once, and these are a few instructions each, built at run time), `pin/`'s pins and
//! object lookups, maps of the agent's own outside the object (`reclaimed.rs`, `rcu.rs`), and object info (`BPF_OBJ_GET_INFO_BY_FD`: a program's maps, its skipped
//! runs), which `sk_lookup` programs a namespace has (`steer.rs`, `BPF_PROG_QUERY`), and a
//! whole array read at once (`BPF_MAP_LOOKUP_BATCH`). The shared pieces: the syscall, zeroed kernel structs, `BPF_PROG_LOAD` with the
//! verifier's last line in the error.
//!
//! Callers only *write* members of the `bpf_attr` union (safe in Rust); what the kernel
//! answers comes back in the syscall's return value or in a plain struct or array it
//! filled.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};
use aya_obj::generated::{
    bpf_attach_type, bpf_attr, bpf_cmd, bpf_map_info, bpf_map_type, bpf_prog_info, bpf_prog_type,
};

/// A kernel struct for which all-zero bytes are a valid value.
///
/// # Safety
/// Implement only for plain C structs and unions of integers and arrays of integers.
unsafe trait Zeroable: Sized {}
// SAFETY: bindgen's C union of integer structs and arrays (include/uapi/linux/bpf.h).
unsafe impl Zeroable for bpf_attr {}
// SAFETY: a C struct of integers and arrays of integers.
unsafe impl Zeroable for bpf_prog_info {}
// SAFETY: as above.
unsafe impl Zeroable for bpf_map_info {}

/// An all-zero `T`: what the kernel expects in every member a command does not use.
fn zeroed<T: Zeroable>() -> T {
    // SAFETY: `T: Zeroable`, so all-zero bytes are a valid `T`.
    unsafe { std::mem::zeroed() }
}

/// The `bpf()` syscall; its return value as the kernel gave it (an fd for some commands).
///
/// The kernel reads and writes through the pointer members of `attr`: every caller (in
/// this file, `pin/objects.rs` and `steer.rs`, nowhere else) points them only at buffers
/// of the size it gives that outlive the call.
pub(super) fn bpf_call(command: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a whole `bpf_attr` of the size we pass, valid for the kernel to
    // read and write; its pointer members point at live buffers (see above).
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

/// A `bpf_attr` with every member zero (the kernel refuses nonzero bytes past a command's
/// members).
pub(super) fn zeroed_attr() -> bpf_attr {
    zeroed()
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info`, which says how much the kernel may fill.
fn obj_info<T: Zeroable>(fd: BorrowedFd<'_>, info: &mut T) -> Result<()> {
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = u32::try_from(fd.as_raw_fd()).context("bad fd")?;
    attr.info.info_len = u32::try_from(size_of::<T>()).context("info size")?;
    attr.info.info = std::ptr::from_mut(info) as u64;
    bpf_call(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(())
}

/// The kernel's `bpf_map_info` of the map `fd`.
pub(super) fn map_info(fd: BorrowedFd<'_>) -> Result<bpf_map_info> {
    let mut info: bpf_map_info = zeroed();
    obj_info(fd, &mut info)?;
    Ok(info)
}

/// The kernel's `bpf_prog_info` of the program `fd`, with the ids of the maps it uses in
/// `map_ids` (as many as fit; `nr_map_ids` says how many it uses).
pub(super) fn prog_info(fd: BorrowedFd<'_>, map_ids: &mut [u32]) -> Result<bpf_prog_info> {
    let mut info: bpf_prog_info = zeroed();
    if !map_ids.is_empty() {
        info.nr_map_ids = u32::try_from(map_ids.len()).context("map count")?;
        info.map_ids = map_ids.as_mut_ptr() as u64;
    }
    obj_info(fd, &mut info)?;
    Ok(info)
}

/// Every value of the array map `fd` (`values.len() / value_size` entries, in index order)
/// in one `BPF_MAP_LOOKUP_BATCH` (Linux 5.6; the agent needs 5.9), where a lookup per entry
/// is a system call each.
pub(super) fn array_values(fd: BorrowedFd<'_>, value_size: usize, values: &mut [u8]) -> Result<()> {
    anyhow::ensure!(
        value_size > 0 && values.len().is_multiple_of(value_size),
        "a buffer of whole values"
    );
    let entries = values.len() / value_size;
    // The kernel writes `count` keys and values of the map's own sizes: the buffers are
    // only as large as the sizes given here, so those must be the map's.
    let info = map_info(fd)?;
    anyhow::ensure!(
        (info.key_size, info.value_size, info.max_entries)
            == (
                u32::try_from(size_of::<u32>()).context("key size")?,
                u32::try_from(value_size).context("value size")?,
                u32::try_from(entries).context("too many entries")?,
            ),
        "the map is no array of {entries} values of {value_size} bytes"
    );
    let mut keys = vec![u32::MAX; entries];
    let mut next = 0_u32;
    let mut attr = zeroed_attr();
    // No `in_batch`: from the first entry. The kernel stops with success only once it has
    // copied `count` entries (fewer, at the map's end, is ENOENT).
    attr.batch.out_batch = std::ptr::from_mut(&mut next) as u64;
    attr.batch.keys = keys.as_mut_ptr() as u64;
    attr.batch.values = values.as_mut_ptr() as u64;
    attr.batch.count = u32::try_from(entries).context("too many entries")?;
    attr.batch.map_fd = u32::try_from(fd.as_raw_fd()).context("bad fd")?;
    bpf_call(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr).context("BPF_MAP_LOOKUP_BATCH")?;
    // An array's entries come in index order; anything else is no array of that size.
    if !(0_u32..).zip(&keys).all(|(index, key)| index == *key) {
        bail!("BPF_MAP_LOOKUP_BATCH gave the entries out of order");
    }
    Ok(())
}

/// What a map made by [`map_create`] is.
pub(super) struct MapKind<'a> {
    pub map_type: bpf_map_type,
    /// For a map of maps: a map like those it holds.
    pub inner_map: Option<BorrowedFd<'a>>,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    /// For `bpftool map` (under 16 bytes).
    pub name: &'static [u8],
}

/// `BPF_MAP_CREATE` of a map no program uses (`reclaimed.rs`, `rcu.rs`).
pub(super) fn map_create(kind: &MapKind<'_>) -> Result<OwnedFd> {
    anyhow::ensure!(kind.name.len() < 16, "map name too long");
    let mut map_name = [0 as libc::c_char; 16];
    for (to, from) in map_name.iter_mut().zip(kind.name.iter()) {
        *to = *from as libc::c_char;
    }
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_1.map_type = kind.map_type as u32;
    attr.__bindgen_anon_1.key_size = kind.key_size;
    attr.__bindgen_anon_1.value_size = kind.value_size;
    attr.__bindgen_anon_1.max_entries = kind.max_entries;
    attr.__bindgen_anon_1.map_flags = kind.flags;
    attr.__bindgen_anon_1.map_name = map_name;
    if let Some(inner) = kind.inner_map {
        attr.__bindgen_anon_1.inner_map_fd = u32::try_from(inner.as_raw_fd()).context("bad fd")?;
    }
    bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE")
}

/// `BPF_MAP_UPDATE_ELEM` (`BPF_ANY`) of the map `fd` with a key and a value of 4 bytes each.
pub(super) fn map_update_u32(fd: BorrowedFd<'_>, key: u32, value: u32) -> Result<()> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2.map_fd = u32::try_from(fd.as_raw_fd()).context("bad fd")?;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(&key) as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_ref(&value) as u64;
    attr.__bindgen_anon_2.flags = u64::from(aya_obj::generated::BPF_ANY);
    bpf_call(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).context("BPF_MAP_UPDATE_ELEM")?;
    Ok(())
}

/// `BPF_MAP_LOOKUP_ELEM` of the map `fd` with a key of 4 bytes and a value of 8: `None` for
/// a key it does not hold.
pub(super) fn map_lookup_u32_i64(fd: BorrowedFd<'_>, key: u32) -> Result<Option<i64>> {
    let mut value: i64 = 0;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2.map_fd = u32::try_from(fd.as_raw_fd()).context("bad fd")?;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(&key) as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_mut(&mut value) as u64;
    match bpf_call(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(error) => Err(error).context("BPF_MAP_LOOKUP_ELEM"),
    }
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
    let mut prog_name = [0 as libc::c_char; 16];
    for (to, from) in prog_name.iter_mut().zip(kind.name.iter()) {
        *to = *from as libc::c_char;
    }
    let mut attr = zeroed_attr();
    // The members BPF_PROG_LOAD reads; the pointers outlive the call.
    attr.__bindgen_anon_3.prog_type = kind.prog_type as u32;
    attr.__bindgen_anon_3.expected_attach_type = kind.attach_type as u32;
    attr.__bindgen_anon_3.insn_cnt = u32::try_from(insns.len()).context("too many instructions")?;
    attr.__bindgen_anon_3.insns = insns.as_ptr() as u64;
    attr.__bindgen_anon_3.license = license.as_ptr() as u64;
    attr.__bindgen_anon_3.log_level = 1;
    attr.__bindgen_anon_3.log_size = u32::try_from(log.len()).context("log size")?;
    attr.__bindgen_anon_3.log_buf = log.as_mut_ptr() as u64;
    attr.__bindgen_anon_3.prog_name = prog_name;
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
