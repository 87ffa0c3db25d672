//! Fuzzes the OpenAI stream decoding (`ChunkDecoder`): no panic, the same chunks or the same error
//! however the body is cut, and decoded chunks encoded again (`encode_sse`) decode to themselves.
#![no_main]

use agent_runtime_core::llm::Chunk;
use agent_runtime_core::llm::wire::{ChunkDecoder, decode_body, encode_sse};
use libfuzzer_sys::fuzz_target;

/// Every chunk of the pieces, or the first error's code.
fn decode(pieces: &[&[u8]]) -> Result<Vec<Chunk>, String> {
    let mut d = ChunkDecoder::new();
    let mut out = Vec::new();
    for p in pieces {
        out.extend(d.push(p).map_err(|e| e.code().to_string())?);
    }
    out.extend(d.finish().map_err(|e| e.code().to_string())?);
    Ok(out)
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, body)) = input.split_first() else {
        return;
    };
    let whole = decode(&[body]);
    let at = usize::from(cut) % (body.len() + 1);
    assert_eq!(decode(&[&body[..at], &body[at..]]), whole, "cut at {at}");
    assert_eq!(decode_body(body).map_err(|e| e.code().to_string()), whole);
    match whole {
        Ok(chunks) => {
            let again = encode_sse("fuzz", &chunks);
            assert_eq!(decode(&[again.as_bytes()]), Ok(chunks), "round trip of {again:?}");
        }
        // The documented failures of a model stream: an empty body (llama.cpp's answer to a prompt
        // too long) or a context error event is CONTEXT_TOO_LARGE, anything else LLM_ERROR.
        Err(code) => assert!(
            ["LLM_ERROR", "CONTEXT_TOO_LARGE"].contains(&code.as_str()),
            "{code}"
        ),
    }
});
