"""Fixtures: a mock model server, a project folder, a SQLite file, and a Runtime over them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import agent_runtime  # noqa: E402
from mock_llm import MockLLM  # noqa: E402


@pytest.fixture
def llm() -> Iterator[MockLLM]:
    """A fresh mock model server with an empty script."""
    with MockLLM() as server:
        yield server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project folder for the runtime's tools."""
    p = tmp_path / "project"
    p.mkdir()
    return p


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A SQLite file of its own for each test."""
    return f"sqlite://{tmp_path / 'agent-runtime.db'}"


@pytest.fixture
def rt(llm: MockLLM, db_url: str) -> agent_runtime.Runtime:
    """A Runtime over the test's SQLite file and mock model."""
    return agent_runtime.Runtime(database_url=db_url, llm_url=llm.url, model="mock-model")


@pytest.fixture
def session(rt: agent_runtime.Runtime, project: Path) -> str:
    """A session on the project folder; its id."""
    return rt.create_session(user_id="user_1", metadata={"project_path": str(project)})["session_id"]


def strip_seq(events):
    """Events without their `seq` (checked separately where it matters)."""
    return [{k: v for k, v in e.items() if k != "seq"} for e in events]
