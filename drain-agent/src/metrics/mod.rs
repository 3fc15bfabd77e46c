//! Prometheus metrics (prefix `drain_agent_`), on the agent's own registry.
//!
//! Connection metrics come from a [`Collector`] that reads the tracker at scrape time, so a
//! scrape always shows the kernel's current counts and nothing is kept twice. Label sets
//! stay bounded: ports (optionally limited by `--ports`) and local addresses (the node's
//! and its pods' own, [`ConnectionLabels`]), never client addresses. The drain metrics by
//! scope follow the same [`MetricLabels`]: the drains count by them.

mod connections;
mod drains;
mod families;
mod kernel_state;

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounterVec, Opts, Registry, TextEncoder,
};

use self::{
    connections::ConnectionCollector, drains::DrainCollector, kernel_state::KernelStateCollector,
};
pub use crate::metric_labels::{ConnectionLabels, MetricLabels, PortSet};
use crate::{drain::Drains, kernel::KernelState, tracker::Tracker};

/// The agent's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    drain_requests: IntCounterVec,
    drain_wait_seconds: Histogram,
    attach: String,
    /// What is exported (`--ports`, `--metrics-labels`).
    labels: MetricLabels,
    /// One render at a time ([`Metrics::render_off_runtime`]).
    rendering: tokio::sync::Semaphore,
}

impl Metrics {
    /// `process_metrics` adds the standard process metrics (CPU, RSS, fds) of this process.
    pub fn new(
        tracker: Arc<Tracker>,
        ports: Option<PortSet>,
        labels: ConnectionLabels,
        attach: &str,
        process_metrics: bool,
    ) -> Result<Self> {
        let registry = Registry::new();
        let drain_requests = IntCounterVec::new(
            Opts::new(
                "drain_agent_drain_requests_total",
                "/drained requests answered, by result: drained, timeout (waits, with a timeout above 0), query (timeout=0: answered at once, drained or not; no wait), invalid (bad input), rejected (429: too many waiters, or every connection busy), error, abandoned, agent_shutdown, continued (a slice of a longer wait, continues=true, that ran out: its hook asks again; no wait time).",
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
                "How long /drained waits (a timeout above 0) waited before answering; queries (timeout=0) are not waits.",
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
            labels,
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
            labels: MetricLabels { ports, labels },
            rendering: tokio::sync::Semaphore::new(1),
        })
    }

    /// Counts a `/drained` answer; `waited` only for answered waits (never a query's).
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
        self.labels.exports_port(port)
    }

    /// What is exported: the drains count their ends by scope with it
    /// ([`Drains::with_metric_labels`]).
    pub fn labels(&self) -> &MetricLabels {
        &self.labels
    }

    /// [`Metrics::render`] on a blocking thread, one render at a time. A render reads every
    /// endpoint, drain and histogram (syscalls on the kernel's maps), and anyone who reaches
    /// the node listener may scrape: on one of the runtime's few workers, a few scrapes at
    /// once would hold up every hook's answer. Here further scrapes wait their turn without
    /// holding a worker (each holds only its connection's slot, which the server bounds).
    pub async fn render_off_runtime(self: &Arc<Self>) -> Result<String> {
        let _turn = self
            .rendering
            .acquire()
            .await
            .context("the metrics render gate is closed")?;
        let metrics = Arc::clone(self);
        tokio::task::spawn_blocking(move || metrics.render())
            .await
            .context("the metrics render did not finish")?
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
impl Metrics {
    /// Adds a collector of another module (the pod listeners' gauge).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> Result<()> {
        self.registry
            .register(collector)
            .context("cannot register a metric")
    }

    /// Adds `drain_agent_kernel_state` (adopted or new, pinned or not).
    pub fn register_kernel_state(&self, state: Arc<KernelState>) -> Result<()> {
        self.registry
            .register(Box::new(KernelStateCollector::new(state)?))
            .context("cannot register the kernel state metric")
    }

    /// Adds the drains' metrics (`drains_total`, `drain_duration_seconds`, by scope). The
    /// drains must count by scope with these metrics' labels ([`Drains::with_metric_labels`]):
    /// otherwise their series would show ports `--ports` leaves out, or addresses
    /// `--metrics-labels port` hides.
    pub fn register_drains(&self, drains: Arc<Drains>) -> Result<()> {
        anyhow::ensure!(
            drains.metric_labels() == &self.labels,
            "the drains count by scope with {:?}, the metrics export {:?}",
            drains.metric_labels(),
            self.labels
        );
        self.registry
            .register(Box::new(DrainCollector::new(drains)?))
            .context("cannot register the drain metrics")
    }
}

/// How a `/drained` request ended: the `result` label of `drain_agent_drain_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainResult {
    /// A wait (a timeout above 0) answered drained.
    Drained,
    /// A wait whose timeout passed before its port drained.
    Timeout,
    /// A pure query (`timeout=0`: a progress line, a script's look), answered at once,
    /// drained or not. Not a drain and not a wait: no `drain_wait_seconds` sample, and
    /// neither `drained` nor `timeout`, whose share the alerts and dashboards read.
    Query,
    /// Bad input (4xx).
    Invalid,
    /// Too many waiters (429).
    Rejected,
    /// The counts could not be read (500).
    Error,
    /// The client reset its connection before its answer (a FIN alone is not counted:
    /// a half-closed client waits for its answer).
    Abandoned,
    /// Answered not drained because the agent is shutting down (not a timeout).
    AgentShutdown,
    /// A wait that asked `continues=true` (one slice of a longer wait: `drain-agent wait`
    /// over `--max-timeout`) whose timeout passed before its port drained: the hook asks
    /// again, so neither a `timeout` nor a wait of its own (no `drain_wait_seconds` sample).
    Continued,
}

impl DrainResult {
    pub const ALL: [Self; 9] = [
        Self::Drained,
        Self::Timeout,
        Self::Query,
        Self::Invalid,
        Self::Rejected,
        Self::Error,
        Self::Abandoned,
        Self::AgentShutdown,
        Self::Continued,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::Timeout => "timeout",
            Self::Query => "query",
            Self::Invalid => "invalid",
            Self::Rejected => "rejected",
            Self::Error => "error",
            Self::Abandoned => "abandoned",
            Self::AgentShutdown => "agent_shutdown",
            Self::Continued => "continued",
        }
    }
}

#[cfg(test)]
mod tests {
    use drain_agent_common::{DURATION_BUCKET_COUNT, DurationHistogram};

    use super::{families::duration_metric, *};
    use crate::tracker::fake::{FakeSource, endpoint};

    fn metrics(ports: Option<PortSet>) -> (Arc<FakeSource>, Metrics) {
        labelled(ports, ConnectionLabels::Port)
    }

    fn labelled(ports: Option<PortSet>, labels: ConnectionLabels) -> (Arc<FakeSource>, Metrics) {
        let source = Arc::new(FakeSource::default());
        let tracker = Arc::new(Tracker::new(source.clone(), 4));
        let metrics = Metrics::new(tracker, ports, labels, "tp_btf", false).expect("metrics");
        (source, metrics)
    }

    /// Drains on `source`'s endpoints, counted as `metrics` exports them and registered.
    fn drains_of(source: &Arc<FakeSource>, metrics: &Metrics) -> Arc<Drains> {
        let tracker = Arc::new(Tracker::new(source.clone(), 4));
        let drains = Arc::new(
            Drains::new(tracker, None, None, None, 4).with_metric_labels(metrics.labels().clone()),
        );
        metrics
            .register_drains(Arc::clone(&drains))
            .expect("register");
        drains
    }

    /// A drain of `filter` posted by the node, ending at `timeout`.
    async fn post(drains: &Arc<Drains>, filter: crate::tracker::Filter, timeout: Duration) {
        use crate::{
            drain::{DrainSpec, Given, OnTimeout},
            drain_rule::DrainRule,
        };
        drains
            .post(
                DrainSpec {
                    filter,
                    timeout,
                    rule: DrainRule::default(),
                    on_timeout: OnTimeout::Keep,
                    pace: 0,
                    given: Given::default(),
                },
                crate::drain::StartedBy::Node,
            )
            .await
            .expect("room");
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
    fn address_labels_sum_namespaces_and_keep_the_port_exact() {
        let source = Arc::new(FakeSource::default());
        let tracker = Arc::new(Tracker::new(source.clone(), 4));
        let metrics = Metrics::new(
            tracker,
            Some("8080".parse().expect("ports")),
            ConnectionLabels::Address,
            "tp_btf",
            false,
        )
        .expect("metrics");
        let mut loopback_elsewhere = endpoint("127.0.0.1", 8080, 2);
        loopback_elsewhere.netns += 1;
        source.set(vec![
            endpoint("10.0.0.1", 8080, 3),
            endpoint("10.0.0.2", 8080, 0),
            endpoint("127.0.0.1", 8080, 1),
            loopback_elsewhere,
            endpoint("10.0.0.1", 9, 1),
        ]);
        let text = metrics.render().expect("render");
        for line in [
            "drain_agent_connections_active{port=\"8080\",addr=\"10.0.0.1\"} 3",
            "drain_agent_connections_active{port=\"8080\",addr=\"10.0.0.2\"} 0",
            // Two namespaces, one address: one series.
            "drain_agent_connections_active{port=\"8080\",addr=\"127.0.0.1\"} 3",
        ] {
            assert!(text.contains(line), "{line}:\n{text}");
        }
        // Every connection is in an endpoint: no series without an address; --ports holds.
        assert!(
            !text.contains("drain_agent_connections_active{port=\"8080\"}"),
            "{text}"
        );
        assert!(!text.contains("port=\"9\""), "{text}");
    }

    #[tokio::test]
    async fn drains_by_scope_show_while_they_run_and_count_their_results() {
        use crate::tracker::Filter;
        let (source, metrics) = labelled(None, ConnectionLabels::Address);
        source.set(vec![endpoint("10.0.0.1", 8080, 1)]);
        let drains = drains_of(&source, &metrics);
        let pod = Filter {
            addr: Some("10.0.0.1".parse().expect("addr")),
            ..Filter::port(8080)
        };
        post(&drains, pod.clone(), Duration::from_millis(300)).await;
        // A pod listener's drain (its namespace): labelled by the pod's address there.
        let mut in_pod = endpoint("127.0.0.1", 8081, 1);
        in_pod.netns = 7;
        let mut pod_ip = endpoint("10.0.0.7", 8081, 1);
        pod_ip.netns = 7;
        source.set(vec![endpoint("10.0.0.1", 8080, 1), in_pod, pod_ip]);
        let in_namespace = Filter {
            netns: Some(7),
            ..Filter::port(8081)
        };
        post(&drains, in_namespace, Duration::from_secs(60)).await;
        let scope = "port=\"8080\",addr=\"10.0.0.1\"";
        let text = metrics.render().expect("render");
        for line in [
            "drain_agent_drain_in_progress{port=\"8081\",addr=\"10.0.0.7\"} 1".to_owned(),
            format!("drain_agent_drain_in_progress{{{scope}}} 1"),
            format!("drain_agent_scope_drains_total{{{scope},result=\"timeout\"}} 0"),
        ] {
            assert!(text.contains(&line), "{line}:\n{text}");
        }
        drains
            .wait_ended(&pod, Duration::from_secs(5))
            .await
            .expect("the drain ends at its timeout");
        let text = metrics.render().expect("render");
        // Ended: no longer in progress, its timeout counted for its scope.
        assert!(
            !text.contains(&format!("drain_agent_drain_in_progress{{{scope}}}")),
            "{text}"
        );
        let line = format!("drain_agent_scope_drains_total{{{scope},result=\"timeout\"}} 1");
        assert!(text.contains(&line), "{line}:\n{text}");
    }

    /// Audit (upgrade overlap, kured): beside the state file's writer, whose `/metrics` is
    /// closed from its SIGTERM on while its drains run on, nothing here showed them: the
    /// kured alert went silent. `other_agent_drains_in_progress` counts them (ports
    /// `--ports` leaves out excepted, as for this agent's own), 0 outside an overlap.
    #[tokio::test]
    async fn the_writers_drains_are_counted_beside_it() {
        use crate::{drain::state_file::StateFile, tracker::Filter};
        let dir = tempfile::tempdir().expect("dir");
        let (source, metrics) =
            labelled(Some("8080".parse().expect("ports")), ConnectionLabels::Port);
        source.set(vec![
            endpoint("10.0.0.1", 8080, 1),
            endpoint("10.0.0.1", 9090, 1),
        ]);
        let writer = {
            let file = StateFile::open(dir.path()).expect("state file");
            // As the writer at its start: the next agent's file is free for another agent.
            file.retire_next().expect("nothing to retire");
            let tracker = Arc::new(Tracker::new(source.clone(), 4));
            Arc::new(Drains::new(tracker, None, None, None, 4).with_state_file(file))
        };
        let beside = {
            let tracker = Arc::new(Tracker::new(source.clone(), 4));
            let drains = Arc::new(
                Drains::new(tracker, None, None, None, 4)
                    .with_metric_labels(metrics.labels().clone())
                    .with_state_file(StateFile::open(dir.path()).expect("state file")),
            );
            metrics
                .register_drains(Arc::clone(&drains))
                .expect("register");
            drains
        };
        beside.restore();
        let gauge = "drain_agent_other_agent_drains_in_progress";
        let text = metrics.render().expect("render");
        assert!(text.contains(&format!("# TYPE {gauge} gauge")), "{text}");
        assert!(text.contains(&format!("\n{gauge} 0\n")), "{text}");
        for port in [8080, 9090] {
            post(&writer, Filter::port(port), Duration::from_secs(600)).await;
        }
        assert_eq!(writer.save().await, crate::drain::Saved::Yes);
        let text = metrics.render().expect("render");
        assert!(text.contains(&format!("\n{gauge} 1\n")), "{text}");
        assert!(!text.contains("drain_agent_drain_in_progress"), "{text}");
    }

    /// The opened and closed counters of a render, by series (name and labels as rendered).
    fn counters(text: &str) -> std::collections::BTreeMap<String, f64> {
        text.lines()
            .filter(|line| {
                line.starts_with("drain_agent_connections_opened_total")
                    || line.starts_with("drain_agent_connections_closed_total")
            })
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    /// Renders `metrics`' counters, checking that no series shown in `before` as well went
    /// down (Prometheus reads a decrease as a reset: the whole value as new increase).
    fn counters_after(
        metrics: &Metrics,
        before: &std::collections::BTreeMap<String, f64>,
    ) -> std::collections::BTreeMap<String, f64> {
        let after = counters(&metrics.render().expect("render"));
        for (series, value) in &after {
            if let Some(was) = before.get(series) {
                assert!(value >= was, "{series} went down from {was} to {value}");
            }
        }
        after
    }

    /// An endpoint with no connection open that had `total` (opened and closed).
    fn idle(addr: &str, port: u16, total: u64) -> crate::tracker::Endpoint {
        let mut endpoint = endpoint(addr, port, 0);
        endpoint.opened = total;
        endpoint.closed = total;
        endpoint
    }

    /// Audit: a reclaimed endpoint's totals went to its port's series without `addr`, so
    /// that series jumped by the pod's whole lifetime count in one scrape (a spike of
    /// `sum by (port) (rate(...))`: counts its own series had reported already). Now the
    /// address's series goes (no endpoint has it: Prometheus marks it stale) and its totals
    /// show nowhere else.
    #[test]
    fn a_reclaimed_address_leaves_its_series_and_adds_nothing_to_the_port_series() {
        let (source, metrics) = labelled(None, ConnectionLabels::Address);
        let gone = idle("10.0.0.1", 8080, 500);
        source.set(vec![gone.clone(), endpoint("10.0.0.2", 8080, 2)]);
        let before = counters(&metrics.render().expect("render"));
        assert_eq!(
            before.get("drain_agent_connections_opened_total{port=\"8080\",addr=\"10.0.0.1\"}"),
            Some(&500.0),
            "{before:?}"
        );
        source.reclaim(&gone);
        let after = counters_after(&metrics, &before);
        assert!(
            !after.keys().any(|series| series.contains("10.0.0.1")),
            "{after:?}"
        );
        for family in [
            "drain_agent_connections_opened_total",
            "drain_agent_connections_closed_total",
        ] {
            let port_only = format!("{family}{{port=\"8080\"}}");
            let (was, now) = (
                before.get(&port_only).copied().unwrap_or(0.0),
                after.get(&port_only).copied().unwrap_or(0.0),
            );
            assert!(
                now <= was,
                "{port_only} grew from {was} to {now} by totals 10.0.0.1 had reported: {after:?}"
            );
        }
    }

    /// Audit: endpoints that share an address in several namespaces (127.0.0.1 in every pod)
    /// are one series, and reclaiming one of them took its totals out of that series: it
    /// went down, and Prometheus counted the whole rest as new. Now the series keeps them
    /// while an endpoint has its address, and loses them (bounded) with its last endpoint.
    #[test]
    fn reclaiming_one_namespaces_endpoint_keeps_a_shared_address_whole() {
        let (source, metrics) = labelled(None, ConnectionLabels::Address);
        let shared = "drain_agent_connections_opened_total{port=\"8080\",addr=\"127.0.0.1\"}";
        let quiet = idle("127.0.0.1", 8080, 300);
        let mut busy = endpoint("127.0.0.1", 8080, 1);
        busy.netns += 1;
        source.set(vec![quiet.clone(), busy.clone()]);
        let before = counters(&metrics.render().expect("render"));
        assert_eq!(before.get(shared), Some(&301.0), "{before:?}");
        source.reclaim(&quiet);
        let after = counters_after(&metrics, &before);
        assert_eq!(after.get(shared), Some(&301.0), "{after:?}");
        assert!(
            !after.contains_key("drain_agent_connections_opened_total{port=\"8080\"}"),
            "{after:?}"
        );
        // It counts on from there.
        busy.opened += 2;
        source.set(vec![busy.clone()]);
        let later = counters_after(&metrics, &after);
        assert_eq!(later.get(shared), Some(&303.0), "{later:?}");
        // The last endpoint of the address goes: so does the series, and what it carried.
        source.reclaim(&busy);
        let gone = counters_after(&metrics, &later);
        assert!(gone.is_empty(), "{gone:?}");
        // A new endpoint there (a reused address) starts afresh, not from the old totals.
        source.set(vec![endpoint("127.0.0.1", 8080, 1)]);
        let again = counters(&metrics.render().expect("render"));
        assert_eq!(again.get(shared), Some(&1.0), "{again:?}");
    }

    /// By port, the port's series holds every reclaimed endpoint's totals: it never goes
    /// down when one is reclaimed.
    #[test]
    fn by_port_the_series_keeps_reclaimed_totals() {
        let (source, metrics) = labelled(None, ConnectionLabels::Port);
        let quiet = idle("10.0.0.1", 8080, 40);
        source.set(vec![quiet.clone(), endpoint("10.0.0.2", 8080, 2)]);
        let series = "drain_agent_connections_opened_total{port=\"8080\"}";
        let before = counters(&metrics.render().expect("render"));
        assert_eq!(before.get(series), Some(&42.0), "{before:?}");
        source.reclaim(&quiet);
        let after = counters_after(&metrics, &before);
        assert_eq!(after.get(series), Some(&42.0), "{after:?}");
    }

    /// A reclaim between a scrape's read of the endpoints and its read of the reclaimed
    /// totals would count the endpoint twice in that scrape (and the next one would go
    /// down): the two are read together.
    #[test]
    fn a_reclaim_during_a_scrape_is_not_counted_twice() {
        for labels in [ConnectionLabels::Port, ConnectionLabels::Address] {
            let (source, metrics) = labelled(None, labels);
            let quiet = idle("127.0.0.1", 8080, 40);
            let mut busy = endpoint("127.0.0.1", 8080, 2);
            busy.netns += 1;
            source.set(vec![quiet.clone(), busy]);
            *source.after_next_read.lock().expect("lock") =
                Some(Box::new(move |source: &FakeSource| source.reclaim(&quiet)));
            let during = counters(&metrics.render().expect("render"));
            assert!(
                during.values().all(|value| *value <= 42.0),
                "{labels:?}: {during:?}"
            );
            let after = counters_after(&metrics, &during);
            assert!(
                after.values().any(|value| *value == 42.0),
                "{labels:?}: {after:?}"
            );
        }
    }

    /// Audit: connections counted for their port only (the endpoint map was full when they
    /// opened) showed only on ports that had an endpoint series already: a port with none
    /// in the endpoint map had no `connections_active` series at all, and
    /// `tracked_sockets`, a sum over the endpoints, left them all out. Every port with
    /// tracked connections now has its series (by address, the one without `addr` holds
    /// what no endpoint does), a sum by port is the port's total, and the gauge counts every
    /// tracked socket, exported or not.
    #[test]
    fn connections_counted_for_their_port_only_show_on_every_port() {
        for labels in [ConnectionLabels::Address, ConnectionLabels::Port] {
            for ports in [None, Some("8080,9090".parse::<PortSet>().expect("ports"))] {
                let all_exported = ports.is_none();
                let (source, metrics) = labelled(ports, labels);
                source.set(vec![endpoint("10.0.0.1", 8080, 2)]);
                *source.port_only.lock().expect("lock") =
                    std::collections::BTreeMap::from([(8080, 1), (9090, 4), (7070, 5)]);
                let text = metrics.render().expect("render");
                let lines: &[&str] = match labels {
                    ConnectionLabels::Address => &[
                        "drain_agent_connections_active{port=\"8080\",addr=\"10.0.0.1\"} 2",
                        "drain_agent_connections_active{port=\"8080\"} 1",
                        "drain_agent_connections_active{port=\"9090\"} 4",
                    ],
                    ConnectionLabels::Port => &[
                        "drain_agent_connections_active{port=\"8080\"} 3",
                        "drain_agent_connections_active{port=\"9090\"} 4",
                    ],
                };
                for line in lines {
                    assert!(text.contains(line), "{labels:?} {line}:\n{text}");
                }
                // Port 7070 is tracked: in the gauge, and in the series unless --ports
                // leaves it out.
                assert!(
                    text.contains("drain_agent_tracked_sockets 12"),
                    "{labels:?}:\n{text}"
                );
                assert_eq!(
                    text.contains("drain_agent_connections_active{port=\"7070\"} 5"),
                    all_exported,
                    "{labels:?} all exported {all_exported}:\n{text}"
                );
                // No endpoint ever counted port 9090's opens and closes: no counter says
                // they were none.
                assert!(
                    !text.contains("_total{port=\"9090\""),
                    "{labels:?}:\n{text}"
                );
            }
        }
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

    /// Audit (--ports, --metrics-labels): the drain metrics ignored both. `--ports 8080`
    /// still exported drains of 9090, and `--metrics-labels port` (SECURITY.md: what hides
    /// the pods' addresses from a public /metrics) still gave each drain its pod's `addr`,
    /// a namespace's drain included. Now they follow the connection metrics: ports left
    /// out are not exported, and by port every address's drains are one series a port.
    #[tokio::test]
    async fn drain_metrics_follow_the_ports_allow_list_and_the_port_label() {
        use crate::tracker::Filter;
        let (source, metrics) =
            labelled(Some("8080".parse().expect("ports")), ConnectionLabels::Port);
        let mut pod_ip = endpoint("10.0.0.7", 8080, 1);
        pod_ip.netns = 7;
        source.set(vec![
            endpoint("10.0.0.1", 8080, 1),
            endpoint("10.0.0.2", 8080, 1),
            pod_ip,
            endpoint("10.0.0.1", 9090, 1),
        ]);
        let drains = drains_of(&source, &metrics);
        let at = |addr: &str, port: u16| Filter {
            addr: Some(addr.parse().expect("addr")),
            ..Filter::port(port)
        };
        let short = Duration::from_millis(200);
        let scopes = [
            at("10.0.0.1", 8080),
            at("10.0.0.2", 8080),
            Filter {
                netns: Some(7),
                ..Filter::port(8080)
            },
            at("10.0.0.1", 9090),
        ];
        for scope in &scopes {
            post(&drains, scope.clone(), short).await;
        }
        let text = metrics.render().expect("render");
        assert!(
            text.contains("drain_agent_drain_in_progress{port=\"8080\"} 3"),
            "{text}"
        );
        assert!(!text.contains("addr="), "{text}");
        assert!(!text.contains("port=\"9090\""), "{text}");
        // Each ends at its timeout (`None`: ended already, counted with its end: the test's
        // runtime has one thread).
        for scope in &scopes {
            let _ = drains.wait_ended(scope, Duration::from_secs(5)).await;
        }
        let text = metrics.render().expect("render");
        assert!(
            text.contains("drain_agent_scope_drains_total{port=\"8080\",result=\"timeout\"} 3"),
            "{text}"
        );
        assert!(!text.contains("addr="), "{text}");
        assert!(!text.contains("port=\"9090\""), "{text}");
        // Every drain is in the totals, whatever its port.
        assert!(
            text.contains("drain_agent_drains_total{result=\"timeout\"} 4"),
            "{text}"
        );
    }

    /// The drains must count by scope as the metrics export: drains counted otherwise are
    /// refused, not rendered with the wrong labels.
    #[test]
    fn drains_counted_with_other_labels_are_refused() {
        let (source, metrics) = metrics(Some("8080".parse().expect("ports")));
        let tracker = Arc::new(Tracker::new(source, 4));
        let drains = Arc::new(Drains::new(tracker, None, None, None, 4));
        assert!(metrics.register_drains(drains).is_err());
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
