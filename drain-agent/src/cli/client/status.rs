//! `drain-agent status`: the agent's open connections as a table (or its JSON), with the
//! timeout advice from history.

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{AgentUrl, EXIT_ERROR, error_text, get};
use crate::{
    cli::StatusArgs,
    drain::advice::PortAdvice,
    duration::format_duration,
    http::api::{ConnectionsBody, Endpoint},
};

/// `drain-agent status`: a table of the ports with open connections, or with `--json` the
/// agent's `/connections` answer as it is (one line), for scripts.
pub fn status(args: &StatusArgs) -> ExitCode {
    match status_text(args) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(problem) => {
            eprintln!("drain-agent status: {problem:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn status_text(args: &StatusArgs) -> Result<String> {
    let url = AgentUrl::parse(&args.agent)?
        .with_token_file(args.token_file.as_deref())?
        .with_agent_uid(args.agent_uid);
    let path = match args.port {
        Some(port) => format!("/connections?port={port}"),
        None => "/connections".to_owned(),
    };
    let response = get(&url, &path, Duration::from_secs(10))
        .with_context(|| format!("agent unreachable at {}", args.agent))?;
    if response.status != 200 {
        bail!(
            "agent answered {}: {}",
            response.status,
            error_text(&response.body)
        );
    }
    if args.json {
        // Parsed and printed again: one line, and never a non-JSON answer passed on.
        let body: serde_json::Value =
            serde_json::from_str(&response.body).context("the agent's answer is not JSON")?;
        return Ok(format!("{body}\n"));
    }
    let body: ConnectionsBody = serde_json::from_str(&response.body)
        .context("the agent's answer is not the expected JSON")?;
    let endpoints: Vec<Endpoint> = body.endpoints.into_iter().map(|row| row.endpoint).collect();
    let mut out = render_table(&endpoints);
    // Advice from history; an older agent without /advice just gets the table.
    if let Ok(response) = get(&url, "/advice", Duration::from_secs(10))
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
    Ok(out)
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

fn render_table(rows: &[Endpoint]) -> String {
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
        out.push_str("(no open inbound connections)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("PORT  ADDRESS"), "{table}");
        // Every column ends at the same place on every line.
        let active_end = lines[0].find("ACTIVE").expect("header") + "ACTIVE".len();
        assert_eq!(&lines[1][active_end - 2..active_end], "12", "{table}");
        assert_eq!(&lines[2][active_end - 1..active_end], "1", "{table}");
        assert!(render_table(&[]).contains("no open inbound connections"));
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
