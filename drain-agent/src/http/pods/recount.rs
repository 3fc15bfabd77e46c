//! Whether a steered namespace's count of application listeners on the in-pod port can be
//! trusted, or is checked against the socket tables and counted again: the rule
//! ([`next_step`]) and the pod manager's pass that applies it ([`CountChecks::pass`]).
//!
//! The `sk_lookup` program of a namespace steers the in-pod port to the agent while the
//! kernel side's count (`POD_LISTEN_COUNTS`) is 0. The count goes up at the handler's run
//! for a `listen()` (CLOSE→LISTEN); a run the kernel skipped leaves it at 0 while the
//! application listens, and its connections on that port go to the agent instead. The
//! kernel counts such skips in the handler's `recursion_misses` (tp_btf and the raw
//! tracepoint from Linux 6.1, the classic tracepoint from 6.7); before 6.7 the classic
//! tracepoint's skips are not counted at all (`Doubt::SkipsUnseen`). The walks count
//! listeners too, but a skip starts one only where it is seen, and then within 5 s.
//!
//! The pass, on the manager's rescan (at most every [`CHECK_EVERY`]): for each steered
//! namespace whose count is 0 and that is in doubt (a skip counted since it was last
//! verified, or skips unseen), the in-pod port's listeners are read from the namespace's
//! socket tables (`sock_diag`, listening sockets only); where there is one (or the tables
//! cannot be read), the namespace is counted again with the seeder (`seed_pod_listeners`,
//! exactly once with the handler: both insert into `POD_LISTENERS` with `BPF_NOEXIST` under
//! the socket's lock), which puts the count up and stops the steering there.
//!
//! Exactness: a skipped CLOSE→LISTEN is counted in `recursion_misses` when the tracepoint
//! fires, before `listen()` hashes the socket; so the tables read just after a skip may not
//! show its listener yet. A namespace the tables clear is verified only as of the skips
//! read at the *previous* pass ([`Verified::skips`]): every skip is followed by two checks,
//! the second one a pass (at least [`CHECK_EVERY`]) after the skip was read, by when that
//! `listen()` (a few instructions under its socket lock) has hashed its socket or failed.
//! Where skips are unseen every pass checks. A namespace whose count is not 0 is not
//! steered: it is left in doubt (not verified) and checked once its count is 0 again, so a
//! listener missed while another one was counted is found when that one closes. What stays
//! open: at most one pass (~1 s) where the application's connections go to the agent; a
//! `listen()` stalled longer than a pass between its tracepoint and its hash insert; and, on
//! a kernel that cannot read the socket tables (no `inet_diag`), a recount with the seeder
//! on every such pass instead (a walk of the namespace's TCP hash, 1–8 ms).
//!
//! Cost: where skips are seen and none happen, a read of `recursion_misses` per pass and
//! nothing per namespace; after a skip, one `sock_diag` dump of the listening sockets per
//! idle steered namespace, twice. Where skips are unseen (the classic tracepoint before
//! 6.7), that dump in every idle steered namespace on every pass (`--attach tp-btf` or
//! `raw-tracepoint` avoids it, as it avoids the doubt).

use std::{fs::File, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use log::warn;

use super::OwnEndpoints;
use crate::sys::{netns, sockdiag};

/// The shortest time between two passes: the rescan's period (bursts of rescans after a
/// namespace appears do not check more often).
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the socket tables of the namespace say about listeners on the in-pod port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tables {
    /// Not read (yet).
    Unread,
    /// No TCP socket listens on the port there (any address, IPv4 or IPv6).
    NoListener,
    /// One does.
    Listener,
    /// They could not be read (the namespace not entered, no `inet_diag`).
    Unreadable,
}

/// What the pass does next about one steered namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing: the count is trusted as it is, and the namespace stays verified or in doubt
    /// as it was.
    Keep,
    /// Read the socket tables, then ask again.
    ReadTables,
    /// The count (0) is right: the namespace is verified.
    Verified,
    /// Count the namespace's listeners again (the seeder), then it is verified.
    Recount,
}

/// The rule: `skipped` runs of the handler counted since the namespace was last verified,
/// whether this kernel counts them at all (`skips_seen`), whether the kernel side counts an
/// application listener there now (`counted`: the count is not 0, so nothing is steered),
/// and what the socket tables said.
pub(super) fn next_step(skipped: u64, skips_seen: bool, counted: bool, tables: Tables) -> Step {
    if !in_doubt(skipped, skips_seen) || counted {
        // In doubt but not steered now: it stays in doubt, checked once the count is 0.
        return Step::Keep;
    }
    match tables {
        Tables::Unread => Step::ReadTables,
        Tables::NoListener => Step::Verified,
        Tables::Listener | Tables::Unreadable => Step::Recount,
    }
}

/// Whether a namespace's count may miss a listener: a skip was counted since it was
/// verified, or this kernel does not count the skips. Not in doubt, nothing is read.
pub(super) fn in_doubt(skipped: u64, skips_seen: bool) -> bool {
    !skips_seen || skipped > 0
}

/// As of which reading of the handler's skipped runs a steered namespace's count is known
/// to be right.
#[derive(Clone, Copy, Debug)]
pub(super) struct Verified {
    pub(super) skips: u64,
}

/// A steered namespace, for the pass.
pub(super) struct Steered {
    /// The namespace (the steering link's file of it): the tables are read and the seeder
    /// run inside it.
    pub(super) namespace: Arc<File>,
    pub(super) verified: Verified,
}

/// What the pass found in one namespace.
enum Found {
    Verified,
    Recounted(Tables),
    Kept,
    Failed(anyhow::Error),
}

/// Whether a TCP socket listens on `port` in the namespace `namespace` (`inode`).
fn read_tables(namespace: &File, inode: u32, port: u16) -> Result<bool> {
    let namespace = namespace
        .try_clone()
        .context("cannot duplicate the namespace file")?;
    netns::run_in_file(namespace, format!("{inode}"), move || {
        Ok(!sockdiag::query(&sockdiag::Query {
            local_port: port,
            states: sockdiag::state::bit(sockdiag::state::LISTEN),
            with_info: false,
        })?
        .is_empty())
    })
}

/// One namespace through the rule.
fn check(
    endpoints: &dyn OwnEndpoints,
    inode: u32,
    namespace: &File,
    port: u16,
    skipped: u64,
    skips_seen: bool,
) -> Found {
    if !in_doubt(skipped, skips_seen) {
        // The count is not even read: nothing per namespace while no skip happens.
        return Found::Kept;
    }
    let mut tables = Tables::Unread;
    loop {
        // Read again after the tables: a listener that began meanwhile is the handler's.
        let counted = match endpoints.pod_listeners_counted(inode) {
            Ok(counted) => counted,
            Err(problem) => return Found::Failed(problem),
        };
        match next_step(skipped, skips_seen, counted, tables) {
            Step::Keep => return Found::Kept,
            Step::Verified => return Found::Verified,
            Step::ReadTables => {
                tables = match read_tables(namespace, inode, port) {
                    Ok(true) => Tables::Listener,
                    Ok(false) => Tables::NoListener,
                    Err(_) => Tables::Unreadable,
                };
            }
            Step::Recount => {
                return match endpoints.recount_pod_listeners(inode, namespace) {
                    Ok(()) => Found::Recounted(tables),
                    Err(problem) => Found::Failed(problem),
                };
            }
        }
    }
}

/// The pod manager's record of its passes.
#[derive(Debug, Default)]
pub(super) struct CountChecks {
    /// When the steered namespaces' listener counts were last checked.
    pub(super) checked: Option<tokio::time::Instant>,
    /// The handler's skipped runs as that check read them (`None` before, or where this
    /// kernel does not count them).
    pub(super) skips_read: Option<u64>,
}

impl CountChecks {
    /// Whether the last pass is less than [`CHECK_EVERY`] old.
    pub(super) fn recent(&self) -> bool {
        self.checked.is_some_and(|at| at.elapsed() < CHECK_EVERY)
    }

    /// The pass (see the module doc) over the `steered` namespaces (inode, and what the pass
    /// keeps of each), asking `endpoints` (the in-pod port `port`).
    pub(super) async fn pass(
        &mut self,
        endpoints: &Arc<dyn OwnEndpoints>,
        port: u16,
        mut steered: Vec<(u32, &mut Steered)>,
    ) {
        self.checked = Some(tokio::time::Instant::now());
        let asked: Vec<(u32, Arc<File>, Verified)> = steered
            .iter()
            .map(|(inode, steered)| (*inode, Arc::clone(&steered.namespace), steered.verified))
            .collect();
        let endpoints = Arc::clone(endpoints);
        let before = self.skips_read;
        let checked = tokio::task::spawn_blocking(move || {
            // `None`: this kernel does not count the skips (`Doubt::SkipsUnseen`).
            let skips = endpoints.handler_skips()?;
            let found: Vec<(u32, Found)> = asked
                .into_iter()
                .map(|(inode, namespace, verified)| {
                    let skipped = skips.map_or(0, |now| now.saturating_sub(verified.skips));
                    let found = check(
                        endpoints.as_ref(),
                        inode,
                        &namespace,
                        port,
                        skipped,
                        skips.is_some(),
                    );
                    (inode, found)
                })
                .collect();
            anyhow::Ok((skips, found))
        })
        .await;
        let (skips, found) = match checked {
            Ok(Ok(checked)) => checked,
            Ok(Err(problem)) => {
                warn!(
                    "cannot read the handler's skipped runs: {problem:#}; the in-pod port's listener counts are checked on the next pass"
                );
                return;
            }
            Err(problem) => {
                warn!("the check of the in-pod port's listener counts failed: {problem}");
                return;
            }
        };
        // Verified as of the skips read at the previous pass (see the module doc).
        let verified = Verified {
            skips: before.unwrap_or(0),
        };
        for (inode, found) in found {
            let Some((_, steered)) = steered.iter_mut().find(|(at, _)| *at == inode) else {
                continue;
            };
            match found {
                Found::Kept => {}
                Found::Verified => steered.verified = verified,
                Found::Recounted(tables) => {
                    steered.verified = verified;
                    if tables == Tables::Listener {
                        warn!(
                            "network namespace {inode}: an application listens on the in-pod port {port} there, but the kernel side counted none (a handler run the kernel skipped); counted it again: the port is the application's"
                        );
                    }
                }
                Found::Failed(problem) => warn!(
                    "network namespace {inode}: cannot check the count of the applications' listeners on the in-pod port {port}: {problem:#} (retrying on the next pass)"
                ),
            }
        }
        self.skips_read = skips.or(self.skips_read);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by an audit: a skipped CLOSE→LISTEN left a namespace's count at 0 while its
    /// application listened, and nothing looked until a walk. A skip counted since the
    /// namespace was verified, where the count is 0, sends the pass to the socket tables,
    /// and a listener there is counted again.
    #[test]
    fn a_counted_skip_has_an_uncounted_listener_counted_again() {
        assert_eq!(next_step(1, true, false, Tables::Unread), Step::ReadTables);
        assert_eq!(next_step(1, true, false, Tables::Listener), Step::Recount);
        assert_eq!(
            next_step(1, true, false, Tables::NoListener),
            Step::Verified
        );
    }

    /// Where the kernel does not count the skips (the classic tracepoint before 6.7), every
    /// pass checks the namespaces whose count is 0.
    #[test]
    fn unseen_skips_check_every_pass() {
        assert_eq!(next_step(0, false, false, Tables::Unread), Step::ReadTables);
        assert_eq!(next_step(0, false, false, Tables::Listener), Step::Recount);
        assert_eq!(
            next_step(0, false, false, Tables::NoListener),
            Step::Verified
        );
    }

    /// No skip since the namespace was verified, where skips are seen: the count is the
    /// handler's, trusted without a look.
    #[test]
    fn no_skip_since_the_last_check_trusts_the_count() {
        for tables in [Tables::Unread, Tables::Listener, Tables::Unreadable] {
            assert_eq!(next_step(0, true, false, tables), Step::Keep);
        }
    }

    /// A namespace whose count is not 0 is not steered: nothing to do now, and it is not
    /// verified (a listener missed beside a counted one is looked for once that one closes).
    #[test]
    fn a_counted_namespace_is_left_in_doubt() {
        for seen in [true, false] {
            for tables in [Tables::Unread, Tables::NoListener, Tables::Listener] {
                assert_eq!(next_step(3, seen, true, tables), Step::Keep);
            }
        }
    }

    /// Tables that cannot be read prove nothing: the namespace is counted again with the
    /// seeder (exact, and idempotent with the handler).
    #[test]
    fn unreadable_tables_count_again() {
        assert_eq!(next_step(1, true, false, Tables::Unreadable), Step::Recount);
        assert_eq!(
            next_step(0, false, false, Tables::Unreadable),
            Step::Recount
        );
    }
}
