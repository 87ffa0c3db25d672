"""`async for` under asyncio, threads driving sessions at once, and Ctrl-C during iteration."""

from __future__ import annotations

import _thread
import asyncio
import signal
import threading

import pytest

import agent_runtime
from conftest import strip_seq
from mock_llm import MockLLM, route, text


def test_async_for_reads_the_turn_under_asyncio(rt, llm, session):
    llm.script(route("ask"), text("async", " tokens"))

    async def main():
        return [event async for event in rt.send_message(session, "Q?")]

    events = asyncio.run(main())

    assert [e["type"] for e in events] == ["agent_switched", "assistant_message", "assistant_message", "assistant_message", "done"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert events == list(rt.events(session))


def test_a_cancelled_await_loses_no_event(rt, llm, session):
    gate = threading.Event()
    llm.script(route("ask"), text("a", "b", "c", gate=gate))

    async def main():
        stream = rt.send_message(session, "Q?")
        seen = [await stream.__anext__(), await stream.__anext__()]  # the switch and "a"
        # The model waits for the gate: this await times out and is cancelled.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stream.__anext__(), timeout=0.2)
        gate.set()
        seen += [e async for e in stream]
        return seen

    events = asyncio.run(main())

    assert [e["seq"] for e in events] == list(range(1, 7))
    assert [e.get("token") for e in events[1:4]] == ["a", "b", "c"]


def test_the_event_loop_keeps_running_while_a_stream_waits(rt, llm, session):
    gate = threading.Event()
    answer = text("x", "y", gate=gate)
    llm.script(route("ask"), answer)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while not gate.is_set():
                ticks += 1
                if ticks == 5:
                    gate.set()  # the loop ran five times while the stream was waiting
                await asyncio.sleep(0.01)

        t = asyncio.ensure_future(ticker())
        events = [e async for e in rt.send_message(session, "Q?")]
        await t
        return events

    events = asyncio.run(main())
    assert events[-1]["stop_reason"] == "completed"


def test_four_threads_drive_four_sessions_at_once(db_url):
    # Every request waits at the barrier until all four are in flight: this only passes if the
    # four turns really run at the same time (the GIL is released while each thread iterates).
    barrier = threading.Barrier(4, timeout=60)

    def responder(request):
        barrier.wait()
        user = [m for m in request["messages"] if m["role"] == "user"][-1]["content"]
        return text("echo: ", user)

    with MockLLM(responder=responder) as llm:
        rt = agent_runtime.Runtime(database_url=db_url, llm_url=llm.url, multi_agent_enabled=False)
        sessions = [rt.create_session(session_id=f"s{i}")["session_id"] for i in range(4)]
        results = {}
        errors = []

        def drive(sid):
            try:
                results[sid] = list(rt.send_message(sid, f"hello from {sid}"))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=drive, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

    assert errors == []
    for sid in sessions:
        assert strip_seq(results[sid])[:3] == [
            {"type": "assistant_message", "token": "echo: ", "is_final": False},
            {"type": "assistant_message", "token": f"hello from {sid}", "is_final": False},
            {"type": "assistant_message", "content": f"echo: hello from {sid}", "is_final": True},
        ]
        assert results[sid][-1]["stop_reason"] == "completed"


@pytest.fixture
def ctrl_c_raises():
    # A process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt (`_thread.interrupt_main` does nothing): the
    # test installs Python's own handler for its duration, whatever launched it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_interrupts_a_blocking_iteration_and_the_turn_goes_on(
    rt, llm, session, ctrl_c_raises
):
    gate = threading.Event()
    answer = text("a", "b", gate=gate)
    llm.script(route("ask"), answer)
    stream = rt.send_message(session, "Q?")

    got_a = threading.Event()

    def press_ctrl_c():
        # Pressed once "a" is consumed: the reader is then blocked waiting for "b".
        got_a.wait(30)
        _thread.interrupt_main()

    threading.Thread(target=press_ctrl_c).start()
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for event in stream:
            seen.append(event)
            if event.get("token") == "a":
                got_a.set()

    assert [e.get("token") for e in seen] == [None, "a"]
    gate.set()
    # The interrupted reader can go on; the turn was never cancelled.
    rest = list(stream)
    assert [e["seq"] for e in seen + rest] == list(range(1, 6))
    assert rest[-1]["stop_reason"] == "completed"
