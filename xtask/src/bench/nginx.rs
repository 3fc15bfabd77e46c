//! A real server: nginx (the Debian package) answering `200 ok` from its config, driven by
//! a load generator that opens a new connection per request (HTTP/1.1,
//! `Connection: close`), with the agent attached vs not, in alternating pairs as in the
//! overhead section. Reported: requests per second, and CPU per request (nginx's master
//! and workers, the load generator's threads, and the agent's), each as the median of the
//! pair ratios with its interval.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{
    Foreign, Plan, net,
    pairs::{self, Paired, Round, RoundAgent},
    sys,
};

/// The nginx binary (Debian package), as the tests use it.
const NGINX: &str = "/usr/sbin/nginx";
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const BODY: &[u8] = b"ok";
/// Loopback addresses nginx listens on: each one is another range of 4-tuples, so the
/// TIME_WAIT sockets nginx keeps (it closes first) rarely meet a reused client port.
const ADDRESSES: u8 = 4;

#[derive(Clone, Debug, Default, Serialize)]
pub struct NginxOverhead {
    pub nginx_version: String,
    pub workers: usize,
    pub threads: usize,
    pub round_seconds: f64,
    pub rounds: Vec<Round>,
    /// Ratios within pairs (requests/s; CPU per request) and their medians.
    #[serde(flatten)]
    pub paired: Paired,
    pub errors: u64,
    pub left_active: u64,
}

/// nginx in its own directory and process group; stopped (SIGQUIT, then SIGKILL to the
/// group) on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
    addresses: Vec<SocketAddr>,
}

impl Nginx {
    fn start(log_dir: &Path, workers: usize) -> Result<Self> {
        let dir = log_dir.join(format!("nginx-{}", std::process::id()));
        // What an earlier, killed run left here.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // A port free now on 127.0.0.1 (nginx binds it right after, on each address).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port")?
            .port();
        let addresses: Vec<SocketAddr> = std::iter::once(Ipv4Addr::LOCALHOST)
            .chain(net::loopback_destinations(ADDRESSES - 1))
            .map(|ip| SocketAddr::V4(SocketAddrV4::new(ip, port)))
            .collect();
        let listen: String = addresses
            .iter()
            .map(|a| format!("        listen {a} backlog=4096;\n"))
            .collect();
        let conf = format!(
            "worker_processes {workers};\n\
             pid nginx.pid;\n\
             error_log error.log warn;\n\
             events {{\n    worker_connections 4096;\n}}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   keepalive_timeout 0;\n\
             \x20   client_body_temp_path client_body_temp;\n\
             \x20   proxy_temp_path proxy_temp;\n\
             \x20   fastcgi_temp_path fastcgi_temp;\n\
             \x20   uwsgi_temp_path uwsgi_temp;\n\
             \x20   scgi_temp_path scgi_temp;\n\
             \x20   server {{\n{listen}\
             \x20       location / {{\n            return 200 \"ok\";\n        }}\n    }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("cannot write {}", conf_path.display()))?;
        let prefix = format!("{}/", dir.display());
        let child = Command::new(NGINX)
            .args(["-p", &prefix, "-c"])
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: the workers are stopped with the master.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {NGINX}"))?;
        let mut nginx = Self {
            child,
            dir,
            port,
            addresses,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = nginx.child.try_wait().context("cannot watch nginx")? {
                bail!("nginx exited at start ({status}):\n{}", nginx.error_log());
            }
            if nginx.addresses.iter().all(|a| request(*a).is_ok())
                && nginx.workers().len() == workers
            {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                bail!("nginx did not answer within 10 s:\n{}", nginx.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn workers(&self) -> Vec<u32> {
        sys::children_of(self.child.id())
    }

    /// CPU time of the master and its workers, ms.
    fn cpu_ms(&self) -> Result<f64> {
        let mut total = sys::cpu_time_ms(self.child.id())?;
        for worker in self.workers() {
            total += sys::cpu_time_ms(worker)?;
        }
        Ok(total)
    }

    fn version() -> String {
        Command::new(NGINX)
            .arg("-v")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stderr).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signalling the process group of our own child (its pgid is its pid,
            // `process_group(0)`); SIGQUIT is nginx's graceful stop.
            unsafe { libc::kill(-pid, libc::SIGQUIT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above; whatever is left of the group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request on a new connection; the whole answer read (nginx closes), checked.
fn request(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .context("read timeout")?;
    stream.write_all(REQUEST).context("send the request")?;
    let mut answer = Vec::with_capacity(256);
    stream.read_to_end(&mut answer).context("read the answer")?;
    if !answer.starts_with(b"HTTP/1.1 200") || !answer.ends_with(BODY) {
        bail!(
            "nginx answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
    Ok(())
}

/// Requests from `threads` threads for `time` (or `limit` requests in all): (requests,
/// errors, elapsed).
fn load(
    addresses: &[SocketAddr],
    threads: usize,
    time: Duration,
    limit: u64,
) -> Result<(u64, u64, Duration)> {
    let quota = limit.div_ceil(threads as u64);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let failed = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let barrier = Arc::clone(&barrier);
            let failed = Arc::clone(&failed);
            let addresses = addresses.to_vec();
            std::thread::spawn(move || -> Result<(u64, u64)> {
                barrier.wait();
                let deadline = Instant::now() + time;
                let (mut made, mut errors) = (0u64, 0u64);
                let mut next = thread;
                while made < quota {
                    if made % 32 == 0
                        && (Instant::now() >= deadline || failed.load(Ordering::Relaxed))
                    {
                        break;
                    }
                    next += 1;
                    match request(addresses[next % addresses.len()]) {
                        Ok(()) => made += 1,
                        Err(error) => {
                            errors += 1;
                            if errors > 1_000 {
                                failed.store(true, Ordering::Relaxed);
                                return Err(error.context(format!(
                                    "requests to nginx keep failing ({errors} errors)"
                                )));
                            }
                        }
                    }
                }
                Ok((made, errors))
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let (mut requests, mut errors) = (0, 0);
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok((made, failed))) => {
                requests += made;
                errors += failed;
            }
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(_) => {
                first_error.get_or_insert_with(|| anyhow::anyhow!("a load thread panicked"));
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    Ok((requests, errors, started.elapsed()))
}

pub fn run(
    plan: &Plan,
    binary: &Path,
    log_dir: &Path,
    foreign: &mut Foreign,
) -> Result<NginxOverhead> {
    let workers = plan.nginx_workers;
    let nginx = Nginx::start(log_dir, workers)?;
    let rounds = pairs::alternate("nginx", "request", plan.nginx_pairs, |pair, with_agent| {
        round(plan, binary, log_dir, foreign, &nginx, pair, with_agent)
    })?;
    drop(nginx);
    Ok(NginxOverhead {
        nginx_version: Nginx::version(),
        workers,
        threads: plan.nginx_threads,
        round_seconds: plan.nginx_round.as_secs_f64(),
        paired: Paired::of(&rounds),
        errors: rounds.iter().map(|r| r.errors).sum(),
        left_active: rounds.iter().filter_map(|r| r.left_active).sum(),
        rounds,
    })
}

fn round(
    plan: &Plan,
    binary: &Path,
    log_dir: &Path,
    foreign: &mut Foreign,
    nginx: &Nginx,
    pair: usize,
    with_agent: bool,
) -> Result<Round> {
    let agent = RoundAgent::start(plan, binary, log_dir, foreign, with_agent)?;
    let nginx_before = nginx.cpu_ms()?;
    let load_before = sys::own_cpu_time_ms();
    let (requests, errors, elapsed) = load(
        &nginx.addresses,
        plan.nginx_threads,
        plan.nginx_round,
        plan.nginx_max_requests,
    )?;
    let load_cpu_ms = sys::own_cpu_time_ms() - load_before;
    let nginx_cpu_ms = nginx.cpu_ms()? - nginx_before;
    let (agent_cpu_ms, left_active) = agent.finish(&[nginx.port])?;
    let seconds = elapsed.as_secs_f64();
    Ok(Round {
        pair,
        with_agent,
        done: requests,
        seconds,
        per_second: if seconds > 0.0 {
            requests as f64 / seconds
        } else {
            0.0
        },
        errors,
        load_cpu_ms,
        server_cpu_ms: nginx_cpu_ms,
        agent_cpu_ms,
        left_active,
    })
}
