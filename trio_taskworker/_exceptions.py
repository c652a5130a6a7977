"""Exceptions raised by trio_taskworker.

Every error the library raises on its own account derives from one root::

    TaskWorkerError
    ├── ConfigurationError          bad settings, entrypoints or task definitions
    ├── ServerError                 the server answered with an error status
    │   └── TaskRunNotFound         no run with that id (HTTP 404)
    ├── ServerUnavailable           the server could not be reached at all
    ├── ProtocolError               a websocket message broke the protocol
    ├── SerializationError          a payload could not be (un)pickled, or was refused
    │                               (a missing or bad signature)
    ├── TaskRunFailed               a FAILED run whose exception could not be rebuilt
    ├── TaskRunTimedOut             a run hit its ``timeout_seconds`` (also a TimeoutError)
    ├── TaskRunCancelled            the run ended CANCELLED
    ├── TaskRunCrashed              the run ended CRASHED
    ├── MissingContextError         get_run_context() outside a run (also a RuntimeError)
    ├── RemoteTraceback             the worker-side traceback, set as a re-raised
    │                               exception's ``__cause__`` (never raised alone)
    └── StopTaskWorker              raised inside a task to stop the worker serving it

A FAILED run normally re-raises the task's own exception from
:meth:`TaskRunFuture.result`; :class:`TaskRunFailed` only stands in when that
exception could not be pickled by the worker or unpickled by the caller.

This module imports no I/O library.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = [
    "ConfigurationError",
    "MissingContextError",
    "ProtocolError",
    "RemoteTraceback",
    "SerializationError",
    "ServerError",
    "ServerUnavailable",
    "StopTaskWorker",
    "TaskRunCancelled",
    "TaskRunCrashed",
    "TaskRunFailed",
    "TaskRunNotFound",
    "TaskRunTimedOut",
    "TaskWorkerError",
    "leaves",
]

E = TypeVar("E", bound=BaseException)


def leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """Every exception in ``group``, however deeply nested groups hold it, in order.

    Errors raised inside nurseries arrive wrapped, once per nursery they cross;
    this flattens them without losing any.
    """
    found: list[E] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(leaves(exc))
        else:
            found.append(exc)
    return found


class TaskWorkerError(Exception):
    """The root of every exception raised by trio_taskworker itself."""


class ConfigurationError(TaskWorkerError, ValueError):
    """A setting, an entrypoint or a task definition is not usable.

    It is also a ``ValueError``, so the server's JSON decoding reports a
    request whose options break the same rules as a 422 with this message.
    """


class ServerError(TaskWorkerError):
    """The server answered a request with an error status.

    ``status_code`` is the HTTP status and ``detail`` the server's message.
    """

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"server answered {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class TaskRunNotFound(ServerError):
    """The server holds no run with the requested id."""


class ServerUnavailable(TaskWorkerError):
    """The server could not be reached (refused, reset, timed out)."""


class ProtocolError(TaskWorkerError):
    """A websocket peer sent a message that breaks the subscription protocol."""


class SerializationError(TaskWorkerError):
    """Parameters or a result could not be pickled or unpickled, or were refused
    because their signature is missing or wrong (see ``TRIO_TASKWORKER_SIGNING_KEY``)."""


class TaskRunFailed(TaskWorkerError):
    """A run FAILED and its original exception could not be rebuilt here.

    ``exc_type`` is the dotted name of the task's exception type and
    ``traceback`` the worker-side traceback text.
    """

    def __init__(self, exc_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback


class TaskRunTimedOut(TaskWorkerError, TimeoutError):
    """A run was still going when its task's ``timeout_seconds`` ran out."""


class TaskRunCancelled(TaskWorkerError):
    """The run ended in the CANCELLED state, so it has no result."""


class TaskRunCrashed(TaskWorkerError):
    """The run ended in the CRASHED state: the infrastructure, not the task, failed."""


class MissingContextError(TaskWorkerError, RuntimeError):
    """:func:`get_run_context` was called outside a run that a worker executes."""


class RemoteTraceback(TaskWorkerError):
    """The traceback of a FAILED run as the worker saw it.

    When :meth:`TaskRunFuture.result` re-raises a task's exception, this is its
    ``__cause__``, so the printed traceback shows the worker-side frames below
    "The above exception was the direct cause...", as ``concurrent.futures``
    does for exceptions from another process. ``traceback`` is the text.
    """

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback.rstrip()}\n"""'


class StopTaskWorker(TaskWorkerError):
    """Raise inside a task to stop the worker that runs it.

    The worker stops as it does on :meth:`TaskWorker.stop`: it takes no more
    runs and lets the others in flight finish within the shutdown grace period.
    """
