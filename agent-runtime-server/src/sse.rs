//! Server-sent events (API.md §4): each event as `id: <seq>` + `data: <json>` and a blank line,
//! and a `: keep-alive` comment whenever the stream has been idle for the keep-alive interval.

use std::convert::Infallible;
use std::time::Duration;

use agent_runtime_core::Event;
use agent_runtime_core::orchestrator::EventStream;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http_body_util::StreamBody;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Frame;
use hyper::{Response, StatusCode, header};

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
    use std::io::Write;
    // Writing into a Vec cannot fail; an event that cannot be encoded is sent as `{}`.
    let _ = write!(buf, "id: {}\ndata: ", event.seq);
    let start = buf.len();
    if event.write_wire_json(buf).is_err() {
        buf.truncate(start);
        buf.extend_from_slice(b"{}");
    }
    buf.extend_from_slice(b"\n\n");
}

struct Sse {
    events: EventStream,
    /// The events ended while a burst was gathered.
    ended: bool,
    keep_alive: Duration,
    _guard: StreamGuard,
}

/// A `200 text/event-stream` response streaming `events`. The guard counts the stream as active
/// until the client leaves or the stream ends; dropping it never touches the turn.
pub fn response(
    events: EventStream,
    keep_alive: Duration,
    guard: StreamGuard,
) -> Response<UnsyncBoxBody<Bytes, Infallible>> {
    let state = Sse {
        events,
        ended: false,
        keep_alive,
        _guard: guard,
    };
    let frames = futures::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        // Dropping `next()` on a timeout loses nothing: the pending read lives in the stream.
        let bytes = match tokio::time::timeout(s.keep_alive, s.events.next()).await {
            Ok(Some(event)) => {
                // Events already here (a burst of tokens) go out in one write.
                let mut buf = Vec::with_capacity(512);
                encode_into(&mut buf, &event);
                while buf.len() < BURST_BYTES {
                    match s.events.next().now_or_never() {
                        Some(Some(next)) => encode_into(&mut buf, &next),
                        Some(None) => {
                            // Ended: never poll the stream again.
                            s.ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                Bytes::from(buf)
            }
            Ok(None) => return None,
            Err(_) => Bytes::from_static(KEEP_ALIVE),
        };
        Some((Ok::<_, Infallible>(Frame::data(bytes)), s))
    });
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
