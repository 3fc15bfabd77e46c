//! drain-agent: counts inbound TCP connections per local port from the kernel and answers
//! "is this port drained?" over HTTP. See the README for the contracts; each module has one job.

pub mod addr;
pub mod advice;
pub mod agent;
pub mod agentcheck;
pub mod api;
pub mod authority;
pub mod build_info;
pub mod cli;
pub mod client;
pub mod closer;
pub mod doubt;
pub mod drain;
pub mod drain_rule;
pub mod duration;
pub mod fdlimit;
pub mod generate;
pub mod http;
pub mod identify;
pub mod ifaddrs;
pub mod journal;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod netns_watch;
pub mod pod_addresses;
pub mod pod_scope;
pub mod pods;
pub mod repair;
pub mod server;
pub mod sockdiag;
pub mod state_file;
pub mod tasks;
pub mod tracker;
