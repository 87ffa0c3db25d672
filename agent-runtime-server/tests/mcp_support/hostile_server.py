#!/usr/bin/env python3
"""A hostile MCP server (stdio) for the tests: each tool misbehaves in one way.

hang never answers; garbage answers malformed JSON-RPC; huge answers a 10 MB line; die exits
mid-call; broken is listed with a schema that does not compile; change adds a tool and sends
notifications/tools/list_changed; ok answers "fine"; fail answers isError.
"""
import json
import sys

added = False


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def tools():
    obj = {"type": "object", "properties": {}}
    listed = [
        {"name": n, "description": "hostile " + n, "inputSchema": obj}
        for n in ["hang", "garbage", "huge", "die", "change", "ok", "fail"]
    ]
    listed.append({
        "name": "broken",
        "description": "a schema that does not compile",
        "inputSchema": {"type": "object", "properties": {"x": {"type": "no-such-type"}}},
    })
    listed.append({"name": "bad name!", "description": "", "inputSchema": obj})
    if added:
        listed.append({"name": "added", "description": "appeared later", "inputSchema": obj})
    return listed


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
            "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": "hostile", "version": "1"},
        }})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": tools()}})
    elif method == "tools/call":
        name = msg["params"]["name"]
        if name == "hang":
            pass
        elif name == "garbage":
            sys.stdout.write('{"jsonrpc": "2.0", "id": ' + json.dumps(mid) + ', "result": {oops\n')
            sys.stdout.write("not json at all\n")
            sys.stdout.flush()
        elif name == "huge":
            text = "x" * (10 * 1024 * 1024)
            send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": text}]}})
        elif name == "die":
            sys.exit(3)
        elif name == "change":
            added = True
            send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": "changed"}]}})
        elif name == "fail":
            send({"jsonrpc": "2.0", "id": mid, "result": {
                "content": [{"type": "text", "text": "the tool broke"}], "isError": True}})
        else:
            send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": "fine " + name}]}})
    elif method == "ping":
        send({"jsonrpc": "2.0", "id": mid, "result": {}})
    else:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "no " + str(method)}})
