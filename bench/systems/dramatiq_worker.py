"""Dramatiq worker of the benchmark: ``python -m bench.systems.dramatiq_worker --threads N``.

One OS process running ``dramatiq.Worker`` with N worker threads (the work the ``dramatiq`` CLI
does in each of its worker processes, without the extra supervising process), prefetch
Dramatiq's default (2 x threads). SIGTERM/SIGINT stop it gracefully.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from types import FrameType

import dramatiq

from bench.systems.dramatiq_app import build_from_env


def main(threads: int) -> None:
    app = build_from_env()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.broker.emit_after("process_boot")
    worker = dramatiq.Worker(app.broker, worker_threads=threads)
    worker.start()
    print(f"dramatiq worker {os.getpid()} running ({threads} threads)", flush=True)
    stop.wait()
    worker.stop(timeout=10_000)
    app.broker.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    main(parser.parse_args().threads)
