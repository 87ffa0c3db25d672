"""Type stubs of the native part of `agent_runtime` (built from agent-runtime-py/src)."""

from os import PathLike
from typing import Any, AsyncIterator, ClassVar, Dict, Iterator, List, Optional, Sequence, Union

__version__: str

JsonValue = Any
Event = Dict[str, Any]
"""An event: the SSE ``data`` JSON of API.md §4 (``type``, ``seq``, ``is_final``, ...)."""

class Server:
    """A running HTTP server (from ``Runtime.serve(block=False)``)."""
    @property
    def address(self) -> str:
        """The bound address, ``host:port``."""
    def stop(self) -> None:
        """Stops gracefully (running turns end with ``done: cancelled``) and waits until it has."""
    def wait(self) -> None:
        """Blocks until the server stops; Ctrl-C stops it and raises `KeyboardInterrupt`."""

class AgentRuntimeError(Exception):
    """Base of every error the runtime raises; ``code`` is the stable code of API.md §1.1."""

    code: ClassVar[str]
    message: str

class SessionNotFound(AgentRuntimeError):
    """The session does not exist (or was deleted)."""

class InvalidTool(AgentRuntimeError):
    """A tool that does not exist or the agent may not use, or arguments that fail its schema."""

class ToolExecutionFailed(AgentRuntimeError):
    """A tool failed in a way the runtime could not hand back to the model."""

class ContextTooLarge(AgentRuntimeError):
    """The system prompt plus the newest message alone exceed ``max_context_tokens``."""

class LlmError(AgentRuntimeError):
    """The model backend failed (after retries) or answered garbage."""

class DatabaseError(AgentRuntimeError):
    """Storage failed."""

class InvalidRequest(AgentRuntimeError):
    """A malformed or invalid request or setting; the message names the field or variable."""

class SessionExists(AgentRuntimeError):
    """A session with the requested ``session_id`` already exists."""

class SessionBusy(AgentRuntimeError):
    """A turn is already running in this session."""

class ApprovalNotFound(AgentRuntimeError):
    """No approval with that ``call_id`` in that session."""

class ApprovalAlreadyDecided(AgentRuntimeError):
    """The approval is no longer pending."""

class ToolCallNotFound(AgentRuntimeError):
    """A tool result for a call that is not open."""

class AgentSwitchLimit(AgentRuntimeError):
    """``max_agent_switches`` automatic switches were reached in one turn."""

class ShuttingDown(AgentRuntimeError):
    """The runtime is draining (``drain``): it takes no new turns."""

class InternalError(AgentRuntimeError):
    """A bug in the runtime; the message carries no internals."""

class EventStream:
    """A turn's events (or a replay); ``for`` blocks with the GIL released, ``async for`` awaits.

    Ends after ``done``. Dropping or closing it never cancels the turn.
    """

    def __iter__(self) -> Iterator[Event]: ...
    def __next__(self) -> Event: ...
    def __aiter__(self) -> AsyncIterator[Event]: ...
    async def __anext__(self) -> Event: ...
    def close(self) -> None:
        """Stops reading: iteration ends after what is already buffered. The turn goes on."""
    def collect(self) -> List[Event]:
        """Reads the stream to its end and returns every event."""

class Subscription:
    """EventBus notifications ``{"kind", "session_id", "at", "data"}``; never ends on its own."""

    def __iter__(self) -> Iterator[Dict[str, Any]]: ...
    def __next__(self) -> Dict[str, Any]: ...
    def __aiter__(self) -> AsyncIterator[Dict[str, Any]]: ...
    async def __anext__(self) -> Dict[str, Any]: ...
    def next(self, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """The next notification, or None if none arrives within ``timeout`` seconds."""
    def close(self) -> None:
        """Stops the subscription; iteration ends after what is already buffered."""

class Runtime:
    """Sessions, agents, turns and approvals over one store and one model (see `agent_runtime.Runtime`)."""

    def __init__(
        self,
        database_url: Optional[Union[str, PathLike[str]]] = None,
        llm_url: Optional[str] = None,
        model: Optional[str] = None,
        api_key: Optional[str] = None,
        **settings: Union[str, int, float, bool, Sequence[str], PathLike[str], Dict[str, Any], None],
    ) -> None:
        """Settings as keyword arguments (API.md settings, lower-cased). MCP servers come from
        `mcp_servers_file="/path/mcp.json"` or `mcp_servers={"fs": {"command": "node", "args": [...]}}`
        (the file's `mcpServers` object, with `agents`, `tools`, `deny`, `approval`, `tool_approval`)."""
    @property
    def settings(self) -> Dict[str, Any]:
        """The settings in force (defaults filled in), keyed like the keyword arguments."""
    def environment(self) -> Dict[str, str]:
        """The constructor's settings as API.md §8 environment variables."""
    def _start_server(self, host: str, port: int) -> Server:
        """Starts the HTTP server in this process (use `agent_runtime.Runtime.serve`)."""
    def create_session(
        self,
        user_id: Optional[str] = None,
        metadata: Optional[Dict[str, JsonValue]] = None,
        session_id: Optional[str] = None,
        budget: Optional[Dict[str, Optional[float]]] = None,
    ) -> Dict[str, Any]:
        """Creates a session on the default agent; returns it as ``get_session`` does.
        ``budget``: ``session_tokens``, ``session_cost``, ``turn_tokens``, ``turn_cost``,
        ``turn_time_secs``, ``turn_tool_calls`` over the settings' defaults (``None``: unlimited)."""
    def get_session(self, session_id: str) -> Dict[str, Any]:
        """``session_id``, ``user_id``, ``created_at``, ``last_activity``, ``metadata``,
        ``current_agent``, ``message_count``, ``status``, and ``budget`` when it has one."""
    def list_sessions(
        self, user_id: Optional[str] = None, limit: int = 100, cursor: Optional[str] = None
    ) -> Dict[str, Any]:
        """``{"sessions": [...], "next_cursor": str | None, "total": int}``, newest activity first."""
    def delete_session(self, session_id: str) -> None:
        """Deletes a session and everything of it, cancelling its running turn first."""
    def messages(
        self, session_id: str, after: int = 0, limit: Optional[int] = None
    ) -> List[Dict[str, Any]]:
        """The stored conversation, oldest first (every message when ``limit`` is None)."""
    def agents(self) -> List[Dict[str, Any]]:
        """The agents as ``GET /agents`` lists them."""
    def current_agent(self, session_id: str) -> Dict[str, Any]:
        """``current_agent``, ``previous_agent``, ``switch_count``, ``switch_history``."""
    def pending_approvals(self, session_id: str) -> List[Dict[str, Any]]:
        """Pending approvals, oldest first (``call_id``, ``tool_name``, ``arguments``, ...)."""
    def usage(self, session_id: str) -> Dict[str, int]:
        """``{"prompt_tokens", "completion_tokens"}`` over every turn of the session."""
    def budget_usage(self, session_id: str) -> Dict[str, Any]:
        """Tokens, ``cost`` (``None`` without a price; ``cost_unavailable`` says why), ``budget``,
        ``spent`` and ``remaining``, as ``GET /sessions/{id}/usage``."""
    def set_budget(self, session_id: str, budget: Dict[str, Optional[float]]) -> Dict[str, Any]:
        """Sets the named budgets (``None``: unlimited), keeps the others; returns the session.
        Raises ``InvalidRequest`` naming a bad key or value."""
    def send_message(
        self,
        session_id: str,
        content: str,
        agent_type: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> EventStream:
        """Sends the user's message; returns the turn's events."""
    def switch_agent(
        self,
        session_id: str,
        agent_type: str,
        content: Optional[str] = None,
        reason: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> EventStream:
        """Explicit switch; with ``content`` runs a turn on the new agent."""
    def decide(
        self,
        session_id: str,
        call_id: str,
        decision: str,
        modified_arguments: Optional[Dict[str, JsonValue]] = None,
        feedback: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> EventStream:
        """``approve`` / ``edit`` / ``reject`` a pending approval; the stream continues the turn."""
    def submit_tool_result(
        self,
        session_id: str,
        call_id: str,
        result: JsonValue = None,
        error: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> EventStream:
        """The client's result of a tool it executed (client execution mode)."""
    def events(
        self, session_id: str, after: Optional[int] = None, follow: bool = False
    ) -> EventStream:
        """Replays persisted events after ``after``, then follows the running turn."""
    def cancel(self, session_id: str) -> str:
        """Cancels the running or paused turn: ``"cancelled"`` or ``"idle"``."""
    def subscribe(
        self, kinds: Optional[Sequence[str]] = None, session_id: Optional[str] = None
    ) -> Subscription:
        """EventBus notifications (``approval.requested``, ``turn.completed``, ...)."""
    def drain(self, timeout: float = 10.0) -> Dict[str, int]:
        """Drains for a restart: no new turn (``ShuttingDown``); running turns are handed over at
        their next step boundary for another runtime on the same database to resume
        (``turn_resumed``); streams end. ``{"handed_over": n, "still_running": m}``."""
    def shutdown(self, grace: float = 10.0) -> None:
        """Stops every turn running in this process (each ends with ``done``, ``cancelled``)."""
