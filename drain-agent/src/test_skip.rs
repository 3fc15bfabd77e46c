//! A unit test that cannot run here (no root, socket tables that cannot be read): it fails
//! under `DRAIN_AGENT_REQUIRE_KERNEL=1` (CI, where everything can run), and otherwise says
//! so where `cargo xtask test` counts it as skipped rather than passed. The crate's side of
//! tests/common's `kernel_available` and `report_skip`.

use std::io::Write as _;

/// Whether `DRAIN_AGENT_REQUIRE_KERNEL=1`: a test that cannot run fails instead of skipping.
pub fn required() -> bool {
    std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1")
}

/// `test` cannot run here because of `why`; the caller returns right after. Under
/// `DRAIN_AGENT_REQUIRE_KERNEL=1` this fails the test; otherwise it prints
/// `SKIP <test>: <why>` on a line of its own, to the process's standard output itself
/// rather than through `println!`, which libtest captures (and shows only for a failure):
/// past the capture the line shows in every run, and `cargo xtask test` counts it.
pub fn skip(test: &str, why: &str) {
    assert!(
        !required(),
        "{test} cannot run ({why}) and DRAIN_AGENT_REQUIRE_KERNEL=1"
    );
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "SKIP {test}: {why}; set DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead"
    );
    let _ = out.flush();
}

/// This host's socket-table entry of `stream` (a connection of the test's own), or `None`
/// after [`skip`] when the socket tables do not answer or cannot be read: for tests that need
/// them (the owner checks).
pub fn socket_of_or_skip(
    test: &str,
    stream: &std::net::TcpStream,
) -> Option<crate::sys::sockdiag::TcpSocket> {
    let found = crate::sys::sockdiag::find_one(
        stream.peer_addr().expect("peer"),
        stream.local_addr().expect("local"),
    );
    match found {
        Ok(Some(socket)) => Some(socket),
        Ok(None) => {
            skip(
                test,
                "this host's socket tables do not answer (no inet_diag/tcp_diag)",
            );
            None
        }
        Err(problem) => {
            skip(
                test,
                &format!("this host's socket tables cannot be read: {problem:#}"),
            );
            None
        }
    }
}
