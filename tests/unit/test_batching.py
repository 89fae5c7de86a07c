"""How the relay splits due attempts into messages, without services."""

from __future__ import annotations

from dataclasses import dataclass

from rexec.dispatcher.batching import BatchSizes, PoolAgents
from rexec.schemas import messages

NEW = messages.BATCHES_FROM_MINOR


@dataclass(frozen=True)
class Row:
    pool: str
    n: int


def sizes(per_message: int = 16, **pools: PoolAgents) -> BatchSizes:
    return BatchSizes(per_message, pools=dict(pools))


def rows(pool: str, count: int) -> list[Row]:
    return [Row(pool, i) for i in range(count)]


def shape(batches: list[list[Row]]) -> list[tuple[str, int]]:
    return [(batch[0].pool, len(batch)) for batch in batches]


def test_a_pool_whose_agents_all_speak_1_2_gets_batches_of_its_smallest_concurrency() -> None:
    split = sizes(p=PoolAgents(agents=1, oldest_minor=NEW, smallest_concurrency=4)).split(
        rows("p", 10)
    )
    assert shape(split) == [("p", 4), ("p", 4), ("p", 2)]
    assert [row.n for batch in split for row in batch] == list(range(10)), "order kept"


def test_a_burst_is_spread_over_the_pools_agents() -> None:
    split = sizes(p=PoolAgents(agents=3, oldest_minor=NEW, smallest_concurrency=16)).split(
        rows("p", 10)
    )
    assert shape(split) == [("p", 4), ("p", 4), ("p", 2)]


def test_an_older_agent_or_no_known_agent_means_one_task_per_message() -> None:
    old = PoolAgents(agents=2, oldest_minor=NEW - 1, smallest_concurrency=16)
    split = sizes(old=old).split([*rows("old", 2), *rows("unknown", 2)])
    assert shape(split) == [("old", 1), ("old", 1), ("unknown", 1), ("unknown", 1)]


def test_tasks_per_message_caps_the_batch_and_one_turns_batches_off() -> None:
    agents = PoolAgents(agents=1, oldest_minor=NEW, smallest_concurrency=64)
    assert shape(sizes(5, p=agents).split(rows("p", 7))) == [("p", 5), ("p", 2)]
    assert shape(sizes(1, p=agents).split(rows("p", 2))) == [("p", 1), ("p", 1)]


def test_pools_are_never_mixed_in_one_message() -> None:
    agents = PoolAgents(agents=1, oldest_minor=NEW, smallest_concurrency=8)
    split = sizes(a=agents, b=agents).split([Row("a", 0), Row("b", 0), Row("a", 1)])
    assert shape(split) == [("a", 2), ("b", 1)]
