//! A fast reader for a streamed chat-completion chunk's JSON: read in place, strings borrowed
//! unless they hold escapes, fields we do not use skipped without building anything.
//!
//! It accepts only what `serde_json` into [`WireChunk`] accepts and gives the same value. What it
//! does not handle (an `error` that is not `null`, an escaped key, a lone surrogate escape, a
//! number that is not a plain integer, a struct written as an array, nesting deeper than
//! [`MAX_DEPTH`], bad JSON of any kind) it answers with `None`, and the caller parses the text
//! with `serde_json` instead, so such chunks decode and fail exactly as before.

use std::borrow::Cow;

use super::wire::{
    WireChoice, WireChunk, WireDelta, WireFunction, WirePromptDetails, WireToolCall, WireUsage,
};

/// The deepest nesting skipped inside a field we do not use (serde_json's own limit is 128; the
/// chunk's structure around it adds at most five levels).
const MAX_DEPTH: u32 = 64;

/// The chunk in `text`, or `None` when `serde_json` must decide (see the module doc).
pub(super) fn parse(text: &str) -> Option<WireChunk<'_>> {
    let mut r = Reader { text, at: 0 };
    let (mut choices, mut usage, mut error) = (None, None, None);
    r.ws();
    r.object(|r, key| match key {
        b"choices" => once(&mut choices, r.opt(|r| r.list(Reader::choice))?),
        // A server's error object goes to serde, which keeps it as a `Value`.
        b"error" => {
            r.literal(b"null")?;
            once(&mut error, Some(()))
        }
        b"usage" => once(&mut usage, r.opt(Reader::usage)?),
        _ => r.skip(MAX_DEPTH),
    })?;
    r.ws();
    (r.at == r.text.len()).then(|| WireChunk {
        choices: choices.flatten(),
        usage: usage.flatten(),
        error: None,
    })
}

/// Records a known field's value; a field named twice is serde's "duplicate field" error.
fn once<T>(slot: &mut Option<Option<T>>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// A position in the JSON text. Every method answers `None` for what it does not accept.
struct Reader<'a> {
    text: &'a str,
    at: usize,
}

/// Bytes that end a run of plain string content: `"`, `\` and the control characters JSON
/// forbids unescaped.
static STOPS: [bool; 256] = {
    let mut stops = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        stops[b] = true;
        b += 1;
    }
    stops[b'"' as usize] = true;
    stops[b'\\' as usize] = true;
    stops
};

impl<'a> Reader<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    /// JSON's whitespace (serde_json's: space, LF, TAB, CR).
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.bytes()[self.at..]
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    /// Reads `null` if it is next.
    fn null(&mut self) -> bool {
        self.literal(b"null").is_some()
    }

    /// `null` as `None`, anything else read by `read`.
    fn opt<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.null() {
            Some(None)
        } else {
            read(self).map(Some)
        }
    }

    /// An object, each member's value read by `member` (given the key, unescaped keys only).
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.key()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.peek()? {
                b',' => {
                    self.at += 1;
                    self.ws();
                }
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An array, each item read by `item`.
    fn array(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        self.ws();
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            item(self)?;
            self.ws();
            match self.peek()? {
                b',' => {
                    self.at += 1;
                    self.ws();
                }
                b']' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn list<T>(&mut self, read: impl Fn(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let mut items = Vec::new();
        self.array(|r| {
            items.push(read(r)?);
            Some(())
        })?;
        Some(items)
    }

    /// The index just past the plain run of string content starting at `from`.
    fn plain_run(&self, mut from: usize) -> usize {
        let bytes = self.bytes();
        while from < bytes.len() && !STOPS[usize::from(bytes[from])] {
            from += 1;
        }
        from
    }

    /// A key without escapes, as its bytes.
    fn key(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.at;
        let end = self.plain_run(start);
        self.at = end;
        self.eat(b'"')?;
        Some(&self.bytes()[start..end])
    }

    /// A string, borrowed when it holds no escape.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.at;
        let mut end = self.plain_run(start);
        match self.peek_at(end)? {
            b'"' => {
                self.at = end + 1;
                return Some(Cow::Borrowed(self.text.get(start..end)?));
            }
            b'\\' => {}
            _ => return None,
        }
        let mut owned = String::with_capacity(end - start + 16);
        owned.push_str(self.text.get(start..end)?);
        loop {
            // At a backslash.
            self.at = end + 1;
            let c = self.escape()?;
            owned.push(c);
            let run = self.at;
            end = self.plain_run(run);
            owned.push_str(self.text.get(run..end)?);
            match self.peek_at(end)? {
                b'"' => {
                    self.at = end + 1;
                    return Some(Cow::Owned(owned));
                }
                b'\\' => {}
                _ => return None,
            }
        }
    }

    fn peek_at(&self, at: usize) -> Option<u8> {
        self.bytes().get(at).copied()
    }

    /// The character of the escape after a backslash; a surrogate pair as one character, a lone
    /// surrogate left to serde.
    fn escape(&mut self) -> Option<char> {
        let byte = self.peek()?;
        self.at += 1;
        Some(match byte {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                match first {
                    0xD800..=0xDBFF => {
                        self.literal(b"\\u")?;
                        let second = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return None;
                        }
                        char::from_u32(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00))?
                    }
                    0xDC00..=0xDFFF => return None,
                    _ => char::from_u32(first)?,
                }
            }
            _ => return None,
        })
    }

    /// Four hex digits.
    fn hex4(&mut self) -> Option<u32> {
        let digits = self.bytes().get(self.at..self.at + 4)?;
        let mut n = 0;
        for &d in digits {
            n = n * 16 + char::from(d).to_digit(16)?;
        }
        self.at += 4;
        Some(n)
    }

    /// A non-negative integer as serde_json reads one into an unsigned field: no sign, no
    /// leading zero, no fraction or exponent, within `u64`.
    fn uint(&mut self) -> Option<u64> {
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || (digits > 1 && self.bytes()[start] == b'0') {
            return None;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(n)
    }

    fn index(&mut self) -> Option<usize> {
        usize::try_from(self.uint()?).ok()
    }

    /// Skips any JSON value, checked as serde_json checks a value it ignores.
    fn skip(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.skip_string(),
            b'{' if depth > 0 => self.object(|r, _| r.skip(depth - 1)),
            b'[' if depth > 0 => self.array(|r| r.skip(depth - 1)),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'-' | b'0'..=b'9' => self.skip_number(),
            _ => None,
        }
    }

    /// Skips a string: escapes are checked (`\u` needs four hex digits) but not decoded.
    fn skip_string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            self.at = self.plain_run(self.at);
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => {
                    self.at += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        b'u' => {
                            self.at += 1;
                            self.hex4()?;
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
    }

    /// Skips a number: `-`? (`0` | [1-9][0-9]*) (`.` [0-9]+)? ([eE] [+-]? [0-9]+)?
    fn skip_number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.peek().filter(u8::is_ascii_digit)?;
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.peek().filter(u8::is_ascii_digit)?;
            self.digits();
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
    }

    fn choice(&mut self) -> Option<WireChoice<'a>> {
        let (mut index, mut delta, mut finish_reason) = (None, None, None);
        self.object(|r, key| match key {
            b"index" => once(&mut index, r.opt(Reader::index)?),
            b"delta" => once(&mut delta, r.opt(Reader::delta)?),
            b"finish_reason" => once(&mut finish_reason, r.opt(Reader::string)?),
            _ => r.skip(MAX_DEPTH),
        })?;
        Some(WireChoice {
            index: index.flatten(),
            delta: delta.flatten(),
            finish_reason: finish_reason.flatten(),
        })
    }

    fn delta(&mut self) -> Option<WireDelta<'a>> {
        let (mut content, mut tool_calls, mut function_call) = (None, None, None);
        self.object(|r, key| match key {
            b"content" => once(&mut content, r.opt(Reader::string)?),
            b"tool_calls" => once(&mut tool_calls, r.opt(|r| r.list(Reader::tool_call))?),
            b"function_call" => once(&mut function_call, r.opt(Reader::function)?),
            _ => r.skip(MAX_DEPTH),
        })?;
        Some(WireDelta {
            content: content.flatten(),
            tool_calls: tool_calls.flatten(),
            function_call: function_call.flatten(),
        })
    }

    fn tool_call(&mut self) -> Option<WireToolCall<'a>> {
        let (mut index, mut id, mut function) = (None, None, None);
        self.object(|r, key| match key {
            b"index" => once(&mut index, r.opt(Reader::index)?),
            b"id" => once(&mut id, r.opt(Reader::string)?),
            b"function" => once(&mut function, r.opt(Reader::function)?),
            _ => r.skip(MAX_DEPTH),
        })?;
        Some(WireToolCall {
            index: index.flatten(),
            id: id.flatten(),
            function: function.flatten(),
        })
    }

    fn function(&mut self) -> Option<WireFunction<'a>> {
        let (mut name, mut arguments) = (None, None);
        self.object(|r, key| match key {
            b"name" => once(&mut name, r.opt(Reader::string)?),
            b"arguments" => once(&mut arguments, r.opt(Reader::string)?),
            _ => r.skip(MAX_DEPTH),
        })?;
        Some(WireFunction {
            name: name.flatten(),
            arguments: arguments.flatten(),
        })
    }

    fn usage(&mut self) -> Option<WireUsage> {
        let (mut prompt, mut completion, mut details) = (None, None, None);
        self.object(|r, key| match key {
            b"prompt_tokens" => once(&mut prompt, r.opt(Reader::uint)?),
            b"completion_tokens" => once(&mut completion, r.opt(Reader::uint)?),
            b"prompt_tokens_details" => once(&mut details, r.opt(Reader::prompt_details)?),
            _ => r.skip(MAX_DEPTH),
        })?;
        Some(WireUsage {
            prompt_tokens: prompt.flatten(),
            completion_tokens: completion.flatten(),
            prompt_tokens_details: details.flatten(),
        })
    }

    fn prompt_details(&mut self) -> Option<WirePromptDetails> {
        let mut cached = None;
        self.object(|r, key| match key {
            b"cached_tokens" => once(&mut cached, r.opt(Reader::uint)?),
            _ => r.skip(MAX_DEPTH),
        })?;
        Some(WirePromptDetails {
            cached_tokens: cached.flatten(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What serde makes of `text` (the reference the fast reader must match).
    fn serde(text: &str) -> serde_json::Result<WireChunk<'_>> {
        serde_json::from_str(text)
    }

    /// Chunks as real servers send them: OpenAI (system_fingerprint, logprobs, refusal, usage
    /// null, tool calls with type, a usage chunk with details), vLLM (stop_reason, a logprobs
    /// object), llama.cpp (fields in another order, timings), llama-cpp-python (spaces after
    /// separators, every non-ASCII character escaped, surrogate pairs), Ollama, DeepSeek
    /// (reasoning_content), and the legacy function_call.
    const REAL: &[&str] = &[
        r#"{"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,"model":"mock","choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}"#,
        r#"{"id":"chatcmpl-AB12","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        r#"{"id":"chatcmpl-AB12","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_abc","type":"function","function":{"name":"read_file","arguments":""}}],"refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        r#"{"id":"chatcmpl-AB12","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"path\":\"src/ma"}}]},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        r#"{"id":"chatcmpl-AB12","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}"#,
        r#"{"id":"chatcmpl-AB12","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":1912,"completion_tokens":10,"total_tokens":1922,"prompt_tokens_details":{"cached_tokens":1792,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
        r#"{"id":"chatcmpl-9f2","object":"chat.completion.chunk","created":1727000000,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}"#,
        r#"{"id":"chatcmpl-9f2","object":"chat.completion.chunk","created":1727000000,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7,"prompt_tokens_details":null}}"#,
        r#"{"id":"chatcmpl-9f2","object":"chat.completion.chunk","created":1727000000,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-0.0012,"bytes":[72,105],"top_logprobs":[{"token":"Hi","logprob":-1.2e-3,"bytes":[72,105]},{"token":"Hey","logprob":-6.5E+2,"bytes":null}]}]},"finish_reason":null}]}"#,
        r#"{"id":"chatcmpl-9f2","object":"chat.completion.chunk","created":1727000000,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"id":"chatcmpl-tool-4d1","type":"function","index":0,"function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},"logprobs":null,"finish_reason":null}]}"#,
        r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" world"}}],"created":1727000000,"id":"chatcmpl-abc","model":"gpt-3.5-turbo","system_fingerprint":"b3899-1e7b9299","object":"chat.completion.chunk"}"#,
        r#"{"choices":[{"finish_reason":"stop","index":0,"delta":{}}],"created":1727000000,"id":"chatcmpl-abc","model":"gpt-3.5-turbo","system_fingerprint":"b3899-1e7b9299","object":"chat.completion.chunk","usage":{"completion_tokens":10,"prompt_tokens":5,"total_tokens":15},"timings":{"prompt_n":5,"prompt_ms":12.5,"prompt_per_token_ms":2.5,"prompt_per_second":400.0,"predicted_n":10,"predicted_ms":100.1,"predicted_per_token_ms":10.01,"predicted_per_second":99.9}}"#,
        r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"id":"WvXn6Tq2","type":"function","function":{"name":"ls","arguments":"{\"path\":"}}]}}],"created":1,"id":"chatcmpl-abc","model":"m","object":"chat.completion.chunk"}"#,
        r#"{"id": "chatcmpl-1b6", "object": "chat.completion.chunk", "created": 1727000000, "model": "models/smollm2.gguf", "choices": [{"index": 0, "delta": {"content": "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440"}, "logprobs": null, "finish_reason": null}]}"#,
        r#"{"id": "chatcmpl-1b6", "object": "chat.completion.chunk", "created": 1727000000, "model": "m", "choices": [{"index": 0, "delta": {"content": "\ud83d\ude00 ok \u00e9\u20ac"}, "logprobs": null, "finish_reason": null}]}"#,
        r#"{"id": "chatcmpl-1b6", "object": "chat.completion.chunk", "created": 1727000000, "model": "m", "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}]}"#,
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"llama3","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}"#,
        r#"{"id":"d1","object":"chat.completion.chunk","created":1,"model":"deepseek-reasoner","system_fingerprint":"fp_x","choices":[{"index":0,"delta":{"content":null,"reasoning_content":"Let me think"},"logprobs":null,"finish_reason":null}]}"#,
        r#"{"choices":[{"delta":{"function_call":{"name":"ls","arguments":"{}"}},"finish_reason":"function_call"}]}"#,
        r#"{"choices":[{"delta":{"content":"line\nnext \"quoted\" back\\slash\ttab \/ \b\f\r"},"finish_reason":null}]}"#,
        r#"{"choices":[{"delta":{"content":"Привет, мир 😀 — «ok»"},"finish_reason":null}]}"#,
        r#"{"choices":[{"index":1,"delta":{"content":"second"}},{"index":0,"delta":{"content":"first"},"finish_reason":"eos"}]}"#,
        r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":null,"type":null,"function":{"name":null,"arguments":"{}"}},{"index":1,"id":"call_2","function":{"name":"grep","arguments":null}}]},"finish_reason":null}]}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"x","tool_calls":null,"function_call":null},"finish_reason":""}],"usage":{"prompt_tokens":null,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":null}},"error":null}"#,
        r#"{"choices":null,"usage":null,"error":null,"x":[[[{"a":[true,false,null,-0,0.5,1e10,"\u00ff\ud800"]}]]],"y":{}}"#,
        r#"{}"#,
        "{\n  \"choices\" : [ {\r\n\t\"index\" : 0 , \"delta\" : { \"content\" : \"spaced\" } , \"finish_reason\" : \"content_filter\" } ]\n}",
        r#"{"choices":[{"index":18446744073709551615,"delta":{"content":"\u0000\u001f\u007f"}}]}"#,
    ];

    #[test]
    fn real_world_chunks_are_read_fast_and_give_serdes_value() {
        for text in REAL {
            assert_eq!(parse(text), Some(serde(text).unwrap()), "{text}");
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed_and_escaped_ones_decoded() {
        let chunk =
            parse(r#"{"choices":[{"delta":{"content":"plain"},"finish_reason":"a\u00e9\ud83d\ude00\n"}]}"#)
                .unwrap();
        let choice = &chunk.choices.as_ref().unwrap()[0];
        let content = choice.delta.as_ref().unwrap().content.as_ref().unwrap();
        assert!(matches!(content, Cow::Borrowed("plain")), "{content:?}");
        assert_eq!(choice.finish_reason, Some(Cow::Owned("aé😀\n".to_string())));
    }

    /// Shapes the fast reader leaves to serde: some serde accepts (an error object, an escaped key,
    /// a struct written as an array), most it refuses. Either way the answer is serde's.
    const DECLINED: &[&str] = &[
        r#"{"error":{"message":"boom","type":"server_error","code":500}}"#,
        r#"{"error":"plain text"}"#,
        r#"{"cho\u0069ces":[{"delta":{"content":"escaped key"}}]}"#,
        r#"{"choices":[[0,{"content":"as an array"},"stop"]]}"#,
        r#"{"choices":[{"index":-1}]}"#,
        r#"{"choices":[{"index":1.0}]}"#,
        r#"{"choices":[{"index":1e2}]}"#,
        r#"{"choices":[{"index":01}]}"#,
        r#"{"choices":[{"index":"0"}]}"#,
        r#"{"usage":{"prompt_tokens":18446744073709551616}}"#,
        r#"{"choices":[{"delta":{"content":"a"},"delta":{}}]}"#,
        r#"{"choices":[],"choices":[]}"#,
        r#"{"error":null,"error":null}"#,
        r#"{"choices":[],}"#,
        r#"{"choices":[1,]}"#,
        r#"{"choices":[]} x"#,
        r#"{"choices":[{"delta":{"content":"\ud83d"}}]}"#,
        r#"{"choices":[{"delta":{"content":"\ude00"}}]}"#,
        r#"{"choices":[{"delta":{"content":"\ud83d\u0041"}}]}"#,
        r#"{"choices":[{"delta":{"content":"\x"}}]}"#,
        r#"{"choices":[{"delta":{"content":"\u12g4"}}]}"#,
        "{\"choices\":[{\"delta\":{\"content\":\"raw\ttab\"}}]}",
        r#"{"choices": [{"delta": {"content": "a"}}]"#,
        r#"{"choices":[{"delta":{"content":5}}]}"#,
        r#"{"choices":{}}"#,
        r#"{"x":01}"#,
        r#"{"x":1.}"#,
        r#"{"x":-}"#,
        r#"{"x":1e}"#,
        r#"{"x":nul}"#,
        r#"{"x":"\q"}"#,
        r#"{"x":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#,
        r#"[]"#,
        r#""text""#,
        r#"{"choices": [\n"#,
        "",
    ];

    #[test]
    fn shapes_the_fast_reader_declines_get_serdes_answer_and_errors() {
        for text in DECLINED {
            assert_eq!(parse(text), None, "{text}");
            let ours = super::super::wire::parse_chunk(text).map_err(|e| e.to_string());
            assert_eq!(ours, serde(text).map_err(|e| e.to_string()), "{text}");
        }
    }

    /// A small deterministic generator (xorshift64*), so the test needs no crate and repeats.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
        }
    }

    #[test]
    fn mutated_chunks_are_either_declined_or_read_as_serde_reads_them() {
        const PIECES: &[&str] = &[
            "\"",
            "\\",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "\n",
            "\t",
            "0",
            "1",
            "-",
            ".",
            "e",
            "+",
            "null",
            "true",
            "\\u00e9",
            "\\ud83d",
            "\\ude00",
            "\\n",
            "é",
            "😀",
            "\u{1}",
            "\"index\":",
            "\"content\":",
            "\"choices\":",
            "\"usage\":",
            "\"error\":",
            "9999999999999999999999",
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut read_fast, mut declined) = (0, 0);
        for _ in 0..20_000 {
            let mut text = REAL[rng.below(REAL.len())].to_string();
            for _ in 0..1 + rng.below(3) {
                let mut at = rng.below(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                match rng.below(3) {
                    0 => text.insert_str(at, PIECES[rng.below(PIECES.len())]),
                    1 => {
                        let mut end = (at + 1 + rng.below(8)).min(text.len());
                        while !text.is_char_boundary(end) {
                            end += 1;
                        }
                        text.replace_range(at..end, "");
                    }
                    _ => {
                        let piece = PIECES[rng.below(PIECES.len())];
                        let mut end = (at + piece.len()).min(text.len());
                        while !text.is_char_boundary(end) {
                            end += 1;
                        }
                        text.replace_range(at..end, piece);
                    }
                }
            }
            match parse(&text) {
                Some(fast) => {
                    read_fast += 1;
                    assert_eq!(Some(fast), serde(&text).ok(), "{text}");
                }
                None => declined += 1,
            }
        }
        // Both sides of the comparison were exercised.
        assert!(
            read_fast > 1_000 && declined > 1_000,
            "{read_fast} read, {declined} declined"
        );
    }
}
