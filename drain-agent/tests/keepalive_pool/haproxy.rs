//! A real HAProxy (Debian package) of the test's own, on loopback: its configuration, its
//! runtime API (the stats socket, `level admin`), and what `ss` says about its connections.
//! Its directory (configuration, socket, pid files of what the test starts next to it) is
//! removed on drop, and the process group killed; a run killed outright leaves a directory
//! whose processes the next run kills.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{common::child::Guard, processes};

/// The HAProxy binary (Debian package `haproxy`, in `cargo xtask setup`).
pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// Whether HAProxy is installed. When it is not: with `DRAIN_AGENT_REQUIRE_KERNEL=1` (CI,
/// which runs `cargo xtask setup` first) the test fails; otherwise it prints a loud SKIP.
pub fn available(test: &str) -> bool {
    if Path::new(HAPROXY).is_file() {
        return true;
    }
    let required = std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: {HAPROXY} is not installed (cargo xtask setup installs it)"
    );
    crate::common::report_skip(
        test,
        &format!("{HAPROXY} is not installed (cargo xtask setup installs it)"),
    );
    false
}

/// One `server` line of the backend `be`.
pub struct ServerLine {
    pub name: String,
    pub port: u16,
    /// Keywords after the address, e.g. `agent-check agent-port 9 …`.
    pub options: String,
}

pub struct Haproxy {
    pub frontend_port: u16,
    dir: PathBuf,
    process: Option<Guard>,
}

/// The configuration: one HTTP frontend, one backend `be` that keeps idle keep-alive
/// connections to its servers (reused by any request, purged only after `pool-purge-delay`),
/// and the runtime API on a Unix socket. No health checks: nothing but traffic and the
/// agent checks of `servers` connects to the servers.
fn config(frontend_port: u16, socket: &Path, servers: &[ServerLine]) -> String {
    let mut config = format!(
        "global
    stats socket {socket} mode 600 level admin
    nbthread 1

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout http-request 10s

frontend fe
    bind 127.0.0.1:{frontend_port}
    default_backend be

backend be
    balance roundrobin
",
        socket = socket.display()
    );
    for server in servers {
        config.push_str(&format!(
            "    server {} 127.0.0.1:{} pool-purge-delay 60s {}\n",
            server.name, server.port, server.options
        ));
    }
    config
}

impl Haproxy {
    /// A directory for this HAProxy and what the test runs next to it (`run/NAME.pid`).
    pub fn prepare_dir(tag: &str) -> PathBuf {
        processes::remove_leftovers_of_killed_runs("da-haproxy-", "haproxy.pid", "haproxy");
        let dir = std::env::temp_dir().join(format!("da-haproxy-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).expect("create the HAProxy directory");
        dir
    }

    /// Starts HAProxy in the foreground (`-db`) in `dir` (from [`Haproxy::prepare_dir`])
    /// and waits for its runtime API.
    pub fn start(dir: PathBuf, frontend_port: u16, servers: &[ServerLine]) -> Self {
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(
            &config_path,
            config(frontend_port, &dir.join("admin.sock"), servers),
        )
        .expect("write haproxy.cfg");
        let checked = Command::new(HAPROXY)
            .arg("-c")
            .arg("-f")
            .arg(&config_path)
            .output()
            .expect("run haproxy -c");
        assert!(
            checked.status.success(),
            "haproxy.cfg is invalid: {}",
            String::from_utf8_lossy(&checked.stderr)
        );
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("haproxy.log");
        let process = Guard::spawn_group(
            "haproxy",
            Command::new(HAPROXY)
                .arg("-db")
                .arg("-f")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("haproxy.log"))
                .stderr(log),
        )
        .stop_signal(Some(libc::SIGTERM));
        std::fs::write(dir.join("haproxy.pid"), format!("{}\n", process.pid()))
            .expect("write haproxy.pid");
        let haproxy = Self {
            frontend_port,
            dir,
            process: Some(process),
        };
        let started = Instant::now();
        while haproxy.try_admin("show info").is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "HAProxy's runtime API did not come up; log:\n{}",
                haproxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        haproxy
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("HAProxy runs").pid()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    fn try_admin(&self, command: &str) -> std::io::Result<String> {
        let mut socket = UnixStream::connect(self.dir.join("admin.sock"))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// One runtime-API command (non-interactive: HAProxy answers and closes).
    pub fn admin(&self, command: &str) -> String {
        self.try_admin(command)
            .unwrap_or_else(|e| panic!("HAProxy runtime API, {command:?}: {e}"))
    }

    /// `show stat` of server `be/NAME`: each CSV column by its header name.
    pub fn server_stat(&self, name: &str) -> std::collections::HashMap<String, String> {
        let stat = self.admin("show stat");
        let mut lines = stat.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|line| line.strip_prefix("# "))
            .expect("show stat header")
            .split(',')
            .collect();
        let row = lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .find(|row| row.first() == Some(&"be") && row.get(1) == Some(&name))
            .unwrap_or_else(|| panic!("no be/{name} in show stat:\n{stat}"));
        header
            .iter()
            .zip(row)
            .map(|(key, value)| ((*key).to_owned(), value.to_owned()))
            .collect()
    }

    /// The `status` column of `be/NAME` (UP, DRAIN, MAINT, DOWN, `no check`).
    pub fn server_status(&self, name: &str) -> String {
        self.server_stat(name)
            .remove("status")
            .expect("a status column")
    }

    /// Established connections from this HAProxy to 127.0.0.1:`port` (`ss -p`): its idle
    /// pool and the requests it has in flight there.
    pub fn connections_to(&self, port: u16) -> usize {
        let output = Command::new("ss")
            .args(["-Htnp", "state", "established"])
            .arg(format!("( dport = :{port} )"))
            .output()
            .expect("run ss");
        let owner = format!("pid={},", self.pid());
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.contains("\"haproxy\"") && line.contains(&owner))
            .count()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.process.take();
        for pid in processes::pids_in(&self.dir.join("run")) {
            processes::kill_backend(pid);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
