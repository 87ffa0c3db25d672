//! An incremental `text/event-stream` decoder: bytes in (split anywhere, even inside a UTF-8
//! character or a CRLF), the `data` of each complete event out.
//!
//! Lines end with LF, CRLF or CR. `:` comment lines, `event:`, `id:` and `retry:` fields are
//! skipped; the data lines of one event are joined with `\n` (the SSE rules).

/// Decodes SSE events from byte pieces as they arrive.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the current, unfinished line. Kept as bytes: a piece may end inside a character,
    /// and a line is only turned into text once its terminator (never part of a character) came.
    line: Vec<u8>,
    /// The previous piece ended with CR: a LF at the start of the next one belongs to it.
    after_cr: bool,
    /// Data lines of the current event.
    data: Option<String>,
    /// Bytes seen so far.
    seen: usize,
}

impl SseDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many bytes were pushed so far.
    pub fn bytes_seen(&self) -> usize {
        self.seen
    }

    /// Feeds a piece of the body; returns the data of every event it completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.seen += bytes.len();
        let mut events = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut events),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut events);
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    /// The end of the body: an event whose blank line never came is still delivered (servers that
    /// close right after `data: [DONE]` exist); a half-written one then fails to parse upstream.
    pub fn finish(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            self.end_line(&mut events);
        }
        if let Some(data) = self.data.take() {
            events.push(data);
        }
        events
    }

    fn end_line(&mut self, events: &mut Vec<String>) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_whole(body: &[u8]) -> Vec<String> {
        let mut d = SseDecoder::new();
        let mut events = d.push(body);
        events.extend(d.finish());
        events
    }

    fn decode_bytewise(body: &[u8]) -> Vec<String> {
        let mut d = SseDecoder::new();
        let mut events = Vec::new();
        for b in body {
            events.extend(d.push(std::slice::from_ref(b)));
        }
        events.extend(d.finish());
        events
    }

    #[test]
    fn events_are_split_on_blank_lines_with_comments_and_fields_skipped() {
        let body = b": keep-alive\r\nevent: message\r\ndata: {\"a\":1}\r\n\r\nid: 7\ndata:{\"b\":2}\n\ndata: [DONE]\n\n";
        let expected = vec![
            "{\"a\":1}".to_string(),
            "{\"b\":2}".to_string(),
            "[DONE]".to_string(),
        ];
        assert_eq!(decode_whole(body), expected);
        assert_eq!(decode_bytewise(body), expected);
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        assert_eq!(decode_whole(b"data: a\ndata: b\n\n"), vec!["a\nb".to_string()]);
    }

    #[test]
    fn cyrillic_split_inside_a_character_survives() {
        let body = "data: {\"content\":\"Привет, мир\"}\r\n\r\n".as_bytes();
        assert_eq!(
            decode_bytewise(body),
            vec!["{\"content\":\"Привет, мир\"}".to_string()]
        );
    }

    #[test]
    fn lone_cr_ends_lines_and_a_missing_final_blank_line_still_delivers() {
        assert_eq!(
            decode_bytewise(b"data: x\r\rdata: [DONE]"),
            vec!["x".to_string(), "[DONE]".to_string()]
        );
    }
}
