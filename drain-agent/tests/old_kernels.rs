//! What older kernels cannot vouch for, with the real kernel side: the handler attached as
//! the classic tracepoint, the maps' doubts read as the tracker reads them, with the
//! kernel's version assumed older (`KernelMaps::assume_kernel_version`: this machine's
//! kernel is newer than the kernels in question, whose behaviour cannot be made here).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is the test failing"
)]

mod common;

use common::kernel_available;
use drain_agent::{
    doubt::Doubt,
    kernel::{AttachMethod, Kernel},
    tracker::{Filter, Vouch as _},
};

fn load_kernel(attach: AttachMethod) -> Kernel {
    common::small_kernel(Some(attach), false)
}

/// Found by an audit: before Linux 6.7 the classic tracepoint's skipped runs are counted
/// nowhere, and before 5.15 a walk races closes; the agent doubted neither and answered a
/// zero in the maps "drained". Each doubt reaches every scope's doubts and the health ones,
/// the walk's from the first walk on.
#[test]
#[ignore = "kernel test: needs root and BPF; run by cargo xtask test (or cargo test -- --include-ignored)"]
fn an_old_kernels_doubts_reach_every_answer() {
    if !kernel_available("an_old_kernels_doubts_reach_every_answer") {
        return;
    }
    let mut kernel = load_kernel(AttachMethod::Tracepoint);
    let maps = kernel.maps();
    let filter = Filter::port(8080);
    maps.assume_kernel_version((5, 10));
    let doubts = maps.doubts(&filter).expect("doubts");
    assert!(doubts.contains(&Doubt::SkipsUnseen), "{doubts:?}");
    // No walk has run yet: none raced a close.
    assert!(!doubts.contains(&Doubt::WalkUnlocked), "{doubts:?}");
    kernel.seed_existing_connections().expect("seed");
    for doubts in [maps.doubts(&filter).expect("doubts"), maps.health_doubts()] {
        assert!(
            doubts.contains(&Doubt::SkipsUnseen) && doubts.contains(&Doubt::WalkUnlocked),
            "{doubts:?}"
        );
    }
    // A kernel that counts the skips and locks the socket in walks has neither.
    maps.assume_kernel_version((6, 7));
    let doubts = maps.doubts(&filter).expect("doubts");
    assert!(doubts.is_empty(), "{doubts:?}");
    assert!(
        maps.health_doubts().is_empty(),
        "{:?}",
        maps.health_doubts()
    );
}
