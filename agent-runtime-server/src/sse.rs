//! Server-sent events (API.md §4): each event as `id: <seq>` + `data: <json>` and a blank line,
//! and a `: keep-alive` comment whenever the stream has been idle for the keep-alive interval.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use agent_runtime_core::Event;
use agent_runtime_core::orchestrator::EventStream;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::StreamBody;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Frame;
use hyper::{Response, StatusCode, header};
use tokio::time::Instant;

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

/// [`encode`] appended to `buf`: the JSON is written in place, with no string of its own.
fn encode_into(buf: &mut Vec<u8>, event: &Event) {
    use std::io::Write;
    // Writing into a Vec cannot fail; an event that cannot be encoded is sent as `{}`.
    let _ = write!(buf, "id: {}\ndata: ", event.seq);
    let start = buf.len();
    if serde_json::to_writer(&mut *buf, event).is_err() {
        buf.truncate(start);
        buf.extend_from_slice(b"{}");
    }
    buf.extend_from_slice(b"\n\n");
}

/// The body of an SSE response: ready events in bursts, a keep-alive comment when idle.
///
/// One idle timer per stream, moved forward after each write: moving a registered timer later
/// only updates its deadline (the timer wheel sees the new one when the old one comes due), where
/// a timeout per burst registered a timer and removed it again for every burst of tokens.
struct Sse {
    events: EventStream,
    /// The events ended while a burst was gathered.
    ended: bool,
    keep_alive: Duration,
    /// Fires when nothing was written for `keep_alive`.
    idle: Pin<Box<tokio::time::Sleep>>,
    _guard: StreamGuard,
}

impl Stream for Sse {
    type Item = Result<Frame<Bytes>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let s = &mut *self;
        if s.ended {
            return Poll::Ready(None);
        }
        let bytes = match s.events.poll_next_unpin(cx) {
            Poll::Ready(Some(event)) => {
                // Events already here (a burst of tokens) go out in one write.
                let mut buf = Vec::with_capacity(512);
                encode_into(&mut buf, &event);
                while buf.len() < BURST_BYTES {
                    match s.events.poll_next_unpin(cx) {
                        Poll::Ready(Some(next)) => encode_into(&mut buf, &next),
                        Poll::Ready(None) => {
                            // Ended: never poll the stream again.
                            s.ended = true;
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
                Bytes::from(buf)
            }
            Poll::Ready(None) => {
                s.ended = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {
                if s.idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                Bytes::from_static(KEEP_ALIVE)
            }
        };
        let next = Instant::now() + s.keep_alive;
        s.idle.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }
}

/// A `200 text/event-stream` response streaming `events`. The guard counts the stream as active
/// until the client leaves or the stream ends; dropping it never touches the turn.
pub fn response(
    events: EventStream,
    keep_alive: Duration,
    guard: StreamGuard,
) -> Response<UnsyncBoxBody<Bytes, Infallible>> {
    let frames = Sse {
        events,
        ended: false,
        keep_alive,
        idle: Box::pin(tokio::time::sleep(keep_alive)),
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
    fn an_event_is_framed_with_its_seq_as_id() {
        let e = Event {
            seq: 42,
            payload: EventPayload::AssistantMessage(AssistantMessage::Token { token: "a\nb".into() }),
        };
        assert_eq!(
            encode(&e),
            Bytes::from(
                "id: 42\ndata: {\"type\":\"assistant_message\",\"token\":\"a\\nb\",\"seq\":42,\"is_final\":false}\n\n"
            )
        );
    }
}
