//! The drain journal (`--journal PATH`): one JSON line per ended drain, appended, bounded
//! in size (past `--journal-max-bytes` the file moves to `PATH.1` and a new one starts, so at
//! most twice the bound is kept), read back at start so `/drains` survives restarts.
//!
//! The path is trusted for nothing (issue 22: the agent runs as root on a shared node, and
//! the journal holds client addresses). Both `PATH` and `PATH.1` are opened without
//! following a symbolic link (`O_NOFOLLOW`) and used only when they are regular files, so
//! the journal is never written through a link, nor read from a device or a FIFO; a new
//! journal is created mode 0600; the read at start takes only the tail of each file
//! ([`TAIL_BYTES`]); a torn last line (a write cut short, no newline) is ignored, and the
//! next append starts on a line of its own.

use std::{
    fs::{self, File},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Serialize, de::DeserializeOwned};

use crate::drain::untrusted_path::{Access, Named, refuse_foreign_owner};

/// At start at most this much of the end of each file (`PATH.1`, `PATH`) is read. A fixed
/// cap rather than `--journal-max-bytes`: that flag has no upper bound, and the agent
/// keeps only the last 200 records (`drain::HISTORY`), each well under 4 KiB (at most 10
/// peers at the end), so 4 MiB per file holds the history several times over. A larger
/// file (a lowered `--journal-max-bytes`, or something else writing there) costs no more.
pub const TAIL_BYTES: u64 = 4 << 20;

/// Mode of a journal the agent creates: only its owner (root) reads the client addresses.
const NEW_FILE_MODE: u32 = 0o600;

/// An append-only, size-bounded file of drain records (any record type that serde can write
/// and read back: the journal does not depend on the drains that use it).
pub struct Journal {
    path: PathBuf,
    max_bytes: u64,
    /// Appends are serialised: a line is never interleaved with another.
    lock: Mutex<()>,
    /// Appends that failed since the start (`drain_agent_journal_write_failures_total`).
    failed_appends: std::sync::atomic::AtomicU64,
}

/// How long an append waits for another agent's lock on the journal (its append: one
/// write and a sync), and how many times it opens the name again when the file moved on.
const LOCK_WAIT: Duration = Duration::from_secs(2);
const LOCK_TRIES: u32 = 4;

/// Takes `flock(LOCK_EX)` on `file`, trying for at most `wait` (a holder that never lets go
/// must not hold a drain's answer up).
fn lock_within(file: &File, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    loop {
        match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return true,
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return false,
        }
    }
}

/// The journal's files, as their errors name them.
const JOURNAL: Named = Named {
    what: "the drain journal",
    advice: |file_type| {
        if file_type.is_symlink() {
            " (the journal is never written through a link: name the file itself)"
        } else {
            ""
        }
    },
};

/// Opens a journal file ([`Named::open_regular`]): `PATH` for appending (created 0600 if
/// missing), `PATH.1` and `PATH` when reading records.
fn open_regular(path: &Path, access: Access) -> Result<File> {
    JOURNAL
        .open_regular(path, access)?
        .ok_or_else(|| anyhow::anyhow!("the drain journal {} is gone", path.display()))
}

/// Warns (once, at start) when others than the owner may read or write an existing
/// journal: it holds client addresses. Nothing is changed: the mode may be deliberate.
fn warn_if_loose(path: &Path, file: &File) {
    if let Ok(meta) = file.metadata()
        && meta.mode() & 0o066 != 0
    {
        log::warn!(
            "the drain journal {} has mode {:04o}: group or others can read (or write) the \
             client addresses in it; `chmod 600` it (new journals are created 0600)",
            path.display(),
            meta.mode() & 0o7777
        );
    }
}

/// The complete lines of the last [`TAIL_BYTES`] of `file`, with their byte offsets: a
/// line cut by the start of the window and a torn last line (no newline) are left out.
fn tail_lines(path: &Path, file: &mut File) -> Result<Vec<(u64, Vec<u8>)>> {
    let size = file.metadata().context("stat")?.len();
    // One byte before the window too: it says whether the window starts a line.
    let start = size.saturating_sub(TAIL_BYTES).saturating_sub(1);
    file.seek(SeekFrom::Start(start)).context("seek")?;
    let mut data = Vec::new();
    file.take(TAIL_BYTES + 1)
        .read_to_end(&mut data)
        .context("read")?;
    let mut from = 0;
    if start > 0 {
        // Up to and including the first newline is the end of a line cut by the window
        // (or just the newline before the window, when the window starts a line).
        match data.iter().position(|&byte| byte == b'\n') {
            Some(at) => from = at + 1,
            None => return Ok(Vec::new()),
        }
    }
    let mut end = data.len();
    if !data.ends_with(b"\n") {
        let complete = data[from..]
            .iter()
            .rposition(|&byte| byte == b'\n')
            .map_or(from, |at| from + at + 1);
        log::warn!(
            "{}: the last line has no newline (a write cut short), ignored ({} bytes)",
            path.display(),
            end - complete
        );
        end = complete;
    }
    let mut lines = Vec::new();
    let mut offset = from;
    for line in data[from..end].split(|&byte| byte == b'\n') {
        if !line.is_empty() {
            lines.push((start + offset as u64, line.to_vec()));
        }
        offset += line.len() + 1;
    }
    Ok(lines)
}

impl Journal {
    /// Opens (creating if needed, mode 0600) the journal at `path`, and checks `PATH.1` if
    /// it is there; fails early when either is not a regular file or cannot be written, or
    /// when it or its directory is another user's than the agent's, so a bad path is found
    /// at start, not at the first drain.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self> {
        let journal = Self {
            path: path.to_owned(),
            max_bytes: max_bytes.max(4096),
            lock: Mutex::new(()),
            failed_appends: std::sync::atomic::AtomicU64::new(0),
        };
        // Its directory's owner could rename another journal over it (records read back at
        // the next start): refused before anything is created there.
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let dir_meta = fs::metadata(dir).with_context(|| {
            format!(
                "cannot stat the drain journal's directory {}",
                dir.display()
            )
        })?;
        refuse_foreign_owner("the drain journal's directory", dir, &dir_meta, "--journal")?;
        let file = open_regular(path, Access::Append(NEW_FILE_MODE))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat the drain journal {}", path.display()))?;
        refuse_foreign_owner("the drain journal", path, &meta, "--journal")?;
        warn_if_loose(path, &file);
        let rotated = journal.rotated();
        match fs::symlink_metadata(&rotated) {
            Err(problem) if problem.kind() == std::io::ErrorKind::NotFound => {}
            _ => {
                let file = open_regular(&rotated, Access::Read)?;
                let meta = file.metadata().with_context(|| {
                    format!("cannot stat the drain journal {}", rotated.display())
                })?;
                refuse_foreign_owner("the drain journal", &rotated, &meta, "--journal")?;
                warn_if_loose(&rotated, &file);
            }
        }
        Ok(journal)
    }

    fn rotated(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".1");
        PathBuf::from(name)
    }

    /// Appends one record as a JSON line (rotating first if the file is full).
    /// A failure is counted ([`Journal::failed_appends`]).
    pub fn append<R: Serialize>(&self, record: &R) -> Result<()> {
        let _serial = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let appended = self.append_locked(record);
        if appended.is_err() {
            self.failed_appends
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        appended
    }

    /// How many appends failed since the start: drains whose record is not in the journal.
    pub fn failed_appends(&self) -> u64 {
        self.failed_appends
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`Journal::append`], under its lock.
    fn append_locked<R: Serialize>(&self, record: &R) -> Result<()> {
        let mut line = serde_json::to_vec(record).context("cannot encode a drain record")?;
        line.push(b'\n');
        // Another agent may append to the same journal (an upgrade's overlap): the file is
        // appended to and rotated under its `flock`, and a name that moved on while this
        // one waited (the other rotated) is opened again. Without it both could find the
        // file full and rotate it, and the second rename would put the first one's new,
        // nearly empty file over PATH.1: the full file's records gone.
        let mut rotations = 0;
        let (mut file, size) = loop {
            let (file, locked) = self.open_locked()?;
            let size = file
                .metadata()
                .with_context(|| format!("cannot stat the drain journal {}", self.path.display()))?
                .len();
            // Without the lock (another holder kept it past the bound) the record is still
            // appended, in one write, but the file is not rotated: too big for a while,
            // never a rotation racing another.
            if size + line.len() as u64 <= self.max_bytes || !locked || rotations > 0 {
                break (file, size);
            }
            // rename(2) replaces the name PATH.1 itself: a link there is replaced, never
            // followed, and its target is not touched.
            fs::rename(&self.path, self.rotated()).with_context(|| {
                format!("cannot rotate the drain journal {}", self.path.display())
            })?;
            rotations += 1;
        };
        // A torn last line (a write cut short by a crash or a full disk): end it first, so
        // this record is a line of its own.
        let mut last = [0_u8; 1];
        if size > 0
            && file
                .read_at(&mut last, size - 1)
                .with_context(|| format!("cannot read the drain journal {}", self.path.display()))?
                == 1
            && last[0] != b'\n'
        {
            line.insert(0, b'\n');
        }
        // One write of a whole line: O_APPEND keeps it in one piece.
        file.write_all(&line)
            .with_context(|| format!("cannot write the drain journal {}", self.path.display()))?;
        // On disk before the drain's answer is sent (the drains wait for this): a client
        // that got an answer finds its drain in the journal after a crash. A new file (first
        // record, or just rotated) also needs its name on disk: the directory is synced too.
        file.sync_data()
            .with_context(|| format!("cannot sync the drain journal {}", self.path.display()))?;
        if size == 0
            && let Some(parent) = self.path.parent()
        {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            File::open(parent)
                .and_then(|directory| directory.sync_all())
                .with_context(|| format!("cannot sync the directory {}", parent.display()))?;
        }
        Ok(())
    }

    /// `PATH` opened for appending and locked (`flock`, waited for at most
    /// [`LOCK_WAIT`]), and whether it is: the file that has the name now, not one another
    /// agent rotated away while this one waited for its lock.
    fn open_locked(&self) -> Result<(File, bool)> {
        let mut tries = 0;
        loop {
            tries += 1;
            let file = open_regular(&self.path, Access::Append(NEW_FILE_MODE))?;
            if !lock_within(&file, LOCK_WAIT) {
                log::warn!(
                    "the drain journal {} stayed locked by another process for {LOCK_WAIT:?}: \
                     appending without the lock (and without rotating)",
                    self.path.display()
                );
                return Ok((file, false));
            }
            let opened = file.metadata().with_context(|| {
                format!("cannot stat the drain journal {}", self.path.display())
            })?;
            let named = fs::symlink_metadata(&self.path).ok();
            let same = named
                .is_some_and(|named| (named.dev(), named.ino()) == (opened.dev(), opened.ino()));
            if same || tries >= LOCK_TRIES {
                return Ok((file, same));
            }
        }
    }

    /// The last `limit` records, oldest first, from the tails of `PATH.1` and `PATH`
    /// (unreadable lines and files are skipped with a log).
    pub fn read_records<R: DeserializeOwned>(&self, limit: usize) -> Vec<R> {
        let mut records = Vec::new();
        for path in [self.rotated(), self.path.clone()] {
            if fs::symlink_metadata(&path).is_err() {
                continue;
            }
            let lines = open_regular(&path, Access::Read).and_then(|mut file| {
                tail_lines(&path, &mut file)
                    .with_context(|| format!("cannot read the drain journal {}", path.display()))
            });
            let lines = match lines {
                Ok(lines) => lines,
                Err(problem) => {
                    log::warn!("{problem:#}");
                    continue;
                }
            };
            for (offset, line) in lines {
                match serde_json::from_slice::<R>(&line) {
                    Ok(record) => records.push(record),
                    Err(problem) => log::warn!(
                        "{} at byte {offset}: not a drain record, skipped: {problem}",
                        path.display()
                    ),
                }
            }
        }
        let skip = records.len().saturating_sub(limit);
        records.split_off(skip)
    }
}

#[cfg(test)]
mod tests {
    use std::{fs::OpenOptions, sync::Arc};

    use super::*;
    use crate::drain::{DrainEnd, DrainRecord, OnTimeout};

    fn record(id: u64) -> DrainRecord {
        DrainRecord {
            id,
            port: 8080,
            addr: None,
            netns: None,
            started_ms: 1,
            first_zero_after_ms: Some(5),
            ended_ms: Some(10),
            result: Some(DrainEnd::Drained),
            active_at_start: 3,
            late_arrivals: 1,
            peers_at_end: Vec::new(),
            closed_by_agent: 0,
            wait_ms: 9,
            on_timeout: OnTimeout::Keep,
            started_by: None,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_the_size_stays_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drains.jsonl");
        let journal = Journal::open(&path, 4096).expect("open");
        for id in 1..=100 {
            journal.append(&record(id)).expect("append");
        }
        let size = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
        assert!(size(&path) <= 4096, "{}", size(&path));
        assert!(size(&journal.rotated()) <= 4096);
        let reopened = Journal::open(&path, 4096).expect("reopen");
        let records = reopened.read_records::<DrainRecord>(10);
        assert_eq!(records.len(), 10);
        assert_eq!(records.last().map(|r| r.id), Some(100));
        assert_eq!(records[0].id, 91);
        // Every line parses as JSON on its own.
        for line in fs::read_to_string(&path).expect("read").lines() {
            serde_json::from_str::<serde_json::Value>(line).expect("a JSON line");
        }
    }

    /// An append that fails (here a directory took the journal's name after the start; in
    /// life a full disk or a removed directory) is counted: the drain's record is missing,
    /// and `drain_agent_journal_write_failures_total` says so. Before, only the log did.
    #[test]
    fn a_failed_append_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drains.jsonl");
        let journal = Journal::open(&path, 4096).expect("open");
        journal.append(&record(1)).expect("append");
        assert_eq!(journal.failed_appends(), 0);
        fs::remove_file(&path).expect("remove");
        fs::create_dir(&path).expect("a directory in its place");
        assert!(journal.append(&record(2)).is_err());
        assert!(journal.append(&record(3)).is_err());
        assert_eq!(journal.failed_appends(), 2);
        fs::remove_dir(&path).expect("the directory gone");
        journal.append(&record(4)).expect("append again");
        assert_eq!(journal.failed_appends(), 2, "a count since the start");
    }

    /// Found by an audit: two agents on one `--journal` (an upgrade's overlap) that both
    /// found the file full both rotated it: the second rename moved the first one's new,
    /// nearly empty file over `PATH.1`, and the full file's records were gone. An append
    /// now holds `flock` on the file it appends to, and one that finds the name moved on
    /// while it waited appends to the new file instead of rotating again.
    #[test]
    fn two_agents_rotating_at_once_lose_no_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drains.jsonl");
        let journal = Arc::new(Journal::open(&path, 4096).expect("open"));
        let mut id = 0;
        let line = serde_json::to_vec(&record(10_000)).expect("json").len() as u64 + 1;
        // Full: the next record does not fit.
        while fs::metadata(&path).expect("size").len() + line <= 4096 {
            id += 1;
            journal.append(&record(id)).expect("append");
        }
        let full = id;
        // The other agent, in the middle of its own rotation: it holds the file's lock.
        let other = OpenOptions::new().append(true).open(&path).expect("open");
        rustix::fs::flock(&other, rustix::fs::FlockOperation::LockExclusive).expect("flock");
        let appending = {
            let journal = Arc::clone(&journal);
            std::thread::spawn(move || journal.append(&record(10_000)))
        };
        std::thread::sleep(Duration::from_millis(200));
        // It rotates and writes its record to the new file, then lets go.
        fs::rename(&path, journal.rotated()).expect("rotate");
        let mut new = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .expect("new file");
        new.write_all(&serde_json::to_vec(&record(20_000)).expect("json"))
            .expect("write");
        new.write_all(b"\n").expect("write");
        drop(other);
        appending.join().expect("join").expect("append");
        let ids: Vec<u64> = journal
            .read_records::<DrainRecord>(1000)
            .iter()
            .map(|record| record.id)
            .collect();
        for id in (1..=full).chain([20_000, 10_000]) {
            assert!(ids.contains(&id), "record {id} lost: {ids:?}");
        }
    }

    #[test]
    fn a_bad_path_fails_at_open() {
        assert!(Journal::open(Path::new("/nonexistent/dir/drains.jsonl"), 4096).is_err());
    }

    /// A record the test can tell apart from any other.
    fn ids(journal: &Journal) -> Vec<u64> {
        journal
            .read_records::<DrainRecord>(1000)
            .iter()
            .map(|r| r.id)
            .collect()
    }

    fn error_of(result: Result<Journal>) -> String {
        match result {
            Ok(_) => panic!("the journal was opened"),
            Err(problem) => format!("{problem:#}"),
        }
    }

    #[test]
    fn a_symlink_at_the_path_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").expect("write victim");
        let link = dir.path().join("drains.jsonl");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        let message = error_of(Journal::open(&link, 4096));
        assert!(message.contains("symbolic link"), "{message}");
        assert!(message.contains(&*link.to_string_lossy()), "{message}");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "precious\n");

        // A dangling link: its target is not created either.
        let missing = dir.path().join("created-through-the-link");
        let dangling = dir.path().join("dangling.jsonl");
        std::os::unix::fs::symlink(&missing, &dangling).expect("symlink");
        let message = error_of(Journal::open(&dangling, 4096));
        assert!(message.contains("symbolic link"), "{message}");
        assert!(!missing.exists(), "the link's target was created");
    }

    #[test]
    fn a_symlink_at_the_rotated_path_is_refused_at_start_and_replaced_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drains.jsonl");
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").expect("write victim");
        let rotated = dir.path().join("drains.jsonl.1");
        std::os::unix::fs::symlink(&victim, &rotated).expect("symlink");
        let message = error_of(Journal::open(&path, 4096));
        assert!(message.contains("drains.jsonl.1"), "{message}");
        assert!(message.contains("symbolic link"), "{message}");

        // A link that appears at PATH.1 while the agent runs: the rotation replaces it.
        fs::remove_file(&rotated).expect("remove link");
        let journal = Journal::open(&path, 4096).expect("open");
        std::os::unix::fs::symlink(&victim, &rotated).expect("symlink");
        for id in 1..=100 {
            journal.append(&record(id)).expect("append");
        }
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "precious\n");
        assert!(
            fs::symlink_metadata(&rotated)
                .expect("rotated")
                .file_type()
                .is_file()
        );
    }

    #[test]
    fn a_fifo_is_refused_at_once() {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("drains.jsonl");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let (done, result) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = done.send(Journal::open(&path, 4096).map(|_| ()));
        });
        let answer = result.recv_timeout(std::time::Duration::from_secs(2));
        let Ok(answer) = answer else {
            // Release the blocked open (it waits for a reader) before failing.
            let _reader = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo);
            panic!("opening a FIFO as the journal blocked for 2 s");
        };
        let message = format!("{:#}", answer.expect_err("a FIFO is refused"));
        assert!(message.contains("FIFO"), "{message}");
        assert!(message.contains("not a regular file"), "{message}");
    }

    #[test]
    fn devices_directories_and_sockets_are_refused() {
        let message = error_of(Journal::open(Path::new("/dev/zero"), 4096));
        assert!(message.contains("/dev/zero"), "{message}");
        assert!(message.contains("character device"), "{message}");

        let dir = tempfile::tempdir().expect("tempdir");
        let message = error_of(Journal::open(dir.path(), 4096));
        assert!(
            message.contains("a directory, not a regular file"),
            "{message}"
        );

        let socket = dir.path().join("drains.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let message = error_of(Journal::open(&socket, 4096));
        assert!(
            message.contains("a socket, not a regular file"),
            "{message}"
        );
    }

    #[test]
    fn a_new_journal_is_mode_0600_and_an_existing_one_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drains.jsonl");
        let journal = Journal::open(&path, 4096).expect("open");
        journal.append(&record(1)).expect("append");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&path), 0o600);
        // Rotated, the new file is 0600 too.
        for id in 2..=100 {
            journal.append(&record(id)).expect("append");
        }
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&journal.rotated()), 0o600);

        // An existing 0644 journal is used (with a warning) and not changed.
        let loose = dir.path().join("loose.jsonl");
        fs::write(&loose, "").expect("write");
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).expect("chmod");
        Journal::open(&loose, 4096)
            .expect("open")
            .append(&record(1))
            .expect("append");
        assert_eq!(mode(&loose), 0o644);
    }

    /// Peak resident memory of this process so far, KiB (`VmHWM`).
    fn peak_rss_kib() -> u64 {
        fs::read_to_string("/proc/self/status")
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    #[test]
    fn a_huge_journal_is_read_only_at_its_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drains.jsonl");
        // 1 GiB of NUL bytes (sparse: no disk used), one newline, then three records.
        let file = fs::File::create(&path).expect("create");
        file.set_len(1 << 30).expect("set_len");
        drop(file);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(b"\n").expect("newline");
        for id in 1..=3 {
            let mut line = serde_json::to_vec(&record(id)).expect("json");
            line.push(b'\n');
            file.write_all(&line).expect("write");
        }
        drop(file);
        let before = peak_rss_kib();
        let started = std::time::Instant::now();
        let journal = Journal::open(&path, 4096).expect("open");
        assert_eq!(ids(&journal), [1, 2, 3]);
        let took = started.elapsed();
        let grew = peak_rss_kib().saturating_sub(before);
        assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
        assert!(grew < 64 << 10, "peak memory grew by {grew} KiB");
        println!("1 GiB journal: read in {took:?}, peak memory +{grew} KiB");
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_the_next_record_starts_a_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drains.jsonl");
        let journal = Journal::open(&path, 1 << 20).expect("open");
        journal.append(&record(1)).expect("append");
        journal.append(&record(2)).expect("append");
        // A write cut short: a whole record but no newline, then the agent restarts.
        let mut torn = serde_json::to_vec(&record(3)).expect("json");
        torn.truncate(torn.len() - 1);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open")
            .write_all(&torn)
            .expect("write");
        let journal = Journal::open(&path, 1 << 20).expect("reopen");
        assert_eq!(ids(&journal), [1, 2]);
        journal.append(&record(4)).expect("append");
        assert_eq!(
            ids(&Journal::open(&path, 1 << 20).expect("reopen")),
            [1, 2, 4]
        );
        let text = fs::read_to_string(&path).expect("read");
        let last = text.lines().last().expect("a line");
        assert_eq!(
            serde_json::from_str::<DrainRecord>(last)
                .expect("a record")
                .id,
            4
        );
        // Even a complete JSON object without its newline is a torn line (the write of a
        // line is one write: without the newline it did not finish).
        OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open")
            .write_all(&serde_json::to_vec(&record(5)).expect("json"))
            .expect("write");
        assert_eq!(
            ids(&Journal::open(&path, 1 << 20).expect("reopen")),
            [1, 2, 4]
        );
    }

    #[test]
    fn the_tail_window_keeps_a_line_that_starts_at_its_edge_and_drops_a_cut_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let line = |id: u64, pad: usize| {
            // JSON allows leading white space: a record padded to a chosen length.
            let mut line = vec![b' '; pad];
            line.extend(serde_json::to_vec(&record(id)).expect("json"));
            line.push(b'\n');
            line
        };
        let rest = [line(2, 0), line(3, 0)].concat();
        let unpadded = line(1, 0).len();
        let window = usize::try_from(TAIL_BYTES).expect("usize");
        for (extra, expected) in [(0, vec![1, 2, 3]), (1, vec![2, 3])] {
            // Record 1 starts exactly at the window's first byte, or one byte before it.
            let first = line(1, window - rest.len() - unpadded + extra);
            let path = dir.path().join(format!("drains-{extra}.jsonl"));
            fs::write(&path, [b"garbage\n".as_slice(), &first, &rest].concat()).expect("write");
            let journal = Journal::open(&path, 4096).expect("open");
            assert_eq!(
                ids(&journal),
                expected,
                "record 1 {extra} byte(s) before the window"
            );
        }
    }

    /// Audit (state owner): only the journal's mode was checked, never whose it was or
    /// whose its directory: a user owning the directory (one made under /tmp, 0700) could
    /// rename a journal of its own over it, read back at the next start. Both are refused,
    /// naming the flag.
    #[test]
    fn a_journal_or_directory_another_user_owns_is_refused() {
        if !rustix::process::geteuid().is_root() {
            crate::test_skip::skip(
                "a_journal_or_directory_another_user_owns_is_refused",
                "chown needs root",
            );
            return;
        }
        let root = tempfile::tempdir().expect("dir");
        let users = root.path().join("users");
        fs::create_dir(&users).expect("dir");
        std::os::unix::fs::chown(&users, Some(65_534), Some(65_534)).expect("chown");
        let refused = Journal::open(&users.join("drains.jsonl"), 1 << 20)
            .err()
            .expect("a directory of uid 65534 is refused");
        let text = format!("{refused:#}");
        assert!(
            text.contains("owned by uid 65534") && text.contains("--journal"),
            "{text}"
        );
        assert!(!users.join("drains.jsonl").exists(), "nothing made there");
        // A journal of that user's in a directory of the agent's.
        let theirs = root.path().join("theirs.jsonl");
        fs::write(&theirs, "").expect("journal");
        std::os::unix::fs::chown(&theirs, Some(65_534), Some(65_534)).expect("chown");
        let refused = Journal::open(&theirs, 1 << 20)
            .err()
            .expect("a journal of uid 65534 is refused");
        let text = format!("{refused:#}");
        assert!(
            text.contains("owned by uid 65534") && text.contains("--journal"),
            "{text}"
        );
        // The agent's own.
        Journal::open(&root.path().join("ours.jsonl"), 1 << 20).expect("its own journal");
    }
}
