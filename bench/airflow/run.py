"""Airflow 3 executors compared on the same DAGs: rexec, Edge, Celery and Local.

For each system (rotated between repetitions): its own Airflow (scheduler, API server, DAG
processor on SQLite) and two workers of concurrency 4, then

- **fan-out**: a warm-up run, then ``rexec_fanout`` with 100 mapped tasks: the wall time from
  the trigger to the run's end, and each try's queued-to-running (``start_date -
  queued_when``) p50/p95;
- **kill** and **stop** (remote systems only): ``bench_long``'s 30 s task starts, 2 s later its
  worker's whole process tree gets SIGKILL (a node crash) or SIGSTOP (a frozen VM); the figure
  is the seconds from the signal until the task starts again (the next try, or the same try
  restarted), "> ceiling" where that does not happen within the ceiling.

The CPU load is sampled once a second during every case: Airflow itself takes much of the two
cores. Results go to ``bench/results/airflow-<date>.json`` (rewritten after every system, so an
interrupted run keeps what it measured).

    REXEC_AIRFLOW_VENV=.venv-airflow-bench .venv/bin/python -m bench.airflow.run \\
        [--systems local,rexec,celery,edge] [--cases fanout,kill,stop] [--repeat 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from bench.airflow.systems import SYSTEMS, System, signal_tree, wait_for
from bench.machine import describe
from bench.stats import percentile
from tests.airflow.harness import AIRFLOW_VENV_VAR, AirflowInstance, _timestamp, airflow_venv
from tests.support import REPO

RESULTS = REPO / "bench" / "results"
BENCH_DAGS = Path(__file__).resolve().parent / "dags"
FANOUT_DAG = REPO / "tests" / "airflow" / "dags" / "rexec_fanout.py"
FANOUT_TASKS = 100
WARMUP_TASKS = 8
LONG_SECONDS = 30.0
FAULT_AFTER = 2.0
"""Seconds after the 30 s task's start when its worker gets the signal."""
CEILING = 400.0
RUN_TIMEOUT = 1200.0
VENV_PACKAGES = (
    "apache-airflow",
    "apache-airflow-core",
    "apache-airflow-task-sdk",
    "apache-airflow-providers-edge3",
    "apache-airflow-providers-celery",
    "celery",
    "kombu",
    "rexec",
)
SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


class LoadSampler:
    """The machine's load average and CPU use, sampled once a second while a case runs."""

    def __init__(self) -> None:
        self.loads: list[float] = []
        self.cpu: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        psutil.cpu_percent(None)
        while not self._stop.wait(1.0):
            self.loads.append(os.getloadavg()[0])
            self.cpu.append(psutil.cpu_percent(None))

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float | None]:
        def mean(values: list[float]) -> float | None:
            return round(sum(values) / len(values), 2) if values else None

        return {
            "load1_mean": mean(self.loads),
            "load1_max": max(self.loads) if self.loads else None,
            "cpu_percent_mean": mean(self.cpu),
        }


def finished_run(airflow: AirflowInstance, dag_id: str, run_id: str, timeout: float) -> Any:
    def done() -> Any:
        run = airflow.dag_run(dag_id, run_id)
        return run if run["state"] in {"success", "failed"} else None

    return wait_for(done, timeout, f"run {dag_id}/{run_id} finished", interval=0.5)


def fanout(system: System, airflow: AirflowInstance) -> dict[str, Any]:
    """Wall time of a 100-task fan-out and its tries' queued-to-running, after a warm-up."""
    warmup = airflow.trigger("rexec_fanout", {"n": WARMUP_TASKS})
    finished_run(airflow, "rexec_fanout", warmup, RUN_TIMEOUT)
    with LoadSampler() as load:
        triggered = time.time()
        run_id = airflow.trigger("rexec_fanout", {"n": FANOUT_TASKS})
        run = finished_run(airflow, "rexec_fanout", run_id, RUN_TIMEOUT)
        seen = time.time()
    tis = all_task_instances(airflow, "rexec_fanout", run_id)
    waits = [
        _timestamp(ti["start_date"]) - _timestamp(ti["queued_when"])
        for ti in tis
        if ti["task_id"] == "work" and ti.get("start_date") and ti.get("queued_when")
    ]
    runs = [
        _timestamp(ti["end_date"]) - _timestamp(ti["start_date"])
        for ti in tis
        if ti["task_id"] == "work" and ti.get("start_date") and ti.get("end_date")
    ]
    states: dict[str, int] = {}
    for ti in tis:
        states[ti["state"]] = states.get(ti["state"], 0) + 1
    wall = _timestamp(run["end_date"]) - triggered if run.get("end_date") else seen - triggered
    return {
        "state": run["state"],
        "tasks": len(waits),
        "task_states": states,
        "wall_s": round(wall, 2),
        "queued_to_running_p50_s": _round(percentile(waits, 50)),
        "queued_to_running_p95_s": _round(percentile(waits, 95)),
        "queued_to_running_max_s": _round(max(waits) if waits else None),
        "running_mean_s": _round(sum(runs) / len(runs) if runs else None),
        "load": load.summary(),
    }


def all_task_instances(airflow: AirflowInstance, dag_id: str, run_id: str) -> list[Any]:
    """Every task instance of the run: the REST API gives at most ``[api]
    maximum_page_limit`` (100) a page, so :meth:`AirflowInstance.task_instances` alone would
    miss the fan-out's last ones."""
    path = f"/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}/taskInstances"
    tis: list[Any] = []
    while True:
        page = airflow._request("GET", path, params={"limit": 100, "offset": len(tis)})
        tis.extend(page["task_instances"])
        if not page["task_instances"] or len(tis) >= page["total_entries"]:
            return tis


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def read_marks(folder: Path) -> list[dict[str, Any]]:
    """Every start of ``bench_long``'s task so far, earliest first."""
    found = [json.loads(path.read_text()) for path in folder.glob("[0-9]*.json")]
    return sorted(found, key=lambda mark: float(mark["started"]))


def failover(system: System, case: str, marks: Path, spare: str, ceiling: float) -> dict[str, Any]:
    """Signal the worker running a 30 s task; seconds until the task starts again."""
    airflow = system.airflow
    assert airflow is not None
    run_id = airflow.trigger("bench_long", {"seconds": LONG_SECONDS, "marks": str(marks)})
    first = wait_for(lambda: read_marks(marks), RUN_TIMEOUT, "bench_long started", 0.1)[0]
    victim = str(first["worker"])
    # The fault lands a fixed time into the try (a schedule, not a condition to wait for).
    time.sleep(max(0.0, float(first["started"]) + FAULT_AFTER - time.time()))
    with LoadSampler() as load:
        signalled = time.time()
        processes = signal_tree(system.worker_pid(victim), SIGNALS[case])
        try:
            again = wait_for(
                lambda: [m for m in read_marks(marks) if float(m["started"]) > signalled],
                ceiling,
                "the task to start again",
                interval=0.1,
            )[0]
        except TimeoutError:
            again = None
    result: dict[str, Any] = {
        "signal": SIGNALS[case].name,
        "victim": victim,
        "processes_signalled": processes,
        "first_try": first["try"],
        "ceiling_s": ceiling,
        "recovered_s": None if again is None else round(float(again["started"]) - signalled, 2),
        "next_start": None if again is None else {k: again[k] for k in ("try", "worker")},
        "load": load.summary(),
    }
    # Back to two workers for the next case, and the run ended either way.
    system.stop_worker(victim)
    system.start_worker(spare)
    if again is None:
        airflow.set_task_state("bench_long", run_id, "long", "failed")
    run = finished_run(airflow, "bench_long", run_id, LONG_SECONDS + 300)
    ti = airflow.task_instance("bench_long", run_id, "long")
    result.update(run_state=run["state"], final_try=ti["try_number"], starts=len(read_marks(marks)))
    return result


def venv_versions() -> dict[str, str]:
    """Versions in the Airflow venv the systems run from (not the harness's venv)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    python = airflow_venv() / "bin" / "python"
    text = subprocess.run(
        [str(python), "-c", code, *VENV_PACKAGES], capture_output=True, text=True, check=True
    ).stdout
    versions: dict[str, str] = json.loads(text)
    return versions


def run_system(
    name: str, cases: list[str], workdir: Path, ceiling: float, rep: int
) -> dict[str, Any]:
    home = workdir / f"{name}-r{rep}"
    dags = home / "dags"
    dags.mkdir(parents=True)
    shutil.copy(FANOUT_DAG, dags)
    shutil.copy(BENCH_DAGS / "bench_long.py", dags)
    system = SYSTEMS[name](home, dags)
    record: dict[str, Any] = {"system": name, "rep": rep, "executor": system.executor}
    try:
        began = time.monotonic()
        airflow = system.start()
        record["start_s"] = round(time.monotonic() - began, 1)
        for dag_id in ("rexec_fanout", "bench_long"):
            airflow.wait_dag_parsed(dag_id)
        record["settings"] = system.settings()
        spares = iter(range(3, 100))
        for case in cases:
            print(f"bench-airflow: {name} r{rep} {case}", flush=True)
            if case == "fanout":
                record[case] = fanout(system, airflow)
            elif not system.remote:
                record[case] = {"n/a": "no remote worker"}
            else:
                marks = home / f"marks-{case}"
                record[case] = failover(system, case, marks, f"w{next(spares)}", ceiling)
            print(f"bench-airflow: {name} r{rep} {case}: {record[case]}", flush=True)
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        traceback.print_exc()
        if system.airflow is not None:
            print(system.airflow.diagnostics(2000))
    finally:
        system.close()
    return record


def fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def markdown(results: dict[str, Any]) -> str:
    """The README's table: one row per system and repetition."""
    lines = [
        "| system | fan-out wall s | queued→running p50 s | p95 s | run s "
        "| kill -9 → runs again s | SIGSTOP → runs again s | load (fan-out, mean 1-min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for record in results["runs"]:
        f = record.get("fanout", {})
        cells = [f"{record['system']}" + (f" (r{record['rep']})" if record["rep"] else "")]
        failed = f.get("state") not in {None, "success"}
        cells += [
            fmt(f.get("wall_s")) + (f" (run {f['state']})" if failed else ""),
            fmt(f.get("queued_to_running_p50_s")),
            fmt(f.get("queued_to_running_p95_s")),
            fmt(f.get("running_mean_s")),
        ]
        for case in ("kill", "stop"):
            c = record.get(case, {})
            if "n/a" in c:
                cells.append("n/a")
            elif not c:
                cells.append("-")
            elif c.get("recovered_s") is None:
                cells.append(f"> {c['ceiling_s']:.0f}")
            else:
                cells.append(f"{c['recovered_s']} (try {c['next_start']['try']})")
        cells.append(fmt((f.get("load") or {}).get("load1_mean")))
        if "error" in record:
            cells[0] += " (error)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="local,rexec,celery,edge")
    parser.add_argument("--cases", default="fanout,kill,stop")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--ceiling", type=float, default=CEILING)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the Airflow homes (logs)")
    parser.add_argument("--table", type=Path, help="only print the table of a results file")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    systems = [s for s in args.systems.split(",") if s]
    cases = [c for c in args.cases.split(",") if c]
    unknown = [s for s in systems if s not in SYSTEMS] + [
        c for c in cases if c not in {"fanout", *SIGNALS}
    ]
    if unknown:
        parser.error(f"unknown systems or cases: {unknown}")
    today = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"airflow-{today}.json"
    results: dict[str, Any] = {
        "date": today,
        "machine": {**describe(), "airflow_venv": venv_versions()},
        "venv": os.environ.get(AIRFLOW_VENV_VAR, ""),
        "sizes": {
            "fanout_tasks": FANOUT_TASKS,
            "warmup_tasks": WARMUP_TASKS,
            "long_task_s": LONG_SECONDS,
            "fault_after_s": FAULT_AFTER,
            "ceiling_s": args.ceiling,
        },
        "cases": cases,
        "runs": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="rexec-bench-airflow-"))
    print(f"bench-airflow: homes and logs under {workdir}", flush=True)
    try:
        for rep in range(args.repeat):
            shift = rep % len(systems)
            for name in systems[shift:] + systems[:shift]:
                results["runs"].append(run_system(name, cases, workdir, args.ceiling, rep))
                out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(results))
    print(f"bench-airflow: results in {out}")


if __name__ == "__main__":
    main()
