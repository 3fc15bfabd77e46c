//! Counters: the atomic adds and the error counters every program uses.

use core::{intrinsics::AtomicOrdering, ptr};

use drain_agent_common::error_index;

use crate::maps::{ERRORS, REPAIRS};

pub(crate) const EEXIST: i32 = 17;

/// Handler errors: nothing to do but count them (a BPF program has nobody to return them to).
#[derive(Clone, Copy)]
pub(crate) enum Error {
    ReadFailed,
}

#[inline(always)]
pub(crate) fn count_repair(index: u32) {
    if let Some(counter) = REPAIRS.get_ptr_mut(index) {
        // SAFETY: a pointer into the array map's value.
        unsafe { atomic_add_u64(counter, 1) };
    }
}

/// Adds `delta` to the active count atomically and returns the count read right after.
///
/// The BPF instruction set before v3 has no fetch-and-add, and aya-build fixes the CPU to
/// `generic`, so the add and the read are two steps. That is enough for the wake-ups: a
/// socket's close always follows its open (both run under the socket lock), so the count
/// never goes negative, and whenever a count settles at 0 the *last* add was a decrement
/// whose read comes after every add and sees the 0, so at least one "reached zero" event is
/// written. Concurrent changes may add spurious events; the agent re-reads the count on each.
///
/// # Safety
/// `active` points into a live map value.
#[inline(always)]
pub(crate) unsafe fn add_active(active: *mut i64, delta: i64) -> i64 {
    // SAFETY: the caller's pointer is valid; volatile so the read is not folded into the add.
    unsafe {
        core::intrinsics::atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(active, delta);
        ptr::read_volatile(active)
    }
}

#[inline(always)]
pub(crate) unsafe fn atomic_add_u64(target: *mut u64, value: u64) {
    // SAFETY: the caller passes a pointer into a map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(target, value);
    }
}

#[inline(always)]
pub(crate) fn count_error(error: Error) {
    match error {
        Error::ReadFailed => count_error_at(error_index::READ_FAILED),
    }
}

#[inline(always)]
pub(crate) fn count_error_at(index: u32) {
    if let Some(counter) = ERRORS.get_ptr_mut(index) {
        // SAFETY: a pointer into the array map's value.
        unsafe { atomic_add_u64(counter, 1) };
    }
}
