//! One pass over the socket tables shared by the callers of the same moment.
//!
//! [`SharedLists`]: one report list per scope, shared by the waiters answered together.
//!
//! A not-drained answer lists who is still connected (a pass over the kernel's socket
//! tables, in every namespace of the scope). Waiters of one scope tend to be answered
//! together: a thousand hooks with the same timeout, or every waiter at once when a drain
//! ends. Each making its own pass costs a thousand passes in the same few milliseconds and
//! makes the last answers late by seconds (measured in `tests/waiters_on_time.rs`: p50 at
//! 6.3 s for a 5 s timeout before this). So the first waiter of a scope starts the pass (a
//! task of its own), the others arriving while it runs, or within [`FRESH_FOR`] after it
//! ended, take its result; and an answer that is due waits for its list only a small
//! budget: a pass in many namespaces on a loaded host takes hundreds of milliseconds, and
//! a hook's deadline is the caller's, the list only a report. A report list is never the
//! ground for a "drained" answer (that is the count's and the doubts' business), so a
//! list at most this old is fine for a report.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

/// How long after a pass ended its list still answers for its scope.
pub const FRESH_FOR: Duration = Duration::from_millis(100);

/// Scopes with a list kept at most; older entries are dropped first when full.
const MAX_SCOPES: usize = 4096;

/// Single-flight, briefly kept results per key, each waited for at most a budget: a pass
/// runs as a task of its own, so a caller that stops waiting (its answer is due) neither
/// cancels it nor makes the next caller start another.
pub struct SharedLists<K, V> {
    entries: Arc<Mutex<HashMap<K, Entry<V>>>>,
}

struct Entry<V> {
    /// The last pass's end and result.
    made: Option<(Instant, Result<Arc<V>, String>)>,
    running: bool,
    /// Bumped when a pass ends.
    done: watch::Sender<u64>,
}

impl<K, V> Default for SharedLists<K, V> {
    fn default() -> Self {
        Self {
            entries: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> SharedLists<K, V>
where
    K: Clone + Eq + Hash + Send + 'static,
    V: Send + Sync + 'static,
{
    /// The list of `key`: one made within [`FRESH_FOR`], else the one being made now (or
    /// `make`, started now as a task), waited for at most `budget`; `None` when it did not
    /// come in time.
    pub async fn get<F, Fut>(
        &self,
        key: &K,
        budget: Duration,
        make: F,
    ) -> Option<Result<Arc<V>, String>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, String>> + Send + 'static,
    {
        let mut done = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if entries.len() >= MAX_SCOPES && !entries.contains_key(key) {
                entries.retain(|_, entry| entry.running || entry.fresh());
            }
            let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
                made: None,
                running: false,
                done: watch::channel(0).0,
            });
            if entry.fresh() {
                return entry.made.as_ref().map(|(_, result)| result.clone());
            }
            let done = entry.done.subscribe();
            if !entry.running {
                entry.running = true;
                let pass = make();
                let entries = Arc::clone(&self.entries);
                let key = key.clone();
                tokio::spawn(async move {
                    let result = pass.await.map(Arc::new);
                    let mut entries = entries.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(entry) = entries.get_mut(&key) {
                        entry.made = Some((Instant::now(), result));
                        entry.running = false;
                        entry.done.send_modify(|passes| *passes += 1);
                    }
                });
            }
            done
        };
        tokio::time::timeout(budget, done.changed())
            .await
            .ok()?
            .ok()?;
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(key)
            .and_then(|entry| entry.made.as_ref())
            .map(|(_, result)| result.clone())
    }
}

impl<V> Entry<V> {
    fn fresh(&self) -> bool {
        self.made
            .as_ref()
            .is_some_and(|(made, _)| made.elapsed() <= FRESH_FOR)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn callers_at_the_same_time_share_one_pass() {
        let lists = SharedLists::<u16, Vec<u32>>::default();
        let passes = Arc::new(AtomicUsize::new(0));
        let make = || {
            let passes = Arc::clone(&passes);
            async move {
                passes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(vec![1, 2, 3])
            }
        };
        let (a, b, c) = tokio::join!(
            lists.get(&8080, LONG, make),
            lists.get(&8080, LONG, make),
            lists.get(&8080, LONG, make)
        );
        for list in [a, b, c] {
            assert_eq!(list.expect("in time").as_deref(), Ok(&vec![1, 2, 3]));
        }
        assert_eq!(
            passes.load(Ordering::SeqCst),
            1,
            "one pass for three callers"
        );
        // Another scope makes its own.
        let _ = lists.get(&9090, LONG, make).await;
        assert_eq!(passes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_list_older_than_fresh_for_is_made_again() {
        let lists = SharedLists::<u16, u32>::default();
        let passes = Arc::new(AtomicUsize::new(0));
        let make = || {
            let passes = Arc::clone(&passes);
            async move { Ok(u32::try_from(passes.fetch_add(1, Ordering::SeqCst)).unwrap()) }
        };
        assert_eq!(lists.get(&1, LONG, make).await.unwrap().as_deref(), Ok(&0));
        assert_eq!(
            lists.get(&1, LONG, make).await.unwrap().as_deref(),
            Ok(&0),
            "fresh: shared"
        );
        tokio::time::sleep(FRESH_FOR + Duration::from_millis(20)).await;
        assert_eq!(
            lists.get(&1, LONG, make).await.unwrap().as_deref(),
            Ok(&1),
            "stale: made again"
        );
    }

    #[tokio::test]
    async fn a_failed_pass_is_shared_too_and_retried_once_stale() {
        let lists = SharedLists::<u16, u32>::default();
        assert_eq!(
            lists
                .get(&1, LONG, || async { Err("no tables".to_owned()) })
                .await,
            Some(Err("no tables".to_owned()))
        );
        tokio::time::sleep(FRESH_FOR + Duration::from_millis(20)).await;
        assert_eq!(
            lists
                .get(&1, LONG, || async { Ok(7) })
                .await
                .unwrap()
                .as_deref(),
            Ok(&7)
        );
    }

    #[tokio::test]
    async fn a_slow_pass_costs_a_caller_its_budget_only_and_is_not_started_twice() {
        let lists = SharedLists::<u16, u32>::default();
        let passes = Arc::new(AtomicUsize::new(0));
        let make = || {
            let passes = Arc::clone(&passes);
            async move {
                passes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(5)
            }
        };
        let started = Instant::now();
        assert_eq!(lists.get(&1, Duration::from_millis(20), make).await, None);
        assert!(started.elapsed() < Duration::from_millis(200));
        // The pass goes on; a later caller with time to wait gets it, from the same pass.
        assert_eq!(lists.get(&1, LONG, make).await.unwrap().as_deref(), Ok(&5));
        assert_eq!(passes.load(Ordering::SeqCst), 1);
    }
}
