//! Client execution mode as IDE clients use it, black-box through the real server on SQLite and
//! Postgres: refused calls never streamed as `tool_call`, cancellations first, older clients' fields.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod fault_support;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use fault_support::postgres_url;
use serde_json::{Value, json};

/// A server, its mock model, and one session in the given tool execution mode.
struct Setup {
    llm: MockLlmServer,
    s: Server,
    id: String,
}

impl Setup {
    /// `project`: the session also gets a `project_path` (a fresh folder).
    async fn new(db: Option<&str>, mode: &str, project: bool) -> Setup {
        let llm = MockLlmServer::start().await.unwrap();
        let s = Server::start_with(&llm.url(), db, &[]).await;
        let mut metadata = json!({"tool_execution": mode});
        if project {
            let dir = s.dir.path().join("project");
            std::fs::create_dir(&dir).unwrap();
            metadata["project_path"] = json!(dir.to_str().unwrap());
        }
        let id = s.session(json!({"metadata": metadata})).await;
        Setup { llm, s, id }
    }

    fn script(&self, script: Script) {
        self.llm.push(MockResponse::script(&script));
    }

    async fn send(&self, message: Value) -> Vec<Value> {
        self.s.send(&self.id, message).await
    }

    /// Every stored event of the session, as `GET /sessions/{id}/events` replays them.
    async fn replay(&self) -> Vec<Value> {
        let r = self
            .s
            .get(&format!("/sessions/{}/events?after=0", self.id))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        Sse::new(r).all().await
    }

    /// The `content` of the tool message the model was last told.
    fn last_tool_message(&self) -> String {
        let last = self.llm.requests().last().cloned().unwrap();
        let tool = last["messages"]
            .as_array()
            .unwrap()
            .iter()
            .rfind(|m| m["role"] == "tool")
            .cloned()
            .unwrap();
        tool["content"].as_str().unwrap().to_string()
    }
}

/// The events as the wire shows them, numbered from `first`.
fn numbered(first: u64, events: Vec<Value>) -> Vec<Value> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            let fin = matches!(e["type"].as_str(), Some("error" | "done"))
                || (e["type"] == "assistant_message" && e.get("content").is_some());
            e["seq"] = json!(first + i as u64);
            e["is_final"] = json!(fin);
            e
        })
        .collect()
}

fn switched(from: &str, to: &str) -> Value {
    json!({"type": "agent_switched", "from_agent": from, "to_agent": to, "reason": "User requested agent switch"})
}

fn refused(call_id: &Value, tool: &str, message: &str) -> Value {
    json!({"type": "tool_result", "call_id": call_id, "tool_name": tool,
           "error": {"code": "INVALID_TOOL", "message": message}})
}

fn answer(text: &str) -> [Value; 2] {
    [
        json!({"type": "assistant_message", "token": text}),
        json!({"type": "assistant_message", "content": text}),
    ]
}

fn done(stop: &str, last: &[Value]) -> Value {
    json!({"type": "done", "stop_reason": stop, "usage": last.last().unwrap()["usage"]})
}

/// The `call_id` of the first event of `kind` in `events`.
fn call_id_of(events: &[Value], kind: &str) -> Value {
    find(events, kind)["call_id"].clone()
}

/// One refusal in client mode: the model's call, on `agent`, is refused before it runs. The
/// stream (live and replayed) holds only its `tool_result`, then the turn goes on.
async fn refusal_is_only_a_tool_result(
    db: Option<&str>,
    agent: &str,
    call: Script,
    tool: &str,
    message: &str,
) {
    let t = Setup::new(db, "client", true).await;
    t.script(call);
    t.script(Script::text("Понятно."));
    let live = t
        .send(json!({"type": "user_message", "content": "Сделай это", "agent_type": agent}))
        .await;
    let call_id = call_id_of(&live, "tool_result");
    let [token, complete] = answer("Понятно.");
    let expected = numbered(
        1,
        vec![
            switched("orchestrator", agent),
            refused(&call_id, tool, message),
            token,
            complete,
            done("completed", &live),
        ],
    );
    assert_eq!(live, expected);
    assert_eq!(t.replay().await, expected);
    assert_eq!(t.last_tool_message(), format!("INVALID_TOOL: {message}"));
}

async fn a_tool_the_agent_may_not_use(db: Option<&str>) {
    refusal_is_only_a_tool_result(
        db,
        "ask",
        Script::tool_call("write_file", json!({"path": "notes.md", "content": "x"})),
        "write_file",
        "the ask agent may not use the tool 'write_file'; its tools are: read_file, search_in_code, list_files",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tool_the_agent_may_not_use_is_only_a_tool_result_on_sqlite() {
    a_tool_the_agent_may_not_use(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_tool_the_agent_may_not_use_is_only_a_tool_result_on_postgres() {
    let (_guard, url) = postgres_url().await;
    a_tool_the_agent_may_not_use(Some(&url)).await;
}

async fn a_write_outside_the_path_rule(db: Option<&str>) {
    refusal_is_only_a_tool_result(
        db,
        "architect",
        Script::tool_call("write_file", json!({"path": "main.rs", "content": "x"})),
        "write_file",
        "the architect agent may only write files ending in .md; 'main.rs' is refused",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_outside_the_path_rule_is_only_a_tool_result_on_sqlite() {
    a_write_outside_the_path_rule(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_write_outside_the_path_rule_is_only_a_tool_result_on_postgres() {
    let (_guard, url) = postgres_url().await;
    a_write_outside_the_path_rule(Some(&url)).await;
}

async fn a_path_outside_the_project(db: Option<&str>) {
    refusal_is_only_a_tool_result(
        db,
        "coder",
        Script::tool_call("read_file", json!({"path": "../../etc/passwd"})),
        "read_file",
        "path '../../etc/passwd' resolves outside the project",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_outside_the_project_is_only_a_tool_result_on_sqlite() {
    a_path_outside_the_project(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_path_outside_the_project_is_only_a_tool_result_on_postgres() {
    let (_guard, url) = postgres_url().await;
    a_path_outside_the_project(Some(&url)).await;
}

async fn arguments_that_are_not_json(db: Option<&str>) {
    refusal_is_only_a_tool_result(
        db,
        "coder",
        Script::raw_tool_call("read_file", "{\"path\": "),
        "read_file",
        "the arguments of 'read_file' are not valid JSON ({\"path\": ); call the tool again with a JSON object",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn arguments_that_are_not_json_are_only_a_tool_result_on_sqlite() {
    arguments_that_are_not_json(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn arguments_that_are_not_json_are_only_a_tool_result_on_postgres() {
    let (_guard, url) = postgres_url().await;
    arguments_that_are_not_json(Some(&url)).await;
}

async fn an_unknown_tool(db: Option<&str>) {
    refusal_is_only_a_tool_result(
        db,
        "coder",
        Script::tool_call("format_disk", json!({})),
        "format_disk",
        "unknown tool 'format_disk'",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_tool_is_only_a_tool_result_on_sqlite() {
    an_unknown_tool(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn an_unknown_tool_is_only_a_tool_result_on_postgres() {
    let (_guard, url) = postgres_url().await;
    an_unknown_tool(Some(&url)).await;
}

/// The same call a third time in a turn: the first two go to the client, the third is refused
/// (only its `tool_result`), and the turn ends with an `error` that also carries `content`.
async fn a_call_stopped_by_the_loop_guard(db: Option<&str>) {
    let t = Setup::new(db, "client", false).await;
    let read = || Script::tool_call("read_file", json!({"path": "a.txt"}));
    t.script(read());
    let first = t
        .send(json!({"type": "user_message", "content": "Прочитай a.txt", "agent_type": "coder"}))
        .await;
    let mut all = first.clone();
    let mut calls = vec![call_id_of(&first, "tool_call")];
    t.script(read());
    let second = t
        .send(json!({"type": "tool_result", "call_id": calls[0], "result": "A"}))
        .await;
    all.extend(second.clone());
    calls.push(call_id_of(&second, "tool_call"));
    t.script(read());
    let third = t
        .send(json!({"type": "tool_result", "call_id": calls[1], "result": "A"}))
        .await;
    all.extend(third.clone());
    let results: Vec<&Value> = third.iter().filter(|e| e["type"] == "tool_result").collect();
    let refused_id = results.last().unwrap()["call_id"].clone();
    let tool_call = |id: &Value| {
        json!({"type": "tool_call", "call_id": id, "tool_name": "read_file",
               "arguments": {"path": "a.txt"}, "requires_approval": false})
    };
    let client_result =
        |id: &Value| json!({"type": "tool_result", "call_id": id, "tool_name": "read_file", "result": "A"});
    let message = "loop detected: the model called read_file with the same arguments 3 times in this turn";
    assert_eq!(
        first,
        numbered(
            1,
            vec![
                switched("orchestrator", "coder"),
                tool_call(&calls[0]),
                done("awaiting_tool_result", &first),
            ]
        )
    );
    assert_eq!(
        second,
        numbered(
            4,
            vec![
                client_result(&calls[0]),
                tool_call(&calls[1]),
                done("awaiting_tool_result", &second),
            ]
        )
    );
    assert_eq!(
        third,
        numbered(
            7,
            vec![
                client_result(&calls[1]),
                refused(&refused_id, "read_file", message),
                json!({"type": "error", "code": "INVALID_TOOL", "message": message, "content": message}),
                done("error", &third),
            ]
        )
    );
    assert_eq!(t.replay().await, all);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_stopped_by_the_loop_guard_is_only_a_tool_result_on_sqlite() {
    a_call_stopped_by_the_loop_guard(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_call_stopped_by_the_loop_guard_is_only_a_tool_result_on_postgres() {
    let (_guard, url) = postgres_url().await;
    a_call_stopped_by_the_loop_guard(Some(&url)).await;
}

/// An agent handing over in client mode: the runtime runs its own `switch_agent`, so the client
/// sees only `agent_switched` (a `tool_call` would tell it to run the switch); the model is still
/// told the switch happened.
async fn a_hand_over_is_only_an_agent_switch(db: Option<&str>) {
    let t = Setup::new(db, "client", false).await;
    t.script(Script::tool_call(
        "switch_agent",
        json!({"agent_type": "architect", "reason": "design question"}),
    ));
    t.script(Script::text("Проектирую."));
    let live = t
        .send(json!({"type": "user_message", "content": "Спроектируй авторизацию", "agent_type": "coder"}))
        .await;
    let [token, complete] = answer("Проектирую.");
    let expected = numbered(
        1,
        vec![
            switched("orchestrator", "coder"),
            json!({"type": "agent_switched", "from_agent": "coder", "to_agent": "architect",
                   "reason": "design question"}),
            token,
            complete,
            done("completed", &live),
        ],
    );
    assert_eq!(live, expected);
    assert_eq!(t.replay().await, expected);
    assert_eq!(
        t.last_tool_message(),
        "Switched to the architect agent, which continues."
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hand_over_is_only_an_agent_switch_on_sqlite() {
    a_hand_over_is_only_an_agent_switch(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_hand_over_is_only_an_agent_switch_on_postgres() {
    let (_guard, url) = postgres_url().await;
    a_hand_over_is_only_an_agent_switch(Some(&url)).await;
}

/// In runtime mode nothing changed: the refused call is streamed as `tool_call`, then its result.
#[tokio::test(flavor = "multi_thread")]
async fn in_runtime_mode_a_refused_call_is_still_streamed_as_tool_call_then_result() {
    let t = Setup::new(None, "runtime", true).await;
    t.script(Script::tool_call("format_disk", json!({})));
    t.script(Script::text("Понятно."));
    let live = t
        .send(json!({"type": "user_message", "content": "Сделай это", "agent_type": "coder"}))
        .await;
    let call_id = call_id_of(&live, "tool_call");
    let [token, complete] = answer("Понятно.");
    let expected = numbered(
        1,
        vec![
            switched("orchestrator", "coder"),
            json!({"type": "tool_call", "call_id": call_id, "tool_name": "format_disk",
                   "arguments": {}, "requires_approval": false}),
            refused(&call_id, "format_disk", "unknown tool 'format_disk'"),
            token,
            complete,
            done("completed", &live),
        ],
    );
    assert_eq!(live, expected);
    assert_eq!(t.replay().await, expected);
}

/// A turn paused on an approval (a `write_file` in client mode); the first stream is checked.
async fn paused_on_an_approval(t: &Setup) -> (Vec<Value>, Value) {
    t.script(Script::tool_call(
        "write_file",
        json!({"path": "notes.md", "content": "x"}),
    ));
    let first = t
        .send(json!({"type": "user_message", "content": "Запиши заметку", "agent_type": "coder"}))
        .await;
    let call_id = call_id_of(&first, "tool_call");
    let mut call = find(&first, "tool_call").clone();
    let reason = call["reason"].take();
    assert!(reason.is_string(), "{first:?}");
    assert_eq!(
        first,
        numbered(
            1,
            vec![
                switched("orchestrator", "coder"),
                json!({"type": "tool_call", "call_id": call_id, "tool_name": "write_file",
                       "arguments": {"path": "notes.md", "content": "x"}, "requires_approval": true,
                       "reason": reason}),
                done("awaiting_approval", &first),
            ]
        )
    );
    (first, call_id)
}

fn cancelled_result(call_id: &Value, tool: &str) -> Value {
    json!({"type": "tool_result", "call_id": call_id, "tool_name": tool,
           "error": {"code": "CANCELLED", "message": "cancelled: the user sent a new message"}})
}

/// A new `user_message` cancels the pending approval: `approval_resolved` (cancel) and the call's
/// `CANCELLED` result open its stream, live, replayed, and when its `request_id` is sent again.
async fn a_new_message_streams_the_approvals_it_cancels_first(db: Option<&str>) {
    let t = Setup::new(db, "client", false).await;
    let (first, call_id) = paused_on_an_approval(&t).await;
    t.script(Script::text("Хорошо."));
    let request = json!({"session_id": t.id, "request_id": "req-new-message",
                         "message": {"type": "user_message", "content": "Не надо"}});
    let r =
        t.s.post("/agent/message/stream", request.clone())
            .send()
            .await
            .unwrap();
    let second = Sse::new(r).all().await;
    let [token, complete] = answer("Хорошо.");
    let expected = numbered(
        4,
        vec![
            json!({"type": "approval_resolved", "call_id": call_id, "decision": "cancel"}),
            cancelled_result(&call_id, "write_file"),
            token,
            complete,
            done("completed", &second),
        ],
    );
    assert_eq!(second, expected);
    let mut all = first;
    all.extend(expected.clone());
    assert_eq!(t.replay().await, all);
    let r = t.s.post("/agent/message/stream", request).send().await.unwrap();
    assert_eq!(Sse::new(r).all().await, expected);
    let (status, body) = error_of(
        t.s.post(
            &format!("/sessions/{}/hitl-decision", t.id),
            json!({"call_id": call_id, "decision": "approve"}),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("APPROVAL_ALREADY_DECIDED"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_message_streams_the_approvals_it_cancels_first_on_sqlite() {
    a_new_message_streams_the_approvals_it_cancels_first(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_new_message_streams_the_approvals_it_cancels_first_on_postgres() {
    let (_guard, url) = postgres_url().await;
    a_new_message_streams_the_approvals_it_cancels_first(Some(&url)).await;
}

/// A `switch_agent` with content cancels like a new message: the cancellations come first, then
/// the switch and the new agent's answer.
async fn a_switch_with_content_streams_the_approvals_it_cancels_first(db: Option<&str>) {
    let t = Setup::new(db, "client", false).await;
    let (first, call_id) = paused_on_an_approval(&t).await;
    t.script(Script::text("Смотрю."));
    let second = t
        .send(json!({"type": "switch_agent", "agent_type": "ask", "content": "Просто объясни"}))
        .await;
    let [token, complete] = answer("Смотрю.");
    let expected = numbered(
        4,
        vec![
            json!({"type": "approval_resolved", "call_id": call_id, "decision": "cancel"}),
            cancelled_result(&call_id, "write_file"),
            switched("coder", "ask"),
            token,
            complete,
            done("completed", &second),
        ],
    );
    assert_eq!(second, expected);
    let mut all = first;
    all.extend(expected);
    assert_eq!(t.replay().await, all);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_switch_with_content_streams_the_approvals_it_cancels_first_on_sqlite() {
    a_switch_with_content_streams_the_approvals_it_cancels_first(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_switch_with_content_streams_the_approvals_it_cancels_first_on_postgres() {
    let (_guard, url) = postgres_url().await;
    a_switch_with_content_streams_the_approvals_it_cancels_first(Some(&url)).await;
}

/// A client tool call still awaiting its result is cancelled by a new message; its `CANCELLED`
/// result opens the new stream, and the client's late result is refused with 404.
async fn a_new_message_streams_the_client_calls_it_cancels_first(db: Option<&str>) {
    let t = Setup::new(db, "client", false).await;
    t.script(Script::tool_call("read_file", json!({"path": "a.txt"})));
    let first = t
        .send(json!({"type": "user_message", "content": "Прочитай a.txt", "agent_type": "coder"}))
        .await;
    let call_id = call_id_of(&first, "tool_call");
    assert_eq!(
        first,
        numbered(
            1,
            vec![
                switched("orchestrator", "coder"),
                json!({"type": "tool_call", "call_id": call_id, "tool_name": "read_file",
                       "arguments": {"path": "a.txt"}, "requires_approval": false}),
                done("awaiting_tool_result", &first),
            ]
        )
    );
    t.script(Script::text("Хорошо."));
    let second = t
        .send(json!({"type": "user_message", "content": "Не надо"}))
        .await;
    let [token, complete] = answer("Хорошо.");
    let expected = numbered(
        4,
        vec![
            cancelled_result(&call_id, "read_file"),
            token,
            complete,
            done("completed", &second),
        ],
    );
    assert_eq!(second, expected);
    let mut all = first;
    all.extend(expected);
    assert_eq!(t.replay().await, all);
    let (status, body) = error_of(
        t.s.post(
            "/agent/message/stream",
            json!({"session_id": t.id, "message": {"type": "tool_result", "call_id": call_id, "result": "A"}}),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("TOOL_CALL_NOT_FOUND"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_message_streams_the_client_calls_it_cancels_first_on_sqlite() {
    a_new_message_streams_the_client_calls_it_cancels_first(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_new_message_streams_the_client_calls_it_cancels_first_on_postgres() {
    let (_guard, url) = postgres_url().await;
    a_new_message_streams_the_client_calls_it_cancels_first(Some(&url)).await;
}

/// `/history` (and `/messages`) also return `message_count`, `current_agent`, `last_activity` and
/// `agent_history`, oldest first.
async fn history_carries_what_older_clients_read(db: Option<&str>) {
    let t = Setup::new(db, "client", false).await;
    t.script(Script::text("Готово."));
    t.send(json!({"type": "user_message", "content": "Привет", "agent_type": "coder"}))
        .await;
    t.send(json!({"type": "switch_agent", "agent_type": "ask", "reason": "Вопрос"}))
        .await;
    let history = t.s.get_json(&format!("/sessions/{}/history", t.id)).await;
    let messages = t.s.get_json(&format!("/sessions/{}/messages", t.id)).await;
    assert_eq!(history, messages);
    let session = t.s.get_json(&format!("/sessions/{}", t.id)).await;
    let current = t.s.get_json(&format!("/agents/{}/current", t.id)).await;
    let switches = current["switch_history"].as_array().unwrap();
    for s in switches {
        let at = s["timestamp"].as_str().unwrap();
        assert!(at.ends_with('Z') && at.contains('T'), "{at}");
    }
    let roles: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant"]);
    assert_eq!(
        history,
        json!({
            "session_id": t.id,
            "messages": messages["messages"],
            "message_count": 2,
            "current_agent": "ask",
            "last_activity": session["last_activity"],
            "agent_history": [
                {"from_agent": "orchestrator", "to_agent": "coder",
                 "reason": "User requested agent switch", "timestamp": switches[0]["timestamp"]},
                {"from_agent": "coder", "to_agent": "ask", "reason": "Вопрос",
                 "timestamp": switches[1]["timestamp"]},
            ],
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn history_carries_what_older_clients_read_on_sqlite() {
    history_carries_what_older_clients_read(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn history_carries_what_older_clients_read_on_postgres() {
    let (_guard, url) = postgres_url().await;
    history_carries_what_older_clients_read(Some(&url)).await;
}

/// `GET /sessions` reports `total`: the sessions matching the filter across all pages.
async fn the_session_list_reports_the_total_of_its_filter(db: Option<&str>) {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start_with(&llm.url(), db, &[]).await;
    let user = format!("user-{}", uuid::Uuid::new_v4().simple());
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(s.session(json!({"user_id": user})).await);
    }
    s.session(json!({"user_id": "someone-else"})).await;
    let mut views = vec![];
    for id in &ids {
        views.push(s.get_json(&format!("/sessions/{id}")).await);
    }
    let first = s
        .get_json(&format!("/api/v1/sessions?user_id={user}&limit=2"))
        .await;
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let second = s
        .get_json(&format!(
            "/api/v1/sessions?user_id={user}&limit=2&cursor={cursor}"
        ))
        .await;
    // Sessions created in the same millisecond are ordered by id: compare the pages' union.
    let mut listed: Vec<Value> = first["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["sessions"].as_array().unwrap())
        .cloned()
        .collect();
    let by_id = |v: &Value| v["session_id"].as_str().unwrap().to_string();
    listed.sort_by_key(by_id);
    views.sort_by_key(by_id);
    assert_eq!(listed, views);
    assert_eq!(
        first,
        json!({"sessions": first["sessions"], "next_cursor": cursor, "total": 3})
    );
    assert_eq!(first["sessions"].as_array().unwrap().len(), 2);
    assert_eq!(
        second,
        json!({"sessions": second["sessions"], "next_cursor": null, "total": 3})
    );
    let nobody = s.get_json("/sessions?user_id=nobody-at-all").await;
    assert_eq!(nobody, json!({"sessions": [], "next_cursor": null, "total": 0}));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_list_reports_the_total_of_its_filter_on_sqlite() {
    the_session_list_reports_the_total_of_its_filter(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn the_session_list_reports_the_total_of_its_filter_on_postgres() {
    let (_guard, url) = postgres_url().await;
    the_session_list_reports_the_total_of_its_filter(Some(&url)).await;
}

/// A `tool_result` sent again with its `request_id` (the client lost the first answer, say to a
/// process that died) replays what the first one caused, as every submission does; it was refused
/// with 404 `TOOL_CALL_NOT_FOUND` because the call it answered was no longer open.
async fn a_tool_result_sent_again_with_its_request_id_replays(db: Option<&str>) {
    let t = Setup::new(db, "client", false).await;
    t.script(Script::tool_call("read_file", json!({"path": "a.txt"})));
    let first = t
        .send(json!({"type": "user_message", "content": "Прочитай a.txt", "agent_type": "coder"}))
        .await;
    let call_id = call_id_of(&first, "tool_call");
    t.script(Script::text("Готово."));
    let request = json!({"session_id": t.id, "request_id": "req-result",
                         "message": {"type": "tool_result", "call_id": call_id, "result": "A"}});
    let r =
        t.s.post("/agent/message/stream", request.clone())
            .send()
            .await
            .unwrap();
    let second = Sse::new(r).all().await;
    let [token, complete] = answer("Готово.");
    let expected = numbered(
        4,
        vec![
            json!({"type": "tool_result", "call_id": call_id, "tool_name": "read_file", "result": "A"}),
            token,
            complete,
            done("completed", &second),
        ],
    );
    assert_eq!(second, expected);
    let r = t.s.post("/agent/message/stream", request).send().await.unwrap();
    assert_eq!(
        Sse::new(r).all().await,
        expected,
        "the same events, no second turn"
    );
    assert_eq!(t.llm.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tool_result_sent_again_with_its_request_id_replays_on_sqlite() {
    a_tool_result_sent_again_with_its_request_id_replays(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs Postgres: set TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
)]
async fn a_tool_result_sent_again_with_its_request_id_replays_on_postgres() {
    let (_guard, url) = postgres_url().await;
    a_tool_result_sent_again_with_its_request_id_replays(Some(&url)).await;
}
