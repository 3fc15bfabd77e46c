//! The agent under test, as users run it (its release binary, as root), and a minimal
//! HTTP/1.1 client for its API: one fresh TCP connection per request, as `curl` in a stop
//! hook makes.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{net, sys};

/// A running agent; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    /// Its state directory (removed when it has stopped).
    state_dir: PathBuf,
    /// Time from spawn to the first healthy `/healthz`.
    pub startup: Duration,
}

/// How to start it.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// `tp-btf`, `tracepoint` or `raw-tracepoint`; `None` lets the agent choose.
    pub attach: Option<&'static str>,
    pub no_seed: bool,
    /// More arguments for `drain-agent run` (`cargo xtask bench --agent-arg …`).
    pub extra: Vec<String>,
}

impl Agent {
    pub fn start(binary: &Path, log_dir: &Path, options: &AgentOptions) -> Result<Self> {
        let addr = free_local_port()?;
        let log = log_dir.join(format!("agent-{}.log", addr.port()));
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let log_err = log_file.try_clone().context("cannot share the agent log")?;
        // Its own state directory: the default, /run/drain-agent, is shared with every other
        // agent on the host, and an agent stops only once it holds that directory's lock (an
        // agent someone left running made every bench agent wait at its stop).
        let state_dir = log_dir.join(format!("state-{}", addr.port()));
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--log-level", "warn"])
            // Nothing pinned (`--pin-dir`): a pinned handler would stay attached after the
            // agent stops and run in the measurements made without an agent. Through the
            // environment, which a `--baseline` build without the flag ignores.
            .env("DRAIN_AGENT_NO_PIN", "true")
            .env("DRAIN_AGENT_STATE_DIR", &state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err));
        if let Some(attach) = options.attach {
            command.args(["--attach", attach]);
        }
        if options.no_seed {
            command.arg("--no-seed");
        }
        command.args(&options.extra);
        let started = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut agent = Self {
            child,
            addr,
            log,
            state_dir,
            startup: Duration::ZERO,
        };
        // Seeding 100k connections takes a moment; a broken agent exits at once.
        let deadline = started + Duration::from_secs(60);
        loop {
            if let Some(status) = agent.child.try_wait().context("cannot watch the agent")? {
                let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
                bail!("the agent exited at start ({status}):\n{log}");
            }
            if let Ok(response) = get(addr, "/healthz", Duration::from_secs(2))
                && response.status == 200
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not become healthy within 60 s (log: {})",
                    agent.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        agent.startup = started.elapsed();
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The BPF programs this agent holds (attached handler and seeding iterator).
    pub fn prog_ids(&self) -> Result<BTreeSet<u32>> {
        sys::prog_ids_of_process(self.pid())
    }

    /// The statistics of this agent's program whose name starts with `prefix`.
    pub fn prog_stats(&self, prefix: &str) -> Result<sys::ProgStats> {
        for id in self.prog_ids()? {
            let stats = sys::prog_stats(id)?;
            if stats.name.starts_with(prefix) {
                return Ok(stats);
            }
        }
        bail!(
            "the agent (pid {}) holds no BPF program named {prefix}…",
            self.pid()
        )
    }

    /// `/drained?port=P&timeout=0`: the active count now.
    pub fn active(&self, port: u16) -> Result<u64> {
        let response = get(
            self.addr,
            &format!("/drained?port={port}&timeout=0"),
            Duration::from_secs(10),
        )?;
        drained_active(&response.body)
    }

    /// The active count summed over `ports`: after every connection to them has closed, it
    /// must be 0 (anything else is a close the agent missed).
    pub fn left_active(&self, ports: &[u16]) -> Result<u64> {
        // Closes on loopback complete inside close(); leave a moment all the same.
        std::thread::sleep(Duration::from_millis(50));
        let mut total = 0;
        for port in ports {
            total += self.active(*port)?;
        }
        Ok(total)
    }

    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        if self.child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: signalling our own child, which has not been reaped (try_wait above).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .child
                .try_wait()
                .context("cannot watch the agent")?
                .is_some()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child.kill().context("cannot kill the agent")?;
        self.child.wait().context("cannot reap the agent")?;
        bail!("the agent did not stop within 10 s of SIGTERM; killed it")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(error) = self.terminate() {
            eprintln!("bench: {error:#}");
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A port nobody listens on now (bound and released; the agent binds it right after).
fn free_local_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    listener.local_addr().context("listener address")
}

// Not `drain_agent::cli::client::get`: depending on drain-agent would build its eBPF object (its build.rs) into every xtask, and the bench needs send-now-read-later waiters, keep-alive and RST closes that `get` has not.

/// An HTTP response: status and body.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// A request sent, its answer not read yet (a `/drained` waiter).
pub struct Pending {
    stream: TcpStream,
}

/// Sends `GET path` on a fresh connection.
pub fn send(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Pending> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to the agent at {addr}"))?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    stream
        .set_read_timeout(Some(timeout))
        .context("read timeout")?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("cannot send GET {path}"))?;
    Ok(Pending { stream })
}

impl Pending {
    /// Reads the whole response, then resets the connection (no TIME_WAIT left behind).
    pub fn finish(mut self) -> Result<Response> {
        let mut buffer = Vec::with_capacity(4096);
        let mut chunk = [0u8; 65536];
        let mut header_end = None;
        let mut content_length = None;
        loop {
            let read = self
                .stream
                .read(&mut chunk)
                .context("cannot read the agent's answer")?;
            if read == 0 {
                break;
            }
            buffer.extend_from_slice(&chunk[..read]);
            if header_end.is_none()
                && let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n")
            {
                header_end = Some(end + 4);
                let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                content_length = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|value| value.trim().parse::<usize>().ok());
            }
            if let (Some(end), Some(length)) = (header_end, content_length)
                && buffer.len() >= end + length
            {
                break;
            }
        }
        net::reset_on_close(&self.stream);
        let end = header_end.context("the agent's answer has no complete header")?;
        let status_line = String::from_utf8_lossy(&buffer[..end]);
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .context("the agent's answer has no status code")?;
        Ok(Response {
            status,
            body: String::from_utf8_lossy(&buffer[end..]).into_owned(),
        })
    }
}

/// A persistent HTTP/1.1 connection (keep-alive), for timing the agent's answer without a
/// TCP handshake per request.
pub struct KeepAlive {
    stream: TcpStream,
    host: SocketAddr,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("cannot connect to the agent at {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .context("read timeout")?;
        Ok(Self { stream, host: addr })
    }

    pub fn get(&mut self, path: &str) -> Result<Response> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.stream
            .write_all(request.as_bytes())
            .with_context(|| format!("cannot send GET {path}"))?;
        let mut buffer = Vec::with_capacity(1024);
        let mut chunk = [0u8; 16384];
        loop {
            let read = self
                .stream
                .read(&mut chunk)
                .context("cannot read the agent's answer")?;
            if read == 0 {
                bail!("the agent closed the keep-alive connection");
            }
            buffer.extend_from_slice(&chunk[..read]);
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|value| value.trim().parse().ok())
                    .context("keep-alive answers need a content-length")?;
                if buffer.len() >= end + 4 + length {
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|code| code.parse().ok())
                        .context("the agent's answer has no status code")?;
                    return Ok(Response {
                        status,
                        body: String::from_utf8_lossy(&buffer[end + 4..end + 4 + length])
                            .into_owned(),
                    });
                }
            }
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        net::reset_on_close(&self.stream);
    }
}

/// `GET path` and the whole answer.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    send(addr, path, timeout)?.finish()
}

/// The `active` field of a `/drained` answer.
pub fn drained_active(body: &str) -> Result<u64> {
    let value: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("/drained answered {body:?}"))?;
    value["active"]
        .as_u64()
        .with_context(|| format!("/drained answered without a count: {body}"))
}
