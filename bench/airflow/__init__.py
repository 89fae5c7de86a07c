"""Airflow executors compared: rexec's RexecExecutor beside Edge, Celery and Local (`make bench-airflow`)."""
