//! Idempotent installation of everything the project needs on a fresh machine.

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{is_root, status};

/// The nightly that builds the eBPF crate (keep in step with drain-agent/build.rs).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
/// bpf-linker 0.10 loads rustc's own LLVM; 0.11+ needs a system LLVM >= 21.
const BPF_LINKER_VERSION: &str = "0.10.0";

/// Debian packages the tests use, each with a command that shows it is installed.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("curl", "curl"),
    ("nginx", "nginx"),
    ("prometheus", "promtool"),
];

#[derive(Args, Default)]
pub struct SetupArgs {
    /// Do not install Debian packages (only the Rust toolchain and bpf-linker).
    #[arg(long)]
    pub no_apt: bool,
}

impl SetupArgs {
    pub const fn toolchain_only() -> Self {
        Self { no_apt: true }
    }
}

pub fn setup(args: &SetupArgs) -> Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()?;
    if !args.no_apt {
        ensure_debian_packages()?;
    }
    Ok(())
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Components of the eBPF toolchain: rust-src for `-Z build-std=core`, clippy for the
/// BPF-target lint run.
const EBPF_COMPONENTS: [&str; 2] = ["rust-src", "clippy"];

fn ensure_nightly() -> Result<()> {
    let installed = output_of(
        "rustup",
        &[
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ],
    );
    let Some(installed) = installed else {
        eprintln!("xtask: installing {EBPF_TOOLCHAIN} (for the eBPF build)");
        let mut command = Command::new("rustup");
        command.args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
        ]);
        for component in EBPF_COMPONENTS {
            command.args(["--component", component]);
        }
        return status(&mut command)
            .context("cannot install the eBPF toolchain (is rustup on PATH?)");
    };
    let missing: Vec<&str> = EBPF_COMPONENTS
        .into_iter()
        .filter(|component| !installed.lines().any(|line| line.starts_with(component)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: adding {} to {EBPF_TOOLCHAIN}", missing.join(", "));
    status(
        Command::new("rustup")
            .args(["component", "add", "--toolchain", EBPF_TOOLCHAIN])
            .args(&missing),
    )
    .context("cannot add components to the eBPF toolchain")
}

fn ensure_bpf_linker() -> Result<()> {
    let version = output_of("bpf-linker", &["--version"]).unwrap_or_default();
    if version.contains(" 0.10.") {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
    status(Command::new(crate::cargo_binary()).args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))
    .context("cannot install bpf-linker")
}

fn has_command(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|dir| dir.join(name).is_file())
    })
}

fn ensure_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, command)| !has_command(command))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !has_command("apt-get") {
        bail!(
            "missing Debian packages {}: install them (apt-get install {}) or run as root",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
