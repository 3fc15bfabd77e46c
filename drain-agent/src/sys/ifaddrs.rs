//! The IP addresses of the network namespace the calling thread is in (`getifaddrs`): the
//! node's own addresses (who may call a pod listener bound beyond loopback) and a pod's
//! (whether an `addr=` asked on its listener is its own).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};

use crate::addr::canonical_addr;

/// Every address configured on an interface of the calling thread's network namespace,
/// IPv4-mapped IPv6 folded to IPv4 (as the tracker does).
pub fn local_addresses() -> Result<BTreeSet<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; the list is freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs failed");
    }
    let mut found = BTreeSet::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not freed yet.
        let entry = unsafe { &*cursor };
        if let Some(addr) = address_of(entry.ifa_addr) {
            found.insert(canonical_addr(addr));
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// The IP address in a `sockaddr` of getifaddrs' list (`None`: no address, or a link-layer
/// one).
fn address_of(sockaddr: *const libc::sockaddr) -> Option<IpAddr> {
    if sockaddr.is_null() {
        return None;
    }
    // SAFETY: getifaddrs' addresses are valid sockaddrs; the family says which kind.
    let family = i32::from(unsafe { (*sockaddr).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: an AF_INET address is a sockaddr_in (read unaligned to be safe).
            let sin = unsafe { std::ptr::read_unaligned(sockaddr.cast::<libc::sockaddr_in>()) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address is a sockaddr_in6 (read unaligned to be safe).
            let sin6 = unsafe { std::ptr::read_unaligned(sockaddr.cast::<libc::sockaddr_in6>()) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_a_local_address() {
        let addresses = local_addresses().expect("getifaddrs");
        // Loopback may be down in a bare test namespace; when it is up, it is listed.
        if !addresses.is_empty() {
            assert!(
                addresses.iter().all(|a| !a.is_unspecified()),
                "{addresses:?}"
            );
        }
        assert!(addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)) || addresses.is_empty());
    }
}
