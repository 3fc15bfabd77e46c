//! Kernel memory of maps whose size depends on the node: sized at load time so that no
//! neighbour can make the agent's maps outgrow a fixed budget, whatever the CPU count.

use anyhow::{Result, anyhow};
use drain_agent_common::{DurationHistogram, PORT_COUNT};

/// The most kernel memory the per-CPU duration histograms (`DURATIONS`) may take. The map
/// holds one histogram per port *per possible CPU*, allocated at a port's first tracked
/// close and never freed; a pod that listens on, connects to and closes many ports in its
/// own namespace fills it. At 65,536 ports it took 7.5 MiB per CPU (480 MiB on a 64-CPU
/// node, charged to the agent's cgroup): sized by the CPU count instead, the ports beyond
/// its room keep their counts (exact) and lose only their duration metrics, counted as
/// `histogram_failed`.
pub const DURATIONS_BUDGET: u64 = 8 << 20;

/// At least this many ports keep duration metrics, however many CPUs (only a node with more
/// than 1,092 possible CPUs goes past the budget by this floor).
pub const DURATIONS_MIN_PORTS: u32 = 64;

/// Bytes one histogram takes per possible CPU: the kernel rounds per-CPU values up to 8.
const HISTOGRAM_BYTES: u64 = (size_of::<DurationHistogram>() as u64).div_ceil(8) * 8;

/// How many ports the duration histograms have room for on a node with `possible_cpus`.
pub fn duration_ports(possible_cpus: u32) -> u32 {
    let per_port = HISTOGRAM_BYTES * u64::from(possible_cpus.max(1));
    let fit = DURATIONS_BUDGET / per_port;
    u32::try_from(fit)
        .unwrap_or(u32::MAX)
        .clamp(DURATIONS_MIN_PORTS, PORT_COUNT)
}

/// The kernel memory of the duration histograms' values with room for `ports` on
/// `possible_cpus`.
pub fn durations_bytes(ports: u32, possible_cpus: u32) -> u64 {
    u64::from(ports) * HISTOGRAM_BYTES * u64::from(possible_cpus)
}

/// The number of possible CPUs (per-CPU maps allocate for each).
pub fn possible_cpus() -> Result<u32> {
    let cpus =
        aya::util::nr_cpus().map_err(|(path, problem)| anyhow!("cannot read {path}: {problem}"))?;
    Ok(u32::try_from(cpus).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_duration_histograms_stay_within_their_budget_on_any_node() {
        for cpus in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1092] {
            let ports = duration_ports(cpus);
            assert!(
                durations_bytes(ports, cpus) <= DURATIONS_BUDGET,
                "{cpus} CPUs: {ports} ports take {} bytes",
                durations_bytes(ports, cpus)
            );
            assert!(ports >= DURATIONS_MIN_PORTS);
        }
        // Small nodes keep every port.
        assert_eq!(duration_ports(1), PORT_COUNT);
        // Where the floor wins, it is the floor.
        assert_eq!(duration_ports(4096), DURATIONS_MIN_PORTS);
    }
}
