//! `drain-agent status`: the agent's open connections as a table (or its JSON), with the
//! timeout advice from history, and what the agent cannot vouch for in them.
//!
//! `/connections` lists the endpoint map as it is: rows a full map has no room for, ports
//! outside `--ports` and connections a doubt leaves uncounted are not in it. So `status`
//! also asks `/healthz` (degraded, seeding, the kernel's limits) and checks the rows: with
//! `--port`, against the agent's fail-closed count for the port (`/drained?port=P&timeout=0`:
//! its `active`, and `unknown` when even that cannot be vouched for); without, against the
//! per-port totals of the answer (`port_totals`, sent to the node only: a table they do not
//! come with cannot be checked). The answers it combines must all be one agent's (an
//! upgrade's two agents share the address, [`OneAgent`]). It prints each doubt, and exits
//! [`EXIT_NOT_VOUCHED`] when there is one: never a table presented as complete that the
//! agent cannot vouch for.

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    AgentUrl, EXIT_ERROR, EXIT_NOT_VOUCHED, describe_remaining, error_text, get, wait::refused,
};
use crate::{
    cli::StatusArgs,
    drain::advice::PortAdvice,
    duration::format_duration,
    http::{
        api::{ConnectionsBody, DrainedBody, Endpoint, HealthStatus, HealthzBody},
        pods::SteeringStop,
    },
};

/// How long one request of `status` may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often `status` reads the rows and the agent's counts (`--port`: the port's; else
/// the per-port totals) again when they disagree (connections opening or closing between
/// the two reads).
const CONSISTENT_READS: usize = 3;

/// How often one request is sent, on a fresh connection each time, while another agent
/// than the one that answered first answers it ([`OneAgent`]): with two agents, each try
/// reaches either.
const SAME_AGENT_TRIES: usize = 8;

/// How often the whole look is read while its answers still come from two agents (the
/// first answer's agent may stop answering: an old agent handing over).
const SAME_AGENT_LOOKS: usize = 3;

/// The pause after another agent's answer before the next connection (as `probe`'s).
const AFTER_ANOTHER: Duration = Duration::from_millis(10);

/// The agent `status` asks. During an upgrade's overlap the old and the new agent share the
/// address (`SO_REUSEPORT`) and each new connection may reach either: the old agent's
/// `/healthz` (ok) with the new one's rows (still seeding, which only its own `/healthz`
/// says) would be a table short of connections, vouched for. Every answer names its agent
/// ([`crate::http::INSTANCE_HEADER`]): the first one's is the agent of this look, and a
/// request another agent answers is sent again on a fresh connection (hashed anew), up to
/// [`SAME_AGENT_TRIES`] times.
struct OneAgent {
    url: AgentUrl,
    /// The instance the first answer named (`Some(None)`: it named none).
    first: Option<Option<String>>,
    /// An answer that still came from another agent: the first's instance, and its.
    other: Option<(Option<String>, Option<String>)>,
}

impl OneAgent {
    fn new(url: AgentUrl) -> Self {
        Self {
            url,
            first: None,
            other: None,
        }
    }

    /// `GET path` from this look's agent; another agent's answer when no try reached it
    /// (then [`OneAgent::other`] says so).
    fn get(&mut self, path: &str) -> Result<super::Response> {
        let mut another = None;
        for _ in 0..SAME_AGENT_TRIES {
            let response = match get(&self.url, path, REQUEST_TIMEOUT) {
                Ok(response) => response,
                // Another agent answered before: that answer stands (the look is read again).
                Err(_) if another.is_some() => break,
                Err(problem) => return Err(problem),
            };
            let first = self.first.get_or_insert_with(|| response.instance.clone());
            if *first == response.instance {
                return Ok(response);
            }
            another = Some(response);
            std::thread::sleep(AFTER_ANOTHER);
        }
        let response = another.context("no answer from the agent")?;
        self.other
            .get_or_insert_with(|| (self.first.clone().flatten(), response.instance.clone()));
        Ok(response)
    }
}

/// The doubt of answers from two agents (`first` and `other`'s instances).
fn two_agents((first, other): &(Option<String>, Option<String>)) -> String {
    let name = |instance: &Option<String>| {
        instance.as_ref().map_or_else(
            || "one that names none".to_owned(),
            |name| format!("{name:?}"),
        )
    };
    format!(
        "the answers came from two agents ({} and {}; an upgrade's old and new agent share the address) however often they were read again: one agent's counts cannot be checked with another's /healthz and counts",
        name(first),
        name(other)
    )
}

/// What `status` found: the `/connections` answer (as sent, and parsed), the agent's count
/// for `--port`, and each reason the counts shown cannot be vouched for.
struct Look {
    url: AgentUrl,
    raw: String,
    connections: ConnectionsBody,
    port_count: Option<DrainedBody>,
    doubts: Vec<String>,
}

/// `drain-agent status`: a table of the ports with open connections, or with `--json` the
/// agent's `/connections` answer as it is (one line), for scripts. Exit status: 0 the agent
/// vouches for every count shown; 1 it cannot (each reason printed: after the table, or on
/// stderr with `--json`); 2 usage error, agent unreachable or a refused request.
pub fn status(args: &StatusArgs) -> ExitCode {
    let look = match look(args) {
        Ok(look) => look,
        Err(problem) => {
            eprintln!("drain-agent status: {problem:#}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    if args.json {
        // Parsed and printed again: one line, and never a non-JSON answer passed on.
        match serde_json::from_str::<serde_json::Value>(&look.raw) {
            Ok(body) => println!("{body}"),
            Err(problem) => {
                eprintln!("drain-agent status: the agent's answer is not JSON: {problem}");
                return ExitCode::from(EXIT_ERROR);
            }
        }
        for doubt in &look.doubts {
            eprintln!("drain-agent status: cannot vouch for the counts: {doubt}");
        }
    } else {
        print!("{}", render(args, &look));
    }
    if look.doubts.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_VOUCHED)
    }
}

/// Asks the agent: `/connections`, `/healthz`, and with `--port` the port's count, all from
/// one agent ([`OneAgent`]): read again, [`SAME_AGENT_LOOKS`] times in all, while two
/// agents answered, and then a doubt.
fn look(args: &StatusArgs) -> Result<Look> {
    let url = AgentUrl::parse(&args.agent)?
        .with_token_file(args.token_file.as_deref())?
        .with_agent_uid(args.agent_uid);
    let mut read = 0;
    loop {
        read += 1;
        let mut agent = OneAgent::new(url.clone());
        let mut look = look_once(args, &mut agent)?;
        match agent.other {
            None => return Ok(look),
            Some(other) if read == SAME_AGENT_LOOKS => {
                look.doubts.push(two_agents(&other));
                return Ok(look);
            }
            Some(_) => {}
        }
    }
}

/// One [`look`], its answers from `agent`.
fn look_once(args: &StatusArgs, agent: &mut OneAgent) -> Result<Look> {
    let path = match args.port {
        Some(port) => format!("/connections?port={port}"),
        None => "/connections".to_owned(),
    };
    let mut doubts = health_doubts(agent, args.port.is_none());
    let (raw, connections, port_count) = match args.port {
        None => {
            // Read again while a port's rows add up to less than its total (a connection
            // that opened between the agent's two reads); no totals stay none.
            let mut read = 0;
            loop {
                read += 1;
                let (raw, connections) = connections(agent, &path, &args.agent)?;
                let table = table_doubts(&connections);
                if table.is_empty() || connections.port_totals.is_none() || read == CONSISTENT_READS
                {
                    doubts.extend(table);
                    break (raw, connections, None);
                }
            }
        }
        Some(port) => {
            // The rows and the port's count, read again while they disagree (a connection
            // that opened or closed between the two reads).
            let mut read = 0;
            loop {
                read += 1;
                let (raw, connections) = connections(agent, &path, &args.agent)?;
                let count = port_count(agent, port)?;
                let agree = count.as_ref().is_ok_and(|count| {
                    connections.outside_ports || count.active == listed(&connections)
                });
                if agree || read == CONSISTENT_READS {
                    match count {
                        Ok(count) => break (raw, connections, Some(count)),
                        Err(doubt) => {
                            doubts.push(doubt);
                            break (raw, connections, None);
                        }
                    }
                }
            }
        }
    };
    if let (Some(port), Some(count)) = (args.port, &port_count) {
        if let Some(why) = &count.unknown {
            doubts.push(format!(
                "port {port}: the agent cannot vouch for its own count: {why}"
            ));
        }
        let rows = listed(&connections);
        if connections.outside_ports {
            doubts.push(format!(
                "port {port}: not listed: outside --ports (the agent lists and exports only the ports of its --ports; its count for the port is above)"
            ));
        } else if rows != count.active {
            doubts.push(format!(
                "port {port}: the rows add up to {rows}, the agent counts {} for the port (connections counted for the port only, not for their address and namespace, are in no row)",
                count.active
            ));
        }
    }
    Ok(Look {
        url: agent.url.clone(),
        raw,
        connections,
        port_count,
        doubts,
    })
}

/// `/connections` (or `?port=P`): its text and its parse; anything but `200` is an error.
fn connections(agent: &mut OneAgent, path: &str, url: &str) -> Result<(String, ConnectionsBody)> {
    let response = agent
        .get(path)
        .with_context(|| format!("agent unreachable at {url}"))?;
    if response.status != 200 {
        bail!(
            "agent answered {}: {}",
            response.status,
            error_text(&response.body)
        );
    }
    let body: ConnectionsBody = serde_json::from_str(&response.body)
        .context("the agent's answer is not the expected JSON")?;
    Ok((response.body, body))
}

/// The connections the rows of an answer count.
fn listed(connections: &ConnectionsBody) -> u64 {
    connections
        .endpoints
        .iter()
        .map(|row| row.endpoint.active)
        .sum()
}

/// What the whole table (no `--port`) cannot vouch for: each port whose rows add up to
/// less than the agent's total for it (connections counted for their port only, a port
/// outside `--ports`), or that no totals came to check the rows with.
fn table_doubts(connections: &ConnectionsBody) -> Vec<String> {
    let Some(totals) = &connections.port_totals else {
        return vec![
            "the agent sent no per-port totals to check the rows against (it sends them to root or a token holder only; an older agent sends none): connections counted for their port only, or on ports outside --ports, may be in no row (status --port P shows a port's count)".into(),
        ];
    };
    let mut doubts = Vec::new();
    // Ports outside --ports are in no row at all: one doubt naming them all.
    let mut outside = Vec::new();
    for total in totals {
        let port = total.port;
        if total.outside_ports {
            outside.push(format!("{port} ({} open)", total.active));
            continue;
        }
        let rows: u64 = connections
            .endpoints
            .iter()
            .filter(|row| row.endpoint.port == port)
            .map(|row| row.endpoint.active)
            .sum();
        // More rows than the total: one closed between the agent's reads, none missing.
        if rows < total.active {
            doubts.push(format!(
                "port {port}: the rows add up to {rows}, the agent counts {} for the port (connections counted for the port only, not for their address and namespace, are in no row; status --port {port} shows its count)",
                total.active
            ));
        }
    }
    if !outside.is_empty() {
        doubts.push(format!(
            "not listed: outside --ports (the agent lists and exports only the ports of its --ports), counted: {}",
            outside.join(", ")
        ));
    }
    doubts
}

/// The agent's fail-closed count for `port` (a pure query, `timeout=0`: it starts and waits
/// for nothing), or why there is none (a doubt); an error when the agent refuses the
/// question for good (a `4xx` `wait` takes as a refusal, e.g. `400` for its own API port).
fn port_count(agent: &mut OneAgent, port: u16) -> Result<Result<DrainedBody, String>> {
    let response = match agent.get(&format!("/drained?port={port}&timeout=0")) {
        Ok(response) => response,
        Err(problem) => {
            return Ok(Err(format!(
                "port {port}: no count from the agent: {problem:#}"
            )));
        }
    };
    if refused(response.status) {
        bail!(
            "the agent refused to count port {port} ({}): {}",
            response.status,
            error_text(&response.body)
        );
    }
    let no_count = || {
        format!(
            "port {port}: no count from the agent (it answered {}: {})",
            response.status,
            error_text(&response.body)
        )
    };
    if response.status != 200 && response.status != 503 {
        return Ok(Err(no_count()));
    }
    Ok(serde_json::from_str(&response.body).map_err(|_| no_count()))
}

/// What `/healthz` says the counts cannot be vouched for: its degraded `reasons` (but the
/// in-pod port's steering, which is no doubt about a count), seeding, and — `whole_table`:
/// no `--port`, whose count would be confirmed — the kernel's limits, with which the maps'
/// counts are not checked. An agent that does not answer it is a doubt too.
fn health_doubts(agent: &mut OneAgent, whole_table: bool) -> Vec<String> {
    let response = match agent.get("/healthz") {
        Ok(response) => response,
        Err(problem) => return vec![format!("no answer from /healthz: {problem:#}")],
    };
    if response.status != 200 {
        return vec![format!(
            "the agent's /healthz answered {}: {}",
            response.status,
            error_text(&response.body)
        )];
    }
    let health: HealthzBody = match serde_json::from_str(&response.body) {
        Ok(health) => health,
        Err(_) => {
            return vec![format!(
                "the agent's /healthz answer is not the expected JSON: {}",
                response.body.trim()
            )];
        }
    };
    doubts_of(&health, whole_table)
}

/// The doubts of one `/healthz` answer ([`health_doubts`]).
fn doubts_of(health: &HealthzBody, whole_table: bool) -> Vec<String> {
    let mut doubts: Vec<String> = health
        .reasons
        .iter()
        .filter(|reason| reason.as_str() != SteeringStop::REASON)
        .map(|reason| format!("degraded: {reason}"))
        .collect();
    if health.status == HealthStatus::Degraded && health.reasons.is_empty() {
        doubts.push("degraded (no reason given)".into());
    }
    if health.seeding {
        doubts.push(
            "seeding: the agent is still counting the connections open before it started".into(),
        );
    }
    if whole_table {
        doubts.extend(health.kernel_limits.iter().map(|limit| {
            format!(
                "a limit of this kernel: {limit} (the rows are the maps' counts, not confirmed; status --port P shows a port's confirmed count)"
            )
        }));
    }
    doubts
}

/// The table, the port's count (`--port`), the doubts, the advice from history.
fn render(args: &StatusArgs, look: &Look) -> String {
    let endpoints: Vec<Endpoint> = look
        .connections
        .endpoints
        .iter()
        .map(|row| row.endpoint.clone())
        .collect();
    let mut out = render_table(&endpoints, look.doubts.is_empty());
    if let Some(count) = &look.port_count {
        out.push_str(&format!(
            "the agent's count for the port: {}\n",
            describe_remaining(count)
        ));
    }
    if !look.doubts.is_empty() {
        out.push_str("\nthe agent cannot vouch for these counts (exit 1):\n");
        for doubt in &look.doubts {
            out.push_str(&format!("  - {doubt}\n"));
        }
    }
    // Advice from history; an older agent without /advice just gets the table.
    if let Ok(response) = get(&look.url, "/advice", REQUEST_TIMEOUT)
        && response.status == 200
        && let Ok(mut advice) = serde_json::from_str::<Vec<PortAdvice>>(&response.body)
        && {
            advice.retain(|port| args.port.is_none_or(|wanted| wanted == port.port));
            !advice.is_empty()
        }
    {
        out.push('\n');
        out.push_str(&render_advice(&advice));
    }
    out
}

/// `ms` as a short duration ("over 1h" for the overflow bucket).
fn short_ms(ms: Option<u64>) -> String {
    match ms {
        None => "over 1h".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) => format_duration(Duration::from_millis(ms)),
    }
}

/// How long each port's connections last, and the timeout that covers them.
fn render_advice(advice: &[PortAdvice]) -> String {
    let mut out = String::from(
        "connection durations since the counting state was made (kept through restarts with --pin-dir; histogram bounds):\n",
    );
    for port in advice {
        let pick = match (port.timeout_s, port.grace_period_s) {
            (Some(timeout), Some(grace)) => {
                format!("drain --timeout {timeout}s; terminationGracePeriodSeconds >= {grace}")
            }
            _ => "connections outlive any timeout: drain with --idle, or --close-at-timeout".into(),
        };
        out.push_str(&format!(
            "  {}: {} closed; p50 <= {}, p99 <= {}, max <= {}: {pick}\n",
            port.port,
            port.connections,
            short_ms(port.p50_ms),
            short_ms(port.p99_ms),
            short_ms(port.max_ms)
        ));
    }
    out
}

/// The rows; `vouched`: an empty table says no connections are open (else that none are
/// listed, the reasons below it).
fn render_table(rows: &[Endpoint], vouched: bool) -> String {
    let header = ["PORT", "ADDRESS", "NETNS", "ACTIVE", "OPENED", "CLOSED"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|row| {
            [
                row.port.to_string(),
                row.addr.to_string(),
                row.netns.to_string(),
                row.active.to_string(),
                row.opened.to_string(),
                row.closed.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 6]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            // Text left-aligned, numbers right-aligned.
            if i == 1 {
                text.push_str(&format!("{cell:<width$}  "));
            } else {
                text.push_str(&format!("{cell:>width$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header);
    for row in &cells {
        line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
    }
    if rows.is_empty() {
        out.push_str(if vouched {
            "(no open inbound connections)\n"
        } else {
            "(no connections listed: see below)\n"
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{
        super::testing::{FakeAgent, fake_agent_on},
        *,
    };

    #[test]
    fn table_columns_line_up() {
        let rows = vec![
            Endpoint {
                netns: 4026531840,
                addr: "127.0.0.1".parse().expect("ip"),
                port: 8080,
                active: 12,
                opened: 140,
                closed: 128,
                last_change_ns: 0,
            },
            Endpoint {
                netns: 4026532000,
                addr: "fd00::1234".parse().expect("ip"),
                port: 443,
                active: 1,
                opened: 1,
                closed: 0,
                last_change_ns: 0,
            },
        ];
        let table = render_table(&rows, true);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("PORT  ADDRESS"), "{table}");
        // Every column ends at the same place on every line.
        let active_end = lines[0].find("ACTIVE").expect("header") + "ACTIVE".len();
        assert_eq!(&lines[1][active_end - 2..active_end], "12", "{table}");
        assert_eq!(&lines[2][active_end - 1..active_end], "1", "{table}");
        assert!(render_table(&[], true).contains("no open inbound connections"));
        assert!(!render_table(&[], false).contains("no open inbound connections"));
    }

    /// Degraded reasons and seeding are doubts; the in-pod port's steering is not one
    /// about a count; the kernel's limits are for the whole table only (a port's count is
    /// confirmed with the socket tables).
    #[test]
    fn health_doubts_are_the_counts_ones() {
        let mut health = HealthzBody {
            status: HealthStatus::Ok,
            attach: "tp_btf".into(),
            reasons: Vec::new(),
            kernel_limits: Vec::new(),
            close_unavailable: Some("no way to close".into()),
            seeding: false,
        };
        assert!(doubts_of(&health, true).is_empty());
        health.kernel_limits = vec!["old kernel".into()];
        assert!(doubts_of(&health, false).is_empty());
        assert!(doubts_of(&health, true)[0].contains("old kernel"));
        health.kernel_limits.clear();
        health.status = HealthStatus::Degraded;
        health.reasons = vec![SteeringStop::REASON.into()];
        assert!(doubts_of(&health, true).is_empty());
        health
            .reasons
            .push("the socket map is full (--max-connections)".into());
        health.seeding = true;
        let doubts = doubts_of(&health, false);
        assert_eq!(doubts.len(), 2, "{doubts:?}");
        assert!(doubts[0].contains("--max-connections"), "{doubts:?}");
        assert!(doubts[1].contains("seeding"), "{doubts:?}");
    }

    /// Found by an audit: a connection counted for its port only (its endpoint being
    /// reclaimed, or the endpoint map full, when it opened) is in no row until it closes,
    /// with `/healthz` ok: the whole table said "(no open inbound connections)" and exit 0.
    /// The rows are checked against the agent's per-port totals.
    #[test]
    fn a_port_total_the_rows_do_not_add_up_to_is_not_vouched() {
        let answer = |json: &str| -> ConnectionsBody { serde_json::from_str(json).expect("json") };
        let unlisted = answer(r#"{"endpoints":[],"port_totals":[{"port":8080,"active":1}]}"#);
        let doubts = table_doubts(&unlisted);
        assert_eq!(doubts.len(), 1, "{doubts:?}");
        assert!(
            doubts[0].contains("port 8080") && doubts[0].contains("counts 1"),
            "{doubts:?}"
        );
        assert!(!render_table(&[], doubts.is_empty()).contains("no open inbound connections"));
        let outside = answer(
            r#"{"endpoints":[],"port_totals":[{"port":9000,"active":2,"outside_ports":true}]}"#,
        );
        let doubts = table_doubts(&outside);
        assert!(
            doubts.len() == 1
                && doubts[0].contains("outside --ports")
                && doubts[0].contains("9000 (2 open)"),
            "{doubts:?}"
        );
        // Rows that add up to every total (or more: one closed between the reads) vouch.
        let row = r#"{"netns":1,"addr":"127.0.0.1","port":8080,"active":2,"opened":2,"closed":0}"#;
        let listed = answer(&format!(
            r#"{{"endpoints":[{row}],"port_totals":[{{"port":8080,"active":2}}]}}"#
        ));
        assert!(table_doubts(&listed).is_empty());
        let closed = answer(&format!(
            r#"{{"endpoints":[{row}],"port_totals":[{{"port":8080,"active":1}}]}}"#
        ));
        assert!(table_doubts(&closed).is_empty());
        // No totals (a confined caller, an older agent): nothing to check the rows with.
        let unchecked = table_doubts(&answer(r#"{"endpoints":[]}"#));
        assert!(
            unchecked.len() == 1 && unchecked[0].contains("no per-port totals"),
            "{unchecked:?}"
        );
    }

    /// A fake agent whose `/healthz` (ok), `/connections` (rows that add up to their
    /// totals: 2 open on 8080) and `/drained` (8080's count: 2) answers name these instances
    /// (`None`: no `drain-agent-instance` header); anything else is a 404.
    fn agents(
        healthz: Option<&'static str>,
        connections: Option<&'static str>,
        drained: Option<&'static str>,
    ) -> FakeAgent {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        fake_agent_on(listener, move |target| {
            let (instance, body) = match target.split('?').next().unwrap_or_default() {
                "/healthz" => (healthz, r#"{"status":"ok","attach":"tp_btf"}"#),
                "/connections" => (
                    connections,
                    r#"{"endpoints":[{"netns":1,"addr":"127.0.0.1","port":8080,"active":2,"opened":2,"closed":0}],"port_totals":[{"port":8080,"active":2}]}"#,
                ),
                "/drained" => (
                    drained,
                    r#"{"port":8080,"drained":false,"active":2,"waited_ms":0}"#,
                ),
                _ => {
                    return (
                        "404 Not Found".into(),
                        r#"{"error":"no such endpoint"}"#.into(),
                    );
                }
            };
            let status = match instance {
                Some(instance) => format!("200 OK\r\n{}: {instance}", crate::http::INSTANCE_HEADER),
                None => "200 OK".into(),
            };
            (status, body.into())
        })
    }

    fn status_args(agent: &FakeAgent, more: &[&str]) -> StatusArgs {
        use clap::Parser as _;
        let mut argv = vec!["drain-agent", "status", "--agent", &agent.agent];
        argv.extend_from_slice(more);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("parse");
        let Some(crate::cli::Command::Status(args)) = cli.command else {
            panic!("not a status");
        };
        args
    }

    /// Audit (upgrade): two agents share the address during an upgrade's overlap, and each
    /// request of `status` may reach either. `/healthz` from the old agent (ok) and
    /// `/connections` from the new one, still seeding (which only its own `/healthz` says),
    /// made a table short of connections with no doubt, exit 0. Answers from different agents
    /// are read again, and if they still differ, that is a doubt (exit 1).
    #[test]
    fn answers_from_two_agents_are_not_vouched_for() {
        let same = agents(Some("new"), Some("new"), Some("new"));
        assert_eq!(status(&status_args(&same, &[])), ExitCode::SUCCESS);
        assert_eq!(
            status(&status_args(&same, &["--port", "8080"])),
            ExitCode::SUCCESS
        );
        let unnamed = agents(None, None, None);
        assert_eq!(status(&status_args(&unnamed, &[])), ExitCode::SUCCESS);
        for (mixed, args) in [
            (agents(Some("old"), Some("new"), Some("new")), &[][..]),
            (agents(None, Some("new"), Some("new")), &[][..]),
            (
                agents(Some("new"), Some("new"), Some("old")),
                &["--port", "8080"][..],
            ),
        ] {
            let args = status_args(&mixed, args);
            assert_eq!(
                status(&args),
                ExitCode::from(EXIT_NOT_VOUCHED),
                "{:?}",
                mixed.requests()
            );
            let doubts = look(&args).expect("a look").doubts;
            assert!(
                doubts.len() == 1 && doubts[0].contains("two agents"),
                "{doubts:?}"
            );
        }
        // Read again on fresh connections: the other agent's answer was asked again.
        let once = agents(Some("old"), Some("new"), Some("new"));
        let _ = look(&status_args(&once, &[])).expect("a look");
        let asked = once.requests().len();
        assert!(asked > 2, "asked {asked} times");
        // Another agent's answer, then this one's on a fresh connection: vouched for.
        let answered = std::sync::atomic::AtomicUsize::new(0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let connections = r#"{"endpoints":[],"port_totals":[]}"#;
        let switching = fake_agent_on(listener, move |target| {
            let instance = match target {
                "/connections"
                    if answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 =>
                {
                    "old"
                }
                _ => "new",
            };
            let body = match target {
                "/healthz" => r#"{"status":"ok","attach":"tp_btf"}"#,
                _ => connections,
            };
            (
                format!("200 OK\r\n{}: {instance}", crate::http::INSTANCE_HEADER),
                body.into(),
            )
        });
        let look = look(&status_args(&switching, &[])).expect("a look");
        assert!(look.doubts.is_empty(), "{:?}", look.doubts);
        assert_eq!(
            switching.requests(),
            [
                "GET /healthz HTTP/1.1",
                "GET /connections HTTP/1.1",
                "GET /connections HTTP/1.1"
            ]
        );
    }

    /// The durations come from the kernel's histograms, which a restarted agent adopts
    /// (`--pin-dir`): the heading says since when they count, not since this agent started.
    #[test]
    fn advice_heading_says_the_durations_outlive_the_agent() {
        let heading = render_advice(&[]);
        assert!(
            heading.contains("--pin-dir") && !heading.contains("agent started"),
            "{heading}"
        );
    }
}
