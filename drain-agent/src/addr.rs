//! One spelling per address: what the kernel side keys by and what requests compare against.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use drain_agent_common::{AF_INET, ConnKey};

/// Folds `::ffff:a.b.c.d` to `a.b.c.d`, as the kernel side does for keys.
pub fn canonical_addr(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// The address of a kernel-side key, as an `IpAddr`.
pub fn key_addr(key: &ConnKey) -> IpAddr {
    if key.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(key.addr))
    }
}

/// Why an address is no connection's local address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoConnection {
    /// `0.0.0.0` or `::`: a listener's "every address", never a connection's.
    Unspecified,
    /// `224.0.0.0/4` or `ff00::/8`: TCP has no multicast.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
}

impl std::fmt::Display for NoConnection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Self::Unspecified => "it is the unspecified address",
            Self::Multicast => "it is a multicast address",
            Self::Broadcast => "it is the broadcast address",
        })
    }
}

/// `addr` folded ([`canonical_addr`]), if a TCP connection can have it as its local
/// address. A scope at one that cannot counts no connection, ever: "drained" at once
/// while clients are connected, and nothing to close.
pub fn connection_addr(addr: IpAddr) -> Result<IpAddr, NoConnection> {
    let addr = canonical_addr(addr);
    let problem = match addr {
        IpAddr::V4(v4) if v4.is_broadcast() => Some(NoConnection::Broadcast),
        IpAddr::V4(v4) if v4.is_multicast() => Some(NoConnection::Multicast),
        IpAddr::V6(v6) if v6.is_multicast() => Some(NoConnection::Multicast),
        _ if addr.is_unspecified() => Some(NoConnection::Unspecified),
        _ => None,
    };
    problem.map_or(Ok(addr), Err)
}

/// Why `addr` (given as `name`: `addr`, `--addr`) is refused, as its caller is told.
pub fn no_connection_message(name: &str, addr: IpAddr, why: NoConnection) -> String {
    let addr = canonical_addr(addr);
    format!(
        "{addr} is not an address a connection can have ({why}; leave {name} out for every address)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_no_connection_has_are_told_apart() {
        let cases = [
            ("0.0.0.0", Err(NoConnection::Unspecified)),
            ("::", Err(NoConnection::Unspecified)),
            ("::ffff:0.0.0.0", Err(NoConnection::Unspecified)),
            ("224.0.0.1", Err(NoConnection::Multicast)),
            ("::ffff:239.1.2.3", Err(NoConnection::Multicast)),
            ("ff02::1", Err(NoConnection::Multicast)),
            ("255.255.255.255", Err(NoConnection::Broadcast)),
            ("10.1.2.3", Ok("10.1.2.3")),
            ("::ffff:10.1.2.3", Ok("10.1.2.3")),
            ("127.0.0.1", Ok("127.0.0.1")),
            ("10.1.255.255", Ok("10.1.255.255")),
            ("fd00::3", Ok("fd00::3")),
            ("::1", Ok("::1")),
        ];
        for (text, expected) in cases {
            let addr: IpAddr = text.parse().expect("ip");
            let expected = expected.map(|text| text.parse::<IpAddr>().expect("ip"));
            assert_eq!(connection_addr(addr), expected, "{text}");
        }
    }

    #[test]
    fn mapped_addresses_fold_to_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(
            canonical_addr(mapped),
            "10.1.2.3".parse::<IpAddr>().expect("ip")
        );
        let v6: IpAddr = "fd00::3".parse().expect("ip");
        assert_eq!(canonical_addr(v6), v6);
    }
}
