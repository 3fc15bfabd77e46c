//! Opening a file at a path trusted for nothing: the drain journal's and the state file's
//! (issue 22: the agent runs as root on a shared node, and both hold client addresses or
//! `/health` gates). One way to open, and one vocabulary for what was found instead.

use std::{
    fs::{self, File, FileType, Metadata, OpenOptions},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
};

use anyhow::{Context as _, Result};

/// What a file type is, in a start-up error.
pub(super) fn kind_of(file_type: FileType) -> &'static str {
    if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "of an unknown type"
    }
}

/// Refuses `path` (`what`: the state directory, the journal's directory or file, given with
/// `flag`) when another user than the agent's own owns it: its owner may replace what the
/// agent keeps there, whatever its mode (an owner can `chmod` it), and the agent reads it
/// back at its next start (drains resumed with their settings, `on_timeout=close`
/// included; held `/health` gates; records). The agent's user is root wherever it is
/// deployed; one started as another user keeps its files in directories of its own.
pub(super) fn refuse_foreign_owner(
    what: &str,
    path: &Path,
    meta: &Metadata,
    flag: &str,
) -> Result<()> {
    let agent = rustix::process::geteuid().as_raw();
    let owner = meta.uid();
    anyhow::ensure!(
        owner == agent,
        "{what} {} is owned by uid {owner}, not by the agent's user (uid {agent}): that user could replace what the agent keeps there and reads back at its next start; refused. `chown {agent}` it (and `chmod go-w`), or choose another with {flag}",
        path.display()
    );
    Ok(())
}

/// How a file is opened.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Read and append, created with this mode if missing.
    Append(u32),
    /// Read only, never created.
    Read,
}

/// A file at an untrusted path, as its errors name it.
pub(super) struct Named {
    /// "the drain journal", "the state file".
    pub what: &'static str,
    /// What a refusal of `path` adds (advice for what was found there).
    pub advice: fn(FileType) -> &'static str,
}

impl Named {
    /// The start-up error for a path that is not a regular file of its own.
    pub(super) fn refuse(&self, path: &Path, file_type: FileType) -> anyhow::Error {
        anyhow::anyhow!(
            "{} {} is {}, not a regular file: refused{}",
            self.what,
            path.display(),
            kind_of(file_type),
            (self.advice)(file_type)
        )
    }

    /// Opens `path` only if it is a regular file that is not a symbolic link, without ever
    /// blocking on what is there; `None` when nothing is there (read only).
    ///
    /// `O_NOFOLLOW` fails the open (ELOOP) when the last component is a link, also with
    /// `O_CREAT` (a dangling link is not followed to create its target). `O_NONBLOCK`
    /// because opening a FIFO otherwise blocks until the other end is opened (for ever, at
    /// start); with it the open returns at once and `fstat` on the descriptor (not on the
    /// path, which could be swapped in between) says what was opened. On a regular file
    /// `O_NONBLOCK` has no effect on Linux (open(2)); it is cleared anyway, so the
    /// descriptor is the one a plain open gives whatever a file system makes of the flag.
    /// Chosen over `O_PATH` and a second open, which would check one file and then open a
    /// name again.
    pub(super) fn open_regular(&self, path: &Path, access: Access) -> Result<Option<File>> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
        if let Access::Append(mode) = access {
            options.append(true).create(true).mode(mode);
        }
        let file = match options.open(path) {
            Ok(file) => file,
            Err(problem)
                if access == Access::Read && problem.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(None);
            }
            Err(problem) => {
                // ELOOP (a link), EISDIR (a directory opened for writing), ENXIO (a
                // socket): name what is there rather than the errno.
                if let Ok(meta) = fs::symlink_metadata(path)
                    && !meta.file_type().is_file()
                {
                    return Err(self.refuse(path, meta.file_type()));
                }
                return Err(problem)
                    .with_context(|| format!("cannot open {} {}", self.what, path.display()));
            }
        };
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {} {}", self.what, path.display()))?;
        if !meta.file_type().is_file() {
            return Err(self.refuse(path, meta.file_type()));
        }
        rustix::fs::fcntl_getfl(&file)
            .and_then(|flags| rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK))
            .with_context(|| format!("cannot clear O_NONBLOCK on {}", path.display()))?;
        Ok(Some(file))
    }
}
