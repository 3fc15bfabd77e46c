//! Metric families built by hand for the collectors that read their values at scrape
//! time: descriptions, families, labels and samples.

use drain_agent_common::{DURATION_BUCKET_COUNT, DURATION_BUCKETS_MS};
use prometheus::{
    core::Desc,
    proto::{self, MetricFamily, MetricType},
};

/// The description of metric `(name, help)` with these labels.
pub(super) fn desc((name, help): (&str, &str), labels: &[&str]) -> prometheus::Result<Desc> {
    Desc::new(
        name.to_owned(),
        help.to_owned(),
        labels.iter().map(|l| (*l).to_owned()).collect(),
        Default::default(),
    )
}

pub(super) fn family(
    (name, help): (&str, &str),
    kind: MetricType,
    metrics: Vec<proto::Metric>,
) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

pub(super) fn labels(pairs: &[(&str, String)]) -> Vec<proto::LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = proto::LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value(value.clone());
            pair
        })
        .collect()
}

pub(super) fn gauge(pairs: &[(&str, String)], value: f64) -> proto::Metric {
    let mut gauge = proto::Gauge::default();
    gauge.set_value(value);
    let mut metric = proto::Metric::from_label(labels(pairs));
    metric.set_gauge(gauge);
    metric
}

pub(super) fn counter(pairs: &[(&str, String)], value: f64) -> proto::Metric {
    let mut counter = proto::Counter::default();
    counter.set_value(value);
    let mut metric = proto::Metric::from_label(labels(pairs));
    metric.set_counter(counter);
    metric
}

/// The `port`'s connection-duration histogram from the kernel's buckets (milliseconds).
pub(super) fn duration_metric(
    port: u16,
    buckets: &[u64; DURATION_BUCKET_COUNT],
    sum_ns: u64,
) -> proto::Metric {
    let mut cumulative = 0;
    let mut proto_buckets = Vec::new();
    for (upper_ms, count) in DURATION_BUCKETS_MS.iter().zip(buckets) {
        cumulative += count;
        let mut bucket = proto::Bucket::default();
        bucket.set_upper_bound(*upper_ms as f64 / 1000.0);
        bucket.set_cumulative_count(cumulative);
        proto_buckets.push(bucket);
    }
    let total: u64 = buckets.iter().sum();
    let mut histogram = proto::Histogram::default();
    histogram.set_bucket(proto_buckets);
    histogram.set_sample_count(total);
    histogram.set_sample_sum(sum_ns as f64 / 1e9);
    let mut metric = proto::Metric::from_label(labels(&[("port", port.to_string())]));
    metric.set_histogram(histogram);
    metric
}
