//! The one error type of the runtime and its stable machine codes (API.md §1.1).
//! The HTTP status for each code is the server's business, not this crate's.

/// Everything that can go wrong in the runtime, each variant with a stable [`Error::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The session does not exist (or was deleted).
    #[error("session '{0}' not found")]
    SessionNotFound(String),
    /// A tool that does not exist, is not allowed for the agent, or got arguments that fail its schema.
    #[error("{0}")]
    InvalidTool(String),
    /// A tool failed in a way that could not be handed back to the model.
    #[error("{0}")]
    ToolExecutionFailed(String),
    /// The system prompt plus the newest message alone exceed the context window.
    #[error("{0}")]
    ContextTooLarge(String),
    /// The model backend failed (after retries) or answered garbage.
    #[error("{0}")]
    Llm(String),
    /// Storage failed.
    #[error("database error: {0}")]
    Database(String),
    /// Malformed or invalid request: missing or ill-typed fields, unknown message or agent type.
    #[error("{0}")]
    InvalidRequest(String),
    /// A session with this id already exists.
    #[error("session '{0}' already exists")]
    SessionExists(String),
    /// A turn is already running in this session.
    #[error("session '{0}' is busy: a turn is already running")]
    SessionBusy(String),
    /// No approval with that call id in that session.
    #[error("no approval '{0}' in this session")]
    ApprovalNotFound(String),
    /// The approval is no longer pending.
    #[error("approval '{0}' was already decided")]
    ApprovalAlreadyDecided(String),
    /// A tool result for a call that is not open.
    #[error("no open tool call '{0}' in this session")]
    ToolCallNotFound(String),
    /// `MAX_AGENT_SWITCHES` automatic switches were reached in this turn.
    #[error("{0}")]
    AgentSwitchLimit(String),
    /// This process is shutting down (draining): it takes no new turns; another replica, or
    /// this one restarted, does.
    #[error("{0}")]
    ShuttingDown(String),
    /// A bug. The message is for logs; clients see a generic text.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The stable machine code of API.md §1.1, e.g. `SESSION_NOT_FOUND`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::SessionNotFound(_) => "SESSION_NOT_FOUND",
            Error::InvalidTool(_) => "INVALID_TOOL",
            Error::ToolExecutionFailed(_) => "TOOL_EXECUTION_FAILED",
            Error::ContextTooLarge(_) => "CONTEXT_TOO_LARGE",
            Error::Llm(_) => "LLM_ERROR",
            Error::Database(_) => "DATABASE_ERROR",
            Error::InvalidRequest(_) => "INVALID_REQUEST",
            Error::SessionExists(_) => "SESSION_EXISTS",
            Error::SessionBusy(_) => "SESSION_BUSY",
            Error::ApprovalNotFound(_) => "APPROVAL_NOT_FOUND",
            Error::ApprovalAlreadyDecided(_) => "APPROVAL_ALREADY_DECIDED",
            Error::ToolCallNotFound(_) => "TOOL_CALL_NOT_FOUND",
            Error::AgentSwitchLimit(_) => "AGENT_SWITCH_LIMIT",
            Error::ShuttingDown(_) => "SHUTTING_DOWN",
            Error::Internal(_) => "INTERNAL",
        }
    }

    /// The message a client may see: everything but [`Error::Internal`] (whose text stays in logs)
    /// and [`Error::Database`] (whose driver text may carry internals) is shown as is.
    pub fn public_message(&self) -> String {
        match self {
            Error::Internal(_) => "internal error".to_string(),
            Error::Database(_) => "storage failed".to_string(),
            other => other.to_string(),
        }
    }

    /// The full text for whoever runs this process (start-up failures, logs): unlike
    /// [`Error::public_message`] it keeps a storage failure's cause, without the `database
    /// error:` prefix that its code already says.
    pub fn operator_message(&self) -> String {
        match self {
            Error::Database(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// Shorthand for a storage failure from any displayable driver error.
    pub fn database(e: impl std::fmt::Display) -> Self {
        Error::Database(e.to_string())
    }
}

/// `Result` with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_strings() {
        let all = [
            (Error::SessionNotFound("s".into()), "SESSION_NOT_FOUND"),
            (Error::InvalidTool("x".into()), "INVALID_TOOL"),
            (Error::ToolExecutionFailed("x".into()), "TOOL_EXECUTION_FAILED"),
            (Error::ContextTooLarge("x".into()), "CONTEXT_TOO_LARGE"),
            (Error::Llm("x".into()), "LLM_ERROR"),
            (Error::Database("x".into()), "DATABASE_ERROR"),
            (Error::InvalidRequest("x".into()), "INVALID_REQUEST"),
            (Error::SessionExists("s".into()), "SESSION_EXISTS"),
            (Error::SessionBusy("s".into()), "SESSION_BUSY"),
            (Error::ApprovalNotFound("c".into()), "APPROVAL_NOT_FOUND"),
            (
                Error::ApprovalAlreadyDecided("c".into()),
                "APPROVAL_ALREADY_DECIDED",
            ),
            (Error::ToolCallNotFound("c".into()), "TOOL_CALL_NOT_FOUND"),
            (Error::AgentSwitchLimit("x".into()), "AGENT_SWITCH_LIMIT"),
            (Error::ShuttingDown("x".into()), "SHUTTING_DOWN"),
            (Error::Internal("x".into()), "INTERNAL"),
        ];
        for (err, code) in all {
            assert_eq!(err.code(), code);
        }
    }

    #[test]
    fn an_operator_reads_the_storage_cause_that_a_client_does_not() {
        let e = Error::Database("directory /nope does not exist".into());
        assert_eq!(
            (e.public_message(), e.operator_message()),
            (
                "storage failed".to_string(),
                "directory /nope does not exist".to_string()
            )
        );
    }

    #[test]
    fn internal_details_stay_out_of_public_messages() {
        assert_eq!(
            Error::Internal("index out of bounds".into()).public_message(),
            "internal error"
        );
        assert_eq!(
            Error::SessionNotFound("session_456".into()).public_message(),
            "session 'session_456' not found"
        );
    }
}
