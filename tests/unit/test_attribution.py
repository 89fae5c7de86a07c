"""Events are believed only from the broker user issued to the agent they name."""

from __future__ import annotations

from rexec.dispatcher.events import misattributed
from rexec.schemas import messages


def started(agent_id: str) -> messages.Started:
    return messages.Started(task_id="t", attempt=1, agent_id=agent_id, at=0.0)


def test_an_agent_reports_for_itself() -> None:
    users: dict[str, str | None] = {"a": "rexec-agent-a"}
    assert misattributed("rexec-agent-a", [started("a")], users) is None


def test_events_of_a_scoped_agent_from_another_user_are_refused() -> None:
    users: dict[str, str | None] = {"a": "rexec-agent-a"}
    for publisher in ("rexec-agent-b", "guest", None):
        reason = misattributed(publisher, [started("a")], users)
        assert reason is not None and "own broker user 'rexec-agent-a'" in reason


def test_an_agent_user_cannot_report_for_an_agent_without_credentials() -> None:
    users: dict[str, str | None] = {"legacy": None}
    reason = misattributed("rexec-agent-b", [started("legacy")], users)
    assert reason is not None and "of agent b published events of agent legacy" in reason


def test_agents_with_shared_credentials_are_taken_at_their_word() -> None:
    """Agents without users of their own (shared mode, 1.0 agents) cannot be told apart."""
    users: dict[str, str | None] = {"legacy": None}
    assert misattributed("guest", [started("legacy")], users) is None
    assert misattributed(None, [started("legacy")], users) is None
