"""The spawner: runs start under the worker's CapacityLimiter, one child task each.

::

    Spawner.run()
    └── stop scope              (one deadline for every run in flight: a stop's grace)
        └── runs nursery
            ├── intake          (a delivered run waits for a limiter token, then starts)
            └── one child per run
                └── cancelled   (the caller cancelled the run)
                    └── lost    (its connection is gone; the server took the lease back)
                        └── timeout  (the task's ``timeout_seconds``)

Each cause of a run's cancellation acts on a scope of its own, so the scope
that fired says why, with no flags to keep in step: the caller's cancel ends
the run CANCELLED, a lost connection hands it back silently (the server has
requeued it already), the timeout FAILS it with :class:`TaskRunTimedOut`, and
the stop's deadline cancels it out of the stop scope, which hands it back.
When several fire together, trio hands ``Cancelled`` to the outermost, so the
order of the nesting is the order of precedence; a stop that meets a caller's
cancel reports the run handed back, and the server's cancel-wins rule still
ends it CANCELLED. A sync task that returns after its run was cancelled has its
value dropped. Once the task's value is in, storing it is shielded from the stop.

Reports (started, finished, released, and a credit per freed slot) leave
through the ``report`` callable, tagged with the connection the run came on.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import inspect
import logging
import math
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import outcome
import trio

from ._client import TaskWorkerClient, fits_inline, load_payload, store_payload
from ._context import TaskRunContext, run_context
from ._definition import TaskDefinition, preview_value
from ._exceptions import (
    ConfigurationError,
    ProtocolError,
    SerializationError,
    ServerUnavailable,
    StopTaskWorker,
    TaskRunTimedOut,
)
from ._models import Credit, ErrorInfo, Finished, Released, Started, TaskRun, WorkerMessage
from ._policy import Hook, State
from ._runlog import LogShipper, run_logging
from ._serialization import dumps_payload, loads_payload
from ._states import TaskRunState

__all__ = ["UNLIMITED_WINDOW", "Report", "Spawner", "should_try_to_read_parameters"]

log = logging.getLogger(__name__)

#: With ``limit=None`` the worker still asks for at most this many runs at once.
UNLIMITED_WINDOW = 1000

#: ``report(message, generation)``: send ``message`` on connection ``generation``
#: (None: whichever connection is current).
Report = Callable[[WorkerMessage, int | None], None]

_STOPPED = "cancelled by a worker stop"

_inside_run: contextvars.ContextVar[Spawner | None] = contextvars.ContextVar(
    "trio_taskworker_inside_run", default=None
)


def should_try_to_read_parameters(task: TaskDefinition[Any, Any], task_run: TaskRun) -> bool:
    """True when the run's stored parameters should be read for this task.

    That is when the task's function takes parameters and the run carries a
    parameters payload (inline or as a stored blob). A task without
    parameters is called with none, whatever the run holds.
    """
    takes_parameters = bool(task.signature.parameters)
    return takes_parameters and (
        task_run.parameters is not None or task_run.parameters_ref is not None
    )


@attrs.define(eq=False)
class InFlight:
    """A run that has started and not ended, with the scopes that can cancel it."""

    run: TaskRun
    #: The connection it was leased on; None for :meth:`Spawner.execute`.
    generation: int | None
    started_at: datetime.datetime
    cancelled: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    lost: trio.CancelScope = attrs.field(factory=trio.CancelScope)


@attrs.define(eq=False)
class Spawner:
    """Starts delivered runs under a ``trio.CapacityLimiter(limit)`` and reports them.

    ``limit=None`` means no limit (the worker still asks for at most
    :data:`UNLIMITED_WINDOW` runs at a time). ``request_stop`` is called when
    a task raises :class:`StopTaskWorker`. ``client`` reads and stores large
    payloads; it is set while the worker runs. ``logs`` takes the runs' log
    records (see :mod:`._runlog`); a run's records are flushed before it is
    reported ended. ``log_prints`` is the default for tasks that leave their
    ``log_prints`` option unset.
    """

    tasks: Mapping[str, TaskDefinition[Any, Any]]
    limit: int | None
    report: Report
    request_stop: Callable[[], None]
    client: TaskWorkerClient | None = None
    logs: LogShipper | None = None
    log_prints: bool = False
    stopping: bool = attrs.field(init=False, default=False)
    #: Runs ended, per task key.
    finished: Counter[str] = attrs.field(init=False, factory=Counter)
    #: Of those, the ones that ended FAILED, per task key (retried or not).
    failed: Counter[str] = attrs.field(init=False, factory=Counter)
    _in_flight: dict[tuple[uuid.UUID, int], InFlight] = attrs.field(init=False, factory=dict)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    _thread_limiter: trio.CapacityLimiter = attrs.field(init=False)
    _send: trio.MemorySendChannel[tuple[int, TaskRun]] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[tuple[int, TaskRun]] = attrs.field(init=False)
    _cancelled_before_start: set[uuid.UUID] = attrs.field(init=False, factory=set)
    #: Connections up to this generation are gone, and their deliveries void.
    _lost_up_to: int = attrs.field(init=False, default=0)
    _intake: trio.CancelScope | None = attrs.field(init=False, default=None)
    _stop_deadline: float = attrs.field(init=False, default=math.inf)
    _stop_scopes: set[trio.CancelScope] = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(math.inf if self.limit is None else self.limit)
        # Sync runs hold a token of _limiter already; the thread limiter only
        # lifts trio's default cap of 40 threads up to the worker's window.
        self._thread_limiter = trio.CapacityLimiter(self.window)
        self._send, self._receive = trio.open_memory_channel[tuple[int, TaskRun]](self.window)

    # --- state ---------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """The most runs the worker asks the server for at once."""
        return UNLIMITED_WINDOW if self.limit is None else self.limit

    @property
    def in_flight(self) -> int:
        """Runs started and not yet ended."""
        return len(self._in_flight)

    @property
    def available(self) -> int | None:
        """Free limiter tokens (None with no limit)."""
        return None if self.limit is None else int(self._limiter.available_tokens)

    def in_flight_runs(self) -> list[InFlight]:
        """The runs in flight now, oldest first."""
        return list(self._in_flight.values())

    def inside_run(self) -> bool:
        """True when called from inside one of this spawner's runs."""
        return _inside_run.get() is self

    # --- what the subscription hands over ------------------------------------------------

    def deliver(self, generation: int, run: TaskRun) -> None:
        """Queue a run leased on connection ``generation``.

        Raises :class:`ProtocolError` if the server sent more runs than credits.
        While stopping, the run goes straight back.
        """
        if self.stopping:
            self._skip(run, generation)
            return
        try:
            self._send.send_nowait((generation, run))
        except trio.WouldBlock:
            raise ProtocolError("the server sent more runs than credits") from None

    def cancel(self, run_id: uuid.UUID) -> None:
        """The caller cancelled this run: cancel it here, or never start it."""
        found = False
        for key, entry in self._in_flight.items():
            if key[0] == run_id:
                found = True
                entry.cancelled.cancel()
        if not found:
            # Still waiting for a slot: it never starts, and the server has it CANCELLED.
            self._cancelled_before_start.add(run_id)

    def connection_lost(self, generation: int) -> None:
        """The server requeues that connection's runs: cancel ours, skip queued ones.

        Their reports could not be accepted any more (the lease is gone), so
        finishing them would only hold slots that new runs need.
        """
        self._lost_up_to = max(self._lost_up_to, generation)
        self._cancelled_before_start.clear()
        for entry in self._in_flight.values():
            if entry.generation == generation:
                entry.lost.cancel()

    # --- stopping --------------------------------------------------------------------

    def begin_stop(self, grace: float) -> None:
        """Start no more runs; cancel those in flight ``grace`` seconds from now.

        A later call can only bring the deadline closer.
        """
        self.stopping = True
        if self._intake is not None:
            self._intake.cancel()
        self._stop_deadline = min(self._stop_deadline, trio.current_time() + grace)
        for scope in self._stop_scopes:
            scope.deadline = self._stop_deadline

    @contextlib.contextmanager
    def _stoppable(self) -> Iterator[trio.CancelScope]:
        """A scope around runs that a stop's deadline cancels."""
        with trio.CancelScope(deadline=self._stop_deadline) as scope:
            self._stop_scopes.add(scope)
            try:
                yield scope
            finally:
                self._stop_scopes.discard(scope)

    # --- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """Start delivered runs until a stop; return once every run has ended."""
        with self._stoppable():
            async with trio.open_nursery() as runs:
                with trio.CancelScope() as self._intake:
                    if self.stopping:
                        self._intake.cancel()
                    async for generation, run in self._receive:
                        if generation <= self._lost_up_to:
                            continue  # its connection is gone, so the server requeued it
                        await self._limiter.acquire_on_behalf_of((run.id, run.attempt))
                        if generation <= self._lost_up_to:
                            # Lost while it waited for a slot.
                            self._limiter.release_on_behalf_of((run.id, run.attempt))
                            continue
                        if run.id in self._cancelled_before_start or self.stopping:
                            self._limiter.release_on_behalf_of((run.id, run.attempt))
                            self._skip(run, generation)
                            continue
                        runs.start_soon(self._run_leased, run, generation)
                # Runs that arrived as the stop began never started: hand them back.
                while True:
                    try:
                        generation, run = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if generation > self._lost_up_to:
                        self._skip(run, generation)

    def _skip(self, run: TaskRun, generation: int) -> None:
        if run.id in self._cancelled_before_start:
            # Cancelled before it started (the server already marked it
            # CANCELLED): it never starts, and its credit goes back.
            self._cancelled_before_start.discard(run.id)
            self.report(Credit(n=1), generation)
        else:
            self.report(
                Released(id=run.id, attempt=run.attempt, reason="the worker is stopping"),
                generation,
            )

    async def _run_leased(self, run: TaskRun, generation: int) -> None:
        report: Finished | Released = Released(id=run.id, attempt=run.attempt, reason=_STOPPED)
        hooks: _Hooks | None = None
        try:
            try:
                self.report(Started(id=run.id, attempt=run.attempt), generation)
                report, hooks = await self._execute(run, generation)
            except trio.Cancelled:
                log.info("run %s cancelled as the worker stops: handed back", run.id)
                raise
            finally:
                self.report(report, generation)
            if hooks is not None:
                await self._run_hooks(hooks)
        finally:
            self._limiter.release_on_behalf_of((run.id, run.attempt))
            if not self.stopping:
                self.report(Credit(n=1), None)

    async def execute(self, run: TaskRun) -> Finished | Released:
        """Run one run here and now, under the limiter; report it and return the report."""
        report: Finished | Released = Released(id=run.id, attempt=run.attempt, reason=_STOPPED)
        hooks: _Hooks | None = None
        async with self._limiter:
            with self._stoppable():
                report, hooks = await self._execute(run, None)
            self.report(report, None)
            if hooks is not None:
                await self._run_hooks(hooks)
        return report

    async def _execute(
        self, run: TaskRun, generation: int | None
    ) -> tuple[Finished | Released, _Hooks | None]:
        task = self.tasks.get(run.task_key)
        if task is None:
            missing = ConfigurationError(f"this worker has no task {run.task_key!r}")
            log.error("run %s failed: %s", run.id, missing)
            return _failed(run, missing), None
        entry = InFlight(
            run=run, generation=generation, started_at=datetime.datetime.now(datetime.UTC)
        )
        self._in_flight[run.id, run.attempt] = entry
        log.info("run %s (%s) attempt %d started", run.id, run.task_key, run.attempt)
        token = _inside_run.set(self)
        try:
            report, hooks = await self._call(task, entry)
            if self.logs is not None:
                # So that the run's logs are there once its end is (bounded, shielded).
                await self.logs.flush_run(run.id, run.attempt)
        finally:
            _inside_run.reset(token)
            del self._in_flight[run.id, run.attempt]
            self.finished[run.task_key] += 1
        if isinstance(report, Finished) and report.state in _FAILED:
            self.failed[run.task_key] += 1
        return report, hooks

    async def _call(
        self, task: TaskDefinition[Any, Any], entry: InFlight
    ) -> tuple[Finished | Released, _Hooks | None]:
        run = entry.run
        # The run's own option: the submitter may have changed it (with_options).
        timeout = run.timeout_seconds
        try:
            with entry.cancelled, entry.lost:
                with trio.move_on_after(math.inf if timeout is None else timeout) as timer:
                    args, kwargs = await self._read_parameters(task, run)
                    context = TaskRunContext(task=task, task_run=run, args=args, kwargs=kwargs)
                    log_prints = task.local.log_prints
                    with (
                        run_context(context),
                        run_logging(
                            run,
                            self.logs,
                            log_prints=self.log_prints if log_prints is None else log_prints,
                        ),
                    ):
                        value = await self._invoke(task, args, kwargs)
        except StopTaskWorker as exc:
            log.info("run %s raised StopTaskWorker: stopping the worker", run.id)
            self.request_stop()
            # It ends here: handed back, it would stop every worker that took it.
            stopped = Finished(
                id=run.id,
                attempt=run.attempt,
                state=TaskRunState.CANCELLED,
                message=f"the task raised StopTaskWorker ({exc}): the worker stopped",
            )
            return stopped, None
        except _Unreachable as exc:
            return _hand_back(run, str(exc)), None
        except Exception as exc:
            return await self._failure(task, run, exc)
        # Checked in this order also when a sync task returned after the cancel:
        # its value is dropped.
        if entry.cancelled.cancel_called:
            log.info("run %s cancelled by the caller", run.id)
            return Finished(id=run.id, attempt=run.attempt, state=TaskRunState.CANCELLED), None
        if entry.lost.cancel_called:
            log.info("run %s cancelled: its connection was lost", run.id)
            return Released(id=run.id, attempt=run.attempt, reason="connection lost"), None
        # Past a stop's deadline, this raises Cancelled and the stop scope hands it back.
        await trio.lowlevel.checkpoint_if_cancelled()
        if timer.cancel_called:
            timed_out = TaskRunTimedOut(f"the run exceeded its timeout of {timeout} s")
            return await self._failure(task, run, timed_out)
        try:
            # The value is in: a stop's deadline no longer cuts the run short
            # (the upload of a large result is bounded by the client's timeouts).
            with trio.CancelScope(shield=True):
                finished = await self._completed(run, value)
        except _Unreachable as exc:
            return _hand_back(run, str(exc)), None
        except Exception as exc:  # the result cannot be pickled, or the server refused it
            return await self._failure(task, run, exc)
        state = State(type=TaskRunState.COMPLETED, value=value)
        return finished, _Hooks.of("on_completion", task.local.on_completion, task, run, state)

    async def _failure(
        self, task: TaskDefinition[Any, Any], run: TaskRun, exc: Exception
    ) -> tuple[Finished, _Hooks | None]:
        """The report for a failed attempt (whether and when to retry) and its hooks.

        With retries left, the task's ``retry_condition_fn`` may refuse the
        retry, and its retry delays (list, function, jitter) set the wait. A
        run that fails for good gets its ``on_failure`` hooks run once it is
        reported.
        """
        finished = _failed(run, exc)
        state = State(type=TaskRunState.FAILED, message=str(exc), exception=exc)
        on_failure = _Hooks.of("on_failure", task.local.on_failure, task, run, state)
        if run.retry_count >= run.retries:
            _log_failure(run, exc, "no retries left" if run.retries else None, retried=False)
            return finished, on_failure
        local = task.local
        try:
            retry = True
            if local.retry_condition_fn is not None:
                retry = bool(await self._call_user(local.retry_condition_fn, task, run, state))
            if retry:
                delay = local.retry_delay(run.retry_count, run.retries, run.retry_delay_seconds)
                retry_n = f"retry {run.retry_count + 1} of {run.retries} in {delay:g} s"
                _log_failure(run, exc, retry_n, retried=True)
                return attrs.evolve(finished, retry_delay_seconds=delay), None
            reason = "not retried: retry_condition_fn returned False"
        except Exception as error:
            log.exception("run %s: deciding whether to retry failed", run.id)
            reason = f"not retried: deciding whether to retry raised {error!r}"
        _log_failure(run, exc, reason, retried=False)
        return attrs.evolve(finished, retry=False, message=reason), on_failure

    async def _call_user(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a hook or a retry condition: a coroutine function is awaited, and a
        plain function runs in a worker thread, so a slow one never stalls the
        event loop (and with it every other run's heartbeats)."""
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        ):
            return await fn(*args)
        value = await trio.to_thread.run_sync(
            functools.partial(fn, *args), limiter=self._thread_limiter, abandon_on_cancel=True
        )
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _run_hooks(self, hooks: _Hooks) -> None:
        """Run the hooks of an ended run, in order, after it has been reported.

        A hook's error is logged and changes nothing. The caller's cancel and a
        lost connection no longer reach them (the run has ended); a stop's
        deadline cancels them (a sync hook's thread is abandoned), so a hook
        that hangs cannot hold a stop.
        """
        ended = attrs.evolve(hooks.run, state=hooks.state.type)
        with self._stoppable():
            for hook in hooks.hooks:
                try:
                    await self._call_user(hook, hooks.task, ended, hooks.state)
                except Exception:
                    log.exception("run %s: %s hook %r raised", ended.id, hooks.kind, hook)

    async def _invoke(
        self, task: TaskDefinition[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if task.is_async:
            return await task.fn(*args, **kwargs)
        return await trio.to_thread.run_sync(
            functools.partial(task.fn, *args, **kwargs), limiter=self._thread_limiter
        )

    async def _read_parameters(
        self, task: TaskDefinition[Any, Any], run: TaskRun
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not should_try_to_read_parameters(task, run):
            return (), {}
        try:
            data = await load_payload(self.client, run.parameters, run.parameters_ref)
        except ServerUnavailable as exc:
            raise _Unreachable(f"cannot read its parameters: {exc}") from exc
        assert data is not None  # should_try_to_read_parameters saw one form or the other
        args, kwargs = loads_payload(data, what="parameters")
        return tuple(args), dict(kwargs)

    async def _completed(self, run: TaskRun, value: Any) -> Finished:
        data = dumps_payload(value)
        try:
            stored = await store_payload(self.client, data)
        except ServerUnavailable as exc:
            raise _Unreachable(f"cannot store its result: {exc}") from exc
        log.info("run %s (%s) completed", run.id, run.task_key)
        return Finished(
            id=run.id,
            attempt=run.attempt,
            state=TaskRunState.COMPLETED,
            result=stored.inline,
            result_ref=stored.ref,
            result_preview=preview_value(value),
        )


@attrs.frozen
class _Hooks:
    """Hooks to run for an ended run, once it has been reported."""

    kind: str
    hooks: tuple[Hook, ...]
    task: TaskDefinition[Any, Any]
    run: TaskRun
    state: State

    @classmethod
    def of(
        cls,
        kind: str,
        hooks: tuple[Hook, ...],
        task: TaskDefinition[Any, Any],
        run: TaskRun,
        state: State,
    ) -> _Hooks | None:
        return cls(kind, hooks, task, run, state) if hooks else None


class _Unreachable(Exception):
    """The server could not be reached for a payload: a connection problem, not the run's."""


def _hand_back(run: TaskRun, reason: str) -> Released:
    log.warning("run %s handed back: %s", run.id, reason)
    return Released(id=run.id, attempt=run.attempt, reason=reason)


_FAILED = frozenset({TaskRunState.FAILED, TaskRunState.CRASHED})


def _log_failure(run: TaskRun, exc: BaseException, outcome: str | None, *, retried: bool) -> None:
    """One line for a failed attempt, with its traceback: WARNING when it will be
    retried, ERROR when the run fails for good. ``outcome`` says which."""
    log.log(
        logging.WARNING if retried else logging.ERROR,
        "run %s (%s) attempt %d failed: %r%s",
        run.id,
        run.task_key,
        run.attempt,
        exc,
        f"; {outcome}" if outcome else "",
        exc_info=exc,
        # As on the run logger's records, for handlers that route by run.
        extra={"run_id": str(run.id), "task_key": run.task_key, "attempt": run.attempt},
    )


def _failed(run: TaskRun, exc: BaseException) -> Finished:
    """The report of a failed attempt: the exception pickled if it fits, and described."""
    try:
        data: bytes | None = dumps_payload(exc)
    except SerializationError:
        data = None
    if data is not None and not fits_inline(data):
        data = None  # the ErrorInfo still says what happened
    kind = type(exc)
    return Finished(
        id=run.id,
        attempt=run.attempt,
        state=TaskRunState.FAILED,
        result=data,
        error=ErrorInfo(
            type=f"{kind.__module__}.{kind.__qualname__}",
            message=str(exc),
            traceback=user_traceback(exc),
        ),
    )


#: Where the frames that call a task come from: this package, trio (the thread
#: hop of a sync task) and outcome (trio's way of carrying an error back).
_MACHINERY = tuple(f"{Path(path).parent}/" for path in (trio.__file__, outcome.__file__, __file__))


def user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as text, from the first frame of the user's code.

    The frames that led from the worker to the task (the spawner, trio's
    thread hop, ``outcome``) say nothing about the failure; a reader of the
    run's error wants its own code first, as with a plain call. When no frame
    is the user's (a failure in the worker itself), nothing is left out.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_MACHINERY):
        tb = tb.tb_next
    if tb is None:
        tb = exc.__traceback__
    return "".join(traceback.TracebackException(type(exc), exc, tb).format())
