//! A minimal reader of `text/event-stream` bodies (the parts the runtime's server sends: `id:`,
//! `data:`, `: keep-alive` comments), shared by the HTTP examples.

use std::pin::Pin;

use futures::{Stream, StreamExt};

/// One server-sent event: its `id:` (the session's event seq) and its `data:` JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// The `id:` line, parsed (`None` if absent).
    pub id: Option<u64>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Reads events from a streaming HTTP response body.
pub struct SseReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    buf: Vec<u8>,
}

impl SseReader {
    /// Reads the body of `response` as events.
    pub fn new(response: reqwest::Response) -> Self {
        SseReader {
            body: Box::pin(response.bytes_stream().map(|r| r.map(|b| b.to_vec()))),
            buf: Vec::new(),
        }
    }

    /// The next event; `Ok(None)` when the body ended, `Err` when the connection failed.
    pub async fn next(&mut self) -> reqwest::Result<Option<SseEvent>> {
        loop {
            while let Some(frame) = self.take_frame() {
                if let Some(event) = parse(&frame) {
                    return Ok(Some(event));
                }
            }
            match self.body.next().await {
                // Dropping CRs lets one search find `\n\n` whichever line ends the server uses.
                Some(Ok(bytes)) => self.buf.extend(bytes.iter().filter(|b| **b != b'\r')),
                Some(Err(e)) => return Err(e),
                None => return Ok(None),
            }
        }
    }

    /// Cuts the first complete frame (up to a blank line) off the buffer.
    fn take_frame(&mut self) -> Option<String> {
        let end = self.buf.windows(2).position(|w| w == b"\n\n")?;
        let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
        Some(String::from_utf8_lossy(&frame).into_owned())
    }
}

/// An event from one frame; `None` for a frame of comments only (keep-alives).
fn parse(frame: &str) -> Option<SseEvent> {
    let mut id = None;
    let mut data: Vec<&str> = Vec::new();
    for line in frame.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    (!data.is_empty()).then(|| SseEvent {
        id,
        data: data.join("\n"),
    })
}
