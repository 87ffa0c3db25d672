//! The writer thread: it owns the one write connection and applies queued writes in group
//! commits.
//!
//! Every write (a turn's commit, a lease change, creating or deleting a session) is a closure sent
//! to this thread. The thread takes whatever is queued (up to [`MAX_BATCH`]) and applies it in one
//! `BEGIN IMMEDIATE` transaction, each write inside its own savepoint: a write that fails is rolled
//! back to its savepoint and answers its error, the others are kept. Callers hear back only after
//! the batch's `COMMIT`, so nothing is reported stored before it is. Under load this turns many
//! small transactions into a few larger ones (WAL frames and the commit itself are paid once per
//! batch) and replaces a thread hand-off plus a contended mutex per write with one queue. With a
//! single write queued, the batch is that write's own transaction, as before.
//!
//! WAL checkpoints run on a thread of their own ([`Checkpointer`]), not inside a commit: SQLite's
//! automatic checkpoint runs in the commit that crosses its threshold and fsyncs the WAL and the
//! database file there, so one write in a few hundred waited for two fsyncs (the single-user
//! turn's p99, docs/PERFORMANCE.md). A passive checkpoint on another connection copies the same
//! pages while the writer goes on appending.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::db;
use crate::error::{Error, Result};

/// Most writes applied in one transaction. Each waits for the whole batch's commit, so the bound
/// keeps the first write's wait short (writes take tens of microseconds).
const MAX_BATCH: usize = 32;

/// Batches committed between two nudges of the checkpointer.
const CHECKPOINT_EVERY: u32 = 64;

/// The checkpointer looks at the WAL at least this often, nudged or not.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// One queued write and where its answer goes.
trait Pending: Send {
    /// Runs the write; `true` if it succeeded (its changes are to be kept).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: the write's own result, or `batch`'s error if the batch was not
    /// committed.
    fn answer(self: Box<Self>, batch: Result<()>);
}

struct Task<T, F> {
    work: Option<F>,
    out: Option<Result<T>>,
    reply: tokio::sync::oneshot::Sender<Result<T>>,
}

impl<T, F> Pending for Task<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let out = match self.work.take() {
            Some(work) => catch_unwind(AssertUnwindSafe(|| work(conn)))
                .unwrap_or_else(|_| Err(Error::Internal("a sqlite write panicked".into()))),
            None => Err(Error::Internal("a sqlite write ran twice".into())),
        };
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn answer(self: Box<Self>, batch: Result<()>) {
        let out = match (self.out, batch) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(_)) | None, Err(e)) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, Ok(())) => Err(Error::Internal("a sqlite write was never run".into())),
        };
        // The caller may have gone away (its request was cancelled); the write stands.
        let _ = self.reply.send(out);
    }
}

/// The handle to the writer thread. Dropping it lets the thread finish what is queued, close the
/// connection (checkpointing the WAL) and exit; the drop waits for that.
pub(super) struct Writer {
    queue: Option<mpsc::Sender<Box<dyn Pending>>>,
    thread: Option<JoinHandle<()>>,
    /// Stopped after the writer thread has ended.
    checkpointer: Option<Checkpointer>,
}

impl Writer {
    /// Starts the thread that owns `conn`; with `checkpoints` (a second connection to the same
    /// file), the WAL is checkpointed on a thread of its own instead of inside commits.
    pub(super) fn start(conn: Connection, checkpoints: Option<Connection>) -> Result<Writer> {
        let checkpointer = match checkpoints {
            Some(c) => {
                // Off for the writer's connection only: the checkpointer does it instead.
                conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(db)?;
                Some(Checkpointer::start(c)?)
            }
            None => None,
        };
        let nudge = checkpointer.as_ref().map(|c| c.nudge.clone());
        let (queue, jobs) = mpsc::channel::<Box<dyn Pending>>();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let mut since_nudge = 0u32;
                while let Ok(first) = jobs.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match jobs.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    apply(&conn, batch);
                    since_nudge += 1;
                    if since_nudge >= CHECKPOINT_EVERY {
                        since_nudge = 0;
                        if let Some(n) = &nudge {
                            // Full means a nudge is already waiting: one is enough.
                            let _ = n.try_send(());
                        }
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the sqlite writer thread: {e}")))?;
        Ok(Writer {
            queue: Some(queue),
            thread: Some(thread),
            checkpointer,
        })
    }

    /// Queues `work` for the write connection (now, not when the future is first polled); it runs
    /// inside a transaction, and the future gives its result once that transaction is committed
    /// (or its error: a failed write changes nothing).
    pub(super) fn run<T, F>(&self, work: F) -> impl Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let task: Box<dyn Pending> = Box::new(Task {
            work: Some(work),
            out: None,
            reply,
        });
        let queued = self.queue.as_ref().is_some_and(|q| q.send(task).is_ok());
        async move {
            let stopped = || Error::Internal("the sqlite writer thread has stopped".into());
            if !queued {
                return Err(stopped());
            }
            answer.await.map_err(|_| stopped())?
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The writer thread (and its copy of the nudge) is gone: the checkpointer sees its
        // channel closed and ends.
        drop(self.checkpointer.take());
    }
}

/// The thread that checkpoints the WAL: passively (it never waits for the writer or readers, and
/// they never wait for it), when the writer has committed [`CHECKPOINT_EVERY`] batches since the
/// last nudge, and at least every [`CHECKPOINT_IDLE`]. A checkpoint with nothing new to copy
/// costs a look at the WAL index. Durability is unchanged: commits are durable against a crash of
/// the process when they return (WAL, `synchronous = NORMAL`) either way; a checkpoint only moves
/// committed pages from the WAL into the database file.
struct Checkpointer {
    nudge: mpsc::SyncSender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(conn: Connection) -> Result<Checkpointer> {
        let (nudge, nudges) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                loop {
                    match nudges.recv_timeout(CHECKPOINT_IDLE) {
                        Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    let done = conn
                        .prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")
                        .and_then(|mut s| s.query_row([], |_| Ok(())));
                    if let Err(e) = done {
                        tracing::warn!(error = %e, "a WAL checkpoint failed; the next one retries");
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the sqlite checkpoint thread: {e}")))?;
        Ok(Checkpointer {
            nudge,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Replacing the sender drops the last one: the thread sees the disconnection and ends.
        let (closed, _) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.nudge, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Applies one batch in one transaction (savepoints only when there is more than one write).
fn apply(conn: &Connection, mut batch: Vec<Box<dyn Pending>>) {
    if let Err(e) = run(conn, "BEGIN IMMEDIATE") {
        return answer_all(batch, Err(e));
    }
    if let [single] = batch.as_mut_slice() {
        if !single.run(conn) {
            let _ = run(conn, "ROLLBACK");
            // The write's own error is what its caller hears.
            return answer_all(batch, Ok(()));
        }
    } else if let Err(e) = batch.iter_mut().try_for_each(|job| in_savepoint(conn, job)) {
        let _ = run(conn, "ROLLBACK");
        return answer_all(batch, Err(e));
    }
    let committed = run(conn, "COMMIT");
    if committed.is_err() {
        let _ = run(conn, "ROLLBACK");
    }
    answer_all(batch, committed);
}

/// Runs one write of a batch in its own savepoint, rolled back to if the write fails. `Err` only
/// when the savepoint statements themselves fail (the whole batch is then rolled back).
fn in_savepoint(conn: &Connection, job: &mut Box<dyn Pending>) -> Result<()> {
    run(conn, "SAVEPOINT write")?;
    if !job.run(conn) {
        run(conn, "ROLLBACK TO write")?;
    }
    run(conn, "RELEASE write")
}

/// Runs one transaction-control statement, kept prepared (parsing it costs more than running it).
fn run(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(db)
}

fn answer_all(batch: Vec<Box<dyn Pending>>, outcome: Result<()>) {
    for job in batch {
        job.answer(outcome.clone());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use rusqlite::params;
    use std::sync::Arc;
    use std::time::Duration;

    fn writer() -> (Arc<Writer>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("w.db")).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        (Arc::new(Writer::start(conn, None).unwrap()), dir)
    }

    fn keys(w: &Writer) -> impl Future<Output = Result<Vec<i64>>> {
        w.run(|c| {
            let mut s = c.prepare("SELECT k FROM t ORDER BY k").map_err(db)?;
            let rows = s.query_map([], |r| r.get(0)).map_err(db)?;
            rows.collect::<rusqlite::Result<Vec<i64>>>().map_err(db)
        })
    }

    /// Writes queued behind a slow one share a batch; a failing or panicking write is rolled back
    /// alone (to its savepoint) and answers its own error; the others are kept and answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_in_a_batch_changes_nothing_and_spares_the_others() {
        let (w, _dir) = writer();
        // Holds the thread so that the writes below queue up into one batch.
        let slow = tokio::spawn({
            let w = w.clone();
            async move {
                w.run(|c| {
                    std::thread::sleep(Duration::from_millis(200));
                    c.execute("INSERT INTO t VALUES (0, 'slow')", []).map_err(db)
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut writes = Vec::new();
        for k in 1..=20i64 {
            let w = w.clone();
            writes.push(tokio::spawn(async move {
                w.run(move |c| {
                    c.execute("INSERT INTO t VALUES (?1, 'x')", [k]).map_err(db)?;
                    match k % 5 {
                        // Fails after writing: the insert above must not survive.
                        0 => Err(Error::InvalidRequest(format!("refused {k}"))),
                        3 if k == 13 => panic!("boom"),
                        _ => Ok(k),
                    }
                })
                .await
            }));
        }
        assert_eq!(slow.await.unwrap(), Ok(1));
        for (i, h) in writes.into_iter().enumerate() {
            let k = i as i64 + 1;
            let out = h.await.unwrap();
            match k {
                _ if k % 5 == 0 => assert_eq!(out, Err(Error::InvalidRequest(format!("refused {k}")))),
                13 => assert!(matches!(out, Err(Error::Internal(_))), "{out:?}"),
                _ => assert_eq!(out, Ok(k)),
            }
        }
        let expected: Vec<i64> = (0..=20)
            .filter(|k| k % 5 != 0 || *k == 0)
            .filter(|k| *k != 13)
            .collect();
        assert_eq!(keys(&w).await.unwrap(), expected);
    }

    /// A write that violates a constraint mid-batch is its own error, not the batch's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_constraint_error_is_answered_to_its_write_only() {
        let (w, _dir) = writer();
        let hold = {
            let w = w.clone();
            tokio::spawn(async move {
                w.run(|_| {
                    std::thread::sleep(Duration::from_millis(100));
                    Ok(())
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let a = w.run(|c| c.execute("INSERT INTO t VALUES (1, 'a')", []).map_err(db));
        let b = w.run(|c| c.execute("INSERT INTO t VALUES (1, 'b')", []).map_err(db));
        let c = w.run(|c| c.execute("INSERT INTO t VALUES (2, 'c')", []).map_err(db));
        let (a, b, c) = tokio::join!(a, b, c);
        hold.await.unwrap().unwrap();
        assert_eq!(a, Ok(1));
        assert!(matches!(b, Err(Error::Database(_))), "{b:?}");
        assert_eq!(c, Ok(1));
        assert_eq!(keys(&w).await.unwrap(), vec![1, 2]);
    }

    /// With a checkpoint connection the writer's commits never checkpoint (its automatic
    /// checkpoint is off), and the checkpointer thread still moves committed pages into the
    /// database file on its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_checkpointed_by_its_own_thread_not_by_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        let empty = std::fs::metadata(&path).unwrap().len();
        let w = Writer::start(conn, Some(Connection::open(&path).unwrap())).unwrap();
        let autocheckpoint = w
            .run(|c| {
                c.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get::<_, i64>(0))
                    .map_err(db)
            })
            .await;
        assert_eq!(autocheckpoint, Ok(0));
        let blob = "x".repeat(64 * 1024);
        for k in 0..16i64 {
            let v = blob.clone();
            w.run(move |c| {
                c.execute("INSERT INTO t VALUES (?1, ?2)", params![k, v])
                    .map_err(db)
            })
            .await
            .unwrap();
        }
        // Only a checkpoint writes the rows into the database file; the thread runs at least
        // every CHECKPOINT_IDLE. Waits for it (bounded), asserting nothing about how soon.
        let mut size = empty;
        for _ in 0..400 {
            size = std::fs::metadata(&path).unwrap().len();
            if size > 16 * 64 * 1024 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            size > 16 * 64 * 1024,
            "the database file stayed at {size} bytes ({empty} empty)"
        );
        drop(w);
        let n: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 16);
    }

    /// Dropping the handle lets queued writes finish and be committed first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_finishes_queued_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY)")
            .unwrap();
        let w = Writer::start(conn, None).unwrap();
        let pending: Vec<_> = (0..10)
            .map(|k| w.run(move |c| c.execute("INSERT INTO t VALUES (?1)", [k]).map_err(db)))
            .collect();
        drop(w);
        let all = tokio::spawn(futures::future::join_all(pending));
        assert!(all.await.unwrap().iter().all(|r| *r == Ok(1)));
        let n: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 10);
    }
}
