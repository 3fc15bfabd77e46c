//! Command-line interface. `drain-agent` alone runs the agent, like `drain-agent run`.

pub mod client;
pub mod generate;

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    duration::parse_duration,
    http::server::ServerLimits,
    kernel::AttachMethod,
    logging::{LogFormat, LogLevel},
    metrics::{ConnectionLabels, PortSet},
};

/// The default address of the agent for `wait` and `status`.
pub const DEFAULT_AGENT_URL: &str = "http://127.0.0.1:9100";

/// `--attach`: the command-line names of [`AttachMethod`] (the kernel side knows nothing
/// of the command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachArg {
    /// BTF-enabled tracepoint (`tp_btf`): cheapest; needs no tracefs.
    TpBtf,
    /// Classic tracepoint through tracefs (mounted by the agent if absent).
    Tracepoint,
    /// Raw tracepoint: needs no tracefs; for kernels that refuse tp_btf.
    RawTracepoint,
}

impl From<AttachArg> for AttachMethod {
    fn from(arg: AttachArg) -> Self {
        match arg {
            AttachArg::TpBtf => Self::TpBtf,
            AttachArg::Tracepoint => Self::Tracepoint,
            AttachArg::RawTracepoint => Self::RawTracepoint,
        }
    }
}

/// `--close-method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CloseArg {
    /// bpf-sock-destroy where it loaded, else netlink.
    Auto,
    /// `bpf_sock_destroy()` from a BPF iterator (Linux >= 6.5).
    BpfSockDestroy,
    /// Netlink `SOCK_DESTROY`, as `ss -K` (needs CONFIG_INET_DIAG_DESTROY and
    /// CAP_NET_ADMIN: without it, `on_timeout=close` is refused).
    Netlink,
}

#[derive(Debug, Parser)]
#[command(
    name = "drain-agent",
    version = crate::build_info::VERSION,
    about = "Counts the inbound TCP connections of every local port from the kernel (eBPF) and \
             answers \"is this port drained?\" for deploy hooks.",
    long_about = "Counts the inbound TCP connections of every local port from the kernel (eBPF) \
                  and answers \"is this port drained?\" for deploy hooks.\n\n\
                  Run the agent (as root, or with CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE, and \
                  CAP_NET_ADMIN to close connections at a deadline on kernels before 6.5), then block a \
                  stop hook on it:\n  drain-agent wait --port 8080 --timeout 30s\n  \
                  curl -fsS 'http://127.0.0.1:9100/drained?port=8080&timeout=30s'   (curl does \
                  not check whose server answers: on a host shared with untrusted users, use \
                  drain-agent wait)",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `run`, for bare `drain-agent`.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach to the kernel, count connections, serve the HTTP API.
    Run(Box<RunArgs>),
    /// Block until a port is drained, by asking a running agent (for images without curl; and
    /// unlike curl, it asks only a server socket of root or its own user).
    /// Exit status: 0 drained, 1 not drained in time, 2 usage error, a refusal (a 4xx other
    /// than 408, 425 or 429, e.g. 404 for an unknown --netns inode: at once) or agent
    /// unreachable (a server on its address whose socket is another user's, see
    /// --agent-uid, counts as unreachable: nothing is sent to it).
    Wait(WaitArgs),
    /// Print the ports with open connections, as a running agent counts them, and every
    /// reason the agent cannot vouch for them (/healthz degraded or seeding; with --port the
    /// agent's own count for the port, which rows short of it or a port outside the agent's
    /// --ports are told against; without, its per-port totals, the same way: sent to root
    /// or a token holder only, so a pod or local user gets exit 1 there; answers of two
    /// agents, an upgrade's old and new one on the same address, asked again and still
    /// mixed). Exit status: 0
    /// the agent vouches for every count shown; 1 it cannot (the reasons printed after the
    /// table, on stderr with --json); 2 usage error, a refused request or agent unreachable.
    Status(StatusArgs),
    /// Whether the agent named --instance serves and is healthy at --listen: an exec probe
    /// for the kubelet. During an upgrade two agents share the address (SO_REUSEPORT) and
    /// each connection goes to either; an `httpGet` probe of the new pod may be answered by
    /// the old agent. This tries fresh connections (each hashed anew) until the named agent
    /// answers `/healthz` (its answers carry its name) or --within passes. Exit status: 0
    /// that agent answered 200 (with --ready: and is ready); 1 it answered otherwise, or
    /// only other agents or none did; 2 usage error.
    Probe(ProbeArgs),
    /// Print a shell completion script, e.g.
    /// `drain-agent completions bash > /etc/bash_completion.d/drain-agent`.
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (drain-agent.1, drain-agent-run.1, …) into a directory.
    #[command(hide = true)]
    Manpage {
        /// Where to write them (created if missing).
        #[arg(default_value = ".")]
        dir: std::path::PathBuf,
    },
}

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Address to serve the HTTP API on. 9100 is also node_exporter's default port: pick
    /// another (e.g. 127.0.0.1:9110) if both run on one host.
    #[arg(long, env = "DRAIN_AGENT_LISTEN", default_value = "127.0.0.1:9100")]
    pub listen: SocketAddr,

    /// Also serve the API inside every other network namespace (every pod) on this address,
    /// e.g. 127.0.0.1:9100 (hooks call localhost) or 0.0.0.0:9100 (the kubelet's httpGet
    /// calls the pod IP). Requests there answer for that namespace only; beyond loopback only
    /// the pod itself (localhost) and root on the node (the kubelet) are answered, anyone
    /// else gets 403, a call a proxy in the pod relays (a service mesh's sidecar) included:
    /// exclude the port from its inbound interception (SECURITY.md). Off by default.
    #[arg(long, env = "DRAIN_AGENT_POD_LISTEN")]
    pub pod_listen: Option<SocketAddr>,

    /// With --pod-listen: only named namespaces (/run/netns/NAME) whose NAME starts with
    /// this (e.g. "cni-" for containerd's pods; CRI-O names its pods' by a UUID); default:
    /// every namespace that may be a pod's (not one a user or a container made for itself).
    #[arg(long, env = "DRAIN_AGENT_POD_NETNS_PREFIX", requires = "pod_listen")]
    pub pod_netns_prefix: Option<String>,

    /// With --pod-listen: open HTTP connections at most per pod listener.
    #[arg(
        long,
        env = "DRAIN_AGENT_POD_HTTP_MAX_CONNECTIONS",
        requires = "pod_listen",
        default_value_t = 16,
        value_parser = at_least_one
    )]
    pub pod_http_max_connections: usize,

    /// With --pod-listen: pod listeners open at most. Each costs descriptors (its socket,
    /// its steering program and link, a file of its namespace, and up to
    /// --pod-http-max-connections connections plus a reserve of an eighth of them, 4 to 64:
    /// 24 by default)
    /// and a server; past it, further namespaces get no listener while it stays so (WARN,
    /// drain_agent_pod_listeners{state="over_limit"}). Lowered at start (WARN) to what the
    /// open-file limit leaves beside the node listener (its connections and their reserve),
    /// the agent-check listener (with --agent-check-listen: 64 connections and its socket)
    /// and 128 for the rest of the agent.
    /// Namespaces a user's user namespace owns (unshare -Urn) are never served and not
    /// counted.
    #[arg(
        long,
        env = "DRAIN_AGENT_POD_MAX_LISTENERS",
        requires = "pod_listen",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub pod_max_listeners: u32,

    /// With --pod-listen (steered with sk_lookup): the port of the agent's own socket in
    /// each pod, on loopback (127.0.0.1; [::1] or [::] for an IPv6 --pod-listen), which the
    /// in-pod port is steered to. It is taken in every pod: no application there can bind it
    /// (on any address), but one running as root that sets SO_REUSEPORT, which then shares
    /// the agent's socket unnoticed. Choose one your pods never use; a pod whose application
    /// holds it already, also with SO_REUSEPORT, is not served (WARN,
    /// drain_agent_pod_listeners{state="socket_port_taken"}).
    /// Must differ from --pod-listen's port.
    #[arg(
        long,
        env = "DRAIN_AGENT_POD_SOCKET_PORT",
        requires = "pod_listen",
        default_value_t = crate::http::pods::DEFAULT_SOCKET_PORT,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub pod_socket_port: u16,

    /// With --pod-listen: bind its address in each namespace, as on kernels without
    /// sk_lookup (Linux < 5.9), even where the port could be steered. For the tests of that
    /// fallback; hidden.
    #[arg(long, hide = true, requires = "pod_listen")]
    pub pod_listen_bind: bool,

    /// Makes the event reader (a watched task, `tasks.rs`) end this long after the start,
    /// as a failed ring buffer would end it. For the tests of the agent's stop when a
    /// watched task ends; hidden.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub end_event_reader_after: Option<Duration>,

    /// Doubts as on a kernel of this version (`MAJOR.MINOR`, an older one than the running
    /// kernel: what it cannot vouch for, such as the classic tracepoint's skipped runs
    /// before 6.7, is doubted here too; a newer one is taken as the running kernel's, whose
    /// doubts stay). For the tests of older kernels' doubts; hidden.
    #[arg(long, hide = true, value_parser = parse_kernel_version)]
    pub assume_kernel_version: Option<crate::kernel::version::KernelVersion>,

    /// How long /drained blocks when the request has no `timeout`.
    #[arg(long, env = "DRAIN_AGENT_DEFAULT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub default_timeout: Duration,

    /// The longest `timeout` (and `settle`) a request may ask for.
    #[arg(long, env = "DRAIN_AGENT_MAX_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub max_timeout: Duration,

    /// How many /drained requests may block at once, and drains be in progress at once
    /// (of each, one pod's namespace, or the node's local users, may have 64; root only this
    /// limit); more get 429.
    #[arg(long, env = "DRAIN_AGENT_MAX_WAITERS", default_value_t = 1024)]
    pub max_waiters: usize,

    /// Open HTTP connections at most (lowered so that they and the reserve below stay 128
    /// under the open-file limit). At the cap, a new
    /// connection replaces the oldest idle one; when every one has a request in progress,
    /// the new one is served on a small reserve beyond the cap (/healthz, and a /drained
    /// from a source with none in progress) or answered 429 with Retry-After; when the
    /// reserve is full too, new connections wait in the listen backlog. None is reset.
    #[arg(
        long,
        env = "DRAIN_AGENT_HTTP_MAX_CONNECTIONS",
        default_value_t = 512,
        value_parser = at_least_one
    )]
    pub http_max_connections: usize,

    /// Time a client has to send a complete request head (idle connections are closed then).
    #[arg(long, env = "DRAIN_AGENT_HTTP_HEADER_TIMEOUT", default_value = "5s", value_parser = longer_than_zero)]
    pub http_header_timeout: Duration,

    /// Drop a connection whose answer makes no progress this long (a client that does not read).
    #[arg(long, env = "DRAIN_AGENT_HTTP_WRITE_TIMEOUT", default_value = "10s", value_parser = longer_than_zero)]
    pub http_write_timeout: Duration,

    /// How long open HTTP connections get to finish on SIGTERM before they are dropped
    /// (counted from the end of --shutdown-grace).
    #[arg(long, env = "DRAIN_AGENT_HTTP_SHUTDOWN_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub http_shutdown_timeout: Duration,

    /// On SIGTERM the agent stops accepting at once (its listeners are shared with the next
    /// agent of an upgrade, which takes new connections and those queued) and keeps giving
    /// the waiters it has their usual answers (drained, or not at their timeout) for up to
    /// this long; those still waiting then get 503 `"reason":"agent_shutdown"` with
    /// Retry-After. Where an agent starts beside this one (the DaemonSet's upgrade), set it
    /// to --max-timeout, so that every waiter gets its real answer (the DaemonSet: 10m). The
    /// stop timeout (terminationGracePeriodSeconds, TimeoutStopSec=) must cover it plus
    /// --http-shutdown-timeout plus 8 s (drains' records 2 s, exit waits 3 s + 3 s; 2 s more
    /// with --agent-check-listen; a grace under 2 s counts as 2 s) and a margin. The agent exits as soon as no waiter is
    /// left. Not waited for when the agent stops because a background task of its own ended
    /// (the event reader, the repair task): it answers every waiter at once and exits 1, to
    /// be restarted.
    #[arg(long, env = "DRAIN_AGENT_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// How many /drained requests one source may have in progress; more get 429. A source is
    /// a local user (by its socket's owner, whatever loopback address it calls from), a pod
    /// (by its namespace), else an IP address (root's processes among them).
    #[arg(
        long,
        env = "DRAIN_AGENT_MAX_WAITERS_PER_SOURCE",
        default_value_t = 64,
        value_parser = at_least_one
    )]
    pub max_waiters_per_source: usize,

    /// Connections tracked at once (kernel per-socket map size). Memory is used as
    /// connections come (128 bytes each, plus 16 bytes of buckets per slot at start: 4 MiB
    /// at the default), not reserved up front, unless --preallocate-sockets.
    #[arg(long, env = "DRAIN_AGENT_MAX_CONNECTIONS", default_value_t = 262_144)]
    pub max_connections: u32,

    /// Reserve the per-socket map's kernel memory at start (136 bytes per
    /// --max-connections slot: 34 MiB at the default, charged to the agent's cgroup). Tracked
    /// opens and closes then cost about 40 % less on cold caches, and tracking never fails
    /// for lack of memory.
    #[arg(long, env = "DRAIN_AGENT_PREALLOCATE_SOCKETS")]
    pub preallocate_sockets: bool,

    /// Distinct (network namespace, local address, port) endpoints tracked.
    #[arg(long, env = "DRAIN_AGENT_MAX_ENDPOINTS", default_value_t = 16_384)]
    pub max_endpoints: u32,

    /// Only export these ports in /metrics (connections and drains) and /connections, e.g.
    /// `80,443,8080-8090` (default: every port that has had an inbound connection).
    #[arg(long, env = "DRAIN_AGENT_PORTS", value_parser = clap::value_parser!(PortSet))]
    pub ports: Option<PortSet>,

    /// The labels of the connection and drain metrics: `address` (port and local address,
    /// a pod's IP: one series per address and port served on the node, never client
    /// addresses) or `port` (one series per port, no address anywhere in /metrics).
    #[arg(long, env = "DRAIN_AGENT_METRICS_LABELS", value_enum, default_value_t = ConnectionLabels::Address)]
    pub metrics_labels: ConnectionLabels,

    /// Attach only this way instead of trying tp_btf, then raw-tracepoint, then tracepoint.
    #[arg(long, env = "DRAIN_AGENT_ATTACH", value_enum)]
    pub attach: Option<AttachArg>,

    /// How often to walk the open sockets to find and repair state changes the kernel
    /// skipped (it also walks within 5 s of the kernel reporting a skipped run);
    /// 0 walks only then.
    #[arg(long, env = "DRAIN_AGENT_REPAIR_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub repair_interval: Duration,

    /// Do not walk the open sockets at start: connections open before the agent started
    /// are then only counted by the first repair walk (see --repair-interval).
    #[arg(long, env = "DRAIN_AGENT_NO_SEED")]
    pub no_seed: bool,

    /// Pin the kernel handler and its counting maps here (bpffs, 0700 root; bpffs is mounted
    /// at /sys/fs/bpf if nothing is): counting goes on while the agent is down, and the next
    /// agent adopts the counts instead of seeding afresh (the classic tracepoint only from
    /// Linux 5.15: before, it has no link to pin). Remove the directory to uninstall (that
    /// detaches the handler).
    #[arg(
        long,
        env = "DRAIN_AGENT_PIN_DIR",
        default_value = crate::kernel::pin::DEFAULT_DIR,
        conflicts_with = "no_pin"
    )]
    pub pin_dir: std::path::PathBuf,

    /// Pin nothing: the handler detaches when the agent stops, and the next agent seeds its
    /// counts with a walk of the open sockets.
    #[arg(long, env = "DRAIN_AGENT_NO_PIN")]
    pub no_pin: bool,

    /// This agent's name, sent in the `drain-agent-instance` header of every answer on
    /// --listen: `drain-agent probe --instance` tells this agent from another one on the same
    /// address (an upgrade's old or new agent). The DaemonSet gives the pod's UID. Letters,
    /// digits, '.', '_' and '-', at most 64. Default: random at each start.
    #[arg(long, env = "DRAIN_AGENT_INSTANCE", value_parser = parse_instance)]
    pub instance: Option<String>,

    /// Serve HAProxy's agent-check protocol on this address: `drain` for a port being
    /// drained, `ready` otherwise (point `agent-check agent-port … agent-send "PORT\n"` at it).
    /// Closed at SIGTERM with the other listeners (the next agent answers). On a port of its
    /// own: an address --listen would share (the same, or a wildcard covering the other, on
    /// the same port) is refused.
    #[arg(long, env = "DRAIN_AGENT_AGENT_CHECK_LISTEN")]
    pub agent_check_listen: Option<SocketAddr>,

    /// How connections are closed at a drain's deadline (`on_timeout=close`): `auto` uses
    /// `bpf_sock_destroy()` where the kernel has it (6.5+), else netlink `SOCK_DESTROY`
    /// (which needs CAP_NET_ADMIN: without it such drains are refused, and /healthz says why).
    #[arg(
        long,
        env = "DRAIN_AGENT_CLOSE_METHOD",
        value_enum,
        default_value = "auto"
    )]
    pub close_method: CloseArg,

    /// Bearer tokens (one per line, at least 16 characters; `#` comments) that give a caller
    /// the node's authority on the node listener (a pod listener does not read them): the
    /// only way for callers that are neither this node nor a pod on it to do more than read
    /// /metrics, /healthz and /health. Send it as `Authorization: Bearer TOKEN`
    /// (`drain-agent wait` sends the one in its `--token-file`, $DRAIN_AGENT_TOKEN_FILE);
    /// another scheme (a scraper's basic auth) is not read. See SECURITY.md.
    #[arg(long, env = "DRAIN_AGENT_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<std::path::PathBuf>,

    /// Append a record of every ended drain to this file (JSON lines), and read the last
    /// ones back at start so `/drains` survives restarts. A regular file or nothing (then
    /// created mode 0600): a link, FIFO or device there, or a file or directory another
    /// user than the agent's owns, stops the start.
    #[arg(long, env = "DRAIN_AGENT_JOURNAL")]
    pub journal: Option<std::path::PathBuf>,

    /// Past this size the journal moves to PATH.1 and a new one starts (at most twice
    /// this is kept).
    #[arg(
        long,
        env = "DRAIN_AGENT_JOURNAL_MAX_BYTES",
        default_value_t = 8 << 20,
        requires = "journal"
    )]
    pub journal_max_bytes: u64,

    /// Keep the drains POSTed and in progress, and the /health gates held after drains, in
    /// DIR/drains.json (written atomically, synced before a POST /drain is answered), so a
    /// restarted agent resumes them. During an upgrade the new agent keeps what it is asked
    /// in DIR/drains.next.json until the old one has gone. Created mode 0700 if absent; a
    /// link there, a directory another user than the agent's owns, or a state file that is
    /// not a regular file, stops the start. A state file
    /// this agent cannot read (a later release's, after a rollback) is moved aside, never
    /// written over, and /health answers "draining" for every port while it could still
    /// gate. Keep it on a file system that
    /// lives as long as the node's boot (systemd `RuntimeDirectory=`, a `hostPath`).
    #[arg(
        long,
        env = "DRAIN_AGENT_STATE_DIR",
        default_value = "/run/drain-agent"
    )]
    pub state_dir: std::path::PathBuf,

    /// Log level: error, warn, info, debug, trace or off; another word is refused
    /// (RUST_LOG, in env_logger's syntax, overrides it).
    #[arg(
        long,
        env = "DRAIN_AGENT_LOG",
        value_enum,
        ignore_case = true,
        default_value_t = LogLevel::Info
    )]
    pub log_level: LogLevel,

    /// Log format: text, or json (one object per line: ts, level, target, message).
    #[arg(long, env = "DRAIN_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Debug, Args)]
pub struct ProbeArgs {
    /// The address the agent serves on (its `run --listen`).
    #[arg(long, env = "DRAIN_AGENT_LISTEN", default_value = "127.0.0.1:9100")]
    pub listen: SocketAddr,

    /// The agent to reach: its `run --instance` (the DaemonSet gives both the pod's UID).
    #[arg(long, env = "DRAIN_AGENT_INSTANCE", value_parser = parse_instance)]
    pub instance: String,

    /// Give up (exit 1) when that agent has not answered within this long; keep it below
    /// the probe's timeoutSeconds.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub within: Duration,

    /// Pass only once the agent is also ready (`/healthz?ready=true`): with `run
    /// --pod-listen`, the listeners of the pod namespaces there at its start are open (or
    /// could not be within 30 s). The DaemonSet's readiness probe: an upgrade's old agent
    /// is stopped once the new one is ready. Not for the startup or liveness probe: their
    /// failures restart the agent, and a long first round would only start over.
    #[arg(long)]
    pub ready: bool,
}

/// The longest `--instance`.
pub const INSTANCE_MAX_LEN: usize = 64;

/// `--instance`: letters, digits, `.`, `_` and `-` (a pod UID, a host name), at most
/// [`INSTANCE_MAX_LEN`]: it is sent in a header as it is.
pub fn parse_instance(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > INSTANCE_MAX_LEN {
        return Err(format!(
            "an instance name has 1 to {INSTANCE_MAX_LEN} characters"
        ));
    }
    if !text
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    {
        return Err("an instance name has only letters, digits, '.', '_' and '-'".into());
    }
    Ok(text.to_owned())
}

/// `--assume-kernel-version`: `MAJOR.MINOR`.
fn parse_kernel_version(text: &str) -> Result<crate::kernel::version::KernelVersion, String> {
    crate::kernel::version::parse_release(text)
        .ok_or_else(|| format!("{text:?} is no kernel version (MAJOR.MINOR)"))
}

#[derive(Clone, Debug, Args)]
pub struct WaitArgs {
    /// Local port whose inbound connections must finish.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,

    /// Only connections to this local address (a pod's IP; in a pod spec, set
    /// DRAIN_AGENT_ADDR from `status.podIP` and the hook needs no shell). Not 0.0.0.0, ::,
    /// multicast or broadcast, which no connection has: leave it out for every address.
    #[arg(long, env = "DRAIN_AGENT_ADDR", value_parser = wait_addr)]
    pub addr: Option<std::net::IpAddr>,

    /// Only this network namespace: an inode number or a path such as /proc/PID/ns/net.
    #[arg(long)]
    pub netns: Option<String>,

    /// Give up (exit 1) after this long. Over 10 minutes it is asked in slices of at most 10
    /// minutes (the agent's default --max-timeout); each slice the wait asks again after
    /// says so (`continues=true`), and its drain ends `continued`, not `timeout`: no alert
    /// for a hook that goes on waiting. The wait ends by 0.5 s after this (1 s when the agent
    /// never takes its request), up to 5.5 s when the agent took its request late (its
    /// restart, an overloaded agent: it answers as much later), and waits for a close's
    /// answer (--close-at-timeout) up to 30 s more.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Arrivals stopped: drained only once no new connection has arrived for this long,
    /// counted from when `wait` asked (every drain takes at least this long: the time load
    /// balancers need to stop sending). `--settle` is its deprecated name.
    #[arg(long, alias = "settle", default_value = "0s", value_parser = parse_duration)]
    pub quiet: Duration,

    /// Probe traffic: connections from these sources (CIDR[,CIDR…], e.g. the node's
    /// address toward the pod, where the kubelet's probes come from) neither count as
    /// arrivals nor hold the drain. Every client arriving from them is ignored too (traffic
    /// masqueraded to the node, a hostNetwork proxy): leave out an address real clients
    /// come from. At most 64 sources.
    #[arg(long, value_name = "CIDR[,CIDR...]", value_parser = ignore_list)]
    pub ignore: Option<String>,

    /// Idle connections need not hold the drain: a connection with nothing in flight that
    /// has moved no data for this long does not count (keep-alive pools). Nothing in
    /// flight: both queues empty and no reply awaited. A connection whose last bytes came
    /// from the client (a request being worked on, but also a WebSocket pong or an HTTP/2
    /// WINDOW_UPDATE after a response) is busy until the server sends again, and may hold
    /// the drain to its timeout. Off by default: an idle WebSocket is still a live session.
    #[arg(long, value_parser = parse_duration)]
    pub idle: Option<Duration>,

    /// At the timeout, close the connections still open (idle ones first) instead of
    /// leaving them: the drain ends then, and the peers get a reset. Never by default, and
    /// never before the timeout (a wait over 10 minutes asks in slices, the last one at least
    /// --quiet long where the timeout is at least twice --quiet; only the last closes). The
    /// wait ends once the agent has closed them (with --pace, up to 30 s past the timeout).
    #[arg(long)]
    pub close_at_timeout: bool,

    /// With --close-at-timeout: close at most this many connections per second (0: all at
    /// once; closing 10,000 WebSockets at once makes a reconnect storm).
    #[arg(long, default_value_t = 0, requires = "close_at_timeout")]
    pub pace: u32,

    /// Print a progress line to stderr this often (0: never).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub progress: Duration,

    /// The agent to ask.
    #[arg(long, env = "DRAIN_AGENT_URL", default_value = DEFAULT_AGENT_URL)]
    pub agent: String,

    /// A file holding a bearer token the agent accepts (its --auth-token-file): needed only
    /// when asking an agent from beyond its node and pods (SECURITY.md).
    #[arg(long, env = "DRAIN_AGENT_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// The agent's user, if it is neither root nor the user running this command (an agent
    /// run as a user with capabilities). A request, and its token, goes only to a server
    /// socket of root, of this user or of this uid when the socket is in this network
    /// namespace: while the agent is down, any local user may bind its address. Another
    /// user's server is not the agent: nothing is sent to it, and it counts as an agent out
    /// of reach (SECURITY.md).
    #[arg(long, env = "DRAIN_AGENT_UID", value_name = "UID")]
    pub agent_uid: Option<u32>,
}

#[derive(Clone, Debug, Args)]
pub struct StatusArgs {
    /// The agent to ask.
    #[arg(long, env = "DRAIN_AGENT_URL", default_value = DEFAULT_AGENT_URL)]
    pub agent: String,

    /// A file holding a bearer token the agent accepts (its --auth-token-file): needed only
    /// when asking an agent from beyond its node and pods (SECURITY.md).
    #[arg(long, env = "DRAIN_AGENT_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// The agent's user, if it is neither root nor the user running this command (an agent
    /// run as a user with capabilities). A request, and its token, goes only to a server
    /// socket of root, of this user or of this uid when the socket is in this network
    /// namespace: while the agent is down, any local user may bind its address. Another
    /// user's server is not the agent: nothing is sent to it, and it counts as an agent out
    /// of reach (SECURITY.md).
    #[arg(long, env = "DRAIN_AGENT_UID", value_name = "UID")]
    pub agent_uid: Option<u32>,

    /// Only this local port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,

    /// Print the agent's `/connections` JSON instead of a table (for scripts and jq); what
    /// the agent cannot vouch for goes to stderr, and the exit status is the table's.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// What clap cannot check alone: the flags that must agree with each other.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.default_timeout <= self.max_timeout,
            "--default-timeout ({:?}) is longer than --max-timeout ({:?})",
            self.default_timeout,
            self.max_timeout
        );
        anyhow::ensure!(self.max_waiters > 0, "--max-waiters must be at least 1");
        if let Some(pod_listen) = self.pod_listen {
            anyhow::ensure!(
                pod_listen.port() != self.pod_socket_port,
                "--pod-socket-port ({}) must differ from --pod-listen's port: the agent's socket there would take the in-pod port from every pod",
                self.pod_socket_port
            );
        }
        // --pod-listen needs no such check: it is bound (or steered) in every namespace but
        // the agent's own (`http/pods/manager.rs` `candidates`), never beside these two.
        if let Some(agent_check) = self.agent_check_listen {
            anyhow::ensure!(
                !overlapping(agent_check, self.listen),
                "--agent-check-listen ({agent_check}) and --listen ({}) would take the same connections (one port, and one address or a wildcard that covers the other): both are bound with SO_REUSEPORT, so they would share the port and the kernel would split its connections between the HTTP API and the agent-check protocol; give them different ports",
                self.listen
            );
        }
        Ok(())
    }

    /// The HTTP server's limits this agent was given.
    pub fn server_limits(&self) -> ServerLimits {
        ServerLimits {
            max_connections: self.http_max_connections,
            header_timeout: self.http_header_timeout,
            write_timeout: self.http_write_timeout,
            max_waiters_per_source: self.max_waiters_per_source,
            shutdown_timeout: self.http_shutdown_timeout,
        }
    }
}

/// A limit of the HTTP servers (`--http-max-connections`, `--pod-http-max-connections`,
/// `--max-waiters-per-source`): 0 serves nobody. Refused here, naming the flag: the servers'
/// own check comes only once they start (after the program load), and each pod listener's
/// named `--http-max-connections` in a WARN while the agent ran on with no pod served.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 would serve nobody)".to_owned()),
        Ok(count) => Ok(count),
        Err(problem) => Err(problem.to_string()),
    }
}

/// `--http-header-timeout`, `--http-write-timeout`: 0 would drop every connection.
fn longer_than_zero(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        duration if duration.is_zero() => {
            Err("must be longer than 0 (0 would drop every connection)".to_owned())
        }
        duration => Ok(duration),
    }
}

/// Whether listeners on `a` and `b` would take the same connections: the same port (not 0,
/// which the kernel picks anew for each), and the same address, or one of them the wildcard
/// that takes the other's (`0.0.0.0` every IPv4 address; `[::]` every address, as the agent
/// binds it dual-stack, `http/handover.rs`).
fn overlapping(a: SocketAddr, b: SocketAddr) -> bool {
    use std::net::IpAddr;
    let takes = |wildcard: IpAddr, other: IpAddr| match wildcard {
        IpAddr::V4(v4) => v4.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(v6) => v6.is_unspecified(),
    };
    let (a_ip, b_ip) = (
        crate::addr::canonical_addr(a.ip()),
        crate::addr::canonical_addr(b.ip()),
    );
    a.port() != 0
        && a.port() == b.port()
        && (a_ip == b_ip || takes(a_ip, b_ip) || takes(b_ip, a_ip))
}

/// `wait --ignore`: checked as the agent checks its `ignore=` (the same parser and limit),
/// and sent as given.
fn ignore_list(text: &str) -> Result<String, String> {
    crate::drain_rule::parse_cidrs(text).map(|_| text.to_owned())
}

/// `wait --addr`: refused as the agent refuses its `addr=` (one no connection can have),
/// and sent as given.
fn wait_addr(text: &str) -> Result<std::net::IpAddr, String> {
    let addr = text
        .parse::<std::net::IpAddr>()
        .map_err(|_| format!("{text:?} is not an IP address"))?;
    crate::addr::connection_addr(addr)
        .map(|_| addr)
        .map_err(|why| crate::addr::no_connection_message("--addr", addr, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `wait --ignore` is checked with the agent's own rule (one definition, the same
    /// limit), so a list the agent would refuse is said before any request is sent.
    #[test]
    fn wait_ignore_is_checked_like_the_agent_does() {
        use crate::drain_rule::MAX_IGNORE;
        let list = |count: usize| vec!["10.0.0.1/32"; count].join(",");
        let wait = |ignore: &str| {
            Cli::try_parse_from(["drain-agent", "wait", "--port", "8080", "--ignore", ignore])
        };
        assert!(wait(&list(MAX_IGNORE)).is_ok());
        for bad in [list(MAX_IGNORE + 1), "10.0.0.0/99".to_owned()] {
            assert!(wait(&bad).is_err(), "{bad}");
        }
        // Address bits beyond the prefix (`$HOST_IP/32` on an IPv6 node) are refused,
        // naming the flag; a bare address (its own /32 or /128) is taken.
        for bad in ["2600:1f14:ab:cd00::5/32", "10.1.2.3/8"] {
            let problem = wait(bad).expect_err(bad).to_string();
            assert!(
                problem.contains("--ignore") && problem.contains("beyond its prefix"),
                "{bad}: {problem}"
            );
        }
        for good in ["2600:1f14:ab:cd00::5", "10.1.2.3", "::ffff:10.1.0.0/112"] {
            assert!(wait(good).is_ok(), "{good}");
        }
        // The help states the limit (a doc comment cannot name the constant).
        let mut command = <Cli as clap::CommandFactory>::command();
        let help = command
            .find_subcommand_mut("wait")
            .and_then(|wait| wait.get_arguments().find(|arg| arg.get_id() == "ignore"))
            .and_then(|arg| arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(
            help.contains(&format!("At most {MAX_IGNORE} sources")),
            "{help}"
        );
    }

    /// `wait --addr` is checked with the agent's own rule: an address no connection can
    /// have (which the agent refuses) is said before any request is sent.
    #[test]
    fn wait_addr_is_checked_like_the_agent_does() {
        let wait = |addr: &str| {
            Cli::try_parse_from(["drain-agent", "wait", "--port", "8080", "--addr", addr])
        };
        for good in ["10.1.0.7", "fd00::7", "::ffff:10.1.0.7"] {
            assert!(wait(good).is_ok(), "{good}");
        }
        for bad in [
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "ff02::1",
            "nope",
        ] {
            let problem = wait(bad).expect_err(bad).to_string();
            assert!(problem.contains("--addr"), "{bad}: {problem}");
        }
        let problem = wait("0.0.0.0").expect_err("unspecified").to_string();
        assert!(
            problem.contains("not an address a connection can have"),
            "{problem}"
        );
    }

    /// The agent's `--auth-token-file` help names the variable `wait` takes its token file
    /// from: clap's own env of `wait --token-file`, so the two cannot drift apart.
    #[test]
    fn auth_token_help_names_the_variable_wait_reads() {
        let mut command = <Cli as clap::CommandFactory>::command();
        let env = command
            .find_subcommand_mut("wait")
            .and_then(|wait| {
                wait.get_arguments()
                    .find(|arg| arg.get_id() == "token_file")
            })
            .and_then(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .expect("wait --token-file has a variable");
        let help = command
            .get_arguments()
            .find(|arg| arg.get_id() == "auth_token_file")
            .and_then(|arg| arg.get_long_help().or(arg.get_help()))
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(help.contains(&format!("${env}")), "{help}");
    }

    #[test]
    fn bare_command_runs_with_defaults() {
        let cli = Cli::try_parse_from(["drain-agent"]).expect("parse");
        assert!(cli.command.is_none());
        assert_eq!(cli.run.listen, "127.0.0.1:9100".parse().expect("addr"));
        assert_eq!(cli.run.default_timeout, Duration::from_secs(30));
        assert_eq!(
            cli.run.server_limits(),
            crate::http::server::ServerLimits::default()
        );
    }

    #[test]
    fn run_and_wait_parse() {
        let cli =
            Cli::try_parse_from(["drain-agent", "run", "--listen", "0.0.0.0:9110"]).expect("parse");
        assert!(matches!(cli.command, Some(Command::Run(args)) if args.listen.port() == 9110));
        let cli = Cli::try_parse_from(["drain-agent", "wait", "--port", "8080", "--timeout", "2m"])
            .expect("parse");
        assert!(
            matches!(cli.command, Some(Command::Wait(args)) if args.port == 8080 && args.timeout == Duration::from_secs(120))
        );
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            vec!["drain-agent", "--listen", "nowhere"],
            vec!["drain-agent", "--default-timeout", "soon"],
            vec!["drain-agent", "--ports", "0"],
            vec!["drain-agent", "wait", "--port", "0"],
            vec!["drain-agent", "wait", "--port", "70000"],
            vec!["drain-agent", "wait"],
            vec!["drain-agent", "--pod-socket-port", "0"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
    }

    /// `--pod-http-max-connections 0` passed the start, and then every pod listener failed
    /// (a WARN naming `--http-max-connections`) and the pods' hooks were refused. Each
    /// limit of the HTTP servers that 0 breaks is refused by the parser, naming its flag.
    #[test]
    fn server_limits_of_zero_are_refused_naming_their_flag() {
        for (flag, zero) in [
            ("--pod-http-max-connections", "0"),
            ("--http-max-connections", "0"),
            ("--max-waiters-per-source", "0"),
            ("--http-header-timeout", "0s"),
            ("--http-write-timeout", "0ms"),
        ] {
            let problem = Cli::try_parse_from(["drain-agent", flag, zero])
                .expect_err(flag)
                .to_string();
            assert!(problem.contains(flag), "{flag} {zero}: {problem}");
        }
        let cli = Cli::try_parse_from([
            "drain-agent",
            "--pod-listen",
            "0.0.0.0:9100",
            "--pod-http-max-connections",
            "1",
            "--http-max-connections",
            "1",
            "--max-waiters-per-source",
            "1",
            "--http-header-timeout",
            "1ms",
            "--http-write-timeout",
            "1ms",
        ])
        .expect("the least of each is taken");
        assert_eq!(cli.run.pod_http_max_connections, 1);
        assert!(cli.run.check().is_ok());
    }

    /// `--log-level warning` was taken, and env_logger read the word as a module name: every
    /// log line was silenced, the fatal start-up error too. A word that is no level is
    /// refused, naming the flag and the levels; any case of a level is taken.
    #[test]
    fn the_log_level_is_a_level() {
        let parse = |level: &str| Cli::try_parse_from(["drain-agent", "--log-level", level]);
        for bad in ["warning", "drain_agent=debug", "verbose", ""] {
            let problem = parse(bad).expect_err(bad).to_string();
            assert!(
                problem.contains("--log-level")
                    && ["error", "warn", "info", "debug", "trace", "off"]
                        .iter()
                        .all(|level| problem.contains(level)),
                "{bad}: {problem}"
            );
        }
        for (given, level) in [
            ("warn", LogLevel::Warn),
            ("WARN", LogLevel::Warn),
            ("Debug", LogLevel::Debug),
            ("off", LogLevel::Off),
        ] {
            assert_eq!(parse(given).expect(given).run.log_level, level, "{given}");
        }
        assert_eq!(
            Cli::try_parse_from(["drain-agent"])
                .expect("parse")
                .run
                .log_level,
            LogLevel::Info
        );
    }

    /// `--agent-check-listen` on --listen's address, or on a wildcard of the same port, was
    /// taken: both sockets are SO_REUSEPORT, so they shared the port and the kernel split its
    /// connections between the HTTP API and the agent-check server. Refused at start, naming
    /// both flags; another port, or another address on the same port, is fine.
    #[test]
    fn the_agent_check_listener_is_not_the_api_listener() {
        let check = |listen: &str, agent_check: &str| {
            Cli::try_parse_from([
                "drain-agent",
                "--listen",
                listen,
                "--agent-check-listen",
                agent_check,
            ])
            .expect("parse")
            .run
            .check()
        };
        for (listen, agent_check) in [
            ("127.0.0.1:9100", "127.0.0.1:9100"),
            ("0.0.0.0:9100", "127.0.0.1:9100"),
            ("127.0.0.1:9100", "0.0.0.0:9100"),
            ("10.0.0.5:19700", "0.0.0.0:19700"),
            ("[::1]:9100", "[::1]:9100"),
            ("[::]:9100", "[::1]:9100"),
            ("[fd00::5]:9100", "[::]:9100"),
            // `[::]` is bound dual-stack: it takes IPv4 too.
            ("[::]:9100", "127.0.0.1:9100"),
            ("0.0.0.0:9100", "[::]:9100"),
            ("[::ffff:127.0.0.1]:9100", "127.0.0.1:9100"),
        ] {
            let problem = format!(
                "{:#}",
                check(listen, agent_check).expect_err(&format!("{listen} {agent_check}"))
            );
            assert!(
                problem.contains("--agent-check-listen") && problem.contains("--listen"),
                "{listen} {agent_check}: {problem}"
            );
        }
        for (listen, agent_check) in [
            ("127.0.0.1:9100", "127.0.0.1:9101"),
            ("127.0.0.1:9100", "127.0.0.2:9100"),
            ("0.0.0.0:9100", "[::1]:9100"),
            ("[::1]:9100", "0.0.0.0:9100"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            assert!(check(listen, agent_check).is_ok(), "{listen} {agent_check}");
        }
    }

    /// The agent's socket in each pod at the in-pod port itself would take that port from
    /// every pod: refused at start, naming both flags.
    #[test]
    fn the_pod_socket_port_is_not_the_pod_port() {
        let cli =
            Cli::try_parse_from(["drain-agent", "--pod-listen", "0.0.0.0:9100"]).expect("parse");
        assert_eq!(cli.run.pod_socket_port, 29100);
        assert!(cli.run.check().is_ok());
        let cli = Cli::try_parse_from([
            "drain-agent",
            "--pod-listen",
            "0.0.0.0:9100",
            "--pod-socket-port",
            "9100",
        ])
        .expect("parse");
        let problem = format!("{:#}", cli.run.check().expect_err("refused"));
        assert!(
            problem.contains("--pod-socket-port (9100)") && problem.contains("--pod-listen"),
            "{problem}"
        );
    }

    /// Audit (the operator's view): these flags only mean something beside another, and were
    /// accepted and ignored without it (`wait --pace 100` closed nothing, at no pace).
    #[test]
    fn a_flag_without_the_one_it_belongs_to_is_refused() {
        for (argv, needs) in [
            (
                vec!["drain-agent", "wait", "--port", "8080", "--pace", "100"],
                "--close-at-timeout",
            ),
            (
                vec!["drain-agent", "--pod-http-max-connections", "8"],
                "--pod-listen",
            ),
            (
                vec!["drain-agent", "--pod-max-listeners", "8"],
                "--pod-listen",
            ),
            (
                vec!["drain-agent", "--pod-socket-port", "29200"],
                "--pod-listen",
            ),
            (
                vec!["drain-agent", "--journal-max-bytes", "4096"],
                "--journal",
            ),
        ] {
            let problem = Cli::try_parse_from(&argv)
                .map(|_| ())
                .expect_err("refused without the flag it belongs to")
                .to_string();
            assert!(problem.contains(needs), "{argv:?}: {problem}");
        }
        // With it, and the defaults without either, parse.
        for argv in [
            vec![
                "drain-agent",
                "wait",
                "--port",
                "8080",
                "--close-at-timeout",
                "--pace",
                "100",
            ],
            vec![
                "drain-agent",
                "--pod-listen",
                "0.0.0.0:9100",
                "--pod-max-listeners",
                "8",
            ],
            vec![
                "drain-agent",
                "--journal",
                "/tmp/j",
                "--journal-max-bytes",
                "4096",
            ],
            vec!["drain-agent"],
        ] {
            assert!(Cli::try_parse_from(&argv).is_ok(), "{argv:?}");
        }
    }
}
