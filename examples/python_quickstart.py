"""Python quick start: a routed turn that stops for one approval, then continues after it.

Shows `agent_runtime.Runtime` over a SQLite file: a session on a project folder, the orchestrator
routing "Создай новый виджет профиля" to the coder, the coder asking to write a file, the pending
approval (also announced on the EventBus), the human's "approve", and the file on disk. Runs
offline: the model is the test suite's standard-library mock of an OpenAI-compatible server.

Run (from the repository root, after `pip install ./agent-runtime-py`):

    python3 examples/python_quickstart.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import agent_runtime

# The mock model server of the Python tests (standard library only).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent-runtime-py" / "tests"))
from mock_llm import MockLLM, route, text, tool_call  # noqa: E402


def show(event: dict) -> None:
    """Prints one event the way a client would render it."""
    kind = event["type"]
    if kind == "assistant_message" and not event["is_final"]:
        print(event["token"], end="", flush=True)
    elif kind == "assistant_message":
        print()
    elif kind == "agent_switched":
        print(f"[{event['from_agent']} → {event['to_agent']}: {event['reason']}]")
    elif kind == "tool_call":
        flag = " (needs approval)" if event["requires_approval"] else ""
        print(f"[tool_call {event['tool_name']} {event['arguments']}{flag}]")
    elif kind == "tool_result":
        print(f"[tool_result {event.get('result', event.get('error'))}]")
    elif kind == "approval_resolved":
        print(f"[approval {event['call_id']}: {event['decision']}]")
    elif kind == "done":
        print(f"[done: {event['stop_reason']}, usage {event['usage']}]")
    else:
        print(f"[{kind}: {event}]")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, MockLLM() as llm:
        project = Path(tmp) / "project"
        project.mkdir()
        llm.script(
            route("coder", "the user wants new code"),
            tool_call(
                "write_file",
                {"path": "src/ProfileWidget.tsx", "content": "export const ProfileWidget = () => null;\n"},
                tokens=("Создаю ", "виджет ", "профиля."),
            ),
            text("Готово: ", "виджет ", "создан."),
        )

        rt = agent_runtime.Runtime(database_url=f"sqlite://{tmp}/agent-runtime.db", llm_url=llm.url, model="mock")
        session = rt.create_session(user_id="user_123", metadata={"project_path": str(project)})
        sid = session["session_id"]
        bus = rt.subscribe(kinds=["approval.requested"], session_id=sid)

        for event in rt.send_message(sid, "Создай новый виджет профиля"):
            show(event)

        note = bus.next(timeout=10)
        print(f"EventBus: {note['kind']} for {note['data']['call_id']}")
        (pending,) = rt.pending_approvals(sid)
        print(f"Pending: {pending['tool_name']} {pending['arguments']['path']} — approving")

        for event in rt.decide(sid, pending["call_id"], "approve"):
            show(event)

        written = (project / "src" / "ProfileWidget.tsx").read_text()
        assert written == "export const ProfileWidget = () => null;\n", written
        print(f"Wrote src/ProfileWidget.tsx ({len(written)} bytes); agent now: {rt.current_agent(sid)['current_agent']['name']}")


if __name__ == "__main__":
    main()
