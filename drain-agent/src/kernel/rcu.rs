//! Waiting for every handler run that may have missed a mark the agent just set: the one
//! synchronisation between the agent and the programs, used by the endpoint reclaim
//! (`reclaim`), the sweep of dead sockets' entries (`forget`) and the start of a pod
//! namespace's listener count (`pod`).

use std::os::fd::{AsFd as _, OwnedFd};

use anyhow::{Context as _, Result};
use aya_obj::generated::bpf_map_type;

use super::raw;

/// Waits for RCU grace periods: one map of maps with one slot, and the map that slot holds.
///
/// Every run of the handler is an RCU read-side critical section: `__bpf_trace_run()` (the
/// raw tracepoint and `tp_btf`), `trace_call_bpf()` (the classic tracepoint) and
/// `bpf_iter_run_prog()` take `rcu_read_lock()`, and so does `BPF_PROG_TEST_RUN`. So
/// `synchronize_rcu()` waits for all of them, and an update of a map of maps from user
/// space calls it before it returns, whatever the number of CPUs and the preemption model
/// (kernel/bpf/syscall.c `maybe_wait_bpf_programs()`, Linux >= 4.19: "Wait for any running
/// BPF programs to complete so that userspace, when we return to it, knows that all
/// programs that could be running use the new map value"; the kernel's own selftests wait
/// for a grace period this way).
///
/// Not `membarrier(MEMBARRIER_CMD_GLOBAL)`, which the agent used before: it skips
/// `synchronize_rcu()` when one CPU is online (kernel/sched/membarrier.c), and refuses on
/// `nohz_full` systems. One CPU is a grace period only if no run can be preempted, and
/// since tracepoints call their probes under SRCU rather than with preemption off, a
/// handler run can be preempted on a preemptible kernel (PREEMPT_DYNAMIC, `PREEMPT_RT`):
/// a reclaim that did not wait could free an endpoint a preempted open was about to count
/// into.
pub(super) struct GracePeriods {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GracePeriods {
    /// Makes the two maps (a few hundred bytes of kernel memory).
    pub(super) fn new() -> Result<Self> {
        let four = u32::try_from(size_of::<u32>()).context("key size")?;
        let inner = raw::map_create(&raw::MapKind {
            map_type: bpf_map_type::BPF_MAP_TYPE_ARRAY,
            inner_map: None,
            key_size: four,
            value_size: four,
            max_entries: 1,
            flags: 0,
            name: b"GRACE_INNER",
        })
        .context("cannot make the map a grace period's update stores")?;
        let outer = raw::map_create(&raw::MapKind {
            map_type: bpf_map_type::BPF_MAP_TYPE_ARRAY_OF_MAPS,
            inner_map: Some(inner.as_fd()),
            key_size: four,
            value_size: four,
            max_entries: 1,
            flags: 0,
            name: b"GRACE_PERIODS",
        })
        .context("cannot make the map of maps a grace period is waited on")?;
        Ok(Self { outer, inner })
    }

    /// The same two maps through descriptors of its own: to wait without the kernel's lock.
    pub(super) fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            outer: self
                .outer
                .try_clone()
                .context("cannot duplicate a map descriptor")?,
            inner: self
                .inner
                .try_clone()
                .context("cannot duplicate a map descriptor")?,
        })
    }

    /// Returns once every program run that began before the call has ended, so that every
    /// run after it sees what the agent wrote before the call.
    pub(super) fn wait(&self) -> Result<()> {
        let inner = self.inner.as_fd();
        let fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&inner)).context("bad fd")?;
        raw::map_update_u32(self.outer.as_fd(), 0, fd)
            .context("cannot wait for an RCU grace period (an update of a map of maps)")
    }
}

impl super::Kernel {
    /// Waits for an RCU grace period ([`GracePeriods::wait`]); an error if none can be
    /// waited for here (said once at start).
    pub(super) fn grace_period(&self) -> Result<()> {
        self.grace_periods()?.wait()
    }

    /// What [`Kernel::grace_period`](super::Kernel) waits on; an error if none can be
    /// waited for here.
    pub(super) fn grace_periods(&self) -> Result<&GracePeriods> {
        self.grace_periods
            .as_ref()
            .map_err(|problem| anyhow::anyhow!("no grace period can be waited for: {problem}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audit (kernel side): with one CPU online the wait (then `membarrier`) returned at
    /// once, on the argument that a program run cannot be preempted. Since tracepoints call
    /// their probes under SRCU-fast, not with preemption off, a handler run can be
    /// preempted on a preemptible kernel (PREEMPT_DYNAMIC, as here) by the agent's reclaim,
    /// which then deleted an endpoint the run held a pointer into: an open counted into
    /// freed memory, and a scoped answer drained over it. The wait no longer looks at the
    /// CPUs. A real grace period takes milliseconds here (`synchronize_rcu()`: about 8 ms on
    /// the test VM); the one-CPU shortcut returned in microseconds (62 µs).
    #[test]
    #[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn a_grace_period_is_waited_for_whatever_the_cpus() {
        let periods = match GracePeriods::new() {
            Ok(periods) => periods,
            Err(problem) => {
                crate::test_skip::skip(
                    "a_grace_period_is_waited_for_whatever_the_cpus",
                    &format!("{problem:#}"),
                );
                return;
            }
        };
        for _ in 0..3 {
            let started = std::time::Instant::now();
            periods.wait().expect("a grace period");
            assert!(
                started.elapsed() >= std::time::Duration::from_millis(1),
                "returned after {:?}: no grace period was waited for",
                started.elapsed()
            );
        }
    }
}
