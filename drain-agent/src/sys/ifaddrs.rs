//! The IP addresses of the network namespace the calling thread is in: the node's own
//! addresses (who may call a pod listener bound beyond loopback) and a pod's (whether an
//! `addr=` asked on its listener is its own).
//!
//! Read as `getifaddrs(3)` reads them, without its C list: an `RTM_GETADDR` dump over
//! `NETLINK_ROUTE` (include/uapi/linux/rtnetlink.h, if_addr.h), through the same safe
//! netlink socket as the socket tables ([`crate::sys::netlink`]).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    addr::canonical_addr,
    sys::netlink::{
        Dump, Protocol, Socket,
        wire::{Attributes, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_HDRLEN, Request, align4},
    },
};

/// include/uapi/linux/rtnetlink.h
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
/// `sizeof(struct ifaddrmsg)`: family, prefix length, flags, scope (u8 each), index (u32).
const IFADDRMSG_LEN: usize = 8;
/// include/uapi/linux/if_addr.h
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// How often a dump the kernel marks inconsistent (addresses added or removed while it ran)
/// is asked again before giving up.
const ATTEMPTS: usize = 3;

/// Every address configured on an interface of the calling thread's network namespace,
/// IPv4-mapped IPv6 folded to IPv4 (as the tracker does).
pub fn local_addresses() -> Result<BTreeSet<IpAddr>> {
    for _ in 0..ATTEMPTS {
        if let Some(found) = dump_addresses()? {
            return Ok(found);
        }
    }
    bail!("the interface addresses changed during each of {ATTEMPTS} RTM_GETADDR dumps")
}

/// One `RTM_GETADDR` dump of every family (`None`: the kernel marked it inconsistent).
fn dump_addresses() -> Result<Option<BTreeSet<IpAddr>>> {
    let seq = 1;
    let mut request = Request::new(
        RTM_GETADDR,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NLMSG_HDRLEN + IFADDRMSG_LEN,
    );
    // ifa_family AF_UNSPEC: every family's addresses, as getifaddrs asks.
    request.push(&[0; IFADDRMSG_LEN]);
    let request = request.finish()?;
    // A new socket per attempt: an interrupted dump may have left answers queued.
    let socket = Socket::open(Protocol::Route)?;
    let mut found = BTreeSet::new();
    let dump = socket
        .dump(&request, seq, "RTM_GETADDR", |message| {
            if message.kind != RTM_NEWADDR {
                bail!("unexpected netlink message type {}", message.kind);
            }
            if let Some(address) = address_of(message.payload).context("malformed ifaddrmsg")? {
                found.insert(canonical_addr(address));
            }
            Ok(())
        })
        .context("cannot list the interface addresses (RTM_GETADDR)")?;
    Ok((dump == Dump::Complete).then_some(found))
}

/// The address of one `RTM_NEWADDR` message (`struct ifaddrmsg` and its attributes); `None`
/// for a family other than IPv4 and IPv6.
///
/// The interface's own address is `IFA_LOCAL` when present, else `IFA_ADDRESS`: on a
/// point-to-point link `IFA_ADDRESS` is the peer's (if_addr.h), which is why glibc's and
/// musl's getifaddrs put `IFA_LOCAL` in `ifa_addr` and the other in `ifa_dstaddr`.
fn address_of(payload: &[u8]) -> Result<Option<IpAddr>> {
    let Some(&family) = payload.first() else {
        bail!("empty RTM_NEWADDR message");
    };
    let attributes = payload.get(align4(IFADDRMSG_LEN)..).unwrap_or_default();
    let (mut local, mut address) = (None, None);
    for attribute in Attributes::new(attributes) {
        let (kind, value) = attribute?;
        match kind {
            IFA_LOCAL => local = Some(value),
            IFA_ADDRESS => address = Some(value),
            _ => {}
        }
    }
    let Some(raw) = local.or(address) else {
        return Ok(None);
    };
    let ip = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(raw).context("IPv4 address not 4 bytes")?,
        )),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(raw).context("IPv6 address not 16 bytes")?,
        )),
        _ => return Ok(None),
    };
    Ok(Some(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_a_local_address() {
        let addresses = local_addresses().expect("RTM_GETADDR");
        // Loopback may be down in a bare test namespace; when it is up, it is listed.
        if !addresses.is_empty() {
            assert!(
                addresses.iter().all(|a| !a.is_unspecified()),
                "{addresses:?}"
            );
        }
        assert!(addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)) || addresses.is_empty());
    }

    /// Every IPv6 address the kernel lists in /proc/net/if_inet6 (net/ipv6/addrconf.c,
    /// `if6_seq_show`: 32 hex digits first on each line) is found, and no other.
    #[test]
    fn the_ipv6_addresses_are_those_of_proc() {
        let Ok(table) = std::fs::read_to_string("/proc/net/if_inet6") else {
            return; // IPv6 disabled in this kernel: nothing to compare.
        };
        let from_proc: BTreeSet<IpAddr> = table
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .map(|hex| {
                let bits = u128::from_str_radix(hex, 16).expect("hex address");
                canonical_addr(IpAddr::V6(Ipv6Addr::from(bits)))
            })
            .collect();
        let ours: BTreeSet<IpAddr> = local_addresses()
            .expect("RTM_GETADDR")
            .into_iter()
            .filter(|address| address.is_ipv6())
            .collect();
        assert_eq!(ours, from_proc);
    }

    /// An RTM_NEWADDR payload: ifaddrmsg of `family`, then the attributes.
    fn message(family: i32, attributes: &[(u16, &[u8])]) -> Vec<u8> {
        let mut request = Request::new(RTM_NEWADDR, 0, 0, 64);
        request.push(&[family as u8, 24, 0, 0, 1, 0, 0, 0]);
        for (kind, value) in attributes {
            request.attribute(*kind, value).expect("attribute");
        }
        request.finish().expect("message")[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn the_local_end_of_a_point_to_point_link_is_ours() {
        let peer = [10, 0, 0, 2];
        let own = [10, 0, 0, 1];
        let ptp = message(libc::AF_INET, &[(IFA_ADDRESS, &peer), (IFA_LOCAL, &own)]);
        assert_eq!(
            address_of(&ptp).expect("parse"),
            Some(IpAddr::from(own)),
            "IFA_LOCAL, not the peer"
        );
        let plain = message(libc::AF_INET, &[(IFA_ADDRESS, &own)]);
        assert_eq!(address_of(&plain).expect("parse"), Some(IpAddr::from(own)));
        let v6 = Ipv6Addr::LOCALHOST.octets();
        let v6 = message(libc::AF_INET6, &[(IFA_ADDRESS, &v6)]);
        assert_eq!(
            address_of(&v6).expect("parse"),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        // Another family, an IPv4 address of the wrong size, no address at all.
        assert_eq!(
            address_of(&message(libc::AF_PACKET, &[(IFA_ADDRESS, &[1; 6])])).expect("parse"),
            None
        );
        assert!(address_of(&message(libc::AF_INET, &[(IFA_LOCAL, &[1; 16])])).is_err());
        assert_eq!(
            address_of(&message(libc::AF_INET, &[])).expect("parse"),
            None
        );
    }
}
