"""Hypothesis against the wire-message decoders: whatever arrives on a queue, decoding either
returns a message or raises :class:`MessageError` (which consumers dead-letter with its text);
no other exception may escape, since it would take a consumer down instead."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rexec.schemas import messages

DECODERS: list[Callable[[bytes], Any]] = [
    messages.decode_task,
    messages.decode_events,
    messages.decode_control,
]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)
KEYS = [
    "v",
    "task_id",
    "attempt",
    "pool",
    "kind",
    "target",
    "argv",
    "args",
    "kwargs",
    "timeout",
    "expires_at",
    "submitted_at",
    "events",
    "type",
    "agent_id",
    "at",
    "action",
    "result",
    "error_type",
    "message",
    "retryable",
]
# Objects that look like messages: the real field names, the right version, any values.
message_like = st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=5), json_values, max_size=12
).map(lambda d: {**d, "v": 1})
event_like = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "events": st.lists(
            st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8).map(
                lambda d: {
                    **d,
                    "type": d.get("type", "started")
                    if isinstance(d.get("type"), str)
                    else "started",
                }
            ),
            max_size=4,
        ),
    }
)


def decode_or_refuse(decode: Callable[[bytes], Any], body: bytes) -> None:
    try:
        decode(body)
    except messages.MessageError as exc:
        assert str(exc)  # refused with a reason, never an empty message


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__)
@FUZZ
@given(body=st.binary(max_size=2000))
def test_arbitrary_bytes(decode: Callable[[bytes], Any], body: bytes) -> None:
    decode_or_refuse(decode, body)


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__)
@FUZZ
@given(value=json_values)
def test_arbitrary_json(decode: Callable[[bytes], Any], value: Any) -> None:
    decode_or_refuse(decode, json.dumps(value).encode())


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__)
@FUZZ
@given(value=message_like | event_like)
def test_message_shaped_json(decode: Callable[[bytes], Any], value: Any) -> None:
    decode_or_refuse(decode, json.dumps(value).encode())


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"v": 1, "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"v": 1e400}',
        b'{"v": 123456789012345678901234567890}',
        b'{"v": 1, "task_id": "\\ud800"}',
        b'{"v": 1, "v": 2}',
        '{"v": 1, "pool": "\u00e9"}'.encode("latin-1"),
        b'\xef\xbb\xbf{"v": 1}',
        b"",
    ],
    ids=[
        "deep-array",
        "deep-args",
        "huge-float-version",
        "huge-int-version",
        "lone-surrogate",
        "duplicate-key",
        "latin-1",
        "bom",
        "empty",
    ],
)
def test_hostile_bodies(decode: Callable[[bytes], Any], body: bytes) -> None:
    decode_or_refuse(decode, body)


@FUZZ
@given(
    task=st.builds(
        messages.TaskMessage,
        task_id=st.text(),
        attempt=st.integers(),
        pool=st.text(),
        kind=st.sampled_from(["function", "command"]),
        target=st.text(),
        args=st.lists(json_values, max_size=3),
    )
)
def test_encoded_tasks_decode_to_themselves(task: messages.TaskMessage) -> None:
    assert messages.decode_task(messages.encode(task)) == task


def test_a_refused_body_names_the_message_kind() -> None:
    with pytest.raises(messages.MessageError, match="malformed control message"):
        messages.decode_control(msgspec.json.encode({"v": 1, "action": "explode"}))
