//! `--pod-listen`: the agent's API inside every pod's network namespace. Pods are network
//! namespaces with veth pairs to the host (10.213.3x.0/30, addresses that exist only in
//! this test); the real agent binary serves inside them. A pod's requests answer for that
//! pod only; the kubelet-style caller (root on the host, at the pod's IP) is answered, other
//! callers (another user on the host, and a call a sidecar in the pod relays, among them)
//! are refused; a new namespace gets its listener within a second, a deleted one
//! is let go (no socket of the agent pins it); a pod holding the port keeps it; and
//! SIGTERM answers waiters on every listener.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{
    Agent, Netns, connect_from, free_port,
    http::curl,
    kernel_available,
    pod::{Pod, connect},
    run, wait_until,
};

/// `GET path` from inside the namespace at `netns_path` (or from the host with `None`)
/// to `addr`: status and JSON body (`Null` when not JSON).
fn get_from(netns_path: Option<&str>, addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let path = path.to_owned();
    let fetch = move || common::http::get(addr, &path, Duration::from_secs(60));
    let (status, body) = match netns_path {
        Some(ns) => drain_agent::sys::netns::run_in_path(Path::new(ns), fetch),
        None => fetch(),
    }
    .expect("request answered");
    (status, serde_json::from_str(&body).unwrap_or_default())
}

/// The same from another thread, for requests that block.
fn spawn_get(
    netns_path: Option<String>,
    addr: SocketAddr,
    path: String,
) -> thread::JoinHandle<(u16, serde_json::Value, Duration)> {
    thread::spawn(move || {
        let started = Instant::now();
        let (status, body) = get_from(netns_path.as_deref(), addr, &path);
        (status, body, started.elapsed())
    })
}

fn inode_of(path: &str) -> u64 {
    std::fs::metadata(path).expect("namespace file").ino()
}

/// Every place a network namespace inode shows from user space: processes' and threads'
/// namespaces (the agent's setns threads among them) and `lsns`.
fn namespace_visible(inode: u64) -> Vec<String> {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(entry.path().join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if std::fs::metadata(task.path().join("ns/net")).is_ok_and(|m| m.ino() == inode) {
                seen.push(format!("{}", task.path().display()));
            }
        }
    }
    let lsns = Command::new("lsns")
        .args(["-t", "net", "-n", "-o", "NS"])
        .output()
        .expect("lsns");
    if String::from_utf8_lossy(&lsns.stdout)
        .lines()
        .any(|line| line.trim() == inode.to_string())
    {
        seen.push("lsns".into());
    }
    seen
}

/// The network namespace inodes of the sockets `pid` holds: each descriptor copied with
/// pidfd_getfd, its namespace asked with SIOCGSKNS.
fn socket_namespaces(pid: u32) -> Vec<u64> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: pidfd_open with a pid and no flags.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: pidfd_getfd copies a descriptor of the target into this process.
        let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
        if copy < 0 {
            continue;
        }
        let copy = copy as i32;
        // SAFETY: SIOCGSKNS on a socket returns a new descriptor of its network namespace.
        let ns = unsafe { libc::ioctl(copy, SIOCGSKNS) };
        if ns >= 0 {
            let metadata = std::fs::metadata(format!("/proc/self/fd/{ns}")).expect("ns fd");
            found.push(metadata.ino());
            // SAFETY: closing the descriptor the ioctl returned.
            unsafe { libc::close(ns) };
        }
        // SAFETY: closing our copy.
        unsafe { libc::close(copy) };
    }
    // SAFETY: closing the pidfd.
    unsafe { libc::close(pidfd as i32) };
    found
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_api_inside_every_pod() {
    if !kernel_available("the_api_inside_every_pod") {
        return;
    }
    let pid = std::process::id();
    // Only this test's namespaces get listeners (other tests on this machine make theirs).
    let prefix = format!("da-pl{pid}-");
    let tag = |t: &str| format!("pl{pid}-{t}");
    let pod_port = free_port();
    let pod_a = Pod::new(&tag("a"), 31);
    let pod_b = Pod::new(&tag("b"), 32);
    // A pod that serves on the agent's pod port itself.
    let squatter = Pod::new(&tag("c"), 33);
    let squatter_server = squatter.listen(pod_port);
    // A namespace outside the prefix, wired to pod A directly: neither loopback nor a node
    // address for A's listener.
    let stranger = Netns::new(&format!("plx{pid}"));
    let (a_side, x_side) = (
        format!("da{}a", pid % 100_000),
        format!("da{}x", pid % 100_000),
    );
    run(
        "ip",
        &[
            "-n",
            &pod_a.netns.name,
            "link",
            "add",
            &a_side,
            "type",
            "veth",
            "peer",
            "name",
            &x_side,
            "netns",
            &stranger.name,
        ],
    );
    run(
        "ip",
        &[
            "-n",
            &pod_a.netns.name,
            "addr",
            "add",
            "10.213.34.1/30",
            "dev",
            &a_side,
        ],
    );
    run(
        "ip",
        &["-n", &pod_a.netns.name, "link", "set", &a_side, "up"],
    );
    run(
        "ip",
        &[
            "-n",
            &stranger.name,
            "addr",
            "add",
            "10.213.34.2/30",
            "dev",
            &x_side,
        ],
    );
    run("ip", &["-n", &stranger.name, "link", "set", &x_side, "up"]);

    let pod_listen = format!("0.0.0.0:{pod_port}");
    let mut agent = Agent::start(&[
        "--pod-listen",
        &pod_listen,
        "--pod-netns-prefix",
        &prefix,
        "--pod-http-max-connections",
        "8",
        "--max-waiters-per-source",
        "3",
        // Its SIGTERM below answers the waiters at once (tests/handover.rs keeps the grace).
        "--shutdown-grace",
        "0s",
    ]);
    // Every pod is served, the squatter too: the port is steered to the agent (sk_lookup)
    // only where no application listens on it, and bound nowhere (tests/pod_port.rs).
    wait_until("pod listeners", Duration::from_secs(5), || {
        agent.metric("drain_agent_pod_listeners{state=\"listening\"}") == Some(3.0)
            && agent.metric("drain_agent_pod_listeners{state=\"skipped\"}") == Some(0.0)
    });
    // The squatter's own server keeps working.
    let before = squatter_server.accepted();
    let _kept = TcpStream::connect_timeout(
        &format!("{}:{pod_port}", squatter.ip).parse().expect("addr"),
        Duration::from_secs(5),
    )
    .expect("the pod's own server on the port");
    squatter_server.wait_accepted(before + 1);

    let port = free_port();
    let server_a = pod_a.listen(port);
    let server_b = pod_b.listen(port);
    let clients_a = connect(&pod_a.ip, port, 3, &server_a);
    let clients_b = connect(&pod_b.ip, port, 5, &server_b);
    let local = SocketAddr::from(([127, 0, 0, 1], pod_port));
    let (path_a, path_b) = (pod_a.netns.path(), pod_b.netns.path());

    // Inside A (`ip netns exec A curl`): A's count only.
    let curl = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod_a.netns.name,
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!(
            "http://127.0.0.1:{pod_port}/drained?port={port}&timeout=0"
        ))
        .output()
        .expect("curl in pod A");
    let text = String::from_utf8_lossy(&curl.stdout);
    println!("curl inside pod A: {text}");
    assert!(text.ends_with("\n503"), "{text}");
    let body: serde_json::Value =
        serde_json::from_str(text.lines().next().unwrap_or_default()).expect("json");
    assert_eq!(body["active"], 3, "{body}");
    let (status, body) = get_from(
        Some(&path_b),
        local,
        &format!("/drained?port={port}&timeout=0"),
    );
    assert_eq!((status, body["active"].as_u64()), (503, Some(5)), "{body}");
    // The node listener still sees the whole node.
    assert_eq!(agent.active(port), 8);

    // A naming B: 400, whether by path, inode, address or a namespace that does not exist.
    let b_inode = inode_of(&path_b);
    for query in [
        format!("netns={path_b}"),
        format!("netns={b_inode}"),
        "netns=4294967295".to_owned(),
        format!("addr={}", pod_b.ip),
    ] {
        let (status, body) = get_from(
            Some(&path_a),
            local,
            &format!("/drained?port={port}&timeout=0&{query}"),
        );
        assert_eq!(status, 400, "{query}: {body}");
        println!("A asking {query}: {body}");
    }
    let (status, body) = get_from(
        Some(&path_a),
        local,
        &format!(
            "/drained?port={port}&timeout=0&addr={}&netns={path_a}",
            pod_a.ip
        ),
    );
    assert_eq!((status, body["active"].as_u64()), (503, Some(3)), "{body}");
    // Node-wide data is not served in a pod; /connections shows the pod only.
    for path in ["/metrics", "/advice"] {
        let (status, _) = get_from(Some(&path_a), local, path);
        assert_eq!(status, 403, "{path}");
    }
    let (status, body) = get_from(Some(&path_a), local, "/connections");
    assert_eq!(status, 200);
    let endpoints = body["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 1, "{body}");
    assert_eq!(endpoints[0]["addr"], pod_a.ip.as_str(), "{body}");
    assert!(!body.to_string().contains(&pod_b.ip), "{body}");

    // A caller that is neither loopback nor the node: 403 (the stranger at A's other IP).
    let (status, body) = get_from(
        Some(&stranger.path()),
        SocketAddr::from(([10, 213, 34, 1], pod_port)),
        "/healthz",
    );
    assert_eq!(status, 403, "{body}");
    println!("stranger: {body}");

    // A's waiters use up A's per-source limit (3): a fourth is turned away; B is not
    // affected.
    let a_waiters: Vec<_> = (0..3)
        .map(|_| {
            spawn_get(
                Some(path_a.clone()),
                local,
                format!("/drained?port={port}&timeout=30s"),
            )
        })
        .collect();
    agent.wait_for_waiters(3);
    let (status, body) = get_from(
        Some(&path_a),
        local,
        &format!("/drained?port={port}&timeout=30s"),
    );
    assert_eq!(status, 429, "{body}");
    let b_waiter = spawn_get(
        Some(path_b.clone()),
        local,
        format!("/drained?port={port}&timeout=30s"),
    );
    agent.wait_for_waiters(4);
    drop(clients_b);
    server_b.close_all();
    let (status, body, took) = b_waiter.join().expect("B's waiter");
    assert_eq!(
        (status, body["drained"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    println!("B drained in {took:?} while A's 3 waiters waited");
    assert!(a_waiters.iter().all(|w| !w.is_finished()));

    // The kubelet's httpGet: the host calls A's IP on the pod port; it blocks until A drains.
    // It joins the drain A's waiters started, so it names no setting of its own (a
    // differing `quiet` would be 409: one scope's drain has one rule).
    let http_get = spawn_get(
        None,
        format!("{}:{pod_port}", pod_a.ip).parse().expect("addr"),
        format!("/drained?port={port}&timeout=20s"),
    );
    thread::sleep(Duration::from_millis(300));
    assert!(
        !http_get.is_finished(),
        "the httpGet answered while A was busy"
    );
    drop(clients_a);
    server_a.close_all();
    let (status, body, took) = http_get.join().expect("httpGet");
    assert_eq!(
        (status, body["drained"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    println!("httpGet from the node to A's IP answered 200 after {took:?}");
    for waiter in a_waiters {
        let (status, _, _) = waiter.join().expect("A's waiter");
        assert_eq!(status, 200);
    }

    // A namespace made now gets its listener within a second; deleted, it is let go.
    let started = Instant::now();
    let late = Netns::new(&tag("d"));
    let late_path = late.path();
    let late_inode = inode_of(&late_path);
    let mut answered = None;
    while started.elapsed() < Duration::from_secs(5) {
        let probe = late_path.clone();
        let ok = drain_agent::sys::netns::run_in_path(Path::new(&probe), move || {
            Ok(common::http::get(local, "/healthz", Duration::from_secs(1))
                .is_ok_and(|(s, _)| s == 200))
        })
        .unwrap_or(false);
        if ok {
            answered = Some(started.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let answered = answered.expect("the new namespace got a listener");
    println!("a namespace made after the start was served {answered:?} after `ip netns add`");
    assert!(answered < Duration::from_secs(1), "{answered:?}");
    assert!(
        socket_namespaces(agent.pid()).contains(&late_inode),
        "the agent's listener socket is in the new namespace"
    );
    let deleted = Instant::now();
    drop(late);
    wait_until(
        "the agent to let the deleted namespace go",
        Duration::from_secs(5),
        || !socket_namespaces(agent.pid()).contains(&late_inode),
    );
    let released = deleted.elapsed();
    wait_until("the namespace to vanish", Duration::from_secs(5), || {
        namespace_visible(late_inode).is_empty()
    });
    println!(
        "after `ip netns del`: the agent's socket closed within {released:?}; inode {late_inode} visible nowhere after {:?}",
        deleted.elapsed()
    );
    wait_until("the listener count", Duration::from_secs(5), || {
        agent.metric("drain_agent_pod_listeners{state=\"listening\"}") == Some(3.0)
    });

    // SIGTERM: waiters on the node listener and inside a pod are answered; clean exit.
    let _busy = connect(&pod_b.ip, port, 1, &server_b);
    let pod_waiter = spawn_get(
        Some(path_b.clone()),
        local,
        format!("/drained?port={port}&timeout=60s"),
    );
    let node_waiter = spawn_get(
        None,
        SocketAddr::from(([127, 0, 0, 1], agent.port)),
        format!("/drained?port={port}&timeout=60s"),
    );
    agent.wait_for_waiters(2);
    let stopping = Instant::now();
    let status = agent.stop();
    assert!(status.success(), "{status:?}");
    for (name, waiter) in [("pod", pod_waiter), ("node", node_waiter)] {
        let (status, body, _) = waiter.join().expect("waiter");
        assert_eq!(status, 503, "{name}: {body}");
        assert_eq!(body["drained"], false, "{name}: {body}");
    }
    println!(
        "SIGTERM: exited and answered both waiters in {:?}",
        stopping.elapsed()
    );
    // No listener is left in the pods.
    let status = drain_agent::sys::netns::run_in_path(Path::new(&path_b), move || {
        Ok(common::http::get(local, "/healthz", Duration::from_secs(1)).map_or(0, |(s, _)| s))
    })
    .expect("probe");
    assert_eq!(status, 0);
    drop(squatter_server);
}

/// Only root of the node acts for a pod from the node: the in-pod listener answers a caller
/// from a node address (the kubelet's `httpGet`) by the owner of its socket in the node's
/// namespace. `curl` as uid 65534 at the pod's IPv4 and IPv6 address (a dual-stack
/// `[::]` listener: the IPv4 caller arrives IPv4-mapped) may neither start a drain of the
/// pod's port (which closes its clients at the deadline with `on_timeout=close`) nor read
/// its clients' addresses, and nothing changes; root's same request is answered as before.
/// Before the fix every caller from a node address was the pod itself: 201 for uid 65534.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn only_root_of_the_node_acts_for_a_pod_at_its_address() {
    if !kernel_available("only_root_of_the_node_acts_for_a_pod_at_its_address") {
        return;
    }
    const NOBODY: u32 = 65_534;
    let pid = std::process::id();
    let prefix = format!("da-pu{pid}-");
    // Its own last letter: it names the host end of the veth pair, which a test running
    // beside it in this binary (pod "a") must not share.
    let pod = Pod::new(&format!("pu{pid}-u"), 35);
    // IPv6 beside the pod's IPv4 (`nodad`: usable at once).
    let (host_v6, pod_v6) = ("fd00:213:35::1", "fd00:213:35::2");
    run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{host_v6}/64"),
            "dev",
            &pod.host_link,
            "nodad",
        ],
    );
    run(
        "ip",
        &[
            "-n",
            &pod.netns.name,
            "addr",
            "add",
            &format!("{pod_v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    let pod_port = free_port();
    let agent = Agent::start(&[
        "--pod-listen",
        &format!("[::]:{pod_port}"),
        "--pod-netns-prefix",
        &prefix,
    ]);
    wait_until("the pod listener", Duration::from_secs(5), || {
        agent.metric("drain_agent_pod_listeners{state=\"listening\"}") == Some(1.0)
    });
    let port = free_port();
    let server = pod.listen(port);
    let _clients = connect(&pod.ip, port, 2, &server);
    let pod_urls = [
        format!("http://{}:{pod_port}", pod.ip),
        format!("http://[{pod_v6}]:{pod_port}"),
    ];
    let drains_in_progress = || {
        let (status, body) = agent.get_json("/drains");
        assert_eq!(status, 200, "{body}");
        body["in_progress"].as_array().expect("in_progress").len()
    };
    for base in &pod_urls {
        let (status, body) = curl(
            None,
            Some(NOBODY),
            "POST",
            &format!("{base}/drain?port={port}&timeout=1s&on_timeout=close"),
        );
        println!("uid {NOBODY} POST /drain at {base}: {status} {body}");
        assert_eq!(status, 403, "{base}: {body}");
        assert!(body.contains("root"), "{base}: says who may: {body}");
        for path in [
            format!("/connections?port={port}&peers=true"),
            format!("/drained?port={port}&timeout=0"),
            "/drains".to_owned(),
        ] {
            let (status, body) = curl(None, Some(NOBODY), "GET", &format!("{base}{path}"));
            assert_eq!(status, 403, "{base}{path}: {body}");
            assert!(!body.contains("10.213.35.1"), "{base}{path}: {body}");
        }
        assert_eq!(drains_in_progress(), 0, "{base}: uid {NOBODY} started none");
    }
    // The clients are there still, past the refused drain's deadline.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(agent.active(port), 2);

    // Root (the kubelet) at either address: answered as the pod, as before.
    for base in &pod_urls {
        let (status, body) = curl(
            None,
            None,
            "POST",
            &format!("{base}/drain?port={port}&timeout=30s"),
        );
        assert_eq!(status, 201, "{base}: {body}");
        assert_eq!(drains_in_progress(), 1, "{base}");
        let (status, body) = curl(
            None,
            None,
            "GET",
            &format!("{base}/connections?port={port}&peers=true"),
        );
        assert_eq!(status, 200, "{base}: {body}");
        assert!(body.contains(&pod.ip), "{base}: {body}");
        let (status, body) = curl(None, None, "DELETE", &format!("{base}/drain?port={port}"));
        assert_eq!(status, 200, "{base}: {body}");
        assert_eq!(drains_in_progress(), 0, "{base}");
    }
    // The pod itself, on its loopback, is the pod whoever runs the call there (no socket
    // of the node's is asked about): `nsenter` as root, then `curl` as uid 65534.
    let inside = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns.path()))
        .args([
            "setpriv",
            "--reuid",
            &NOBODY.to_string(),
            "--regid",
            &NOBODY.to_string(),
            "--clear-groups",
            "curl",
            "-sS",
            "-m",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!(
            "http://127.0.0.1:{pod_port}/connections?port={port}&peers=true"
        ))
        .output()
        .expect("curl inside the pod");
    assert_eq!(
        String::from_utf8_lossy(&inside.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&inside.stderr)
    );
}

/// A service mesh's sidecar in REDIRECT mode (Istio's): the mesh's rules send every
/// connection to the pod to the sidecar's own port, and the sidecar opens each one's
/// upstream to the original destination, the pod's address, from 127.0.0.6 over the pod's
/// loopback. Here it takes connections on a port of its own on every address of `pod` and
/// relays each to `upstream` so. Returns its port.
fn sidecar(pod: &Netns, upstream: SocketAddrV4) -> u16 {
    pod.run_in(move || {
        let listener = TcpListener::bind("0.0.0.0:0").expect("the sidecar's port");
        let port = listener.local_addr().expect("addr").port();
        // Started from this thread, the relay is in the pod's namespace too: the upstream
        // sockets it makes are the pod's.
        thread::spawn(move || {
            for downstream in listener.incoming() {
                let Ok(downstream) = downstream else {
                    break;
                };
                let upstream = connect_from(Ipv4Addr::new(127, 0, 0, 6), upstream)
                    .expect("the sidecar's upstream");
                let (mut from, mut to) = (
                    downstream.try_clone().expect("clone"),
                    upstream.try_clone().expect("clone"),
                );
                thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
                let (mut from, mut to) = (upstream, downstream);
                thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        });
        port
    })
}

/// Audit: with a service mesh's sidecar in the pod (REDIRECT mode, Istio's default), a
/// connection from another pod or host to the pod's address reaches the in-pod listener
/// relayed: from 127.0.0.6, a loopback address, to the pod's address. The listener took
/// every loopback caller for the pod itself, so any pod could drain another (out of
/// rotation, its clients closed at the deadline), cancel its stop hook's drain, and read its
/// clients' addresses. A loopback caller is the pod only when the connection is loopback at
/// both ends: a relayed one gets `403` saying so, and nothing changes; the pod's own call on
/// its loopback is answered as before. Before the fix the relayed `POST /drain` was `201`.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_call_relayed_by_a_sidecar_in_the_pod_is_not_the_pod() {
    if !kernel_available("a_call_relayed_by_a_sidecar_in_the_pod_is_not_the_pod") {
        return;
    }
    let pid = std::process::id();
    let prefix = format!("da-pr{pid}-");
    let pod = Pod::new(&format!("pr{pid}-r"), 36);
    // Another pod, wired to this one directly: it calls the sidecar at the pod's address on
    // that link.
    let other = Netns::new(&format!("prx{pid}"));
    let (pod_side, other_side) = (
        format!("dr{}p", pid % 100_000),
        format!("dr{}o", pid % 100_000),
    );
    run(
        "ip",
        &[
            "-n",
            &pod.netns.name,
            "link",
            "add",
            &pod_side,
            "type",
            "veth",
            "peer",
            "name",
            &other_side,
            "netns",
            &other.name,
        ],
    );
    for (netns, link, addr) in [
        (&pod.netns, &pod_side, "10.213.38.1/30"),
        (&other, &other_side, "10.213.38.2/30"),
    ] {
        run("ip", &["-n", &netns.name, "addr", "add", addr, "dev", link]);
        run("ip", &["-n", &netns.name, "link", "set", link, "up"]);
    }
    let pod_ip: Ipv4Addr = pod.ip.parse().expect("the pod's address");
    let port = free_port();
    let server = pod.listen(port);
    let _clients = connect(&pod.ip, port, 2, &server);
    // Steered to the agent's socket (its local end is the address the caller addressed),
    // and bound in the pod (the fallback without `sk_lookup`).
    for mode in [None, Some("--pod-listen-bind")] {
        let pod_port = free_port();
        let pod_listen = format!("0.0.0.0:{pod_port}");
        let mut args = vec!["--pod-listen", &pod_listen, "--pod-netns-prefix", &prefix];
        args.extend(mode);
        let agent = Agent::start(&args);
        wait_until("the pod listener", Duration::from_secs(5), || {
            agent.metric("drain_agent_pod_listeners{state=\"listening\"}") == Some(1.0)
        });
        let relay = sidecar(&pod.netns, SocketAddrV4::new(pod_ip, pod_port));
        relayed_calls_are_refused(&agent, &pod, &other, relay, pod_port, port, mode);
    }
}

/// [`a_call_relayed_by_a_sidecar_in_the_pod_is_not_the_pod`] with `agent` serving the pod at
/// `pod_port` and the sidecar at `relay`, the pod's clients on `port`.
fn relayed_calls_are_refused(
    agent: &Agent,
    pod: &Pod,
    other: &Netns,
    relay: u16,
    pod_port: u16,
    port: u16,
    mode: Option<&str>,
) {
    let drains_in_progress = || {
        let (status, body) = agent.get_json("/drains");
        assert_eq!(status, 200, "{body}");
        body["in_progress"].as_array().expect("in_progress").len()
    };
    let other_path = other.path();
    let relayed = |method: &str, path: &str| {
        let (status, body) = curl(
            Some(&other_path),
            None,
            method,
            &format!("http://10.213.38.1:{relay}{path}"),
        );
        println!("{mode:?}: {method} {path} relayed: {status} {body}");
        (status, body)
    };
    let refused = |(status, body): (u16, String)| {
        assert_eq!(status, 403, "{mode:?}: {body}");
        assert!(body.contains("proxy"), "{mode:?}: says why: {body}");
        assert!(
            body.contains("excludeInboundPorts"),
            "{mode:?}: says the way out: {body}"
        );
        assert!(
            !body.contains("10.213.") && !body.contains("127.0.0."),
            "{mode:?}: names no address: {body}"
        );
    };

    refused(relayed(
        "POST",
        &format!("/drain?port={port}&timeout=1s&on_timeout=close"),
    ));
    assert_eq!(
        drains_in_progress(),
        0,
        "{mode:?}: the relayed call started none"
    );
    // The clients are there still, past the refused drain's deadline.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(agent.active(port), 2, "{mode:?}");

    // The pod itself, on its loopback: its drain starts.
    let inside = |method: &str, path: &str| {
        curl(
            Some(&pod.netns.path()),
            None,
            method,
            &format!("http://127.0.0.1:{pod_port}{path}"),
        )
    };
    let (status, body) = inside("POST", &format!("/drain?port={port}&timeout=30s"));
    assert_eq!(status, 201, "{mode:?}: {body}");
    assert_eq!(drains_in_progress(), 1, "{mode:?}");
    // Relayed, the pod's drain can be neither cancelled nor looked at.
    refused(relayed("DELETE", &format!("/drain?port={port}")));
    assert_eq!(
        drains_in_progress(),
        1,
        "{mode:?}: the relayed call cancelled nothing"
    );
    refused(relayed(
        "GET",
        &format!("/connections?port={port}&peers=true"),
    ));
    refused(relayed("GET", "/drains"));
    // The pod's own calls are answered as before.
    let (status, body) = inside("GET", &format!("/connections?port={port}&peers=true"));
    assert_eq!(status, 200, "{mode:?}: {body}");
    let (status, body) = inside("DELETE", &format!("/drain?port={port}"));
    assert_eq!(status, 200, "{mode:?}: {body}");
    assert_eq!(drains_in_progress(), 0, "{mode:?}");
}

/// Audit: with no `--pod-netns-prefix` (the DaemonSet's default) a listener was opened in
/// every network namespace, those any local user makes (`unshare -Urn`) among them: each
/// cost the agent descriptors, a program and a server, and each was an owner of its own
/// in the shared limits (its loopback callers a pod's), so a local user could fill the
/// node's drains and waiters and run the agent out of descriptors. Namespaces a user's user
/// namespace owns are no pod's (`sys/pod_addresses.rs`): the agent listens in none of them.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn no_listener_in_a_namespace_a_local_user_made() {
    if !kernel_available("no_listener_in_a_namespace_a_local_user_made") {
        return;
    }
    const NOBODY: &str = "65534";
    const USER_NAMESPACES: usize = 5;
    let pid = std::process::id();
    // uid 65534's own user and network namespaces, loopback up, as any local user can.
    let users: Vec<common::child::Guard> = (0..USER_NAMESPACES)
        .map(|n| {
            common::child::Guard::spawn(
                &format!("unshare -Urn ({n})"),
                Command::new("setpriv")
                    .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
                    .args([
                        "unshare",
                        "-Urn",
                        "sh",
                        "-c",
                        "ip link set lo up && exec sleep 120",
                    ]),
            )
        })
        .collect();
    // A namespace root made (a pod's): served, so the agent has looked at the others.
    let pod = Netns::new(&format!("pn{pid}"));
    let (user_paths, user_inodes) =
        namespaces_up("the user namespaces", users.iter().map(|user| user.pid()));
    let (pod_port, socket_port) = (free_port(), free_port());
    let agent = Agent::start(&[
        "--pod-listen",
        &format!("127.0.0.1:{pod_port}"),
        "--pod-socket-port",
        &socket_port.to_string(),
    ]);
    let local = SocketAddr::from(([127, 0, 0, 1], pod_port));
    let pod_path = pod.path();
    wait_until("the pod's listener", Duration::from_secs(10), || {
        drain_agent::sys::netns::run_in_path(Path::new(&pod_path), move || {
            Ok(TcpStream::connect_timeout(&local, Duration::from_secs(1)).is_ok())
        })
        .unwrap_or(false)
    });
    // A rescan or two more: a namespace found in the same scan as the pod's is served by now.
    thread::sleep(Duration::from_millis(2500));
    let held = socket_namespaces(agent.pid());
    assert!(
        held.contains(&inode_of(&pod_path)),
        "the pod's listener: {held:?}"
    );
    for (path, inode) in user_paths.iter().zip(&user_inodes) {
        assert!(
            !held.contains(inode),
            "a socket of the agent's in uid {NOBODY}'s namespace {inode}"
        );
        for port in [pod_port, socket_port] {
            let connected = drain_agent::sys::netns::run_in_path(Path::new(path), move || {
                Ok(TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_secs(1),
                )
                .is_ok())
            })
            .expect("enter the user's namespace");
            assert!(!connected, "port {port} answered in namespace {inode}");
        }
    }
    let user_owned = agent.metric("drain_agent_pod_listeners{state=\"user_owned\"}");
    assert!(user_owned >= Some(USER_NAMESPACES as f64), "{user_owned:?}");
    let log = agent.log_text();
    for inode in &user_inodes {
        assert!(
            !log.contains(&format!("inside network namespace {inode} ")),
            "the agent served namespace {inode}: {log}"
        );
    }
    drop(users);
}

/// Audit: a pod running as root without a user namespace of its own (`hostUsers` left
/// true, as the `baseline` Pod Security level allows) could make any number of network
/// namespaces, each in a user namespace of its own (`unshare -Urn`); the user namespaces'
/// creator being root (uid 0 on the node), each was taken for a `hostUsers: false` pod's
/// and got a listener, an owner of its own in the shared limits: ~1,024 of them filled
/// `--pod-max-listeners`, and later pods' hooks found no agent. Such a namespace is not
/// pinned under /run/netns (only root of the node mounts there; a CRI runtime pins every
/// pod's): it gets none, and counts `user_owned`. One that a runtime pins after the agent
/// first saw it (a `hostUsers: false` pod: the runtime makes the namespace, then pins it)
/// is served once pinned.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn no_listener_in_a_namespace_a_root_container_made() {
    if !kernel_available("no_listener_in_a_namespace_a_root_container_made") {
        return;
    }
    const NESTED: usize = 3;
    let pid = std::process::id();
    // As a root container makes them: root of the node, a user namespace mapping root, a
    // network namespace inside it, loopback up; the last one is pinned later, as a runtime
    // pins a `hostUsers: false` pod's.
    let nested = common::child::user_owned_namespaces(NESTED + 1);
    // A namespace the runtime's way (`ip netns add`): served, so the agent has looked at
    // the others.
    let pod = Netns::new(&format!("rc{pid}"));
    let (nested_paths, nested_inodes) = namespaces_up(
        "the nested namespaces",
        nested.iter().map(|child| child.pid()),
    );
    let (pod_port, socket_port) = (free_port(), free_port());
    let agent = Agent::start(&[
        "--pod-listen",
        &format!("127.0.0.1:{pod_port}"),
        "--pod-socket-port",
        &socket_port.to_string(),
    ]);
    let served = |path: String| {
        let local = SocketAddr::from(([127, 0, 0, 1], pod_port));
        drain_agent::sys::netns::run_in_path(Path::new(&path), move || {
            Ok(TcpStream::connect_timeout(&local, Duration::from_secs(1)).is_ok())
        })
        .expect("enter the namespace")
    };
    wait_until("the pod's listener", Duration::from_secs(10), || {
        served(pod.path())
    });
    // A rescan or two more: a namespace found in the same scan as the pod's is served by now.
    thread::sleep(Duration::from_millis(2500));
    let held = socket_namespaces(agent.pid());
    assert!(
        held.contains(&inode_of(&pod.path())),
        "the pod's listener: {held:?}"
    );
    for (path, inode) in nested_paths.iter().zip(&nested_inodes) {
        assert!(
            !held.contains(inode),
            "a socket of the agent's in the nested namespace {inode}"
        );
        assert!(!served(path.clone()), "served in namespace {inode}");
    }
    let user_owned = agent.metric("drain_agent_pod_listeners{state=\"user_owned\"}");
    assert!(user_owned >= Some((NESTED + 1) as f64), "{user_owned:?}");
    // The runtime pins the last one (`ip netns attach`: a bind mount under /run/netns, as
    // containerd and CRI-O pin a `hostUsers: false` pod's): it is served.
    let pinned = Netns {
        name: format!("da-rc{pid}-pinned"),
    };
    let last = nested.last().expect("one to pin").pid().to_string();
    run("ip", &["netns", "attach", &pinned.name, &last]);
    wait_until(
        "the pinned namespace's listener",
        Duration::from_secs(5),
        || served(pinned.path()),
    );
    drop(pinned);
    drop(nested);
}

/// Audit: pod listeners had no bound: each costs descriptors (socket, steering program and
/// link, up to 16 + 4 connections), and every server was sized against the whole open-file
/// limit. `--pod-max-listeners` bounds them: past it a namespace gets none (WARN once,
/// `state="over_limit"`), and gets one once room is made.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn pod_listeners_stop_at_the_limit() {
    if !kernel_available("pod_listeners_stop_at_the_limit") {
        return;
    }
    let pid = std::process::id();
    let prefix = format!("da-pm{pid}-");
    let first = Netns::new(&format!("pm{pid}-a"));
    let second = Netns::new(&format!("pm{pid}-b"));
    let pod_port = free_port();
    let agent = Agent::start(&[
        "--pod-listen",
        &format!("127.0.0.1:{pod_port}"),
        "--pod-netns-prefix",
        &prefix,
        "--pod-max-listeners",
        "1",
    ]);
    let state =
        |state: &str| agent.metric(&format!("drain_agent_pod_listeners{{state=\"{state}\"}}"));
    wait_until(
        "one listener, one namespace over the limit",
        Duration::from_secs(5),
        || state("listening") == Some(1.0) && state("over_limit") == Some(1.0),
    );
    // Stays so over rescans, told once.
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        (state("listening"), state("over_limit")),
        (Some(1.0), Some(1.0))
    );
    let log = agent.log_text();
    assert_eq!(
        log.matches("--pod-max-listeners): 1 more").count(),
        1,
        "{log}"
    );
    // One goes: the other is served.
    drop(first);
    wait_until("the other namespace served", Duration::from_secs(5), || {
        state("listening") == Some(1.0) && state("over_limit") == Some(0.0)
    });
    let local = SocketAddr::from(([127, 0, 0, 1], pod_port));
    let (status, _) = get_from(Some(&second.path()), local, "/healthz");
    assert_eq!(status, 200);
}

/// The network namespaces of the processes `pids`, once each is a namespace of its own with
/// its loopback up (`what` names them in a timeout): their paths and inodes.
fn namespaces_up(what: &str, pids: impl Iterator<Item = u32>) -> (Vec<String>, Vec<u64>) {
    let paths: Vec<String> = pids.map(|pid| format!("/proc/{pid}/ns/net")).collect();
    let own = inode_of("/proc/self/ns/net");
    wait_until(what, Duration::from_secs(5), || {
        paths.iter().all(|path| {
            std::fs::metadata(path).is_ok_and(|m| m.ino() != own)
                && drain_agent::sys::netns::run_in_path(Path::new(path), || {
                    Ok(drain_agent::sys::ifaddrs::local_addresses()?
                        .iter()
                        .any(|addr| addr.is_loopback()))
                })
                .unwrap_or(false)
        })
    });
    let inodes = paths.iter().map(|path| inode_of(path)).collect();
    (paths, inodes)
}
