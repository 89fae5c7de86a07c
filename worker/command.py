"""Command tasks: run an argv in one of the agent's child processes and keep its output's tail.

The child (``rexec.worker.child``) starts the command in a session of its own, with the
child's captured fds 1 and 2 as its stdout and stderr, so the attempt's log (``sink``) tells
them apart; the result's ``output`` tail is both, in the order the chunks arrived.

A command runs in a child rather than straight from the agent because a SIGKILLed agent can
stop nothing: the child, a subreaper that hears its agent die, stops the command and all it
started, even what moved to a session of its own (Airflow's task runner does) or
double-forked. It also costs no process start beyond the command's own. The secrets the task
named are in its environment, each under its own name; the output tail that goes back is
masked by the agent's ``Reporter``.

A command that can never start (a NUL byte in its argv, a file that is no executable) fails
as ``InvalidCommand``, not retried; one that cannot start now (no memory) is a retryable
agent error.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

import msgspec

from . import protocol
from .environment import task_environment

if TYPE_CHECKING:
    from .children import ChildPool

OUTPUT_TAIL = protocol.TRACEBACK_TAIL
CANNOT_EXEC = frozenset({errno.ENOEXEC, errno.E2BIG, errno.ENAMETOOLONG, errno.ELOOP})
"""Reasons an exec fails that no retry can change (not an executable, an argv too long...)."""

_json = msgspec.json.Encoder()


Sink = Callable[[str, str], None]


def start_failure(argv: list[str], exc: Exception) -> protocol.Outcome:
    """The outcome of a command that could not be started (the child calls this)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError)):
        return protocol.failure(
            "TargetNotFound",
            f"cannot run command {argv[0]!r}: {exc.strerror or exc}",
            retryable=False,
        )
    if isinstance(exc, ValueError):  # "embedded null byte": no exec can ever take this argv
        return protocol.failure(
            "InvalidCommand", f"cannot run command {argv[0]!r}: {exc}", retryable=False
        )
    if isinstance(exc, OSError) and exc.errno in CANNOT_EXEC:
        return protocol.failure(
            "InvalidCommand",
            f"cannot run command {argv[0]!r}: {exc.strerror or exc}",
            retryable=False,
        )
    # out of processes or memory, say: another attempt may well start
    return protocol.failure(
        "AgentError", f"the agent could not start command {argv[0]!r}: {exc!r}", retryable=True
    )


async def run_command(
    argv: list[str],
    sink: Sink | None = None,
    *,
    env: Mapping[str, str] | None = None,
    children: ChildPool | None = None,
    final_exit_codes: Collection[int] = (),
) -> protocol.Outcome:
    """Run to completion in one of ``children``; on cancellation (timeout, cancel) the child
    stops the command and everything it started (SIGTERM, the grace, SIGKILL) first.

    ``sink`` gets each piece of output with its stream; ``env`` is the environment (default:
    the agent's, minus its credentials). A non-zero exit code fails the attempt, retryably
    unless it is one of ``final_exit_codes``. Without ``children`` a pool of one is started
    for the call (it costs a Python start)."""
    if children is None:
        from .children import open_child_pool

        async with open_child_pool(1, 1 << 20) as pool:
            return await run_command(
                argv, sink, env=env, children=pool, final_exit_codes=final_exit_codes
            )
    tail: list[str] = []
    size = 0

    def keep(stream: str, text: str) -> None:
        nonlocal size
        tail.append(text)
        size += len(text)
        while size - len(tail[0]) >= OUTPUT_TAIL:
            size -= len(tail.pop(0))
        if sink is not None:
            sink(stream, text)

    call = protocol.Call(
        target=argv[0],
        argv=argv,
        env=dict(env) if env is not None else task_environment(),
    )
    outcome = await children.call(call, keep)
    if not outcome.ok:
        return outcome
    code = msgspec.json.decode(outcome.result, type=int)
    output = "".join(tail)[-OUTPUT_TAIL:]
    if code != 0:
        final = code in final_exit_codes
        return protocol.failure(
            "CommandFailed",
            f"exit code {code}" + (" (a final exit code: not retried)" if final else ""),
            traceback=output,
            retryable=not final,
        )
    return protocol.success(_json.encode({"exit_code": code, "output": output}))
