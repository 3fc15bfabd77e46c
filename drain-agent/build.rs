//! Builds the eBPF programs (drain-agent-ebpf) for the BPF target with the pinned nightly
//! and bpf-linker, into OUT_DIR, where `bpf.rs` embeds them with `include_bytes_aligned!`.
//! `cargo xtask setup` installs both; the error below says so when they are missing.

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// The nightly that builds the eBPF side (newer aya-ebpf needs rustc >= 1.98; see ARCHITECTURE.md).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../drain-agent-common/src");
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
