"""How the ``rexec`` CLI shows things: rich tables for people, JSON for scripts."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec
from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rexec.schemas.api import (
    AgentView,
    ApiKeyView,
    AuditEntry,
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


NARROW = 110
NARROWER = 90
"""Terminal columns below which ``rexec tasks`` leaves out columns (agent and created, then
pool), so every task stays on one line with its full id."""


def listing(title: str) -> Table:
    """A listing for a terminal: a header rule and no cell borders, so more of it fits."""
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )


def fitted(
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[str | Text]],
    width: int | None,
    drop: Sequence[str] = (),
) -> Table:
    """A listing of one line per row: the columns named in ``drop`` are left out, in that
    order, until the rest fits ``width`` (rich, left to squeeze, cuts numbers short).
    ``columns`` are (header, justify)."""
    widths = [
        max([len(header), *(len(str(row[i])) for row in rows)])
        for i, (header, _) in enumerate(columns)
    ]
    kept = list(range(len(columns)))
    names = [header for header, _ in columns]
    for name in drop:
        if width is None or sum(widths[i] for i in kept) + 3 * (len(kept) - 1) + 2 <= width:
            break
        kept.remove(names.index(name))
    table = listing(title)
    for i in kept:
        header, justify = columns[i]
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*(row[i] for i in kept))
    return table


def to_json(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    try:
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):  # a time no calendar shows: say it as is
        return f"{ts:.0f}"


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


HIDDEN = "(sensitive: hidden)"
"""Shown for the arguments of a sensitive task, which a viewer key does not get."""


def hidden(task: TaskView) -> bool:
    """A sensitive task whose arguments the API left out (a viewer key asked)."""
    return task.sensitive and not (task.args or task.kwargs or task.argv)


def task_label(task: TaskView) -> str:
    if task.kind != "command":
        return task.target
    return f"{task.target} {HIDDEN}" if hidden(task) else " ".join(task.argv)


def outcome(task: TaskView) -> str:
    """The result or the error of a finished task, in one line."""
    if task.state is TaskState.SUCCEEDED:
        return short(task.result)
    if task.error:
        kind = task.error.get("type", "error")
        return short(f"{kind}: {task.error.get('message', '')}")
    return ""


def pools_table(pools: Sequence[PoolView], width: int | None = None) -> Table:
    columns = [("pool", "left"), ("status", "left"), ("max running", "right")]
    columns += [(state, "right") for state in STATE_COLUMNS] + [("created", "left")]
    rows: list[list[str | Text]] = [
        [
            Text(pool.name, style="bold"),
            Text("draining", style="yellow") if pool.draining else Text("active", style="green"),
            "-" if pool.max_running is None else str(pool.max_running),
            *(
                Text(str(pool.tasks.get(state, 0)), style=STATE_STYLE[TaskState(state)])
                for state in STATE_COLUMNS
            ),
            when(pool.created_at),
        ]
        for pool in pools
    ]
    drop = ["created", "expired", "cancelled", "timed_out", "max running"]
    return fitted("pools", columns, rows, width, drop)


def tokens_table(tokens: Sequence[TokenView]) -> Table:
    table = listing("agent tokens")
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


def api_keys_table(keys: Sequence[ApiKeyView]) -> Table:
    table = listing("API keys")
    for column in ("id", "name", "role", "prefix", "state", "created", "last used", "expires"):
        table.add_column(column)
    styles = {"active": "green", "expired": "bright_black", "revoked": "red"}
    for key in keys:
        table.add_row(
            key.id,
            key.name,
            key.role.value,
            key.prefix + "…",
            Text(key.state, style=styles.get(key.state, "")),
            when(key.created_at),
            ago(key.last_used_at),
            when(key.expires_at) if key.expires_at else "never",
        )
    return table


def audit_table(entries: Sequence[AuditEntry]) -> Table:
    table = listing("audit log")
    for column in ("at", "who", "action", "target", "detail"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        who = (
            "bootstrap"
            if entry.actor_kind == "bootstrap"
            else f"{entry.actor_kind} {entry.actor_id}"
        )
        if entry.actor_name and entry.actor_kind != "bootstrap":
            who += f" ({entry.actor_name})"
        detail = ", ".join(f"{k}={v}" for k, v in entry.detail.items() if v is not None)
        table.add_row(when(entry.at), who, entry.action, entry.target, detail)
    return table


def agents_table(agents: Sequence[AgentView], width: int | None = None) -> Table:
    names = ("agent", "pool", "state", "heartbeat", "running", "host", "pid", "registered")
    columns = [(c, "right" if c in ("running", "pid") else "left") for c in names]
    styles = {"online": "green", "offline": "bright_black", "lost": "red", "unknown": "yellow"}
    rows: list[list[str | Text]] = [
        [
            agent.id,
            agent.pool,
            Text(agent.state, style=styles.get(agent.state, "")),
            age(agent.heartbeat_age) + (" ago" if agent.heartbeat_age is not None else ""),
            f"{agent.running}/{agent.concurrency}",
            agent.hostname,
            str(agent.pid),
            when(agent.registered_at),
        ]
        for agent in agents
    ]
    return fitted("agents", columns, rows, width, ["registered", "pid", "host"])


def tasks_table(tasks: Sequence[TaskView], title: str = "tasks", width: int | None = None) -> Table:
    """One line per task, its full id first. Target and outcome are cut to what the terminal
    leaves them (rich, left to squeeze, can squeeze a narrow column away). A terminal narrower
    than ``NARROW`` columns loses the agent and created columns, one narrower than ``NARROWER``
    the pool too: ``rexec status ID`` has everything."""
    width = width or 240
    pool_width = min(24, max([4, *(len(t.pool) for t in tasks)]))
    agent_width = min(40, max([5, *(len(t.agent_id or "-") for t in tasks)]))
    optional = {"pool": width >= NARROWER, "agent": width >= NARROW, "created": width >= NARROW}
    fixed = {
        "task": 32,
        "pool": pool_width,
        "state": 9,
        "attempt": 7,
        "agent": agent_width,
        "created": 8,
    }
    shown = [c for c in fixed if optional.get(c, True)]
    columns = len(shown) + 2  # and target, outcome
    # SIMPLE_HEAD: a blank edge each side, three columns between cells (padding, rule, padding).
    room = width - sum(fixed[c] for c in shown) - 3 * (columns - 1) - 2
    target_width = max(8, min(40, room * 2 // 5))
    outcome_width = max(8, room - target_width)
    order = ["task", "pool", "target", "state", "attempt", "agent", "created", "outcome"]
    table = listing(title)
    for column in order:
        if optional.get(column, True):
            table.add_column(column, no_wrap=True)
    now = time.time()
    for task in tasks:
        cells: dict[str, RenderableType] = {
            "task": task.id,
            "pool": short(task.pool, pool_width),
            "target": short(task_label(task), target_width),
            "state": state_text(task.state),
            "attempt": f"{task.attempt}/{task.max_attempts}",
            "agent": task.agent_id or "-",
            "created": ago(task.created_at, now),
            "outcome": short(outcome(task), outcome_width),
        }
        table.add_row(*(cells[c] for c in order if optional.get(c, True)))
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
    if task.kind == "function" and hidden(task):
        rows += [("args", HIDDEN), ("kwargs", HIDDEN)]
    elif task.kind == "function":
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
    table = listing(f"history of {task_id}")
    for column in ("at", "attempt", "from", "to", "agent", "reason", "by"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            when(entry.at) + f".{int((entry.at % 1) * 1000):03d}",
            str(entry.attempt),
            entry.from_state or "-",
            state_text(entry.to_state),
            entry.agent_id or "-",
            entry.reason or "",
            entry.by or "",
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


def top_pools_table(snapshot: top.Snapshot, rates: top.Rates, width: int | None = None) -> Table:
    """Pools with the broker's queue depth, live agents, task counts and completions per second."""
    figures = snapshot.figures
    columns = [("pool", "left"), ("status", "left"), ("agents", "right"), ("queue depth", "right")]
    columns += [(state, "right") for state in STATE_COLUMNS]
    columns += [("ok/s", "right"), ("failed/s", "right")]
    rows: list[list[str | Text]] = []
    for pool in snapshot.pools:
        pool_rates = rates.of(pool.name)
        depth = None if figures is None else figures.queue_depth.get(pool.name)
        live = None if figures is None else figures.agents_live.get(pool.name, 0)
        rows.append(
            [
                Text(pool.name, style="bold"),
                Text("draining", style="yellow")
                if pool.draining
                else Text("active", style="green"),
                "-" if live is None else f"{live:.0f}",
                "-" if depth is None else f"{depth:,.0f}",
                *(
                    Text(f"{pool.tasks.get(state, 0):,}", style=STATE_STYLE[TaskState(state)])
                    for state in STATE_COLUMNS
                ),
                Text(rate(None if pool_rates is None else pool_rates.succeeded), style="green"),
                Text(rate(None if pool_rates is None else pool_rates.failed), style="red"),
            ]
        )
    drop = ["expired", "cancelled", "timed_out", "status"]
    return fitted("pools", columns, rows, width, drop)


def top_agents_table(snapshot: top.Snapshot, width: int | None = None) -> Table:
    """Agents with their heartbeat age and the tasks they run now."""
    names = ("agent", "pool", "state", "heartbeat", "running", "tasks", "host", "pid")
    columns = [(c, "right" if c in ("running", "pid") else "left") for c in names]
    styles = {"online": "green", "offline": "bright_black", "lost": "red", "unknown": "yellow"}
    running_on = snapshot.running_on()
    rows: list[list[str | Text]] = []
    for agent in snapshot.agents:
        tasks = running_on.get(agent.id, [])
        shown = " ".join(t.id[:8] for t in tasks[:3])
        if len(tasks) > 3:
            shown += f" +{len(tasks) - 3}"
        rows.append(
            [
                agent.id,
                agent.pool,
                Text(agent.state, style=styles.get(agent.state, "")),
                age(agent.heartbeat_age) + (" ago" if agent.heartbeat_age is not None else ""),
                f"{agent.running}/{agent.concurrency}",
                shown or "-",
                agent.hostname,
                str(agent.pid),
            ]
        )
    return fitted("agents", columns, rows, width, ["pid", "host"])


def running_table(snapshot: top.Snapshot) -> Table:
    tasks = sorted(snapshot.running, key=lambda t: t.started_at or t.created_at)
    more = len(tasks) - TOP_RUNNING_ROWS
    title = "running tasks" + (f" (oldest {TOP_RUNNING_ROWS} of {len(tasks)})" if more > 0 else "")
    table = listing(title)
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
    api_url: str,
    snapshot: top.Snapshot,
    rates: top.Rates,
    interval: float,
    width: int | None = None,
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
        top_pools_table(snapshot, rates, width),
        top_agents_table(snapshot, width),
        running_table(snapshot),
        tasks_table(snapshot.recent, "recent tasks", width),
    ]
    return Group(*parts)
