//! What `--state-dir` keeps of the drains across a restart (the layout of `drains.json`),
//! and the glue to the [`StateFile`](crate::drain::state_file::StateFile): saving, restoring at start-up, taking over from the
//! agent that wrote it (an upgrade).

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    drain::{
        DrainRecord, DrainSpec, Drains, Given, HELD_MAX,
        gate::Held,
        lock,
        registry::{Running, scope_text},
        unix_ms,
    },
    drain_rule::{Cidr, DrainRule},
    tracker::Filter,
};

/// What `--state-dir` keeps across a restart: the drains `POST /drain` started that are in
/// progress, and the scopes held out of rotation after their drains.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedDrains {
    drains: Vec<SavedDrain>,
    held: Vec<SavedHold>,
}

/// A POSTed drain in progress: its record and everything its spec needs.
#[derive(Debug, Serialize, Deserialize)]
struct SavedDrain {
    record: DrainRecord,
    /// Unix time in milliseconds when it ends (at a restart it resumes with what is left).
    deadline_ms: u64,
    timeout_ms: u64,
    quiet_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ignore: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idle_ms: Option<u64>,
    pace: u32,
    given: SavedGiven,
}

/// [`Given`] on disk.
#[derive(Debug, Serialize, Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one flag per setting a request can name, as `Given`"
)]
struct SavedGiven {
    on_timeout: bool,
    quiet: bool,
    ignore: bool,
    idle: bool,
    pace: bool,
}

/// A scope held out of rotation after its drain.
#[derive(Debug, Serialize, Deserialize)]
struct SavedHold {
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<u32>,
    /// Cookies of the listeners when the drain ended (a socket's cookie never changes).
    listeners: Vec<u64>,
    /// Unix time in milliseconds when the hold ends.
    until_ms: u64,
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl SavedDrain {
    fn of(
        spec: &DrainSpec,
        record: &DrainRecord,
        deadline: tokio::time::Instant,
        now: tokio::time::Instant,
        now_ms: u64,
    ) -> Self {
        Self {
            record: record.clone(),
            deadline_ms: now_ms.saturating_add(millis(deadline.saturating_duration_since(now))),
            timeout_ms: millis(spec.timeout),
            quiet_ms: millis(spec.rule.quiet),
            ignore: spec.rule.ignore.iter().map(ToString::to_string).collect(),
            idle_ms: spec.rule.idle.map(millis),
            pace: spec.pace,
            given: SavedGiven {
                on_timeout: spec.given.on_timeout,
                quiet: spec.given.quiet,
                ignore: spec.given.ignore,
                idle: spec.given.idle,
                pace: spec.given.pace,
            },
        }
    }

    /// The drain's spec again; `None` when a setting cannot be read.
    fn spec(&self) -> Option<DrainSpec> {
        let ignore = self
            .ignore
            .iter()
            .map(|cidr| cidr.parse::<Cidr>().ok())
            .collect::<Option<Vec<_>>>()?;
        Some(DrainSpec {
            filter: Filter {
                port: self.record.port,
                addr: self.record.addr,
                netns: self.record.netns,
            },
            timeout: Duration::from_millis(self.timeout_ms),
            rule: DrainRule {
                quiet: Duration::from_millis(self.quiet_ms),
                ignore,
                idle: self.idle_ms.map(Duration::from_millis),
            },
            on_timeout: self.record.on_timeout,
            pace: self.pace,
            given: Given {
                on_timeout: self.given.on_timeout,
                quiet: self.given.quiet,
                ignore: self.given.ignore,
                idle: self.given.idle,
                pace: self.given.pace,
            },
        })
    }
}

impl Drains {
    /// The drains and gates to keep across a restart, as they are now; `None` once the agent
    /// is stopping (drains end then as `agent_shutdown`, and must stay on disk to resume).
    fn saved(&self) -> Option<SavedDrains> {
        if self.tracker.shutting_down() {
            return None;
        }
        let now_ms = unix_ms();
        let now = tokio::time::Instant::now();
        let drains = lock(&self.running)
            .values()
            .filter(|drain| drain.posted.load(Ordering::Acquire))
            .map(|drain| {
                SavedDrain::of(
                    &drain.spec,
                    &lock(&drain.record),
                    drain.deadline,
                    now,
                    now_ms,
                )
            })
            .collect();
        let held = lock(&self.held)
            .iter()
            .filter(|(_, hold)| hold.until > now)
            .map(|(scope, hold)| SavedHold {
                port: scope.port,
                addr: scope.addr,
                netns: scope.netns,
                listeners: hold.listeners.iter().copied().collect(),
                until_ms: now_ms.saturating_add(millis(hold.until - now)),
            })
            .collect();
        Some(SavedDrains { drains, held })
    }

    /// Writes the state file (if any) and syncs it: called before `POST /drain` and
    /// `DELETE /drain` are answered, and when a drain ends. A failure is logged: the drain
    /// goes on, but would not survive a restart.
    pub async fn save(self: &Arc<Self>) {
        let Some(file) = self.state.clone() else {
            return;
        };
        let drains = Arc::clone(self);
        let written = tokio::task::spawn_blocking(move || file.write_with(|| drains.saved())).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(problem)) => {
                log::warn!("cannot save the drains (they will not survive a restart): {problem:#}");
            }
            Err(problem) => log::warn!("the state file writer failed: {problem}"),
        }
    }

    /// At start-up: the drains POSTed before the last stop resume with their own deadlines
    /// (waiters of `/drained` are gone with the old process: a drain only they started would
    /// have ended `abandoned`, so none is kept), and held gates stay held until their hold
    /// ends, a new listener appears, or `DELETE /drain`. Ids go on after the restored ones.
    pub fn restore(self: &Arc<Self>) {
        self.restore_saved(false);
    }

    /// Once the agent that wrote the state file has gone (an upgrade: `StateFile`): what it
    /// saved after this agent started (drains POSTed to it meanwhile, gates it held) joins
    /// this agent's, scopes this agent has already kept as they are, and this agent writes
    /// from now on.
    pub async fn take_over_state(self: &Arc<Self>) {
        let Some(file) = self.state.clone() else {
            return;
        };
        if file.is_writer() {
            return;
        }
        match tokio::task::spawn_blocking(move || file.wait_to_write()).await {
            Ok(Ok(())) => {}
            Ok(Err(problem)) => {
                log::warn!(
                    "{problem:#}: the drains are not saved (they will not survive a restart)"
                );
                return;
            }
            Err(problem) => {
                log::warn!("the state file's lock waiter failed: {problem}");
                return;
            }
        }
        self.restore_saved(true);
        self.save().await;
    }

    /// Restores the state file's drains and gates; `only_new`: not for scopes this agent
    /// has a drain or a gate of already.
    fn restore_saved(self: &Arc<Self>, only_new: bool) {
        let Some(file) = &self.state else {
            return;
        };
        let Some(saved) = file.read::<SavedDrains>() else {
            return;
        };
        let now_ms = unix_ms();
        let now = tokio::time::Instant::now();
        let mut gates = 0;
        {
            let mut held = lock(&self.held);
            for hold in saved.held {
                if hold.until_ms <= now_ms || held.len() >= HELD_MAX {
                    continue;
                }
                let scope = Filter {
                    port: hold.port,
                    addr: hold.addr,
                    netns: hold.netns,
                };
                if only_new && held.contains_key(&scope) {
                    continue;
                }
                held.insert(
                    scope,
                    Held {
                        listeners: hold.listeners.into_iter().collect(),
                        until: now + Duration::from_millis(hold.until_ms - now_ms),
                    },
                );
                gates += 1;
            }
        }
        let mut drains = 0;
        for drain in saved.drains {
            let Some(spec) = drain.spec() else {
                log::warn!(
                    "{}: drain {} has settings this agent cannot read: not resumed",
                    file.path().display(),
                    drain.record.id
                );
                continue;
            };
            let id = drain.record.id;
            if only_new && lock(&self.running).contains_key(&spec.filter) {
                continue;
            }
            self.next_id.fetch_max(id + 1, Ordering::Relaxed);
            let ran_for = Duration::from_millis(now_ms.saturating_sub(drain.record.started_ms));
            let left = Duration::from_millis(drain.deadline_ms.saturating_sub(now_ms));
            let resumed = Running::new(
                spec.clone(),
                now.checked_sub(ran_for).unwrap_or(now),
                now + left,
                drain.record,
                true,
            );
            if lock(&self.running)
                .insert(spec.filter.clone(), Arc::clone(&resumed))
                .is_some()
            {
                log::warn!(
                    "{}: two drains of one scope; the later one kept",
                    file.path().display()
                );
            }
            log::info!(
                "drain {id} resumed after a restart: {} {left:?} left",
                scope_text(&spec.filter)
            );
            self.launch(resumed);
            drains += 1;
        }
        log::info!(
            "restored {drains} drain(s) in progress and {gates} held /health gate(s) from {}",
            file.path().display()
        );
    }
}
