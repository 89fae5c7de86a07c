"""Which targets this agent may run: ``--allow`` glob patterns, matched case-sensitively."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from rexec.schemas.messages import TaskMessage


def task_target(task: TaskMessage) -> str:
    """What the patterns match: ``module:function``, or the program (argv[0]) of a command."""
    if task.kind == "command" and task.argv:
        return task.argv[0]
    return task.target


def allowed(target: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(target, pattern) for pattern in patterns)


def refusal(target: str, patterns: Sequence[str]) -> str:
    shown = ", ".join(repr(p) for p in patterns) or "(none)"
    return (
        f"target {target!r} is not allowed on this agent (allowed patterns: {shown}); "
        "start the agent with an --allow pattern that matches it"
    )


def preload_modules(patterns: Sequence[str]) -> list[str]:
    """The modules the allow patterns name outright (``pkg.jobs:*`` names ``pkg.jobs``): the
    children import them when they start, as Celery's workers import their task modules, so a
    child's first task does not pay for the import."""
    modules: list[str] = []
    for pattern in patterns:
        module, sep, _ = pattern.partition(":")
        if sep and module and not any(c in module for c in "*?[") and module not in modules:
            modules.append(module)
    return modules
