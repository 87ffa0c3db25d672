"""Turns through the Python module: routing, token streaming, replay, sessions and agents."""

from __future__ import annotations

import json
import threading

import pytest

import agent_runtime
from conftest import strip_seq
from mock_llm import route, text


def test_a_request_is_routed_to_the_coder_who_answers_in_the_same_stream(rt, llm, session):
    llm.script(route("coder", "code to write"), text("Готово", ", сделано"))

    events = list(rt.send_message(session, "Создай новый виджет профиля"))

    assert strip_seq(events) == [
        {"type": "agent_switched", "from_agent": "orchestrator", "to_agent": "coder", "reason": "code to write", "is_final": False},
        {"type": "assistant_message", "token": "Готово", "is_final": False},
        {"type": "assistant_message", "token": ", сделано", "is_final": False},
        {"type": "assistant_message", "content": "Готово, сделано", "is_final": True},
        {"type": "done", "stop_reason": "completed", "usage": {"prompt_tokens": 20, "completion_tokens": 3}, "is_final": True},
    ]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert llm.requests[0]["tool_choice"] == {"type": "function", "function": {"name": "route"}}
    assert llm.requests[1]["model"] == "mock-model"
    current = rt.current_agent(session)
    assert current["current_agent"]["type"] == "coder"
    assert current["previous_agent"] == {"type": "orchestrator", "name": "Orchestrator Agent", "emoji": "🎭"}
    assert current["switch_count"] == 1
    assert [(m["role"], m["content"]) for m in rt.messages(session)] == [
        ("user", "Создай новый виджет профиля"),
        ("assistant", "Готово, сделано"),
    ]


def test_tokens_arrive_one_by_one_while_the_model_is_still_answering(rt, llm, session):
    gate = threading.Event()
    answer = text("first", " second", " third", gate=gate)
    llm.script(route("ask"), answer)

    stream = rt.send_message(session, "What does this project do?")
    assert next(stream)["type"] == "agent_switched"
    # The model has sent one token and waits for the gate: the token is already here.
    assert strip_seq([next(stream)]) == [{"type": "assistant_message", "token": "first", "is_final": False}]
    gate.set()
    rest = list(stream)

    assert strip_seq(rest[:3]) == [
        {"type": "assistant_message", "token": " second", "is_final": False},
        {"type": "assistant_message", "token": " third", "is_final": False},
        {"type": "assistant_message", "content": "first second third", "is_final": True},
    ]
    assert rest[-1]["type"] == "done"


def test_explicit_switch_without_content_streams_the_switch_and_done(rt, session):
    events = rt.switch_agent(session, "architect").collect()

    assert strip_seq(events) == [
        {"type": "agent_switched", "from_agent": "orchestrator", "to_agent": "architect", "reason": "User requested agent switch", "is_final": False},
        {"type": "done", "stop_reason": "completed", "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "is_final": True},
    ]
    assert rt.get_session(session)["current_agent"] == "architect"


def test_agent_type_on_a_message_switches_first_and_skips_routing(rt, llm, session):
    llm.script(text("Ищу причину"))

    events = list(rt.send_message(session, "Почему падает?", agent_type="debug"))

    assert events[0]["type"] == "agent_switched" and events[0]["to_agent"] == "debug"
    assert events[-1]["stop_reason"] == "completed"
    assert len(llm.requests) == 1
    assert "tool_choice" not in llm.requests[0] or llm.requests[0]["tool_choice"] != {"type": "function", "function": {"name": "route"}}


def test_replay_after_a_seq_gives_exactly_the_missing_events(rt, llm, session):
    llm.script(route("ask"), text("a", "b"))
    live = list(rt.send_message(session, "A question?"))

    replayed = list(rt.events(session, after=2))

    assert replayed == live[2:]
    assert list(rt.events(session)) == live


def test_the_same_request_id_replays_the_turn_instead_of_running_another(rt, llm, session):
    llm.script(route("ask"), text("once"))
    first = list(rt.send_message(session, "Q?", request_id="req-1"))

    again = list(rt.send_message(session, "Q?", request_id="req-1"))

    assert again == first
    assert len(llm.requests) == 2


def test_sessions_are_created_listed_and_deleted(rt, project):
    created = rt.create_session(user_id="alice", metadata={"project_path": str(project), "tag": [1, 2.5, None, True]}, session_id="my-session.1")
    assert created == {
        "session_id": "my-session.1",
        "user_id": "alice",
        "created_at": created["created_at"],
        "last_activity": created["created_at"],
        "metadata": {"project_path": str(project), "tag": [1, 2.5, None, True]},
        "current_agent": "orchestrator",
        "message_count": 0,
        "status": "idle",
    }
    assert created["created_at"].endswith("Z")
    rt.create_session(user_id="bob")

    page = rt.list_sessions(user_id="alice")
    assert [s["session_id"] for s in page["sessions"]] == ["my-session.1"]
    assert page["next_cursor"] is None
    assert rt.get_session("my-session.1") == created

    rt.delete_session("my-session.1")
    with pytest.raises(agent_runtime.SessionNotFound):
        rt.get_session("my-session.1")


def test_the_five_agents_are_listed_in_order(rt):
    agents = rt.agents()

    assert [a["type"] for a in agents] == ["orchestrator", "coder", "architect", "debug", "ask"]
    assert agents[1]["tools"] == ["read_file", "write_file", "list_files", "search_in_code", "execute_command", "git_diff", "git_commit", "delete_file"]
    assert set(agents[0]) == {"type", "name", "description", "emoji", "tools", "restrictions", "command_rights"}
    assert agents[3]["command_rights"] == {
        "sandbox": "enforce",
        "project": "read_only",
        "network": False,
        "extra_read_paths": [],
        "extra_write_paths": [],
    }


def test_cancel_with_nothing_running_is_idle(rt, session):
    assert rt.cancel(session) == "idle"


def test_usage_sums_the_turns(rt, llm, session):
    # agent_type skips the routing call (whose tokens the core does not yet add to the session).
    llm.script(text("x"), text("y", "z"))
    list(rt.send_message(session, "Q?", agent_type="ask"))
    list(rt.send_message(session, "Q2?"))

    assert rt.usage(session) == {"prompt_tokens": 20, "completion_tokens": 3}


def test_events_are_json_serializable_as_the_sse_data(rt, llm, session):
    llm.script(route("ask"), text("x"))

    for event in rt.send_message(session, "Q?"):
        assert json.loads(json.dumps(event)) == event
