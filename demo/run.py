"""Run the demo: a dispatcher, two agents in two pools, a few thousand mixed tasks, a summary.

Everything it starts lives in a RabbitMQ vhost, a Redis key prefix and a SQLite file of its own
(``rexec-demo``, ``.demo/``), so it never disturbs anything else, and every process it starts is
stopped before it returns, also on Ctrl-C or an error.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rexec.client import RexecClient, RexecError
from rexec.schemas.api import SubmitTask, TaskView

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / ".demo"
VHOST = "rexec-demo"
MANAGEMENT = os.environ.get("REXEC_DEMO_MANAGEMENT_URL", "http://127.0.0.1:15672")
AMQP_HOST = os.environ.get("REXEC_DEMO_AMQP_HOST", "127.0.0.1:5672")
API_PORT = int(os.environ.get("REXEC_DEMO_API_PORT", "8611"))
DEADLINE = 50.0

console = Console()


def workload() -> dict[str, list[SubmitTask]]:
    """About 2,500 tasks: fast functions, async I/O, slow ones, flaky and broken ones, commands."""
    alpha = [SubmitTask(pool="alpha", target="demo.tasks:add", args=[i, i]) for i in range(1500)]
    alpha += [
        SubmitTask(pool="alpha", target="demo.tasks:checksum", args=[f"doc-{i}"])
        for i in range(200)
    ]
    alpha += [
        SubmitTask(pool="alpha", command=["echo", f"command task {i}"], timeout=10)
        for i in range(100)
    ]
    alpha += [
        SubmitTask(
            pool="alpha", target="demo.tasks:flaky", args=[0.4], max_attempts=5, retry_backoff=0.1
        )
        for _ in range(60)
    ]
    beta = [SubmitTask(pool="beta", target="demo.tasks:fetch", args=[0.01]) for _ in range(500)]
    beta += [
        SubmitTask(pool="beta", target="demo.tasks:slow", args=[0.25], timeout=10)
        for _ in range(60)
    ]
    beta += [
        SubmitTask(pool="beta", target="demo.tasks:broken", max_attempts=3, retry_backoff=0.1)
        for _ in range(10)
    ]
    return {"alpha": alpha, "beta": beta}


def main() -> int:
    WORKDIR.mkdir(exist_ok=True)
    (WORKDIR / "rexec.db").unlink(missing_ok=True)
    reset_vhost()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REXEC_DATABASE_URL": f"sqlite+aiosqlite:///{WORKDIR / 'rexec.db'}",
        "REXEC_AMQP_URL": f"amqp://guest:guest@{AMQP_HOST}/{quote(VHOST, safe='')}",
        "REXEC_REDIS_PREFIX": "rexec-demo",
        "REXEC_API_PORT": str(API_PORT),
        "REXEC_API_URL": f"http://127.0.0.1:{API_PORT}",
        # The bootstrap admin key of this demo's dispatcher (every API call needs a key).
        "REXEC_API_KEY": "rexec_demo_" + secrets.token_urlsafe(24),
        "REXEC_LOG_DIR": str(WORKDIR / "task-logs"),
    }
    with processes() as started:
        console.print("[bold]rexec demo[/]: starting the dispatcher (rexec serve)")
        dispatcher = started("dispatcher", ["rexec.client.cli", "serve"], env)
        client = RexecClient(env["REXEC_API_URL"], api_key=env["REXEC_API_KEY"])
        wait_for_api(client, dispatcher)
        tasks = workload()
        agents: list[subprocess.Popen[bytes]] = []
        for pool, concurrency in (("alpha", 8), ("beta", 8)):
            client.create_pool(pool, description=f"demo pool {pool}")
            secret = client.create_token(pool, name="demo").secret
            allow = ["--allow", "demo.tasks:*", "--allow", "echo"]
            argv = ["rexec.worker.cli", "--pool", pool, "--concurrency", str(concurrency), *allow]
            agents.append(started(f"agent-{pool}", argv, {**env, "REXEC_AGENT_TOKEN": secret}))
            console.print(f"started an agent for pool [cyan]{pool}[/] (concurrency {concurrency})")
        total = sum(len(batch) for batch in tasks.values())
        began = time.time()
        ids = submit(client, tasks)
        finished = follow(client, total, began)
        views = [t for pool in tasks for t in client.list_tasks(pool=pool, limit=total)]
        summarise(views, began, finished)
        stop_agents(client, agents)
        if len(views) != len(ids):
            console.print(f"[red]expected {len(ids)} tasks, found {len(views)}[/]")
            return 1
        return 0 if all(t.state.terminal for t in views) else 1


def submit(client: RexecClient, tasks: dict[str, list[SubmitTask]]) -> list[str]:
    """Interleave the pools and submit in batches, as a busy client would."""
    ids: list[str] = []
    everything = [t for pair in zip(*tasks.values(), strict=False) for t in pair]
    everything += [t for batch in tasks.values() for t in batch[min(map(len, tasks.values())) :]]
    for start in range(0, len(everything), 250):
        ids += client.submit_many(everything[start : start + 250])
    console.print(f"submitted {len(ids)} tasks in {len(ids) // 250 + 1} batches")
    return ids


def follow(client: RexecClient, total: int, began: float) -> float:
    """A live progress bar until every task reached a terminal state; returns when that was."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("running", total=total)
        while True:
            counts: Counter[str] = Counter()
            for pool in client.list_pools():
                counts.update(pool.tasks)
            done = sum(n for state, n in counts.items() if state not in ("queued", "running"))
            progress.update(
                bar,
                completed=done,
                description=f"queued {counts['queued']:>5}  running {counts['running']:>3}",
            )
            if done >= total:
                return time.time()
            if time.time() - began > DEADLINE:
                raise TimeoutError(f"only {done} of {total} tasks finished within {DEADLINE:.0f}s")
            time.sleep(0.2)


def summarise(views: list[TaskView], began: float, finished: float) -> None:
    table = Table(title="tasks by pool and state (ms from submission: p50/p95/p99)")
    for column in ("pool", "state", "tasks", "attempts", "to start ms", "to end ms"):
        table.add_column(column, justify="right" if column != "pool" else "left")
    groups: dict[tuple[str, str], list[TaskView]] = {}
    for view in views:
        groups.setdefault((view.pool, view.state.value), []).append(view)
    for (pool, state), group in sorted(groups.items()):
        starts = [t.started_at - t.created_at for t in group if t.started_at]
        ends = [t.finished_at - t.created_at for t in group if t.finished_at]
        table.add_row(
            pool, state, str(len(group)), str(sum(t.attempt for t in group)), pct(starts), pct(ends)
        )
    console.print(table)
    elapsed = finished - began
    console.print(
        f"{len(views)} tasks in {elapsed:.1f}s: [bold]{len(views) / elapsed:,.0f} tasks/s[/] end to end "
        f"(submit to last result), retries: {sum(t.attempt - 1 for t in views)}"
    )


def pct(samples: list[float]) -> str:
    if not samples:
        return "-"
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return f"{at(0.5):.0f}/{at(0.95):.0f}/{at(0.99):.0f}"


def reset_vhost() -> None:
    """A clean vhost of the demo's own: nothing left from an earlier run, nothing shared."""
    path = quote(VHOST, safe="")
    try:
        with httpx.Client(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=30) as api:
            api.delete(f"/api/vhosts/{path}")
            api.put(f"/api/vhosts/{path}").raise_for_status()
            perms = {"configure": ".*", "write": ".*", "read": ".*"}
            api.put(f"/api/permissions/{path}/guest", json=perms).raise_for_status()
    except httpx.HTTPError as exc:
        raise SystemExit(
            f"demo: RabbitMQ's management API at {MANAGEMENT} did not answer ({exc}); "
            "run `make services` (it enables the management plugin)"
        ) from None


def wait_for_api(client: RexecClient, dispatcher: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if dispatcher.poll() is not None:
            raise SystemExit(f"demo: rexec serve exited; see {WORKDIR / 'logs' / 'dispatcher.log'}")
        try:
            client.list_pools()
            return
        except RexecError:
            time.sleep(0.1)
    raise SystemExit("demo: the dispatcher's API did not come up within 30s")


def stop_agents(client: RexecClient, agents: list[subprocess.Popen[bytes]]) -> None:
    """Stop the agents while the dispatcher still runs: it takes in their offline events and
    withdraws their broker and Redis logins (stopping everything at once left those behind)."""
    for proc in agents:
        proc.send_signal(signal.SIGTERM)
    for proc in agents:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    path = quote(VHOST, safe="")
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=5) as management:
        while time.monotonic() < deadline:
            online = [a for a in client.list_agents() if a.state == "online"]
            granted = management.get(f"/api/vhosts/{path}/permissions").json()
            if not online and not [g for g in granted if g["user"].startswith("rexec-agent-")]:
                return
            time.sleep(0.1)


@contextmanager
def processes() -> Iterator[Callable[[str, list[str], dict[str, str]], subprocess.Popen[bytes]]]:
    """Start processes in their own sessions; on exit stop them all (SIGTERM, then SIGKILL)."""
    logs = WORKDIR / "logs"
    logs.mkdir(exist_ok=True)
    running: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        running.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in reversed(running):
            with suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        console.print(f"stopped {len(running)} processes; logs in {logs}")


if __name__ == "__main__":
    sys.exit(main())
