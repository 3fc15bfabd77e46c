//! `cargo xtask dist`: what a release ships, in `target/dist/`:
//!
//! ```text
//! target/dist/
//!   x86_64-unknown-linux-musl/drain-agent          static, stripped release binary
//!   x86_64-unknown-linux-musl/drain-agent.sha256   `sha256sum -c` format
//!   x86_64-unknown-linux-musl/example-app          the program deploy/systemd/example-app.service
//!   x86_64-unknown-linux-musl/example-app.sha256   runs (the workspace's e2e-backend), static too
//!   completions/                                   bash, zsh, fish, elvish, PowerShell
//!   man/                                           drain-agent.1, drain-agent-run.1, …
//!   drain-agent-VERSION-oci.tar                    the image (OCI archive), unless --no-image
//!   SHA256SUMS                                     every file above
//! ```
//!
//! The binary is linked statically against musl so that it runs on any distribution
//! whatever its C library (Alpine, UBI 8, Amazon Linux 2, Debian 11 have an older glibc
//! than the build machine). The eBPF object inside it is built by drain-agent/build.rs
//! for the BPF target with the pinned nightly, whatever the host target.
//!
//! The image is built with buildah from the static binary on an empty base (no Docker
//! engine, no base image to download) and tagged `localhost/drain-agent:VERSION` in the
//! local containers storage, where podman runs it; deploy/Dockerfile builds the same
//! layout (drain-agent/tests/image.rs compares them).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;

use crate::{cargo_binary, is_root, setup, status, workspace_root};

/// Cross linkers for the targets that need one on an x86_64 build machine.
const CROSS_LINKERS: &[(&str, &str)] = &[("aarch64-unknown-linux-musl", "aarch64-linux-gnu-gcc")];

/// The shells `drain-agent completions` knows, with the file name each expects.
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "drain-agent.bash"),
    ("zsh", "_drain-agent"),
    ("fish", "drain-agent.fish"),
    ("elvish", "drain-agent.elv"),
    ("powershell", "_drain-agent.ps1"),
];

/// The image's OCI labels that do not depend on the build (deploy/Dockerfile has the same;
/// drain-agent/tests/image.rs checks both). `version` and `revision` are added per build.
pub const STATIC_LABELS: &[(&str, &str)] = &[
    ("org.opencontainers.image.title", "drain-agent"),
    (
        "org.opencontainers.image.description",
        "Counts inbound TCP connections per local port from the kernel (eBPF) and answers drain queries for stop hooks",
    ),
    ("org.opencontainers.image.licenses", "MIT OR Apache-2.0"),
    ("org.opencontainers.image.base.name", "scratch"),
];

#[derive(Args, Default)]
pub struct DistArgs {
    /// Rust targets to build (repeatable). Default: x86_64-unknown-linux-musl, which is
    /// the one the image and the tests use. aarch64-unknown-linux-musl needs the Debian
    /// package gcc-aarch64-linux-gnu as its linker.
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Do not build the OCI image.
    #[arg(long)]
    pub no_image: bool,
}

/// Where cargo puts its output: `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(
            || workspace_root().join("target"),
            |dir| workspace_root().join(dir),
        )
}

pub fn dist_dir() -> PathBuf {
    target_dir().join("dist")
}

pub fn dist(args: &DistArgs) -> Result<()> {
    let started = Instant::now();
    setup::setup(&setup::SetupArgs::toolchain_only())?;
    let targets = if args.targets.is_empty() {
        vec![setup::STATIC_TARGET.to_owned()]
    } else {
        args.targets.clone()
    };
    let dist = dist_dir();
    std::fs::create_dir_all(&dist).with_context(|| format!("cannot create {}", dist.display()))?;
    let mut shipped = Vec::new();
    let mut native = None;
    for target in &targets {
        let binary = build(target)?;
        shipped.push(binary.clone());
        shipped.push(binary.with_extension("sha256"));
        if target == setup::STATIC_TARGET {
            // The example unit's program: something to try the units with before
            // pointing them at one's own service.
            let example = build_binary(target, "e2e-backend", "example-app")?;
            shipped.push(example.clone());
            shipped.push(example.with_extension("sha256"));
            native = Some(binary);
        }
    }
    if let Some(binary) = &native {
        let version = output(Command::new(binary).arg("--version"))?;
        println!("xtask dist: {}", version.trim());
        shipped.extend(completions_and_manpages(binary, &dist)?);
    }
    if !args.no_image {
        let binary = native.as_ref().with_context(|| {
            format!(
                "the image needs the {} binary: add --target {0} or pass --no-image",
                setup::STATIC_TARGET
            )
        })?;
        shipped.push(image(binary, &dist)?);
    }
    write_checksums(&dist)?;
    for file in &shipped {
        println!(
            "xtask dist:   {}",
            file.strip_prefix(&dist).unwrap_or(file).display()
        );
    }
    println!(
        "xtask dist: done in {:.0} s, in {}",
        started.elapsed().as_secs_f64(),
        dist.display()
    );
    Ok(())
}

/// Builds the static release binary for `target` and copies it, with its checksum, to
/// `target/dist/<target>/drain-agent`.
pub fn build(target: &str) -> Result<PathBuf> {
    build_binary(target, "drain-agent", "drain-agent")
}

/// Builds `package`'s static release binary (named as the package) for `target` and copies
/// it, with its checksum, to `target/dist/<target>/<shipped>`.
fn build_binary(target: &str, package: &str, shipped: &str) -> Result<PathBuf> {
    setup::ensure_rust_target(target)?;
    let started = Instant::now();
    let variable = target.to_ascii_uppercase().replace('-', "_");
    let mut command = Command::new(cargo_binary());
    command
        .args(["build", "--release", "--locked", "--package", package])
        .args(["--target", target])
        // Stripped by the linker, for this target only: the eBPF object inside keeps its
        // BTF (built for the BPF target), and build scripts are untouched.
        .env(
            format!("CARGO_TARGET_{variable}_RUSTFLAGS"),
            "-C strip=symbols",
        )
        .current_dir(workspace_root());
    if let Some((_, linker)) = CROSS_LINKERS.iter().find(|(t, _)| *t == target) {
        ensure!(
            setup::has_command(linker),
            "building for {target} needs the cross linker {linker} (Debian: apt-get install \
             gcc-aarch64-linux-gnu)"
        );
        command.env(format!("CARGO_TARGET_{variable}_LINKER"), linker);
    }
    status(&mut command)?;
    let built = target_dir().join(target).join("release").join(package);
    let dir = dist_dir().join(target);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let binary = dir.join(shipped);
    std::fs::copy(&built, &binary)
        .with_context(|| format!("cannot copy {} to {}", built.display(), binary.display()))?;
    check_static(&binary)?;
    let checksum = output(Command::new("sha256sum").arg(shipped).current_dir(&dir))?;
    std::fs::write(binary.with_extension("sha256"), &checksum)
        .context("cannot write the checksum")?;
    let size = std::fs::metadata(&binary)
        .context("cannot read the binary's size")?
        .len();
    println!(
        "xtask dist: {target}: {} ({:.1} MiB, built in {:.0} s), sha256 {}",
        binary.display(),
        size as f64 / 1_048_576.0,
        started.elapsed().as_secs_f64(),
        checksum.split_whitespace().next().unwrap_or_default()
    );
    Ok(binary)
}

/// Fails unless `binary` has no program interpreter (no dynamic loader, so no shared
/// library) — read from its ELF program headers, since `ldd` cannot look at a foreign
/// architecture's binary — and, for the build machine's architecture, `ldd` agrees.
fn check_static(binary: &Path) -> Result<()> {
    let bytes =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    ensure!(
        !has_interpreter(&bytes)?,
        "{} asks for a dynamic loader (PT_INTERP): not a static binary",
        binary.display()
    );
    let native = bytes.get(18..20) == Some(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    if native && cfg!(target_arch = "x86_64") {
        let ldd = Command::new("ldd")
            .arg(binary)
            .output()
            .context("cannot run ldd")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&ldd.stdout),
            String::from_utf8_lossy(&ldd.stderr)
        );
        ensure!(
            text.contains("not a dynamic executable") || text.contains("statically linked"),
            "ldd {}: {text}",
            binary.display()
        );
        println!("xtask dist: ldd: {}", text.trim());
    }
    Ok(())
}

/// Whether a 64-bit little-endian ELF file has a PT_INTERP program header.
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    ensure!(
        elf.get(..6) == Some(b"\x7fELF\x02\x01".as_slice()),
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |at: usize| -> Result<u64> {
        let bytes = elf.get(at..at + 2).context("truncated ELF header")?;
        Ok(u64::from(u16::from_le_bytes([bytes[0], bytes[1]])))
    };
    let u64_at = |at: usize| -> Result<u64> {
        let bytes: [u8; 8] = elf
            .get(at..at + 8)
            .context("truncated ELF header")?
            .try_into()
            .context("eight bytes")?;
        Ok(u64::from_le_bytes(bytes))
    };
    let table = u64_at(0x20)?;
    let entry_size = u16_at(0x36)?;
    let entries = u16_at(0x38)?;
    for index in 0..entries {
        let at = usize::try_from(table + index * entry_size).context("program header offset")?;
        let kind = elf.get(at..at + 4).context("truncated program header")?;
        if kind == 3u32.to_le_bytes() {
            return Ok(true); // PT_INTERP
        }
    }
    Ok(false)
}

/// Shell completions and man pages, generated by the binary from its clap definitions.
fn completions_and_manpages(binary: &Path, dist: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let completions = dist.join("completions");
    std::fs::create_dir_all(&completions).context("cannot create completions/")?;
    for (shell, name) in COMPLETIONS {
        let script = output(Command::new(binary).args(["completions", shell]))?;
        let path = completions.join(name);
        std::fs::write(&path, script)
            .with_context(|| format!("cannot write {}", path.display()))?;
        files.push(path);
    }
    let man = dist.join("man");
    let _ = std::fs::remove_dir_all(&man);
    status(Command::new(binary).arg("manpage").arg(&man))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)
        .context("cannot list man/")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .context("cannot list man/")?;
    pages.sort();
    ensure!(!pages.is_empty(), "drain-agent manpage wrote nothing");
    files.extend(pages);
    println!(
        "xtask dist: {} completion scripts, {} man pages",
        COMPLETIONS.len(),
        files.len() - COMPLETIONS.len()
    );
    Ok(files)
}

/// The version in Cargo.toml and the commit `--version` reports (what the binary says of
/// itself, so the image's labels cannot disagree with it).
fn version_and_revision(binary: &Path) -> Result<(String, String)> {
    // "drain-agent 0.1.0 (commit 0123456789ab)"
    let text = output(Command::new(binary).arg("--version"))?;
    let mut words = text.split_whitespace().skip(1);
    let version = words
        .next()
        .context("--version names no version")?
        .to_owned();
    let revision = words
        .nth(1)
        .map(|commit| commit.trim_end_matches(')').to_owned())
        .context("--version names no commit")?;
    Ok((version, revision))
}

/// The image reference `cargo xtask dist` tags.
pub fn image_name(version: &str) -> String {
    format!("localhost/drain-agent:{version}")
}

/// Builds the image with buildah: the static binary at /drain-agent on an empty base,
/// entrypoint `/drain-agent`, command `run`, OCI labels. Tags it in the local containers
/// storage (where podman finds it) and writes it as an OCI archive to `dist`.
fn image(binary: &Path, dist: &Path) -> Result<PathBuf> {
    if !setup::has_command("buildah") {
        if is_root() {
            setup::ensure_debian_packages(setup::IMAGE_PACKAGES)?;
        } else {
            bail!("the image needs buildah (apt-get install buildah), or pass --no-image");
        }
    }
    let started = Instant::now();
    let (version, revision) = version_and_revision(binary)?;
    let name = image_name(&version);
    let container = output(Command::new("buildah").args(["from", "scratch"]))?
        .trim()
        .to_owned();
    let built = (|| -> Result<()> {
        status(
            Command::new("buildah")
                .args(["copy", "--chown", "0:0", "--chmod", "0755", &container])
                .arg(binary)
                .arg("/drain-agent"),
        )?;
        let mut config = Command::new("buildah");
        config.args([
            "config",
            "--entrypoint",
            r#"["/drain-agent"]"#,
            "--cmd",
            r#"["run"]"#,
            "--os",
            "linux",
            "--arch",
            "amd64",
        ]);
        let dynamic = [
            ("org.opencontainers.image.version", version.as_str()),
            ("org.opencontainers.image.revision", revision.as_str()),
        ];
        for (key, value) in STATIC_LABELS.iter().chain(&dynamic) {
            config.arg("--label").arg(format!("{key}={value}"));
        }
        status(config.arg(&container))?;
        status(Command::new("buildah").args([
            "commit",
            "--rm",
            "--format",
            "oci",
            // No io.buildah.version label: the image's labels are the Dockerfile's.
            "--identity-label=false",
            &container,
            &name,
        ]))
    })();
    if built.is_err() {
        let _ = Command::new("buildah").args(["rm", &container]).output();
    }
    built?;
    let archive = dist.join(format!("drain-agent-{version}-oci.tar"));
    let _ = std::fs::remove_file(&archive);
    status(
        Command::new("buildah")
            .args(["push", &name])
            .arg(format!("oci-archive:{}:{name}", archive.display())),
    )?;
    let archive_size = std::fs::metadata(&archive)
        .context("cannot read the archive's size")?
        .len();
    println!(
        "xtask dist: image {name}, OCI archive {} ({:.1} MiB), built in {:.0} s",
        archive.display(),
        archive_size as f64 / 1_048_576.0,
        started.elapsed().as_secs_f64()
    );
    Ok(archive)
}

/// `target/dist/SHA256SUMS` for every file under `dist` (what this run built and what an
/// earlier run for another target left), with paths relative to `dist`.
fn write_checksums(dist: &Path) -> Result<()> {
    let mut files = Vec::new();
    let mut dirs = vec![dist.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let path = entry
                .with_context(|| format!("cannot list {}", dir.display()))?
                .path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|name| name != "SHA256SUMS") {
                files.push(path.strip_prefix(dist).unwrap_or(&path).to_path_buf());
            }
        }
    }
    files.sort();
    let sums = output(Command::new("sha256sum").args(&files).current_dir(dist))?;
    std::fs::write(dist.join("SHA256SUMS"), sums).context("cannot write SHA256SUMS")
}

/// Runs a command and returns its stdout, failing with its stderr.
fn output(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed non-UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_xtask_binary_is_dynamic_and_that_is_detected() {
        // The xtask binary itself is built for the glibc host target: it has a loader.
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read self");
        assert!(has_interpreter(&me).expect("ELF"));
        assert!(has_interpreter(b"not an ELF file").is_err());
    }
}
