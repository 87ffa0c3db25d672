//! The exception hierarchy of `agent_runtime`: `AgentRuntimeError` and one subclass per stable
//! error code of API.md §1.1, each carrying `.code` and `.message`.

use agent_runtime_core::Error;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyType;

pyo3::create_exception!(
    agent_runtime,
    AgentRuntimeError,
    PyException,
    "Base of every error the runtime raises. `.code` is the stable code of API.md (e.g. \
     `SESSION_NOT_FOUND`), `.message` the human-readable text."
);

macro_rules! subclasses {
    ($($name:ident => $code:literal : $doc:literal),* $(,)?) => {
        $(pyo3::create_exception!(agent_runtime, $name, AgentRuntimeError, $doc);)*

        /// Every subclass with its code, for registration in the module.
        fn subclasses(py: Python<'_>) -> Vec<(Bound<'_, PyType>, &'static str)> {
            vec![$((py.get_type::<$name>(), $code)),*]
        }
    };
}

subclasses! {
    SessionNotFound => "SESSION_NOT_FOUND": "The session does not exist (or was deleted).",
    InvalidTool => "INVALID_TOOL": "A tool that does not exist or that the agent may not use, or arguments that fail its schema (e.g. an `edit` decision that would escalate).",
    ToolExecutionFailed => "TOOL_EXECUTION_FAILED": "A tool failed in a way the runtime could not hand back to the model.",
    ContextTooLarge => "CONTEXT_TOO_LARGE": "The system prompt plus the newest message alone exceed `max_context_tokens`.",
    LlmError => "LLM_ERROR": "The model backend failed (after retries) or answered garbage.",
    DatabaseError => "DATABASE_ERROR": "Storage failed.",
    InvalidRequest => "INVALID_REQUEST": "A malformed or invalid request or setting: the message names the field or the variable.",
    SessionExists => "SESSION_EXISTS": "A session with the requested `session_id` already exists.",
    SessionBusy => "SESSION_BUSY": "A turn is already running in this session.",
    ApprovalNotFound => "APPROVAL_NOT_FOUND": "No approval with that `call_id` in that session.",
    ApprovalAlreadyDecided => "APPROVAL_ALREADY_DECIDED": "The approval is no longer pending.",
    ToolCallNotFound => "TOOL_CALL_NOT_FOUND": "A tool result for a call that is not open.",
    AgentSwitchLimit => "AGENT_SWITCH_LIMIT": "`max_agent_switches` automatic switches were reached in one turn.",
    ShuttingDown => "SHUTTING_DOWN": "The runtime is draining (`drain`): it takes no new turns.",
    InternalError => "INTERNAL": "A bug in the runtime; the message carries no internals.",
}

/// Adds the exception classes to the module and gives each class its `code` attribute.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let base = py.get_type::<AgentRuntimeError>();
    base.setattr("code", "AGENT_RUNTIME_ERROR")?;
    m.add("AgentRuntimeError", base)?;
    for (class, code) in subclasses(py) {
        class.setattr("code", code)?;
        m.add(class.name()?, class)?;
    }
    Ok(())
}

/// Builds the Python exception for a core error: one arm per code, so a new code added to the
/// core fails to compile here until it has its class.
///
/// The message is the full text (driver details of a `DATABASE_ERROR` included): unlike an HTTP
/// client, the Python caller is the process that owns the runtime and needs them to act.
pub fn to_py(error: Error) -> PyErr {
    let code = error.code();
    let message = error.to_string();
    let err = match error {
        Error::SessionNotFound(_) => SessionNotFound::new_err(message.clone()),
        Error::InvalidTool(_) => InvalidTool::new_err(message.clone()),
        Error::ToolExecutionFailed(_) => ToolExecutionFailed::new_err(message.clone()),
        Error::ContextTooLarge(_) => ContextTooLarge::new_err(message.clone()),
        Error::Llm(_) => LlmError::new_err(message.clone()),
        Error::Database(_) => DatabaseError::new_err(message.clone()),
        Error::InvalidRequest(_) => InvalidRequest::new_err(message.clone()),
        Error::SessionExists(_) => SessionExists::new_err(message.clone()),
        Error::SessionBusy(_) => SessionBusy::new_err(message.clone()),
        Error::ApprovalNotFound(_) => ApprovalNotFound::new_err(message.clone()),
        Error::ApprovalAlreadyDecided(_) => ApprovalAlreadyDecided::new_err(message.clone()),
        Error::ToolCallNotFound(_) => ToolCallNotFound::new_err(message.clone()),
        Error::AgentSwitchLimit(_) => AgentSwitchLimit::new_err(message.clone()),
        Error::ShuttingDown(_) => ShuttingDown::new_err(message.clone()),
        Error::Internal(_) => InternalError::new_err(message.clone()),
    };
    Python::attach(|py| {
        let value = err.value(py);
        // Setting attributes on a fresh exception instance cannot fail short of memory
        // exhaustion; if it does, the exception still carries its class and message.
        let _ = value.setattr("code", code);
        let _ = value.setattr("message", message);
    });
    err
}

/// `Result<T, core::Error>` → `PyResult<T>`.
pub trait IntoPyResult<T> {
    /// Converts the error into its Python exception.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for agent_runtime_core::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
