//! The client side of HTTP/1.1 the commands need: one `GET` with a deadline for the whole
//! exchange. URLs are parsed with [`http::Uri`], answers with [`httparse`].

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::owner::{self, ServerOwners};

/// `http://host:port[/prefix]`, split up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    pub host: String,
    pub port: u16,
    pub prefix: String,
    /// Sent as `Authorization: Bearer …` when set ([`AgentUrl::with_token_file`]).
    pub token: Option<String>,
    /// Whose server socket a request goes to, when it is in this network namespace: an
    /// agent's ([`AgentUrl::parse`]; [`AgentUrl::with_agent_uid`]).
    pub owners: ServerOwners,
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

    /// Also takes a server socket of `agent_uid` for the agent's, if given (`--agent-uid`:
    /// an agent run as a user other than root and this one).
    #[must_use]
    pub fn with_agent_uid(mut self, agent_uid: Option<u32>) -> Self {
        self.owners = ServerOwners::Agent { agent_uid };
        self
    }

    /// `http://host[:port][/prefix]`; the port defaults to 80, a trailing `/` of the prefix
    /// is dropped.
    pub fn parse(text: &str) -> Result<Self> {
        let Some(rest) = text.strip_prefix("http://") else {
            bail!("agent URL {text:?} must start with http:// (e.g. http://127.0.0.1:9100)");
        };
        // `http://$(HOST_IP):19700` on an IPv6 node: which colon starts the port cannot be
        // told (`fd00::5:9100` is an address too), so it is refused saying how to write it.
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host_port = authority.rsplit('@').next().unwrap_or_default();
        if host_port.matches(':').count() > 1 && !host_port.contains('[') {
            bail!(
                "agent URL {text:?}: an IPv6 address is written in brackets in a URL, e.g. http://[fd00::5]:19700 (in a pod spec: http://[$(HOST_IP)]:19700)"
            );
        }
        let uri = text
            .parse::<http::Uri>()
            .with_context(|| format!("agent URL {text:?} is not a URL"))?;
        let authority = uri
            .authority()
            .with_context(|| format!("agent URL {text:?} has no host"))?;
        // An IPv6 address is bracketed in a URL and bare in a socket address.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            bail!("agent URL {text:?} has no host");
        }
        // `Authority::port` is `None` for a port that is not a number as well as for none:
        // whatever follows the host's last `:` must be a port.
        let port = match authority.as_str().rsplit_once(':') {
            Some((_, port)) if !port.contains(']') => port
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .with_context(|| format!("agent URL {text:?} has a bad port {port:?}"))?,
            _ => 80,
        };
        let prefix = uri
            .path_and_query()
            .map_or("", |path| path.as_str())
            .trim_end_matches('/');
        Ok(Self {
            host: host.to_owned(),
            port,
            prefix: prefix.to_owned(),
            token: None,
            owners: ServerOwners::Agent { agent_uid: None },
        })
    }
}

/// One response: status code, body, and the agent that answered
/// ([`crate::http::INSTANCE_HEADER`]).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub instance: Option<String>,
    /// `Retry-After` in seconds (the agent's `429`s and stop answers carry it; an HTTP date
    /// is not read).
    pub retry_after: Option<Duration>,
}

/// The longest a connect may take within a `get` (a SYN to a dead host is not retried
/// sooner otherwise).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The most of an answer `get` reads (the agent's largest, /metrics, is far smaller).
const MAX_ANSWER: usize = 16 << 20;

/// `GET path` with a deadline for the whole exchange: connect (to each address of the host
/// in turn, [`connect`]), send and read together take at most `timeout` (name resolution
/// aside: the agent URL is normally an IP address).
pub fn get(url: &AgentUrl, path: &str, timeout: Duration) -> Result<Response> {
    let deadline = Instant::now() + timeout;
    get_within(
        url,
        path,
        Deadlines {
            connect: deadline,
            answer_after_sent: timeout,
            answer: deadline,
        },
    )
}

/// When a `GET` gives up ([`get_within`]): the connection by one deadline, the answer by
/// another that may count from the request's sending.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// By when the connection is made and taken by the agent ([`connect`]: where its socket
    /// is in this network namespace, its accept is waited for).
    pub connect: Instant,
    /// How long the answer may take, counted from when the request goes out (right after
    /// the agent took the connection): an agent that took it late answers as much later.
    pub answer_after_sent: Duration,
    /// By when the answer is complete at the latest, however late the request went out.
    pub answer: Instant,
}

/// `GET path` with [`Deadlines`] of its own: [`get`]'s, but the answer awaited for
/// `answer_after_sent` from the request's sending (bounded by `answer`) rather than from
/// the call.
pub fn get_within(url: &AgentUrl, path: &str, deadlines: Deadlines) -> Result<Response> {
    let addresses: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", url.host))?
        .collect();
    get_from(&addresses, url, path, deadlines)
}

/// [`get_within`] from the host's `addresses`, in the resolver's order ([`connect`]).
fn get_from(
    addresses: &[SocketAddr],
    url: &AgentUrl,
    path: &str,
    deadlines: Deadlines,
) -> Result<Response> {
    let started = Instant::now();
    let mut stream = connect(addresses, url, deadlines.connect)?;
    // The agent has the connection (or is in another namespace, where its accept cannot be
    // seen): it counts a request's timeout from when it reads it, which is no sooner.
    let sent_at = Instant::now();
    let deadline = (sent_at + deadlines.answer_after_sent).min(deadlines.answer);
    let timeout = deadline.saturating_duration_since(started);
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

/// A connection to the first of `addresses` that takes one and is the agent's
/// ([`owner::check`]: a server socket of another user gets nothing sent), tried in turn
/// within the deadline (each connect bounded by [`CONNECT_TIMEOUT`]): `localhost` resolves
/// to `::1` first on glibc and musl, and an agent on `127.0.0.1` is still found. The wait
/// for a connection's owner to show (a listener that has not accepted it yet) is bounded by
/// [`CONNECT_TIMEOUT`] too while more addresses remain: a listener that never accepts, on
/// the first address, would otherwise hold the request until its deadline. The last
/// address has the rest of the deadline. The error says why each address failed.
fn connect(addresses: &[SocketAddr], url: &AgentUrl, deadline: Instant) -> Result<TcpStream> {
    let mut problems = Vec::new();
    for (index, address) in addresses.iter().enumerate() {
        let Ok(left) = left(deadline) else { break };
        let more = index + 1 < addresses.len();
        match TcpStream::connect_timeout(address, left.min(CONNECT_TIMEOUT))
            .with_context(|| format!("cannot connect to the agent at {address}"))
            .and_then(|stream| {
                let owner_deadline = if more {
                    deadline.min(Instant::now() + CONNECT_TIMEOUT)
                } else {
                    deadline
                };
                owner::check(&stream, url.owners, url.token.is_some(), owner_deadline)
                    .map(|()| stream)
            }) {
            Ok(stream) => return Ok(stream),
            Err(problem) => problems.push(problem),
        }
    }
    let mut problems = problems.into_iter();
    match (problems.next(), problems.len()) {
        (None, _) if addresses.is_empty() => bail!("{} has no address", url.host),
        (None, _) => bail!("no complete answer from the agent by the deadline"),
        (Some(only), 0) => Err(only),
        (Some(first), _) => bail!(
            "{}",
            std::iter::once(first)
                .chain(problems)
                .map(|problem| format!("{problem:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
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

/// The status code and body of a whole answer (read to its end: the request says
/// `Connection: close`).
fn parse_response(raw: &[u8]) -> Result<Response> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let body_at = match head.parse(raw) {
        Ok(httparse::Status::Complete(body_at)) => body_at,
        Ok(httparse::Status::Partial) => bail!("the agent's answer is not HTTP"),
        Err(problem) => bail!("the agent's answer is not HTTP: {problem}"),
    };
    let status = head.code.context("the agent's answer has no status code")?;
    let chunked = head.headers.iter().any(|header| {
        header.name.eq_ignore_ascii_case("transfer-encoding")
            && header.value.trim_ascii().eq_ignore_ascii_case(b"chunked")
    });
    let instance = head
        .headers
        .iter()
        .find(|header| {
            header
                .name
                .eq_ignore_ascii_case(crate::http::INSTANCE_HEADER)
        })
        .map(|header| String::from_utf8_lossy(header.value).into_owned());
    let retry_after = head
        .headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case("retry-after"))
        .and_then(|header| std::str::from_utf8(header.value).ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = &raw[body_at..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        instance,
        retry_after,
    })
}

/// Joins the chunks of a chunked body. On bytes: chunk sizes count bytes, and a chunk may
/// end inside a multi-byte character. Chunk extensions (";name=value") are skipped.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let (data_at, size) = match httparse::parse_chunk_size(body) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => bail!("bad chunked body"),
            Err(_) => bail!("bad chunk size"),
        };
        let size = usize::try_from(size).context("bad chunk size")?;
        let rest = &body[data_at..];
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::{
        super::testing::{fake_agent_on, nobodys_listener},
        *,
    };

    #[test]
    fn agent_urls_parse() {
        assert_eq!(
            AgentUrl::parse("http://127.0.0.1:9100").expect("url"),
            AgentUrl {
                host: "127.0.0.1".into(),
                port: 9100,
                prefix: String::new(),
                token: None,
                owners: ServerOwners::Agent { agent_uid: None },
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
        // An IPv6 node's address, as the docs' DRAIN_AGENT_URL=http://[$(HOST_IP)]:19700
        // gives it; unbracketed (http://$(HOST_IP):19700 there) it is refused saying how to
        // write it: which colon starts the port cannot be told.
        let url = AgentUrl::parse("http://[2600:1f14:ab:cd00::5]:19700").expect("url");
        assert_eq!(
            (url.host.as_str(), url.port),
            ("2600:1f14:ab:cd00::5", 19700)
        );
        for unbracketed in ["http://2600:1f14:ab:cd00::5:19700", "http://fd00::5/agent"] {
            let problem = format!("{:#}", AgentUrl::parse(unbracketed).expect_err(unbracketed));
            assert!(problem.contains("in brackets"), "{unbracketed}: {problem}");
        }
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

    /// [`get`]'s deadlines: the whole exchange within `timeout` from now.
    fn within(timeout: Duration) -> Deadlines {
        let deadline = Instant::now() + timeout;
        Deadlines {
            connect: deadline,
            answer_after_sent: timeout,
            answer: deadline,
        }
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

    /// `localhost` resolves to `::1` first (glibc and musl sort it so), and the agent
    /// listens on 127.0.0.1 only: `get` tried the first address alone, and `wait --agent
    /// http://localhost:9100` retried a refused `[::1]:9100` until its timeout (exit 2).
    /// Every address is tried in turn; the test hands over the resolver's order itself.
    #[test]
    fn every_address_of_the_host_is_tried_in_turn() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut request = [0_u8; 1024];
                let _ = std::io::Read::read(&mut stream, &mut request);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                );
            }
        });
        let url = AgentUrl::parse(&format!("http://localhost:{port}")).expect("url");
        let resolved = [
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
        ];
        let answer = get_from(&resolved, &url, "/healthz", within(Duration::from_secs(2)))
            .expect("answered at 127.0.0.1 after [::1] refused");
        assert_eq!((answer.status, answer.body.as_str()), (200, "{}"));
    }

    /// Audit: `localhost` is `[::1]` first, and a local user who listened on `[::1]:9100`
    /// and never accepted held every request there: the owner lookup waited for the
    /// connection to be accepted until the request's whole deadline, and the agent at
    /// `127.0.0.1:9100` was never asked (`wait` exited 2 at its timeout, no drain ran). An
    /// address with more after it is waited for [`CONNECT_TIMEOUT`] at most.
    #[test]
    #[ignore = "kernel test: needs root (setfsuid); run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn a_listener_that_never_accepts_does_not_hold_up_the_next_address() {
        // nobody's listener on [::1]:P, never accepting; root's agent on 127.0.0.1:P.
        let (never, agent, _accept) = (0..20)
            .find_map(|_| {
                let (never, accept) =
                    nobodys_listener(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)));
                let agent =
                    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, never.port()))
                        .ok()?;
                Some((never, agent, accept))
            })
            .expect("a port free on both loopback addresses");
        let port = never.port();
        let _agent = fake_agent_on(agent, |_| ("200 OK".into(), r#"{"agent":"root's"}"#.into()));
        let url = AgentUrl::parse(&format!("http://localhost:{port}")).expect("url");
        let resolved = [
            never,
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
        ];
        let started = Instant::now();
        let answer = get_from(&resolved, &url, "/healthz", within(Duration::from_secs(10)))
            .expect("answered at 127.0.0.1 after [::1] never accepted");
        assert_eq!(answer.body, r#"{"agent":"root's"}"#);
        assert!(
            started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        // The last address is waited for until the deadline, as before.
        let started = Instant::now();
        let problem = get_from(&[never], &url, "/healthz", within(Duration::from_secs(3)))
            .expect_err("nobody's listener never accepts");
        assert!(
            format!("{problem:#}").contains("has not accepted"),
            "{problem:#}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(2900),
            "gave up after {:?}",
            started.elapsed()
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
}
