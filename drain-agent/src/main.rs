//! The `drain-agent` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser as _;
use drain_agent::{
    agent,
    cli::client,
    cli::generate,
    cli::{Cli, Command},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => agent::main(cli.run),
        Some(Command::Run(args)) => agent::main(*args),
        Some(Command::Wait(args)) => client::wait(&args),
        Some(Command::Status(args)) => client::status(&args),
        Some(Command::Probe(args)) => client::probe(&args),
        Some(Command::Completions { shell }) => generate::completions(shell),
        Some(Command::Manpage { dir }) => generate::manpages(&dir),
    }
}
