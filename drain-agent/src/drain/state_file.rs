//! The agent's state file (`run --state-dir DIR`: `DIR/drains.json`): what must outlive a
//! restart of the agent (drains in progress, `/health` gates held after a drain), written
//! whole and atomically, read back at start. Generic over what it holds: it does not import
//! the drains that use it (as the journal).
//!
//! The directory and the file are trusted for nothing (the agent runs as root on a shared
//! node; SECURITY.md), as the journal's path is not: the directory is created 0700 when
//! absent and must be a directory, not a link; the file is opened without following a
//! link (`O_NOFOLLOW`) and used only when it is a regular file (a link, FIFO or device
//! there stops the start, naming it); new files are 0600; at most [`MAX_BYTES`] is read.
//! A write goes to `drains.json.tmp` (removed first, then created with `O_EXCL |
//! O_NOFOLLOW`, so a link planted there is never followed), is synced, renamed over the
//! file (`rename(2)` replaces a name, never follows it) and the directory synced: after a
//! crash the file is the old state or the new one, whole.
//!
//! A file that cannot be read as this version's state (another version: a rollback from a
//! later release; torn by something else, edited) is never overwritten nor removed: the
//! agent that would write over it (or fold it in) sets it aside under a name saying so
//! ([`StateFile::read_owned`], [`set_aside_name`]), at most [`SET_ASIDE_MAX`] of them, and
//! says until when it could still gate ([`Unreadable::until_ms`]: its own `until_ms` when it
//! has one, see [`Lasting`], else the agent's longest drain and hold from now). Until then
//! the drains answer every scope "draining" (`Drains::fail_closed`).

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::{Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::drain::untrusted_path::{Access, Named, kind_of, refuse_foreign_owner};

/// The file's name in the state directory.
pub const FILE_NAME: &str = "drains.json";
/// What the agent that is not the writer keeps meanwhile (an upgrade's overlap): its own
/// drains and cancels, so that a crash of it before the writer has gone loses nothing.
pub const NEXT_FILE_NAME: &str = "drains.next.json";
/// Held (`flock`) by the agent that writes [`NEXT_FILE_NAME`]: one at a time, and a file
/// whose lock nobody holds is a crashed agent's, to be taken over.
const NEXT_LOCK_NAME: &str = "drains.next.lock";
/// The layout written, and the only one read back.
pub const VERSION: u32 = 1;
/// The largest file read or written (the drains in progress are bounded by
/// `--max-waiters`, the held gates by `drain::HELD_MAX`: far below this).
pub const MAX_BYTES: u64 = 16 << 20;
/// Files set aside at most ([`set_aside_name`]); past it the one whose gating ends first
/// goes (every scope is gated until the latest end, so that one changes nothing).
pub const SET_ASIDE_MAX: usize = 8;
/// How long an unreadable file gates by default, until [`StateFile::with_longest_gate`]:
/// and the longest a file's own `until_ms` may say (later is taken as damaged).
pub const UNREADABLE_GATE_CAP: Duration = Duration::from_secs(24 * 3600);
/// What comes between the file's name and the version in a set-aside file's name.
const SET_ASIDE_TAG: &str = ".unreadable-v";
/// Mode of the directory the agent creates.
const DIR_MODE: u32 = 0o700;
/// Mode of the files the agent creates.
const FILE_MODE: u32 = 0o600;

/// On disk: the version beside what is kept, and until when anything in it could gate.
///
/// The forward-compatibility rule (ARCHITECTURE.md): every version keeps `version` and
/// `until_ms` here, with these meanings, so that an older agent that cannot read the rest
/// knows how long to fail closed for it.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until_ms: Option<u64>,
    state: T,
}

/// What a kept state says of how long it matters ([`Envelope`]'s `until_ms`).
pub trait Lasting {
    /// Unix time in milliseconds after which nothing in it runs or gates any more.
    fn lasts_until_ms(&self) -> u64;
}

/// What reading a file this agent is about to write over (or fold in and remove) found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<T> {
    /// No file.
    Nothing,
    State(T),
    /// A file this agent cannot read: set aside (or, if that failed, left where it was and
    /// never written over).
    Unreadable(Unreadable),
}

/// A state file this agent could not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Where it is now.
    pub path: PathBuf,
    /// Whether it was moved aside (else it stays at its name, and nothing writes there).
    pub set_aside: bool,
    /// Its version, when that much could be read.
    pub version: Option<u32>,
    /// Unix time in milliseconds until which something in it could still gate.
    pub until_ms: u64,
    /// Why it could not be read.
    pub problem: String,
}

/// `version` and `until_ms` of a file whatever else is in it ([`Envelope`]).
#[derive(Deserialize)]
struct Bounds {
    version: Option<u32>,
    until_ms: Option<u64>,
}

/// The name a file `base` ([`FILE_NAME`], [`NEXT_FILE_NAME`]) of `version` is set aside
/// under at `at_ms` (Unix ms), gating until `until_ms`: e.g.
/// `drains.json.unreadable-v2-at-1700000000000-until-1700000900000`. The end is in the name,
/// so that an agent started later gates until it without reading the file.
pub fn set_aside_name(base: &str, version: Option<u32>, at_ms: u64, until_ms: u64) -> String {
    let version = version.map_or_else(|| "unknown".to_owned(), |version| version.to_string());
    format!("{base}{SET_ASIDE_TAG}{version}-at-{at_ms}-until-{until_ms}")
}

/// A set-aside file's name, read back: when it was set aside and until when it gates.
fn parse_set_aside_name(name: &str) -> Option<(u64, u64)> {
    let rest = [FILE_NAME, NEXT_FILE_NAME]
        .iter()
        .find_map(|base| name.strip_prefix(base)?.strip_prefix(SET_ASIDE_TAG))?;
    let (_version, times) = rest.split_once("-at-")?;
    let (at, until) = times.split_once("-until-")?;
    Some((at.parse().ok()?, until.parse().ok()?))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The state file of one agent.
///
/// One writer at a time: the agent holding `flock(LOCK_EX)` on the directory. During an
/// upgrade two agents run at once (the hand-over, `handover.rs`); the new one restores what
/// the old one saved, and leaves the file to it until it exits (the lock is released with
/// the process, however it ends). Were both to write, each would overwrite the other's
/// drains with its own set, and a drain POSTed to the old agent after the new one started
/// would be lost with the old agent. The new one then takes the lock, merges what the old
/// one left, and writes ([`crate::drain::Drains::take_over_state`]).
///
/// Meanwhile the new agent keeps what is its own (drains POSTed to it, cancels sent to it)
/// in [`NEXT_FILE_NAME`], under a lock of its own: were it to crash before the old agent has
/// gone, the agent started after it takes that file over (a lock nobody holds) and loses
/// none of it. The agent that becomes the writer folds the file into the state and removes
/// it ([`StateFile::retire_next`]).
pub struct StateFile {
    path: PathBuf,
    temp: PathBuf,
    next_path: PathBuf,
    next_temp: PathBuf,
    dir: PathBuf,
    /// Writes are serialised, and each writes the state as it is when it takes the lock,
    /// so the last write on disk is never an older state than another's.
    lock: Mutex<()>,
    /// The directory, open; `flock`ed while this agent is the writer.
    dir_file: File,
    writer: std::sync::atomic::AtomicBool,
    /// The lock of [`NEXT_FILE_NAME`], while this agent holds it: it writes that file (not
    /// the writer), or it has yet to fold and remove one a crashed agent left (the writer).
    next_lock: Mutex<Option<File>>,
    /// Whether the last write left the state on disk behind this agent's, and how many
    /// writes did so; both set under `lock`, so they follow the order of the writes.
    unsaved: std::sync::atomic::AtomicBool,
    failed_writes: std::sync::atomic::AtomicU64,
    /// How long a file this agent cannot read may still gate, from when it is found
    /// (the longest drain and hold this agent allows; [`StateFile::with_longest_gate`]).
    longest_gate: Duration,
    /// An unreadable file that could not be set aside is at the state file's name, or at
    /// the next file's: nothing writes over it or removes it.
    blocked: std::sync::atomic::AtomicBool,
    next_blocked: std::sync::atomic::AtomicBool,
}

/// What one [`StateFile::write_with`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The state is on disk, synced.
    OnDisk,
    /// Nothing to write: the agent is stopping (what is on disk stays).
    Nothing,
    /// [`Role::Neither`]: kept in memory only.
    InMemoryOnly,
}

/// One version of the state file on disk: its inode, size and change time. Every write
/// renames a new file over the name (a new inode), so a state another agent wrote since is
/// a new stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Which file [`StateFile::write_with`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The state file: this agent holds the directory's lock.
    Writer,
    /// [`NEXT_FILE_NAME`]: another agent writes the state file (an upgrade's overlap).
    Next,
    /// Neither: a third agent at once; what it is asked is kept in memory only.
    Neither,
}

/// Which of the two files another agent may be writing: [`StateFile::stamp`] and
/// [`StateFile::read_stamped`] read it, never write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The state file ([`FILE_NAME`]): the writer's, read by the agent beside it.
    State,
    /// [`NEXT_FILE_NAME`]: the agent beside the writer's, read by the writer.
    Next,
}

/// Removes `path` if something is there (never following it: `unlink` removes a name).
fn remove_if_there(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(problem) if problem.kind() != std::io::ErrorKind::NotFound => {
            Err(problem).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn lock_of<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The state file, as its errors name it.
const STATE_FILE: Named = Named {
    what: "the state file",
    advice: |_| " (remove it)",
};

/// Opens `path` for reading only if it is a regular file, never through a link and never
/// blocking on a FIFO ([`Named::open_regular`]).
fn open_regular(path: &Path) -> Result<Option<File>> {
    STATE_FILE.open_regular(path, Access::Read)
}

impl StateFile {
    /// The state file in `dir` (created 0700 if absent). Fails when `dir` is not a
    /// directory of its own (a link, a file) or the file there is not a regular file, so
    /// a bad path stops the start rather than the first drain's answer.
    pub fn open(dir: &Path) -> Result<Self> {
        match fs::symlink_metadata(dir) {
            Err(problem) if problem.kind() == std::io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(dir)
                    .with_context(|| {
                        format!("cannot create the state directory {}", dir.display())
                    })?;
            }
            Err(problem) => {
                return Err(problem)
                    .with_context(|| format!("cannot stat the state directory {}", dir.display()));
            }
            Ok(_) => {}
        }
        let meta = fs::symlink_metadata(dir)
            .with_context(|| format!("cannot stat the state directory {}", dir.display()))?;
        if !meta.file_type().is_dir() {
            bail!(
                "the state directory {} is {}, not a directory: refused",
                dir.display(),
                kind_of(meta.file_type())
            );
        }
        refuse_foreign_owner("the state directory", dir, &meta, "--state-dir")?;
        if meta.mode() & 0o022 != 0 {
            log::warn!(
                "the state directory {} has mode {:04o}: others than its owner may replace the state file (held /health gates); `chmod 700` it",
                dir.display(),
                meta.mode() & 0o7777
            );
        }
        let dir_file = File::open(dir)
            .with_context(|| format!("cannot open the state directory {}", dir.display()))?;
        let writer = rustix::fs::flock(
            &dir_file,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .is_ok();
        // A link, FIFO or device at the lock's name stops the start, as at the state file's.
        open_regular(&dir.join(NEXT_LOCK_NAME))?;
        // The writer takes it too when it can, but only when a file is there: a crashed
        // agent's, which it folds in. With none there it leaves the lock alone: an agent
        // started beside it (an upgrade right after this start) must get it, and an agent
        // beside makes the file only once it holds the lock (`take_orphaned_next` takes one
        // made later, once its agent has gone). One that cannot be made (a read-only
        // directory) costs only what it would keep: the agent starts, as it does when the
        // state file cannot be written.
        let next_lock = if writer && !dir.join(NEXT_FILE_NAME).exists() {
            None
        } else {
            Self::take_next_lock(dir).unwrap_or_else(|problem| {
                log::warn!(
                    "{problem:#}: drains POSTed during an upgrade's overlap are kept in memory only"
                );
                None
            })
        };
        if !writer {
            if next_lock.is_some() {
                log::info!(
                    "another agent writes the state in {} (an upgrade in progress): its drains are restored, this agent keeps its own in {NEXT_FILE_NAME} meanwhile and writes the state once it has gone",
                    dir.display()
                );
            } else {
                log::warn!(
                    "two other agents use the state in {}: drains POSTed to this one are kept in memory only until they have gone",
                    dir.display()
                );
            }
        }
        let file = Self {
            path: dir.join(FILE_NAME),
            temp: dir.join(format!("{FILE_NAME}.tmp")),
            next_path: dir.join(NEXT_FILE_NAME),
            next_temp: dir.join(format!("{NEXT_FILE_NAME}.tmp")),
            dir: dir.to_owned(),
            lock: Mutex::new(()),
            dir_file,
            writer: std::sync::atomic::AtomicBool::new(writer),
            next_lock: Mutex::new(next_lock),
            unsaved: std::sync::atomic::AtomicBool::new(false),
            failed_writes: std::sync::atomic::AtomicU64::new(0),
            longest_gate: UNREADABLE_GATE_CAP,
            blocked: std::sync::atomic::AtomicBool::new(false),
            next_blocked: std::sync::atomic::AtomicBool::new(false),
        };
        // Checked now: a link or a FIFO there is refused at start.
        open_regular(&file.path)?;
        open_regular(&file.next_path)?;
        Ok(file)
    }

    /// How long a drain and the gate after it may last on this agent (its maximum timeout
    /// and the hold): how long a file it cannot read is taken to gate when the file does
    /// not say ([`Unreadable::until_ms`]).
    #[must_use]
    pub fn with_longest_gate(mut self, longest: Duration) -> Self {
        self.longest_gate = longest;
        self
    }

    /// The lock of [`NEXT_FILE_NAME`] if nobody holds it (a regular file of its own,
    /// created 0600: never through a link).
    fn take_next_lock(dir: &Path) -> Result<Option<File>> {
        let path = dir.join(NEXT_LOCK_NAME);
        let file = STATE_FILE
            .open_regular(&path, Access::Append(FILE_MODE))?
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .is_ok()
                .then_some(file),
        )
    }

    /// For the writer: takes the lock of a [`NEXT_FILE_NAME`] that is there and that nobody
    /// holds (its agent has gone: a crash, or a stop while this one runs on). True when this
    /// agent holds it now; [`StateFile::read_next`] then reads the file.
    ///
    /// The lock is tried only when the file exists: an agent starting beside this one never
    /// finds its lock taken by this check (it creates the file only once it holds the lock).
    pub fn take_orphaned_next(&self) -> Result<bool> {
        let mut next_lock = lock_of(&self.next_lock);
        if next_lock.is_some() {
            return Ok(true);
        }
        if !self.is_writer() || !self.next_is_there() {
            return Ok(false);
        }
        *next_lock = Self::take_next_lock(&self.dir)?;
        Ok(next_lock.is_some())
    }

    /// Whether a [`NEXT_FILE_NAME`] is there (whoever holds its lock): one `stat`.
    pub fn next_is_there(&self) -> bool {
        fs::symlink_metadata(&self.next_path).is_ok()
    }

    /// Syncs the directory: a rename or a removal in it on disk.
    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot sync the directory {}", self.dir.display()))
    }

    /// Which file this agent writes now.
    pub fn role(&self) -> Role {
        if self.is_writer() {
            Role::Writer
        } else if lock_of(&self.next_lock).is_some() {
            Role::Next
        } else {
            Role::Neither
        }
    }

    /// [`NEXT_FILE_NAME`] as another agent left it (a crash), or as this one wrote it: only
    /// while this agent holds its lock, else [`Found::Nothing`]. One this agent cannot read
    /// is set aside (this agent would write over it, or remove it once folded in).
    pub fn read_next<T: DeserializeOwned>(&self) -> Found<T> {
        let _serial = lock_of(&self.lock);
        if lock_of(&self.next_lock).is_none() {
            return Found::Nothing;
        }
        self.read_or_set_aside(&self.next_path, NEXT_FILE_NAME, &self.next_blocked)
    }

    /// The state file, for the agent holding the directory's lock (the writer at its start,
    /// or at the take-over before [`StateFile::start_writing`]): one it cannot read is set
    /// aside, never written over.
    pub fn read_owned<T: DeserializeOwned>(&self) -> Found<T> {
        let _serial = lock_of(&self.lock);
        self.read_or_set_aside(&self.path, FILE_NAME, &self.blocked)
    }

    /// `path` read, or set aside if it cannot be (under the write lock).
    fn read_or_set_aside<T: DeserializeOwned>(
        &self,
        path: &Path,
        base: &str,
        blocked: &std::sync::atomic::AtomicBool,
    ) -> Found<T> {
        let data = match Self::read_bytes(path) {
            Ok(None) => return Found::Nothing,
            Ok(Some(data)) => data,
            Err(problem) => {
                return Found::Unreadable(self.set_aside(path, base, None, &problem, blocked));
            }
        };
        match Self::parse(&data, path) {
            Ok(state) => Found::State(state),
            Err(problem) => {
                Found::Unreadable(self.set_aside(path, base, Some(&data), &problem, blocked))
            }
        }
    }

    /// Moves the unreadable `path` (holding `data` when it could be read) aside; if that
    /// fails it stays, and `blocked` keeps writes and removals off it.
    fn set_aside(
        &self,
        path: &Path,
        base: &str,
        data: Option<&[u8]>,
        problem: &anyhow::Error,
        blocked: &std::sync::atomic::AtomicBool,
    ) -> Unreadable {
        use std::sync::atomic::Ordering::Relaxed;
        let bounds = data.and_then(|data| serde_json::from_slice::<Bounds>(data).ok());
        let version = bounds.as_ref().and_then(|bounds| bounds.version);
        let at_ms = now_ms();
        let cap = at_ms.saturating_add(millis(UNREADABLE_GATE_CAP.max(self.longest_gate)));
        let until_ms = bounds
            .and_then(|bounds| bounds.until_ms)
            .filter(|until_ms| *until_ms <= cap)
            .unwrap_or_else(|| at_ms.saturating_add(millis(self.longest_gate)));
        // Two set aside within one millisecond: never one over the other.
        let mut aside = self
            .dir
            .join(set_aside_name(base, version, at_ms, until_ms));
        for later in 1..=16 {
            if fs::symlink_metadata(&aside).is_err() {
                break;
            }
            aside = self.dir.join(set_aside_name(
                base,
                version,
                at_ms.saturating_add(later),
                until_ms,
            ));
        }
        let moved = self.make_room_to_set_aside().and_then(|()| {
            fs::rename(path, &aside)
                .with_context(|| format!("cannot move {} aside", path.display()))?;
            self.sync_dir()
        });
        let problem = format!("{problem:#}");
        match moved {
            Ok(()) => {
                blocked.store(false, Relaxed);
                Unreadable {
                    path: aside,
                    set_aside: true,
                    version,
                    until_ms,
                    problem,
                }
            }
            Err(failed) => {
                log::error!(
                    "{failed:#}: it stays at its name, and this agent writes no state there until it is moved away"
                );
                blocked.store(true, Relaxed);
                Unreadable {
                    path: path.to_owned(),
                    set_aside: false,
                    version,
                    until_ms,
                    problem,
                }
            }
        }
    }

    /// The files set aside in the directory: their paths, when they were set aside and until
    /// when they gate (from their names: [`set_aside_name`]).
    fn set_aside_files(&self) -> Result<Vec<(PathBuf, u64, u64)>> {
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list the state directory {}", self.dir.display()))?;
        Ok(entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let (at, until) = parse_set_aside_name(entry.file_name().to_str()?)?;
                Some((entry.path(), at, until))
            })
            .collect())
    }

    /// Below [`SET_ASIDE_MAX`] set-aside files: those whose gating ends first go.
    fn make_room_to_set_aside(&self) -> Result<()> {
        let mut files = self.set_aside_files()?;
        files.sort_by_key(|(_, at, until)| (*until, *at));
        let excess = (files.len() + 1).saturating_sub(SET_ASIDE_MAX);
        for (path, _, _) in files.iter().take(excess) {
            remove_if_there(path)?;
            log::warn!(
                "{} removed: more than {SET_ASIDE_MAX} unreadable state files set aside (the one gating for the shortest goes)",
                path.display()
            );
        }
        Ok(())
    }

    /// Until when the files set aside in the directory (by this agent or one before it)
    /// gate, as their names say; a name saying more than [`UNREADABLE_GATE_CAP`] (or the
    /// longest gate) after it was set aside is taken to say that much. `None`: none gates
    /// any more, or none is there.
    pub fn set_aside_until_ms(&self) -> Result<Option<u64>> {
        let cap = millis(UNREADABLE_GATE_CAP.max(self.longest_gate));
        let now = now_ms();
        Ok(self
            .set_aside_files()?
            .into_iter()
            .map(|(_, at, until)| until.min(at.saturating_add(cap)))
            .filter(|until| *until > now)
            .max())
    }

    /// Once the state file holds what [`NEXT_FILE_NAME`] held (the writer wrote after folding
    /// it in): the file goes, and its lock is let go.
    pub fn retire_next(&self) -> Result<()> {
        let _serial = lock_of(&self.lock);
        let mut next_lock = lock_of(&self.next_lock);
        if next_lock.is_none() || !self.is_writer() {
            return Ok(());
        }
        if self.next_blocked.load(std::sync::atomic::Ordering::Relaxed) {
            bail!(
                "{} cannot be read nor moved aside: kept (its lock too)",
                self.next_path.display()
            );
        }
        remove_if_there(&self.next_path)?;
        self.sync_dir()?;
        *next_lock = None;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this agent writes the file (holds the directory's lock).
    pub fn is_writer(&self) -> bool {
        self.writer.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Blocks until this agent holds the directory's lock (the other agent exited). It does
    /// not write yet: what the other agent left is read and merged first, then
    /// [`StateFile::start_writing`] (a write in between would replace that agent's last state
    /// with this one's). For a thread of its own.
    pub fn wait_for_lock(&self) -> Result<()> {
        rustix::fs::flock(&self.dir_file, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("cannot lock the state directory {}", self.dir.display()))
    }

    /// Writes from now on (after [`StateFile::wait_for_lock`] and the merge).
    pub fn start_writing(&self) {
        let _serial = lock_of(&self.lock);
        self.writer
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The state last written, or `None`: no file, or one that cannot be read as this
    /// version's state (logged at WARN; the caller starts without it). For an agent that
    /// does not own the file (beside the writer): the owner uses [`StateFile::read_owned`].
    pub fn read<T: DeserializeOwned>(&self) -> Option<T> {
        match Self::try_read(&self.path) {
            Ok(state) => state,
            Err(problem) => {
                log::warn!("{problem:#}: ignored, starting without the saved drains");
                None
            }
        }
    }

    /// Which version of `which` file is there now (`None`: no file): one `lstat`. A
    /// write renames a new file over the name, so a new state is a new [`Stamp`].
    pub fn stamp(&self, which: Which) -> Result<Option<Stamp>> {
        let path = self.path_of(which);
        match fs::symlink_metadata(path) {
            Ok(meta) => Ok(Some(Stamp::of(&meta))),
            Err(problem) if problem.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(problem) => Err(problem)
                .with_context(|| format!("cannot stat the state file {}", path.display())),
        }
    }

    /// `which` file as another agent wrote it, with the [`Stamp`] of what was read (taken
    /// from the open file, so it names that content): `None` when there is none. Unlike
    /// [`StateFile::read`], a file that cannot be read is an error, for the caller to decide.
    pub fn read_stamped<T: DeserializeOwned>(&self, which: Which) -> Result<Option<(Stamp, T)>> {
        let path = self.path_of(which);
        let Some(file) = open_regular(path)? else {
            return Ok(None);
        };
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat the state file {}", path.display()))?;
        let state = Self::read_open(file, path)?;
        Ok(Some((Stamp::of(&meta), state)))
    }

    fn path_of(&self, which: Which) -> &Path {
        match which {
            Which::State => &self.path,
            Which::Next => &self.next_path,
        }
    }

    /// Whether this agent holds the lock of [`NEXT_FILE_NAME`]: the file there (if any) is
    /// its own, or a gone agent's it is folding in; else an agent beside it writes it.
    pub fn holds_next_lock(&self) -> bool {
        lock_of(&self.next_lock).is_some()
    }

    fn try_read<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
        let Some(file) = open_regular(path)? else {
            return Ok(None);
        };
        Self::read_open(file, path).map(Some)
    }

    /// `path`'s content (at most [`MAX_BYTES`]), `None` when there is no file.
    fn read_bytes(path: &Path) -> Result<Option<Vec<u8>>> {
        let Some(file) = open_regular(path)? else {
            return Ok(None);
        };
        Self::read_data(file, path).map(Some)
    }

    /// Reads the state from `file`, opened at `path`: at most [`MAX_BYTES`], this version's.
    fn read_open<T: DeserializeOwned>(file: File, path: &Path) -> Result<T> {
        Self::parse(&Self::read_data(file, path)?, path)
    }

    /// At most [`MAX_BYTES`] of `file`, opened at `path`.
    fn read_data(file: File, path: &Path) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        file.take(MAX_BYTES + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("cannot read the state file {}", path.display()))?;
        if data.len() as u64 > MAX_BYTES {
            bail!(
                "the state file {} is larger than {MAX_BYTES} bytes",
                path.display()
            );
        }
        Ok(data)
    }

    /// `data`, read at `path`, as this version's state.
    fn parse<T: DeserializeOwned>(data: &[u8], path: &Path) -> Result<T> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let version: Version = serde_json::from_slice(data)
            .with_context(|| format!("the state file {} is not a state file", path.display()))?;
        if version.version != VERSION {
            bail!(
                "the state file {} has version {}, this agent reads {VERSION}",
                path.display(),
                version.version
            );
        }
        let envelope: Envelope<T> = serde_json::from_slice(data)
            .with_context(|| format!("the state file {} cannot be read", path.display()))?;
        Ok(envelope.state)
    }

    /// Writes the state `now(role)` gives for this agent's [`Role`] (called under the write
    /// lock, so the file always ends with the newest state) and syncs it to disk before
    /// returning: the state file for the writer, [`NEXT_FILE_NAME`] for the agent beside it.
    /// `now` returning `None` writes nothing (the agent is stopping: what is on disk
    /// stays); nor does [`Role::Neither`].
    ///
    /// A write that fails, or one kept in memory only, leaves [`StateFile::unsaved`] set
    /// until a later write reaches the disk.
    pub fn write_with<T: Serialize + Lasting>(
        &self,
        now: impl FnOnce(Role) -> Option<T>,
    ) -> Result<Written> {
        use std::sync::atomic::Ordering::Relaxed;
        let _serial = lock_of(&self.lock);
        let written = self.write_locked(now);
        match &written {
            Ok(Written::OnDisk) => self.unsaved.store(false, Relaxed),
            Ok(Written::Nothing) => {}
            Ok(Written::InMemoryOnly) | Err(_) => {
                self.unsaved.store(true, Relaxed);
                self.failed_writes.fetch_add(1, Relaxed);
            }
        }
        written
    }

    /// Whether the state as this agent last wrote it is not on disk (a failed write, or a
    /// third agent's: [`Role::Neither`]), and how many writes since the start were not.
    pub fn unsaved(&self) -> (bool, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.unsaved.load(Relaxed), self.failed_writes.load(Relaxed))
    }

    /// [`StateFile::write_with`], under its lock.
    fn write_locked<T: Serialize + Lasting>(
        &self,
        now: impl FnOnce(Role) -> Option<T>,
    ) -> Result<Written> {
        let role = self.role();
        let (path, temp, blocked) = match role {
            Role::Writer => (&self.path, &self.temp, &self.blocked),
            Role::Next => (&self.next_path, &self.next_temp, &self.next_blocked),
            // The other agents' files stand until they exit (see the type).
            Role::Neither => return Ok(Written::InMemoryOnly),
        };
        if blocked.load(std::sync::atomic::Ordering::Relaxed) {
            bail!(
                "{} is a state file this agent cannot read and could not move aside: not written over (move it away)",
                path.display()
            );
        }
        let Some(state) = now(role) else {
            return Ok(Written::Nothing);
        };
        let data = serde_json::to_vec(&Envelope {
            version: VERSION,
            until_ms: Some(state.lasts_until_ms()),
            state,
        })
        .context("cannot encode the state")?;
        if data.len() as u64 > MAX_BYTES {
            bail!("the state is larger than {MAX_BYTES} bytes: not written");
        }
        // A leftover (a crash mid-write) or anything planted there: gone, then made anew
        // without following a link.
        remove_if_there(temp)?;
        let mut written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(temp)
            .with_context(|| format!("cannot create {}", temp.display()))?;
        written
            .write_all(&data)
            .and_then(|()| written.sync_all())
            .with_context(|| format!("cannot write {}", temp.display()))?;
        drop(written);
        fs::rename(temp, path).with_context(|| format!("cannot replace {}", path.display()))?;
        // The rename itself on disk.
        self.sync_dir()?;
        Ok(Written::OnDisk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Kept {
        drains: Vec<u64>,
    }

    /// Its drains are the Unix ms they end at.
    impl Lasting for Kept {
        fn lasts_until_ms(&self) -> u64 {
            self.drains.iter().copied().max().unwrap_or(0)
        }
    }

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn written_state_is_read_back_and_the_directory_is_made_private() {
        let root = dir();
        let state_dir = root.path().join("a/b");
        let file = StateFile::open(&state_dir).expect("open");
        assert_eq!(
            fs::metadata(&state_dir).expect("dir").mode() & 0o777,
            DIR_MODE
        );
        assert_eq!(file.read::<Kept>(), None);
        file.write_with(|_| Some(Kept { drains: vec![1, 2] }))
            .expect("write");
        assert_eq!(
            fs::metadata(file.path()).expect("file").mode() & 0o777,
            FILE_MODE
        );
        assert_eq!(file.read::<Kept>(), Some(Kept { drains: vec![1, 2] }));
        file.write_with(|_| None::<Kept>).expect("nothing written");
        assert_eq!(
            StateFile::open(&state_dir).expect("again").read::<Kept>(),
            Some(Kept { drains: vec![1, 2] })
        );
    }

    /// An upgrade: the second agent writes nothing until it has the lock *and* has merged
    /// what the first one left. Before, taking the lock made it the writer at once, and a
    /// save in between (a drain ending) replaced the first agent's last state with its own.
    #[test]
    fn the_next_agent_writes_only_once_it_has_merged() {
        let root = dir();
        let first = StateFile::open(root.path()).expect("open");
        let second = StateFile::open(root.path()).expect("open again");
        assert!(first.is_writer() && !second.is_writer());
        second
            .write_with(|_| Some(Kept { drains: vec![9] }))
            .expect("not the writer: nothing written");
        first
            .write_with(|_| Some(Kept { drains: vec![1] }))
            .expect("write");
        drop(first);
        second
            .wait_for_lock()
            .expect("the lock, once the first is gone");
        second
            .write_with(|_| Some(Kept { drains: vec![2] }))
            .expect("not merged yet: nothing written");
        assert_eq!(second.read::<Kept>(), Some(Kept { drains: vec![1] }));
        second.start_writing();
        second
            .write_with(|_| Some(Kept { drains: vec![1, 2] }))
            .expect("write");
        assert_eq!(second.read::<Kept>(), Some(Kept { drains: vec![1, 2] }));
    }

    /// The agent beside the writer keeps its own in the next file; a crash of it leaves the
    /// file to the next agent (its lock is free), and the one that becomes the writer folds
    /// it in and removes it.
    #[test]
    fn the_next_file_outlives_a_crash_until_the_writer_folds_it_in() {
        let root = dir();
        let writer = StateFile::open(root.path()).expect("open");
        assert_eq!(writer.role(), Role::Writer);
        // At start the writer holds the next file's lock too (a crashed agent's file would
        // be its to fold in); with none there, it lets it go.
        assert_eq!(writer.read_next::<Kept>(), Found::Nothing);
        writer.retire_next().expect("nothing to retire");
        writer
            .write_with(|role| {
                assert_eq!(role, Role::Writer);
                Some(Kept { drains: vec![1] })
            })
            .expect("write");
        let beside = StateFile::open(root.path()).expect("open beside");
        assert_eq!(beside.role(), Role::Next);
        // A third agent keeps what it is asked in memory only, and says so.
        let third = StateFile::open(root.path()).expect("a third");
        assert_eq!(third.role(), Role::Neither);
        assert_eq!(
            third.write_with(|_| Some(Kept { drains: vec![3] })).ok(),
            Some(Written::InMemoryOnly)
        );
        assert_eq!(third.unsaved(), (true, 1));
        drop(third);
        assert_eq!(
            beside
                .write_with(|role| {
                    assert_eq!(role, Role::Next);
                    Some(Kept { drains: vec![5] })
                })
                .ok(),
            Some(Written::OnDisk)
        );
        assert_eq!(beside.unsaved(), (false, 0));
        assert_eq!(writer.read::<Kept>(), Some(Kept { drains: vec![1] }));
        beside.retire_next().expect("not the writer: kept");
        drop(beside);
        let after_crash = StateFile::open(root.path()).expect("open after the crash");
        assert_eq!(after_crash.role(), Role::Next);
        assert_eq!(
            after_crash.read_next::<Kept>(),
            Found::State(Kept { drains: vec![5] })
        );
        drop(writer);
        after_crash.wait_for_lock().expect("lock");
        after_crash.start_writing();
        after_crash
            .write_with(|role| {
                assert_eq!(role, Role::Writer);
                Some(Kept { drains: vec![1, 5] })
            })
            .expect("write");
        after_crash.retire_next().expect("retire");
        assert!(!root.path().join(NEXT_FILE_NAME).exists());
        assert_eq!(
            after_crash.read_next::<Kept>(),
            Found::Nothing,
            "its lock let go"
        );
        assert_eq!(
            after_crash.read::<Kept>(),
            Some(Kept { drains: vec![1, 5] })
        );
    }

    /// Found in a CI run: the writer took the next file's lock at its start whether or not
    /// a file was there, and let it go only once its take-over task had run; an agent started
    /// beside it meanwhile (an upgrade right after a start, slowed by load) found both locks
    /// taken, took itself for a third agent, and kept drains POSTed to it in memory only
    /// (no `drains.next.json`: the old agent answered "not draining" for them).
    #[test]
    fn an_agent_started_right_after_the_writer_keeps_the_next_file() {
        let root = dir();
        let writer = StateFile::open(root.path()).expect("open");
        let beside = StateFile::open(root.path()).expect("beside");
        assert_eq!(
            beside.role(),
            Role::Next,
            "the writer held the next file's lock"
        );
        drop(writer);
    }

    /// The writer takes up a next file whose agent has gone, and only such a one: with no
    /// file it never touches the lock (an agent starting beside it must get it).
    #[test]
    fn the_writer_takes_an_orphaned_next_file_and_no_other() {
        let root = dir();
        let writer = StateFile::open(root.path()).expect("open");
        writer.retire_next().expect("none at start");
        assert!(!writer.take_orphaned_next().expect("no file"));
        let beside = StateFile::open(root.path()).expect("beside");
        assert_eq!(beside.role(), Role::Next, "the lock was left alone");
        beside
            .write_with(|_| Some(Kept { drains: vec![7] }))
            .expect("write");
        assert!(!writer.take_orphaned_next().expect("its agent holds it"));
        assert_eq!(writer.read_next::<Kept>(), Found::Nothing);
        drop(beside);
        assert!(writer.take_orphaned_next().expect("its agent has gone"));
        assert_eq!(
            writer.read_next::<Kept>(),
            Found::State(Kept { drains: vec![7] })
        );
        writer.retire_next().expect("retire");
        assert!(!root.path().join(NEXT_FILE_NAME).exists());
    }

    #[test]
    fn a_link_at_the_path_or_the_directory_is_refused() {
        let root = dir();
        let target = root.path().join("elsewhere");
        fs::write(&target, b"secret").expect("target");
        // The state file, the next file and its lock: refused, the target untouched.
        for name in [FILE_NAME, NEXT_FILE_NAME, NEXT_LOCK_NAME] {
            let state_dir = root.path().join(format!("state-{name}"));
            fs::create_dir(&state_dir).expect("dir");
            std::os::unix::fs::symlink(&target, state_dir.join(name)).expect("link");
            let refused = StateFile::open(&state_dir).err().expect("refused");
            assert!(
                format!("{refused:#}").contains("symbolic link"),
                "{name}: {refused:#}"
            );
            assert_eq!(fs::read(&target).expect("target"), b"secret");
        }

        let linked_dir = root.path().join("linked");
        std::os::unix::fs::symlink(root.path(), &linked_dir).expect("dir link");
        let refused = StateFile::open(&linked_dir).err().expect("refused");
        assert!(
            format!("{refused:#}").contains("not a directory"),
            "{refused:#}"
        );
    }

    /// Audit (state owner): only the state directory's mode was checked, never its owner:
    /// a user owning it (made under /tmp before the agent, 0700) could swap drains.json and
    /// have drains, gates and `on_timeout=close` resumed at the next start. It is refused at
    /// start, naming the flag.
    #[test]
    fn a_state_directory_another_user_owns_is_refused() {
        if !rustix::process::geteuid().is_root() {
            crate::test_skip::skip(
                "a_state_directory_another_user_owns_is_refused",
                "chown needs root",
            );
            return;
        }
        let root = dir();
        let theirs = root.path().join("theirs");
        DirBuilder::new()
            .mode(DIR_MODE)
            .create(&theirs)
            .expect("dir");
        std::os::unix::fs::chown(&theirs, Some(65_534), Some(65_534)).expect("chown");
        let refused = StateFile::open(&theirs)
            .err()
            .expect("a directory of uid 65534 is refused");
        let text = format!("{refused:#}");
        assert!(
            text.contains("owned by uid 65534") && text.contains("--state-dir"),
            "{text}"
        );
        assert!(!theirs.join(NEXT_LOCK_NAME).exists(), "nothing made there");
        StateFile::open(&root.path().join("ours")).expect("its own");
    }

    #[test]
    fn a_link_at_the_temporary_name_is_not_followed() {
        let root = dir();
        let target = root.path().join("elsewhere");
        fs::write(&target, b"secret").expect("target");
        let file = StateFile::open(&root.path().join("state")).expect("open");
        std::os::unix::fs::symlink(&target, &file.temp).expect("link");
        file.write_with(|_| Some(Kept { drains: vec![7] }))
            .expect("write");
        assert_eq!(fs::read(&target).expect("target"), b"secret");
        assert_eq!(file.read::<Kept>(), Some(Kept { drains: vec![7] }));
    }

    #[test]
    fn torn_corrupt_and_foreign_files_are_ignored() {
        let root = dir();
        let file = StateFile::open(root.path()).expect("open");
        for content in [
            &b"{\"version\":1,\"state\":{\"drains\":[1,"[..],
            b"not json",
            b"{\"version\":2,\"state\":{\"drains\":[1]}}",
            b"{\"version\":1,\"state\":{\"other\":true}}",
        ] {
            fs::write(file.path(), content).expect("write");
            assert_eq!(
                file.read::<Kept>(),
                None,
                "{}",
                String::from_utf8_lossy(content)
            );
        }
        fs::write(file.path(), vec![b' '; MAX_BYTES as usize + 1]).expect("write");
        assert_eq!(file.read::<Kept>(), None);
    }

    /// Audit (rollback): a file of another version (or a damaged one) that this agent owns
    /// is never written over nor removed: it is set aside under a name giving its version,
    /// when, and until when it gates — its own `until_ms` if it has a sane one, else the
    /// longest gate from now — and an agent opened later reads that end from the name.
    #[test]
    fn an_unreadable_file_is_set_aside_with_its_bound_and_never_written_over() {
        let root = dir();
        let longest = Duration::from_secs(900);
        let file = StateFile::open(root.path())
            .expect("open")
            .with_longest_gate(longest);
        let newer = format!(
            "{{\"version\":2,\"until_ms\":{},\"state\":{{\"gates\":[1]}}}}",
            now_ms() + 60_000
        );
        fs::write(file.path(), &newer).expect("write");
        let before = now_ms();
        let Found::Unreadable(found) = file.read_owned::<Kept>() else {
            panic!("read as a state");
        };
        assert!(found.set_aside && found.version == Some(2), "{found:?}");
        assert!(found.problem.contains("version 2"), "{}", found.problem);
        assert_eq!(fs::read_to_string(&found.path).expect("set aside"), newer);
        assert!(!file.path().exists());
        let name = found.path.file_name().and_then(|name| name.to_str());
        assert!(
            name.is_some_and(|name| name.starts_with("drains.json.unreadable-v2-at-")),
            "{name:?}"
        );
        assert!(
            found.until_ms > before && found.until_ms <= before + 61_000,
            "its own bound"
        );
        // Written again only where it was: the state file's name.
        file.write_with(|_| Some(Kept { drains: vec![1] }))
            .expect("write");
        assert_eq!(fs::read_to_string(&found.path).expect("kept"), newer);
        let again = StateFile::open(root.path()).expect("open again");
        assert_eq!(
            again.set_aside_until_ms().expect("listed"),
            Some(found.until_ms)
        );

        // No bound of its own (not even JSON): the longest gate from now.
        fs::write(file.path(), b"not json").expect("write");
        let Found::Unreadable(damaged) = file.read_owned::<Kept>() else {
            panic!("read as a state");
        };
        assert_eq!(damaged.version, None);
        assert!(
            damaged.until_ms >= before + millis(longest)
                && damaged.until_ms <= now_ms() + millis(longest),
            "{damaged:?}"
        );
        assert_eq!(
            fs::read(&damaged.path).expect("set aside"),
            b"not json".to_vec()
        );
        assert_eq!(
            again.set_aside_until_ms().expect("listed"),
            Some(damaged.until_ms),
            "the latest end"
        );

        // The next file too, for the agent holding its lock; and a bound past the cap is
        // taken as damaged. (`again`, opened beside the writer, holds that lock: gone first.)
        drop(again);
        let next = format!("{{\"version\":3,\"until_ms\":{},\"state\":{{}}}}", u64::MAX);
        fs::write(root.path().join(NEXT_FILE_NAME), &next).expect("write");
        assert!(file.take_orphaned_next().expect("its lock"));
        let Found::Unreadable(left) = file.read_next::<Kept>() else {
            panic!("read as a state");
        };
        assert_eq!(left.version, Some(3));
        assert!(left.until_ms <= now_ms() + millis(longest), "{left:?}");
        assert_eq!(fs::read_to_string(&left.path).expect("set aside"), next);
        file.retire_next().expect("nothing left to remove");
        assert_eq!(fs::read_to_string(&left.path).expect("kept"), next);
    }

    /// The files set aside are bounded: past [`SET_ASIDE_MAX`], the one gating for the
    /// shortest goes (every scope is gated until the latest end, which stays).
    #[test]
    fn set_aside_files_are_bounded_and_the_latest_end_stays() {
        let root = dir();
        let file = StateFile::open(root.path()).expect("open");
        let base = now_ms() + 3_600_000;
        let mut ends = Vec::new();
        for round in 0..SET_ASIDE_MAX as u64 + 3 {
            // The third one found gates the longest.
            let until = if round == 2 {
                base + 1_000_000
            } else {
                base + round
            };
            ends.push(until);
            fs::write(
                file.path(),
                format!("{{\"version\":9,\"until_ms\":{until},\"state\":{round}}}"),
            )
            .expect("write");
            assert!(matches!(file.read_owned::<Kept>(), Found::Unreadable(_)));
        }
        let left = file.set_aside_files().expect("listed");
        assert_eq!(left.len(), SET_ASIDE_MAX);
        assert_eq!(
            file.set_aside_until_ms().expect("listed"),
            Some(base + 1_000_000)
        );
        let gone: Vec<u64> = ends
            .iter()
            .copied()
            .filter(|until| !left.iter().any(|(_, _, kept)| kept == until))
            .collect();
        assert_eq!(gone, vec![base, base + 1, base + 3], "the shortest went");
    }
}
