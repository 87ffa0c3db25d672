//! Fuzzes the server's request-body parsing (`agent_runtime_server::body::parse_json`) for every
//! request type: a body parses only when it is a JSON object, and anything else is `400 INVALID_REQUEST`.
#![no_main]

use agent_runtime_core::orchestrator::CreateSession;
use agent_runtime_core::protocol::ClientMessage;
use agent_runtime_server::body::parse_json;
use agent_runtime_server::error::ApiError;
use agent_runtime_server::views::{HitlDecisionRequest, StreamRequest};
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;

/// Checks one outcome against the documented ones; returns whether the body parsed.
fn check<T>(outcome: &Result<T, ApiError>, body: &[u8], empty_ok: bool) -> bool {
    let blank = body.iter().all(u8::is_ascii_whitespace);
    match outcome {
        Ok(_) => {
            // A JSON object by the grammar (RFC 8259): UTF-8, well formed, `{` first. Not by
            // `Value`, which refuses numbers beyond f64 (`1e400`) that the grammar allows.
            let object = std::str::from_utf8(body).is_ok_and(|text| {
                text.trim_start_matches(|c: char| c.is_ascii_whitespace())
                    .starts_with('{')
                    && serde_json::from_str::<IgnoredAny>(text).is_ok()
            });
            assert!(
                object || (blank && empty_ok),
                "parsed a body that is no JSON object: {body:?}"
            );
            true
        }
        Err(e) => {
            assert_eq!((e.code, e.status().as_u16()), ("INVALID_REQUEST", 400), "{e:?}");
            assert!(e.message.starts_with("invalid JSON body: "), "{e:?}");
            false
        }
    }
}

fuzz_target!(|body: &[u8]| {
    check(&parse_json::<CreateSession>(body, true), body, true);
    check(&parse_json::<HitlDecisionRequest>(body, false), body, false);
    let stream = parse_json::<StreamRequest>(body, false);
    check(&stream, body, false);
    if let Ok(request) = stream {
        // The message the server hands to the core serializes and parses back to itself.
        let text = serde_json::to_vec(&request.message).expect("a parsed message serializes");
        let again: ClientMessage = serde_json::from_slice(&text).expect("its JSON parses again");
        assert_eq!(again, request.message);
    }
});
