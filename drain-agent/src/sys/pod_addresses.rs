//! Which network namespace on this node an address belongs to: how the agent tells a pod
//! on this node (a request from that pod's own address) from anyone else, and which
//! namespace an `addr=` names when a gate is asked about it (`http/authority.rs`, `drain/gate.rs`).
//!
//! The map is read from the namespaces themselves (`ifaddrs` on a thread inside each, the
//! namespaces `netns::all_namespaces` finds), never from what a caller says. Only addresses
//! that name one namespace are kept: loopback, link-local, unspecified and multicast
//! addresses (every namespace has or may have them), the agent's own namespace's addresses
//! (the node's), and any address found in two namespaces are left out, so they never name a
//! pod.
//!
//! Reading every namespace costs a thread and a `setns` each (about 0.1 ms), so the map is
//! read again only when asked and stale: on a miss at most once per [`MISS_REFRESH`] (a
//! caller from another node is a miss every time), and a hit older than [`HIT_REFRESH`] is
//! checked again (a pod's address can move to a new pod).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::{addr::canonical_addr, sys::netns};

/// A miss reads the namespaces again at most this often.
pub const MISS_REFRESH: Duration = Duration::from_secs(1);
/// A hit older than this is read again before it is believed.
pub const HIT_REFRESH: Duration = Duration::from_secs(5);

/// Reads the addresses of every namespace but the agent's own, by inode.
pub trait AddressSource: Send + Sync + 'static {
    fn read(&self) -> BTreeMap<u32, Vec<IpAddr>>;
}

/// The real source: `netns::all_namespaces` and `ifaddrs::local_addresses` inside each.
pub struct NamespaceAddresses {
    pub own_netns: u32,
}

impl AddressSource for NamespaceAddresses {
    fn read(&self) -> BTreeMap<u32, Vec<IpAddr>> {
        let mut found = BTreeMap::new();
        let own = crate::sys::ifaddrs::local_addresses().unwrap_or_default();
        found.insert(self.own_netns, own.into_iter().collect());
        for (inode, path) in netns::all_namespaces() {
            if inode == self.own_netns {
                continue;
            }
            match netns::run_in(inode, &path, crate::sys::ifaddrs::local_addresses) {
                Ok(addresses) => {
                    found.insert(inode, addresses.into_iter().collect());
                }
                // Gone meanwhile, or not enterable: its addresses name nobody.
                Err(problem) => log::debug!("addresses of netns {inode}: {problem:#}"),
            }
        }
        found
    }
}

#[derive(Default)]
struct Snapshot {
    owners: HashMap<IpAddr, u32>,
    read_at: Option<Instant>,
}

/// Address → the one pod namespace that has it.
pub struct PodAddresses {
    own_netns: u32,
    source: Arc<dyn AddressSource>,
    snapshot: Mutex<Snapshot>,
    /// One reader at a time; others use what is there.
    reading: tokio::sync::Mutex<()>,
}

/// Whether `addr` can name a pod at all.
fn may_name_a_pod(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_multicast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

/// The owners: addresses of exactly one namespace other than `own`, and not of `own`.
fn owners_of(own: u32, read: &BTreeMap<u32, Vec<IpAddr>>) -> HashMap<IpAddr, u32> {
    let mut seen: HashMap<IpAddr, Option<u32>> = HashMap::new();
    for (&inode, addresses) in read {
        for &addr in addresses {
            let addr = canonical_addr(addr);
            if !may_name_a_pod(addr) {
                continue;
            }
            seen.entry(addr)
                .and_modify(|owner| {
                    if *owner != Some(inode) {
                        *owner = None;
                    }
                })
                .or_insert(Some(inode));
        }
    }
    seen.into_iter()
        .filter_map(|(addr, owner)| {
            owner
                .filter(|&inode| inode != own)
                .map(|inode| (addr, inode))
        })
        .collect()
}

impl PodAddresses {
    pub fn new(own_netns: u32, source: Arc<dyn AddressSource>) -> Self {
        Self {
            own_netns,
            source,
            snapshot: Mutex::new(Snapshot::default()),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// The agent's own network namespace (the node's).
    pub const fn own_netns(&self) -> u32 {
        self.own_netns
    }

    /// The pod namespace that has `addr`, if exactly one does.
    pub async fn owner(&self, addr: IpAddr) -> Option<u32> {
        let addr = canonical_addr(addr);
        if !may_name_a_pod(addr) {
            return None;
        }
        let now = Instant::now();
        let (found, read_at) = {
            let snapshot = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
            (snapshot.owners.get(&addr).copied(), snapshot.read_at)
        };
        let age = read_at.map(|at| now.saturating_duration_since(at));
        let stale = match (found, age) {
            (_, None) => true,
            (Some(_), Some(age)) => age >= HIT_REFRESH,
            (None, Some(age)) => age >= MISS_REFRESH,
        };
        if !stale {
            return found;
        }
        self.refresh(read_at).await;
        self.snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .owners
            .get(&addr)
            .copied()
    }

    /// Reads the namespaces again, unless another caller did since `seen`.
    async fn refresh(&self, seen: Option<Instant>) {
        let _reading = self.reading.lock().await;
        let current = self
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read_at;
        if current != seen {
            return;
        }
        let source = Arc::clone(&self.source);
        let read = tokio::task::spawn_blocking(move || source.read())
            .await
            .unwrap_or_default();
        let owners = owners_of(self.own_netns, &read);
        let mut snapshot = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        snapshot.owners = owners;
        snapshot.read_at = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Fake {
        map: Mutex<BTreeMap<u32, Vec<IpAddr>>>,
        reads: AtomicUsize,
    }

    impl AddressSource for Fake {
        fn read(&self) -> BTreeMap<u32, Vec<IpAddr>> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.map.lock().expect("lock").clone()
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn only_addresses_of_exactly_one_pod_namespace_name_it() {
        let read = BTreeMap::from([
            (1, vec![ip("10.0.0.1"), ip("127.0.0.1"), ip("192.168.5.1")]),
            (
                7,
                vec![
                    ip("10.1.0.7"),
                    ip("127.0.0.1"),
                    ip("fe80::1"),
                    ip("10.9.9.9"),
                ],
            ),
            (
                8,
                vec![ip("10.1.0.8"), ip("10.9.9.9"), ip("::ffff:10.1.0.80")],
            ),
            (9, vec![ip("192.168.5.1")]),
        ]);
        let owners = owners_of(1, &read);
        assert_eq!(owners.get(&ip("10.1.0.7")), Some(&7));
        assert_eq!(owners.get(&ip("10.1.0.8")), Some(&8));
        assert_eq!(owners.get(&ip("10.1.0.80")), Some(&8), "mapped form folded");
        // Shared by two pods, loopback, link-local, the node's own: nobody's.
        for nobody in [
            "10.9.9.9",
            "127.0.0.1",
            "fe80::1",
            "10.0.0.1",
            "192.168.5.1",
        ] {
            assert_eq!(owners.get(&ip(nobody)), None, "{nobody}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn misses_and_old_hits_read_again_but_not_on_every_call() {
        let fake = Arc::new(Fake {
            map: Mutex::new(BTreeMap::from([(7, vec![ip("10.1.0.7")])])),
            reads: AtomicUsize::new(0),
        });
        let pods = PodAddresses::new(1, fake.clone());
        assert_eq!(pods.owner(ip("10.1.0.7")).await, Some(7));
        assert_eq!(fake.reads.load(Ordering::Relaxed), 1);
        // Misses within MISS_REFRESH use what was read.
        for _ in 0..5 {
            assert_eq!(pods.owner(ip("203.0.113.9")).await, None);
        }
        assert_eq!(fake.reads.load(Ordering::Relaxed), 1);
        // A new pod's address is found after MISS_REFRESH.
        fake.map
            .lock()
            .expect("lock")
            .insert(8, vec![ip("10.1.0.8")]);
        tokio::time::advance(MISS_REFRESH).await;
        assert_eq!(pods.owner(ip("10.1.0.8")).await, Some(8));
        // An address that moved to another pod is believed again only after a read.
        fake.map.lock().expect("lock").remove(&7);
        fake.map
            .lock()
            .expect("lock")
            .insert(9, vec![ip("10.1.0.7")]);
        assert_eq!(pods.owner(ip("10.1.0.7")).await, Some(7), "fresh hit");
        tokio::time::advance(HIT_REFRESH).await;
        assert_eq!(pods.owner(ip("10.1.0.7")).await, Some(9));
        // Loopback never asks.
        let reads = fake.reads.load(Ordering::Relaxed);
        assert_eq!(pods.owner(ip("127.0.0.1")).await, None);
        assert_eq!(fake.reads.load(Ordering::Relaxed), reads);
    }
}
