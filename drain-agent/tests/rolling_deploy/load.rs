//! The load generator: threads of keep-alive HTTP/1.1 clients sending a mix of fast requests
//! and slow ones (0.5–3 s, streamed) through nginx, bounded by count and time, checking every
//! answer (status 200, the whole body, byte for byte).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// What the load looks like.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: SocketAddr,
    /// Threads sending `/fast` requests, one after the other with `fast_pause` between.
    pub fast_clients: usize,
    pub fast_pause: Duration,
    /// Threads sending `/slow` requests back to back: always one in flight each.
    pub slow_clients: usize,
    /// The slow requests last between these many milliseconds.
    pub slow_ms: (u64, u64),
    /// Hard bounds, whatever happens.
    pub max_requests: u64,
    pub max_duration: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Fast,
    Slow,
}

/// How one request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 200 and the whole body, as expected.
    Ok,
    /// No connection to nginx.
    Connect(String),
    /// The connection failed before a whole answer head arrived (reset, closed).
    Connection(String),
    /// An answer other than 200 (nginx's 502 when no backend answers).
    Status(u16),
    /// A 200 whose body stopped short of its Content-Length (or was not the expected one).
    Truncated { received: usize, expected: usize },
    /// No answer within the client's timeout.
    Timeout,
}

/// One request, as the client saw it.
#[derive(Clone, Debug)]
pub struct Record {
    pub kind: Kind,
    pub started: Instant,
    pub ended: Instant,
    pub outcome: Outcome,
    /// The `X-Backend` header (`ADDRESS VERSION`), when an answer head arrived.
    pub backend: Option<String>,
    /// Sent a second time, on a new connection, because nginx closed the connection under the
    /// first try before reading it (nothing at all came back): a reload makes the old workers
    /// close their idle client connections, and a request sent at that moment is dropped
    /// unread. HTTP clients re-send idempotent requests then (RFC 9110 §9.2.2). Never done after
    /// any byte of an answer arrived, so it cannot hide a cut answer; and the test checks in
    /// nginx's access log that nginx never read the first try.
    pub retried: bool,
    /// The request id (`rid=` in the query) of each attempt, the one that counted last.
    pub attempts: Vec<String>,
}

impl Record {
    /// The backend's port, from `X-Backend`.
    pub fn backend_port(&self) -> Option<u16> {
        let address = self.backend.as_deref()?.split(' ').next()?;
        address.rsplit_once(':')?.1.parse().ok()
    }

    pub fn backend_version(&self) -> Option<&str> {
        self.backend.as_deref()?.split(' ').nth(1)
    }
}

/// The running load; [`Load::finish`] stops it and collects what happened.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Record>>>,
}

impl Load {
    pub fn start(config: &LoadConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + config.max_duration;
        let mut threads = Vec::new();
        let kinds = std::iter::repeat_n(Kind::Fast, config.fast_clients)
            .chain(std::iter::repeat_n(Kind::Slow, config.slow_clients));
        for (index, kind) in kinds.enumerate() {
            let worker = Worker {
                config: config.clone(),
                kind,
                stop: Arc::clone(&stop),
                sent: Arc::clone(&sent),
                deadline,
                random: Random::new(index as u64 + 1),
                index,
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("load-{index}"))
                    .spawn(move || worker.run())
                    .expect("start a load thread"),
            );
        }
        Self { stop, threads }
    }

    /// Stops sending; waits for the requests in flight (slow ones included) to end.
    pub fn finish(mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|thread| thread.join().expect("load thread"))
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // On a panic elsewhere: let the threads run out on their own (bounded by the deadline).
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Worker {
    config: LoadConfig,
    kind: Kind,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    deadline: Instant,
    random: Random,
    index: usize,
}

impl Worker {
    fn run(mut self) -> Vec<Record> {
        let mut client = Client::new(self.config.target);
        let mut records = Vec::new();
        let mut sequence = 0_u64;
        while !self.stop.load(Ordering::SeqCst)
            && Instant::now() < self.deadline
            && self.sent.fetch_add(1, Ordering::SeqCst) < self.config.max_requests
        {
            let (path, expected) = match self.kind {
                Kind::Fast => {
                    let bytes = self.random.between(256, 4096) as usize;
                    (format!("/fast?bytes={bytes}"), bytes)
                }
                Kind::Slow => {
                    let (low, high) = self.config.slow_ms;
                    let ms = self.random.between(low, high);
                    let bytes = self.random.between(8192, 32768) as usize;
                    (format!("/slow?ms={ms}&bytes={bytes}"), bytes)
                }
            };
            sequence += 1;
            let id = format!("w{}-{sequence}", self.index);
            records.push(client.get(self.kind, &path, &id, expected));
            if self.kind == Kind::Fast {
                std::thread::sleep(self.config.fast_pause);
            }
        }
        records
    }
}

/// xorshift64*: enough randomness for request sizes and durations, no dependency.
struct Random(u64);

impl Random {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        low + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % (high - low + 1)
    }
}

/// The longest a request may take before it counts as a timeout.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// A keep-alive HTTP/1.1 client to one address. Not `drain_agent::cli::client::get` (the tests'
/// shared client): that one opens a connection per request and says `Connection: close`,
/// while the load must keep connections alive across nginx reloads, read `X-Backend`, tell
/// whether any answer byte arrived before a failure (to re-send only unread requests), and
/// time each request itself.
struct Client {
    target: SocketAddr,
    connection: Option<TcpStream>,
}

/// How an exchange on one connection went wrong, and whether any answer byte had arrived.
struct Failure {
    outcome: Outcome,
    answer_bytes: usize,
}

/// A whole answer.
struct Answer {
    status: u16,
    backend: Option<String>,
    body: Vec<u8>,
    expected_len: usize,
    keep_alive: bool,
}

impl Client {
    fn new(target: SocketAddr) -> Self {
        Self {
            target,
            connection: None,
        }
    }

    /// `GET path&rid=ID-N` (N: the attempt), answer checked against `expected` bytes.
    fn get(&mut self, kind: Kind, path: &str, id: &str, expected: usize) -> Record {
        let started = Instant::now();
        let mut retried = false;
        let mut attempts = Vec::new();
        let result = loop {
            let attempt = format!("{id}-{}", attempts.len());
            let result = self.exchange(&format!("{path}&rid={attempt}"));
            attempts.push(attempt);
            match result {
                Err(Failure {
                    outcome: Outcome::Connection(_),
                    answer_bytes: 0,
                }) if !retried => {
                    // Closed under us with no answer at all (an old nginx worker after a
                    // reload): once more, on a new connection.
                    retried = true;
                }
                result => break result,
            }
        };
        let (outcome, backend) = match result {
            Err(failure) => (failure.outcome, None),
            Ok(answer) => {
                let outcome = judge(&answer, expected);
                // `exchange` kept the connection if the answer allows; not after a bad one.
                if outcome != Outcome::Ok {
                    self.connection = None;
                }
                (outcome, answer.backend)
            }
        };
        Record {
            kind,
            started,
            ended: Instant::now(),
            outcome,
            backend,
            retried,
            attempts,
        }
    }

    /// Sends one request and reads its answer; on success the connection is kept.
    fn exchange(&mut self, path: &str) -> Result<Answer, Failure> {
        let failure = |outcome, answer_bytes| Failure {
            outcome,
            answer_bytes,
        };
        let mut stream = match self.connection.take() {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect_timeout(&self.target, Duration::from_secs(2))
                    .map_err(|e| failure(Outcome::Connect(e.to_string()), 0))?;
                stream
                    .set_read_timeout(Some(CLIENT_TIMEOUT))
                    .and_then(|()| stream.set_nodelay(true))
                    .map_err(|e| failure(Outcome::Connect(e.to_string()), 0))?;
                stream
            }
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.target);
        stream
            .write_all(request.as_bytes())
            .map_err(|e| failure(Outcome::Connection(e.to_string()), 0))?;
        let answer = read_answer(&mut stream)?;
        if answer.keep_alive {
            self.connection = Some(stream);
        }
        Ok(answer)
    }
}

fn io_outcome(error: &std::io::Error) -> Outcome {
    match error.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Outcome::Timeout,
        _ => Outcome::Connection(error.to_string()),
    }
}

fn read_answer(stream: &mut TcpStream) -> Result<Answer, Failure> {
    let mut received = Vec::with_capacity(8192);
    let mut chunk = [0; 16 * 1024];
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let read = stream.read(&mut chunk).map_err(|e| Failure {
            outcome: io_outcome(&e),
            answer_bytes: received.len(),
        })?;
        if read == 0 {
            return Err(Failure {
                outcome: Outcome::Connection(format!(
                    "closed after {} bytes of the head",
                    received.len()
                )),
                answer_bytes: received.len(),
            });
        }
        received.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    let expected_len = header("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let keep_alive = !header("connection").is_some_and(|value| value.eq_ignore_ascii_case("close"));
    let backend = header("x-backend");
    let mut body = received[head_end..].to_vec();
    while body.len() < expected_len {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => body.extend_from_slice(&chunk[..read]),
            Err(error) if body.len() < expected_len => {
                // A body cut by a reset is a truncated answer, whatever the reason.
                if io_outcome(&error) == Outcome::Timeout {
                    return Err(Failure {
                        outcome: Outcome::Timeout,
                        answer_bytes: head_end + body.len(),
                    });
                }
                break;
            }
            Err(_) => break,
        }
    }
    let complete = body.len() >= expected_len;
    Ok(Answer {
        status,
        backend,
        body,
        expected_len,
        keep_alive: keep_alive && complete,
    })
}

/// 200, the announced length, the requested length, and the right bytes.
fn judge(answer: &Answer, expected: usize) -> Outcome {
    if answer.status != 200 {
        return Outcome::Status(answer.status);
    }
    let right_bytes = answer.body.len() == expected
        && answer.expected_len == expected
        && answer
            .body
            .iter()
            .enumerate()
            .all(|(i, byte)| *byte == b'a' + (i % 26) as u8);
    if right_bytes {
        Outcome::Ok
    } else {
        Outcome::Truncated {
            received: answer.body.len(),
            expected,
        }
    }
}
