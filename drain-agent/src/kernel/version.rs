//! The running kernel's version, and what the agent cannot vouch for on older kernels
//! ([`old_kernel_doubts`]).

use super::AttachMethod;
use crate::doubt::Doubt;

/// A kernel release as (major, minor): `6.18.44-fc-v1300` is (6, 18).
pub type KernelVersion = (u32, u32);

/// What an unreadable release counts as: older than any kernel, so every doubt of an old
/// kernel holds (fail closed).
pub const UNKNOWN: KernelVersion = (0, 0);

/// The version of the running kernel (`uname -r`); [`UNKNOWN`] when its release cannot be
/// parsed.
pub fn running() -> KernelVersion {
    let name = rustix::system::uname();
    let release = name.release().to_string_lossy();
    parse_release(&release).unwrap_or_else(|| {
        log::warn!(
            "cannot tell the kernel's version from its release {release:?}: taken as an old kernel"
        );
        UNKNOWN
    })
}

/// The version the agent doubts as under `--assume-kernel-version asked` on a kernel of
/// `running`: only ever an older one. A newer one would drop the doubts of the running
/// kernel (its unseen skipped runs, its unlocked walks), and counts it cannot vouch for
/// would answer drained.
pub fn assumed(asked: KernelVersion, running: KernelVersion) -> KernelVersion {
    asked.min(running)
}

/// (major, minor) of a kernel release string, if it starts with them.
pub fn parse_release(release: &str) -> Option<KernelVersion> {
    let mut numbers = release.split(['.', '-', '+', '_']);
    let major = numbers.next()?.parse().ok()?;
    let minor = numbers.next()?.parse().ok()?;
    Some((major, minor))
}

/// The doubts that hold for good on a kernel of `version` with the handler attached by
/// `attach`; `can_walk` says whether the walker loaded, `walked` whether a walk has run on
/// these counts (this agent's, or the agent's whose pinned counts were adopted).
pub fn old_kernel_doubts(
    version: KernelVersion,
    attach: AttachMethod,
    can_walk: bool,
    walked: bool,
) -> Vec<Doubt> {
    let mut doubts = Vec::new();
    // `trace_call_bpf()` skips the classic tracepoint's program while this CPU's
    // `bpf_prog_active` is raised, and counts the skip in `recursion_misses` only from
    // Linux 6.7 (commit dd8657894c11, "bpf: Count missed stats in trace_call_bpf"). tp_btf
    // and the raw tracepoint do not use `bpf_prog_active`: before 6.1 a nested run runs,
    // from 6.1 (commit 05b24ff9b2cf) a skipped one is counted.
    if attach == AttachMethod::Tracepoint && version < (6, 7) {
        doubts.push(Doubt::SkipsUnseen);
    }
    // `bpf_iter_tcp_seq_show()` holds each socket's lock (`lock_sock_fast()`, with
    // batching) from Linux 5.15 (commit 04c7820b776f, "bpf: tcp: Bpf iter batching and
    // lock_sock"); before, only the hash bucket's spinlock, which a close from ESTABLISHED
    // or CLOSE_WAIT does not take.
    if can_walk && walked && version < (5, 15) {
        doubts.push(Doubt::WalkUnlocked);
    }
    doubts
}

/// One WARN at start for each doubt this kernel will hold for good once the agent walks
/// (the seeding always does), with what avoids it.
pub(super) fn warn_of_old_kernel(version: KernelVersion, attach: AttachMethod, can_walk: bool) {
    let (major, minor) = version;
    for doubt in old_kernel_doubts(version, attach, can_walk, true) {
        match doubt {
            Doubt::SkipsUnseen => log::warn!(
                "Linux {major}.{minor} does not count the classic tracepoint's skipped runs (from 6.7): every /drained answer is confirmed with the socket tables (sock_diag); --attach tp-btf or raw-tracepoint avoids it"
            ),
            Doubt::WalkUnlocked => log::warn!(
                "Linux {major}.{minor} walks the sockets without each socket's lock (from 5.15): a walk can race a close, so every /drained answer is confirmed with the socket tables (sock_diag)"
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audit (second look): the hidden `--assume-kernel-version` took a newer version too:
    /// `6.8` on a 5.10 kernel with the classic tracepoint dropped its doubts (skipped runs
    /// it cannot see, walks without the socket lock), and answers were no longer confirmed
    /// with the socket tables. It only ever makes the kernel older.
    #[test]
    fn an_assumed_kernel_is_never_newer_than_the_running_one() {
        assert_eq!(assumed((6, 8), (5, 10)), (5, 10));
        assert_eq!(assumed((6, 6), (6, 18)), (6, 6));
        assert_eq!(assumed((5, 10), UNKNOWN), UNKNOWN);
        let walked = true;
        assert_eq!(
            old_kernel_doubts(
                assumed((6, 8), (5, 10)),
                AttachMethod::Tracepoint,
                true,
                walked
            ),
            old_kernel_doubts((5, 10), AttachMethod::Tracepoint, true, walked)
        );
    }

    #[test]
    fn releases_give_their_major_and_minor() {
        assert_eq!(parse_release("6.18.44-fc-v1300"), Some((6, 18)));
        assert_eq!(parse_release("5.10.0-32-cloud-amd64"), Some((5, 10)));
        assert_eq!(parse_release("6.12.57+deb13-cloud-amd64"), Some((6, 12)));
        assert_eq!(parse_release("7.3"), Some((7, 3)));
        assert_eq!(parse_release("6.7-rc1"), Some((6, 7)));
        assert_eq!(parse_release(""), None);
        assert_eq!(parse_release("linux"), None);
        assert_eq!(parse_release("6"), None);
        assert_eq!(parse_release("6.x.1"), None);
    }

    #[test]
    fn the_running_kernel_has_a_version() {
        // This machine's release parses: a real version, not the fail-closed one.
        assert!(running() > (5, 0), "{:?}", running());
    }

    /// Found by an audit: before Linux 6.7 `trace_call_bpf()` skips the classic
    /// tracepoint's program while `bpf_prog_active` is raised (another kprobe or tracepoint
    /// program on that CPU, any `bpf()` map lookup or update there) and counts nothing, so a
    /// skipped passive open left a count too low with no doubt: a false "drained".
    #[test]
    fn the_classic_tracepoint_before_6_7_cannot_see_its_skips() {
        for version in [(5, 10), (5, 15), (6, 1), (6, 6), UNKNOWN] {
            let doubts = old_kernel_doubts(version, AttachMethod::Tracepoint, true, true);
            assert!(
                doubts.contains(&Doubt::SkipsUnseen),
                "{version:?}: {doubts:?}"
            );
        }
        // The raw tracepoint and tp_btf do not go through `bpf_prog_active`.
        for attach in [AttachMethod::TpBtf, AttachMethod::RawTracepoint] {
            let doubts = old_kernel_doubts((6, 6), attach, true, true);
            assert!(
                !doubts.contains(&Doubt::SkipsUnseen),
                "{attach}: {doubts:?}"
            );
        }
    }

    /// Found by an audit: before Linux 5.15 the `iter/tcp` walker runs under the hash
    /// bucket's spinlock only, not the socket's lock, so a walk can race the handler's close
    /// of the same socket (counted twice, or an endpoint un-counted twice).
    #[test]
    fn a_walk_before_5_15_does_not_hold_the_socket_lock() {
        for version in [(5, 9), (5, 10), (5, 14), UNKNOWN] {
            let doubts = old_kernel_doubts(version, AttachMethod::TpBtf, true, true);
            assert_eq!(doubts, vec![Doubt::WalkUnlocked], "{version:?}");
            // Before any walk nothing raced a close; without a walker none ever runs.
            assert!(old_kernel_doubts(version, AttachMethod::TpBtf, true, false).is_empty());
            assert!(old_kernel_doubts(version, AttachMethod::TpBtf, false, true).is_empty());
        }
        let both = old_kernel_doubts((5, 10), AttachMethod::Tracepoint, true, true);
        assert_eq!(both, vec![Doubt::SkipsUnseen, Doubt::WalkUnlocked]);
        assert!(old_kernel_doubts((5, 15), AttachMethod::TpBtf, true, true).is_empty());
    }

    #[test]
    fn kernels_from_6_7_have_neither_doubt() {
        for version in [(6, 7), (6, 12), (6, 18), (7, 3)] {
            for attach in AttachMethod::ALL {
                for (can_walk, walked) in [(true, true), (true, false), (false, false)] {
                    assert!(
                        old_kernel_doubts(version, attach, can_walk, walked).is_empty(),
                        "{version:?} {attach}"
                    );
                }
            }
        }
    }
}
