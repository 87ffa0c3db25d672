//! Start-up of the real binary against storage it cannot open: the operator reads the cause and
//! the fix on one stderr line, never a password, and no `listening on` precedes the failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;

use common::spawn_raw;

/// What a start-up with `database_url` ended with.
#[derive(Debug)]
struct Failed {
    exit_code: i32,
    stdout: String,
    /// The lines the server addresses to the operator (`agent-runtime-server: ...`).
    message: Vec<String>,
    stderr: String,
}

fn start_with(env: &[(&str, &str)]) -> Failed {
    let mut child = spawn_raw(&["--port", "0"], env);
    let status = child.wait().unwrap();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let message = stderr
        .lines()
        .filter(|l| l.starts_with("agent-runtime-server: "))
        .map(String::from)
        .collect();
    Failed {
        exit_code: status.code().unwrap(),
        stdout,
        message,
        stderr,
    }
}

/// Asserts a refused start-up: exit code 2, nothing on stdout (no `listening on`), exactly
/// `expected` as the operator's line.
fn assert_refused(database_url: &str, expected: &str) -> Failed {
    let failed = start_with(&[("DATABASE_URL", database_url)]);
    assert_eq!(
        (failed.exit_code, failed.stdout.as_str(), failed.message.clone()),
        (2, "", vec![format!("agent-runtime-server: {expected}")]),
        "{failed:#?}"
    );
    failed
}

#[test]
fn a_sqlite_file_in_a_missing_directory_names_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    assert_refused(
        &format!("sqlite://{}/agent-runtime.db", missing.display()),
        &format!(
            "DATABASE_URL: directory {} does not exist — create it or choose another DATABASE_URL",
            missing.display()
        ),
    );
    assert!(!missing.exists());
}

#[test]
fn a_sqlite_url_naming_a_directory_asks_for_a_file_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    assert_refused(
        &format!("sqlite://{d}"),
        &format!("DATABASE_URL: {d} is a directory — name a file in it, e.g. sqlite://{d}/agent-runtime.db"),
    );
}

#[test]
fn a_file_that_is_not_a_sqlite_database_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    let text = "not a database, just some text that is long enough to fill a header page. ".repeat(8);
    std::fs::write(&file, &text).unwrap();
    assert_refused(
        &format!("sqlite://{}", file.display()),
        &format!(
            "DATABASE_URL: {} is not a SQLite database — choose another file in DATABASE_URL",
            file.display()
        ),
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
}

#[test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs a Postgres server: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
fn a_missing_postgres_database_is_named_with_the_command_that_creates_it() {
    let failed = assert_refused(
        "postgres://postgres:hunter2@127.0.0.1:5432/agent_runtime_no_such_db",
        "DATABASE_URL: database \"agent_runtime_no_such_db\" does not exist — create it with createdb agent_runtime_no_such_db",
    );
    assert!(!failed.stderr.contains("hunter2"), "{}", failed.stderr);
}

#[test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs a Postgres server: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
fn an_unknown_postgres_role_is_named_without_its_password() {
    let failed = assert_refused(
        "postgres://agent_runtime_no_such_role:hunter2@127.0.0.1:5432/test",
        "DATABASE_URL: role \"agent_runtime_no_such_role\" does not exist — create it with createuser agent_runtime_no_such_role, or name an existing user in DATABASE_URL",
    );
    assert!(!failed.stderr.contains("hunter2"), "{}", failed.stderr);
}

#[test]
fn a_port_where_no_postgres_listens_is_named_as_refused() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let failed = assert_refused(
        &format!("postgresql://postgres:hunter2@127.0.0.1:{port}/test"),
        &format!(
            "DATABASE_URL: cannot connect to 127.0.0.1:{port} (connection refused) — is PostgreSQL running there?"
        ),
    );
    assert!(!failed.stderr.contains("hunter2"), "{}", failed.stderr);
}

#[test]
fn a_start_up_that_fails_after_opening_storage_prints_no_listening_line() {
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("agents.json");
    let failed = start_with(&[
        (
            "DATABASE_URL",
            &format!("sqlite://{}/ok.db", dir.path().display()),
        ),
        ("AGENT_RUNTIME__AGENTS_FILE", &agents.display().to_string()),
    ]);
    assert_eq!(
        (failed.exit_code, failed.stdout.as_str(), failed.message.clone()),
        (
            2,
            "",
            vec![format!(
                "agent-runtime-server: AGENT_RUNTIME__AGENTS_FILE: {}: No such file or directory (os error 2)",
                agents.display()
            )]
        ),
        "{failed:#?}"
    );
}
