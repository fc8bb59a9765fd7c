//! Group commit of qcow2 metadata, for the acknowledgement rule (`crate::device`): a write
//! is acknowledged only after imago's dirty L2/refcount caches have been written back to the
//! image file by a write-back that *started after the write's data was written*.
//!
//! Writers share write-backs. Flushes are numbered; a writer whose data is on the file notes
//! the number of the next flush to start (`started + 1`). If no flush is running it runs that
//! one itself; otherwise it waits, and when the running one ends, one waiter starts the next,
//! which covers every writer that was waiting. Any flush numbered at or above a writer's
//! target started after its data write completed, so its result is the writer's result.
//!
//! Also [`blocking`]: how the block layer runs what waits for the disk (imago is built in
//! its synchronous mode: its async mode returns futures that are not `Send`, which
//! `BlockDevice` needs, and would run the same blocking system calls inside them).

use std::io;
use std::sync::Mutex;

use tokio::sync::watch;

/// Runs blocking image I/O from async code: through `block_in_place` on a multi-threaded
/// tokio runtime (so other tasks move to another worker meanwhile), directly otherwise
/// (a current-thread runtime, or no runtime), where it blocks the thread as any file I/O
/// in an async fn would.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[derive(Debug, Default)]
struct State {
    /// Number of the last flush started.
    started: u64,
    /// Number of the last flush finished.
    finished: u64,
    /// Whether a flush is running.
    running: bool,
    /// Outcome of the last flush finished.
    last: Option<(io::ErrorKind, String)>,
}

/// Shares metadata write-backs among concurrent writers. See the module documentation.
#[derive(Debug)]
pub struct GroupCommit {
    state: Mutex<State>,
    /// Carries `finished` to waiters.
    done: watch::Sender<u64>,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            done: watch::Sender::new(0),
        }
    }
}

fn outcome(last: &Option<(io::ErrorKind, String)>) -> io::Result<()> {
    match last {
        None => Ok(()),
        Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
    }
}

impl GroupCommit {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave `State` inconsistent (plain stores).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once a call of `flush` that started after this call began has finished,
    /// with that flush's result. `flush` runs on the calling thread: it writes imago's
    /// caches to the page cache, which does not wait for the disk (as data writes do not).
    pub async fn commit(&self, flush: impl Fn() -> io::Result<()>) -> io::Result<()> {
        let target = self.lock().started + 1;
        loop {
            let mut rx = {
                let mut s = self.lock();
                if s.finished >= target {
                    return outcome(&s.last);
                }
                if !s.running {
                    s.running = true;
                    s.started += 1;
                    let number = s.started;
                    drop(s);
                    let result = flush();
                    let mut s = self.lock();
                    s.running = false;
                    s.finished = number;
                    s.last = result.as_ref().err().map(|e| (e.kind(), e.to_string()));
                    self.done.send_replace(number);
                    return result;
                }
                // Subscribed under the lock: the running flush reports after we looked.
                self.done.subscribe()
            };
            // The sender lives as long as `self`, so this cannot fail; if it did, we would
            // just look again.
            let _ = rx.changed().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// Concurrent committers share flushes, and each returns only after a flush that began
    /// after it asked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_commits_share_flushes_that_started_after_them() {
        let gc = Arc::new(GroupCommit::default());
        let flushes = Arc::new(AtomicU64::new(0));
        // Each task records the flush count when it asks; the flush that covers it must
        // start later, i.e. the count when it returns is above the recorded one.
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let gc = gc.clone();
            let flushes = flushes.clone();
            tasks.push(tokio::spawn(async move {
                let started_before = flushes.load(Ordering::SeqCst);
                gc.commit(|| {
                    flushes.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    Ok(())
                })
                .await
                .map(|()| (started_before, flushes.load(Ordering::SeqCst)))
            }));
        }
        for t in tasks {
            let (before, after) = t.await.expect("join").expect("commit");
            assert!(
                after > before,
                "returned without a flush of its own ({before} -> {after})"
            );
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!(n < 32, "{n} flushes for 32 commits: nothing was shared");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_fails_the_commit() {
        let gc = GroupCommit::default();
        let e = gc
            .commit(|| Err(io::Error::other("disk on fire")))
            .await
            .expect_err("must fail");
        assert_eq!(e.to_string(), "disk on fire");
        gc.commit(|| Ok(())).await.expect("a later flush succeeds");
    }
}
