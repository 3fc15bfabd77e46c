//! Prometheus metrics (prefix `drain_agent_`), on the agent's own registry.
//!
//! Connection metrics come from a [`Collector`] that reads the tracker at scrape time, so a
//! scrape always shows the kernel's current counts and nothing is kept twice. Label sets
//! stay bounded: ports (optionally limited by `--ports`), never client addresses.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use drain_agent_common::{DURATION_BUCKET_COUNT, DURATION_BUCKETS_MS};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounterVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

use crate::{
    drain::{DURATION_BUCKETS as DRAIN_DURATION_BUCKETS, DrainEnd, Drains},
    kernel::KernelState,
    tracker::Tracker,
};

/// The agent's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    drain_requests: IntCounterVec,
    drain_wait_seconds: Histogram,
    attach: String,
    ports: Option<PortSet>,
}

impl Metrics {
    /// `process_metrics` adds the standard process metrics (CPU, RSS, fds) of this process.
    pub fn new(
        tracker: Arc<Tracker>,
        ports: Option<PortSet>,
        attach: &str,
        process_metrics: bool,
    ) -> Result<Self> {
        let registry = Registry::new();
        let drain_requests = IntCounterVec::new(
            Opts::new(
                "drain_agent_drain_requests_total",
                "/drained requests answered, by result: drained, timeout, invalid (bad input), rejected (too many waiters), error.",
            ),
            &["result"],
        )?;
        // Pre-create every documented result so dashboards see zeros, not gaps.
        for result in DrainResult::ALL {
            drain_requests.with_label_values(&[result.label()]);
        }
        // A plain histogram (no labels), so it is exported, with zeros, before the first wait.
        let drain_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "drain_agent_drain_wait_seconds",
                "How long /drained requests waited before answering.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )?;
        registry.register(Box::new(drain_requests.clone()))?;
        registry.register(Box::new(drain_wait_seconds.clone()))?;
        registry.register(Box::new(ConnectionCollector::new(
            tracker,
            ports.clone(),
            attach.to_owned(),
        )?))?;
        if process_metrics {
            registry
                .register(Box::new(
                    prometheus::process_collector::ProcessCollector::for_self(),
                ))
                .context("cannot register the process metrics")?;
        }
        Ok(Self {
            registry,
            drain_requests,
            drain_wait_seconds,
            attach: attach.to_owned(),
            ports,
        })
    }

    /// Counts a `/drained` answer; `waited` only for answered waits.
    pub fn drain_request(&self, result: DrainResult, waited: Option<Duration>) {
        self.drain_requests
            .with_label_values(&[result.label()])
            .inc();
        if let Some(waited) = waited {
            self.drain_wait_seconds.observe(waited.as_secs_f64());
        }
    }

    /// How the kernel handler is attached (`tp_btf`, `tracepoint`, `raw_tracepoint`).
    pub fn attach_method(&self) -> &str {
        &self.attach
    }

    /// Whether `--ports` lets this port be exported.
    pub fn exports_port(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|ports| ports.contains(port))
    }

    /// The Prometheus text format.
    pub fn render(&self) -> Result<String> {
        let families = self.registry.gather();
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut text)
            .context("cannot encode metrics")?;
        String::from_utf8(text).context("metrics are not UTF-8")
    }
}

/// Reads the tracker at scrape time.
struct ConnectionCollector {
    tracker: Arc<Tracker>,
    ports: Option<PortSet>,
    attach: String,
    descs: Vec<Desc>,
}

const ACTIVE: (&str, &str) = (
    "drain_agent_connections_active",
    "Inbound TCP connections open now (ESTABLISHED or CLOSE_WAIT), per local port.",
);
const OPENED: (&str, &str) = (
    "drain_agent_connections_opened_total",
    "Inbound TCP connections opened (or found open at start) since the agent started, per local port.",
);
const CLOSED: (&str, &str) = (
    "drain_agent_connections_closed_total",
    "Inbound TCP connections closed since the agent started, per local port.",
);
const DURATION: (&str, &str) = (
    "drain_agent_connection_duration_seconds",
    "How long inbound TCP connections stayed open, per local port (connections open before the agent started are not included).",
);
const TRACKED: (&str, &str) = (
    "drain_agent_tracked_sockets",
    "Sockets tracked in the kernel map now, all ports.",
);
const ERRORS: (&str, &str) = (
    "drain_agent_tracking_errors_total",
    "Connections or events the kernel side could not track, by reason; anything above 0 means counts may be off.",
);
const REPAIRS: (&str, &str) = (
    "drain_agent_repairs_total",
    "State changes the kernel skipped (see tracking_errors_total{reason=\"handler_skipped\"}) that a walk of the open sockets found and repaired, by kind.",
);
const BUILD_INFO: (&str, &str) = (
    "drain_agent_build_info",
    "Always 1; labels give the agent version and how it is attached to the kernel.",
);
const WALKS: (&str, &str) = (
    "drain_agent_walks_total",
    "Completed walks of the open sockets (seeding and repairs); each one vouches for the counts as of its start.",
);
const DEGRADED: (&str, &str) = (
    "drain_agent_degraded",
    "1 while the agent cannot vouch for every count (a full map, a namespace it cannot walk, …; /healthz gives the reasons): /drained then confirms with the kernel's socket tables or answers 503.",
);
const WAITERS: (&str, &str) = (
    "drain_agent_drain_waiters",
    "/drained requests blocked now.",
);

/// The description of metric `(name, help)` with these labels.
fn desc((name, help): (&str, &str), labels: &[&str]) -> prometheus::Result<Desc> {
    Desc::new(
        name.to_owned(),
        help.to_owned(),
        labels.iter().map(|l| (*l).to_owned()).collect(),
        Default::default(),
    )
}

impl ConnectionCollector {
    fn new(tracker: Arc<Tracker>, ports: Option<PortSet>, attach: String) -> Result<Self> {
        let descs = vec![
            desc(ACTIVE, &["port"])?,
            desc(OPENED, &["port"])?,
            desc(CLOSED, &["port"])?,
            desc(DURATION, &["port"])?,
            desc(TRACKED, &[])?,
            desc(ERRORS, &["reason"])?,
            desc(REPAIRS, &["kind"])?,
            desc(BUILD_INFO, &["version", "attach"])?,
            desc(WAITERS, &[])?,
            desc(WALKS, &[])?,
            desc(DEGRADED, &[])?,
        ];
        Ok(Self {
            tracker,
            ports,
            attach,
            descs,
        })
    }

    fn exported(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|ports| ports.contains(port))
    }
}

fn family(
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

fn labels(pairs: &[(&str, String)]) -> Vec<proto::LabelPair> {
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

fn gauge(pairs: &[(&str, String)], value: f64) -> proto::Metric {
    let mut gauge = proto::Gauge::default();
    gauge.set_value(value);
    let mut metric = proto::Metric::from_label(labels(pairs));
    metric.set_gauge(gauge);
    metric
}

fn counter(pairs: &[(&str, String)], value: f64) -> proto::Metric {
    let mut counter = proto::Counter::default();
    counter.set_value(value);
    let mut metric = proto::Metric::from_label(labels(pairs));
    metric.set_counter(counter);
    metric
}

/// Per-port totals, summed over namespaces and addresses.
#[derive(Default)]
struct PortTotals {
    active: u64,
    opened: u64,
    closed: u64,
}

impl Collector for ConnectionCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = Vec::new();
        let version = env!("CARGO_PKG_VERSION").to_owned();
        families.push(family(
            BUILD_INFO,
            MetricType::GAUGE,
            vec![gauge(
                &[("version", version), ("attach", self.attach.clone())],
                1.0,
            )],
        ));
        families.push(family(
            WAITERS,
            MetricType::GAUGE,
            vec![gauge(&[], self.tracker.waiters() as f64)],
        ));
        families.push(family(
            WALKS,
            MetricType::COUNTER,
            vec![counter(&[], self.tracker.walks() as f64)],
        ));
        let degraded = self
            .tracker
            .health_doubts()
            .iter()
            .any(crate::doubt::Doubt::degrades_health);
        families.push(family(
            DEGRADED,
            MetricType::GAUGE,
            vec![gauge(&[], f64::from(u8::from(degraded)))],
        ));

        // A scrape that cannot read the kernel shows no connection metrics rather than
        // wrong ones; /healthz says why.
        let Ok(endpoints) = self.tracker.snapshot() else {
            return families;
        };
        let mut by_port: BTreeMap<u16, PortTotals> = BTreeMap::new();
        let mut tracked = 0;
        for endpoint in &endpoints {
            tracked += endpoint.active;
            if !self.exported(endpoint.port) {
                continue;
            }
            let totals = by_port.entry(endpoint.port).or_default();
            totals.active += endpoint.active;
            totals.opened += endpoint.opened;
            totals.closed += endpoint.closed;
        }
        // Endpoints reclaimed after going idle keep their totals here.
        for (port, opened, closed) in self.tracker.reclaimed_totals() {
            if self.exported(port) {
                let totals = by_port.entry(port).or_default();
                totals.opened += opened;
                totals.closed += closed;
            }
        }
        // The port totals are exact even for connections counted for their port only.
        for (port, totals) in &mut by_port {
            if let Ok(active) = self.tracker.active(&crate::tracker::Filter::port(*port)) {
                totals.active = active;
            }
        }
        let per_port = |value: fn(&PortTotals) -> u64,
                        make: fn(&[(&str, String)], f64) -> proto::Metric| {
            by_port
                .iter()
                .map(|(port, totals)| make(&[("port", port.to_string())], value(totals) as f64))
                .collect::<Vec<_>>()
        };
        families.push(family(
            ACTIVE,
            MetricType::GAUGE,
            per_port(|t| t.active, gauge),
        ));
        families.push(family(
            OPENED,
            MetricType::COUNTER,
            per_port(|t| t.opened, counter),
        ));
        families.push(family(
            CLOSED,
            MetricType::COUNTER,
            per_port(|t| t.closed, counter),
        ));
        families.push(family(
            TRACKED,
            MetricType::GAUGE,
            vec![gauge(&[], tracked as f64)],
        ));

        if let Ok(durations) = self.tracker.durations() {
            let mut by_port: BTreeMap<u16, ([u64; DURATION_BUCKET_COUNT], u64)> = BTreeMap::new();
            for (port, histogram) in durations {
                if !self.exported(port) {
                    continue;
                }
                let entry = by_port
                    .entry(port)
                    .or_insert(([0; DURATION_BUCKET_COUNT], 0));
                for (total, count) in entry.0.iter_mut().zip(histogram.buckets) {
                    *total += count;
                }
                entry.1 += histogram.sum_ns;
            }
            let metrics = by_port
                .into_iter()
                .map(|(port, (buckets, sum_ns))| duration_metric(port, &buckets, sum_ns))
                .collect();
            families.push(family(DURATION, MetricType::HISTOGRAM, metrics));
        }

        if let Ok(errors) = self.tracker.tracking_errors() {
            let metrics = errors
                .into_iter()
                .map(|(reason, count)| counter(&[("reason", reason.to_owned())], count as f64))
                .collect();
            families.push(family(ERRORS, MetricType::COUNTER, metrics));
        }
        if let Ok(repairs) = self.tracker.repairs() {
            let metrics = repairs
                .into_iter()
                .map(|(kind, count)| counter(&[("kind", kind.to_owned())], count as f64))
                .collect();
            families.push(family(REPAIRS, MetricType::COUNTER, metrics));
        }
        // Families with no samples would render as bare HELP/TYPE lines; leave them out.
        families.retain(|family| !family.get_metric().is_empty());
        families
    }
}

const DRAINS: (&str, &str) = (
    "drain_agent_drains_total",
    "Drains ended since the agent started, by result (drained, timeout, closed_at_deadline, cancelled, agent_shutdown).",
);
const DRAIN_DURATION: (&str, &str) = (
    "drain_agent_drain_duration_seconds",
    "How long drains took from start to end.",
);

const KERNEL_STATE: (&str, &str) = (
    "drain_agent_kernel_state",
    "Always 1; origin=\"adopted\" when the counts were adopted from the previous agent's pinned kernel state, \"new\" when this agent loaded them; pinned=\"true\" when they outlive the agent (--pin-dir).",
);

/// Where the kernel state came from, read at scrape time (an agent that waited for the pin
/// directory's lock pins its state later).
struct KernelStateCollector {
    state: Arc<KernelState>,
    desc: Desc,
}

impl Collector for KernelStateCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        vec![family(
            KERNEL_STATE,
            MetricType::GAUGE,
            vec![gauge(
                &[
                    ("origin", self.state.origin.name().to_owned()),
                    ("pinned", self.state.pinned().to_string()),
                ],
                1.0,
            )],
        )]
    }
}

/// The drain records' metrics, read from the registry at scrape time.
struct DrainCollector {
    drains: Arc<Drains>,
    descs: Vec<Desc>,
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

impl Metrics {
    /// Adds a collector of another module (the pod listeners' gauge).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> Result<()> {
        self.registry
            .register(collector)
            .context("cannot register a metric")
    }

    /// Adds `drain_agent_kernel_state` (adopted or new, pinned or not).
    pub fn register_kernel_state(&self, state: Arc<KernelState>) -> Result<()> {
        let desc = desc(KERNEL_STATE, &["origin", "pinned"])?;
        self.registry
            .register(Box::new(KernelStateCollector { state, desc }))
            .context("cannot register the kernel state metric")
    }

    /// Adds the drains' metrics (`drains_total`, `drain_duration_seconds`).
    pub fn register_drains(&self, drains: Arc<Drains>) -> Result<()> {
        let descs = vec![desc(DRAINS, &["result"])?, desc(DRAIN_DURATION, &[])?];
        self.registry
            .register(Box::new(DrainCollector { drains, descs }))
            .context("cannot register the drain metrics")
    }
}

fn duration_metric(
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

/// A set of ports, as given to `--ports` (`80,443,8080-8090`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.ranges
            .iter()
            .any(|(low, high)| (*low..=*high).contains(&port))
    }
}

impl std::str::FromStr for PortSet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let port = |part: &str| match part.trim().parse::<u32>() {
            Ok(port @ 1..=65535) => Ok(port as u16),
            _ => Err(format!("{part:?} is not a port number (1-65535)")),
        };
        let mut ranges = Vec::new();
        for item in text.split(',') {
            let range = match item.split_once('-') {
                Some((low, high)) => {
                    let (low, high) = (port(low)?, port(high)?);
                    if low > high {
                        return Err(format!("range {item:?} is backwards"));
                    }
                    (low, high)
                }
                None => {
                    let single = port(item)?;
                    (single, single)
                }
            };
            ranges.push(range);
        }
        Ok(Self { ranges })
    }
}

/// How a `/drained` request ended: the `result` label of `drain_agent_drain_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainResult {
    Drained,
    Timeout,
    /// Bad input (4xx).
    Invalid,
    /// Too many waiters (429).
    Rejected,
    /// The counts could not be read (500).
    Error,
    /// The client hung up before its answer.
    Abandoned,
    /// Answered not drained because the agent is shutting down (not a timeout).
    AgentShutdown,
}

impl DrainResult {
    pub const ALL: [Self; 7] = [
        Self::Drained,
        Self::Timeout,
        Self::Invalid,
        Self::Rejected,
        Self::Error,
        Self::Abandoned,
        Self::AgentShutdown,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::Timeout => "timeout",
            Self::Invalid => "invalid",
            Self::Rejected => "rejected",
            Self::Error => "error",
            Self::Abandoned => "abandoned",
            Self::AgentShutdown => "agent_shutdown",
        }
    }
}

#[cfg(test)]
mod tests {
    use drain_agent_common::DurationHistogram;

    use super::*;
    use crate::tracker::fake::{FakeSource, endpoint};

    fn metrics(ports: Option<PortSet>) -> (Arc<FakeSource>, Metrics) {
        let source = Arc::new(FakeSource::default());
        let tracker = Arc::new(Tracker::new(source.clone(), 4));
        let metrics = Metrics::new(tracker, ports, "tp_btf", false).expect("metrics");
        (source, metrics)
    }

    #[test]
    fn port_sets_parse_and_refuse_nonsense() {
        let ports: PortSet = "80, 443,8080-8090".parse().expect("ports");
        assert!(ports.contains(80) && ports.contains(8085) && !ports.contains(8091));
        for bad in ["", "0", "70000", "a", "90-80", "1-", "-5"] {
            assert!(bad.parse::<PortSet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn renders_per_port_sums_from_the_live_counts() {
        let (source, metrics) = metrics(None);
        source.set(vec![
            endpoint("127.0.0.1", 8080, 3),
            endpoint("10.0.0.1", 8080, 2),
            endpoint("::1", 443, 1),
        ]);
        let text = metrics.render().expect("render");
        assert!(
            text.contains("drain_agent_connections_active{port=\"8080\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("drain_agent_connections_active{port=\"443\"} 1"),
            "{text}"
        );
        assert!(text.contains("drain_agent_tracked_sockets 6"), "{text}");
        assert!(
            text.contains("drain_agent_build_info{version=\"0.1.0\",attach=\"tp_btf\"} 1"),
            "{text}"
        );
        // Read at scrape time: a change shows in the next scrape.
        source.set(vec![endpoint("127.0.0.1", 8080, 0)]);
        let text = metrics.render().expect("render");
        assert!(
            text.contains("drain_agent_connections_active{port=\"8080\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn ports_allow_list_limits_the_labels() {
        let (source, metrics) = metrics(Some("8080".parse().expect("ports")));
        source.set(vec![
            endpoint("127.0.0.1", 8080, 3),
            endpoint("127.0.0.1", 9, 1),
        ]);
        let text = metrics.render().expect("render");
        assert!(text.contains("port=\"8080\""), "{text}");
        assert!(!text.contains("port=\"9\""), "{text}");
        assert!(metrics.exports_port(8080) && !metrics.exports_port(9));
    }

    #[test]
    fn duration_histogram_is_cumulative_in_seconds() {
        let mut buckets = [0; DURATION_BUCKET_COUNT];
        buckets[0] = 2; // <= 1 ms
        buckets[6] = 1; // <= 1 s
        buckets[DURATION_BUCKET_COUNT - 1] = 1; // > 1 h
        let metric = duration_metric(80, &buckets, 3_700_000_000_000);
        let histogram = metric.get_histogram();
        assert_eq!(histogram.get_sample_count(), 4);
        assert!((histogram.get_sample_sum() - 3700.0).abs() < 1e-6);
        let bounds: Vec<(f64, u64)> = histogram
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        assert_eq!(bounds[0], (0.001, 2));
        assert_eq!(bounds[6], (1.0, 3));
        assert_eq!(bounds.last().copied(), Some((3600.0, 3)));
        // A port's kernel histogram before any close: all zeros, no sample.
        let empty = DurationHistogram::default();
        let metric = duration_metric(80, &empty.buckets, empty.sum_ns);
        let histogram = metric.get_histogram();
        assert_eq!(histogram.get_sample_count(), 0);
        assert_eq!(histogram.get_sample_sum(), 0.0);
        assert!(
            histogram
                .get_bucket()
                .iter()
                .all(|b| b.cumulative_count() == 0)
        );
    }

    #[test]
    fn drain_metrics_are_zeros_before_the_first_request() {
        let (_, metrics) = metrics(None);
        let text = metrics.render().expect("render");
        for result in DrainResult::ALL {
            let line = format!(
                "drain_agent_drain_requests_total{{result=\"{}\"}} 0",
                result.label()
            );
            assert!(text.contains(&line), "{line}:\n{text}");
        }
        assert!(
            text.contains("drain_agent_drain_wait_seconds_count 0"),
            "{text}"
        );
        assert!(
            text.contains("drain_agent_drain_wait_seconds_bucket{le=\"+Inf\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn drain_requests_are_counted() {
        let (_, metrics) = metrics(None);
        metrics.drain_request(DrainResult::Drained, Some(Duration::from_millis(3)));
        metrics.drain_request(DrainResult::Invalid, None);
        let text = metrics.render().expect("render");
        assert!(
            text.contains("drain_agent_drain_requests_total{result=\"drained\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("drain_agent_drain_requests_total{result=\"timeout\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("drain_agent_drain_wait_seconds_count 1"),
            "{text}"
        );
    }
}
