//! The real `bpftrace` (the Debian package), running the one-liner people would write to
//! keep per-socket state for a drain, or an empty probe on the same tracepoint: its program's
//! `run_time_ns / run_cnt` read from the kernel's statistics as the agent's are.
//!
//! Optional: when the binary is missing or fails, the caller skips its rows with the reason.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::AsFd as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapInfo;

use super::{
    net, reference,
    sys::{self, ProgStats},
};

/// The tracepoint the agent's handler is attached to, as bpftrace names it (a classic
/// tracepoint: bpftrace 0.17 attaches `tracepoint:` probes through perf events).
const SOCKET_MAP_SCRIPT: &str = "tracepoint:sock:inet_sock_set_state { \
     if (args->oldstate == 3 && args->newstate == 1) { @s[args->skaddr] = nsecs; } \
     else if (args->oldstate == 1) { delete(@s[args->skaddr]); } }";
const EMPTY_SCRIPT: &str = "tracepoint:sock:inet_sock_set_state { }";

/// Which one-liner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// `@s[skaddr] = nsecs` on SYN_RECV → ESTABLISHED, `delete(@s[skaddr])` when a socket
    /// leaves ESTABLISHED (3 and 1 are TCP_SYN_RECV and TCP_ESTABLISHED).
    SocketMap,
    /// A probe that does nothing: bpftrace's floor on its tracepoint.
    Empty,
}

impl Script {
    pub fn text(self) -> &'static str {
        match self {
            Script::SocketMap => SOCKET_MAP_SCRIPT,
            Script::Empty => EMPTY_SCRIPT,
        }
    }
}

/// Why the real bpftrace cannot be measured here, if it cannot (`None`: it can).
pub fn unavailable() -> Option<String> {
    if crate::setup::has_command("bpftrace") {
        None
    } else {
        Some("`bpftrace` is not installed (Debian package bpftrace)".to_owned())
    }
}

/// `bpftrace --version`.
pub fn version() -> String {
    Command::new("bpftrace")
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// A running bpftrace with its program attached; stopped (SIGINT, then SIGKILL) on drop.
pub struct Bpftrace {
    child: Child,
    prog: u32,
    /// `@s` (SocketMap only).
    map: Option<MapInfo>,
}

impl Bpftrace {
    /// Starts `script` with room for `map_keys` keys in its maps (bpftrace's default is
    /// 4,096; 0.17 reads `BPFTRACE_MAP_KEYS_MAX`, later versions `BPFTRACE_MAX_MAP_KEYS`),
    /// and waits until its program runs on a loopback connection.
    pub fn start(script: Script, map_keys: u32, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("bpftrace-{script:?}.log"));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone().context("cannot share the bpftrace log")?;
        let child = Command::new("bpftrace")
            .args(["-e", script.text()])
            .env("BPFTRACE_MAP_KEYS_MAX", map_keys.to_string())
            .env("BPFTRACE_MAX_MAP_KEYS", map_keys.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .context("cannot start bpftrace")?;
        let mut bpftrace = Self {
            child,
            prog: 0,
            map: None,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let listener = net::listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        let port = net::local_port(&listener)?;
        loop {
            if let Some(status) = bpftrace.child.try_wait().context("cannot watch bpftrace")? {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("bpftrace exited at start ({status}):\n{log}");
            }
            if Instant::now() > deadline {
                bail!(
                    "bpftrace's program did not run within 60 s (log: {})",
                    log.display()
                );
            }
            // A connection fires the tracepoint; the program that ran is bpftrace's.
            let client = TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
                .context("cannot connect to the probe listener")?;
            let (server, _) = listener.accept().context("accept()")?;
            drop((client, server));
            let pid = bpftrace.child.id();
            let running = sys::prog_ids_of_process(pid)?
                .into_iter()
                .filter_map(|id| sys::prog_stats(id).ok())
                .find(|stats| stats.run_cnt > 0);
            if let Some(stats) = running {
                bpftrace.prog = stats.id;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if script == Script::SocketMap {
            bpftrace.map = Some(bpftrace.socket_map(map_keys, deadline)?);
        }
        Ok(bpftrace)
    }

    pub fn stats(&self) -> Result<ProgStats> {
        sys::prog_stats(self.prog)
    }

    /// `@s`: the u64 → u64 hash map among the maps bpftrace holds, with room for `map_keys`.
    fn socket_map(&self, map_keys: u32, deadline: Instant) -> Result<MapInfo> {
        loop {
            let maps: Vec<MapInfo> = sys::map_ids_of_process(self.child.id())?
                .into_iter()
                .filter_map(|id| MapInfo::from_id(id).ok())
                .collect();
            let found = maps.into_iter().find(|info| {
                info.key_size() == 8
                    && info.value_size() == 8
                    && matches!(info.map_type(), Ok(aya::maps::MapType::Hash))
            });
            if let Some(map) = found {
                if map.max_entries() < map_keys {
                    bail!(
                        "bpftrace's @s holds at most {} keys, {map_keys} asked: this version reads neither BPFTRACE_MAP_KEYS_MAX nor BPFTRACE_MAX_MAP_KEYS",
                        map.max_entries()
                    );
                }
                return Ok(map);
            }
            if Instant::now() > deadline {
                bail!("bpftrace holds no u64 → u64 hash map (its @s)");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `@s`'s flags: whether bpftrace preallocates it.
    pub fn preallocated(&self) -> Option<bool> {
        self.map
            .as_ref()
            .map(|map| map.map_flags() & reference::map_flags(false) == 0)
    }

    /// The keys `@s` holds now (0 for the empty script).
    pub fn held(&self) -> Result<u64> {
        let Some(map) = &self.map else {
            return Ok(0);
        };
        let fd = map.fd().context("cannot open bpftrace's map")?;
        reference::count_keys(fd.as_fd())
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signalling our own child, not reaped yet (try_wait above). SIGINT is
            // bpftrace's own way to stop (it prints its maps, to the log, and detaches).
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    /// The real one-liner runs, keeps each passive open's socket in `@s` (of the size asked)
    /// and drops it when the socket leaves ESTABLISHED; its statistics are read.
    #[test]
    #[ignore = "kernel test: needs root, BPF and bpftrace; run by cargo xtask test (or cargo test -- --include-ignored)"]
    fn the_real_one_liner_keeps_and_drops_each_socket() {
        if !sys::root_or_skip("the_real_one_liner_keeps_and_drops_each_socket") {
            return;
        }
        let _serial = sys::KERNEL_TEST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(reason) = unavailable() {
            crate::test_skip::skip(
                "the_real_one_liner_keeps_and_drops_each_socket",
                &format!("{reason} (cargo xtask setup installs it)"),
            );
            return;
        }
        let _stats = sys::Sysctl::set("kernel.bpf_stats_enabled", "1").unwrap();
        let logs = tempfile_dir();
        const N: u64 = 300;
        let bpftrace = Bpftrace::start(Script::SocketMap, 20_000, &logs).unwrap();
        assert_eq!(bpftrace.preallocated(), Some(true), "bpftrace's maps");
        let before = bpftrace.stats().unwrap();
        let pairs = super::super::net::open_for_test(N);
        let held = bpftrace.held().unwrap();
        assert!((N..N + 50).contains(&held), "{held} held after {N} opens");
        pairs.close_gracefully();
        std::thread::sleep(Duration::from_millis(100));
        let held = bpftrace.held().unwrap();
        assert!(held < N / 10, "{held} still held after {N} closes");
        let runs = bpftrace.stats().unwrap().since(&before).run_cnt;
        assert!(runs >= 4 * N, "only {runs} runs for {N} connections");
        drop(bpftrace);
        let _ = std::fs::remove_dir_all(&logs);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("bench-bpftrace-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
