//! The results: which checks each guest passed, the table, and deploy/COMPATIBILITY.md.

use std::{fmt::Write as _, process::Command};

use anyhow::Result;

use super::{choice::Available, output, qemu::Guest};
use crate::workspace_root;

/// The checks a guest must report as `ok…`, in table order, with their column titles.
const CHECKS: &[(&str, &str)] = &[
    ("boots", "boots"),
    ("btf", "BTF"),
    ("attach_default", "default attach"),
    ("attach_tp-btf", "tp-btf"),
    ("attach_tracepoint", "tracepoint"),
    ("attach_raw-tracepoint", "raw-tracepoint"),
    ("preallocated", "preallocated map"),
    ("pre_existing", "pre-existing counted"),
    ("new_connections", "new counted"),
    ("socket_tables", "socket tables"),
    ("wakeup", "drained wake-up"),
    ("netns_seed", "2nd netns seeded"),
    ("pod_port", "pod port steered"),
];

pub(super) struct Row {
    pub(super) kernel: Available,
    pub(super) guest: Guest,
    /// The log of a first boot that never reached the guest's init (the kernel was booted
    /// once more: `guest` is the second boot).
    pub(super) first_boot: Option<std::path::PathBuf>,
}

impl Row {
    pub(super) fn new(
        kernel: &Available,
        guest: Guest,
        first_boot: Option<std::path::PathBuf>,
    ) -> Self {
        Self {
            kernel: kernel.clone(),
            guest,
            first_boot,
        }
    }

    /// The checks that did not report `ok…` (a hung or crashed guest fails every check it
    /// did not reach, and `done`).
    pub(super) fn failures(&self) -> Vec<String> {
        let mut failures: Vec<String> = CHECKS
            .iter()
            .filter(|(key, _)| !self.passed(key))
            .map(|(key, _)| (*key).to_owned())
            .collect();
        if self.guest.hung {
            failures.push(format!("hung, killed after {:.0} s", self.guest.seconds));
        } else if !self.guest.results.contains_key("done") {
            failures.push(format!("guest ended early ({})", self.guest.exit));
        }
        failures
    }

    pub(super) fn passed(&self, key: &str) -> bool {
        self.guest.results.get(key).is_some_and(|value| {
            if key == "attach_default" {
                // The mode the agent picked by itself: a name, not a failure.
                !value.is_empty() && !value.starts_with("FAIL")
            } else if key == "socket_tables" {
                // A kernel whose diag modules the archive does not offer cannot be checked:
                // said in its cell, not a failure of the agent.
                value.starts_with("ok") || value.starts_with("n/a")
            } else {
                value.starts_with("ok")
            }
        })
    }

    pub(super) fn cell(&self, key: &str) -> String {
        match self.guest.results.get(key) {
            None if key == "boots" && self.guest.hung => {
                format!("FAIL: no console within {:.0} s", self.guest.seconds)
            }
            None if key == "boots" => {
                format!("FAIL: {} {}", self.guest.exit, self.guest.qemu_errors)
            }
            None => "—".to_owned(),
            Some(value) => {
                let value = value.strip_prefix("ok ").unwrap_or(value);
                let mut shown: String = value.replace('|', "/").chars().take(160).collect();
                if shown.len() < value.len() {
                    shown.push('…');
                }
                if key == "boots"
                    && let Some(first) = &self.first_boot
                {
                    let name = first
                        .file_name()
                        .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
                    let _ = write!(shown, " (2nd boot: the 1st never reached init, log {name})");
                }
                shown
            }
        }
    }
}

pub(super) fn render_table(rows: &[Row], rounds: u32) -> String {
    let mut table = String::from("| kernel | package (suite) |");
    let mut rule = String::from("|---|---|");
    for (key, title) in CHECKS {
        if *key == "wakeup" {
            let _ = write!(table, " {title} (worst of {rounds}) |");
        } else {
            let _ = write!(table, " {title} |");
        }
        rule.push_str("---|");
    }
    table.push_str(" RSS | start | result |\n");
    rule.push_str("---|---|---|\n");
    table.push_str(&rule);
    for row in rows {
        let _ = write!(
            table,
            "| {} | {} {} ({}) |",
            row.guest
                .results
                .get("kernel")
                .cloned()
                .unwrap_or_else(|| format!("{}-cloud-amd64", row.kernel.abi)),
            row.kernel.package,
            row.kernel.version,
            row.kernel.suite
        );
        for (key, _) in CHECKS {
            let _ = write!(table, " {} |", row.cell(key));
        }
        let rss = row
            .guest
            .results
            .get("rss_kib")
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or_else(|| "—".to_owned(), |kib| format!("{:.1} MiB", kib / 1024.0));
        let start = row
            .guest
            .results
            .get("start_ms")
            .and_then(|ms| ms.parse::<f64>().ok())
            .map_or_else(|| "—".to_owned(), |ms| format!("{:.1} s", ms / 1000.0));
        let failures = row.failures();
        let verdict = if failures.is_empty() {
            "pass".to_owned()
        } else {
            format!("**FAIL** ({})", failures.join(", "))
        };
        let _ = writeln!(table, " {rss} | {start} | {verdict} |");
    }
    table
}

/// deploy/COMPATIBILITY.md: the table, when and from which commit it was made.
pub(super) fn compatibility_document(table: &str) -> Result<String> {
    let git = |args: &[&str]| -> Result<String> {
        Ok(
            output(Command::new("git").args(args).current_dir(workspace_root()))?
                .trim()
                .to_owned(),
        )
    };
    let mut commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    if !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
        commit.push_str(" (with uncommitted changes)");
    }
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    Ok(format!(
        "# Kernel compatibility\n\n\
         Made by `cargo xtask kernels --all --write` on {date} from commit {commit}: the agent's \
         release build booted under qemu (TCG, 2 vCPUs, 1 GiB) on the newest Debian cloud kernel \
         of every series Debian's suites offer, with a busybox initramfs and an in-guest test \
         (`xtask/guest/init.sh`) that checks each answer. CI (`.ci/run`) runs the subset \
         `cargo xtask kernels` (the oldest series, 6.1, 6.12 and the newest) and fails on any \
         regression. A kernel whose first boot never reaches the guest's init (the emulated \
         boot crashed or hung before anything of the agent ran) is booted once more, and its \
         *boots* cell says so.\n\n\
         Columns: *default attach* is the mode the agent picks by itself; *tp-btf*, *tracepoint*, \
         *raw-tracepoint* force one mode (`--attach`) and check that a connection is counted and \
         a waiter woken; *preallocated map* does the same with `--preallocate-sockets`; \
         *pre-existing counted* is a connection opened before the agent started; \
         *socket tables* is the agent reading the kernel's socket tables (inet_diag and tcp_diag, \
         loaded into the guest as a host loads them on demand), with which it confirms a count \
         it cannot vouch for (`n/a`: the archive has no modules package for that kernel); \
         *drained wake-up* is the worst time, over every round, from the last `close()` to the \
         answer of a `/drained` waiter that was already blocked (each must be under 1 s); *2nd \
         netns seeded* is a pre-existing connection in another network namespace (`unshare -n`); \
         *pod port steered* is `--pod-listen 127.0.0.1:9100` answering inside another namespace while \
         an application there can still listen on 9100 and gets its connections (sk_lookup steering). \
         RSS and start time (launch to the first healthy `/healthz`) are measured under TCG \
         emulation, which is many times slower than hardware: compare them between kernels, \
         not with a real host.\n\n\
         Not tested: 5.15 and 6.6 (no reachable Debian suite offers them any more), and kernels \
         without BTF (the agent refuses to start there, by design).\n\n{table}",
        date = date.trim()
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn row(results: &[(&str, &str)], first_boot: Option<&str>) -> Row {
        Row::new(
            &Available {
                abi: "6.12.117+deb13".into(),
                series: "6.12".into(),
                package: "linux-image-6.12.117+deb13-cloud-amd64".into(),
                version: "6.12.117-1".into(),
                suite: "trixie".into(),
            },
            Guest {
                results: results
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
                hung: false,
                exit: "exit status: 0".into(),
                seconds: 40.0,
                qemu_errors: String::new(),
            },
            first_boot.map(std::path::PathBuf::from),
        )
    }

    /// A kernel booted a second time (its first boot never reached init) is judged by the
    /// second boot, and its row says that it took two.
    #[test]
    fn a_second_boot_is_judged_by_itself_and_said() {
        let all_ok: Vec<(&str, &str)> = CHECKS
            .iter()
            .map(|(key, _)| {
                (
                    *key,
                    if *key == "attach_default" {
                        "tp_btf"
                    } else {
                        "ok"
                    },
                )
            })
            .chain([("done", "ok")])
            .collect();
        let retried = row(&all_ok, Some("/logs/6.12.117+deb13.first-boot.log"));
        assert!(retried.failures().is_empty(), "{:?}", retried.failures());
        assert_eq!(
            retried.cell("boots"),
            "ok (2nd boot: the 1st never reached init, log 6.12.117+deb13.first-boot.log)"
        );
        assert_eq!(row(&all_ok, None).cell("boots"), "ok");
        // A second boot that fails too is a failure.
        let failed = row(&[], Some("/logs/x.first-boot.log"));
        assert!(failed.failures().contains(&"boots".to_owned()));
    }
}
