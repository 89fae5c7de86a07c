"""Task logs on the agent's side: every attempt's stdout, stderr and log records, in its store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rexec.schemas import messages
from rexec.schemas.settings import Settings
from rexec.worker.secrets.env import EnvBackend
from tests.worker.harness import Broker, running_agent, task

pytestmark = pytest.mark.anyio

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (stdout|stderr|log   |rexec ) (.*)$")


def read_log(settings: Settings, ref: str) -> list[tuple[str, str]]:
    assert ref.startswith("dir:"), ref
    text = (Path(settings.log_dir) / ref.removeprefix("dir:")).read_text()
    lines = []
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"not a log line: {line!r}"
        lines.append((match.group(1).strip(), match.group(2)))
    return lines


async def test_a_function_tasks_output_and_log_records_are_in_its_log(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, concurrency=1):
        message = task(pool, "tests.tasks:chatty", args=["fn"])
        event = await broker.run(pool, message)
        assert isinstance(event, messages.Succeeded) and event.result == "fn"
        assert event.log_ref == f"dir:{pool}/{message.task_id}/1.log"
        lines = read_log(agent_settings, event.log_ref)
        assert [t for s, t in lines if s == "stdout"] == [
            "out fn 0",
            "out fn 1",
            "out fn 2",
            "sub-out fn",
            "no newline at the end",
        ]
        assert [t for s, t in lines if s == "stderr"] == ["err fn", "sub-err fn"]
        assert [t for s, t in lines if s == "log"] == [
            "INFO tests.chatty: logged fn",
            "WARNING tests.chatty: warned fn",
        ]
        assert lines[-1] == ("rexec", "attempt succeeded")
        assert "out fn 2" in event.log_tail and event.log_tail.endswith("attempt succeeded\n")

        # The next call in the same persistent child gets only its own output.
        second = task(pool, "tests.tasks:chatty_fail", args=["two"])
        failed = await broker.run(pool, second)
        assert isinstance(failed, messages.Failed) and failed.error_type == "ValueError"
        lines = read_log(agent_settings, failed.log_ref)
        assert lines[0] == ("stdout", "about to fail two")
        assert ("rexec", "attempt failed: ValueError: failed two") in lines
        assert any("raise ValueError" in t for s, t in lines if s == "rexec")
        assert not any("fn" in t for _, t in lines)


async def test_a_command_tasks_streams_are_told_apart_and_its_output_tail_stays(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, allow=["sh"]):
        script = "echo to-stdout; echo to-stderr >&2; exit 3"
        event = await broker.run(pool, task(pool, argv=["sh", "-c", script]))
        assert isinstance(event, messages.Failed) and event.error_type == "CommandFailed"
        assert "to-stdout" in event.traceback and "to-stderr" in event.traceback
        lines = read_log(agent_settings, event.log_ref)
        assert ("stdout", "to-stdout") in lines and ("stderr", "to-stderr") in lines
        assert lines[-1] == ("rexec", "attempt failed: CommandFailed: exit code 3")
        assert "to-stderr" in event.log_tail


async def test_a_log_past_its_cap_is_cut_and_says_so_and_masking_applies(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    import msgspec

    settings = msgspec.structs.replace(agent_settings, log_max_bytes=2000)
    secrets = EnvBackend("REXEC_SECRET_", {"REXEC_SECRET_pw": "hunter2"})
    async with running_agent(broker, settings, pool, allow=["sh"], secrets_backend=secrets):
        script = "echo password=$pw; i=0; while [ $i -lt 500 ]; do echo line-$i; i=$((i+1)); done"
        message = msgspec.structs.replace(task(pool, argv=["sh", "-c", script]), secrets=["pw"])
        event = await broker.run(pool, message)
        assert isinstance(event, messages.Succeeded)
        path = Path(settings.log_dir) / event.log_ref.removeprefix("dir:")
        text = path.read_text()
        assert "hunter2" not in text and "password=***" in text
        assert path.stat().st_size < 2000 + 400
        assert "log reached its limit of 2000 bytes (REXEC_LOG_MAX_BYTES)" in text
        assert re.search(r"dropped \d+ lines \(\d+ bytes\) past the limit", text)
        # The tail follows the output past the cap: the last lines are still in it.
        assert "line-499" in event.log_tail and "hunter2" not in event.log_tail
        assert len(event.log_tail.encode()) <= 2048
        assert event.result["output"].endswith("line-499\n")


async def test_more_output_than_a_pipe_holds_is_all_captured(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, concurrency=1):
        message = task(pool, "tests.tasks:flood", args=[5000])
        await broker.publish(pool, message)
        event = await broker.terminal(message.task_id, within=30)
        assert isinstance(event, messages.Succeeded) and event.result == 5000
        lines = read_log(agent_settings, event.log_ref)
        printed = [t for s, t in lines if s == "stdout"]
        assert len(printed) == 10000
        assert printed[4999].startswith("flood line 004999 ") and printed[-1] == "5000"


async def test_a_killed_attempt_keeps_its_output_and_says_why_it_ended(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, allow=["sh"]):
        message = task(pool, argv=["sh", "-c", "echo before; sleep 30"], timeout=0.5)
        event = await broker.run(pool, message)
        assert isinstance(event, messages.TimedOut)
        lines = read_log(agent_settings, event.log_ref)
        assert lines == [
            ("stdout", "before"),
            ("rexec", "attempt timed out after 0.5s and was killed"),
        ]


async def test_an_attempt_that_succeeds_silently_keeps_no_log_and_one_that_fails_does(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, concurrency=1):
        quiet = task(pool, "tests.tasks:add", args=[1, 2])
        event = await broker.run(pool, quiet)
        assert isinstance(event, messages.Succeeded) and event.result == 3
        assert (event.log_ref, event.log_tail) == ("", "")
        assert not (Path(agent_settings.log_dir) / pool / quiet.task_id).exists()
        failing = task(pool, "tests.tasks:fail", args=["quietly"])
        failed = await broker.run(pool, failing)
        assert isinstance(failed, messages.Failed)
        [(stream, text), *_] = read_log(agent_settings, failed.log_ref)
        assert (stream, text) == ("rexec", "attempt failed: RuntimeError: quietly")
