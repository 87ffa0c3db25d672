//! Why a store did not open, in words an operator can act on: the cause (a missing directory, a
//! missing database or role, a refused port) and the fix. Never the password.

#[cfg(feature = "sqlite")]
use std::path::Path;

use crate::error::Error;

/// A SQLite file that could not be opened or set up: `path` as `DATABASE_URL` named it.
#[cfg(feature = "sqlite")]
pub(crate) fn sqlite_open(path: &Path, e: &rusqlite::Error) -> Error {
    use rusqlite::ErrorCode;
    let shown = path.display();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let code = e.sqlite_error_code();
    let cause = if path.is_dir() {
        format!("{shown} is a directory — name a file in it, e.g. sqlite://{shown}/agent-runtime.db")
    } else if let Some(dir) = dir.filter(|d| !d.exists()) {
        format!(
            "directory {} does not exist — create it or choose another DATABASE_URL",
            dir.display()
        )
    } else if let Some(dir) = dir.filter(|d| !d.is_dir()) {
        format!(
            "{} is not a directory — choose another DATABASE_URL",
            dir.display()
        )
    } else if code == Some(ErrorCode::NotADatabase) {
        format!("{shown} is not a SQLite database — choose another file in DATABASE_URL")
    } else if matches!(
        code,
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly)
    ) {
        format!(
            "cannot open or create {shown} ({e}) — check that this user may read and write it and its directory"
        )
    } else {
        format!("cannot open {shown}: {e}")
    };
    Error::Database(cause)
}

/// Where a Postgres URL points, for messages: `host:port`, the database and the user.
#[cfg(feature = "postgres")]
pub(crate) struct PgTarget {
    address: String,
    database: String,
    user: String,
}

#[cfg(feature = "postgres")]
impl PgTarget {
    pub(crate) fn of(options: &sqlx::postgres::PgConnectOptions) -> Self {
        let address = match options.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", options.get_host(), options.get_port()),
        };
        let user = options.get_username().to_string();
        PgTarget {
            address,
            // Postgres' own default: a database named after the user.
            database: options.get_database().unwrap_or(&user).to_string(),
            user,
        }
    }

    /// The server did not answer within `secs` seconds.
    pub(crate) fn timed_out(&self, secs: u64) -> Error {
        Error::Database(format!(
            "cannot connect to {} (no answer within {secs} s) — is PostgreSQL running there, and may this machine reach it?",
            self.address
        ))
    }

    /// A connection attempt that failed with `e`.
    pub(crate) fn connect_failed(&self, e: &sqlx::Error) -> Error {
        let address = &self.address;
        let cause = match e {
            sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                format!("cannot connect to {address} (connection refused) — is PostgreSQL running there?")
            }
            sqlx::Error::Io(io) => {
                format!("cannot connect to {address} ({io}) — check the host and port in DATABASE_URL")
            }
            sqlx::Error::Tls(tls) => {
                format!("cannot connect to {address}: TLS failed ({tls}) — check sslmode in DATABASE_URL")
            }
            sqlx::Error::Database(db) => self.refused_by_server(db.code().as_deref(), db.message()),
            other => format!("cannot connect to {address}: {other}"),
        };
        Error::Database(cause)
    }

    /// The server answered and refused: SQLSTATE `code`, its `message`.
    fn refused_by_server(&self, code: Option<&str>, message: &str) -> String {
        let (database, user) = (&self.database, &self.user);
        match code {
            // invalid_catalog_name
            Some("3D000") => {
                format!("database \"{database}\" does not exist — create it with createdb {database}")
            }
            // invalid_authorization_specification: an unknown role, or no pg_hba.conf entry.
            Some("28000") if message.starts_with("role ") => format!(
                "{message} — create it with createuser {user}, or name an existing user in DATABASE_URL"
            ),
            Some("28000") => format!(
                "{message} — allow user \"{user}\" in the server's pg_hba.conf, or name another user in DATABASE_URL"
            ),
            // invalid_password
            Some("28P01") => format!("{message} — check the password in DATABASE_URL"),
            Some(code) => format!(
                "{} refused the connection: {message} (SQLSTATE {code})",
                self.address
            ),
            None => format!("{} refused the connection: {message}", self.address),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "postgres")]
    fn target(url: &str) -> PgTarget {
        use std::str::FromStr;
        PgTarget::of(&sqlx::postgres::PgConnectOptions::from_str(url).unwrap())
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn a_refusing_server_is_named_by_its_cause_and_fix() {
        let t = target("postgres://alice:s3cret@db.example:6543/shop");
        let cases = [
            (
                Some("3D000"),
                "database \"shop\" does not exist",
                "database \"shop\" does not exist — create it with createdb shop",
            ),
            (
                Some("28000"),
                "role \"alice\" does not exist",
                "role \"alice\" does not exist — create it with createuser alice, or name an existing user in DATABASE_URL",
            ),
            (
                Some("28P01"),
                "password authentication failed for user \"alice\"",
                "password authentication failed for user \"alice\" — check the password in DATABASE_URL",
            ),
            (
                Some("53300"),
                "too many connections",
                "db.example:6543 refused the connection: too many connections (SQLSTATE 53300)",
            ),
        ];
        for (code, message, expected) in cases {
            assert_eq!(t.refused_by_server(code, message), expected);
        }
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn without_a_database_in_the_url_the_user_name_is_the_database() {
        let t = target("postgres://bob@127.0.0.1/");
        assert_eq!(
            t.refused_by_server(Some("3D000"), "database \"bob\" does not exist"),
            "database \"bob\" does not exist — create it with createdb bob"
        );
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn a_sqlite_path_in_a_missing_directory_names_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/x.db");
        let e = rusqlite::Connection::open(&path).unwrap_err();
        assert_eq!(
            sqlite_open(&path, &e),
            Error::Database(format!(
                "directory {} does not exist — create it or choose another DATABASE_URL",
                dir.path().join("no/such").display()
            ))
        );
    }
}
