//! Issue 22, item 3: `--pod-listen` takes no port from a pod. With `sk_lookup` the agent
//! binds the in-pod port (9100, the default of many exporters) in no namespace; an
//! application that listens on it there, before or after the agent noticed the namespace,
//! on `0.0.0.0`, `127.0.0.1` or `[::]`, gets it and its connections; when it stops
//! listening the agent answers there again; in a pod that does not use the port the stop
//! hook's calls (from inside, and the kubelet's `httpGet` from the node to the pod's IP)
//! keep working, and the agent's own connections are never counted as the pod's. The one
//! port the agent does take in a pod is its socket's, `--pod-socket-port` (29100), never a
//! port in the ephemeral range an application may bind by number; a pod that holds it is
//! not served. In the binding fallback (forced with `--pod-listen-bind`) an application on
//! the port at another address (IPv6-only `[::]:9100`) never has its connections taken for
//! the agent's.
//!
//! Pods are network namespaces with veth pairs to the host (10.213.4x.0/30, addresses that
//! exist only in this test); the real agent binary serves inside them.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use common::{
    Agent, Netns, free_port, kernel_available,
    pod::{Pod, connect},
    report_skip, wait_until,
};

/// The port of the finding: node_exporter's, and so the one pods most often use.
const POD_PORT: u16 = 9100;

/// The three ways an application listens on the port that the finding saw fail.
const APP_ADDRESSES: [&str; 3] = ["0.0.0.0", "127.0.0.1", "[::]"];

/// Whether `sk_lookup` exists here (Linux >= 5.9; the tests run as root, so CAP_NET_ADMIN).
/// Without it the agent falls back to binding the port, and these tests cannot pass: they
/// fail under `DRAIN_AGENT_REQUIRE_KERNEL=1` and are skipped otherwise.
fn sk_lookup_available(test: &str) -> bool {
    if !kernel_available(test) {
        return false;
    }
    let (release, version) = common::kernel_version();
    if version >= (5, 9) {
        return true;
    }
    let required = std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: Linux {release} has no sk_lookup (5.9) and DRAIN_AGENT_REQUIRE_KERNEL=1"
    );
    report_skip(test, &format!("Linux {release} has no sk_lookup (5.9)"));
    false
}

/// An application's listener inside a namespace: counts what it accepts (and keeps it
/// open); dropping it closes the listening socket.
struct App {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl App {
    /// `bind()` + `listen()` on `addr` inside `netns`, as an application does (Rust's
    /// standard library sets SO_REUSEADDR, as most servers do).
    fn listen(netns: &Netns, addr: &str) -> std::io::Result<Self> {
        let addr: SocketAddr = addr.parse().expect("address");
        let listener = netns.run_in(move || TcpListener::bind(addr))?;
        Ok(Self::serve(listener))
    }

    /// `listen [::]:port` as nginx does it: IPv6 only (`IPV6_V6ONLY`), so the port's IPv4
    /// side stays free for another socket.
    fn listen_ipv6_only(netns: &Netns, port: u16) -> std::io::Result<Self> {
        use rustix::net::{AddressFamily, SocketType, sockopt};
        let listener = netns.run_in(move || -> std::io::Result<TcpListener> {
            let socket = rustix::net::socket(AddressFamily::INET6, SocketType::STREAM, None)?;
            sockopt::set_socket_reuseaddr(&socket, true)?;
            sockopt::set_ipv6_v6only(&socket, true)?;
            rustix::net::bind(&socket, &SocketAddr::from(([0u16; 8], port)))?;
            rustix::net::listen(&socket, 128)?;
            Ok(TcpListener::from(socket))
        })?;
        Ok(Self::serve(listener))
    }

    /// `bind()` + `listen()` with `SO_REUSEPORT` set first, as nginx's `reuseport`, HAProxy
    /// and many Go servers do (this test runs as root, the agent's user).
    fn listen_reuseport(netns: &Netns, addr: &str) -> std::io::Result<Self> {
        Ok(Self::serve(Self::bind_reuseport(netns, addr)?))
    }

    /// The listener of [`App::listen_reuseport`], not yet served.
    fn bind_reuseport(netns: &Netns, addr: &str) -> std::io::Result<TcpListener> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
        let addr: SocketAddr = addr.parse().expect("address");
        netns.run_in(move || -> std::io::Result<TcpListener> {
            let family = match addr {
                SocketAddr::V4(_) => AddressFamily::INET,
                SocketAddr::V6(_) => AddressFamily::INET6,
            };
            // Close-on-exec, as std's: the agent this test starts must not hold it too.
            let socket =
                rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
            sockopt::set_socket_reuseaddr(&socket, true)?;
            sockopt::set_socket_reuseport(&socket, true)?;
            rustix::net::bind(&socket, &addr)?;
            rustix::net::listen(&socket, 128)?;
            Ok(TcpListener::from(socket))
        })
    }

    fn serve(listener: TcpListener) -> Self {
        listener.set_nonblocking(true).expect("non-blocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let accepted = Arc::clone(&accepted);
            let stop = Arc::clone(&stop);
            move || {
                let mut kept = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            kept.push(stream);
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            }
        });
        Self {
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `GET path` on `addr` from inside the namespace at `netns_path` (or from the host with
/// `None`): status and JSON body, or `None` when nothing answered HTTP.
fn get(
    netns_path: Option<&str>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Option<(u16, serde_json::Value)> {
    let path = path.to_owned();
    let fetch = move || Ok(common::http::get(addr, &path, timeout).ok());
    let answer = match netns_path {
        Some(ns) => {
            drain_agent::sys::netns::run_in_path(Path::new(ns), fetch).expect("run in namespace")
        }
        None => fetch().expect("request"),
    }?;
    Some((
        answer.0,
        serde_json::from_str(&answer.1).unwrap_or_default(),
    ))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Whether the agent answers `/healthz` on the in-pod port inside the namespace.
fn agent_answers(netns: &Netns) -> bool {
    // Short: an application that holds the port accepts and never answers HTTP.
    let timeout = Duration::from_millis(500);
    get(Some(&netns.path()), local(POD_PORT), "/healthz", timeout)
        .is_some_and(|(status, body)| status == 200 && body.get("status").is_some())
}

/// A connection to the in-pod port from inside the namespace, at `target`, reaches `app`.
fn reaches_app(netns: &Netns, target: SocketAddr, app: &App) {
    let before = app.accepted();
    let _client = netns
        .run_in(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("connect to {target} inside {}: {e}", netns.name));
    wait_until(
        &format!("the application to accept the connection to {target}"),
        Duration::from_secs(5),
        || app.accepted() == before + 1,
    );
}

/// Connections on the in-pod port in `netns` as the node listener counts them.
fn active_in(agent: &Agent, netns: &Netns) -> u64 {
    let (status, body) = agent.get_json(&format!(
        "/drained?port={POD_PORT}&netns={}&timeout=0",
        netns.path()
    ));
    assert!(matches!(status, 200 | 503), "{body}");
    body["active"].as_u64().expect("active")
}

/// Sockets listening on the in-pod port inside the namespace, by `ss`.
fn listening_on_pod_port(netns: &Netns) -> String {
    common::ss::ss(
        Some(&netns.name),
        &["-Hltn", &format!("( sport = :{POD_PORT} )")],
    )
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn an_application_gets_the_pod_port_before_and_after_the_agent() {
    let test = "an_application_gets_the_pod_port_before_and_after_the_agent";
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    let prefix = format!("da-pp{pid}-");
    let tag = |t: &str| format!("pp{pid}-{t}");
    // Namespaces whose application listened before the agent started (one per address:
    // 0.0.0.0 and 127.0.0.1 exclude each other), with the first one's pod wired to the node.
    let early_pod = Pod::new(&tag("0"), 41);
    let early: Vec<Netns> = (1..APP_ADDRESSES.len())
        .map(|i| Netns::new(&tag(&i.to_string())))
        .collect();
    let early_apps: Vec<App> = std::iter::once(&early_pod.netns)
        .chain(&early)
        .zip(APP_ADDRESSES)
        .map(|(netns, addr)| {
            App::listen(netns, &format!("{addr}:{POD_PORT}"))
                .unwrap_or_else(|e| panic!("listen on {addr}:{POD_PORT} before the agent: {e}"))
        })
        .collect();
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let agent = Agent::start(&["--pod-listen", &pod_listen, "--pod-netns-prefix", &prefix]);
    // A namespace made after the start: the agent serves it before anything listens there.
    let late = Netns::new(&tag("l"));
    wait_until(
        "the agent to serve the late namespace",
        Duration::from_secs(5),
        || agent_answers(&late),
    );
    // Before: each application kept its port and gets the connections, on every address it
    // listens on, from inside and (for the pod) from the node.
    for ((netns, addr), app) in std::iter::once(&early_pod.netns)
        .chain(&early)
        .zip(APP_ADDRESSES)
        .zip(&early_apps)
    {
        println!(
            "{}: an application on {addr}:{POD_PORT} from before the start",
            netns.name
        );
        reaches_app(netns, local(POD_PORT), app);
        if addr == "[::]" {
            reaches_app(
                netns,
                format!("[::1]:{POD_PORT}").parse().expect("addr"),
                app,
            );
        }
        assert!(
            !agent_answers(netns),
            "{}: the agent answered instead",
            netns.name
        );
    }
    // The node's call to the pod's IP reaches the pod's application too.
    let before = early_apps[0].accepted();
    let _from_node = TcpStream::connect_timeout(
        &format!("{}:{POD_PORT}", early_pod.ip)
            .parse()
            .expect("addr"),
        Duration::from_secs(5),
    )
    .expect("connect from the node to the pod's IP");
    wait_until(
        "the pod's application to accept the node's connection",
        Duration::from_secs(5),
        || early_apps[0].accepted() == before + 1,
    );
    // After: the agent serves the late namespace; an application binds the port there on
    // each address, gets the connections, and hands the port back when it closes.
    for addr in APP_ADDRESSES {
        assert!(agent_answers(&late), "the agent serves {}", late.name);
        assert_eq!(
            listening_on_pod_port(&late),
            "",
            "nothing listens on {POD_PORT} in {} while the agent serves it",
            late.name
        );
        let app = App::listen(&late, &format!("{addr}:{POD_PORT}")).unwrap_or_else(|e| {
            panic!(
                "an application in {} could not listen on {addr}:{POD_PORT} after the agent served the namespace: {e}",
                late.name
            )
        });
        println!(
            "{}: an application listens on {addr}:{POD_PORT} after the agent",
            late.name
        );
        reaches_app(&late, local(POD_PORT), &app);
        assert!(
            !agent_answers(&late),
            "the agent answered instead of the application"
        );
        drop(app);
        wait_until(
            "the agent to answer again once the application closed",
            Duration::from_secs(5),
            || agent_answers(&late),
        );
    }
    // When an application stops listening, the agent answers there.
    for (netns, app) in std::iter::once(&early_pod.netns)
        .chain(&early)
        .zip(early_apps)
    {
        drop(app);
        wait_until(
            &format!(
                "the agent to answer in {} once the application closed",
                netns.name
            ),
            Duration::from_secs(5),
            || agent_answers(netns),
        );
    }

    wait_until("every namespace served", Duration::from_secs(5), || {
        agent.metric("drain_agent_pod_listeners{state=\"listening\"}") == Some(4.0)
    });
    assert_eq!(
        agent.metric("drain_agent_pod_listeners{state=\"steered\"}"),
        Some(4.0),
        "served through sk_lookup, binding nothing"
    );
    assert_eq!(
        agent.metric("drain_agent_pod_listeners{state=\"skipped\"}"),
        Some(0.0)
    );

    // The agent's own connections on the in-pod port were never counted as the pod's.
    assert_eq!(active_in(&agent, &late), 0);
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_hook_works_in_a_pod_that_does_not_use_the_port() {
    let test = "the_hook_works_in_a_pod_that_does_not_use_the_port";
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    let prefix = format!("da-ph{pid}-");
    let pod = Pod::new(&format!("ph{pid}-a"), 45);
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let agent = Agent::start(&["--pod-listen", &pod_listen, "--pod-netns-prefix", &prefix]);
    wait_until("the agent to serve the pod", Duration::from_secs(5), || {
        agent_answers(&pod.netns)
    });
    assert_eq!(
        listening_on_pod_port(&pod.netns),
        "",
        "the port is free in the pod"
    );
    // An IPv4 `--pod-listen` steers IPv4 only (README, "Which pods it cannot serve this
    // way"): a dual-stack pod's hook to its IPv6 address needs `[::]:9100`
    // (`an_ipv6_wildcard_pod_listen_serves_both_families`).
    let v6: SocketAddr = format!("[::1]:{POD_PORT}").parse().expect("addr");
    assert_eq!(
        get(
            Some(&pod.netns.path()),
            v6,
            "/healthz",
            Duration::from_secs(2)
        )
        .map(|(s, _)| s),
        None,
        "nothing answers the pod's IPv6 loopback on the port"
    );
    let port = free_port();
    let server = pod.listen(port);
    let clients = connect(&pod.ip, port, 2, &server);

    // `curl http://localhost:9100/drained?port=P` inside the pod: this pod's count.
    let curl = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns.name,
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!(
            "http://localhost:{POD_PORT}/drained?port={port}&timeout=0"
        ))
        .output()
        .expect("curl in the pod");
    let text = String::from_utf8_lossy(&curl.stdout);
    println!("curl inside the pod: {text}");
    assert!(text.ends_with("\n503"), "{text}");
    let body: serde_json::Value =
        serde_json::from_str(text.lines().next().unwrap_or_default()).expect("json");
    assert_eq!(body["active"], 2, "{body}");
    // The kubelet's httpGet: the node calls the pod's IP on the in-pod port; it blocks
    // until the pod drains.
    let target: SocketAddr = format!("{}:{POD_PORT}", pod.ip).parse().expect("addr");
    let waiter = thread::spawn(move || {
        get(
            None,
            target,
            &format!("/drained?port={port}&timeout=20s&quiet=200ms"),
            Duration::from_secs(30),
        )
    });
    thread::sleep(Duration::from_millis(300));
    assert!(
        !waiter.is_finished(),
        "the httpGet answered while the pod was busy"
    );
    drop(clients);
    server.close_all();
    let (status, body) = waiter.join().expect("httpGet").expect("answered");
    assert_eq!(
        (status, body["drained"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    // The node listener saw none of the agent's own in-pod connections.
    assert_eq!(active_in(&agent, &pod.netns), 0);
}

/// The capabilities the DaemonSet and the systemd unit grant (deploy/README.md) are enough
/// for the steering without CAP_NET_ADMIN (granted only for netlink closes): loading an
/// `sk_lookup` program takes CAP_BPF (it is not among kernel/bpf/syscall.c's
/// `is_net_admin_prog_type()`), and attaching it to a namespace asks for nothing more. The
/// agent runs under `setpriv` with the unit's bounding set less CAP_NET_ADMIN, as the unit
/// runs it, and serves a pod through `sk_lookup`.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_granted_capabilities_are_enough_to_steer() {
    let test = "the_granted_capabilities_are_enough_to_steer";
    if !sk_lookup_available(test) {
        return;
    }
    // Fails under DRAIN_AGENT_REQUIRE_KERNEL=1 (CI), else skips loudly.
    if !common::deploy::tool_available(test, "setpriv", &["--version"]) {
        return;
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/drain-agent.service"),
    )
    .expect("the systemd unit");
    let granted: Vec<String> = unit
        .lines()
        .find_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .filter(|c| *c != "CAP_NET_ADMIN")
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    let dir = common::temp_dir("drain-agent-caps-");
    let wrapper = dir.path().join("drain-agent");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set=-all,{} --no-new-privs {} \"$@\"\n",
            granted.join(","),
            common::agent_binary().display()
        ),
    )
    .expect("wrapper");
    Command::new("chmod")
        .args(["755"])
        .arg(&wrapper)
        .status()
        .expect("chmod");
    let pid = std::process::id();
    let netns = Netns::new(&format!("pc{pid}-a"));
    let prefix = format!("da-pc{pid}-");
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let agent = Agent::start_binary_on_a_free_port(
        &wrapper,
        &["--pod-listen", &pod_listen, "--pod-netns-prefix", &prefix],
    );
    wait_until("the agent to serve the pod", Duration::from_secs(5), || {
        agent_answers(&netns)
    });
    assert_eq!(
        agent.metric("drain_agent_pod_listeners{state=\"steered\"}"),
        Some(1.0),
        "with {granted:?} the port is steered, not bound: {}",
        agent.log_text()
    );
    assert_eq!(listening_on_pod_port(&netns), "");
    let app = App::listen(&netns, &format!("0.0.0.0:{POD_PORT}")).expect("the app listens");
    reaches_app(&netns, local(POD_PORT), &app);
}

/// `--pod-listen [::]:9100` (the DaemonSet's IPv6 variant): the agent answers inside on
/// `127.0.0.1` and `[::1]`, and from the node at the pod's IPv4 address (its socket there is
/// dual-stack: one bound to `::1` would be IPv6-only); an application on `[::]:9100` gets
/// the port all the same.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn an_ipv6_wildcard_pod_listen_serves_both_families() {
    let test = "an_ipv6_wildcard_pod_listen_serves_both_families";
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    let prefix = format!("da-p6{pid}-");
    let pod = Pod::new(&format!("p6{pid}-a"), 46);
    let pod_listen = format!("[::]:{POD_PORT}");
    let _agent = Agent::start(&["--pod-listen", &pod_listen, "--pod-netns-prefix", &prefix]);
    wait_until("the agent to serve the pod", Duration::from_secs(5), || {
        agent_answers(&pod.netns)
    });
    let v6: SocketAddr = format!("[::1]:{POD_PORT}").parse().expect("addr");
    let answered = |netns: Option<&str>, addr: SocketAddr| {
        get(netns, addr, "/healthz", Duration::from_secs(5)).map(|(status, _)| status)
    };
    assert_eq!(answered(Some(&pod.netns.path()), v6), Some(200));
    let pod_ip: SocketAddr = format!("{}:{POD_PORT}", pod.ip).parse().expect("addr");
    assert_eq!(
        answered(None, pod_ip),
        Some(200),
        "the node at the pod's IP"
    );
    let app = App::listen(&pod.netns, &format!("[::]:{POD_PORT}")).expect("the app listens");
    reaches_app(&pod.netns, v6, &app);
    reaches_app(&pod.netns, local(POD_PORT), &app);
    drop(app);
    wait_until("the agent to answer again", Duration::from_secs(5), || {
        agent_answers(&pod.netns)
    });
}

/// The listener count is kept by the handler whichever way it is attached: an application
/// that listens after the agent served its namespace gets the port with each attach method.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn every_attach_method_counts_the_applications_listener() {
    let test = "every_attach_method_counts_the_applications_listener";
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    for (i, method) in ["tp-btf", "tracepoint", "raw-tracepoint"]
        .into_iter()
        .enumerate()
    {
        let prefix = format!("da-pa{pid}{i}-");
        let netns = Netns::new(&format!("pa{pid}{i}-a"));
        let pod_listen = format!("0.0.0.0:{POD_PORT}");
        let _agent = Agent::start(&[
            "--attach",
            method,
            "--pod-listen",
            &pod_listen,
            "--pod-netns-prefix",
            &prefix,
        ]);
        wait_until(
            "the agent to serve the namespace",
            Duration::from_secs(5),
            || agent_answers(&netns),
        );
        let app = App::listen(&netns, &format!("0.0.0.0:{POD_PORT}"))
            .unwrap_or_else(|e| panic!("{method}: the app cannot listen: {e}"));
        reaches_app(&netns, local(POD_PORT), &app);
        drop(app);
        wait_until(
            &format!("{method}: the agent to answer again"),
            Duration::from_secs(5),
            || agent_answers(&netns),
        );
        println!("{method}: the application got the port and gave it back");
    }
}

/// Steering goes on over adopted kernel state (`--pin-dir`): an agent killed with `kill -9`,
/// an application that starts listening on the in-pod port while no agent runs (the pinned
/// handler counts it), and the next agent, which adopts the counts, leaves the port to the
/// application and takes it back when the application stops listening.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn steering_goes_on_over_adopted_state() {
    let test = "steering_goes_on_over_adopted_state";
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    let prefix = format!("da-pa{pid}-");
    let pod = Pod::new(&format!("pa{pid}-a"), 47);
    let pins = common::PinDir::new();
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let args = [
        "--pod-listen",
        &pod_listen,
        "--pod-netns-prefix",
        &prefix,
        "--pin-dir",
        &pins.arg(),
    ];
    let mut first = Agent::start(&args);
    wait_until("the agent to serve the pod", Duration::from_secs(5), || {
        agent_answers(&pod.netns)
    });
    // SAFETY: kill(2) on the agent, a child of this test.
    let killed = unsafe { libc::kill(i32::try_from(first.pid()).expect("pid"), libc::SIGKILL) };
    assert_eq!(killed, 0);
    first.stop();
    let app = App::listen(&pod.netns, &format!("0.0.0.0:{POD_PORT}")).expect("the app listens");
    let second = Agent::start(&args);
    assert!(
        second.log_text().contains("kernel state adopted"),
        "{}",
        second.log_text()
    );
    reaches_app(&pod.netns, local(POD_PORT), &app);
    drop(app);
    wait_until(
        "the agent to serve the pod again",
        Duration::from_secs(5),
        || agent_answers(&pod.netns),
    );
}

/// The binding fallback (no `sk_lookup`: forced with `--pod-listen-bind`) binds
/// `0.0.0.0:9100` in the pod; an application may still listen on `[::]:9100` IPv6-only
/// (nginx's `listen [::]:9100`), which does not conflict with it. The agent's own endpoint
/// there must not make the application's IPv6 connections look like the agent's own: the
/// node listener never answers "drained" for the pod's port 9100 while one is open.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn an_ipv6_only_app_beside_the_bound_fallback_is_never_drained_falsely() {
    let test = "an_ipv6_only_app_beside_the_bound_fallback_is_never_drained_falsely";
    if !kernel_available(test) {
        return;
    }
    let pid = std::process::id();
    let netns = Netns::new(&format!("pb{pid}-a"));
    let prefix = format!("da-pb{pid}-");
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let agent = Agent::start(&[
        "--pod-listen",
        &pod_listen,
        "--pod-netns-prefix",
        &prefix,
        "--pod-listen-bind",
    ]);
    wait_until("the agent to serve the pod", Duration::from_secs(5), || {
        agent_answers(&netns)
    });
    let bound = listening_on_pod_port(&netns);
    assert!(
        bound.contains(&format!("0.0.0.0:{POD_PORT}")),
        "the fallback binds the port: {bound}"
    );
    let app = App::listen_ipv6_only(&netns, POD_PORT).expect("the app listens on [::]:9100");
    let target = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], POD_PORT));
    let client = netns
        .run_in(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)))
        .expect("connect to the app over IPv6");
    wait_until("the app to accept", Duration::from_secs(5), || {
        app.accepted() == 1
    });
    let (status, body) = agent.get_json(&format!(
        "/drained?port={POD_PORT}&netns={}&timeout=0",
        netns.path()
    ));
    println!("/drained with the app's IPv6 connection open: {status} {body}");
    assert_eq!(
        (status, body["drained"].as_bool()),
        (503, Some(false)),
        "the app's connection is open: {body}"
    );
    assert!(
        body["active"].as_u64().is_some_and(|active| active >= 1),
        "{body}"
    );
    // Once the app and its connection are gone, the port drains again.
    drop(client);
    drop(app);
    wait_until(
        "the pod's port 9100 to drain",
        Duration::from_secs(5),
        || {
            let (status, body) = agent.get_json(&format!(
                "/drained?port={POD_PORT}&netns={}&timeout=0",
                netns.path()
            ));
            status == 200 && body["drained"] == true
        },
    );
}

/// The local ports of the sockets listening inside the namespace, by `ss`.
fn listening_ports(netns: &Netns) -> Vec<u16> {
    let rows = common::ss::ss(Some(&netns.name), &["-Hltn"]);
    let mut ports: Vec<u16> = rows
        .lines()
        .filter_map(|row| {
            let local = row.split_whitespace().nth(3)?;
            local.rsplit(':').next()?.parse().ok()
        })
        .collect();
    ports.sort_unstable();
    ports
}

/// The kernel's default `ip_local_port_range`, where servers bind fixed ports too (gRPC's
/// 50051, MySQL X's 33060).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 32768..=60999;

/// The agent's own socket in a pod (the one the in-pod port is steered to) is at
/// `--pod-socket-port`, 29100 by default, not at a port the kernel picks: a picked one
/// comes from the ephemeral range, and the agent makes it as soon as the namespace
/// appears, before the application starts; an application that binds that port by number
/// then failed (`EADDRINUSE`) and crash-looped.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_agents_socket_in_a_pod_is_at_the_socket_port() {
    let test = "the_agents_socket_in_a_pod_is_at_the_socket_port";
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    let netns = Netns::new(&format!("ps{pid}-a"));
    let prefix = format!("da-ps{pid}-");
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let agent = Agent::start(&["--pod-listen", &pod_listen, "--pod-netns-prefix", &prefix]);
    wait_until("the agent to serve the pod", Duration::from_secs(5), || {
        agent_answers(&netns)
    });
    let agents = listening_ports(&netns);
    println!("the agent listens in the pod on {agents:?}");
    // An application that binds, by number, the port the agent's socket holds in the
    // ephemeral range is locked out of it.
    let mut apps = Vec::new();
    for port in agents
        .iter()
        .copied()
        .filter(|port| EPHEMERAL.contains(port))
    {
        let app = App::listen(&netns, &format!("0.0.0.0:{port}")).unwrap_or_else(|e| {
            panic!("an application cannot bind 0.0.0.0:{port} while the agent runs: {e}")
        });
        apps.push(app);
    }
    assert_eq!(agents, vec![29100], "the agent's socket is at the default");
    // gRPC's port, say, in that range: free.
    let grpc = App::listen(&netns, "0.0.0.0:50051").expect("an application binds 50051");
    reaches_app(&netns, local(50051), &grpc);
    // The in-pod port is still the agent's.
    assert!(agent_answers(&netns));
    assert_eq!(
        agent.metric("drain_agent_pod_listeners{state=\"steered\"}"),
        Some(1.0)
    );
}

/// A pod whose application holds `--pod-socket-port` already is not served: no socket of
/// the agent's there, no steering (the in-pod port refuses: the hook fails at once, as
/// where the agent cannot make its socket), a WARN and
/// `drain_agent_pod_listeners{state="socket_port_taken"}`; the application keeps its port,
/// and other pods are served.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_pod_holding_the_socket_port_is_not_served() {
    let test = "a_pod_holding_the_socket_port_is_not_served";
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    let taken = Netns::new(&format!("pt{pid}-a"));
    let served = Netns::new(&format!("pt{pid}-b"));
    let socket_port = free_port();
    let app = App::listen(&taken, &format!("0.0.0.0:{socket_port}")).expect("the app listens");
    let socket_port_arg = socket_port.to_string();
    let agent = pod_agent(
        &format!("da-pt{pid}-"),
        &["--pod-socket-port", &socket_port_arg],
    );
    served_and_left(&agent, &served, "socket_port_taken", 1);
    assert_eq!(listening_ports(&served), vec![socket_port]);
    let log = agent.log_text();
    assert!(
        log.contains("the agent's socket port is taken there"),
        "a WARN names the pod: {log}"
    );
    let refused = taken
        .run_in(|| TcpStream::connect_timeout(&local(POD_PORT), Duration::from_secs(2)).map(drop));
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "no agent and no steering in the taken pod"
    );
    assert_eq!(listening_ports(&taken), vec![socket_port]);
    reaches_app(&taken, local(socket_port), &app);
}

/// Found by an audit: an application that set `SO_REUSEPORT` (nginx's `reuseport`, HAProxy,
/// many Go servers) and runs as the agent's user (root) was no conflict for the agent's
/// socket: the agent bound `127.0.0.1:<socket port>` beside the application's `0.0.0.0`
/// one (and then took every loopback connection to it, its address being the more
/// specific), or joined the application's own `127.0.0.1` group (a share of its
/// connections, and its group's program replaced), with no WARN and no `socket_port_taken`.
/// Now the pod is not served, as for any application there.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_pod_holding_the_socket_port_with_reuseport_is_not_served() {
    let test = "a_pod_holding_the_socket_port_with_reuseport_is_not_served";
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    let socket_port = free_port();
    let taken = reuseport_apps(&format!("pr{pid}"), socket_port);
    let served = Netns::new(&format!("pr{pid}-s"));
    let socket_port_arg = socket_port.to_string();
    let agent = pod_agent(
        &format!("da-pr{pid}-"),
        &["--pod-socket-port", &socket_port_arg],
    );
    served_and_left(&agent, &served, "socket_port_taken", 2);
    let log = agent.log_text();
    assert!(
        log.contains("the agent's socket port is taken there"),
        "a WARN names the pod: {log}"
    );
    only_the_apps_listen(&taken, socket_port);
}

/// The binding fallback (`--pod-listen-bind`) likewise leaves a pod whose application
/// listens on the in-pod address with `SO_REUSEPORT` as root (its wildcard, or the address
/// itself): the agent's bind would not fail there but join its group or sit beside it, so
/// it looks before binding and once bound, and skips the pod.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_bound_fallback_skips_a_pod_holding_the_port_with_reuseport() {
    let test = "the_bound_fallback_skips_a_pod_holding_the_port_with_reuseport";
    if !kernel_available(test) {
        return;
    }
    let pid = std::process::id();
    let taken = reuseport_apps(&format!("pf{pid}"), POD_PORT);
    let served = Netns::new(&format!("pf{pid}-s"));
    let agent = pod_agent(&format!("da-pf{pid}-"), &["--pod-listen-bind"]);
    served_and_left(&agent, &served, "skipped", 2);
    only_the_apps_listen(&taken, POD_PORT);
}

/// Applications listening with `SO_REUSEPORT` on `port`, one on the wildcard and one on
/// loopback, each in a namespace of its own named `<tag>-<n>`.
fn reuseport_apps(tag: &str, port: u16) -> Vec<(Netns, App)> {
    ["0.0.0.0", "127.0.0.1"]
        .iter()
        .enumerate()
        .map(|(index, ip)| {
            let netns = Netns::new(&format!("{tag}-{index}"));
            let app =
                App::listen_reuseport(&netns, &format!("{ip}:{port}")).expect("the app listens");
            (netns, app)
        })
        .collect()
}

/// An agent serving the pods whose namespaces start with `prefix`, on the in-pod port.
fn pod_agent(prefix: &str, extra: &[&str]) -> Agent {
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let mut args = vec!["--pod-listen", &pod_listen, "--pod-netns-prefix", prefix];
    args.extend_from_slice(extra);
    Agent::start(&args)
}

/// Waits until `agent` serves `served` and reports `count` pod listeners in `state`.
fn served_and_left(agent: &Agent, served: &Netns, state: &str, count: u32) {
    wait_until(
        "the agent to serve the other pod",
        Duration::from_secs(5),
        || agent_answers(served),
    );
    let gauge = format!("drain_agent_pod_listeners{{state=\"{state}\"}}");
    wait_until(
        "the taken pods to be reported",
        Duration::from_secs(5),
        || agent.metric(&gauge) == Some(f64::from(count)),
    );
}

/// Only each application listens on `port` in its namespace, and every loopback connection
/// to it there is the application's.
fn only_the_apps_listen(taken: &[(Netns, App)], port: u16) {
    for (netns, app) in taken {
        assert_eq!(
            listening_ports(netns),
            vec![port],
            "the application's socket only in {}",
            netns.name
        );
        for _ in 0..8 {
            reaches_app(netns, local(port), app);
        }
    }
}

/// The agent's `/healthz` (on the node listener) as status and JSON body.
fn healthz(agent: &Agent) -> (u16, serde_json::Value) {
    agent.get_json("/healthz")
}

/// Sets `ERRORS[index]` in the kernel state pinned in `pins` (its one layout), as the
/// kernel side does when it cannot keep a count.
fn set_pinned_error(pins: &common::PinDir, index: u32, value: u64) {
    let data = pinned_map(pins, "ERRORS");
    let mut errors: aya::maps::Array<aya::maps::MapData, u64> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("an array");
    errors.set(index, value, 0).expect("set the error counter");
}

/// Found by an audit: once `ERRORS[pod_listen_count_failed]` grows (a listener count the
/// kernel side could not keep, or a socket it could not read), every pod's steering stops
/// for good and every `httpGet` preStop to the in-pod port is refused, but the agent said
/// so in one WARN only: `/healthz` stayed `ok`, `drain_agent_pod_listeners{state="steered"}`
/// unchanged, and the tracking-errors alert resolved after 5 minutes. Now `/healthz` says
/// `degraded` naming it, the gauge counts the listeners as `stopped` (none `steered`) while
/// it lasts, and a hand-over restart (the next agent beside this one, as the DaemonSet's
/// rollout starts it) steers again with no moment without an agent.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_node_whose_steering_stopped_says_so_until_a_hand_over_restart_steers_again() {
    let test = "a_node_whose_steering_stopped_says_so_until_a_hand_over_restart_steers_again";
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    let netns = Netns::new(&format!("pz{pid}-a"));
    let prefix = format!("da-pz{pid}-");
    let pins = common::PinDir::new();
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let pin_dir = pins.arg();
    let args = [
        "--pod-listen",
        &pod_listen,
        "--pod-netns-prefix",
        &prefix,
        "--pin-dir",
        &pin_dir,
    ];
    let steered = |agent: &Agent| agent.metric("drain_agent_pod_listeners{state=\"steered\"}");
    let stopped = |agent: &Agent| agent.metric("drain_agent_pod_listeners{state=\"stopped\"}");
    let mut first = Agent::start(&args);
    wait_until("the agent to serve the pod", Duration::from_secs(5), || {
        agent_answers(&netns)
    });
    let (status, body) = healthz(&first);
    assert_eq!((status, &body["status"]), (200, &"ok".into()), "{body}");
    assert_eq!(steered(&first), Some(1.0));
    assert_eq!(stopped(&first), Some(0.0));

    set_pinned_error(
        &pins,
        drain_agent_common::error_index::POD_LISTEN_COUNT_FAILED,
        1,
    );
    // The kernel's programs stop steering at once: the hook's connection is refused.
    let refused = netns
        .run_in(|| TcpStream::connect_timeout(&local(POD_PORT), Duration::from_secs(2)).map(drop));
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the steering stopped"
    );
    wait_until(
        "the agent to report the stopped steering",
        Duration::from_secs(5),
        || stopped(&first) == Some(1.0),
    );
    assert_eq!(steered(&first), Some(0.0));
    let (status, body) = healthz(&first);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("steered to the agent in no pod"), "{body}");
    // Lasting: still so a while later.
    thread::sleep(Duration::from_millis(1_500));
    assert_eq!(stopped(&first), Some(1.0));
    assert_eq!(healthz(&first).1["status"], "degraded");
    assert!(
        first.log_text().contains("pod_listen_count_failed"),
        "a WARN names it: {}",
        first.log_text()
    );

    // The next agent beside this one (an upgrade, a rollout restart) makes state of its own
    // and steers again; the old one then stops.
    let second = Agent::start(&args);
    wait_until(
        "the next agent to serve the pod",
        Duration::from_secs(5),
        || agent_answers(&netns),
    );
    wait_until("the next agent to steer", Duration::from_secs(5), || {
        steered(&second) == Some(1.0)
    });
    assert_eq!(stopped(&second), Some(0.0));
    assert_eq!(healthz(&second).1["status"], "ok");
    assert!(first.stop().success(), "a clean stop");
    assert!(agent_answers(&netns), "served through the old agent's stop");
}

/// The pinned map `name` of the agent started with `pins`.
fn pinned_map(pins: &common::PinDir, name: &str) -> aya::maps::MapData {
    let layouts: Vec<_> = std::fs::read_dir(&pins.path)
        .expect("pin dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.is_dir())
        .collect();
    let [layout] = layouts.try_into().expect("one layout");
    aya::maps::MapData::from_pin(layout.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The kernel side's count of the application listeners on the in-pod port in `netns`.
fn pod_listen_count(pins: &common::PinDir, netns: &Netns) -> i64 {
    use std::os::unix::fs::MetadataExt as _;
    let inode = u32::try_from(std::fs::metadata(netns.path()).expect("netns").ino()).expect("u32");
    let counts: aya::maps::HashMap<aya::maps::MapData, u32, i64> = aya::maps::HashMap::try_from(
        aya::maps::Map::HashMap(pinned_map(pins, "POD_LISTEN_COUNTS")),
    )
    .expect("a hash map");
    counts.get(&inode, 0).unwrap_or(0)
}

/// Leaves the kernel side's count of `netns` as a `listen()` whose handler run the kernel
/// skipped leaves it: the namespace's listeners unrecorded (`POD_LISTENERS`) and its count 0.
fn forget_pod_listeners_as_a_skipped_run(pins: &common::PinDir, netns: &Netns, left: Left) {
    use std::os::unix::fs::MetadataExt as _;
    let inode = u32::try_from(std::fs::metadata(netns.path()).expect("netns").ino()).expect("u32");
    let mut listeners: aya::maps::HashMap<aya::maps::MapData, u64, u32> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(pinned_map(pins, "POD_LISTENERS")))
            .expect("a hash map");
    let theirs: Vec<u64> = listeners
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, netns)| *netns == inode)
        .map(|(sk, _)| sk)
        .collect();
    assert!(!theirs.is_empty(), "the application's listener is recorded");
    for sk in theirs {
        match left {
            Left::Nothing => listeners.remove(&sk).expect("forget the listener"),
            // What a listener of another namespace leaves when its close is skipped and its
            // socket's memory goes to this one before this one is counted.
            Left::AnotherNamespacesEntry => listeners
                .insert(sk, inode.wrapping_add(1), 0)
                .expect("another namespace's entry"),
        }
    }
    let mut counts: aya::maps::HashMap<aya::maps::MapData, u32, i64> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(pinned_map(
            pins,
            "POD_LISTEN_COUNTS",
        )))
        .expect("a hash map");
    counts.insert(inode, 0, 0).expect("zero the count");
}

/// What a lost count leaves at the listener's address in `POD_LISTENERS`.
#[derive(Clone, Copy)]
enum Left {
    /// No entry: the skipped run was this listener's `listen()`.
    Nothing,
    /// A dead listener's entry of another namespace, at the same socket address.
    AnotherNamespacesEntry,
}

/// Found by an audit: the kernel can skip a handler run (`recursion_misses`; the classic
/// tracepoint before Linux 6.7 skips without counting it). A skipped CLOSE→LISTEN left the
/// namespace's count of application listeners at 0, so its `sk_lookup` program kept
/// handing the application's connections on the in-pod port to the agent until a walk
/// counted the listener: up to `--repair-interval` (10 min) where skips are not seen, since
/// no skip starts a walk there. Now the pod manager checks the in-pod port's listeners
/// against the socket tables where the count is 0 (on every rescan where skips are unseen,
/// after a skip where they are seen) and counts them again: the application gets its
/// connections back within a rescan or two. Skips unseen: `--attach tracepoint` doubting as
/// on Linux 6.6.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn an_application_listener_a_skipped_run_left_uncounted_gets_its_port_back() {
    listener_left_uncounted_gets_its_port_back(
        "an_application_listener_a_skipped_run_left_uncounted_gets_its_port_back",
        "pk",
        Left::Nothing,
    );
}

/// Audit (third look): since listeners are counted only in served namespaces, a listener
/// that began before its namespace was served is counted by the seed (or a recount, or a
/// walk) alone. Where a dead listener of another namespace left its entry at the same
/// socket address (its close skipped, the memory reused), the walk took the entry for this
/// listener's own and counted nothing: the count stayed 0, the application's port went to
/// the agent, and the recount said "counted it again". A walk now takes over an entry of
/// another namespace and counts the listener (the dead one's count stays too high).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_listener_at_a_dead_listeners_address_of_another_namespace_is_counted() {
    listener_left_uncounted_gets_its_port_back(
        "a_listener_at_a_dead_listeners_address_of_another_namespace_is_counted",
        "pe",
        Left::AnotherNamespacesEntry,
    );
}

/// The application's listener in a pod, left uncounted as `left` says, gets the in-pod
/// port's connections back within a few rescans.
fn listener_left_uncounted_gets_its_port_back(test: &str, tag: &str, left: Left) {
    if !sk_lookup_available(test) {
        return;
    }
    let pid = std::process::id();
    let netns = Netns::new(&format!("{tag}{pid}-a"));
    let prefix = format!("da-{tag}{pid}-");
    let pins = common::PinDir::new();
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let agent = Agent::start(&[
        "--attach",
        "tracepoint",
        "--assume-kernel-version",
        "6.6",
        "--pod-listen",
        &pod_listen,
        "--pod-netns-prefix",
        &prefix,
        "--pin-dir",
        &pins.arg(),
    ]);
    wait_until("the agent to serve the pod", Duration::from_secs(5), || {
        agent_answers(&netns)
    });
    let app = App::listen(&netns, &format!("0.0.0.0:{POD_PORT}")).expect("the app listens");
    reaches_app(&netns, local(POD_PORT), &app);
    assert_eq!(pod_listen_count(&pins, &netns), 1);

    forget_pod_listeners_as_a_skipped_run(&pins, &netns, left);
    assert_eq!(pod_listen_count(&pins, &netns), 0);
    // Far below the 10 minutes of the next periodic walk: a few rescans (1 s each).
    let target = local(POD_PORT);
    wait_until(
        "the application to get the in-pod port's connections again",
        Duration::from_secs(5),
        || {
            let before = app.accepted();
            let client =
                netns.run_in(move || TcpStream::connect_timeout(&target, Duration::from_secs(1)));
            thread::sleep(Duration::from_millis(50));
            drop(client);
            app.accepted() > before
        },
    );
    assert_eq!(pod_listen_count(&pins, &netns), 1, "counted once again");
    assert!(
        agent.log_text().contains("counted it again"),
        "{}",
        agent.log_text()
    );
    // Counted exactly: the application's close un-counts it, and the agent answers again.
    drop(app);
    wait_until(
        "the agent to serve the pod again",
        Duration::from_secs(5),
        || agent_answers(&netns),
    );
    assert_eq!(pod_listen_count(&pins, &netns), 0);
}

/// The pinned `POD_LISTEN_COUNTS` of the layout in `pins`: listeners on the in-pod port
/// counted by network namespace inode.
fn pinned_pod_listen_counts(pins: &common::PinDir) -> std::collections::HashMap<u32, i64> {
    let data = pinned_map(pins, "POD_LISTEN_COUNTS");
    let counts: aya::maps::HashMap<aya::maps::MapData, u32, i64> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("a hash map");
    counts
        .iter()
        .map(|entry| entry.expect("an entry"))
        .collect()
}

/// Found by an audit: a listener on the in-pod port in *any* network namespace made a
/// `POD_LISTEN_COUNTS` entry, never deleted (16,384 of them, pinned across restarts). A
/// local user who listens there in namespaces of their own (`unshare -Urn`), holding
/// cheap namespaces of other kinds so that each new network namespace gets a fresh inode,
/// filled the map; the next insert failed, `pod_listen_count_failed` grew, and every pod's
/// steering stopped for good (every `httpGet` preStop refused). Listeners are now counted
/// only in namespaces the agent serves: `K` namespaces no pod's (user namespaces a root
/// container makes, and a namespace the agent is not told to serve), each with a listener
/// on the in-pod port, leave no entry, and a pod's application is still counted (its
/// connections go to it, the agent answers again once it stops listening).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn listeners_in_namespaces_the_agent_does_not_serve_are_not_counted() {
    let test = "listeners_in_namespaces_the_agent_does_not_serve_are_not_counted";
    if !sk_lookup_available(test) {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    const K: usize = 50;
    let pid = std::process::id();
    let prefix = format!("da-pu{pid}-");
    let pod = Netns::new(&format!("pu{pid}-a"));
    // Pinned under /run/netns like a pod's, but not under the prefix: not served.
    let unserved = Netns::new(&format!("pv{pid}-a"));
    let pins = common::PinDir::new();
    let pod_listen = format!("0.0.0.0:{POD_PORT}");
    let pin_dir = pins.arg();
    let agent = Agent::start(&[
        "--pod-listen",
        &pod_listen,
        "--pod-netns-prefix",
        &prefix,
        "--pin-dir",
        &pin_dir,
    ]);
    wait_until("the agent to serve the pod", Duration::from_secs(5), || {
        agent_answers(&pod)
    });
    // As a root container (or, with `unshare -Urn`, any local user) makes them.
    let nested = common::child::user_owned_namespaces(K);
    let own = std::fs::metadata("/proc/self/ns/net")
        .expect("own netns")
        .ino();
    let paths: Vec<String> = nested
        .iter()
        .map(|child| format!("/proc/{}/ns/net", child.pid()))
        .chain(std::iter::once(unserved.path()))
        .collect();
    // Each listens on the in-pod port inside (once its loopback is up).
    let mut listeners = Vec::new();
    let mut inodes = Vec::new();
    for path in &paths {
        wait_until("a namespace of its own", Duration::from_secs(5), || {
            std::fs::metadata(path).is_ok_and(|m| m.ino() != own)
        });
        let listener = wait_for_listener(path);
        inodes.push(u32::try_from(std::fs::metadata(path).expect("netns").ino()).expect("inode"));
        listeners.push(listener);
    }
    // The pod's application: counted, its connections its own.
    let app = App::listen(&pod, &format!("0.0.0.0:{POD_PORT}")).expect("the app listens");
    reaches_app(&pod, local(POD_PORT), &app);
    assert!(!agent_answers(&pod), "the agent answered instead");
    // Past a walk or two too (each walk passes every namespace's listeners).
    thread::sleep(Duration::from_millis(2_500));
    let counts = pinned_pod_listen_counts(&pins);
    let counted: Vec<u32> = inodes
        .iter()
        .copied()
        .filter(|inode| counts.contains_key(inode))
        .collect();
    assert!(
        counted.is_empty(),
        "{} of {} namespaces the agent does not serve have a count: {counted:?}",
        counted.len(),
        inodes.len()
    );
    let pod_inode =
        u32::try_from(std::fs::metadata(pod.path()).expect("netns").ino()).expect("inode");
    assert_eq!(counts.get(&pod_inode), Some(&1), "{counts:?}");
    assert_eq!(
        agent.metric("drain_agent_pod_listeners{state=\"stopped\"}"),
        Some(0.0)
    );
    drop(app);
    wait_until(
        "the agent to serve the pod again",
        Duration::from_secs(5),
        || agent_answers(&pod),
    );
    drop(listeners);
    drop(nested);
}

/// A listener on the in-pod port on loopback inside the namespace at `path`, once its
/// loopback is up.
fn wait_for_listener(path: &str) -> TcpListener {
    let mut listener = None;
    wait_until("a listener inside", Duration::from_secs(5), || {
        listener = drain_agent::sys::netns::run_in_path(Path::new(path), || {
            Ok(TcpListener::bind(local(POD_PORT)).ok())
        })
        .unwrap_or(None);
        listener.is_some()
    });
    listener.expect("a listener")
}

/// Found by an audit: a pod listener's forget of its own endpoint runs under the kernel's
/// lock, which a walk holds for minutes, so it may run long after the listener closed; the
/// pod's namespace is gone by then, and the kernel hands its inode to the next namespace
/// made, where the manager may serve already. That late forget took the new pod's
/// registration: its steering (the hooks to the in-pod port refused) and its mark (its own
/// connections counted as the application's, a drain that never ends, and the
/// application's listeners there left uncounted, its connections steered to the agent).
/// Here the "new pod" is the same namespace served again (its inode is the same), with the
/// kernel side loaded in-process as the agent has it (`KernelEndpoints`).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_late_forget_leaves_the_next_registration_on_its_inode_alone() {
    use std::os::{fd::AsFd as _, unix::fs::MetadataExt as _};

    use drain_agent::{agent::KernelEndpoints, http::pods::OwnEndpoints as _, tracker::Filter};

    let test = "a_late_forget_leaves_the_next_registration_on_its_inode_alone";
    if !sk_lookup_available(test) {
        return;
    }
    let kernel = drain_agent::kernel::Kernel::load(&drain_agent::kernel::KernelOptions {
        max_connections: 4_096,
        max_endpoints: 1_024,
        attach: None,
        no_seed: true,
        preallocate_sockets: false,
        pod_port: POD_PORT,
        pin_dir: None,
    })
    .expect("load the kernel side");
    let maps = kernel.maps();
    let endpoints = KernelEndpoints(Arc::new(std::sync::Mutex::new(kernel)));
    let pod = Netns::new("late-forget");
    let inode = u32::try_from(std::fs::metadata(pod.path()).expect("netns").ino()).expect("u32");
    let file = std::fs::File::open(pod.path()).expect("the namespace's file");
    let target = local(POD_PORT);
    let socket_port = drain_agent::http::pods::DEFAULT_SOCKET_PORT;
    let socket = || {
        pod.run_in(move || TcpListener::bind(local(socket_port)))
            .expect("the agent's socket")
    };
    // The old pod's listener, served, then closed: its link dropped, its socket closed.
    let old = socket();
    let old_steered = endpoints
        .steer(target, inode, &file, old.as_fd())
        .expect("steer in the old pod");
    drop(old_steered.link);
    drop(old);
    // The new pod on that inode, served before the old listener's forget ran.
    let new = socket();
    let _new_steered = endpoints
        .steer(target, inode, &file, new.as_fd())
        .expect("steer in the new pod");
    // The old listener's forget, late.
    endpoints.forget(old_steered.own).expect("the late forget");

    // The new pod's hook reaches its socket (steered), and is not counted (the mark).
    let client = pod.run_in(move || TcpStream::connect_timeout(&target, Duration::from_secs(2)));
    let steered = client.is_ok();
    let uncounted = steered && {
        let (_accepted, _) = new.accept().expect("accept the hook");
        let filter = Filter {
            port: POD_PORT,
            addr: None,
            netns: Some(inode),
        };
        maps.tracked(&filter)
            .expect("the tracked sockets")
            .is_empty()
    };
    drop(client);
    // The new pod's application listens on the port: counted, as in a served namespace.
    let app = App::listen(&pod, &format!("0.0.0.0:{POD_PORT}")).expect("the app listens");
    let app_counted = endpoints
        .pod_listeners_counted(inode)
        .expect("read the count");
    drop(app);
    assert!(
        steered && uncounted && app_counted,
        "the old listener's late forget undid the new pod's registration: steered {steered}, own connection uncounted {uncounted}, the application's listener counted {app_counted}"
    );
}
