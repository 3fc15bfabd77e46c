//! What the docs count and name, checked against the code: the files under deploy/ they
//! send a reader to, the `unsafe` code ARCHITECTURE.md counts, the subcommands its map
//! gives main.rs. No privileges, no agent.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{collections::BTreeSet, fs, path::PathBuf};

use clap::CommandFactory as _;
use common::deploy::{deploy, read, workspace};

/// The project's docs name only files under deploy/ that exist: a reader sent to
/// `deploy/…` finds it.
#[test]
fn docs_name_only_deploy_files_that_exist() {
    let mut docs: Vec<PathBuf> = [
        "README.md",
        "SECURITY.md",
        "ARCHITECTURE.md",
        "INVARIANTS.md",
    ]
    .iter()
    .map(|name| workspace().join(name))
    .collect();
    let mut dirs = vec![deploy("")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                docs.push(path);
            }
        }
    }
    let mut missing = Vec::new();
    for doc in &docs {
        let text = read(doc);
        // `deploy/…` in backquotes, up to a space or a line's `:NN` / `#anchor`.
        for quoted in text.split('`').skip(1).step_by(2) {
            let Some(path) = quoted.strip_prefix("deploy/") else {
                continue;
            };
            let path = path.split([' ', ':', '#']).next().unwrap_or_default();
            if !deploy(path).exists() {
                missing.push(format!("{}: `deploy/{path}`", doc.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs name files that do not exist: {missing:#?}"
    );
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: PathBuf) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The number ARCHITECTURE.md gives just before `what` ("15 `unsafe` blocks").
fn number_before(text: &str, what: &str) -> usize {
    let at = text
        .find(what)
        .unwrap_or_else(|| panic!("ARCHITECTURE.md says nothing of {what}"));
    text[..at]
        .split_whitespace()
        .next_back()
        .and_then(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("ARCHITECTURE.md gives no number before {what}"))
}

/// ARCHITECTURE.md counts the `unsafe` code left in drain-agent/src outside its tests (the
/// `tests.rs` files and each file's `#[cfg(test)]` part, which ends it): blocks and
/// `unsafe impl`s, each with its SAFETY note.
#[test]
fn architecture_counts_the_unsafe_code() {
    let (mut blocks, mut impls) = (Vec::new(), Vec::new());
    for path in rust_files(workspace().join("drain-agent/src")) {
        if path.file_name().is_some_and(|name| name == "tests.rs") {
            continue;
        }
        let text = read(&path);
        for (number, line) in text.lines().enumerate() {
            let code = line.trim();
            if code == "#[cfg(test)]" {
                break;
            }
            if code.starts_with("//") {
                continue;
            }
            let at = format!("{}:{}", path.display(), number + 1);
            if code.contains("unsafe {") {
                blocks.push(at);
            } else if code.contains("unsafe impl") {
                impls.push(at);
            }
        }
    }
    let architecture = read(&workspace().join("ARCHITECTURE.md"));
    assert_eq!(
        number_before(&architecture, "`unsafe` blocks"),
        blocks.len(),
        "ARCHITECTURE.md's count of unsafe blocks; the source has {blocks:#?}"
    );
    assert_eq!(
        number_before(&architecture, "`unsafe impl`s"),
        impls.len(),
        "ARCHITECTURE.md's count of unsafe impls; the source has {impls:#?}"
    );
}

/// ARCHITECTURE.md's map says what main.rs hands over to: every subcommand, hidden ones
/// included.
#[test]
fn architecture_names_every_subcommand() {
    let architecture = read(&workspace().join("ARCHITECTURE.md"));
    let line = architecture
        .lines()
        .find(|line| line.trim_start().starts_with("10 main.rs"))
        .expect("ARCHITECTURE.md's map has main.rs");
    let listed: BTreeSet<String> = line
        .split_once("hand over (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .expect("main.rs: hand over (…)")
        .0
        .split(", ")
        .map(str::to_owned)
        .collect();
    let subcommands: BTreeSet<String> = drain_agent::cli::Cli::command()
        .get_subcommands()
        .map(|command| command.get_name().to_owned())
        .filter(|name| name != "help")
        .collect();
    assert_eq!(listed, subcommands, "ARCHITECTURE.md: {line}");
}
