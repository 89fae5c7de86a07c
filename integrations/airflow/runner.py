"""What a rexec agent runs for one Airflow try: the task SDK's supervisor, and its exit code.

The agent allows it with ``--allow 'rexec.airflow.runner:*'``, which also makes the agent's
children import this module (and so Airflow) when they start: each try then forks its task
process from a warm interpreter, as Celery's prefork workers do, instead of paying Airflow's
imports (8-12 s) per try. The agent needs only ``[core] execution_api_server_url`` and the DAG
files: no metadata database, no JWT secret; the workload carries its own short-lived token.

How a try ends, in rexec's terms:

- the supervisor's exit code 0: succeeded, with 0 as the result;
- any other exit code: :class:`TryFailed`; Airflow knows already (the supervisor reported
  it) and runs its own retries, so rexec makes no further attempt;
- the Execution API refuses the start (409 ``invalid_state``: this try started before, on an
  agent since lost; 401/403: the token expired): :class:`TryRefused`, no further attempt, and
  the executor tells the scheduler at once, so Airflow's retry starts within seconds;
- the Execution API unreachable, or this agent lost before the start: an ordinary failure, and
  rexec gives the same try to another agent.
"""

from __future__ import annotations

import sys
from typing import Any

from setproctitle import getproctitle, setproctitle

from airflow.executors.base_executor import BaseExecutor
from airflow.executors.workloads import ExecuteTask
from airflow.sdk.api.client import ServerResponseError
from airflow.sdk.exceptions import TaskAlreadyRunningError
from airflow.sdk.log import configure_logging
from rexec.worker.context import NonRetryable

REFUSALS = {401: "token refused", 403: "token refused", 404: "unknown try", 409: "started before"}


class TryFailed(NonRetryable):
    """The try ran and failed; Airflow has its state and decides on a retry."""


class TryRefused(NonRetryable):
    """The Execution API would not start this try (it started before, or its token expired)."""


def run_workload(workload: dict[str, Any]) -> int:
    """Run one ``ExecuteTask`` workload (its JSON as a dict) through the supervisor."""
    task = ExecuteTask.model_validate(workload)
    ti = task.ti
    name = f"{ti.dag_id}.{ti.task_id} run {ti.run_id} try {ti.try_number}"
    if ti.map_index is not None and ti.map_index >= 0:
        name += f" map index {ti.map_index}"
    # JSON lines on stdout: the agent keeps them as the attempt's log, which the Airflow UI
    # reads from this agent through rexec (the lines are the task handler's own format).
    configure_logging(output=sys.stdout.buffer, json_output=True)
    title = getproctitle()
    try:
        code = BaseExecutor.run_workload(
            task, subprocess_logs_to_stdout=True, proctitle=f"rexec airflow supervisor: {name}"
        )
    except TaskAlreadyRunningError as exc:
        # The task SDK's own name for a 409 while the try runs: it started on an agent since
        # lost (or frozen), so only Airflow's next try can run it now.
        raise TryRefused(
            f"the Execution API refused to start {name} (409, started before): {exc}"
        ) from None
    except ServerResponseError as exc:
        status = exc.response.status_code
        if status in REFUSALS:
            raise TryRefused(
                f"the Execution API refused to start {name} ({status}, {REFUSALS[status]}): "
                f"{exc.detail or exc}"
            ) from None
        raise
    finally:
        setproctitle(title)  # the child runs more tries after this one
    if code != 0:
        raise TryFailed(f"{name} failed: the supervisor exited with {code}")
    return code
