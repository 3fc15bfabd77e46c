//! `cargo xtask systemd`: the units of deploy/systemd/ under a real systemd.
//!
//! A Debian rootfs made by `mmdebstrap` (cached in `target/systemd/rootfs-SUITE-KEY/`, KEY a
//! hash of the suite, variant and package list) is booted with `systemd-nspawn -b`: systemd
//! is PID 1 of the container, with its own journal and unit files. The agent (the static
//! release binary) and its unit are installed as the README's install section says, and the
//! checks run inside through `nsenter` into the container's leader (its PID 1): no D-Bus and no
//! machined are needed on the host, and `systemctl` inside talks to that systemd over its
//! private socket.
//!
//! The root stays read-only: `--volatile=overlay` puts a tmpfs over it for the boot, so every
//! run starts from the same tree and a crashed run leaves nothing behind in it; files are
//! installed through `/proc/LEADER/root`, which is the container's own view of its root.
//!
//! The checks, in order (each prints PASS or FAIL with what it saw; any FAIL, or a check that
//! could not run, makes the command fail):
//! 1. the agent starts under its unit and answers `/healthz` on 127.0.0.1:9100;
//! 2. `systemctl stop example-app` (e2e-backend as /usr/local/bin/example-app) while a client
//!    holds a connection: the stop stays in ExecStop= (`drain-agent wait`) past the quiet
//!    window, and the wait's end and SIGTERM follow the client's close;
//! 3. the drop-in from the agent unit's comment (`Environment=DRAIN_AGENT_LISTEN=…`, where
//!    `systemctl edit` writes it, `daemon-reload`, `restart`) moves the agent, nothing is
//!    left on 9100;
//! 4. with the example unit's documented drop-in (`Environment=DRAIN_AGENT_URL=…`), its stop
//!    waits as in 2 with the agent moved;
//! 5. (after 2) the agent killed (`kill -9`) 2 s into the app's stop, a client still
//!    connected: it is back within seconds (its restart not queued behind the app's stop
//!    job: the app is ordered after drain-agent.target, not the service), and SIGTERM comes
//!    within seconds of the client's close, not at the wait's timeout;
//!    The same with `systemctl restart drain-agent` instead of the kill: it returns at once;
//! 6. (last) poweroff with a client connected: the app's stop waits in ExecStop= while the
//!    agent is still running, its stop job waiting behind the app's.
//!
//! The container shares the host's kernel: the agent's eBPF program sees every namespace's
//! connections, and the example unit's unscoped `wait --port 8080` counts the host's port
//! 8080 too. CI runs the rig alone.
//!
//! [`Machine`] and [`rootfs`] are the reusable part: boot, run a bounded command inside,
//! install a file, power off (or kill) — every wait has a limit.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;

use crate::{cargo_binary, dist, is_root, kernels, setup, status, workspace_root};

/// The Debian packages the rig needs on the host, each with a command that shows it is there.
pub const PACKAGES: &[(&str, &str)] = &[
    ("systemd-container", "systemd-nspawn"),
    ("mmdebstrap", "mmdebstrap"),
];

/// The container's distribution: the suite the host's apt sources carry.
const SUITE: &str = "bookworm";
/// `minbase`: Essential packages and apt only; what the checks need comes from `INCLUDE`.
const VARIANT: &str = "minbase";
/// systemd as init; curl and iproute2 (`ss`) for the checks, run inside the container.
const INCLUDE: &[&str] = &["systemd", "systemd-sysv", "curl", "iproute2"];

/// The nspawn flags the agent needs, besides the boot itself (`-b`, `-D`, `--machine`):
const NSPAWN_FLAGS: &[&str] = &[
    // nspawn's seccomp filter refuses bpf() and perf_event_open() by default. Without bpf()
    // the agent cannot create its maps ("failed to create map `SOCKETS`: Operation not
    // permitted"); perf_event_open() is only for the classic-tracepoint fallback (tp_btf
    // attaches through bpf() alone), which the unit allows too. Nothing else is needed: the
    // default capability set holds CAP_SYS_ADMIN, which the kernel accepts for what CAP_BPF
    // and CAP_PERFMON allow, and nspawn's read-only /sys has /sys/kernel/btf/vmlinux.
    "--system-call-filter=bpf perf_event_open",
    // This host has no D-Bus and no systemd-machined: do not register the machine, and run
    // in the caller's cgroup instead of asking the host's systemd for a scope.
    "--register=no",
    "--keep-unit",
    // Its own network namespace (loopback only): the container's ports are not the host's.
    "--private-network",
    // The cached tree is the read-only lower layer of an overlay with a tmpfs on top.
    "--volatile=overlay",
    // The boot messages go to the console log; nothing is read from stdin.
    "--console=read-only",
];

/// A PATH for commands inside the container (not the caller's, which names host tools).
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Limits on every wait.
const BOOT_LIMIT: Duration = Duration::from_secs(90);
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
const START_LIMIT: Duration = Duration::from_secs(30);
const POWER_OFF_LIMIT: Duration = Duration::from_secs(30);
const MMDEBSTRAP_LIMIT: Duration = Duration::from_secs(15 * 60);

/// The agent's default address (the unit's `Environment=DRAIN_AGENT_LISTEN=`).
const DEFAULT_LISTEN: &str = "127.0.0.1:9100";

#[derive(Args, Default)]
pub struct SystemdArgs {
    /// The agent's unit to install instead of deploy/systemd/drain-agent.service (e.g. an
    /// older version, to see a check fail).
    #[arg(long)]
    pub agent_unit: Option<PathBuf>,
    /// Make the rootfs again even if a cached one exists.
    #[arg(long)]
    pub rebuild_rootfs: bool,
}

pub fn systemd(args: &SystemdArgs) -> Result<()> {
    let started = Instant::now();
    ensure!(
        is_root(),
        "cargo xtask systemd needs root: mmdebstrap, systemd-nspawn and the agent's eBPF programs"
    );
    setup::setup(&setup::SetupArgs::toolchain_only())?;
    setup::ensure_debian_packages(PACKAGES)?;
    let agent = dist::build(setup::STATIC_TARGET)?;
    let app = build_example_app()?;
    let agent_unit = args
        .agent_unit
        .clone()
        .unwrap_or_else(|| workspace_root().join("deploy/systemd/drain-agent.service"));
    let agent_unit_text = fs::read_to_string(&agent_unit)
        .with_context(|| format!("cannot read {}", agent_unit.display()))?;
    let app_unit_text =
        fs::read_to_string(workspace_root().join("deploy/systemd/example-app.service"))
            .context("cannot read deploy/systemd/example-app.service")?;

    let build_time = started.elapsed();
    let prepared = Instant::now();
    let root = rootfs(args.rebuild_rootfs)?;
    let rootfs_time = prepared.elapsed();
    let dir = rig_dir();
    let booting = Instant::now();
    let mut machine = Machine::boot(&root, "drain-agent-rig", &dir.join("console.log"))?;
    let boot_time = booting.elapsed();
    println!(
        "xtask systemd: booted {} in {:.1} s (systemd is PID 1 of the container, leader pid {})",
        root.display(),
        boot_time.as_secs_f64(),
        machine.leader
    );

    let mut checks = Checks::default();
    let installed = checks.run("agent installed and started by systemd", || {
        install_agent(&machine, &agent, &agent_unit_text)
    });
    if installed {
        checks.run(
            "example-app: systemctl stop waits for a held connection, SIGTERM after it closed",
            || example_app_stop(&machine, &app, &app_unit_text),
        );
        checks.run(
            "agent killed (kill -9) mid-drain: back within seconds, SIGTERM soon after the close",
            || agent_crash_mid_drain(&machine, &app_unit_text, Interruption::Kill),
        );
        checks.run(
            "systemctl restart drain-agent mid-drain: returns at once, SIGTERM soon after the close",
            || agent_crash_mid_drain(&machine, &app_unit_text, Interruption::Restart),
        );
        let moved = checks.run(
            "drop-in from the unit's comment moves the listener (daemon-reload, restart)",
            || drop_in_moves_listener(&machine, &agent_unit_text),
        );
        let name =
            "example-app, told the moved address by the drop-in its comment documents, still waits";
        if moved {
            checks.run(name, || {
                example_app_follows_moved_agent(&machine, &app_unit_text, &agent_unit_text)
            });
        } else {
            checks.not_run(name, "the agent did not move");
        }
    } else {
        for name in [
            "example-app's stop",
            "agent killed mid-drain",
            "agent restarted mid-drain",
            "the drop-in",
            "example-app with the agent moved",
        ] {
            checks.not_run(name, "the agent was not installed and started");
        }
    }
    if checks.failed() > 0 {
        print_diagnostics(&machine);
    }
    let name = "poweroff: example-app stops (and drains) while the agent is still running";
    if installed {
        checks.run(name, || poweroff_drains_first(&machine, &app_unit_text));
    } else {
        checks.not_run(name, "the agent was not installed and started");
    }
    let powered_off = machine.power_off();
    println!(
        "xtask systemd: {} passed, {} failed; builds {:.1} s, rootfs {:.1} s, boot {:.1} s, {:.1} s in all",
        checks.passed(),
        checks.failed(),
        build_time.as_secs_f64(),
        rootfs_time.as_secs_f64(),
        boot_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    powered_off?;
    ensure!(
        checks.failed() == 0,
        "{} of {} systemd checks failed (console: {})",
        checks.failed(),
        checks.passed() + checks.failed(),
        dir.join("console.log").display()
    );
    Ok(())
}

fn rig_dir() -> PathBuf {
    dist::target_dir().join("systemd")
}

/// The checks run so far, printed as they end.
#[derive(Default)]
struct Checks {
    results: Vec<bool>,
}

impl Checks {
    fn run(&mut self, name: &str, check: impl FnOnce() -> Result<String>) -> bool {
        println!("xtask systemd: CHECK {name}");
        let started = Instant::now();
        let passed = match check() {
            Ok(detail) => {
                println!(
                    "xtask systemd: PASS  {name} ({:.1} s): {detail}",
                    started.elapsed().as_secs_f64()
                );
                true
            }
            Err(problem) => {
                println!(
                    "xtask systemd: FAIL  {name} ({:.1} s): {problem:#}",
                    started.elapsed().as_secs_f64()
                );
                false
            }
        };
        self.results.push(passed);
        passed
    }

    /// A check that cannot run because one it builds on failed: counted as failed.
    fn not_run(&mut self, name: &str, why: &str) {
        println!("xtask systemd: FAIL  {name}: not run: {why}");
        self.results.push(false);
    }

    fn passed(&self) -> usize {
        self.results.iter().filter(|passed| **passed).count()
    }

    fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
}

/// The example app: e2e-backend (HTTP on `--listen`, a graceful SIGTERM that logs what was
/// open), statically linked like the agent so that it runs on the container's libc.
fn build_example_app() -> Result<PathBuf> {
    status(
        Command::new(cargo_binary())
            .args(["build", "--release", "--locked", "--package", "e2e-backend"])
            .args(["--target", setup::STATIC_TARGET])
            .current_dir(workspace_root()),
    )?;
    Ok(dist::target_dir()
        .join(setup::STATIC_TARGET)
        .join("release")
        .join("e2e-backend"))
}

// ---------------------------------------------------------------------------------------
// The rootfs

/// The cached rootfs for `SUITE`, `VARIANT` and `INCLUDE`, made with mmdebstrap from the
/// host's apt mirror when it is missing (or `rebuild`). A tree is only ever renamed into
/// place once mmdebstrap has finished, so a cached one is complete.
pub fn rootfs(rebuild: bool) -> Result<PathBuf> {
    let key = fnv1a(format!("{SUITE} {VARIANT} {}", INCLUDE.join(",")).as_bytes());
    let dir = rig_dir();
    let root = dir.join(format!("rootfs-{SUITE}-{key:016x}"));
    if root.join("usr/lib/systemd/systemd").is_file() && !rebuild {
        println!("xtask systemd: reusing the rootfs {}", root.display());
        return Ok(root);
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = root.with_extension("partial");
    for old in [&partial, &root] {
        if old.exists() {
            fs::remove_dir_all(old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
    }
    let mirror = kernels::debian_mirror()?;
    println!(
        "xtask systemd: making the rootfs ({SUITE}, {VARIANT}, + {}) with mmdebstrap from the host's apt mirror",
        INCLUDE.join(",")
    );
    let started = Instant::now();
    let made = run_bounded(
        Command::new("mmdebstrap")
            .arg(format!("--variant={VARIANT}"))
            .arg(format!("--include={}", INCLUDE.join(",")))
            .args([SUITE, &partial.to_string_lossy()])
            .arg(format!("deb {mirror} {SUITE} main")),
        MMDEBSTRAP_LIMIT,
    )?;
    ensure!(
        made.status.success(),
        "mmdebstrap failed ({}):\n{}",
        made.status,
        tail(&made.stderr, 30)
    );
    fs::rename(&partial, &root)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), root.display()))?;
    println!(
        "xtask systemd: rootfs made in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        root.display()
    );
    Ok(root)
}

/// FNV-1a: a stable hash for the cache key (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------
// The machine

/// A container booted with `systemd-nspawn -b`: systemd is its PID 1 (`leader` here).
/// Dropping it kills what is left of it.
pub struct Machine {
    nspawn: Child,
    /// The container's PID 1 (systemd), as the host sees it.
    pub leader: u32,
    console: PathBuf,
    stopped: bool,
    /// `request_power_off` sent the signal already.
    power_off_requested: std::cell::Cell<bool>,
}

impl Machine {
    /// Boots `root` and returns once systemd reports the boot finished (`running`, or
    /// `degraded`: a failed unit is named then), within `BOOT_LIMIT`.
    pub fn boot(root: &Path, name: &str, console: &Path) -> Result<Self> {
        let log = fs::File::create(console)
            .with_context(|| format!("cannot create {}", console.display()))?;
        let log_err = log.try_clone().context("cannot share the console log")?;
        let mut command = Command::new("systemd-nspawn");
        command
            .arg("--quiet")
            .arg("--boot")
            .arg(format!("--directory={}", root.display()))
            .arg(format!("--machine={name}"))
            .args(NSPAWN_FLAGS)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let nspawn = command
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        let mut machine = Self {
            nspawn,
            leader: 0,
            console: console.to_owned(),
            stopped: false,
            power_off_requested: std::cell::Cell::new(false),
        };
        let deadline = Instant::now() + BOOT_LIMIT;
        machine.leader = machine.find_leader(deadline)?;
        let state = loop {
            let state = machine
                .run(&["systemctl", "is-system-running", "--wait"], COMMAND_LIMIT)
                .map(|done| done.stdout.trim().to_owned());
            match state.as_deref() {
                Ok(state @ ("running" | "degraded")) => break state.to_owned(),
                Ok(state @ ("stopping" | "maintenance")) => {
                    bail!("the container's systemd is {state}")
                }
                // Before systemd has its private socket, systemctl cannot reach it (and says
                // `offline`).
                _ if Instant::now() < deadline => thread::sleep(Duration::from_millis(200)),
                _ => bail!(
                    "the container did not finish booting within {BOOT_LIMIT:?} ({state:?}); console: {}\n{}",
                    console.display(),
                    tail(&fs::read_to_string(console).unwrap_or_default(), 30)
                ),
            }
        };
        if state == "degraded" {
            let failed = machine.run(&["systemctl", "--failed", "--no-legend"], COMMAND_LIMIT)?;
            println!("xtask systemd: booted degraded: {}", failed.stdout.trim());
        }
        Ok(machine)
    }

    /// nspawn's child whose program is systemd, in another PID namespace than ours (before
    /// it runs systemd, nspawn's child is nspawn itself).
    fn find_leader(&mut self, deadline: Instant) -> Result<u32> {
        let our_namespace = fs::read_link("/proc/self/ns/pid").context("our PID namespace")?;
        loop {
            if let Some(exit) = self.nspawn.try_wait().context("systemd-nspawn")? {
                self.stopped = true;
                bail!(
                    "systemd-nspawn exited ({exit}) before the container booted; console:\n{}",
                    tail(&fs::read_to_string(&self.console).unwrap_or_default(), 30)
                );
            }
            let children =
                fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.nspawn.id()))
                    .unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                let comm = fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                let namespace = fs::read_link(format!("/proc/{child}/ns/pid")).ok();
                if comm.trim() == "systemd" && namespace.is_some_and(|ns| ns != our_namespace) {
                    return Ok(child);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "systemd-nspawn started no systemd within {BOOT_LIMIT:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A command that runs `args` inside the container: in all its namespaces, with a PATH
    /// of its own and nothing of the caller's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["--target", &self.leader.to_string(), "--all", "--"])
            .args(args)
            .env_clear()
            .env("PATH", CONTAINER_PATH)
            .env("LANG", "C")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0");
        command
    }

    /// Runs `args` inside the container, within `limit`.
    pub fn run(&self, args: &[&str], limit: Duration) -> Result<Finished> {
        run_bounded(&mut self.command(args), limit)
    }

    /// Runs `args` inside the container and fails unless it exits 0; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let done = self.run(args, COMMAND_LIMIT)?;
        ensure!(
            done.status.success(),
            "{} failed ({}): {}{}",
            args.join(" "),
            done.status,
            done.stdout.trim(),
            done.stderr.trim()
        );
        Ok(done.stdout)
    }

    /// Writes `contents` to `path` inside the container (the container's own view of its
    /// root, through /proc/LEADER/root), with `mode`, creating its directory.
    pub fn install(&self, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        let relative = path.trim_start_matches('/');
        let target = PathBuf::from(format!("/proc/{}/root", self.leader)).join(relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {} in the container", parent.display()))?;
        }
        fs::write(&target, contents)
            .with_context(|| format!("cannot write {path} in the container"))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot chmod {path} in the container"))
    }

    /// One property of a unit (`systemctl show --value`).
    pub fn property(&self, unit: &str, name: &str) -> Result<String> {
        Ok(self
            .ok(&["systemctl", "show", "--value", "-p", name, unit])?
            .trim()
            .to_owned())
    }

    /// `GET http://ADDRESS/PATH` with curl inside the container: the status and body, or
    /// an error when nothing answered.
    pub fn http_get(&self, address: &str, path: &str) -> Result<(u16, String)> {
        let url = format!("http://{address}{path}");
        let done = self.run(
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                &url,
            ],
            COMMAND_LIMIT,
        )?;
        ensure!(
            done.status.success(),
            "curl {url}: {} ({})",
            done.stderr.trim(),
            done.status
        );
        let (body, code) = done
            .stdout
            .rsplit_once('\n')
            .with_context(|| format!("curl {url}: no status in {:?}", done.stdout))?;
        let code = code
            .trim()
            .parse()
            .with_context(|| format!("curl {url}: status {code:?}"))?;
        Ok((code, body.to_owned()))
    }

    /// The TCP addresses listened on inside the container (`ss -Htln`).
    pub fn listening(&self) -> Result<Vec<String>> {
        Ok(self
            .ok(&["ss", "-Htln"])?
            .lines()
            .filter_map(|line| line.split_whitespace().nth(3).map(str::to_owned))
            .collect())
    }

    /// Waits until `ready` says yes (`Ok(Some)`), at most `limit`; its last error otherwise.
    pub fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut(&Self) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            let last = match ready(self) {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => String::from("not yet"),
                Err(problem) => format!("{problem:#}"),
            };
            if Instant::now() >= deadline {
                bail!("{what}: not within {limit:?} (last: {last})");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Powers the container off (SIGRTMIN+4 to its systemd: `systemctl poweroff` without
    /// asking logind, which this minimal system does not run), within `POWER_OFF_LIMIT`;
    /// kills it past that, and fails.
    pub fn power_off(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        let started = Instant::now();
        let sent = self.power_off_requested.get() || self.request_power_off().is_ok();
        if sent {
            while started.elapsed() < POWER_OFF_LIMIT {
                if let Some(exit) = self.nspawn.try_wait().context("systemd-nspawn")? {
                    self.stopped = true;
                    println!(
                        "xtask systemd: powered off in {:.1} s (systemd-nspawn: {exit})",
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        self.kill();
        bail!("the container did not power off within {POWER_OFF_LIMIT:?}: killed")
    }

    /// Asks the container's systemd to power off (SIGRTMIN+4) and returns at once;
    /// `power_off` then waits for it.
    pub fn request_power_off(&self) -> Result<()> {
        ensure!(self.leader != 0, "the container's PID 1 is not known");
        // SAFETY: kill() with the container's PID 1 (never 0, our own process group) and a
        // valid signal number.
        let sent = unsafe { libc::kill(self.leader as libc::pid_t, libc::SIGRTMIN() + 4) };
        ensure!(sent == 0, "cannot signal the container's systemd");
        self.power_off_requested.set(true);
        Ok(())
    }

    fn kill(&mut self) {
        if self.stopped {
            return;
        }
        // Never kill(0, …): that is our own process group. Before the leader is known,
        // only nspawn is there to stop.
        if self.leader != 0 {
            // SAFETY: kill() with the container's PID 1, which nspawn started for us: SIGKILL
            // ends its PID namespace, and nspawn then exits by itself (and cleans up).
            unsafe {
                libc::kill(self.leader as libc::pid_t, libc::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.nspawn.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        self.stopped = true;
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a bounded command left.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` (stdin empty, output captured) and fails if it has not ended within
/// `limit` (it is killed then; what it started inside a container may live on).
pub fn run_bounded(command: &mut Command, limit: Duration) -> Result<Finished> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| shown.clone())? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    // The output ends when the command does (a reader that outlives it is left behind).
    let collect = |output: mpsc::Receiver<String>| {
        output
            .recv_timeout(Duration::from_secs(2))
            .unwrap_or_default()
    };
    Ok(Finished {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

fn reader(pipe: Option<impl std::io::Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (send, receive) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = send.send(String::from_utf8_lossy(&bytes).into_owned());
        });
    }
    receive
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// The checks

/// The README's install section: the binary to /usr/local/bin, the unit to
/// /etc/systemd/system, `systemctl daemon-reload && systemctl enable --now drain-agent`;
/// then the agent answers `/healthz` on its default address.
fn install_agent(machine: &Machine, agent: &Path, unit: &str) -> Result<String> {
    let binary = fs::read(agent).with_context(|| format!("cannot read {}", agent.display()))?;
    machine.install("/usr/local/bin/drain-agent", &binary, 0o755)?;
    machine.install(
        "/etc/systemd/system/drain-agent.service",
        unit.as_bytes(),
        0o644,
    )?;
    // The target the apps order themselves after, installed with the agent's unit.
    let target = fs::read(workspace_root().join("deploy/systemd/drain-agent.target"))
        .context("cannot read deploy/systemd/drain-agent.target")?;
    machine.install("/etc/systemd/system/drain-agent.target", &target, 0o644)?;
    machine.ok(&["systemctl", "daemon-reload"])?;
    machine.ok(&["systemctl", "enable", "--now", "drain-agent"])?;
    let (status, body) = machine.wait_for(
        &format!("the agent answering /healthz on {DEFAULT_LISTEN}"),
        START_LIMIT,
        |m| {
            ensure!(
                m.property("drain-agent", "ActiveState")? != "failed",
                "drain-agent.service failed"
            );
            Ok(m.http_get(DEFAULT_LISTEN, "/healthz").ok())
        },
    )?;
    ensure!(
        status == 200,
        "/healthz on {DEFAULT_LISTEN}: {status} {body}"
    );
    Ok(format!(
        "active ({}), /healthz on {DEFAULT_LISTEN}: {status} {}",
        machine.property("drain-agent", "SubState")?,
        body.trim()
    ))
}

/// The drop-in the unit's comment documents (`systemctl edit drain-agent`:
/// `Environment=DRAIN_AGENT_LISTEN=…`), written where `systemctl edit` writes it, then
/// `systemctl daemon-reload && systemctl restart drain-agent`: the agent must answer on the
/// drop-in's address, and nothing may listen on the default one any more.
fn drop_in_moves_listener(machine: &Machine, unit: &str) -> Result<String> {
    let moved_to = documented_setting(unit, "DRAIN_AGENT_LISTEN")?;
    let moved_to = moved_to.as_str();
    let setting = format!("Environment=DRAIN_AGENT_LISTEN={moved_to}");
    ensure!(
        moved_to != DEFAULT_LISTEN,
        "the documented drop-in names the default address"
    );
    machine.install(
        "/etc/systemd/system/drain-agent.service.d/override.conf",
        format!("[Service]\n{setting}\n").as_bytes(),
        0o644,
    )?;
    machine.ok(&["systemctl", "daemon-reload"])?;
    machine.ok(&["systemctl", "restart", "drain-agent"])?;
    // Wait for the restarted agent on either address, then judge.
    let answered_on =
        machine.wait_for("the restarted agent answering /healthz", START_LIMIT, |m| {
            ensure!(
                m.property("drain-agent", "ActiveState")? != "failed",
                "drain-agent.service failed"
            );
            Ok([moved_to, DEFAULT_LISTEN]
                .into_iter()
                .find(|address| matches!(m.http_get(address, "/healthz"), Ok((200, _)))))
        })?;
    let listening = machine.listening()?;
    let exec_start = machine.property("drain-agent", "ExecStart")?;
    let environment = machine.property("drain-agent", "Environment")?;
    let default_port = DEFAULT_LISTEN.rsplit(':').next().unwrap_or(DEFAULT_LISTEN);
    let on_default: Vec<&String> = listening
        .iter()
        .filter(|address| address.rsplit(':').next() == Some(default_port))
        .collect();
    ensure!(
        answered_on == moved_to && on_default.is_empty(),
        "the drop-in did not move the agent: it answers on {answered_on}, not {moved_to}; \
         listening: {listening:?}; Environment={environment}; ExecStart={exec_start}"
    );
    let (status, body) = machine.http_get(moved_to, "/healthz")?;
    ensure!(status == 200, "/healthz on {moved_to}: {status} {body}");
    Ok(format!(
        "/healthz on {moved_to}: {status} {}; nothing on port {default_port} (listening: {})",
        body.trim(),
        listening.join(" ")
    ))
}

/// The example app's stop as its unit says: `systemctl stop example-app` while a client
/// holds a connection to it runs `drain-agent wait` in ExecStop=, which blocks past the
/// quiet window for as long as the connection is open; systemd sends SIGTERM only after the
/// client closed, and the app then has nothing open.
fn example_app_stop(machine: &Machine, app: &Path, unit: &str) -> Result<String> {
    let binary = fs::read(app).with_context(|| format!("cannot read {}", app.display()))?;
    machine.install("/usr/local/bin/example-app", &binary, 0o755)?;
    machine.install(
        "/etc/systemd/system/example-app.service",
        unit.as_bytes(),
        0o644,
    )?;
    machine.ok(&["systemctl", "daemon-reload"])?;
    stop_waits_for_held_connection(machine, unit, DEFAULT_LISTEN)
}

/// With the agent moved by its drop-in, the example app's stop hook must be told where it
/// is: the drop-in its unit's comment documents (`Environment=DRAIN_AGENT_URL=…`), for the
/// address the agent's documented drop-in moved it to. Then the stop waits as before.
fn example_app_follows_moved_agent(
    machine: &Machine,
    app_unit: &str,
    agent_unit: &str,
) -> Result<String> {
    let moved_to = documented_setting(agent_unit, "DRAIN_AGENT_LISTEN")?;
    let url = documented_setting(app_unit, "DRAIN_AGENT_URL")?;
    ensure!(
        url == format!("http://{moved_to}"),
        "the example unit's comment points the wait at {url}, the agent's unit moves it to {moved_to}"
    );
    machine.install(
        "/etc/systemd/system/example-app.service.d/override.conf",
        format!("[Service]\nEnvironment=DRAIN_AGENT_URL={url}\n").as_bytes(),
        0o644,
    )?;
    machine.ok(&["systemctl", "daemon-reload"])?;
    stop_waits_for_held_connection(machine, app_unit, &moved_to)
}

/// The value of `Environment=NAME=VALUE` in a unit's comments (the drop-in it documents).
fn documented_setting(unit: &str, name: &str) -> Result<String> {
    let prefix = format!("Environment={name}=");
    unit.lines()
        .filter(|line| line.starts_with('#'))
        .find_map(|line| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(prefix.as_str()))
        })
        .map(|value| value.trim_end_matches(['.', ',', ')', '`']).to_owned())
        .with_context(|| format!("the unit's comments show no {prefix}… drop-in"))
}

/// Starts example-app, holds a connection to it, stops it: the stop must wait (the wait in
/// ExecStop= asking the agent at `agent`) past the quiet window while the connection is
/// open, and SIGTERM must follow the close.
fn stop_waits_for_held_connection(machine: &Machine, unit: &str, agent: &str) -> Result<String> {
    let port = app_port(unit)?;
    let address = format!("127.0.0.1:{port}");
    let since = monotonic_micros()?;
    machine.ok(&["systemctl", "start", "example-app"])?;
    machine.wait_for(&format!("example-app on {address}"), START_LIMIT, |m| {
        ensure!(
            m.property("example-app", "ActiveState")? != "failed",
            "example-app.service failed"
        );
        Ok(m.http_get(&address, "/health")
            .ok()
            .filter(|(status, _)| *status == 200))
    })?;

    let mut client = HeldConnection::open(machine, &address)?;
    let drained_query = format!("/drained?port={port}&timeout=0");
    machine.wait_for("the agent counting the held connection", START_LIMIT, |m| {
        let (_, body) = m.http_get(agent, &drained_query)?;
        Ok(body.contains("\"active\":1").then_some(()))
    })?;

    // The wait's quiet window alone keeps the stop for that long; hold longer.
    let hold = quiet_window(unit)? + Duration::from_secs(3);
    machine.ok(&["systemctl", "stop", "--no-block", "example-app"])?;
    let stop_began = Instant::now();
    while stop_began.elapsed() < hold {
        let state = machine.property("example-app", "ActiveState")?;
        ensure!(
            state == "deactivating",
            "example-app is {state} {:.1} s into the stop, with the client still connected",
            stop_began.elapsed().as_secs_f64()
        );
        thread::sleep(Duration::from_millis(250));
    }
    let control = machine.property("example-app", "ControlPID")?;
    let waiting = machine
        .ok(&["cat", &format!("/proc/{control}/cmdline")])
        .map(|line| line.replace('\0', " "))
        .unwrap_or_default();
    ensure!(
        waiting.contains("drain-agent wait"),
        "{:.1} s into the stop, the unit's control process ({control}) is not `drain-agent wait`: {waiting:?}",
        stop_began.elapsed().as_secs_f64()
    );
    let early = journal_lines(machine, since, ": shutdown signal=")?;
    ensure!(
        early.is_empty(),
        "the app was signalled while the client was connected: {early:?}"
    );

    let closed_at = monotonic_micros()?;
    client.close()?;
    let closed = Instant::now();
    machine.wait_for("example-app stopped after the close", START_LIMIT, |m| {
        Ok((m.property("example-app", "ActiveState")? == "inactive").then_some(()))
    })?;
    let stop_took = closed.elapsed();
    // The wait's own last line (stdout, exit 0), then the app's line on its signal; journald
    // reads the units' output streams on its own time, so give it a moment.
    let drained_line = format!("port {port} drained (waited ");
    let (drained, signalled) = machine
        .wait_for("the wait's and the app's last lines in the journal", COMMAND_LIMIT, |m| {
            let drained = journal_lines(m, since, &drained_line)?;
            let signalled = journal_lines(m, since, ": shutdown signal=")?;
            Ok((!drained.is_empty() && !signalled.is_empty()).then_some((drained, signalled)))
        })
        .context("no `port N drained` line from `drain-agent wait` (its exit 0), or no signal line from the app")?;
    let [(drained_at, drained_message)] = drained.as_slice() else {
        bail!("one `port {port} drained` line expected from `drain-agent wait`, got {drained:?}");
    };
    let [(signalled_at, message)] = signalled.as_slice() else {
        bail!("one shutdown line expected from the app, got {signalled:?}");
    };
    ensure!(
        message.contains("signal=SIGTERM"),
        "the app was not stopped by SIGTERM: {message}"
    );
    ensure!(
        closed_at <= *drained_at && drained_at <= signalled_at,
        "out of order (monotonic µs): client closed {closed_at}, wait drained {drained_at}, \
         app signalled {signalled_at}"
    );
    ensure!(
        message.contains("open_connections=0"),
        "at SIGTERM the app still had connections: {message}"
    );
    Ok(format!(
        "held {:.1} s into the stop (> the {:?} quiet window) with `drain-agent wait` running \
         and no signal; client closed, then the wait ({:.0} ms later: \"{}\"), then SIGTERM \
         ({:.0} ms after the close: \"{}\"); inactive {:.1} s after the close",
        hold.as_secs_f64(),
        quiet_window(unit)?,
        (drained_at - closed_at) as f64 / 1000.0,
        drained_message.trim(),
        (signalled_at - closed_at) as f64 / 1000.0,
        message.trim(),
        stop_took.as_secs_f64()
    ))
}

/// What happens to the agent during the app's stop in [`agent_crash_mid_drain`].
#[derive(Clone, Copy)]
enum Interruption {
    /// `kill -9` of its main PID: `Restart=on-failure` brings it back.
    Kill,
    /// `systemctl restart drain-agent` (an upgrade, a changed drop-in).
    Restart,
}

impl std::fmt::Display for Interruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kill => "kill -9",
            Self::Restart => "systemctl restart drain-agent",
        })
    }
}

/// How soon the agent must be back after a `kill -9` (its unit's RestartSec=2s, and the
/// start), and how soon after the client's close SIGTERM must come in the crash check.
const RESTART_LIMIT: Duration = Duration::from_secs(8);
const SIGTERM_AFTER_CLOSE_LIMIT: Duration = Duration::from_secs(8);

/// Issue 23: the agent crashes (`kill -9`), or is restarted (`how`), while the example
/// app's stop waits on it. With a client holding a connection, `systemctl stop --no-block
/// example-app`, then 2 s later `kill -9` of the agent's main PID (or `systemctl restart
/// drain-agent`): the agent must be back within `RESTART_LIMIT` (its restart job not
/// queued behind the app's stop job), the stop must still wait for the connection, and
/// SIGTERM must come within `SIGTERM_AFTER_CLOSE_LIMIT` of the client's close — not at the
/// wait's 30 s timeout.
fn agent_crash_mid_drain(machine: &Machine, unit: &str, how: Interruption) -> Result<String> {
    let port = app_port(unit)?;
    let address = format!("127.0.0.1:{port}");
    let since = monotonic_micros()?;
    machine.ok(&["systemctl", "start", "example-app"])?;
    machine.wait_for(&format!("example-app on {address}"), START_LIMIT, |m| {
        Ok(m.http_get(&address, "/health")
            .ok()
            .filter(|(status, _)| *status == 200))
    })?;
    let mut client = HeldConnection::open(machine, &address)?;
    let drained_query = format!("/drained?port={port}&timeout=0");
    machine.wait_for("the agent counting the held connection", START_LIMIT, |m| {
        let (_, body) = m.http_get(DEFAULT_LISTEN, &drained_query)?;
        Ok(body.contains("\"active\":1").then_some(()))
    })?;

    machine.ok(&["systemctl", "stop", "--no-block", "example-app"])?;
    let stop_began = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let old_pid = machine.property("drain-agent", "MainPID")?;
    ensure!(
        old_pid != "0",
        "the agent has no main PID 2 s into the app's stop"
    );
    let killed = Instant::now();
    let interrupted = match how {
        // bash's builtin: the minimal rootfs has no procps.
        Interruption::Kill => machine
            .ok(&["bash", "-c", &format!("kill -9 {old_pid}")])
            .map(drop),
        // Bounded: `systemctl restart` blocks until the agent's restart job has run.
        Interruption::Restart => machine
            .run(&["systemctl", "restart", "drain-agent"], RESTART_LIMIT)
            .and_then(|done| {
                ensure!(
                    done.status.success(),
                    "systemctl restart drain-agent: {}",
                    done.stderr.trim()
                );
                Ok(())
            }),
    };
    let back = interrupted.and_then(|()| {
        machine.wait_for(&format!("the agent back after {how}"), RESTART_LIMIT, |m| {
            let pid = m.property("drain-agent", "MainPID")?;
            let state = m.property("drain-agent", "ActiveState")?;
            let up = pid != "0"
                && pid != old_pid
                && state == "active"
                && matches!(m.http_get(DEFAULT_LISTEN, "/healthz"), Ok((200, _)));
            Ok(up.then(|| killed.elapsed()))
        })
    });
    let back = match back {
        Ok(back) => back,
        Err(problem) => {
            let jobs = machine.ok(&["systemctl", "list-jobs"]).unwrap_or_default();
            let app = machine
                .property("example-app", "ActiveState")
                .unwrap_or_default();
            // Leave the machine as the next checks expect: app stopped, agent up.
            let _ = client.close();
            let _ = machine.wait_for("example-app stopped", Duration::from_secs(45), |m| {
                Ok((m.property("example-app", "ActiveState")? == "inactive").then_some(()))
            });
            let _ = machine.wait_for("the agent back", START_LIMIT, |m| {
                Ok(matches!(m.http_get(DEFAULT_LISTEN, "/healthz"), Ok((200, _))).then_some(()))
            });
            return Err(problem.context(format!("example-app {app}; jobs:\n{}", jobs.trim())));
        }
    };
    let app_state = machine.property("example-app", "ActiveState")?;
    ensure!(
        app_state == "deactivating",
        "example-app is {app_state} once the agent is back, with the client still connected"
    );
    // The restarted agent counts the held connection again (it seeds what is open).
    machine.wait_for(
        "the restarted agent counting the held connection",
        START_LIMIT,
        |m| {
            let (_, body) = m.http_get(DEFAULT_LISTEN, &drained_query)?;
            Ok(body.contains("\"active\":1").then_some(()))
        },
    )?;
    // Hold past the wait's quiet window, so the close is what ends the drain.
    let hold = quiet_window(unit)? + Duration::from_secs(2);
    while stop_began.elapsed() < hold {
        thread::sleep(Duration::from_millis(100));
    }
    let app_state = machine.property("example-app", "ActiveState")?;
    ensure!(
        app_state == "deactivating",
        "example-app is {app_state} {:.1} s into the stop, with the client still connected",
        stop_began.elapsed().as_secs_f64()
    );
    let early = journal_lines(machine, since, ": shutdown signal=")?;
    ensure!(
        early.is_empty(),
        "the app was signalled while the client was connected: {early:?}"
    );

    let closed_at = monotonic_micros()?;
    client.close()?;
    machine.wait_for(
        "example-app stopped after the close",
        Duration::from_secs(45),
        |m| Ok((m.property("example-app", "ActiveState")? == "inactive").then_some(())),
    )?;
    let signalled =
        machine.wait_for("the app's signal line in the journal", COMMAND_LIMIT, |m| {
            let lines = journal_lines(m, since, ": shutdown signal=")?;
            Ok((!lines.is_empty()).then_some(lines))
        })?;
    let [(signalled_at, message)] = signalled.as_slice() else {
        bail!("one shutdown line expected from the app, got {signalled:?}");
    };
    ensure!(
        *signalled_at >= closed_at,
        "the app was signalled before the client closed: {message}"
    );
    let after_close = Duration::from_micros(signalled_at - closed_at);
    ensure!(
        after_close <= SIGTERM_AFTER_CLOSE_LIMIT,
        "SIGTERM came {:.1} s after the client closed (limit {SIGTERM_AFTER_CLOSE_LIMIT:?}): {message}",
        after_close.as_secs_f64()
    );
    ensure!(
        message.contains("signal=SIGTERM") && message.contains("open_connections=0"),
        "the app was not stopped by SIGTERM with nothing open: {message}"
    );
    Ok(format!(
        "agent (pid {old_pid}) {how} 2 s into the stop, back (pid {}) {:.1} s later while the \
         app still waited; client closed {:.1} s into the stop, SIGTERM {:.1} s after the close: \"{}\"",
        machine.property("drain-agent", "MainPID")?,
        back.as_secs_f64(),
        hold.as_secs_f64(),
        after_close.as_secs_f64(),
        message.trim()
    ))
}

/// Host shutdown: with a client holding a connection to example-app, the container's
/// systemd is asked to power off. For the app's quiet window and more, its stop must stay
/// in ExecStop= (`drain-agent wait`) while drain-agent.service is still active (its own
/// stop job waiting behind the app's); then the client closes and the container powers off.
/// The machine is left powering off.
fn poweroff_drains_first(machine: &Machine, unit: &str) -> Result<String> {
    let port = app_port(unit)?;
    let address = format!("127.0.0.1:{port}");
    machine.ok(&["systemctl", "start", "example-app"])?;
    machine.wait_for(&format!("example-app on {address}"), START_LIMIT, |m| {
        Ok(m.http_get(&address, "/health")
            .ok()
            .filter(|(status, _)| *status == 200))
    })?;
    let mut client = HeldConnection::open(machine, &address)?;
    machine.request_power_off()?;
    let began = Instant::now();
    let hold = quiet_window(unit)? + Duration::from_secs(2);
    let mut jobs = String::new();
    let mut saw_wait = false;
    while began.elapsed() < hold {
        let app = machine.property("example-app", "ActiveState")?;
        let agent = machine.property("drain-agent", "ActiveState")?;
        let agent_sub = machine.property("drain-agent", "SubState")?;
        let elapsed = began.elapsed().as_secs_f64();
        // The shutdown transaction may take a moment to reach the app.
        if app == "active" && elapsed < 2.0 {
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        ensure!(
            app == "deactivating",
            "example-app is {app} {elapsed:.1} s into the poweroff, with the client still connected"
        );
        ensure!(
            agent == "active" && agent_sub == "running",
            "drain-agent is {agent} ({agent_sub}) {elapsed:.1} s into the poweroff, while \
             example-app still drains"
        );
        if !saw_wait {
            let control = machine.property("example-app", "ControlPID")?;
            let waiting = machine
                .ok(&["cat", &format!("/proc/{control}/cmdline")])
                .map(|line| line.replace('\0', " "))
                .unwrap_or_default();
            saw_wait = waiting.contains("drain-agent wait");
            if saw_wait {
                jobs = machine.ok(&["systemctl", "list-jobs", "--no-legend"])?;
            }
        }
        thread::sleep(Duration::from_millis(250));
    }
    ensure!(
        saw_wait,
        "example-app's control process was never `drain-agent wait` during the poweroff"
    );
    let agent_stop_waits = jobs
        .lines()
        .any(|line| line.contains("drain-agent.service") && line.contains("stop"));
    ensure!(
        agent_stop_waits,
        "no stop job for drain-agent.service waiting while the app drained: {}",
        jobs.trim()
    );
    client.close()?;
    Ok(format!(
        "{:.1} s into the poweroff example-app still in `drain-agent wait`, drain-agent active \
         (running) with its stop job waiting; jobs then: {}",
        hold.as_secs_f64(),
        jobs.lines()
            .filter(|line| line.contains("drain-agent") || line.contains("example-app"))
            .map(|line| line
                .split_whitespace()
                .take(4)
                .collect::<Vec<_>>()
                .join(" "))
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

/// The port in the example unit's `ExecStart= … --listen ADDR:PORT`.
fn app_port(unit: &str) -> Result<u16> {
    let exec_start = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .context("the example unit has no ExecStart=")?;
    let listen = exec_start
        .split_whitespace()
        .skip_while(|word| *word != "--listen")
        .nth(1)
        .context("the example unit's ExecStart= has no --listen")?;
    let port = listen.rsplit(':').next().unwrap_or_default();
    port.parse()
        .with_context(|| format!("port of --listen {listen}"))
}

/// The `--quiet` of the example unit's `drain-agent wait` (seconds: `5s`).
fn quiet_window(unit: &str) -> Result<Duration> {
    let wait = unit
        .lines()
        .filter_map(|line| line.strip_prefix("ExecStop="))
        .find(|line| line.contains("drain-agent wait"))
        .context("the example unit has no ExecStop= with `drain-agent wait`")?;
    let quiet = wait
        .split_whitespace()
        .skip_while(|word| *word != "--quiet")
        .nth(1)
        .unwrap_or("0s");
    let seconds = quiet
        .strip_suffix('s')
        .unwrap_or(quiet)
        .parse()
        .with_context(|| format!("--quiet {quiet}: expected seconds"))?;
    Ok(Duration::from_secs(seconds))
}

/// The example app's journal lines (its own and its ExecStop= commands') since `since` that
/// contain `needle`, with their monotonic timestamps (µs; the container shares the host's
/// clock).
fn journal_lines(machine: &Machine, since: u64, needle: &str) -> Result<Vec<(u64, String)>> {
    let journal = machine.ok(&[
        "journalctl",
        "-u",
        "example-app",
        "-o",
        "json",
        "--no-pager",
    ])?;
    let mut lines = Vec::new();
    for line in journal.lines().filter(|line| !line.trim().is_empty()) {
        let entry: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("journal entry {line}"))?;
        let message = entry["MESSAGE"].as_str().unwrap_or_default();
        if !message.contains(needle) {
            continue;
        }
        let at = entry["__MONOTONIC_TIMESTAMP"]
            .as_str()
            .and_then(|at| at.parse().ok())
            .with_context(|| format!("journal entry without a monotonic time: {line}"))?;
        if at >= since {
            lines.push((at, message.to_owned()));
        }
    }
    Ok(lines)
}

fn monotonic_micros() -> Result<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the time into the timespec it is given.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    ensure!(read == 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    Ok(
        u64::try_from(now.tv_sec).context("monotonic seconds")? * 1_000_000
            + u64::try_from(now.tv_nsec).context("monotonic nanoseconds")? / 1000,
    )
}

/// A TCP connection to an address inside the container, held open by a shell there until
/// `close` (bash's /dev/tcp; the shell waits on its stdin, which is ours).
struct HeldConnection {
    shell: Child,
    stdin: Option<ChildStdin>,
}

impl HeldConnection {
    fn open(machine: &Machine, address: &str) -> Result<Self> {
        let (host, port) = address
            .rsplit_once(':')
            .with_context(|| format!("no port in {address}"))?;
        let script =
            format!("exec 3<>/dev/tcp/{host}/{port} && echo connected && read -r _; exit 0");
        let mut shell = machine
            .command(&["bash", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the client in the container")?;
        let stdin = shell.stdin.take();
        let stdout = shell.stdout.take().context("the client's stdout")?;
        let (send, receive) = mpsc::channel();
        thread::spawn(move || {
            let mut first = String::new();
            let _ = BufReader::new(stdout).read_line(&mut first);
            let _ = send.send(first);
        });
        let mut held = Self { shell, stdin };
        let first = receive.recv_timeout(COMMAND_LIMIT).unwrap_or_default();
        if first.trim() != "connected" {
            held.kill();
            bail!("the client could not connect to {address}");
        }
        Ok(held)
    }

    /// Closes the connection: the shell reads end of file and exits, closing its socket.
    fn close(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + COMMAND_LIMIT;
        while Instant::now() < deadline {
            if let Some(exit) = self.shell.try_wait().context("the client")? {
                ensure!(exit.success(), "the client exited {exit}");
                return Ok(());
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        bail!("the client did not exit within {COMMAND_LIMIT:?}")
    }

    fn kill(&mut self) {
        drop(self.stdin.take());
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        if self.shell.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// After a failure: what systemd and the journal say about the units.
fn print_diagnostics(machine: &Machine) {
    let mut report = String::new();
    for args in [
        &[
            "systemctl",
            "--no-pager",
            "status",
            "drain-agent",
            "example-app",
        ][..],
        &[
            "journalctl",
            "--no-pager",
            "-n",
            "60",
            "-u",
            "drain-agent",
            "-u",
            "example-app",
        ][..],
        &["ss", "-Htlnp"][..],
    ] {
        let _ = writeln!(report, "--- {}", args.join(" "));
        match machine.run(args, COMMAND_LIMIT) {
            Ok(done) => {
                let _ = writeln!(report, "{}{}", done.stdout, done.stderr);
            }
            Err(problem) => {
                let _ = writeln!(report, "{problem:#}");
            }
        }
    }
    println!("xtask systemd: inside the container:\n{report}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_example_units_port_and_quiet_window() {
        let unit = fs::read_to_string(workspace_root().join("deploy/systemd/example-app.service"))
            .unwrap();
        assert_eq!(app_port(&unit).unwrap(), 8080);
        assert_eq!(quiet_window(&unit).unwrap(), Duration::from_secs(5));
    }

    #[test]
    fn the_cache_key_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
