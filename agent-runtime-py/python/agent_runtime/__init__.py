"""The agent runtime as a Python module.

`Runtime` opens a store (SQLite or Postgres) and a model endpoint (any OpenAI-compatible API) and
gives sessions, the five agents, streamed turns, human approvals and the EventBus. Every event is a
dict shaped like the SSE ``data`` JSON of the HTTP API; every error is an `AgentRuntimeError`
subclass whose ``.code`` is the API's stable code.

    >>> rt = Runtime(database_url="sqlite:///tmp/agent.db", llm_url="http://localhost:8002")
    >>> s = rt.create_session(metadata={"project_path": "/abs/project"})
    >>> for event in rt.send_message(s["session_id"], "Explain src/lib.rs"):
    ...     print(event["type"])
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

from . import _agent_runtime as _native
from ._agent_runtime import (
    Server,
    AgentRuntimeError,
    AgentSwitchLimit,
    ApprovalAlreadyDecided,
    ApprovalNotFound,
    ContextTooLarge,
    DatabaseError,
    EventStream,
    InternalError,
    InvalidRequest,
    InvalidTool,
    LlmError,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    ShuttingDown,
    Subscription,
    ToolCallNotFound,
    ToolExecutionFailed,
)

__version__: str = _native.__version__

__all__ = [
    "Runtime",
    "EventStream",
    "Subscription",
    "AgentRuntimeError",
    "SessionNotFound",
    "InvalidTool",
    "ToolExecutionFailed",
    "ContextTooLarge",
    "LlmError",
    "DatabaseError",
    "InvalidRequest",
    "SessionExists",
    "SessionBusy",
    "ApprovalNotFound",
    "ApprovalAlreadyDecided",
    "ToolCallNotFound",
    "AgentSwitchLimit",
    "ShuttingDown",
    "InternalError",
    "ERRORS_BY_CODE",
    "find_server",
    "Server",
]

#: Every exception class by its stable code (``"SESSION_NOT_FOUND"`` → `SessionNotFound`, ...).
ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (
        SessionNotFound,
        InvalidTool,
        ToolExecutionFailed,
        ContextTooLarge,
        LlmError,
        DatabaseError,
        InvalidRequest,
        SessionExists,
        SessionBusy,
        ApprovalNotFound,
        ApprovalAlreadyDecided,
        ToolCallNotFound,
        AgentSwitchLimit,
        ShuttingDown,
        InternalError,
    )
}

_SERVER_NAME = "agent-runtime-server"


def find_server() -> Optional[str]:
    """The `agent-runtime-server` binary `Runtime.serve` runs, or None if there is none.

    Looked up in order: the ``AGENT_RUNTIME_SERVER`` environment variable, the package's own
    ``bin/`` folder, the folder of the Python executable (a venv's ``bin/``), then ``PATH``.
    """
    explicit = os.environ.get("AGENT_RUNTIME_SERVER")
    if explicit:
        return explicit
    for folder in (Path(__file__).parent / "bin", Path(sys.executable).parent):
        candidate = folder / _SERVER_NAME
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(_SERVER_NAME)


class Runtime(_native.Runtime):
    """The agent runtime: sessions, agents, turns and approvals over one store and one model.

    ``Runtime(database_url="sqlite:///path/agent-runtime.db", llm_url="http://localhost:8002",
    model="gpt-4o-mini", api_key=None, **settings)`` takes the HTTP server's settings (API.md §8)
    as keyword arguments, lower-cased and without the ``AGENT_RUNTIME__`` prefix
    (``max_context_tokens=4000``, ``multi_agent_enabled=False``,
    ``hitl_dangerous_tools=["write_file"]``), with the server's defaults and validation: a bad
    value raises `InvalidRequest` naming the variable; an unknown keyword raises `TypeError`.
    The process environment is not read. ``database_url`` may also be a `pathlib.Path`, meaning a
    SQLite file.
    """

    def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8001,
        *,
        block: bool = True,
        server: Optional[Union[str, os.PathLike]] = None,
    ) -> Union[None, "Server", int, "subprocess.Popen[bytes]"]:
        """Runs the HTTP server (API.md) with this runtime's settings.

        By default the server runs in this process (no binary needed) and shares this runtime's
        database, so use a file or Postgres, not ``sqlite::memory:``. ``port=0`` picks a free
        port. With ``block=True`` (the default) it serves until Ctrl-C, which stops it
        gracefully (running turns end with ``done: cancelled``) and raises `KeyboardInterrupt`.
        With ``block=False`` it returns a `Server` at once: ``.address``, ``.stop()``, ``.wait()``.

        With ``server=`` (a path to an ``agent-runtime-server`` binary, see `find_server`) it
        runs that binary as a child process instead, with these settings as its environment;
        ``block=True`` returns its exit code, ``block=False`` the `subprocess.Popen`.
        """
        if server is None:
            running = self._start_server(host, port)
            if not block:
                return running
            running.wait()
            return None
        binary = os.fspath(server)
        env = dict(os.environ)
        env.update(self.environment())
        env["HOST"] = host
        env["PORT"] = str(port)
        child = subprocess.Popen([binary, "--host", host, "--port", str(port)], env=env)
        if not block:
            return child
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise
