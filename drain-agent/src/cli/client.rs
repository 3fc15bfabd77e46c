//! `drain-agent wait` and `drain-agent status`: small clients of a running agent, for
//! images without curl. Plain HTTP/1.1 over a TCP socket: no TLS, no dependencies.

use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cli::{StatusArgs, WaitArgs},
    drain::advice::PortAdvice,
    duration::format_duration,
    http::api::{ConnectionsBody, DrainedBody, Endpoint, ErrorBody},
};

/// Exit status of `wait` when the port drained.
pub const EXIT_DRAINED: u8 = 0;
/// Exit status of `wait` when the port did not drain in time.
pub const EXIT_NOT_DRAINED: u8 = 1;
/// Exit status for usage errors and an unreachable agent.
pub const EXIT_ERROR: u8 = 2;

/// The longest single `/drained` request `wait` makes (the agent's default
/// `--max-timeout`). One request covers the whole wait whenever it can: a quiet window is
/// counted from the request.
const MAX_SLICE: Duration = Duration::from_secs(600);

/// How long to pause before asking a briefly unreachable agent again.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How long past its deadline `wait` waits for an answer the agent sends at that deadline
/// (the agent answers a `timeout=T` request after T, plus the time to send it).
const ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// `http://host:port[/prefix]`, split up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    pub host: String,
    pub port: u16,
    pub prefix: String,
    /// Sent as `Authorization: Bearer …` when set ([`AgentUrl::with_token_file`]).
    pub token: Option<String>,
}

impl AgentUrl {
    /// Adds the bearer token read from `path` (its first line that is not blank or a `#`
    /// comment), if a path is given.
    pub fn with_token_file(mut self, path: Option<&std::path::Path>) -> Result<Self> {
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            let token = text
                .lines()
                .map(str::trim)
                .find(|line| !line.is_empty() && !line.starts_with('#'))
                .with_context(|| format!("the token file {} holds no token", path.display()))?;
            if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
                bail!(
                    "the token in {} has characters a header cannot carry",
                    path.display()
                );
            }
            self.token = Some(token.to_owned());
        }
        Ok(self)
    }

    pub fn parse(text: &str) -> Result<Self> {
        let Some(rest) = text.strip_prefix("http://") else {
            bail!("agent URL {text:?} must start with http:// (e.g. http://127.0.0.1:9100)");
        };
        let (authority, prefix) = match rest.find('/') {
            Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .with_context(|| format!("agent URL {text:?} has an unclosed '['"))?;
            (host, after.strip_prefix(':').unwrap_or("80"))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, port),
                None => (authority, "80"),
            }
        };
        if host.is_empty() {
            bail!("agent URL {text:?} has no host");
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("agent URL {text:?} has a bad port {port:?}"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
            prefix: prefix.to_owned(),
            token: None,
        })
    }
}

/// One response: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// The longest a connect may take within a `get` (a SYN to a dead host is not retried
/// sooner otherwise).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The most of an answer `get` reads (the agent's largest, /metrics, is far smaller).
const MAX_ANSWER: usize = 16 << 20;

/// `GET path` with a deadline for the whole exchange: connect, send and read together take
/// at most `timeout` (name resolution aside: the agent URL is normally an IP address).
pub fn get(url: &AgentUrl, path: &str, timeout: Duration) -> Result<Response> {
    let deadline = Instant::now() + timeout;
    let address = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", url.host))?
        .next()
        .with_context(|| format!("{} has no address", url.host))?;
    let mut stream = TcpStream::connect_timeout(&address, left(deadline)?.min(CONNECT_TIMEOUT))
        .with_context(|| format!("cannot connect to the agent at {address}"))?;
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let authorization = url
        .token
        .as_ref()
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {}{path} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: drain-agent/{}\r\nAccept: application/json\r\n{authorization}Connection: close\r\n\r\n",
        url.prefix,
        url.port,
        env!("CARGO_PKG_VERSION")
    );
    let mut sent = 0;
    while sent < request.len() {
        stream
            .set_write_timeout(Some(left(deadline)?))
            .context("socket timeout")?;
        match stream.write(&request.as_bytes()[sent..]) {
            Ok(0) => bail!("the agent closed the connection before the request was sent"),
            Ok(n) => sent += n,
            Err(problem) if problem.kind() == std::io::ErrorKind::Interrupted => {}
            Err(problem) => return Err(problem).context("cannot send the request"),
        }
    }
    let mut raw = Vec::new();
    let mut buffer = [0u8; 16 << 10];
    loop {
        stream
            .set_read_timeout(Some(left(deadline)?))
            .context("socket timeout")?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buffer[..n]);
                if raw.len() > MAX_ANSWER {
                    bail!("the agent's answer is longer than {MAX_ANSWER} bytes");
                }
            }
            Err(problem) if problem.kind() == std::io::ErrorKind::Interrupted => {}
            Err(problem)
                if matches!(
                    problem.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("no complete answer from the agent within {timeout:?}")
            }
            Err(problem) => return Err(problem).context("no complete answer from the agent"),
        }
    }
    parse_response(&raw)
}

/// Time left until `deadline`; an error once it has passed (a zero socket timeout would
/// mean "no timeout").
fn left(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("no complete answer from the agent by the deadline");
    }
    Ok(left)
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .context("the agent's answer is not HTTP")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .context("the agent's answer has no status code")?;
    let chunked = head.lines().any(|line| {
        line.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Joins the chunks of a chunked body. On bytes: chunk sizes count bytes, and a chunk may
/// end inside a multi-byte character.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|window| window == b"\r\n")
            .context("bad chunked body")?;
        let size = std::str::from_utf8(&body[..line_end]).context("bad chunk size")?;
        // Chunk extensions (";name=value") are allowed after the size.
        let size = size.split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        let rest = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).context("short chunk")?);
        body = rest
            .get(size..)
            .and_then(|after| after.strip_prefix(b"\r\n"))
            .context("short chunk")?;
    }
}

fn error_text(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body).map_or_else(|_| body.trim().to_owned(), |e| e.error)
}

/// The drain-rule parameters of `wait`'s requests.
fn rule_query(args: &WaitArgs) -> String {
    let mut query = String::new();
    if !args.quiet.is_zero() {
        query.push_str(&format!("&quiet={}ms", args.quiet.as_millis()));
    }
    if let Some(ignore) = &args.ignore {
        query.push_str("&ignore=");
        query.extend(form_urlencoded::byte_serialize(ignore.as_bytes()));
    }
    if let Some(idle) = args.idle {
        query.push_str(&format!("&idle={}ms", idle.as_millis()));
    }
    if args.close_at_timeout {
        query.push_str("&on_timeout=close");
        if args.pace > 0 {
            query.push_str(&format!("&pace={}", args.pace));
        }
    }
    query
}

/// One line about what still holds a drain: "8080: 3 active (2 idle), oldest 41 s from
/// 10.0.3.7:51234".
pub fn describe_remaining(body: &DrainedBody) -> String {
    let mut line = format!("{}: {} active", body.port, body.active);
    if let Some(idle) = body.idle {
        line.push_str(&format!(" ({idle} idle)"));
    }
    if let Some(oldest) = body
        .peers
        .iter()
        .filter(|peer| peer.age_ms.is_some())
        .max_by_key(|peer| peer.age_ms)
    {
        line.push_str(&format!(
            ", oldest {} s from {}",
            oldest.age_ms.unwrap_or(0) / 1000,
            oldest.remote
        ));
    } else if let Some(first) = body.peers.first() {
        line.push_str(&format!(", e.g. from {}", first.remote));
    }
    if let Some(why) = &body.unknown {
        line.push_str(&format!("; cannot vouch for the count: {why}"));
    }
    line
}

/// Prints a progress line every `every` until `done` is set: a pure query
/// (`timeout=0`), which starts nothing and does not disturb the waiting request.
fn progress_lines(
    url: AgentUrl,
    query: String,
    every: Duration,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut next = Instant::now() + every;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() < next {
            continue;
        }
        next += every;
        if let Ok(response) = get(&url, &query, Duration::from_secs(5))
            && let Ok(body) = serde_json::from_str::<DrainedBody>(&response.body)
            && !body.drained
            && !done.load(std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!("drain-agent wait: {}", describe_remaining(&body));
        }
    }
}

/// `drain-agent wait`: 0 drained, 1 not drained in time, 2 usage error or agent unreachable.
pub fn wait(args: &WaitArgs) -> ExitCode {
    let url = match AgentUrl::parse(&args.agent)
        .and_then(|url| url.with_token_file(args.token_file.as_deref()))
    {
        Ok(url) => url,
        Err(problem) => {
            eprintln!("drain-agent wait: {problem:#}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let started = Instant::now();
    let deadline = started + args.timeout;
    let mut last_problem: WaitProblem;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _stop_progress = StopOnDrop(std::sync::Arc::clone(&done));
    if !args.progress.is_zero() {
        let mut query = format!("/drained?port={}&timeout=0&peers=true", args.port);
        if let Some(addr) = args.addr {
            query.push_str(&format!("&addr={addr}"));
        }
        if let Some(netns) = &args.netns {
            query.push_str("&netns=");
            query.extend(form_urlencoded::byte_serialize(netns.as_bytes()));
        }
        if let Some(ignore) = &args.ignore {
            query.push_str("&ignore=");
            query.extend(form_urlencoded::byte_serialize(ignore.as_bytes()));
        }
        if let Some(idle) = args.idle {
            query.push_str(&format!("&idle={}ms", idle.as_millis()));
        }
        let (url, every, done) = (url.clone(), args.progress, std::sync::Arc::clone(&done));
        std::thread::spawn(move || progress_lines(url, query, every, done));
    }
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        // Ask in slices of at most a minute: within any agent's --max-timeout, and a
        // restarted agent is found again quickly.
        let slice = remaining.min(MAX_SLICE);
        let mut query = format!(
            "/drained?port={}&timeout={}ms",
            args.port,
            slice.as_millis()
        );
        if let Some(addr) = args.addr {
            query.push_str(&format!("&addr={addr}"));
        }
        if let Some(netns) = &args.netns {
            query.push_str("&netns=");
            query.extend(form_urlencoded::byte_serialize(netns.as_bytes()));
        }
        query.push_str(&rule_query(args));
        // The whole exchange ends by the deadline (plus ANSWER_MARGIN), whatever the agent
        // does: an agent that accepts but never answers (stopped, or out of file
        // descriptors with connections queued in its backlog) must not stretch the wait.
        let exchange = (slice + Duration::from_secs(5)).min(remaining + ANSWER_MARGIN);
        match get(&url, &query, exchange) {
            Ok(response) if response.status == 200 || response.status == 503 => {
                match serde_json::from_str::<DrainedBody>(&response.body) {
                    Ok(body) if body.drained => {
                        match body.closed {
                            Some(closed) => println!(
                                "port {} drained at the deadline: the agent closed {closed} connection(s) (waited {} ms)",
                                args.port,
                                started.elapsed().as_millis()
                            ),
                            None => println!(
                                "port {} drained (waited {} ms)",
                                args.port,
                                started.elapsed().as_millis()
                            ),
                        }
                        return ExitCode::from(EXIT_DRAINED);
                    }
                    Ok(body) => {
                        // Not drained: the timeout ran out, or the agent is shutting down and
                        // answered early. Ask again while time is left.
                        last_problem = WaitProblem::NotDrained(describe_remaining(&body));
                    }
                    Err(_) => {
                        // A 503 that is not ours (e.g. a proxy in front): report it.
                        last_problem = WaitProblem::NotDrained(format!(
                            "unexpected answer {}: {}",
                            response.status,
                            error_text(&response.body)
                        ));
                    }
                }
            }
            // Bad input, a token the agent does not accept, a caller that may not ask this,
            // or settings that differ from the drain in progress: asking again cannot help.
            Ok(response) if matches!(response.status, 400 | 401 | 403 | 409) => {
                eprintln!(
                    "drain-agent wait: the agent refused the request ({}): {}",
                    response.status,
                    error_text(&response.body)
                );
                return ExitCode::from(EXIT_ERROR);
            }
            Ok(response) => {
                last_problem = WaitProblem::NotDrained(format!(
                    "agent answered {}: {}",
                    response.status,
                    error_text(&response.body)
                ));
            }
            Err(problem) => {
                // Unreachable (restarting?): retry within the timeout.
                last_problem = WaitProblem::Unreachable(format!(
                    "agent unreachable at {}: {problem:#}",
                    args.agent
                ));
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())));
    }
    match last_problem {
        WaitProblem::Unreachable(problem) => {
            eprintln!("drain-agent wait: {problem}");
            ExitCode::from(EXIT_ERROR)
        }
        WaitProblem::NotDrained(problem) => {
            eprintln!(
                "drain-agent wait: port {} not drained within {}: {problem}",
                args.port,
                format_duration(args.timeout)
            );
            ExitCode::from(EXIT_NOT_DRAINED)
        }
    }
}

/// Stops the progress thread however `wait` returns.
struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why the last try of `wait` did not end it: decides the exit status at the deadline.
enum WaitProblem {
    /// The agent answered, but the port was not drained (exit 1).
    NotDrained(String),
    /// The agent could not be reached (exit 2).
    Unreachable(String),
}

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
    let url = AgentUrl::parse(&args.agent)?.with_token_file(args.token_file.as_deref())?;
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
    let mut out =
        String::from("connection durations since the agent started (histogram bounds):\n");
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
    fn agent_urls_parse() {
        assert_eq!(
            AgentUrl::parse("http://127.0.0.1:9100").expect("url"),
            AgentUrl {
                host: "127.0.0.1".into(),
                port: 9100,
                prefix: String::new(),
                token: None,
            }
        );
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "# ops\n\n  0123456789abcdef-ops \nsecond\n").expect("write");
        let url = AgentUrl::parse("http://127.0.0.1:9100")
            .and_then(|url| url.with_token_file(Some(&file)))
            .expect("token");
        assert_eq!(url.token.as_deref(), Some("0123456789abcdef-ops"));
        std::fs::write(&file, "bad token\n").expect("write");
        assert!(
            AgentUrl::parse("http://127.0.0.1:9100")
                .and_then(|url| url.with_token_file(Some(&file)))
                .is_err()
        );
        let url = AgentUrl::parse("http://[::1]:9110/agent/").expect("url");
        assert_eq!(
            (url.host.as_str(), url.port, url.prefix.as_str()),
            ("::1", 9110, "/agent")
        );
        assert_eq!(AgentUrl::parse("http://node").expect("url").port, 80);
        for bad in [
            "https://x:1",
            "127.0.0.1:9100",
            "http://:9100",
            "http://x:0",
            "http://x:abc",
        ] {
            assert!(AgentUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_parse_plain_and_chunked() {
        let plain =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}")
                .expect("plain");
        assert_eq!((plain.status, plain.body.as_str()), (503, "{}"));
        let chunked = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!(chunked.body, "abcde");
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn chunks_split_inside_a_character_join_on_bytes() {
        // "é" is two bytes (c3 a9), sent in two chunks of one byte each; chunk extensions
        // are ignored.
        let split = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{\xc3\r\n1;x=y\r\n\xa9\r\n1\r\n}\r\n0\r\n\r\n",
        )
        .expect("split character");
        assert_eq!(split.body, "{\u{e9}}");
        // A stray invalid byte counts as one byte, not as the three of U+FFFD.
        let invalid = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\na\xff\r\n1\r\nb\r\n0\r\n\r\n",
        )
        .expect("invalid byte");
        assert_eq!(invalid.body, "a\u{fffd}b");
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
                .is_err()
        );
    }

    /// A listener that accepts (through the backlog) and never answers.
    fn silent_agent() -> (std::net::TcpListener, AgentUrl) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let url = AgentUrl::parse(&format!("http://127.0.0.1:{port}")).expect("url");
        (listener, url)
    }

    #[test]
    fn get_keeps_its_deadline_against_a_silent_agent() {
        let (_listener, url) = silent_agent();
        let started = Instant::now();
        let answer = get(&url, "/healthz", Duration::from_millis(700));
        let took = started.elapsed();
        assert!(answer.is_err());
        assert!(
            took >= Duration::from_millis(650) && took < Duration::from_millis(1200),
            "took {took:?}"
        );
    }

    #[test]
    fn get_keeps_its_deadline_against_a_trickling_agent() {
        // Sends a byte every 200 ms: per-read timeouts alone would never fire.
        let (listener, url) = silent_agent();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n");
                for _ in 0..50 {
                    std::thread::sleep(Duration::from_millis(200));
                    if stream.write_all(b"x").is_err() {
                        return;
                    }
                }
            }
        });
        let started = Instant::now();
        let answer = get(&url, "/healthz", Duration::from_secs(1));
        let took = started.elapsed();
        assert!(answer.is_err());
        assert!(took < Duration::from_millis(1500), "took {took:?}");
    }

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
}
