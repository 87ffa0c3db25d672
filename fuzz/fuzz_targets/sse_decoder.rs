//! Fuzzes core's `SseDecoder`: the events never depend on where the bytes are cut, and the decoded
//! events, written out again as SSE, decode to themselves (the round trip).
#![no_main]

use agent_runtime_core::llm::sse::SseDecoder;
use libfuzzer_sys::fuzz_target;

fn decode(pieces: &[&[u8]]) -> Vec<String> {
    let mut d = SseDecoder::new();
    let mut events: Vec<String> = pieces.iter().flat_map(|p| d.push(p)).collect();
    events.extend(d.finish());
    events
}

fuzz_target!(|input: &[u8]| {
    // The first byte chooses where the body is cut in two.
    let Some((&cut, body)) = input.split_first() else {
        return;
    };
    let whole = decode(&[body]);
    let at = usize::from(cut) % (body.len() + 1);
    assert_eq!(decode(&[&body[..at], &body[at..]]), whole, "cut at {at}");
    let bytewise: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(decode(&bytewise), whole, "byte by byte");
    let mut again = String::new();
    for data in &whole {
        for line in data.split('\n') {
            again.push_str("data: ");
            again.push_str(line);
            again.push('\n');
        }
        again.push('\n');
    }
    assert_eq!(decode(&[again.as_bytes()]), whole, "round trip of {again:?}");
});
