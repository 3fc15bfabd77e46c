//! Helpers shared by the kernel and end-to-end tests: privilege checks, the real agent
//! binary, processes ([`child`]), deployment files ([`deploy`]), HTTP ([`http`]), a real
//! Prometheus ([`prometheus`]), temporary directories, network namespaces. Each test binary
//! uses a different subset.
#![allow(
    dead_code,
    reason = "each test binary uses its own subset of these helpers"
)]

pub mod child;
pub mod deploy;
pub mod http;
pub mod pod;
pub mod prometheus;
pub mod ss;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use child::Guard;
use drain_agent::cli::client::AgentUrl;

/// The running kernel's release, as `/proc/sys/kernel/osrelease` says it, and its
/// `(major, minor)` (zeros where it cannot be read).
pub fn kernel_version() -> (String, (u32, u32)) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim().to_owned();
    // The agent's own reading of a release.
    let version = drain_agent::kernel::version::parse_release(&release)
        .unwrap_or(drain_agent::kernel::version::UNKNOWN);
    (release, version)
}

/// The kernel side loaded in-process with small maps (4,096 sockets, 1,024 endpoints),
/// attached by `attach` (the agent's choice with `None`), seeding or not.
pub fn small_kernel(
    attach: Option<drain_agent::kernel::AttachMethod>,
    no_seed: bool,
) -> drain_agent::kernel::Kernel {
    drain_agent::kernel::Kernel::load(&drain_agent::kernel::KernelOptions {
        max_connections: 4_096,
        max_endpoints: 1_024,
        attach,
        no_seed,
        preallocate_sockets: false,
        pod_port: 0,
        pin_dir: None,
    })
    .expect("load the kernel side")
}

/// Whether kernel tests can run here. When they cannot: with `DRAIN_AGENT_REQUIRE_KERNEL=1`
/// (CI) the test fails; otherwise it reports a SKIP (see [`report_skip`]) and the caller
/// returns.
pub fn kernel_available(test: &str) -> bool {
    let required = std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    if root && btf {
        return true;
    }
    let why = if root {
        "the kernel has no BTF"
    } else {
        "not running as root"
    };
    assert!(
        !required,
        "{test}: kernel test cannot run ({why}) and DRAIN_AGENT_REQUIRE_KERNEL=1"
    );
    report_skip(
        test,
        &format!(
            "kernel test cannot run ({why}); set DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead"
        ),
    );
    false
}

/// Prints `SKIP <test>: <why>` on a line of its own, to the process's standard output
/// itself rather than through `println!`: libtest captures `println!` of passing tests, and
/// a skipped test passes — written past the capture, the line shows in every run, and
/// `cargo xtask test` counts it as skipped instead of passed.
pub fn report_skip(test: &str, why: &str) {
    let mut out = std::io::stdout().lock();
    // With one test thread libtest has written `test NAME ... ` on this line already:
    // `cargo xtask test` finds the SKIP there too.
    let _ = writeln!(out, "SKIP {test}: {why}");
    let _ = out.flush();
}

/// Polls `ready` every 20 ms until it holds; fails the test after `limit`, naming `what`.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temporary directory whose name starts with `prefix`, removed on drop.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory")
}

/// Gives an agent started by `command` a state directory of its own
/// (`DRAIN_AGENT_STATE_DIR`; the default, /run/drain-agent, would be shared by every test's
/// agent): keep the returned directory as long as the agent runs (`Guard::keep`).
pub fn private_state(command: &mut Command) -> tempfile::TempDir {
    let dir = temp_dir("da-state-");
    command.env("DRAIN_AGENT_STATE_DIR", dir.path());
    dir
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// When a start returns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ready {
    /// `/healthz` answers 200.
    Serving,
    /// … and the seeding walk has ended.
    Seeded,
}

/// The real agent binary, started as users start it; stopped and reaped on drop.
pub struct Agent {
    process: Guard,
    /// The agent's own `--state-dir` (`DRAIN_AGENT_STATE_DIR`), unless the test gave one:
    /// agents of tests running in parallel never share saved drains by accident.
    _state_dir: Option<tempfile::TempDir>,
    pub port: u16,
    pub url: String,
    pub log: Arc<Mutex<Vec<String>>>,
    /// The agent's own pin directory, removed after the agent is stopped (fields drop in
    /// order: `process` first).
    _pins: Option<PinDir>,
}

/// A pin directory under bpffs of the test's own (`--pin-dir`), removed on drop: removing
/// it unpins the maps and detaches a handler no agent holds any more. Tests run in parallel
/// on one kernel, so each agent gets its own unless a test shares one on purpose.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            path: PathBuf::from(format!(
                "/sys/fs/bpf/drain-agent-test-{}-{n}",
                std::process::id()
            )),
        }
    }

    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether `binary` has `--pin-dir` (an older build, `DRAIN_AGENT_TEST_BINARY`, has not).
fn knows_pin_dir(binary: &std::path::Path) -> bool {
    static KNOWN: Mutex<Vec<(PathBuf, bool)>> = Mutex::new(Vec::new());
    let mut known = KNOWN.lock().expect("known binaries");
    if let Some((_, knows)) = known.iter().find(|(path, _)| path == binary) {
        return *knows;
    }
    let knows = Command::new(binary)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("--pin-dir"));
    known.push((binary.to_path_buf(), knows));
    knows
}

/// The agent binary under test: this build's, or `DRAIN_AGENT_TEST_BINARY` (to show that a
/// test fails against an older build).
pub fn agent_binary() -> PathBuf {
    std::env::var_os("DRAIN_AGENT_TEST_BINARY").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_drain-agent")),
        PathBuf::from,
    )
}

/// `target/dist`, where `cargo xtask dist` puts what it builds: beside the directory of the
/// test build (`target/debug`), wherever CARGO_TARGET_DIR put it.
pub fn dist_dir() -> PathBuf {
    agent_binary()
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the agent binary is in target/<profile>/")
        .join("dist")
}

/// The static binary `cargo xtask dist` built, when it is there. When it is not: with
/// `DRAIN_AGENT_REQUIRE_KERNEL=1` (CI, where `cargo xtask test` builds it first) the test
/// fails; otherwise it prints a loud SKIP.
pub fn dist_binary(test: &str) -> Option<PathBuf> {
    let binary = dist_dir().join("x86_64-unknown-linux-musl/drain-agent");
    if binary.is_file() {
        return Some(binary);
    }
    let required = std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: {} is missing (`cargo xtask dist` builds it) and DRAIN_AGENT_REQUIRE_KERNEL=1",
        binary.display()
    );
    report_skip(
        test,
        &format!(
            "{} is missing; run `cargo xtask dist` (set DRAIN_AGENT_REQUIRE_KERNEL=1 to fail instead)",
            binary.display()
        ),
    );
    None
}

impl Agent {
    /// Starts `drain-agent run --listen 127.0.0.1:<free port> <extra>` and waits for /healthz.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_binary_on_a_free_port(&agent_binary(), extra)
    }

    /// Starts the agent on a given loopback port.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        Self::start_binary(&agent_binary(), port, extra)
    }

    /// Starts another build of the agent (the static one of `cargo xtask dist`) on a given
    /// loopback port.
    pub fn start_binary(binary: &std::path::Path, port: u16, extra: &[&str]) -> Self {
        Self::spawn(binary, port, extra, None, Ready::Seeded).unwrap_or_else(|why| panic!("{why}"))
    }

    /// Starts the agent on a free port with `state_dir` as its state directory (set through
    /// `DRAIN_AGENT_STATE_DIR`, which builds without the flag ignore): agents started one
    /// after the other with the same directory share their saved drains.
    pub fn start_with_state_dir(state_dir: &std::path::Path, extra: &[&str]) -> Self {
        Self::spawn(
            &agent_binary(),
            free_port(),
            extra,
            Some(state_dir),
            Ready::Seeded,
        )
        .unwrap_or_else(|why| panic!("{why}"))
    }

    /// Starts the agent and returns as soon as it serves, while its seeding walk may still
    /// run (`/healthz` `"seeding":true`; every other start waits for the walk's end, so
    /// tests see the counts of connections open before the start).
    pub fn start_serving(extra: &[&str]) -> Self {
        Self::start_on_a_free_port(&agent_binary(), extra, Ready::Serving)
    }

    /// [`Agent::start_serving`] of another build (the shipped one of `cargo xtask dist`).
    pub fn start_binary_serving(binary: &std::path::Path, extra: &[&str]) -> Self {
        Self::start_on_a_free_port(binary, extra, Ready::Serving)
    }

    /// Starts `binary` on a free loopback port. A free port can be taken by another test
    /// between the check and the agent's bind: the agent then exits at once ("Address
    /// already in use"), and another port is tried (five in all).
    pub fn start_binary_on_a_free_port(binary: &std::path::Path, extra: &[&str]) -> Self {
        Self::start_on_a_free_port(binary, extra, Ready::Seeded)
    }

    fn start_on_a_free_port(binary: &std::path::Path, extra: &[&str], ready: Ready) -> Self {
        let mut attempt = 1;
        loop {
            match Self::spawn(binary, free_port(), extra, None, ready) {
                Ok(agent) => return agent,
                Err(why) if attempt < 5 && why.contains("Address already in use") => {
                    attempt += 1;
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    fn spawn(
        binary: &std::path::Path,
        port: u16,
        extra: &[&str],
        state_dir: Option<&std::path::Path>,
        ready: Ready,
    ) -> Result<Self, String> {
        // Each agent pins into a directory of its own, unless the test chose.
        let pins = (!extra
            .iter()
            .any(|arg| arg.starts_with("--pin-dir") || *arg == "--no-pin")
            && knows_pin_dir(binary))
        .then(PinDir::new);
        let own_state = state_dir.is_none().then(|| temp_dir("da-state-"));
        let state_path = state_dir.map_or_else(
            || own_state.as_ref().expect("own state dir").path().to_owned(),
            std::path::Path::to_owned,
        );
        let mut command = Command::new(binary);
        command
            .env("DRAIN_AGENT_STATE_DIR", &state_path)
            .arg("run")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        if let Some(pins) = &pins {
            command.arg("--pin-dir").arg(&pins.path);
        }
        let mut process = Guard::spawn(
            "drain-agent",
            command
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = process.child_mut().stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                sink.lock().expect("log").push(line);
            }
        });
        let mut agent = Self {
            process,
            _state_dir: own_state,
            port,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _pins: pins,
        };
        match agent.wait_healthy(Duration::from_secs(30), ready) {
            Ok(()) => Ok(agent),
            Err(exited) => {
                if exited {
                    // The whole log: the reader ends with the agent's stderr.
                    let _ = reader.join();
                }
                Err(format!(
                    "agent not healthy{}; log:\n{}",
                    if exited {
                        " (it exited)"
                    } else {
                        " after 30 s"
                    },
                    agent.log.lock().expect("log").join("\n")
                ))
            }
        }
    }

    /// Waits for `/healthz` to answer 200 (and for the seeding walk's end unless `ready` is
    /// [`Ready::Serving`]); `Err(true)` when the agent exited first,
    /// `Err(false)` after `limit`.
    fn wait_healthy(&mut self, limit: Duration, ready: Ready) -> Result<(), bool> {
        let started = Instant::now();
        loop {
            if matches!(self.process.child_mut().try_wait(), Ok(Some(_))) {
                return Err(true);
            }
            // A short deadline: whoever holds the port when the agent could not bind it may
            // accept and never answer.
            if let Ok((200, body)) = AgentUrl::parse(&self.url)
                .and_then(|url| http::get_url(&url, "/healthz", Duration::from_secs(1)))
            {
                // Serving; and, unless only that was asked for, done counting what was open
                // before the start (the seeding walk runs beside the serving agent).
                let seeding = serde_json::from_str::<serde_json::Value>(&body)
                    .is_ok_and(|body| body["seeding"] == true);
                if !seeding || ready == Ready::Serving {
                    return Ok(());
                }
            }
            if started.elapsed() >= limit {
                return Err(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn try_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http::get_url(&AgentUrl::parse(&self.url)?, path, Duration::from_secs(120))
    }

    /// GET `path`; the body parsed as JSON.
    pub fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.try_get(path).expect("agent answers");
        let json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: body is not JSON ({e}): {body}"));
        (status, json)
    }

    /// Active connections on `port` now (`/drained?port=P&timeout=0`).
    pub fn active(&self, port: u16) -> u64 {
        let (_, body) = self.get_json(&format!("/drained?port={port}&timeout=0"));
        body["active"].as_u64().expect("active is a number")
    }

    /// Polls `active(port)` until it equals `expected` (events reach the maps at once,
    /// but the test's own closes race with its reads) — fails after 10 s.
    pub fn expect_active(&self, port: u16, expected: u64) {
        let started = Instant::now();
        loop {
            let active = self.active(port);
            if active == expected {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "port {port}: active {active}, expected {expected}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of the first `/metrics` sample line starting with `line_start` (a name,
    /// or a name and labels).
    ///
    /// A selector `name{a="x",…}` sums every series of `name` whose labels include those:
    /// the connection metrics carry the local address too (`--metrics-labels address`), and
    /// `name{port="P"}` asks about the port.
    pub fn metric(&self, line_start: &str) -> Option<f64> {
        let (_, body) = self.try_get("/metrics").expect("metrics");
        metric_in(&body, line_start)
    }

    /// Waits (at most 10 s) until `count` `/drained` requests are blocked in the agent
    /// (`drain_agent_drain_waiters`): a waiter started by the test has arrived and waits.
    pub fn wait_for_waiters(&self, count: u64) {
        wait_until(
            &format!("{count} blocked /drained request(s)"),
            Duration::from_secs(10),
            || self.metric("drain_agent_drain_waiters ") == Some(count as f64),
        );
    }

    /// Completed socket walks so far (`drain_agent_walks_total`: seeding and repairs).
    pub fn walks(&self) -> u64 {
        self.metric("drain_agent_walks_total ")
            .expect("drain_agent_walks_total is exported") as u64
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGTERM and returns the exit status; fails if the agent takes over 15 s.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let (status, took) = self.process.stop_within(Duration::from_secs(15));
        status.unwrap_or_else(|| panic!("agent did not exit within {took:?} of SIGTERM"))
    }

    /// Waits up to `limit` for the agent to exit by itself; its exit status, if it did.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait_for(limit)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }
}

/// A loopback listener that accepts and keeps connections until told to close them.
pub struct Server {
    pub port: u16,
    accepted: Arc<Mutex<Vec<TcpStream>>>,
}

impl Server {
    pub fn start(bind: &str) -> Self {
        Self::try_start(bind).expect("bind server")
    }

    /// One server per host, all on one port that is free on every host. The first host's
    /// ephemeral port may be taken on another host (by a test running beside this one): such
    /// a port is given back and another is tried, at most 50 times.
    pub fn start_on_one_port(hosts: &[&str]) -> Vec<Self> {
        for _ in 0..50 {
            let first = Self::start(&format!("{}:0", hosts[0]));
            let port = first.port;
            let rest: std::io::Result<Vec<Self>> = hosts[1..]
                .iter()
                .map(|host| Self::try_start(&format!("{host}:{port}")))
                .collect();
            if let Ok(rest) = rest {
                return std::iter::once(first).chain(rest).collect();
            }
        }
        panic!("no port free on all of {hosts:?} in 50 tries");
    }

    pub fn try_start(bind: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind)?;
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => sink.lock().expect("accepted").push(stream),
                    Err(_) => break,
                }
            }
        });
        Ok(Self { port, accepted })
    }

    /// Accepted connections so far.
    pub fn accepted(&self) -> usize {
        self.accepted.lock().expect("accepted").len()
    }

    pub fn wait_accepted(&self, count: usize) {
        let started = Instant::now();
        while self.accepted() < count {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "server accepted {} of {count}",
                self.accepted()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Closes (drops) every accepted connection.
    pub fn close_all(&self) {
        self.accepted.lock().expect("accepted").clear();
    }

    /// Takes the accepted connections out, for tests that close them one way or another.
    pub fn take_all(&self) -> Vec<TcpStream> {
        std::mem::take(&mut *self.accepted.lock().expect("accepted"))
    }
}

/// A TCP connection to `target` from the local address `source` (bound before connecting):
/// traffic that comes from another address of this host, e.g. a node's probes (127.0.0.2).
pub fn connect_from(
    source: std::net::Ipv4Addr,
    target: std::net::SocketAddrV4,
) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    fn sockaddr(address: std::net::SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: address.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(address.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    }
    let length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket has no preconditions; the descriptor is checked, then owned by `stream`.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        TcpStream::from_raw_fd(fd)
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let local = sockaddr(std::net::SocketAddrV4::new(source, 0));
    // SAFETY: bind on our open socket, with a sockaddr_in of the length given.
    if unsafe { libc::bind(fd, (&raw const local).cast(), length) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let peer = sockaddr(target);
    // SAFETY: connect on our open socket, with a sockaddr_in of the length given.
    if unsafe { libc::connect(fd, (&raw const peer).cast(), length) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// A network namespace made for one test (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

pub fn run(command: &str, args: &[&str]) {
    let output = Command::new(command)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    assert!(
        output.status.success(),
        "{command} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Netns {
    /// A namespace whose name starts with `da-` (so a failed run's leftovers are recognisable).
    pub fn new(tag: &str) -> Self {
        let name = format!("da-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `work` on a thread inside this namespace (sockets it makes live there).
    pub fn run_in<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        drain_agent::sys::netns::run_in_path(std::path::Path::new(&self.path()), move || Ok(work()))
            .expect("run in netns")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The value of `selector` in the Prometheus text `body` (see [`Agent::metric`]).
pub fn metric_in(body: &str, selector: &str) -> Option<f64> {
    let value = |line: &str| line.rsplit(' ').next()?.parse::<f64>().ok();
    let Some((name, wanted)) = selector
        .strip_suffix('}')
        .and_then(|rest| rest.split_once('{'))
    else {
        return body
            .lines()
            .find(|line| line.starts_with(selector))
            .and_then(value);
    };
    let wanted: Vec<&str> = wanted
        .split("\",")
        .map(|pair| pair.trim_end_matches('"'))
        .collect();
    let mut found = None;
    for line in body.lines() {
        let Some(labels) = line
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('{'))
            .and_then(|rest| rest.split_once("} "))
            .map(|(labels, _)| labels)
        else {
            continue;
        };
        let has: Vec<&str> = labels
            .split("\",")
            .map(|pair| pair.trim_end_matches('"'))
            .collect();
        if wanted.iter().all(|pair| has.contains(pair)) {
            *found.get_or_insert(0.0) += value(line)?;
        }
    }
    found
}
