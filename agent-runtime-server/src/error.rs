//! The one JSON error shape of the API and the one table from error codes to HTTP statuses.
//! The core knows codes only; which status a code gets is decided here and nowhere else.

use agent_runtime_core::Error;
use hyper::StatusCode;
use serde::Serialize;

/// The HTTP status of each core error. One arm per variant and no wildcard, so a new core error
/// without a status does not compile (as the Python exception table does not).
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::SessionNotFound(_) | Error::ApprovalNotFound(_) | Error::ToolCallNotFound(_) => {
            StatusCode::NOT_FOUND
        }
        Error::InvalidTool(_) | Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        Error::ContextTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::Llm(_) => StatusCode::BAD_GATEWAY,
        Error::SessionExists(_)
        | Error::SessionBusy(_)
        | Error::ApprovalAlreadyDecided(_)
        | Error::AgentSwitchLimit(_) => StatusCode::CONFLICT,
        Error::ToolExecutionFailed(_) | Error::Database(_) | Error::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        Error::ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The errors only HTTP has: the core never sees a token, a body size, a path or a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Missing or wrong `x-internal-auth` token.
    Unauthorized,
    /// The request body is over `MAX_REQUEST_BYTES`.
    PayloadTooLarge,
    /// No route for the path.
    NotFound,
    /// The route does not answer this method.
    MethodNotAllowed,
}

impl HttpError {
    /// Every one of them, for the documentation and its tests.
    pub const ALL: [HttpError; 4] = [
        HttpError::Unauthorized,
        HttpError::PayloadTooLarge,
        HttpError::NotFound,
        HttpError::MethodNotAllowed,
    ];

    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            HttpError::Unauthorized => "UNAUTHORIZED",
            HttpError::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            HttpError::NotFound => "NOT_FOUND",
            HttpError::MethodNotAllowed => "METHOD_NOT_ALLOWED",
        }
    }

    /// The status.
    pub fn status(self) -> StatusCode {
        match self {
            HttpError::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::NotFound => StatusCode::NOT_FOUND,
            HttpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

/// An error on its way to the client: a stable code, its status and a message without internals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The machine code (`SESSION_NOT_FOUND`, ...).
    pub code: &'static str,
    /// The HTTP status of the code, decided by [`status_of`] or [`HttpError::status`].
    pub status: StatusCode,
    /// What the client reads.
    pub message: String,
}

impl ApiError {
    /// An error only HTTP has, with a message.
    pub fn http(kind: HttpError, message: impl Into<String>) -> Self {
        ApiError {
            code: kind.code(),
            status: kind.status(),
            message: message.into(),
        }
    }

    /// `INVALID_REQUEST`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidRequest(message.into()).into()
    }

    /// `NOT_FOUND` for an unknown route.
    pub fn not_found(path: &str) -> Self {
        Self::http(HttpError::NotFound, format!("no route for '{path}'"))
    }

    /// The status of this error's code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body: `{"error": {"code": ..., "message": ...}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        if matches!(e, Error::Internal(_) | Error::Database(_)) {
            // The details stay in the log; the client gets the public text.
            tracing::error!(code = e.code(), error = %e, "request failed");
        }
        ApiError {
            code: e.code(),
            status: status_of(&e),
            message: e.public_message(),
        }
    }
}

/// The error body as the OpenAPI document describes it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorDetail {
    /// A stable error code (docs/API.md, "Errors").
    pub code: String,
    /// What went wrong.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code with its status, as the documentation's error table states it.
    fn documented_statuses() -> Vec<(&'static str, u16)> {
        let core = [
            Error::SessionNotFound("s".into()),
            Error::InvalidTool("x".into()),
            Error::ToolExecutionFailed("x".into()),
            Error::ContextTooLarge("x".into()),
            Error::Llm("x".into()),
            Error::Database("x".into()),
            Error::InvalidRequest("x".into()),
            Error::SessionExists("s".into()),
            Error::SessionBusy("s".into()),
            Error::ApprovalNotFound("c".into()),
            Error::ApprovalAlreadyDecided("c".into()),
            Error::ToolCallNotFound("c".into()),
            Error::AgentSwitchLimit("x".into()),
            Error::ShuttingDown("x".into()),
            Error::Internal("x".into()),
        ];
        let core = core.iter().map(|e| (e.code(), status_of(e).as_u16()));
        let http = HttpError::ALL.iter().map(|h| (h.code(), h.status().as_u16()));
        core.chain(http).collect()
    }

    #[test]
    fn every_code_has_its_documented_status() {
        assert_eq!(
            documented_statuses(),
            vec![
                ("SESSION_NOT_FOUND", 404),
                ("INVALID_TOOL", 400),
                ("TOOL_EXECUTION_FAILED", 500),
                ("CONTEXT_TOO_LARGE", 413),
                ("LLM_ERROR", 502),
                ("DATABASE_ERROR", 500),
                ("INVALID_REQUEST", 400),
                ("SESSION_EXISTS", 409),
                ("SESSION_BUSY", 409),
                ("APPROVAL_NOT_FOUND", 404),
                ("APPROVAL_ALREADY_DECIDED", 409),
                ("TOOL_CALL_NOT_FOUND", 404),
                ("AGENT_SWITCH_LIMIT", 409),
                ("SHUTTING_DOWN", 503),
                ("INTERNAL", 500),
                ("UNAUTHORIZED", 401),
                ("PAYLOAD_TOO_LARGE", 413),
                ("NOT_FOUND", 404),
                ("METHOD_NOT_ALLOWED", 405),
            ]
        );
    }

    #[test]
    fn the_reference_states_every_code_with_its_status() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md")).unwrap();
        let missing: Vec<String> = documented_statuses()
            .into_iter()
            .map(|(code, status)| format!("| `{code}` | {status} |"))
            .filter(|row| !doc.contains(row.as_str()))
            .collect();
        assert_eq!(missing, Vec::<String>::new(), "rows missing from docs/API.md");
    }

    #[test]
    fn internal_errors_hide_their_details() {
        let e = ApiError::from(Error::Internal("index out of bounds at x.rs:3".into()));
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {"code": "INTERNAL", "message": "internal error"}})
        );
    }
}
