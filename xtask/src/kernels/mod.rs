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
//!
//! By job: [`mirror`] finds the Debian archive, [`apt`] is the private apt configuration and
//! fetches kernels, [`choice`] picks the kernels to boot, [`host`] fetches qemu and busybox,
//! [`initramfs`] (with the [`cpio`] writer) packs the guest, [`qemu`] boots it and reads its
//! results, [`report`] renders the table and deploy/COMPATIBILITY.md. This file wires them.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;

use self::{
    apt::PrivateApt,
    choice::{choose, print_list},
    host::HostTools,
    initramfs::{build_initramfs, modules_archive},
    report::{Row, compatibility_document, render_table},
};
use crate::{cargo, setup, workspace_root};

mod apt;
mod choice;
mod cpio;
mod host;
mod initramfs;
mod mirror;
mod qemu;
mod report;

pub use mirror::debian_mirror;

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
        let boot = || {
            tools.boot(
                &vmlinuz,
                &own_initramfs,
                args.rounds,
                Duration::from_secs(args.guest_timeout),
                &log,
            )
        };
        let mut guest = boot()?;
        let mut first_boot = None;
        if !guest.results.contains_key("boots") {
            // The kernel never reached the guest's init: it crashed or hung while booting,
            // before anything of the agent ran (seen once with 6.12.117 under TCG: an `int3`
            // oops in `sched_clock_cpu` during an initcall; the next boot of the same image
            // passed). Booted once more; the row says so, with the first boot's log.
            let first = logs.join(format!("{}.first-boot.log", kernel.abi));
            fs::rename(&log, &first)
                .with_context(|| format!("cannot keep {} as {}", log.display(), first.display()))?;
            eprintln!(
                "xtask: {} did not reach the guest's init ({}); booting it once more (first log: {})",
                kernel.abi,
                guest.exit,
                first.display()
            );
            first_boot = Some(first);
            guest = boot()?;
        }
        let row = Row::new(kernel, guest, first_boot);
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

pub(super) fn output_bytes(command: &mut Command) -> Result<Vec<u8>> {
    let shown = format!("{command:?}");
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    ensure!(out.status.success(), "{shown} failed: {}", out.status);
    Ok(out.stdout)
}

pub(super) fn output(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    ensure!(out.status.success(), "{shown} failed ({})", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
