"""Task workers: :class:`TaskWorker` and :func:`serve`.

The worker is a nursery tree::

    TaskWorker.start()
    └── nursery
        ├── connection   (websocket; reconnects with backoff; reader and sender)
        ├── spawner      (CapacityLimiter(limit); one child per run)
        │   └── run      (one CancelScope per run: timeout, shutdown)
        ├── status server (optional HTTP, GET /status)
        └── signal watcher (SIGTERM/SIGINT -> stop; a second one stops at once)

The worker grants the server one credit per free limiter token, so it never
holds a run it cannot start.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import math
import random
import signal
import threading
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio
import trio_websocket

from ._client import INLINE_PAYLOAD_LIMIT, api_url_from_env
from ._exceptions import (
    ConfigurationError,
    ProtocolError,
    SerializationError,
    StopTaskWorker,
    TaskRunTimedOut,
)
from ._models import (
    Cancel,
    Credit,
    Deliver,
    Drain,
    Drained,
    ErrorInfo,
    Finished,
    Heartbeat,
    Rejected,
    Released,
    Started,
    Subscribe,
    Subscribed,
    TaskRun,
    WorkerMessage,
)
from ._serialization import (
    InvalidPayload,
    decode_server_frame,
    dumps_payload,
    encode_frame,
    loads_payload,
)
from ._states import TaskRunState
from ._task import Task

__all__ = ["TaskWorker", "serve", "should_try_to_read_parameters"]

log = logging.getLogger(__name__)

#: With ``limit=None`` the worker still asks for at most this many runs at once.
UNLIMITED_WINDOW = 1000
#: Reconnect backoff: full jitter, doubling from the base to the cap.
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0
#: How often the worker pings the server, and how long it waits for the pong.
PING_INTERVAL = 10.0
PING_TIMEOUT = 10.0
#: The longest a TCP connect, or a websocket handshake, may take.
CONNECT_TIMEOUT = 10.0
#: After the last run ends during a stop, how long to wait for reports to go out.
FLUSH_TIMEOUT = 5.0
#: Close codes after which reconnecting cannot help.
_FATAL_CLOSE_CODES = range(4000, 5000)

_TRANSPORT_ERRORS = (
    OSError,
    trio_websocket.HandshakeError,
    trio_websocket.ConnectionClosed,
    trio.TooSlowError,
)

_inside_run: contextvars.ContextVar[TaskWorker | None] = contextvars.ContextVar(
    "trio_taskworker_inside_run", default=None
)


def should_try_to_read_parameters(task: Task[Any, Any], task_run: TaskRun) -> bool:
    """True when the run's stored parameters should be read for this task.

    That is when the task's function takes parameters and the run carries a
    parameters payload (inline or as a stored blob). A task without
    parameters is called with none, whatever the run holds.
    """
    takes_parameters = bool(task.signature.parameters)
    return takes_parameters and (
        task_run.parameters is not None or task_run.parameters_ref is not None
    )


def _error_info(exc: BaseException) -> ErrorInfo:
    kind = type(exc)
    return ErrorInfo(
        type=f"{kind.__module__}.{kind.__qualname__}",
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


@attrs.define(eq=False)
class _InFlight:
    run: TaskRun
    scope: trio.CancelScope
    started_at: datetime.datetime
    generation: int
    timeout_deadline: float = math.inf
    shutdown_deadline: float = math.inf
    lost: bool = False
    cancel_requested: bool = False

    def set_shutdown_deadline(self, deadline: float) -> None:
        self.shutdown_deadline = min(self.shutdown_deadline, deadline)
        self.scope.deadline = min(self.timeout_deadline, self.shutdown_deadline)


@attrs.define(eq=False)
class _Outbox:
    """Reports and credits waiting for the sender, tagged with their connection."""

    messages: list[tuple[int, WorkerMessage]] = attrs.field(factory=list)
    has_mail: trio.Event = attrs.field(factory=trio.Event)

    def put(self, generation: int, message: WorkerMessage) -> None:
        self.messages.append((generation, message))
        self.has_mail.set()

    def take(self, generation: int) -> list[WorkerMessage]:
        """Everything for this connection, credits merged; older connections' dropped."""
        taken, self.messages = self.messages, []
        self.has_mail = trio.Event()
        out: list[WorkerMessage] = []
        credit = 0
        for gen, message in taken:
            if gen != generation:
                continue  # the server already released that lease
            if isinstance(message, Credit):
                credit += message.n
            else:
                out.append(message)
        if credit:
            out.append(Credit(n=credit))
        return out


class TaskWorker:
    """Runs the given tasks' queued runs, at most ``limit`` at once.

    ``limit=None`` means no limit (the worker still asks for at most
    ``UNLIMITED_WINDOW`` runs at a time). ``shutdown_timeout`` is how long
    in-flight runs get to finish on a stop before they are cancelled and
    handed back to the queue.
    """

    def __init__(
        self,
        *tasks: Task[Any, Any],
        limit: int | None = 10,
        shutdown_timeout: float = 30.0,
        api_url: str | None = None,
        status_server_port: int | None = None,
        handle_signals: bool = True,
    ) -> None:
        if not tasks:
            raise ConfigurationError("a TaskWorker needs at least one task")
        by_key: dict[str, Task[Any, Any]] = {}
        for t in tasks:
            if not isinstance(t, Task):
                raise ConfigurationError(f"{t!r} is not a task; decorate it with @task")
            if t.key in by_key and by_key[t.key] is not t:
                raise ConfigurationError(f"two different tasks share the key {t.key!r}")
            by_key[t.key] = t
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ConfigurationError(f"limit must be a positive int or None, got {limit!r}")
        if shutdown_timeout < 0:
            raise ConfigurationError("shutdown_timeout must be 0 or more")
        self.tasks = by_key
        self._limit = limit
        self.shutdown_timeout = float(shutdown_timeout)
        self.api_url = (api_url or api_url_from_env()).rstrip("/")
        self.status_server_port = status_server_port
        self.handle_signals = handle_signals
        self.client_id = f"worker-{uuid.uuid4().hex[:12]}"
        self._window = limit if limit is not None else UNLIMITED_WINDOW
        self._limiter = trio.CapacityLimiter(limit if limit is not None else math.inf)
        # Sync runs hold a token of _limiter already; the thread limiter only
        # lifts trio's default cap of 40 threads up to the worker's window.
        self._thread_limiter = trio.CapacityLimiter(self._window)
        # Keyed by (run id, attempt): a redelivered run may meet its old attempt here.
        self._in_flight: dict[tuple[uuid.UUID, int], _InFlight] = {}
        self._finished: Counter[str] = Counter()
        self._outbox = _Outbox()
        self._generation = 0
        self._connected = False
        self._started = False
        self._started_at: datetime.datetime | None = None
        self._stopping = False
        self._stopped = trio.Event()
        self._intake_scope: trio.CancelScope | None = None
        self._reconnect_scope: trio.CancelScope | None = None
        self._ready: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        self._token: trio.lowlevel.TrioToken | None = None
        self._deliveries_send, self._deliveries_receive = trio.open_memory_channel[
            tuple[int, TaskRun]
        ](self._window)
        self._fatal: BaseException | None = None
        self._cancelled_before_start: set[uuid.UUID] = set()
        self._drain_seq = 0
        self._drained_seq = -1
        self._drained = trio.Event()
        self._http: httpx.AsyncClient | None = None
        # How a subscription connects; tests substitute an in-process transport.
        self._connect: Callable[
            [], contextlib.AbstractAsyncContextManager[trio_websocket.WebSocketConnection]
        ] = self._open_websocket

    # --- public state ---------------------------------------------------------------

    @property
    def limit(self) -> int | None:
        """The most runs at once, or None for no limit."""
        return self._limit

    @property
    def started(self) -> bool:
        """True between :meth:`start` being called and it returning."""
        return self._started

    @property
    def stopping(self) -> bool:
        """True once a stop has been requested."""
        return self._stopping

    @property
    def current_tasks(self) -> int:
        """How many runs are executing now."""
        return len(self._in_flight)

    @property
    def available_tasks(self) -> int | None:
        """How many more runs could start now (None with no limit)."""
        if self._limit is None:
            return None
        return int(self._limiter.available_tokens)

    def status(self) -> dict[str, Any]:
        """The snapshot served at ``GET /status``."""
        in_flight: dict[str, list[dict[str, str]]] = {}
        for entry in self._in_flight.values():
            in_flight.setdefault(entry.run.task_key, []).append(
                {"id": str(entry.run.id), "started_at": entry.started_at.isoformat()}
            )
        return {
            "client_id": self.client_id,
            "started_at": None if self._started_at is None else self._started_at.isoformat(),
            "stopping": self._stopping,
            "connected": self._connected,
            "limit": self._limit,
            "current": self.current_tasks,
            "available": self.available_tasks,
            "tasks": sorted(self.tasks),
            "finished": dict(self._finished),
            "in_flight": in_flight,
        }

    # --- lifecycle ------------------------------------------------------------------

    async def start(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the worker until it is stopped, then return normally.

        ``task_status.started()`` once the first subscription is accepted.
        A stop (:meth:`stop`, SIGTERM/SIGINT, :class:`StopTaskWorker` from a
        task) takes no more runs, lets in-flight runs finish for up to
        ``shutdown_timeout`` seconds, cancels and hands back the rest, and
        sends their reports before returning.

        Raises :class:`ProtocolError` when the server refuses the worker for
        good (a close code in the 4000s or a policy violation), and
        ``RuntimeError`` if the worker was started already.
        """
        if self._started:
            raise RuntimeError("this TaskWorker was started already")
        self._started = True
        self._started_at = datetime.datetime.now(datetime.UTC)
        self._token = trio.lowlevel.current_trio_token()
        log.info(
            "worker %s serving %s (limit %s) from %s",
            self.client_id,
            ", ".join(sorted(self.tasks)),
            self._limit,
            self.api_url,
        )
        try:
            async with httpx.AsyncClient(base_url=self.api_url) as http:
                self._http = http
                async with trio.open_nursery() as nursery:
                    if (
                        self.handle_signals
                        and threading.current_thread() is threading.main_thread()
                    ):
                        nursery.start_soon(self._watch_signals)
                    if self.status_server_port is not None:
                        from ._status import StatusServer

                        await nursery.start(StatusServer(self, port=self.status_server_port).run)
                    await nursery.start(self._connection_loop)
                    task_status.started()
                    await self._spawner()
                    await self._flush_reports()
                    nursery.cancel_scope.cancel()
        finally:
            self._started = False
            self._connected = False
            self._stopped.set()
            log.info("worker %s stopped", self.client_id)
        if self._fatal is not None:
            raise self._fatal

    async def stop(self) -> None:
        """Stop the worker gracefully (see :meth:`start`).

        Returns once :meth:`start` has finished, except when called from inside
        one of this worker's own runs, where waiting would never end: then it
        returns at once. Calling it on a worker that is not running does nothing.
        """
        if not self._started:
            return
        self._begin_stop(self.shutdown_timeout)
        if _inside_run.get() is not self:
            await self._stopped.wait()

    def handle_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Stop gracefully; usable as a ``signal.signal`` handler.

        The worker installs its own handling of SIGTERM and SIGINT while it runs
        (unless ``handle_signals=False``); call this to wire other signals.
        """
        log.info("worker %s received signal %s: stopping", self.client_id, signum)
        if self._token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._begin_stop, self.shutdown_timeout)

    def _begin_stop(self, grace: float) -> None:
        """Take no more runs; give the in-flight ones ``grace`` seconds."""
        if not self._started:
            return
        if not self._stopping:
            self._stopping = True
            self._outbox.put(self._generation, Drain(seq=0))
            log.info(
                "worker %s stopping: %d runs in flight get %.1f s to finish",
                self.client_id,
                len(self._in_flight),
                grace,
            )
        if self._intake_scope is not None:
            self._intake_scope.cancel()
        if self._reconnect_scope is not None and not self._connected and not self._in_flight:
            self._reconnect_scope.cancel()
        deadline = trio.current_time() + grace
        for entry in self._in_flight.values():
            entry.set_shutdown_deadline(deadline)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self._stopping:
                    self.handle_sigterm(signum, None)
                else:
                    log.info("second signal %s: cancelling runs in flight now", signum)
                    self._begin_stop(0.0)

    # --- spawner --------------------------------------------------------------------

    async def _spawner(self) -> None:
        async with trio.open_nursery() as runs:
            with trio.CancelScope() as self._intake_scope:
                if self._stopping:
                    self._intake_scope.cancel()
                async for generation, run in self._deliveries_receive:
                    if generation != self._generation:
                        continue  # its connection is gone, so the server requeued it
                    await self._limiter.acquire_on_behalf_of((run.id, run.attempt))
                    if run.id in self._cancelled_before_start:
                        # Cancelled before it started (the server already marked it
                        # CANCELLED): it never starts, and its credit goes back.
                        self._cancelled_before_start.discard(run.id)
                        self._limiter.release_on_behalf_of((run.id, run.attempt))
                        self._outbox.put(generation, Credit(n=1))
                        continue
                    if self._stopping:
                        self._limiter.release_on_behalf_of((run.id, run.attempt))
                        self._hand_back(run, "the worker is stopping")
                        continue
                    runs.start_soon(self._run_leased, run, generation)
            # Runs that arrived as the stop began never started: hand them back.
            while True:
                try:
                    generation, run = self._deliveries_receive.receive_nowait()
                except trio.WouldBlock:
                    break
                if generation == self._generation:
                    self._hand_back(run, "the worker is stopping")

    def _hand_back(self, run: TaskRun, reason: str) -> None:
        self._outbox.put(self._generation, Released(id=run.id, attempt=run.attempt, reason=reason))

    async def _run_leased(self, run: TaskRun, generation: int) -> None:
        try:
            self._outbox.put(generation, Started(id=run.id, attempt=run.attempt))
            report = await self._execute(run, generation)
            self._outbox.put(generation, report)
        finally:
            self._limiter.release_on_behalf_of((run.id, run.attempt))
            if not self._stopping:
                self._outbox.put(self._generation, Credit(n=1))

    async def execute_task_run(self, task_run: TaskRun) -> TaskRunState:
        """Run one run here and now, under the limiter, and report it if subscribed.

        Returns the state the worker reports: COMPLETED, FAILED, or SCHEDULED
        when the run was handed back (the worker stopped, or the task raised
        :class:`StopTaskWorker`). A FAILED run with retries left is
        rescheduled by the server, not here.
        """
        async with self._limiter:
            report = await self._execute(task_run, self._generation)
        self._outbox.put(self._generation, report)
        if isinstance(report, Released):
            return TaskRunState.SCHEDULED
        return report.state

    async def _execute(self, run: TaskRun, generation: int) -> Finished | Released:
        task = self.tasks.get(run.task_key)
        if task is None:
            return self._failed(
                run, ConfigurationError(f"this worker has no task {run.task_key!r}")
            )
        entry = _InFlight(
            run=run,
            scope=trio.CancelScope(),
            started_at=datetime.datetime.now(datetime.UTC),
            generation=generation,
        )
        if task.options.timeout_seconds is not None:
            entry.timeout_deadline = trio.current_time() + task.options.timeout_seconds
            entry.scope.deadline = entry.timeout_deadline
        if self._stopping:
            entry.set_shutdown_deadline(trio.current_time() + self.shutdown_timeout)
        self._in_flight[run.id, run.attempt] = entry
        log.info("run %s (%s) attempt %d started", run.id, run.task_key, run.attempt)
        token = _inside_run.set(self)
        try:
            return await self._call(task, run, entry)
        finally:
            _inside_run.reset(token)
            del self._in_flight[run.id, run.attempt]
            self._finished[run.task_key] += 1

    async def _call(
        self, task: Task[Any, Any], run: TaskRun, entry: _InFlight
    ) -> Finished | Released:
        value: Any = None
        try:
            args, kwargs = await self._read_parameters(task, run)
            with entry.scope:
                if task.is_async:
                    value = await task.fn(*args, **kwargs)
                else:
                    value = await trio.to_thread.run_sync(
                        lambda: task.fn(*args, **kwargs), limiter=self._thread_limiter
                    )
        except StopTaskWorker as exc:
            log.info("run %s raised StopTaskWorker: stopping the worker", run.id)
            self._begin_stop(self.shutdown_timeout)
            return Released(id=run.id, attempt=run.attempt, reason=f"StopTaskWorker: {exc}")
        except Exception as exc:
            return self._failed(run, exc)
        if entry.scope.cancel_called:
            # Also when a sync task returned after the cancel: its value is dropped.
            if entry.cancel_requested:
                log.info("run %s cancelled by the caller", run.id)
                return Finished(id=run.id, attempt=run.attempt, state=TaskRunState.CANCELLED)
            if entry.lost:
                log.info("run %s cancelled: its connection was lost", run.id)
                return Released(id=run.id, attempt=run.attempt, reason="connection lost")
            if trio.current_time() >= entry.shutdown_deadline:
                log.info("run %s cancelled by the worker's stop: handed back", run.id)
                return Released(
                    id=run.id, attempt=run.attempt, reason="cancelled by a worker stop"
                )
            return self._failed(
                run,
                TaskRunTimedOut(
                    f"the run exceeded its timeout of {task.options.timeout_seconds} s"
                ),
            )
        try:
            return await self._completed(run, value)
        except SerializationError as exc:
            return self._failed(run, exc)

    async def _read_parameters(
        self, task: Task[Any, Any], run: TaskRun
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not should_try_to_read_parameters(task, run):
            return (), {}
        data = run.parameters
        if data is None:
            data = await self._get_blob(str(run.parameters_ref))
        args, kwargs = loads_payload(data)
        return tuple(args), dict(kwargs)

    async def _completed(self, run: TaskRun, value: Any) -> Finished:
        data = dumps_payload(value)
        if len(data) <= INLINE_PAYLOAD_LIMIT:
            result = Finished(
                id=run.id, attempt=run.attempt, state=TaskRunState.COMPLETED, result=data
            )
        else:
            ref = await self._put_blob(data)
            result = Finished(
                id=run.id, attempt=run.attempt, state=TaskRunState.COMPLETED, result_ref=ref
            )
        log.info("run %s (%s) completed", run.id, run.task_key)
        return result

    def _failed(self, run: TaskRun, exc: BaseException) -> Finished:
        log.info("run %s (%s) failed: %r", run.id, run.task_key, exc)
        try:
            data: bytes | None = dumps_payload(exc)
        except SerializationError:
            data = None
        if data is not None and len(data) > INLINE_PAYLOAD_LIMIT:
            data = None  # the ErrorInfo still says what happened
        return Finished(
            id=run.id,
            attempt=run.attempt,
            state=TaskRunState.FAILED,
            result=data,
            error=_error_info(exc),
        )

    async def _get_blob(self, ref: str) -> bytes:
        assert self._http is not None, "blobs are read only while the worker runs"
        response = await self._http.get(f"/blobs/{ref}")
        response.raise_for_status()
        return response.content

    async def _put_blob(self, data: bytes) -> str:
        if self._http is None:
            raise SerializationError("a large result needs a running worker to store it")
        response = await self._http.post(
            "/blobs", content=data, headers={"content-type": "application/octet-stream"}
        )
        response.raise_for_status()
        return str(response.json()["id"])

    async def _flush_reports(self) -> None:
        """Wait (a bounded time) until the server has applied every report.

        The server answers a :class:`Drain` only after it has applied all the
        reports sent before it, so once the answer arrives, ``stop()`` can
        return and callers see final states on the server.
        """
        if not self._connected:
            return
        self._drain_seq += 1
        seq = self._drain_seq
        self._outbox.put(self._generation, Drain(seq=seq))
        with trio.move_on_after(FLUSH_TIMEOUT):
            while self._connected and self._drained_seq < seq:
                self._drained = trio.Event()
                await self._drained.wait()

    # --- connection -----------------------------------------------------------------

    async def _connection_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._ready = task_status
        failures = 0
        outage_logged = False
        while not (self._stopping and not self._in_flight):
            fatal: BaseException | None = None
            lost: BaseException | None = None
            with trio.CancelScope() as self._reconnect_scope:
                if self._stopping:
                    self._reconnect_scope.cancel()
                try:
                    await self._connect_once()
                except* (ProtocolError, ConfigurationError) as group:
                    fatal = group.exceptions[0]
                except* trio_websocket.ConnectionRejected as group:
                    rejected = group.exceptions[0]
                    assert isinstance(rejected, trio_websocket.ConnectionRejected)
                    status = rejected.status_code or 0
                    if 400 <= status < 500:
                        # A refusal (wrong URL, not authorised) will not heal by retrying.
                        fatal = ProtocolError(
                            f"the server refused the subscription: HTTP {status}"
                        )
                    else:
                        lost = rejected
                except* _TRANSPORT_ERRORS as group:
                    lost = group.exceptions[0]
            if fatal is not None:
                self._fatal = fatal
                log.error("worker %s stops: %s", self.client_id, fatal)
                self._begin_stop(0.0)
                break
            if lost is None:
                failures = 0
                if outage_logged:
                    outage_logged = False
                continue
            if not outage_logged:
                log.warning("worker %s lost the server (%r); reconnecting", self.client_id, lost)
                outage_logged = True
            failures += 1
            delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(failures, 16)))
            with trio.CancelScope() as self._reconnect_scope:
                if self._stopping and not self._in_flight:
                    self._reconnect_scope.cancel()
                await trio.sleep(delay)
        self._mark_ready()

    def _mark_ready(self) -> None:
        ready, self._ready = self._ready, trio.TASK_STATUS_IGNORED
        if ready is not trio.TASK_STATUS_IGNORED:
            ready.started()

    async def _connect_once(self) -> None:
        try:
            async with self._connect() as ws:
                await self._serve_connection(ws)
        finally:
            self._connected = False
            self._drained.set()  # nobody waits on a connection that is gone
            self._abandon_generation(self._generation)

    @contextlib.asynccontextmanager
    async def _open_websocket(self) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        """Connect to ``/subscribe`` and close the socket ourselves on the way out.

        trio-websocket leaves the TCP socket open when the peer ends the
        connection, so the stream is opened here and closed in ``finally``.
        """
        url = urlsplit(self.api_url)
        host = url.hostname or "127.0.0.1"
        port = url.port or (443 if url.scheme == "https" else 80)
        if url.scheme == "https":
            raise ConfigurationError("https is not supported yet; use http on 127.0.0.1")
        resource = (url.path.rstrip("/") or "") + "/subscribe"
        # Neither the TCP connect nor the websocket handshake has a timeout of
        # its own; a server killed mid-handshake must not hold the worker forever.
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(CONNECT_TIMEOUT):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, stream, host, resource, message_queue_size=64
                    )
                yield ws
                nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    def _cancel(self, run_id: uuid.UUID) -> None:
        """The caller cancelled this run: cancel it here, or never start it."""
        found = False
        for key, entry in self._in_flight.items():
            if key[0] == run_id:
                found = True
                entry.cancel_requested = True
                entry.scope.cancel()
        if not found:
            # Still waiting in the delivery channel; the spawner will skip it.
            self._cancelled_before_start.add(run_id)

    def _abandon_generation(self, generation: int) -> None:
        """The connection is gone and the server requeues its runs: cancel ours.

        Their reports could not be accepted any more (the lease is gone), so
        finishing them would only hold slots that new runs need.
        """
        for entry in self._in_flight.values():
            if entry.generation == generation and not entry.lost:
                entry.lost = True
                entry.scope.cancel()

    async def _serve_connection(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._generation += 1
        generation = self._generation
        self._cancelled_before_start.clear()
        credits = 0 if self._stopping else max(0, self._window - len(self._in_flight))
        hello = Subscribe(
            keys=tuple(sorted(self.tasks)), client_id=self.client_id, credits=credits
        )
        await ws.send_message(encode_frame([hello]))
        with trio.fail_after(PING_TIMEOUT):
            reply = await self._receive(ws)
        if not reply or not isinstance(reply[0], Subscribed):
            raise ProtocolError(f"expected a subscribed message, got {reply!r}")
        self._connected = True
        lease_seconds = reply[0].lease_seconds
        log.info("worker %s subscribed (connection %s)", self.client_id, reply[0].connection_id)
        self._mark_ready()
        if self._stopping:
            self._outbox.put(generation, Drain(seq=0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sender, ws, generation)
            nursery.start_soon(self._pinger, ws)
            nursery.start_soon(self._heartbeat, generation, lease_seconds / 3)
            await self._reader(ws)
            nursery.cancel_scope.cancel()

    async def _receive(self, ws: trio_websocket.WebSocketConnection) -> list[Any]:
        try:
            data = await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            if reason is not None and (reason.code in _FATAL_CLOSE_CODES or reason.code == 1008):
                raise ProtocolError(
                    f"the server refused this worker: {reason.code} {reason.reason}"
                ) from None
            raise
        try:
            return list(decode_server_frame(data))
        except InvalidPayload as exc:
            raise ProtocolError(f"the server sent an invalid message: {exc}") from None

    async def _reader(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            for message in await self._receive(ws):
                if isinstance(message, Deliver):
                    for run in message.runs:
                        log.debug("received run %s attempt %d", run.id, run.attempt)
                        try:
                            self._deliveries_send.send_nowait((self._generation, run))
                        except trio.WouldBlock:
                            raise ProtocolError("the server sent more runs than credits") from None
                elif isinstance(message, Rejected):
                    log.warning(
                        "the server refused a report on run %s: %s", message.id, message.reason
                    )
                elif isinstance(message, Drained):
                    self._drained_seq = max(self._drained_seq, message.seq)
                    self._drained.set()
                elif isinstance(message, Cancel):
                    self._cancel(message.id)

    async def _sender(self, ws: trio_websocket.WebSocketConnection, generation: int) -> None:
        while True:
            await self._outbox.has_mail.wait()
            messages = self._outbox.take(generation)
            if messages:
                await ws.send_message(encode_frame(messages))

    async def _heartbeat(self, generation: int, interval: float) -> None:
        """Keep the leases alive: the server drops a connection silent for a lease."""
        while True:
            await trio.sleep(interval)
            self._outbox.put(generation, Heartbeat())

    async def _pinger(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            # ping() waits for its pong with no timeout of its own.
            with trio.fail_after(PING_TIMEOUT):
                await ws.ping()


async def serve(
    *tasks: Task[Any, Any],
    limit: int | None = 10,
    status_server_port: int | None = None,
    shutdown_timeout: float = 30.0,
    api_url: str | None = None,
) -> None:
    """Serve ``tasks`` with a :class:`TaskWorker` until it is stopped; then return.

    With ``status_server_port`` it also serves ``GET /status`` on 127.0.0.1.
    SIGTERM or SIGINT stop it gracefully (a second signal at once), and so
    does :class:`StopTaskWorker` raised by a task.
    """
    worker = TaskWorker(
        *tasks,
        limit=limit,
        shutdown_timeout=shutdown_timeout,
        api_url=api_url,
        status_server_port=status_server_port,
    )
    await worker.start()
