"""trio_taskworker: run Python functions in the background, the trio way.

Submit runs of a :func:`task` with ``await fn.delay(...)``; a server keeps
them in a durable queue; :class:`TaskWorker` processes run them under a
capacity limit; ``await future.result()`` brings the value back.

As a library it logs through the ``trio_taskworker`` loggers and prints
nothing unless the application configures logging (a ``NullHandler`` keeps
Python's last-resort handler quiet).
"""

import logging as _logging
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._client import SyncClient, TaskWorkerClient, open_client
from ._context import TaskRunContext, get_run_context
from ._definition import unmapped
from ._exceptions import (
    ConfigurationError,
    MissingContextError,
    ProtocolError,
    RemoteTraceback,
    SerializationError,
    ServerError,
    ServerUnavailable,
    StopTaskWorker,
    TaskRunCancelled,
    TaskRunCrashed,
    TaskRunFailed,
    TaskRunNotFound,
    TaskRunTimedOut,
    TaskWorkerError,
)
from ._future import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    DoneAndNotDoneFutures,
    TaskRunFuture,
    TaskRunFutureList,
    as_completed,
    as_completed_sync,
    gather_results,
    gather_results_sync,
    wait,
    wait_sync,
)
from ._models import ErrorInfo, TaskOptions, TaskRun
from ._policy import State, exponential_backoff
from ._runlog import get_run_logger

if _TYPE_CHECKING:
    from ._server import TaskServer
from ._states import TaskRunState
from ._task import Task, task
from ._version import __version__
from ._worker import TaskWorker, serve, should_try_to_read_parameters

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def __getattr__(name: str) -> _Any:
    # The server (Starlette, Hypercorn, psycopg, prometheus_client) is imported
    # on first use: a worker or a submitting process never loads it, which
    # keeps their memory and start-up small.
    if name == "TaskServer":
        from ._server import TaskServer

        return TaskServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Plain sorted() order, which test_exports checks (ruff's isort-style order
# would put the constants first).
__all__ = [  # noqa: RUF022
    "ALL_COMPLETED",
    "ConfigurationError",
    "DoneAndNotDoneFutures",
    "ErrorInfo",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "MissingContextError",
    "ProtocolError",
    "RemoteTraceback",
    "SerializationError",
    "ServerError",
    "ServerUnavailable",
    "State",
    "StopTaskWorker",
    "SyncClient",
    "Task",
    "TaskOptions",
    "TaskRun",
    "TaskRunCancelled",
    "TaskRunContext",
    "TaskRunCrashed",
    "TaskRunFailed",
    "TaskRunFuture",
    "TaskRunFutureList",
    "TaskRunNotFound",
    "TaskRunState",
    "TaskRunTimedOut",
    "TaskServer",
    "TaskWorker",
    "TaskWorkerClient",
    "TaskWorkerError",
    "__version__",
    "as_completed",
    "as_completed_sync",
    "exponential_backoff",
    "gather_results",
    "gather_results_sync",
    "get_run_context",
    "get_run_logger",
    "open_client",
    "serve",
    "should_try_to_read_parameters",
    "task",
    "unmapped",
    "wait",
    "wait_sync",
]
