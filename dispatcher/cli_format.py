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

from . import top

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


TOP_RUNNING_ROWS = 10
"""Running tasks listed by ``rexec top`` (the agents table counts them all)."""


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def top_pools_table(snapshot: top.Snapshot, rates: top.Rates) -> Table:
    """Pools with the broker's queue depth, live agents, task counts and completions per second."""
    figures = snapshot.figures
    table = Table(title="pools", title_justify="left")
    table.add_column("pool", style="bold", no_wrap=True)
    table.add_column("status")
    table.add_column("agents", justify="right")
    table.add_column("queue depth", justify="right")
    for state in STATE_COLUMNS:
        table.add_column(state, justify="right", style=STATE_STYLE[TaskState(state)])
    table.add_column("ok/s", justify="right", style="green")
    table.add_column("failed/s", justify="right", style="red")
    for pool in snapshot.pools:
        pool_rates = rates.of(pool.name)
        depth = None if figures is None else figures.queue_depth.get(pool.name)
        live = None if figures is None else figures.agents_live.get(pool.name, 0)
        table.add_row(
            pool.name,
            Text("draining", style="yellow") if pool.draining else Text("active", style="green"),
            "-" if live is None else f"{live:.0f}",
            "-" if depth is None else f"{depth:,.0f}",
            *(f"{pool.tasks.get(state, 0):,}" for state in STATE_COLUMNS),
            rate(None if pool_rates is None else pool_rates.succeeded),
            rate(None if pool_rates is None else pool_rates.failed),
        )
    return table


def top_agents_table(snapshot: top.Snapshot) -> Table:
    """Agents with their heartbeat age and the tasks they run now."""
    table = Table(title="agents", title_justify="left")
    for column in ("agent", "pool", "state", "heartbeat", "running", "tasks", "host", "pid"):
        table.add_column(column, justify="right" if column in ("running", "pid") else "left")
    styles = {"online": "green", "offline": "bright_black", "lost": "red", "unknown": "yellow"}
    running_on = snapshot.running_on()
    for agent in snapshot.agents:
        tasks = running_on.get(agent.id, [])
        shown = " ".join(t.id[:8] for t in tasks[:3])
        if len(tasks) > 3:
            shown += f" +{len(tasks) - 3}"
        table.add_row(
            agent.id,
            agent.pool,
            Text(agent.state, style=styles.get(agent.state, "")),
            age(agent.heartbeat_age) + (" ago" if agent.heartbeat_age is not None else ""),
            f"{agent.running}/{agent.concurrency}",
            shown or "-",
            agent.hostname,
            str(agent.pid),
        )
    return table


def running_table(snapshot: top.Snapshot) -> Table:
    tasks = sorted(snapshot.running, key=lambda t: t.started_at or t.created_at)
    more = len(tasks) - TOP_RUNNING_ROWS
    title = "running tasks" + (f" (oldest {TOP_RUNNING_ROWS} of {len(tasks)})" if more > 0 else "")
    table = Table(title=title, title_justify="left")
    for column in ("task", "pool", "target", "agent", "attempt", "running for"):
        table.add_column(column, no_wrap=column in ("task", "agent"))
    for task in tasks[:TOP_RUNNING_ROWS]:
        table.add_row(
            task.id,
            task.pool,
            short(task_label(task), 40),
            task.agent_id or "-",
            f"{task.attempt}/{task.max_attempts}",
            age(None if task.started_at is None else max(0.0, snapshot.at - task.started_at)),
        )
    return table


def trouble_line(figures: top.Figures | None) -> Text:
    """Requeues, stale events and dead letters since the dispatcher started: zero is healthy."""
    line = Text("since the dispatcher started: ")
    if figures is None:
        line.append("its /metrics did not answer", style="yellow")
        return line
    for label, counts in (
        ("requeues", figures.requeues),
        ("stale events", figures.stale_events),
        ("dead-lettered", figures.dead_lettered),
    ):
        total = sum(counts.values())
        detail = ", ".join(f"{k} {v:.0f}" for k, v in sorted(counts.items()) if v)
        line.append(f"{label} {total:.0f}", style="red" if total else "green")
        if detail:
            line.append(f" ({detail})")
        line.append("   ")
    return line


def top_view(
    api_url: str, snapshot: top.Snapshot, rates: top.Rates, interval: float
) -> RenderableType:
    totals = [rates.of(p.name) for p in snapshot.pools]
    succeeded = sum(r.succeeded for r in totals if r)
    failed = sum(r.failed for r in totals if r)
    header = Text(
        f"rexec top  {api_url}  {when(snapshot.at)}  every {interval:g}s  (Ctrl-C to quit)",
        style="bold",
    )
    throughput = Text("throughput: ")
    throughput.append(f"{succeeded:,.1f} succeeded/s", style="green")
    throughput.append("  ")
    throughput.append(f"{failed:,.1f} failed/s", style="red" if failed else "")
    throughput.append(f"  (last {rates.window:g}s)")
    parts: list[RenderableType] = [header]
    if snapshot.error:
        parts.append(Panel(Text(snapshot.error, style="red"), title="API error"))
        return Group(*parts)
    parts += [
        throughput,
        trouble_line(snapshot.figures),
        top_pools_table(snapshot, rates),
        top_agents_table(snapshot),
        running_table(snapshot),
        tasks_table(snapshot.recent, "recent tasks"),
    ]
    return Group(*parts)
