"""Budgets through the Python module: a tool-call budget trips at its limit, a raise resumes the same
turn, a rejected raise closes it, set_budget validates, budget_usage reports spent and remaining."""

from __future__ import annotations

import agent_runtime
import pytest
from conftest import strip_seq
from mock_llm import text, tool_call


@pytest.fixture
def coder(llm, db_url):
    """A Runtime whose sessions start on the coder (no routing call)."""
    return agent_runtime.Runtime(database_url=db_url, llm_url=llm.url, model="mock-model", default_agent="coder")


def _trip(rt, llm, project, budget):
    """A session with ``budget`` whose turn read a.txt and stopped before reading b.txt."""
    (project / "a.txt").write_text("A")
    (project / "b.txt").write_text("B")
    session = rt.create_session(metadata={"project_path": str(project)}, budget=budget)["session_id"]
    llm.script(
        tool_call("read_file", {"path": "a.txt"}, call_id="call_a"),
        tool_call("read_file", {"path": "b.txt"}, call_id="call_b"),
        text("Both", " read."),
    )
    events = list(rt.send_message(session, "Read a and b"))
    kinds = [e["type"] for e in events if not (e["type"] == "assistant_message" and not e["is_final"])]
    assert kinds == ["tool_call", "tool_result", "budget_exceeded", "done"]
    assert events[-1]["stop_reason"] == "budget_exceeded"
    return session, events


def test_a_tool_call_budget_trips_at_its_limit_and_approve_resumes_the_same_turn(coder, llm, project):
    session, events = _trip(coder, llm, project, {"turn_tool_calls": 1})
    exceeded = events[2]
    call_id = exceeded["call_id"]
    assert {k: v for k, v in exceeded.items() if k not in ("seq", "reason")} == {
        "type": "budget_exceeded", "call_id": call_id, "budget": "turn_tool_calls",
        "spent": 1, "limit": 1, "proposed_limit": 2, "is_final": False,
    }
    assert events[-1]["usage"]["remaining"] == {"turn_tool_calls": 0}
    pending = coder.pending_approvals(session)
    assert [(p["call_id"], p["tool_name"], p["request_type"], p["arguments"]) for p in pending] == [
        (call_id, "raise_budget", "budget", {"budget": "turn_tool_calls", "spent": 1, "limit": 1, "proposed_limit": 2})
    ]
    assert coder.get_session(session)["status"] == "awaiting_approval"

    resumed = list(coder.decide(session, call_id, "approve"))

    assert strip_seq(resumed[:3]) == [
        {"type": "approval_resolved", "call_id": call_id, "decision": "approve", "is_final": False},
        {"type": "tool_call", "call_id": "call_b", "tool_name": "read_file", "arguments": {"path": "b.txt"},
         "requires_approval": False, "is_final": False},
        {"type": "tool_result", "call_id": "call_b", "tool_name": "read_file", "result": resumed[2]["result"], "is_final": False},
    ]
    assert "B" in str(resumed[2]["result"])
    assert resumed[-1]["stop_reason"] == "completed"
    assert resumed[-1]["usage"]["remaining"] == {"turn_tool_calls": 0}
    assert resumed[-1]["usage"]["spent"]["turn_tool_calls"] == 2
    assert coder.pending_approvals(session) == []


def test_a_rejected_budget_ends_the_turn_with_a_closing_message(coder, llm, project):
    session, events = _trip(coder, llm, project, {"turn_tool_calls": 1})

    closed = list(coder.decide(session, events[2]["call_id"], "reject"))

    closing = "I stopped here: this turn reached its turn_tool_calls budget (1 of 1) and raising it was declined."
    assert [e["type"] for e in closed] == ["approval_resolved", "tool_result", "assistant_message", "done"]
    assert closed[1]["error"]["code"] == "TOOL_EXECUTION_FAILED"  # the waiting call never ran
    assert closed[2]["content"] == closing
    assert closed[-1]["stop_reason"] == "budget_exceeded"
    assert coder.get_session(session)["status"] == "idle"
    assert coder.messages(session)[-1]["content"] == closing


def test_set_budget_changes_the_named_budgets_and_refuses_bad_ones(coder, project):
    session = coder.create_session(metadata={"project_path": str(project)}, budget={"turn_tool_calls": 3})["session_id"]
    assert coder.get_session(session)["budget"] == {"turn_tool_calls": 3}

    assert coder.set_budget(session, {"session_tokens": 5000, "turn_tool_calls": None})["budget"] == {"session_tokens": 5000}

    for bad, says in [({"turns": 1}, "budget.turns is not a budget"), ({"session_tokens": -1}, "budget.session_tokens must be")]:
        with pytest.raises(agent_runtime.InvalidRequest, match=says):
            coder.set_budget(session, bad)
    assert coder.get_session(session)["budget"] == {"session_tokens": 5000}
    with pytest.raises(agent_runtime.SessionNotFound):
        coder.set_budget("nope", {"turn_tokens": 1})
    usage = coder.budget_usage(session)
    assert usage == {
        "session_id": session, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0,
        "total_tokens": 0, "cost": None,
        "cost_unavailable": "no MODEL_PRICES_FILE is set: tokens are counted, cost is not",
        "budget": {"session_tokens": 5000},
        "spent": {"session_tokens": 0, "turn_tokens": 0, "turn_time_secs": 0, "turn_tool_calls": 0},
        "remaining": {"session_tokens": 5000},
    }


def test_budget_settings_are_the_defaults_of_new_sessions(llm, db_url, project):
    rt = agent_runtime.Runtime(database_url=db_url, llm_url=llm.url, turn_tool_call_budget=7)
    assert rt.create_session()["budget"] == {"turn_tool_calls": 7}
    assert "budget" not in rt.create_session(budget={"turn_tool_calls": None})
