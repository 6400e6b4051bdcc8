//! One run of a piece of work per key, shared by everyone who asks while it
//! runs: one upstream request per manifest or tag however many clients
//! wait. The work runs as a task of its own, so a caller's disconnect does
//! not cancel it for the others.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::ContentError;

/// The result of a shared fetch.
pub type FlightResult<V> = Result<V, ContentError>;

type SharedFlight<V> = Shared<BoxFuture<'static, FlightResult<V>>>;

/// Removes a finished run's key from the table.
struct Leave<K: Eq + Hash, V> {
    table: Arc<Mutex<HashMap<K, SharedFlight<V>>>>,
    key: K,
}

impl<K: Eq + Hash, V> Drop for Leave<K, V> {
    fn drop(&mut self) {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Runs one future per key; concurrent callers with the same key share it.
/// The future runs as its own task, so a caller's disconnect does not cancel
/// it for the others.
pub struct SingleFlight<K, V> {
    running: Arc<Mutex<HashMap<K, SharedFlight<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `make()` for `key` unless it is already running; returns its
    /// result and whether this call started it.
    pub async fn run<F>(&self, key: K, make: impl FnOnce() -> F) -> (FlightResult<V>, bool)
    where
        F: std::future::Future<Output = FlightResult<V>> + Send + 'static,
    {
        let (fut, leader) = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = running.get(&key) {
                (f.clone(), false)
            } else {
                let work = make();
                let table = self.running.clone();
                let k = key.clone();
                let handle = tokio::spawn(async move {
                    // Leaves the table however the work ends, a panic
                    // included, so that the key is not stuck on a dead run.
                    let _leave = Leave { table, key: k };
                    work.await
                });
                let fut = async move {
                    handle.await.unwrap_or_else(|e| {
                        Err(ContentError::Internal(format!("fetch task failed: {e}")))
                    })
                }
                .boxed()
                .shared();
                running.insert(key, fut.clone());
                (fut, true)
            }
        };
        (fut.await, leader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn single_flight_runs_once_for_concurrent_callers() {
        let sf: Arc<SingleFlight<&'static str, u32>> = Arc::new(SingleFlight::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let sf = sf.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                sf.run("k", || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(7)
                })
                .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (r, leader) = t.await.unwrap();
            assert_eq!(r.unwrap(), 7);
            leaders += usize::from(leader);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        // Finished work is forgotten: the next call runs again.
        let (r, leader) = sf.run("k", || async { Ok(8) }).await;
        assert_eq!((r.unwrap(), leader), (8, true));
    }

    #[tokio::test(start_paused = true)]
    async fn single_flight_survives_the_leader_going_away() {
        let sf: Arc<SingleFlight<u8, u8>> = Arc::new(SingleFlight::default());
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let leader = {
            let sf = sf.clone();
            tokio::spawn(async move {
                sf.run(1, || async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    d.fetch_add(1, Ordering::SeqCst);
                    Ok(1)
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        let (r, started) = sf.run(1, || async { Ok(2) }).await;
        assert_eq!((r.unwrap(), started), (1, false));
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn work_that_panics_fails_its_callers_and_leaves_the_key_free() {
        let sf: SingleFlight<u8, u8> = SingleFlight::default();
        let (r, _) = sf
            .run(1, || async {
                if true {
                    panic!("a bug, on purpose");
                }
                Ok(0)
            })
            .await;
        assert!(matches!(r, Err(ContentError::Internal(_))));
        let (r, leader) = sf.run(1, || async { Ok(3) }).await;
        assert_eq!((r.unwrap(), leader), (3, true));
    }
}
