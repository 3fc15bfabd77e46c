//! The connection metrics, read from the tracker at scrape time.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use anyhow::Result;
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

use super::{
    ConnectionLabels, PortSet,
    families::{counter, desc, duration_metric, family, gauge},
};
use crate::tracker::Tracker;
use drain_agent_common::DURATION_BUCKET_COUNT;

pub(super) struct ConnectionCollector {
    tracker: Arc<Tracker>,
    ports: Option<PortSet>,
    labels: ConnectionLabels,
    attach: String,
    descs: Vec<Desc>,
}

const ACTIVE: (&str, &str) = (
    "drain_agent_connections_active",
    "Inbound TCP connections open now (ESTABLISHED or CLOSE_WAIT), per local port and (--metrics-labels address) local address; a series without addr holds those counted for their port only.",
);
const OPENED: (&str, &str) = (
    "drain_agent_connections_opened_total",
    "Inbound TCP connections opened (or found open by a walk) since the kernel counting state was made (pinned in --pin-dir, a restarted agent goes on from it), per local port and (--metrics-labels address) local address; those counted for their port only are not in it. An endpoint idle for 60 s is reclaimed: by port its totals stay in the port's series (pinned with the counting state too); by address they stay in the address's series while an endpoint of another namespace has that address, else that series ends.",
);
const CLOSED: (&str, &str) = (
    "drain_agent_connections_closed_total",
    "Inbound TCP connections closed since the kernel counting state was made (pinned in --pin-dir, a restarted agent goes on from it), per local port and (--metrics-labels address) local address; those counted for their port only are not in it. An endpoint idle for 60 s is reclaimed: by port its totals stay in the port's series (pinned with the counting state too); by address they stay in the address's series while an endpoint of another namespace has that address, else that series ends.",
);
const DURATION: (&str, &str) = (
    "drain_agent_connection_duration_seconds",
    "How long inbound TCP connections stayed open, per local port, since the kernel counting state was made (pinned in --pin-dir, a restarted agent goes on from it; connections already open when it was made are not included).",
);
const TRACKED: (&str, &str) = (
    "drain_agent_tracked_sockets",
    "Sockets tracked in the kernel map now, all ports (those counted for their port only included).",
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
const KERNEL_LIMITED: (&str, &str) = (
    "drain_agent_kernel_limited",
    "1 while a limit of this kernel (no socket walker; the classic tracepoint before Linux 6.7; walks without the socket lock before 5.15; /healthz kernel_limits names it) has every /drained answer confirmed with the kernel's socket tables: right, each a little slower. Not counted in drain_agent_degraded.",
);
const WAITERS: (&str, &str) = (
    "drain_agent_drain_waiters",
    "/drained requests blocked now.",
);

impl ConnectionCollector {
    pub(super) fn new(
        tracker: Arc<Tracker>,
        ports: Option<PortSet>,
        labels: ConnectionLabels,
        attach: String,
    ) -> Result<Self> {
        let per_endpoint: &[&str] = match labels {
            ConnectionLabels::Port => &["port"],
            ConnectionLabels::Address => &["port", "addr"],
        };
        let descs = vec![
            desc(ACTIVE, per_endpoint)?,
            desc(OPENED, per_endpoint)?,
            desc(CLOSED, per_endpoint)?,
            desc(DURATION, &["port"])?,
            desc(TRACKED, &[])?,
            desc(ERRORS, &["reason"])?,
            desc(REPAIRS, &["kind"])?,
            desc(BUILD_INFO, &["version", "attach"])?,
            desc(WAITERS, &[])?,
            desc(WALKS, &[])?,
            desc(DEGRADED, &[])?,
            desc(KERNEL_LIMITED, &[])?,
        ];
        Ok(Self {
            tracker,
            ports,
            labels,
            attach,
            descs,
        })
    }

    fn exported(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|ports| ports.contains(port))
    }
}

/// One series of the connection metrics: a port and, labelled by address, the local
/// address (`None`: what no address can be given: connections open now that are counted
/// for their port only; with port labels only, the whole port).
type SeriesKey = (u16, Option<IpAddr>);

/// Totals of one series, summed over the namespaces (and, by port, the addresses) in it.
#[derive(Default)]
struct PortTotals {
    /// An endpoint (or a reclaimed one) counted its opens and closes: connections counted
    /// for their port only are in no opened or closed count, so a series of those alone
    /// has none to show.
    counted: bool,
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
        let doubts = self.tracker.health_doubts();
        let degraded = doubts.iter().any(crate::doubt::Doubt::degrades_health);
        families.push(family(
            DEGRADED,
            MetricType::GAUGE,
            vec![gauge(&[], f64::from(u8::from(degraded)))],
        ));
        let limited = doubts.iter().any(crate::doubt::Doubt::kernel_limit);
        families.push(family(
            KERNEL_LIMITED,
            MetricType::GAUGE,
            vec![gauge(&[], f64::from(u8::from(limited)))],
        ));

        // A scrape that cannot read the kernel shows no connection metrics rather than
        // wrong ones; /healthz says why.
        let Ok((endpoints, reclaimed)) = self.tracker.counters() else {
            return families;
        };
        // Every port that has had a tracked connection, with what is open there now, those
        // counted for their port only (the endpoint map was full, or the endpoint was being
        // reclaimed, when they opened) included: those are in no endpoint, and a port may
        // have no endpoint at all. (A port whose first connection is being counted right
        // now may show in the endpoints and not here yet: its series is then theirs.)
        let Ok(port_totals) = self.tracker.port_totals(&endpoints) else {
            return families;
        };
        // Every tracked socket is in its port's total, scoped or not, exported or not.
        let tracked: u64 = port_totals.values().sum();
        let by_address = self.labels == ConnectionLabels::Address;
        let mut series: BTreeMap<SeriesKey, PortTotals> = BTreeMap::new();
        for endpoint in &endpoints {
            if !self.exported(endpoint.port) {
                continue;
            }
            // Endpoints that share an address and port in several namespaces (127.0.0.1 in
            // every pod) are one series: the namespace is nothing Prometheus can join on.
            let addr = by_address.then_some(endpoint.addr);
            let totals = series.entry((endpoint.port, addr)).or_default();
            totals.counted = true;
            totals.active += endpoint.active;
            totals.opened += endpoint.opened;
            totals.closed += endpoint.closed;
        }
        // What reclaimed endpoints counted stays in the series that showed it, so that no
        // counter goes down: by port, the port's; by address, the address's while an
        // endpoint (of another namespace) still has it. Never in another series: one that
        // took a reclaimed address's totals would jump by counts already reported.
        if by_address {
            for ((port, addr), counted) in &reclaimed.by_address {
                if let Some(totals) = series.get_mut(&(*port, Some(*addr))) {
                    totals.opened += counted.opened;
                    totals.closed += counted.closed;
                }
            }
        } else {
            for (port, counted) in &reclaimed.by_port {
                if self.exported(*port) {
                    let totals = series.entry((*port, None)).or_default();
                    totals.counted = true;
                    totals.opened += counted.opened;
                    totals.closed += counted.closed;
                }
            }
        }
        // The port totals are exact even for connections counted for their port only: by
        // port they replace the sum (a port with no endpoint gets its series from them), by
        // address what no endpoint holds goes to the port's series without an address, so
        // a sum by port of the active connections is the port's total.
        for (port, active) in port_totals {
            if !self.exported(port) {
                continue;
            }
            let in_endpoints: u64 = series
                .range((port, Some(IpAddr::from([0u8; 4])))..)
                .take_while(|((other, _), _)| *other == port)
                .map(|(_, totals)| totals.active)
                .sum();
            let rest = active.saturating_sub(in_endpoints);
            if !by_address || rest > 0 {
                series.entry((port, None)).or_default().active = rest;
            }
        }
        let labels = |(port, addr): &SeriesKey| {
            let mut labels = vec![("port", port.to_string())];
            if let Some(addr) = addr {
                labels.push(("addr", addr.to_string()));
            }
            labels
        };
        let per_port = |value: fn(&PortTotals) -> u64,
                        make: fn(&[(&str, String)], f64) -> proto::Metric,
                        counted: bool| {
            series
                .iter()
                // A series no endpoint counted (by address, the one without an address;
                // by port, a port whose connections were all counted for the port only)
                // holds connections open now: it has no opened or closed to count.
                .filter(|(_, totals)| !counted || totals.counted)
                .map(|(key, totals)| make(&labels(key), value(totals) as f64))
                .collect::<Vec<_>>()
        };
        families.push(family(
            ACTIVE,
            MetricType::GAUGE,
            per_port(|t| t.active, gauge, false),
        ));
        families.push(family(
            OPENED,
            MetricType::COUNTER,
            per_port(|t| t.opened, counter, true),
        ));
        families.push(family(
            CLOSED,
            MetricType::COUNTER,
            per_port(|t| t.closed, counter, true),
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
