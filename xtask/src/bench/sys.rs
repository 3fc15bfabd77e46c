//! What the benchmark reads from and sets in the kernel: BPF program statistics (aya's
//! decoding of `bpf_prog_info`), process memory and CPU time (`/proc`), sysctls, and the fd
//! limit.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{ProgramInfo, loaded_programs};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
use serde::Serialize;

/// One BPF program's statistics at one instant.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgStats {
    pub id: u32,
    /// As the kernel keeps it: the first 15 bytes of the program's name.
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub recursion_misses: u64,
}

impl ProgStats {
    /// What happened between `earlier` and `self` (same program).
    pub fn since(&self, earlier: &Self) -> ProgStats {
        ProgStats {
            id: self.id,
            name: self.name.clone(),
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(earlier.run_cnt),
            recursion_misses: self
                .recursion_misses
                .saturating_sub(earlier.recursion_misses),
        }
    }

    pub fn mean_ns(&self) -> f64 {
        if self.run_cnt == 0 {
            0.0
        } else {
            self.run_time_ns as f64 / self.run_cnt as f64
        }
    }
}

pub(super) fn bpf(
    command: libc::c_long,
    attr: *mut libc::c_void,
    size: usize,
) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` points to a live, initialised attribute struct of `size` bytes; the
    // kernel reads and writes only within it (and within buffers it points to).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr, size) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The kernel's `bpf_prog_info` of the program behind `fd`, as aya-obj's typed struct: for
/// `recursion_misses`, which aya 0.14's `ProgramInfo` does not decode (and the id of a
/// program that aya did not load).
pub(super) fn raw_prog_info(fd: BorrowedFd<'_>) -> Result<bpf_prog_info> {
    // SAFETY: plain C structs of integers; all-zero is a valid value for both.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The `info` member of the union is the one BPF_OBJ_GET_INFO_BY_FD reads.
    attr.info.bpf_fd = u32::try_from(fd.as_raw_fd()).context("negative fd")?;
    attr.info.info_len = u32::try_from(size_of::<bpf_prog_info>()).context("info size")?;
    attr.info.info = (&raw mut info) as u64;
    bpf(
        bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
        (&raw mut attr).cast(),
        size_of::<bpf_attr>(),
    )
    .context("bpf BPF_OBJ_GET_INFO_BY_FD")?;
    // SAFETY: the `info` member is the one written above, and the kernel only updates its
    // `info_len` (to the size it filled).
    let filled = unsafe { attr.info.info_len } as usize;
    if filled < std::mem::offset_of!(bpf_prog_info, recursion_misses) + size_of::<u64>() {
        bail!(
            "the kernel's bpf_prog_info has only {filled} bytes: no recursion_misses (Linux >= 5.12 needed)"
        );
    }
    Ok(info)
}

/// One program's statistics: id, name, run time and count as aya decodes them;
/// `recursion_misses` from the typed struct.
fn stats_of(info: &ProgramInfo) -> Result<ProgStats> {
    let id = info.id();
    let fd = info
        .fd()
        .with_context(|| format!("cannot open BPF program {id}"))?;
    let raw = raw_prog_info(fd.as_fd()).with_context(|| format!("cannot read BPF program {id}"))?;
    Ok(ProgStats {
        id,
        name: String::from_utf8_lossy(info.name()).into_owned(),
        run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        run_cnt: info.run_count(),
        recursion_misses: raw.recursion_misses,
    })
}

/// The statistics of every program on the host that `wanted(id, name)` picks. Programs
/// unloaded while they are listed are passed over.
fn programs_where(wanted: impl Fn(u32, &[u8]) -> bool) -> Result<Vec<ProgStats>> {
    let mut found = Vec::new();
    let mut listed = false;
    let mut last_error = None;
    for info in loaded_programs() {
        match info {
            Ok(info) => {
                listed = true;
                if wanted(info.id(), info.name()) {
                    // A program can be unloaded between listing and opening it.
                    match stats_of(&info) {
                        Ok(stats) => found.push(stats),
                        Err(error) => last_error = Some(error),
                    }
                }
            }
            Err(error) => last_error = Some(anyhow::Error::new(error)),
        }
    }
    if !listed && let Some(error) = last_error {
        return Err(error.context("cannot list the BPF programs (root needed)"));
    }
    Ok(found)
}

/// The statistics of program `id`.
pub fn prog_stats(id: u32) -> Result<ProgStats> {
    programs_where(|candidate, _| candidate == id)?
        .pop()
        .with_context(|| format!("cannot read BPF program {id}: not loaded (any more)"))
}

/// Programs on the host whose name starts with `prefix`, except those in `mine`: other
/// agents (other people's tests) attached to the same tracepoint add their cost to every
/// connection we make.
pub fn foreign_programs(prefix: &str, mine: &BTreeSet<u32>) -> Result<Vec<ProgStats>> {
    programs_where(|id, name| !mine.contains(&id) && name.starts_with(prefix.as_bytes()))
}

/// The BPF programs a process holds open (from `/proc/PID/fdinfo`: `prog_id:` lines, which
/// program fds and link fds both have).
pub fn prog_ids_of_process(pid: u32) -> Result<BTreeSet<u32>> {
    ids_of_process(pid, "prog_id:")
}

/// The BPF maps a process holds open (`map_id:` lines of `/proc/PID/fdinfo`).
pub fn map_ids_of_process(pid: u32) -> Result<BTreeSet<u32>> {
    ids_of_process(pid, "map_id:")
}

fn ids_of_process(pid: u32, field: &str) -> Result<BTreeSet<u32>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut ids = BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        // An fd may close while we look: skip it.
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(id) = line.strip_prefix(field)
                && let Ok(id) = id.trim().parse()
            {
                ids.insert(id);
            }
        }
    }
    Ok(ids)
}

/// The processes whose parent is `parent` (e.g. nginx's workers), from `/proc/*/stat`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|text| {
                    // Field 4 (ppid), counted from after the parenthesised command name.
                    let (_, rest) = text.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Kernel memory of the BPF maps a process holds (sum of the `memlock:` of its map fds;
/// on 6.x kernels this is the maps' real usage, not their capacity).
pub fn map_memory_bytes(pid: u32) -> Result<u64> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += memlock;
        }
    }
    Ok(total)
}

/// A process's memory, in KiB, from `/proc/PID/status` and `/proc/PID/smaps_rollup`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub rss_shmem_kib: u64,
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss_kib: field("VmRSS:"),
        rss_anon_kib: field("RssAnon:"),
        rss_file_kib: field("RssFile:"),
        rss_shmem_kib: field("RssShmem:"),
        hwm_kib: field("VmHWM:"),
    })
}

/// Where a process's resident memory is, by mapping (largest first): `[heap]`, anonymous
/// mappings, the binary, libraries, BPF maps.
pub fn rss_by_mapping(pid: u32) -> Result<Vec<(String, u64)>> {
    let path = format!("/proc/{pid}/smaps");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let mut totals: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // "start-end perms offset dev inode [path]"
            let path = line.split_whitespace().nth(5).unwrap_or("");
            current = if path.is_empty() {
                "[anonymous]".to_owned()
            } else if let Some(name) = path.rsplit('/').next()
                && path.starts_with('/')
            {
                name.to_owned()
            } else {
                path.to_owned()
            };
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *totals.entry(current.clone()).or_default() += kib;
        }
    }
    let mut list: Vec<(String, u64)> = totals.into_iter().filter(|(_, kib)| *kib > 0).collect();
    list.sort_by_key(|entry| std::cmp::Reverse(entry.1));
    Ok(list)
}

/// User + system CPU time of a process (all threads), in milliseconds.
pub fn cpu_time_ms(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name is in parentheses and may contain spaces: count from after it.
    let after = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path} is malformed"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of stat(5); `after` starts at field 3.
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path}: no field {index}"))
    };
    let total = ticks(14)? + ticks(15)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok(total as f64 * 1000.0 / hz)
}

/// Sets a sysctl for the life of the guard, and puts the old value back when dropped.
pub struct Sysctl {
    path: PathBuf,
    previous: String,
}

impl Sysctl {
    /// `name` as in `sysctl`, e.g. `kernel.bpf_stats_enabled`.
    pub fn set(name: &str, value: &str) -> Result<Self> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let previous = fs::read_to_string(&path)
            .with_context(|| format!("cannot read sysctl {name}"))?
            .trim()
            .to_owned();
        fs::write(&path, value).with_context(|| format!("cannot set sysctl {name}={value}"))?;
        Ok(Self { path, previous })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(error) = fs::write(&self.path, &self.previous) {
            eprintln!(
                "bench: cannot restore {} to {}: {error}",
                self.path.display(),
                self.previous
            );
        }
    }
}

pub fn read_sysctl(name: &str) -> Result<String> {
    let path = Path::new("/proc/sys").join(name.replace('.', "/"));
    Ok(fs::read_to_string(&path)
        .with_context(|| format!("cannot read sysctl {name}"))?
        .trim()
        .to_owned())
}

/// Raises RLIMIT_NOFILE (soft and hard) to at least `wanted`, within `fs.nr_open`.
pub fn raise_fd_limit(wanted: u64) -> Result<u64> {
    let nr_open: u64 = read_sysctl("fs.nr_open")?.parse().context("fs.nr_open")?;
    let target = wanted.min(nr_open);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur >= target {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.rlim_max.max(target),
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot raise RLIMIT_NOFILE to {target} (root needed)"));
    }
    Ok(target)
}

/// The machine the numbers come from.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub commit: String,
    pub date_utc: String,
}

pub fn machine(workspace: &Path) -> Machine {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or_else(
            || "unknown".to_owned(),
            |(_, model)| model.trim().to_owned(),
        );
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |v| v.trim().to_owned());
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(workspace)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let mut commit =
        output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // Uncommitted changes to the agent (not to the bench's own output) change the numbers.
    let dirty = output(
        "git",
        &[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "drain-agent/src",
            "drain-agent/build.rs",
            "drain-agent/Cargo.toml",
            "drain-agent-ebpf",
            "drain-agent-common",
        ],
    )
    .is_some_and(|text| !text.is_empty());
    if dirty {
        commit.push_str(" (+ uncommitted agent changes)");
    }
    let date_utc = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    Machine {
        cpus,
        cpu_model,
        memory_gib: memory_kib / 1024.0 / 1024.0,
        kernel,
        commit,
        date_utc,
    }
}

/// User + system CPU time of this process (all its threads) so far, in milliseconds.
pub fn own_cpu_time_ms() -> f64 {
    // SAFETY: a zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let ms = |tv: libc::timeval| tv.tv_sec as f64 * 1000.0 + tv.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

/// The host's TCP sockets now (`/proc/net/sockstat`): in use, and in TIME_WAIT.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TcpSockets {
    pub inuse: u64,
    pub time_wait: u64,
}

pub fn tcp_sockets() -> TcpSockets {
    let text = fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let Some(line) = text.lines().find(|line| line.starts_with("TCP:")) else {
        return TcpSockets::default();
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .position(|w| *w == name)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    TcpSockets {
        inuse: field("inuse"),
        time_wait: field("tw"),
    }
}

/// Held by each of the bench's kernel tests: they switch `kernel.bpf_stats_enabled` on and
/// back off, and count the host's passive opens, so two at once would disturb each other.
#[cfg(test)]
pub static KERNEL_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// In a test: whether it runs as root (BPF needs it); if not, the test is skipped with a
/// `SKIP` line `cargo xtask test` counts, or fails under `DRAIN_AGENT_REQUIRE_KERNEL=1` (CI).
#[cfg(test)]
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    crate::test_skip::skip(test, "kernel test cannot run (not running as root)");
    false
}
