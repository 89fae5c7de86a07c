"""Wire decoding is strict and its errors say what was wrong."""

from __future__ import annotations

import pytest

from rexec.schemas import messages


def test_task_round_trip() -> None:
    task = messages.TaskMessage(
        task_id="t", attempt=2, pool="p", kind="function", target="m:f", args=[1], kwargs={"a": "b"}
    )
    assert messages.decode_task(messages.encode(task)) == task


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"not json", "malformed task message"),
        (b'{"v": 9, "task_id": "t"}', "unsupported protocol version 9"),
        (b'{"v": 1, "task_id": "t"}', "missing required field"),
        (
            b'{"v": 1, "task_id": "t", "attempt": "x", "pool": "p", "kind": "function", "target": "m:f"}',
            "Expected `int`",
        ),
        (
            b'{"v": 1, "task_id": "t", "attempt": 1, "pool": "p", "kind": "shell", "target": "m:f"}',
            "Invalid enum value 'shell'",
        ),
        (
            b'{"v": 1, "task_id": "t", "attempt": 1, "pool": "p", "kind": "function", "target": "m:f", "extra": 1}',
            "unknown field",
        ),
    ],
)
def test_bad_task_bodies_are_refused_with_the_reason(body: bytes, needle: str) -> None:
    with pytest.raises(messages.MessageError, match=needle):
        messages.decode_task(body)


def test_event_batches_carry_mixed_events() -> None:
    batch = messages.EventBatch(
        events=[
            messages.Started(task_id="t", attempt=1, agent_id="a", at=1.0),
            messages.Succeeded(task_id="t", attempt=1, agent_id="a", at=2.0, result={"x": [1, 2]}),
            messages.AgentOffline(agent_id="a", pool="p", reason="drained", at=3.0),
        ]
    )
    assert messages.decode_events(messages.encode(batch)) == batch


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(messages.MessageError, match=r"\$\.events\[0\]"):
        messages.decode_events(b'{"v": 1, "events": [{"type": "exploded"}]}')


def test_a_task_batch_round_trips_and_an_unusable_one_says_why() -> None:
    tasks = [
        messages.TaskMessage(task_id=f"t{i}", attempt=1, pool="p", kind="function", target="m:f")
        for i in range(3)
    ]
    batch = messages.TaskBatch(tasks=tasks, traceparents=["a", "b", "c"])
    assert messages.decode_task_batch(messages.encode(batch)) == batch
    with pytest.raises(messages.MessageError, match="3 tasks"):
        messages.decode_task_batch(
            messages.encode(messages.TaskBatch(tasks=tasks, traceparents=["a"]))
        )
    with pytest.raises(messages.MessageError, match="unsupported protocol version 7"):
        messages.decode_task_batch(b'{"v": 7, "tasks": []}')


def test_a_returned_event_names_its_reason_in_a_few_words() -> None:
    returned = messages.Returned(task_id="t", attempt=1, agent_id="a", at=1.0, reason="no_slot")
    body = messages.encode(messages.EventBatch(events=[returned]))
    assert messages.decode_events(body).events == [returned]
    with pytest.raises(messages.MessageError, match="length <= 64"):
        messages.decode_events(body.replace(b"no_slot", b"x" * 65))


def test_control_messages_decode() -> None:
    control = messages.Control(action="cancel", task_id="t", attempt=1)
    assert messages.decode_control(messages.encode(control)) == control
    with pytest.raises(messages.MessageError):
        messages.decode_control(b'{"v": 1, "action": "explode", "task_id": "t", "attempt": 1}')


def test_settings_from_the_environment() -> None:
    from rexec.schemas.settings import load_settings

    settings = load_settings(
        {"REXEC_HEARTBEAT_TTL": "3", "REXEC_MANAGEMENT_URL": "", "REXEC_API_PORT": ""}
    )
    assert (settings.heartbeat_ttl, settings.management_url, settings.api_port) == (3.0, "", 8600)
    with pytest.raises(ValueError, match="REXEC_"):
        load_settings({"REXEC_HEARTBEAT_TTL": "soon"})
