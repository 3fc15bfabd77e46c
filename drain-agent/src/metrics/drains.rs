//! The drain records' metrics, read from the drains at scrape time.

use std::{collections::BTreeMap, sync::Arc};

use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

use super::families::{counter, desc, family, gauge};
use crate::drain::{DURATION_BUCKETS as DRAIN_DURATION_BUCKETS, DrainEnd, Drains, ScopeLabels};

const DRAINS: (&str, &str) = (
    "drain_agent_drains_total",
    "Drains ended since the agent started, by result (drained, timeout, closed_at_deadline, cancelled, agent_shutdown, abandoned, not_owned, continued: a slice of a longer wait ran out, and its hook asked again).",
);
const DRAIN_DURATION: (&str, &str) = (
    "drain_agent_drain_duration_seconds",
    "How long drains took from start to end.",
);

const IN_PROGRESS: (&str, &str) = (
    "drain_agent_drain_in_progress",
    "Drains in progress, by scope: port (only ports --ports allows) and, with --metrics-labels address, for a drain asked for an address (a pod's IP) or a pod's namespace, addr. Only scopes with a drain in progress: a series goes when its drain ends.",
);
const OTHER_AGENT: (&str, &str) = (
    "drain_agent_other_agent_drains_in_progress",
    "During an upgrade's overlap: drains in progress on the other agent sharing --state-dir (the old agent, whose /metrics closes at its SIGTERM while its drains run on; or the agent started beside this one), POSTed or started by /drained waiters, as its state file says, less those this agent runs too (in drain_in_progress) and those of ports --ports leaves out. At least 1 while that file cannot be read. 0 outside an overlap.",
);
const SCOPE_DRAINS: (&str, &str) = (
    "drain_agent_scope_drains_total",
    "Drains ended, by scope (port, only ports --ports allows, and with --metrics-labels address, for a drain asked for an address or a pod's namespace, addr) and result; a scope shows while its drain runs and for an hour after its last one ended.",
);

const UNSAVED: (&str, &str) = (
    "drain_agent_drains_unsaved",
    "1 while the drains and held /health gates as they are now are not in --state-dir (the last save failed, or a third agent shares the directory): they would not survive a restart of the agent. The log says why.",
);
const SAVE_FAILURES: (&str, &str) = (
    "drain_agent_drain_save_failures_total",
    "Saves of the drains to --state-dir that did not reach the disk, since the agent started.",
);

const STATE_UNREADABLE: (&str, &str) = (
    "drain_agent_state_unreadable",
    "1 while a state file in --state-dir this agent cannot read (another version: a rollback from a later release; or damaged) could still hold a drain or a /health gate: it was moved aside, not written over, and /health and the agent-check answer \"draining\" for every scope meanwhile. The log names the file.",
);

const JOURNAL_FAILURES: (&str, &str) = (
    "drain_agent_journal_write_failures_total",
    "Drain records that could not be written to --journal since the agent started (the log says why): those drains are missing from it.",
);

/// The drain records' metrics, read from the registry at scrape time.
pub(super) struct DrainCollector {
    drains: Arc<Drains>,
    descs: Vec<Desc>,
}

impl DrainCollector {
    /// The drains count and name their scopes as the metrics export them
    /// ([`Drains::with_metric_labels`]): ports `--ports` leaves out are not among them,
    /// and with `--metrics-labels port` no scope has an address.
    pub(super) fn new(drains: Arc<Drains>) -> prometheus::Result<Self> {
        let (scope, scope_result): (&[&str], &[&str]) = if drains.metric_labels().by_address() {
            (&["port", "addr"], &["port", "addr", "result"])
        } else {
            (&["port"], &["port", "result"])
        };
        let descs = vec![
            desc(DRAINS, &["result"])?,
            desc(DRAIN_DURATION, &[])?,
            desc(IN_PROGRESS, scope)?,
            desc(OTHER_AGENT, &[])?,
            desc(SCOPE_DRAINS, scope_result)?,
            desc(UNSAVED, &[])?,
            desc(SAVE_FAILURES, &[])?,
            desc(STATE_UNREADABLE, &[])?,
            desc(JOURNAL_FAILURES, &[])?,
        ];
        Ok(Self { drains, descs })
    }
}

impl Collector for DrainCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self.drains.stats();
        let ended = DrainEnd::ALL
            .iter()
            .map(|result| {
                let count = stats.ended.get(result).copied().unwrap_or(0);
                counter(&[("result", result.label().to_owned())], count as f64)
            })
            .collect();
        let mut histogram = proto::Histogram::default();
        histogram.set_bucket(
            DRAIN_DURATION_BUCKETS
                .iter()
                .zip(stats.buckets)
                .map(|(bound, count)| {
                    let mut bucket = proto::Bucket::default();
                    bucket.set_upper_bound(*bound);
                    bucket.set_cumulative_count(count);
                    bucket
                })
                .collect(),
        );
        histogram.set_sample_count(stats.count);
        histogram.set_sample_sum(stats.sum_seconds);
        let mut duration = proto::Metric::default();
        duration.set_histogram(histogram);
        let mut in_progress: BTreeMap<ScopeLabels, u64> = BTreeMap::new();
        for scope in self.drains.in_progress_scopes() {
            *in_progress.entry(scope).or_default() += 1;
        }
        // A running scope shows its results at 0 before its first end, so that a rate sees
        // the rise when it ends.
        let mut by_scope: BTreeMap<ScopeLabels, Vec<u64>> = in_progress
            .keys()
            .map(|scope| (*scope, vec![0; DrainEnd::ALL.len()]))
            .collect();
        for (scope, ends) in &stats.by_scope {
            let counts = by_scope
                .entry(*scope)
                .or_insert_with(|| vec![0; DrainEnd::ALL.len()]);
            for (count, result) in counts.iter_mut().zip(DrainEnd::ALL) {
                *count = ends.ended.get(&result).copied().unwrap_or(0);
            }
        }
        let in_progress = in_progress
            .iter()
            .map(|(scope, count)| gauge(&scope_labels(scope), *count as f64))
            .collect();
        let scope_drains = by_scope
            .iter()
            .flat_map(|(scope, counts)| {
                counts.iter().zip(DrainEnd::ALL).map(|(count, result)| {
                    let mut labels = scope_labels(scope);
                    labels.push(("result", result.label().to_owned()));
                    counter(&labels, *count as f64)
                })
            })
            .collect();
        let mut families = vec![
            family(DRAINS, MetricType::COUNTER, ended),
            family(DRAIN_DURATION, MetricType::HISTOGRAM, vec![duration]),
            family(IN_PROGRESS, MetricType::GAUGE, in_progress),
            family(
                OTHER_AGENT,
                MetricType::GAUGE,
                vec![gauge(&[], self.drains.other_agents_drains() as f64)],
            ),
            family(SCOPE_DRAINS, MetricType::COUNTER, scope_drains),
        ];
        let (unsaved, save_failures) = self.drains.unsaved();
        families.push(family(
            UNSAVED,
            MetricType::GAUGE,
            vec![gauge(&[], f64::from(u8::from(unsaved)))],
        ));
        families.push(family(
            SAVE_FAILURES,
            MetricType::COUNTER,
            vec![counter(&[], save_failures as f64)],
        ));
        families.push(family(
            STATE_UNREADABLE,
            MetricType::GAUGE,
            vec![gauge(
                &[],
                f64::from(u8::from(self.drains.failing_closed())),
            )],
        ));
        families.push(family(
            JOURNAL_FAILURES,
            MetricType::COUNTER,
            vec![counter(&[], self.drains.unjournaled() as f64)],
        ));
        // No drain by scope: no bare HELP/TYPE lines either.
        families.retain(|family| !family.get_metric().is_empty());
        families
    }
}

/// A scope's labels: `port`, and `addr` when the drains name one (by address, a drain
/// asked for an address or of a namespace whose address is known).
fn scope_labels((port, addr): &ScopeLabels) -> Vec<(&'static str, String)> {
    let mut labels = vec![("port", port.to_string())];
    if let Some(addr) = addr {
        labels.push(("addr", addr.to_string()));
    }
    labels
}
