"""What the figures were measured on: machine, services and package versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import psutil

from bench.infra import rabbitmq_version, redis_version

PACKAGES = (
    "rexec",
    "aio-pika",
    "aiormq",
    "celery",
    "kombu",
    "amqp",
    "dramatiq",
    "pika",
    "redis",
    "psutil",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def package_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def describe() -> dict[str, object]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "rabbitmq": rabbitmq_version(),
        "redis": redis_version(),
        "packages": package_versions(),
    }
