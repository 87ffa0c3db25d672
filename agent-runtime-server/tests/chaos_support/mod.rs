//! The chaos run shared by `chaos.rs` (replicas on Postgres) and `chaos_sqlite.rs` (one process on
//! one SQLite file): clients drive sessions through any live process while a killer stops them.
//!
//! Each of `SESSIONS` clients runs turns back to back on a session of its own, sending every request
//! to a random live process: turns read a file, write one (after an approval), append a line to a
//! ledger with a command, and stream an answer; client-mode sessions run the tool calls themselves
//! and send their results. A stream that drops is resumed on another process with `Last-Event-ID`;
//! a request whose answer was lost is sent again with the same `request_id`. Meanwhile the killer
//! SIGKILLs a random process every 2–4 s (`CHAOS_KILLS`, default 30) and restarts it, with
//! `TERMS` rolling SIGTERMs among the kills. Afterwards every session takes a new message, and
//! what each client assembled from its streams must equal the stored events exactly, every user
//! message must be stored once, every side effect must have happened at most once (and exactly once
//! where its result said it succeeded). The run prints takeover times and counts.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use agent_runtime_core::test_kit::EventStream;
use serde_json::{Value, json};

use crate::common::{Server, TOKEN};

/// Concurrent client sessions (half run tools in the runtime, half in the client).
pub const SESSIONS: usize = 48;
/// Rolling SIGTERMs among the kills.
pub const TERMS: usize = 5;
/// Turns each session runs at least, however quick the kills are.
const MIN_TURNS: usize = 3;
/// A submission that has not reached its `done` by then is a stuck session.
const SUBMISSION_DEADLINE: Duration = Duration::from_secs(90);
/// A stream silent this long is dropped and resumed (keep-alives come every 15 s).
const SILENCE: Duration = Duration::from_secs(20);

const ENV: &[(&str, &str)] = &[
    ("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false"),
    ("AGENT_RUNTIME__DEFAULT_AGENT", "coder"),
    // write_file waits for approval; the ledger command runs at once (kills land mid-tool).
    ("HITL_DANGEROUS_TOOLS", "write_file"),
    ("DRAIN_TIMEOUT_SECS", "5"),
];

/// SIGKILLs per run: `CHAOS_KILLS` (default 30; CI keeps the default, about 2 minutes).
pub fn kills() -> usize {
    std::env::var("CHAOS_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(30)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Kill,
    Term,
}

/// One process slot: the running server (restarted after each stop) and its history.
struct Slot {
    server: tokio::sync::Mutex<Option<Server>>,
    /// Base URL and generation of the live process; `None` while stopped.
    live: Mutex<Option<(String, u64)>>,
}

/// The processes, the model and the database they share, what the killer did.
pub struct Cluster {
    slots: Vec<Slot>,
    llm: MockLlmServer,
    db: String,
    /// When and how each (slot, generation) was stopped.
    stops: Mutex<HashMap<(usize, u64), (Instant, Stop)>>,
    /// How long each restart took until the process listened.
    restarts: Mutex<Vec<Duration>>,
    client: reqwest::Client,
}

impl Cluster {
    async fn start(db: &str, processes: usize) -> Arc<Cluster> {
        let llm = MockLlmServer::start().await.unwrap();
        llm.respond_with(model);
        let mut slots = Vec::new();
        for _ in 0..processes {
            let s = Server::start_with(&llm.url(), Some(db), ENV).await;
            slots.push(Slot {
                live: Mutex::new(Some((s.base.clone(), 0))),
                server: tokio::sync::Mutex::new(Some(s)),
            });
        }
        Arc::new(Cluster {
            slots,
            llm,
            db: db.to_string(),
            stops: Mutex::new(HashMap::new()),
            restarts: Mutex::new(Vec::new()),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
        })
    }

    /// A random live process: (slot, generation, base URL); waits while none is live.
    async fn pick(&self) -> (usize, u64, String) {
        loop {
            let live: Vec<(usize, u64, String)> = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.live.lock().unwrap().clone().map(|(base, g)| (i, g, base)))
                .collect();
            if !live.is_empty() {
                return live[fastrand::usize(0..live.len())].clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn generation(&self, slot: usize) -> Option<u64> {
        self.slots[slot].live.lock().unwrap().as_ref().map(|l| l.1)
    }

    /// Stops slot `i` (SIGKILL, or SIGTERM and a bounded wait for the exit) and starts it again.
    async fn stop_and_restart(&self, i: usize, how: Stop) {
        let slot = &self.slots[i];
        let mut guard = slot.server.lock().await;
        let generation = {
            let mut live = slot.live.lock().unwrap();
            let g = live.as_ref().map_or(0, |l| l.1);
            *live = None;
            g
        };
        self.stops
            .lock()
            .unwrap()
            .insert((i, generation), (Instant::now(), how));
        let server = guard.take().expect("a running process");
        match how {
            Stop::Kill => drop(server), // SIGKILL, waited for
            Stop::Term => {
                let exited = tokio::task::spawn_blocking(move || {
                    let mut server = server;
                    (server.terminate(), server)
                })
                .await
                .unwrap();
                assert!(
                    exited.0,
                    "the process exits cleanly on SIGTERM\n{}",
                    exited.1.logs()
                );
            }
        }
        let starting = Instant::now();
        let s = Server::start_with(&self.llm.url(), Some(&self.db), ENV).await;
        self.restarts.lock().unwrap().push(starting.elapsed());
        *slot.live.lock().unwrap() = Some((s.base.clone(), generation + 1));
        *guard = Some(s);
    }

    fn post(&self, base: &str, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{base}{path}"))
            .header("x-internal-auth", TOKEN)
            .json(body)
    }

    fn get(&self, base: &str, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{base}{path}"))
            .header("x-internal-auth", TOKEN)
    }

    async fn logs(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s.server.lock().await.as_ref() {
                out.push_str(&format!("--- process {i}\n{}", s.logs()));
            }
        }
        out
    }
}

/// The scripted model: what it answers follows from the conversation it is sent, so a turn asked
/// again after a takeover gets the same next step. The last user message names the session's kind,
/// number and turn (`chaos:KIND:N:K`); the step is the number of tool-calling answers since.
fn model(body: &Value) -> MockResponse {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let Some(user) = messages.iter().rposition(|m| m["role"] == "user") else {
        return MockResponse::status(500, "chaos model: no user message");
    };
    let content = messages[user]["content"].as_str().unwrap_or_default();
    let tag: Vec<&str> = content.split(':').collect();
    let (kind, n, k) = match tag.as_slice() {
        ["chaos", kind, n, k, ..] => (*kind, *n, *k),
        _ => return MockResponse::status(500, format!("chaos model: unknown message {content:?}")),
    };
    let step = messages[user + 1..]
        .iter()
        .filter(|m| m["role"] == "assistant" && m["tool_calls"].as_array().is_some_and(|c| !c.is_empty()))
        .count();
    let marker = format!("s{n}-t{k}");
    let call = |name: &str, args: Value| MockResponse::script(&Script::tool_call(name, args));
    match (kind, step) {
        ("final", _) => MockResponse::script(&Script::text(format!("{marker} fine"))),
        (_, 0) => call("read_file", json!({"path": "README.md"})),
        (_, 1) => call(
            "write_file",
            json!({"path": format!("t{k}.txt"), "content": marker}),
        ),
        ("runtime", 2) => call(
            "execute_command",
            json!({"command": format!("sleep 0.2; echo {marker} >> ledger.txt")}),
        ),
        _ => {
            let text: String = (0..24).map(|w| format!("{marker}-w{w} ")).collect();
            MockResponse::script(&Script::text(text.trim_end()))
                .split_every(64)
                .drip(Duration::from_millis(12))
        }
    }
}

/// Figures of a run.
#[derive(Default)]
struct Counts {
    turns: AtomicUsize,
    submissions: AtomicUsize,
    reconnects: AtomicUsize,
    resubmits: AtomicUsize,
    busy: AtomicUsize,
    resumed: AtomicUsize,
    interrupted_calls: AtomicUsize,
    kills: AtomicUsize,
    terms: AtomicUsize,
    /// Per SIGKILL (slot, generation): how long after it each turn it cut went on.
    takeovers: Mutex<BTreeMap<(usize, u64), Vec<Duration>>>,
    endings: Mutex<BTreeMap<String, usize>>,
}

/// What one client knows of its session.
struct Client {
    cluster: Arc<Cluster>,
    counts: Arc<Counts>,
    n: usize,
    kind: &'static str,
    id: String,
    project: PathBuf,
    /// Every event received on any stream, by seq (index = seq - 1).
    assembled: Vec<Value>,
    /// User messages acknowledged.
    sent: Vec<String>,
    /// Client-mode calls run by this client, by turn and call id.
    ran: BTreeMap<String, usize>,
    submissions: usize,
}

/// How a stream was opened, to tell a takeover from a plain reconnect.
struct Opened {
    stream: EventStream,
    slot: usize,
    generation: u64,
    /// The stream of the request that started the work on that process.
    owner: bool,
}

impl Client {
    fn last_seq(&self) -> u64 {
        self.assembled.len() as u64
    }

    fn ctx(&self) -> String {
        format!("session {} ({}, {})", self.n, self.kind, self.id)
    }

    /// Takes one event from a stream: a replayed one must equal what was received before; a new
    /// one must come right after the last (no gap). Returns whether it was new.
    fn take(&mut self, e: Value) -> bool {
        let seq = e["seq"].as_u64().unwrap();
        if seq <= self.last_seq() {
            assert_eq!(
                self.assembled[seq as usize - 1],
                e,
                "{}: event {seq} replayed differently",
                self.ctx()
            );
            return false;
        }
        assert_eq!(
            seq,
            self.last_seq() + 1,
            "{}: a gap before event {seq}: {e}",
            self.ctx()
        );
        self.assembled.push(e);
        true
    }

    /// Sends a submission (`path`, `body` with a fresh `request_id`) and follows what it causes to
    /// its `done`, wherever that happens; returns the `done`.
    async fn submit(&mut self, path: &str, mut body: Value) -> Value {
        self.submissions += 1;
        self.counts.submissions.fetch_add(1, Ordering::Relaxed);
        body["request_id"] = json!(format!("chaos-{}-{}", self.id, self.submissions));
        let start = self.last_seq();
        let began = Instant::now();
        let mut open = self.post_until_accepted(path, &body, began).await;
        let mut takeover_from: Option<((usize, u64), Instant)> = None;
        loop {
            assert!(
                began.elapsed() < SUBMISSION_DEADLINE,
                "{}: no `done` {SUBMISSION_DEADLINE:?} after {body}; received {:#?}\n{}",
                self.ctx(),
                &self.assembled[start as usize..],
                self.cluster.logs().await
            );
            let before = self.last_seq();
            let mut done = None;
            while let Ok(Some(e)) = tokio::time::timeout(SILENCE, open.stream.next()).await {
                let fresh = self.take(e.clone());
                if fresh && let Some((kill, at)) = takeover_from.take() {
                    let mut t = self.counts.takeovers.lock().unwrap();
                    t.entry(kill).or_default().push(at.elapsed());
                }
                if fresh && e["type"] == "done" {
                    done = Some(e);
                    break;
                }
            }
            if let Some(done) = done {
                return done;
            }
            // The stream dropped (or went silent): was its process stopped under it?
            if open.owner && self.cluster.generation(open.slot) != Some(open.generation) {
                let stop = self
                    .cluster
                    .stops
                    .lock()
                    .unwrap()
                    .get(&(open.slot, open.generation))
                    .copied();
                if let Some((at, Stop::Kill)) = stop {
                    takeover_from.get_or_insert(((open.slot, open.generation), at));
                }
            }
            if self.last_seq() == start && before == start && !open.owner {
                // Nothing of this submission is stored yet: its first attempt may never have
                // arrived. The same `request_id` again either replays it or makes it.
                self.counts.resubmits.fetch_add(1, Ordering::Relaxed);
                open = self.post_until_accepted(path, &body, began).await;
                continue;
            }
            self.counts.reconnects.fetch_add(1, Ordering::Relaxed);
            open = self.reconnect().await;
        }
    }

    /// POSTs until a process answers with a stream: another process after a connection failure,
    /// again after `SESSION_BUSY` (the session's previous holder is being taken over). When it is
    /// busy because this very submission runs already, following it is what is left.
    async fn post_until_accepted(&mut self, path: &str, body: &Value, began: Instant) -> Opened {
        loop {
            assert!(
                began.elapsed() < SUBMISSION_DEADLINE,
                "{}: {path} never accepted: {body}\n{}",
                self.ctx(),
                self.cluster.logs().await
            );
            let (slot, generation, base) = self.cluster.pick().await;
            let Ok(r) = self.cluster.post(&base, path, body).send().await else {
                // Its process may have taken it and died before answering.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            match r.status().as_u16() {
                200 => {
                    return Opened {
                        stream: EventStream::cut_tolerant(r),
                        slot,
                        generation,
                        owner: true,
                    };
                }
                409 => {
                    let text = r.text().await.unwrap_or_default();
                    assert!(
                        text.contains("SESSION_BUSY"),
                        "{}: {path} {body}: 409 {text}",
                        self.ctx()
                    );
                    self.counts.busy.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // A process on its way down may answer before it closes.
                500..=599 => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                status => panic!(
                    "{}: {path} {body}: {status} {}",
                    self.ctx(),
                    r.text().await.unwrap_or_default()
                ),
            }
        }
    }

    /// `GET /sessions/{id}/events` with `Last-Event-ID` on a random live process.
    async fn reconnect(&mut self) -> Opened {
        loop {
            let (slot, generation, base) = self.cluster.pick().await;
            let r = self
                .cluster
                .get(&base, &format!("/sessions/{}/events", self.id))
                .header("last-event-id", self.last_seq().to_string())
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 200 => {
                    return Opened {
                        stream: EventStream::cut_tolerant(r),
                        slot,
                        generation,
                        owner: false,
                    };
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Events of the current turn: those after the last `user_message` submission began.
    fn calls_waiting(&self, turn_start: usize, approval: bool) -> Vec<Value> {
        let events = &self.assembled[turn_start..];
        events
            .iter()
            .filter(|e| e["type"] == "tool_call" && e["requires_approval"] == approval)
            .filter(|c| {
                !events.iter().any(|e| {
                    e["call_id"] == c["call_id"]
                        && if approval {
                            e["type"] == "approval_resolved"
                        } else {
                            e["type"] == "tool_result"
                        }
                })
            })
            .cloned()
            .collect()
    }

    /// One turn: the user's message, then approvals and client tool results until it ends.
    async fn turn(&mut self, k: usize) {
        let content = format!("chaos:{}:{}:{k}: please work", self.kind, self.n);
        let turn_start = self.assembled.len();
        let mut done = self
            .submit(
                "/agent/message/stream",
                json!({"session_id": self.id, "message": {"type": "user_message", "content": content}}),
            )
            .await;
        self.sent.push(content);
        loop {
            let reason = done["stop_reason"].as_str().unwrap().to_string();
            match reason.as_str() {
                "awaiting_approval" => {
                    let pending = self.calls_waiting(turn_start, true);
                    assert!(!pending.is_empty(), "{}: awaiting what?", self.ctx());
                    done = self
                        .submit(
                            &format!("/sessions/{}/hitl-decision", self.id),
                            json!({"call_id": pending[0]["call_id"], "decision": "approve"}),
                        )
                        .await;
                }
                "awaiting_tool_result" => {
                    assert_eq!(self.kind, "client", "{}", self.ctx());
                    let open = self.calls_waiting(turn_start, false);
                    assert!(!open.is_empty(), "{}: awaiting which result?", self.ctx());
                    let call = &open[0];
                    let id = call["call_id"].as_str().unwrap().to_string();
                    // By turn: a model's call id comes back once older calls left the window.
                    let runs = *self
                        .ran
                        .entry(format!("t{k}:{id}"))
                        .and_modify(|r| *r += 1)
                        .or_insert(1);
                    assert_eq!(runs, 1, "{}: asked to run {id} twice", self.ctx());
                    done = self
                        .submit(
                            "/agent/message/stream",
                            json!({"session_id": self.id, "message": {"type": "tool_result",
                                   "call_id": id, "result": format!("ran {}", call["tool_name"])}}),
                        )
                        .await;
                }
                _ => break,
            }
        }
        let reason = done["stop_reason"].as_str().unwrap();
        // Turns are resumed after a SIGKILL and handed over on a SIGTERM: every one completes.
        let ending = match reason {
            "completed" => "completed".to_string(),
            other => panic!(
                "{}: the turn ended {other}: {:#?}",
                self.ctx(),
                &self.assembled[turn_start..]
            ),
        };
        *self.counts.endings.lock().unwrap().entry(ending).or_default() += 1;
        self.counts.turns.fetch_add(1, Ordering::Relaxed);
    }

    /// After the chaos: a new message completes, storage equals what was assembled, every user
    /// message is stored once, every side effect happened at most once.
    async fn check(&mut self) {
        let content = format!("chaos:final:{}:0: still there?", self.n);
        let done = self
            .submit(
                "/agent/message/stream",
                json!({"session_id": self.id, "message": {"type": "user_message", "content": content}}),
            )
            .await;
        self.sent.push(content);
        assert_eq!(done["stop_reason"], "completed", "{}", self.ctx());

        let (_, _, base) = self.cluster.pick().await;
        let r = self
            .cluster
            .get(&base, &format!("/sessions/{}/events?after=0", self.id))
            .send()
            .await
            .unwrap();
        let stored = EventStream::new(r)
            .rest_within_ctx(Duration::from_secs(30), &self.ctx())
            .await;
        let seqs: Vec<u64> = stored.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "{}: stored seqs",
            self.ctx()
        );
        assert_eq!(
            self.assembled,
            stored,
            "{}: what the client assembled = storage",
            self.ctx()
        );
        let messages: Value = self
            .cluster
            .get(&base, &format!("/sessions/{}/messages?limit=1000", self.id))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let messages = messages["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: messages: {messages}", self.ctx()))
            .clone();
        assert_calls_answered(&messages, &self.ctx());
        let users: Vec<&str> = messages
            .iter()
            .filter(|m| m["role"] == "user")
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(users, self.sent, "{}: user messages, each once", self.ctx());
        if self.kind == "runtime" {
            self.check_side_effects();
        }
        let resumed = self
            .assembled
            .iter()
            .filter(|e| e["type"] == "turn_resumed")
            .count();
        let interrupted = self
            .assembled
            .iter()
            .filter(|e| {
                e["type"] == "tool_result"
                    && e["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("interrupted"))
            })
            .count();
        self.counts.resumed.fetch_add(resumed, Ordering::Relaxed);
        self.counts
            .interrupted_calls
            .fetch_add(interrupted, Ordering::Relaxed);
    }

    /// The ledger has one line per command that succeeded and at most one per command run; each
    /// write that succeeded left its file; no file or line without its call.
    fn check_side_effects(&self) {
        let ctx = self.ctx();
        // The result of the call streamed as event `at` (ids repeat once out of the window).
        let result = |at: usize| {
            let call_id = &self.assembled[at]["call_id"];
            self.assembled[at..]
                .iter()
                .find(|e| e["type"] == "tool_result" && e["call_id"] == *call_id)
                .and_then(|e| e.get("result").cloned())
        };
        let succeeded = |at: usize| result(at).is_some();
        // A command killed with its process (a SIGTERM's cancel) reports its exit code as null.
        let exited_0 = |at: usize| {
            result(at).is_some_and(|r| {
                let r = match r {
                    Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::Null),
                    r => r,
                };
                r["exit_code"] == 0
            })
        };
        let ledger = std::fs::read_to_string(self.project.join("ledger.txt")).unwrap_or_default();
        let mut lines: BTreeMap<&str, usize> = BTreeMap::new();
        for l in ledger.lines() {
            *lines.entry(l).or_default() += 1;
        }
        let mut expected_files = BTreeMap::new();
        let mut commands = BTreeMap::new();
        for (at, c) in self
            .assembled
            .iter()
            .enumerate()
            .filter(|(_, e)| e["type"] == "tool_call")
        {
            let args = &c["arguments"];
            match c["tool_name"].as_str().unwrap() {
                "execute_command" => {
                    let command = args["command"].as_str().unwrap();
                    let line = command
                        .split("echo ")
                        .nth(1)
                        .and_then(|r| r.split(" >>").next())
                        .unwrap()
                        .to_string();
                    let ok = exited_0(at);
                    let ran = lines.get(line.as_str()).copied().unwrap_or(0);
                    assert!(
                        ran <= 1 && (!ok || ran == 1),
                        "{ctx}: command {line} ran {ran} times (its result says it exited with 0: {ok}): {:?}",
                        self.assembled
                            .iter()
                            .filter(|e| e["call_id"] == c["call_id"])
                            .collect::<Vec<_>>()
                    );
                    assert!(commands.insert(line, ok).is_none(), "{ctx}: one command per turn");
                }
                "write_file" => {
                    let path = args["path"].as_str().unwrap().to_string();
                    if succeeded(at) {
                        assert_eq!(
                            std::fs::read_to_string(self.project.join(&path)).ok().as_deref(),
                            args["content"].as_str(),
                            "{ctx}: {path}"
                        );
                    }
                    expected_files.insert(path, ());
                }
                _ => {}
            }
        }
        for line in lines.keys() {
            assert!(
                commands.contains_key(*line),
                "{ctx}: ledger line {line} without its call"
            );
        }
        for f in std::fs::read_dir(&self.project).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            if name.starts_with('t') && name.ends_with(".txt") {
                assert!(
                    expected_files.contains_key(&name),
                    "{ctx}: {name} without its call"
                );
            }
        }
    }
}

/// The history is valid for a model: message seqs increase, and the results of an assistant
/// message's tool calls follow it, one per call, before anything else. (Call ids repeat across
/// turns here: the mock model names every call `call_0`, which the model's history keeps.)
fn assert_calls_answered(messages: &[Value], ctx: &str) {
    let seqs: Vec<u64> = messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{ctx}: message seqs {seqs:?}"
    );
    let mut open: Vec<String> = Vec::new();
    for m in messages {
        if m["role"] == "tool" {
            let id = m["tool_call_id"].as_str().unwrap();
            let at = open.iter().position(|c| c == id);
            assert!(at.is_some(), "{ctx}: a result for {id}, which is not open: {m}");
            open.remove(at.unwrap());
            continue;
        }
        assert!(
            open.is_empty(),
            "{ctx}: calls {open:?} without results before {m}"
        );
        if let Some(calls) = m["tool_calls"].as_array() {
            open = calls
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_string())
                .collect();
        }
    }
    assert!(
        open.is_empty(),
        "{ctx}: calls {open:?} without results at the end"
    );
}

/// Creates a session on any live process (a lost answer just leaves an unused session).
async fn create_session(cluster: &Cluster, metadata: Value) -> String {
    loop {
        let (_, _, base) = cluster.pick().await;
        if let Ok(r) = cluster
            .post(&base, "/api/v1/sessions", &json!({"metadata": metadata}))
            .send()
            .await
            && r.status() == 201
        {
            let v: Value = r.json().await.unwrap();
            return v["session_id"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The whole run on `db` with `processes` server processes; `name` labels what it prints.
pub async fn run(name: &str, db: &str, processes: usize) {
    let kills = kills();
    let mut rng = crate::fault_support::rng(name, 1515);
    eprintln!("{name}: {processes} process(es), {SESSIONS} sessions, {kills} SIGKILLs + {TERMS} SIGTERMs");
    let began = Instant::now();
    let cluster = Cluster::start(db, processes).await;
    let counts = Arc::new(Counts::default());
    let projects = tempfile::tempdir().unwrap();
    let chaos_over = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::new();
    for n in 0..SESSIONS {
        let kind = if n % 2 == 0 { "runtime" } else { "client" };
        let project = projects.path().join(format!("s{n}"));
        std::fs::create_dir(&project).unwrap();
        std::fs::write(project.join("README.md"), format!("project of session {n}\n")).unwrap();
        let (cluster, counts, chaos_over) = (cluster.clone(), counts.clone(), chaos_over.clone());
        let think = rng.u64(50..400);
        clients.push(tokio::spawn(async move {
            let metadata = json!({"project_path": project.to_str().unwrap(), "tool_execution": kind});
            let id = create_session(&cluster, metadata).await;
            let mut c = Client {
                cluster,
                counts,
                n,
                kind,
                id,
                project,
                assembled: Vec::new(),
                sent: Vec::new(),
                ran: BTreeMap::new(),
                submissions: 0,
            };
            let mut k = 0;
            while k < MIN_TURNS || !chaos_over.load(Ordering::Relaxed) {
                c.turn(k).await;
                k += 1;
                tokio::time::sleep(Duration::from_millis(think)).await;
            }
            c
        }));
    }

    // The killer. Replicas: a stop every 2–4 s, restarts in the background (a slot restarting is
    // not stopped again; one process stays live). One process: it is stopped 2–4 s after it
    // listens again (its restart is the outage).
    let events = kills + TERMS;
    let mut next_term = 0;
    let mut restarts = Vec::new();
    for e in 0..events {
        tokio::time::sleep(Duration::from_millis(rng.u64(2000..4000))).await;
        let live = loop {
            let live: Vec<usize> = (0..processes)
                .filter(|&i| cluster.generation(i).is_some())
                .collect();
            if live.len() == processes || (processes > 1 && live.len() >= 2) {
                break live;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let term = next_term < TERMS && e * TERMS >= next_term * events + events / (2 * TERMS);
        let (victim, how) = if term {
            // Rolling: the next live process in order.
            next_term += 1;
            counts.terms.fetch_add(1, Ordering::Relaxed);
            let at = live.iter().position(|&i| i >= next_term % processes).unwrap_or(0);
            (live[at], Stop::Term)
        } else {
            counts.kills.fetch_add(1, Ordering::Relaxed);
            (live[rng.usize(0..live.len())], Stop::Kill)
        };
        let c = cluster.clone();
        let restart = tokio::spawn(async move { c.stop_and_restart(victim, how).await });
        if processes == 1 {
            restart.await.unwrap();
        } else {
            restarts.push(restart);
        }
    }
    for r in restarts {
        r.await.unwrap();
    }
    let chaos_secs = began.elapsed();
    chaos_over.store(true, Ordering::Relaxed);

    let mut finished = Vec::new();
    for c in clients {
        finished.push(c.await.unwrap());
    }
    let mut checks = Vec::new();
    for mut c in finished {
        checks.push(tokio::spawn(async move {
            c.check().await;
        }));
    }
    for c in checks {
        c.await.unwrap();
    }

    let by_kill = counts.takeovers.lock().unwrap().clone();
    let mut takeovers: Vec<Duration> = by_kill.values().flatten().copied().collect();
    takeovers.sort();
    // Per kill, the first and the last of its turns to go on: a spread that grows with the turns
    // the killed process held says they are taken over one after another.
    let (mut firsts, mut lasts, mut held): (Vec<Duration>, Vec<Duration>, Vec<usize>) = Default::default();
    for v in by_kill.values() {
        firsts.push(*v.iter().min().unwrap());
        lasts.push(*v.iter().max().unwrap());
        held.push(v.len());
    }
    firsts.sort();
    lasts.sort();
    held.sort();
    eprintln!(
        "{name}: {} SIGKILLs, {} SIGTERMs in {chaos_secs:.1?}; {} turns ({:?}), {} submissions, \
         {} stream resumptions, {} re-sent submissions, {} SESSION_BUSY retries, {} turn_resumed, \
         {} calls interrupted; total {:.1?}",
        counts.kills.load(Ordering::Relaxed),
        counts.terms.load(Ordering::Relaxed),
        counts.turns.load(Ordering::Relaxed),
        counts.endings.lock().unwrap(),
        counts.submissions.load(Ordering::Relaxed),
        counts.reconnects.load(Ordering::Relaxed),
        counts.resubmits.load(Ordering::Relaxed),
        counts.busy.load(Ordering::Relaxed),
        counts.resumed.load(Ordering::Relaxed),
        counts.interrupted_calls.load(Ordering::Relaxed),
        began.elapsed(),
    );
    eprintln!(
        "{name}: takeover after SIGKILL (kill → next event of the turn, {} turns cut): p50 {:?}, \
         p99 {:?}, max {:?}",
        takeovers.len(),
        percentile(&takeovers, 0.5),
        percentile(&takeovers, 0.99),
        percentile(&takeovers, 1.0),
    );
    eprintln!(
        "{name}: per SIGKILL ({} with turns cut, median {} turns each): the first turn went on after \
         p50 {:?}, the last after p50 {:?} (max {:?})",
        by_kill.len(),
        held.get(held.len() / 2).copied().unwrap_or(0),
        percentile(&firsts, 0.5),
        percentile(&lasts, 0.5),
        percentile(&lasts, 1.0),
    );
    let mut restarts = cluster.restarts.lock().unwrap().clone();
    restarts.sort();
    eprintln!(
        "{name}: a restarted process listened after p50 {:?}, max {:?}",
        percentile(&restarts, 0.5),
        percentile(&restarts, 1.0)
    );
    assert!(
        counts.kills.load(Ordering::Relaxed) >= kills && counts.terms.load(Ordering::Relaxed) == TERMS,
        "the killer did its work"
    );
    assert!(
        counts.resumed.load(Ordering::Relaxed) > 0,
        "no turn was cut and resumed: the chaos never hit a running turn"
    );
}
