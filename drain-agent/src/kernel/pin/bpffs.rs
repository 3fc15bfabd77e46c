//! bpffs for the pin directory: mounted at `/sys/fs/bpf` when nothing is there, and a pin
//! directory checked before the agent trusts what is pinned in it.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
};

use anyhow::{Context as _, Result, ensure};
use log::info;
use rustix::{fs::FlockOperation, mount::MountFlags};

use super::{BPF_FS_MAGIC, BPFFS};

/// Makes `root` (0700) and mounts bpffs at [`BPFFS`] first if `root` is under it and
/// nothing is mounted there.
pub(super) fn make(root: &Path) -> Result<()> {
    if root.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
        mount_bpffs()?;
    }
    match fs::DirBuilder::new().mode(0o700).create(root) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => {
            Err(error).with_context(|| format!("cannot make the pin directory {}", root.display()))
        }
    }
}

/// Mounts bpffs at [`BPFFS`], unless another process did meanwhile. Two agents starting at
/// once would otherwise both mount it, the second instance hiding the first and the pins
/// in it (their handlers attached, out of reach of `rm -r`). So the check and the mount are
/// made under a `flock` of the mount point as opened before the mount (sysfs's directory):
/// whoever waited finds bpffs there afterwards.
fn mount_bpffs() -> Result<()> {
    let mount_point = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(BPFFS)
        .with_context(|| format!("cannot open {BPFFS}"))?;
    // Released when `mount_point` is closed.
    rustix::fs::flock(&mount_point, FlockOperation::LockExclusive)
        .map_err(io::Error::from)
        .with_context(|| format!("cannot lock {BPFFS}"))?;
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(());
    }
    info!("bpffs is not mounted; mounting it at {BPFFS}");
    rustix::mount::mount("bpf", BPFFS, "bpf", MountFlags::empty(), c"mode=0700")
        .map_err(io::Error::from)
        .with_context(|| format!("cannot mount bpffs at {BPFFS}"))
}

/// Refuses a pin directory another user could have prepared or can write into: pins there
/// are programs and maps the agent would run and trust.
pub(super) fn check_safe(root: &Path) -> Result<()> {
    let shown = root.display();
    let meta = fs::symlink_metadata(root).with_context(|| format!("cannot stat {shown}"))?;
    ensure!(
        meta.is_dir(),
        "the pin directory {shown} is not a directory (a link?); remove it or choose another with --pin-dir (or --no-pin)"
    );
    ensure!(
        is_bpffs(root),
        "the pin directory {shown} is not on bpffs; choose one under {BPFFS} with --pin-dir (or --no-pin)"
    );
    ensure!(
        meta.uid() == 0,
        "the pin directory {shown} is owned by uid {}, not root; remove it (rm -r {shown}) or choose another with --pin-dir",
        meta.uid()
    );
    ensure!(
        meta.mode() & 0o077 == 0,
        "the pin directory {shown} is open to other users (mode {:o}); it must be 0700 (chmod 700 {shown})",
        meta.mode() & 0o7777
    );
    Ok(())
}

/// `f_type` is signed in glibc's `struct statfs` and unsigned in musl's.
fn is_bpf_magic<T: Into<i128>>(f_type: T) -> bool {
    f_type.into() == i128::from(BPF_FS_MAGIC)
}

fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|stat| is_bpf_magic(stat.f_type))
}
