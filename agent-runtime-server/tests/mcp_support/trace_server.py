#!/usr/bin/env python3
"""An MCP server (stdio) for the telemetry tests: its one tool, whoami, answers with the `_meta`
of the tools/call it received, as JSON text, so the test sees the trace context the runtime sent
(SEP-414: params._meta.traceparent / tracestate).
"""
import json
import sys


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    method = msg.get("method")
    mid = msg.get("id")
    if mid is None:
        continue
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {
            "protocolVersion": msg["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "trace", "version": "1"},
        }})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": [{
            "name": "whoami",
            "description": "answers with the _meta of the call",
            "inputSchema": {"type": "object", "properties": {}},
        }]}})
    elif method == "tools/call":
        meta = msg["params"].get("_meta", {})
        text = json.dumps({"meta": meta})
        send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": text}]}})
    else:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "no such method"}})
