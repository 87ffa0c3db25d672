"""Errors: one exception class per stable code, raised before the stream or streamed as events."""

from __future__ import annotations

import threading

import pytest

import agent_runtime
from agent_runtime import AgentRuntimeError
from mock_llm import route, status, text, tool_call

CODES = {
    "SESSION_NOT_FOUND": agent_runtime.SessionNotFound,
    "INVALID_TOOL": agent_runtime.InvalidTool,
    "TOOL_EXECUTION_FAILED": agent_runtime.ToolExecutionFailed,
    "CONTEXT_TOO_LARGE": agent_runtime.ContextTooLarge,
    "LLM_ERROR": agent_runtime.LlmError,
    "DATABASE_ERROR": agent_runtime.DatabaseError,
    "INVALID_REQUEST": agent_runtime.InvalidRequest,
    "SESSION_EXISTS": agent_runtime.SessionExists,
    "SESSION_BUSY": agent_runtime.SessionBusy,
    "APPROVAL_NOT_FOUND": agent_runtime.ApprovalNotFound,
    "APPROVAL_ALREADY_DECIDED": agent_runtime.ApprovalAlreadyDecided,
    "TOOL_CALL_NOT_FOUND": agent_runtime.ToolCallNotFound,
    "AGENT_SWITCH_LIMIT": agent_runtime.AgentSwitchLimit,
    "SHUTTING_DOWN": agent_runtime.ShuttingDown,
    "INTERNAL": agent_runtime.InternalError,
}


def test_every_code_has_its_own_subclass_of_agent_runtime_error():
    assert agent_runtime.ERRORS_BY_CODE == CODES
    for code, cls in CODES.items():
        assert issubclass(cls, AgentRuntimeError) and cls is not AgentRuntimeError
        assert cls.code == code
        assert cls.__module__ == "agent_runtime"
        assert cls.__doc__


def _raises(cls, fn, *args, **kwargs):
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    assert info.value.code == cls.code
    assert info.value.message == str(info.value)
    return info.value


def test_session_not_found(rt):
    e = _raises(agent_runtime.SessionNotFound, rt.get_session, "missing")
    assert e.message == "session 'missing' not found"
    _raises(agent_runtime.SessionNotFound, rt.send_message, "missing", "hi")
    _raises(agent_runtime.SessionNotFound, rt.pending_approvals, "missing")
    _raises(agent_runtime.SessionNotFound, rt.delete_session, "missing")


def test_session_exists(rt):
    rt.create_session(session_id="taken")
    _raises(agent_runtime.SessionExists, rt.create_session, session_id="taken")


def test_invalid_request(rt, tmp_path):
    _raises(agent_runtime.InvalidRequest, rt.create_session, session_id="bad id with spaces")
    _raises(agent_runtime.InvalidRequest, rt.create_session, metadata={"project_path": "relative/path"})
    _raises(agent_runtime.InvalidRequest, rt.create_session, metadata={"project_path": str(tmp_path / "absent")})
    _raises(agent_runtime.InvalidRequest, rt.list_sessions, limit=0)
    session = rt.create_session()["session_id"]
    _raises(agent_runtime.InvalidRequest, rt.switch_agent, session, "pirate")
    _raises(agent_runtime.InvalidRequest, rt.subscribe, kinds=["no.such.kind"])
    assert rt.list_sessions()["sessions"][0]["session_id"] == session  # nothing else was created


def test_context_too_large_is_raised_before_the_stream(llm, db_url):
    rt = agent_runtime.Runtime(database_url=db_url, llm_url=llm.url, max_context_tokens=50)
    session = rt.create_session()["session_id"]

    _raises(agent_runtime.ContextTooLarge, rt.send_message, session, "слово " * 200)

    assert rt.messages(session) == []
    assert llm.requests == []


def test_session_busy_while_a_turn_streams(rt, llm, session):
    gate = threading.Event()
    answer = text("one", " two", gate=gate)
    llm.script(route("ask"), answer)
    stream = rt.send_message(session, "Q?")
    assert answer.started.wait(30)

    _raises(agent_runtime.SessionBusy, rt.send_message, session, "another")

    gate.set()
    assert list(stream)[-1]["stop_reason"] == "completed"


def test_approval_not_found_and_already_decided(rt, llm, session):
    _raises(agent_runtime.ApprovalNotFound, rt.decide, session, "call_nope", "approve")
    llm.script(route("coder"), tool_call("write_file", {"path": "a.txt", "content": "x"}, call_id="call_1"), text("ok"))
    list(rt.send_message(session, "Создай файл"))
    list(rt.decide(session, "call_1", "approve"))

    _raises(agent_runtime.ApprovalAlreadyDecided, rt.decide, session, "call_1", "reject")


def test_tool_call_not_found(rt, session):
    _raises(agent_runtime.ToolCallNotFound, rt.submit_tool_result, session, "call_nope", result="x")


def test_database_error_when_the_store_cannot_open(tmp_path):
    e = _raises(agent_runtime.DatabaseError, agent_runtime.Runtime, database_url=f"sqlite://{tmp_path}/no/such/dir/x.db")
    assert "database error" in e.message


def test_llm_and_switch_limit_failures_arrive_as_error_events_then_done(llm, db_url):
    rt = agent_runtime.Runtime(database_url=db_url, llm_url=llm.url, max_agent_switches=0)
    session = rt.create_session()["session_id"]
    llm.script(route("coder"))
    events = list(rt.send_message(session, "Создай виджет"))
    assert [(e["type"], e.get("code")) for e in events] == [("error", "AGENT_SWITCH_LIMIT"), ("done", None)]
    assert agent_runtime.ERRORS_BY_CODE[events[0]["code"]] is agent_runtime.AgentSwitchLimit

    llm.script(status(400))
    events = list(rt.send_message(session, "Q?", agent_type="ask"))
    assert [(e["type"], e.get("code")) for e in events] == [("agent_switched", None), ("error", "LLM_ERROR"), ("done", None)]
    assert events[-1]["stop_reason"] == "error"
    assert agent_runtime.ERRORS_BY_CODE[events[1]["code"]] is agent_runtime.LlmError


def test_metadata_that_is_not_json_is_a_type_error(rt):
    with pytest.raises(TypeError, match="metadata: set is not JSON-serializable"):
        rt.create_session(metadata={"tags": {1, 2}})
    assert rt.list_sessions()["sessions"] == []


def test_a_drained_runtime_refuses_new_turns_with_shutting_down(rt):
    session = rt.create_session()["session_id"]
    assert rt.drain(timeout=1.0) == {"handed_over": 0, "still_running": 0}
    e = _raises(agent_runtime.ShuttingDown, rt.send_message, session, "hi")
    assert e.message.startswith("this server is shutting down and takes no new turns")
