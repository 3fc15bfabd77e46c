//! What this binary is: its version and the commit it was built from (drain-agent/build.rs
//! reads the commit from git, or `DRAIN_AGENT_GIT_COMMIT`; "unknown" outside git).

/// The git commit the binary was built from, or "unknown".
pub const GIT_COMMIT: &str = env!("DRAIN_AGENT_GIT_COMMIT");

/// `drain-agent --version`: the package version and the commit, so that a binary found on
/// a node can be traced back to its source.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("DRAIN_AGENT_GIT_COMMIT"),
    ")"
);
