//! deploy/Dockerfile checked against how `cargo xtask setup` and `cargo xtask dist` build
//! the agent, and with hadolint.
//!
//! A linter that is not installed skips its test loudly, or fails it when
//! `DRAIN_AGENT_REQUIRE_KERNEL=1` (CI); `cargo xtask setup` installs them all.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{path::Path, process::Command};

use common::deploy::{
    deploy, dockerfile_instructions, read, run, text_of, tool, tool_available, workspace,
};

/// `const NAME: &str = "value";` in a Rust source file.
fn rust_const(path: &Path, name: &str) -> String {
    let text = read(path);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("const {name}: &str = ")))
        .unwrap_or_else(|| panic!("{} defines no {name}", path.display()));
    line.split('"').nth(1).expect("string constant").to_owned()
}

#[test]
fn dockerfile_builds_like_xtask_setup() {
    let test = "dockerfile_builds_like_xtask_setup";
    let path = deploy("Dockerfile");
    let instructions = dockerfile_instructions(&read(&path));
    let toolchain = rust_const(&workspace().join("xtask/src/setup.rs"), "EBPF_TOOLCHAIN");
    assert_eq!(
        toolchain,
        rust_const(&workspace().join("drain-agent/build.rs"), "EBPF_TOOLCHAIN"),
        "xtask and build.rs pin the same nightly"
    );
    let linker = rust_const(
        &workspace().join("xtask/src/setup.rs"),
        "BPF_LINKER_VERSION",
    );

    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stages.len(), 2, "a builder and a runtime stage");
    let builder = &instructions[stages[0]..stages[1]];
    let runtime = &instructions[stages[1]..];
    let builder_from = &builder[0].1;
    assert!(
        builder_from.starts_with("rust:") && builder_from.ends_with(" AS builder"),
        "FROM rust:… AS builder, not {builder_from:?}"
    );
    // The binary is static (musl): the runtime needs no C library, nor any base image.
    assert_eq!(runtime[0].1, "scratch", "the runtime stage is FROM scratch");

    let runs: Vec<String> = builder
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, r)| r.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let script = runs.join(" && ");
    let target = rust_const(&workspace().join("xtask/src/setup.rs"), "STATIC_TARGET");
    for expected in [
        format!("rustup toolchain install {toolchain} --profile minimal --component rust-src"),
        format!("cargo install bpf-linker@{linker} --locked"),
        format!("rustup target add {target}"),
        // The binary built as `cargo xtask dist` builds it outside Docker.
        "cargo xtask dist --no-image".to_owned(),
        format!("cp target/dist/{target}/drain-agent /drain-agent"),
    ] {
        assert!(
            script.contains(&expected),
            "the builder should run `{expected}`:\n{script}"
        );
    }

    // The whole workspace is copied in (cargo reads every member's manifest), less what
    // deploy/Dockerfile.dockerignore leaves out: build output and history, nothing the
    // build reads.
    let copies: Vec<&String> = builder
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        copies,
        [". ."],
        "the builder copies the workspace with COPY . ."
    );
    let ignored: Vec<String> = read(&deploy("Dockerfile.dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for needed in ["target", ".git"] {
        assert!(
            ignored.iter().any(|p| p == needed),
            "the build context should leave out {needed}/"
        );
    }
    let manifest = read(&workspace().join("Cargo.toml"));
    let members = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    let read_by_build =
        members
            .split('"')
            .skip(1)
            .step_by(2)
            .chain(["Cargo.toml", "Cargo.lock", ".cargo"]);
    for path in read_by_build {
        assert!(
            workspace().join(path).exists(),
            "{path} is in the workspace"
        );
        for pattern in &ignored {
            let pattern = pattern.trim_start_matches("**/").trim_end_matches('/');
            assert!(
                path != pattern && !path.starts_with(&format!("{pattern}/")) && pattern != "*",
                "Dockerfile.dockerignore pattern {pattern:?} leaves out {path}, which the build reads"
            );
        }
    }

    let copy_binary = runtime
        .iter()
        .find(|(k, a)| k == "COPY" && a.starts_with("--from=builder"))
        .expect("the runtime copies the binary from the builder");
    assert!(copy_binary.1.ends_with(" /drain-agent"), "{copy_binary:?}");
    let entrypoint = runtime
        .iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .expect("ENTRYPOINT");
    let entrypoint: Vec<String> =
        serde_json::from_str(&entrypoint.1).expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(entrypoint, ["/drain-agent"]);
    assert!(
        !runtime.iter().any(|(k, _)| k == "RUN"),
        "the runtime stage holds the binary alone"
    );

    if tool_available(test, "hadolint", &["--version"]) {
        let output = run(Command::new(tool("hadolint"))
            .args(["--no-color", "--failure-threshold", "style"])
            .arg(&path));
        assert!(output.status.success(), "hadolint:\n{}", text_of(&output));
    }
}
