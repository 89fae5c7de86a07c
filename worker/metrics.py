"""Prometheus metrics of one agent, served at ``/metrics`` by its health server.

Counters are read at scrape time from what the agent counts anyway (its ``AgentStatus``: the
stats, the event publisher, the heartbeat), so nothing is counted twice; only the run-time histogram is updated
as attempts end. Each agent has its own registry, so agents run in one process stay apart.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .attempts import Outcome
from .status import AgentStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)


class AgentMetrics:
    """The agent's registry: the run-time histogram, and its counters read at scrape time."""

    def __init__(self, agent: AgentStatus) -> None:
        self.registry = CollectorRegistry()
        self.task_seconds = Histogram(
            "rexec_agent_task_seconds",
            "From an attempt's confirmed start to its confirmed terminal event, by outcome.",
            ["pool", "outcome"],
            buckets=RUN_BUCKETS,
            registry=self.registry,
        )
        self._pool = agent.pool
        self.registry.register(_AgentCollector(agent))

    def ran(self, outcome: Outcome, seconds: float) -> None:
        if outcome is not Outcome.LEASE_LOST:
            self.task_seconds.labels(self._pool, outcome.value).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _AgentCollector(Collector):
    """Reads the agent's own counters at scrape time."""

    def __init__(self, agent: AgentStatus) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        pool = agent.pool
        s = agent.stats
        tasks = CounterMetricFamily(
            "rexec_agent_tasks",
            "Deliveries of this agent's pool queue, by how they ended on this agent.",
            labels=["pool", "outcome"],
        )
        by_outcome = {
            Outcome.SUCCEEDED: s.succeeded,
            Outcome.FAILED: s.failed,
            Outcome.TIMED_OUT: s.timed_out,
            Outcome.CANCELLED: s.cancelled + s.cancelled_before_start,
            Outcome.EXPIRED: s.expired,
            Outcome.NOT_ALLOWED: s.not_allowed,
            Outcome.DEAD_LETTERED: s.dead_lettered,
            Outcome.DUPLICATE: s.duplicates,
            Outcome.HANDED_BACK: s.handed_back + s.stopped_at_drain,
        }
        for outcome, count in by_outcome.items():
            tasks.add_metric([pool, outcome.value], count)
        yield tasks
        running = GaugeMetricFamily(
            "rexec_agent_running", "Attempts running on this agent.", labels=["pool"]
        )
        running.add_metric([pool], agent.running)
        yield running
        slots = GaugeMetricFamily(
            "rexec_agent_slots",
            "Attempts this agent runs at once (--concurrency).",
            labels=["pool"],
        )
        slots.add_metric([pool], agent.concurrency)
        yield slots
        counts = agent.counters()
        yield CounterMetricFamily(
            "rexec_agent_event_batches",
            "Event batches the broker confirmed.",
            value=counts.event_batches,
        )
        yield CounterMetricFamily(
            "rexec_agent_events", "Events the broker confirmed.", value=counts.events
        )
        yield CounterMetricFamily(
            "rexec_agent_leases_lost",
            "Running attempts stopped because another agent took their lease over.",
            value=s.leases_lost,
        )
        yield CounterMetricFamily(
            "rexec_agent_heartbeat_failures",
            "Heartbeats that could not reach Redis.",
            value=counts.heartbeat_failures,
        )
