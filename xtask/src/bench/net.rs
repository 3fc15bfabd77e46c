//! Loopback TCP load: listeners, many established connections at once, and connection
//! churn (connect / accept / close as fast as the threads go).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A TCP socket bound to `addr`, listening with `backlog` when `Some`, else only bound (a
/// port where connects are refused with RST).
fn bound_socket(addr: SocketAddrV4, backlog: Option<i32>) -> Result<OwnedFd> {
    // SAFETY: plain socket creation; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket()");
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option pointer/length.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let sockaddr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sockaddr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot bind {addr}"));
    }
    if let Some(backlog) = backlog {
        // SAFETY: a bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot listen on {addr}"));
        }
    }
    Ok(fd)
}

/// A listener with a deep accept queue (std's is 128).
pub fn listener(addr: SocketAddrV4) -> Result<TcpListener> {
    let fd = bound_socket(addr, Some(4096))?;
    Ok(TcpListener::from(fd))
}

/// A local port that refuses connections (bound, not listening) while the fd lives.
pub fn refusing_port() -> Result<(OwnedFd, u16)> {
    let fd = bound_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), None)?;
    // SAFETY: zeroed sockaddr_in is a valid out-parameter.
    let mut sockaddr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut length = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    let rc = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut sockaddr).cast(), &mut length) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockname()");
    }
    Ok((fd, u16::from_be(sockaddr.sin_port)))
}

pub fn local_port(listener: &TcpListener) -> Result<u16> {
    Ok(listener.local_addr().context("listener address")?.port())
}

/// Makes `close()` send RST instead of FIN: neither side keeps a TIME_WAIT socket.
pub fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option pointer/length.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Loopback destinations 127.0.0.2, 127.0.0.3, …: each one gives another full range of
/// ephemeral ports (connections only need a unique 4-tuple).
pub fn loopback_destinations(count: u8) -> Vec<Ipv4Addr> {
    (0..count)
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i))
        .collect()
}

/// Established connections, both ends held here: `servers[i]` is the accepted end of
/// `clients[i]`'s connection (in order, or at least one to one).
#[derive(Default)]
pub struct Pairs {
    pub clients: Vec<TcpStream>,
    pub servers: Vec<TcpStream>,
}

impl Pairs {
    /// Adds `count` connections to `listener` (bound to 0.0.0.0:port), spread over
    /// `destinations`, in batches that never overflow its accept queue.
    pub fn establish(
        &mut self,
        listener: &TcpListener,
        destinations: &[Ipv4Addr],
        count: usize,
        deadline: Instant,
    ) -> Result<()> {
        let port = local_port(listener)?;
        if destinations.is_empty() {
            bail!("no destination address");
        }
        self.clients.reserve(count);
        self.servers.reserve(count);
        let mut made = 0;
        let mut next = 0;
        while made < count {
            if Instant::now() > deadline {
                bail!("establishing connections took too long ({made} of {count})");
            }
            let batch = (count - made).min(1024);
            for _ in 0..batch {
                let destination = SocketAddr::V4(SocketAddrV4::new(
                    destinations[next % destinations.len()],
                    port,
                ));
                next += 1;
                let client = TcpStream::connect(destination).with_context(|| {
                    format!(
                        "cannot connect to {destination} (connection {} of {count})",
                        made + 1
                    )
                })?;
                self.clients.push(client);
            }
            for _ in 0..batch {
                let (server, _) = listener.accept().context("accept()")?;
                self.servers.push(server);
            }
            made += batch;
        }
        Ok(())
    }

    /// The usual close: the client first (FIN), then the server. The client side is left
    /// in TIME_WAIT.
    pub fn close_gracefully(self) {
        drop(self.clients);
        drop(self.servers);
    }
}

/// `n` connections to a new listener on 127.0.0.1, both ends held (tests).
#[cfg(test)]
pub fn open_for_test(n: u64) -> Pairs {
    let listener = listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).expect("listener");
    let mut pairs = Pairs::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    pairs
        .establish(&listener, &[Ipv4Addr::LOCALHOST], n as usize, deadline)
        .expect("connections");
    pairs
}

/// What a churn does per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChurnKind {
    /// connect, accept, close the client, close the server (each thread has its own
    /// listener on 127.0.0.1).
    Accepted,
    /// As `Accepted`, but one extra connection to each listener stays open throughout, so
    /// the port's count never returns to zero (no ring-buffer events).
    Anchored,
    /// connect to a port with no listener: SYN, RST, refused.
    Refused,
}

/// When a churn stops: after `connections` in total, or after `time`, whichever first.
#[derive(Clone, Copy, Debug)]
pub struct ChurnLimit {
    pub connections: u64,
    pub time: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct ChurnReport {
    pub connections: u64,
    pub elapsed: Duration,
    pub errors: u64,
    /// The listeners' ports (closed when the churn returns, with every connection to them).
    pub ports: Vec<u16>,
}

impl ChurnReport {
    pub fn per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.connections as f64 / seconds
        } else {
            0.0
        }
    }
}

/// Runs `threads` churn loops at once.
pub fn churn(kind: ChurnKind, threads: usize, limit: ChurnLimit) -> Result<ChurnReport> {
    let threads = threads.max(1);
    let quota = limit.connections.div_ceil(threads as u64);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let failed = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..threads {
        // Set up before the clock starts.
        let target = match kind {
            ChurnKind::Accepted | ChurnKind::Anchored => {
                let listener = listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
                let port = local_port(&listener)?;
                ports.push(port);
                let anchor = if kind == ChurnKind::Anchored {
                    let client = TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
                        .context("cannot open the anchor connection")?;
                    let (server, _) = listener.accept().context("accept()")?;
                    Some((client, server))
                } else {
                    None
                };
                Target::Listener {
                    listener,
                    port,
                    _anchor: anchor,
                }
            }
            ChurnKind::Refused => {
                let (socket, port) = refusing_port()?;
                Target::Refusing {
                    _socket: socket,
                    port,
                }
            }
        };
        let barrier = Arc::clone(&barrier);
        let failed = Arc::clone(&failed);
        handles.push(std::thread::spawn(move || {
            barrier.wait();
            let result = churn_loop(&target, quota, limit.time, &failed);
            if result.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            result
        }));
    }
    barrier.wait();
    let started = Instant::now();
    let mut report = ChurnReport::default();
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok((connections, errors))) => {
                report.connections += connections;
                report.errors += errors;
            }
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(_) => {
                first_error.get_or_insert_with(|| anyhow::anyhow!("a churn thread panicked"));
            }
        }
    }
    report.elapsed = started.elapsed();
    report.ports = ports;
    if let Some(error) = first_error {
        return Err(error);
    }
    Ok(report)
}

enum Target {
    Listener {
        listener: TcpListener,
        port: u16,
        /// Held open while the churn runs (`ChurnKind::Anchored`).
        _anchor: Option<(TcpStream, TcpStream)>,
    },
    /// The socket holds the port (bound, not listening) while the churn runs.
    Refusing { _socket: OwnedFd, port: u16 },
}

/// One thread's loop: (connections made, errors tolerated).
fn churn_loop(
    target: &Target,
    quota: u64,
    time: Duration,
    failed: &AtomicBool,
) -> Result<(u64, u64)> {
    let deadline = Instant::now() + time;
    let mut made = 0;
    let mut errors = 0;
    while made < quota {
        if made % 64 == 0 && (Instant::now() >= deadline || failed.load(Ordering::Relaxed)) {
            break;
        }
        match target {
            Target::Listener { listener, port, .. } => {
                match TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, *port)) {
                    Ok(client) => {
                        let (server, _) = listener.accept().context("accept()")?;
                        drop(client);
                        drop(server);
                        made += 1;
                    }
                    // Out of ephemeral ports for a moment (TIME_WAIT): note it, go on.
                    Err(_) => {
                        errors += 1;
                        if errors > 10_000 {
                            bail!("connect() keeps failing in the churn ({errors} errors)");
                        }
                    }
                }
            }
            Target::Refusing { port, .. } => {
                match TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, *port)) {
                    Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                        made += 1
                    }
                    Err(_) => {
                        errors += 1;
                        if errors > 10_000 {
                            bail!("connect() keeps failing in the refused churn ({errors} errors)");
                        }
                    }
                    Ok(_) => bail!("a connection to the refusing port {port} succeeded"),
                }
            }
        }
    }
    Ok((made, errors))
}
