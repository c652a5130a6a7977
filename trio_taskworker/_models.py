"""Values that cross a boundary: runs, requests, and websocket messages.

All are frozen attrs classes; :mod:`trio_taskworker._serialization` turns them
into JSON and back with cattrs. This module imports no I/O library.

Payloads (parameters and results) are opaque bytes here. They travel inline,
base64-encoded, when small, and by reference to a stored blob otherwise.
"""

from __future__ import annotations

import datetime
import uuid

import attrs

from ._states import TaskRunState

__all__ = [
    "Cancel",
    "CreatedRuns",
    "Credit",
    "Deliver",
    "Drain",
    "Drained",
    "ErrorInfo",
    "Finished",
    "Heartbeat",
    "Rejected",
    "Released",
    "RunList",
    "Started",
    "Subscribe",
    "Subscribed",
    "TaskRun",
    "TaskRunCreate",
    "TaskRunCreateBatch",
    "WaitRequest",
]


@attrs.frozen(kw_only=True)
class ErrorInfo:
    """What a FAILED (or CRASHED) run raised, readable without unpickling."""

    type: str
    message: str
    traceback: str = ""


@attrs.frozen(kw_only=True)
class TaskRun:
    """A snapshot of one run, as the server last recorded it.

    ``attempt`` counts deliveries to a worker (0 until the first one) and is
    also the fencing token: a worker's report must name the attempt it was given.
    ``parameters``/``result`` hold inline payload bytes; ``parameters_ref`` and
    ``result_ref`` name a stored blob instead when the payload was large.
    For a FAILED run, ``result`` holds the pickled exception.
    """

    id: uuid.UUID
    task_key: str
    task_name: str
    state: TaskRunState
    created_at: datetime.datetime
    scheduled_time: datetime.datetime
    started_at: datetime.datetime | None = None
    finished_at: datetime.datetime | None = None
    attempt: int = 0
    retries: int = 0
    retry_count: int = 0
    retry_delay_seconds: float = 0.0
    timeout_seconds: float | None = None
    max_redeliveries: int | None = None
    redeliveries: int = 0
    tags: tuple[str, ...] = ()
    parameters: bytes | None = None
    parameters_ref: str | None = None
    result: bytes | None = None
    result_ref: str | None = None
    error: ErrorInfo | None = None
    message: str | None = None


@attrs.frozen(kw_only=True)
class TaskRunCreate:
    """One run to create. ``scheduled_time`` must carry a timezone."""

    task_key: str
    task_name: str = ""
    parameters: bytes | None = None
    parameters_ref: str | None = None
    scheduled_time: datetime.datetime | None = None
    retries: int = 0
    retry_delay_seconds: float = 0.0
    timeout_seconds: float | None = None
    max_redeliveries: int | None = None
    tags: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class TaskRunCreateBatch:
    """The body of ``POST /runs``: all its runs are created in one transaction."""

    runs: tuple[TaskRunCreate, ...]


@attrs.frozen(kw_only=True)
class CreatedRuns:
    """The answer to ``POST /runs``: the new runs' ids, in request order."""

    ids: tuple[uuid.UUID, ...]


@attrs.frozen(kw_only=True)
class RunList:
    """A page of runs (without their payloads)."""

    runs: tuple[TaskRun, ...]


@attrs.frozen(kw_only=True)
class WaitRequest:
    """The body of ``POST /runs/wait``.

    The answer comes once all of ``ids`` have ended (``ALL_ENDED``, the
    default) or once any has (``FIRST_ENDED``), or after ``timeout`` seconds,
    and lists the runs among ``ids`` that have ended by then.
    """

    ids: tuple[uuid.UUID, ...]
    timeout: float = 30.0
    return_when: str = "ALL_ENDED"


# --- websocket messages, worker to server -------------------------------------------


@attrs.frozen(kw_only=True)
class Subscribe:
    """The first message on a subscription: which task keys, and initial credits."""

    keys: tuple[str, ...]
    client_id: str
    credits: int


@attrs.frozen(kw_only=True)
class Credit:
    """The worker can take ``n`` more runs."""

    n: int


@attrs.frozen(kw_only=True)
class Started:
    """The worker has started the run it was given as ``attempt``."""

    id: uuid.UUID
    attempt: int


@attrs.frozen(kw_only=True)
class Finished:
    """The run ended on the worker: ``state`` is COMPLETED, FAILED or CANCELLED."""

    id: uuid.UUID
    attempt: int
    state: TaskRunState
    result: bytes | None = None
    result_ref: str | None = None
    error: ErrorInfo | None = None


@attrs.frozen(kw_only=True)
class Released:
    """The worker hands the run back unfinished (it is stopping); requeue it."""

    id: uuid.UUID
    attempt: int
    reason: str


@attrs.frozen(kw_only=True)
class Heartbeat:
    """The worker is alive; sent every third of the lease when nothing else is."""


@attrs.frozen(kw_only=True)
class Drain:
    """The worker is stopping: send it no more runs (its reports still count).

    The server answers with :class:`Drained` carrying the same ``seq`` once it
    has applied every report sent before it.
    """

    seq: int = 0


# --- websocket messages, server to worker -------------------------------------------


@attrs.frozen(kw_only=True)
class Subscribed:
    """The server accepted the subscription.

    Leases on this connection last ``lease_seconds`` past the last message the
    worker sent; a worker must send something (a heartbeat at least) more often.
    """

    connection_id: str
    lease_seconds: float = 30.0


@attrs.frozen(kw_only=True)
class Deliver:
    """Runs leased to this connection, each with its ``attempt`` as lease token."""

    runs: tuple[TaskRun, ...]


@attrs.frozen(kw_only=True)
class Rejected:
    """The server refused a report about run ``id``."""

    id: uuid.UUID
    reason: str


@attrs.frozen(kw_only=True)
class Drained:
    """Every report before the worker's :class:`Drain` number ``seq`` is applied."""

    seq: int


@attrs.frozen(kw_only=True)
class Cancel:
    """The caller cancelled run ``id``: cancel it on the worker."""

    id: uuid.UUID


WorkerMessage = Subscribe | Credit | Started | Finished | Released | Drain | Heartbeat
ServerMessage = Subscribed | Deliver | Rejected | Cancel | Drained
