"""Benchmarks of rexec against its peers (Celery, Dramatiq, a bare aio-pika loop).

Not part of ``make test``. Run with ``make bench`` or ``python -m bench.run``; see README.md.
"""
