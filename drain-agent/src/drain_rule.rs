//! The drain rule: when a scope counts as drained in real traffic, as a pure function of
//! time and of what is still connected (so it is tested on a fake clock).
//!
//! * **Arrivals stopped** (`quiet`): no new connection to the scope for `quiet`, counted
//!   from the *later* of the request's arrival and the last arrival. Every drain takes at
//!   least `quiet` (the time load balancers and kube-proxies need to stop sending) and ends
//!   `quiet` after the last arrival.
//! * **Probe traffic is not traffic** (`ignore`): connections from these sources neither
//!   count as arrivals nor hold the drain.
//! * **Idle connections need not hold a drain** (`idle`, opt-in): a remaining connection is
//!   idle when nothing is in flight (no byte in its receive queue, none unsent or
//!   unacknowledged) and no data has moved either way for `idle`; otherwise busy. Without
//!   the option every remaining connection holds the drain (an idle WebSocket is still a
//!   live session).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::addr::canonical_addr;

/// An IPv4 or IPv6 network, `10.0.0.0/8`, `fd00::/8` or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// What a network may have set beyond its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostBits {
    /// Refused: a request, the command line. `10.1.2.3/8` is not a network but a mistake
    /// (an address with a prefix it does not fill), and reading it as its network hid one:
    /// the docs' `$HOST_IP/32` on an IPv6 node ignored a /32 of IPv6, every client.
    Refused,
    /// Cleared: a drain an agent saved before they were refused, which matched the network.
    Cleared,
}

impl Cidr {
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, canonical_addr(addr)) {
            (IpAddr::V4(_), addr @ IpAddr::V4(_)) | (IpAddr::V6(_), addr @ IpAddr::V6(_)) => {
                masked(addr, self.prefix) == self.network
            }
            _ => false,
        }
    }

    /// A network a drain saved in `--state-dir` names: as a request's, except that bits set
    /// beyond the prefix (taken before they were refused) are cleared, as they matched.
    pub fn from_saved(text: &str) -> Result<Self, String> {
        Self::parse(text, HostBits::Cleared)
    }

    fn parse(text: &str, host_bits: HostBits) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let given = addr
            .parse::<IpAddr>()
            .map_err(|_| format!("{text:?} is not an address or network (e.g. 10.0.0.0/8)"))?;
        let max = if given.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0-{max}"))?,
        };
        // An IPv4-mapped network (`::ffff:a.b.c.d/N`, as `ss` shows the clients of a
        // dual-stack listener) is the IPv4 network of its last 32 bits, the way connections
        // are compared (folded to IPv4); its prefix counts the 96 bits of `::ffff:` too.
        let (network, prefix) = match canonical_addr(given) {
            IpAddr::V4(v4) if given.is_ipv6() => match prefix.checked_sub(96) {
                Some(prefix) => (IpAddr::V4(v4), prefix),
                None => {
                    return Err(format!(
                        "{text:?}: an IPv4-mapped network (::ffff:a.b.c.d) needs a prefix length of 96-128, the 96 bits of ::ffff: and then the IPv4 network's; a shorter one would take in addresses that are not IPv4-mapped (write the IPv4 network itself, e.g. 10.1.0.0/16 for ::ffff:10.1.0.0/112)"
                    ));
                }
            },
            network => (network, prefix),
        };
        let cleared = masked(network, prefix);
        if cleared != network && host_bits == HostBits::Refused {
            return Err(format!(
                "{text:?} has address bits set beyond its prefix: the network is {cleared}/{prefix}, and a single address is written without a prefix ({addr})"
            ));
        }
        Ok(Self {
            network: cleared,
            prefix,
        })
    }
}

/// `addr` with every bit beyond the first `prefix` cleared.
fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// A network as a request or the command line gives it: address bits set beyond the
    /// prefix are refused.
    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text, HostBits::Refused)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The most sources one `ignore` list may name. Each is kept in the drain's spec, copied
/// into every answer's rule and written to the state file in `--state-dir`; without a
/// limit one request (hyper takes a ~64 KB URI) carried ~6,000, and a few hundred such
/// drains filled the state file past what a restart reads back (16 MiB) and the agent's
/// memory limit. Probe sources are a handful (the node's addresses, a monitoring range).
pub const MAX_IGNORE: usize = 64;

/// Parses `CIDR[,CIDR…]`, at most [`MAX_IGNORE`] of them.
pub fn parse_cidrs(text: &str) -> Result<Vec<Cidr>, String> {
    // Counted before any is parsed: a list over the limit costs no more than its split.
    let given = text.split(',').count();
    if given > MAX_IGNORE {
        return Err(format!(
            "at most {MAX_IGNORE} sources (CIDR[,CIDR…]) per request, {given} given"
        ));
    }
    text.split(',')
        .map(|part| part.trim().parse::<Cidr>())
        .collect()
}

/// What "drained" means for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainRule {
    pub quiet: Duration,
    pub ignore: Vec<Cidr>,
    pub idle: Option<Duration>,
}

impl DrainRule {
    /// Whether a connection from `remote` is probe traffic to leave out.
    pub fn ignores(&self, remote: IpAddr) -> bool {
        self.ignore.iter().any(|cidr| cidr.contains(remote))
    }

    /// Whether `other` ignores the same sources: the lists compared as sets (another order,
    /// or a source named twice, is the same list).
    pub fn ignores_the_same(&self, other: &Self) -> bool {
        let within = |some: &[Cidr], all: &[Cidr]| some.iter().all(|cidr| all.contains(cidr));
        within(&self.ignore, &other.ignore) && within(&other.ignore, &self.ignore)
    }

    /// Whether deciding needs the remaining connections one by one (their peers and queues)
    /// rather than their count.
    pub const fn needs_peers(&self) -> bool {
        !self.ignore.is_empty() || self.idle.is_some()
    }
}

/// One remaining connection, as the kernel's socket tables show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// How long it has been open, when known (connections opened before the agent started
    /// have no known start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// How long no data has moved either way.
    pub idle_ms: u64,
    /// Bytes received and not yet read by the application.
    pub recv_queue: u32,
    /// Bytes not yet sent or not yet acknowledged by the peer.
    pub send_queue: u32,
    /// Data arrived after the last data sent, or data arrived and nothing was ever sent: a
    /// request the application has read and not answered yet (it may be thinking, with
    /// both queues empty). Any data from the peer counts (a WebSocket pong, an HTTP/2
    /// WINDOW_UPDATE): busy until this end sends again. One case reads as not awaiting: a
    /// request that arrived in the same kernel tick (1 to 10 ms) as the previous response
    /// left (`TcpInfoSummary::awaiting_reply`).
    #[serde(default)]
    pub awaiting_reply: bool,
    /// Busy or idle by the request's `idle` (or a 0 s bar when it has none).
    pub busy: bool,
}

impl Peer {
    /// Nothing in flight either way: both queues empty, and no request read and not yet
    /// answered (for request/response protocols, a request being worked on moves no bytes).
    pub const fn nothing_in_flight(&self) -> bool {
        self.recv_queue == 0 && self.send_queue == 0 && !self.awaiting_reply
    }

    /// Idle for the bar `idle`: nothing in flight and silent for at least `idle`.
    pub fn is_idle(&self, idle: Duration) -> bool {
        self.nothing_in_flight() && Duration::from_millis(self.idle_ms) >= idle
    }
}

/// How often a connection with data in flight is looked at again: moving data sends no
/// event, so this is the one case the rule cannot wake for exactly.
pub const BUSY_RECHECK: Duration = Duration::from_millis(250);

/// The rule's answer at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Drained,
    /// Not yet. `recheck_in`: when time alone may change the answer (the quiet window
    /// ends, a connection turns idle); `None` when only a connection event can.
    Wait {
        recheck_in: Option<Duration>,
    },
}

/// What remains of a scope: only a count (strict rule, no ignored sources), or the
/// connections one by one.
#[derive(Clone, Debug)]
pub enum Remaining<'a> {
    Count(u64),
    Peers(&'a [Peer]),
}

/// The rule. `since_request`: time since the request arrived; `since_arrival`: time since
/// the last arrival (of a source not ignored) after the request, if any.
pub fn decide(
    rule: &DrainRule,
    since_request: Duration,
    since_arrival: Option<Duration>,
    remaining: &Remaining<'_>,
) -> Decision {
    let quiet_for = since_arrival.map_or(since_request, |since| since.min(since_request));
    let mut recheck: Option<Duration> = None;
    let mut soonest = |wait: Duration| {
        recheck = Some(recheck.map_or(wait, |now: Duration| now.min(wait)));
    };
    let mut drained = true;
    if quiet_for < rule.quiet {
        drained = false;
        soonest(rule.quiet - quiet_for);
    }
    match remaining {
        Remaining::Count(0) => {}
        Remaining::Count(_) => drained = false,
        Remaining::Peers(peers) => {
            for peer in peers.iter().filter(|peer| !rule.ignores(peer.remote.ip())) {
                match rule.idle {
                    None => drained = false,
                    Some(idle) => {
                        if peer.is_idle(idle) {
                            continue;
                        }
                        drained = false;
                        if peer.nothing_in_flight() {
                            // Silent but not for long enough: it turns idle at a known time.
                            soonest(idle.saturating_sub(Duration::from_millis(peer.idle_ms)));
                        } else {
                            soonest(BUSY_RECHECK);
                        }
                    }
                }
            }
        }
    }
    if drained {
        Decision::Drained
    } else {
        Decision::Wait {
            recheck_in: recheck,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(remote: &str, idle_ms: u64, recv_queue: u32, send_queue: u32) -> Peer {
        Peer {
            remote: remote.parse().expect("addr"),
            local: "10.0.0.1:8080".parse().expect("addr"),
            age_ms: None,
            idle_ms,
            recv_queue,
            send_queue,
            awaiting_reply: false,
            busy: false,
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_quiet_window_counts_from_the_request() {
        let rule = DrainRule {
            quiet: S(5),
            ..DrainRule::default()
        };
        // Idle for an hour before the request: still waits the window from the request.
        let none = Remaining::Count(0);
        assert_eq!(
            decide(&rule, S(0), None, &none),
            Decision::Wait {
                recheck_in: Some(S(5))
            }
        );
        assert_eq!(
            decide(&rule, S(3), None, &none),
            Decision::Wait {
                recheck_in: Some(S(2))
            }
        );
        assert_eq!(decide(&rule, S(5), None, &none), Decision::Drained);
    }

    #[test]
    fn a_late_arrival_restarts_the_quiet_window() {
        let rule = DrainRule {
            quiet: S(5),
            ..DrainRule::default()
        };
        let none = Remaining::Count(0);
        // An arrival 4 s after the request, gone again: the window ends 5 s after it.
        assert_eq!(
            decide(&rule, S(6), Some(S(2)), &none),
            Decision::Wait {
                recheck_in: Some(S(3))
            }
        );
        assert_eq!(decide(&rule, S(9), Some(S(5)), &none), Decision::Drained);
        // While it is open the count holds the drain, and only its close can end it.
        assert_eq!(
            decide(&rule, S(20), Some(S(15)), &Remaining::Count(1)),
            Decision::Wait { recheck_in: None }
        );
    }

    #[test]
    fn ignored_sources_neither_hold_the_drain() {
        let rule = DrainRule {
            ignore: parse_cidrs("10.1.0.0/16, fd00::7").expect("cidrs"),
            ..DrainRule::default()
        };
        let probes = [
            peer("10.1.2.3:5000", 0, 10, 0),
            peer("[fd00::7]:1", 0, 0, 0),
        ];
        assert_eq!(
            decide(&rule, S(0), None, &Remaining::Peers(&probes)),
            Decision::Drained
        );
        let mixed = [probes[0].clone(), peer("10.2.0.1:5000", 9_000, 0, 0)];
        assert_eq!(
            decide(&rule, S(0), None, &Remaining::Peers(&mixed)),
            Decision::Wait { recheck_in: None }
        );
        // An IPv4 client seen through an IPv6 listener is the IPv4 address.
        assert!(rule.ignores("::ffff:10.1.9.9".parse().expect("ip")));
    }

    #[test]
    fn idle_connections_do_not_hold_the_drain_but_busy_ones_do() {
        let rule = DrainRule {
            idle: Some(S(2)),
            ..DrainRule::default()
        };
        let idle = peer("10.2.0.1:1", 2_500, 0, 0);
        let silent_not_long = peer("10.2.0.2:1", 500, 0, 0);
        let unread = peer("10.2.0.3:1", 60_000, 100, 0);
        let unacked = peer("10.2.0.4:1", 60_000, 0, 4_000);
        assert_eq!(
            decide(
                &rule,
                S(0),
                None,
                &Remaining::Peers(std::slice::from_ref(&idle))
            ),
            Decision::Drained
        );
        // It turns idle 1.5 s from now: the rule says when to look again.
        assert_eq!(
            decide(
                &rule,
                S(0),
                None,
                &Remaining::Peers(&[idle.clone(), silent_not_long])
            ),
            Decision::Wait {
                recheck_in: Some(Duration::from_millis(1_500))
            }
        );
        let thinking = Peer {
            awaiting_reply: true,
            ..peer("10.2.0.5:1", 60_000, 0, 0)
        };
        for busy in [unread, unacked, thinking] {
            assert_eq!(
                decide(&rule, S(0), None, &Remaining::Peers(&[idle.clone(), busy])),
                Decision::Wait {
                    recheck_in: Some(BUSY_RECHECK)
                }
            );
        }
        // Without the option, an idle connection is still a connection.
        assert_eq!(
            decide(
                &DrainRule::default(),
                S(0),
                None,
                &Remaining::Peers(&[idle])
            ),
            Decision::Wait { recheck_in: None }
        );
    }

    #[test]
    fn an_ignore_list_longer_than_the_limit_is_refused() {
        let at_limit = vec!["10.0.0.1"; MAX_IGNORE].join(",");
        assert_eq!(
            parse_cidrs(&at_limit).map(|list| list.len()),
            Ok(MAX_IGNORE)
        );
        let over = vec!["10.0.0.1"; MAX_IGNORE + 1].join(",");
        let problem = parse_cidrs(&over).expect_err("one over the limit");
        assert!(
            problem.contains(&format!("at most {MAX_IGNORE}")),
            "{problem}"
        );
        // Counted before any is parsed: a long list of garbage names the limit too.
        let garbage = vec!["x"; MAX_IGNORE + 1].join(",");
        let problem = parse_cidrs(&garbage).expect_err("over");
        assert!(
            problem.contains(&format!("at most {MAX_IGNORE}")),
            "{problem}"
        );
    }

    #[test]
    fn cidrs_parse_and_match() {
        let net: Cidr = "192.168.4.0/22".parse().expect("cidr");
        assert!(net.contains("192.168.7.255".parse().expect("ip")));
        assert!(!net.contains("192.168.8.0".parse().expect("ip")));
        assert!(!net.contains("::1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        let one: Cidr = "fd00::1".parse().expect("cidr");
        assert!(one.contains("fd00::1".parse().expect("ip")));
        assert!(!one.contains("fd00::2".parse().expect("ip")));
        for bad in ["", "10.0.0.0/33", "fd00::/129", "nope", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(net.to_string(), "192.168.4.0/22");
        // Probe sources as `ss` shows them on a dual-stack listener: an IPv4-mapped network
        // is the IPv4 network of its last 32 bits (prefix - 96). It was folded to IPv4
        // before its prefix was read: /112 was refused ("must be 0-32"), and /24 was read
        // as the IPv4 /24.
        let mapped: Cidr = "::ffff:10.1.0.0/112".parse().expect("mapped cidr");
        assert!(mapped.contains("10.1.9.9".parse().expect("ip")));
        assert!(mapped.contains("::ffff:10.1.9.9".parse().expect("ip")));
        assert!(!mapped.contains("10.2.0.1".parse().expect("ip")));
        assert_eq!(mapped.to_string(), "10.1.0.0/16");
        let one: Cidr = "::ffff:10.1.2.3".parse().expect("mapped address");
        assert_eq!(one.to_string(), "10.1.2.3/32");
        let every: Cidr = "::ffff:0.0.0.0/96".parse().expect("every mapped address");
        assert!(every.contains("8.8.8.8".parse().expect("ip")));
        for short in [
            "::ffff:10.1.2.3/24",
            "::ffff:0.0.0.0/95",
            "::ffff:10.0.0.0/0",
        ] {
            let problem = short.parse::<Cidr>().expect_err(short);
            assert!(problem.contains("96-128"), "{short}: {problem}");
        }
        assert!("::ffff:10.0.0.0/129".parse::<Cidr>().is_err());
    }

    /// A network with address bits set beyond its prefix was read as the network: the docs'
    /// `--ignore "$HOST_IP/32"` on an IPv6 node (`2600:1f14:ab:cd00::5/32`) ignored every
    /// client in 2600:1f14::/32, and the wait answered drained with clients connected. It is
    /// refused, naming the network it would have been and the single address's spelling.
    #[test]
    fn address_bits_beyond_the_prefix_are_refused() {
        for (given, network) in [
            ("2600:1f14:ab:cd00::5/32", "2600:1f14::/32"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("192.168.4.1/22", "192.168.4.0/22"),
            ("::ffff:10.1.2.3/112", "10.1.0.0/16"),
            ("10.0.0.1/0", "0.0.0.0/0"),
        ] {
            let problem = given.parse::<Cidr>().expect_err(given);
            assert!(
                problem.contains("beyond its prefix") && problem.contains(network),
                "{given}: {problem}"
            );
            assert!(
                parse_cidrs(&format!("10.0.0.0/8,{given}")).is_err(),
                "{given}"
            );
        }
        // A single address is its own /32 or /128, and a network without host bits is
        // taken, IPv4-mapped ones too.
        let host: Cidr = "2600:1f14:ab:cd00::5".parse().expect("address");
        assert!(host.contains("2600:1f14:ab:cd00::5".parse().expect("ip")));
        assert!(!host.contains("2600:1f14:ab:cd00::6".parse().expect("ip")));
        for good in [
            "2600:1f14:ab:cd00::5/128",
            "10.1.2.3/32",
            "10.0.0.0/8",
            "fd00::/8",
            "::ffff:10.1.0.0/112",
            "::ffff:10.1.2.3/128",
            "::ffff:10.1.2.3",
            "0.0.0.0/0",
            "::/0",
        ] {
            assert!(good.parse::<Cidr>().is_ok(), "{good}");
        }
        // A drain an earlier agent saved with such a network resumes with the network it
        // matched.
        let saved = Cidr::from_saved("10.1.2.3/8").expect("saved");
        assert_eq!(saved.to_string(), "10.0.0.0/8");
        assert!(saved.contains("10.200.0.1".parse().expect("ip")));
        assert!(Cidr::from_saved("10.0.0.0/99").is_err());
    }
}
