//! The reader threads: a few threads of their own, each with its own read-only connection, take
//! reads from one queue; a read wakes a thread only when one is asleep.
//!
//! Reads went through `tokio::task::spawn_blocking`, which shares its 16 threads with the file
//! and search tools, and each read paid the blocking pool's queue and condition variable, a
//! semaphore and a mutex over the idle connections: about 5.6 `futex` calls per read at 64 users
//! (docs/PERFORMANCE.md). Here a read is a closure pushed on a queue under one mutex; it notifies
//! the condition variable only if a reader thread sleeps on it, and a busy thread takes the next
//! read without sleeping. The answer goes back through a oneshot, as the writer's do.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use super::prepared::Db;
use super::{db, open_reader};
use crate::error::{Error, Result};

/// One queued read: it is given the thread's connection (or the error opening it) and answers
/// its caller itself.
type Job = Box<dyn for<'a, 'c> FnOnce(Result<&'a Db<'c>>) + Send>;

struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting on `ready` that no read has claimed yet.
    idle: usize,
    /// Set by `Drop`: the threads finish what is queued and exit.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The reader threads of one database file. Dropping it lets the threads finish the queued reads
/// and waits for them to exit.
pub(super) struct Readers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Readers {
    /// Starts `threads` reader threads on the file at `path`; each opens its connection at its
    /// first read (and again at the next read if opening failed).
    pub(super) fn start(path: &Path, threads: usize) -> Result<Readers> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                idle: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let mut readers = Readers {
            shared,
            threads: Vec::with_capacity(threads),
        };
        for _ in 0..threads {
            let shared = Arc::clone(&readers.shared);
            let path = path.to_path_buf();
            let thread = std::thread::Builder::new()
                .name("sqlite-reader".into())
                .spawn(move || serve(&shared, &path))
                .map_err(|e| Error::Internal(format!("cannot start a sqlite reader thread: {e}")))?;
            readers.threads.push(thread);
        }
        Ok(readers)
    }

    /// Queues `f` for a reader thread (now, not when the future is first polled); the future
    /// gives its result.
    pub(super) fn run<T, F>(&self, f: F) -> impl Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn: Result<&Db<'_>>| {
            let out = conn.and_then(|c| {
                catch_unwind(AssertUnwindSafe(|| f(c)))
                    .unwrap_or_else(|_| Err(Error::Internal("a sqlite read panicked".into())))
            });
            // The caller may have gone away (its request was cancelled).
            let _ = reply.send(out);
        });
        let (queued, wake) = {
            let mut q = self.shared.lock();
            if q.closed {
                (false, false)
            } else {
                q.jobs.push_back(job);
                // A sleeping thread is claimed and woken; a busy one finds the read when done.
                let wake = q.idle > 0;
                if wake {
                    q.idle -= 1;
                }
                (true, wake)
            }
        };
        // Notified after the lock is let go: a thread woken while it was held would sleep again
        // at once, on the mutex (two more `futex` calls per read, measured).
        if wake {
            self.shared.ready.notify_one();
        }
        async move {
            let stopped = || Error::Internal("the sqlite reader threads have stopped".into());
            if !queued {
                return Err(stopped());
            }
            answer.await.map_err(|_| stopped())?
        }
    }
}

/// A reader thread's loop: the queued reads in order, sleeping only when there are none. The
/// connection opens at the first read (a read that finds it failing is answered the error, and
/// the next tries again) and keeps its statements prepared from then on.
fn serve(shared: &Shared, path: &Path) {
    let (conn, first) = loop {
        let Some(job) = next(shared) else { return };
        match open_reader(path) {
            Ok(c) => break (c, job),
            Err(e) => job(Err(db(e))),
        }
    };
    let conn = Db::new(&conn);
    first(Ok(&conn));
    while let Some(job) = next(shared) {
        job(Ok(&conn));
    }
}

/// The next queued read, waiting for one; `None` once the readers are closed and none is left.
fn next(shared: &Shared) -> Option<Job> {
    let mut q = shared.lock();
    loop {
        if let Some(job) = q.jobs.pop_front() {
            return Some(job);
        } else if q.closed {
            return None;
        } else {
            // Counted idle until a read claims it (a spurious wake-up leaves it counted twice,
            // which costs at most one needless notification later).
            q.idle += 1;
            q = shared.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::sync::Barrier;

    fn readers(threads: usize) -> (Readers, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (k INTEGER PRIMARY KEY); INSERT INTO t VALUES (7)",
        )
        .unwrap();
        (Readers::start(&path, threads).unwrap(), dir)
    }

    fn count(c: &Db<'_>) -> Result<i64> {
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .map_err(db)
    }

    /// Two reads run at once on two threads: each waits for the other inside its read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_run_side_by_side_on_their_own_connections() {
        let (r, _dir) = readers(2);
        let both = Arc::new(Barrier::new(2));
        let read = |b: Arc<Barrier>| {
            r.run(move |c| {
                b.wait();
                count(c)
            })
        };
        let (a, b) = tokio::join!(read(both.clone()), read(both));
        assert_eq!((a, b), (Ok(1), Ok(1)));
    }

    /// A statement kept prepared between reads holds no read transaction open: a row another
    /// connection commits after the first read is seen by the next one on the same thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_statement_sees_what_was_committed_since_its_last_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE t (k INTEGER PRIMARY KEY); INSERT INTO t VALUES (7)",
            )
            .unwrap();
        let r = Readers::start(&path, 1).unwrap();
        let keys = || {
            r.run(|c| {
                c.with("SELECT k FROM t ORDER BY k", |s| {
                    s.query_map([], |row| row.get(0))?
                        .collect::<rusqlite::Result<Vec<i64>>>()
                })
                .and_then(|rows| rows)
                .map_err(db)
            })
        };
        assert_eq!(keys().await, Ok(vec![7]));
        writer.execute("INSERT INTO t VALUES (8)", []).unwrap();
        assert_eq!(keys().await, Ok(vec![7, 8]));
    }

    /// A read that panics answers an internal error; its thread goes on serving reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_read_answers_an_error_and_the_thread_serves_the_next() {
        let (r, _dir) = readers(1);
        let out = r.run(|_| -> Result<i64> { panic!("boom") }).await;
        assert_eq!(out, Err(Error::Internal("a sqlite read panicked".into())));
        assert_eq!(r.run(count).await, Ok(1));
    }

    /// The connections are read-only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_cannot_write() {
        let (r, _dir) = readers(1);
        let out = r
            .run(|c| c.execute("INSERT INTO t VALUES (8)", []).map_err(db))
            .await;
        assert!(matches!(out, Err(Error::Database(_))), "{out:?}");
        assert_eq!(r.run(count).await, Ok(1));
    }

    /// Reads queued behind a slow one on a single thread are all answered, in order, and dropping
    /// the readers waits for them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_reads_are_answered_before_the_threads_exit() {
        let (r, _dir) = readers(1);
        let slow = r.run(|c| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            count(c)
        });
        let queued: Vec<_> = (0..10i64)
            .map(|k| r.run(move |c| count(c).map(|n| n + k)))
            .collect();
        drop(r);
        assert_eq!(slow.await, Ok(1));
        let answers = futures::future::join_all(queued).await;
        assert_eq!(answers, (1..=10).map(Ok).collect::<Vec<_>>());
    }
}
