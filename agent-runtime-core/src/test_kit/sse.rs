//! Event streams over HTTP: [`SseReader`] gives the frames of any `text/event-stream` body;
//! [`EventStream`] reads the runtime's own streams (JSON events whose `seq` is their `id:`).
// Test code shipped behind `test-utils`: a stream that breaks its contract fails the test (panics).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

use crate::llm::sse::{SseDecoder, SseFrame};

/// One event of a stream: its `id:` (the runtime's event seq) and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field as a number; `None` when absent or not a number.
    pub id: Option<u64>,
    /// The data lines joined with `\n`.
    pub data: String,
}

/// Reads the frames of a streaming HTTP response as they arrive.
pub struct SseReader {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    decoder: SseDecoder,
    ready: VecDeque<SseFrame>,
}

impl std::fmt::Debug for SseReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseReader")
            .field("decoder", &self.decoder)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl SseReader {
    /// Reads the body of `response`.
    pub fn new(response: reqwest::Response) -> Self {
        SseReader {
            body: response.bytes_stream().boxed(),
            decoder: SseDecoder::new(),
            ready: VecDeque::new(),
        }
    }

    /// The next frame (an event or a comment); `Ok(None)` when the body ended, `Err` when the
    /// connection failed. A frame the end of the body cut short is not delivered
    /// ([`SseReader::is_mid_frame`] tells).
    pub async fn next_frame(&mut self) -> reqwest::Result<Option<SseFrame>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Ok(Some(frame));
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.ready.extend(self.decoder.push_frames(&bytes)),
                Some(Err(e)) => return Err(e),
                None => return Ok(None),
            }
        }
    }

    /// The next event, comments skipped; as [`SseReader::next_frame`] otherwise.
    pub async fn next(&mut self) -> reqwest::Result<Option<SseEvent>> {
        while let Some(frame) = self.next_frame().await? {
            if let SseFrame::Event { id, data } = frame {
                let id = id.and_then(|id| id.trim().parse().ok());
                return Ok(Some(SseEvent { id, data }));
            }
        }
        Ok(None)
    }

    /// Bytes of a frame came whose end has not.
    pub fn is_mid_frame(&self) -> bool {
        self.decoder.is_mid_frame()
    }
}

/// One of the runtime's event streams (`POST /agent/message/stream`, `GET /sessions/{id}/events`):
/// each frame is an event `id: <seq>` + `data: <event JSON>` with that `seq`, or a `:` comment.
#[derive(Debug)]
pub struct EventStream {
    sse: SseReader,
    /// A failed connection ends the stream instead of failing the test.
    cut_ends: bool,
    /// The body ended (or was cut).
    ended: bool,
    /// Every event received so far, in order.
    pub events: Vec<Value>,
}

impl EventStream {
    /// A stream that must run cleanly: a failed connection, or bytes after the last complete frame,
    /// fail the test. Checks the response is a `200` event stream with buffering off.
    pub fn new(response: reqwest::Response) -> Self {
        Self::with(response, false)
    }

    /// A stream that a cut connection (the server killed, the client leaving) just ends; a frame
    /// the cut tore was never received.
    pub fn cut_tolerant(response: reqwest::Response) -> Self {
        Self::with(response, true)
    }

    fn with(response: reqwest::Response, cut_ends: bool) -> Self {
        let headers = response.headers();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(
            (
                response.status().as_u16(),
                header("content-type"),
                header("cache-control"),
                header("x-accel-buffering"),
            ),
            (200, Some("text/event-stream"), Some("no-cache"), Some("no")),
            "not an event stream"
        );
        EventStream {
            sse: SseReader::new(response),
            cut_ends,
            ended: false,
            events: Vec::new(),
        }
    }

    /// The next frame (event or comment) as it was written, without its blank line; `None` at the
    /// end of the body.
    pub async fn next_frame(&mut self) -> Option<String> {
        if self.ended {
            return None;
        }
        let next = self.sse.next_frame().await;
        let frame = match next {
            Ok(Some(frame)) => Some(frame),
            Err(_) if self.cut_ends => None,
            Err(e) => panic!("stream failed: {e}"),
            Ok(None) => {
                assert!(
                    self.cut_ends || !self.sse.is_mid_frame(),
                    "trailing bytes after the last frame"
                );
                None
            }
        };
        let Some(frame) = frame else {
            self.ended = true;
            return None;
        };
        if let SseFrame::Event { id, data } = &frame {
            let id: u64 = id
                .as_deref()
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("an event without a numeric id: {frame:?}"));
            let event: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
            assert_eq!(event["seq"], id, "id line and seq differ");
            self.events.push(event);
        }
        Some(frame.to_string())
    }

    /// The next event (comments skipped); `None` at the end.
    pub async fn next(&mut self) -> Option<Value> {
        let received = self.events.len();
        while self.next_frame().await.is_some() {
            if self.events.len() > received {
                return self.events.last().cloned();
            }
        }
        None
    }

    /// Reads until an event of `kind` (returned) or the end.
    pub async fn until(&mut self, kind: &str) -> Option<Value> {
        while let Some(e) = self.next().await {
            if e["type"] == kind {
                return Some(e);
            }
        }
        None
    }

    /// Every event not read yet, to the end.
    pub async fn all(mut self) -> Vec<Value> {
        let read = self.events.len();
        while self.next_frame().await.is_some() {}
        self.events.split_off(read)
    }

    /// Reads to the end; returns every event received, those read before included.
    pub async fn rest(mut self) -> Vec<Value> {
        while self.next_frame().await.is_some() {}
        self.events
    }

    /// [`EventStream::rest`], bounded: a stream that does not end in `limit` fails the test.
    pub async fn rest_within(self, limit: Duration) -> Vec<Value> {
        self.rest_within_ctx(limit, "").await
    }

    /// [`EventStream::rest_within`], naming `ctx` (and the events so far) when the stream hangs.
    pub async fn rest_within_ctx(mut self, limit: Duration, ctx: &str) -> Vec<Value> {
        let ended = tokio::time::timeout(limit, async { while self.next_frame().await.is_some() {} }).await;
        assert!(
            ended.is_ok(),
            "{ctx}: the stream did not end within {limit:?}; received {:?}",
            self.events
        );
        self.events
    }
}
