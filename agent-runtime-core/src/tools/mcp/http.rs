//! The HTTP client of Streamable HTTP MCP servers: rmcp's own reqwest client, which also sends a
//! `tools/call`'s W3C trace context (from its `params._meta`, SEP-414) as HTTP headers.
//!
//! rmcp's transport takes its custom headers once, for every request of the connection, and
//! sends each message from a worker task of its own (where the caller's OpenTelemetry context is
//! not current). The call's context travels in the message instead: [`super::client::call`] puts
//! `traceparent`/`tracestate` in `params._meta` (SEP-414, the MCP 2026-07-28 revision; rmcp's
//! `RequestParamsMeta::set_traceparent`), and this client repeats them as the request's
//! `traceparent`/`tracestate` headers (W3C Trace Context), for HTTP middleware and proxies that
//! read only headers. Everything else is delegated unchanged, limits included.

use std::collections::HashMap;
use std::sync::Arc;

use futures::stream::BoxStream;
use http::{HeaderName, HeaderValue};
use rmcp::model::{ClientJsonRpcMessage, ClientRequest, JsonRpcMessage, RequestParamsMeta};
use rmcp::transport::streamable_http_client::{
    SseError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
    StreamableHttpResponseLimits,
};
use sse_stream::Sse;

/// rmcp's reqwest client, sending a tool call's trace context as headers too.
#[derive(Clone, Debug, Default)]
pub(super) struct TracingHttpClient(pub reqwest::Client);

type Headers = HashMap<HeaderName, HeaderValue>;
type PostResult = Result<StreamableHttpPostResponse, StreamableHttpError<reqwest::Error>>;

/// `headers` plus the `traceparent` and `tracestate` of `message` when it is a `tools/call`
/// carrying them in `_meta` (a value that is not a valid header is left out).
fn with_trace_context(message: &ClientJsonRpcMessage, mut headers: Headers) -> Headers {
    if let JsonRpcMessage::Request(r) = message
        && let ClientRequest::CallToolRequest(call) = &r.request
    {
        let fields = [
            ("traceparent", call.params.traceparent()),
            ("tracestate", call.params.tracestate()),
        ];
        for (name, value) in fields {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
    }
    headers
}

impl StreamableHttpClient for TracingHttpClient {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: Headers,
    ) -> PostResult {
        let limits = StreamableHttpResponseLimits::default();
        self.post_message_with_response_limits(uri, message, session_id, auth_header, custom_headers, limits)
            .await
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: Headers,
        max_sse_event_size: usize,
    ) -> PostResult {
        let mut limits = StreamableHttpResponseLimits::default();
        limits.max_sse_event_size = max_sse_event_size;
        self.post_message_with_response_limits(uri, message, session_id, auth_header, custom_headers, limits)
            .await
    }

    /// Every POST comes here (the other two as rmcp's reqwest client routes them).
    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: Headers,
        limits: StreamableHttpResponseLimits,
    ) -> PostResult {
        let headers = with_trace_context(&message, custom_headers);
        (self.0)
            .post_message_with_response_limits(uri, message, session_id, auth_header, headers, limits)
            .await
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: Headers,
    ) -> Result<(), StreamableHttpError<Self::Error>> {
        (self.0)
            .delete_session(uri, session_id, auth_header, custom_headers)
            .await
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: Headers,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, StreamableHttpError<Self::Error>> {
        (self.0)
            .get_stream(uri, session_id, last_event_id, auth_header, custom_headers)
            .await
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: Headers,
        max_sse_event_size: usize,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, StreamableHttpError<Self::Error>> {
        (self.0)
            .get_stream_with_max_sse_event_size(
                uri,
                session_id,
                last_event_id,
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{CallToolRequest, CallToolRequestParams, JsonRpcRequest, NumberOrString};

    fn call_with(meta: &[(&str, &str)]) -> ClientJsonRpcMessage {
        let mut params = CallToolRequestParams::new("echo");
        for (k, v) in meta {
            match *k {
                "traceparent" => params.set_traceparent(v),
                _ => params.set_tracestate(v),
            }
        }
        JsonRpcMessage::Request(JsonRpcRequest::new(
            NumberOrString::Number(1),
            ClientRequest::CallToolRequest(CallToolRequest::new(params)),
        ))
    }

    fn named(h: &Headers) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_tool_calls_trace_context_goes_to_the_headers_beside_the_configured_ones() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let configured = Headers::from([(
            HeaderName::from_static("authorization"),
            HeaderValue::from_static("Bearer t"),
        )]);
        let h = with_trace_context(
            &call_with(&[("traceparent", tp), ("tracestate", "k=v")]),
            configured,
        );
        assert_eq!(
            named(&h),
            [
                ("authorization".to_string(), "Bearer t".to_string()),
                ("traceparent".to_string(), tp.to_string()),
                ("tracestate".to_string(), "k=v".to_string()),
            ]
        );
    }

    #[test]
    fn a_call_without_trace_context_and_a_value_that_is_no_header_add_nothing() {
        assert_eq!(named(&with_trace_context(&call_with(&[]), Headers::new())), []);
        assert_eq!(
            named(&with_trace_context(
                &call_with(&[("traceparent", "bad\nvalue")]),
                Headers::new()
            )),
            []
        );
    }
}
