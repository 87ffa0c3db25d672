//! Server-sent events (API.md §4): each event as `id: <seq>` + `data: <json>` and a blank line,
//! and a `: keep-alive` comment whenever the stream has been idle for the keep-alive interval.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use agent_runtime_core::Event;
use agent_runtime_core::orchestrator::EventStream;
use agent_runtime_core::protocol::write_decimal;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::StreamBody;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Frame;
use hyper::{Response, StatusCode, header};
use tokio::time::{Instant, Sleep};

use crate::metrics::StreamGuard;

/// Ready events are written together up to about this many bytes.
const BURST_BYTES: usize = 16 * 1024;

/// The comment sent while a stream is idle.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// One event in SSE framing. The JSON is compact, so it holds no raw newline.
pub fn encode(event: &Event) -> Bytes {
    let mut buf = Vec::with_capacity(128);
    encode_into(&mut buf, event);
    Bytes::from(buf)
}

/// [`encode`] appended to `buf`: the JSON is written in place, with no string of its own, the
/// payload serialized once ([`Event::write_wire_json`]).
fn encode_into(buf: &mut Vec<u8>, event: &Event) {
    // An event that cannot be encoded is sent as `{}`.
    buf.extend_from_slice(b"id: ");
    write_decimal(buf, event.seq);
    buf.extend_from_slice(b"\ndata: ");
    let start = buf.len();
    if event.write_wire_json(buf).is_err() {
        buf.truncate(start);
        buf.extend_from_slice(b"{}");
    }
    buf.extend_from_slice(b"\n\n");
}

/// The response body's stream: bursts of framed events, and a keep-alive comment whenever the
/// stream has been idle for `keep_alive`. Written by hand rather than as an `unfold` of a
/// `timeout` per burst: that armed and dropped a timer for every burst and moved the step's
/// future state on each poll; here one timer is armed per stream and moved only when it fires.
struct Sse {
    events: EventStream,
    /// The events ended (no more polls of `events`).
    ended: bool,
    keep_alive: Duration,
    /// When the last frame was sent (or the stream opened).
    sent: Instant,
    /// Armed for `keep_alive` after some earlier `sent`: when it fires, it is moved on to
    /// `sent + keep_alive` if a frame went out since, else the comment is sent.
    idle: Pin<Box<Sleep>>,
    _guard: StreamGuard,
}

impl Sse {
    /// The ready events, up to about [`BURST_BYTES`], framed into one buffer after `first`.
    fn burst(&mut self, first: &Event, cx: &mut Context<'_>) -> Bytes {
        let mut buf = Vec::with_capacity(512);
        encode_into(&mut buf, first);
        while buf.len() < BURST_BYTES {
            match self.events.poll_next_unpin(cx) {
                Poll::Ready(Some(next)) => encode_into(&mut buf, &next),
                Poll::Ready(None) => {
                    // Ended: never poll the stream again.
                    self.ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        Bytes::from(buf)
    }
}

impl Stream for Sse {
    type Item = Result<Frame<Bytes>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let s = self.get_mut();
        if s.ended {
            return Poll::Ready(None);
        }
        match s.events.poll_next_unpin(cx) {
            Poll::Ready(Some(event)) => {
                // Events already here (a burst of tokens) go out in one write.
                let bytes = s.burst(&event, cx);
                s.sent = Instant::now();
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            Poll::Ready(None) => {
                s.ended = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        loop {
            ready!(s.idle.as_mut().poll(cx));
            let due = s.sent + s.keep_alive;
            let now = Instant::now();
            if due > now {
                // Frames went out since the timer was armed: idle for less than `keep_alive`.
                s.idle.as_mut().reset(due);
                continue;
            }
            s.sent = now;
            s.idle.as_mut().reset(now + s.keep_alive);
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEP_ALIVE)))));
        }
    }
}

/// A `200 text/event-stream` response streaming `events`. The guard counts the stream as active
/// until the client leaves or the stream ends; dropping it never touches the turn.
pub fn response(
    events: EventStream,
    keep_alive: Duration,
    guard: StreamGuard,
) -> Response<UnsyncBoxBody<Bytes, Infallible>> {
    let sent = Instant::now();
    let frames = Sse {
        events,
        ended: false,
        keep_alive,
        sent,
        idle: Box::pin(tokio::time::sleep_until(sent + keep_alive)),
        _guard: guard,
    };
    let mut response = Response::new(UnsyncBoxBody::new(StreamBody::new(frames)));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    h.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_runtime_core::protocol::{AssistantMessage, EventPayload};

    #[test]
    fn every_event_type_is_framed_byte_for_byte_as_its_serialized_event() {
        for (seq, payload) in (1..).zip(agent_runtime_core::test_kit::every_event_payload()) {
            let fresh = Event::new(seq, payload.clone());
            // The framing before events kept their stored JSON: the event's `Serialize`.
            let before = format!("id: {seq}\ndata: {}\n\n", serde_json::to_string(&fresh).unwrap());
            let stored = Event::encoded(seq, payload).unwrap();
            assert_eq!(
                (encode(&fresh), encode(&stored)),
                (Bytes::from(before.clone()), Bytes::from(before)),
                "{}",
                fresh.payload.kind()
            );
        }
    }

    #[test]
    fn an_event_is_framed_with_its_seq_as_id() {
        let e = Event::new(
            42,
            EventPayload::AssistantMessage(AssistantMessage::Token { token: "a\nb".into() }),
        );
        assert_eq!(
            encode(&e),
            Bytes::from(
                "id: 42\ndata: {\"type\":\"assistant_message\",\"token\":\"a\\nb\",\"seq\":42,\"is_final\":false}\n\n"
            )
        );
    }
}
