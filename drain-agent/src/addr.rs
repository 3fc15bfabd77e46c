//! One spelling per address: what the kernel side keys by and what requests compare against.

use std::net::IpAddr;

/// Folds `::ffff:a.b.c.d` to `a.b.c.d`, as the kernel side does for keys.
pub fn canonical_addr(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
