"""The systems under test: name -> ``module:Class`` implementing ``bench.systems.base.System``.

Imported lazily by ``bench.run``, so a system whose module or packages are missing (``rexec``
until its runner exists) is reported as skipped.
"""

from __future__ import annotations

SYSTEMS: dict[str, str] = {
    "bare": "bench.systems.bare:BareSystem",
    "celery": "bench.systems.celery_system:CelerySystem",
    "dramatiq": "bench.systems.dramatiq_system:DramatiqSystem",
    "rexec": "bench.systems.rexec_system:RexecSystem",
}
