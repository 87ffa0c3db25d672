//! An incremental `text/event-stream` decoder: bytes in (split anywhere, even inside a UTF-8
//! character or a CRLF), the `data` of each complete event out.
//!
//! Lines end with LF, CRLF or CR. `event:` and `retry:` fields are skipped; the data lines of one
//! event are joined with `\n` (the SSE rules). [`SseDecoder::push`] gives the data only (what a model
//! stream needs); [`SseDecoder::push_frames`] also gives each event's `id:` and the `:` comments.

use std::fmt;

/// One complete piece of a stream, as [`SseDecoder::push_frames`] delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseFrame {
    /// An event: its `id:` field, if it had one, and its data lines joined with `\n`.
    Event {
        /// The `id:` field's value.
        id: Option<String>,
        /// The data.
        data: String,
    },
    /// A comment line, without its `:` (`: keep-alive` is `" keep-alive"`).
    Comment(String),
}

impl fmt::Display for SseFrame {
    /// The frame as it is written on the wire, without the blank line that ends it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseFrame::Comment(text) => write!(f, ":{text}"),
            SseFrame::Event { id, data } => {
                if let Some(id) = id {
                    writeln!(f, "id: {id}")?;
                }
                let mut lines = data.split('\n');
                write!(f, "data: {}", lines.next().unwrap_or_default())?;
                lines.try_for_each(|line| write!(f, "\ndata: {line}"))
            }
        }
    }
}

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
    /// The buffer of an event whose data was read in place ([`SseDecoder::push_data`]), kept
    /// for the next event's data.
    spare: String,
    /// The `id:` of the current event.
    id: Option<String>,
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
        data_only(self.push_frames(bytes))
    }

    /// The end of the body: an event whose blank line never came is still delivered (servers that
    /// close right after `data: [DONE]` exist); a half-written one then fails to parse upstream.
    pub fn finish(&mut self) -> Vec<String> {
        data_only(self.finish_frames())
    }

    /// [`SseDecoder::push`] with every frame: events with their `id:`, and comments.
    pub fn push_frames(&mut self, bytes: &[u8]) -> Vec<SseFrame> {
        let mut frames = Vec::new();
        self.decode(bytes, &mut frames);
        frames
    }

    /// [`SseDecoder::push`] handing each event's data to `on_data` where it lies, in a buffer
    /// reused from one event to the next, rather than in a `String` of its own.
    pub fn push_data(&mut self, bytes: &[u8], on_data: impl FnMut(&str)) {
        self.decode(bytes, &mut DataOnly(on_data));
    }

    /// [`SseDecoder::finish`] handing the data to `on_data` as [`SseDecoder::push_data`] does.
    pub fn finish_data(&mut self, on_data: impl FnMut(&str)) {
        self.end(&mut DataOnly(on_data));
    }

    /// Decodes `bytes` into `frames`.
    ///
    /// Whole lines are found with `memchr` and read in place; only a line that a piece cuts is
    /// copied (into `line`) until its end comes.
    fn decode(&mut self, mut bytes: &[u8], frames: &mut impl Frames) {
        self.seen += bytes.len();
        if !bytes.is_empty() && std::mem::take(&mut self.after_cr) && bytes[0] == b'\n' {
            bytes = &bytes[1..];
        }
        while let Some(at) = memchr::memchr2(b'\n', b'\r', bytes) {
            if self.line.is_empty() {
                self.end_line(&bytes[..at], frames);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&bytes[..at]);
                self.end_line(&line, frames);
                line.clear();
                self.line = line;
            }
            let cr = bytes[at] == b'\r';
            bytes = &bytes[at + 1..];
            if cr {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    // The LF of this CRLF, if it is one, starts the next piece.
                    None => self.after_cr = true,
                }
            }
        }
        self.line.extend_from_slice(bytes);
    }

    /// [`SseDecoder::finish`] with every frame.
    pub fn finish_frames(&mut self) -> Vec<SseFrame> {
        let mut frames = Vec::new();
        self.end(&mut frames);
        frames
    }

    /// The end of the body, into `frames`.
    fn end(&mut self, frames: &mut impl Frames) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.end_line(&line, frames);
        }
        self.end_event(frames);
    }

    /// The current event, if it has data, goes to `frames`.
    fn end_event(&mut self, frames: &mut impl Frames) {
        let id = self.id.take();
        if let Some(mut data) = self.data.take() {
            frames.event(id, &mut data);
            data.clear();
            self.spare = data;
        }
    }

    /// Part of a frame came whose end did not: a line without its end, or an event without its
    /// blank line. At the end of a body this is a frame cut short.
    pub fn is_mid_frame(&self) -> bool {
        !self.line.is_empty() || self.data.is_some() || self.id.is_some()
    }

    /// One line, without its end. Text once whole: a valid line is read in place, an invalid one
    /// gets U+FFFD for its bad bytes.
    fn end_line(&mut self, line: &[u8], frames: &mut impl Frames) {
        // Nearly every line of a model stream is `data: …`: its value is checked as text alone,
        // without looking for the colon (the prefix is ASCII, so the value's bad bytes, if any,
        // get the same U+FFFD as in the whole line).
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            match std::str::from_utf8(value) {
                Ok(text) => self.data_line(text),
                Err(_) => self.data_line(&String::from_utf8_lossy(value)),
            }
            return;
        }
        let line = match std::str::from_utf8(line) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(line),
        };
        if line.is_empty() {
            self.end_event(frames);
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            frames.comment(comment);
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => self.data_line(value),
            "id" => self.id = Some(value.to_string()),
            _ => {}
        }
    }

    /// A `data:` line's value joins the current event's data.
    fn data_line(&mut self, value: &str) {
        match &mut self.data {
            Some(data) => {
                data.push('\n');
                data.push_str(value);
            }
            None => {
                let mut data = std::mem::take(&mut self.spare);
                data.push_str(value);
                self.data = Some(data);
            }
        }
    }
}

/// Where decoded frames go.
trait Frames {
    /// An event; `data` may be taken (it is cleared and reused otherwise).
    fn event(&mut self, id: Option<String>, data: &mut String);
    /// A comment line, without its `:`.
    fn comment(&mut self, text: &str);
}

impl Frames for Vec<SseFrame> {
    fn event(&mut self, id: Option<String>, data: &mut String) {
        self.push(SseFrame::Event {
            id,
            data: std::mem::take(data),
        });
    }

    fn comment(&mut self, text: &str) {
        self.push(SseFrame::Comment(text.to_string()));
    }
}

/// The events' data only, handed to a function where it lies.
struct DataOnly<F>(F);

impl<F: FnMut(&str)> Frames for DataOnly<F> {
    fn event(&mut self, _id: Option<String>, data: &mut String) {
        (self.0)(data);
    }

    fn comment(&mut self, _text: &str) {}
}

/// The data of the events among `frames`.
fn data_only(frames: Vec<SseFrame>) -> Vec<String> {
    frames
        .into_iter()
        .filter_map(|f| match f {
            SseFrame::Event { data, .. } => Some(data),
            SseFrame::Comment(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events' data as `push` gives them, checked to be what `push_data` reads in place.
    fn decode_whole(body: &[u8]) -> Vec<String> {
        let mut d = SseDecoder::new();
        let mut events = d.push(body);
        events.extend(d.finish());
        assert_eq!(read_in_place(&[body]), events);
        events
    }

    /// [`decode_whole`] with the body pushed one byte at a time.
    fn decode_bytewise(body: &[u8]) -> Vec<String> {
        let mut d = SseDecoder::new();
        let mut events = Vec::new();
        for b in body {
            events.extend(d.push(std::slice::from_ref(b)));
        }
        events.extend(d.finish());
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(read_in_place(&bytes), events);
        events
    }

    /// The data `push_data` and `finish_data` hand over for a body in `pieces`.
    fn read_in_place(pieces: &[&[u8]]) -> Vec<String> {
        let mut d = SseDecoder::new();
        let mut events = Vec::new();
        for piece in pieces {
            d.push_data(piece, |data| events.push(data.to_string()));
        }
        d.finish_data(|data| events.push(data.to_string()));
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
    fn frames_carry_ids_and_comments_and_print_as_on_the_wire() {
        let body = b": keep-alive\n\nid: 7\ndata: a\ndata: b\n\ndata: x\n\nid: 8";
        let mut d = SseDecoder::new();
        let frames = d.push_frames(body);
        let expected = vec![
            SseFrame::Comment(" keep-alive".into()),
            SseFrame::Event {
                id: Some("7".into()),
                data: "a\nb".into(),
            },
            SseFrame::Event {
                id: None,
                data: "x".into(),
            },
        ];
        assert_eq!(frames, expected);
        let printed: Vec<String> = frames.iter().map(ToString::to_string).collect();
        assert_eq!(printed, [": keep-alive", "id: 7\ndata: a\ndata: b", "data: x"]);
        assert!(d.is_mid_frame(), "the last id line has not ended");
        assert_eq!(d.finish_frames(), vec![]);
        assert!(!d.is_mid_frame());
    }

    #[test]
    fn a_body_cut_in_two_anywhere_decodes_as_the_whole_body() {
        let body =
            ": hi\r\ndata: {\"content\":\"Привет\"}\r\n\r\nid: 3\rdata: a\rdata: b\r\rdata: [DONE]\n\n"
                .as_bytes();
        let whole = decode_whole(body);
        assert_eq!(whole, ["{\"content\":\"Привет\"}", "a\nb", "[DONE]"]);
        for cut in 0..=body.len() {
            let mut d = SseDecoder::new();
            let mut events = d.push(&body[..cut]);
            events.extend(d.push(&[]));
            events.extend(d.push(&body[cut..]));
            events.extend(d.finish());
            assert_eq!(events, whole, "cut at {cut}");
        }
    }

    #[test]
    fn bad_bytes_become_replacement_characters_in_data_and_other_fields_alike() {
        let body = b"data: a\xffb\ndata:\xe2\x82\n:c\xff\nid: \xff7\ndata\n\ndata: [DONE]\n\n";
        assert_eq!(
            decode_whole(body),
            vec!["a\u{FFFD}b\n\u{FFFD}\n".to_string(), "[DONE]".to_string()]
        );
        let frames = SseDecoder::new().push_frames(body);
        assert_eq!(
            frames,
            vec![
                SseFrame::Comment("c\u{FFFD}".into()),
                SseFrame::Event {
                    id: Some("\u{FFFD}7".into()),
                    data: "a\u{FFFD}b\n\u{FFFD}\n".into(),
                },
                SseFrame::Event {
                    id: None,
                    data: "[DONE]".into(),
                },
            ]
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
