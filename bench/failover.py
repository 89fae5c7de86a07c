"""rexec's failover time: from kill -9 (or SIGSTOP) of an agent running tasks to the last of
those tasks finishing on another agent, with the default heartbeat settings and with a 3 s TTL.

Each figure must stay within heartbeat TTL + one watchdog interval + 1 s (guide, promise 3).
The tasks' first attempts hang and their retries return at once, so the figure is the
failover itself. Times come from the dispatcher's database (when each task finished) against
the moment of the fault.

    python -m bench.failover [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import secrets
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.infra import RunContext, isolated_run
from bench.procs import ManagedProcess, start_module, stop_all, wait_until
from rexec.client import RexecClient
from rexec.schemas.api import TaskState
from rexec.schemas.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = 4
console = Console()


def rexec_env(
    ctx: RunContext, api_port: int, ttl: float, interval: float, db: Path
) -> dict[str, str]:
    return {
        "REXEC_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "REXEC_AMQP_URL": ctx.amqp_url,
        "REXEC_MANAGEMENT_URL": ctx.management_url.replace(
            "://", f"://{ctx.management_auth[0]}:{ctx.management_auth[1]}@", 1
        ),
        "REXEC_REDIS_URL": ctx.redis_url,
        "REXEC_REDIS_PREFIX": ctx.prefix,
        "REXEC_API_PORT": str(api_port),
        "REXEC_API_URL": f"http://127.0.0.1:{api_port}",
        "REXEC_API_KEY": "rexec_bench_" + secrets.token_urlsafe(24),  # the bootstrap admin key
        "REXEC_HEARTBEAT_TTL": str(ttl),
        "REXEC_WATCHDOG_INTERVAL": str(interval),
        "REXEC_LOG_DIR": str(db.parent / "task-logs"),  # the run's own, removed with it
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }


def one_failover(mode: signal.Signals, ttl: float, interval: float, api_port: int) -> float:
    """Seconds from the fault to the last reassigned task finishing."""
    with isolated_run(f"failover-{mode.name.lower()}") as ctx, tempfile.TemporaryDirectory() as tmp:
        env = rexec_env(ctx, api_port, ttl, interval, Path(tmp) / "rexec.db")
        processes: list[ManagedProcess] = []
        try:
            processes.append(
                start_module(
                    "dispatcher", "rexec.client.cli", ["serve"], env, ctx.log_dir / "dispatcher.log"
                )
            )
            client = RexecClient(env["REXEC_API_URL"], api_key=env["REXEC_API_KEY"])
            wait_until(lambda: _answers(env["REXEC_API_URL"]), 30, what="the dispatcher")
            client.create_pool("failover")

            def agent(name: str) -> ManagedProcess:
                token = client.create_token("failover").secret
                argv = [
                    "--pool",
                    "failover",
                    "--concurrency",
                    str(TASKS),
                    "--allow",
                    "bench.failover_tasks:*",
                ]
                proc = start_module(
                    name,
                    "rexec.worker.cli",
                    argv,
                    {**env, "REXEC_AGENT_TOKEN": token},
                    ctx.log_dir / f"{name}.log",
                )
                processes.append(proc)
                return proc

            def online(count: int) -> bool:
                return (
                    sum(a.state == "online" for a in client.list_agents(pool="failover")) >= count
                )

            victim = agent("victim")
            wait_until(lambda: online(1), 30, what="the victim agent")
            ids = [
                client.submit(
                    "failover",
                    "bench.failover_tasks:first_attempt_hangs",
                    args=[f"{tmp}/m{i}"],
                    max_attempts=3,
                ).id
                for i in range(TASKS)
            ]
            wait_until(
                lambda: all(client.get(i).state is TaskState.RUNNING for i in ids),
                30,
                what="tasks to start",
            )
            agent("survivor")
            wait_until(lambda: online(2), 30, what="the survivor agent")

            fault_at = time.time()
            victim.popen.send_signal(mode)
            done = client.wait(ids, timeout=120)
            if mode is signal.SIGSTOP:
                victim.popen.send_signal(signal.SIGCONT)
            assert all(t.state is TaskState.SUCCEEDED and t.result == "retry" for t in done), done
            return max(t.finished_at or 0.0 for t in done) - fault_at
        finally:
            for proc in reversed(processes):
                proc.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--api-port", type=int, default=8690)
    args = parser.parse_args()
    defaults = Settings()
    configs = [
        ("defaults", defaults.heartbeat_ttl, defaults.watchdog_interval),
        ("ttl 3 s", 3.0, defaults.watchdog_interval),
    ]
    table = Table(title="rexec failover: fault to last reassigned task finished (seconds)")
    for column in (
        "settings",
        "fault",
        "runs",
        "median",
        "max",
        "bound (TTL + interval + 1 s)",
        "within",
    ):
        table.add_column(column)
    results = []
    try:
        for label, ttl, interval in configs:
            for mode in (signal.SIGKILL, signal.SIGSTOP):
                runs = [
                    one_failover(mode, ttl, interval, args.api_port) for _ in range(args.repeat)
                ]
                bound = ttl + interval + 1.0
                row = {
                    "settings": label,
                    "heartbeat_ttl": ttl,
                    "watchdog_interval": interval,
                    "fault": "kill -9" if mode is signal.SIGKILL else "SIGSTOP",
                    "runs": [round(r, 2) for r in runs],
                    "median": round(statistics.median(runs), 2),
                    "max": round(max(runs), 2),
                    "bound": bound,
                    "within": max(runs) <= bound,
                }
                results.append(row)
                table.add_row(
                    label,
                    row["fault"],
                    ", ".join(f"{r:.2f}" for r in runs),
                    f"{row['median']:.2f}",
                    f"{row['max']:.2f}",
                    f"{bound:.1f}",
                    "yes" if row["within"] else "NO",
                )
                console.print(f"{label} {row['fault']}: {row['runs']}")
    finally:
        stop_all()
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"failover-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"failover": results}, indent=2) + "\n")
    console.print(f"written {out}")


if __name__ == "__main__":
    main()
