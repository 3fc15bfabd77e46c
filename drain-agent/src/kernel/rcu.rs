//! Waiting for every handler run that may have missed a mark the agent just set: the one
//! synchronisation between the agent and the programs, used by the endpoint reclaim
//! (`reclaim`) and the sweep of dead sockets' entries (`forget`).

use anyhow::{Context as _, Result, bail};
use rustix::thread::{MembarrierCommand, membarrier, membarrier_query};

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
    membarrier(MembarrierCommand::Global)
        .map_err(std::io::Error::from)
        .context("membarrier(MEMBARRIER_CMD_GLOBAL)")
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
    // An empty answer when the syscall fails (rustix's `membarrier_query`).
    (!membarrier_query().contains_command(MembarrierCommand::Global)).then(|| {
        "membarrier(MEMBARRIER_CMD_GLOBAL) is not available (nohz_full, or Linux < 4.16)".to_owned()
    })
}

/// Whether at most one CPU is online, from the kernel's list of online CPUs
/// (`/sys/devices/system/cpu/online`, as glibc's `sysconf(_SC_NPROCESSORS_ONLN)` reads it).
/// Unreadable counts as several: then [`grace_period`] runs membarrier, which is right for
/// any number of CPUs.
fn one_cpu_online() -> bool {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .is_ok_and(|list| cpus_in_list(&list) == Some(1))
}

/// The number of CPUs in a kernel CPU list ("0-3,5"), or `None` if it is not one.
fn cpus_in_list(list: &str) -> Option<usize> {
    let mut count = 0usize;
    for range in list.trim().split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let first: usize = first.parse().ok()?;
        let last: usize = last.parse().ok()?;
        count = count.checked_add(last.checked_sub(first)?.checked_add(1)?)?;
    }
    Some(count)
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

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(cpus_in_list("0\n"), Some(1));
        assert_eq!(cpus_in_list("0-3,5"), Some(5));
        assert_eq!(cpus_in_list("0-1,4-5,7\n"), Some(5));
        assert_eq!(cpus_in_list(""), None);
        assert_eq!(cpus_in_list("3-1"), None);
    }
}
