//! Advice from history: from each port's connection-duration histogram, how long its
//! connections last (p50, p99, max) and the drain timeout that would have covered them,
//! so users stop hand-tuning 30 s, 240 s, 300 s.

use drain_agent_common::{DURATION_BUCKET_COUNT, DURATION_BUCKETS_MS, DurationHistogram};
use serde::{Deserialize, Serialize};

/// What `GET /advice` says about one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAdvice {
    pub port: u16,
    /// Connections closed since the kernel's counting state was made (those the histogram
    /// knows; kept across restarts with `--pin-dir`).
    pub connections: u64,
    /// Upper bounds of the histogram buckets the quantiles fall in; `None`: over 1 h.
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub max_ms: Option<u64>,
    /// A drain timeout that covers the p99 with room: 1.5 × p99, rounded up to 5 s, at
    /// least 5 s. `None` when the p99 is over an hour (drain with `idle` or close at the
    /// deadline instead).
    pub timeout_s: Option<u64>,
    /// `terminationGracePeriodSeconds` (or `TimeoutStopSec`) for that timeout: the drain
    /// plus 15 s for the application's own shutdown after SIGTERM.
    pub grace_period_s: Option<u64>,
}

/// Seconds the application is given after SIGTERM, on top of the drain.
const SHUTDOWN_ROOM_S: u64 = 15;

/// The upper bound (ms) of bucket `index`; `None` for the overflow bucket.
fn bound(index: usize) -> Option<u64> {
    DURATION_BUCKETS_MS.get(index).copied()
}

/// The bucket the `q` quantile falls in.
fn quantile(buckets: &[u64; DURATION_BUCKET_COUNT], total: u64, q: f64) -> Option<usize> {
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut cumulative = 0;
    buckets.iter().position(|count| {
        cumulative += count;
        cumulative >= rank
    })
}

/// Advice for every port with closed connections, by port.
pub fn advise(histograms: &[(u16, DurationHistogram)]) -> Vec<PortAdvice> {
    let mut by_port: std::collections::BTreeMap<u16, [u64; DURATION_BUCKET_COUNT]> =
        std::collections::BTreeMap::new();
    for (port, histogram) in histograms {
        let buckets = by_port.entry(*port).or_insert([0; DURATION_BUCKET_COUNT]);
        for (total, count) in buckets.iter_mut().zip(histogram.buckets) {
            *total += count;
        }
    }
    by_port
        .into_iter()
        .filter_map(|(port, buckets)| {
            let total: u64 = buckets.iter().sum();
            if total == 0 {
                return None;
            }
            let p50 = quantile(&buckets, total, 0.5).and_then(bound);
            let p99_index = quantile(&buckets, total, 0.99);
            let p99 = p99_index.and_then(bound);
            let max = buckets.iter().rposition(|count| *count > 0).and_then(bound);
            let timeout_s = p99.map(|ms| {
                let seconds = (ms * 3).div_ceil(2).div_ceil(1000);
                seconds.div_ceil(5).max(1) * 5
            });
            Some(PortAdvice {
                port,
                connections: total,
                p50_ms: p50,
                p99_ms: p99,
                max_ms: max,
                timeout_s,
                grace_period_s: timeout_s.map(|t| t + SHUTDOWN_ROOM_S),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(counts: &[(usize, u64)]) -> DurationHistogram {
        let mut histogram = DurationHistogram::default();
        for (bucket, count) in counts {
            histogram.buckets[*bucket] = *count;
        }
        histogram
    }

    #[test]
    fn quantiles_come_from_bucket_bounds_and_the_timeout_covers_the_p99() {
        // 98 connections under 100 ms, 2 between 10 s and 30 s (bucket bounds:
        // 1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 30000, … ms).
        let advice = advise(&[(8080, histogram(&[(4, 98), (9, 2)]))]);
        assert_eq!(advice.len(), 1);
        let a = &advice[0];
        assert_eq!((a.port, a.connections), (8080, 100));
        assert_eq!(a.p50_ms, Some(100));
        assert_eq!(a.p99_ms, Some(30_000));
        assert_eq!(a.max_ms, Some(30_000));
        assert_eq!(a.timeout_s, Some(45));
        assert_eq!(a.grace_period_s, Some(60));
    }

    #[test]
    fn endpoints_of_a_port_add_up_and_overflow_has_no_timeout() {
        let advice = advise(&[
            (443, histogram(&[(0, 1)])),
            (443, histogram(&[(DURATION_BUCKET_COUNT - 1, 1)])),
            (80, DurationHistogram::default()),
        ]);
        assert_eq!(
            advice.len(),
            1,
            "a port with no closed connection gets no advice"
        );
        assert_eq!(advice[0].connections, 2);
        assert_eq!(advice[0].p99_ms, None);
        assert_eq!(advice[0].timeout_s, None);
        // Short connections still get the 5 s floor.
        let short = advise(&[(80, histogram(&[(0, 10)]))]);
        assert_eq!(short[0].timeout_s, Some(5));
    }
}
