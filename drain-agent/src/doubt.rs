//! Why the agent cannot vouch for a count: the fail-closed rule's vocabulary.
//!
//! A count read from the kernel maps is exact while every state change reached the
//! handler and every connection found room in the maps. When that may not hold for a
//! question's scope, the count is *doubted*: the agent does not answer "drained" from it.
//! It checks the kernel's socket tables instead (sock_diag, see `Counts::confirm` in `kernel/source.rs`), and if
//! even that is impossible it answers 503 with the doubt as the reason. Never a false
//! "drained".

use std::fmt;

/// One reason a count may be wrong.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Doubt {
    /// The kernel skipped runs of the handler (another BPF program was running on that CPU)
    /// since the last walk began: a connection may have opened unseen. Routine under load;
    /// repaired by the next walk.
    HandlerSkipped,
    /// The handler could not read a socket's fields.
    ReadFailed,
    /// A walk could not record every listener: a pre-existing inbound connection may have
    /// been taken for an outbound one.
    ListenerMapFull,
    /// A close found no counters for its endpoint (should never happen).
    CountMissing,
    /// Connections open before the agent started were not counted (`--no-seed`) and no
    /// walk has run since.
    NotSeeded,
    /// The counts were adopted from the pinned state of an agent that is gone, and this
    /// agent has not walked the sockets yet: what happened while no agent watched (skipped
    /// runs, lost connections) is not known until that walk.
    AdoptedUnwalked,
    /// The agent serves while its first walk (the seeding) runs: connections open before
    /// it started are not all counted yet. Routine for a few seconds after every start;
    /// answers are confirmed with the socket tables meanwhile.
    Seeding,
    /// This kernel cannot walk the open sockets (no `iter/tcp`): pre-existing connections
    /// and skipped runs cannot be found.
    NoWalker,
    /// The handler is the classic tracepoint on a kernel older than 6.7: the kernel skips
    /// it whenever another kprobe or tracepoint BPF program runs on that CPU (and while any
    /// `bpf()` map lookup or update, the agent's own reads included, runs there) without
    /// counting the skip (`trace_call_bpf()` counts `recursion_misses` from Linux 6.7,
    /// commit dd8657894c11): a missed open or close leaves no trace. Permanent on this node.
    SkipsUnseen,
    /// A walk has run on a kernel older than 5.15, whose `iter/tcp` shows each socket
    /// under the hash bucket's spinlock only, not the socket's lock (`lock_sock_fast()`
    /// came with commit 04c7820b776f): a walk can race a close and count a socket twice
    /// or un-count an endpoint twice. Permanent on this node once a walk has run.
    WalkUnlocked,
    /// Connections on this port could not be tracked since the last walk began: the
    /// per-socket map was full (`--max-connections`), or an open found its socket's
    /// address still held by a dead socket whose close the kernel skipped.
    ConnectionsLost { port: u16 },
    /// Some connections on this port are counted for the port only, not for their
    /// address and namespace (the endpoint map was full, `--max-endpoints`, or an endpoint
    /// was being reclaimed): answers scoped by `addr` or `netns` cannot use the counts.
    Unscoped { port: u16 },
    /// A network namespace could not be walked: its pre-existing connections are unknown.
    NamespaceUnwalked { netns: u32 },
    /// Open connections on `port` that the last walk found untracked with no listener on the
    /// port: inbound ones of a service that closed its listener before the agent (re)started
    /// look just like outbound ones.
    PassivityUnknown { port: u16 },
    /// The per-socket map overflowed since the last walk began (health; the ports
    /// concerned show [`Doubt::ConnectionsLost`]).
    SocketMapFull,
    /// The endpoint map overflowed since the last walk began (health; the ports concerned
    /// show [`Doubt::Unscoped`]).
    EndpointMapFull,
    /// The agent's own listener is bound on `port` in network namespace `netns`, and
    /// another program has sockets on that port there too (a listener on another address
    /// or family, or connections the agent's listener cannot have accepted): connections
    /// to the port are left uncounted as the agent's by namespace and port, so theirs may be.
    OwnPortShared { port: u16, netns: u32 },
}

impl Doubt {
    /// Whether the doubt means something is wrong with the agent or its limits (shown by
    /// `/healthz` as degraded), not a routine condition the next walk clears nor a limit of
    /// the kernel ([`Doubt::kernel_limit`]).
    pub const fn degrades_health(&self) -> bool {
        !self.kernel_limit()
            && !matches!(
                self,
                Self::HandlerSkipped
                    | Self::Seeding
                    | Self::Unscoped { .. }
                    | Self::OwnPortShared { .. }
                    | Self::PassivityUnknown { .. }
                    | Self::AdoptedUnwalked
            )
    }

    /// Whether the doubt is a limit of the kernel the agent runs on (`NoWalker`,
    /// `SkipsUnseen`, `WalkUnlocked`): it holds for good, every answer is confirmed with the
    /// socket tables for it, and nothing an operator sets clears it short of another kernel
    /// (or attach method). Shown apart from `degraded` (`/healthz` `kernel_limits`,
    /// `drain_agent_kernel_limited`): as a fault it kept `DrainAgentDegraded` firing on
    /// every such node, where a real fault could not be told from it.
    pub const fn kernel_limit(&self) -> bool {
        matches!(
            self,
            Self::NoWalker | Self::SkipsUnseen | Self::WalkUnlocked
        )
    }
}

impl Doubt {
    /// Whether a walk of the sockets may clear the doubt: not a property of the kernel
    /// (`NoWalker`, `SkipsUnseen`, `WalkUnlocked` hold for good), for which walking again
    /// only costs a pass over every socket.
    pub const fn walk_may_clear(&self) -> bool {
        !self.kernel_limit()
    }
}

impl fmt::Display for Doubt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HandlerSkipped => {
                f.write_str("the kernel skipped handler runs since the last walk of the sockets")
            }
            Self::ReadFailed => f.write_str("the handler could not read a socket"),
            Self::ListenerMapFull => {
                f.write_str("the listener map was full during a walk (--max-endpoints)")
            }
            Self::CountMissing => f.write_str("a close found no counters for its endpoint"),
            Self::NotSeeded => f.write_str(
                "connections open before start were not counted (--no-seed) and no walk has run yet",
            ),
            Self::AdoptedUnwalked => f.write_str(
                "the counts were adopted from the previous agent's pinned state and are not checked by a walk of the sockets yet",
            ),
            Self::Seeding => f.write_str(
                "the agent is counting the connections open before it started (seeding): confirmed with the socket tables until it has",
            ),
            Self::NoWalker => f.write_str(
                "this kernel cannot walk the open sockets (iter/tcp): pre-existing connections are unknown",
            ),
            Self::SkipsUnseen => f.write_str(
                "the classic tracepoint before Linux 6.7 skips the handler without counting it (--attach tp-btf or raw-tracepoint avoids it): every answer is confirmed with the socket tables",
            ),
            Self::WalkUnlocked => f.write_str(
                "before Linux 5.15 a walk of the sockets does not hold each socket's lock and can race a close: every answer is confirmed with the socket tables",
            ),
            Self::ConnectionsLost { port } => write!(
                f,
                "connections on port {port} could not be tracked: the socket map is full (--max-connections), or a skipped close left a dead socket's entry at a new socket's address"
            ),
            Self::Unscoped { port } => write!(
                f,
                "some connections on port {port} are counted for the port only (endpoint map full, --max-endpoints, or an endpoint being reclaimed)"
            ),
            Self::NamespaceUnwalked { netns } => {
                write!(f, "network namespace {netns} could not be walked")
            }
            Self::PassivityUnknown { port } => write!(
                f,
                "connections on port {port} were open with no listener when the agent walked the sockets (a service that closed its listener, or outbound ones): confirmed with the socket tables"
            ),
            Self::SocketMapFull => f.write_str(
                "the socket map is full (--max-connections): some connections are not tracked",
            ),
            Self::EndpointMapFull => f.write_str(
                "the endpoint map is full (--max-endpoints): some connections are counted for their port only",
            ),
            Self::OwnPortShared { port, netns } => write!(
                f,
                "the agent's own listener on port {port} in network namespace {netns} shares the port with another program's sockets, whose connections may be taken for the agent's: confirmed with the socket tables"
            ),
        }
    }
}

/// Joins doubts into one line for an answer or a log.
pub fn describe(doubts: &[Doubt]) -> String {
    doubts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routine_doubts_do_not_degrade_health() {
        assert!(!Doubt::HandlerSkipped.degrades_health());
        assert!(!Doubt::Unscoped { port: 1 }.degrades_health());
        assert!(!Doubt::AdoptedUnwalked.degrades_health());
        assert!(!Doubt::OwnPortShared { port: 1, netns: 7 }.degrades_health());
        assert!(!Doubt::Seeding.degrades_health());
        assert!(Doubt::NotSeeded.degrades_health());
        assert!(Doubt::ConnectionsLost { port: 1 }.degrades_health());
        assert!(Doubt::NamespaceUnwalked { netns: 7 }.degrades_health());
        // The kernel's own limits hold for good: shown apart, not as degraded.
        for doubt in [Doubt::NoWalker, Doubt::SkipsUnseen, Doubt::WalkUnlocked] {
            assert!(
                doubt.kernel_limit() && !doubt.degrades_health(),
                "{doubt:?}"
            );
        }
        assert!(!Doubt::SocketMapFull.kernel_limit());
    }

    #[test]
    fn no_walk_clears_a_limit_of_the_kernel() {
        for doubt in [Doubt::NoWalker, Doubt::SkipsUnseen, Doubt::WalkUnlocked] {
            assert!(!doubt.walk_may_clear(), "{doubt:?}");
        }
        assert!(Doubt::NamespaceUnwalked { netns: 7 }.walk_may_clear());
        assert!(Doubt::SocketMapFull.walk_may_clear());
    }

    #[test]
    fn descriptions_name_the_cause() {
        let text = describe(&[Doubt::ConnectionsLost { port: 8080 }, Doubt::NotSeeded]);
        assert!(
            text.contains("port 8080") && text.contains("--max-connections"),
            "{text}"
        );
        assert!(text.contains("--no-seed"), "{text}");
    }
}
