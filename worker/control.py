"""The agent's control queue (``rexec.agent.<id>``): the dispatcher stops attempts it runs.

``cancel`` stops the attempt and reports ``cancelled``; ``lease_lost`` means another agent owns
the attempt now, so it is stopped and reports nothing. Malformed messages are logged and acked:
a control message is advice, and a retry of a bad one could never succeed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage

from rexec.schemas import messages

from .attempts import Attempts, StopReason

log = logging.getLogger("rexec.agent.control")


class ControlHandler:
    def __init__(
        self,
        attempts: Attempts,
        agent_id: str,
        lease_lost: Callable[[str, int, str | None], None],
    ) -> None:
        self.attempts = attempts
        self.agent_id = agent_id
        self._lease_lost = lease_lost

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            self.apply(messages.decode_control(message.body))
        except messages.MessageError as exc:
            log.error(
                "malformed control message dropped",
                extra={"agent_id": self.agent_id, "reason": str(exc)},
            )
        try:
            await message.ack()
        except Exception as exc:  # channel lost: the message comes back, and is idempotent
            log.warning("control ack failed", extra={"agent_id": self.agent_id, "error": repr(exc)})

    def apply(self, control: messages.Control) -> None:
        fields = {
            "agent_id": self.agent_id,
            "task_id": control.task_id,
            "attempt": control.attempt,
        }
        attempt = self.attempts.get(control.task_id, control.attempt)
        if attempt is None:
            log.info(f"{control.action} for an attempt not running here", extra=fields)
        elif control.action == "cancel":
            if attempt.stop(StopReason.CANCEL):
                log.info("cancel requested: stopping the attempt", extra=fields)
        else:
            self._lease_lost(control.task_id, control.attempt, None)
