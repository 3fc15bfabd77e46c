//! `drain-agent completions SHELL` and `drain-agent manpage DIR`: shell completions and man
//! pages generated from the clap definitions in `cli`, by the binary itself.
//!
//! Why the binary and not xtask: they then always describe the binary they come with (a
//! user of a downloaded binary can regenerate them), and xtask does not have to link the
//! agent's library, whose build script compiles the eBPF programs with the pinned nightly.

use std::{io::Write as _, path::Path, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;

use crate::cli::Cli;

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "drain-agent", &mut out);
    report(
        std::io::stdout()
            .write_all(&out)
            .context("cannot write to stdout"),
    )
}

/// Writes `drain-agent.1` and one page per subcommand (`drain-agent-run.1`, …) into `dir`.
pub fn manpages(dir: &Path) -> ExitCode {
    report(write_manpages(dir))
}

fn write_manpages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let command = Cli::command();
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))
}

fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("drain-agent: {problem:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_manpages_name_the_subcommands() {
        let mut command = Cli::command();
        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut command,
            "drain-agent",
            &mut bash,
        );
        let bash = String::from_utf8(bash).expect("UTF-8");
        for word in ["wait", "status", "--listen", "--log-format"] {
            assert!(bash.contains(word), "bash completion lacks {word}");
        }
        let dir = std::env::temp_dir().join(format!("drain-agent-man-{}", std::process::id()));
        write_manpages(&dir).expect("man pages");
        let page = std::fs::read_to_string(dir.join("drain-agent-wait.1")).expect("wait page");
        assert!(page.contains(".TH"), "{page}");
        assert!(page.contains("settle"), "{page}");
        // Hidden subcommands get no page.
        assert!(!dir.join("drain-agent-manpage.1").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
