//! drain-agent: counts inbound TCP connections per local port from the kernel and answers
//! "is this port drained?" over HTTP. See the README for the contracts; each module has one job.

pub mod addr;
pub mod agent;
pub mod build_info;
pub mod cli;
pub mod closer;
pub mod doubt;
pub mod drain;
pub mod drain_rule;
pub mod duration;
pub mod http;
pub mod kernel;
pub mod logging;
pub mod metric_labels;
pub mod metrics;
pub mod repair;
pub mod sys;
pub mod tasks;
#[cfg(test)]
mod test_skip;
pub mod tracker;
