//! Kernel state that outlives the agent: the handler's link and the maps it counts into,
//! pinned under bpffs, so counting goes on while no agent runs and the next agent adopts
//! the counts instead of rebuilding them (INVARIANTS.md, "Kernel state that outlives the
//! agent").
//!
//! The pin directory (`--pin-dir`, `/sys/fs/bpf/drain-agent` by default) holds one
//! subdirectory per *layout*: a hash of the embedded eBPF object and of every choice that
//! shapes its maps or what the handler counts ([`layout_name`]). Inside: each map of
//! [`SHARED_MAPS`] under its name, the totals of reclaimed endpoints ([`RECLAIMED`]), the
//! handler program (`handler-<attach method>`) and its link (`link`, pinned last: a layout
//! without it is incomplete and never adopted).
//!
//! Ownership is a `flock(LOCK_EX)` on the pin directory, held for the agent's lifetime
//! (the kernel drops it when the process ends, however it ends). Only the holder adopts
//! or replaces pins; an agent that cannot get the lock (another one still runs) counts
//! with state of its own, unpinned, and replaces the pins when it gets the lock.

mod bpffs;
mod objects;

use std::{
    fs::{self, File},
    io,
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use rustix::fs::FlockOperation;

use self::bpffs::{check_safe, make};
use self::objects::obj_pin;
pub(super) use self::objects::{check_handler_maps, link_fd_by_id, map_id, obj_get};
use super::AttachMethod;

/// The pin directory when `--pin-dir` is not given.
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/drain-agent";
/// Where bpffs is mounted (by the agent if nothing is).
const BPFFS: &str = "/sys/fs/bpf";
/// `statfs.f_type` of bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The handler's link, pinned last.
const LINK: &str = "link";
/// Bumped when the meaning of a pinned layout changes in a way the object bytes do not show.
/// v2: [`RECLAIMED`] is pinned too (a v1 layout's counts, adopted without it, would have
/// lost every reclaimed endpoint's totals).
const LAYOUT_VERSION: &str = "v2";
/// The totals of reclaimed endpoints (`kernel/reclaimed.rs`): a map no program uses, pinned
/// with the counting state so that an adopting agent goes on from them.
pub(super) const RECLAIMED: &str = "RECLAIMED";
/// How often an agent that found the pin directory locked tries again.
const LOCK_RETRY: Duration = Duration::from_millis(250);

/// Every map the state-change handler reads or writes: the counting state, shared by the
/// pinned handler and whoever adopts it. Exactly the maps the handler's relocations name
/// (checked at run time against the loaded handler, [`check_handler_maps`]); the maps only
/// the walker, the forgetter, the closer and the steering programs use are per agent.
pub(super) const SHARED_MAPS: [&str; 16] = [
    "SOCKETS",
    "COUNTS",
    "PORT_TOTALS",
    "TRACKED_PORTS",
    "DURATIONS",
    "ERRORS",
    "EVENTS",
    "WATCHED_PORTS",
    "RETIRING",
    "RETIRING_PORTS",
    "FORGETTING",
    "FORGETTING_NOW",
    "OWN_ENDPOINTS",
    "OWN_PORTS",
    "POD_LISTENERS",
    "POD_LISTEN_COUNTS",
];

/// Where the agent's counting state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The pinned state of an earlier agent with the same layout: its handler kept counting.
    Adopted,
    /// Loaded by this agent, seeded by its walk.
    New,
}

impl Origin {
    /// The `origin` label of `drain_agent_kernel_state`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Adopted => "adopted",
            Self::New => "new",
        }
    }
}

/// The agent's kernel state, for logs and `/metrics`.
#[derive(Debug)]
pub struct KernelState {
    pub origin: Origin,
    /// Whether the state is pinned (it outlives the agent); becomes true later for an agent
    /// that waited for the lock.
    pinned: AtomicBool,
}

impl KernelState {
    pub(super) const fn new(origin: Origin, pinned: bool) -> Self {
        Self {
            origin,
            pinned: AtomicBool::new(pinned),
        }
    }

    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }
}

/// The name of the layout directory: FNV-1a over the object's bytes and `facts` (the
/// choices that shape maps or what the handler counts). Not a security boundary: the pin
/// directory is root's alone; a new object or other sizes simply find no match.
pub(super) fn layout_name(object: &[u8], facts: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in object
        .iter()
        .chain([0].iter())
        .chain(facts.as_bytes())
        .chain(LAYOUT_VERSION.as_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{LAYOUT_VERSION}-{hash:016x}")
}

/// The pin directory, opened and checked.
pub(super) struct PinDir {
    root: PathBuf,
    /// The directory itself, open: its `flock` is the ownership.
    file: File,
    layout: String,
}

/// What a pinned layout directory offers for adoption.
pub(super) struct Adoptable {
    pub dir: PathBuf,
    pub method: AttachMethod,
}

/// This agent's handler and maps, to pin.
pub(super) struct Publication {
    pub maps: Vec<(&'static str, OwnedFd)>,
    pub handler: OwnedFd,
    pub link: OwnedFd,
    pub method: AttachMethod,
}

impl PinDir {
    /// Opens (and makes, mounting bpffs at /sys/fs/bpf when nothing is mounted there) the
    /// pin directory `root`. `Ok(None)`: it cannot be made here (read-only /sys, no
    /// permission to mount), said with a WARN: the agent runs unpinned. An error: the
    /// directory exists but is not safe to use (not bpffs, not root's, open to others).
    pub(super) fn open(root: &Path, layout: String) -> Result<Option<Self>> {
        if let Err(problem) = make(root) {
            warn!(
                "kernel state will not outlive the agent (counting stops while it is down, and the next agent seeds afresh): {problem:#}"
            );
            return Ok(None);
        }
        check_safe(root)?;
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(root)
            .with_context(|| format!("cannot open the pin directory {}", root.display()))?;
        Ok(Some(Self {
            root: root.to_path_buf(),
            file,
            layout,
        }))
    }

    /// Takes the lock if no other agent holds it.
    pub(super) fn try_lock(&self) -> Result<bool> {
        match rustix::fs::flock(&self.file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
            Err(error) => Err(io::Error::from(error))
                .with_context(|| format!("cannot lock {}", self.root.display())),
        }
    }

    fn layout_dir(&self) -> PathBuf {
        self.root.join(&self.layout)
    }

    pub(super) fn root_display(&self) -> std::path::Display<'_> {
        self.root.display()
    }

    pub(super) fn layout_display(&self) -> String {
        self.layout_dir().display().to_string()
    }

    /// The complete pinned state of this layout, if there is one (check with the lock held).
    pub(super) fn adoptable(&self) -> Option<Adoptable> {
        let dir = self.layout_dir();
        if !dir.join(LINK).exists()
            || SHARED_MAPS
                .iter()
                .chain([&RECLAIMED])
                .any(|name| !dir.join(name).exists())
        {
            return None;
        }
        let method = AttachMethod::ALL
            .into_iter()
            .find(|method| dir.join(program_pin(*method)).exists())?;
        Some(Adoptable { dir, method })
    }

    /// Why nothing is adopted (for the log), given that [`PinDir::adoptable`] said so.
    pub(super) fn why_not_adopted(&self) -> String {
        let others = self.others();
        if self.layout_dir().exists() {
            "the pinned state of this layout is incomplete (an agent stopped while pinning)"
                .to_owned()
        } else if others.is_empty() {
            "nothing is pinned yet".to_owned()
        } else {
            format!(
                "the pinned state is of another layout (another version, or other sizes or attach options): {}",
                others.join(", ")
            )
        }
    }

    /// Entries of the pin directory other than this layout's.
    fn others(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| *name != self.layout)
            .collect()
    }

    /// Pins `state` as this layout's, replacing what is there (its handler detaches when its
    /// last pin goes). Call with the lock held and this agent's handler attached.
    pub(super) fn publish(&self, state: &Publication) -> Result<()> {
        let dir = self.layout_dir();
        if dir.exists() {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove the old pins at {}", dir.display()))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot make {}", dir.display()))?;
        let pinned = (|| -> Result<()> {
            for (name, fd) in &state.maps {
                obj_pin(fd.as_fd(), &dir.join(name))
                    .with_context(|| format!("cannot pin map {name}"))?;
            }
            obj_pin(state.handler.as_fd(), &dir.join(program_pin(state.method)))
                .context("cannot pin the handler")?;
            // Last: a layout with its link is complete.
            obj_pin(state.link.as_fd(), &dir.join(LINK)).context("cannot pin the handler's link")
        })();
        if let Err(problem) = pinned {
            let _ = fs::remove_dir_all(&dir);
            return Err(problem);
        }
        Ok(())
    }

    /// Removes every layout but this one (after this agent's handler is attached, or its
    /// adopted one is in place): their handlers detach when their last pin goes, instead of
    /// counting on into maps nobody reads.
    pub(super) fn remove_others(&self) {
        for name in self.others() {
            let path = self.root.join(&name);
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => info!("removed stale pinned kernel state {}", path.display()),
                Err(problem) => warn!("cannot remove {}: {problem}", path.display()),
            }
        }
    }
}

/// The pin of the handler program attached with `method`.
pub(super) fn program_pin(method: AttachMethod) -> String {
    format!("handler-{}", method.name())
}

/// Waits (on a thread) until the pin directory's lock is free, then pins `state` there:
/// the agent that held it is gone. Stops trying once `stop` is set (the kernel state was
/// dropped: then `state`'s link must not outlive it).
pub(super) fn publish_when_free(
    pins: PinDir,
    state: Publication,
    status: Arc<KernelState>,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Option<PinDir>>>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("pin-lock".to_owned())
        .spawn(move || {
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match pins.try_lock() {
                    Ok(true) => break,
                    Ok(false) => std::thread::sleep(LOCK_RETRY),
                    Err(problem) => {
                        warn!("kernel state will not be pinned: {problem:#}");
                        return;
                    }
                }
            }
            match pins.publish(&state) {
                Ok(()) => {
                    status.pinned.store(true, Ordering::Relaxed);
                    info!(
                        "the agent that held {} is gone: this agent's kernel state is pinned there now (the next agent adopts it)",
                        pins.root.display()
                    );
                }
                Err(problem) => warn!("cannot pin the kernel state: {problem:#}"),
            }
            pins.remove_others();
            // The lock is held as long as the kernel state (the agent's life).
            *held.lock().unwrap_or_else(PoisonError::into_inner) = Some(pins);
            drop(state);
        })
        .context("cannot start the pin-lock thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_differ_by_object_and_by_facts() {
        let one = layout_name(b"object", "max_connections=1");
        assert_eq!(one, layout_name(b"object", "max_connections=1"));
        assert_ne!(one, layout_name(b"object", "max_connections=2"));
        assert_ne!(one, layout_name(b"object2", "max_connections=1"));
        // The boundary between object and facts is part of the hash.
        assert_ne!(layout_name(b"ab", "c"), layout_name(b"a", "bc"));
        assert!(one.starts_with("v2-") && one.len() == 3 + 16, "{one}");
    }

    #[test]
    fn origins_have_their_metric_labels() {
        assert_eq!(Origin::Adopted.name(), "adopted");
        assert_eq!(Origin::New.name(), "new");
    }
}
