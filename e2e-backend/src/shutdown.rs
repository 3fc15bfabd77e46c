//! SIGTERM and SIGINT turned into one shutdown notice that every thread can wait on.
//!
//! The signals are blocked in every thread and taken by one thread with `sigwait`. When one
//! arrives, that thread closes the write end of a pipe: from then on the read end is readable
//! (end of file) for everybody who polls it, so idle connections wake up at once, with no
//! polling interval.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// The shutdown notice: a flag, and a file descriptor that becomes readable when it is set.
pub struct Shutdown {
    requested: AtomicBool,
    notice: OwnedFd,
}

/// What [`wait_readable`] saw first.
#[derive(Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// The socket has data (or an end of file, or an error) to read.
    Readable,
    /// Shutdown was requested.
    Shutdown,
    /// The timeout passed.
    Timeout,
}

/// Blocks SIGTERM and SIGINT in the calling thread, and so in every thread it starts later.
/// Call it first in `main`, before any thread exists.
pub fn block_stop_signals() -> Result<()> {
    let set = stop_signals();
    // SAFETY: `set` is an initialised signal set; a null old set is allowed.
    let error =
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if error != 0 {
        bail!("pthread_sigmask: {}", io::Error::from_raw_os_error(error));
    }
    Ok(())
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only adds valid signal numbers.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        set
    }
}

impl Shutdown {
    /// Starts the thread that waits for SIGTERM or SIGINT. `on_signal` runs on that thread with
    /// the signal's name, after the flag is set and before anybody is woken.
    pub fn listen(on_signal: impl FnOnce(&str) + Send + 'static) -> Result<Arc<Self>> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error()).context("pipe2");
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
        let (notice, trigger) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let shutdown = Arc::new(Self {
            requested: AtomicBool::new(false),
            notice,
        });
        let flag = Arc::clone(&shutdown);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let name = wait_for_stop_signal();
                flag.requested.store(true, Ordering::SeqCst);
                on_signal(name);
                drop(trigger);
            })
            .context("cannot start the signal thread")?;
        Ok(shutdown)
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn notice_fd(&self) -> RawFd {
        self.notice.as_raw_fd()
    }
}

fn wait_for_stop_signal() -> &'static str {
    let set = stop_signals();
    loop {
        let mut signal = 0;
        // SAFETY: `set` is initialised and `signal` is a valid place for the answer.
        if unsafe { libc::sigwait(&raw const set, &raw mut signal) } == 0 {
            return if signal == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
        }
    }
}

/// Waits until `fd` is readable, shutdown is requested (only if `shutdown` is given), or
/// `timeout` passes (`None`: no limit).
pub fn wait_readable(
    fd: RawFd,
    shutdown: Option<&Shutdown>,
    timeout: Option<Duration>,
) -> io::Result<Wakeup> {
    let mut fds = vec![libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(shutdown) = shutdown {
        fds.push(libc::pollfd {
            fd: shutdown.notice_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    let timeout_ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    loop {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if ready == 0 {
            return Ok(Wakeup::Timeout);
        }
        // A request that has already arrived is served even during shutdown.
        if fds[0].revents != 0 {
            return Ok(Wakeup::Readable);
        }
        return Ok(Wakeup::Shutdown);
    }
}
