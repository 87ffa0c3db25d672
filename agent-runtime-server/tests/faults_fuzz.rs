//! Property fuzzing (proptest; the coverage-guided targets are in `fuzz/`): the model-stream parser
//! (SSE lines, chunk decoding, tool-call delta assembly), the server's request-body reading (the
//! handlers' own function, against the documented outcomes), and path confinement. Fixed case
//! counts keep each under a few seconds; failures are persisted to `proptest-regressions/` beside
//! this file and replayed first on every run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::path::Path;
use std::time::Duration;

use agent_runtime_core::llm::sse::SseDecoder;
use agent_runtime_core::llm::wire::{ChunkDecoder, decode_body};
use agent_runtime_core::llm::{Chunk, Script, ToolCallAssembler};
use agent_runtime_core::orchestrator::CreateSession;
use agent_runtime_core::protocol::ClientMessage;
use agent_runtime_core::tools::sandbox;
use agent_runtime_server::body::{self, BodyLimits};
use agent_runtime_server::error::ApiError;
use agent_runtime_server::views::{HitlDecisionRequest, StreamRequest};
use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Cases per property (`PROPTEST_CASES` overrides).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(cases),
        ..ProptestConfig::default()
    }
}

/// Cuts `bytes` at the given offsets (taken modulo the length, in order).
fn pieces(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    if bytes.is_empty() {
        return vec![Vec::new()];
    }
    let mut at: Vec<usize> = cuts.iter().map(|c| c % bytes.len()).collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for a in at {
        out.push(bytes[start..a].to_vec());
        start = a;
    }
    out.push(bytes[start..].to_vec());
    out
}

fn sse_all(pieces: &[Vec<u8>]) -> Vec<String> {
    let mut d = SseDecoder::new();
    let mut out: Vec<String> = pieces.iter().flat_map(|p| d.push(p)).collect();
    out.extend(d.finish());
    out
}

/// Every chunk decoded from the pieces, or the first error's code.
fn chunks_all(pieces: &[Vec<u8>]) -> Result<Vec<Chunk>, String> {
    let mut d = ChunkDecoder::new();
    let mut out = Vec::new();
    for p in pieces {
        out.extend(d.push(p).map_err(|e| e.code().to_string())?);
    }
    out.extend(d.finish().map_err(|e| e.code().to_string())?);
    Ok(out)
}

/// Bytes that look like an SSE model stream: real lines mixed with garbage.
fn sse_like() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        Just(b"data: [DONE]".to_vec()),
        Just(b": keep-alive".to_vec()),
        Just(b"event: message".to_vec()),
        Just(br#"data: {"choices":[{"index":0,"delta":{"content":"h\u00e9"}}]}"#.to_vec()),
        Just(br#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"read_file","arguments":"{\"pa"}}]}}]}"#.to_vec()),
        Just(br#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":7,"function":{"arguments":"th\"}"}}]},"finish_reason":"tool_calls"}]}"#.to_vec()),
        Just(br#"data: {"usage":{"prompt_tokens":3,"completion_tokens":4},"choices":[]}"#.to_vec()),
        Just(b"data: {\"choices\": 5}".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..40),
        "data: [ -~]{0,40}".prop_map(String::into_bytes),
    ];
    let end = prop_oneof![
        Just(&b"\n"[..]),
        Just(&b"\r\n"[..]),
        Just(&b"\r"[..]),
        Just(&b"\n\n"[..])
    ];
    proptest::collection::vec((line, end), 0..12).prop_map(|ls| {
        ls.into_iter()
            .flat_map(|(mut l, e)| {
                l.extend_from_slice(e);
                l
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn sse_decoding_never_panics_and_ignores_where_the_bytes_are_cut(
        body in prop_oneof![sse_like(), proptest::collection::vec(any::<u8>(), 0..300)],
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = sse_all(std::slice::from_ref(&body));
        prop_assert_eq!(sse_all(&pieces(&body, &cuts)), whole.clone());
        let bytewise: Vec<Vec<u8>> = body.iter().map(|b| vec![*b]).collect();
        prop_assert_eq!(sse_all(&bytewise), whole);
    }

    #[test]
    fn chunk_decoding_never_panics_and_ignores_where_the_bytes_are_cut(
        body in prop_oneof![sse_like(), proptest::collection::vec(any::<u8>(), 0..300)],
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = chunks_all(std::slice::from_ref(&body));
        prop_assert_eq!(chunks_all(&pieces(&body, &cuts)), whole.clone());
        prop_assert_eq!(decode_body(&body).map_err(|e| e.code().to_string()), whole);
    }

    #[test]
    fn scripted_answers_decode_to_their_chunks_however_cut(
        text in "\\PC{0,60}",
        calls in proptest::collection::vec(("[a-z_]{1,12}", "\\PC{0,80}"), 0..3),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut script = Script::text(text);
        for (name, args) in &calls {
            script = script.and_raw_tool_call(name.clone(), args.clone());
        }
        let body = script.sse_body("m").into_bytes();
        let got = chunks_all(&pieces(&body, &cuts)).unwrap();
        prop_assert_eq!(got.clone(), chunks_all(&[body]).unwrap());
        // The assembled calls are exactly the scripted ones.
        let mut asm = ToolCallAssembler::new();
        let mut streamed = String::new();
        for c in &got {
            match c {
                Chunk::ToolCallDelta { index, id, name, arguments } => {
                    asm.push(*index, id.as_deref(), name.as_deref(), arguments)
                }
                Chunk::Text(t) => streamed.push_str(t),
                _ => {}
            }
        }
        let assembled: Vec<(String, String)> =
            asm.finish().into_iter().map(|c| (c.name, c.arguments)).collect();
        prop_assert_eq!(assembled, calls);
        prop_assert_eq!(streamed, script_text(&script));
    }

    #[test]
    fn tool_call_deltas_assemble_per_index_in_order(
        deltas in proptest::collection::vec(
            (0usize..4, proptest::option::of("[a-z0-9_]{0,6}"), proptest::option::of("[a-z_]{0,8}"), "\\PC{0,10}"),
            0..30,
        ),
    ) {
        let mut asm = ToolCallAssembler::new();
        for (i, id, name, args) in &deltas {
            asm.push(*i, id.as_deref(), name.as_deref(), args);
        }
        let calls = asm.finish();
        let mut indices: Vec<usize> = deltas.iter().map(|d| d.0).collect();
        indices.sort_unstable();
        indices.dedup();
        prop_assert_eq!(calls.len(), indices.len());
        for (call, idx) in calls.iter().zip(&indices) {
            let mine: Vec<_> = deltas.iter().filter(|d| d.0 == *idx).collect();
            let args: String = mine.iter().map(|d| d.3.as_str()).collect();
            prop_assert_eq!(&call.arguments, &args);
            let first_id = mine.iter().find_map(|d| d.1.clone().filter(|s| !s.is_empty())).unwrap_or_default();
            prop_assert_eq!(&call.id, &first_id);
        }
    }
}

fn script_text(script: &Script) -> String {
    script
        .chunks()
        .into_iter()
        .filter_map(|c| match c {
            Chunk::Text(t) => Some(t),
            _ => None,
        })
        .collect()
}

/// Arbitrary JSON, a few levels deep, with the message fields' names likely to appear.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("type".to_string()),
        Just("content".to_string()),
        Just("call_id".to_string()),
        Just("decision".to_string()),
        Just("agent_type".to_string()),
        Just("session_id".to_string()),
        Just("message".to_string()),
        Just("result".to_string()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop_oneof![
            Just("user_message".to_string()),
            Just("switch_agent".to_string()),
            Just("tool_result".to_string()),
            Just("hitl_decision".to_string()),
            Just("approve".to_string()),
            Just("coder".to_string()),
            "\\PC{0,12}",
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 40, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(key.clone(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The body limit of the properties: small, so that random bodies cross it.
const LIMIT: usize = 512;

/// The server's own body reading (`body::read_json`: limit, collect, parse) over `bytes` streamed
/// in the given pieces.
fn read<T: DeserializeOwned>(bytes: &[u8], cuts: &[usize], empty_ok: bool) -> Result<T, ApiError> {
    let frames = pieces(bytes, cuts)
        .into_iter()
        .map(|p| Ok::<_, Infallible>(Frame::data(Bytes::from(p))));
    let body = StreamBody::new(futures::stream::iter(frames));
    let limits = BodyLimits {
        max_bytes: LIMIT,
        timeout: Duration::from_secs(10),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(body::read_json(body, limits, empty_ok))
}

/// An outcome: the request's `Debug` text (the request types have no `PartialEq`), or the error's
/// status and code.
type Outcome = Result<String, (u16, &'static str)>;

/// What API.md §1 promises for a body, worked out without the server's code: over the limit is
/// `413 PAYLOAD_TOO_LARGE`; a JSON object of the request's shape (or a blank body where every
/// field is optional) is that request; anything else is `400 INVALID_REQUEST`.
fn documented<T: DeserializeOwned + std::fmt::Debug>(bytes: &[u8], empty_ok: bool) -> Outcome {
    if bytes.len() > LIMIT {
        return Err((413, "PAYLOAD_TOO_LARGE"));
    }
    let value = if empty_ok && bytes.iter().all(u8::is_ascii_whitespace) {
        Some(json!({}))
    } else {
        serde_json::from_slice::<Value>(bytes)
            .ok()
            .filter(Value::is_object)
    };
    value
        .and_then(|v| serde_json::from_value::<T>(v).ok())
        .map(|t| format!("{t:?}"))
        .ok_or((400, "INVALID_REQUEST"))
}

/// The server's outcome for `bytes` read as a request of type `T`.
fn outcome<T: DeserializeOwned + std::fmt::Debug>(bytes: &[u8], cuts: &[usize], empty_ok: bool) -> Outcome {
    read::<T>(bytes, cuts, empty_ok)
        .map(|t| format!("{t:?}"))
        .map_err(|e| (e.status().as_u16(), e.code))
}

/// Runs `bytes` through the server's reading as each request body type: each outcome is the
/// documented one (so never a panic, never a 5xx).
fn check_all_requests(bytes: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        outcome::<CreateSession>(bytes, cuts, true),
        documented::<CreateSession>(bytes, true)
    );
    prop_assert_eq!(
        outcome::<StreamRequest>(bytes, cuts, false),
        documented::<StreamRequest>(bytes, false)
    );
    prop_assert_eq!(
        outcome::<HitlDecisionRequest>(bytes, cuts, false),
        documented::<HitlDecisionRequest>(bytes, false)
    );
    Ok(())
}

/// A valid `POST /agent/message/stream` body for each kind of message, padded with whitespace:
/// the JSON sent and the body's text.
fn valid_stream_request() -> impl Strategy<Value = (Value, String)> {
    let message = prop_oneof![
        "\\PC{0,40}".prop_map(|c| json!({"type": "user_message", "content": c})),
        "[a-z]{1,8}".prop_map(|a| json!({"type": "switch_agent", "agent_type": a})),
        ("[a-z0-9_]{1,12}", "\\PC{0,40}")
            .prop_map(|(id, r)| json!({"type": "tool_result", "call_id": id, "result": r})),
        ("[a-z0-9_]{1,12}", prop_oneof![Just("approve"), Just("reject")])
            .prop_map(|(id, d)| json!({"type": "hitl_decision", "call_id": id, "decision": d})),
    ];
    (message, "[a-z0-9-]{1,20}", "[ \t\r\n]{0,3}").prop_map(|(message, session_id, pad)| {
        let body = json!({"session_id": session_id, "message": message});
        (body.clone(), format!("{pad}{body}{pad}"))
    })
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn request_bodies_get_the_documented_outcome(
        bytes in proptest::collection::vec(any::<u8>(), 0..(LIMIT + 100)),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        check_all_requests(&bytes, &cuts)?;
    }

    #[test]
    fn json_shaped_request_bodies_get_the_documented_outcome(
        v in json_value(),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let bytes = serde_json::to_vec(&v).unwrap();
        check_all_requests(&bytes, &cuts)?;
        let wrapped = serde_json::to_vec(&json!({"session_id": "s", "message": v})).unwrap();
        check_all_requests(&wrapped, &cuts)?;
        // A parsed message serializes back to something that parses to the same message.
        if let Ok(m) = serde_json::from_slice::<ClientMessage>(&bytes) {
            let again: ClientMessage = serde_json::from_value(serde_json::to_value(&m).unwrap()).unwrap();
            prop_assert_eq!(again, m);
        }
    }

    #[test]
    fn valid_stream_requests_are_read_as_sent_however_they_arrive(
        (sent, body) in valid_stream_request(),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let read = read::<StreamRequest>(body.as_bytes(), &cuts, false)
            .unwrap_or_else(|e| panic!("{body:?} refused: {e:?}"));
        let message: ClientMessage = serde_json::from_value(sent["message"].clone()).unwrap();
        prop_assert_eq!(
            (read.session_id, read.request_id, read.message),
            (sent["session_id"].as_str().unwrap().to_string(), None, message)
        );
    }
}

/// A project root inside a temp dir, beside a sibling "outside" with a secret, with symlinks
/// inside the root pointing out (to a dir, a file, a missing path) and one pointing in.
struct Sandbox {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

fn sandbox() -> Sandbox {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "s").unwrap();
    std::fs::write(root.join("sub/file"), "f").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("sub/secret")).unwrap();
    std::os::unix::fs::symlink(outside.join("missing"), root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../..", root.join("sub/deeper/up")).unwrap();
    std::os::unix::fs::symlink("sub", root.join("in")).unwrap();
    std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
    let root = root.canonicalize().unwrap();
    Sandbox { _dir: dir, root }
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        Just("sub".to_string()),
        Just("deeper".to_string()),
        Just("up".to_string()),
        Just("out".to_string()),
        Just("in".to_string()),
        Just("dangling".to_string()),
        Just("loop".to_string()),
        Just("secret".to_string()),
        Just("root".to_string()),
        Just("outside".to_string()),
        Just("etc".to_string()),
        Just("a\0b".to_string()),
        Just("%2e%2e".to_string()),
        Just("~".to_string()),
        "\\PC{1,6}",
    ]
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn resolved_paths_never_leave_the_project(
        segs in proptest::collection::vec(segment(), 0..8),
        absolute in any::<bool>(),
        via_root in any::<bool>(),
    ) {
        let sb = sandbox();
        let mut path = segs.join("/");
        if absolute {
            path = if via_root {
                format!("{}/{path}", sb.root.display())
            } else {
                format!("/{path}")
            };
        }
        match sandbox::resolve(&sb.root, &path) {
            Ok(p) => {
                prop_assert!(p.starts_with(&sb.root), "{path:?} -> {p:?}");
                prop_assert!(!path.contains('\0'));
                // What exists of it really is inside too (no symlink left to follow out).
                let mut existing: &Path = &p;
                while !existing.exists() {
                    existing = existing.parent().unwrap();
                }
                prop_assert!(existing.canonicalize().unwrap().starts_with(&sb.root), "{path:?} -> {p:?}");
            }
            Err(e) => {
                // Refused, never a crash.
                let text = format!("{:?}", e);
                prop_assert!(!text.is_empty());
            }
        }
    }
}
