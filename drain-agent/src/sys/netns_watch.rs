//! Noticing new and removed named network namespaces at once: inotify on the directories
//! where `ip netns add`, containerd and CRI-O name them (`/run/netns`, `/var/run/netns`).
//! Namespaces of processes have no file event; the pod listener manager rescans `/proc`
//! every second for those, and to cover a directory that did not exist yet.
//!
//! rustix's inotify calls, not a watcher crate: three calls and one read loop.

use std::{
    collections::BTreeSet,
    mem::MaybeUninit,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use rustix::{
    fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags},
    io::Errno,
};
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
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)
            .map_err(std::io::Error::from)
            .context("inotify_init1 failed")?;
        // SAFETY: an OwnedFd's descriptor stays open and the same until the AsyncFd (which
        // owns it) is dropped. (tokio's safe `with_interest` is deprecated as unsound for
        // lack of I/O safety: tokio-rs/tokio#8587; this is its replacement.)
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
        let mask = WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::MOVED_TO
            | WatchFlags::MOVED_FROM
            | WatchFlags::DELETE_SELF
            | WatchFlags::ONLYDIR;
        inotify::add_watch(self.fd.get_ref(), dir, mask)
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
        Ok(())
    }

    /// Waits until something happened in a watched directory, and consumes the events
    /// (which ones does not matter: the caller rescans). A deleted directory is forgotten,
    /// to be watched again once it exists.
    pub async fn changed(&mut self) -> Result<()> {
        loop {
            let mut guard = self.fd.readable().await.context("inotify")?;
            let mut buffer = [MaybeUninit::<u8>::uninit(); 4096];
            let mut got_any = false;
            let mut dir_gone = false;
            let mut events = inotify::Reader::new(guard.get_inner(), &mut buffer);
            let problem = loop {
                match events.next() {
                    Ok(event) => {
                        got_any = true;
                        // IN_DELETE_SELF or IN_IGNORED: a watched directory went away.
                        dir_gone |= event
                            .events()
                            .intersects(ReadFlags::DELETE_SELF | ReadFlags::IGNORED);
                    }
                    Err(Errno::WOULDBLOCK) => break None,
                    Err(problem) => break Some(problem),
                }
            };
            if let Some(problem) = problem {
                return Err(std::io::Error::from(problem)).context("cannot read inotify events");
            }
            guard.clear_ready();
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
