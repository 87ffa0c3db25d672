//! The writer thread: it owns the one write connection and applies queued writes in group
//! commits.
//!
//! Every write (a turn's commit, a lease change, creating or deleting a session) is a closure sent
//! to this thread. The thread takes whatever is queued (up to [`MAX_BATCH`]) and applies it in one
//! `BEGIN IMMEDIATE` transaction. Callers hear back only after the batch's `COMMIT`, so nothing is
//! reported stored before it is. Under load this turns many small transactions into a few larger
//! ones (WAL frames and the commit itself are paid once per batch) and replaces a thread hand-off
//! plus a contended mutex per write with one queue. With a single write queued, the batch is that
//! write's own transaction.
//!
//! A write of a batch runs without a savepoint of its own: a savepoint makes SQLite copy every
//! page the write changes into a statement journal in case it is rolled back, and past 64 KiB
//! that journal is a temporary file, written with system calls on every batch
//! (docs/PERFORMANCE.md, step 43). Instead a write that fails is judged by what it did: one that wrote nothing
//! (the expected failures: a head or lease mismatch, a session not found or already there, all
//! found before a row is touched; SQLite's total change count tells) is answered its error and the
//! batch goes on. One that fails after writing (a constraint, a panic, an I/O error that ended
//! the transaction) makes the whole batch roll back, and every write of it that had not failed
//! already is run again, alone, in a transaction of its own: one failing write still never fails
//! or half-applies another. That is why a write must be `Clone` (a batch of more than one runs a
//! copy and keeps the original for such a replay) and must not act outside the database in a way
//! that running it twice would break.
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
use super::heads::Heads;
use super::prepared::Db;
use crate::error::{Error, Result};

/// Most writes applied in one transaction. Each waits for the whole batch's commit, so the bound
/// keeps the first write's wait short (writes take tens of microseconds).
const MAX_BATCH: usize = 32;

/// Batches committed between two nudges of the checkpointer.
const CHECKPOINT_EVERY: u32 = 64;

/// The checkpointer looks at the WAL at least this often, nudged or not.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// WAL frames (4 KiB pages) past which the checkpointer, its passive checkpoint done, restarts
/// the WAL: under steady load a passive checkpoint never catches up with the writer (a commit
/// lands while it copies), so SQLite never starts the WAL over and it grew by every commit
/// (256 MB in a 7 s run at 64 users), each frame appended to a fresh page of the page cache,
/// which the kernel zeroes and the file system allocates (a third of the writer's CPU,
/// docs/PERFORMANCE.md). `RESTART` takes the write lock, copies what the passive one left (a
/// few commits), waits for readers of the old frames, and lets the next commit write from the
/// WAL's start, over pages the page cache already holds. The writer waits for it (its busy
/// handler) about once per this many frames.
const RESTART_FRAMES: i64 = 16384;

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    /// It succeeded: its changes are to be kept.
    Done,
    /// It answered an error.
    Failed,
    /// It panicked (what it did before is unknown).
    Panicked,
}

/// One queued write and where its answer goes.
trait Pending: Send {
    /// Runs the write (again, if it ran before: its earlier result is dropped first). With `keep`
    /// it runs a copy and keeps the write for a replay.
    fn run(&mut self, conn: &Db<'_>, keep: bool) -> Ran;
    /// Whether it ran and failed (its answer is final: a replay leaves it out).
    fn failed(&self) -> bool;
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
    F: FnOnce(&Db<'_>) -> Result<T> + Clone + Send,
{
    fn run(&mut self, conn: &Db<'_>, keep: bool) -> Ran {
        // An earlier run's result (rolled back with its batch) goes before the write runs again.
        self.out = None;
        let work = if keep { self.work.clone() } else { self.work.take() };
        let (out, ran) = match work {
            Some(work) => match catch_unwind(AssertUnwindSafe(|| work(conn))) {
                Ok(Ok(v)) => (Ok(v), Ran::Done),
                Ok(Err(e)) => (Err(e), Ran::Failed),
                Err(_) => (
                    Err(Error::Internal("a sqlite write panicked".into())),
                    Ran::Panicked,
                ),
            },
            None => (
                Err(Error::Internal("a sqlite write ran twice".into())),
                Ran::Failed,
            ),
        };
        self.out = Some(out);
        ran
    }

    fn failed(&self) -> bool {
        matches!(self.out, Some(Err(_)))
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
                // The statements the writes run stay prepared for the connection's life.
                // With the cache of session heads the writes keep (`heads`).
                let conn = Db::writer(&conn);
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
    /// (or its error: a failed write changes nothing). It may run more than once (a copy first,
    /// rolled back with its batch; see the module's doc): it must act on nothing but the
    /// connection, or only in ways it may repeat.
    pub(super) fn run<T, F>(&self, work: F) -> impl Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T> + Clone + Send + 'static,
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
/// costs a look at the WAL index. Once the WAL holds [`RESTART_FRAMES`], a `RESTART` checkpoint
/// follows the passive one, which the writer does wait for (briefly: the passive one left it
/// little to copy), so that the WAL is written over from its start rather than grown.
/// Durability is unchanged: commits are durable against a crash of the process when they return
/// (WAL, `synchronous = NORMAL`) either way; a checkpoint only moves committed pages from the WAL
/// into the database file.
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
                    if let Err(e) = checkpoint_once(&conn) {
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

/// One checkpoint: passive, then a restart of the WAL if it holds [`RESTART_FRAMES`] or more.
fn checkpoint_once(conn: &Connection) -> rusqlite::Result<()> {
    if checkpoint(conn, "PRAGMA wal_checkpoint(PASSIVE)")? >= RESTART_FRAMES {
        checkpoint(conn, "PRAGMA wal_checkpoint(RESTART)")?;
    }
    Ok(())
}

/// Runs a `wal_checkpoint` pragma; gives the frames the WAL held when it ran (-1 when the
/// connection is not in WAL mode).
fn checkpoint(conn: &Connection, pragma: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached(pragma)?.query_row([], |r| r.get::<_, i64>(1))
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

/// Applies one batch in one transaction, without savepoints (see the module's doc).
fn apply(conn: &Db<'_>, mut batch: Vec<Box<dyn Pending>>) {
    if let Err(e) = run(conn, "BEGIN IMMEDIATE") {
        conn.heads(Heads::clear);
        return answer_all(batch, Err(e));
    }
    // Another connection may have committed since this one's last transaction; the write lock
    // now keeps it out until the `COMMIT` (`heads`' doc).
    if let Err(e) = validate_heads(conn) {
        rollback(conn);
        return answer_all(batch, Err(e));
    }
    if let [single] = batch.as_mut_slice() {
        if single.run(conn, false) != Ran::Done {
            rollback(conn);
            // The write's own error is what its caller hears.
            return answer_all(batch, Ok(()));
        }
    } else {
        for job in batch.iter_mut() {
            let before = conn.total_changes();
            let ran = job.run(conn, true);
            // SQLite ends the transaction itself on some errors (I/O, disk full): then whatever
            // the batch wrote is gone, as after a write that failed having written.
            let clean = match ran {
                Ran::Done => !conn.is_autocommit(),
                Ran::Failed => !conn.is_autocommit() && conn.total_changes() == before,
                Ran::Panicked => false,
            };
            if !clean {
                rollback(conn);
                return replay(conn, batch);
            }
        }
    }
    let committed = run(conn, "COMMIT");
    if committed.is_err() {
        rollback(conn);
    }
    answer_all(batch, committed);
}

/// After a write of the batch failed having written, and the batch was rolled back: each write
/// that had not failed runs again alone, in its own transaction; those that failed are answered
/// their error (what they wrote went with the rollback).
fn replay(conn: &Db<'_>, batch: Vec<Box<dyn Pending>>) {
    tracing::debug!(
        writes = batch.len(),
        "a write failed after writing: its batch runs again, one write at a time"
    );
    for job in batch {
        if job.failed() {
            job.answer(Ok(()));
        } else {
            apply(conn, vec![job]);
        }
    }
}

/// Drops the cached session heads unless no other connection has committed since they were
/// known good.
fn validate_heads(conn: &Db<'_>) -> Result<()> {
    if conn.heads(|_| ()).is_none() {
        return Ok(());
    }
    let version: i64 = conn
        .query_row("PRAGMA data_version", [], |r| r.get(0))
        .map_err(db)?;
    conn.heads(|h| h.validate(version));
    Ok(())
}

/// Ends the open transaction, if SQLite has not ended it already, and drops the cached session
/// heads: what the batch's writes put there was never committed.
fn rollback(conn: &Db<'_>) {
    conn.heads(Heads::clear);
    if !conn.is_autocommit() {
        let _ = run(conn, "ROLLBACK");
    }
}

/// Runs one transaction-control statement, kept prepared (parsing it costs more than running it).
fn run(conn: &Db<'_>, sql: &'static str) -> Result<()> {
    conn.execute(sql, []).map(|_| ()).map_err(db)
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

    /// Writes queued behind a slow one share a batch; a write that fails or panics after writing
    /// changes nothing and answers its own error; the others are kept (replayed each alone, see
    /// the module's doc) and answered.
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

    /// Holds the writer thread for `ms` so that what is queued meanwhile forms one batch.
    fn hold(w: &Arc<Writer>, ms: u64) -> tokio::task::JoinHandle<Result<()>> {
        let w = w.clone();
        tokio::spawn(async move {
            w.run(move |_| {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(())
            })
            .await
        })
    }

    /// A write that fails before writing anything (a refused lease, a missing session) costs the
    /// others of its batch nothing: each runs once, in the one transaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_refused_before_writing_leaves_its_batch_to_commit_as_is() {
        let (w, _dir) = writer();
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let held = hold(&w, 150);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let write = |k: i64| {
            let runs = runs.clone();
            w.run(move |c| {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if k == 2 {
                    // Looks first, finds what it needs missing, writes nothing.
                    let found: i64 = c
                        .query_row("SELECT count(*) FROM t WHERE k = 99", [], |r| r.get(0))
                        .map_err(db)?;
                    return Err(Error::SessionNotFound(format!("{k}: {found} rows")));
                }
                c.execute("INSERT INTO t VALUES (?1, 'x')", [k]).map_err(db)
            })
        };
        let (a, b, c) = tokio::join!(write(1), write(2), write(3));
        held.await.unwrap().unwrap();
        assert_eq!(
            (a, b, c),
            (Ok(1), Err(Error::SessionNotFound("2: 0 rows".into())), Ok(1))
        );
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(keys(&w).await.unwrap(), vec![1, 3]);
    }

    /// A write that fails after writing rolls its batch back; the writes that had succeeded before
    /// it and those queued after it run again (or for the first time) each alone, and land once;
    /// the failed one is answered its error and leaves nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_failing_after_writing_makes_its_batch_replay_one_write_at_a_time() {
        let (w, _dir) = writer();
        let runs: Arc<Vec<std::sync::atomic::AtomicUsize>> =
            Arc::new((0..4).map(|_| std::sync::atomic::AtomicUsize::new(0)).collect());
        let held = hold(&w, 150);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let write = |k: i64| {
            let runs = runs.clone();
            w.run(move |c| {
                runs[k as usize].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                c.execute("INSERT INTO t VALUES (?1, 'x')", [k]).map_err(db)?;
                if k == 1 {
                    // A second row that collides with the first: a constraint error after a write.
                    c.execute("INSERT INTO t VALUES (?1, 'again')", [k]).map_err(db)?;
                }
                Ok(k)
            })
        };
        let (a, b, c, d) = tokio::join!(write(0), write(1), write(2), write(3));
        held.await.unwrap().unwrap();
        assert_eq!((&a, &c, &d), (&Ok(0), &Ok(2), &Ok(3)));
        // Not the batch's error: the write's own (the primary key's constraint).
        let Err(Error::Database(why)) = &b else {
            panic!("expected the write's constraint error, got {b:?}")
        };
        assert!(why.contains("UNIQUE"), "{why}");
        let runs: Vec<usize> = runs
            .iter()
            .map(|r| r.load(std::sync::atomic::Ordering::SeqCst))
            .collect();
        // 0 ran in the batch, then alone; 1 failed in the batch and was not run again; 2 and 3
        // had not run when the batch rolled back, and ran alone.
        assert_eq!(runs, vec![2, 1, 1, 1]);
        assert_eq!(keys(&w).await.unwrap(), vec![0, 2, 3]);
    }

    /// A write that fails before writing, in a batch another write's failure replays, keeps its
    /// own answer and is not run again; a panic after writing is replayed around the same way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replayed_batch_answers_each_write_as_if_it_had_run_alone() {
        let (w, _dir) = writer();
        let held = hold(&w, 150);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let refused = w.run(|_| Err::<(), _>(Error::SessionBusy("taken".into())));
        let kept = w.run(|c| c.execute("INSERT INTO t VALUES (7, 'kept')", []).map_err(db));
        let panicked = w.run(|c| -> Result<usize> {
            c.execute("INSERT INTO t VALUES (8, 'gone')", []).map_err(db)?;
            panic!("after writing")
        });
        let after = w.run(|c| c.execute("INSERT INTO t VALUES (9, 'after')", []).map_err(db));
        let (refused, kept, panicked, after) = tokio::join!(refused, kept, panicked, after);
        held.await.unwrap().unwrap();
        assert_eq!(refused, Err(Error::SessionBusy("taken".into())));
        assert_eq!(kept, Ok(1));
        assert_eq!(panicked, Err(Error::Internal("a sqlite write panicked".into())));
        assert_eq!(after, Ok(1));
        assert_eq!(keys(&w).await.unwrap(), vec![7, 9]);
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

    /// The frames of the WAL at `path` and how many of them are in the database file, from a
    /// connection of its own (a passive checkpoint).
    fn wal_frames(path: &std::path::Path) -> (i64, i64) {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })
            .unwrap()
    }

    /// A WAL of at least `frames` frames (autocheckpoint off); gives its connection and the
    /// rows it wrote.
    fn wal_of(path: &std::path::Path, frames: i64) -> (Connection, i64) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)",
        )
        .unwrap();
        let blob = vec![7u8; 3000];
        let mut rows = 0;
        // Counted from the file's size: a checkpoint here would let the WAL start over.
        let wal = path.with_extension("db-wal");
        let written = || (std::fs::metadata(&wal).map_or(0, |m| m.len()) as i64 - 32) / 4120;
        while written() < frames {
            for _ in 0..64 {
                conn.execute("INSERT INTO t VALUES (?1, ?2)", params![rows, blob])
                    .unwrap();
                rows += 1;
            }
        }
        (conn, rows)
    }

    /// A WAL grown past `RESTART_FRAMES` while a reader holds an old snapshot: the passive
    /// checkpoint copies it, and the restart waits for that reader to finish, so the next commit
    /// writes from the WAL's start (a passive checkpoint alone returns at once, and a commit
    /// while the reader is still there appends to the WAL: under load there always is one).
    /// Nothing is lost.
    #[test]
    fn a_wal_grown_past_the_restart_size_is_started_over_once_its_readers_are_done() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let (writer, rows) = wal_of(&path, RESTART_FRAMES);
        let (reading, read) = mpsc::channel();
        let reader = {
            let path = path.clone();
            std::thread::spawn(move || {
                let conn = Connection::open(&path).unwrap();
                conn.execute_batch("BEGIN").unwrap();
                let n: i64 = conn
                    .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .unwrap();
                reading.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                conn.execute_batch("COMMIT").unwrap();
                n
            })
        };
        read.recv().unwrap();
        checkpoint_once(&Connection::open(&path).unwrap()).unwrap();
        writer
            .execute("INSERT INTO t VALUES (?1, ?2)", params![rows, [1u8]])
            .unwrap();
        let (frames, _) = wal_frames(&path);
        assert!(frames < 8, "the WAL went on from {frames} frames");
        assert_eq!(reader.join().unwrap(), rows);
        let n: i64 = writer
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, rows + 1);
    }

    /// A smaller WAL is only copied: its frames stay until a commit finds no reader on them.
    #[test]
    fn a_checkpoint_of_a_small_wal_copies_it_and_leaves_it_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (_writer, _) = wal_of(&path, 64);
        let (frames, _) = wal_frames(&path);
        checkpoint_once(&Connection::open(&path).unwrap()).unwrap();
        assert_eq!(wal_frames(&path), (frames, frames));
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
