//! Simulated pods: a network namespace with `eth0` on a veth pair to the host, host side
//! `.1`, pod side `.2` of 10.213.`subnet`.0/30 (addresses that exist only inside the tests).

use std::{net::TcpStream, process::Command, time::Duration};

use super::{Netns, Server, run};

pub struct Pod {
    pub netns: Netns,
    pub host_link: String,
    pub ip: String,
}

impl Pod {
    /// `tag` names the namespace; `subnet` (one per pod, as its addresses are) and this
    /// process's id name the host side of the veth pair (at most 15 characters), so neither
    /// concurrent tests nor concurrent test binaries clash. (It was the tag's last letter:
    /// two tests of one file, "podb" and "glb", took the same link from each other.)
    pub fn new(tag: &str, subnet: u8) -> Self {
        let netns = Netns::new(tag);
        let host_link = format!("dp{}s{subnet}", std::process::id() % 100_000);
        let _ = Command::new("ip")
            .args(["link", "del", &host_link])
            .output();
        run(
            "ip",
            &[
                "link",
                "add",
                &host_link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns.name,
            ],
        );
        let ip = format!("10.213.{subnet}.2");
        let host_ip = format!("10.213.{subnet}.1/30");
        run("ip", &["addr", "add", &host_ip, "dev", &host_link]);
        run("ip", &["link", "set", &host_link, "up"]);
        let pod_ip = format!("{ip}/30");
        run(
            "ip",
            &["-n", &netns.name, "addr", "add", &pod_ip, "dev", "eth0"],
        );
        run("ip", &["-n", &netns.name, "link", "set", "eth0", "up"]);
        Self {
            netns,
            host_link,
            ip,
        }
    }

    /// A listener inside the pod, on all its addresses.
    pub fn listen(&self, port: u16) -> Server {
        self.netns
            .run_in(move || Server::start(&format!("0.0.0.0:{port}")))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
    }
}

/// `count` connections from here to `ip:port`, each accepted by `server` before this returns.
pub fn connect(ip: &str, port: u16, count: usize, server: &Server) -> Vec<TcpStream> {
    let before = server.accepted();
    let clients = (0..count)
        .map(|_| {
            TcpStream::connect_timeout(
                &format!("{ip}:{port}").parse().expect("addr"),
                Duration::from_secs(5),
            )
            .expect("connect to pod")
        })
        .collect();
    server.wait_accepted(before + count);
    clients
}
