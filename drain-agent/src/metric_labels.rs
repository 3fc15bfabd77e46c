//! What the metrics export (`--ports`, `--metrics-labels`): which ports, and whether a
//! series names a local address beside its port. Below the drains, which count their ended
//! drains by scope as the metrics name them ([`MetricLabels`]), and the metrics, which
//! render those counts and the connections' with the same rule.

/// The labels of the connection and drain metrics (`--metrics-labels`).
///
/// By address (the default), a series is a (local address, port): on a node that is the
/// pods' IPs and the node's own addresses times the ports served, bounded by what runs on
/// the node (110 pods × 2 ports: 220 series a metric), and the address is what
/// kube-state-metrics' `kube_pod_info{pod_ip}` joins on. The network namespace is no label:
/// Prometheus has nothing to join it with, and endpoints that share an address and port in
/// several namespaces (127.0.0.1 in each pod) are summed. Client addresses never are labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConnectionLabels {
    /// `port` only: one series a port, the sum over every address and namespace.
    Port,
    /// `port` and `addr` (the local address: a pod's IP).
    #[default]
    Address,
}

/// A set of ports, as given to `--ports` (`80,443,8080-8090`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.ranges
            .iter()
            .any(|(low, high)| (*low..=*high).contains(&port))
    }
}

impl std::str::FromStr for PortSet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let port = |part: &str| match part.trim().parse::<u32>() {
            Ok(port @ 1..=65535) => Ok(port as u16),
            _ => Err(format!("{part:?} is not a port number (1-65535)")),
        };
        let mut ranges = Vec::new();
        for item in text.split(',') {
            let range = match item.split_once('-') {
                Some((low, high)) => {
                    let (low, high) = (port(low)?, port(high)?);
                    if low > high {
                        return Err(format!("range {item:?} is backwards"));
                    }
                    (low, high)
                }
                None => {
                    let single = port(item)?;
                    (single, single)
                }
            };
            ranges.push(range);
        }
        Ok(Self { ranges })
    }
}

/// What the metrics export: the ports `--ports` allows, with the labels `--metrics-labels`
/// chose. One value for every collector and for the drains' counts by scope, so that no
/// series shows a port `--ports` leaves out or an address `--metrics-labels port` hides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricLabels {
    /// `None`: every port.
    pub ports: Option<PortSet>,
    pub labels: ConnectionLabels,
}

impl MetricLabels {
    /// Whether series of this port are exported.
    pub fn exports_port(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|ports| ports.contains(port))
    }

    /// Whether a series names its local address (`addr`) beside its port.
    pub fn by_address(&self) -> bool {
        self.labels == ConnectionLabels::Address
    }
}
