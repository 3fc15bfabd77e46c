//! The drain journal (`--journal PATH`): one JSON line per ended drain, appended, bounded
//! in size (past `--journal-max-bytes` the file moves to `PATH.1` and a new one starts, so at
//! most twice the bound is kept), read back at start so `/drains` survives restarts.

use std::{
    fs::{self, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{Context as _, Result};
use serde::{Serialize, de::DeserializeOwned};

/// An append-only, size-bounded file of drain records (any record type that serde can write
/// and read back: the journal does not depend on the drains that use it).
pub struct Journal {
    path: PathBuf,
    max_bytes: u64,
    /// Appends are serialised: a line is never interleaved with another.
    lock: Mutex<()>,
}

impl Journal {
    /// Opens (creating if needed) the journal at `path`; fails early when it cannot be
    /// written, so a bad path is found at start, not at the first drain.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the drain journal {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            max_bytes: max_bytes.max(4096),
            lock: Mutex::new(()),
        })
    }

    fn rotated(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".1");
        PathBuf::from(name)
    }

    /// Appends one record as a JSON line (rotating first if the file is full).
    pub fn append<R: Serialize>(&self, record: &R) -> Result<()> {
        let _serial = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut line = serde_json::to_vec(record).context("cannot encode a drain record")?;
        line.push(b'\n');
        let size = fs::metadata(&self.path).map_or(0, |meta| meta.len());
        if size + line.len() as u64 > self.max_bytes {
            fs::rename(&self.path, self.rotated()).with_context(|| {
                format!("cannot rotate the drain journal {}", self.path.display())
            })?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open the drain journal {}", self.path.display()))?;
        // One write of a whole line: O_APPEND keeps it in one piece.
        file.write_all(&line)
            .with_context(|| format!("cannot write the drain journal {}", self.path.display()))
    }

    /// The last `limit` records, oldest first (unreadable lines are skipped with a log).
    pub fn read_records<R: DeserializeOwned>(&self, limit: usize) -> Vec<R> {
        let mut records = Vec::new();
        for path in [self.rotated(), self.path.clone()] {
            let Ok(file) = fs::File::open(&path) else {
                continue;
            };
            for (number, line) in BufReader::new(file).lines().enumerate() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<R>(&line) {
                    Ok(record) => records.push(record),
                    Err(problem) => log::warn!(
                        "{}:{}: not a drain record, skipped: {problem}",
                        path.display(),
                        number + 1
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

    #[test]
    fn a_bad_path_fails_at_open() {
        assert!(Journal::open(Path::new("/nonexistent/dir/drains.jsonl"), 4096).is_err());
    }
}
