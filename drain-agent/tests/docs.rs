//! What the docs count and name, checked against the code: the files under deploy/ they
//! send a reader to, the `unsafe` code ARCHITECTURE.md counts, the subcommands its map
//! gives main.rs. No privileges, no agent.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
use common::deploy::{deploy, read, workspace};

/// The project's docs name only files under deploy/ that exist: a reader sent to
/// `deploy/…` finds it.
#[test]
fn docs_name_only_deploy_files_that_exist() {
    let docs = docs_and_deploy_files(|path| path.extension().is_some_and(|e| e == "md"));
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
/// `tests.rs` files, the tests' helpers in `testing.rs` files, and each file's
/// `#[cfg(test)]` part, which ends it): blocks and `unsafe impl`s, each with its SAFETY note.
#[test]
fn architecture_counts_the_unsafe_code() {
    let (mut blocks, mut impls) = (Vec::new(), Vec::new());
    for path in rust_files(workspace().join("drain-agent/src")) {
        if path
            .file_name()
            .is_some_and(|name| name == "tests.rs" || name == "testing.rs")
        {
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

/// The project's docs, and the files under deploy/ (manifests, units, examples) that
/// `wanted` takes.
fn docs_and_deploy_files(wanted: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = [
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
            } else if wanted(&path) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A text file (manifests, units, examples, docs).
fn is_text(path: &Path) -> bool {
    fs::read_to_string(path).is_ok()
}

/// The value shown after `at` (`--ignore "$HOST_IP"`, `ignore=10.0.0.0/8&…`): quotes,
/// `=`, blanks and a shell's `\` skipped, up to the next blank, quote, backquote or `&`; a
/// `<placeholder>` is taken whole, blanks and all.
fn shown_value(text: &str) -> String {
    let text = text.trim_start_matches([' ', '=', '"', '\\']);
    let mut value = String::new();
    let mut placeholder = false;
    for c in text.chars() {
        match c {
            '<' => placeholder = true,
            '>' => placeholder = false,
            ' ' if placeholder => {}
            ' ' | '\n' | '"' | '\\' | '`' | '&' | '\'' => break,
            _ => {}
        }
        value.push(c);
    }
    value
}

/// Every `--ignore` / `ignore=` the docs and deploy files show names the node's address
/// alone, or networks the agent takes. They showed `--ignore "$HOST_IP/32"`: on an IPv6 node
/// (`2600:1f14:ab:cd00::5/32`) a /32 of IPv6, every client ignored, and the wait answered
/// drained with clients connected (now refused: address bits beyond the prefix).
#[test]
fn documented_ignores_name_the_node_address_alone() {
    let mut wrong = Vec::new();
    let mut shown = 0;
    for file in docs_and_deploy_files(is_text) {
        let text = read(&file);
        for keyword in ["--ignore", "ignore="] {
            for (at, _) in text.match_indices(keyword) {
                let value = shown_value(&text[at + keyword.len()..]);
                shown += 1;
                let variable = value.contains('$') || value.contains('<');
                let literal = value.starts_with(|c: char| c.is_ascii_digit() || c == ':');
                let refused = if variable {
                    // A variable or placeholder address: bare, without a prefix.
                    value.contains('/')
                } else {
                    literal && drain_agent::drain_rule::parse_cidrs(&value).is_err()
                };
                if refused {
                    wrong.push(format!("{}: {keyword} {value}", file.display()));
                }
            }
        }
    }
    assert!(shown >= 10, "found only {shown} ignores in the docs");
    assert!(
        wrong.is_empty(),
        "documented ignores that are not one address or a network the agent takes: {wrong:#?}"
    );
}

/// Where the docs give a hook's `DRAIN_AGENT_URL` from the node's address, they give the
/// IPv6 node's bracketed form too: `http://$(HOST_IP):19700` there is refused by `wait`
/// (which colon starts the port cannot be told).
#[test]
fn documented_agent_urls_from_the_node_address_say_how_on_ipv6() {
    for file in docs_and_deploy_files(is_text) {
        let text = read(&file);
        if text.contains("http://$(HOST_IP):") {
            assert!(
                text.contains("http://[$(HOST_IP)]:"),
                "{} gives DRAIN_AGENT_URL=http://$(HOST_IP):… without the IPv6 node's http://[$(HOST_IP)]:…",
                file.display()
            );
        }
    }
}

/// A request to `localhost:9100/` that is a pod's own hook (an `exec` hook in a pod's spec):
/// inside the pod, loopback is the pod's, and `localhost` is the agent's in-pod listener.
fn is_in_pod_hook(line: &str) -> bool {
    line.contains("command: [")
}

/// No node-side example asks the agent at `localhost:9100`: `localhost` resolves to `::1`
/// first, and the agent listens on `127.0.0.1` only, so any local user may bind
/// `[::1]:9100` and answer root's curl hook `200 {"drained":true}` (curl does not check
/// whose server it reached). The examples name `127.0.0.1:9100`; a pod's own hook calling
/// its in-pod listener at `localhost` is another case (the pod's loopback is its own).
#[test]
fn node_side_examples_do_not_ask_localhost() {
    let mut shown = Vec::new();
    for file in docs_and_deploy_files(is_text) {
        let text = read(&file);
        for (number, line) in text.lines().enumerate() {
            if line.contains("localhost:9100/") && !is_in_pod_hook(line) {
                shown.push(format!(
                    "{}:{}: {}",
                    file.display(),
                    number + 1,
                    line.trim()
                ));
            }
        }
    }
    let help = drain_agent::cli::Cli::command()
        .render_long_help()
        .to_string();
    for line in help.lines() {
        if line.contains("localhost:9100/") {
            shown.push(format!("drain-agent --help: {}", line.trim()));
        }
    }
    assert!(
        shown.is_empty(),
        "node-side examples ask localhost:9100 (::1 first, which any local user may bind): {shown:#?}"
    );
    // README's first example does not call curl the same as `drain-agent wait`: only the
    // client checks whose server it reached.
    let readme = read(&workspace().join("README.md"));
    let first = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .expect("README.md opens with a sh example");
    if first.contains("curl") {
        assert!(
            !first.contains("# the same"),
            "README.md calls curl the same as drain-agent wait: {first}"
        );
    }
}

/// SECURITY.md's "Whom the clients trust" says that curl and other plain HTTP clients (the
/// kubelet's `httpGet` from the node) check no owner, and which hook to use on a node shared
/// with untrusted local users.
#[test]
fn security_says_which_clients_check_no_owner() {
    let security = read(&workspace().join("SECURITY.md"));
    let section = security
        .split("\n## Whom the clients trust\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("SECURITY.md has \"Whom the clients trust\"");
    for needed in ["curl", "no owner check", "untrusted local users"] {
        assert!(
            section.contains(needed),
            "SECURITY.md's \"Whom the clients trust\" does not say {needed:?}"
        );
    }
}

/// Every `reason` of `drain_agent_tracking_errors_total` the agent exports (the kernel
/// side's errors and `handler_skipped`).
fn tracking_error_reasons() -> Vec<&'static str> {
    drain_agent_common::error_index::NAMES
        .into_iter()
        .chain(["handler_skipped"])
        .collect()
}

/// README's metrics table says what each reason of `tracking_errors_total` means: it left
/// out `listener_map_full`, `count_missing` and `pod_listener_map_full`.
#[test]
fn readme_names_every_tracking_error_reason() {
    let readme = read(&workspace().join("README.md"));
    let row = readme
        .lines()
        .find(|line| line.starts_with("| `tracking_errors_total{reason}`"))
        .expect("README.md's metrics table has tracking_errors_total");
    let missing: Vec<&str> = tracking_error_reasons()
        .into_iter()
        .filter(|reason| !row.contains(reason))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md's tracking_errors_total row does not name {missing:?}: {row}"
    );
}
