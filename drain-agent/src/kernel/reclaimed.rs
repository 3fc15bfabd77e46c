//! What reclaimed endpoints counted (`reclaim`: their counters leave `COUNTS`), kept for the
//! connection metrics and for scoped quiet windows, and pinned with the counting state
//! (`pin`: [`pin::RECLAIMED`] beside the shared maps) in a map of its own that no program
//! uses, written at each reclaim. An agent that adopts the counts goes on from these as
//! well (kept in memory only, a restart took every reclaimed endpoint's totals off its
//! port's counters: a counter that went down, which Prometheus reads as a reset); an agent
//! whose counting state is new starts without them, as its counts do.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::IpAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{HashMap, IterableMap, MapData};
use aya_obj::generated::{BPF_F_NO_PREALLOC, bpf_map_type};
use drain_agent_common::{ConnCounts, ConnKey, PORT_COUNT};
use log::warn;

use super::{pin, raw};
use crate::addr::key_addr;
use crate::tracker::{ReclaimedTotals, Totals};

/// The reclaimed totals, in memory and pinned.
pub struct Reclaimed {
    totals: ReclaimedTotals,
    /// The last change of a reclaimed endpoint, by port (CLOCK_MONOTONIC ns).
    last_change: StdHashMap<u16, u64>,
    /// The copy that outlives the agent: a port's totals under the port alone (family 0),
    /// a port and address's under both; the namespace is 0 and `active` unused.
    map: HashMap<MapData, ConnKey, ConnCounts>,
    /// A write of `map` failed (said once).
    unsaved: bool,
}

/// The key of a port's totals in the map.
fn port_key(port: u16) -> ConnKey {
    ConnKey {
        port,
        ..ConnKey::default()
    }
}

/// The key of a port and address's totals in the map (from an endpoint's key).
fn address_key(endpoint: &ConnKey) -> ConnKey {
    ConnKey {
        netns: 0,
        ..*endpoint
    }
}

fn value(totals: Totals, last_change_ns: u64) -> ConnCounts {
    ConnCounts {
        active: 0,
        opened: totals.opened,
        closed: totals.closed,
        last_change_ns,
    }
}

fn typed(fd: OwnedFd) -> Result<HashMap<MapData, ConnKey, ConnCounts>> {
    let info = raw::map_info(fd.as_fd())?;
    ensure!(
        info.type_ == bpf_map_type::BPF_MAP_TYPE_HASH as u32,
        "not a hash map"
    );
    let data = MapData::from_fd(fd).context("cannot open the map")?;
    HashMap::try_from(aya::maps::Map::HashMap(data)).context("a map of other key or value sizes")
}

impl Reclaimed {
    /// Nothing reclaimed yet, in a new map (room for every port and, per address, for every
    /// endpoint; memory taken per entry used).
    pub(super) fn new(max_endpoints: u32) -> Result<Self> {
        let fd = raw::map_create(&raw::MapKind {
            map_type: bpf_map_type::BPF_MAP_TYPE_HASH,
            inner_map: None,
            key_size: u32::try_from(size_of::<ConnKey>()).context("key size")?,
            value_size: u32::try_from(size_of::<ConnCounts>()).context("value size")?,
            max_entries: PORT_COUNT.saturating_add(max_endpoints),
            flags: BPF_F_NO_PREALLOC,
            name: b"RECLAIMED",
        })
        .context("cannot make the map of reclaimed endpoints' totals")?;
        Ok(Self {
            totals: ReclaimedTotals::default(),
            last_change: StdHashMap::new(),
            map: typed(fd)?,
            unsaved: false,
        })
    }

    /// What the map pinned in `dir` (a layout being adopted) holds.
    pub(super) fn adopt(dir: &Path) -> Result<Self> {
        let path = dir.join(pin::RECLAIMED);
        let map = typed(pin::obj_get(&path)?)
            .with_context(|| format!("{} is not the reclaimed totals", path.display()))?;
        let mut totals = ReclaimedTotals::default();
        let mut last_change = StdHashMap::new();
        for entry in map.iter() {
            let (key, counts) = entry.with_context(|| format!("cannot read {}", path.display()))?;
            let counted = Totals {
                opened: counts.opened,
                closed: counts.closed,
            };
            if key.family == 0 {
                totals.by_port.insert(key.port, counted);
                last_change.insert(key.port, counts.last_change_ns);
            } else {
                totals
                    .by_address
                    .insert((key.port, key_addr(&key)), counted);
            }
        }
        Ok(Self {
            totals,
            last_change,
            map,
            unsaved: false,
        })
    }

    /// The map's fd, to pin it with the counting state.
    pub(super) fn map_fd(&self) -> Result<OwnedFd> {
        IterableMap::map(&self.map)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate the reclaimed totals' fd")
    }

    pub(super) fn totals(&self) -> ReclaimedTotals {
        self.totals.clone()
    }

    /// The last change of a reclaimed endpoint of `port` (0: none).
    pub(super) fn last_change(&self, port: u16) -> u64 {
        self.last_change.get(&port).copied().unwrap_or(0)
    }

    /// Takes in what the endpoint `key` counted, just taken out of `COUNTS`;
    /// `address_kept`: another endpoint still has its port and address.
    pub(super) fn fold(&mut self, key: &ConnKey, counts: &ConnCounts, address_kept: bool) {
        let counted = Totals {
            opened: counts.opened,
            closed: counts.closed,
        };
        let addr = key_addr(key);
        self.totals.fold(key.port, addr, counted, address_kept);
        let last_change = self.last_change.entry(key.port).or_default();
        *last_change = (*last_change).max(counts.last_change_ns);
        let last_change = *last_change;
        let by_port = self
            .totals
            .by_port
            .get(&key.port)
            .copied()
            .unwrap_or_default();
        let saved = self
            .map
            .insert(port_key(key.port), value(by_port, last_change), 0);
        self.saved(saved.map_err(anyhow::Error::from));
        match self.totals.by_address.get(&(key.port, addr)).copied() {
            Some(by_address) => {
                let saved = self.map.insert(address_key(key), value(by_address, 0), 0);
                self.saved(saved.map_err(anyhow::Error::from));
            }
            // Not there (never saved) is as good as removed.
            None => {
                let _ = self.map.remove(&address_key(key));
            }
        }
    }

    /// Drops the totals of every port and address no endpoint has (`live`).
    pub(super) fn keep_addresses(&mut self, live: &HashSet<(u16, IpAddr)>) {
        for (port, addr) in self.totals.keep_addresses(live) {
            let key = match addr {
                IpAddr::V4(ip) => {
                    let mut bytes = [0; 16];
                    bytes[..4].copy_from_slice(&ip.octets());
                    ConnKey {
                        netns: 0,
                        family: drain_agent_common::AF_INET,
                        port,
                        addr: bytes,
                    }
                }
                IpAddr::V6(ip) => ConnKey {
                    netns: 0,
                    family: drain_agent_common::AF_INET6,
                    port,
                    addr: ip.octets(),
                },
            };
            let _ = self.map.remove(&key);
        }
    }

    fn saved(&mut self, saved: Result<()>) {
        if let Err(problem) = saved
            && !self.unsaved
        {
            self.unsaved = true;
            warn!(
                "cannot keep reclaimed endpoints' totals with the pinned counting state ({problem:#}): an agent that adopts it will show lower opened and closed counters"
            );
        }
    }
}
