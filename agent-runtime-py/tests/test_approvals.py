"""Human approvals through the Python module: approve, edit, reject, and a decision after restart."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import agent_runtime
from conftest import strip_seq
from mock_llm import route, text, tool_call


def _pause_on_write(rt, llm, session, arguments):
    """Runs a routed turn that stops for approval of write_file(arguments); the call id."""
    llm.script(route("coder"), tool_call("write_file", arguments, call_id="call_w1"))
    events = list(rt.send_message(session, "Создай файл"))
    assert strip_seq(events[1:]) == [
        {"type": "tool_call", "call_id": "call_w1", "tool_name": "write_file", "arguments": arguments,
         "requires_approval": True, "reason": "File modification requires approval", "is_final": False},
        {"type": "done", "stop_reason": "awaiting_approval", "usage": {"prompt_tokens": 20, "completion_tokens": 2}, "is_final": True},
    ]
    return "call_w1"


def test_approve_executes_the_call_and_the_turn_continues(rt, llm, session, project):
    call = _pause_on_write(rt, llm, session, {"path": "src/a.txt", "content": "hello"})
    pending = rt.pending_approvals(session)
    assert [(p["call_id"], p["tool_name"], p["arguments"], p["request_type"], p["status"]) for p in pending] == [
        (call, "write_file", {"path": "src/a.txt", "content": "hello"}, "tool", "pending")
    ]
    assert rt.get_session(session)["status"] == "awaiting_approval"
    llm.script(text("Записал"))

    events = list(rt.decide(session, call, "approve"))

    assert strip_seq(events) == [
        {"type": "approval_resolved", "call_id": call, "decision": "approve", "is_final": False},
        {"type": "tool_result", "call_id": call, "tool_name": "write_file", "result": {"bytes_written": 5, "path": "src/a.txt"}, "is_final": False},
        {"type": "assistant_message", "token": "Записал", "is_final": False},
        {"type": "assistant_message", "content": "Записал", "is_final": True},
        {"type": "done", "stop_reason": "completed", "usage": {"prompt_tokens": 30, "completion_tokens": 3}, "is_final": True},  # the whole turn
    ]
    assert (project / "src" / "a.txt").read_text() == "hello"
    assert rt.pending_approvals(session) == []
    assert rt.get_session(session)["status"] == "idle"


def test_edit_runs_the_modified_arguments(rt, llm, session, project):
    call = _pause_on_write(rt, llm, session, {"path": "a.txt", "content": "proposed"})
    llm.script(text("ok"))

    events = list(rt.decide(session, call, "edit", modified_arguments={"path": "b.txt", "content": "edited"}))

    assert events[0]["decision"] == "edit"
    assert events[1]["result"] == {"bytes_written": 6, "path": "b.txt"}
    assert (project / "b.txt").read_text() == "edited"
    assert not (project / "a.txt").exists()


def test_an_edit_that_escapes_the_project_is_invalid_tool_and_stays_pending(rt, llm, session, project):
    call = _pause_on_write(rt, llm, session, {"path": "a.txt", "content": "x"})

    try:
        rt.decide(session, call, "edit", modified_arguments={"path": "../outside.txt", "content": "x"})
        raise AssertionError("the edit was accepted")
    except agent_runtime.InvalidTool as e:
        assert e.code == "INVALID_TOOL"

    assert [p["status"] for p in rt.pending_approvals(session)] == ["pending"]
    assert not (project.parent / "outside.txt").exists()


def test_reject_tells_the_model_with_the_feedback(rt, llm, session, project):
    call = _pause_on_write(rt, llm, session, {"path": "a.txt", "content": "x"})
    llm.script(text("Понял"))

    events = list(rt.decide(session, call, "reject", feedback="не трогай этот файл"))

    assert events[0] == {"type": "approval_resolved", "call_id": call, "decision": "reject", "is_final": False, "seq": events[0]["seq"]}
    assert events[1]["type"] == "tool_result" and "error" in events[1]
    assert events[-1]["stop_reason"] == "completed"
    assert not (project / "a.txt").exists()
    tool_message = [m for m in llm.requests[-1]["messages"] if m["role"] == "tool"][-1]
    assert "не трогай этот файл" in tool_message["content"]


def test_a_new_runtime_on_the_same_sqlite_file_continues_the_paused_turn(llm, db_url, project):
    # The first runtime lives in another process that exits once the turn awaits approval.
    llm.script(route("coder"), tool_call("write_file", {"path": "after-restart.txt", "content": "durable"}, call_id="call_w1"))
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import agent_runtime
            rt = agent_runtime.Runtime(database_url={db_url!r}, llm_url={llm.url!r})
            sid = rt.create_session(metadata={{"project_path": {str(project)!r}}})["session_id"]
            events = list(rt.send_message(sid, "Создай файл"))
            assert events[-1]["stop_reason"] == "awaiting_approval", events
            print(sid)
        """)],
        capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == 0, child.stderr
    session = child.stdout.strip()

    second = agent_runtime.Runtime(database_url=db_url, llm_url=llm.url)
    pending = second.pending_approvals(session)
    assert [(p["call_id"], p["arguments"]) for p in pending] == [("call_w1", {"path": "after-restart.txt", "content": "durable"})]
    llm.script(text("Готово"))
    events = list(second.decide(session, "call_w1", "approve"))

    assert [e["type"] for e in events] == ["approval_resolved", "tool_result", "assistant_message", "assistant_message", "done"]
    assert [e["seq"] for e in events] == [4, 5, 6, 7, 8]
    assert events[-1]["stop_reason"] == "completed"
    assert (project / "after-restart.txt").read_text() == "durable"
    assert [m["role"] for m in second.messages(session)] == ["user", "assistant", "tool", "assistant"]


def test_the_event_bus_reports_the_approval_request(rt, llm, session):
    sub = rt.subscribe(kinds=["approval.requested"], session_id=session)
    call = _pause_on_write(rt, llm, session, {"path": "a.txt", "content": "x"})

    note = sub.next(timeout=30)

    assert note is not None
    assert (note["kind"], note["session_id"], note["data"]["call_id"]) == ("approval.requested", session, call)
    sub.close()
    assert list(sub) == []


def test_client_execution_mode_continues_with_the_clients_tool_result(rt, llm):
    session = rt.create_session(metadata={"tool_execution": "client"})["session_id"]
    llm.script(route("ask"), tool_call("read_file", {"path": "README.md"}, call_id="call_r1"))
    events = list(rt.send_message(session, "Что в README?"))
    assert events[-1]["stop_reason"] == "awaiting_tool_result"
    llm.script(text("Там описание"))

    events = list(rt.submit_tool_result(session, "call_r1", result={"content": "# Hello"}))

    assert events[-1]["stop_reason"] == "completed"
    tool_message = [m for m in llm.requests[-1]["messages"] if m["role"] == "tool"][-1]
    assert "# Hello" in tool_message["content"]
