//! The open-file limit (RLIMIT_NOFILE). A systemd unit without `LimitNOFILE=` starts the
//! agent with a soft limit of 1,024: too few for its eBPF objects plus hundreds of HTTP
//! connections. The soft limit may be raised to the hard one without privileges.

use std::io;

use anyhow::{Context as _, Result};

fn get() -> Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("cannot read the open-file limit");
    }
    Ok(limit)
}

/// The soft open-file limit now.
pub fn soft_limit() -> Result<u64> {
    Ok(get()?.rlim_cur)
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit now in force.
pub fn raise_soft_limit() -> Result<u64> {
    let mut limit = get()?;
    if limit.rlim_cur >= limit.rlim_max {
        return Ok(limit.rlim_cur);
    }
    let before = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads one valid rlimit struct; soft <= hard, so no privilege needed.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| {
            format!(
                "cannot raise the open-file limit from {before} to {}",
                limit.rlim_max
            )
        });
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit() {
        let raised = raise_soft_limit().expect("raise");
        let limit = get().expect("get");
        assert_eq!(raised, limit.rlim_max);
        assert_eq!(soft_limit().expect("soft"), limit.rlim_max);
    }
}
