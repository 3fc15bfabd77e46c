//! The drain records' metrics, read from the drains at scrape time.

use std::sync::Arc;

use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

use super::families::{counter, desc, family};
use crate::drain::{DURATION_BUCKETS as DRAIN_DURATION_BUCKETS, DrainEnd, Drains};

const DRAINS: (&str, &str) = (
    "drain_agent_drains_total",
    "Drains ended since the agent started, by result (drained, timeout, closed_at_deadline, cancelled, agent_shutdown).",
);
const DRAIN_DURATION: (&str, &str) = (
    "drain_agent_drain_duration_seconds",
    "How long drains took from start to end.",
);

/// The drain records' metrics, read from the registry at scrape time.
pub(super) struct DrainCollector {
    drains: Arc<Drains>,
    descs: Vec<Desc>,
}

impl DrainCollector {
    pub(super) fn new(drains: Arc<Drains>) -> prometheus::Result<Self> {
        let descs = vec![desc(DRAINS, &["result"])?, desc(DRAIN_DURATION, &[])?];
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
        vec![
            family(DRAINS, MetricType::COUNTER, ended),
            family(DRAIN_DURATION, MetricType::HISTOGRAM, vec![duration]),
        ]
    }
}
