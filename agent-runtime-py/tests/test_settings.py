"""Runtime settings: the server's variables (API.md §8) as keyword arguments; `serve`."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

import agent_runtime

DEFAULTS = {
    "database_url": "sqlite::memory:",
    "llm_url": "http://localhost:8002",
    "model": "gpt-4o-mini",
    "api_key": None,
    "temperature": None,
    "hitl_enabled": True,
    "hitl_dangerous_tools": ["write_file", "delete_file", "execute_command"],
    "max_context_tokens": 8000,
    "max_context_messages": 50,
    "multi_agent_enabled": True,
    "default_agent": "orchestrator",
    "auto_agent_switching": True,
    "max_agent_switches": 10,
    "tool_execution": "runtime",
    "project_roots": [],
    "sandbox": "enforce",
    "sandbox_read_paths": [],
    "sandbox_write_paths": [],
    "sandbox_network_agents": [],
    "command_timeout_secs": 120,
    "mcp_servers_file": None,
    "mcp_tool_timeout_secs": 60,
    "max_turn_iterations": 25,
    "max_tool_output_bytes": 32768,
    "session_lease_secs": 30,
    "routing_timeout_secs": 5,
    "llm_first_byte_timeout_secs": 60,
    "llm_context_tokens": None,
}


def test_nothing_given_means_the_servers_defaults():
    assert agent_runtime.Runtime(database_url="sqlite::memory:").settings == DEFAULTS


def test_keyword_arguments_set_the_variables(tmp_path):
    rt = agent_runtime.Runtime(
        database_url=tmp_path / "x.db",
        llm_url="http://127.0.0.1:9/v1",
        model="m",
        api_key="secret",
        hitl_enabled=False,
        hitl_dangerous_tools=["write_file", "run_command"],
        max_context_tokens=4000,
        multi_agent_enabled=False,
        default_agent="coder",
        max_agent_switches=3,
        tool_execution="client",
        workspace_roots=[str(tmp_path)],  # the earlier name of project_roots
        sandbox="off",
        sandbox_network_agents=["coder"],
        COMMAND_TIMEOUT_SECS=5,
        internal_api_key="k",
    )

    assert rt.settings == {
        **DEFAULTS,
        "database_url": f"sqlite://{tmp_path / 'x.db'}",  # a path means a SQLite file
        "llm_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "api_key": "***",
        "hitl_enabled": False,
        "hitl_dangerous_tools": ["write_file", "run_command"],
        "max_context_tokens": 4000,
        "multi_agent_enabled": False,
        "default_agent": "coder",
        "max_agent_switches": 3,
        "tool_execution": "client",
        "project_roots": [str(tmp_path)],
        "sandbox": "off",
        "sandbox_network_agents": ["coder"],
        "command_timeout_secs": 5,
    }
    assert rt.environment()["AGENT_RUNTIME__MULTI_AGENT_ENABLED"] == "false"
    assert rt.environment()["INTERNAL_API_KEY"] == "k"
    assert "secret" not in repr(rt)


def test_the_model_deadlines_and_context_size_are_keyword_arguments_and_bound_the_window():
    rt = agent_runtime.Runtime(
        database_url="sqlite::memory:",
        routing_timeout_secs=2,
        llm_first_byte_timeout_secs=30,
        llm_context_tokens=4096,
    )

    assert rt.settings == {
        **DEFAULTS,
        "routing_timeout_secs": 2,
        "llm_first_byte_timeout_secs": 30,
        "llm_context_tokens": 4096,
        "max_context_tokens": 3072,  # three quarters of the model's context
    }


@pytest.mark.parametrize(
    "kwargs, variable",
    [
        ({"max_context_tokens": "lots"}, "MAX_CONTEXT_TOKENS"),
        ({"hitl_enabled": "perhaps"}, "HITL_ENABLED"),
        ({"database_url": "mysql://x"}, "DATABASE_URL"),
        ({"tool_execution": "cloud"}, "TOOL_EXECUTION"),
        ({"max_turn_iterations": 0}, "MAX_TURN_ITERATIONS"),
        ({"default_agent": "pirate"}, "AGENT_RUNTIME__DEFAULT_AGENT"),
        ({"llm_url": "ftp://x"}, "LLM_PROXY_URL"),
        ({"max_request_bytes": 0}, "MAX_REQUEST_BYTES"),
    ],
)
def test_a_bad_value_is_invalid_request_naming_the_variable(kwargs, variable):
    kwargs.setdefault("database_url", "sqlite::memory:")
    with pytest.raises(agent_runtime.InvalidRequest) as info:
        agent_runtime.Runtime(**kwargs)
    assert info.value.message.startswith(f"{variable}: "), info.value.message


def test_an_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected setting 'max_contxt_tokens'"):
        agent_runtime.Runtime(database_url="sqlite::memory:", max_contxt_tokens=1)


def test_serve_runs_the_server_binary_with_the_runtimes_settings(tmp_path):
    # A stand-in for agent-runtime-server that records its arguments and environment.
    record = tmp_path / "record.json"
    fake = tmp_path / "agent-runtime-server"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': {{k: v for k, v in os.environ.items()}}}}, open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    rt = agent_runtime.Runtime(database_url=f"sqlite://{tmp_path}/s.db", max_context_tokens=1234, api_key="sk")

    code = rt.serve(host="127.0.0.1", port=8123, server=fake)

    assert code == 0
    seen = json.loads(record.read_text())
    assert seen["argv"] == ["--host", "127.0.0.1", "--port", "8123"]
    env = seen["env"]
    assert (env["HOST"], env["PORT"], env["DATABASE_URL"], env["MAX_CONTEXT_TOKENS"], env["LLM_API_KEY"]) == (
        "127.0.0.1", "8123", f"sqlite://{tmp_path}/s.db", "1234", "sk",
    )


def test_serve_runs_the_http_server_in_process_until_stopped(tmp_path):
    import urllib.request

    rt = agent_runtime.Runtime(database_url=f"sqlite://{tmp_path}/serve.db", internal_api_key="secret-token")
    server = rt.serve(host="127.0.0.1", port=0, block=False)
    try:
        base = f"http://{server.address}"
        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            health = json.loads(r.read())
        assert (health["status"], health["dependencies"]["sqlite"]) == ("degraded", "connected")
        req = urllib.request.Request(
            f"{base}/sessions", data=b'{"session_id": "from-http"}', method="POST",
            headers={"x-internal-auth": "secret-token", "content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 201
    finally:
        server.stop()
    # The same database, seen by the Python runtime.
    assert rt.get_session("from-http")["session_id"] == "from-http"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{server.address}/health", timeout=2)
