//! The accept loop's error handling, shared by every listener of the agent.

use std::{future::Future, io, net::SocketAddr, pin::Pin, time::Duration};

use log::warn;
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};

/// How long to pause accepting after an accept error that is not about one connection
/// (EMFILE, ENFILE, ENOBUFS...): retrying at once would spin, and the error is not fatal.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The accept loop's error handling, shared by every listener of the agent (HTTP here, the
/// agent-check protocol in [`crate::http::agentcheck`]).
#[derive(Default)]
pub struct Acceptor {
    logged_at: Option<Instant>,
}

impl Acceptor {
    /// The next connection of `listener`, or None once `shutdown` completes. An error about
    /// one connection (reset before it was taken) is skipped; any other (EMFILE and friends)
    /// is not fatal, but retrying at once would spin: it pauses ACCEPT_ERROR_PAUSE and is
    /// logged, with `what()`, at most every 10 s.
    pub async fn next<F: Future<Output = ()>>(
        &mut self,
        listener: &TcpListener,
        mut shutdown: Pin<&mut F>,
        what: impl Fn() -> String,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.as_mut() => return None,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok(pair) => return Some(pair),
                Err(problem) if is_per_connection(&problem) => {}
                Err(problem) => {
                    if self
                        .logged_at
                        .is_none_or(|at| at.elapsed() > Duration::from_secs(10))
                    {
                        warn!("{}: {problem} (pausing {ACCEPT_ERROR_PAUSE:?})", what());
                        self.logged_at = Some(Instant::now());
                    }
                    tokio::select! {
                        biased;
                        () = shutdown.as_mut() => return None,
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    }
                }
            }
        }
    }
}

/// Accept errors that concern one connection only (retry at once).
fn is_per_connection(problem: &io::Error) -> bool {
    matches!(
        problem.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}
