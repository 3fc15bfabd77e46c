//! Blocking passes shared by the callers that ask at the same time, never older than the
//! question: a caller gets the result of a pass that began after it asked. Callers that ask
//! while a pass runs wait for it to end and share the next one, so at most one pass per key
//! runs and one waits, however many ask. Used for what is read on every read of a scope and
//! costs a pass over `/proc` and a thread in a namespace (`KernelMaps::own_port_shared`):
//! a local user asking about the agent's own port in a loop from many connections starts
//! one such pass at a time, not one each.
//!
//! Not a cache: a result is never handed to a caller that asked after its pass began, so it
//! says nothing older than the question (a doubt input that a cache would let go stale in
//! the unsafe direction: a program that binds beside the agent after the pass began).

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
};

/// One key's passes: how many began, whether one runs, and the last one's result.
struct Slot<V> {
    state: Mutex<SlotState<V>>,
    ended: Condvar,
}

struct SlotState<V> {
    /// Passes begun so far (the running one's number, while one runs).
    begun: u64,
    running: bool,
    /// The last pass that ended: its number and result.
    last: Option<(u64, V)>,
}

impl<V> Default for Slot<V> {
    fn default() -> Self {
        Self {
            state: Mutex::new(SlotState {
                begun: 0,
                running: false,
                last: None,
            }),
            ended: Condvar::new(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends a pass however it ends (a panic included): the callers waiting for it are woken,
/// and one of them begins the next.
struct Running<'a, V> {
    slot: &'a Slot<V>,
}

impl<V> Drop for Running<'_, V> {
    fn drop(&mut self) {
        lock(&self.slot.state).running = false;
        self.slot.ended.notify_all();
    }
}

impl<V: Clone> Slot<V> {
    fn get(&self, pass: impl FnOnce() -> V) -> V {
        let mut pass = Some(pass);
        let mut state = lock(&self.state);
        // The first pass that begins after this call.
        let wanted = state.begun + 1;
        loop {
            if let Some((number, value)) = &state.last
                && *number >= wanted
            {
                return value.clone();
            }
            if !state.running
                && let Some(pass) = pass.take()
            {
                state.begun += 1;
                state.running = true;
                let number = state.begun;
                drop(state);
                let running = Running { slot: self };
                let value = pass();
                lock(&self.state).last = Some((number, value.clone()));
                drop(running);
                return value;
            }
            state = self
                .ended
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Shared passes, one slot per key while anybody asks about it.
pub struct SharedPasses<K, V> {
    slots: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

impl<K, V> Default for SharedPasses<K, V> {
    fn default() -> Self {
        Self {
            slots: Mutex::default(),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> SharedPasses<K, V> {
    /// The result of a pass for `key` that began after this call: `pass`, or the one
    /// another caller began meanwhile. Blocking (waits for a running pass to end).
    pub fn get(&self, key: &K, pass: impl FnOnce() -> V) -> V {
        let slot = Arc::clone(lock(&self.slots).entry(key.clone()).or_default());
        let value = slot.get(pass);
        drop(slot);
        // The last caller of a key lets its slot go (nobody else holds it: a caller takes
        // its hold under this lock).
        let mut slots = lock(&self.slots);
        if slots
            .get(key)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            slots.remove(key);
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Barrier,
            atomic::{AtomicU64, Ordering},
            mpsc,
        },
        thread,
        time::Duration,
    };

    use super::*;

    #[test]
    fn callers_that_ask_during_a_pass_share_the_next_and_never_get_an_older_one() {
        let passes = Arc::new(SharedPasses::<u32, u64>::default());
        let begun = Arc::new(AtomicU64::new(0));
        // A first pass runs until told to end.
        let (end_first, first_may_end) = mpsc::channel::<()>();
        let (first_began, first_running) = mpsc::channel::<()>();
        let first = {
            let (passes, begun) = (Arc::clone(&passes), Arc::clone(&begun));
            thread::spawn(move || {
                passes.get(&1, || {
                    let number = begun.fetch_add(1, Ordering::SeqCst) + 1;
                    first_began.send(()).expect("send");
                    first_may_end.recv().expect("recv");
                    number
                })
            })
        };
        first_running.recv().expect("first began");
        // Eight callers ask while it runs: none may get its result (it began before they
        // asked); they share one pass begun after it.
        let asked = Arc::new(Barrier::new(9));
        let later: Vec<_> = (0..8)
            .map(|_| {
                let (passes, begun, asked) =
                    (Arc::clone(&passes), Arc::clone(&begun), Arc::clone(&asked));
                thread::spawn(move || {
                    asked.wait();
                    passes.get(&1, || {
                        thread::sleep(Duration::from_millis(20));
                        begun.fetch_add(1, Ordering::SeqCst) + 1
                    })
                })
            })
            .collect();
        asked.wait();
        thread::sleep(Duration::from_millis(50));
        end_first.send(()).expect("send");
        assert_eq!(first.join().expect("first"), 1);
        for caller in later {
            assert!(
                caller.join().expect("caller") >= 2,
                "an older pass's result"
            );
        }
        // At most one pass behind the first for all of them (two if the scheduler let the
        // second begin before some of them had asked: still never one each).
        let passes_run = begun.load(Ordering::SeqCst);
        assert!(passes_run <= 3, "{passes_run} passes for 9 callers");
        assert!(lock(&passes.slots).is_empty(), "the key's slot is let go");
    }

    #[test]
    fn a_pass_that_panics_lets_the_next_caller_begin_one() {
        let passes = SharedPasses::<u32, u64>::default();
        let panicked = thread::scope(|scope| {
            scope
                .spawn(|| passes.get(&1, || panic!("the pass failed")))
                .join()
        });
        assert!(panicked.is_err());
        assert_eq!(passes.get(&1, || 7), 7);
    }
}
