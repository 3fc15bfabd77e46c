//! HTTP for the tests: one `GET` on a fresh connection through the agent's own client,
//! `drain_agent::client::get` (one deadline for the whole exchange, chunked bodies joined),
//! so the tests do not carry a second hand-written client.

use std::{net::SocketAddr, time::Duration};

use drain_agent::client::{AgentUrl, get as client_get};

/// `GET path` from the server at `addr`: status and body.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let url = AgentUrl {
        host: addr.ip().to_string(),
        port: addr.port(),
        prefix: String::new(),
        token: None,
    };
    get_url(&url, path, timeout)
}

/// `GET path` below `url` (`http://host:port[/prefix]`): status and body.
pub fn get_url(url: &AgentUrl, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let response = client_get(url, path, timeout)?;
    Ok((response.status, response.body))
}

/// The loopback address of `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
