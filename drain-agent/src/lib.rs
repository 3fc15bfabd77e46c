//! drain-agent: counts inbound TCP connections per local port from the kernel and answers
//! "is this port drained?" over HTTP. See the README for the contracts; each module has one job.

pub mod agent;
pub mod build_info;
pub mod cli;
pub mod client;
pub mod doubt;
pub mod duration;
pub mod fdlimit;
pub mod generate;
pub mod http;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod server;
pub mod sockdiag;
pub mod tasks;
pub mod tracker;
