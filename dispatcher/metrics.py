"""Prometheus metrics of the orchestration plane, served at ``/metrics``: their definitions.

Counters and histograms are updated where things happen (relay, events consumer, watchdog);
gauges that describe the world (tasks by state, queue depth, live agents) are read at scrape
time, by ``gauges.render``. This module only defines the instruments and imports nothing of
the dispatcher: the runtime holds a ``Metrics``, and reading the world needs the runtime.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Gauge("rexec_tasks", "Tasks by pool and state.", ["pool", "state"], registry=r)
        self.queue_depth = Gauge(
            "rexec_queue_depth", "Messages ready in the pool's queue.", ["pool"], registry=r
        )
        self.agents_live = Gauge(
            "rexec_agents_live", "Agents whose heartbeat key is alive.", ["pool"], registry=r
        )
        self.submit_to_start = Histogram(
            "rexec_submit_to_start_seconds",
            "From submission to the start of an attempt.",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "rexec_run_seconds",
            "From the start of the last attempt to its end.",
            ["pool", "state"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requeues = Counter(
            "rexec_requeues",
            "Attempts handed back to the queue, by reason.",
            ["reason"],
            registry=r,
        )
        self.task_messages = Counter(
            "rexec_task_messages",
            "Task messages the relay published, by pool (a batch of attempts is one).",
            ["pool"],
            registry=r,
        )
        self.attempts_published = Counter(
            "rexec_attempts_published",
            "Attempts the relay published, by pool (in single messages or in batches).",
            ["pool"],
            registry=r,
        )
        self.watchdog_lost_races = Counter(
            "rexec_watchdog_lost_races",
            "Watchdog writes dropped: the task changed since it was read (task_changed), "
            "or another replica took the lead (deposed).",
            ["action", "cause"],
            registry=r,
        )
        self.stale_events = Counter(
            "rexec_stale_events",
            "Agent events rejected by fencing, by reason.",
            ["reason"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "rexec_dead_lettered",
            "Messages rexec dead-lettered, by source.",
            ["source"],
            registry=r,
        )
        self.dead_letters = Counter(
            "rexec_dead_letters",
            "Tasks of dead-lettered task messages, by what the dispatcher did: republished, "
            "failed, or nothing (not_queued, stale_attempt, unknown_task; not_a_task and "
            "error count messages).",
            ["outcome"],
            registry=r,
        )
        self.event_failures = Counter(
            "rexec_event_failures",
            "Event messages whose handling raised: dead-lettered to rexec.dead.events with "
            "the reason, and the consumer went on; by error type.",
            ["error"],
            registry=r,
        )
