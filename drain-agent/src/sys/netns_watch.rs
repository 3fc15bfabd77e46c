//! Noticing new and removed named network namespaces at once: inotify on the directories
//! where `ip netns add`, containerd and CRI-O name them (`/run/netns`, `/var/run/netns`).
//! Namespaces of processes have no file event; the pod listener manager rescans `/proc`
//! every second for those, and to cover a directory that did not exist yet.
//!
//! The `libc` inotify calls, not a crate: three calls and one read loop.

use std::{
    collections::BTreeSet,
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use tokio::io::unix::AsyncFd;

/// The directories watched (`/var/run` is usually a link to `/run`: watched once).
pub const WATCHED_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// An inotify instance watching the namespace directories that exist.
pub struct NetnsWatch {
    fd: AsyncFd<OwnedFd>,
    /// Directories watched already (canonical paths).
    watched: BTreeSet<PathBuf>,
}

impl NetnsWatch {
    /// An inotify instance; call [`NetnsWatch::watch_dirs`] to add the directories.
    pub fn new() -> Result<Self> {
        // SAFETY: inotify_init1 takes flags only; the fd is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("inotify_init1 failed");
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an OwnedFd's descriptor stays open and the same until the AsyncFd (which
        // owns it) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|problem| problem.into_parts().1)
            .context("cannot register the inotify descriptor")?;
        let mut watch = Self {
            fd,
            watched: BTreeSet::new(),
        };
        watch.watch_dirs();
        Ok(watch)
    }

    /// Adds a watch on each namespace directory that exists and is not watched yet; called
    /// again on every rescan, so a directory created later (the first `ip netns add`) is
    /// watched from then on.
    pub fn watch_dirs(&mut self) {
        for dir in WATCHED_DIRS {
            let Ok(canonical) = std::fs::canonicalize(dir) else {
                continue;
            };
            if self.watched.contains(&canonical) {
                continue;
            }
            match self.add(&canonical) {
                Ok(()) => {
                    log::debug!("watching {} for network namespaces", canonical.display());
                    self.watched.insert(canonical);
                }
                Err(problem) => log::debug!("{problem:#}"),
            }
        }
    }

    fn add(&self, dir: &Path) -> Result<()> {
        let path = CString::new(dir.as_os_str().as_bytes()).context("path with a NUL")?;
        let mask = libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE_SELF
            | libc::IN_ONLYDIR;
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        let wd =
            unsafe { libc::inotify_add_watch(self.fd.get_ref().as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot watch {}", dir.display()));
        }
        Ok(())
    }

    /// Waits until something happened in a watched directory, and consumes the events
    /// (which ones does not matter: the caller rescans). A deleted directory is forgotten,
    /// to be watched again once it exists.
    pub async fn changed(&mut self) -> Result<()> {
        loop {
            let mut guard = self.fd.readable().await.context("inotify")?;
            let mut buffer = [0u8; 4096];
            let mut got_any = false;
            let mut dir_gone = false;
            loop {
                let fd = guard.get_inner().as_raw_fd();
                // SAFETY: reading into a buffer we own, at most its length.
                let read = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
                if read > 0 {
                    got_any = true;
                    dir_gone |= has_dir_gone(&buffer[..read.unsigned_abs()]);
                    continue;
                }
                let problem = std::io::Error::last_os_error();
                if read < 0 && problem.kind() == std::io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    break;
                }
                return Err(problem).context("cannot read inotify events");
            }
            if dir_gone {
                self.watched.clear();
                self.watch_dirs();
            }
            if got_any {
                return Ok(());
            }
        }
    }
}

/// Whether a buffer of inotify events holds IN_DELETE_SELF or IN_IGNORED (a watched
/// directory went away).
fn has_dir_gone(events: &[u8]) -> bool {
    let header = std::mem::size_of::<libc::inotify_event>();
    let mut offset = 0;
    while offset + header <= events.len() {
        // SAFETY: at least a header's bytes are left; read unaligned from the byte buffer.
        let event = unsafe {
            std::ptr::read_unaligned(events[offset..].as_ptr().cast::<libc::inotify_event>())
        };
        if event.mask & (libc::IN_DELETE_SELF | libc::IN_IGNORED) != 0 {
            return true;
        }
        offset += header + event.len as usize;
    }
    false
}
