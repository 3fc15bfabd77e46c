//! A test of xtask's own that cannot run here (no root, a tool missing): it fails under
//! `DRAIN_AGENT_REQUIRE_KERNEL=1` (CI, where everything can run), and otherwise prints the
//! line `cargo xtask test` counts as skipped rather than passed (`is_skip_line`), as
//! drain-agent's tests/common `report_skip` does.

use std::io::Write as _;

/// `SKIP <test>: <why>; …`: what [`skip`] prints.
pub fn skip_line(test: &str, why: &str) -> String {
    format!("SKIP {test}: {why}; set DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead")
}

/// `test` cannot run here because of `why`; the caller returns right after. Under
/// `DRAIN_AGENT_REQUIRE_KERNEL=1` this fails the test; otherwise it writes [`skip_line`]
/// to the process's standard output itself rather than through `println!`, which libtest
/// captures (and shows only for a failure): past the capture it shows in every run, and
/// `cargo xtask test` counts it.
pub fn skip(test: &str, why: &str) {
    assert!(
        !std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1"),
        "{test} cannot run ({why}) and DRAIN_AGENT_REQUIRE_KERNEL=1"
    );
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", skip_line(test, why));
    let _ = out.flush();
}
