"""A secret a task names never comes back: tasks on a real ``rexec-agent`` try every way to
leak it (return it, nest it, base64 it, raise it, print it, log it, echo it from a command),
and the value is in no database row, no event on the wire, no agent log line and no span."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import anyio
import httpx
import pytest
from sqlalchemy import select

from rexec.dispatcher.db.engine import make_engine, make_sessionmaker
from rexec.dispatcher.db.models import Base
from rexec.schemas.api import TaskState, TaskView
from tests.conftest import MANAGEMENT_URL
from tests.e2e.conftest import Plane
from tests.otlp import OtlpReceiver
from tests.support import wait_until

SECRET = f"leak-{uuid.uuid4().hex[:12]}\"q'{uuid.uuid4().hex[:8]}"
"""With both quote characters, so escaped forms (JSON, repr) are exercised too."""

LEAKS = [
    base64.b64encode(SECRET.encode()).decode(),  # before SECRET: its forms must not shadow it
    SECRET,
    json.dumps(SECRET)[1:-1],
    repr(SECRET)[1:-1],
]
FUNCTIONS = ["return_it", "return_nested", "return_base64", "raise_it", "print_it", "log_it"]
COMMANDS = {
    "command_ok": ["sh", "-c", "printf 'out %s\\n' \"$leak\"; printf 'err %s\\n' \"$leak\" >&2"],
    "command_fails": ["sh", "-c", "printf 'dying with %s\\n' \"$leak\"; exit 3"],
}


def assert_clean(what: str, text: str) -> None:
    for form in LEAKS:
        assert form not in text, f"the secret leaked into {what}"


class EventTap:
    """A queue of the test's own bound to the fanout ``rexec.events``: a copy of every event
    batch an agent published, read through the management API."""

    def __init__(self, vhost: str) -> None:
        self.api = httpx.Client(base_url=MANAGEMENT_URL, auth=("guest", "guest"), timeout=30)
        self.path = f"{quote(vhost, safe='')}/rexec-test-tap-{uuid.uuid4().hex[:8]}"
        self.queue = self.path.rsplit("/", 1)[1]
        self.api.put(f"/api/queues/{self.path}", json={"durable": False}).raise_for_status()
        self.api.post(
            f"/api/bindings/{quote(vhost, safe='')}/e/rexec.events/q/{self.queue}",
            json={"routing_key": ""},
        ).raise_for_status()
        self.bodies: list[str] = []

    def drain(self) -> list[str]:
        reply = self.api.post(
            f"/api/queues/{self.path}/get",
            json={"count": 10_000, "ackmode": "ack_requeue_false", "encoding": "auto"},
        )
        reply.raise_for_status()
        for message in reply.json():
            assert message["payload_encoding"] == "string"
            self.bodies.append(message["payload"])
        return self.bodies

    def close(self) -> None:
        self.api.delete(f"/api/queues/{self.path}")
        self.api.close()


@pytest.fixture
def tap(vhost: str, traced_plane: Plane) -> Iterator[EventTap]:
    tap = EventTap(vhost)  # after the dispatcher declared rexec.events
    yield tap
    tap.close()


async def all_rows(database_url: str) -> str:
    engine = make_engine(database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            text = []
            for table in Base.metadata.sorted_tables:
                rows = (await session.execute(select(table))).all()
                text.extend(repr(tuple(row)) for row in rows)
            return "\n".join(text)
    finally:
        await engine.dispose()


def test_a_secret_never_comes_back_from_tasks_that_try_to_leak_it(
    traced_plane: Plane, receiver: OtlpReceiver, tap: EventTap, pool_name: str
) -> None:
    plane = traced_plane
    plane.client.create_pool(pool_name)
    token = plane.client.create_token(pool_name).secret
    agent = plane._start(
        [
            "rexec-agent",
            "--pool",
            pool_name,
            "--allow",
            "tests.secret_tasks:*",
            "--allow",
            "sh",
        ],
        "agent",
        {"REXEC_AGENT_TOKEN": token, "REXEC_SECRET_leak": SECRET},
    )
    submitted: dict[str, TaskView] = {}
    for name in ["digest", *FUNCTIONS]:
        submitted[name] = plane.client.submit(
            pool_name, f"tests.secret_tasks:{name}", args=["leak"], secrets=["leak"], max_attempts=1
        )
    for name, argv in COMMANDS.items():
        submitted[name] = plane.client.submit(
            pool_name, command=argv, secrets=["leak"], max_attempts=1
        )
    submitted["missing"] = plane.client.submit(
        pool_name, "tests.secret_tasks:digest", args=["nope"], secrets=["leak", "nope"]
    )
    done = {t.id: t for t in plane.client.wait([t.id for t in submitted.values()], timeout=90)}
    views = {name: done[t.id] for name, t in submitted.items()}

    # The tasks did get the value (the digest proves it) and what they sent back is masked.
    assert views["digest"].result == hashlib.sha256(SECRET.encode()).hexdigest()
    assert views["digest"].secrets == ["leak"]
    assert views["return_it"].result == "***"
    assert views["return_nested"].result == {"nested": ["***", {"again": "x***x"}]}
    assert views["return_base64"].result == "***"
    raised = views["raise_it"]
    assert raised.state is TaskState.FAILED and raised.error is not None
    assert "***" in raised.error["message"] and "RuntimeError" in raised.error["traceback"]
    assert (views["print_it"].result, views["log_it"].result) == ("printed", "logged")
    assert views["command_ok"].result["output"] == "out ***\nerr ***\n"
    assert views["command_fails"].state is TaskState.FAILED
    assert views["command_fails"].error is not None
    assert "dying with ***" in views["command_fails"].error["traceback"]
    missing = views["missing"]
    assert missing.state is TaskState.FAILED and missing.error is not None
    assert missing.error["type"] == "SecretNotFound" and missing.attempt == 1
    assert (
        "'nope'" in missing.error["message"] and "env secrets backend" in missing.error["message"]
    )

    # Nowhere in the database.
    assert_clean("the database", anyio.run(all_rows, plane.settings.database_url))

    # Nowhere on the wire: every terminal event of every task reached the tap.
    ids = {t.id for t in submitted.values()}

    def tapped() -> list[str]:
        bodies = tap.drain()
        seen = set()
        for body in bodies:
            for event in json.loads(body)["events"]:
                if event.get("type") not in ("started", "agent_online", "agent_offline"):
                    seen.add(event.get("task_id"))
        return bodies if ids <= seen else []

    bodies = wait_until(tapped, 20, "every terminal event on the tap")
    assert_clean("an event on the wire", "\n".join(bodies))

    # Nowhere in a span: wait for the agent's process spans of every task.
    def processed() -> bool:
        return ids <= {
            str(s.attributes.get("rexec.task.id"))
            for s in receiver.spans
            if s.name.startswith("process")
        }

    wait_until(processed, 20, "the agent's span of every task")
    exported = b"\n".join(receiver.bodies)
    for form in LEAKS:
        assert form.encode() not in exported, "the secret leaked into a span"

    # Nowhere in the agent's log nor in the task logs it keeps, though the tasks printed and
    # logged it: what they printed and logged is in their task logs, masked.
    agent.stop()
    assert_clean("the agent's log", agent.log.read_text(errors="replace"))
    task_logs = "\n".join(
        path.read_text(errors="replace") for path in sorted(plane.task_logs.rglob("*.log"))
    )
    assert "stdout: ***" in task_logs and "stderr: ***" in task_logs
    assert "the secret is ***" in task_logs
    assert_clean("the task logs", task_logs)
