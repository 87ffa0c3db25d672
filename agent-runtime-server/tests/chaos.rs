//! The chaos test on Postgres (issue 15's proof): three replicas on one fresh schema, 48 client
//! sessions sending every request to a random live one, a killer SIGKILLing and restarting them.
//!
//! What is driven and asserted is described in `chaos_support`. `CHAOS_KILLS` sets the SIGKILLs
//! (default 30, one every 2–4 s, about two minutes in all); the figures print with `--nocapture`:
//! `TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo test -p agent-runtime-server
//! --test chaos -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod chaos_support;
mod common;
mod fault_support;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn three_replicas_killed_at_random_lose_no_event_and_run_no_side_effect_twice() {
    let (_guard, url) = fault_support::postgres_url().await;
    chaos_support::run(
        "three_replicas_killed_at_random_lose_no_event_and_run_no_side_effect_twice",
        &url,
        3,
    )
    .await;
}
