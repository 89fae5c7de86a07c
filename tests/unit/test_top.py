"""``rexec top``'s arithmetic: per-second rates over a window, and reading /metrics."""

from __future__ import annotations

from rexec.client.top import Rates, parse_figures
from rexec.schemas.api import PoolView


def pool(name: str, **tasks: int) -> PoolView:
    return PoolView(name=name, description="", draining=False, created_at=0.0, tasks=tasks)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rates_need_two_samples_then_average_over_the_window() -> None:
    clock = Clock()
    rates = Rates(window=10, clock=clock)
    rates.add([pool("a", succeeded=0, failed=0)])
    assert rates.of("a") is None
    for second in range(1, 21):
        clock.now = 100.0 + second
        # 5 succeeded/s; 1 failed and 1 timed out every second from second 11 on
        late = max(0, second - 10)
        rates.add([pool("a", succeeded=5 * second, failed=late, timed_out=late)])
    got = rates.of("a")
    assert got is not None
    assert got.succeeded == 5.0
    assert got.failed == 2.0  # only the last 10 s count: failures began 10 s ago
    assert rates.of("unknown") is None


def test_a_pool_that_appears_later_has_no_rate_until_it_is_in_the_window() -> None:
    clock = Clock()
    rates = Rates(window=10, clock=clock)
    rates.add([pool("a")])
    clock.now += 1
    rates.add([pool("a"), pool("b", succeeded=3)])
    assert rates.of("b") is None
    assert rates.of("a") is not None


def test_counts_going_down_are_not_negative_rates() -> None:
    # A task cancelled after it was counted, or a pool recreated: never a negative rate.
    clock = Clock()
    rates = Rates(window=10, clock=clock)
    rates.add([pool("a", failed=4)])
    clock.now += 2
    rates.add([pool("a", failed=1)])
    got = rates.of("a")
    assert got is not None and got.failed == 0.0


def test_figures_from_the_dispatchers_metrics() -> None:
    text = """# HELP rexec_queue_depth Messages ready in the pool's queue.
# TYPE rexec_queue_depth gauge
rexec_queue_depth{pool="a"} 12.0
rexec_queue_depth{pool="b"} 0.0
# TYPE rexec_agents_live gauge
rexec_agents_live{pool="a"} 2.0
# TYPE rexec_requeues counter
rexec_requeues_total{reason="agent_lost"} 4.0
rexec_requeues_created{reason="agent_lost"} 1.7e+09
rexec_requeues_total{reason="timeout_backstop"} 1.0
# TYPE rexec_stale_events counter
# TYPE rexec_dead_lettered counter
rexec_dead_lettered_total{source="events"} 3.0
"""
    figures = parse_figures(text)
    assert figures.queue_depth == {"a": 12.0, "b": 0.0}
    assert figures.agents_live == {"a": 2.0}
    assert figures.requeues == {"agent_lost": 4.0, "timeout_backstop": 1.0}
    assert figures.stale_events == {}
    assert figures.dead_lettered == {"events": 3.0}
