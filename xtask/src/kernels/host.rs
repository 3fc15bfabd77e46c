//! qemu and busybox from the host's own suites, downloaded with the closure of their
//! dependencies the host lacks and unpacked under target/kernels/host (never installed).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};

use super::output;
use crate::{is_root, status};

/// qemu and busybox, unpacked from the host's own suites (never installed: installing
/// qemu-system-x86 could replace packages the host holds, e.g. a backported qemu-utils).
pub(super) struct HostTools {
    pub(super) qemu: PathBuf,
    pub(super) library_path: String,
    pub(super) firmware: Vec<PathBuf>,
    pub(super) busybox: PathBuf,
}

impl HostTools {
    pub(super) fn fetch(dir: &Path) -> Result<Self> {
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

    pub(super) fn unpack(dir: &Path, root: &Path) -> Result<()> {
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
    pub(super) fn check(&self) -> Result<()> {
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
}

/// What the guests need from the host's suites; their dependencies that the host lacks are
/// fetched too (shared libraries, and seabios for the firmware).
const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-system-data", "busybox-static"];

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

pub(super) fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| out.stdout == b"install ok installed")
}
