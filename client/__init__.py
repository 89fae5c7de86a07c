"""Python client of the rexec Remote Execution API, sync and async, with the CLI's verbs.

>>> from rexec.client import RexecClient
>>> with RexecClient() as rexec:                        # REXEC_API_URL, default :8600
...     task = rexec.submit("etl", "myapp.jobs:resize", args=["a.png"])
...     [done] = rexec.wait([task.id], timeout=60)
"""

from __future__ import annotations

from rexec.schemas.api import (
    AgentView,
    PoolView,
    SubmitTask,
    TaskChange,
    TaskChanges,
    TaskHistoryEntry,
    TaskState,
    TaskView,
    TokenCreated,
    TokenView,
)

from ._async import AsyncRexecClient
from ._calls import RexecError
from ._sync import RexecClient

__all__ = [
    "AgentView",
    "AsyncRexecClient",
    "PoolView",
    "RexecClient",
    "RexecError",
    "SubmitTask",
    "TaskChange",
    "TaskChanges",
    "TaskHistoryEntry",
    "TaskState",
    "TaskView",
    "TokenCreated",
    "TokenView",
]
