//! `drain-agent probe`: the kubelet's exec probe of the agent's own pod. During an upgrade
//! (the DaemonSet's `maxSurge: 1`) the old and the new agent both listen on the node's
//! address (`SO_REUSEPORT`), and the kernel hashes each new connection to either: an
//! `httpGet` probe of the new pod may be answered by the old agent, which would make the
//! new pod Ready, and the old one deleted, while the new agent is still loading or about
//! to fail. Every answer on the node listener names its agent (`INSTANCE_HEADER`), so the
//! probe opens fresh connections (a new source port hashes anew) until the named agent
//! answers, and passes only on that agent's own `200`. With `--ready` (the readiness
//! probe) it asks `/healthz?ready=true`, which also waits for the agent's first round of
//! pod listeners (`http/ready.rs`): the old agent detaches its steering in every pod at its
//! stop.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use crate::{
    cli::{
        ProbeArgs,
        client::{AgentUrl, EXIT_ERROR, error_text, get},
    },
    http::ready::READY_QUERY,
};

/// Exit status: the named agent answered `/healthz` (`?ready=true` with `--ready`) with `200`.
const EXIT_READY: u8 = 0;
/// Exit status: it answered otherwise, or only other agents (or none) answered in time.
const EXIT_NOT_READY: u8 = 1;

/// The pause after another agent's answer before the next connection: with two agents
/// half the connections reach each, so a few tries suffice, and a probe that only ever
/// reaches the other one (this one is not serving) does not flood it.
const AFTER_ANOTHER: Duration = Duration::from_millis(10);
/// The pause after a connection that failed (nothing serves yet).
const AFTER_FAILURE: Duration = Duration::from_millis(50);

/// What the probe learned.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The named agent answered this status, with this body.
    Reached { status: u16, body: String },
    /// Only other agents answered (how many times), or no connection succeeded (the last
    /// problem), until the deadline.
    NotReached {
        others: usize,
        failures: usize,
        last_problem: Option<String>,
    },
}

/// Tries fresh connections to `url` until the agent named `instance` answers `path` (a
/// `/healthz`) or `within` passes.
fn reach(url: &AgentUrl, path: &str, instance: &str, within: Duration) -> Outcome {
    let deadline = Instant::now() + within;
    let (mut others, mut failures, mut last_problem) = (0, 0, None);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Outcome::NotReached {
                others,
                failures,
                last_problem,
            };
        }
        let pause = match get(url, path, left) {
            Ok(answer) if answer.instance.as_deref() == Some(instance) => {
                return Outcome::Reached {
                    status: answer.status,
                    body: answer.body,
                };
            }
            Ok(_) => {
                others += 1;
                AFTER_ANOTHER
            }
            Err(problem) => {
                failures += 1;
                last_problem = Some(format!("{problem:#}"));
                AFTER_FAILURE
            }
        };
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// `drain-agent probe`.
pub fn probe(args: &ProbeArgs) -> ExitCode {
    let url = match AgentUrl::parse(&format!("http://{}", args.listen)) {
        Ok(url) => url,
        Err(problem) => {
            eprintln!("drain-agent probe: {problem:#}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let (path, not) = if args.ready {
        (format!("/healthz?{READY_QUERY}"), "ready")
    } else {
        ("/healthz".to_owned(), "healthy")
    };
    match reach(&url, &path, &args.instance, args.within) {
        Outcome::Reached { status: 200, body } => {
            println!(
                "agent {} at {}: {}",
                args.instance,
                args.listen,
                body.trim()
            );
            ExitCode::from(EXIT_READY)
        }
        Outcome::Reached { status, body } => {
            eprintln!(
                "drain-agent probe: agent {} at {} is not {not}: {status} {}",
                args.instance,
                args.listen,
                error_text(&body)
            );
            ExitCode::from(EXIT_NOT_READY)
        }
        Outcome::NotReached {
            others,
            failures,
            last_problem,
        } => {
            eprintln!(
                "drain-agent probe: agent {} did not answer at {} within {:?}: {others} answer(s) from other agents, {failures} failed connection(s){}",
                args.instance,
                args.listen,
                args.within,
                last_problem.map_or_else(String::new, |problem| format!(" (last: {problem})"))
            );
            ExitCode::from(EXIT_NOT_READY)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpListener,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use super::*;

    /// A server on a free loopback port that answers every connection's request with the
    /// next of `answers` (status, instance) in turn, the last one forever after; and the
    /// count of connections it served.
    fn fake_agents(answers: Vec<(u16, &'static str)>) -> (AgentUrl, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let served = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&served);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut request = [0_u8; 1024];
                let _ = stream.read(&mut request);
                let n = count.fetch_add(1, Ordering::SeqCst);
                let (status, instance) = answers[n.min(answers.len() - 1)];
                let body = format!("{{\"status\":\"{status}\"}}");
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ndrain-agent-instance: {instance}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let url = AgentUrl::parse(&format!("http://127.0.0.1:{port}")).expect("url");
        (url, served)
    }

    #[test]
    fn another_agents_200_never_passes() {
        let (url, served) = fake_agents(vec![(200, "old-agent")]);
        let outcome = reach(&url, "/healthz", "new-agent", Duration::from_millis(300));
        let Outcome::NotReached { others, .. } = outcome else {
            panic!("passed on another agent's answer: {outcome:?}");
        };
        assert!(others >= 2, "fresh connections were tried: {others}");
        // Every answer counted as another agent's was one the fake served (it counts before
        // it answers). It may have served one more: a last request cut by the deadline is a
        // failed connection to the client (an exact count failed under load).
        let served = served.load(Ordering::SeqCst);
        assert!(
            (others..=others + 1).contains(&served),
            "{others} answers from other agents, {served} served"
        );
    }

    #[test]
    fn the_named_agent_is_found_among_others() {
        let (url, served) = fake_agents(vec![
            (200, "old-agent"),
            (200, "old-agent"),
            (200, "new-agent"),
        ]);
        assert_eq!(
            reach(&url, "/healthz", "new-agent", Duration::from_secs(5)),
            Outcome::Reached {
                status: 200,
                body: "{\"status\":\"200\"}".into()
            }
        );
        assert_eq!(served.load(Ordering::SeqCst), 3, "one connection each");
    }

    #[test]
    fn the_named_agents_own_failure_is_final() {
        let (url, served) = fake_agents(vec![(503, "new-agent"), (200, "new-agent")]);
        let outcome = reach(&url, "/healthz", "new-agent", Duration::from_secs(5));
        assert!(
            matches!(outcome, Outcome::Reached { status: 503, .. }),
            "{outcome:?}"
        );
        assert_eq!(served.load(Ordering::SeqCst), 1, "not asked again");
    }

    #[test]
    fn nothing_listening_is_not_reached() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let url = AgentUrl::parse(&format!("http://127.0.0.1:{port}")).expect("url");
        let outcome = reach(&url, "/healthz", "new-agent", Duration::from_millis(200));
        assert!(
            matches!(
                outcome,
                Outcome::NotReached {
                    others: 0,
                    failures: 1..,
                    last_problem: Some(_)
                }
            ),
            "{outcome:?}"
        );
    }
}
