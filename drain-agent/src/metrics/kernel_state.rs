//! `drain_agent_kernel_state`: where the kernel state came from.

use std::sync::Arc;

use prometheus::{
    core::{Collector, Desc},
    proto::{MetricFamily, MetricType},
};

use super::families::{desc, family, gauge};
use crate::kernel::KernelState;

const KERNEL_STATE: (&str, &str) = (
    "drain_agent_kernel_state",
    "Always 1; origin=\"adopted\" when the counts were adopted from the previous agent's pinned kernel state, \"new\" when this agent loaded them; pinned=\"true\" when they outlive the agent (--pin-dir).",
);

/// Where the kernel state came from, read at scrape time (an agent that waited for the pin
/// directory's lock pins its state later).
pub(super) struct KernelStateCollector {
    state: Arc<KernelState>,
    desc: Desc,
}

impl KernelStateCollector {
    pub(super) fn new(state: Arc<KernelState>) -> prometheus::Result<Self> {
        let desc = desc(KERNEL_STATE, &["origin", "pinned"])?;
        Ok(Self { state, desc })
    }
}

impl Collector for KernelStateCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        vec![family(
            KERNEL_STATE,
            MetricType::GAUGE,
            vec![gauge(
                &[
                    ("origin", self.state.origin.name().to_owned()),
                    ("pinned", self.state.pinned().to_string()),
                ],
                1.0,
            )],
        )]
    }
}
