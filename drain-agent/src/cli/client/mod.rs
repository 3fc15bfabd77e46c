//! `drain-agent wait`, `status` and `probe`: small clients of a running agent, for images
//! without curl. Plain HTTP/1.1 over a TCP socket, no TLS: the transport (`transport.rs`,
//! URL and answers parsed by the `http` and `httparse` crates), whose server must be the
//! agent's socket when it is in this network namespace (`owner.rs`), and the commands
//! (`wait.rs`, `status.rs`, `probe.rs`).

mod owner;
mod probe;
mod status;
#[cfg(test)]
mod testing;
mod transport;
mod wait;

pub use self::{
    owner::ServerOwners,
    probe::probe,
    status::status,
    transport::{AgentUrl, Deadlines, Response, get, get_within},
    wait::{describe_remaining, wait},
};
use crate::http::api::ErrorBody;

/// Exit status of `wait` when the port drained.
pub const EXIT_DRAINED: u8 = 0;
/// Exit status of `wait` when the port did not drain in time.
pub const EXIT_NOT_DRAINED: u8 = 1;
/// Exit status of `status` when the agent cannot vouch for the counts it shows (degraded,
/// seeding, a port outside `--ports`, rows short of the port's count).
pub const EXIT_NOT_VOUCHED: u8 = 1;
/// Exit status for usage errors and an unreachable agent.
pub const EXIT_ERROR: u8 = 2;

/// The error an agent's answer carries (its JSON `error`), or the answer's text.
fn error_text(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body).map_or_else(|_| body.trim().to_owned(), |e| e.error)
}
