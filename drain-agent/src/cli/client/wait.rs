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

use super::{
    AgentUrl, Deadlines, EXIT_DRAINED, EXIT_ERROR, EXIT_NOT_DRAINED, error_text, get, get_within,
};
use crate::{
    cli::WaitArgs,
    drain::waiter::CLOSE_WAIT,
    duration::format_duration,
    http::api::{AnswerReason, DrainedBody},
};

/// The longest single `/drained` request `wait` makes (the agent's default
/// `--max-timeout`). One request covers the whole wait whenever it can: a quiet window is
/// counted from the request.
const MAX_SLICE: Duration = Duration::from_secs(600);

/// The longest `wait` pauses for an answer's `Retry-After` (a proxy in front may ask for
/// minutes; the deadline bounds it as well).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// How long to pause before asking a briefly unreachable agent again.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How long past its deadline `wait` waits for an answer the agent sends at that deadline
/// (the agent answers a `timeout=T` request after T, plus the time to send it).
const ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// The same for a slice before the last: its answer is not the end of the wait, and one
/// that comes back late delays the next request only.
const SLICE_ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// How long past a request's own end `wait` waits for the agent to take it (accept its
/// connection: its listener bound before it serves, at its start or restart; an overloaded
/// agent's backlog). A stopped agent, whose backlog takes connections that nobody accepts,
/// holds the wait no longer than this past its deadline.
const LATE_ACCEPT: Duration = Duration::from_secs(1);

/// How much later than its own end `wait` still awaits the answer to a request the agent
/// took late: the agent counts `timeout=T` from when it reads the request, and answers as
/// much later.
const LATE_ANSWER: Duration = Duration::from_secs(5);

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

/// The query of a waiting request asking `slice` when `until_deadline` is left of the wait.
/// A slice after which the wait asks again says so (`continues=true`): the agent then ends
/// its drain `continued` at the slice's end, not `timeout` (no alert, no aborted rollout for
/// a hook that goes on waiting). The last one does not, and may close. Nor does a slice that
/// ends before the deadline with less than `--quiet` left after it (the longest slice, when
/// no split leaves room for the quiet window twice), nor one that leaves no more than the
/// gap before the next request ([`SLICE_GAP`]; with `--quiet 0`, a wait a little over 10
/// minutes): no request that could end drained follows it (the wait's loop asks nothing
/// that could not end drained, and what it asks with nothing left is a pure query, which
/// starts no drain), so its drain is the hook's last, and a `timeout` there is one.
fn wait_query(args: &WaitArgs, slice: Duration, until_deadline: Duration) -> String {
    let last = slice == until_deadline;
    let after = until_deadline.saturating_sub(slice + SLICE_GAP);
    let continues = !last && !after.is_zero() && after >= args.quiet;
    format!(
        "/drained?port={}&timeout={}ms{}{}{}",
        args.port,
        slice.as_millis(),
        scope_query(args),
        rule_query(args, closes(args, slice, until_deadline)),
        if continues { CONTINUES } else { "" }
    )
}

/// Whether the request asking `slice` when `until_deadline` is left carries the close at
/// the deadline (`--close-at-timeout`): only the last, whose deadline is the wait's own,
/// and never a pure query (`timeout=0` closes nothing: the agent refuses the pair).
fn closes(args: &WaitArgs, slice: Duration, until_deadline: Duration) -> bool {
    args.close_at_timeout && slice == until_deadline && !slice.is_zero()
}

/// When `wait` gives up on the request asking `slice` (sent now) when `until_deadline` is
/// left. The agent answers it `slice` after it reads it, and one that closes at the
/// deadline up to [`CLOSE_WAIT`] later still (its paced rounds a second apart, the list of
/// whom it closes first): that answer, the close's count, is the wait's, and hanging up
/// before it would end the hook while the agent still closes. The answer is awaited that
/// long from the request's sending (which follows the agent's accept, when its socket is
/// in this network namespace), plus the way back; the agent may take the connection up to
/// [`LATE_ACCEPT`] past the request's own end, and its answer is awaited up to
/// [`LATE_ANSWER`] later than that end. Whatever the agent does, every request ends by the
/// wait's `deadline` plus [`LATE_ANSWER`] and [`ANSWER_MARGIN`], plus [`CLOSE_WAIT`] for
/// the one that closes; a prompt agent that closes nothing answers the last one by the
/// deadline plus the way back.
fn request_deadlines(
    args: &WaitArgs,
    slice: Duration,
    until_deadline: Duration,
    deadline: Instant,
) -> Deadlines {
    let asked = Instant::now();
    let close_wait = if closes(args, slice, until_deadline) {
        CLOSE_WAIT
    } else {
        Duration::ZERO
    };
    let margin = if slice == until_deadline {
        ANSWER_MARGIN
    } else {
        SLICE_ANSWER_MARGIN
    };
    let end = (asked + slice).min(deadline);
    Deadlines {
        connect: end + LATE_ACCEPT,
        answer_after_sent: slice + close_wait + margin,
        answer: (asked + slice + LATE_ANSWER + margin).min(deadline + LATE_ANSWER + ANSWER_MARGIN)
            + close_wait,
    }
}

/// What a slice before the last adds to its query.
const CONTINUES: &str = "&continues=true";

/// The start of an agent's `400` to a parameter it does not know, for `continues` (an agent
/// from before it): `wait` then asks its slices without it, as before.
const CONTINUES_UNKNOWN: &str = "unknown parameter \"continues\"";

/// The drain-rule parameters of `wait`'s requests. `closes`: the request's deadline is the
/// wait's own, so it may carry `--close-at-timeout` (a slice that ends earlier must not: the
/// agent would reset the connections at the slice's end, minutes before the timeout).
fn rule_query(args: &WaitArgs, closes: bool) -> String {
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
    if args.close_at_timeout && closes {
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
    if let Some(unrecorded) = body.unrecorded {
        line.push_str(&format!("; {}", unrecorded.meaning()));
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

/// The query of a count that starts nothing and waits for nothing (`timeout=0`): the
/// progress lines, and the count of a wait that can no longer end drained.
fn count_query(args: &WaitArgs) -> String {
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
    query
}

/// How often a wait that can no longer end drained asks the count (and whether an agent
/// answers at all), and how long one such request may take.
const COUNT_EVERY: Duration = Duration::from_secs(1);

/// What one answer (or the lack of one) of the agent means for the wait.
enum Reply {
    /// 200 or 503 with the agent's body: drained or not.
    Body(DrainedBody),
    /// A 4xx that asking again cannot change ([`refused`]): bad input, a `--netns` inode
    /// no namespace has (404), a token the agent does not accept, a caller that may not ask
    /// this, settings that differ from the drain in progress, something the agent cannot do
    /// as it runs (`--close-at-timeout` without a way to close), a request head too large
    /// (431): the wait ends at once (exit 2).
    Refused(String),
    /// Anything else: the reason the wait goes on.
    Problem(WaitProblem),
}

/// Whether an answer's status refuses the request for good: every 4xx but those that say
/// "later" — 408 (the server timed the request out), 425 (too early) and 429 (too many
/// requests: the agent's limits of waiters and connections, with `Retry-After`). The agent
/// answers 400, 401, 403, 404 (an unknown `netns` inode, an unknown path), 409, 422 and 431
/// (a request head too large) to requests that will be refused again however often they
/// are asked. 5xx (the counts could not be read, a proxy without an agent behind it) and
/// anything else are asked again within the timeout; a refusal is never drained either.
pub(super) fn refused(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 425 | 429)
}

/// The timeout of the next request when `until_deadline` is left: at most [`MAX_SLICE`], and,
/// when more is left, short enough that the rest is at least `quiet` long by the time the
/// next request is sent ([`SLICE_GAP`] later). The last request is the one that may end
/// drained with its own quiet window and close at the deadline (`--close-at-timeout`): with
/// less than `quiet` left for it, no request would close. Where both cannot be (more than 10
/// minutes left, but less than about twice `quiet`), the longest slice. The last request
/// is given at least [`LAST_SLICE_LEAST`] also without a quiet window: a wait of 10 minutes
/// and 200 ms asked 10 minutes first, had nothing left to ask after the gap, and with
/// `--close-at-timeout` closed nothing at all.
fn next_slice(until_deadline: Duration, quiet: Duration) -> Duration {
    if until_deadline <= MAX_SLICE {
        return until_deadline;
    }
    let last = quiet.max(LAST_SLICE_LEAST) + SLICE_GAP;
    let rest = until_deadline - MAX_SLICE;
    if rest >= last {
        return MAX_SLICE;
    }
    // Less than MAX_SLICE, since `rest` < `last`.
    let leaving_last = until_deadline - last;
    if leaving_last >= quiet {
        leaving_last
    } else {
        MAX_SLICE
    }
}

/// The least the last request of a sliced wait asks for ([`next_slice`]): time for the
/// agent to read it and answer, and to close at the deadline.
const LAST_SLICE_LEAST: Duration = Duration::from_secs(1);

/// What passes between one slice's end and the next request: the pause before asking
/// again, and the answer's way back (the agent answers a slice at its deadline).
const SLICE_GAP: Duration = RETRY_PAUSE.saturating_add(ANSWER_MARGIN);

/// How long to pause before asking again after `answer`: [`RETRY_PAUSE`], or longer when a
/// `429` says when to ask again (its `Retry-After`, at most [`MAX_RETRY_AFTER`]): the agent
/// turned the request away because its limits are full, and asking sooner only adds to the
/// load that filled them. A stopping agent's `503` also carries `Retry-After`, but the next
/// agent answers as soon as it can, so that one is asked again after the usual pause.
fn pause_after(answer: &anyhow::Result<super::Response>) -> Duration {
    match answer {
        Ok(response) if response.status == 429 => {
            response.retry_after.map_or(RETRY_PAUSE, |asked| {
                asked.clamp(RETRY_PAUSE, MAX_RETRY_AFTER)
            })
        }
        _ => RETRY_PAUSE,
    }
}

/// What `get`'s result says, the same for the waiting requests and the counts.
fn judge(answer: anyhow::Result<super::Response>, agent: &str) -> Reply {
    match answer {
        Ok(response) if response.status == 200 || response.status == 503 => {
            match serde_json::from_str::<DrainedBody>(&response.body) {
                Ok(body) => Reply::Body(body),
                // A 503 that is not ours (e.g. a proxy in front): report it.
                Err(_) => Reply::Problem(WaitProblem::NotDrained(format!(
                    "unexpected answer {}: {}",
                    response.status,
                    error_text(&response.body)
                ))),
            }
        }
        Ok(response) if refused(response.status) => Reply::Refused(format!(
            "({}): {}",
            response.status,
            error_text(&response.body)
        )),
        Ok(response) => Reply::Problem(WaitProblem::NotDrained(format!(
            "agent answered {}: {}",
            response.status,
            error_text(&response.body)
        ))),
        // Unreachable (restarting?): retry within the timeout.
        Err(problem) => Reply::Problem(WaitProblem::Unreachable(format!(
            "agent unreachable at {agent}: {problem:#}"
        ))),
    }
}

/// `drain-agent wait`: 0 drained, 1 not drained in time, 2 usage error, a refusal
/// ([`refused`], at once) or agent unreachable.
pub fn wait(args: &WaitArgs) -> ExitCode {
    let url = match AgentUrl::parse(&args.agent)
        .and_then(|url| url.with_token_file(args.token_file.as_deref()))
        .map(|url| url.with_agent_uid(args.agent_uid))
    {
        Ok(url) => url,
        Err(problem) => {
            eprintln!("drain-agent wait: {problem:#}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let started = Instant::now();
    let deadline = started + args.timeout;
    // Why the last request did not end the wait; none before the first.
    let mut last_problem: Option<WaitProblem> = None;
    // Until an agent refuses `continues` as a parameter it does not know (an older one).
    let mut agent_knows_continues = true;
    let done = Arc::new(AtomicBool::new(false));
    let _stop_progress = StopOnDrop(Arc::clone(&done));
    if !args.progress.is_zero() {
        let (url, every, done) = (url.clone(), args.progress, Arc::clone(&done));
        let query = count_query(args);
        std::thread::spawn(move || progress_lines(url, query, every, done));
    }
    let last_problem = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        // Ask in slices of at most MAX_SLICE: within any agent's --max-timeout, and a
        // restarted agent is found again quickly. The first request asks for --timeout
        // itself, not the microseconds less that are left by now: a --quiet as long as
        // --timeout is allowed, and 1999 ms would have been refused for a 2 s window.
        let until_deadline = match last_problem {
            None => args.timeout,
            Some(_) => remaining,
        };
        let slice = next_slice(until_deadline, args.quiet);
        // A retry (the agent restarted or was out of reach) asks for what is left, and the
        // quiet window is counted from each request: with less left than --quiet, no
        // answer can say drained in time (the agent refuses such a request, and a shorter
        // window would call drained what the user did not).
        if let Some(problem) = &last_problem
            && args.quiet.as_millis() > slice.as_millis()
        {
            return wait_out(&url, args, deadline, problem);
        }
        let mut query = wait_query(args, slice, until_deadline);
        if !agent_knows_continues {
            query = query.replace(CONTINUES, "");
        }
        // The exchange ends when the agent's answer is due, whatever the agent does (an
        // agent that accepts but never answers, stopped or out of file descriptors, must
        // not stretch the wait further): counted from the request's sending, and for the
        // close's answer past the deadline ([`request_deadlines`]).
        let answer = get_within(
            &url,
            &query,
            request_deadlines(args, slice, until_deadline, deadline),
        );
        let pause = pause_after(&answer);
        let problem = match judge(answer, &args.agent) {
            Reply::Body(body) if body.drained => {
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
            // Not drained: the timeout ran out, or the agent is shutting down and answered
            // early. Ask again while time is left.
            Reply::Body(body) => WaitProblem::NotDrained(match body.reason {
                Some(AnswerReason::AgentShutdown) => {
                    format!("the agent shut down ({})", describe_remaining(&body))
                }
                None => describe_remaining(&body),
            }),
            Reply::Refused(why) if agent_knows_continues && why.contains(CONTINUES_UNKNOWN) => {
                // An agent from before `continues`: the same slice at once without it (its
                // drain ends `timeout` at the slice's end there, as it always did).
                agent_knows_continues = false;
                continue;
            }
            Reply::Refused(why) => {
                eprintln!("drain-agent wait: the agent refused the request {why}");
                return ExitCode::from(EXIT_ERROR);
            }
            Reply::Problem(problem) => problem,
        };
        if Instant::now() >= deadline {
            break problem;
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        // A pause that ran to the deadline (a 429's Retry-After, a retry's pause with less
        // left) leaves nothing to ask: the wait ends with what it last heard, as at the
        // deadline above (asking then was a pure query, `timeout=0`, with the close: `400`).
        if Instant::now() >= deadline {
            break problem;
        }
        last_problem = Some(problem);
    };
    finish(args, last_problem, None)
}

/// The rest of a wait that can no longer end drained: less is left than `--quiet` after
/// `after` ended the last request early. It keeps the hook waiting until its deadline (the
/// app serves meanwhile, as it would have for a wait that ends not drained) and asks the
/// count about every second (`timeout=0`, which starts nothing), so that it ends as any
/// wait does: 1 not drained in time, or 2 if no agent answered the last time.
fn wait_out(url: &AgentUrl, args: &WaitArgs, deadline: Instant, after: &WaitProblem) -> ExitCode {
    let left = format_duration(deadline.saturating_duration_since(Instant::now()));
    let quiet = format_duration(args.quiet);
    // --close-at-timeout cannot be asked for either: the request that closes at the
    // deadline carries the quiet window too, and a shorter one could answer drained.
    let no_close = if args.close_at_timeout {
        " (nothing is closed at the deadline)"
    } else {
        ""
    };
    eprintln!(
        "drain-agent wait: {}; {left} left, less than the quiet window {quiet}: the wait cannot end drained in time, waiting out the timeout{no_close}",
        after.text()
    );
    let why = format!("{left} was left to ask again, less than the quiet window {quiet}");
    let query = count_query(args);
    let last_problem = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let problem = match judge(
            get(url, &query, COUNT_EVERY.min(remaining + ANSWER_MARGIN)),
            &args.agent,
        ) {
            // Drained by count alone is not drained: the quiet window was not kept.
            Reply::Body(body) => WaitProblem::NotDrained(describe_remaining(&body)),
            Reply::Refused(refused) => {
                eprintln!("drain-agent wait: the agent refused the request {refused}");
                return ExitCode::from(EXIT_ERROR);
            }
            Reply::Problem(problem) => problem,
        };
        if Instant::now() >= deadline {
            break problem;
        }
        std::thread::sleep(COUNT_EVERY.min(deadline.saturating_duration_since(Instant::now())));
    };
    finish(args, last_problem, Some(&why))
}

/// The end of a wait whose deadline passed: the exit status says why (`cause`: what made
/// it unable to end drained, if something other than the count did).
fn finish(args: &WaitArgs, last_problem: WaitProblem, cause: Option<&str>) -> ExitCode {
    let cause = cause.map(|cause| format!(" ({cause})")).unwrap_or_default();
    match last_problem {
        WaitProblem::Unreachable(problem) => {
            eprintln!("drain-agent wait: {problem}{cause}");
            ExitCode::from(EXIT_ERROR)
        }
        WaitProblem::NotDrained(problem) => {
            eprintln!(
                "drain-agent wait: port {} not drained within {}: {problem}{cause}",
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

impl WaitProblem {
    fn text(&self) -> &str {
        match self {
            Self::NotDrained(text) | Self::Unreachable(text) => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::testing::{fake_agent, fake_agent_on},
        *,
    };

    fn answered(status: u16, body: &str) -> anyhow::Result<super::super::Response> {
        Ok(super::super::Response {
            status,
            body: body.to_owned(),
            instance: None,
            retry_after: None,
        })
    }

    /// A request the agent will refuse again however often it is asked ends the wait at
    /// once (exit 2): the agent's own 404 for an unknown `--netns` inode, and every other
    /// 4xx but the three that say "later". Before, anything but 400, 401, 403, 409 and 422
    /// was retried every 250 ms until the deadline and then called "not drained" (exit 1).
    #[test]
    fn a_4xx_that_asking_again_cannot_change_is_a_refusal() {
        let unknown_netns =
            r#"{"error":"netns: no network namespace with inode 1 is known to the agent"}"#;
        match judge(answered(404, unknown_netns), "agent") {
            Reply::Refused(why) => assert!(
                why.contains("404") && why.contains("no network namespace with inode 1"),
                "{why}"
            ),
            Reply::Body(_) | Reply::Problem(_) => panic!("404 for an unknown netns: not refused"),
        }
        for status in [400, 401, 403, 404, 405, 410, 413, 414, 422, 409, 431, 451] {
            assert!(
                matches!(judge(answered(status, "{}"), "agent"), Reply::Refused(_)),
                "{status}: not a refusal"
            );
        }
    }

    /// What may change by asking again is asked again within the timeout: too many
    /// requests (429, with Retry-After), a request the server timed out (408), too early
    /// (425), and the server's own failures (5xx: the counts could not be read, a proxy
    /// without an agent behind it); a 503 that is not the agent's answer among them. None
    /// of them ends the wait, and none is ever drained.
    #[test]
    fn an_answer_that_says_later_is_asked_again() {
        for status in [408, 425, 429, 500, 502, 503, 504] {
            assert!(
                matches!(
                    judge(answered(status, "busy"), "agent"),
                    Reply::Problem(WaitProblem::NotDrained(_))
                ),
                "{status}: not asked again"
            );
        }
    }

    /// Audit (overload): the agent's `429` says when to ask again (`Retry-After: 1`), and
    /// `wait` asked again after 250 ms all the same: four requests a second from every
    /// hook turned away, on an agent already at its limits. It now waits what the answer
    /// asks (at least its own pause, at most [`MAX_RETRY_AFTER`] and the deadline).
    #[test]
    fn a_429_is_asked_again_no_sooner_than_its_retry_after() {
        let asked = fake_agent(
            "429 Too Many Requests\r\nretry-after: 1",
            r#"{"error":"8 requests are waiting already (--max-waiters); retry later"}"#,
        );
        let exit = wait(&wait_args(&asked.agent, &["--timeout", "2500ms"]));
        assert_eq!(exit, ExitCode::from(EXIT_NOT_DRAINED), "never drained");
        // Asked at 0, ~1, ~2 s (and perhaps once more at the deadline's edge); every 250 ms
        // it was about ten times.
        let asked = asked.requests().len();
        assert!((2..=4).contains(&asked), "asked {asked} times in 2.5 s");
    }

    /// Audit (a second look): a pause that ran to the deadline (here a 429's `Retry-After`
    /// longer than what was left) was followed by one more request, asking `timeout=0ms`
    /// with `on_timeout=close`, which the agent refuses (`400`: a pure query closes
    /// nothing): `wait` exited 2, "the agent refused the request", not 1.
    #[test]
    fn a_pause_that_runs_to_the_deadline_ends_the_wait_not_drained() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let agent = fake_agent_on(listener, |target| {
            if target.contains("timeout=0ms") && target.contains("on_timeout=close") {
                (
                    "400 Bad Request".to_owned(),
                    r#"{"error":"on_timeout: a pure query (timeout=0) answers at once and closes nothing"}"#.to_owned(),
                )
            } else {
                (
                    "429 Too Many Requests\r\nretry-after: 2".to_owned(),
                    r#"{"error":"8 requests are waiting already (--max-waiters); retry later"}"#
                        .to_owned(),
                )
            }
        });
        let exit = wait(&wait_args(
            &agent.agent,
            &["--timeout", "1s", "--close-at-timeout"],
        ));
        let requests = agent.requests();
        assert_eq!(exit, ExitCode::from(EXIT_NOT_DRAINED), "{requests:#?}");
        assert!(
            requests
                .iter()
                .all(|target| !(target.contains("timeout=0ms")
                    && target.contains("on_timeout=close"))),
            "{requests:#?}"
        );
    }

    /// Audit (drain rules): `wait --timeout 20m --close-at-timeout` asked its first slice
    /// (10 minutes, the longest one request asks) with `on_timeout=close`, so the agent
    /// reset every connection left at 10 minutes and `wait` exited 0 ten minutes early.
    /// Only a request whose deadline is the wait's own carries the close now.
    #[test]
    fn only_the_slice_that_ends_at_the_timeout_closes() {
        let agent = fake_agent("400 Bad Request", r#"{"error":"stop here"}"#);
        let exit = wait(&wait_args(
            &agent.agent,
            &["--timeout", "20m", "--close-at-timeout"],
        ));
        assert_eq!(exit, ExitCode::from(EXIT_ERROR), "a 400 ends the wait");
        let first = agent.requests().remove(0);
        assert!(
            first.contains("timeout=600000ms") && !first.contains("on_timeout=close"),
            "the first 10 minutes of a 20-minute wait must not close: {first}"
        );
        let short = fake_agent("400 Bad Request", r#"{"error":"stop here"}"#);
        let exit = wait(&wait_args(
            &short.agent,
            &["--timeout", "5m", "--close-at-timeout"],
        ));
        assert_eq!(exit, ExitCode::from(EXIT_ERROR));
        let first = short.requests().remove(0);
        assert!(
            first.contains("timeout=300000ms") && first.contains("on_timeout=close"),
            "a wait that fits one request closes at its timeout: {first}"
        );
    }

    /// Audit (a second look): with the close only on the slice that ends at the timeout, a
    /// wait of 10 minutes 5 seconds with a 10 s quiet window asked 10 minutes first and had 5 s
    /// left, less than the window: it waited out the rest, and nothing closed at all. The
    /// slices now leave the last one at least the window long when they can.
    #[test]
    fn the_last_slice_is_long_enough_for_the_quiet_window() {
        let (second, minute) = (Duration::from_secs(1), Duration::from_secs(60));
        // Fits one request.
        assert_eq!(next_slice(5 * minute, 10 * second), 5 * minute);
        assert_eq!(next_slice(MAX_SLICE, 10 * second), MAX_SLICE);
        // Enough left after a whole slice.
        assert_eq!(next_slice(20 * minute, 10 * second), MAX_SLICE);
        assert_eq!(next_slice(25 * minute, Duration::ZERO), MAX_SLICE);
        // 10 min 5 s, quiet 10 s: the first slice leaves the window and the gap before the
        // next request, so that the last request, sent after the pause and the answer's
        // way back, still holds the whole window (and closes at the deadline).
        let total = 10 * minute + 5 * second;
        let first = next_slice(total, 10 * second);
        assert_eq!(first, total - 10 * second - SLICE_GAP);
        // Audit (a third look): leaving exactly the window was not enough: the pause and the
        // answer's way back (up to SLICE_GAP) left 9.74 s for a 10 s window, and the wait
        // waited out the rest with nothing closed.
        for late in [RETRY_PAUSE, SLICE_GAP] {
            let left = total - first - late;
            let last = next_slice(left, 10 * second);
            assert!(
                last >= 10 * second,
                "{last:?} left after a slice {late:?} late"
            );
        }
        // Cannot leave a window for both: the longest slice.
        assert_eq!(next_slice(11 * minute, 8 * minute), MAX_SLICE);
    }

    /// Audit (slices): each slice of a wait over 10 minutes started a drain that ended
    /// `timeout` at the slice's end, for the alerts a hook that gave up (one per slice,
    /// though the pod drained in time). Every slice but the last says so
    /// (`continues=true`): its drain ends `continued`. The last one, whose deadline is the
    /// wait's own, does not, and it alone carries `--close-at-timeout`.
    #[test]
    fn only_the_slices_before_the_last_say_the_wait_continues() {
        let long = fake_agent("400 Bad Request", r#"{"error":"stop here"}"#);
        let exit = wait(&wait_args(&long.agent, &["--timeout", "20m"]));
        assert_eq!(exit, ExitCode::from(EXIT_ERROR), "a 400 ends the wait");
        let first = long.requests().remove(0);
        assert!(
            first.contains("timeout=600000ms") && first.contains("&continues=true"),
            "the first 10 minutes of a 20-minute wait are a slice: {first}"
        );
        let short = fake_agent("400 Bad Request", r#"{"error":"stop here"}"#);
        let exit = wait(&wait_args(&short.agent, &["--timeout", "5m"]));
        assert_eq!(exit, ExitCode::from(EXIT_ERROR));
        let first = short.requests().remove(0);
        assert!(
            first.contains("timeout=300000ms") && !first.contains("continues"),
            "a wait that fits one request is the hook's own: {first}"
        );
        // Every request of a 25-minute wait: two slices, then the last.
        let args = wait_args(
            "http://127.0.0.1:1",
            &["--timeout", "25m", "--quiet", "10s", "--close-at-timeout"],
        );
        let mut left = args.timeout;
        let mut queries = Vec::new();
        while !left.is_zero() {
            let slice = next_slice(left, args.quiet);
            queries.push(wait_query(&args, slice, left));
            left -= slice;
        }
        let Some((last, slices)) = queries.split_last() else {
            panic!("no request");
        };
        assert_eq!(slices.len(), 2, "{queries:?}");
        for slice in slices {
            assert!(
                slice.contains("&continues=true") && !slice.contains("on_timeout"),
                "{slice}"
            );
        }
        assert!(
            !last.contains("continues") && last.contains("&on_timeout=close"),
            "{last}"
        );
    }

    /// Audit (second look): `--timeout 10m30s --quiet 6m` asked 10 minutes with
    /// `continues=true`, then had 30 s left, less than `--quiet`, and asked nothing more:
    /// the hook's only drain ended `continued`, and its timeout was nowhere (no alert for a
    /// stop that did cut connections off). A slice says it continues only when the wait
    /// will ask again after it.
    #[test]
    fn a_slice_says_it_continues_only_when_another_request_follows() {
        let minute = Duration::from_secs(60);
        for (timeout, quiet) in [
            (10 * minute + Duration::from_secs(30), 6 * minute),
            (11 * minute, 8 * minute),
            (25 * minute, Duration::from_secs(10)),
            (20 * minute, Duration::ZERO),
            (10 * minute + Duration::from_secs(1), Duration::ZERO),
            // Less than the gap left after the first slice: no request follows it (the
            // next one would be a pure query, `timeout=0`, no drain).
            (10 * minute + Duration::from_millis(200), Duration::ZERO),
        ] {
            let args = wait_args(
                "http://127.0.0.1:1",
                &[
                    "--timeout",
                    &format!("{}ms", timeout.as_millis()),
                    "--quiet",
                    &format!("{}ms", quiet.as_millis()),
                ],
            );
            // As the wait's loop goes when every slice runs out: each next request is
            // asked after the gap, and none when less than --quiet is left.
            let mut left = timeout;
            let mut queries = Vec::new();
            loop {
                let slice = next_slice(left, args.quiet);
                if !queries.is_empty() && args.quiet > slice {
                    break;
                }
                queries.push(wait_query(&args, slice, left));
                left = left.saturating_sub(slice + SLICE_GAP);
                if left.is_zero() {
                    break;
                }
            }
            let Some(last) = queries.last() else {
                panic!("no request");
            };
            assert!(
                !last.contains("continues"),
                "{timeout:?} with --quiet {quiet:?}: the last request says the wait continues: {queries:#?}"
            );
        }
    }

    /// Audit (a second look): a wait just over 10 minutes asked 10 minutes first and had
    /// less than the gap left after it: no request followed, and with `--close-at-timeout`
    /// nothing closed at the deadline. The last request now gets at least a second.
    #[test]
    fn a_wait_just_over_ten_minutes_closes_at_its_deadline() {
        let minute = Duration::from_secs(60);
        for timeout in [
            10 * minute + Duration::from_millis(1),
            10 * minute + Duration::from_millis(200),
            10 * minute + Duration::from_millis(1_700),
            20 * minute + Duration::from_millis(300),
        ] {
            let args = wait_args(
                "http://127.0.0.1:1",
                &[
                    "--timeout",
                    &format!("{}ms", timeout.as_millis()),
                    "--close-at-timeout",
                ],
            );
            // As the wait's loop goes when every slice runs out.
            let mut left = timeout;
            let mut queries = Vec::new();
            while !left.is_zero() {
                let slice = next_slice(left, args.quiet);
                queries.push(wait_query(&args, slice, left));
                left = left.saturating_sub(slice + SLICE_GAP);
            }
            let Some(last) = queries.last() else {
                panic!("no request");
            };
            assert!(
                last.contains("on_timeout=close") && !last.contains("timeout=0ms"),
                "{timeout:?}: the last request does not close: {queries:#?}"
            );
            assert!(
                queries
                    .iter()
                    .filter(|q| q.contains("on_timeout=close"))
                    .count()
                    == 1,
                "{timeout:?}: {queries:#?}"
            );
        }
    }

    /// An agent from before `continues` refuses it as an unknown parameter (`400`): the
    /// slice is asked again without it (its drain then ends `timeout` there, as before),
    /// rather than the wait ending at once with 2.
    #[test]
    fn an_agent_that_does_not_know_continues_is_asked_without_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let agent = fake_agent_on(listener, |target| {
            if target.contains("continues") {
                (
                    "400 Bad Request".to_owned(),
                    r#"{"error":"unknown parameter \"continues\" (known: port, addr, netns, timeout, quiet, ignore, idle, settle, on_timeout, pace, peers)"}"#.to_owned(),
                )
            } else {
                (
                    "200 OK".to_owned(),
                    r#"{"port":8080,"drained":true,"active":0,"waited_ms":5}"#.to_owned(),
                )
            }
        });
        let exit = wait(&wait_args(&agent.agent, &["--timeout", "20m"]));
        assert_eq!(exit, ExitCode::from(EXIT_DRAINED));
        let requests = agent.requests();
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert!(
            requests[0].contains("continues=true") && !requests[1].contains("continues"),
            "{requests:?}"
        );
    }

    /// The `timeout=` a request asked for, as the fake agents read it.
    fn asked_timeout(target: &str) -> Duration {
        let millis = target
            .split(['?', '&'])
            .find_map(|pair| pair.strip_prefix("timeout="))
            .and_then(|value| {
                value
                    .strip_suffix("ms")
                    .unwrap_or(value)
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no timeout in {target}"));
        Duration::from_millis(millis)
    }

    /// Audit (paced close): `wait --close-at-timeout --pace N` hung up 0.5 s after its
    /// timeout while the agent was still closing (it answers a close up to
    /// [`CLOSE_WAIT`] past the deadline, the paced rounds a second apart), and exited 2
    /// "agent unreachable": the hook returned and SIGTERM hit the app mid-pacing. A request
    /// that asked for the close waits for the close's answer.
    #[test]
    fn a_paced_close_is_waited_for_past_the_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let agent = fake_agent_on(listener, |target| {
            // Closing for 3 s past the deadline (three rounds of one connection).
            std::thread::sleep(asked_timeout(target) + Duration::from_secs(3));
            (
                "200 OK".to_owned(),
                r#"{"port":8080,"drained":true,"active":0,"waited_ms":3000,"closed":3}"#.to_owned(),
            )
        });
        let exit = wait(&wait_args(
            &agent.agent,
            &["--timeout", "1s", "--close-at-timeout", "--pace", "1"],
        ));
        let requests = agent.requests();
        assert!(
            requests[0].contains("&on_timeout=close&pace=1"),
            "{requests:?}"
        );
        assert_eq!(exit, ExitCode::from(EXIT_DRAINED), "{requests:?}");
    }

    /// Audit (late accept): a request's `timeout=` was fixed, and its deadline for the
    /// answer started, before connecting; but an agent may take the connection late (its
    /// listener bound before it serves, at a start or restart; an overloaded backlog), and
    /// it counts the timeout from when it reads the request. `wait` gave up before the
    /// agent's answer and exited 2 "agent unreachable" instead of the agent's own verdict.
    /// The answer's deadline now counts from the request's write, which follows the agent's
    /// accept (the owner check waits for it: this needs the socket tables).
    #[test]
    fn a_request_the_agent_takes_late_gets_the_agents_answer() {
        let test = "a_request_the_agent_takes_late_gets_the_agents_answer";
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr");
        // Whether this host's socket tables answer (else the request is sent at once, into
        // the backlog, and when the agent reads it cannot be told).
        let probe = std::net::TcpStream::connect(address).expect("connect");
        let (_accepted, _) = listener.accept().expect("accept");
        if crate::test_skip::socket_of_or_skip(test, &probe).is_none() {
            return;
        }
        drop(probe);
        // The agent starts serving 1.5 s after its listener was bound.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            let _agent = fake_agent_on(listener, |target| {
                std::thread::sleep(asked_timeout(target));
                (
                    "503 Service Unavailable".to_owned(),
                    r#"{"port":8080,"drained":false,"active":1,"waited_ms":1000}"#.to_owned(),
                )
            });
            std::thread::sleep(Duration::from_secs(10));
        });
        let exit = wait(&wait_args(
            &format!("http://{address}"),
            &["--timeout", "1s", "--progress", "0s"],
        ));
        assert_eq!(exit, ExitCode::from(EXIT_NOT_DRAINED));
    }

    fn wait_args(agent: &str, more: &[&str]) -> WaitArgs {
        use clap::Parser as _;
        let mut argv = vec!["drain-agent", "wait", "--port", "8080", "--agent", agent];
        argv.extend_from_slice(more);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("parse");
        let Some(crate::cli::Command::Wait(args)) = cli.command else {
            panic!("not a wait");
        };
        args
    }

    /// The agent refuses a quiet window on a pure query (`timeout=0`: its window, counted
    /// from the request, could never be met). `wait`'s own pure queries — the progress
    /// lines and the counts of a wait that can no longer end drained — carry none whatever
    /// `--quiet` is, and keep the rest of the rule (`--ignore`, `--idle`): the agent takes
    /// them as they are sent.
    #[test]
    fn the_counts_wait_asks_carry_no_quiet_window() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from([
            "drain-agent",
            "wait",
            "--port",
            "8080",
            "--timeout",
            "20s",
            "--quiet",
            "10s",
            "--ignore",
            "10.0.0.0/8",
            "--idle",
            "2s",
        ])
        .expect("parse");
        let Some(crate::cli::Command::Wait(args)) = cli.command else {
            panic!("not a wait");
        };
        let query = count_query(&args);
        let limits = crate::http::api::WaitLimits {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(600),
            own_port: None,
            own_netns: None,
        };
        let asked = crate::http::api::parse_drain_request(
            query.strip_prefix("/drained?"),
            limits,
            crate::sys::netns::ProcessPaths::Any,
        )
        .unwrap_or_else(|problem| panic!("{query}: refused: {problem:?}"));
        assert!(asked.timeout.is_zero() && asked.peers, "{query}");
        assert!(asked.rule.quiet.is_zero() && !asked.given.quiet, "{query}");
        assert!(
            asked.rule.idle == Some(Duration::from_secs(2)) && asked.rule.ignore.len() == 1,
            "{query}"
        );
    }

    /// An answer that waited unrecorded (its owner at its limit of drains) says so in what
    /// `wait` prints: without a drain there is no gate and no close at the deadline, which a
    /// hook asking `--close-at-timeout` must hear. Before, the line left it out.
    #[test]
    fn a_wait_that_was_not_recorded_says_so() {
        let body: DrainedBody = serde_json::from_value(serde_json::json!({
            "port": 8080,
            "drained": false,
            "active": 2,
            "waited_ms": 1000,
            "unrecorded": "owner_limit",
        }))
        .expect("an answer");
        let line = describe_remaining(&body);
        assert!(
            line.starts_with("8080: 2 active") && line.contains("nothing closed at the deadline"),
            "{line}"
        );
        let recorded = DrainedBody {
            unrecorded: None,
            ..body
        };
        assert!(!describe_remaining(&recorded).contains("no drain"));
    }
}
