//! Builds the eBPF programs (drain-agent-ebpf) for the BPF target with the pinned nightly
//! and bpf-linker, into OUT_DIR, where `kernel/mod.rs` embeds them with `include_bytes_aligned!`.
//! `cargo xtask setup` installs both; the error below says so when they are missing.

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// The nightly that builds the eBPF side (newer aya-ebpf needs rustc >= 1.98; see ARCHITECTURE.md).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../drain-agent-common/src");
    emit_git_commit();
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../drain-agent-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "drain-agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .with_context(|| {
        format!(
            "cannot build the eBPF programs; install the prerequisites with `cargo xtask setup` \
             (rustup toolchain {EBPF_TOOLCHAIN} with rust-src, and bpf-linker 0.10)"
        )
    })
}

/// `DRAIN_AGENT_GIT_COMMIT` for `drain-agent --version`: the commit being built, from
/// the environment when set (an image build without `.git` passes it in), else from git,
/// else "unknown" (a source tarball). Rebuilt when HEAD or the branch it names moves.
fn emit_git_commit() {
    println!("cargo:rerun-if-env-changed=DRAIN_AGENT_GIT_COMMIT");
    let git = |args: &[&str]| -> Option<String> {
        let output = std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()?;
        let text = String::from_utf8(output.stdout).ok()?;
        (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
    };
    let commit = std::env::var("DRAIN_AGENT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=DRAIN_AGENT_GIT_COMMIT={commit}");
    // Worktrees keep HEAD and refs apart: ask git where they are.
    for path in ["HEAD", "packed-refs"]
        .into_iter()
        .map(str::to_owned)
        .chain(git(&["symbolic-ref", "-q", "HEAD"]))
    {
        // Only files that exist: cargo reruns the script on every build for one that does not.
        if let Some(file) = git(&["rev-parse", "--path-format=absolute", "--git-path", &path])
            .filter(|file| std::path::Path::new(file).exists())
        {
            println!("cargo:rerun-if-changed={file}");
        }
    }
}
