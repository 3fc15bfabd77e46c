//! The open-file limit (RLIMIT_NOFILE). A systemd unit without `LimitNOFILE=` starts the
//! agent with a soft limit of 1,024: too few for its eBPF objects plus hundreds of HTTP
//! connections. The soft limit may be raised to the hard one without privileges.

use std::io;

use anyhow::{Context as _, Result};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// A limit as a number: `RLIM_INFINITY` (rustix's `None`) is `u64::MAX`, as the kernel and
/// libc spell it.
fn number(limit: Option<u64>) -> u64 {
    limit.unwrap_or(u64::MAX)
}

/// The soft open-file limit now.
pub fn soft_limit() -> Result<u64> {
    Ok(number(getrlimit(Resource::Nofile).current))
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit now in force.
pub fn raise_soft_limit() -> Result<u64> {
    let limit = getrlimit(Resource::Nofile);
    let (soft, hard) = (number(limit.current), number(limit.maximum));
    if soft >= hard {
        return Ok(soft);
    }
    // Soft up to hard: no privilege needed.
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised)
        .map_err(io::Error::from)
        .with_context(|| format!("cannot raise the open-file limit from {soft} to {hard}"))?;
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit() {
        let raised = raise_soft_limit().expect("raise");
        let hard = number(getrlimit(Resource::Nofile).maximum);
        assert_eq!(raised, hard);
        assert_eq!(soft_limit().expect("soft"), hard);
    }
}
