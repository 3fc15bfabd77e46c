//! HTTP for the tests: one `GET` on a fresh connection through the agent's own client,
//! `drain_agent::cli::client::get` (one deadline for the whole exchange, chunked bodies joined),
//! so the tests do not carry a second hand-written client.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use drain_agent::cli::client::{AgentUrl, ServerOwners, get as client_get};

/// `GET path` from the server at `addr`: status and body. Any server of the tests', not
/// only agents: nginx's workers run as `nobody`, and the agent's client talks to root's
/// and its own user's sockets only.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let url = AgentUrl {
        host: addr.ip().to_string(),
        port: addr.port(),
        prefix: String::new(),
        token: None,
        owners: ServerOwners::Anyone,
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

/// A request with any method, through curl (a Debian package the tests install; the
/// agent's own client only sends `GET`): status and body. `netns`: a namespace path to run
/// it in (`nsenter`), `uid`: the user to run it as (the agent tells callers by their
/// socket's owner).
pub fn curl(netns: Option<&str>, uid: Option<u32>, method: &str, url: &str) -> (u16, String) {
    let mut command = match netns {
        Some(path) => {
            let mut command = Command::new("nsenter");
            command.arg(format!("--net={path}")).arg("curl");
            command
        }
        None => Command::new("curl"),
    };
    command
        .args(["-sS", "-m", "20", "-X", method, "-w", "\n%{http_code}", url])
        .stdin(Stdio::null());
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt as _;
        command.uid(uid).gid(uid);
    }
    let output = command.output().expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// [`curl`] from here as this user, the body read as JSON (`Null` if it is not).
pub fn curl_json(method: &str, url: &str) -> (u16, serde_json::Value) {
    let (status, body) = curl(None, None, method, url);
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}
