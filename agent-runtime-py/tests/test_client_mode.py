"""Client execution mode through the Python module's streams: refusals only as tool results,
cancellations first in the new message's stream, and the fields clients of the earlier runtime read."""

from __future__ import annotations

from conftest import strip_seq
from mock_llm import status, text, tool_call


def _client_session(rt):
    return rt.create_session(metadata={"tool_execution": "client"})["session_id"]


def test_a_refused_call_is_streamed_only_as_its_tool_result(rt, llm):
    session = _client_session(rt)
    llm.script(tool_call("write_file", {"path": "notes.md", "content": "x"}, call_id="call_w1"), text("Понятно."))

    events = list(rt.send_message(session, "Запиши заметку", agent_type="ask"))

    message = "the ask agent may not use the tool 'write_file'; its tools are: read_file, search_in_code, list_files"
    assert strip_seq(events) == [
        {"type": "agent_switched", "from_agent": "orchestrator", "to_agent": "ask",
         "reason": "User requested agent switch", "is_final": False},
        {"type": "tool_result", "call_id": "call_w1", "tool_name": "write_file",
         "error": {"code": "INVALID_TOOL", "message": message}, "is_final": False},
        {"type": "assistant_message", "token": "Понятно.", "is_final": False},
        {"type": "assistant_message", "content": "Понятно.", "is_final": True},
        {"type": "done", "stop_reason": "completed", "usage": events[-1]["usage"], "is_final": True},
    ]
    assert list(rt.events(session, after=0)) == events


def test_a_new_message_streams_the_approval_it_cancels_first(rt, llm):
    session = _client_session(rt)
    llm.script(tool_call("write_file", {"path": "notes.md", "content": "x"}, call_id="call_w2"))
    first = list(rt.send_message(session, "Запиши заметку", agent_type="coder"))
    assert [e["type"] for e in first] == ["agent_switched", "tool_call", "done"]
    llm.script(text("Хорошо."))

    second = list(rt.send_message(session, "Не надо"))

    assert strip_seq(second) == [
        {"type": "approval_resolved", "call_id": "call_w2", "decision": "cancel", "is_final": False},
        {"type": "tool_result", "call_id": "call_w2", "tool_name": "write_file",
         "error": {"code": "CANCELLED", "message": "cancelled: the user sent a new message"}, "is_final": False},
        {"type": "assistant_message", "token": "Хорошо.", "is_final": False},
        {"type": "assistant_message", "content": "Хорошо.", "is_final": True},
        {"type": "done", "stop_reason": "completed", "usage": second[-1]["usage"], "is_final": True},
    ]
    assert [e["seq"] for e in first + second] == list(range(1, 9))
    assert list(rt.events(session, after=0)) == first + second


def test_an_error_event_carries_its_message_also_as_content(rt, llm):
    session = _client_session(rt)
    llm.script(status(400))

    events = list(rt.send_message(session, "Q?", agent_type="ask"))

    error = events[1]
    assert error == {"type": "error", "code": "LLM_ERROR", "message": error["message"],
                     "content": error["message"], "seq": 2, "is_final": True}
    assert error["message"]


def test_the_session_list_reports_the_total_of_its_filter(rt):
    ids = {rt.create_session(user_id="carol")["session_id"] for _ in range(3)}
    rt.create_session(user_id="dave")

    first = rt.list_sessions(user_id="carol", limit=2)
    second = rt.list_sessions(user_id="carol", limit=2, cursor=first["next_cursor"])

    assert (len(first["sessions"]), first["total"]) == (2, 3)
    assert (len(second["sessions"]), second["next_cursor"], second["total"]) == (1, None, 3)
    assert {s["session_id"] for s in first["sessions"] + second["sessions"]} == ids
    assert rt.list_sessions(user_id="nobody") == {"sessions": [], "next_cursor": None, "total": 0}
