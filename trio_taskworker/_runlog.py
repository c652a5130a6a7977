"""Run logs: :func:`get_run_logger`, ``log_prints`` and the worker's log shipper.

Inside a run, :func:`get_run_logger` returns a :class:`RunLogger`. Each record
it takes goes two ways:

- to the worker's own log, through the ``trio_taskworker.task_runs`` logger,
  its message prefixed with the run id (and the id in the record's ``extra``);
- into the worker's :class:`LogShipper`, which sends records to the server in
  batches (``POST /logs``) from a task of the worker's nursery.

::

    task code ── RunLogger.log ──┬── logging: "trio_taskworker.task_runs"
     (any thread)                └── LogShipper.add ── bounded buffer
                                                           │ every 0.5 s, at 100 records,
                                                           │ or when a run ends
                                     LogShipper.run ── POST /logs (retried, then dropped)

Which records are taken is the ``trio_taskworker.task_runs`` logger's level
(INFO unless the application sets it): both ways see the same records. A
run's records are sent before the worker reports the run ended, so that its
logs are there as soon as its result is; waiting for that is bounded, and a
server that does not take them never fails a run or the worker.

With ``log_prints``, ``print()`` to stdout inside the run goes to the run's
logger at INFO instead: a wrapper of ``builtins.print``, installed the first
time a run asks for it, diverts only the calls made in such a run (a
context variable says which), and only those to stdout.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import contextvars
import datetime
import logging
import sys
import threading
import traceback
import types
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import trio

from ._context import get_run_context
from ._exceptions import MissingContextError, ServerError, ServerUnavailable
from ._models import LOG_LEVELS, MAX_LOG_MESSAGE, MAX_LOG_RECORDS, MAX_NAME, LogRecord, TaskRun

__all__ = [
    "RUN_LOGGER_NAME",
    "LogShipper",
    "RunLogger",
    "get_run_logger",
    "level_name",
    "run_logging",
    "shorten_message",
]

log = logging.getLogger(__name__)

#: The logger that run loggers log through (and whose level decides what they take).
RUN_LOGGER_NAME = "trio_taskworker.task_runs"

_run_logger = logging.getLogger(RUN_LOGGER_NAME)
if _run_logger.level == logging.NOTSET:
    # A run's INFO records are its point: take them even when the application
    # left the root logger at WARNING. Setting a level adds no output; the
    # application's handlers (or the package's NullHandler) still decide that.
    _run_logger.setLevel(logging.INFO)

_LEVELS = tuple((getattr(logging, name), name) for name in LOG_LEVELS)


def level_name(levelno: int) -> str:
    """The name among ``LOG_LEVELS`` nearest to a numeric level (a tie goes up).

    Custom levels (``logging.addLevelName(25, "NOTICE")``) become one of the
    five names the server stores.
    """
    best_no, best = _LEVELS[0]
    for number, name in _LEVELS:
        if abs(levelno - number) <= abs(levelno - best_no):
            best_no, best = number, name
    return best


_CUT_MARKER = " ... [{} more characters cut]"


def shorten_message(message: str) -> str:
    """``message`` fit for the server: at most ``MAX_LOG_MESSAGE`` characters
    (a longer one keeps its start and says how much was cut) and valid UTF-8
    (a lone surrogate becomes its ``\\udcxx`` escape)."""
    if len(message) > MAX_LOG_MESSAGE:
        # Room for the marker with the longest count it could hold.
        keep = MAX_LOG_MESSAGE - len(_CUT_MARKER.format(len(message)))
        message = message[:keep] + _CUT_MARKER.format(len(message) - keep)
    try:
        message.encode()
    except UnicodeEncodeError:
        message = message.encode("utf-8", "backslashreplace").decode()
        if len(message) > MAX_LOG_MESSAGE:
            return shorten_message(message)
    return message


def _message_of(msg: Any, args: tuple[Any, ...]) -> str:
    """What ``LogRecord.getMessage`` makes of ``msg % args``, without raising."""
    text = str(msg)
    if args:
        if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            args = args[0]  # type: ignore[assignment] # logging's own rule for one mapping
        try:
            text = text % args
        except Exception as exc:
            text = f"{text!r} % {args!r} (the message could not be formatted: {exc!r})"
    return text


ExcInfo = tuple[type[BaseException], BaseException, types.TracebackType | None]


def _exc_text(exc_info: Any) -> str:
    """The traceback text for a logging call's ``exc_info``, or ""."""
    if not exc_info:
        return ""
    if isinstance(exc_info, BaseException):
        exc: BaseException | None = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = sys.exc_info()[1]
    if exc is None:
        return ""
    try:
        return "".join(traceback.format_exception(exc)).rstrip("\n")
    except Exception:  # a broken __str__ in the chain
        return f"<the traceback of {type(exc).__name__} could not be formatted>"


# --- the shipper ---------------------------------------------------------------------

#: ``post(records)``: send one batch; the worker passes ``TaskWorkerClient.post_logs``.
Post = Callable[[Sequence[LogRecord]], Awaitable[object]]

RunKey = tuple[uuid.UUID, int]

#: While the buffer keeps overflowing, the worker's log says so at most this often.
_DROP_WARNING_EVERY = 60.0


@attrs.frozen
class _Pending:
    seq: int
    key: RunKey
    record: LogRecord


def _retriable(exc: Exception) -> bool:
    if isinstance(exc, ServerUnavailable):
        return True
    # 501: a server without POST /logs; asking again will not add it.
    return isinstance(exc, ServerError) and (
        (exc.status_code >= 500 and exc.status_code != 501) or exc.status_code in (408, 429)
    )


@attrs.define(eq=False)
class LogShipper:
    """Sends run log records to the server in batches; a worker owns one.

    :meth:`add` may be called from any thread. :meth:`run` (in the worker's
    nursery) sends what is buffered every ``interval`` seconds, at once when
    ``batch`` records wait, and when a run asks (:meth:`flush_run`), in
    requests of at most ``MAX_LOG_RECORDS`` through ``post``. A request that
    fails for a reason that may pass (the server unreachable, a 5xx, 429) is
    tried again after each of ``retry_delays``; then its records are dropped
    and the worker's log says so once, until requests succeed again.

    The buffer holds at most ``max_records`` records and ``max_chars``
    characters of messages; past that the oldest go, and the next batch tells
    the server, for each run that lost some, how many (a WARNING record).
    """

    post: Post | None = None
    interval: float = 0.5
    batch: int = 100
    max_records: int = 10_000
    max_chars: int = 16 * 1024 * 1024
    retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0)
    #: The longest a run's end waits for its records to be sent.
    flush_timeout: float = 5.0
    #: Records dropped here in all (buffer full, or a batch the server did not take).
    dropped: int = attrs.field(init=False, default=0)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _buffer: collections.deque[_Pending] = attrs.field(init=False, factory=collections.deque)
    _chars: int = attrs.field(init=False, default=0)
    _next_seq: int = attrs.field(init=False, default=1)
    _sending_from: int | None = attrs.field(init=False, default=None)
    _last_seq: dict[RunKey, int] = attrs.field(init=False, factory=dict)
    _dropped_by_run: collections.Counter[RunKey] = attrs.field(
        init=False, factory=collections.Counter
    )
    _dropped_unreported: int = attrs.field(init=False, default=0)
    _last_drop_warning: float | None = attrs.field(init=False, default=None)
    _failing: bool = attrs.field(init=False, default=False)
    _lost_while_failing: int = attrs.field(init=False, default=0)
    _running: bool = attrs.field(init=False, default=False)
    _token: trio.lowlevel.TrioToken | None = attrs.field(init=False, default=None)
    _trio_thread: int | None = attrs.field(init=False, default=None)
    #: Set when records wait (the pass's timer starts), and when they must go now.
    _pending: trio.Event = attrs.field(init=False, factory=trio.Event)
    _pending_asked: bool = attrs.field(init=False, default=False)
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)
    _wake_asked: bool = attrs.field(init=False, default=False)
    _progress: trio.Event = attrs.field(init=False, factory=trio.Event)
    #: One sender at a time (the loop, or close()), so batches leave in order.
    _sending: trio.Lock = attrs.field(init=False, factory=trio.Lock)

    # --- taking records (any thread) ------------------------------------------------

    @property
    def buffered(self) -> int:
        """Records waiting to be sent."""
        return len(self._buffer)

    def add(self, record: LogRecord) -> None:
        """Queue one record; drops the oldest ones when the buffer is full."""
        key = (record.run_id, record.attempt)
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._buffer.append(_Pending(seq, key, record))
            self._last_seq[key] = seq
            self._chars += len(record.message)
            while len(self._buffer) > self.max_records or (
                self._chars > self.max_chars and len(self._buffer) > 1
            ):
                old = self._buffer.popleft()
                self._chars -= len(old.record.message)
                self._note_dropped(old.key, 1)
                self._forget(old)
            pending = not self._pending_asked
            self._pending_asked = True
            wake = len(self._buffer) >= self.batch and not self._wake_asked
            if wake:
                self._wake_asked = True
        if pending or wake:
            self._signal(self._set_pending if not wake else self._set_wake)

    def _forget(self, pending: _Pending) -> None:
        # Called with the lock held, once ``pending`` is sent or dropped: when it
        # was its run's last record, nothing of the run is left to wait for.
        if self._last_seq.get(pending.key) == pending.seq:
            del self._last_seq[pending.key]

    def _note_dropped(self, key: RunKey, n: int) -> None:
        # Called with the lock held. The notes are bounded like the buffer.
        self.dropped += n
        self._dropped_unreported += n
        if key in self._dropped_by_run or len(self._dropped_by_run) < MAX_LOG_RECORDS // 2:
            self._dropped_by_run[key] += n

    def _signal(self, setter: Callable[[], None]) -> None:
        if self._token is None:
            return  # not running: run() looks at the buffer when it starts
        if threading.get_ident() == self._trio_thread:
            setter()
        else:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(setter)

    def _set_pending(self) -> None:
        self._pending.set()

    def _set_wake(self) -> None:
        self._pending.set()
        self._wake.set()

    def _resolved(self) -> int:
        """Every record up to this sequence number is sent or dropped."""
        with self._lock:
            if self._sending_from is not None:
                return self._sending_from - 1
            if self._buffer:
                return self._buffer[0].seq - 1
            return self._next_seq - 1

    # --- sending (the trio thread) ----------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send buffered records until cancelled. ``task_status.started()`` at once.

        Never raises on the server's account: an unexpected error is logged
        and the next pass goes on. With nothing buffered it sleeps without a
        timer, so an idle worker wakes for nothing.
        """
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._running = True
        if self._buffer:
            self._pending.set()
        task_status.started()
        try:
            while True:
                await self._pending.wait()
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                await self.send_all()
        finally:
            self._running = False
            self._token = None

    async def send_all(self) -> None:
        """Send every buffered record (those added meanwhile too), then return."""
        async with self._sending:
            await self._send_all()

    async def _send_all(self) -> None:
        with self._lock:
            # A record added from here on signals the new events: none is missed.
            self._pending, self._pending_asked = trio.Event(), False
            self._wake, self._wake_asked = trio.Event(), False
        while True:
            batch, taken = self._take()
            if not batch:
                return
            try:
                await self._send(batch)
            except Exception:
                log.exception("sending run logs failed; %d records dropped", len(batch))
            finally:
                with self._lock:
                    self._sending_from = None
                    for pending in taken:
                        self._forget(pending)
                self._progress.set()
                self._progress = trio.Event()

    def _take(self) -> tuple[list[LogRecord], list[_Pending]]:
        with self._lock:
            notes = [self._dropped_note(key, n) for key, n in self._dropped_by_run.items()]
            self._dropped_by_run.clear()
            dropped = self._dropped_unreported
            now = trio.current_time()
            if dropped and (
                self._last_drop_warning is None
                or now - self._last_drop_warning >= _DROP_WARNING_EVERY
            ):
                self._dropped_unreported = 0
                self._last_drop_warning = now
            else:
                dropped = 0  # said again later, with the count so far
            room = MAX_LOG_RECORDS - len(notes)
            taken = [self._buffer.popleft() for _ in range(min(room, len(self._buffer)))]
            self._chars -= sum(len(p.record.message) for p in taken)
            if taken:
                self._sending_from = taken[0].seq
        if dropped:
            log.warning(
                "the run log buffer was full (%d records): dropped the %d oldest",
                self.max_records,
                dropped,
            )
        return notes + [p.record for p in taken], taken

    def _dropped_note(self, key: RunKey, n: int) -> LogRecord:
        return LogRecord(
            run_id=key[0],
            attempt=key[1],
            timestamp=datetime.datetime.now(datetime.UTC),
            level="WARNING",
            logger=RUN_LOGGER_NAME,
            message=f"{n} log records of this run were dropped by the worker: its buffer was full",
        )

    async def _send(self, batch: list[LogRecord]) -> None:
        if self.post is None:
            self._lost(batch, "the worker has no connection to the server")
            return
        for delay in (*self.retry_delays, None):
            try:
                await self.post(batch)
            except (ServerUnavailable, ServerError) as exc:
                if delay is None or not _retriable(exc):
                    self._lost(batch, str(exc))
                    return
                log.debug("sending %d run log records: %s; retrying", len(batch), exc)
                await trio.sleep(delay)
            else:
                if self._failing:
                    log.info(
                        "run logs reach the server again (%d more records were lost meanwhile)",
                        self._lost_while_failing,
                    )
                    self._failing = False
                    self._lost_while_failing = 0
                return

    def _lost(self, batch: list[LogRecord], reason: str) -> None:
        self.dropped += len(batch)
        if self._failing:
            self._lost_while_failing += len(batch)
            return
        self._failing = True
        log.warning(
            "could not send %d run log records (%s): dropped; further losses are"
            " counted until the server takes them again",
            len(batch),
            reason,
        )

    async def flush_run(self, run_id: uuid.UUID, attempt: int) -> None:
        """Return once the run's records so far are sent or dropped.

        Costs nothing when the run logged nothing (or all of it is sent). Waits
        at most :attr:`flush_timeout` seconds, shielded from cancellation: a
        run whose value is in is not handed back for its logs. Returns at once
        when the shipper is not running.
        """
        with self._lock:
            target = self._last_seq.pop((run_id, attempt), None)
        if target is None or not self._running:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.flush_timeout):
            while self._resolved() < target:
                self._set_wake()
                await self._progress.wait()

    async def close(self, timeout: float | None = None) -> None:
        """Send what is left, for at most ``timeout`` (default :attr:`flush_timeout`) seconds."""
        with trio.move_on_after(self.flush_timeout if timeout is None else timeout):
            await self.send_all()


# --- the run logger --------------------------------------------------------------------


class RunLogger(logging.LoggerAdapter[logging.Logger]):
    """The logger :func:`get_run_logger` returns: a ``logging.LoggerAdapter``.

    Its records go to the worker's log through ``trio_taskworker.task_runs``,
    as ``run <id> (<task name>): <message>`` with ``run_id``, ``task_key`` and
    ``attempt`` in the record, and to the server with the run. ``exc_info``
    (``logger.exception``) sends the traceback along. Which levels it takes
    is that logger's level (INFO by default).
    """

    def __init__(self, run: TaskRun, shipper: LogShipper | None) -> None:
        super().__init__(_run_logger, {"run_id": str(run.id)})
        self.run = run
        self.shipper = shipper

    def log(  # type: ignore[override] # the keywords of Logger.log, spelled out
        self,
        level: int,
        msg: object,
        *args: object,
        exc_info: Any = None,
        stack_info: bool = False,
        stacklevel: int = 1,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        """Log ``msg % args`` at ``level`` for this run (see the class)."""
        if not self.isEnabledFor(level):
            return
        message = _message_of(msg, args)
        if self.shipper is not None:
            shipped = message
            if exc_info:
                shipped = f"{message}\n{_exc_text(exc_info)}"
            try:
                record = LogRecord(
                    run_id=self.run.id,
                    attempt=self.run.attempt,
                    timestamp=datetime.datetime.now(datetime.UTC),
                    level=level_name(level),
                    logger=self.logger.name[:MAX_NAME],
                    message=shorten_message(shipped),
                )
            except Exception:  # a record the model refuses must not fail the task
                log.debug("run %s: a log record could not be built", self.run.id, exc_info=True)
            else:
                self.shipper.add(record)
        run = self.run
        self.logger.log(
            level,
            "run %s (%s): %s",
            run.id,
            run.task_name,
            message,
            exc_info=exc_info,
            stack_info=stack_info,
            # Past this method, to the caller's line (logging skips its own frames).
            stacklevel=stacklevel + 1,
            extra={
                "run_id": str(run.id),
                "task_key": run.task_key,
                "attempt": run.attempt,
                **(extra or {}),
            },
        )


_current_logger: contextvars.ContextVar[RunLogger | None] = contextvars.ContextVar(
    "trio_taskworker_run_logger", default=None
)
_prints_to: contextvars.ContextVar[RunLogger | None] = contextvars.ContextVar(
    "trio_taskworker_log_prints", default=None
)


def get_run_logger() -> RunLogger:
    """The logger of the run executing this code (see :class:`RunLogger`).

    Works in async tasks and in sync tasks (their worker thread carries the
    run's context). Outside a run it raises :class:`MissingContextError`
    (also a ``RuntimeError``), as :func:`get_run_context` does.
    """
    logger = _current_logger.get()
    if logger is not None:
        return logger
    context = get_run_context()  # raises MissingContextError outside a run
    if context.task_run is None:
        raise MissingContextError(
            "get_run_logger() was called where no run exists yet: it works only inside"
            " a task that a worker is executing"
        )
    # A run context set up by hand (no worker): its records go to the local log only.
    return RunLogger(context.task_run, None)


@contextlib.contextmanager
def run_logging(
    run: TaskRun, shipper: LogShipper | None, *, log_prints: bool = False
) -> Iterator[RunLogger]:
    """Inside the block, :func:`get_run_logger` returns this run's logger, and
    with ``log_prints`` ``print()`` to stdout goes to it."""
    logger = RunLogger(run, shipper)
    token = _current_logger.set(logger)
    prints = _prints_to.set(logger if log_prints else None)
    if log_prints:
        _install_print()
    try:
        yield logger
    finally:
        _prints_to.reset(prints)
        _current_logger.reset(token)


# --- log_prints ------------------------------------------------------------------------

_original_print = builtins.print
_installed = False


def _install_print() -> None:
    """Put the diverting ``print`` in ``builtins`` (once per process)."""
    global _installed, _original_print
    if _installed:
        return
    _original_print = builtins.print
    builtins.print = _print
    _installed = True


def _print(*values: object, sep: str | None = " ", end: str | None = "\n", **kwargs: Any) -> None:
    """``print``, except that inside a ``log_prints`` run a print to stdout is logged.

    Anything ``print`` itself would refuse (a bad ``sep``, an unknown
    keyword) goes to ``print`` unchanged, to raise as it always does.
    """
    logger = _prints_to.get()
    file = kwargs.get("file")
    if (
        logger is None
        or (file is not None and file is not sys.stdout)
        or not set(kwargs) <= {"file", "flush"}
        or not isinstance(sep, str | None)
        or not isinstance(end, str | None)
    ):
        _original_print(*values, sep=sep, end=end, **kwargs)
        return
    # A handler that prints to stdout must not come back here.
    token = _prints_to.set(None)
    try:
        logger.log(
            logging.INFO, "%s", (" " if sep is None else sep).join(map(str, values)), stacklevel=2
        )
    finally:
        _prints_to.reset(token)
