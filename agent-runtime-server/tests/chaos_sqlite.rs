//! The chaos test on SQLite (issue 15's proof): one process on one SQLite file, SIGKILLed and
//! restarted 30 times while 48 client sessions run turns through it.
//!
//! What is driven and asserted is described in `chaos_support`; `CHAOS_KILLS` sets the SIGKILLs
//! (default 30, one every 2–4 s). Figures print with
//! `cargo test -p agent-runtime-server --test chaos_sqlite -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod chaos_support;
mod common;
mod fault_support;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_process_killed_and_restarted_on_sqlite_loses_no_event_and_runs_no_side_effect_twice() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("chaos.db").display());
    chaos_support::run(
        "one_process_killed_and_restarted_on_sqlite_loses_no_event_and_runs_no_side_effect_twice",
        &url,
        1,
    )
    .await;
}
