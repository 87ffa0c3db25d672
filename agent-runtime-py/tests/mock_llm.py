"""A mock OpenAI-compatible model server for the tests and the example (standard library only).

`MockLLM` serves ``POST /v1/chat/completions`` on 127.0.0.1 (an ephemeral port) in a thread,
speaking the streaming wire (``data: {chunk}`` lines, then ``data: [DONE]``) with one chunk per
token. Answers come from a queue of scripted responses (`text`, `tool_call`, `route`, `status`) or,
when the queue is empty, from an optional `responder` function of the request. Every request body
is recorded in `requests`.

    with MockLLM() as llm:
        llm.script(route("coder"), text("Готово", ", сделано"))
        rt = agent_runtime.Runtime(database_url=..., llm_url=llm.url)
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Sequence

_ids = itertools.count(1)


@dataclass
class Response:
    """One scripted answer: tokens of text, tool calls, or an HTTP error status."""

    tokens: Sequence[str] = ()
    tool_calls: Sequence[Dict[str, Any]] = ()
    status: int = 200
    body: str = ""
    #: If set, the server sends the first token, then waits for this event before the rest.
    gate: Optional[threading.Event] = None
    #: Set by the server when it has sent the first piece of this response.
    started: threading.Event = field(default_factory=threading.Event)


def text(*tokens: str, gate: Optional[threading.Event] = None) -> Response:
    """An assistant answer streamed as these tokens, one chunk each."""
    return Response(tokens=tokens, gate=gate)


def tool_call(
    name: str, arguments: Dict[str, Any], call_id: Optional[str] = None, *, tokens: Sequence[str] = ()
) -> Response:
    """An answer that calls one tool, after streaming ``tokens`` of text if given."""
    return tool_calls((name, arguments, call_id), tokens=tokens)


def tool_calls(*calls: Any, tokens: Sequence[str] = ()) -> Response:
    """An answer that calls several tools: tuples ``(name, arguments, call_id or None)``."""
    out = []
    for name, arguments, call_id in calls:
        out.append(
            {
                "id": call_id or f"call_mock_{next(_ids)}",
                "name": name,
                "arguments": json.dumps(arguments, ensure_ascii=False),
            }
        )
    return Response(tokens=tokens, tool_calls=out)


def route(agent: str, reason: str = "the request fits this agent") -> Response:
    """The orchestrator's forced ``route`` call choosing ``agent``."""
    return tool_call("route", {"agent": agent, "reason": reason})


def status(code: int, body: str = '{"error": {"message": "mock failure"}}') -> Response:
    """An HTTP error answer (e.g. 400, which the runtime does not retry)."""
    return Response(status=code, body=body)


def _chunk(delta: Dict[str, Any], finish: Optional[str] = None) -> Dict[str, Any]:
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "model": "mock",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


class MockLLM:
    """The server. Use as a context manager, or call `start` / `stop`."""

    def __init__(self, responder: Optional[Callable[[Dict[str, Any]], Response]] = None) -> None:
        self.responder = responder
        self.requests: List[Dict[str, Any]] = []
        self._queue: "queue.Queue[Response]" = queue.Queue()
        self._lock = threading.Lock()
        #: Set whenever a request arrives.
        self.request_arrived = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base URL to give the runtime as ``llm_url``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, *responses: Response) -> None:
        """Queues answers for the next requests, in order."""
        for r in responses:
            self._queue.put(r)

    def pending(self) -> int:
        """Scripted answers not yet used."""
        return self._queue.qsize()

    def start(self) -> "MockLLM":
        """Starts serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "MockLLM":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _next_response(self, request: Dict[str, Any]) -> Response:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            if self.responder is not None:
                return self.responder(request)
            return text("MOCK: no scripted response left")

    def _handler(self) -> type:
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                body = json.dumps({"object": "list", "data": [{"id": "mock", "object": "model"}]})
                self._send(200, body)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                request = json.loads(self.rfile.read(length) or b"{}")
                with mock._lock:
                    mock.requests.append(request)
                mock.request_arrived.set()
                response = mock._next_response(request)
                if response.status != 200:
                    response.started.set()
                    self._send(response.status, response.body)
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                self._event(_chunk({"role": "assistant", "content": None}))
                for i, token in enumerate(response.tokens):
                    self._event(_chunk({"content": token}))
                    if i == 0:
                        response.started.set()
                        if response.gate is not None:
                            response.gate.wait(timeout=60)
                for index, call in enumerate(response.tool_calls):
                    self._event(
                        _chunk(
                            {
                                "tool_calls": [
                                    {
                                        "index": index,
                                        "id": call["id"],
                                        "type": "function",
                                        "function": {"name": call["name"], "arguments": ""},
                                    }
                                ]
                            }
                        )
                    )
                    self._event(
                        _chunk({"tool_calls": [{"index": index, "function": {"arguments": call["arguments"]}}]})
                    )
                response.started.set()
                self._event(_chunk({}, "tool_calls" if response.tool_calls else "stop"))
                if (request.get("stream_options") or {}).get("include_usage"):
                    self._event(
                        {
                            "id": "chatcmpl-mock",
                            "object": "chat.completion.chunk",
                            "choices": [],
                            "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(response.tokens)), "total_tokens": 0},
                        }
                    )
                self._write(b"data: [DONE]\n\n")
                self._write(b"")

            def _event(self, chunk: Dict[str, Any]) -> None:
                self._write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")

            def _write(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _send(self, code: int, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
