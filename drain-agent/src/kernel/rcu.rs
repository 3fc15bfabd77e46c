//! Waiting for every handler run that may have missed a mark the agent just set: the one
//! synchronisation between the agent and the programs, used by the endpoint reclaim
//! (`reclaim`) and the sweep of dead sockets' entries (`forget`).

use anyhow::{Context as _, Result, bail};

/// Returns once every program run that began before the call has ended, so that every run
/// after it sees what the agent wrote before the call.
///
/// Every run of the handler is an RCU read-side critical section: tracepoint probes run
/// with preemption disabled, `__bpf_trace_run()` and `bpf_iter_run_prog()` take
/// `rcu_read_lock()`, and so does `BPF_PROG_TEST_RUN`. `membarrier(MEMBARRIER_CMD_GLOBAL)`
/// runs `synchronize_rcu()` (kernel/sched/membarrier.c, Linux >= 4.16 under this name),
/// which waits for all of them.
///
/// With one CPU online membarrier returns at once. That is still a grace period unless
/// the kernel is `PREEMPT_RT`: a run that cannot be preempted has ended before this
/// thread runs on the only CPU, but on RT kernels the programs run preemptibly. There,
/// and on `nohz_full` systems (where membarrier refuses with EINVAL), this fails and the
/// caller leaves things as they are: counts stay too high, never too low.
pub(super) fn grace_period() -> Result<()> {
    if let Some(problem) = unavailable() {
        bail!("{problem}");
    }
    if one_cpu_online() {
        return Ok(());
    }
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    if unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("membarrier(MEMBARRIER_CMD_GLOBAL)");
    }
    Ok(())
}

/// Why [`grace_period`] cannot work on this machine as it is now, if it cannot: the agent
/// says so once at start (the membarrier query leaves `MEMBARRIER_CMD_GLOBAL` out on
/// `nohz_full` systems, kernel/sched/membarrier.c).
pub(super) fn unavailable() -> Option<String> {
    if one_cpu_online() {
        return preempt_rt().then(|| {
            "one CPU online on a PREEMPT_RT kernel: no grace period can be waited for".to_owned()
        });
    }
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let supported = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0) };
    (supported < 0 || supported & MEMBARRIER_CMD_GLOBAL == 0).then(|| {
        "membarrier(MEMBARRIER_CMD_GLOBAL) is not available (nohz_full, or Linux < 4.16)".to_owned()
    })
}

const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;

fn one_cpu_online() -> bool {
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    online < 2
}

/// Whether the running kernel is built with `PREEMPT_RT` (its version string says so;
/// Linux >= 6.12 also has `/sys/kernel/realtime`). Unknown counts as RT: the safe answer.
fn preempt_rt() -> bool {
    if std::fs::read_to_string("/sys/kernel/realtime").is_ok_and(|text| text.trim() == "1") {
        return true;
    }
    std::fs::read_to_string("/proc/sys/kernel/version")
        .map_or(true, |version| version.contains("PREEMPT_RT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grace_period_can_be_waited_for_here() {
        // The machines that run the tests have no PREEMPT_RT or nohz_full kernel.
        assert_eq!(unavailable(), None);
        grace_period().expect("a grace period");
    }
}
