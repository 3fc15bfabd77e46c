//! What the agent does with kernel state that outlives it (`pin`) once its own is loaded:
//! keeps what it adopted or pins what it made, waits for the lock when another agent holds
//! it, and clears what a killed agent left marked in adopted maps.

use std::sync::{Arc, PoisonError};

use anyhow::{Context as _, Result};
use drain_agent_common::ConnKey;
use log::{info, warn};

use super::{Kernel, KernelState, Origin, pin, pin::PinDir};

impl Kernel {
    /// What happens to the pin directory once the state is loaded (see `pin`): the lock
    /// holder keeps what it adopted or pins what it made, and removes every other layout
    /// (only now, with its handler in place); an agent that found the lock held pins its
    /// state when the other agent is gone.
    pub(super) fn take_ownership(&mut self, pins: Option<PinDir>, held: bool) -> Result<()> {
        let Some(pins) = pins else {
            if self.pin_wanted {
                // `PinDir::open` said why.
                return Ok(());
            }
            info!(
                "kernel state made new and not pinned (--no-pin): counting stops when the agent stops"
            );
            return Ok(());
        };
        if held {
            match self.publication.take() {
                // Adopted: the pins are in place already.
                None if self.state.origin == Origin::Adopted => {}
                None => warn!(
                    "kernel state is not pinned: the handler attached with {} has no link that can be pinned (the classic tracepoint has one from Linux 5.15); counting stops when the agent stops",
                    self.attach
                ),
                Some(publication) => match pins.publish(&publication) {
                    Ok(()) => {
                        self.state = Arc::new(KernelState::new(Origin::New, true));
                        info!("kernel state pinned at {}", pins.layout_display());
                    }
                    Err(problem) => warn!(
                        "kernel state is not pinned (counting stops when the agent stops): {problem:#}"
                    ),
                },
            }
            // Whatever this agent pinned, other layouts are stale, and its handler is in place.
            pins.remove_others();
            *self.pin_lock.lock().unwrap_or_else(PoisonError::into_inner) = Some(pins);
            return Ok(());
        }
        let Some(publication) = self.publication.take() else {
            warn!(
                "kernel state is not pinned: the handler attached with {} has no link that can be pinned (the classic tracepoint has one from Linux 5.15); counting stops when the agent stops",
                self.attach
            );
            return Ok(());
        };
        info!(
            "kernel state made new, not pinned for now: another agent holds {} (an upgrade's overlap); this agent counts with state of its own and pins it there when that agent is gone",
            pins.root_display()
        );
        pin::publish_when_free(
            pins,
            publication,
            Arc::clone(&self.state),
            Arc::clone(&self.pin_stop),
            Arc::clone(&self.pin_lock),
        )
    }

    /// Clears what a killed agent may have left marked in the adopted maps, before this
    /// agent uses them. Each clearing is the step the dead agent would have taken last, and
    /// each is exact whenever it runs:
    /// - `FORGETTING_NOW`, then `FORGETTING` (a sweep's step 4, `forget`): the dead agent's
    ///   forgetter ran synchronously in its process, so none runs any more; a mark only made
    ///   a close leave its entry to a walk (`close_deferred`: too high, never too low), and
    ///   the repair walk at adoption sweeps such entries.
    /// - `RETIRING`, then `RETIRING_PORTS` (a reclaim's step 4, `reclaim`): an open that saw
    ///   a mark counted its socket for the port only, and its close undoes exactly that; an
    ///   entry the dead agent deleted was deleted after its grace period at `active` 0.
    /// - `OWN_ENDPOINTS`: the dead agent's listeners closed with it; its marks would hide
    ///   the connections of an application that listens there later (a count too low).
    ///   This agent marks its own listeners again as it opens them. A connection accepted
    ///   at such an endpoint before this clearing is untracked: the repair walk at adoption
    ///   counts it (open, untracked, with a listener), and until that walk every answer is
    ///   confirmed with the socket tables ([`crate::doubt::Doubt::AdoptedUnwalked`]).
    ///   `OWN_PORTS` stays: a bit there only sends the handler to look up `OWN_ENDPOINTS`.
    /// - `WATCHED_PORTS`: the dead agent's waiters are gone; their bits would only fill the
    ///   ring buffer with events nobody waits for. (The buffer itself is read on by this
    ///   agent: events already in it make waiters re-read, which is harmless.)
    pub(super) fn clear_dead_agents_marks(&mut self) -> Result<()> {
        self.forgetting_now
            .set(0, 0, 0)
            .context("cannot clear FORGETTING_NOW")?;
        let marked: Vec<u64> = self.forgetting.keys().filter_map(Result::ok).collect();
        for sk in marked {
            let _ = self.forgetting.remove(&sk);
        }
        let retiring: Vec<ConnKey> = self.retiring.keys().filter_map(Result::ok).collect();
        for key in retiring {
            let _ = self.retiring.remove(&key);
        }
        for word in 0..drain_agent_common::WATCHED_WORDS {
            self.retiring_ports
                .set(word, 0, 0)
                .context("cannot clear RETIRING_PORTS")?;
        }
        let own: Vec<u64> = self.own_endpoints.keys().filter_map(Result::ok).collect();
        for key in own {
            let _ = self.own_endpoints.remove(&key);
        }
        let mut watched = self
            .maps
            .watched_ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for word in 0..drain_agent_common::WATCHED_WORDS {
            watched
                .set(word, 0, 0)
                .context("cannot clear WATCHED_PORTS")?;
        }
        Ok(())
    }
}
