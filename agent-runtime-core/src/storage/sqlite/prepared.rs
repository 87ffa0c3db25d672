//! A connection with the statements it keeps prepared, found by the address of their SQL text:
//! the writer's and each reader's thread hold one for as long as their connection lives.
//!
//! rusqlite's statement cache (`prepare_cached`) finds a statement by hashing its whole SQL text,
//! moves it out of an LRU list and back, hashing the text again, and clears every bound parameter
//! on the way back (a 16-row `INSERT` has 113): about 1.5 k instructions per statement run, some
//! 110 k per scenario (docs/PERFORMANCE.md, step 54). Every statement the storage runs often is a
//! `&'static str` (a literal, or built once in a static), so its address and length name it: a
//! look-up here compares two words per statement kept, and bindings stay until the next run
//! binds over them. The same text placed at two addresses (a `const` used in two places may be)
//! is kept twice, which costs a second preparation and nothing else.

use std::cell::RefCell;
use std::ops::Deref;

use rusqlite::{Connection, PrepFlags, Statement};

use super::heads::Heads;

/// What names a statement's SQL text: its address and length.
type Key = (usize, usize);

/// A kept statement (`None` while it runs).
type Kept<'c> = (Key, Option<Statement<'c>>);

/// A connection (borrowed from the thread that owns it) and its kept statements.
pub(super) struct Db<'c> {
    conn: &'c Connection,
    kept: RefCell<Vec<Kept<'c>>>,
    /// The writer's cache of session heads (`heads`); `None` on a reader's connection.
    heads: Option<RefCell<Heads>>,
}

impl<'c> Db<'c> {
    pub(super) fn new(conn: &'c Connection) -> Db<'c> {
        Db {
            conn,
            kept: RefCell::new(Vec::new()),
            heads: None,
        }
    }

    /// The writer's connection: with a cache of session heads, which the writer keeps true
    /// (`heads`' doc).
    pub(super) fn writer(conn: &'c Connection) -> Db<'c> {
        Db {
            heads: Some(RefCell::new(Heads::default())),
            ..Db::new(conn)
        }
    }

    /// Runs `f` on the cache of session heads, if this is the writer's connection.
    pub(super) fn heads<R>(&self, f: impl FnOnce(&mut Heads) -> R) -> Option<R> {
        self.heads.as_ref().map(|h| f(&mut h.borrow_mut()))
    }

    /// Runs `f` on the statement of `sql`, prepared at its first use and kept for the next. A
    /// statement used again while it runs (not done today) is prepared a second time for that use.
    /// Its error is only that of preparing the statement; what `f` gives is its own.
    pub(super) fn with<R>(
        &self,
        sql: &'static str,
        f: impl FnOnce(&mut Statement<'c>) -> R,
    ) -> rusqlite::Result<R> {
        let key: Key = (sql.as_ptr() as usize, sql.len());
        let taken = self
            .kept
            .borrow_mut()
            .iter_mut()
            .find(|(k, _)| *k == key)
            .and_then(|(_, s)| s.take());
        let mut stmt = match taken {
            Some(s) => s,
            None => self
                .conn
                .prepare_with_flags(sql, PrepFlags::SQLITE_PREPARE_PERSISTENT)?,
        };
        let out = f(&mut stmt);
        let mut kept = self.kept.borrow_mut();
        match kept.iter_mut().find(|(k, _)| *k == key) {
            Some((_, slot)) => {
                if slot.is_none() {
                    *slot = Some(stmt);
                }
            }
            None => kept.push((key, Some(stmt))),
        }
        Ok(out)
    }

    /// `Statement::query_row` on the kept statement of `sql`.
    pub(super) fn query_row<T, P: rusqlite::Params>(
        &self,
        sql: &'static str,
        params: P,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.with(sql, |s| s.query_row(params, f)).and_then(|r| r)
    }

    /// `Statement::execute` on the kept statement of `sql`.
    pub(super) fn execute<P: rusqlite::Params>(
        &self,
        sql: &'static str,
        params: P,
    ) -> rusqlite::Result<usize> {
        self.with(sql, |s| s.execute(params)).and_then(|r| r)
    }
}

/// Everything else (migrations, rare and dynamic statements) uses the connection as it is.
impl Deref for Db<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn table() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        conn
    }

    // Statics, not constants: a constant's text may be placed anew where it is used, and each
    // copy is kept as a statement of its own.
    static INSERT: &str = "INSERT INTO t VALUES (?1, ?2)";
    static COUNT: &str = "SELECT count(*), group_concat(v) FROM t";

    /// A statement is prepared once and run again with new bindings; each run sees the rows of
    /// the ones before.
    #[test]
    fn a_kept_statement_runs_again_with_its_new_parameters() {
        let conn = table();
        let db = Db::new(&conn);
        for (k, v) in [(1, "a"), (2, "b"), (3, "c")] {
            assert_eq!(db.execute(INSERT, rusqlite::params![k, v]), Ok(1));
        }
        let seen = db.query_row(COUNT, [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)));
        assert_eq!(seen, Ok((3, "a,b,c".to_string())));
        assert_eq!(db.kept.borrow().len(), 2);
    }

    /// A statement used inside its own run gets a second copy for that use; both answer.
    #[test]
    fn a_statement_used_while_it_runs_is_prepared_again_for_that_use() {
        let conn = table();
        let db = Db::new(&conn);
        db.execute(INSERT, rusqlite::params![1, "a"]).unwrap();
        let nested = db.query_row(COUNT, [], |outer| {
            let inner = db.query_row(COUNT, [], |r| r.get::<_, i64>(0))?;
            Ok((outer.get::<_, i64>(0)?, inner))
        });
        assert_eq!(nested, Ok((1, 1)));
        assert_eq!(db.kept.borrow().len(), 2);
    }

    /// A statement that fails to prepare is an error and keeps nothing.
    #[test]
    fn a_statement_that_does_not_prepare_is_an_error_and_is_not_kept() {
        let conn = table();
        let db = Db::new(&conn);
        let out = db.execute("INSERT INTO missing VALUES (1)", []);
        assert!(matches!(out, Err(rusqlite::Error::SqliteFailure(..))), "{out:?}");
        assert!(db.kept.borrow().is_empty());
    }
}
