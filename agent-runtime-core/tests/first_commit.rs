//! A tool result's first commit goes with the session's lease in one storage call, and goes the
//! long way (lease, then a commit built on the session as leased) when the session moved on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_runtime_core::approval::Approval;
use agent_runtime_core::config::{RuntimeConfig, ToolExecution};
use agent_runtime_core::llm::{Script, ScriptedBackend};
use agent_runtime_core::orchestrator::{CreateSession, Orchestrator, Submission};
use agent_runtime_core::protocol::{AssistantMessage, ClientMessage, EventPayload, Plan, StopReason};
use agent_runtime_core::session::{AgentSwitch, Message, NewSession, Role, Session, SessionStatus};
use agent_runtime_core::storage::{
    self, Commit, CommitNotices, Committed, Expected, Leased, Liveness, SessionPage, SessionQuery, Storage,
};
use agent_runtime_core::{Event, Result};
use async_trait::async_trait;
use futures::StreamExt;
use serde_json::json;

/// What a `lease_and_commit` call did, as the test sees it.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Busy,
    Taken,
    Committed,
}

/// A real SQLite store that records what each `lease_and_commit` did and, when armed, lets
/// "another process" commit an event to the session just before the next one (between the
/// submission's read of the session and its lease).
#[derive(Debug)]
struct Interposed {
    inner: Arc<dyn Storage>,
    before_next_lease: Mutex<Option<EventPayload>>,
    outcomes: Mutex<Vec<Outcome>>,
}

#[async_trait]
impl Storage for Interposed {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
    async fn create_session(&self, new: NewSession) -> Result<Session> {
        self.inner.create_session(new).await
    }
    async fn get_session(&self, id: &str) -> Result<Session> {
        self.inner.get_session(id).await
    }
    async fn list_sessions(&self, query: SessionQuery) -> Result<SessionPage> {
        self.inner.list_sessions(query).await
    }
    async fn delete_session(&self, id: &str) -> Result<()> {
        self.inner.delete_session(id).await
    }
    async fn commit(&self, session_id: &str, commit: Commit) -> Result<Committed> {
        self.inner.commit(session_id, commit).await
    }
    async fn messages_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Message>> {
        self.inner.messages_after(session_id, after, limit).await
    }
    async fn recent_messages(&self, session_id: &str, limit: usize) -> Result<Vec<Message>> {
        self.inner.recent_messages(session_id, limit).await
    }
    async fn events_after(&self, session_id: &str, after: u64, limit: usize) -> Result<Vec<Event>> {
        self.inner.events_after(session_id, after, limit).await
    }
    async fn find_request(&self, session_id: &str, request_id: &str) -> Result<Option<u64>> {
        self.inner.find_request(session_id, request_id).await
    }
    async fn tool_call_answered(&self, session_id: &str, call_id: &str) -> Result<bool> {
        self.inner.tool_call_answered(session_id, call_id).await
    }
    async fn get_approval(&self, session_id: &str, call_id: &str) -> Result<Approval> {
        self.inner.get_approval(session_id, call_id).await
    }
    async fn pending_approvals(&self, session_id: &str) -> Result<Vec<Approval>> {
        self.inner.pending_approvals(session_id).await
    }
    async fn switch_history(&self, session_id: &str) -> Result<Vec<AgentSwitch>> {
        self.inner.switch_history(session_id).await
    }
    async fn session_history(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Session, Vec<Message>, Vec<AgentSwitch>)> {
        self.inner.session_history(session_id, after, limit).await
    }
    async fn get_plan(&self, session_id: &str, plan_id: &str) -> Result<Option<Plan>> {
        self.inner.get_plan(session_id, plan_id).await
    }
    async fn acquire_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.inner.acquire_lease(session_id, owner, ttl).await
    }
    async fn lease_session(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<Option<Session>> {
        self.inner.lease_session(session_id, owner, ttl).await
    }
    async fn lease_and_commit(
        &self,
        session_id: &str,
        owner: &str,
        ttl: Duration,
        expected: &Expected,
        commit: Commit,
    ) -> Result<Leased> {
        let moved_on = self.before_next_lease.lock().unwrap().take();
        if let Some(payload) = moved_on {
            self.inner
                .commit(
                    session_id,
                    Commit {
                        events: vec![payload],
                        ..Commit::now()
                    },
                )
                .await?;
        }
        let leased = (self.inner)
            .lease_and_commit(session_id, owner, ttl, expected, commit)
            .await?;
        self.outcomes.lock().unwrap().push(match &leased {
            Leased::Busy => Outcome::Busy,
            Leased::Taken(_) => Outcome::Taken,
            Leased::Committed(_) => Outcome::Committed,
        });
        Ok(leased)
    }
    async fn renew_lease(&self, session_id: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.inner.renew_lease(session_id, owner, ttl).await
    }
    async fn release_lease(&self, session_id: &str, owner: &str) -> Result<()> {
        self.inner.release_lease(session_id, owner).await
    }
    async fn hold_liveness(&self, owner: &str) -> Result<Liveness> {
        self.inner.hold_liveness(owner).await
    }
    async fn orphaned_sessions(&self, limit: usize) -> Result<Vec<String>> {
        self.inner.orphaned_sessions(limit).await
    }
    async fn commit_notices(&self) -> Result<Option<CommitNotices>> {
        self.inner.commit_notices().await
    }
    async fn request_cancel(&self, session_id: &str) -> Result<Option<String>> {
        self.inner.request_cancel(session_id).await
    }
    async fn cancel_requests(&self, owner: &str) -> Result<Vec<String>> {
        self.inner.cancel_requests(owner).await
    }
    async fn cancel_notices(&self) -> Result<Option<CommitNotices>> {
        self.inner.cancel_notices().await
    }
}

struct Harness {
    _db: tempfile::TempDir,
    store: Arc<Interposed>,
    rt: Orchestrator,
}

/// A client-mode runtime on a SQLite file whose model asks for one file read, then answers.
async fn harness() -> Harness {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("rt.db").display());
    let store = Arc::new(Interposed {
        inner: storage::open(&url).await.unwrap(),
        before_next_lease: Mutex::new(None),
        outcomes: Mutex::new(vec![]),
    });
    let llm = Arc::new(ScriptedBackend::new(vec![
        Script::tool_call("read_file", json!({"path": "lib/main.dart"})),
        Script::text("I see it"),
    ]));
    let config = RuntimeConfig {
        tool_execution: ToolExecution::Client,
        ..RuntimeConfig::default()
    };
    let rt = Orchestrator::builder(store.clone(), llm)
        .config(config)
        .build()
        .unwrap();
    Harness { _db: db, store, rt }
}

async fn collect(stream: agent_runtime_core::orchestrator::EventStream) -> Vec<Event> {
    tokio::time::timeout(Duration::from_secs(20), stream.collect())
        .await
        .expect("stream did not end in 20 s")
}

impl Harness {
    /// A session whose turn waits for the client's result of its one call: (session, call id).
    async fn paused(&self) -> (String, String) {
        let s = (self.rt)
            .create_session(CreateSession {
                user_id: Some("u1".into()),
                metadata: Some(json!({})),
                session_id: None,
                budget: None,
            })
            .await
            .unwrap()
            .id;
        let events = collect(
            (self.rt)
                .submit(
                    &s,
                    Submission::new(ClientMessage::UserMessage {
                        content: "read main".into(),
                        agent_type: Some("coder".into()),
                    }),
                )
                .await
                .unwrap(),
        )
        .await;
        let call = events
            .iter()
            .find_map(|e| match &e.payload {
                EventPayload::ToolCall { call_id, .. } => Some(call_id.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            self.rt.get_session(&s).await.unwrap().status,
            SessionStatus::AwaitingToolResult
        );
        (s, call)
    }

    async fn answer(&self, session: &str, call_id: &str) -> Vec<Event> {
        let sub = Submission::new(ClientMessage::ToolResult {
            call_id: call_id.into(),
            result: Some(json!("void main() {}")),
            error: None,
        });
        collect(self.rt.submit(session, sub).await.unwrap()).await
    }

    fn outcomes(&self) -> Vec<Outcome> {
        std::mem::take(&mut *self.store.outcomes.lock().unwrap())
    }
}

fn tool_result(call_id: &str) -> EventPayload {
    EventPayload::ToolResult {
        call_id: call_id.into(),
        tool_name: "read_file".into(),
        result: Some(json!("void main() {}")),
        error: None,
    }
}

/// The stream of a tool result: its `tool_result` first, then the model's answer and `done`.
fn assert_answered(events: &[Event], call_id: &str, first_seq: u64) {
    let payloads: Vec<_> = events.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(payloads.first(), Some(&tool_result(call_id)), "{payloads:#?}");
    assert_eq!(events[0].seq, first_seq);
    assert!(
        payloads.contains(&EventPayload::AssistantMessage(AssistantMessage::Complete {
            content: "I see it".into()
        })),
        "{payloads:#?}"
    );
    assert!(
        matches!(
            payloads.last(),
            Some(EventPayload::Done {
                stop_reason: StopReason::Completed,
                ..
            })
        ),
        "{payloads:#?}"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (first_seq..first_seq + events.len() as u64).collect();
    assert_eq!(seqs, expected, "gap-free seqs");
}

/// The session's stored tool messages: (call id, content).
async fn tool_messages(store: &Interposed, session: &str) -> Vec<(String, String)> {
    let messages = store.messages_after(session, 0, 1000).await.unwrap();
    messages
        .into_iter()
        .filter(|m| m.role == Role::Tool)
        .map(|m| (m.tool_call_id.unwrap(), m.content))
        .collect()
}

#[tokio::test]
async fn a_tool_result_is_stored_with_the_lease_in_one_storage_call() {
    let h = harness().await;
    let (s, call) = h.paused().await;
    h.outcomes();
    let before = h.rt.get_session(&s).await.unwrap().last_event_seq;
    let events = h.answer(&s, &call).await;
    assert_answered(&events, &call, before + 1);
    assert_eq!(h.outcomes(), vec![Outcome::Committed]);
    assert_eq!(
        tool_messages(&h.store, &s).await,
        vec![(call.clone(), "void main() {}".to_string())]
    );
    let session = h.rt.get_session(&s).await.unwrap();
    assert_eq!(session.status, SessionStatus::Idle);
    assert_eq!(session.last_event_seq, before + events.len() as u64);
}

#[tokio::test]
async fn a_tool_result_on_a_session_that_moved_on_after_it_was_read_goes_the_long_way() {
    let h = harness().await;
    let (s, call) = h.paused().await;
    h.outcomes();
    let before = h.rt.get_session(&s).await.unwrap().last_event_seq;
    // Another process commits an event between the submission's read and its lease.
    let elsewhere = EventPayload::AssistantMessage(AssistantMessage::Token {
        token: "from another process".into(),
    });
    *h.store.before_next_lease.lock().unwrap() = Some(elsewhere.clone());
    let events = h.answer(&s, &call).await;
    // The commit built on the stale read was not stored: the lease was taken alone, and the
    // result committed after the other process's event, exactly once.
    assert_eq!(h.outcomes(), vec![Outcome::Taken]);
    assert_answered(&events, &call, before + 2);
    let stored = h.store.events_after(&s, before, 1).await.unwrap();
    assert_eq!(stored[0].payload, elsewhere);
    assert_eq!(
        tool_messages(&h.store, &s).await,
        vec![(call.clone(), "void main() {}".to_string())]
    );
    let session = h.rt.get_session(&s).await.unwrap();
    assert_eq!(session.status, SessionStatus::Idle);
    assert_eq!(session.last_event_seq, before + 1 + events.len() as u64);
}
