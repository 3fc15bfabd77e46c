//! `drain-agent wait`: asks the agent `/drained` until the port drained or the timeout
//! ran out, through restarts of the agent, with optional progress lines.

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use super::{AgentUrl, EXIT_DRAINED, EXIT_ERROR, EXIT_NOT_DRAINED, error_text, get};
use crate::{cli::WaitArgs, duration::format_duration, http::api::DrainedBody};

/// The longest single `/drained` request `wait` makes (the agent's default
/// `--max-timeout`). One request covers the whole wait whenever it can: a quiet window is
/// counted from the request.
const MAX_SLICE: Duration = Duration::from_secs(600);

/// How long to pause before asking a briefly unreachable agent again.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How long past its deadline `wait` waits for an answer the agent sends at that deadline
/// (the agent answers a `timeout=T` request after T, plus the time to send it).
const ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// Which of the port's listeners `wait`'s requests are about (`--addr`, `--netns`).
fn scope_query(args: &WaitArgs) -> String {
    let mut query = String::new();
    if let Some(addr) = args.addr {
        query.push_str(&format!("&addr={addr}"));
    }
    if let Some(netns) = &args.netns {
        query.push_str("&netns=");
        query.extend(form_urlencoded::byte_serialize(netns.as_bytes()));
    }
    query
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
fn progress_lines(url: AgentUrl, query: String, every: Duration, done: Arc<AtomicBool>) {
    let mut next = Instant::now() + every;
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() < next {
            continue;
        }
        next += every;
        if let Ok(response) = get(&url, &query, Duration::from_secs(5))
            && let Ok(body) = serde_json::from_str::<DrainedBody>(&response.body)
            && !body.drained
            && !done.load(Ordering::Relaxed)
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
    let done = Arc::new(AtomicBool::new(false));
    let _stop_progress = StopOnDrop(Arc::clone(&done));
    if !args.progress.is_zero() {
        let mut query = format!(
            "/drained?port={}&timeout=0&peers=true{}",
            args.port,
            scope_query(args)
        );
        if let Some(ignore) = &args.ignore {
            query.push_str("&ignore=");
            query.extend(form_urlencoded::byte_serialize(ignore.as_bytes()));
        }
        if let Some(idle) = args.idle {
            query.push_str(&format!("&idle={}ms", idle.as_millis()));
        }
        let (url, every, done) = (url.clone(), args.progress, Arc::clone(&done));
        std::thread::spawn(move || progress_lines(url, query, every, done));
    }
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        // Ask in slices of at most a minute: within any agent's --max-timeout, and a
        // restarted agent is found again quickly.
        let slice = remaining.min(MAX_SLICE);
        let query = format!(
            "/drained?port={}&timeout={}ms{}{}",
            args.port,
            slice.as_millis(),
            scope_query(args),
            rule_query(args)
        );
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
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Why the last try of `wait` did not end it: decides the exit status at the deadline.
enum WaitProblem {
    /// The agent answered, but the port was not drained (exit 1).
    NotDrained(String),
    /// The agent could not be reached (exit 2).
    Unreachable(String),
}
