"""The CLI's tables on narrow terminals: one line per row, full task ids, numbers never cut."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from rexec.client import cli_format as fmt
from rexec.schemas.api import AgentView, PoolView, TaskState, TaskView

NOW = time.time()


def task(n: int, state: TaskState, target: str, **fields: object) -> TaskView:
    values: dict[str, object] = {
        "id": f"{n:032x}",
        "pool": "etl",
        "kind": "function",
        "target": target,
        "argv": [],
        "args": [],
        "kwargs": {},
        "state": state,
        "attempt": 1,
        "max_attempts": 3,
        "agent_id": "vm-8d0560c6",
        "result": None,
        "error": None,
        "timeout": None,
        "idempotency_key": None,
        "created_at": NOW - 14,
        "started_at": NOW - 12,
        "finished_at": NOW - 11,
    }
    values.update(fields)
    return TaskView(**values)  # type: ignore[arg-type]


TASKS = [
    task(
        1, TaskState.FAILED, "demo.tasks:broken", error={"type": "ValueError", "message": "x" * 90}
    ),
    task(
        2, TaskState.SUCCEEDED, "", kind="command", argv=["echo", "hello"], result={"out": "y" * 90}
    ),
    task(3, TaskState.TIMED_OUT, "myapp.a.very.long.module.path.indeed:function_name"),
    task(4, TaskState.RUNNING, "demo.tasks:slow", agent_id="host-with-a-long-name-1234abcd"),
]


def render(table: object, width: int) -> list[str]:
    console = Console(width=width, record=True)
    console.print(table)
    return [line.strip() for line in console.export_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("width", "columns"),
    [
        (80, ["task", "target", "state", "attempt", "outcome"]),
        (100, ["task", "pool", "target", "state", "attempt", "outcome"]),
        (160, ["task", "pool", "target", "state", "attempt", "agent", "created", "outcome"]),
    ],
)
def test_tasks_keep_one_line_each_and_their_full_ids(width: int, columns: list[str]) -> None:
    lines = render(fmt.tasks_table(TASKS, width=width), width)
    assert lines[0] == "tasks"
    assert lines[1].split() == columns
    rows = lines[3:]
    assert len(rows) == len(TASKS), "\n".join(lines)
    for row, t in zip(rows, TASKS, strict=True):
        assert len(row) <= width
        assert row.split()[0] == t.id
        assert t.state.value in row.split()
    if "agent" in columns:
        assert "host-with-a-long-name-1234abcd" in rows[3]


def test_pools_never_cut_a_count() -> None:
    pools = [
        PoolView(
            name="beta-long-name",
            description="",
            draining=True,
            created_at=NOW,
            tasks={"succeeded": 1234567, "failed": 3},
        )
    ]
    for width in (80, 100, 200):
        lines = render(fmt.pools_table(pools, width), width)
        row = next(line for line in lines if line.startswith("beta-long-name"))
        assert "1234567" in row.split() and "draining" in row, lines
        assert all(len(line) <= width for line in lines)
    assert "created" not in render(fmt.pools_table(pools, 80), 80)[1]
    assert "created" in render(fmt.pools_table(pools, 200), 200)[1]


def test_agents_on_a_narrow_terminal() -> None:
    agents = [
        AgentView(
            id="vm-8d0560c6",
            pool="etl",
            hostname="vm",
            pid=4060,
            concurrency=8,
            state="online",
            registered_at=NOW,
            last_seen_at=NOW,
            heartbeat_age=0.4,
            running=3,
        )
    ]
    lines = render(fmt.agents_table(agents, 70), 70)
    assert lines[1].split() == ["agent", "pool", "state", "heartbeat", "running", "host", "pid"]
    assert lines[3].split() == ["vm-8d0560c6", "etl", "online", "0.4s", "ago", "3/8", "vm", "4060"]


def test_a_time_no_calendar_shows_is_printed_as_a_number() -> None:
    assert fmt.when(1e16) == "10000000000000000"
    assert fmt.when(None) == "-"
