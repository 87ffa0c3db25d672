"""MCP servers through the Python module: `mcp_servers=` and `mcp_servers_file=` start the reference
filesystem server (npm, installed by .ci/run) and its tools answer in a turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import agent_runtime
from conftest import strip_seq
from mock_llm import route, text, tool_call

NODE_MODULES = Path(__file__).resolve().parents[2] / "agent-runtime-server" / "mcp-tests" / "node_modules"
FS_SERVER = NODE_MODULES / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"


def _fs_server(project: Path) -> dict:
    assert FS_SERVER.exists(), (
        f"the MCP test servers are not installed at {NODE_MODULES}: "
        "run `npm ci --prefix agent-runtime-server/mcp-tests` (as .ci/run does)"
    )
    return {"command": "node", "args": [str(FS_SERVER), str(project)], "agents": ["coder"],
            "approval": "never"}


@pytest.mark.parametrize("given_as", ["mcp_servers", "mcp_servers_file"])
def test_the_coder_reads_through_an_mcp_server_given_as_a_dict_or_a_file(llm, db_url, project, tmp_path, given_as):
    (project / "notes.txt").write_text("hello from python")
    servers = {"fs": _fs_server(project)}
    if given_as == "mcp_servers":
        rt = agent_runtime.Runtime(database_url=db_url, llm_url=llm.url, model="m", mcp_servers=servers)
    else:
        path = tmp_path / "mcp.json"
        path.write_text(json.dumps({"mcpServers": servers}))
        rt = agent_runtime.Runtime(database_url=db_url, llm_url=llm.url, model="m", mcp_servers_file=str(path))
        assert rt.settings["mcp_servers_file"] == str(path)
    session = rt.create_session(user_id="u", metadata={"project_path": str(project)})["session_id"]
    notes = str(project / "notes.txt")
    llm.script(route("coder"), tool_call("fs__read_text_file", {"path": notes}, call_id="call_m1"), text("Прочитал"))

    events = strip_seq(list(rt.send_message(session, "Прочитай заметки")))

    results = [e for e in events if e["type"] == "tool_result"]
    assert results == [
        {"type": "tool_result", "call_id": "call_m1", "tool_name": "fs__read_text_file",
         "result": {"text": "hello from python", "structured_content": {"content": "hello from python"}},
         "is_final": False},
    ]
    coder = [a for a in rt.agents() if a["type"] == "coder"][0]
    assert "fs__read_text_file" in coder["tools"]


def test_an_unknown_key_in_mcp_servers_is_refused_by_name():
    with pytest.raises(agent_runtime.InvalidRequest) as e:
        agent_runtime.Runtime(database_url="sqlite::memory:", mcp_servers={"fs": {"command": "x", "agnets": []}})
    assert "unknown field `agnets`" in str(e.value)
