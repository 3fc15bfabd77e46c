//! Summaries of samples: percentiles (nearest rank) and medians.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

/// A latency distribution, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        if ms.is_empty() {
            return Self::default();
        }
        Self {
            n: ms.len(),
            p50_ms: percentile(&ms, 0.50),
            p99_ms: percentile(&ms, 0.99),
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            min_ms: ms[0],
            max_ms: ms[ms.len() - 1],
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// A distribution-free interval for the median of the population `values` were drawn from:
/// the k-th smallest and k-th largest value, with k the largest whose coverage (the chance
/// that the median lies between them, from the binomial distribution with p = ½) is at least
/// `min_coverage`. Returns (low, high, coverage); `None` for fewer than 2 values.
pub fn median_interval(values: &[f64], min_coverage: f64) -> Option<(f64, f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n < 2 {
        return None;
    }
    // P(X ≤ j) for X ~ Binomial(n, ½), built term by term.
    let mut term = 0.5_f64.powi(i32::try_from(n).ok()?);
    let mut below = 0.0;
    let mut chosen = None;
    for k in 1..=n / 2 {
        // `below` is P(X ≤ k − 2); add P(X = k − 1).
        below += term;
        term *= (n - (k - 1)) as f64 / k as f64;
        let coverage = 1.0 - 2.0 * below;
        if coverage < min_coverage {
            break;
        }
        chosen = Some((sorted[k - 1], sorted[n - k], coverage));
    }
    chosen
}

/// Times `run` up to `count` times, stopping early once `budget` is spent (at least
/// `min_count` samples are taken whatever the budget).
pub fn sample(
    count: usize,
    min_count: usize,
    budget: Duration,
    mut run: impl FnMut() -> Result<()>,
) -> Result<Vec<Duration>> {
    let started = Instant::now();
    let mut samples = Vec::with_capacity(count);
    while samples.len() < count {
        if samples.len() >= min_count && started.elapsed() > budget {
            break;
        }
        let t0 = Instant::now();
        run()?;
        samples.push(t0.elapsed());
    }
    Ok(samples)
}

/// A small deterministic generator (xorshift64*) for random poll phases.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let value = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (value >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_widens_with_the_coverage_asked() {
        let values: Vec<f64> = (1..=7).map(f64::from).collect();
        // n = 7: [min, max] covers 1 − 2/128; [2nd, 6th] only 1 − 16/128.
        let (low, high, coverage) = median_interval(&values, 0.95).expect("interval");
        assert_eq!((low, high), (1.0, 7.0));
        assert!((coverage - (1.0 - 2.0 / 128.0)).abs() < 1e-12, "{coverage}");
        let (low, high, coverage) = median_interval(&values, 0.85).expect("interval");
        assert_eq!((low, high), (2.0, 6.0));
        assert!((coverage - 0.875).abs() < 1e-12, "{coverage}");
        // n = 15: the 4th and 12th values cover 96.5 %.
        let values: Vec<f64> = (1..=15).map(f64::from).collect();
        let (low, high, coverage) = median_interval(&values, 0.95).expect("interval");
        assert_eq!((low, high), (4.0, 12.0));
        assert!(
            (coverage - (1.0 - 2.0 * 576.0 / 32_768.0)).abs() < 1e-12,
            "{coverage}"
        );
        assert_eq!(median_interval(&[1.0], 0.5), None);
        // Too few values for the coverage asked.
        assert_eq!(median_interval(&[1.0, 2.0, 3.0], 0.95), None);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn rng_stays_in_the_unit_interval() {
        let mut rng = Rng::new(42);
        for _ in 0..1000 {
            let x = rng.unit();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
