//! The sweep after a repair walk: drops the entries of tracked sockets that the walk did not
//! find open, whose closes the handler missed (the kernel skipped its run).
//!
//! The rule, and why each dead socket is un-counted exactly once (the kernel half is
//! `forget_stale_socket` and `being_forgotten` in the eBPF program):
//! 1. mark: put the addresses in `FORGETTING`, then set `FORGETTING_NOW`;
//! 2. wait for an RCU grace period (`rcu::grace_period`): every handler run that could have
//!    missed the mark has ended, and every later close at a marked address leaves the entry
//!    there alone;
//! 3. run `forget_stale_socket` for each address: it re-checks that the entry is stale and
//!    drops it; nobody else can remove or replace it meanwhile;
//! 4. unmark: clear `FORGETTING_NOW`, then the addresses.
//!
//! Without the mark a close of a newer socket at the same address could drop the entry
//! between the forgetter's look-up and its delete, and a passive socket reusing the memory
//! could insert a fresh one that the forgetter would then delete: the dead socket
//! un-counted twice, a live one not at all, a count one too low with nothing doubted.
//! A tracked socket that closes while marked keeps its entry (`error_index::CLOSE_DEFERRED`,
//! which asks for another repair walk): too high until then, never too low.

use anyhow::{Context as _, Result};
use aya::programs::{RawTracePoint, RawTracePointRunOptions, TestRun as _};
use drain_agent_common::FORGET_BATCH;
use log::warn;

use super::Kernel;

/// Drops one stale entry; run with `BPF_PROG_TEST_RUN`, never attached (loaded with the
/// walker, `walk::load_walker`).
pub(super) const FORGETTER: &str = "forget_stale_socket";

impl Kernel {
    /// Drops the entries at `stale` that are still stale against a walk that began at
    /// `walk_started_ns` (see the module documentation). When no grace period can be
    /// waited for, drops nothing and says so: the counts stay too high, never too low.
    pub(super) fn forget_stale(&mut self, stale: &[u64], walk_started_ns: u64) -> Result<()> {
        if self.grace_periods.is_err() {
            // Said once at start.
            return Ok(());
        }
        for batch in stale.chunks(FORGET_BATCH as usize) {
            // 1. Mark.
            let mut marked = Vec::with_capacity(batch.len());
            for sk in batch {
                if self.forgetting.insert(sk, 1, 0).is_ok() {
                    marked.push(*sk);
                }
            }
            let swept = self.set_forgetting_now(1).and_then(|()| {
                // 2. Wait for every handler run that may have missed the mark.
                self.grace_period()
                    .context("cannot wait for running programs; no dead socket's entry dropped")?;
                // 3. Drop the entries that are still stale.
                self.run_forgetter(&marked, walk_started_ns)
            });
            // 4. Unmark, whatever happened: the flag first, then the addresses. A close that
            // read the flag just before may still find its address and leave its entry to
            // the next walk (`close_deferred`): too high until then, never too low.
            let cleared = self.set_forgetting_now(0);
            for sk in &marked {
                let _ = self.forgetting.remove(sk);
            }
            if let Err(error) = swept {
                warn!("{error:#}");
                return cleared;
            }
            cleared?;
        }
        Ok(())
    }

    fn set_forgetting_now(&mut self, value: u64) -> Result<()> {
        self.forgetting_now
            .set(0, value, 0)
            .context("cannot write FORGETTING_NOW")
    }

    fn run_forgetter(&self, marked: &[u64], walk_started_ns: u64) -> Result<()> {
        let forget: &RawTracePoint = self
            .ebpf
            .program(FORGETTER)
            .context("the eBPF object has no forget_stale_socket")?
            .try_into()
            .context("forget_stale_socket is not a raw tracepoint")?;
        for sk in marked {
            let mut options = RawTracePointRunOptions::new();
            options.args[0] = *sk;
            options.args[1] = walk_started_ns;
            forget
                .test_run(options)
                .context("cannot run forget_stale_socket")?;
        }
        Ok(())
    }
}
