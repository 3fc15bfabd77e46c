//! `e2e-backend`: a small HTTP/1.1 backend for the rolling-deploy example and its end-to-end
//! test. `GET /fast`, `GET /slow?ms=M` (a body streamed over M ms), `GET /health`; keep-alive;
//! every answer says which backend gave it (`X-Backend: ADDRESS VERSION`).
//!
//! SIGTERM (or SIGINT) stops it gracefully: it stops accepting, closes idle keep-alive
//! connections at once, finishes the requests in flight, and exits 0. It logs what was open
//! at that moment (`shutdown … in_flight=N open_connections=M`), so a deploy can show whether
//! anything was still in flight when it stopped the backend.

mod http;
mod routes;
mod server;
mod shutdown;

use std::{
    net::{SocketAddr, TcpListener},
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Parser;

use crate::{
    server::{Context, Stats},
    shutdown::Shutdown,
};

#[derive(Parser)]
#[command(
    name = "e2e-backend",
    about = "A small HTTP backend with keep-alive, slow streamed answers and a graceful SIGTERM"
)]
struct Cli {
    /// Address to listen on, e.g. 127.0.0.1:8081.
    #[arg(long)]
    listen: SocketAddr,
    /// The version this instance calls itself (in /health and the X-Backend header).
    #[arg(long, default_value = "v1")]
    app_version: String,
    /// After SIGTERM, give requests in flight this long (seconds) to finish, then exit anyway.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("e2e-backend: {problem:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    // Before any thread exists, so that only the signal thread ever takes SIGTERM.
    shutdown::block_stop_signals()?;
    let listener = TcpListener::bind(cli.listen)
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let address = listener.local_addr().context("listener address")?;
    let identity = format!("{address} {}", cli.app_version);
    let stats = Arc::new(Stats::default());

    let report_stats = Arc::clone(&stats);
    let report_identity = identity.clone();
    let shutdown = Shutdown::listen(move |signal| {
        eprintln!(
            "e2e-backend {report_identity}: shutdown signal={signal} in_flight={} open_connections={}",
            report_stats.in_flight.load(Ordering::SeqCst),
            report_stats.open_connections()
        );
    })?;
    eprintln!(
        "e2e-backend {identity}: listening (pid {})",
        std::process::id()
    );

    let context = Arc::new(Context {
        shutdown,
        stats: Arc::clone(&stats),
        identity: identity.clone(),
        version: cli.app_version.clone(),
    });
    server::accept_until_shutdown(listener, &context)?;

    let still_open = stats.wait_all_closed(Duration::from_secs(cli.shutdown_timeout));
    eprintln!(
        "e2e-backend {identity}: exit served={} idle_keepalive_closed={} aborted={} still_open={still_open}",
        stats.served.load(Ordering::SeqCst),
        stats.idle_closed.load(Ordering::SeqCst),
        stats.aborted.load(Ordering::SeqCst),
    );
    Ok(())
}
