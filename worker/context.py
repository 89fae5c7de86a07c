"""What a function task may ask of the agent that runs it, from inside its code.

``secret(name)`` returns the value of a secret the task named at submission
(``rexec submit --secret NAME``, ``client.submit(..., secrets=[NAME])``); the agent resolved it
from its own backend. Values are set for the duration of the call only and removed after it.
Anything the task sends back (its result, an exception, its output) is masked by the agent.
A task that raises :class:`NonRetryable` fails without a further attempt.
"""

from __future__ import annotations

from collections.abc import Mapping

_current: dict[str, str] = {}


class NonRetryable(Exception):
    """Raise it (or a subclass) to fail the attempt for good: no further attempt is made.

    For failures another try cannot fix, as Temporal's ``non_retryable`` errors: a refusal by a
    service that already saw this request, bad input. Any other exception is retried while the
    task has attempts left."""


class SecretNotNamed(LookupError):
    """The task asked for a secret it did not name when it was submitted."""


def secret(name: str) -> str:
    try:
        return _current[name]
    except KeyError:
        named = ", ".join(sorted(_current)) or "none"
        raise SecretNotNamed(
            f"secret {name!r} was not named by this task (named: {named}); submit the task "
            f"with --secret {name} (secrets=[{name!r}] from Python)"
        ) from None


def secret_names() -> list[str]:
    """The secrets the running task named."""
    return sorted(_current)


def _bind(values: Mapping[str, str]) -> None:
    """Called by the child around each call (``rexec.worker.child``)."""
    _current.clear()
    _current.update(values)


def _clear() -> None:
    _current.clear()
