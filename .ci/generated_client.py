"""A Python client generated from a running server's /openapi.json reads in the product's words.
Run by .ci/run: python .ci/generated_client.py http://HOST:PORT TOKEN (openapi-python-client installed)."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

base_url, token = sys.argv[1], sys.argv[2]
out = tempfile.mkdtemp(prefix="agent-runtime-client-")
atexit.register(shutil.rmtree, out, ignore_errors=True)
generator = os.path.join(os.path.dirname(sys.executable), "openapi-python-client")
subprocess.run(
    [generator, "generate", "--url", f"{base_url}/openapi.json", "--meta", "none",
     "--output-path", os.path.join(out, "agent_runtime_client")],
    check=True,
)
sys.path.insert(0, out)

# One module per operation, named by its operationId, grouped by tag; nothing named after a path.
modules = sorted(
    f"{tag}/{name[:-3]}"
    for tag in os.listdir(os.path.join(out, "agent_runtime_client", "api"))
    if not tag.startswith("_")
    for name in os.listdir(os.path.join(out, "agent_runtime_client", "api", tag))
    if name.endswith(".py") and not name.startswith("_")
)
expected = sorted([
    "agents/get_current_agent", "agents/list_agents",
    "approvals/decide_approval", "approvals/list_pending_approvals", "approvals/preview_approval",
    "messages/cancel_turn", "messages/list_messages", "messages/stream_events", "messages/stream_message",
    "sessions/create_session", "sessions/delete_session", "sessions/get_session",
    "sessions/get_session_usage", "sessions/list_sessions", "sessions/update_session",
    "system/get_health", "system/get_metrics", "system/get_open_api",
])
assert modules == expected, f"generated modules: {modules}"

from agent_runtime_client import AuthenticatedClient  # noqa: E402
from agent_runtime_client.api.agents import get_current_agent, list_agents  # noqa: E402
from agent_runtime_client.api.approvals import list_pending_approvals  # noqa: E402
from agent_runtime_client.api.messages import cancel_turn, list_messages  # noqa: E402
from agent_runtime_client.api.sessions import create_session, delete_session, get_session  # noqa: E402
from agent_runtime_client.api.system import get_health  # noqa: E402
from agent_runtime_client.models import CreateSessionRequest  # noqa: E402

client = AuthenticatedClient(base_url=base_url, token=token, prefix="", auth_header_name="x-internal-auth")

created = create_session.sync(client=client, body=CreateSessionRequest(user_id="generated-client"))
sid = created.session_id
assert (created.id, created.current_agent, created.message_count) == (sid, "orchestrator", 0), created

session = get_session.sync(session_id=sid, client=client)
assert (session.session_id, session.user_id, session.status) == (sid, "generated-client", "idle"), session

agents = list_agents.sync(client=client)
assert [a.type_ for a in agents.agents] == ["orchestrator", "coder", "architect", "debug", "ask"], agents

current = get_current_agent.sync(session_id=sid, client=client)
assert (current.current_agent.type_, current.previous_agent, current.switch_count) == ("orchestrator", None, 0)

assert list_pending_approvals.sync(session_id=sid, client=client).pending_approvals == []
assert list_messages.sync(session_id=sid, client=client).messages == []
assert cancel_turn.sync(session_id=sid, client=client).status == "idle"
assert get_health.sync(client=client).service == "agent-runtime"

# An error answer parses as the one error shape.
missing = get_session.sync(session_id="no-such-session", client=client)
assert missing.error.code == "SESSION_NOT_FOUND", missing

assert delete_session.sync(session_id=sid, client=client).status == "deleted"
print(f"generated client: {len(modules)} operations in {len(set(m.split('/')[0] for m in modules))} tags, all parse")
