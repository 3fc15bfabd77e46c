//! HAProxy's agent-check protocol: a small TCP listener that tells HAProxy to stop sending
//! new connections to a server whose port is draining, and to send them again when it is not.
//!
//! The protocol (HAProxy configuration manual, server keywords `agent-check`, `agent-send`,
//! `agent-port`, `agent-inter`): every `agent-inter` HAProxy connects to `agent-port`, writes
//! the `agent-send` string verbatim (if set), and reads one ASCII line ended by the first `\r`
//! or `\n`. The line is made of words separated by spaces, tabs or commas; HAProxy acts on
//! the words it knows — `ready`, `drain`, `maint` (administrative state), `up`, `down`,
//! `fail`, `stopped` (operational state), `N%` (weight), `maxconn:N` — changes nothing it is
//! not told, and reports the first word it does not know as `agent reports an error : WORD`
//! (`show stat`, column `last_agt`) without changing any state. An incomplete line (no
//! `\r`/`\n` before the close) is ignored too. A connection the agent refuses or closes is
//! not an error to HAProxy either (a warning in its log).
//!
//! What this listener answers, to a request line that names a port (`agent-send "8080\n"`:
//! the node's port) or a port and a pod's address (`agent-send "8080 10.0.3.7\n"`: that
//! pod's port, in the namespace the address belongs to):
//!
//! | request | answer | effect in HAProxy |
//! |---|---|---|
//! | a scope a drain covers (its own, or the node's whole port) | `drain\n` | the server leaves the load-balancing farm (DRAIN) |
//! | a scope no drain covers (another pod's drain does not) | `ready\n` | the server's DRAIN or MAINT state is cancelled |
//! | anything else | `invalid-request\n` | nothing (logged as "agent reports an error") |
//!
//! A request is one line, `\r` or `\n` ended (or ended by the connection's end of input):
//! optional blanks, a decimal port `1..=65535` (digits only), optionally blanks and one IPv4
//! or IPv6 address a connection can have (not `0.0.0.0`, `::`, multicast or broadcast),
//! optional blanks. Why a bad
//! request answers neither `ready` nor `drain`: `drain` would take a server out because of
//! a typo in `agent-send`, and `ready` would put back a server that something else (this
//! agent before a restart, or an operator) set to DRAIN or MAINT — HAProxy keeps one forced
//! DRAIN and one forced MAINT flag per server, shared by the agent and the runtime API
//! (`set server … state`), and `ready` clears both. An unknown word is the one answer that
//! changes nothing and still shows in HAProxy's stats (`last_agt`).
//!
//! The same sharing is why `ready` for a port that is not draining is a choice with a
//! consequence: with `agent-check` on a server line, this agent owns that server's
//! administrative state, and a `set server … state maint` (or `drain`) through the runtime
//! API is undone at the next check (within `agent-inter`; HAProxy 2.6 even shows a runtime-API
//! DRAIN as `DRAIN (agent)`). Take such servers out with `disable agent` first, or let the
//! drain registry say `drain`. Only an agent's `ready` can undo its `drain` (HAProxy's manual
//! says so), so answering nothing when not draining would leave drained servers out forever.
//! `tests/agent_check.rs` shows each of these against a real HAProxy.
//!
//! Bounds: at most [`Limits::max_connections`] connections at once. At the cap, a new
//! connection takes the place of the *oldest one already answered* (its answer written and
//! our end of input sent, waiting up to [`LINGER`] for the client's close: HAProxy closes as
//! soon as it has read the line, so that is a client that neither reads nor closes, and
//! closing it loses nothing of the answer), else of the *oldest one still waiting for its
//! request* (HAProxy sends its `agent-send` at once, so that is an idle or hostile client),
//! which is closed unanswered (no change in HAProxy); only when every connection is being
//! answered (its request read, its answer not yet written) does the listener stop accepting
//! until one ends, so new checks wait in the kernel's backlog instead of being refused, and
//! clients that send a request and hold the connection open cannot keep a check waiting
//! there past HAProxy's `timeout check`; the request must arrive within
//! [`Limits::read_timeout`] (counted once for the whole request, not per read) and fit in
//! [`MAX_REQUEST`] bytes; the answer must be written within [`Limits::write_timeout`]. A request
//! that is not `\n`-ended is answered when the read timeout ends it, which is later than
//! HAProxy's check timeout (`agent-inter` when `timeout check` is not set) when that is short:
//! put the `\n` in `agent-send`. Once `shutdown` resolves the listener closes; connections in
//! progress get their (bounded) time to finish, then `serve` returns.

use std::{
    future::Future,
    io,
    net::{IpAddr, Shutdown, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use log::debug;
use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinSet},
    time::Instant,
};

use crate::{addr::connection_addr, drain::PortGate, http::server::Acceptor};

/// The longest request line read, line end included; a longer one is invalid.
pub const MAX_REQUEST: usize = 64;

/// After the answer, how long unread input is drained before the socket is closed (closing
/// with unread input would send a reset, which could reach HAProxy before the answer is read).
const LINGER: Duration = Duration::from_millis(500);

/// What the listener allows its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; at the cap the oldest already answered makes room, else
    /// the oldest still waiting for its request.
    pub max_connections: usize,
    /// The whole request must arrive within this long after the connection is accepted.
    pub read_timeout: Duration,
    /// The answer must be written within this long.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            read_timeout: Duration::from_millis(500),
            write_timeout: Duration::from_secs(1),
        }
    }
}

impl Limits {
    /// The descriptors the listener may hold: its connections and its own socket. The pod
    /// listeners' budget leaves them out of the open-file limit when there is one
    /// (`http::pods::listener_budget`).
    pub fn descriptors(&self) -> u64 {
        u64::try_from(self.max_connections)
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }
}

/// The answer to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The port is not draining: `ready` (cancels DRAIN and MAINT).
    Ready,
    /// The port is draining: `drain`.
    Drain,
    /// The request named no valid port: a word HAProxy does not know (changes nothing).
    Invalid,
}

impl Reply {
    /// The line sent to HAProxy.
    pub fn line(self) -> &'static [u8] {
        match self {
            Self::Ready => b"ready\n",
            Self::Drain => b"drain\n",
            Self::Invalid => b"invalid-request\n",
        }
    }
}

/// The scope a request names: the bytes before the first `\r` or `\n` (all of them if
/// there is none), blanks around, then 1 to 5 ASCII digits making `1..=65535`, optionally
/// followed by blanks and one IPv4 or IPv6 address (`agent-send "8080 10.0.3.7\n"`: that
/// pod's port) that a connection can have (not `0.0.0.0`, `::`, multicast or broadcast:
/// `/health`'s `addr=` refuses the same).
pub fn parse_request(request: &[u8]) -> Option<(u16, Option<IpAddr>)> {
    let line = request
        .split(|byte| *byte == b'\r' || *byte == b'\n')
        .next()
        .unwrap_or_default();
    let line = std::str::from_utf8(line.trim_ascii()).ok()?;
    let mut words = line.split([' ', '\t']).filter(|word| !word.is_empty());
    let port = words.next()?;
    let addr = words.next();
    if words.next().is_some() || port.len() > 5 || !port.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    let addr = match addr {
        None => None,
        Some(text) => Some(
            text.parse::<IpAddr>()
                .ok()
                .filter(|addr| connection_addr(*addr).is_ok())?,
        ),
    };
    (port != 0).then_some((port, addr))
}

/// The answer to `request` (the bytes received) with `gate`.
pub async fn reply_for(request: &[u8], gate: &dyn PortGate) -> Reply {
    match parse_request(request) {
        Some((port, addr)) if gate.draining(port, addr).await => Reply::Drain,
        Some(_) => Reply::Ready,
        None => Reply::Invalid,
    }
}

/// Serves the agent-check protocol on `listener` with the default [`Limits`] until `shutdown`
/// resolves.
pub async fn serve(
    listener: TcpListener,
    gate: Arc<dyn PortGate>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    serve_with(listener, gate, Limits::default(), shutdown).await
}

/// [`serve`] on a task of its own until `stop` resolves (the agent's stop reached
/// `HandingOver`: the checks queued on this listener then move to the next agent's, as the
/// HTTP API's do); a failure is logged (the HTTP API goes on without the agent-check).
pub fn spawn(
    listener: TcpListener,
    gate: Arc<dyn PortGate>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(problem) = serve(listener, gate, stop).await {
            log::warn!("the agent-check listener failed: {problem:#}");
        }
    })
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    listener: TcpListener,
    gate: Arc<dyn PortGate>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    ensure!(
        limits.max_connections > 0,
        "agent-check: max_connections must be at least 1"
    );
    let open = Arc::new(Open::default());
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut acceptor = Acceptor::default();
    'serve: loop {
        // Full of connections being answered: leave new ones in the backlog (they end within
        // the write timeout). A stop ends the serving (a completed `shutdown` must not be
        // polled again by the accept below). Room is made here, before the accept, and the
        // open connections only decrease until the `add` below: the accepted one always has
        // its place, and is answered even if a stop comes meanwhile.
        while !open.make_room(limits.max_connections) {
            tokio::select! {
                biased;
                () = shutdown.as_mut() => break 'serve,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let accepted = acceptor
            .next(&listener, shutdown.as_mut(), || {
                "agent-check: cannot accept connections".to_owned()
            })
            .await;
        while tasks.try_join_next().is_some() {}
        let Some((stream, peer)) = accepted else {
            break;
        };
        debug!("agent-check: {peer}: accepted");
        let gate = Arc::clone(&gate);
        let phase = Arc::new(AtomicU8::new(Phase::Reading as u8));
        let (id, guard) = open.add(Arc::clone(&phase));
        let abort = tasks.spawn(async move {
            let _guard = guard;
            if let Err(problem) = answer(stream, peer, gate.as_ref(), limits, &phase).await {
                debug!("agent-check: {peer}: {problem:#}");
            }
        });
        open.set_abort(id, abort);
    }
    drop(listener);
    // Every connection ends by itself within its timeouts and the linger; wait that long.
    let bound = limits.read_timeout + limits.write_timeout + LINGER;
    let finished =
        tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    Ok(())
}

/// Where a connection is in its exchange, which says whether it may make room for a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Waiting for its request: closed to make room once [`CONNECT_GRACE`] has passed.
    Reading = 0,
    /// Its request read, its answer being found and written: never closed to make room.
    Answering = 1,
    /// Its answer written and our end of input sent, lingering for the client's close:
    /// closed first to make room (nothing of the answer is lost).
    Answered = 2,
}

impl Phase {
    fn load(phase: &AtomicU8) -> Self {
        match phase.load(Ordering::Acquire) {
            0 => Self::Reading,
            1 => Self::Answering,
            _ => Self::Answered,
        }
    }

    fn store(self, phase: &AtomicU8) {
        phase.store(self as u8, Ordering::Release);
    }
}

/// The open connections, oldest first, and the [`Phase`] of each.
#[derive(Default)]
struct Open {
    map: std::sync::Mutex<OpenMap>,
}

#[derive(Default)]
struct OpenMap {
    next_id: u64,
    connections: std::collections::BTreeMap<u64, Connection>,
}

struct Connection {
    phase: Arc<AtomicU8>,
    abort: Option<AbortHandle>,
    accepted: std::time::Instant,
}

/// A connection accepted this recently is not evicted even if its request has not been read:
/// a check writes its request right after it connects, and the agent may accept it first
/// (under load a real check was closed unanswered so, evicted to make room for the next).
const CONNECT_GRACE: Duration = Duration::from_millis(250);

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpenMap> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether one more connection fits under `cap`, closing if needed the oldest one
    /// already answered, else the oldest one still waiting for its request (and accepted at
    /// least [`CONNECT_GRACE`] ago).
    fn make_room(&self, cap: usize) -> bool {
        let victim = {
            let mut map = self.lock();
            if map.connections.len() < cap {
                return true;
            }
            let closable = |wanted: Phase| {
                map.connections
                    .iter()
                    .find(|(_, open)| {
                        open.abort.is_some()
                            && Phase::load(&open.phase) == wanted
                            && (wanted != Phase::Reading
                                || open.accepted.elapsed() >= CONNECT_GRACE)
                    })
                    .map(|(id, _)| *id)
            };
            let Some(id) = closable(Phase::Answered).or_else(|| closable(Phase::Reading)) else {
                return false;
            };
            map.connections.remove(&id)
        };
        if let Some(abort) = victim.and_then(|victim| victim.abort) {
            // Dropping the connection's future closes its socket: unanswered if it was still
            // reading; if answered, the answer and our end of input were sent already.
            abort.abort();
        }
        true
    }

    fn add(self: &Arc<Self>, phase: Arc<AtomicU8>) -> (u64, OpenGuard) {
        let mut map = self.lock();
        let id = map.next_id;
        map.next_id += 1;
        map.connections.insert(
            id,
            Connection {
                phase,
                abort: None,
                accepted: std::time::Instant::now(),
            },
        );
        (
            id,
            OpenGuard {
                open: Arc::clone(self),
                id,
            },
        )
    }

    fn set_abort(&self, id: u64, abort: AbortHandle) {
        if let Some(connection) = self.lock().connections.get_mut(&id) {
            connection.abort = Some(abort);
        }
    }
}

/// Removes a connection from [`Open`] when its task ends or is aborted.
struct OpenGuard {
    open: Arc<Open>,
    id: u64,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.open.lock().connections.remove(&self.id);
    }
}

/// One connection: read the request, answer, close cleanly.
async fn answer(
    stream: TcpStream,
    peer: SocketAddr,
    gate: &dyn PortGate,
    limits: Limits,
    phase: &AtomicU8,
) -> Result<()> {
    let request = read_request(&stream, limits.read_timeout).await?;
    // Answering now: not closed to make room for a new connection until answered.
    Phase::Answering.store(phase);
    let reply = reply_for(&request, gate).await;
    if reply == Reply::Invalid {
        debug!(
            "agent-check: {peer}: invalid request {:?}, answered {:?}",
            String::from_utf8_lossy(&request),
            reply
        );
    }
    tokio::time::timeout(limits.write_timeout, write_all(&stream, reply.line()))
        .await
        .context("answer not written in time")?
        .context("write the answer")?;
    close(stream, phase).await
}

/// Reads until a line end, the end of input, [`MAX_REQUEST`] bytes or the deadline, and
/// returns what arrived (possibly nothing: the answer is then `invalid-request`).
async fn read_request(stream: &TcpStream, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut request = Vec::with_capacity(MAX_REQUEST);
    let mut chunk = [0_u8; MAX_REQUEST];
    while request.len() < MAX_REQUEST
        && !request.iter().any(|byte| *byte == b'\n' || *byte == b'\r')
    {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_elapsed) => break,
            Ok(ready) => ready.context("wait for the request")?,
        }
        let room = MAX_REQUEST - request.len();
        match stream.try_read(&mut chunk[..room]) {
            Ok(0) => break,
            Ok(read) => request.extend_from_slice(&chunk[..read]),
            Err(problem) if problem.kind() == io::ErrorKind::WouldBlock => {}
            Err(problem) => return Err(problem).context("read the request"),
        }
    }
    Ok(request)
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(problem) if problem.kind() == io::ErrorKind::WouldBlock => {}
            Err(problem) => return Err(problem),
        }
    }
    Ok(())
}

/// Sends our end of input (FIN), then reads and drops what the peer still sends until it
/// closes or [`LINGER`] passes, so the close does not turn into a reset. Meanwhile the
/// connection is the first closed to make room for a new one ([`Phase::Answered`]).
async fn close(stream: TcpStream, phase: &AtomicU8) -> Result<()> {
    let stream = stream.into_std().context("take the socket")?;
    stream
        .shutdown(Shutdown::Write)
        .context("shut down the write side")?;
    Phase::Answered.store(phase);
    let stream = TcpStream::from_std(stream).context("give the socket back")?;
    let deadline = Instant::now() + LINGER;
    let mut sink = [0_u8; 512];
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_elapsed) => return Ok(()),
            Ok(ready) => ready.context("wait for the peer's close")?,
        }
        match stream.try_read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(problem) if problem.kind() == io::ErrorKind::WouldBlock => {}
            // A reset after our answer: nothing left to do.
            Err(_) => return Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]
mod tests {
    use std::{
        collections::HashSet,
        io::{Read as _, Write as _},
        sync::{Mutex, atomic::AtomicBool},
    };

    use tokio::sync::oneshot;

    use super::*;

    /// A gate whose draining ports the test sets.
    #[derive(Default)]
    struct FakeGate(Mutex<HashSet<u16>>);

    impl FakeGate {
        fn set(&self, port: u16, draining: bool) {
            let mut ports = self.0.lock().unwrap();
            if draining {
                ports.insert(port);
            } else {
                ports.remove(&port);
            }
        }
    }

    impl PortGate for FakeGate {
        fn draining(
            &self,
            port: u16,
            addr: Option<IpAddr>,
        ) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>> {
            // The fake gates whole ports, and no address-scoped question.
            let draining = addr.is_none() && self.0.lock().unwrap().contains(&port);
            Box::pin(async move { draining })
        }
    }

    #[test]
    fn requests_name_a_port_or_are_invalid() {
        for (request, port) in [
            (&b"8080\n"[..], Some((8080, None))),
            (b"8080\r\n", Some((8080, None))),
            (b"8080", Some((8080, None))),
            (b"  443\t\n", Some((443, None))),
            (b"1\n", Some((1, None))),
            (b"65535\n", Some((65535, None))),
            (b"8080\nmore", Some((8080, None))),
            (
                b"8080 10.0.3.7\n",
                Some((8080, Some(IpAddr::from([10, 0, 3, 7])))),
            ),
            (
                b"8080\tfd00::7\n",
                Some((8080, Some("fd00::7".parse().unwrap()))),
            ),
            // No connection has these as its local address (as /health's addr=).
            (b"8080 0.0.0.0\n", None),
            (b"8080 ::\n", None),
            (b"8080 224.0.0.1\n", None),
            (b"8080 255.255.255.255\n", None),
            (b"8080 ff02::1\n", None),
            (b"8080 10.0.3.7 x\n", None),
            (b"8080 10.0.3\n", None),
            (b"", None),
            (b"\n", None),
            (b"0\n", None),
            (b"00000\n", None),
            (b"65536\n", None),
            (b"99999\n", None),
            (b"123456\n", None),
            (b"+8080\n", None),
            (b"-1\n", None),
            (b"8080 8081\n", None),
            (b"8080,10.0.3.7\n", None),
            (b"port=8080\n", None),
            (b"be/s1\n", None),
            (b"80\x0080\n", None),
            (b"\xff\xfe\n", None),
        ] {
            assert_eq!(
                parse_request(request),
                port,
                "{:?}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[tokio::test]
    async fn answers_follow_the_gate_and_bad_requests_change_nothing() {
        let gate = FakeGate::default();
        assert_eq!(reply_for(b"8080\n", &gate).await, Reply::Ready);
        gate.set(8080, true);
        assert_eq!(reply_for(b"8080\n", &gate).await, Reply::Drain);
        assert_eq!(reply_for(b"8080 10.0.3.7\n", &gate).await, Reply::Ready);
        assert_eq!(reply_for(b"8081\n", &gate).await, Reply::Ready);
        assert_eq!(reply_for(b"nonsense\n", &gate).await, Reply::Invalid);
        gate.set(8080, false);
        assert_eq!(reply_for(b"8080\n", &gate).await, Reply::Ready);

        // The invalid answer is one word HAProxy does not know: not one it acts on
        // (up, down, fail, stopped, ready, drain, maint, N%, maxconn:N), and no separator
        // (space, tab, comma) that would make it several words.
        let line = std::str::from_utf8(Reply::Invalid.line()).unwrap();
        let word = line.strip_suffix('\n').unwrap();
        assert!(!word.contains([' ', '\t', ',', '\r', '\n', '#']));
        let known = ["up", "down", "fail", "stopped", "ready", "drain", "maint"];
        assert!(!known.iter().any(|k| word.eq_ignore_ascii_case(k)));
        assert!(!word.starts_with(|c: char| c.is_ascii_digit()));
        assert!(!word.to_ascii_lowercase().starts_with("maxconn:"));
        for reply in [Reply::Ready, Reply::Drain, Reply::Invalid] {
            assert!(reply.line().ends_with(b"\n") && reply.line().is_ascii());
        }
    }

    struct Running {
        address: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<()>>,
    }

    async fn start(gate: Arc<FakeGate>, limits: Limits) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(listener, gate, limits, async {
            let _ = stopped.await;
        }));
        Running {
            address,
            stop: Some(stop),
            task,
        }
    }

    impl Running {
        async fn stop(mut self) -> Duration {
            let started = std::time::Instant::now();
            let _ = self.stop.take().unwrap().send(());
            self.task.await.unwrap().unwrap();
            started.elapsed()
        }
    }

    /// One exchange from a blocking client (on a blocking thread): what came back, whole.
    async fn exchange(address: SocketAddr, request: &'static [u8], close_write: bool) -> Vec<u8> {
        try_exchange(address, request, close_write).await.unwrap()
    }

    /// [`exchange`], with the client's errors returned.
    async fn try_exchange(
        address: SocketAddr,
        request: &'static [u8],
        close_write: bool,
    ) -> std::io::Result<Vec<u8>> {
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(address)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request)?;
            if close_write {
                stream.shutdown(Shutdown::Write)?;
            }
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer)?;
            Ok(answer)
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_the_gate_over_tcp() {
        let gate = Arc::new(FakeGate::default());
        let running = start(Arc::clone(&gate), Limits::default()).await;
        let address = running.address;
        assert_eq!(exchange(address, b"8080\n", false).await, b"ready\n");
        gate.set(8080, true);
        assert_eq!(exchange(address, b"8080\n", false).await, b"drain\n");
        assert_eq!(exchange(address, b"8080\r\n", false).await, b"drain\n");
        assert_eq!(exchange(address, b"9090\n", false).await, b"ready\n");
        // No line end, but the end of input: answered at once.
        assert_eq!(exchange(address, b"8080", true).await, b"drain\n");
        assert_eq!(
            exchange(address, b"what\n", false).await,
            b"invalid-request\n"
        );
        assert_eq!(exchange(address, b"", true).await, b"invalid-request\n");
        // Longer than MAX_REQUEST with no line end: invalid, answered without waiting.
        let long: &'static [u8] = &[b'1'; MAX_REQUEST * 2];
        let started = std::time::Instant::now();
        assert_eq!(exchange(address, long, false).await, b"invalid-request\n");
        assert!(started.elapsed() < Duration::from_millis(400));
        gate.set(8080, false);
        assert_eq!(exchange(address, b"8080\n", false).await, b"ready\n");
        assert!(running.stop().await < Duration::from_secs(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_client_is_answered_invalid_after_the_read_timeout() {
        let limits = Limits {
            read_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let running = start(Arc::new(FakeGate::default()), limits).await;
        let started = std::time::Instant::now();
        assert_eq!(
            exchange(running.address, b"", false).await,
            b"invalid-request\n"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // A request without a line end that never ends: answered from what arrived.
        assert_eq!(exchange(running.address, b"8080", false).await, b"ready\n");
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_cap_a_check_replaces_the_oldest_silent_connection() {
        let limits = Limits {
            max_connections: 2,
            read_timeout: Duration::from_secs(3),
            ..Limits::default()
        };
        let running = start(Arc::new(FakeGate::default()), limits).await;
        let address = running.address;
        // Two silent connections hold both places (issue 23: 70 idle connections made 18 of
        // 20 real checks end with a reset or nothing).
        let silent: Vec<std::net::TcpStream> = (0..2)
            .map(|_| std::net::TcpStream::connect(address).unwrap())
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Real checks are answered, each taking the place of the oldest silent one.
        for _ in 0..3 {
            let answer =
                tokio::time::timeout(Duration::from_secs(2), exchange(address, b"8080\n", false))
                    .await
                    .expect("answered in time");
            assert_eq!(answer, b"ready\n");
        }
        // The silent ones were closed unanswered (no change in HAProxy).
        for mut stream in silent {
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            assert_eq!(answer, b"", "a silent connection gets no answer");
        }
        running.stop().await;
    }

    /// Clients that send a request and then neither read nor close cannot keep every place
    /// lingering (the answer written, waiting for the client's close): a real check is served
    /// at once instead of waiting in the backlog behind theirs, past HAProxy's `timeout check`
    /// (a `drain` that never reached HAProxy).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_that_never_close_do_not_hold_back_a_check() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let running = start(Arc::new(FakeGate::default()), limits).await;
        let address = running.address;
        let stop = Arc::new(AtomicBool::new(false));
        // Two clients, each opening a connection every 400 ms that sends its request and
        // stays open, unread, for longer than the linger.
        let holders: Vec<_> = (0..2_u64)
            .map(|client| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(200 * client));
                    let mut held = std::collections::VecDeque::new();
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(mut stream) = std::net::TcpStream::connect(address) {
                            let _ = stream.write_all(b"8080\n");
                            held.push_back(stream);
                        }
                        if held.len() > 3 {
                            held.pop_front();
                        }
                        std::thread::sleep(Duration::from_millis(400));
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut took = Vec::new();
        for _ in 0..5 {
            let started = std::time::Instant::now();
            assert_eq!(exchange(address, b"8080\n", false).await, b"ready\n");
            took.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for holder in holders {
            holder.join().unwrap();
        }
        assert!(
            took.iter().all(|took| *took < Duration::from_millis(300)),
            "{took:?}"
        );
        running.stop().await;
    }

    /// A gate that says "draining" once the test releases it, telling the test when asked.
    #[derive(Default)]
    struct HeldGate {
        asked: tokio::sync::Notify,
        release: tokio::sync::Notify,
    }

    impl PortGate for HeldGate {
        fn draining(
            &self,
            _port: u16,
            _addr: Option<IpAddr>,
        ) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>> {
            Box::pin(async move {
                self.asked.notify_one();
                self.release.notified().await;
                true
            })
        }
    }

    /// A check accepted (its request read) before the stop gets its answer, what the gate
    /// says then, not a reset from a socket closed with its request unread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_accepted_before_the_stop_is_answered() {
        let gate = Arc::new(HeldGate::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let task = tokio::spawn(serve_with(
            listener,
            Arc::clone(&gate) as Arc<dyn PortGate>,
            limits,
            async {
                let _ = stopped.await;
            },
        ));
        let check = tokio::spawn(try_exchange(address, b"8080\n", false));
        gate.asked.notified().await;
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        gate.release.notify_one();
        assert_eq!(check.await.unwrap().unwrap(), b"drain\n");
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_closes_the_listener_and_is_bounded() {
        let limits = Limits {
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let running = start(Arc::new(FakeGate::default()), limits).await;
        let address = running.address;
        // A silent connection in progress when shutdown begins.
        let silent = std::net::TcpStream::connect(address).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let took = running.stop().await;
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(std::net::TcpStream::connect(address).is_err());
        drop(silent);
    }

    #[tokio::test]
    async fn zero_connections_is_a_configuration_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = Limits {
            max_connections: 0,
            ..Limits::default()
        };
        let result = serve_with(listener, Arc::new(FakeGate::default()), limits, async {}).await;
        assert!(result.is_err());
    }
}
