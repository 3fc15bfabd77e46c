//! The pinned objects through the raw `bpf()` syscall (`raw.rs`): pin, open a pin, a
//! link by id, and the maps a program uses (checked before a handler is pinned or adopted).

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result, ensure};
use aya_obj::generated::bpf_cmd;

use super::super::raw::{self, zeroed_attr};

/// Checks that the handler `program` reads and writes no map but `shared` and the object's
/// read-only data (`allowed_other`): a handler that outlives its agent must write only
/// into maps the next agent adopts.
pub(in crate::kernel) fn check_handler_maps(
    program: BorrowedFd<'_>,
    shared: &[u32],
    allowed_other: usize,
) -> Result<()> {
    let used = prog_map_ids(program)?;
    let others = used.iter().filter(|id| !shared.contains(id)).count();
    ensure!(
        others <= allowed_other && shared.iter().all(|id| used.contains(id)),
        "the handler uses {} maps, {others} of them not pinned (expected {} pinned and at most {allowed_other} read-only data)",
        used.len(),
        shared.len()
    );
    Ok(())
}

/// `BPF_OBJ_PIN`: pins the map, program or link `fd` at `path` (on bpffs).
pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let name = CString::new(path.as_os_str().as_bytes()).context("pin path")?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = name.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = u32::try_from(fd.as_raw_fd()).context("bad fd")?;
    raw::bpf_call(bpf_cmd::BPF_OBJ_PIN, &mut attr)
        .with_context(|| format!("BPF_OBJ_PIN {}", path.display()))?;
    Ok(())
}

/// `BPF_OBJ_GET`: opens what is pinned at `path`.
pub(in crate::kernel) fn obj_get(path: &Path) -> Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes()).context("pin path")?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = name.as_ptr() as u64;
    raw::bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)
        .with_context(|| format!("cannot open the pin {}", path.display()))
}

/// A link's own fd, from its id (`BPF_LINK_GET_FD_BY_ID`).
pub(in crate::kernel) fn link_fd_by_id(id: u32) -> Result<OwnedFd> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
    raw::bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr).context("BPF_LINK_GET_FD_BY_ID")
}

/// The kernel's id of the map `fd`.
pub(in crate::kernel) fn map_id(fd: BorrowedFd<'_>) -> Result<u32> {
    Ok(raw::map_info(fd)?.id)
}

/// The ids of the maps the program `fd` uses.
fn prog_map_ids(fd: BorrowedFd<'_>) -> Result<Vec<u32>> {
    let used = raw::prog_info(fd, &mut [])?.nr_map_ids;
    let mut ids = vec![0u32; used as usize];
    let info = raw::prog_info(fd, &mut ids)?;
    ids.truncate(info.nr_map_ids as usize);
    Ok(ids)
}
