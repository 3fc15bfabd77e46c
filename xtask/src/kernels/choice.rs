//! Which kernels to boot: the cloud kernels the suites offer, ordered by version, the
//! newest of each series, and the default (CI) subset.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};

/// Series always in the default (CI) run, besides the oldest and the newest: the kernels of
/// Debian 12 and 13, i.e. of most hosts.
const CI_SERIES: &[&str] = &["6.1", "6.12"];

/// One cloud kernel a suite offers.
#[derive(Clone, Debug)]
pub(super) struct Available {
    /// The kernel's ABI name without the flavour, e.g. `6.12.57+deb12`.
    pub(super) abi: String,
    /// `major.minor`.
    pub(super) series: String,
    /// The package that holds the image: `linux-binary-…` from 6.19 on (the
    /// `linux-image-…` package is then empty), else `linux-image-…`.
    pub(super) package: String,
    pub(super) version: String,
    pub(super) suite: String,
}

impl Available {
    /// Numbers of the ABI name, to order versions (`5.10.0-32` < `6.1.0-50` < `6.12.57+deb12`).
    pub(super) fn order(&self) -> Vec<u64> {
        numbers(&self.abi)
    }
}

fn numbers(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// The series of an ABI name: `6.12.57+deb12` → `6.12`.
pub(super) fn series_of(abi: &str) -> Option<String> {
    let mut parts = abi.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some(format!("{major}.{minor}"))
}

/// The newest kernel of each series, oldest series first.
fn newest_per_series(available: &[Available]) -> Vec<Available> {
    let mut newest: BTreeMap<Vec<u64>, Available> = BTreeMap::new();
    for kernel in available {
        let key = numbers(&kernel.series);
        let replace = newest
            .get(&key)
            .is_none_or(|known| known.order() < kernel.order());
        if replace {
            newest.insert(key, kernel.clone());
        }
    }
    newest.into_values().collect()
}

pub(super) fn choose(
    available: &[Available],
    wanted: &[String],
    all: bool,
) -> Result<Vec<Available>> {
    let per_series = newest_per_series(available);
    if all {
        return Ok(per_series);
    }
    let wanted: Vec<String> = if wanted.is_empty() {
        let mut subset = Vec::new();
        if let Some(oldest) = per_series.first() {
            subset.push(oldest.series.clone());
        }
        subset.extend(CI_SERIES.iter().map(|series| (*series).to_owned()));
        if let Some(newest) = per_series.last() {
            subset.push(newest.series.clone());
        }
        subset.dedup();
        subset
    } else {
        wanted.to_vec()
    };
    let mut chosen: Vec<Available> = Vec::new();
    for name in &wanted {
        let found = available
            .iter()
            .find(|kernel| kernel.abi == *name)
            .or_else(|| per_series.iter().find(|kernel| kernel.series == *name))
            .with_context(|| {
                format!("no Debian suite offers a cloud kernel {name} (see `cargo xtask kernels --list`)")
            })?;
        if !chosen.iter().any(|kernel| kernel.abi == found.abi) {
            chosen.push(found.clone());
        }
    }
    Ok(chosen)
}

pub(super) fn print_list(available: &[Available]) {
    let newest: BTreeSet<String> = newest_per_series(available)
        .into_iter()
        .map(|kernel| kernel.abi)
        .collect();
    let mut sorted = available.to_vec();
    sorted.sort_by_key(Available::order);
    println!("| series | kernel | package | version | suite | booted by --all |");
    println!("|---|---|---|---|---|---|");
    for kernel in &sorted {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            kernel.series,
            kernel.abi,
            kernel.package,
            kernel.version,
            kernel.suite,
            if newest.contains(&kernel.abi) {
                "yes"
            } else {
                ""
            }
        );
    }
    let series: BTreeSet<&str> = available.iter().map(|k| k.series.as_str()).collect();
    for missing in ["5.15", "6.6"] {
        if !series.contains(missing) {
            println!("\n{missing}: no reachable Debian suite offers it.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_kernel_versions() {
        assert_eq!(series_of("5.10.0-32").as_deref(), Some("5.10"));
        assert_eq!(series_of("6.12.57+deb12").as_deref(), Some("6.12"));
        assert!(numbers("6.12.90+deb12.1") > numbers("6.12.90+deb12"));
        assert!(numbers("6.12.117+deb13") > numbers("6.12.95+deb12"));
        assert!(numbers("5.10.0-32") < numbers("6.1.0-50"));
    }
}
