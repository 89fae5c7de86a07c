"""Run the benchmark: ``python -m bench.run [--workloads w1,w2,w3,w4,w5] [--systems ...] ...``.

Within each repetition every workload runs for every system in turn (the order rotates between
repetitions), each run in its own RabbitMQ vhost and Redis prefix with its own workers. Prints
each run as it ends, then the medians; writes ``bench/results/<date>.json`` (``-quick`` added
for ``--quick``), merged with the day's earlier results for other workloads or systems, and for
full runs regenerates the figures below the marker in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import signal
import sys
import time
import traceback
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import report
from bench.infra import check_services, isolated_run
from bench.machine import describe
from bench.procs import stop_all
from bench.stats import median_figures
from bench.systems import SYSTEMS
from bench.systems.base import System
from bench.workloads import WORKLOADS, Sizes, applies

console = Console(width=None if sys.stdout.isatty() else 160)


def load_system(name: str) -> type[System]:
    """The system's class; raises with a reason if it cannot run here."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    module_name, _, class_name = SYSTEMS[name].partition(":")
    module = importlib.import_module(module_name)
    cls: type[System] = getattr(module, class_name)
    cls.check_available()
    return cls


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--workloads", default="w1,w2,w3,w4,w5", help="comma-separated, w1..w5")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=None, help="runs each (3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--no-readme", action="store_true", help="do not touch bench/README.md")
    return parser.parse_args(argv)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def summary(workload: str, figures: dict[str, object]) -> str:
    if "error" in figures:
        return f"[red]error: {figures['error']}[/red]"
    columns = report.COLUMNS.get(workload, [])
    return ", ".join(f"{title} {report.fmt(figures.get(key))}" for title, key in columns)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        console.print(f"[red]unknown workloads {unknown}; known: {', '.join(WORKLOADS)}[/red]")
        return 2
    sizes = Sizes.quick() if args.quick else Sizes()
    repeat = args.repeat or (1 if args.quick else 3)
    check_services()

    classes: dict[str, type[System]] = {}
    skipped: dict[str, str] = {}
    for name in (s.strip() for s in args.systems.split(",") if s.strip()):
        try:
            classes[name] = load_system(name)
        except Exception as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            console.print(f"[yellow]skipping {name}: {skipped[name]}[/yellow]")
    if not classes:
        console.print("[red]no system can run[/red]")
        return 2

    started = dt.datetime.now(dt.UTC)
    machine = describe()
    console.print(
        f"bench: {', '.join(classes)} x {', '.join(workloads)}, {repeat} run(s) each"
        f"{' (quick)' if args.quick else ''}; {machine['cpu_model']}, {machine['cores']} cores"
    )
    runs: dict[tuple[str, str], list[dict[str, object]]] = {}
    settings: dict[str, dict[str, object]] = {name: {} for name in classes}
    names = list(classes)
    try:
        for rep in range(repeat):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for workload in workloads:
                title, run_workload = WORKLOADS[workload]
                for name in order:
                    if not applies(workload, name):
                        continue
                    if workload == "w5" and rep > 0:
                        continue  # one scale run is enough: it is long and not a comparison
                    t0 = time.monotonic()
                    figures: dict[str, object]
                    with isolated_run(f"{name}-{workload}-r{rep + 1}") as ctx:
                        system = classes[name](ctx)
                        try:
                            figures = run_workload(system, sizes)
                            settings[name][workload] = system.settings()
                        except KeyboardInterrupt:
                            raise
                        except Exception as exc:
                            figures = {"error": f"{type(exc).__name__}: {exc}"}
                            traceback.print_exc()
                            console.print(f"[dim]worker logs: {ctx.log_dir}[/dim]")
                        finally:
                            system.stop_workers()
                            system.close()
                    runs.setdefault((workload, name), []).append(figures)
                    console.print(
                        f"[bold]{title}[/bold] run {rep + 1}/{repeat} [cyan]{name}[/cyan] "
                        f"({time.monotonic() - t0:.0f} s): {summary(workload, figures)}"
                    )
    except KeyboardInterrupt:
        console.print("[red]interrupted: writing what was measured[/red]")
    finally:
        stop_all()

    document = build_document(
        started, args.quick, repeat, sizes, machine, classes, skipped, settings, runs, workloads
    )
    print_medians(document)
    path = report.results_path(started.date(), args.quick)
    document = report.merge(report.load(path), document)
    report.write(path, document)
    console.print(f"results: {path}")
    if not args.quick and not args.no_readme:
        report.update_readme(document, str(path.relative_to(report.BENCH_DIR.parent)))
        console.print(f"figures table: {report.README}")
    return 0


def build_document(
    started: dt.datetime,
    quick: bool,
    repeat: int,
    sizes: Sizes,
    machine: dict[str, object],
    classes: dict[str, type[System]],
    skipped: dict[str, str],
    settings: dict[str, dict[str, object]],
    runs: dict[tuple[str, str], list[dict[str, object]]],
    workloads: list[str],
) -> dict[str, Any]:
    systems: dict[str, Any] = {
        name: {"versions": cls.versions(), "settings": settings.get(name, {})}
        for name, cls in classes.items()
    }
    systems.update({name: {"skipped": reason} for name, reason in skipped.items()})
    out_workloads: dict[str, Any] = {}
    for workload in workloads:
        entries: dict[str, Any] = {}
        for name in classes:
            measured = runs.get((workload, name), [])
            good = [r for r in measured if "error" not in r]
            if not measured:
                continue
            entries[name] = {
                "median": median_figures(good) if good else {},
                "runs": good,
                "errors": [r["error"] for r in measured if "error" in r],
            }
        if entries:
            out_workloads[workload] = {
                "title": WORKLOADS[workload][0],
                "repeat": repeat,
                "quick": quick,
                "systems": entries,
            }
    return {
        "date": started.date().isoformat(),
        "generated_at": started.isoformat(timespec="seconds"),
        "quick": quick,
        "repeat": repeat,
        "sizes": dataclasses.asdict(sizes),
        "machine": machine,
        "systems": systems,
        "workloads": out_workloads,
    }


def print_medians(document: dict[str, Any]) -> None:
    for key, workload in document["workloads"].items():
        columns = report.COLUMNS.get(key, [])
        table = Table(title=f"{workload['title']} (medians)")
        table.add_column("system")
        table.add_column("runs", justify="right")
        for title, _ in columns:
            table.add_column(title, justify="right")
        for name, entry in workload["systems"].items():
            median = entry["median"]
            row = [report.fmt(median.get(field)) for _, field in columns]
            errors = f" ({len(entry['errors'])} failed)" if entry["errors"] else ""
            table.add_row(name, f"{len(entry['runs'])}{errors}", *row)
        console.print(table)


if __name__ == "__main__":
    sys.exit(main())
