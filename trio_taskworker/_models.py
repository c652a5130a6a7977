"""Values that cross a boundary: runs, requests, and websocket messages.

All are frozen attrs classes; :mod:`trio_taskworker._serialization` turns them
into JSON and back with cattrs. This module imports no I/O library.

Payloads (parameters and results) are opaque bytes here. They travel inline,
base64-encoded, when small, and by reference to a stored blob otherwise.
"""

from __future__ import annotations

import datetime
import enum
import math
import uuid
from collections.abc import Callable
from typing import Any

import attrs

from ._exceptions import ConfigurationError
from ._states import TaskRunState

__all__ = [
    "LOG_LEVELS",
    "MAX_COUNT",
    "MAX_LOG_MESSAGE",
    "MAX_LOG_RECORDS",
    "MAX_NAME",
    "MAX_PREVIEW",
    "MAX_RUNS_PER_REQUEST",
    "MAX_SECONDS",
    "MAX_WAIT_SECONDS",
    "MAX_WATCH_IDS",
    "OPTION_NAMES",
    "Cancel",
    "CreatedRuns",
    "Credit",
    "Deliver",
    "Drain",
    "Drained",
    "ErrorInfo",
    "FeedPage",
    "FeedWatch",
    "FeedWatched",
    "Finished",
    "Heartbeat",
    "LogBatch",
    "LogRecord",
    "Rejected",
    "Released",
    "ReturnWhen",
    "RunHistory",
    "RunList",
    "RunLogs",
    "Started",
    "StateChange",
    "Subscribe",
    "Subscribed",
    "TaskOptions",
    "TaskRun",
    "TaskRunCreate",
    "TaskRunCreateBatch",
    "TaskStats",
    "TaskStatsList",
    "WaitRequest",
    "WorkerInfo",
    "WorkerList",
    "check_number",
    "option_values",
    "seconds_validator",
]

#: The most runs one ``POST /runs`` creates, and the most ids one ``POST /runs/wait`` takes.
MAX_RUNS_PER_REQUEST = 10_000
#: The longest a wait request may ask the server to hold it open, in seconds.
MAX_WAIT_SECONDS = 300.0
#: How long a server replica's lease lasts without a heartbeat, in seconds (it
#: renews it three times per lease); a dead replica's runs wait this long.
DEFAULT_REPLICA_LEASE = 15.0
#: The most ``retries`` or ``max_redeliveries`` a task may ask for (a 32-bit column).
MAX_COUNT = 2**31 - 1
#: The longest delay or timeout in seconds (about 100 years): a time this far
#: ahead still fits a datetime after any arithmetic the server does with it.
MAX_SECONDS = 100 * 365 * 24 * 3600.0
#: The longest task key, task or run name, cache key or tag, in characters.
MAX_NAME = 1000
#: The most tags a run may carry.
MAX_TAGS = 100
#: The longest ``parameters_preview`` or ``result_preview``: a ``repr`` the client
#: or worker shortened (``reprlib``) so that people can read a run without unpickling.
MAX_PREVIEW = 2000
#: The longest log message the server stores; a worker shortens longer ones first.
MAX_LOG_MESSAGE = 16 * 1024
#: The most records one ``POST /logs`` carries.
MAX_LOG_RECORDS = 1000
#: The level names a log record may carry (``logging``'s own).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# --- validators: each raises ConfigurationError naming the option ------------------


def _count(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ConfigurationError(
            f"{attribute.name} must be an int from 0 to {MAX_COUNT}, got {value!r}"
        )


def _optional_count(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _count(instance, attribute, value)


def check_number(
    name: str, value: Any, *, positive: bool = False, maximum: float = MAX_SECONDS
) -> None:
    """Raise :class:`ConfigurationError` naming ``name`` unless ``value`` is a
    finite number from 0 (above 0 with ``positive``) to ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        bound = "greater than 0" if positive else "0 or more"
        raise ConfigurationError(f"{name} must be {bound}, got {value!r}")
    if value > maximum:
        raise ConfigurationError(
            f"{name} must be at most {MAX_SECONDS:.0f} s (100 years), got {value!r}"
            if maximum == MAX_SECONDS
            else f"{name} must be at most {maximum:g}, got {value!r}"
        )


def seconds_validator(
    *, positive: bool = False, optional: bool = False, maximum: float = MAX_SECONDS
) -> Any:
    """An attrs validator: :func:`check_number` on the field (None allowed if ``optional``)."""

    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        check_number(attribute.name, value, positive=positive, maximum=maximum)

    return check


def _to_float(value: Any) -> Any:
    # Only a whole number becomes a float; anything else is left for the validator.
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _to_tags(value: Any) -> Any:
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return value  # the validator says why this is not a list of tags
    return tuple(value)


def _tags(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(t, str) for t in value):
        raise ConfigurationError(f"{attribute.name} must be an iterable of strings, got {value!r}")
    if len(value) > MAX_TAGS or any(len(t) > MAX_NAME for t in value):
        raise ConfigurationError(
            f"{attribute.name}: at most {MAX_TAGS} tags of at most {MAX_NAME} characters"
        )


def _non_empty(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not value:
        raise ConfigurationError(f"{attribute.name} must not be empty")
    if len(value) > MAX_NAME:
        raise ConfigurationError(f"{attribute.name} must be at most {MAX_NAME} characters")


@attrs.frozen(kw_only=True)
class TaskOptions:
    """The options a task gives each of its runs; every rule about them lives here.

    - ``retries`` and ``retry_delay_seconds``: how often a FAILED run is
      rescheduled, and how long it waits in the queue first;
    - ``timeout_seconds``: the run FAILS with :class:`TaskRunTimedOut` after this;
    - ``max_redeliveries``: how often a run whose worker vanished is redelivered
      before it is CRASHED (``None``: the server's setting);
    - ``tags``: free-form labels stored with each run.

    A bad value raises :class:`ConfigurationError`. The server builds the same
    class from each ``POST /runs`` body, so it enforces the same rules.
    """

    retries: int = attrs.field(default=0, validator=_count)
    retry_delay_seconds: float = attrs.field(
        default=0.0, converter=_to_float, validator=seconds_validator()
    )
    timeout_seconds: float | None = attrs.field(
        default=None,
        converter=_to_float,
        validator=seconds_validator(positive=True, optional=True),
    )
    max_redeliveries: int | None = attrs.field(default=None, validator=_optional_count)
    tags: tuple[str, ...] = attrs.field(default=(), converter=_to_tags, validator=_tags)


#: The option names, in declaration order.
OPTION_NAMES = tuple(field.name for field in attrs.fields(TaskOptions))


def option_values(value: TaskOptions) -> dict[str, Any]:
    """The options carried by ``value`` (a :class:`TaskOptions` or a subclass) as keywords."""
    return {name: getattr(value, name) for name in OPTION_NAMES}


class ReturnWhen(enum.StrEnum):
    """When ``POST /runs/wait`` answers."""

    ALL_ENDED = "ALL_ENDED"
    FIRST_ENDED = "FIRST_ENDED"


@attrs.frozen(kw_only=True)
class ErrorInfo:
    """What a FAILED (or CRASHED) run raised, readable without unpickling."""

    type: str
    message: str
    traceback: str = ""


def _unchecked(cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    # A snapshot repeats what the server stored: options were checked when the
    # run was created, and a row stored under older rules must still be readable.
    return [field.evolve(validator=None) for field in fields]


@attrs.frozen(kw_only=True, field_transformer=_unchecked)
class TaskRun(TaskOptions):
    """A snapshot of one run, as the server last recorded it, with its options.

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
    retry_count: int = 0
    redeliveries: int = 0
    parameters: bytes | None = None
    parameters_ref: str | None = None
    result: bytes | None = None
    result_ref: str | None = None
    error: ErrorInfo | None = None
    message: str | None = None
    name: str | None = None
    cache_key: str | None = None
    cache_expiration: float | None = None
    #: A readable ``repr`` of the parameters, from the client (never unpickled).
    parameters_preview: str | None = None
    #: A readable ``repr`` of the return value, from the worker.
    result_preview: str | None = None


def _optional_text_of(maximum: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """A validator: None, or a string of at most ``maximum`` characters."""

    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"{attribute.name} must be a string, got {value!r}")
        if value is not None and len(value) > maximum:
            raise ConfigurationError(f"{attribute.name} must be at most {maximum} characters")

    return check


_optional_text = _optional_text_of(MAX_NAME)
_preview = _optional_text_of(MAX_PREVIEW)


@attrs.frozen(kw_only=True)
class TaskRunCreate(TaskOptions):
    """One run to create, with its options. ``scheduled_time`` must carry a timezone.

    The parameters travel inline (``parameters``) or as a stored blob
    (``parameters_ref``), never both. ``name`` is the run's display name.
    With a ``cache_key``, the server completes the run at once with the
    result of a COMPLETED run of the same task and key, if one ended less than
    its ``cache_expiration`` seconds ago (None: it never expires).
    ``parameters_preview`` is a short, readable ``repr`` of the parameters made
    by the client, shown by ``run show`` and the dashboard; the server never
    reads the pickled ``parameters``.
    """

    task_key: str = attrs.field(validator=_non_empty)
    task_name: str = attrs.field(default="", validator=_optional_text)
    parameters: bytes | None = None
    parameters_ref: str | None = None
    scheduled_time: datetime.datetime | None = None
    name: str | None = attrs.field(default=None, validator=_optional_text)
    cache_key: str | None = attrs.field(default=None, validator=_optional_text)
    cache_expiration: float | None = attrs.field(
        default=None, converter=_to_float, validator=seconds_validator(optional=True)
    )
    parameters_preview: str | None = attrs.field(default=None, validator=_preview)

    def __attrs_post_init__(self) -> None:
        if self.parameters is not None and self.parameters_ref is not None:
            raise ConfigurationError("give parameters or parameters_ref, not both")


def _batch_size(_: Any, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
    if not value:
        raise ConfigurationError(f"a batch needs at least one run in {attribute.name}")
    if len(value) > MAX_RUNS_PER_REQUEST:
        raise ConfigurationError(f"at most {MAX_RUNS_PER_REQUEST} {attribute.name} per request")


def _at_most_per_request(maximum: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """A validator: a sequence of at most ``maximum`` items."""

    def check(_: Any, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
        if len(value) > maximum:
            raise ConfigurationError(f"at most {maximum} {attribute.name} per request")

    return check


_id_count = _at_most_per_request(MAX_RUNS_PER_REQUEST)


def _wait_seconds(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise ConfigurationError(f"{attribute.name} must be in [0, {MAX_WAIT_SECONDS:g}]")


@attrs.frozen(kw_only=True)
class TaskRunCreateBatch:
    """The body of ``POST /runs``: all its runs are created in one transaction."""

    runs: tuple[TaskRunCreate, ...] = attrs.field(validator=_batch_size)


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

    ids: tuple[uuid.UUID, ...] = attrs.field(validator=_id_count)
    timeout: float = attrs.field(default=30.0, validator=_wait_seconds)
    return_when: ReturnWhen = ReturnWhen.ALL_ENDED


#: The most runs one ``POST /feeds/{feed_id}/watch`` names.
MAX_WATCH_IDS = 1_000


@attrs.frozen(kw_only=True)
class FeedWatch:
    """The body of ``POST /feeds/{feed_id}/watch``: runs the feed is to watch."""

    ids: tuple[uuid.UUID, ...] = attrs.field(validator=_at_most_per_request(MAX_WATCH_IDS))


@attrs.frozen(kw_only=True)
class FeedWatched:
    """The answer to ``POST /feeds/{feed_id}/watch``.

    ``epoch`` names the feed as the server has it: polls send it back, and a
    different one than before means the server made the feed anew (it watches
    none of the runs the earlier one did). ``refused`` are the ids it does not
    watch because they name no run.
    """

    epoch: int
    refused: tuple[uuid.UUID, ...] = ()


@attrs.frozen(kw_only=True)
class FeedPage:
    """The answer to ``GET /feeds/{feed_id}``: runs of the feed that have ended.

    ``runs`` come without their parameters; ``heavy`` are runs that ended with
    a result too large to carry here (read each with ``GET /runs/{run_id}``).
    ``cursor`` is what the next poll sends as ``after``, so that the server
    forgets what this page held: a page lost on the way is sent again.
    """

    runs: tuple[TaskRun, ...] = ()
    heavy: tuple[uuid.UUID, ...] = ()
    cursor: int = 0


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
    """The run ended on the worker: ``state`` is COMPLETED, FAILED or CANCELLED.

    For a FAILED run with retries left, the worker decides: ``retry=False``
    ends it FAILED now (the task's ``retry_condition_fn`` said no), and
    ``retry_delay_seconds`` is how long it waits before the next attempt
    (None: the run's ``retry_delay_seconds`` option). ``message`` says why,
    when the state alone does not. ``result_preview`` is a short ``repr`` of a
    COMPLETED run's return value, for people to read.
    """

    id: uuid.UUID
    attempt: int
    state: TaskRunState
    result: bytes | None = None
    result_ref: str | None = None
    error: ErrorInfo | None = None
    message: str | None = None
    retry: bool = True
    retry_delay_seconds: float | None = attrs.field(
        default=None, converter=_to_float, validator=seconds_validator(optional=True)
    )
    result_preview: str | None = attrs.field(default=None, validator=_preview)


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


# --- observing: history, logs, workers, tasks -----------------------------------------


@attrs.frozen(kw_only=True)
class StateChange:
    """One entry of a run's state history: it became ``state`` at ``timestamp``."""

    timestamp: datetime.datetime
    state: TaskRunState
    attempt: int
    message: str | None = None


@attrs.frozen(kw_only=True)
class RunHistory:
    """The answer to ``GET /runs/{id}/history``: every state change, oldest first."""

    history: tuple[StateChange, ...]


def _log_level(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in LOG_LEVELS:
        raise ConfigurationError(f"{attribute.name} must be one of {', '.join(LOG_LEVELS)}")


def _log_message(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or len(value) > MAX_LOG_MESSAGE:
        raise ConfigurationError(
            f"{attribute.name} must be a string of at most {MAX_LOG_MESSAGE} characters"
        )


@attrs.frozen(kw_only=True)
class LogRecord:
    """One log record of a run: what a worker sends and ``GET /runs/{id}/logs`` returns."""

    run_id: uuid.UUID
    attempt: int = attrs.field(validator=_count)
    timestamp: datetime.datetime
    level: str = attrs.field(validator=_log_level)
    logger: str = attrs.field(default="", validator=_optional_text)
    message: str = attrs.field(validator=_log_message)


_log_batch_size = _at_most_per_request(MAX_LOG_RECORDS)


@attrs.frozen(kw_only=True)
class LogBatch:
    """The body of ``POST /logs``: records of any runs, in the order they were made."""

    records: tuple[LogRecord, ...] = attrs.field(validator=_log_batch_size)


@attrs.frozen(kw_only=True)
class RunLogs:
    """The answer to ``GET /runs/{id}/logs``: the stored records, oldest first.

    ``dropped`` counts records the server did not keep because the run had
    reached its bound (the server's ``max_logs_per_run``).
    """

    logs: tuple[LogRecord, ...]
    dropped: int = 0


@attrs.frozen(kw_only=True)
class WorkerInfo:
    """One connected worker, as ``GET /workers`` shows it.

    ``limit`` is the credits it subscribed with (its ``limit``); ``in_flight``
    the runs leased to it now; ``last_seen`` when it last sent anything.
    """

    connection_id: str
    client_id: str
    task_keys: tuple[str, ...]
    limit: int
    in_flight: int
    connected_at: datetime.datetime
    last_seen: datetime.datetime
    draining: bool = False


@attrs.frozen(kw_only=True)
class WorkerList:
    """The answer to ``GET /workers``."""

    workers: tuple[WorkerInfo, ...]


@attrs.frozen(kw_only=True)
class TaskStats:
    """What one task key is doing, as ``GET /tasks`` shows it.

    ``queued`` runs are due and waiting for a worker, ``scheduled`` ones wait
    for their time; ``running`` counts PENDING, RUNNING and CANCELLING.
    ``failed_last_hour`` counts FAILED and CRASHED runs that ended in the last
    hour. ``ended_per_minute`` holds 60 counts of runs that ended in each minute
    of the last hour, oldest first. ``workers`` counts the connected workers
    that serve the key.
    """

    task_key: str
    queued: int
    scheduled: int
    running: int
    completed_last_hour: int
    failed_last_hour: int
    oldest_queued_seconds: float | None
    ended_per_minute: tuple[int, ...]
    workers: int = 0


@attrs.frozen(kw_only=True)
class TaskStatsList:
    """The answer to ``GET /tasks``, by task key."""

    tasks: tuple[TaskStats, ...]


WorkerMessage = Subscribe | Credit | Started | Finished | Released | Drain | Heartbeat
ServerMessage = Subscribed | Deliver | Rejected | Cancel | Drained
