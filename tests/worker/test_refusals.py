"""Bad input is refused clearly: dead-letters with a reason, refusals that name the target,
and the agent keeps consuming afterwards."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from aio_pika.abc import AbstractIncomingMessage

from rexec.schemas import messages, names
from rexec.schemas.settings import Settings
from rexec.schemas.signing import SIGNATURE_HEADER, Signer, generate_private_key
from tests.support import SIGNER, await_until
from tests.worker.harness import Broker, running_agent, task, until

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"this is not json", "malformed task message"),
        (b'{"v": 99, "task_id": "t", "attempt": 1}', "unsupported protocol version 99"),
        (b'{"v": 1, "task_id": "t", "attempt": 1}', "missing required field"),
    ],
    ids=["not-json", "unknown-version", "missing-field"],
)
async def test_unusable_body_is_dead_lettered_with_reason(
    broker: Broker, agent_settings: Settings, pool: str, body: bytes, needle: str
) -> None:
    async with running_agent(broker, agent_settings, pool) as agent:
        await broker.publish(pool, body)
        [dead] = await broker.wait_dead_letters(pool)
        assert dead.body == body
        headers = dead.headers
        assert needle in str(headers[names.REASON_HEADER])
        assert headers["x-rexec-agent"] == agent.agent_id
        await until(lambda: agent.stats.dead_lettered == 1, what="the dead letter counted")
        # The agent keeps consuming.
        event = await broker.run(pool, task(pool))
        assert isinstance(event, messages.Succeeded)
        assert await broker.ready(names.pool_queue(pool)) == []


def signed_by(signer: Signer, body: bytes) -> dict[str, str]:
    return {SIGNATURE_HEADER: signer.sign(body)}


async def test_unsigned_forged_or_altered_tasks_are_dead_lettered_never_run(
    broker: Broker, agent_settings: Settings, pool: str, tmp_path: Path
) -> None:
    """Only the orchestration plane's key makes an agent run code: a broker account that can
    publish to the pool's queue is not enough."""
    marker = tmp_path / "ran"
    evil = messages.encode(task(pool, "tests.tasks:touch", args=[str(marker)]))
    honest = messages.encode(task(pool))
    altered = evil.replace(b'"attempt":1', b'"attempt":2')
    assert altered != evil
    cases = [
        ({}, "unsigned message"),
        (signed_by(Signer(generate_private_key()), evil), "bad signature"),  # another key
        (signed_by(SIGNER, honest), "bad signature"),  # a real signature, of another body
        ({SIGNATURE_HEADER: "not base64 at all!"}, "malformed signature"),
    ]
    async with running_agent(broker, agent_settings, pool) as agent:
        for headers, _ in cases:
            await broker.publish(pool, evil, headers, signed=False)
        await broker.publish(pool, altered, signed_by(SIGNER, evil), signed=False)
        dead: list[AbstractIncomingMessage] = []

        async def all_dead() -> bool:
            dead.extend(await broker.dead_letters(pool))
            return len(dead) == len(cases) + 1

        await await_until(all_dead, 10, "every forged task dead-lettered")
        reasons = sorted(str(m.headers[names.REASON_HEADER]) for m in dead)
        for _, needle in cases:
            assert any(needle in r for r in reasons), (needle, reasons)
        assert all(r.startswith("refused: ") for r in reasons)
        assert agent.stats.dead_lettered == len(cases) + 1 and agent.stats.started == 0
        assert not marker.exists(), "a forged task ran"
        event = await broker.run(pool, task(pool))  # a signed one still runs
        assert isinstance(event, messages.Succeeded)


async def test_task_of_another_pool_is_dead_lettered(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool):
        stray = task("some-other-pool")
        await broker.publish(pool, stray)
        [dead] = await broker.wait_dead_letters(pool)
        reason = str(dead.headers[names.REASON_HEADER])
        assert "'some-other-pool'" in reason and pool in reason
        assert broker.of(stray.task_id) == []


async def test_disallowed_target_fails_and_names_target_and_patterns(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    allow = ["tests.tasks:add", "echo"]
    async with running_agent(broker, agent_settings, pool, allow=allow) as agent:
        for message, target in [
            (task(pool, "tests.tasks:sleep", args=[0]), "tests.tasks:sleep"),
            (task(pool, argv=["rm", "-rf", "/tmp/x"]), "rm"),
        ]:
            event = await broker.run(pool, message)
            assert isinstance(event, messages.Failed), event
            assert (event.error_type, event.retryable) == ("TargetNotAllowed", False)
            assert repr(target) in event.message
            assert "'tests.tasks:add'" in event.message and "'echo'" in event.message
            assert [type(e) for e in broker.of(message.task_id)] == [messages.Failed]
        # Counted once the delivery is acked, a moment after the event is out.
        await until(lambda: agent.stats.not_allowed == 2, what="both refusals counted")
        ok = await broker.run(pool, task(pool, "tests.tasks:add"))
        assert isinstance(ok, messages.Succeeded)


async def test_expired_task_is_not_started(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool) as agent:
        message = task(pool, expires_at=time.time() - 1)
        event = await broker.run(pool, message)
        assert isinstance(event, messages.Expired)
        assert [type(e) for e in broker.of(message.task_id)] == [messages.Expired]
        await until(lambda: agent.stats.expired == 1, what="the expiry counted")
        fresh = await broker.run(pool, task(pool, expires_at=time.time() + 60))
        assert isinstance(fresh, messages.Succeeded)
