"""``RexecExecutor``: Airflow's scheduler hands each try to a rexec agent in the customer's cluster.

Set ``AIRFLOW__CORE__EXECUTOR=rexec.airflow.executor.RexecExecutor`` and a ``[rexec]`` section
(:mod:`rexec.airflow.config`). Each ``ExecuteTask`` workload becomes one rexec task running
:func:`rexec.airflow.runner.run_workload` on the pool of its queue:

- submitted in one batch per scheduler heartbeat, with the scheduler's pre-assigned
  ``external_executor_id`` as idempotency key: a scheduler that crashes after the submit and
  submits again gets the same task back, never a second run of the try;
- expiring when the workload's token does, so a try that waited too long is expired by rexec,
  not started with a dead token;
- ``sensitive``: the workload (its token) is hidden from rexec's viewer keys.

States come from rexec's change feed, read by a thread that long-polls it; ``sync()`` only
drains what the thread found, so the scheduler loop never waits on the network. The thread
also reads every tracked task now and then, which covers anything the feed could miss.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.executors.base_executor import BaseExecutor
from airflow.executors.workloads import ExecuteTask
from airflow.models.taskinstancekey import TaskInstanceKey
from rexec.client import RexecClient, RexecError, SubmitTask, TaskState

from . import config
from .logs import idempotency_key, read_try_log

if TYPE_CHECKING:
    from airflow.models.taskinstance import TaskInstance

log = logging.getLogger(__name__)

FINISHED = {
    TaskState.SUCCEEDED.value,
    TaskState.FAILED.value,
    TaskState.CANCELLED.value,
    TaskState.EXPIRED.value,
}
TOKEN_MARGIN = 5.0
"""Seconds before the workload token's expiry that rexec stops offering the try to agents."""


def token_lifetime(token: str, now: float) -> float | None:
    """Seconds the workload's JWT still lives (its ``exp`` claim; the signature is not ours to
    check), or None when it carries none."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"]) - now
    except (IndexError, KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Update:
    """What the feed thread learned of one rexec task, for ``sync()`` to report."""

    idempotency_key: str
    task_id: str
    state: str
    info: str | None = None


class Feed:
    """Follows rexec's change feed (and reads tracked tasks now and then) in a thread of its own.

    Its own client: an HTTP client is not shared between threads."""

    def __init__(self, settings: config.ExecutorConfig, updates: queue.SimpleQueue[Update]) -> None:
        self.settings = settings
        self.updates = updates
        self.client = _client(settings)
        self.tracked: dict[str, str] = {}
        """rexec task id -> idempotency key; written by the scheduler's thread under ``lock``."""
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.cursor = self.client.changes(pools=settings.all_pools).cursor
        self.thread = threading.Thread(target=self._run, name="rexec-feed", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        self.thread.join(timeout)
        self.client.close()

    def track(self, task_id: str, key: str) -> None:
        with self.lock:
            self.tracked[task_id] = key

    def forget(self, task_id: str) -> None:
        with self.lock:
            self.tracked.pop(task_id, None)

    def _run(self) -> None:
        last_reconcile = time.monotonic()
        failures = 0
        while not self.stopping.is_set():
            try:
                self._follow()
                if time.monotonic() - last_reconcile >= self.settings.reconcile_interval:
                    self.reconcile()
                    last_reconcile = time.monotonic()
                failures = 0
            except RexecError as exc:
                failures += 1
                log.warning("rexec change feed: %s; retrying", exc)
                self.stopping.wait(min(30.0, 0.5 * 2**failures))

    def _follow(self) -> None:
        page = self.client.changes(
            self.cursor, pools=self.settings.all_pools, wait=self.settings.feed_wait
        )
        with self.lock:
            mine = dict(self.tracked)
        for change in page.changes:
            key = mine.get(change.task_id)
            if key is not None and change.state.value in FINISHED:
                self.updates.put(self._finished(change.task_id, key))
        self.cursor = page.cursor

    def reconcile(self) -> None:
        """Read every tracked task once: what the feed missed (a transition committed out of
        order on PostgreSQL, a gap while the API was away) shows here."""
        with self.lock:
            mine = dict(self.tracked)
        if not mine:
            return
        for view in self.client.wait(list(mine), timeout=0):
            if view.state.value in FINISHED:
                self.updates.put(_update(mine[view.id], view.id, view.state.value, view.error))

    def _finished(self, task_id: str, key: str) -> Update:
        view = self.client.get(task_id)
        return _update(key, task_id, view.state.value, view.error)


def _update(key: str, task_id: str, state: str, error: dict[str, Any] | None) -> Update:
    info = None
    if error:
        info = f"rexec task {task_id} {state}: {error.get('type', '')}: {error.get('message', '')}"
    elif state != TaskState.SUCCEEDED.value:
        info = f"rexec task {task_id} {state}"
    return Update(idempotency_key=key, task_id=task_id, state=state, info=info)


def _client(settings: config.ExecutorConfig) -> RexecClient:
    return RexecClient(settings.api_url, api_key=settings.api_key, ca_file=settings.ca_file)


class RexecExecutor(BaseExecutor):
    """Runs Airflow task instances on rexec agents; see the module's docstring."""

    pre_assigns_external_executor_id = True
    serve_logs = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._settings: config.ExecutorConfig | None = None
        self._client: RexecClient | None = None
        self._feed: Feed | None = None
        self._updates: queue.SimpleQueue[Update] = queue.SimpleQueue()
        self._keys: dict[str, TaskInstanceKey] = {}
        """Idempotency key -> the try it runs, for the tries this executor tracks."""
        self._task_ids: dict[TaskInstanceKey, str] = {}
        self._idempotency_keys: dict[TaskInstanceKey, str] = {}

    @property
    def settings(self) -> config.ExecutorConfig:
        if self._settings is None:
            self._settings = config.from_airflow(conf)
        return self._settings

    @property
    def client(self) -> RexecClient:
        """The scheduler thread's client (built on first use: the API server's copy of the
        executor, which only reads logs, is never started)."""
        if self._client is None:
            self._client = _client(self.settings)
        return self._client

    def start(self) -> None:
        self._feed = Feed(self.settings, self._updates)
        self._feed.start()
        log.info(
            "rexec executor: %s, queues %s, other queues to %s",
            self.settings.api_url,
            dict(self.settings.pools) or "-",
            self.settings.default_pool or "the pool of their name",
        )

    # submitting

    def _process_workloads(self, workload_items: Sequence[Any]) -> None:
        tasks = [w for w in workload_items if isinstance(w, ExecuteTask)]
        if len(tasks) != len(workload_items):
            kinds = sorted({type(w).__name__ for w in workload_items} - {"ExecuteTask"})
            raise ValueError(f"RexecExecutor runs task instances only, not {', '.join(kinds)}")
        if not tasks:
            return
        now = time.time()
        bodies = [self._submit_body(w, now) for w in tasks]
        try:
            ids = self.client.submit_many(bodies)
        except RexecError as exc:
            if exc.status is None or exc.status >= 500 or exc.status == 429:
                # Left queued: the next heartbeat submits again, under the same keys.
                log.warning("rexec executor: submit of %d tries failed: %s", len(tasks), exc)
                return
            self._submit_refused(tasks, bodies, exc)
            return
        for workload, body, task_id in zip(tasks, bodies, ids, strict=True):
            self._track(workload.ti.key, body.idempotency_key or "", task_id)
            self.queued_tasks.pop(workload.ti.key, None)

    def _submit_body(self, workload: ExecuteTask, now: float) -> SubmitTask:
        ti = workload.ti
        lifetime = token_lifetime(workload.token, now)
        expires_in = None if lifetime is None else max(1.0, lifetime - TOKEN_MARGIN)
        return SubmitTask(
            pool=self.settings.pool_for(ti.queue),
            target=config.RUNNER,
            kwargs={"workload": workload.model_dump(mode="json")},
            max_attempts=self.settings.max_attempts,
            retry_backoff=0,
            expires_in=expires_in,
            idempotency_key=idempotency_key(ti),
            sensitive=True,
        )

    def _submit_refused(
        self, tasks: Sequence[ExecuteTask], bodies: Sequence[SubmitTask], exc: RexecError
    ) -> None:
        """A batch the API refused (an unknown pool, say): each try alone, so one bad queue
        fails its own tries and no others."""
        for workload, body in zip(tasks, bodies, strict=True):
            key = workload.ti.key
            try:
                [task_id] = self.client.submit_many([body])
            except RexecError as alone:
                if alone.status is None or alone.status >= 500:
                    continue
                log.error("rexec executor: %s refused: %s", key, alone)
                self.queued_tasks.pop(key, None)
                self.fail(key, info=f"rexec refused the try: {alone}")
                continue
            self._track(key, body.idempotency_key or "", task_id)
            self.queued_tasks.pop(key, None)
        log.warning("rexec executor: a batch was refused (%s); its tries went one by one", exc)

    def _track(self, key: TaskInstanceKey, idem: str, task_id: str) -> None:
        self._keys[idem] = key
        self._idempotency_keys[key] = idem
        self._task_ids[key] = task_id
        self.running.add(key)
        if self._feed is not None:
            self._feed.track(task_id, idem)

    def _untrack(self, key: TaskInstanceKey) -> str | None:
        task_id = self._task_ids.pop(key, None)
        if task_id is not None and self._feed is not None:
            self._feed.forget(task_id)
        idem = self._idempotency_keys.pop(key, None)
        if idem is not None:
            self._keys.pop(idem, None)
        return task_id

    # states

    def sync(self) -> None:
        while True:
            try:
                update = self._updates.get_nowait()
            except queue.Empty:
                return
            key = self._keys.get(update.idempotency_key)
            if key is None or self._task_ids.get(key) != update.task_id:
                continue  # reported already, or revoked
            self._untrack(key)
            if update.state == TaskState.SUCCEEDED.value:
                self.success(key, info=update.info)
            else:
                log.warning("rexec executor: %s: %s", key, update.info)
                self.fail(key, info=update.info)

    def revoke_task(self, *, ti: TaskInstance) -> None:
        """Cancel the try's rexec task (queued: at once; running: its agent stops it)."""
        task_id = self._untrack(ti.key) or self._find(ti)
        self.running.discard(ti.key)
        self.queued_tasks.pop(ti.key, None)
        if task_id is None:
            return
        try:
            self.client.cancel(task_id)
        except RexecError as exc:
            if exc.status != 409:  # 409: finished already
                log.warning("rexec executor: cancel of %s (%s) failed: %s", ti.key, task_id, exc)

    def try_adopt_task_instances(self, tis: Sequence[TaskInstance]) -> Sequence[TaskInstance]:
        """Adopt the tries a previous scheduler submitted: found by their idempotency key."""
        not_adopted: list[TaskInstance] = []
        for ti in tis:
            try:
                view = self._lookup(ti)
            except RexecError as exc:
                log.warning("rexec executor: cannot look %s up: %s", ti.key, exc)
                view = None
            if view is None:
                not_adopted.append(ti)
                continue
            idem = idempotency_key(ti)
            self._track(ti.key, idem, view.id)
            if view.state.value in FINISHED:
                self._updates.put(_update(idem, view.id, view.state.value, view.error))
        if len(not_adopted) < len(tis):
            log.info("rexec executor: adopted %d tries", len(tis) - len(not_adopted))
        return not_adopted

    def _lookup(self, ti: Any) -> Any:
        found = self.client.list_tasks(
            pool=self.settings.pool_for(ti.queue), idempotency_key=idempotency_key(ti), limit=1
        )
        return found[0] if found else None

    def _find(self, ti: Any) -> str | None:
        try:
            view = self._lookup(ti)
        except RexecError:
            return None
        return None if view is None else str(view.id)

    # logs

    def get_task_log(self, ti: TaskInstance, try_number: int) -> tuple[list[str], list[str]]:
        """A running try's log, read from the agent that runs it (nothing is copied to the
        plane); ``rexec.airflow.logs`` does the same once the try ended."""
        return read_try_log(self.client, self.settings, ti, try_number)

    # stopping

    def end(self) -> None:
        self.sync()
        self._stop()

    def terminate(self) -> None:
        """The scheduler stops: the tries go on on their agents, and the next scheduler adopts
        them (nothing is cancelled)."""
        self._stop()

    def _stop(self) -> None:
        if self._feed is not None:
            self._feed.stop(timeout=self.settings.feed_wait + 5)
            self._feed = None
        if self._client is not None:
            self._client.close()
            self._client = None
