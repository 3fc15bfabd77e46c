//! The agent's `/metrics` checked against the real Prometheus tools: `promtool check metrics`
//! on a live scrape, a real Prometheus server scraping the agent, the connection-duration
//! histogram against connections held for measured times, bounded label sets (local ports
//! and addresses, never a client's) and the `--ports` allow-list, the process and build-info
//! metrics, and the series per node bounded with 100 endpoints and 10,000 clients.
//!
//! Every test starts its own agent and uses its own listener ports, so they can run in
//! parallel (and alongside other tests that count other ports).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{IpAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Agent, Server, kernel_available, prometheus::Prometheus};
use drain_agent_common::DURATION_BUCKETS_MS;

const PROMTOOL: &str = "/usr/bin/promtool";

// ---------------------------------------------------------------------------------------
// The text format, parsed just enough to look samples up.

/// One sample line: `name{label="value",...} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| parse_sample(line).unwrap_or_else(|| panic!("unparsable sample line {line:?}")))
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    // Rust's float parser takes the format's `+Inf`, `-Inf` and `NaN` as they are.
    let value = value.parse::<f64>().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series, BTreeMap::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="1",b="x\"y"` (the inside of the braces).
fn parse_labels(mut text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (name, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (index, c) = chars.next()?;
            match c {
                '\\' => {
                    let (_, escaped) = chars.next()?;
                    value.push(if escaped == 'n' { '\n' } else { escaped });
                }
                '"' => break index,
                c => value.push(c),
            }
        };
        labels.insert(name.to_owned(), value);
        let after = &rest[end + 1..];
        text = after.strip_prefix(',').unwrap_or(after);
    }
    Some(labels)
}

/// Samples named `name` whose labels include all of `want`.
fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(label, value)| s.labels.get(*label).is_some_and(|v| v == value))
        })
        .collect()
}

/// The one sample named `name` with labels `want`, if there is one (two is a bug).
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let found = find(samples, name, want);
    assert!(
        found.len() <= 1,
        "{name} {want:?} appears {} times: {found:?}",
        found.len()
    );
    found.first().map(|s| s.value)
}

/// GET /metrics from `agent`: the body, checked to be a 200.
fn scrape(agent: &Agent) -> String {
    let (status, body) = agent.try_get("/metrics").expect("agent answers /metrics");
    assert_eq!(status, 200, "/metrics: {body}");
    body
}

/// Scrapes until `done(samples)` holds — the test's own closes race with the scrape — and
/// fails after `limit` with the last body.
fn scrape_until(
    agent: &Agent,
    limit: Duration,
    what: &str,
    done: impl Fn(&[Sample]) -> bool,
) -> String {
    let started = Instant::now();
    loop {
        let body = scrape(agent);
        if done(&parse_samples(&body)) {
            return body;
        }
        assert!(
            started.elapsed() < limit,
            "no scrape showed {what} within {limit:?}; last:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect(port: u16, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. promtool

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn promtool_accepts_a_live_scrape() {
    if !kernel_available("promtool_accepts_a_live_scrape") {
        return;
    }
    let agent = Agent::start(&[]);
    let server = Server::start("127.0.0.1:0");
    let port = server.port.to_string();
    let clients = connect(server.port, 4);
    server.wait_accepted(4);
    // The server closes two (they leave ESTABLISHED: a duration is recorded), two stay open.
    let mut accepted = server.take_all();
    accepted.truncate(2);
    agent.expect_active(server.port, 2);
    // A drained wait and an invalid /drained answer (expect_active made queries), so the
    // drain metrics have samples of every kind too.
    let (status, _) = agent.get_json(&format!("/drained?port={}&timeout=1s", common::free_port()));
    assert_eq!(status, 200);
    let (status, _) = agent.get_json("/drained?port=0");
    assert_eq!(status, 400);

    let body = scrape_until(&agent, Duration::from_secs(10), "the closes", |s| {
        value(
            s,
            "drain_agent_connection_duration_seconds_count",
            &[("port", &port)],
        ) == Some(2.0)
    });
    // The body must have what is being checked: per-port gauge, counters and histogram.
    let samples = parse_samples(&body);
    let port_label = [("port", port.as_str())];
    for (name, expected) in [
        ("drain_agent_connections_active", 2.0),
        ("drain_agent_connections_opened_total", 4.0),
        ("drain_agent_connections_closed_total", 2.0),
        ("drain_agent_connection_duration_seconds_count", 2.0),
    ] {
        assert_eq!(
            value(&samples, name, &port_label),
            Some(expected),
            "{name}:\n{body}"
        );
    }
    assert!(
        value(&samples, "drain_agent_drain_wait_seconds_count", &[]).is_some_and(|n| n >= 1.0),
        "{body}"
    );

    let mut promtool = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {PROMTOOL} (Debian package prometheus): {e}"));
    // promtool reads all of stdin before it writes anything, so this cannot deadlock.
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feed promtool");
    let output = promtool.wait_with_output().expect("promtool");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Problems (lint warnings included) are printed and make the exit status non-zero.
    assert!(
        output.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "promtool check metrics: {}\nstdout:\n{stdout}\nstderr:\n{stderr}\nbody:\n{body}",
        output.status
    );
    drop((clients, accepted));
}

/// Audit: `drain-agent wait`'s progress lines ask `timeout=0` every `--progress`, and each
/// not-drained answer was counted `drain_requests_total{result="timeout"}` with a 0 s
/// `drain_wait_seconds` sample: one hook that waited for one connection counted a timeout
/// per progress line, and `DrainAgentDrainsTimingOut` fired for drains that never timed
/// out. The real client against the real agent: one wait, drained, is one `drained` and one
/// wait sample; its progress lines are `query`.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_waits_progress_lines_are_queries_not_timeouts() {
    if !kernel_available("a_waits_progress_lines_are_queries_not_timeouts") {
        return;
    }
    let agent = Agent::start(&[]);
    let server = Server::start("127.0.0.1:0");
    let client = connect(server.port, 1);
    server.wait_accepted(1);
    agent.expect_active(server.port, 1);
    let counts = || {
        let body = scrape(&agent);
        let samples = parse_samples(&body);
        let requests = |result| {
            value(
                &samples,
                "drain_agent_drain_requests_total",
                &[("result", result)],
            )
        };
        let counted = |result| {
            requests(result)
                .unwrap_or_else(|| panic!("drain_requests_total{{result={result}}}:\n{body}"))
        };
        let waits = value(&samples, "drain_agent_drain_wait_seconds_count", &[])
            .unwrap_or_else(|| panic!("drain_wait_seconds_count:\n{body}"));
        // `query` checked last: an agent from before it existed fails on the timeouts.
        (
            counted("timeout"),
            counted("drained"),
            requests("query"),
            waits,
        )
    };
    let before = counts();
    let wait = Command::new(common::agent_binary())
        .args([
            "wait",
            "--port",
            &server.port.to_string(),
            "--timeout",
            "30s",
        ])
        .args(["--progress", "1s", "--agent", &agent.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wait");
    // The connection stays open for some progress lines, then closes.
    std::thread::sleep(Duration::from_millis(3500));
    server.close_all();
    drop(client);
    let output = wait.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let lines = stderr.matches(": 1 active").count();
    assert!(lines >= 2, "progress lines:\n{stderr}");
    let after = counts();
    let (timeouts, drained, waits) = (after.0 - before.0, after.1 - before.1, after.3 - before.3);
    assert_eq!(
        (timeouts, drained, waits),
        (0.0, 1.0, 1.0),
        "timeouts, drained, waits; stderr:\n{stderr}"
    );
    // A progress line is printed for each not-drained answer (one more may have found the
    // port drained).
    let queries = after.2.expect("query counted") - before.2.expect("query counted");
    assert!(queries >= lines as f64, "{queries} queries, {lines} lines");
}

// ---------------------------------------------------------------------------------------
// 2. A real Prometheus server

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_real_prometheus_sees_connections_open_and_close() {
    if !kernel_available("a_real_prometheus_sees_connections_open_and_close") {
        return;
    }
    let agent = Agent::start(&[]);
    let prometheus = Prometheus::start(&format!("127.0.0.1:{}", agent.port));
    let limit = Duration::from_secs(30);
    // The agent is scraped and the scrape is accepted.
    prometheus.wait_for("up{job=\"drain-agent\"}", "1", limit);

    let server = Server::start("127.0.0.1:0");
    let port = server.port;
    let clients = connect(port, 7);
    server.wait_accepted(7);
    agent.expect_active(port, 7);
    let active = format!("drain_agent_connections_active{{port=\"{port}\"}}");
    let took = prometheus.wait_for(&active, "7", limit);
    eprintln!("prometheus saw 7 active connections after {took:?}");

    server.close_all();
    drop(clients);
    agent.expect_active(port, 0);
    let took = prometheus.wait_for(&active, "0", limit);
    eprintln!("prometheus saw 0 active connections after {took:?}");
    // Counters and the histogram made it through as well.
    for series in [
        format!("drain_agent_connections_opened_total{{port=\"{port}\"}}"),
        format!("drain_agent_connections_closed_total{{port=\"{port}\"}}"),
        format!("drain_agent_connection_duration_seconds_count{{port=\"{port}\"}}"),
        format!("drain_agent_connection_duration_seconds_bucket{{port=\"{port}\",le=\"+Inf\"}}"),
    ] {
        prometheus.wait_for(&series, "7", limit);
    }
}

// ---------------------------------------------------------------------------------------
// 3. The duration histogram

/// One connection held for a known time. The tracked socket is the server's (it was opened
/// passively); the server closes it, so it leaves ESTABLISHED inside `drop(server)`.
struct Held {
    /// Kept open until the end: only the server side closes.
    _client: TcpStream,
    server: Option<TcpStream>,
    hold: Duration,
    /// Before `connect`: the server socket cannot be established earlier.
    connect_started: Instant,
    /// After `accept`: the server socket was established by then.
    accepted: Instant,
    /// The kernel's duration lies in `[shortest, longest]`.
    shortest: Duration,
    longest: Duration,
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn duration_histogram_matches_connections_held_for_known_times() {
    if !kernel_available("duration_histogram_matches_connections_held_for_known_times") {
        return;
    }
    let agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let port_text = port.to_string();
    const HOLDS_MS: [u64; 6] = [50, 50, 50, 600, 600, 1500];

    let mut held: Vec<Held> = HOLDS_MS
        .iter()
        .map(|&hold_ms| {
            let connect_started = Instant::now();
            let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            // One connection in the backlog at a time: this accept returns this connection.
            let (server, _) = listener.accept().expect("accept");
            Held {
                _client: client,
                server: Some(server),
                hold: Duration::from_millis(hold_ms),
                connect_started,
                accepted: Instant::now(),
                shortest: Duration::ZERO,
                longest: Duration::ZERO,
            }
        })
        .collect();
    // Close each server socket when its time is up, earliest first.
    held.sort_by_key(|h| h.accepted + h.hold);
    for h in &mut held {
        std::thread::sleep((h.accepted + h.hold).saturating_duration_since(Instant::now()));
        let closing = Instant::now();
        drop(h.server.take());
        let closed = Instant::now();
        h.shortest = closing - h.accepted;
        h.longest = closed - h.connect_started;
    }

    let body = scrape_until(&agent, Duration::from_secs(10), "6 durations", |s| {
        value(
            s,
            "drain_agent_connection_duration_seconds_count",
            &[("port", &port_text)],
        ) == Some(6.0)
    });
    let samples = parse_samples(&body);
    let label = [("port", port_text.as_str())];
    let sum = value(
        &samples,
        "drain_agent_connection_duration_seconds_sum",
        &label,
    )
    .expect("sum");
    let buckets: Vec<(f64, f64)> = find(
        &samples,
        "drain_agent_connection_duration_seconds_bucket",
        &label,
    )
    .iter()
    .map(|s| {
        let le = s.labels.get("le").expect("le label");
        (
            le.parse::<f64>().unwrap_or_else(|_| panic!("le {le:?}")),
            s.value,
        )
    })
    .collect();

    let shortest: f64 = held.iter().map(|h| h.shortest.as_secs_f64()).sum();
    let longest: f64 = held.iter().map(|h| h.longest.as_secs_f64()).sum();
    let nominal: f64 = HOLDS_MS.iter().map(|&ms| ms as f64 / 1000.0).sum();
    eprintln!(
        "duration sum: agent {sum:.4} s; measured from the test [{shortest:.4}, {longest:.4}] s; nominal {nominal:.3} s"
    );
    eprintln!("buckets (le, cumulative): {buckets:?}");

    // One bucket per bound of drain-agent-common, then +Inf, in order, cumulative.
    let mut expected_bounds: Vec<f64> = DURATION_BUCKETS_MS
        .iter()
        .map(|&ms| ms as f64 / 1000.0)
        .collect();
    expected_bounds.push(f64::INFINITY);
    let bounds: Vec<f64> = buckets.iter().map(|(le, _)| *le).collect();
    assert_eq!(bounds, expected_bounds, "bucket bounds:\n{body}");
    assert!(
        buckets.windows(2).all(|pair| pair[0].1 <= pair[1].1),
        "buckets are not cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.last().map(|b| b.1),
        Some(6.0),
        "le=\"+Inf\" must equal the count"
    );

    // Each connection's kernel-side duration lies within what the test measured around its
    // connect/accept and its close, so every bucket count is known up to connections whose
    // measured interval straddles that bound (normally none: the intervals are microseconds
    // wide). With the nominal holds that is le=0.1 -> 3, le=1 -> 5, le=5 -> 6.
    for &(le, got) in &buckets {
        let surely_in = held
            .iter()
            .filter(|h| h.longest.as_secs_f64() <= le)
            .count() as f64;
        let maybe_in = held
            .iter()
            .filter(|h| h.shortest.as_secs_f64() <= le)
            .count() as f64;
        assert!(
            (surely_in..=maybe_in).contains(&got),
            "le={le}: {got} connections, expected {surely_in}..={maybe_in} from the measured holds {:?}",
            held.iter()
                .map(|h| (h.shortest, h.longest))
                .collect::<Vec<_>>()
        );
    }
    let nominal_bucket = |le: f64| held.iter().filter(|h| h.hold.as_secs_f64() <= le).count();
    if held
        .iter()
        .all(|h| h.longest < h.hold + Duration::from_millis(40))
    {
        // The holds were not delayed past their nominal buckets: the counts are exact.
        for le in [0.1, 1.0, 5.0, f64::INFINITY] {
            let got = buckets.iter().find(|b| b.0 == le).map(|b| b.1);
            assert_eq!(got, Some(nominal_bucket(le) as f64), "le={le}");
        }
    }

    // The sum: within what was measured (plus a millisecond of clock slack per connection),
    // and, generously, near the nominal total.
    let slack = 0.001 * held.len() as f64;
    assert!(
        (shortest - slack..=longest + slack).contains(&sum),
        "sum {sum} s is outside the measured [{shortest}, {longest}] s"
    );
    assert!(
        (sum - nominal).abs() <= 0.4 * nominal,
        "sum {sum} s is not within 40% of the nominal {nominal} s"
    );
    drop(held);
}

// ---------------------------------------------------------------------------------------
// 4. Bounded labels and the --ports allow-list

/// Label names the agent's metrics may carry; a client address or port never is one: their
/// values are few and fixed, local ports (`origin`/`pinned`: where the kernel state came
/// from, `drain_agent_kernel_state`), or local addresses ([`ADDRESS_LABEL`]).
const ALLOWED_LABELS: [&str; 10] = [
    "port", "addr", "le", "result", "reason", "kind", "version", "attach", "origin", "pinned",
];

/// The one label whose values are addresses: the local address of the connection metrics
/// (a pod's IP), never a client's.
const ADDRESS_LABEL: &str = "addr";

/// The sum of the samples named `name` whose labels include all of `want`.
fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    find(samples, name, want).iter().map(|s| s.value).sum()
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn labels_are_local_ports_only_and_the_ports_flag_limits_them() {
    if !kernel_available("labels_are_local_ports_only_and_the_ports_flag_limits_them") {
        return;
    }
    let agent = Agent::start(&[]);
    // Port P on 20 local addresses (127.0.0.1 .. 127.0.0.20): 20 kernel keys, one port.
    let hosts: Vec<String> = (1..=20).map(|i| format!("127.0.0.{i}")).collect();
    let servers = Server::start_on_one_port(&hosts.iter().map(String::as_str).collect::<Vec<_>>());
    let p = servers[0].port;
    let limited = Agent::start(&["--ports", &p.to_string()]);
    let by_port = Agent::start(&["--metrics-labels", "port"]);
    let other = Server::start("127.0.0.1:0");
    let q = other.port;

    let mut clients: Vec<TcpStream> = (1..=20)
        .map(|i| TcpStream::connect((format!("127.0.0.{i}").as_str(), p)).expect("connect"))
        .collect();
    clients.extend(connect(q, 3));
    for server in &servers {
        server.wait_accepted(1);
    }
    other.wait_accepted(3);
    let client_ports: BTreeSet<String> = clients
        .iter()
        .map(|c| c.local_addr().expect("addr").port().to_string())
        .collect();
    // A client as `address:port`, and its port alone as a label value: neither shows.
    let client_ends: Vec<String> = clients
        .iter()
        .map(|c| c.local_addr().expect("addr").to_string())
        .collect();
    agent.expect_active(p, 20);
    agent.expect_active(q, 3);
    limited.expect_active(p, 20);
    by_port.expect_active(p, 20);

    let (p_text, q_text) = (p.to_string(), q.to_string());
    let body = scrape(&agent);
    let samples = parse_samples(&body);
    for sample in &samples {
        for (name, value) in &sample.labels {
            assert!(
                ALLOWED_LABELS.contains(&name.as_str()),
                "label {name} on {sample:?}"
            );
            if name == ADDRESS_LABEL {
                // A local address; on P only the servers' own (other ports may be other
                // tests' or the host's, in their own namespaces).
                assert!(
                    value.parse::<IpAddr>().is_ok(),
                    "addr {value:?}: {sample:?}"
                );
                if sample.labels.get("port") == Some(&p_text) {
                    assert!(hosts.contains(value), "addr {value:?} on P: {sample:?}");
                }
            } else {
                assert!(
                    value.parse::<IpAddr>().is_err(),
                    "an address as a label value: {sample:?}"
                );
            }
            if name == "port" {
                assert!(value.parse::<u16>().is_ok(), "port label {value:?}");
                assert!(
                    !client_ports.contains(value),
                    "a client port as a label: {sample:?}"
                );
            }
        }
    }
    for end in &client_ends {
        assert!(
            !body.contains(end.as_str()),
            "client {end} in /metrics:\n{body}"
        );
    }
    // 20 local addresses, 20 series of one connection each, 20 for the port.
    for host in &hosts {
        assert_eq!(
            value(
                &samples,
                "drain_agent_connections_active",
                &[("port", &p_text), ("addr", host)]
            ),
            Some(1.0),
            "{body}"
        );
    }
    assert_eq!(
        sum(
            &samples,
            "drain_agent_connections_active",
            &[("port", &p_text)]
        ),
        20.0,
        "{body}"
    );
    assert_eq!(
        sum(
            &samples,
            "drain_agent_connections_active",
            &[("port", &q_text)]
        ),
        3.0,
        "{body}"
    );

    // --metrics-labels port: 20 local addresses, one series, no address anywhere.
    let body = scrape(&by_port);
    let samples = parse_samples(&body);
    assert_eq!(
        value(
            &samples,
            "drain_agent_connections_active",
            &[("port", &p_text)]
        ),
        Some(20.0),
        "{body}"
    );
    for sample in &samples {
        assert!(!sample.labels.contains_key(ADDRESS_LABEL), "{sample:?}");
    }

    // With --ports P: P is exported, Q (counted by the other agent) nowhere.
    let body = scrape(&limited);
    let samples = parse_samples(&body);
    assert_eq!(
        sum(
            &samples,
            "drain_agent_connections_active",
            &[("port", &p_text)]
        ),
        20.0,
        "{body}"
    );
    assert_eq!(
        sum(
            &samples,
            "drain_agent_connections_opened_total",
            &[("port", &p_text)]
        ),
        20.0,
        "{body}"
    );
    for sample in &samples {
        if let Some(port) = sample.labels.get("port") {
            assert_eq!(port, &p_text, "--ports {p} exported {sample:?}");
        }
    }
    assert!(!body.contains(&format!("port=\"{q}\"")), "{body}");
    drop(clients);
}

/// Audit: with the endpoint map full (`--max-endpoints 1`), a port whose connections were
/// all counted for the port only had no `connections_active` series at all (the exported
/// ports came from the endpoints), although the HELP text and the README promise such
/// connections in the port's series without `addr`; and `tracked_sockets`, a sum over the
/// endpoints, left them out just when the maps were under pressure
/// (`DrainAgentSocketMapFilling`). Both ports' series now carry their whole counts, by
/// address and by port, and the gauge counts every tracked socket.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn ports_counted_for_the_port_only_keep_their_series_with_a_full_endpoint_map() {
    if !kernel_available(
        "ports_counted_for_the_port_only_keep_their_series_with_a_full_endpoint_map",
    ) {
        return;
    }
    let by_address = Agent::start(&["--max-endpoints", "1"]);
    let by_port = Agent::start(&["--max-endpoints", "1", "--metrics-labels", "port"]);
    let first = Server::start("127.0.0.1:0");
    let second = Server::start("127.0.0.1:0");
    // One endpoint's room: the first port's connections may take it (or another test's
    // traffic may have); the second port's are counted for their port only.
    let first_clients = connect(first.port, 2);
    first.wait_accepted(2);
    let second_clients = connect(second.port, 3);
    second.wait_accepted(3);
    let expected = [(first.port, 2.0), (second.port, 3.0)];
    for agent in [&by_address, &by_port] {
        for (port, count) in expected {
            // The port totals count them all (a port-only /drained reads them).
            agent.expect_active(port, count as u64);
        }
        let body = scrape_until(agent, Duration::from_secs(10), "both ports", |samples| {
            expected.iter().all(|(port, count)| {
                sum(
                    samples,
                    "drain_agent_connections_active",
                    &[("port", &port.to_string())],
                ) == *count
            })
        });
        let samples = parse_samples(&body);
        for (port, _) in expected {
            assert!(
                !find(
                    &samples,
                    "drain_agent_connections_active",
                    &[("port", &port.to_string())]
                )
                .is_empty(),
                "no series for port {port}:\n{body}"
            );
        }
        assert!(
            value(&samples, "drain_agent_tracked_sockets", &[]).is_some_and(|n| n >= 5.0),
            "the 5 tracked sockets of the two ports are not all in the gauge:\n{body}"
        );
    }
    drop((first_clients, second_clients));
}

// ---------------------------------------------------------------------------------------
// 5. Process, build-info and agent-wide metrics

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn process_build_info_and_agent_wide_metrics_are_exported() {
    if !kernel_available("process_build_info_and_agent_wide_metrics_are_exported") {
        return;
    }
    let agent = Agent::start(&[]);
    let body = scrape(&agent);
    let samples = parse_samples(&body);
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            value(&samples, name, &[]).is_some_and(|v| v > 0.0),
            "{name} missing or not positive:\n{body}"
        );
    }
    // The agent-wide families are there before any connection or request (zeros, not gaps).
    for name in [
        "drain_agent_drain_waiters",
        "drain_agent_tracked_sockets",
        "drain_agent_drain_wait_seconds_count",
    ] {
        assert!(
            value(&samples, name, &[]).is_some(),
            "{name} missing:\n{body}"
        );
    }
    assert_eq!(
        value(&samples, "drain_agent_drain_wait_seconds_count", &[]),
        Some(0.0),
        "no /drained request was made:\n{body}"
    );
    for result in [
        "drained", "timeout", "query", "invalid", "rejected", "error",
    ] {
        assert!(
            value(
                &samples,
                "drain_agent_drain_requests_total",
                &[("result", result)]
            )
            .is_some(),
            "drain_requests_total{{result={result}}} missing:\n{body}"
        );
    }
    // Present for every reason (their values count system-wide activity: not asserted).
    let reasons = drain_agent_common::error_index::NAMES
        .into_iter()
        .chain(["handler_skipped"]);
    for reason in reasons {
        assert!(
            value(
                &samples,
                "drain_agent_tracking_errors_total",
                &[("reason", reason)]
            )
            .is_some(),
            "tracking_errors_total{{reason={reason}}} missing:\n{body}"
        );
    }
    for kind in ["missed_open", "missed_close"] {
        assert!(
            value(&samples, "drain_agent_repairs_total", &[("kind", kind)]).is_some(),
            "repairs_total{{kind={kind}}} missing:\n{body}"
        );
    }
    let info = find(&samples, "drain_agent_build_info", &[]);
    assert_eq!(info.len(), 1, "{body}");
    assert_eq!(info[0].value, 1.0);
    assert_eq!(
        info[0].labels.get("version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        info[0].labels.get("attach").map(String::as_str),
        Some("tp_btf"),
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Series per node stay bounded

/// 200 listeners: `ports` on each of 100 local addresses 127.0.1.1 … 127.0.1.100 (the
/// endpoints of 100 pods), or None when one of them is taken (another test's).
fn listeners_on_100_addresses(ports: [u16; 2]) -> Option<Vec<(String, u16, TcpListener)>> {
    let mut listeners = Vec::new();
    for host in (1..=100).map(|i| format!("127.0.1.{i}")) {
        for port in ports {
            listeners.push((
                host.clone(),
                port,
                TcpListener::bind((host.as_str(), port)).ok()?,
            ));
        }
    }
    Some(listeners)
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn series_stay_bounded_with_100_endpoints_and_10000_clients() {
    if !kernel_available("series_stay_bounded_with_100_endpoints_and_10000_clients") {
        return;
    }
    // 100 endpoints × 2 ports; 10,000 clients, 5,000 of them held at once (10,000 fds in
    // this process, client and server side: under the 20,000 it may have).
    const ROUND: usize = 5_000;
    let agent = Agent::start(&[]);
    let listeners = (0..20)
        .find_map(|_| listeners_on_100_addresses([common::free_port(), common::free_port()]))
        .expect("two ports free on 100 addresses");
    let ports: BTreeSet<String> = listeners
        .iter()
        .map(|(_, port, _)| port.to_string())
        .collect();
    let started = Instant::now();
    let mut held = Vec::new();
    for round in 0..2 {
        let mut connections = Vec::with_capacity(2 * ROUND);
        for index in 0..ROUND {
            let (host, port, listener) = &listeners[index % listeners.len()];
            let client = TcpStream::connect((host.as_str(), *port)).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            connections.push(client);
            connections.push(server);
        }
        if round == 0 {
            // The first 5,000 clients come and go.
            drop(connections);
        } else {
            held = connections;
        }
    }
    eprintln!("10,000 clients in {:?}, 5,000 held", started.elapsed());
    let body = scrape_until(
        &agent,
        Duration::from_secs(30),
        "5,000 connections held, 10,000 opened",
        |samples| {
            let ours = |name| {
                find(samples, name, &[])
                    .iter()
                    .filter(|s| s.labels.get("port").is_some_and(|p| ports.contains(p)))
                    .map(|s| s.value)
                    .sum::<f64>()
            };
            ours("drain_agent_connections_active") == ROUND as f64
                && ours("drain_agent_connections_opened_total") == (2 * ROUND) as f64
        },
    );
    let samples = parse_samples(&body);
    let connection_metrics = [
        "drain_agent_connections_active",
        "drain_agent_connections_opened_total",
        "drain_agent_connections_closed_total",
    ];
    let mut all = 0;
    for name in connection_metrics {
        let series = find(&samples, name, &[]);
        let ours = series
            .iter()
            .filter(|s| s.labels.get("port").is_some_and(|p| ports.contains(p)))
            .count();
        // One series per endpoint (address, port), whatever the number of clients.
        assert_eq!(
            ours, 200,
            "{name}: {ours} series for 100 addresses × 2 ports"
        );
        all += series.len();
    }
    let histogram = samples
        .iter()
        .filter(|s| {
            s.name
                .starts_with("drain_agent_connection_duration_seconds")
        })
        .count();
    eprintln!(
        "connection series exposed: {all} (active + opened + closed, every port on this host), \
         {histogram} duration-histogram lines (per port), {} lines in all",
        samples.len()
    );
    // A few hundred: 3 × 200 for the test's endpoints, and what the host serves besides
    // (the other tests of this binary run beside this one, on their own ports).
    assert!(all <= 3 * 200 + 400, "{all} connection series");
    for stream in held.iter().step_by(2) {
        let client = stream.local_addr().expect("addr").to_string();
        assert!(!body.contains(&client), "client {client} in /metrics");
    }
    drop(held);
}
