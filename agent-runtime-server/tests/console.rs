//! The console's static routes (public, typed, with their policy, under both prefixes) and the
//! approval preview route (diffs against the file now) against the real server binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use serde_json::{Value, json};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A client that sends no token and does not follow redirects.
fn anonymous() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers().get(name).map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_files_are_served_without_a_token_under_both_prefixes_with_their_types_and_policy() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let c = anonymous();
    let mut got = Vec::new();
    for prefix in ["", "/api/v1"] {
        for (file, marker) in [
            ("", "<script type=\"module\" src=\"app.js\"></script>"),
            ("console.css", ":root"),
            ("app.js", "import * as api from \"./api.js\";"),
            ("api.js", "export async function readEvents"),
            ("timeline.js", "export class Timeline"),
        ] {
            let r = c
                .get(s.url(&format!("{prefix}/console/{file}")))
                .send()
                .await
                .unwrap();
            let (status, content_type, csp, nosniff) = (
                r.status().as_u16(),
                header(&r, "content-type"),
                header(&r, "content-security-policy"),
                header(&r, "x-content-type-options"),
            );
            let body = r.text().await.unwrap();
            got.push((
                format!("{prefix}/console/{file}"),
                status,
                content_type,
                csp.as_deref() == Some(CSP),
                nosniff,
                body.contains(marker),
            ));
        }
    }
    let want: Vec<_> = ["", "/api/v1"]
        .iter()
        .flat_map(|prefix| {
            [
                ("", "text/html; charset=utf-8"),
                ("console.css", "text/css; charset=utf-8"),
                ("app.js", "text/javascript; charset=utf-8"),
                ("api.js", "text/javascript; charset=utf-8"),
                ("timeline.js", "text/javascript; charset=utf-8"),
            ]
            .map(|(file, ty)| {
                (
                    format!("{prefix}/console/{file}"),
                    200,
                    Some(ty.to_string()),
                    true,
                    Some("nosniff".to_string()),
                    true,
                )
            })
        })
        .collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bare_console_path_redirects_to_the_page_keeping_its_prefix() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let c = anonymous();
    let mut got = Vec::new();
    for path in ["/console", "/api/v1/console"] {
        let r = c.get(s.url(path)).send().await.unwrap();
        got.push((r.status().as_u16(), header(&r, "location")));
    }
    assert_eq!(
        got,
        vec![
            (308, Some("/console/".to_string())),
            (308, Some("/api/v1/console/".to_string()))
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_console_files_skip_auth_and_data_calls_still_need_the_token() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let c = anonymous();
    let mut got = Vec::new();
    for path in [
        "/console/secrets.json",
        "/api/v1/console/x/app.js",
        "/sessions",
        "/api/v1/sessions",
    ] {
        let (status, body) = error_of(c.get(s.url(path)).send().await.unwrap()).await;
        got.push((path, status, body["error"]["code"].clone()));
    }
    let (status, body) = error_of(s.get("/console/secrets.json").send().await.unwrap()).await;
    got.push((
        "/console/secrets.json with the token",
        status,
        body["error"]["code"].clone(),
    ));
    assert_eq!(
        got,
        vec![
            ("/console/secrets.json", 401, json!("UNAUTHORIZED")),
            ("/api/v1/console/x/app.js", 401, json!("UNAUTHORIZED")),
            ("/sessions", 401, json!("UNAUTHORIZED")),
            ("/api/v1/sessions", 401, json!("UNAUTHORIZED")),
            ("/console/secrets.json with the token", 404, json!("NOT_FOUND")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_answers_only_get_and_head_and_stays_out_of_the_openapi_document() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let c = anonymous();
    let post = c.post(s.url("/console/")).send().await.unwrap();
    let allow = header(&post, "allow");
    let (status, body) = error_of(post).await;
    let head = c.head(s.url("/console/app.js")).send().await.unwrap();
    let head = (
        head.status().as_u16(),
        header(&head, "content-type"),
        head.bytes().await.unwrap().len(),
    );
    let doc: Value = c
        .get(s.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let console_paths: Vec<&String> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|p| p.contains("console"))
        .collect();
    assert_eq!(
        (status, body["error"]["code"].clone(), allow, head, console_paths),
        (
            405,
            json!("METHOD_NOT_ALLOWED"),
            Some("GET, HEAD".to_string()),
            (200, Some("text/javascript; charset=utf-8".to_string()), 0),
            Vec::<&String>::new()
        )
    );
}

// ---------- GET /sessions/{id}/approvals/{call_id}/preview ----------

fn route(agent: &str) -> MockResponse {
    MockResponse::script(&Script::tool_call(
        "route",
        json!({"agent": agent, "reason": "code work"}),
    ))
}

/// A session on a fresh project whose turn paused on `tool(arguments)`; its id and the call id.
async fn paused_on(s: &Server, llm: &MockLlmServer, tool: &str, arguments: Value) -> (String, String) {
    let project = s.dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let id = s
        .session(json!({"metadata": {"project_path": project.to_str().unwrap()}}))
        .await;
    llm.push(route("coder"));
    llm.push(MockResponse::script(&Script::tool_call(tool, arguments)));
    let events = s
        .send(&id, json!({"type": "user_message", "content": "Создай файл"}))
        .await;
    assert_eq!(
        kinds(&events),
        ["agent_switched", "tool_call", "done:awaiting_approval"]
    );
    let call = find(&events, "tool_call")["call_id"]
        .as_str()
        .unwrap()
        .to_string();
    (id, call)
}

async fn preview(s: &Server, id: &str, call: &str) -> (u16, Value) {
    let r = s
        .get(&format!("/api/v1/sessions/{id}/approvals/{call}/preview"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_over_an_existing_file_previews_as_a_unified_diff_of_the_file_now() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let (id, call) = paused_on(
        &s,
        &llm,
        "write_file",
        json!({"path": "src/notes.txt", "content": "one\n2\nthree\n"}),
    )
    .await;
    // Written after the proposal: the diff is against the file as it is when previewed.
    let project = s.dir.path().join("project");
    std::fs::create_dir_all(project.join("src")).unwrap();
    std::fs::write(project.join("src/notes.txt"), "one\ntwo\nthree\n").unwrap();
    assert_eq!(
        preview(&s, &id, &call).await,
        (
            200,
            json!({"call_id": call, "tool_name": "write_file", "path": "src/notes.txt", "change": "modify",
                   "diff": "--- a/src/notes.txt\n+++ b/src/notes.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+2\n three\n"})
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_of_a_new_file_previews_against_dev_null() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let (id, call) = paused_on(
        &s,
        &llm,
        "write_file",
        json!({"path": "new.txt", "content": "hello\nworld\n"}),
    )
    .await;
    assert_eq!(
        preview(&s, &id, &call).await,
        (
            200,
            json!({"call_id": call, "tool_name": "write_file", "path": "new.txt", "change": "create",
                   "diff": "--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1,2 @@\n+hello\n+world\n"})
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_previews_every_line_removed() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let project = s.dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("old.txt"), "bye\n").unwrap();
    let (id, call) = paused_on(&s, &llm, "delete_file", json!({"path": "old.txt"})).await;
    assert_eq!(
        preview(&s, &id, &call).await,
        (
            200,
            json!({"call_id": call, "tool_name": "delete_file", "path": "old.txt", "change": "delete",
                   "diff": "--- a/old.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n"})
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_call_id_is_approval_not_found() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let id = s.session(json!({})).await;
    let (status, body) = preview(&s, &id, "call_nope").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("APPROVAL_NOT_FOUND"))
    );
    let (status, body) = preview(&s, "no-such-session", "call_nope").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("SESSION_NOT_FOUND"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_that_now_leads_outside_the_project_is_refused_and_reads_nothing() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let (id, call) = paused_on(
        &s,
        &llm,
        "write_file",
        json!({"path": "link/passwords.txt", "content": "x"}),
    )
    .await;
    // A symlink made after the proposal points the path outside the project.
    let outside = s.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("passwords.txt"), "secret\n").unwrap();
    std::os::unix::fs::symlink(&outside, s.dir.path().join("project/link")).unwrap();
    let (status, body) = preview(&s, &id, &call).await;
    assert_eq!(
        (status, body),
        (
            400,
            json!({"error": {"code": "INVALID_TOOL", "message": "path 'link/passwords.txt' resolves outside the project"}})
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decided_approval_has_nothing_left_to_preview() {
    let llm = MockLlmServer::start().await.unwrap();
    let s = Server::start(&llm.url()).await;
    let (id, call) = paused_on(&s, &llm, "write_file", json!({"path": "a.txt", "content": "x"})).await;
    llm.push(MockResponse::script(&Script::text("ok")));
    let r = s
        .post(
            &format!("/sessions/{id}/hitl-decision"),
            json!({"call_id": call, "decision": "reject"}),
        )
        .send()
        .await
        .unwrap();
    Sse::new(r).all().await;
    let (status, body) = preview(&s, &id, &call).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("APPROVAL_ALREADY_DECIDED"))
    );
}
