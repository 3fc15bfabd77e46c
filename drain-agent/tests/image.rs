//! The image `cargo xtask dist` builds with buildah (localhost/drain-agent:VERSION), run
//! with podman as the DaemonSet runs it: the host's network and PID namespaces, all
//! capabilities dropped but the five the DaemonSet adds, a read-only root, the host's BTF,
//! tracefs and /run/netns mounted read-only, its bpffs and a state directory — no
//! --privileged. It must start, attach, and count a connection made on the host. And it must
//! have deploy/Dockerfile's layout: binary, entrypoint, command, labels. The podman command
//! README.md and deploy/README.md give is this one (`documented_podman_command_is_the_tested_one`).
//!
//! A kernel test (root); skips loudly without podman or the image, or fails with
//! `DRAIN_AGENT_REQUIRE_KERNEL=1` (`cargo xtask test` builds the image first).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use std::{
    collections::BTreeMap,
    net::TcpStream,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

fn image() -> String {
    format!("localhost/drain-agent:{}", env!("CARGO_PKG_VERSION"))
}

fn required() -> bool {
    std::env::var("DRAIN_AGENT_REQUIRE_KERNEL").is_ok_and(|v| v == "1")
}

/// podman, with runc as its runtime when it is installed: Debian 12's default, crun,
/// refuses hosts whose cgroups are in hybrid mode (this machine).
fn podman_command() -> Command {
    let mut command = Command::new("podman");
    if Command::new("runc").arg("--version").output().is_ok() {
        command.args(["--runtime", "runc"]);
    }
    command
}

fn podman(args: &[&str]) -> Output {
    podman_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run podman")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// podman works and the image is there; else SKIP (or fail under REQUIRE_KERNEL).
fn image_available(test: &str) -> bool {
    let why = if Command::new("podman").arg("--version").output().is_err() {
        "podman is not installed (`cargo xtask setup` installs it)".to_owned()
    } else if !podman(&["image", "exists", &image()]).status.success() {
        format!("{} is not built (`cargo xtask dist` builds it)", image())
    } else {
        return true;
    };
    assert!(
        !required(),
        "{test}: {why} and DRAIN_AGENT_REQUIRE_KERNEL=1"
    );
    common::report_skip(test, &why);
    false
}

/// The last stage of deploy/Dockerfile: LABELs (ARG defaults substituted), ENTRYPOINT,
/// CMD, and where the binary is copied to.
struct DockerfileRuntime {
    labels: BTreeMap<String, String>,
    entrypoint: Value,
    cmd: Value,
    binary_path: String,
}

fn dockerfile_runtime() -> DockerfileRuntime {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    let text = std::fs::read_to_string(&path).expect("read the Dockerfile");
    // From the last FROM on: the runtime stage.
    let instructions = common::deploy::dockerfile_instructions(&text);
    let last_from = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .expect("FROM");
    let runtime = &instructions[last_from..];
    let mut args = BTreeMap::new();
    let mut labels = BTreeMap::new();
    let mut entrypoint = Value::Null;
    let mut cmd = Value::Null;
    let mut binary_path = String::new();
    for (keyword, rest) in runtime {
        let rest = rest.as_str();
        match keyword.as_str() {
            "ARG" => {
                let (name, value) = rest.split_once('=').unwrap_or((rest, ""));
                args.insert(format!("${{{name}}}"), value.to_owned());
            }
            "LABEL" => {
                // key="value" pairs; values may hold spaces.
                let mut rest = rest.trim();
                while let Some((key, after)) = rest.split_once("=\"") {
                    let (value, after) = after.split_once('"').expect("closing quote");
                    let mut value = value.to_owned();
                    for (arg, default) in &args {
                        value = value.replace(arg, default);
                    }
                    labels.insert(key.trim().to_owned(), value);
                    rest = after.trim();
                }
            }
            "ENTRYPOINT" => entrypoint = serde_json::from_str(rest).expect("exec form"),
            "CMD" => cmd = serde_json::from_str(rest).expect("exec form"),
            "COPY" => {
                binary_path = rest
                    .split_whitespace()
                    .last()
                    .unwrap_or_default()
                    .to_owned();
            }
            _ => {}
        }
    }
    DockerfileRuntime {
        labels,
        entrypoint,
        cmd,
        binary_path,
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn image_has_the_dockerfiles_layout() {
    let test = "image_has_the_dockerfiles_layout";
    if !common::kernel_available(test) || !image_available(test) {
        return;
    }
    let inspected = podman(&["image", "inspect", &image()]);
    assert!(inspected.status.success(), "{}", text(&inspected));
    let inspected: Value = serde_json::from_slice(&inspected.stdout).expect("JSON");
    let image = &inspected[0];
    let size = image["Size"].as_u64().expect("Size");
    println!(
        "image {}: {size} bytes ({:.1} MiB), {} layer(s)",
        self::image(),
        size as f64 / 1_048_576.0,
        image["RootFS"]["Layers"].as_array().map_or(0, Vec::len)
    );
    assert!(size < 10 * 1_048_576, "image is {size} bytes, over 10 MiB");

    let dockerfile = dockerfile_runtime();
    let config = &image["Config"];
    assert_eq!(config["Entrypoint"], dockerfile.entrypoint);
    assert_eq!(config["Cmd"], dockerfile.cmd);
    assert_eq!(
        dockerfile.entrypoint,
        serde_json::json!([dockerfile.binary_path])
    );
    let labels: BTreeMap<String, String> =
        serde_json::from_value(image["Labels"].clone()).expect("labels");
    assert_eq!(
        labels.keys().collect::<Vec<_>>(),
        dockerfile.labels.keys().collect::<Vec<_>>(),
        "the same OCI labels as deploy/Dockerfile"
    );
    for (key, value) in &dockerfile.labels {
        if key.ends_with(".revision") {
            // Per build: the commit. The binary in the image says which.
            continue;
        }
        assert_eq!(&labels[key], value, "label {key}");
    }
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );

    // Nothing but the binary: one layer, and the binary says its version and commit.
    let version = podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=4096:4096",
        &self::image(),
        "--version",
    ]);
    let version = text(&version);
    assert!(
        version.contains(&labels["org.opencontainers.image.revision"]),
        "the revision label names the binary's commit: {version} vs {labels:?}"
    );
}

/// The DaemonSet's added capabilities, read from the base manifest.
fn daemonset_capabilities() -> Vec<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/base/daemonset.yaml");
    let text = std::fs::read_to_string(path).expect("read the DaemonSet");
    let mut capabilities = Vec::new();
    let mut in_add = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed == "add:" {
            in_add = true;
            continue;
        }
        if in_add {
            match trimmed.strip_prefix("- ") {
                Some(item) => capabilities.push(
                    item.split_whitespace()
                        .next()
                        .expect("capability")
                        .to_owned(),
                ),
                None => break,
            }
        }
    }
    assert_eq!(capabilities.len(), 5, "{capabilities:?}");
    capabilities
}

/// How the image runs as the DaemonSet runs it, as podman's flags: the host's network and
/// PID namespaces, a read-only root, every capability dropped but the DaemonSet's, and its
/// hostPath mounts (`state`: the host's directory for `--state-dir`; `tracing`: whether
/// tracefs is mounted on the host to be mounted in).
fn podman_daemonset_flags(state: &str, tracing: bool) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--network",
        "host",
        "--pid",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for capability in daemonset_capabilities() {
        flags.extend(["--cap-add".to_owned(), capability]);
    }
    let mut volumes = vec!["/sys/kernel/btf:/sys/kernel/btf:ro".to_owned()];
    if tracing {
        volumes.push("/sys/kernel/tracing:/sys/kernel/tracing:ro".to_owned());
    }
    volumes.extend([
        "/run/netns:/run/netns:ro,rslave".to_owned(),
        "/sys/fs/bpf:/sys/fs/bpf:rslave".to_owned(),
        format!("{state}:/run/drain-agent"),
    ]);
    for volume in volumes {
        flags.extend(["-v".to_owned(), volume]);
    }
    flags
}

/// podman's flags as (flag, value) pairs, `--cap-add A,B` as one pair per capability,
/// sorted: the same set of flags however they are ordered or grouped.
fn flag_pairs(words: &[String]) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut words = words.iter();
    while let Some(flag) = words.next() {
        assert!(flag.starts_with('-'), "{flag:?} is not a flag in {words:?}");
        let value = match flag.as_str() {
            "--read-only" => String::new(),
            _ => words
                .next()
                .unwrap_or_else(|| panic!("{flag} without a value"))
                .clone(),
        };
        if flag == "--cap-add" {
            pairs.extend(value.split(',').map(|c| (flag.clone(), c.to_owned())));
        } else {
            pairs.push((flag.clone(), value));
        }
    }
    pairs.sort();
    pairs
}

/// The podman command README.md and deploy/README.md give runs the image as the test above
/// does: the same capabilities (the DaemonSet's five), mounts and namespaces; only its
/// host's state directory is the one the DaemonSet mounts.
#[test]
fn documented_podman_command_is_the_tested_one() {
    let expected = flag_pairs(&podman_daemonset_flags("/run/drain-agent", true));
    for doc in ["README.md", "deploy/README.md"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(doc);
        // Prose wraps the command: one space for each run of whitespace.
        let text = std::fs::read_to_string(&path)
            .expect("read the doc")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let commands: Vec<&str> = text
            .match_indices("podman run ")
            .map(|(at, _)| {
                let rest = &text[at + "podman run ".len()..];
                let end = rest
                    .find("localhost/drain-agent:")
                    .unwrap_or_else(|| panic!("{doc}: `podman run` without the image"));
                &rest[..end]
            })
            .collect();
        assert_eq!(commands.len(), 1, "{doc}: one `podman run` command");
        let words: Vec<String> = commands[0].split_whitespace().map(str::to_owned).collect();
        assert_eq!(
            flag_pairs(&words),
            expected,
            "{doc}'s podman command is not the one tests/image.rs runs: {}",
            words.join(" ")
        );
    }
}

/// The running container, removed on drop.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "5", &self.0]);
    }
}

#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn image_runs_like_the_daemonset_and_counts_host_connections() {
    let test = "image_runs_like_the_daemonset_and_counts_host_connections";
    if !common::kernel_available(test) || !image_available(test) {
        return;
    }
    let port = common::free_port();
    let name = format!("drain-agent-test-{}", std::process::id());
    let _ = podman(&["rm", "--force", &name]);
    // The DaemonSet's hostPath volumes (DirectoryOrCreate for /run/netns).
    std::fs::create_dir_all("/run/netns").expect("/run/netns");
    // And the host's bpffs, where the agent pins its kernel state: into a directory of this
    // test's own (tests run in parallel on one kernel), removed when the test ends.
    let pins = common::PinDir::new();
    let mut args: Vec<String> = [
        "run",
        "--detach",
        "--name",
        &name,
        // podman raises the open-file and process limits by default, which needs
        // CAP_SYS_RESOURCE outside the container (this sandbox has not got it). The agent
        // needs far fewer than these (--http-max-connections 512 plus its maps).
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=4096:4096",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // The DaemonSet's hostPath for the state directory (--state-dir), one per test run;
    // tracefs only where the host has it mounted.
    let state = common::temp_dir("da-state-");
    args.extend(podman_daemonset_flags(
        &state.path().display().to_string(),
        Path::new("/sys/kernel/tracing/events").is_dir(),
    ));
    args.push(image());
    args.extend(["run", "--listen"].iter().map(|s| (*s).to_owned()));
    args.push(format!("127.0.0.1:{port}"));
    args.extend(["--pin-dir".to_owned(), pins.arg()]);
    let started = Instant::now();
    let output = podman_command()
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("podman run");
    assert!(
        output.status.success(),
        "podman {}: {}",
        args.join(" "),
        text(&output)
    );
    let container = Container(name);
    let url = drain_agent::cli::client::AgentUrl::parse(&format!("http://127.0.0.1:{port}"))
        .expect("url");
    let health = loop {
        if let Ok(answer) = drain_agent::cli::client::get(&url, "/healthz", Duration::from_secs(2))
            && answer.status == 200
        {
            break answer.body;
        }
        let state = podman(&["inspect", "--format", "{{.State.Status}}", &container.0]);
        let logs = podman(&["logs", &container.0]);
        assert!(
            started.elapsed() < Duration::from_secs(30) && text(&state).trim() == "running",
            "the container is not healthy ({}):\n{}",
            text(&state).trim(),
            text(&logs)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("container healthy after {:?}: {health}", started.elapsed());

    // A connection made on the host, counted by the agent in the container.
    let server = common::Server::start("127.0.0.1:0");
    let client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    server.wait_accepted(1);
    let active = |expected: u64| {
        let started = Instant::now();
        loop {
            let answer = drain_agent::cli::client::get(
                &url,
                &format!("/drained?port={}&timeout=0", server.port),
                Duration::from_secs(5),
            )
            .expect("/drained");
            let body: Value = serde_json::from_str(&answer.body).expect("JSON");
            if body["active"] == expected {
                return body;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "active {} != {expected}",
                body["active"]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    active(1);
    drop(client);
    server.close_all();
    let body = active(0);
    assert_eq!(body["drained"], true, "{body}");

    let logs = text(&podman(&["logs", &container.0]));
    assert!(logs.contains("serving on"), "{logs}");
    // The kernel state is pinned in the host's bpffs, as the DaemonSet's is.
    assert!(logs.contains("kernel state pinned at"), "{logs}");
    // SIGTERM ends it cleanly (exit 0), as a pod's termination does.
    let stop = podman(&["stop", "--time", "10", &container.0]);
    assert!(stop.status.success(), "{}", text(&stop));
    let exit = podman(&["inspect", "--format", "{{.State.ExitCode}}", &container.0]);
    assert_eq!(text(&exit).trim(), "0", "exit code after SIGTERM");
}
