"""trio_taskworker: run Python functions in the background, the trio way.

Submit runs of a :func:`task` with ``await fn.delay(...)``; a server keeps
them in a durable queue; :class:`TaskWorker` processes run them under a
capacity limit; ``await future.result()`` brings the value back.
"""

from ._client import SyncClient, TaskWorkerClient, open_client
from ._exceptions import (
    ConfigurationError,
    ProtocolError,
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
from ._server import TaskServer
from ._states import TaskRunState
from ._task import Task, task
from ._version import __version__
from ._worker import TaskWorker, serve, should_try_to_read_parameters

# Plain sorted() order, which test_exports checks (ruff's isort-style order
# would put the constants first).
__all__ = [  # noqa: RUF022
    "ALL_COMPLETED",
    "ConfigurationError",
    "DoneAndNotDoneFutures",
    "ErrorInfo",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "ProtocolError",
    "SerializationError",
    "ServerError",
    "ServerUnavailable",
    "StopTaskWorker",
    "SyncClient",
    "Task",
    "TaskOptions",
    "TaskRun",
    "TaskRunCancelled",
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
    "gather_results",
    "gather_results_sync",
    "open_client",
    "serve",
    "should_try_to_read_parameters",
    "task",
    "wait",
    "wait_sync",
]
