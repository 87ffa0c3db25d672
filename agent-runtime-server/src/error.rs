//! The one JSON error shape of the API and the one table from error codes to HTTP statuses.
//! The core knows codes only; which status a code gets is decided here and nowhere else.

use agent_runtime_core::Error;
use hyper::StatusCode;
use serde::Serialize;

/// The HTTP status of every error code of API.md §1.1 (unknown codes are 500).
pub fn status_for(code: &str) -> StatusCode {
    match code {
        "SESSION_NOT_FOUND" | "APPROVAL_NOT_FOUND" | "TOOL_CALL_NOT_FOUND" | "NOT_FOUND" => {
            StatusCode::NOT_FOUND
        }
        "INVALID_TOOL" | "INVALID_REQUEST" => StatusCode::BAD_REQUEST,
        "CONTEXT_TOO_LARGE" | "PAYLOAD_TOO_LARGE" => StatusCode::PAYLOAD_TOO_LARGE,
        "LLM_ERROR" => StatusCode::BAD_GATEWAY,
        "UNAUTHORIZED" => StatusCode::UNAUTHORIZED,
        "SESSION_EXISTS" | "SESSION_BUSY" | "APPROVAL_ALREADY_DECIDED" | "AGENT_SWITCH_LIMIT" => {
            StatusCode::CONFLICT
        }
        "METHOD_NOT_ALLOWED" => StatusCode::METHOD_NOT_ALLOWED,
        // TOOL_EXECUTION_FAILED, DATABASE_ERROR, INTERNAL and anything new.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error on its way to the client: a stable code and a message without internals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The machine code (`SESSION_NOT_FOUND`, ...).
    pub code: &'static str,
    /// What the client reads.
    pub message: String,
}

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// `INVALID_REQUEST`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("INVALID_REQUEST", message)
    }

    /// `NOT_FOUND` for an unknown route.
    pub fn not_found(path: &str) -> Self {
        Self::new("NOT_FOUND", format!("no route for '{path}'"))
    }

    /// The status of this error's code.
    pub fn status(&self) -> StatusCode {
        status_for(self.code)
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
        ApiError::new(e.code(), e.public_message())
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
    /// A code of API.md §1.1.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_code_has_its_documented_status() {
        let table = [
            ("SESSION_NOT_FOUND", 404),
            ("INVALID_TOOL", 400),
            ("TOOL_EXECUTION_FAILED", 500),
            ("CONTEXT_TOO_LARGE", 413),
            ("LLM_ERROR", 502),
            ("DATABASE_ERROR", 500),
            ("UNAUTHORIZED", 401),
            ("INVALID_REQUEST", 400),
            ("PAYLOAD_TOO_LARGE", 413),
            ("SESSION_EXISTS", 409),
            ("SESSION_BUSY", 409),
            ("APPROVAL_NOT_FOUND", 404),
            ("APPROVAL_ALREADY_DECIDED", 409),
            ("TOOL_CALL_NOT_FOUND", 404),
            ("AGENT_SWITCH_LIMIT", 409),
            ("NOT_FOUND", 404),
            ("METHOD_NOT_ALLOWED", 405),
            ("INTERNAL", 500),
        ];
        let got: Vec<(&str, u16)> = table.iter().map(|(c, _)| (*c, status_for(c).as_u16())).collect();
        assert_eq!(got, table.to_vec());
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
