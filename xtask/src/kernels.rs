//! `cargo xtask kernels`: the agent's release build on every kernel our users run.
//!
//! The README promises Linux ≥ 5.9 with BTF, but the test suite only ever sees the build
//! machine's kernel. This boots Debian's cloud kernels (virtio, BTF) under qemu (TCG: no KVM
//! needed) with a busybox initramfs around the agent and an in-guest test
//! (`xtask/guest/init.sh`) that checks every attach mode, seeding, counting, wake-ups and a
//! second network namespace, and prints `RESULT key=value` lines on the serial console.
//!
//! Nothing is installed on the host: kernels, qemu (with the libraries the host lacks and its
//! firmware) and busybox are Debian packages fetched with `apt-get download` and unpacked with
//! `dpkg-deb -x` under `target/kernels/`. Kernels come from a private apt configuration that
//! adds older and newer suites without touching the host's; qemu and busybox come from the
//! host's own configuration, so their libraries match the host's libc.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;

use crate::{cargo, is_root, setup, status, workspace_root};

/// The Debian suites searched for kernels, oldest first: bullseye has 5.10, bookworm 6.1,
/// bookworm-backports and trixie 6.12, trixie-backports and sid the newest. No reachable
/// suite has 5.15 or 6.6 (Debian never shipped them in a release, and sid moved on).
const SUITES: &[&str] = &[
    "bullseye",
    "bookworm",
    "bookworm-backports",
    "trixie",
    "trixie-backports",
    "sid",
];

/// Series always in the default (CI) run, besides the oldest and the newest: the kernels of
/// Debian 12 and 13, i.e. of most hosts.
const CI_SERIES: &[&str] = &["6.1", "6.12"];

/// The in-guest test, PID 1 of the initramfs.
const GUEST_INIT: &str = include_str!("../guest/init.sh");

/// The checks a guest must report as `ok…`, in table order, with their column titles.
const CHECKS: &[(&str, &str)] = &[
    ("boots", "boots"),
    ("btf", "BTF"),
    ("attach_default", "default attach"),
    ("attach_tp-btf", "tp-btf"),
    ("attach_tracepoint", "tracepoint"),
    ("attach_raw-tracepoint", "raw-tracepoint"),
    ("preallocated", "preallocated map"),
    ("pre_existing", "pre-existing counted"),
    ("new_connections", "new counted"),
    ("socket_tables", "socket tables"),
    ("wakeup", "drained wake-up"),
    ("netns_seed", "2nd netns seeded"),
    ("pod_port", "pod port steered"),
];

/// Environment variable that overrides the Debian archive taken from the host's apt sources.
const MIRROR_VARIABLE: &str = "DRAIN_AGENT_DEBIAN_MIRROR";

/// Re-read the suites' package lists when they are older than this.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Args)]
pub struct KernelsArgs {
    /// Kernels to boot: a series (`6.1`) or a full version (`6.12.57+deb12`).
    /// Default: the CI subset, i.e. the oldest series, 6.1, 6.12 and the newest.
    pub kernels: Vec<String>,
    /// Boot the newest kernel of every series the suites offer.
    #[arg(long, conflicts_with = "kernels")]
    pub all: bool,
    /// Only list the cloud kernels the suites offer.
    #[arg(long)]
    pub list: bool,
    /// Rounds of the wake-up stress in each guest.
    #[arg(long, default_value_t = 100)]
    pub rounds: u32,
    /// Seconds a guest may run before it is killed and reported as failed.
    #[arg(long, default_value_t = 300)]
    pub guest_timeout: u64,
    /// Re-read the suites' package lists even when the cached ones are recent.
    #[arg(long)]
    pub refresh: bool,
    /// Also write the table, with the date and commit, into deploy/COMPATIBILITY.md (the
    /// whole matrix only: the document says it covers every series).
    #[arg(long, requires = "all")]
    pub write: bool,
}

/// One cloud kernel a suite offers.
#[derive(Clone, Debug)]
struct Available {
    /// The kernel's ABI name without the flavour, e.g. `6.12.57+deb12`.
    abi: String,
    /// `major.minor`.
    series: String,
    /// The package that holds the image: `linux-binary-…` from 6.19 on (the
    /// `linux-image-…` package is then empty), else `linux-image-…`.
    package: String,
    version: String,
    suite: String,
}

impl Available {
    /// Numbers of the ABI name, to order versions (`5.10.0-32` < `6.1.0-50` < `6.12.57+deb12`).
    fn order(&self) -> Vec<u64> {
        numbers(&self.abi)
    }
}

fn numbers(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

pub fn kernels(args: &KernelsArgs) -> Result<()> {
    ensure_host_commands()?;
    // The kernels' modules come compressed (xz or zstd, by release).
    setup::ensure_debian_packages(&[("xz-utils", "xz"), ("zstd", "zstd")])?;
    let cache = target_dir().join("kernels");
    let apt = PrivateApt::new(&cache.join("apt"))?;
    apt.update(args.refresh)?;
    let available = apt.cloud_kernels()?;
    ensure!(!available.is_empty(), "the suites offer no cloud kernel");
    if args.list {
        print_list(&available);
        return Ok(());
    }
    let chosen = choose(&available, &args.kernels, args.all)?;
    eprintln!(
        "xtask: kernels to boot: {}",
        chosen
            .iter()
            .map(|kernel| kernel.abi.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    setup::setup(&setup::SetupArgs::toolchain_only())?;
    cargo(&["build", "--release", "--package", "drain-agent"])?;
    let tools = HostTools::fetch(&cache.join("host"))?;
    let initramfs = cache.join("initramfs.cpio");
    build_initramfs(
        &target_dir().join("release/drain-agent"),
        &tools.busybox,
        &initramfs,
    )?;

    let logs = cache.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut rows = Vec::new();
    let started = Instant::now();
    for kernel in &chosen {
        let (vmlinuz, modules) = apt.fetch_kernel(kernel, &cache)?;
        // The shared initramfs, then this kernel's modules: the kernel unpacks concatenated
        // cpio archives one after the other.
        let own_initramfs = cache.join(format!("initramfs-{}.cpio", kernel.abi));
        let mut bytes =
            fs::read(&initramfs).with_context(|| format!("cannot read {}", initramfs.display()))?;
        bytes.extend(modules_archive(&modules)?);
        fs::write(&own_initramfs, bytes)
            .with_context(|| format!("cannot write {}", own_initramfs.display()))?;
        eprintln!("xtask: booting {} ({})", kernel.abi, kernel.suite);
        let log = logs.join(format!("{}.log", kernel.abi));
        let guest = tools.boot(
            &vmlinuz,
            &own_initramfs,
            args.rounds,
            Duration::from_secs(args.guest_timeout),
            &log,
        )?;
        let row = Row::new(kernel, guest);
        eprintln!(
            "xtask: {} {} in {:.0} s (console log {})",
            kernel.abi,
            if row.failures().is_empty() {
                "passed"
            } else {
                "FAILED"
            },
            row.guest.seconds,
            log.display()
        );
        rows.push(row);
    }
    let table = render_table(&rows, args.rounds);
    println!("{table}");
    println!(
        "xtask kernels: {} kernels in {:.0} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    let document = compatibility_document(&table)?;
    fs::write(cache.join("COMPATIBILITY.md"), &document)
        .context("cannot write target/kernels/COMPATIBILITY.md")?;
    if args.write {
        let path = workspace_root().join("deploy/COMPATIBILITY.md");
        // The generated part is everything before the first `## ` section; the sections
        // (distributions, where it cannot run) are written by hand and kept.
        let kept = fs::read_to_string(&path)
            .ok()
            .and_then(|old| old.find("\n## ").map(|at| old[at..].to_owned()))
            .unwrap_or_default();
        let written = if kept.is_empty() {
            document.clone()
        } else {
            format!("{}\n{kept}", document.trim_end_matches('\n'))
        };
        fs::write(&path, written).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("xtask: wrote {}", path.display());
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|row| !row.failures().is_empty())
        .map(|row| format!("{} ({})", row.kernel.abi, row.failures().join(", ")))
        .collect();
    if !failed.is_empty() {
        bail!("the agent failed on: {}", failed.join("; "));
    }
    Ok(())
}

/// Where cargo builds: `$CARGO_TARGET_DIR`, else the workspace's `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// apt-get, apt-cache, dpkg-deb and ldd ship with every Debian system (the matrix needs no
/// other host package: the initramfs is written here, not by cpio).
fn ensure_host_commands() -> Result<()> {
    for command in ["apt-get", "apt-cache", "dpkg-deb", "dpkg-query", "ldd"] {
        let found = Command::new(command)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        ensure!(
            found,
            "`{command}` is missing: `cargo xtask kernels` fetches kernels and qemu from Debian's archive and needs a Debian-based host"
        );
    }
    Ok(())
}

/// The series of an ABI name: `6.12.57+deb12` → `6.12`.
fn series_of(abi: &str) -> Option<String> {
    let mut parts = abi.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some(format!("{major}.{minor}"))
}

/// The newest kernel of each series, oldest series first.
fn newest_per_series(available: &[Available]) -> Vec<Available> {
    let mut newest: BTreeMap<Vec<u64>, Available> = BTreeMap::new();
    for kernel in available {
        let key = numbers(&kernel.series);
        let replace = newest
            .get(&key)
            .is_none_or(|known| known.order() < kernel.order());
        if replace {
            newest.insert(key, kernel.clone());
        }
    }
    newest.into_values().collect()
}

fn choose(available: &[Available], wanted: &[String], all: bool) -> Result<Vec<Available>> {
    let per_series = newest_per_series(available);
    if all {
        return Ok(per_series);
    }
    let wanted: Vec<String> = if wanted.is_empty() {
        let mut subset = Vec::new();
        if let Some(oldest) = per_series.first() {
            subset.push(oldest.series.clone());
        }
        subset.extend(CI_SERIES.iter().map(|series| (*series).to_owned()));
        if let Some(newest) = per_series.last() {
            subset.push(newest.series.clone());
        }
        subset.dedup();
        subset
    } else {
        wanted.to_vec()
    };
    let mut chosen: Vec<Available> = Vec::new();
    for name in &wanted {
        let found = available
            .iter()
            .find(|kernel| kernel.abi == *name)
            .or_else(|| per_series.iter().find(|kernel| kernel.series == *name))
            .with_context(|| {
                format!("no Debian suite offers a cloud kernel {name} (see `cargo xtask kernels --list`)")
            })?;
        if !chosen.iter().any(|kernel| kernel.abi == found.abi) {
            chosen.push(found.clone());
        }
    }
    Ok(chosen)
}

fn print_list(available: &[Available]) {
    let newest: BTreeSet<String> = newest_per_series(available)
        .into_iter()
        .map(|kernel| kernel.abi)
        .collect();
    let mut sorted = available.to_vec();
    sorted.sort_by_key(Available::order);
    println!("| series | kernel | package | version | suite | booted by --all |");
    println!("|---|---|---|---|---|---|");
    for kernel in &sorted {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            kernel.series,
            kernel.abi,
            kernel.package,
            kernel.version,
            kernel.suite,
            if newest.contains(&kernel.abi) {
                "yes"
            } else {
                ""
            }
        );
    }
    let series: BTreeSet<&str> = available.iter().map(|k| k.series.as_str()).collect();
    for missing in ["5.15", "6.6"] {
        if !series.contains(missing) {
            println!("\n{missing}: no reachable Debian suite offers it.");
        }
    }
}

/// The Debian archive: `$DRAIN_AGENT_DEBIAN_MIRROR`, else the first non-security archive in
/// the host's apt sources (deb822 `.sources` files, then `sources.list`), so the matrix uses
/// whatever mirror this machine is allowed to reach.
pub fn debian_mirror() -> Result<String> {
    if let Ok(mirror) = std::env::var(MIRROR_VARIABLE)
        && !mirror.trim().is_empty()
    {
        return Ok(mirror.trim().trim_end_matches('/').to_owned());
    }
    let mut files: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "sources"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for file in &files {
        let text = fs::read_to_string(file).unwrap_or_default();
        if let Some(mirror) = mirror_in_deb822(&text) {
            return Ok(mirror);
        }
    }
    let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Some(mirror) = mirror_in_sources_list(&list) {
        return Ok(mirror);
    }
    bail!("cannot find a Debian archive in the host's apt sources; set {MIRROR_VARIABLE} to one")
}

/// Is this the main archive (not security, not a third party's)?
fn is_main_archive(uri: &str, suites: &str) -> bool {
    uri.starts_with("http")
        && uri.trim_end_matches('/').ends_with("/debian")
        && !suites.contains("-security")
}

fn mirror_in_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_owned())
            })
        };
        let (Some(uris), suites) = (field("URIs"), field("Suites").unwrap_or_default()) else {
            continue;
        };
        if let Some(uri) = uris
            .split_whitespace()
            .find(|uri| is_main_archive(uri, &suites))
        {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    None
}

fn mirror_in_sources_list(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line
            .split_whitespace()
            .skip_while(|word| *word == "deb")
            .skip_while(|word| word.starts_with('[') || word.ends_with(']'));
        if !line.trim_start().starts_with("deb ") {
            return None;
        }
        let uri = words.next()?;
        let suite = words.next().unwrap_or_default();
        is_main_archive(uri, suite).then(|| uri.trim_end_matches('/').to_owned())
    })
}

/// An apt configuration of our own (sources, lists, cache) under target/kernels/apt, so the
/// kernel suites never touch the host's apt set-up.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(dir: &Path) -> Result<Self> {
        let mirror = debian_mirror()?;
        for sub in ["state/lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        ensure!(
            Path::new(keyring).exists(),
            "{keyring} is missing (package debian-archive-keyring)"
        );
        let mut sources = String::new();
        for suite in SUITES {
            let _ = writeln!(sources, "deb [signed-by={keyring}] {mirror} {suite} main");
        }
        let list = dir.join("sources.list");
        if fs::read_to_string(&list).ok().as_deref() != Some(sources.as_str()) {
            fs::write(&list, &sources).context("cannot write the private sources.list")?;
            // New sources: the lists must be read again.
            let _ = fs::remove_file(dir.join("state/updated"));
        }
        // An empty dpkg status: what the host has installed does not matter here.
        let status_file = dir.join("state/status");
        if !status_file.exists() {
            fs::write(&status_file, "").context("cannot write the private dpkg status")?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn options(&self) -> Vec<String> {
        let dir = self.dir.display();
        [
            format!("Dir::Etc::sourcelist={dir}/sources.list"),
            "Dir::Etc::sourceparts=-".to_owned(),
            format!("Dir::State={dir}/state"),
            format!("Dir::State::status={dir}/state/status"),
            format!("Dir::Cache={dir}/cache"),
            // Only the package lists: no translations or AppStream metadata.
            "Acquire::Languages=none".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false".to_owned(),
            // Downloads land in our own directories, which apt's sandbox user cannot write.
            "APT::Sandbox::User=root".to_owned(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_owned(), option])
        .collect()
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(self.options());
        command
    }

    fn update(&self, refresh: bool) -> Result<()> {
        let stamp = self.dir.join("state/updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|time| time.elapsed().ok())
            .is_some_and(|age| age < LISTS_MAX_AGE);
        if fresh && !refresh {
            return Ok(());
        }
        eprintln!("xtask: reading the package lists of {}", SUITES.join(", "));
        status(self.command("apt-get").args(["update", "-q"]))
            .context("cannot read the Debian suites' package lists")?;
        fs::write(&stamp, "").context("cannot stamp the package lists")
    }

    /// Every `linux-image-*-cloud-amd64` / `linux-binary-*-cloud-amd64` the suites offer.
    fn cloud_kernels(&self) -> Result<Vec<Available>> {
        let names = output(self.command("apt-cache").args(["pkgnames", "linux-"]))?;
        let mut by_abi: BTreeMap<String, String> = BTreeMap::new();
        for name in names.lines().map(str::trim) {
            let Some(rest) = name.strip_suffix("-cloud-amd64") else {
                continue;
            };
            let (abi, binary) = if let Some(abi) = rest.strip_prefix("linux-binary-") {
                (abi, true)
            } else if let Some(abi) = rest.strip_prefix("linux-image-") {
                (abi, false)
            } else {
                continue;
            };
            // Skips the metapackage and linux-binary-unsigned-*.
            if !abi.starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            // From 6.19 the image is in linux-binary-*; prefer it whenever it exists.
            if binary || !by_abi.contains_key(abi) {
                by_abi.insert(abi.to_owned(), name.to_owned());
            }
        }
        if by_abi.is_empty() {
            return Ok(Vec::new());
        }
        let madison = output(
            self.command("apt-cache")
                .arg("madison")
                .args(by_abi.values()),
        )?;
        let mut available = Vec::new();
        for (abi, package) in by_abi {
            // ` pkg | version | URI suite/main amd64 Packages`; the first line is the newest.
            let Some((version, suite)) = madison.lines().find_map(|line| {
                let mut fields = line.split('|').map(str::trim);
                (fields.next()? == package).then_some(())?;
                let version = fields.next()?.to_owned();
                let suite = fields.next()?.split_whitespace().nth(1)?;
                Some((version, suite.split('/').next()?.to_owned()))
            }) else {
                continue;
            };
            let Some(series) = series_of(&abi) else {
                continue;
            };
            available.push(Available {
                abi,
                series,
                package,
                version,
                suite,
            });
        }
        Ok(available)
    }

    /// The kernel image and its socket-diagnostics modules, downloaded and unpacked once
    /// into target/kernels/vmlinuz/ and target/kernels/modules/ABI/.
    fn fetch_kernel(&self, kernel: &Available, cache: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
        let images = cache.join("vmlinuz");
        let image = images.join(format!("vmlinuz-{}", kernel.abi));
        let modules = cache.join("modules").join(&kernel.abi);
        let done = modules.join(".done");
        if image.exists() && done.exists() {
            return Ok((image, diag_modules(&modules)));
        }
        fs::create_dir_all(&images).context("cannot create target/kernels/vmlinuz")?;
        let downloads = cache.join("downloads");
        fs::create_dir_all(&downloads).context("cannot create target/kernels/downloads")?;
        eprintln!("xtask: downloading {} {}", kernel.package, kernel.version);
        status(
            self.command("apt-get")
                .args(["download", "-q"])
                .arg(format!("{}={}", kernel.package, kernel.version))
                .current_dir(&downloads),
        )?;
        let deb = find_deb(&downloads, &kernel.package)?;
        let unpacked = cache.join(format!("unpack-{}", kernel.abi));
        let _ = fs::remove_dir_all(&unpacked);
        status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        // boot/vmlinuz-VER, or from 7.3 usr/lib/modules/VER/vmlinuz.
        let candidates = [
            unpacked.join(format!("boot/vmlinuz-{}-cloud-amd64", kernel.abi)),
            unpacked.join(format!(
                "usr/lib/modules/{}-cloud-amd64/vmlinuz",
                kernel.abi
            )),
        ];
        let found = candidates
            .iter()
            .find(|path| path.is_file())
            .with_context(|| {
                format!(
                    "{} has no kernel image at {} or {}",
                    kernel.package,
                    candidates[0].display(),
                    candidates[1].display()
                )
            })?;
        fs::copy(found, &image).with_context(|| format!("cannot copy {}", found.display()))?;
        // The cloud kernels have virtio, BTF, bpffs and tracefs built in, but the socket
        // diagnostics (inet_diag, tcp_diag: what `ss` and the agent's confirmation read) are
        // modules, which a host loads on demand and this initramfs cannot: keep those two,
        // uncompressed, for the guest to insmod. A kernel with them built in has none.
        let _ = fs::remove_dir_all(&modules);
        fs::create_dir_all(&modules)
            .with_context(|| format!("cannot create {}", modules.display()))?;
        // From 7.3 the modules are a package of their own, linux-modules-ABI.
        if find_module(&unpacked, DIAG_MODULES[0])?.is_none()
            && let Some(flavour) = kernel
                .package
                .strip_prefix("linux-binary-")
                .or_else(|| kernel.package.strip_prefix("linux-image-"))
        {
            let package = format!("linux-modules-{flavour}");
            eprintln!("xtask: downloading {package} {}", kernel.version);
            let fetched = status(
                self.command("apt-get")
                    .args(["download", "-q"])
                    .arg(format!("{package}={}", kernel.version))
                    .current_dir(&downloads),
            );
            match fetched.and_then(|()| find_deb(&downloads, &package)) {
                Ok(modules_deb) => {
                    status(
                        Command::new("dpkg-deb")
                            .arg("-x")
                            .arg(&modules_deb)
                            .arg(&unpacked),
                    )?;
                    let _ = fs::remove_file(&modules_deb);
                }
                // The guest then says so in its socket-tables cell.
                Err(problem) => eprintln!(
                    "xtask: no socket-diagnostics modules for {}: {problem:#}",
                    kernel.abi
                ),
            }
        }
        for name in DIAG_MODULES {
            if let Some(packed) = find_module(&unpacked, name)? {
                unpack_module(&packed, &modules.join(format!("{name}.ko")))?;
            }
        }
        fs::write(&done, "").with_context(|| format!("cannot write {}", done.display()))?;
        let _ = fs::remove_dir_all(&unpacked);
        let _ = fs::remove_file(&deb);
        Ok((image, diag_modules(&modules)))
    }
}

/// The socket-diagnostics modules, in load order (tcp_diag needs inet_diag).
const DIAG_MODULES: [&str; 2] = ["inet_diag", "tcp_diag"];

/// The unpacked modules of `dir`, in load order.
fn diag_modules(dir: &Path) -> Vec<PathBuf> {
    DIAG_MODULES
        .iter()
        .map(|name| dir.join(format!("{name}.ko")))
        .filter(|path| path.is_file())
        .collect()
}

/// `NAME.ko`, `.ko.xz` or `.ko.zst` under the package's `lib/modules/*/kernel/net/ipv4/`
/// (or `usr/lib/…`, from 7.3).
fn find_module(unpacked: &Path, name: &str) -> Result<Option<PathBuf>> {
    for root in ["lib/modules", "usr/lib/modules"] {
        let Ok(versions) = fs::read_dir(unpacked.join(root)) else {
            continue;
        };
        for version in versions.filter_map(Result::ok) {
            let dir = version.path().join("kernel/net/ipv4");
            for suffix in ["ko", "ko.xz", "ko.zst"] {
                let path = dir.join(format!("{name}.{suffix}"));
                if path.is_file() {
                    return Ok(Some(path));
                }
            }
        }
    }
    Ok(None)
}

/// Copies a module to `out`, uncompressed (busybox's insmod takes plain modules only).
fn unpack_module(packed: &Path, out: &Path) -> Result<()> {
    let name = packed.display().to_string();
    let bytes = if name.ends_with(".xz") {
        output_bytes(Command::new("xz").args(["-dc"]).arg(packed))?
    } else if name.ends_with(".zst") {
        output_bytes(Command::new("zstd").args(["-dcq"]).arg(packed))?
    } else {
        fs::read(packed).with_context(|| format!("cannot read {name}"))?
    };
    fs::write(out, bytes).with_context(|| format!("cannot write {}", out.display()))
}

fn output_bytes(command: &mut Command) -> Result<Vec<u8>> {
    let shown = format!("{command:?}");
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    ensure!(out.status.success(), "{shown} failed: {}", out.status);
    Ok(out.stdout)
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix) && name.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb"))
}

fn output(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    ensure!(out.status.success(), "{shown} failed ({})", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// qemu and busybox, unpacked from the host's own suites (never installed: installing
/// qemu-system-x86 could replace packages the host holds, e.g. a backported qemu-utils).
struct HostTools {
    qemu: PathBuf,
    library_path: String,
    firmware: Vec<PathBuf>,
    busybox: PathBuf,
}

/// What the guests need from the host's suites; their dependencies that the host lacks are
/// fetched too (shared libraries, and seabios for the firmware).
const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-system-data", "busybox-static"];

impl HostTools {
    fn fetch(dir: &Path) -> Result<Self> {
        let root = dir.join("root");
        let complete = dir.join("complete");
        if !complete.exists() {
            Self::unpack(dir, &root)?;
        }
        let library_path = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
            .iter()
            .map(|sub| root.join(sub).display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let tools = Self {
            qemu: root.join("usr/bin/qemu-system-x86_64"),
            library_path,
            firmware: vec![root.join("usr/share/qemu"), root.join("usr/share/seabios")],
            busybox: root.join("bin/busybox"),
        };
        tools.check()?;
        if !complete.exists() {
            fs::write(&complete, "").context("cannot mark qemu as unpacked")?;
        }
        Ok(tools)
    }

    fn unpack(dir: &Path, root: &Path) -> Result<()> {
        let downloads = dir.join("downloads");
        let _ = fs::remove_dir_all(&downloads);
        let _ = fs::remove_dir_all(root);
        fs::create_dir_all(&downloads).context("cannot create target/kernels/host")?;
        if Command::new("apt-cache")
            .args(["show", HOST_PACKAGES[0]])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_or(true, |exit| !exit.success())
        {
            ensure!(
                is_root(),
                "the host's apt lists do not know {}: run `apt-get update` as root",
                HOST_PACKAGES[0]
            );
            status(Command::new("apt-get").args(["update", "-q"]))?;
        }
        let packages = missing_closure(HOST_PACKAGES)?;
        eprintln!("xtask: downloading (not installing) {}", packages.join(" "));
        status(
            Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .args(&packages)
                .current_dir(&downloads),
        )?;
        for entry in fs::read_dir(&downloads).context("cannot read the downloads")? {
            let deb = entry.context("cannot read the downloads")?.path();
            status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
        }
        Ok(())
    }

    /// qemu must start with the unpacked libraries, and busybox must be there.
    fn check(&self) -> Result<()> {
        let ldd = Command::new("ldd")
            .arg(&self.qemu)
            .env("LD_LIBRARY_PATH", &self.library_path)
            .output()
            .with_context(|| format!("cannot run ldd on {}", self.qemu.display()))?;
        let text = String::from_utf8_lossy(&ldd.stdout);
        let missing: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("not found"))
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        ensure!(
            ldd.status.success() && missing.is_empty(),
            "qemu lacks shared libraries {} (delete {} to fetch again)",
            missing.join(", "),
            self.qemu.display()
        );
        ensure!(
            self.busybox.is_file(),
            "busybox-static has no {}",
            self.busybox.display()
        );
        Ok(())
    }

    /// Boots one kernel; a guest that has not powered off by `limit` is killed.
    fn boot(
        &self,
        vmlinuz: &Path,
        initramfs: &Path,
        rounds: u32,
        limit: Duration,
        log: &Path,
    ) -> Result<Guest> {
        let mut command = Command::new(&self.qemu);
        command
            .env("LD_LIBRARY_PATH", &self.library_path)
            .args(["-cpu", "max", "-smp", "2", "-m", "1024"])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet loglevel=4 rounds={rounds}"
            ));
        for dir in &self.firmware {
            command.arg("-L").arg(dir);
        }
        let started = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", self.qemu.display()))?;
        let stdout = child.stdout.take().context("qemu has no stdout")?;
        let mut stderr = child.stderr.take().context("qemu has no stderr")?;
        let (sender, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).replace('\r', "");
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut console = String::new();
        let mut results = BTreeMap::new();
        let mut hung = false;
        loop {
            let left = limit.saturating_sub(started.elapsed());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(result) = line.find("RESULT ").map(|at| &line[at + 7..])
                        && let Some((key, value)) = result.split_once('=')
                    {
                        results.insert(key.trim().to_owned(), value.trim().to_owned());
                    }
                    console.push_str(&line);
                    console.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    hung = true;
                    let _ = child.kill();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let exit = child.wait().context("qemu did not finish")?;
        let _ = reader.join();
        let mut errors = String::new();
        let _ = stderr.read_to_string(&mut errors);
        console.push_str(&errors);
        fs::write(log, &console).with_context(|| format!("cannot write {}", log.display()))?;
        Ok(Guest {
            results,
            hung,
            exit: exit.to_string(),
            seconds: started.elapsed().as_secs_f64(),
            qemu_errors: errors.trim().lines().last().unwrap_or_default().to_owned(),
        })
    }
}

/// The dependency closure of `roots` restricted to packages the host has not installed.
fn missing_closure(roots: &[&str]) -> Result<Vec<String>> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut queue: Vec<String> = roots.iter().map(|root| (*root).to_owned()).collect();
    while let Some(package) = queue.pop() {
        if !seen.insert(package.clone()) {
            continue;
        }
        let depends = output(Command::new("apt-cache").args([
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            &package,
        ]))?;
        for line in depends.lines() {
            let Some((_, name)) = line.split_once("Depends: ") else {
                continue;
            };
            let name = name.trim();
            // `<virtual>` names have no package of their own.
            if name.starts_with('<') || seen.contains(name) || installed(name) {
                continue;
            }
            queue.push(name.to_owned());
        }
    }
    Ok(seen.into_iter().collect())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| out.stdout == b"install ok installed")
}

/// What one guest reported.
struct Guest {
    results: BTreeMap<String, String>,
    hung: bool,
    exit: String,
    seconds: f64,
    qemu_errors: String,
}

struct Row {
    kernel: Available,
    guest: Guest,
}

impl Row {
    fn new(kernel: &Available, guest: Guest) -> Self {
        Self {
            kernel: kernel.clone(),
            guest,
        }
    }

    /// The checks that did not report `ok…` (a hung or crashed guest fails every check it
    /// did not reach, and `done`).
    fn failures(&self) -> Vec<String> {
        let mut failures: Vec<String> = CHECKS
            .iter()
            .filter(|(key, _)| !self.passed(key))
            .map(|(key, _)| (*key).to_owned())
            .collect();
        if self.guest.hung {
            failures.push(format!("hung, killed after {:.0} s", self.guest.seconds));
        } else if !self.guest.results.contains_key("done") {
            failures.push(format!("guest ended early ({})", self.guest.exit));
        }
        failures
    }

    fn passed(&self, key: &str) -> bool {
        self.guest.results.get(key).is_some_and(|value| {
            if key == "attach_default" {
                // The mode the agent picked by itself: a name, not a failure.
                !value.is_empty() && !value.starts_with("FAIL")
            } else if key == "socket_tables" {
                // A kernel whose diag modules the archive does not offer cannot be checked:
                // said in its cell, not a failure of the agent.
                value.starts_with("ok") || value.starts_with("n/a")
            } else {
                value.starts_with("ok")
            }
        })
    }

    fn cell(&self, key: &str) -> String {
        match self.guest.results.get(key) {
            None if key == "boots" && self.guest.hung => {
                format!("FAIL: no console within {:.0} s", self.guest.seconds)
            }
            None if key == "boots" => {
                format!("FAIL: {} {}", self.guest.exit, self.guest.qemu_errors)
            }
            None => "—".to_owned(),
            Some(value) => {
                let value = value.strip_prefix("ok ").unwrap_or(value);
                let mut shown: String = value.replace('|', "/").chars().take(160).collect();
                if shown.len() < value.len() {
                    shown.push('…');
                }
                shown
            }
        }
    }
}

fn render_table(rows: &[Row], rounds: u32) -> String {
    let mut table = String::from("| kernel | package (suite) |");
    let mut rule = String::from("|---|---|");
    for (key, title) in CHECKS {
        if *key == "wakeup" {
            let _ = write!(table, " {title} (worst of {rounds}) |");
        } else {
            let _ = write!(table, " {title} |");
        }
        rule.push_str("---|");
    }
    table.push_str(" RSS | start | result |\n");
    rule.push_str("---|---|---|\n");
    table.push_str(&rule);
    for row in rows {
        let _ = write!(
            table,
            "| {} | {} {} ({}) |",
            row.guest
                .results
                .get("kernel")
                .cloned()
                .unwrap_or_else(|| format!("{}-cloud-amd64", row.kernel.abi)),
            row.kernel.package,
            row.kernel.version,
            row.kernel.suite
        );
        for (key, _) in CHECKS {
            let _ = write!(table, " {} |", row.cell(key));
        }
        let rss = row
            .guest
            .results
            .get("rss_kib")
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or_else(|| "—".to_owned(), |kib| format!("{:.1} MiB", kib / 1024.0));
        let start = row
            .guest
            .results
            .get("start_ms")
            .and_then(|ms| ms.parse::<f64>().ok())
            .map_or_else(|| "—".to_owned(), |ms| format!("{:.1} s", ms / 1000.0));
        let failures = row.failures();
        let verdict = if failures.is_empty() {
            "pass".to_owned()
        } else {
            format!("**FAIL** ({})", failures.join(", "))
        };
        let _ = writeln!(table, " {rss} | {start} | {verdict} |");
    }
    table
}

/// deploy/COMPATIBILITY.md: the table, when and from which commit it was made.
fn compatibility_document(table: &str) -> Result<String> {
    let git = |args: &[&str]| -> Result<String> {
        Ok(
            output(Command::new("git").args(args).current_dir(workspace_root()))?
                .trim()
                .to_owned(),
        )
    };
    let mut commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    if !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
        commit.push_str(" (with uncommitted changes)");
    }
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    Ok(format!(
        "# Kernel compatibility\n\n\
         Made by `cargo xtask kernels --all --write` on {date} from commit {commit}: the agent's \
         release build booted under qemu (TCG, 2 vCPUs, 1 GiB) on the newest Debian cloud kernel \
         of every series Debian's suites offer, with a busybox initramfs and an in-guest test \
         (`xtask/guest/init.sh`) that checks each answer. CI (`.ci/run`) runs the subset \
         `cargo xtask kernels` (the oldest series, 6.1, 6.12 and the newest) and fails on any \
         regression.\n\n\
         Columns: *default attach* is the mode the agent picks by itself; *tp-btf*, *tracepoint*, \
         *raw-tracepoint* force one mode (`--attach`) and check that a connection is counted and \
         a waiter woken; *preallocated map* does the same with `--preallocate-sockets`; \
         *pre-existing counted* is a connection opened before the agent started; \
         *socket tables* is the agent reading the kernel's socket tables (inet_diag and tcp_diag, \
         loaded into the guest as a host loads them on demand), with which it confirms a count \
         it cannot vouch for (`n/a`: the archive has no modules package for that kernel); \
         *drained wake-up* is the worst time, over every round, from the last `close()` to the \
         answer of a `/drained` waiter that was already blocked (each must be under 1 s); *2nd \
         netns seeded* is a pre-existing connection in another network namespace (`unshare -n`); \
         *pod port steered* is `--pod-listen 127.0.0.1:9100` answering inside another namespace while \
         an application there can still listen on 9100 and gets its connections (sk_lookup steering). \
         RSS and start time (launch to the first healthy `/healthz`) are measured under TCG \
         emulation, which is many times slower than hardware: compare them between kernels, \
         not with a real host.\n\n\
         Not tested: 5.15 and 6.6 (no reachable Debian suite offers them any more), and kernels \
         without BTF (the agent refuses to start there, by design).\n\n{table}",
        date = date.trim()
    ))
}

/// Writes the initramfs: busybox, the in-guest test as /init, the agent and the shared
/// libraries `ldd` says it loads (the agent is a dynamic binary), and /dev/console (without
/// it the kernel gives init no console). Written here as a newc cpio archive, so the host
/// needs no cpio.
fn build_initramfs(agent: &Path, busybox: &Path, out: &Path) -> Result<()> {
    let mut archive = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run"] {
        archive.directory(dir);
    }
    archive.device("dev/console", 0o600, 5, 1);
    archive.file("init", 0o755, GUEST_INIT.as_bytes());
    archive.file(
        "bin/busybox",
        0o755,
        &fs::read(busybox).with_context(|| format!("cannot read {}", busybox.display()))?,
    );
    archive.file(
        "drain-agent",
        0o755,
        &fs::read(agent).with_context(|| format!("cannot read {}", agent.display()))?,
    );
    let ldd = output(Command::new("ldd").arg(agent))?;
    for library in ldd
        .lines()
        .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')))
    {
        let inside = library.trim_start_matches('/');
        let mut parent = Path::new(inside).parent();
        let mut parents = Vec::new();
        while let Some(dir) = parent.filter(|dir| !dir.as_os_str().is_empty()) {
            parents.push(dir.display().to_string());
            parent = dir.parent();
        }
        for dir in parents.iter().rev() {
            archive.directory(dir);
        }
        let bytes = fs::read(library).with_context(|| format!("cannot read {library}"))?;
        archive.file(inside, 0o755, &bytes);
    }
    fs::write(out, archive.finish()).with_context(|| format!("cannot write {}", out.display()))
}

/// A cpio archive of `modules/NAME.ko` (the guest loads them in name order: inet_diag,
/// then tcp_diag).
fn modules_archive(modules: &[PathBuf]) -> Result<Vec<u8>> {
    let mut archive = Cpio::default();
    archive.directory("modules");
    for (i, module) in modules.iter().enumerate() {
        let name = module
            .file_name()
            .and_then(|name| name.to_str())
            .context("module file name")?;
        let bytes =
            fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
        archive.file(&format!("modules/{i}-{name}"), 0o644, &bytes);
    }
    Ok(archive.finish())
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
    directories: BTreeSet<String>,
}

impl Cpio {
    fn directory(&mut self, name: &str) {
        if self.directories.insert(name.to_owned()) {
            self.entry(name, 0o040_755, (0, 0), &[]);
        }
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, (0, 0), data);
    }

    fn device(&mut self, name: &str, permissions: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | permissions, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, (major, minor): (u32, u32), data: &[u8]) {
        self.inode += 1;
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let name_size = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [
            self.inode, mode, 0, 0, 1, 0, size, 0, 0, major, minor, name_size, 0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.inode = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_main_archive_in_deb822() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in_deb822(text).as_deref(),
            Some("http://mirror.example/debian")
        );
        let security_first = "URIs: http://mirror.example/debian\nSuites: bookworm-security\n\n\
                              URIs: http://other.example/debian/\nSuites: bookworm\n";
        assert_eq!(
            mirror_in_deb822(security_first).as_deref(),
            Some("http://other.example/debian")
        );
    }

    #[test]
    fn finds_the_main_archive_in_sources_list() {
        let text = "# comment\ndeb http://mirror.example/debian-security bookworm-security main\n\
                    deb [arch=amd64] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_in_sources_list(text).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn orders_kernel_versions() {
        assert_eq!(series_of("5.10.0-32").as_deref(), Some("5.10"));
        assert_eq!(series_of("6.12.57+deb12").as_deref(), Some("6.12"));
        assert!(numbers("6.12.90+deb12.1") > numbers("6.12.90+deb12"));
        assert!(numbers("6.12.117+deb13") > numbers("6.12.95+deb12"));
        assert!(numbers("5.10.0-32") < numbers("6.1.0-50"));
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut archive = Cpio::default();
        archive.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = archive.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.windows(10).any(|window| window == b"TRAILER!!!"));
    }
}
