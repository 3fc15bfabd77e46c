//! Kernel state that outlives the agent (issue 23): the handler's link and its counting maps
//! pinned under bpffs (`--pin-dir`). Counting goes on while no agent runs, a new agent adopts
//! the counts (no re-seed), a layout of other sizes is replaced (never a false drained
//! meanwhile), and an agent started beside a running one owns the pins once that one is gone.
//! Each test pins into a directory of its own (`common::PinDir`), shared only by its agents.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    collections::VecDeque,
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Agent, PinDir, kernel_available, ss::ss_count, wait_until};

fn kill_9(agent: &mut Agent) {
    // SAFETY: kill(2) on the agent, a child of this test.
    let killed = unsafe { libc::kill(i32::try_from(agent.pid()).expect("pid"), libc::SIGKILL) };
    assert_eq!(killed, 0, "kill -9 the agent");
    // Reaps it (SIGTERM to a dead process changes nothing).
    agent.stop();
}

fn state_metric(agent: &Agent) -> String {
    let (_, body) = agent.try_get("/metrics").expect("metrics");
    body.lines()
        .find(|line| line.starts_with("drain_agent_kernel_state{"))
        .unwrap_or_else(|| panic!("no drain_agent_kernel_state in /metrics:\n{body}"))
        .to_owned()
}

fn opened_total(agent: &Agent, port: u16) -> u64 {
    agent
        .metric(&format!(
            "drain_agent_connections_opened_total{{port=\"{port}\"}}"
        ))
        .unwrap_or(0.0) as u64
}

/// The layout directories in `pins`.
fn layouts(pins: &PinDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&pins.path)
        .expect("pin dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Connections to a loopback listener: `hold` more, or `close` the oldest (both ends).
struct Service {
    listener: Option<TcpListener>,
    port: u16,
    held: VecDeque<(TcpStream, TcpStream)>,
}

impl Service {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        Self {
            listener: Some(listener),
            port,
            held: VecDeque::new(),
        }
    }

    fn open(&mut self, count: usize) {
        let listener = self.listener.as_ref().expect("listening");
        for _ in 0..count {
            let client = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            self.held.push_back((client, server));
        }
    }

    fn close(&mut self, count: usize) {
        for _ in 0..count {
            drop(self.held.pop_front().expect("a held connection"));
        }
    }

    /// Closes the listener, keeping the connections (how a draining server stops).
    fn stop_listening(&mut self) {
        self.listener = None;
    }
}

/// A service that opens and closes connections on a thread (15 held at most, the oldest
/// closed first) until stopped; `pause` holds it still.
struct Churn {
    port: u16,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    fn start() -> Self {
        let mut service = Service::start();
        let port = service.port;
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, pause, paused, opened) = (
                Arc::clone(&stop),
                Arc::clone(&pause),
                Arc::clone(&paused),
                Arc::clone(&opened),
            );
            std::thread::spawn(move || {
                // Bounded: at most two minutes of churn whatever happens to the test.
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
                    if pause.load(Ordering::SeqCst) {
                        paused.store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    paused.store(false, Ordering::SeqCst);
                    service.open(1);
                    opened.fetch_add(1, Ordering::SeqCst);
                    if service.held.len() > 15 {
                        service.close(2);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Self {
            port,
            stop,
            pause,
            paused,
            opened,
            thread: Some(thread),
        }
    }

    fn hold_still(&self) {
        self.pause.store(true, Ordering::SeqCst);
        wait_until("the churn to pause", Duration::from_secs(5), || {
            self.paused.load(Ordering::SeqCst)
        });
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `kill -9` while a service churns, restart with the same pin directory: the new agent
/// adopts (log and metric say so), its counts equal `ss` within 1 s of serving, and the
/// counters kept their history (a re-seed would start them at what is open now).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn kill_9_while_a_service_churns_then_the_new_agent_adopts_and_is_exact() {
    let test = "kill_9_while_a_service_churns_then_the_new_agent_adopts_and_is_exact";
    if !kernel_available(test) {
        return;
    }
    let pins = PinDir::new();
    let mut first = Agent::start(&["--pin-dir", &pins.arg()]);
    assert!(
        state_metric(&first).contains("origin=\"new\",pinned=\"true\""),
        "{}",
        state_metric(&first)
    );
    let churn = Churn::start();
    wait_until("100 connections churned", Duration::from_secs(30), || {
        churn.opened.load(Ordering::SeqCst) >= 100
    });
    let opened_before = opened_total(&first, churn.port);
    assert!(
        opened_before >= 100,
        "the first agent counted {opened_before}"
    );
    kill_9(&mut first);
    // The service goes on while no agent runs.
    std::thread::sleep(Duration::from_millis(500));
    let second = Agent::start(&["--pin-dir", &pins.arg()]);
    let serving = Instant::now();
    churn.hold_still();
    let log = second.log_text();
    assert!(log.contains("kernel state adopted from"), "{log}");
    assert!(
        state_metric(&second).contains("origin=\"adopted\",pinned=\"true\""),
        "{}",
        state_metric(&second)
    );
    let (mut active, mut open) = (0, 0);
    while serving.elapsed() < Duration::from_secs(1) {
        open = ss_count(churn.port, None);
        active = second.active(churn.port);
        if active == open {
            break;
        }
    }
    let took = serving.elapsed();
    assert_eq!(
        active, open,
        "counts differ from ss {took:?} after the new agent served"
    );
    assert!(took <= Duration::from_secs(1), "equal only after {took:?}");
    let opened_after = opened_total(&second, churn.port);
    assert!(
        opened_after >= opened_before,
        "the adopted counters lost their history (a re-seed?): {opened_before} opened before the kill, {opened_after} after"
    );
    // And /metrics says so of the counters it carried over: they count since the pinned
    // counting state was made, not since this agent started.
    let (_, metrics) = second.try_get("/metrics").expect("metrics");
    for family in [
        "drain_agent_connections_opened_total",
        "drain_agent_connections_closed_total",
        "drain_agent_connection_duration_seconds",
    ] {
        let help = metrics
            .lines()
            .find(|line| line.starts_with(&format!("# HELP {family} ")))
            .unwrap_or_else(|| panic!("no HELP for {family}:\n{metrics}"));
        assert!(
            help.contains("--pin-dir") && !help.contains("agent started"),
            "{family}'s help hides that an adopting agent goes on from it: {help}"
        );
    }
    // And it follows the churn on from there.
    churn.resume();
    std::thread::sleep(Duration::from_millis(500));
    churn.hold_still();
    second.expect_active(churn.port, ss_count(churn.port, None));
    eprintln!(
        "adopted: active {active} = ss {open} {took:?} after serving; opened {opened_before} before the kill, {opened_after} after"
    );
}

/// Connections opened and closed while no agent runs (after a clean stop, which keeps the
/// pins) are counted by the pinned handler, so the next agent has them right, even with the
/// service's listener closed (a walk alone could not call those connections inbound).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn connections_while_no_agent_runs_are_counted_by_the_pinned_handler() {
    let test = "connections_while_no_agent_runs_are_counted_by_the_pinned_handler";
    if !kernel_available(test) {
        return;
    }
    let pins = PinDir::new();
    let mut first = Agent::start(&["--pin-dir", &pins.arg()]);
    let mut service = Service::start();
    service.open(5);
    first.expect_active(service.port, 5);
    assert!(first.stop().success(), "a clean stop");
    assert_eq!(layouts(&pins).len(), 1, "a clean stop keeps the pins");
    // Nobody watches: 7 opened, 3 of the first closed, the listener closed.
    service.open(7);
    service.close(3);
    service.stop_listening();
    assert_eq!(ss_count(service.port, None), 9);
    let second = Agent::start(&["--pin-dir", &pins.arg()]);
    assert!(
        state_metric(&second).contains("origin=\"adopted\""),
        "{}",
        state_metric(&second)
    );
    let (status, body) = second.get_json(&format!("/drained?port={}&timeout=0", service.port));
    assert_eq!((status, &body["active"]), (503, &9.into()), "{body}");
    // Every open and close was the handler's: 12 opened, 3 closed, nothing found by a walk.
    assert_eq!(opened_total(&second, service.port), 12);
    assert_eq!(
        second
            .metric("drain_agent_repairs_total{kind=\"missed_open\"}")
            .expect("repairs metric"),
        0.0
    );
    // A waiter is woken by the pinned handler's events, read from the pinned ring buffer:
    // with nothing doubted (the repair walk ran), nothing else would wake it before its
    // 30 s timeout.
    let url = second.url.clone();
    let port = service.port;
    let waiter = std::thread::spawn(move || {
        let url = drain_agent::cli::client::AgentUrl::parse(&url).expect("url");
        let asked = Instant::now();
        let answer = common::http::get_url(
            &url,
            &format!("/drained?port={port}&timeout=30s"),
            Duration::from_secs(60),
        );
        (answer, asked.elapsed())
    });
    second.wait_for_waiters(1);
    let closed = Instant::now();
    service.close(9);
    let (answer, _) = waiter.join().expect("waiter");
    let woken = closed.elapsed();
    let (status, body) = answer.expect("an answer");
    assert_eq!(status, 200, "{body}");
    assert!(
        woken < Duration::from_secs(5),
        "the waiter was answered {woken:?} after the last close (not woken by an event?)"
    );
}

/// A pin directory holding another layout (other sizes) is not adopted: the new agent loads
/// its own, removes the old pins once its handler is attached, and never answers drained
/// meanwhile for a service that still has connections.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_layout_of_other_sizes_is_replaced_and_never_answers_a_false_drained() {
    let test = "a_layout_of_other_sizes_is_replaced_and_never_answers_a_false_drained";
    if !kernel_available(test) {
        return;
    }
    let pins = PinDir::new();
    let mut first = Agent::start(&["--pin-dir", &pins.arg(), "--max-connections", "4096"]);
    let mut service = Service::start();
    service.open(6);
    first.expect_active(service.port, 6);
    let old = layouts(&pins);
    assert_eq!(old.len(), 1, "{old:?}");
    kill_9(&mut first);
    // The hardest case for a fresh agent: the listener is gone, the connections stay.
    service.stop_listening();
    let port = common::free_port();
    let service_port = service.port;
    let asking = Arc::new(AtomicBool::new(true));
    // Asks from before the new agent serves until after it has replaced the pins.
    let answers = {
        let asking = Arc::clone(&asking);
        std::thread::spawn(move || {
            let url =
                drain_agent::cli::client::AgentUrl::parse(&format!("http://127.0.0.1:{port}"))
                    .expect("url");
            let mut answers = Vec::new();
            while asking.load(Ordering::SeqCst) {
                if let Ok(answer) = common::http::get_url(
                    &url,
                    &format!("/drained?port={service_port}&timeout=0"),
                    Duration::from_secs(2),
                ) {
                    answers.push(answer);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            answers
        })
    };
    let second = Agent::start_on(
        port,
        &["--pin-dir", &pins.arg(), "--max-connections", "8192"],
    );
    let log = second.log_text();
    assert!(
        log.contains("kernel state made new: the pinned state is of another layout"),
        "{log}"
    );
    assert!(
        state_metric(&second).contains("origin=\"new\",pinned=\"true\""),
        "{}",
        state_metric(&second)
    );
    let now = layouts(&pins);
    assert_eq!(now.len(), 1, "the old layout is removed: {now:?}");
    assert_ne!(now, old, "a layout of its own");
    second.expect_active(service.port, 6);
    std::thread::sleep(Duration::from_millis(300));
    asking.store(false, Ordering::SeqCst);
    let answers = answers.join().expect("asking thread");
    assert!(!answers.is_empty(), "the new agent answered");
    for (status, body) in &answers {
        assert!(
            *status == 503 && body.contains("\"active\":6"),
            "{status} {body}"
        );
    }
    eprintln!(
        "{} answers while the layout was replaced, none drained",
        answers.len()
    );
    service.close(6);
    let (status, body) = second.get_json(&format!("/drained?port={}&timeout=10s", service.port));
    assert_eq!(status, 200, "{body}");
}

/// A second agent started while the first runs does not adopt (the lock is held): both count
/// right, each with its own state. Once the first is gone, the second pins its state there,
/// and a third agent adopts the second's.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn a_second_agent_waits_for_the_lock_then_owns_the_pins() {
    let test = "a_second_agent_waits_for_the_lock_then_owns_the_pins";
    if !kernel_available(test) {
        return;
    }
    let pins = PinDir::new();
    let mut first = Agent::start(&["--pin-dir", &pins.arg()]);
    let mut service = Service::start();
    service.open(4);
    first.expect_active(service.port, 4);
    let mut second = Agent::start(&["--pin-dir", &pins.arg()]);
    let log = second.log_text();
    assert!(log.contains("another agent holds"), "{log}");
    assert!(
        state_metric(&second).contains("origin=\"new\",pinned=\"false\""),
        "{}",
        state_metric(&second)
    );
    service.open(2);
    first.expect_active(service.port, 6);
    second.expect_active(service.port, 6);
    assert!(first.stop().success(), "a clean stop");
    wait_until(
        "the second agent to pin its state",
        Duration::from_secs(5),
        || state_metric(&second).contains("pinned=\"true\""),
    );
    assert!(
        second
            .log_text()
            .contains("this agent's kernel state is pinned there now"),
        "{}",
        second.log_text()
    );
    assert_eq!(layouts(&pins).len(), 1);
    service.open(1);
    service.close(2);
    second.expect_active(service.port, 5);
    let opened = opened_total(&second, service.port);
    kill_9(&mut second);
    let third = Agent::start(&["--pin-dir", &pins.arg()]);
    assert!(
        state_metric(&third).contains("origin=\"adopted\""),
        "{}",
        state_metric(&third)
    );
    assert_eq!(third.active(service.port), 5);
    assert_eq!(ss_count(service.port, None), 5);
    assert_eq!(
        opened_total(&third, service.port),
        opened,
        "the third agent counts on from the second's state"
    );
}

/// The agent refuses, at start and naming why, a pin directory it should not trust: not on
/// bpffs, open to other users, owned by another user (pins there are programs and maps it
/// would run and trust).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn an_unsafe_pin_directory_is_refused() {
    let test = "an_unsafe_pin_directory_is_refused";
    if !kernel_available(test) {
        return;
    }
    use std::os::unix::fs::{PermissionsExt as _, chown};
    // An agent mounts bpffs at /sys/fs/bpf if nothing is there (under a lock, so that agents
    // starting at once mount it once): the directories below are made in it.
    drop(Agent::start(&[]));
    let not_bpffs = common::temp_dir("drain-agent-pins-");
    let open_to_all = PinDir::new();
    std::fs::create_dir(&open_to_all.path).expect("mkdir");
    std::fs::set_permissions(&open_to_all.path, std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let foreign = PinDir::new();
    std::fs::create_dir(&foreign.path).expect("mkdir");
    std::fs::set_permissions(&foreign.path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    chown(&foreign.path, Some(65_534), Some(65_534)).expect("chown");
    for (dir, why) in [
        (not_bpffs.path().to_path_buf(), "is not on bpffs"),
        (
            open_to_all.path.clone(),
            "is open to other users (mode 755)",
        ),
        (foreign.path.clone(), "is owned by uid 65534, not root"),
    ] {
        let output = std::process::Command::new(common::agent_binary())
            .args(["run", "--listen", "127.0.0.1:0", "--pin-dir"])
            .arg(&dir)
            .output()
            .expect("run the agent");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(why),
            "{}: {:?}\n{stderr}",
            dir.display(),
            output.status
        );
    }
}

/// The pinned maps of `pins`' one layout, opened as the test's own handle.
fn pinned_map(pins: &PinDir, name: &str) -> aya::maps::Map {
    let [layout] = layouts(pins).try_into().expect("one layout");
    let data = aya::maps::MapData::from_pin(pins.path.join(layout).join(name)).expect(name);
    match name {
        "OWN_PORTS" | "FORGETTING_NOW" => aya::maps::Map::Array(data),
        _ => aya::maps::Map::HashMap(data),
    }
}

/// Marks a killed agent left in the pinned maps are cleared when a new agent adopts them:
/// an own-endpoint mark on a port an application now serves (left, the handler would leave
/// its connections uncounted: a false drained), and a sweep's marks on tracked sockets
/// (left, their closes would stay counted until a walk).
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn marks_a_killed_agent_left_are_cleared_at_adoption() {
    let test = "marks_a_killed_agent_left_are_cleared_at_adoption";
    if !kernel_available(test) {
        return;
    }
    use aya::maps::{Array, HashMap, MapData};
    use drain_agent_common::{OWN_BOUND, SockEntry, netns_port_key, watched_bit};
    let pins = PinDir::new();
    let mut first = Agent::start(&["--pin-dir", &pins.arg()]);
    let mut service = Service::start();
    service.open(3);
    first.expect_active(service.port, 3);
    kill_9(&mut first);
    // As if the dead agent had listened on the service's port (a pod listener), and had
    // been sweeping the service's sockets when it died.
    let netns = drain_agent::sys::netns::inode_of(std::path::Path::new("/proc/self/ns/net"))
        .expect("own netns");
    let mut own: HashMap<MapData, u64, u8> =
        HashMap::try_from(pinned_map(&pins, "OWN_ENDPOINTS")).expect("OWN_ENDPOINTS");
    own.insert(netns_port_key(netns, service.port), OWN_BOUND, 0)
        .expect("mark");
    let mut own_ports: Array<MapData, u64> =
        Array::try_from(pinned_map(&pins, "OWN_PORTS")).expect("OWN_PORTS");
    let (word, mask) = watched_bit(service.port);
    let bits = own_ports.get(&word, 0).expect("bits");
    own_ports.set(word, bits | mask, 0).expect("bit");
    let sockets: HashMap<MapData, u64, SockEntry> =
        HashMap::try_from(pinned_map(&pins, "SOCKETS")).expect("SOCKETS");
    let mut forgetting: HashMap<MapData, u64, u8> =
        HashMap::try_from(pinned_map(&pins, "FORGETTING")).expect("FORGETTING");
    let ours: Vec<u64> = sockets
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, entry)| entry.key.port == service.port)
        .map(|(sk, _)| sk)
        .collect();
    assert_eq!(ours.len(), 3, "the service's tracked sockets");
    for sk in &ours {
        forgetting.insert(sk, 1, 0).expect("forgetting");
    }
    let mut forgetting_now: Array<MapData, u64> =
        Array::try_from(pinned_map(&pins, "FORGETTING_NOW")).expect("FORGETTING_NOW");
    forgetting_now.set(0, 1, 0).expect("flag");

    let second = Agent::start(&["--pin-dir", &pins.arg()]);
    assert!(
        state_metric(&second).contains("origin=\"adopted\""),
        "{}",
        state_metric(&second)
    );
    // New connections on the once-own port are counted at once (no walk needed)...
    service.open(4);
    let started = Instant::now();
    second.expect_active(service.port, 7);
    // ...and closes of the marked sockets un-count them at once.
    service.close(3);
    second.expect_active(service.port, 4);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "counts followed only after {took:?} (a walk, not the handler?)"
    );
    assert_eq!(ss_count(service.port, None), 4);
}

/// Found by an audit: the per-CPU duration histograms had room for every port, 120 bytes
/// per port per possible CPU, never freed: a pod that opened and closed connections on many
/// ports of its own namespace could make them take 7.5 MiB per CPU (480 MiB on a 64-CPU
/// node) of kernel memory charged to the agent. Their room is now sized by the CPU count
/// (`kernel::budget`): the map the agent loads stays within the budget on this machine,
/// whatever its CPU count.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn the_duration_histograms_stay_within_their_kernel_memory_budget() {
    let test = "the_duration_histograms_stay_within_their_kernel_memory_budget";
    if !kernel_available(test) {
        return;
    }
    use drain_agent::kernel::budget::{DURATIONS_BUDGET, duration_ports, possible_cpus};
    let pins = PinDir::new();
    let agent = Agent::start(&["--pin-dir", &pins.arg()]);
    let [layout] = layouts(&pins).try_into().expect("one layout");
    let map =
        aya::maps::MapData::from_pin(pins.path.join(layout).join("DURATIONS")).expect("DURATIONS");
    let info = map.info().expect("map info");
    let cpus = possible_cpus().expect("possible CPUs");
    let bytes = u64::from(info.max_entries())
        * u64::from(info.value_size()).div_ceil(8)
        * 8
        * u64::from(cpus);
    assert!(
        bytes <= DURATIONS_BUDGET,
        "DURATIONS has room for {} ports: {bytes} bytes of values on {cpus} CPUs",
        info.max_entries()
    );
    assert_eq!(info.max_entries(), duration_ports(cpus));
    drop(agent);
}

/// `drain_agent_connections_closed_total{port}` (0 when absent).
fn closed_total(agent: &Agent, port: u16) -> u64 {
    agent
        .metric(&format!(
            "drain_agent_connections_closed_total{{port=\"{port}\"}}"
        ))
        .unwrap_or(0.0) as u64
}

/// The endpoints of `port` in the pinned endpoint map with no connection open.
fn idle_endpoints(pins: &PinDir, port: u16) -> usize {
    use aya::maps::{HashMap, MapData};
    use drain_agent_common::{ConnCounts, ConnKey};
    let counts: HashMap<MapData, ConnKey, ConnCounts> =
        HashMap::try_from(pinned_map(pins, "COUNTS")).expect("COUNTS");
    counts
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, counts)| key.port == port && counts.active == 0)
        .count()
}

/// Audit: the opened and closed totals of reclaimed endpoints lived only in the agent's
/// memory, so by port (`--metrics-labels port`) an agent that adopted the pinned counts
/// reported each port's counters less every endpoint reclaimed before: a counter that went
/// down, which Prometheus reads as a reset (the whole rest counted as new). They are pinned
/// with the counts now, written at each reclaim (kept through a `kill -9`), and not taken
/// by an agent whose counting state is new.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn reclaimed_totals_outlive_the_agent_with_the_pinned_counts() {
    let test = "reclaimed_totals_outlive_the_agent_with_the_pinned_counts";
    if !kernel_available(test) {
        return;
    }
    // More endpoints of ours than 75 % of the map: idle endpoints are reclaimed in the next
    // round (every 10 s) rather than after 60 s, whatever else the host has open. What
    // does not fit (the host's endpoints took the room) is counted for the port only.
    const ADDRESSES: u8 = 200;
    let pins = PinDir::new();
    let pin_arg = pins.arg();
    let args = [
        "--pin-dir",
        pin_arg.as_str(),
        "--metrics-labels",
        "port",
        "--max-endpoints",
        "256",
    ];
    let mut first = Agent::start(&args);
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // One connection held throughout: the port's series stays present.
    let _held = (
        TcpStream::connect(("127.0.0.1", port)).expect("connect"),
        listener.accept().expect("accept"),
    );
    first.expect_active(port, 1);
    for i in 2..ADDRESSES + 2 {
        let client = TcpStream::connect((format!("127.0.0.{i}").as_str(), port)).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        drop(server);
    }
    first.expect_active(port, 1);
    let counted = || (opened_total(&first, port), closed_total(&first, port));
    wait_until("every counted close", Duration::from_secs(10), || {
        let (opened, closed) = counted();
        opened > 1 && closed == opened - 1
    });
    // Reclaimed within a round or two (10 s apart); after 60 s idle at the latest.
    wait_until(
        "the idle endpoints reclaimed",
        Duration::from_secs(90),
        || idle_endpoints(&pins, port) == 0,
    );
    let (opened, closed) = counted();
    kill_9(&mut first);
    let second = Agent::start(&args);
    assert!(
        second.log_text().contains("kernel state adopted from"),
        "{}",
        second.log_text()
    );
    assert_eq!(
        (opened_total(&second, port), closed_total(&second, port)),
        (opened, closed),
        "the adopting agent's counters (opened, closed) differ from the first agent's"
    );
    drop(second);
    // New counting state (another layout: other sizes): nothing reclaimed is taken over,
    // the counters start from what is open.
    let third = Agent::start(&[
        "--pin-dir",
        pin_arg.as_str(),
        "--metrics-labels",
        "port",
        "--max-endpoints",
        "512",
    ]);
    third.expect_active(port, 1);
    let fresh = (opened_total(&third, port), closed_total(&third, port));
    assert!(
        fresh.0 <= 1 && fresh.1 == 0,
        "new counting state: {fresh:?}"
    );
}
