"""The client over real connections to ``rexec serve``: shared by many threads, and across a
connection that fails under a call (a response lost on the way back)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from rexec.client import RexecClient, RexecError
from tests.conftest import BOOTSTRAP_KEY
from tests.e2e.conftest import Plane
from tests.proxy import TcpProxy

THREADS = 32
PER_THREAD = 25


@pytest.fixture
def cutter(plane: Plane) -> Iterator[TcpProxy]:
    """A proxy in front of the API that can drop answers, as a load balancer or a NAT that
    drops a connection does."""
    proxy = TcpProxy(plane.settings.api_port)
    yield proxy
    proxy.close()


def test_one_client_shared_by_many_threads(plane: Plane, pool_name: str) -> None:
    client = plane.client
    client.create_pool(pool_name)

    def work(thread: int) -> list[str]:
        ids = []
        for i in range(PER_THREAD):
            task = client.submit(
                pool_name, "tests.tasks:add", args=[thread, i], idempotency_key=f"{thread}-{i}"
            )
            assert client.get(task.id).args == [thread, i]
            ids.append(task.id)
        return ids

    with ThreadPoolExecutor(THREADS) as threads:
        ids = [i for batch in threads.map(work, range(THREADS)) for i in batch]
    assert len(set(ids)) == THREADS * PER_THREAD
    listed = client.list_tasks(pool=pool_name, limit=THREADS * PER_THREAD)
    assert {t.id for t in listed} == set(ids)


def test_a_submit_with_a_key_whose_answer_was_lost_is_sent_again_and_made_once(
    plane: Plane, pool_name: str, cutter: TcpProxy
) -> None:
    plane.client.create_pool(pool_name)
    with RexecClient(f"http://127.0.0.1:{cutter.port}", api_key=BOOTSTRAP_KEY) as client:
        cutter.cut_answers(1)
        task = client.submit(pool_name, "tests.tasks:add", args=[1, 2], idempotency_key="once")
        assert (
            cutter.dropped_answers == 1
        )  # the first answer was lost; the second send got the task
        found = plane.client.list_tasks(pool=pool_name, idempotency_key="once")
        assert [t.id for t in found] == [task.id]
        assert len(plane.client.list_tasks(pool=pool_name)) == 1

        # Without a key a second send could make a second task: the error is the caller's.
        cutter.cut_answers(1)
        with pytest.raises(RexecError, match="unreachable") as refused:
            client.submit(pool_name, "tests.tasks:add", args=[3, 4])
        assert refused.value.status is None
        assert len(plane.client.list_tasks(pool=pool_name)) == 2  # the server made it once

        # Reads are sent again as a matter of course.
        cutter.cut_answers(2)
        assert client.get(task.id).id == task.id
        assert cutter.dropped_answers == 4
