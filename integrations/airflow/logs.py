"""Task logs in the Airflow UI, read from the agent that ran the try; nothing is copied.

While a try runs, the scheduler's executor answers (``RexecExecutor.get_task_log``); once it
ended, the API server asks its remote log reader, which is :data:`REMOTE_TASK_LOG` when
``[logging] logging_config_class = rexec.airflow.logs.LOGGING_CONFIG``. Both take a short-lived
log grant from the rexec API and read the log from the agent's log server with it, so the
customer's logs stay in the customer's cluster. Uploads do nothing: there is nothing to upload.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from airflow.config_templates.airflow_local_settings import DEFAULT_LOGGING_CONFIG
from airflow.configuration import conf
from rexec.client import RexecClient, RexecError
from rexec.client.agentlog import AgentLogUnavailable, stream_agent_log

from . import config


def idempotency_key(ti: Any) -> str:
    """The rexec idempotency key of one try: the scheduler's ``external_executor_id`` (committed
    with QUEUED, so it survives a scheduler crash), else the try's own id and number."""
    external: str | None = getattr(ti, "external_executor_id", None)
    return external or f"airflow:{ti.id}:{ti.try_number}"


def read_try_log(
    client: RexecClient, settings: config.ExecutorConfig, ti: Any, try_number: int
) -> tuple[list[str], list[str]]:
    """(sources, [log text]) of one try, from the agent that ran it; ([], []) when rexec has
    no such try (it ran on another executor, or was never submitted)."""
    if try_number != ti.try_number:
        return [], []  # an older try: the history row's own key is asked for it
    key = idempotency_key(ti)
    try:
        found = client.list_tasks(pool=settings.pool_for(ti.queue), idempotency_key=key, limit=1)
        if not found:
            return [], []
        grant = client.log_grant(found[0].id)
    except RexecError as exc:
        return [f"rexec: cannot find this try's log: {exc}"], []
    source = (
        f"rexec task {grant.task_id} attempt {grant.attempt}, "
        f"read from agent {grant.agent_id} at {grant.log_url or '(no log URL)'}"
    )
    chunks: list[bytes] = []
    try:
        stream_agent_log(grant, chunks.append)
    except AgentLogUnavailable as exc:
        if grant.log_tail:
            return [f"{source}: {exc}", "what follows is the last lines the plane keeps"], [
                grant.log_tail
            ]
        return [f"{source}: {exc}"], []
    return [source], [b"".join(chunks).decode(errors="replace")]


class RexecTaskLogIO:
    """Airflow's ``RemoteLogIO`` for tries that ran on rexec agents."""

    processors: tuple[Any, ...] = ()

    def __init__(self) -> None:
        self._client: RexecClient | None = None
        self._settings: config.ExecutorConfig | None = None

    def upload(self, path: os.PathLike[str] | str, ti: Any = None) -> None:
        """Nothing to do: the log stays on the agent."""

    def read(self, relative_path: str, ti: Any) -> tuple[list[str], list[str] | None]:
        try:
            if self._settings is None:
                self._settings = config.from_airflow(conf)
            if self._client is None:
                s = self._settings
                self._client = RexecClient(s.api_url, api_key=s.api_key, ca_file=s.ca_file)
        except config.ConfigError as exc:
            return [f"rexec: {exc}"], None
        sources, logs = read_try_log(self._client, self._settings, ti, ti.try_number)
        return sources, logs or None


LOGGING_CONFIG: dict[str, Any] = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
REMOTE_TASK_LOG = RexecTaskLogIO()
