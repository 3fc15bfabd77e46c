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

use tokio::{
    sync::{Mutex as TurnLock, OnceCell, watch},
    time::Instant,
};

/// How long after a pass ended its list still answers for its scope.
pub const FRESH_FOR: Duration = Duration::from_millis(100);

/// Scopes with a list kept at most; older entries are dropped first when full.
const MAX_SCOPES: usize = 4096;

type Slot<V> = Arc<OnceCell<(Instant, Result<Arc<V>, String>)>>;

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

/// Passes that must begin after a moment their callers name: who calls on a connection must
/// be read from tables that already hold it, so from a pass begun after the connection was
/// accepted. A caller joins the pass running now if it began late enough, else the next
/// pass of its key (one not begun yet), or opens it; passes of a key run one at a time. A
/// thousand hooks connecting at once cost two or three passes, not a thousand, and mostly
/// no wait for the next one (`tests/waiters_on_time.rs`).
pub struct Batched<K, V> {
    keys: Mutex<HashMap<K, Arc<Batch<V>>>>,
}

struct Batch<V> {
    /// Held while a pass of this key runs.
    turn: TurnLock<()>,
    /// The pass not begun yet, which new callers join; and the one running, with when it
    /// began.
    passes: Mutex<Passes<V>>,
}

struct Passes<V> {
    next: Option<Slot<V>>,
    running: Option<(Instant, Slot<V>)>,
}

impl<K, V> Default for Batched<K, V> {
    fn default() -> Self {
        Self {
            keys: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Clone + Eq + Hash, V> Batched<K, V> {
    /// The result of a pass of `key` that began at `since` or later.
    pub async fn get<F, Fut>(&self, key: &K, since: Instant, make: F) -> Result<Arc<V>, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, String>>,
    {
        let batch = {
            let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            if keys.len() >= MAX_SCOPES && !keys.contains_key(key) {
                // Keys nobody waits on any more.
                keys.retain(|_, batch| Arc::strong_count(batch) > 1);
            }
            Arc::clone(keys.entry(key.clone()).or_insert_with(|| {
                Arc::new(Batch {
                    turn: TurnLock::new(()),
                    passes: Mutex::new(Passes {
                        next: None,
                        running: None,
                    }),
                })
            }))
        };
        let (slot, running) = {
            let mut passes = batch.passes.lock().unwrap_or_else(PoisonError::into_inner);
            match &passes.running {
                Some((began, slot)) if *began >= since => (Arc::clone(slot), true),
                _ => (
                    Arc::clone(passes.next.get_or_insert_with(Arc::default)),
                    false,
                ),
            }
        };
        if let Some((_, result)) = slot.get() {
            return result.clone();
        }
        if running {
            // Began late enough: wait for its end (its runner initializes the slot).
            let (_, result) = slot
                .get_or_init(|| async { (Instant::now(), make().await.map(Arc::new)) })
                .await;
            return result.clone();
        }
        let _turn = batch.turn.lock().await;
        {
            // The first of this pass's callers to get the turn begins it: from here on,
            // new callers make the next one (or join this one, if it began late enough).
            let mut passes = batch.passes.lock().unwrap_or_else(PoisonError::into_inner);
            if passes
                .next
                .as_ref()
                .is_some_and(|open| Arc::ptr_eq(open, &slot))
            {
                passes.next = None;
                passes.running = Some((Instant::now(), Arc::clone(&slot)));
            }
        }
        let (_, result) = slot
            .get_or_init(|| async { (Instant::now(), make().await.map(Arc::new)) })
            .await;
        result.clone()
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

    /// A pass of 50 ms for a caller of now, in the background; it returns its number.
    fn slow_pass(
        batched: &Arc<Batched<u16, usize>>,
        passes: &Arc<AtomicUsize>,
    ) -> tokio::task::JoinHandle<Result<Arc<usize>, String>> {
        let batched = Arc::clone(batched);
        let passes = Arc::clone(passes);
        tokio::spawn(async move {
            batched
                .get(&1, Instant::now(), || async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(passes.fetch_add(1, Ordering::SeqCst))
                })
                .await
        })
    }

    #[tokio::test]
    async fn a_batch_begins_after_its_callers_asked() {
        let batched = Arc::new(Batched::<u16, usize>::default());
        let passes = Arc::new(AtomicUsize::new(0));
        // A pass that runs while the second and third caller arrive.
        let first = slow_pass(&batched, &passes);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let make = || async { Ok(passes.fetch_add(1, Ordering::SeqCst)) };
        let now = Instant::now();
        let (second, third) = tokio::join!(batched.get(&1, now, make), batched.get(&1, now, make));
        assert_eq!(first.await.expect("task").as_deref(), Ok(&0));
        // They arrived while pass 0 ran: they share pass 1, which began after them.
        assert_eq!((second.as_deref(), third.as_deref()), (Ok(&1), Ok(&1)));
        assert_eq!(passes.load(Ordering::SeqCst), 2);
        // A later caller gets a pass of its own.
        assert_eq!(
            batched.get(&1, Instant::now(), make).await.as_deref(),
            Ok(&2)
        );
        // One whose moment came before a running pass began joins that pass.
        let before = Instant::now();
        let running = slow_pass(&batched, &passes);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(batched.get(&1, before, make).await.as_deref(), Ok(&3));
        assert_eq!(running.await.expect("task").as_deref(), Ok(&3));
        assert_eq!(passes.load(Ordering::SeqCst), 4);
    }
}
