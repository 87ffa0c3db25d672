//! Start-up and shutdown of the real binary: refused configurations, SIGTERM with a running turn
//! (handed over, and resumed by the restarted server).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use serde_json::{Value, json};

fn refused(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut child = spawn_raw(args, env);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status.code().unwrap(), stderr)
}

#[test]
fn a_public_address_without_a_real_token_is_refused() {
    for env in [vec![], vec![("INTERNAL_API_KEY", "change-me-internal-key")]] {
        let (code, stderr) = refused(&["--host", "0.0.0.0", "--port", "0"], &env);
        assert_eq!(code, 2);
        assert!(
            stderr.contains("INTERNAL_API_KEY: refusing to listen on 0.0.0.0:0"),
            "{stderr}"
        );
    }
}

#[test]
fn a_bad_value_stops_start_up_naming_the_flag_or_variable_the_user_set() {
    for (args, env, var) in [
        (vec!["--port", "http"], vec![], "--port"),
        (vec![], vec![("MAX_CONTEXT_TOKENS", "lots")], "MAX_CONTEXT_TOKENS"),
        (vec!["--default-agent", "pirate"], vec![], "--default-agent"),
        (vec![], vec![("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
    ] {
        let (code, stderr) = refused(&args, &env);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(&format!("{var}: ")), "{var}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_a_running_turn_over_and_the_restarted_server_resumes_it() {
    let llm = MockLlmServer::start().await.unwrap();
    let mut s = Server::start_with(
        &llm.url(),
        None,
        &[("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false")],
    )
    .await;
    let id = s.session(json!({"session_id": "kept"})).await;
    llm.push(MockResponse::hang());
    let r = s
        .post(
            "/agent/message/stream",
            json!({"session_id": id, "message": {"type": "user_message", "content": "hi"}}),
        )
        .send()
        .await
        .unwrap();
    let mut sse = Sse::new(r);
    while llm.request_count() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let stopped = tokio::task::spawn_blocking(move || {
        let ok = s.terminate();
        (ok, s)
    });
    let mut events = Vec::new();
    while let Some(e) = sse.next().await {
        events.push(e);
    }
    assert_eq!(
        events,
        Vec::<Value>::new(),
        "the stream ends without done: the turn goes on elsewhere"
    );
    let (ok, old) = stopped.await.unwrap();
    assert!(ok, "the server exits 0 after SIGTERM");
    let db = format!("sqlite://{}", old.dir.path().join("rt.db").display());
    llm.push(MockResponse::script(&Script::text("resumed")));
    let s = Server::start_with(&llm.url(), Some(&db), &[]).await;
    let r = s.get("/sessions/kept/events?after=0").send().await.unwrap();
    let resumed = Sse::new(r).all().await;
    assert_eq!(
        kinds(&resumed),
        ["turn_resumed", "assistant_final", "done:completed"]
    );
    assert_eq!(resumed[0]["reason"], "handed_over");
    let session: Value = s.get_json("/sessions/kept").await;
    assert_eq!(
        (session["status"].as_str(), session["message_count"].as_u64()),
        (Some("idle"), Some(2))
    );
}
