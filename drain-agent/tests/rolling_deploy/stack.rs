//! One deploy's world, on loopback: a temporary directory, two `e2e-backend` processes (v1),
//! and an nginx of our own in front of them, from deploy/examples/nginx.conf.template.
//! Dropping it kills every process it (or the deploy script) started and removes the
//! directory, nginx configuration included.

use std::{
    collections::HashSet,
    fs::File,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tempfile::TempDir;

use crate::{
    common::{self, child::Guard, free_port, wait_until},
    processes,
};

/// The nginx binary (Debian package).
const NGINX: &str = "/usr/sbin/nginx";

pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// What the backend logged when it was told to stop (`shutdown signal=… in_flight=N
/// open_connections=M`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    pub port: u16,
    pub in_flight: u64,
    pub open_connections: u64,
}

pub struct Stack {
    pub nginx_port: u16,
    pub backend_ports: [u16; 2],
    pub backend_binary: PathBuf,
    /// The deploy script (and the backends it starts), once run: killed on drop.
    pub deploy: Option<Guard>,
    nginx: Option<Guard>,
    backends: Vec<Guard>,
    nginx_log: Arc<Mutex<Vec<String>>>,
    dir: TempDir,
}

impl Stack {
    /// Starts the two v1 backends and nginx, and waits until nginx answers through them.
    pub fn start(tag: &str) -> Self {
        processes::remove_leftovers_of_killed_runs("da-rolling-", "nginx.pid", "nginx");
        // `da-rolling-PID-…`: a later run finds what a killed run left by its pid.
        let dir = common::temp_dir(&format!("da-rolling-{}-{tag}-", std::process::id()));
        std::fs::create_dir_all(dir.path().join("run")).expect("create run dir");
        let mut stack = Self {
            nginx_port: free_port(),
            backend_ports: [free_port(), free_port()],
            backend_binary: processes::backend_binary(),
            deploy: None,
            nginx: None,
            backends: Vec::new(),
            nginx_log: Arc::new(Mutex::new(Vec::new())),
            dir,
        };
        for port in stack.backend_ports {
            stack.start_backend(port);
        }
        stack.start_nginx();
        stack
    }

    /// Pid files and logs of the backends (`backend-PORT.pid`, `backend-PORT.log`).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn conf_path(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    pub fn nginx_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nginx_port))
    }

    /// How the script calls nginx: our prefix, config and error log.
    pub fn nginx_command(&self) -> String {
        let dir = self.dir.path().display();
        format!("{NGINX} -p {dir}/ -c {dir}/nginx.conf -e {dir}/error.log")
    }

    pub fn nginx_pid_file(&self) -> PathBuf {
        self.dir.path().join("nginx.pid")
    }

    pub fn backend_addr(port: u16) -> String {
        format!("127.0.0.1:{port}")
    }

    fn start_backend(&mut self, port: u16) {
        let log = self.backend_log_path(port);
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("backend log");
        let err = out.try_clone().expect("backend log");
        let group = Guard::spawn_group(
            "e2e-backend",
            Command::new(&self.backend_binary)
                .args(["--listen", &Self::backend_addr(port), "--app-version", "v1"])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err),
        )
        .stop_signal(None);
        std::fs::write(
            self.run_dir().join(format!("backend-{port}.pid")),
            format!("{}\n", group.pid()),
        )
        .expect("write the pid file");
        self.backends.push(group);
        wait_until(
            &format!("backend {port} healthy"),
            Duration::from_secs(10),
            || {
                http_get(common::http::loopback(port), "/health")
                    .is_some_and(|(status, _)| status == 200)
            },
        );
    }

    fn start_nginx(&mut self) {
        let template = std::fs::read_to_string(examples_dir().join("nginx.conf.template"))
            .expect("read nginx.conf.template");
        let conf = template
            .replace("@LISTEN_PORT@", &self.nginx_port.to_string())
            .replace("@BACKEND_1_PORT@", &self.backend_ports[0].to_string())
            .replace("@BACKEND_2_PORT@", &self.backend_ports[1].to_string());
        std::fs::write(self.conf_path(), conf).expect("write nginx.conf");
        let mut command = Command::new(NGINX);
        command
            .args(self.nginx_command().split(' ').skip(1))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SIGQUIT: nginx's graceful stop; SIGKILL for the group follows if it takes too long.
        let mut group = Guard::spawn_group("nginx", &mut command).stop_signal(Some(libc::SIGQUIT));
        let stderr = group.child_mut().stderr.take().expect("nginx stderr");
        let sink = Arc::clone(&self.nginx_log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[nginx] {line}");
                sink.lock().expect("nginx log").push(line);
            }
        });
        self.nginx = Some(group);
        let addr = self.nginx_addr();
        wait_until(
            "nginx answering through the backends",
            Duration::from_secs(10),
            || http_get(addr, "/fast?bytes=10").is_some_and(|(status, _)| status == 200),
        );
    }

    pub fn backend_log_path(&self, port: u16) -> PathBuf {
        self.run_dir().join(format!("backend-{port}.log"))
    }

    pub fn backend_log(&self, port: u16) -> String {
        std::fs::read_to_string(self.backend_log_path(port)).unwrap_or_default()
    }

    /// Every `shutdown` line the backends on our ports logged.
    pub fn shutdown_reports(&self) -> Vec<ShutdownReport> {
        self.backend_ports
            .iter()
            .flat_map(|&port| {
                self.backend_log(port)
                    .lines()
                    .filter(|line| line.contains(": shutdown signal="))
                    .map(|line| ShutdownReport {
                        port,
                        in_flight: field(line, "in_flight"),
                        open_connections: field(line, "open_connections"),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The request ids (`rid=` in the query) of every request nginx read, from its access log
    /// (nginx logs each request it has read, answered or not).
    pub fn nginx_request_ids(&self) -> HashSet<String> {
        let log =
            std::fs::read_to_string(self.dir.path().join("access.log")).expect("read access.log");
        log.lines()
            .filter_map(|line| {
                let (_, after) = line.split_once("rid=")?;
                Some(after.split([' ', '&']).next()?.to_owned())
            })
            .collect()
    }

    /// nginx's error log so far (for failure messages).
    pub fn nginx_error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// The pids in the backends' pid files (the script rewrites them as it replaces backends).
    pub fn backend_pids(&self) -> Vec<i32> {
        self.backend_ports
            .iter()
            .filter_map(|port| {
                std::fs::read_to_string(self.run_dir().join(format!("backend-{port}.pid"))).ok()
            })
            .filter_map(|text| text.trim().parse().ok())
            .collect()
    }
}

pub fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The script first (its group holds the backends it started), then nginx and the
        // first backends; then whatever the pid files still name; the directory last.
        self.deploy.take();
        self.nginx.take();
        self.backends.clear();
        for pid in self.backend_pids() {
            processes::kill_backend(pid);
        }
    }
}

/// One `GET` on a new connection: status and body, `None` on any failure.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    common::http::get(addr, path, Duration::from_secs(10)).ok()
}
