//! The storage conformance suite: the same cases run against every [`Storage`] backend, so the
//! memory, SQLite and Postgres stores behave alike (seqs, atomic commits, CAS, leases, cascades).
//!
//! Run it from an integration test with [`storage_conformance_suite!`](crate::storage_conformance_suite):
//!
//! ```ignore
//! async fn open_pair() -> (Arc<dyn Storage>, Arc<dyn Storage>) { /* two handles, one fresh DB */ }
//! agent_runtime_core::storage_conformance_suite!(open_pair);
//! ```
//!
//! `open_pair` gives two handles on the same fresh database (the memory store: the same `Arc`
//! twice). Each case is also a public `async fn(a, b)` here, so a failure names its case.

// This module is test code shipped behind `test-utils`: a failed expectation must panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::approval::{Approval, ApprovalResolution, ApprovalStatus, RequestType};
use crate::budget::Budget;
use crate::error::Error;
use crate::protocol::{AssistantMessage, Event, EventPayload, Plan, StopReason, Subtask};
use crate::session::{
    AgentSwitch, Message, NewMessage, NewSession, Role, Session, SessionStatus, ToolCall, TurnStateJson,
    Usage,
};
use crate::storage::{Commit, Committed, Expected, Leased, SessionQuery, SessionUpdate, Storage};
use crate::time::Timestamp;

/// Expands to one `#[tokio::test]` per conformance case, each calling `$open_pair().await` for two
/// handles `(Arc<dyn Storage>, Arc<dyn Storage>)` on the same fresh database. Attributes after the
/// path go on every case (e.g. a `cfg_attr(..., ignore = "...")` for a backend that needs a server).
#[macro_export]
macro_rules! storage_conformance_suite {
    ($open_pair:path $(, #[$attr:meta])* $(,)?) => {
        $crate::storage_conformance_suite!(@cases $open_pair; [$(#[$attr])*];
            session_round_trip,
            taken_id_is_session_exists,
            missing_session_is_not_found_everywhere,
            list_pages_with_cursor_and_filters,
            list_total_counts_the_filter_across_all_pages,
            concurrent_commits_get_gap_free_contiguous_seqs,
            reads_after_and_recent_respect_limits,
            failed_commit_leaves_nothing_behind,
            delete_leaves_nothing_behind,
            unicode_and_one_mib_content_round_trip,
            approvals_put_get_pending_and_replace,
            racing_resolutions_have_exactly_one_winner,
            switches_are_recorded_in_order,
            session_history_is_the_session_its_messages_after_and_its_switches,
            plans_are_put_and_replaced,
            usage_accumulates,
            budgets_and_cost_are_stored_with_commits,
            turn_state_and_status_updates,
            find_request_remembers_first_event_seq,
            tool_results_are_found_by_call_id_however_long_the_session,
            lease_acquire_renew_release,
            lease_session_takes_the_lease_and_returns_the_session_as_stored,
            lease_and_commit_takes_the_lease_and_stores_the_commit_when_the_session_is_as_expected,
            lease_and_commit_refused_or_on_a_missing_session_stores_nothing,
            lease_and_commit_on_an_unexpected_session_takes_the_lease_and_commits_nothing,
            lease_and_commit_whose_commit_fails_stores_nothing_of_it,
            lease_and_commit_takes_an_expired_or_dead_owners_lease,
            racing_lease_acquires_have_exactly_one_winner,
            expired_lease_is_taken_over,
            a_dead_owners_lease_is_taken_at_once,
            orphaned_sessions_are_running_ones_nobody_can_run,
            commit_is_fenced_by_lease_owner,
            a_stale_owners_commit_is_refused_after_takeover_and_leaves_nothing,
            an_appending_commit_returns_what_it_stored,
            last_commit_of_a_turn_releases_the_lease,
            cancel_requests_reach_the_lease_owner_until_the_lease_changes_hands,
            last_activity_moves_forward_on_commit,
        );
    };
    (@cases $open_pair:path; $attrs:tt; $($case:ident),* $(,)?) => {
        $( $crate::storage_conformance_suite!(@case $open_pair; $attrs; $case); )*
    };
    (@case $open_pair:path; [$(#[$attr:meta])*]; $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $case() {
            let (a, b) = $open_pair().await;
            $crate::storage::conformance::$case(a, b).await;
        }
    };
}

/// A fixed point in time, `ms` milliseconds after 2024-01-09T10:00:00Z.
fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millis(1_704_794_400_000 + ms)
}

fn new_session(id: &str, user: Option<&str>, at: i64) -> NewSession {
    NewSession {
        id: id.into(),
        user_id: user.map(str::to_string),
        metadata: json!({"project_path": "/tmp/project", "n": at}),
        current_agent: "orchestrator".into(),
        created_at: ts(at),
        budget: Budget::default(),
    }
}

/// The session `create_session(new)` must return.
fn fresh(new: &NewSession) -> Session {
    Session {
        id: new.id.clone(),
        user_id: new.user_id.clone(),
        metadata: new.metadata.clone(),
        created_at: new.created_at,
        last_activity: new.created_at,
        current_agent: new.current_agent.clone(),
        status: SessionStatus::Idle,
        message_count: 0,
        last_message_seq: 0,
        last_event_seq: 0,
        usage: Usage::default(),
        turn_state: None,
        budget: new.budget,
        cost: 0.0,
    }
}

async fn create(s: &dyn Storage, id: &str) -> Session {
    s.create_session(new_session(id, Some("user_1"), 0))
        .await
        .unwrap()
}

fn token(t: impl Into<String>) -> EventPayload {
    EventPayload::AssistantMessage(AssistantMessage::Token { token: t.into() })
}

fn at(ms: i64) -> Commit {
    Commit {
        at: Some(ts(ms)),
        ..Commit::default()
    }
}

fn approval(session: &str, call: &str, created: i64) -> Approval {
    Approval {
        call_id: call.into(),
        session_id: session.into(),
        tool_name: "write_file".into(),
        arguments: json!({"path": "a.md", "content": "x"}),
        reason: "File modification requires approval".into(),
        request_type: RequestType::Tool,
        status: ApprovalStatus::Pending,
        created_at: ts(created),
        decided_at: None,
        feedback: None,
        modified_arguments: None,
    }
}

fn resolution(call: &str, status: ApprovalStatus, feedback: &str, when: i64) -> ApprovalResolution {
    ApprovalResolution {
        call_id: call.into(),
        status,
        feedback: Some(feedback.into()),
        modified_arguments: None,
        decided_at: ts(when),
    }
}

fn switch(from: &str, to: &str, when: i64) -> AgentSwitch {
    AgentSwitch {
        from_agent: from.into(),
        to_agent: to.into(),
        reason: format!("{from} hands over to {to}"),
        timestamp: ts(when),
    }
}

fn plan(id: &str, goal: &str) -> Plan {
    Plan {
        plan_id: id.into(),
        goal: goal.into(),
        subtasks: vec![Subtask {
            id: "1".into(),
            description: "write the widget".into(),
            agent: "coder".into(),
            status: "pending".into(),
        }],
    }
}

/// The message `m` as stored with `seq` at `when`.
fn stored(m: &NewMessage, seq: u64, when: Timestamp) -> Message {
    Message {
        seq,
        role: m.role,
        content: m.content.clone(),
        agent: m.agent.clone(),
        tool_calls: m.tool_calls.clone(),
        tool_call_id: m.tool_call_id.clone(),
        created_at: when,
    }
}

async fn all_messages(s: &dyn Storage, id: &str) -> Vec<Message> {
    s.messages_after(id, 0, 100_000).await.unwrap()
}

async fn all_events(s: &dyn Storage, id: &str) -> Vec<Event> {
    s.events_after(id, 0, 100_000).await.unwrap()
}

/// Create, get, list and delete give back exactly what was stored.
pub async fn session_round_trip(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    assert!(["memory", "sqlite", "postgres"].contains(&a.backend()));
    a.ping().await.unwrap();
    b.ping().await.unwrap();
    let new = NewSession {
        id: "session_456".into(),
        user_id: Some("user_123".into()),
        metadata: json!({"project_path": "/path/to/project", "tool_execution": "client",
                         "nested": {"list": [1, 2.5, null, true]}}),
        current_agent: "orchestrator".into(),
        created_at: ts(0),
        budget: Budget {
            session_cost: Some(2.5),
            turn_tool_calls: Some(3),
            ..Budget::default()
        },
    };
    let created = a.create_session(new.clone()).await.unwrap();
    assert_eq!(created, fresh(&new));
    assert_eq!(b.get_session("session_456").await.unwrap(), created);
    let page = b
        .list_sessions(SessionQuery {
            limit: 10,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.sessions, vec![created]);
    assert_eq!(page.next_cursor, None);
    b.delete_session("session_456").await.unwrap();
    assert_eq!(
        a.get_session("session_456").await,
        Err(Error::SessionNotFound("session_456".into()))
    );
    assert_eq!(
        a.delete_session("session_456").await,
        Err(Error::SessionNotFound("session_456".into()))
    );
    let page = a
        .list_sessions(SessionQuery {
            limit: 10,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.sessions, vec![]);
}

/// Creating a taken id is `SessionExists` and leaves the first session as it was.
pub async fn taken_id_is_session_exists(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let first = create(&*a, "taken").await;
    let mut other = new_session("taken", Some("someone_else"), 99);
    other.metadata = json!({"other": true});
    assert_eq!(
        b.create_session(other).await,
        Err(Error::SessionExists("taken".into()))
    );
    assert_eq!(a.get_session("taken").await.unwrap(), first);
}

/// Every operation naming a session that does not exist is `SessionNotFound`.
pub async fn missing_session_is_not_found_everywhere(a: Arc<dyn Storage>, _b: Arc<dyn Storage>) {
    let nf = || Error::SessionNotFound("nope".into());
    let ttl = Duration::from_secs(30);
    assert_eq!(a.get_session("nope").await, Err(nf()));
    assert_eq!(a.delete_session("nope").await, Err(nf()));
    let mut c = Commit::now();
    c.messages.push(NewMessage::user("hi", None));
    c.events.push(token("hi"));
    assert_eq!(a.commit("nope", c).await.map(|_| ()), Err(nf()));
    assert_eq!(a.messages_after("nope", 0, 10).await, Err(nf()));
    assert_eq!(a.recent_messages("nope", 10).await, Err(nf()));
    assert_eq!(a.events_after("nope", 0, 10).await, Err(nf()));
    assert_eq!(a.find_request("nope", "r").await, Err(nf()));
    assert_eq!(a.get_approval("nope", "c").await, Err(nf()));
    assert_eq!(a.tool_call_answered("nope", "c").await, Err(nf()));
    assert_eq!(a.pending_approvals("nope").await, Err(nf()));
    assert_eq!(a.switch_history("nope").await, Err(nf()));
    assert_eq!(a.get_plan("nope", "p").await, Err(nf()));
    assert_eq!(a.acquire_lease("nope", "o", ttl).await, Err(nf()));
    assert_eq!(a.renew_lease("nope", "o", ttl).await, Err(nf()));
    assert_eq!(a.release_lease("nope", "o").await, Err(nf()));
    assert_eq!(a.request_cancel("nope").await, Err(nf()));
    // Nothing was created on the way.
    assert_eq!(a.get_session("nope").await, Err(nf()));
}

/// Keyset pages in (last_activity desc, id desc) order, filters by user and status, and refuses
/// foreign cursors and out-of-range limits.
pub async fn list_pages_with_cursor_and_filters(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    // s2 and s3 share a last_activity: the id breaks the tie (s3 first).
    let specs = [
        ("s0", "u1", 0),
        ("s1", "u2", 1),
        ("s2", "u1", 2),
        ("s3", "u2", 2),
        ("s4", "u1", 4),
        ("s5", "u2", 5),
        ("s6", "u1", 6),
    ];
    let mut by_id = BTreeMap::new();
    for (id, user, t) in specs {
        let s = a.create_session(new_session(id, Some(user), t)).await.unwrap();
        by_id.insert(id, s);
    }
    // s1 starts a turn; its activity time stays 1, so the order is unchanged.
    let mut c = at(1);
    c.session.status = Some(SessionStatus::Running);
    let running = a.commit("s1", c).await.unwrap().session;
    by_id.insert("s1", running);
    let order = |ids: &[&str]| -> Vec<Session> { ids.iter().map(|i| by_id[i].clone()).collect() };

    let collect_pages = |storage: Arc<dyn Storage>, query: SessionQuery| async move {
        let mut pages = vec![];
        let mut q = query;
        loop {
            let page = storage.list_sessions(q.clone()).await.unwrap();
            let next = page.next_cursor.clone();
            pages.push(page.sessions);
            match next {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
            assert!(pages.len() < 20, "pagination does not end");
        }
        pages
    };

    let pages = collect_pages(
        b.clone(),
        SessionQuery {
            limit: 3,
            ..SessionQuery::default()
        },
    )
    .await;
    assert_eq!(
        pages,
        vec![
            order(&["s6", "s5", "s4"]),
            order(&["s3", "s2", "s1"]),
            order(&["s0"])
        ]
    );
    // A page that ends exactly at the last session has no next cursor.
    let whole = b
        .list_sessions(SessionQuery {
            limit: 7,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(whole.sessions, order(&["s6", "s5", "s4", "s3", "s2", "s1", "s0"]));
    assert_eq!(whole.next_cursor, None);

    let pages = collect_pages(
        a.clone(),
        SessionQuery {
            user_id: Some("u2".into()),
            limit: 2,
            ..SessionQuery::default()
        },
    )
    .await;
    let flat: Vec<Session> = pages.into_iter().flatten().collect();
    assert_eq!(flat, order(&["s5", "s3", "s1"]));

    let running = a
        .list_sessions(SessionQuery {
            status: Some(SessionStatus::Running),
            limit: 100,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(running.sessions, order(&["s1"]));
    let none = a
        .list_sessions(SessionQuery {
            user_id: Some("u1".into()),
            status: Some(SessionStatus::Running),
            limit: 100,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(none.sessions, vec![]);
    assert_eq!(none.next_cursor, None);

    for bad in ["not-a-cursor", "", "c1.x.s1"] {
        let r = a
            .list_sessions(SessionQuery {
                limit: 3,
                cursor: Some(bad.into()),
                ..SessionQuery::default()
            })
            .await;
        assert!(matches!(r, Err(Error::InvalidRequest(_))), "{bad:?}: {r:?}");
    }
    for limit in [0, 1001] {
        let r = a
            .list_sessions(SessionQuery {
                limit,
                ..SessionQuery::default()
            })
            .await;
        assert!(matches!(r, Err(Error::InvalidRequest(_))), "{limit}: {r:?}");
    }
}

/// `total` is the number of sessions matching the filters on every page, whatever the cursor
/// and the page size.
pub async fn list_total_counts_the_filter_across_all_pages(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let empty = b
        .list_sessions(SessionQuery {
            limit: 10,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (empty.sessions.len(), empty.next_cursor, empty.total),
        (0, None, 0)
    );
    for (i, user) in ["u1", "u2", "u1", "u1", "u2"].into_iter().enumerate() {
        a.create_session(new_session(&format!("s{i}"), Some(user), i as i64))
            .await
            .unwrap();
    }
    a.create_session(new_session("anonymous", None, 9)).await.unwrap();
    let mut c = at(10);
    c.session.status = Some(SessionStatus::Running);
    a.commit("s3", c).await.unwrap();

    // (user, status, limit) → the `total` of every page, and how many pages there are.
    type Case = (Option<&'static str>, Option<SessionStatus>, usize, u64, usize);
    let cases: [Case; 5] = [
        (None, None, 4, 6, 2),
        (Some("u1"), None, 1, 3, 3),
        (Some("u2"), None, 1000, 2, 1),
        (Some("nobody"), None, 5, 0, 1),
        (Some("u1"), Some(SessionStatus::Running), 1, 1, 1),
    ];
    for (user, status, limit, total, pages) in cases {
        let mut query = SessionQuery {
            user_id: user.map(String::from),
            status,
            limit,
            cursor: None,
        };
        let mut totals = vec![];
        loop {
            let page = b.list_sessions(query.clone()).await.unwrap();
            totals.push(page.total);
            match page.next_cursor {
                Some(c) => query.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(totals, vec![total; pages], "{user:?} {status:?} limit {limit}");
    }
}

/// Four tasks (two per handle) commit at once; message and event seqs come out exactly 1..=N,
/// each commit's message and events contiguous and each stored row the one its commit wrote.
pub async fn concurrent_commits_get_gap_free_contiguous_seqs(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    const TASKS: u64 = 4;
    const PER_TASK: u64 = 100;
    create(&*a, "busy").await;
    let mut handles = vec![];
    for t in 0..TASKS {
        let s = if t % 2 == 0 { a.clone() } else { b.clone() };
        handles.push(tokio::spawn(async move {
            let mut got = vec![];
            for i in 0..PER_TASK {
                let mut c = Commit::now();
                c.messages.push(NewMessage::user(format!("{t}:{i}"), None));
                c.events.push(token(format!("{t}:{i}:0")));
                c.events.push(token(format!("{t}:{i}:1")));
                let done = s.commit("busy", c).await.unwrap();
                assert_eq!(done.messages.len(), 1);
                assert_eq!(done.events.len(), 2);
                got.push((
                    format!("{t}:{i}"),
                    done.messages[0].seq,
                    done.events[0].seq,
                    done.events[1].seq,
                ));
            }
            got
        }));
    }
    let mut content_at_seq = BTreeMap::new();
    let mut token_at_seq = BTreeMap::new();
    for h in handles {
        let got = h.await.unwrap();
        for w in got.windows(2) {
            assert!(w[0].1 < w[1].1, "one task's message seqs go backwards: {w:?}");
        }
        for (label, m, e0, e1) in got {
            assert_eq!(e1, e0 + 1, "events of commit {label} are not contiguous");
            assert!(content_at_seq.insert(m, label.clone()).is_none(), "seq {m} twice");
            assert!(token_at_seq.insert(e0, format!("{label}:0")).is_none());
            assert!(token_at_seq.insert(e1, format!("{label}:1")).is_none());
        }
    }
    let n = TASKS * PER_TASK;
    assert_eq!(
        content_at_seq.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    assert_eq!(
        token_at_seq.keys().copied().collect::<Vec<_>>(),
        (1..=2 * n).collect::<Vec<_>>()
    );
    let messages = all_messages(&*b, "busy").await;
    assert_eq!(
        messages
            .iter()
            .map(|m| (m.seq, m.content.clone()))
            .collect::<Vec<_>>(),
        content_at_seq.into_iter().collect::<Vec<_>>()
    );
    let events = all_events(&*a, "busy").await;
    assert_eq!(
        events,
        token_at_seq
            .into_iter()
            .map(|(seq, t)| Event::new(seq, token(t)))
            .collect::<Vec<_>>()
    );
    let s = a.get_session("busy").await.unwrap();
    assert_eq!(
        (s.message_count, s.last_message_seq, s.last_event_seq),
        (n, n, 2 * n)
    );
}

/// `messages_after`, `recent_messages` and `events_after` return the right window, oldest first;
/// system messages are stored but not counted.
pub async fn reads_after_and_recent_respect_limits(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "hist").await;
    let call = ToolCall {
        id: "call_1".into(),
        name: "read_file".into(),
        arguments: json!({"path": "src/main.rs"}),
    };
    let news: Vec<NewMessage> = (0..10)
        .map(|i| match i % 4 {
            0 => NewMessage::user(format!("question {i}"), Some("orchestrator".into())),
            1 => NewMessage::assistant(format!("answer {i}"), Some("coder".into()), vec![call.clone()]),
            2 => NewMessage::tool("call_1", format!("result {i}"), Some("coder".into())),
            _ => NewMessage {
                role: Role::System,
                content: format!("note {i}"),
                agent: None,
                tool_calls: vec![],
                tool_call_id: None,
            },
        })
        .collect();
    let payloads: Vec<EventPayload> = (0..10).map(|i| token(format!("t{i}"))).collect();
    // Two commits: 4 + 6 messages, 3 + 7 events.
    let mut c1 = at(10);
    c1.messages = news[..4].to_vec();
    c1.events = payloads[..3].to_vec();
    let done1 = a.commit("hist", c1).await.unwrap();
    let mut c2 = at(20);
    c2.messages = news[4..].to_vec();
    c2.events = payloads[3..].to_vec();
    let done2 = b.commit("hist", c2).await.unwrap();

    let expected: Vec<Message> = news
        .iter()
        .enumerate()
        .map(|(i, m)| stored(m, i as u64 + 1, if i < 4 { ts(10) } else { ts(20) }))
        .collect();
    let expected_events: Vec<Event> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| Event::new(i as u64 + 1, p.clone()))
        .collect();
    assert_eq!(done1.messages, expected[..4].to_vec());
    assert_eq!(done2.messages, expected[4..].to_vec());
    assert_eq!(done1.events, expected_events[..3].to_vec());
    assert_eq!(done2.events, expected_events[3..].to_vec());

    assert_eq!(a.messages_after("hist", 0, 100).await.unwrap(), expected);
    assert_eq!(
        b.messages_after("hist", 3, 4).await.unwrap(),
        expected[3..7].to_vec()
    );
    assert_eq!(a.messages_after("hist", 10, 5).await.unwrap(), vec![]);
    assert_eq!(a.messages_after("hist", 50, 5).await.unwrap(), vec![]);
    assert_eq!(
        a.recent_messages("hist", 3).await.unwrap(),
        expected[7..].to_vec()
    );
    assert_eq!(a.recent_messages("hist", 100).await.unwrap(), expected);
    assert_eq!(b.events_after("hist", 0, 100).await.unwrap(), expected_events);
    assert_eq!(
        a.events_after("hist", 2, 3).await.unwrap(),
        expected_events[2..5].to_vec()
    );
    assert_eq!(a.events_after("hist", 10, 3).await.unwrap(), vec![]);

    let s = a.get_session("hist").await.unwrap();
    // Messages 3 and 7 (0-based) are system notes.
    assert_eq!(
        (s.message_count, s.last_message_seq, s.last_event_seq),
        (8, 10, 10)
    );
    assert_eq!(s, done2.session);
}

/// A commit whose resolution fails (or whose lease is not held, or whose input is bad) stores
/// none of its messages, events, approvals, switches, plans, usage, request id or session changes.
pub async fn failed_commit_leaves_nothing_behind(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "atomic").await;
    let mut setup = at(5);
    setup.approvals.push(approval("atomic", "decided", 1));
    setup.messages.push(NewMessage::user("first", None));
    setup.events.push(token("first"));
    a.commit("atomic", setup).await.unwrap();
    let mut decide = at(6);
    decide
        .resolutions
        .push(resolution("decided", ApprovalStatus::Approved, "ok", 6));
    a.commit("atomic", decide).await.unwrap();
    let before = a.get_session("atomic").await.unwrap();
    let decided = a.get_approval("atomic", "decided").await.unwrap();

    let everything = |res: ApprovalResolution| {
        let mut c = at(100);
        c.messages = vec![
            NewMessage::user("lost", None),
            NewMessage::assistant("lost too", Some("coder".into()), vec![]),
        ];
        c.events = vec![token("lost"), token("lost too")];
        c.approvals = vec![approval("atomic", "fresh", 100)];
        c.resolutions = vec![res];
        c.switches = vec![switch("orchestrator", "coder", 100)];
        c.plans = vec![plan("plan_lost", "never")];
        c.usage = Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 20,
            ..Default::default()
        });
        c.request_id = Some("req_lost".into());
        c.session = SessionUpdate {
            status: Some(SessionStatus::Running),
            current_agent: Some("debug".into()),
            turn_state: Some(Some(turn_state(json!({"step": 1})))),
            budget: Some(Budget {
                session_tokens: Some(1),
                ..Budget::default()
            }),
        };
        c.cost = Some(1.0);
        c
    };
    assert_eq!(
        b.commit(
            "atomic",
            everything(resolution("decided", ApprovalStatus::Rejected, "no", 100))
        )
        .await
        .map(|_| ()),
        Err(Error::ApprovalAlreadyDecided("decided".into()))
    );
    assert_eq!(
        a.commit(
            "atomic",
            everything(resolution("ghost", ApprovalStatus::Rejected, "no", 100))
        )
        .await
        .map(|_| ()),
        Err(Error::ApprovalNotFound("ghost".into()))
    );
    let mut fenced = everything(resolution("fresh", ApprovalStatus::Approved, "ok", 100));
    fenced.lease_owner = Some("nobody".into());
    assert_eq!(
        b.commit("atomic", fenced).await.map(|_| ()),
        Err(Error::SessionBusy("atomic".into()))
    );
    let pending_res = everything(resolution("fresh", ApprovalStatus::Pending, "?", 100));
    assert!(matches!(
        a.commit("atomic", pending_res).await,
        Err(Error::InvalidRequest(_))
    ));
    let mut foreign = everything(resolution("fresh", ApprovalStatus::Approved, "ok", 100));
    foreign.approvals = vec![approval("other_session", "fresh", 100)];
    assert!(matches!(
        a.commit("atomic", foreign).await,
        Err(Error::InvalidRequest(_))
    ));

    for s in [&a, &b] {
        assert_eq!(s.get_session("atomic").await.unwrap(), before);
        assert_eq!(all_messages(&**s, "atomic").await.len(), 1);
        assert_eq!(all_events(&**s, "atomic").await.len(), 1);
        assert_eq!(
            s.get_approval("atomic", "fresh").await,
            Err(Error::ApprovalNotFound("fresh".into()))
        );
        assert_eq!(s.get_approval("atomic", "decided").await.unwrap(), decided);
        assert_eq!(s.pending_approvals("atomic").await.unwrap(), vec![]);
        assert_eq!(s.switch_history("atomic").await.unwrap(), vec![]);
        assert_eq!(s.get_plan("atomic", "plan_lost").await.unwrap(), None);
        assert_eq!(s.find_request("atomic", "req_lost").await.unwrap(), None);
    }
    // The seqs the failed commits would have used are handed out next, without a gap.
    let mut next = at(200);
    next.messages.push(NewMessage::user("second", None));
    next.events.push(token("second"));
    let done = b.commit("atomic", next).await.unwrap();
    assert_eq!(done.messages[0].seq, 2);
    assert_eq!(done.events[0].seq, 2);
}

/// Deleting a session removes all of it: the same id recreated starts empty, and other sessions
/// keep theirs.
pub async fn delete_leaves_nothing_behind(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let fill = |id: &'static str| {
        let mut c = at(10);
        c.messages = vec![NewMessage::user("hello", None)];
        c.events = vec![token("hello")];
        c.approvals = vec![approval(id, "call_1", 10)];
        c.switches = vec![switch("orchestrator", "coder", 10)];
        c.plans = vec![plan("plan_1", "goal")];
        c.usage = Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            ..Default::default()
        });
        c.request_id = Some("req_1".into());
        c.session.turn_state = Some(Some(turn_state(json!({"paused": true}))));
        c
    };
    create(&*a, "doomed").await;
    create(&*a, "kept").await;
    a.commit("doomed", fill("doomed")).await.unwrap();
    let kept = a.commit("kept", fill("kept")).await.unwrap().session;
    assert!(
        a.acquire_lease("doomed", "owner_1", Duration::from_secs(60))
            .await
            .unwrap()
    );

    b.delete_session("doomed").await.unwrap();
    let recreated = create(&*b, "doomed").await;
    assert_eq!(recreated, fresh(&new_session("doomed", Some("user_1"), 0)));
    for s in [&a, &b] {
        assert_eq!(s.get_session("doomed").await.unwrap(), recreated);
        assert_eq!(all_messages(&**s, "doomed").await, vec![]);
        assert_eq!(s.recent_messages("doomed", 10).await.unwrap(), vec![]);
        assert_eq!(all_events(&**s, "doomed").await, vec![]);
        assert_eq!(
            s.get_approval("doomed", "call_1").await,
            Err(Error::ApprovalNotFound("call_1".into()))
        );
        assert_eq!(s.pending_approvals("doomed").await.unwrap(), vec![]);
        assert_eq!(s.switch_history("doomed").await.unwrap(), vec![]);
        assert_eq!(s.get_plan("doomed", "plan_1").await.unwrap(), None);
        assert_eq!(s.find_request("doomed", "req_1").await.unwrap(), None);
    }
    // The old lease went with the session.
    assert!(
        b.acquire_lease("doomed", "owner_2", Duration::from_secs(60))
            .await
            .unwrap()
    );
    // The other session is untouched.
    assert_eq!(a.get_session("kept").await.unwrap(), kept);
    assert_eq!(all_messages(&*b, "kept").await.len(), 1);
    assert_eq!(b.pending_approvals("kept").await.unwrap().len(), 1);
    assert_eq!(b.switch_history("kept").await.unwrap().len(), 1);
    assert_eq!(
        b.get_plan("kept", "plan_1").await.unwrap(),
        Some(plan("plan_1", "goal"))
    );
    assert_eq!(b.find_request("kept", "req_1").await.unwrap(), Some(1));
}

/// Cyrillic, emoji and CJK text, and a 1 MiB message, come back byte for byte.
pub async fn unicode_and_one_mib_content_round_trip(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let mut new = new_session("unicode_session", Some("пользователь"), 0);
    new.metadata = json!({"project_path": "/home/иван/проект", "emoji": "🚀✨", "漢字": "かな"});
    let created = a.create_session(new.clone()).await.unwrap();
    assert_eq!(created, fresh(&new));

    let big: String = "ж🦀x\n".repeat(1024 * 1024 / 8);
    assert_eq!(big.len(), 1024 * 1024);
    let small = "Привет, мир! Создай виджет профиля 🚀🦀 — naïve 漢字 \u{1F600}\t\"quoted\"\\";
    let call = ToolCall {
        id: "вызов_1".into(),
        name: "write_file".into(),
        arguments: json!({"path": "файл.md", "content": small}),
    };
    let news = vec![
        NewMessage::user(small, Some("оркестратор".into())),
        NewMessage::assistant(big.clone(), Some("coder".into()), vec![call]),
    ];
    let payloads = vec![
        token(small),
        EventPayload::AssistantMessage(AssistantMessage::Complete { content: big.clone() }),
    ];
    let mut c = at(1);
    c.messages = news.clone();
    c.events = payloads.clone();
    let mut ap = approval("unicode_session", "вызов_1", 1);
    ap.arguments = json!({"content": small});
    ap.reason = "Изменение файла требует одобрения".into();
    c.approvals = vec![ap.clone()];
    a.commit("unicode_session", c).await.unwrap();

    assert_eq!(
        b.get_session("unicode_session").await.unwrap().metadata,
        new.metadata
    );
    assert_eq!(
        all_messages(&*b, "unicode_session").await,
        vec![stored(&news[0], 1, ts(1)), stored(&news[1], 2, ts(1))]
    );
    assert_eq!(
        all_events(&*b, "unicode_session").await,
        vec![
            Event::new(1, payloads[0].clone()),
            Event::new(2, payloads[1].clone())
        ]
    );
    assert_eq!(b.get_approval("unicode_session", "вызов_1").await.unwrap(), ap);
    let user_sessions = b
        .list_sessions(SessionQuery {
            user_id: Some("пользователь".into()),
            limit: 10,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(user_sessions.sessions.len(), 1);
}

/// Approvals are stored and read back whole, listed pending oldest first, and replaced by call id.
pub async fn approvals_put_get_pending_and_replace(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "hitl").await;
    let c2 = approval("hitl", "c2", 5);
    let c1 = approval("hitl", "c1", 3);
    let mut c3 = approval("hitl", "c3", 4);
    c3.request_type = RequestType::Plan;
    c3.tool_name = "propose_plan".into();
    c3.arguments = serde_json::to_value(plan("c3", "goal")).unwrap();
    let mut commit = at(10);
    commit.approvals = vec![c2.clone(), c1.clone(), c3.clone()];
    a.commit("hitl", commit).await.unwrap();
    assert_eq!(b.get_approval("hitl", "c1").await.unwrap(), c1);
    assert_eq!(b.get_approval("hitl", "c3").await.unwrap(), c3);
    assert_eq!(
        b.get_approval("hitl", "missing").await,
        Err(Error::ApprovalNotFound("missing".into()))
    );
    assert_eq!(
        b.pending_approvals("hitl").await.unwrap(),
        vec![c1.clone(), c3.clone(), c2.clone()]
    );

    // Edit-decide c3, with modified arguments.
    let modified = json!({"plan_id": "c3", "goal": "smaller goal", "subtasks": []});
    let mut decide = at(11);
    decide.resolutions.push(ApprovalResolution {
        call_id: "c3".into(),
        status: ApprovalStatus::Edited,
        feedback: Some("smaller please".into()),
        modified_arguments: Some(modified.clone()),
        decided_at: ts(11),
    });
    let done = b.commit("hitl", decide).await.unwrap();
    assert_eq!(done.session.last_activity, ts(11));
    let mut c3_decided = c3.clone();
    c3_decided.status = ApprovalStatus::Edited;
    c3_decided.feedback = Some("smaller please".into());
    c3_decided.modified_arguments = Some(modified);
    c3_decided.decided_at = Some(ts(11));
    assert_eq!(a.get_approval("hitl", "c3").await.unwrap(), c3_decided);
    assert_eq!(
        a.pending_approvals("hitl").await.unwrap(),
        vec![c1.clone(), c2.clone()]
    );

    // Putting an approval with a taken call id replaces it.
    let mut c1_new = c1.clone();
    c1_new.arguments = json!({"path": "b.md", "content": "y"});
    c1_new.reason = "changed".into();
    let mut put = at(12);
    put.approvals.push(c1_new.clone());
    a.commit("hitl", put).await.unwrap();
    assert_eq!(b.get_approval("hitl", "c1").await.unwrap(), c1_new);
    assert_eq!(b.pending_approvals("hitl").await.unwrap(), vec![c1_new, c2]);
}

/// Eight tasks over both handles decide one approval at once: exactly one wins, the others get
/// `ApprovalAlreadyDecided` and their commits (with an event each) leave no trace.
pub async fn racing_resolutions_have_exactly_one_winner(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "race").await;
    let mut put = at(1);
    put.approvals.push(approval("race", "c1", 1));
    a.commit("race", put).await.unwrap();
    let mut handles = vec![];
    for t in 0..8 {
        let s = if t % 2 == 0 { a.clone() } else { b.clone() };
        handles.push(tokio::spawn(async move {
            let status = if t % 3 == 0 {
                ApprovalStatus::Rejected
            } else {
                ApprovalStatus::Approved
            };
            let mut c = at(10 + t);
            c.resolutions
                .push(resolution("c1", status, &format!("task {t}"), 10 + t));
            c.events.push(EventPayload::ApprovalResolved {
                call_id: "c1".into(),
                decision: format!("task {t}"),
            });
            (t, status, s.commit("race", c).await)
        }));
    }
    let mut winners = vec![];
    for h in handles {
        let (t, status, r) = h.await.unwrap();
        match r {
            Ok(_) => winners.push((t, status)),
            Err(e) => assert_eq!(e, Error::ApprovalAlreadyDecided("c1".into())),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let (t, status) = winners[0];
    let mut expected = approval("race", "c1", 1);
    expected.status = status;
    expected.feedback = Some(format!("task {t}"));
    expected.decided_at = Some(ts(10 + t));
    assert_eq!(b.get_approval("race", "c1").await.unwrap(), expected);
    assert_eq!(
        all_events(&*a, "race").await,
        vec![Event::new(
            1,
            EventPayload::ApprovalResolved {
                call_id: "c1".into(),
                decision: format!("task {t}")
            }
        )]
    );
    assert_eq!(a.pending_approvals("race").await.unwrap(), vec![]);
}

/// Switches are kept in order and the last one sets the current agent.
pub async fn switches_are_recorded_in_order(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "sw").await;
    let s1 = switch("orchestrator", "coder", 1);
    let s2 = switch("coder", "architect", 2);
    let s3 = switch("architect", "architect", 3);
    let mut c = at(2);
    c.switches = vec![s1.clone(), s2.clone()];
    let done = a.commit("sw", c).await.unwrap();
    assert_eq!(done.session.current_agent, "architect");
    let mut c = at(3);
    c.switches = vec![s3.clone()];
    b.commit("sw", c).await.unwrap();
    assert_eq!(a.switch_history("sw").await.unwrap(), vec![s1, s2, s3]);
    let mut expected = fresh(&new_session("sw", Some("user_1"), 0));
    expected.current_agent = "architect".into();
    expected.last_activity = ts(3);
    assert_eq!(b.get_session("sw").await.unwrap(), expected);
    // An explicit current agent without a switch record.
    let mut c = at(4);
    c.session.current_agent = Some("debug".into());
    assert_eq!(a.commit("sw", c).await.unwrap().session.current_agent, "debug");
    assert_eq!(b.switch_history("sw").await.unwrap().len(), 3);
}

/// A history read is the session as stored, its messages after a seq (limited, oldest first)
/// and every switch, the same as the three separate reads; a missing session is not found.
pub async fn session_history_is_the_session_its_messages_after_and_its_switches(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    create(&*a, "hist").await;
    let sw = switch("orchestrator", "coder", 1);
    let mut c = at(1);
    c.messages = vec![
        NewMessage::user("one", None),
        NewMessage::assistant("two", Some("coder".into()), vec![]),
        NewMessage::user("three", None),
    ];
    c.switches = vec![sw.clone()];
    a.commit("hist", c).await.unwrap();
    let (session, messages, switches) = b.session_history("hist", 1, 1).await.unwrap();
    assert_eq!(session, b.get_session("hist").await.unwrap());
    assert_eq!(messages, b.messages_after("hist", 1, 1).await.unwrap());
    assert_eq!(
        messages
            .iter()
            .map(|m| (m.seq, m.content.as_str()))
            .collect::<Vec<_>>(),
        vec![(2, "two")]
    );
    assert_eq!(switches, vec![sw.clone()]);
    let back = switch("coder", "orchestrator", 2);
    let mut c = at(2);
    c.switches = vec![back.clone()];
    a.commit("hist", c).await.unwrap();
    let (session, messages, switches) = b.session_history("hist", 3, 10).await.unwrap();
    assert_eq!(session, a.get_session("hist").await.unwrap());
    assert_eq!((messages, switches), (vec![], vec![sw, back]));
    // A session of no messages and no switches.
    let empty = create(&*a, "hist_empty").await;
    assert_eq!(
        b.session_history("hist_empty", 0, 10).await.unwrap(),
        (empty, vec![], vec![])
    );
    assert_eq!(
        a.session_history("nope", 0, 10).await,
        Err(Error::SessionNotFound("nope".into()))
    );
}

/// Plans are stored by id and replaced by id.
pub async fn plans_are_put_and_replaced(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "plans").await;
    let p1 = plan("plan_1", "build the widget");
    let p2 = plan("plan_2", "другая цель");
    let mut c = at(1);
    c.plans = vec![p1.clone(), p2.clone()];
    a.commit("plans", c).await.unwrap();
    assert_eq!(b.get_plan("plans", "plan_1").await.unwrap(), Some(p1.clone()));
    assert_eq!(b.get_plan("plans", "plan_2").await.unwrap(), Some(p2));
    assert_eq!(b.get_plan("plans", "plan_3").await.unwrap(), None);
    let mut p1_done = p1;
    p1_done.subtasks[0].status = "completed".into();
    let mut c = at(2);
    c.plans = vec![p1_done.clone()];
    b.commit("plans", c).await.unwrap();
    assert_eq!(a.get_plan("plans", "plan_1").await.unwrap(), Some(p1_done));
}

/// Usage adds up over commits.
pub async fn usage_accumulates(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "tokens").await;
    let mut c = at(1);
    c.usage = Some(Usage {
        prompt_tokens: 100,
        completion_tokens: 20,
        ..Default::default()
    });
    a.commit("tokens", c).await.unwrap();
    let mut c = at(2);
    c.usage = Some(Usage {
        prompt_tokens: 7,
        completion_tokens: 3,
        ..Default::default()
    });
    c.events.push(EventPayload::Done {
        stop_reason: StopReason::Completed,
        usage: Usage {
            prompt_tokens: 107,
            completion_tokens: 23,
            ..Default::default()
        }
        .into(),
    });
    let done = b.commit("tokens", c).await.unwrap();
    let total = Usage {
        prompt_tokens: 107,
        completion_tokens: 23,
        ..Default::default()
    };
    assert_eq!(done.session.usage, total);
    // A commit without usage changes nothing.
    a.commit("tokens", at(3)).await.unwrap();
    assert_eq!(a.get_session("tokens").await.unwrap().usage, total);
}

/// A session's budgets are set at creation and replaced by a commit; cost and cached prompt
/// tokens add up like tokens, in the same atomic commit, and a failed commit adds nothing.
pub async fn budgets_and_cost_are_stored_with_commits(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let mut new = new_session("budgets", None, 0);
    new.budget = Budget {
        session_tokens: Some(1000),
        turn_time_secs: Some(60),
        ..Budget::default()
    };
    a.create_session(new.clone()).await.unwrap();
    let spend = |at_ms, cost| {
        let mut c = at(at_ms);
        c.usage = Some(Usage {
            prompt_tokens: 100,
            completion_tokens: 10,
            cached_prompt_tokens: 40,
        });
        c.cost = Some(cost);
        c
    };
    a.commit("budgets", spend(1, 0.25)).await.unwrap();
    let mut c = spend(2, 0.125);
    let raised = Budget {
        session_tokens: Some(2000),
        session_cost: Some(1.5),
        ..Budget::default()
    };
    c.session.budget = Some(raised);
    let after = b.commit("budgets", c).await.unwrap().session;
    let mut expected = fresh(&new);
    expected.usage = Usage {
        prompt_tokens: 200,
        completion_tokens: 20,
        cached_prompt_tokens: 80,
    };
    expected.cost = 0.375;
    expected.budget = raised;
    expected.last_activity = ts(2);
    assert_eq!(after, expected);
    assert_eq!(a.get_session("budgets").await.unwrap(), expected);
    // A commit that fails (an unknown approval) adds no cost and changes no budget.
    let mut failing = spend(3, 10.0);
    failing.session.budget = Some(Budget::default());
    failing.resolutions.push(crate::approval::ApprovalResolution {
        call_id: "nope".into(),
        status: crate::approval::ApprovalStatus::Approved,
        feedback: None,
        modified_arguments: None,
        decided_at: ts(3),
    });
    assert!(a.commit("budgets", failing).await.is_err());
    assert_eq!(b.get_session("budgets").await.unwrap(), expected);
    // Unlimited again.
    let mut c = at(4);
    c.session.budget = Some(Budget::default());
    let cleared = a.commit("budgets", c).await.unwrap().session;
    assert_eq!(
        (cleared.budget, b.get_session("budgets").await.unwrap().budget),
        (Budget::default(), Budget::default())
    );
}

/// A turn state written from `v`.
fn turn_state(v: Value) -> TurnStateJson {
    TurnStateJson::from_value(&v)
}

/// The turn state is set, kept when not mentioned, and cleared; the status follows each update.
pub async fn turn_state_and_status_updates(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "state").await;
    // Kept as the text given (spacing and key order too), not re-written from a parsed value.
    let state =
        TurnStateJson::from_text(r#"{"open_calls": ["c1","c2"], "iteration": 3, "текст": "🦀"}"#).unwrap();
    let mut c = at(1);
    c.session.turn_state = Some(Some(state.clone()));
    c.session.status = Some(SessionStatus::Running);
    a.commit("state", c).await.unwrap();
    let s = b.get_session("state").await.unwrap();
    assert_eq!(
        (s.turn_state.clone(), s.status),
        (Some(state.clone()), SessionStatus::Running)
    );

    let mut c = at(2);
    c.session.status = Some(SessionStatus::AwaitingApproval);
    b.commit("state", c).await.unwrap();
    let s = a.get_session("state").await.unwrap();
    assert_eq!(
        (s.turn_state.clone(), s.status),
        (Some(state.clone()), SessionStatus::AwaitingApproval)
    );

    let mut c = at(3);
    c.session.status = Some(SessionStatus::AwaitingToolResult);
    a.commit("state", c).await.unwrap();
    assert_eq!(
        b.get_session("state").await.unwrap().status,
        SessionStatus::AwaitingToolResult
    );

    let mut c = at(4);
    c.session.turn_state = Some(None);
    c.session.status = Some(SessionStatus::Idle);
    a.commit("state", c).await.unwrap();
    let mut expected = fresh(&new_session("state", Some("user_1"), 0));
    expected.last_activity = ts(4);
    assert_eq!(b.get_session("state").await.unwrap(), expected);
}

/// A request id maps to the seq of its commit's first event; reusing it keeps the first.
pub async fn find_request_remembers_first_event_seq(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "req").await;
    let mut c = at(1);
    c.events.push(token("earlier"));
    a.commit("req", c).await.unwrap();
    let mut c = at(2);
    c.request_id = Some("req_abc".into());
    c.events = vec![token("a"), token("b")];
    b.commit("req", c).await.unwrap();
    assert_eq!(a.find_request("req", "req_abc").await.unwrap(), Some(2));
    assert_eq!(a.find_request("req", "req_other").await.unwrap(), None);
    let mut c = at(3);
    c.request_id = Some("req_abc".into());
    c.events = vec![token("c")];
    a.commit("req", c).await.unwrap();
    assert_eq!(b.find_request("req", "req_abc").await.unwrap(), Some(2));
    // Request ids are per session.
    create(&*a, "req_2").await;
    assert_eq!(a.find_request("req_2", "req_abc").await.unwrap(), None);
}

/// `lease_session` takes the lease as `acquire_lease` does and returns the session as stored
/// (with what earlier commits did to it); `None` while another owner holds the lease, and
/// `SessionNotFound` for a missing session, which it does not create.
pub async fn lease_session_takes_the_lease_and_returns_the_session_as_stored(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    let ttl = Duration::from_secs(60);
    create(&*a, "leased").await;
    let mut c = at(7);
    c.messages.push(NewMessage::user("hi", None));
    c.events.push(token("hi"));
    c.session.status = Some(SessionStatus::Running);
    let committed = a.commit("leased", c).await.unwrap().session;
    assert_eq!(
        b.lease_session("leased", "o1", ttl).await.unwrap(),
        Some(committed.clone())
    );
    assert_eq!(a.lease_session("leased", "o2", ttl).await.unwrap(), None);
    assert!(!a.acquire_lease("leased", "o2", ttl).await.unwrap());
    // The owner takes its own lease again.
    assert_eq!(
        a.lease_session("leased", "o1", ttl).await.unwrap(),
        Some(committed.clone())
    );
    b.release_lease("leased", "o1").await.unwrap();
    assert_eq!(
        a.lease_session("leased", "o2", ttl).await.unwrap(),
        Some(committed)
    );
    assert!(!b.acquire_lease("leased", "o1", ttl).await.unwrap());
    assert_eq!(
        a.lease_session("absent", "o1", ttl).await,
        Err(Error::SessionNotFound("absent".into()))
    );
    assert_eq!(
        b.get_session("absent").await,
        Err(Error::SessionNotFound("absent".into()))
    );
}

/// A tool result is found by its call id in its own session, behind any number of newer
/// messages; a call without a result, or another session's result, is not.
pub async fn tool_results_are_found_by_call_id_however_long_the_session(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    create(&*a, "calls").await;
    create(&*a, "calls_2").await;
    let call = |id: &str| ToolCall {
        id: id.into(),
        name: "read_file".into(),
        arguments: json!({"path": "a.txt"}),
    };
    let coder = || Some("coder".to_string());
    let mut c = at(1);
    c.messages = vec![
        NewMessage::assistant("", coder(), vec![call("call_0"), call("call_1")]),
        NewMessage::tool("call_0", "alpha", coder()),
    ];
    a.commit("calls", c).await.unwrap();
    for i in 0..300 {
        let mut c = at(2 + i);
        c.messages = vec![NewMessage::user(format!("message {i}"), None)];
        b.commit("calls", c).await.unwrap();
    }
    let mut c = at(400);
    c.messages = vec![NewMessage::tool("call_9", "other session", coder())];
    a.commit("calls_2", c).await.unwrap();
    let mut found = vec![];
    for (session, id) in [
        ("calls", "call_0"),
        ("calls", "call_1"),
        ("calls", "call_9"),
        ("calls_2", "call_9"),
        ("calls_2", "call_0"),
    ] {
        found.push(b.tool_call_answered(session, id).await.unwrap());
    }
    assert_eq!(found, [true, false, false, true, false]);
}

/// A turn's first commit as `lease_and_commit` takes it: a user message, its request id and the
/// session running, fenced by `owner`.
fn first_commit(owner: &str, request_id: &str) -> Commit {
    let mut c = at(11);
    c.lease_owner = Some(owner.into());
    c.messages
        .push(NewMessage::user("hello", Some("orchestrator".into())));
    c.events.push(token("hi"));
    c.request_id = Some(request_id.into());
    c.session.status = Some(SessionStatus::Running);
    c
}

/// An idle session on the orchestrator with no event yet: what a fresh session is.
fn idle_on_orchestrator() -> Expected {
    Expected {
        status: SessionStatus::Idle,
        current_agent: Some("orchestrator".into()),
        last_event_seq: Some(0),
    }
}

/// What a session holds, read through `s`: the session, its messages and its events.
async fn contents(s: &dyn Storage, id: &str) -> (Session, Vec<Message>, Vec<Event>) {
    (
        s.get_session(id).await.unwrap(),
        s.messages_after(id, 0, 100).await.unwrap(),
        s.events_after(id, 0, 100).await.unwrap(),
    )
}

/// On a session as expected, `lease_and_commit` takes the lease and stores the commit: it returns
/// what it stored, the request id is remembered, and the lease is the owner's.
pub async fn lease_and_commit_takes_the_lease_and_stores_the_commit_when_the_session_is_as_expected(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    let ttl = Duration::from_secs(60);
    create(&*a, "first").await;
    let done = a
        .lease_and_commit(
            "first",
            "o1",
            ttl,
            &idle_on_orchestrator(),
            first_commit("o1", "r1"),
        )
        .await
        .unwrap();
    let (session, messages, events) = contents(&*b, "first").await;
    assert_eq!(session.status, SessionStatus::Running);
    assert_eq!((session.last_message_seq, session.last_event_seq), (1, 1));
    assert_eq!(
        done,
        Leased::Committed(Committed {
            messages,
            events,
            session
        })
    );
    assert_eq!(b.find_request("first", "r1").await.unwrap(), Some(1));
    assert!(!b.acquire_lease("first", "o2", ttl).await.unwrap());
    // Without an agent or a seq to expect, the status alone is checked.
    let running = Expected {
        status: SessionStatus::Running,
        current_agent: None,
        last_event_seq: None,
    };
    let again = b
        .lease_and_commit("first", "o1", ttl, &running, first_commit("o1", "r2"))
        .await
        .unwrap();
    let Leased::Committed(again) = again else {
        panic!("expected a commit, got {again:?}")
    };
    assert_eq!(again.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
}

/// Another owner's lease refuses it (`Busy`), and a missing session is `SessionNotFound`: either
/// way nothing is stored, and no session is created.
pub async fn lease_and_commit_refused_or_on_a_missing_session_stores_nothing(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    let ttl = Duration::from_secs(60);
    let created = create(&*a, "held").await;
    assert!(a.acquire_lease("held", "o2", ttl).await.unwrap());
    let refused = b
        .lease_and_commit(
            "held",
            "o1",
            ttl,
            &idle_on_orchestrator(),
            first_commit("o1", "r1"),
        )
        .await;
    assert_eq!(refused, Ok(Leased::Busy));
    assert_eq!(contents(&*a, "held").await, (created, vec![], vec![]));
    assert_eq!(a.find_request("held", "r1").await.unwrap(), None);
    assert!(!a.acquire_lease("held", "o1", ttl).await.unwrap());

    let missing = b
        .lease_and_commit(
            "absent",
            "o1",
            ttl,
            &idle_on_orchestrator(),
            first_commit("o1", "r1"),
        )
        .await;
    assert_eq!(missing, Err(Error::SessionNotFound("absent".into())));
    assert_eq!(
        a.get_session("absent").await,
        Err(Error::SessionNotFound("absent".into()))
    );
}

/// A session not as expected (another status, agent or last event, or a request id that started
/// a turn already) gives the lease to the caller, commits nothing and returns the session as
/// stored: the caller goes the long way under its lease.
pub async fn lease_and_commit_on_an_unexpected_session_takes_the_lease_and_commits_nothing(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    let ttl = Duration::from_secs(60);
    create(&*a, "other").await;
    let mut c = at(5);
    c.events.push(token("x"));
    c.request_id = Some("used".into());
    c.session.status = Some(SessionStatus::AwaitingToolResult);
    c.session.turn_state = Some(Some(turn_state(json!({"open_calls": ["c1"]}))));
    let stored = a.commit("other", c).await.unwrap().session;
    let stored_events = a.events_after("other", 0, 100).await.unwrap();
    // Each attempt would replace the stored turn state: the session returned still has it.
    let first_commit = |owner: &str, request_id: &str| {
        let mut c = first_commit(owner, request_id);
        c.session.turn_state = Some(Some(turn_state(json!({"iteration": 1}))));
        c
    };
    let paused = Expected {
        status: SessionStatus::AwaitingToolResult,
        current_agent: Some("orchestrator".into()),
        last_event_seq: Some(1),
    };
    let unmet = [
        idle_on_orchestrator(),
        Expected {
            current_agent: Some("coder".into()),
            ..paused.clone()
        },
        Expected {
            last_event_seq: Some(0),
            ..paused.clone()
        },
    ];
    for (i, expected) in unmet.iter().enumerate() {
        let owner = format!("o{i}");
        let taken = b
            .lease_and_commit("other", &owner, ttl, expected, first_commit(&owner, "r1"))
            .await;
        assert_eq!(taken, Ok(Leased::Taken(stored.clone())), "{expected:?}");
        assert_eq!(
            contents(&*a, "other").await,
            (stored.clone(), vec![], stored_events.clone())
        );
        assert_eq!(a.find_request("other", "r1").await.unwrap(), None);
        // The lease is the caller's: nobody else takes it; the next case's owner releases it.
        assert!(!a.acquire_lease("other", "someone", ttl).await.unwrap());
        a.release_lease("other", &owner).await.unwrap();
    }
    // The expectation met, but the request id started a turn already: it is replayed, not rerun.
    let replayed = b
        .lease_and_commit("other", "o1", ttl, &paused, first_commit("o1", "used"))
        .await;
    assert_eq!(replayed, Ok(Leased::Taken(stored.clone())));
    assert_eq!(contents(&*a, "other").await, (stored, vec![], stored_events));
    assert!(!a.acquire_lease("other", "o2", ttl).await.unwrap());
}

/// A commit that fails once the lease is taken (here a resolution of an approval that does not
/// exist) returns its error and stores nothing of itself.
pub async fn lease_and_commit_whose_commit_fails_stores_nothing_of_it(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    let ttl = Duration::from_secs(60);
    let created = create(&*a, "fails").await;
    let mut c = first_commit("o1", "r1");
    c.resolutions
        .push(resolution("call_missing", ApprovalStatus::Approved, "ok", 12));
    let failed = b
        .lease_and_commit("fails", "o1", ttl, &idle_on_orchestrator(), c)
        .await;
    assert_eq!(failed, Err(Error::ApprovalNotFound("call_missing".into())));
    assert_eq!(contents(&*a, "fails").await, (created, vec![], vec![]));
    assert_eq!(a.find_request("fails", "r1").await.unwrap(), None);
}

/// Acquire, re-acquire by the owner, refusal for others, renew and release.
pub async fn lease_acquire_renew_release(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let ttl = Duration::from_secs(60);
    create(&*a, "lease").await;
    assert!(!a.renew_lease("lease", "o1", ttl).await.unwrap());
    assert!(a.acquire_lease("lease", "o1", ttl).await.unwrap());
    assert!(b.acquire_lease("lease", "o1", ttl).await.unwrap());
    assert!(!b.acquire_lease("lease", "o2", ttl).await.unwrap());
    assert!(b.renew_lease("lease", "o1", ttl).await.unwrap());
    assert!(!a.renew_lease("lease", "o2", ttl).await.unwrap());
    // Releasing someone else's lease does nothing.
    a.release_lease("lease", "o2").await.unwrap();
    assert!(!a.acquire_lease("lease", "o2", ttl).await.unwrap());
    b.release_lease("lease", "o1").await.unwrap();
    assert!(!a.renew_lease("lease", "o1", ttl).await.unwrap());
    assert!(a.acquire_lease("lease", "o2", ttl).await.unwrap());
    assert!(!b.acquire_lease("lease", "o1", ttl).await.unwrap());
    // Leases are per session.
    create(&*a, "lease_2").await;
    assert!(b.acquire_lease("lease_2", "o1", ttl).await.unwrap());
}

/// Eight tasks over both handles race for a free lease: exactly one gets it.
pub async fn racing_lease_acquires_have_exactly_one_winner(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "contended").await;
    let mut handles = vec![];
    for t in 0..8 {
        let s = if t % 2 == 0 { a.clone() } else { b.clone() };
        handles.push(tokio::spawn(async move {
            let owner = format!("owner_{t}");
            let won = s
                .acquire_lease("contended", &owner, Duration::from_secs(60))
                .await
                .unwrap();
            (owner, won)
        }));
    }
    let mut winners = vec![];
    for h in handles {
        let (owner, won) = h.await.unwrap();
        if won {
            winners.push(owner);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let winner = &winners[0];
    assert!(
        a.renew_lease("contended", winner, Duration::from_secs(60))
            .await
            .unwrap()
    );
    let losers: BTreeSet<String> = (0..8).map(|t| format!("owner_{t}")).collect();
    for loser in losers.iter().filter(|o| *o != winner) {
        assert!(
            !b.renew_lease("contended", loser, Duration::from_secs(60))
                .await
                .unwrap()
        );
    }
}

/// An expired lease stays its owner's (renew, commit) until another owner takes it; then the old
/// owner can neither renew nor commit under it.
pub async fn expired_lease_is_taken_over(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "expiring").await;
    let short = Duration::from_millis(150);
    assert!(a.acquire_lease("expiring", "o1", short).await.unwrap());
    assert!(
        !b.acquire_lease("expiring", "o2", Duration::from_secs(60))
            .await
            .unwrap()
    );
    // Expired, nobody took it: a slow owner keeps its turn.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut c = Commit::now();
    c.lease_owner = Some("o1".into());
    c.events.push(token("late"));
    assert_eq!(a.commit("expiring", c).await.unwrap().events[0].seq, 1);
    assert!(a.renew_lease("expiring", "o1", short).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        b.acquire_lease("expiring", "o2", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        !a.renew_lease("expiring", "o1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let mut c = Commit::now();
    c.lease_owner = Some("o1".into());
    c.events.push(token("stale"));
    assert_eq!(
        a.commit("expiring", c).await.map(|_| ()),
        Err(Error::SessionBusy("expiring".into()))
    );
    let mut c = Commit::now();
    c.lease_owner = Some("o2".into());
    c.events.push(token("fresh"));
    assert_eq!(a.commit("expiring", c).await.unwrap().events[0].seq, 2);
}

/// `lease_and_commit` takes a lease as `acquire_lease` does: a live owner's unexpired lease is
/// `Busy` (nothing stored); an expired one, or a dead owner's at once, is taken and the commit
/// stored under it.
pub async fn lease_and_commit_takes_an_expired_or_dead_owners_lease(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    let long = Duration::from_secs(600);
    let alive = a.hold_liveness("o1").await.unwrap();
    let _other = b.hold_liveness("o2").await.unwrap();
    create(&*a, "dead").await;
    create(&*a, "expired").await;
    assert!(a.acquire_lease("dead", "o1", long).await.unwrap());
    assert!(
        a.acquire_lease("expired", "o3", Duration::from_millis(50))
            .await
            .unwrap()
    );
    let first = |id: &'static str| {
        let b = b.clone();
        async move {
            b.lease_and_commit(id, "o2", long, &idle_on_orchestrator(), first_commit("o2", "r1"))
                .await
                .unwrap()
        }
    };
    assert_eq!(first("dead").await, Leased::Busy);
    assert_eq!(contents(&*a, "dead").await.2, vec![]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stored = |leased: Leased| match leased {
        Leased::Committed(c) => (c.session.status, c.events),
        other => panic!("not committed: {other:?}"),
    };
    let hi = vec![Event::new(1, token("hi"))];
    assert_eq!(
        stored(first("expired").await),
        (SessionStatus::Running, hi.clone())
    );
    drop(alive);
    // Postgres learns of the closed connection asynchronously: allow it a moment.
    let mut leased = Leased::Busy;
    for _ in 0..100 {
        leased = first("dead").await;
        if leased != Leased::Busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored(leased), (SessionStatus::Running, hi.clone()));
    assert!(!a.renew_lease("dead", "o1", long).await.unwrap());
    assert!(b.renew_lease("dead", "o2", long).await.unwrap());
    assert_eq!(contents(&*a, "dead").await.2, hi);
}

/// A live owner's lease waits for expiry; once the owner's [`Liveness`](super::Liveness) is gone
/// (its process died), another owner takes the lease at once and the old owner is fenced out.
pub async fn a_dead_owners_lease_is_taken_at_once(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let ttl = Duration::from_secs(600);
    create(&*a, "orphan").await;
    let alive = a.hold_liveness("o1").await.unwrap();
    let _other = b.hold_liveness("o2").await.unwrap();
    assert!(a.acquire_lease("orphan", "o1", ttl).await.unwrap());
    assert!(!b.acquire_lease("orphan", "o2", ttl).await.unwrap());
    // An owner that never held liveness is judged by expiry alone.
    create(&*a, "unregistered").await;
    assert!(a.acquire_lease("unregistered", "o3", ttl).await.unwrap());
    drop(alive);
    // Postgres learns of the closed connection asynchronously: allow it a moment.
    let mut taken = false;
    for _ in 0..100 {
        if b.acquire_lease("orphan", "o2", ttl).await.unwrap() {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(taken, "the lease of a dead owner was not taken within 2 s");
    assert!(!a.renew_lease("orphan", "o1", ttl).await.unwrap());
    let mut stale = Commit::now();
    stale.lease_owner = Some("o1".into());
    stale.events.push(token("stale"));
    assert_eq!(
        a.commit("orphan", stale).await.map(|_| ()),
        Err(Error::SessionBusy("orphan".into()))
    );
    assert!(!b.acquire_lease("unregistered", "o2", ttl).await.unwrap());
    // A new liveness for the same owner (a restart that kept its id) makes it live again.
    let _back = a.hold_liveness("o1").await.unwrap();
    assert!(!a.acquire_lease("orphan", "o1", ttl).await.unwrap());
}

/// `orphaned_sessions` lists running sessions whose lease is free, expired or a dead owner's, and
/// nothing else.
pub async fn orphaned_sessions_are_running_ones_nobody_can_run(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let long = Duration::from_secs(600);
    let live = a.hold_liveness("live").await.unwrap();
    let dying = a.hold_liveness("dying").await.unwrap();
    let run = |owner: &'static str| {
        let mut c = Commit::now();
        c.lease_owner = Some(owner.into());
        c.session.status = Some(SessionStatus::Running);
        c
    };
    for (id, owner, ttl) in [
        ("held", "live", long),
        ("dead_owner", "dying", long),
        ("expired", "unregistered", Duration::from_millis(50)),
        ("released", "live", long),
    ] {
        create(&*a, id).await;
        assert!(a.acquire_lease(id, owner, ttl).await.unwrap());
        a.commit(id, run(owner)).await.unwrap();
    }
    a.release_lease("released", "live").await.unwrap();
    create(&*a, "idle").await;
    drop(dying);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut orphans = Vec::new();
    for _ in 0..100 {
        orphans = b.orphaned_sessions(10).await.unwrap();
        orphans.sort();
        if orphans.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // Postgres: the closed connection
    }
    assert_eq!(orphans, ["dead_owner", "expired", "released"]);
    assert_eq!(b.orphaned_sessions(1).await.unwrap().len(), 1);
    drop(live);
}

/// A turn's last commit can give the lease up in the same transaction.
pub async fn last_commit_of_a_turn_releases_the_lease(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "released").await;
    let ttl = Duration::from_secs(60);
    assert!(a.acquire_lease("released", "o1", ttl).await.unwrap());
    assert!(!b.acquire_lease("released", "o2", ttl).await.unwrap());
    let mut last = Commit::now();
    last.lease_owner = Some("o1".into());
    last.release_lease = true;
    last.events.push(token("done"));
    assert_eq!(a.commit("released", last).await.unwrap().events[0].seq, 1);
    assert!(b.acquire_lease("released", "o2", ttl).await.unwrap());
    // Without an owner, release_lease gives nothing up.
    let mut unfenced = Commit::now();
    unfenced.release_lease = true;
    a.commit("released", unfenced).await.unwrap();
    assert!(!a.acquire_lease("released", "o1", ttl).await.unwrap());
}

/// A cancel request marks the session for its lease owner, seen from every handle; renewing keeps
/// the mark, and releasing the lease (directly or by a turn's last commit) or taking it again
/// clears it. Without a lease holder nothing is marked.
pub async fn cancel_requests_reach_the_lease_owner_until_the_lease_changes_hands(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    let ttl = Duration::from_secs(60);
    let none: Vec<String> = vec![];
    create(&*a, "cancel").await;
    create(&*a, "other").await;
    assert_eq!(b.request_cancel("cancel").await, Ok(None));
    assert_eq!(a.cancel_requests("o1").await, Ok(none.clone()));

    assert!(a.acquire_lease("cancel", "o1", ttl).await.unwrap());
    assert!(a.acquire_lease("other", "o1", ttl).await.unwrap());
    assert_eq!(b.request_cancel("cancel").await, Ok(Some("o1".into())));
    assert_eq!(a.cancel_requests("o1").await, Ok(vec!["cancel".to_string()]));
    assert_eq!(a.cancel_requests("o2").await, Ok(none.clone()));
    assert!(a.renew_lease("cancel", "o1", ttl).await.unwrap());
    assert_eq!(b.cancel_requests("o1").await, Ok(vec!["cancel".to_string()]));

    // Released: the mark goes, and a later turn of the same owner does not see it.
    a.release_lease("cancel", "o1").await.unwrap();
    assert_eq!(b.cancel_requests("o1").await, Ok(none.clone()));
    assert!(a.acquire_lease("cancel", "o1", ttl).await.unwrap());
    assert_eq!(b.cancel_requests("o1").await, Ok(none.clone()));

    // Taking the lease (a new turn) clears a mark meant for the turn before.
    assert_eq!(b.request_cancel("cancel").await, Ok(Some("o1".into())));
    assert!(a.acquire_lease("cancel", "o1", ttl).await.unwrap());
    assert_eq!(b.cancel_requests("o1").await, Ok(none.clone()));

    // The turn's last commit releases the lease and the mark with it.
    assert_eq!(b.request_cancel("cancel").await, Ok(Some("o1".into())));
    let mut last = Commit::now();
    last.lease_owner = Some("o1".into());
    last.release_lease = true;
    last.events.push(token("done"));
    a.commit("cancel", last).await.unwrap();
    assert_eq!(b.cancel_requests("o1").await, Ok(none.clone()));
    assert_eq!(b.request_cancel("cancel").await, Ok(None));

    // Deleting a marked session leaves no mark behind.
    assert_eq!(b.request_cancel("other").await, Ok(Some("o1".into())));
    a.delete_session("other").await.unwrap();
    assert_eq!(b.cancel_requests("o1").await, Ok(none));
}

/// A commit naming a lease owner succeeds only while that owner holds the lease.
pub async fn commit_is_fenced_by_lease_owner(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    create(&*a, "fenced").await;
    let fenced = |owner: &str, text: &str| {
        let mut c = Commit::now();
        c.lease_owner = Some(owner.into());
        c.messages.push(NewMessage::user(text, None));
        c.events.push(token(text));
        c
    };
    let busy = || Err(Error::SessionBusy("fenced".into()));
    assert_eq!(
        a.commit("fenced", fenced("o1", "no lease")).await.map(|_| ()),
        busy()
    );
    assert!(
        a.acquire_lease("fenced", "o1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let done = b.commit("fenced", fenced("o1", "held")).await.unwrap();
    assert_eq!((done.messages[0].seq, done.events[0].seq), (1, 1));
    assert_eq!(
        b.commit("fenced", fenced("o2", "not mine")).await.map(|_| ()),
        busy()
    );
    // A commit without an owner is not fenced.
    let mut free = Commit::now();
    free.events.push(token("unfenced"));
    assert_eq!(a.commit("fenced", free).await.unwrap().events[0].seq, 2);
    a.release_lease("fenced", "o1").await.unwrap();
    assert_eq!(
        a.commit("fenced", fenced("o1", "released")).await.map(|_| ()),
        busy()
    );
    let texts: Vec<String> = all_messages(&*b, "fenced")
        .await
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(texts, vec!["held".to_string()]);
    assert_eq!(all_events(&*b, "fenced").await.len(), 2);
}

/// The commit a turn's owner makes after another owner took its lease over (every kind of row and
/// session change a turn's commit carries, and the lease's release) is refused, and changes
/// nothing: no rows, no request id, the session and the new owner's lease as they were; the new
/// owner's next commit gets the next seqs.
pub async fn a_stale_owners_commit_is_refused_after_takeover_and_leaves_nothing(
    a: Arc<dyn Storage>,
    b: Arc<dyn Storage>,
) {
    create(&*a, "stale").await;
    assert!(
        a.acquire_lease("stale", "o1", Duration::from_millis(100))
            .await
            .unwrap()
    );
    let mut first = at(1);
    first.lease_owner = Some("o1".into());
    first.messages.push(NewMessage::user("first", None));
    first.events.push(token("first"));
    a.commit("stale", first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        b.acquire_lease("stale", "o2", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let before = b.get_session("stale").await.unwrap();

    let mut late = at(50);
    late.lease_owner = Some("o1".into());
    late.release_lease = true;
    late.request_id = Some("req_stale".into());
    late.messages = vec![
        NewMessage::assistant("stale answer", Some("coder".into()), vec![]),
        NewMessage::tool("call_1", "stale result", None),
    ];
    late.events = vec![token("stale"), token("stale too")];
    late.usage = Some(Usage {
        prompt_tokens: 7,
        completion_tokens: 8,
        cached_prompt_tokens: 1,
    });
    late.cost = Some(0.5);
    late.session = SessionUpdate {
        status: Some(SessionStatus::Idle),
        current_agent: Some("coder".into()),
        turn_state: Some(Some(turn_state(json!({"stale": true})))),
        budget: Some(Budget {
            session_tokens: Some(3),
            ..Budget::default()
        }),
    };
    assert_eq!(
        a.commit("stale", late).await.map(|_| ()),
        Err(Error::SessionBusy("stale".into()))
    );

    for s in [&a, &b] {
        assert_eq!(s.get_session("stale").await.unwrap(), before);
        assert_eq!(all_messages(&**s, "stale").await.len(), 1);
        assert_eq!(all_events(&**s, "stale").await.len(), 1);
        assert_eq!(s.find_request("stale", "req_stale").await.unwrap(), None);
    }
    // The refused commit gave up nobody's lease: o2 still holds it.
    assert!(
        !a.acquire_lease("stale", "o1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let mut next = at(60);
    next.lease_owner = Some("o2".into());
    next.request_id = Some("req_stale".into());
    next.messages.push(NewMessage::user("second", None));
    next.events.push(token("second"));
    let done = b.commit("stale", next).await.unwrap();
    assert_eq!((done.messages[0].seq, done.events[0].seq), (2, 2));
    assert_eq!(a.find_request("stale", "req_stale").await.unwrap(), Some(2));
}

/// A commit of messages, events, a request id and session changes (a streaming turn's commit)
/// returns exactly the rows and the session it stored, seqs following the earlier commit's.
pub async fn an_appending_commit_returns_what_it_stored(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let created = create(&*a, "appending").await;
    let mut earlier = at(1);
    earlier.messages.push(NewMessage::user("earlier", None));
    earlier.events = vec![token("e1"), token("e2")];
    a.commit("appending", earlier).await.unwrap();

    let call = ToolCall {
        id: "call_7".into(),
        name: "read_file".into(),
        arguments: json!({"path": "a.txt"}),
    };
    let new_messages = vec![
        NewMessage::assistant("reading", Some("coder".into()), vec![call]),
        NewMessage::tool("call_7", "contents", Some("coder".into())),
        NewMessage {
            role: Role::System,
            content: "a note".into(),
            agent: None,
            tool_calls: vec![],
            tool_call_id: None,
        },
    ];
    let mut c = at(20);
    c.request_id = Some("req_appending".into());
    c.messages = new_messages.clone();
    c.events = vec![token("a"), token("b"), token("c")];
    c.usage = Some(Usage {
        prompt_tokens: 11,
        completion_tokens: 12,
        cached_prompt_tokens: 3,
    });
    c.cost = Some(0.25);
    let budget = Budget {
        session_tokens: Some(1000),
        ..Budget::default()
    };
    c.session = SessionUpdate {
        status: Some(SessionStatus::Running),
        current_agent: Some("coder".into()),
        turn_state: Some(Some(turn_state(json!({"step": 2})))),
        budget: Some(budget),
    };
    let done = b.commit("appending", c).await.unwrap();

    let messages: Vec<Message> = new_messages
        .iter()
        .zip(2..)
        .map(|(m, seq)| stored(m, seq, ts(20)))
        .collect();
    let events: Vec<Event> = [(3, "a"), (4, "b"), (5, "c")]
        .into_iter()
        .map(|(seq, t)| Event::new(seq, token(t)))
        .collect();
    let session = Session {
        last_activity: ts(20),
        current_agent: "coder".into(),
        status: SessionStatus::Running,
        message_count: 3,
        last_message_seq: 4,
        last_event_seq: 5,
        usage: Usage {
            prompt_tokens: 11,
            completion_tokens: 12,
            cached_prompt_tokens: 3,
        },
        turn_state: Some(turn_state(json!({"step": 2}))),
        budget,
        cost: 0.25,
        ..created
    };
    assert_eq!(done.messages, messages);
    assert_eq!(done.events, events);
    assert_eq!(done.session, session);
    for s in [&a, &b] {
        assert_eq!(s.get_session("appending").await.unwrap(), session);
        assert_eq!(s.messages_after("appending", 1, 10).await.unwrap(), messages);
        assert_eq!(s.events_after("appending", 2, 10).await.unwrap(), events);
        assert_eq!(
            s.find_request("appending", "req_appending").await.unwrap(),
            Some(3)
        );
    }
}

/// A commit sets `last_activity` to its time (now when unset) and leaves `created_at` alone.
pub async fn last_activity_moves_forward_on_commit(a: Arc<dyn Storage>, b: Arc<dyn Storage>) {
    let created = create(&*a, "active").await;
    let done = a.commit("active", at(1000)).await.unwrap();
    let mut expected = created.clone();
    expected.last_activity = ts(1000);
    assert_eq!(done.session, expected);
    assert_eq!(b.get_session("active").await.unwrap(), expected);
    let before_now = Timestamp::now();
    let done = b.commit("active", Commit::default()).await.unwrap();
    assert!(done.session.last_activity >= before_now);
    assert_eq!(done.session.created_at, created.created_at);
    // The session moves to the front of the list.
    create(&*a, "idle_newer").await;
    let page = a
        .list_sessions(SessionQuery {
            limit: 1,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.sessions[0].id, "active");
}
