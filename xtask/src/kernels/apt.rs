//! A private apt configuration for the kernel suites (never the host's), the kernels it
//! offers, and each kernel's image and socket-diagnostics modules, fetched and unpacked.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use super::{
    choice::{Available, series_of},
    mirror::debian_mirror,
    output, output_bytes,
};
use crate::status;

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

/// Re-read the suites' package lists when they are older than this.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// An apt configuration of our own (sources, lists, cache) under target/kernels/apt, so the
/// kernel suites never touch the host's apt set-up.
pub(super) struct PrivateApt {
    pub(super) dir: PathBuf,
}

impl PrivateApt {
    pub(super) fn new(dir: &Path) -> Result<Self> {
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

    pub(super) fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(self.options());
        command
    }

    pub(super) fn update(&self, refresh: bool) -> Result<()> {
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
    pub(super) fn cloud_kernels(&self) -> Result<Vec<Available>> {
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
    pub(super) fn fetch_kernel(
        &self,
        kernel: &Available,
        cache: &Path,
    ) -> Result<(PathBuf, Vec<PathBuf>)> {
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
        let mut modules_missing = false;
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
                // The guest then says so in its socket-tables cell, and this kernel is not
                // marked done: the next run fetches again, rather than keep an empty module
                // set for good and report the check as not applicable every run after.
                Err(problem) => {
                    eprintln!(
                        "xtask: no socket-diagnostics modules for {}: {problem:#}",
                        kernel.abi
                    );
                    modules_missing = true;
                }
            }
        }
        for name in DIAG_MODULES {
            if let Some(packed) = find_module(&unpacked, name)? {
                unpack_module(&packed, &modules.join(format!("{name}.ko")))?;
            }
        }
        if !modules_missing {
            fs::write(&done, "").with_context(|| format!("cannot write {}", done.display()))?;
        }
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
