"""How the ``rexec`` CLI shows things: rich tables for people, JSON for scripts."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from schemas.api import (
    AgentView,
    PoolView,
    TaskHistoryEntry,
    TaskState,
    TaskView,
    TokenView,
)

STATE_STYLE = {
    TaskState.QUEUED: "cyan",
    TaskState.RUNNING: "yellow",
    TaskState.SUCCEEDED: "green",
    TaskState.FAILED: "red",
    TaskState.CANCELLED: "magenta",
    TaskState.TIMED_OUT: "red",
    TaskState.EXPIRED: "bright_black",
}
STATE_COLUMNS = [s.value for s in TaskState]


def to_json(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    return age(max(0.0, (time.time() if now is None else now) - ts)) + " ago"


def state_text(state: str) -> Text:
    try:
        style = STATE_STYLE[TaskState(state)]
    except ValueError:
        style = ""
    return Text(state, style=style)


def short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


def task_label(task: TaskView) -> str:
    return " ".join(task.argv) if task.kind == "command" else task.target


def outcome(task: TaskView) -> str:
    """The result or the error of a finished task, in one line."""
    if task.state is TaskState.SUCCEEDED:
        return short(task.result)
    if task.error:
        kind = task.error.get("type", "error")
        return short(f"{kind}: {task.error.get('message', '')}")
    return ""


def pools_table(pools: Sequence[PoolView]) -> Table:
    table = Table(title="pools", title_justify="left")
    table.add_column("pool", style="bold", no_wrap=True)
    table.add_column("status")
    for state in STATE_COLUMNS:
        table.add_column(state, justify="right", style=STATE_STYLE[TaskState(state)])
    table.add_column("created")
    for pool in pools:
        table.add_row(
            pool.name,
            Text("draining", style="yellow") if pool.draining else Text("active", style="green"),
            *(str(pool.tasks.get(state, 0)) for state in STATE_COLUMNS),
            when(pool.created_at),
        )
    return table


def tokens_table(tokens: Sequence[TokenView]) -> Table:
    table = Table(title="agent tokens", title_justify="left")
    for column in ("id", "pool", "name", "prefix", "state", "created", "last used", "expires"):
        table.add_column(column)
    styles = {"active": "green", "expired": "bright_black", "revoked": "red"}
    for token in tokens:
        table.add_row(
            token.id,
            token.pool,
            token.name,
            token.prefix + "…",
            Text(token.state, style=styles.get(token.state, "")),
            when(token.created_at),
            ago(token.last_used_at),
            when(token.expires_at) if token.expires_at else "never",
        )
    return table


def agents_table(agents: Sequence[AgentView]) -> Table:
    table = Table(title="agents", title_justify="left")
    for column in ("agent", "pool", "state", "heartbeat", "running", "host", "pid", "registered"):
        table.add_column(column, justify="right" if column in ("running", "pid") else "left")
    styles = {"online": "green", "offline": "bright_black", "lost": "red", "unknown": "yellow"}
    for agent in agents:
        table.add_row(
            agent.id,
            agent.pool,
            Text(agent.state, style=styles.get(agent.state, "")),
            age(agent.heartbeat_age) + (" ago" if agent.heartbeat_age is not None else ""),
            f"{agent.running}/{agent.concurrency}",
            agent.hostname,
            str(agent.pid),
            when(agent.registered_at),
        )
    return table


def tasks_table(tasks: Sequence[TaskView], title: str = "tasks") -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("task", "pool", "target", "state", "attempt", "agent", "created", "outcome"):
        table.add_column(column, no_wrap=column in ("task", "agent"))
    now = time.time()
    for task in tasks:
        table.add_row(
            task.id,
            task.pool,
            short(task_label(task), 40),
            state_text(task.state),
            f"{task.attempt}/{task.max_attempts}",
            task.agent_id or "-",
            ago(task.created_at, now),
            outcome(task),
        )
    return table


def task_detail(task: TaskView) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    rows: list[tuple[str, RenderableType]] = [
        ("task", task.id),
        ("pool", task.pool),
        ("kind", task.kind),
        ("target" if task.kind == "function" else "command", task_label(task)),
    ]
    if task.kind == "function":
        rows += [("args", short(task.args, 200)), ("kwargs", short(task.kwargs, 200))]
    rows += [
        ("state", state_text(task.state)),
        ("attempt", f"{task.attempt} of {task.max_attempts}"),
        ("agent", task.agent_id or "-"),
        ("timeout", "-" if task.timeout is None else f"{task.timeout:g}s"),
        ("key", task.idempotency_key or "-"),
        ("created", when(task.created_at)),
        ("started", when(task.started_at)),
        ("finished", when(task.finished_at)),
    ]
    if task.cancel_requested and not task.state.terminal:
        rows.append(("cancel", "requested"))
    if task.state is TaskState.SUCCEEDED:
        rows.append(("result", short(task.result, 2000)))
    if task.error:
        rows.append(
            ("error", f"{task.error.get('type', 'error')}: {task.error.get('message', '')}")
        )
        if task.error.get("traceback"):
            rows.append(("traceback", str(task.error["traceback"]).rstrip()))
    if task.log_ref:
        rows.append(("log", f"{task.log_ref} (on its agent: `rexec logs {task.id}`)"))
    if task.log_tail:
        rows.append(("log tail", Text(task.log_tail.rstrip("\n"))))
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def history_table(task_id: str, entries: Iterable[TaskHistoryEntry]) -> Table:
    table = Table(title=f"history of {task_id}", title_justify="left")
    for column in ("at", "attempt", "from", "to", "agent", "reason"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            when(entry.at) + f".{int((entry.at % 1) * 1000):03d}",
            str(entry.attempt),
            entry.from_state or "-",
            state_text(entry.to_state),
            entry.agent_id or "-",
            entry.reason or "",
        )
    return table


def wait_line(task: TaskView) -> Text:
    line = Text(f"{task.id} ")
    line.append_text(state_text(task.state))
    detail = outcome(task)
    if detail:
        line.append(f" {detail}")
    return line


def top_view(
    api_url: str,
    pools: Sequence[PoolView],
    agents: Sequence[AgentView],
    tasks: Sequence[TaskView],
    error: str | None = None,
) -> RenderableType:
    header = Text(f"rexec top  {api_url}  {when(time.time())}  (Ctrl-C to quit)", style="bold")
    parts: list[RenderableType] = [header]
    if error:
        parts.append(Panel(Text(error, style="red"), title="API error"))
    parts += [pools_table(pools), agents_table(agents), tasks_table(tasks, "recent tasks")]
    return Group(*parts)
