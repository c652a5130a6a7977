"""Task workers: :class:`TaskWorker` and :func:`serve`.

The worker is a nursery tree, one module per branch::

    TaskWorker.start()
    └── nursery
        ├── subscription    (_subscription: the websocket, reconnects, outbox, credits)
        ├── spawner         (_spawner: CapacityLimiter(limit); a child and scopes per run)
        ├── log shipper     (_runlog: the runs' log records to POST /logs, in batches)
        ├── status server   (_status: optional HTTP, GET /status)
        └── signal watcher  (SIGTERM/SIGINT -> stop; a second one stops at once)

:class:`TaskWorker` only opens the nursery and wires the branches: the
subscription hands runs and cancels to the spawner, and the spawner's reports
leave through the subscription. The worker grants the server one credit per
free limiter token, so it never holds a run it cannot start.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Awaitable, Generator
from types import FrameType, TracebackType
from typing import Any, Self

import trio

from ._client import (
    TaskWorkerClient,
    api_url_from_env,
    api_urls,
    bound_client,
    normalize_api_url,
    pooled_http,
    redact_url,
)
from ._definition import TaskDefinition
from ._exceptions import ConfigurationError, leaves
from ._guard import in_trio_run, needs_trio
from ._models import Released, TaskRun, WorkerMessage
from ._runlog import LogShipper
from ._spawner import Spawner, should_try_to_read_parameters
from ._states import TaskRunState
from ._subscription import Connect, Subscription, max_frame_bytes, websocket_connector

__all__ = ["TaskWorker", "serve", "should_try_to_read_parameters"]

log = logging.getLogger(__name__)


class TaskWorker:
    """Runs the given tasks' queued runs, at most ``limit`` at once.

    ``limit=None`` means no limit (the worker still asks for at most
    ``UNLIMITED_WINDOW`` runs at a time). ``shutdown_timeout`` is how long
    in-flight runs get to finish on a stop before they are cancelled and
    handed back to the queue.

    ``connect`` opens the connection to the server (default: a websocket to
    ``{api_url}/subscribe``); pass another factory to run over another
    transport, as tests do with an in-process one. ``api_key`` (default:
    ``TRIO_TASKWORKER_API_KEY``) goes with the websocket handshake and the
    worker's HTTP requests; a server that refuses it (close code 4001 or
    4003) makes :meth:`start` raise :class:`ProtocolError`. ``api_url``
    (default: ``TRIO_TASKWORKER_API_URL``) may name several replicas of one
    server, separated by commas: the websocket and the HTTP requests go to the
    first that answers and fail over to the next.

    ``async with TaskWorker(...) as worker:`` starts it in the background of
    the enclosing trio task and stops it gracefully when the block exits
    (inside an application that handles its own signals, pass
    ``handle_signals=False``). A worker runs once: start a new one to serve again.

    Records that runs log through :func:`get_run_logger` go to the server
    (``POST /logs``) as well as to this process's log; ``log_prints`` (default:
    ``TRIO_TASKWORKER_LOG_PRINTS``, off when unset) is the worker's default for
    tasks that do not set their own ``log_prints`` option.
    """

    def __init__(
        self,
        *tasks: TaskDefinition[Any, Any],
        limit: int | None = 10,
        shutdown_timeout: float = 30.0,
        api_url: str | None = None,
        status_server_port: int | None = None,
        handle_signals: bool = True,
        connect: Connect | None = None,
        api_key: str | None = None,
        log_prints: bool | None = None,
    ) -> None:
        if not tasks:
            raise ConfigurationError("a TaskWorker needs at least one task")
        by_key: dict[str, TaskDefinition[Any, Any]] = {}
        for t in tasks:
            if not isinstance(t, TaskDefinition):
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
        if log_prints is None:
            log_prints = _flag_from_env("TRIO_TASKWORKER_LOG_PRINTS")
        elif not isinstance(log_prints, bool):
            raise ConfigurationError(f"log_prints must be True, False or None, got {log_prints!r}")
        self.tasks = by_key
        self.shutdown_timeout = float(shutdown_timeout)
        self.api_url = normalize_api_url(api_url or api_url_from_env())
        self.status_server_port = status_server_port
        self.handle_signals = handle_signals
        self._api_key = api_key
        #: Names this worker in the server's logs: host, process id and a suffix
        #: that tells apart several workers in one process.
        self.client_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._logs = LogShipper()
        self._spawner = Spawner(
            by_key,
            limit,
            report=self._report,
            request_stop=self._stop_from_a_run,
            logs=self._logs,
            log_prints=log_prints,
        )
        self._subscription = Subscription(
            connect=connect
            or websocket_connector(
                self.api_url,
                max_message_size=max_frame_bytes(self._spawner.window),
                api_key=api_key,
            ),
            sink=self._spawner,
            keys=tuple(sorted(by_key)),
            client_id=self.client_id,
            window=self._spawner.window,
        )
        self._started = False
        self._started_at: datetime.datetime | None = None
        self._stopped = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._background: contextlib.AsyncExitStack | None = None

    # --- public state ---------------------------------------------------------------

    @property
    def limit(self) -> int | None:
        """The most runs at once, or None for no limit."""
        return self._spawner.limit

    @property
    def task_keys(self) -> set[str]:
        """The keys of the tasks this worker serves."""
        return set(self.tasks)

    @property
    def started_at(self) -> datetime.datetime | None:
        """When :meth:`start` was last called (UTC), or None if never."""
        return self._started_at

    @property
    def in_flight_task_runs(self) -> dict[str, dict[uuid.UUID, datetime.datetime]]:
        """The runs executing now: per task key, each run's id and when it started (UTC)."""
        runs: dict[str, dict[uuid.UUID, datetime.datetime]] = {key: {} for key in self.tasks}
        for entry in self._spawner.in_flight_runs():
            runs.setdefault(entry.run.task_key, {})[entry.run.id] = entry.started_at
        return runs

    @property
    def finished_task_runs(self) -> dict[str, int]:
        """How many runs have ended here, per task key (whatever their outcome)."""
        return {key: self._spawner.finished[key] for key in self.tasks}

    @property
    def failed_task_runs(self) -> dict[str, int]:
        """Of :attr:`finished_task_runs`, those that ended FAILED here, per task key.

        Every failed attempt counts, whether or not the server retries the run.
        """
        return {key: self._spawner.failed[key] for key in self.tasks}

    @property
    def started(self) -> bool:
        """True between :meth:`start` being called and it returning."""
        return self._started

    @property
    def stopping(self) -> bool:
        """True once a stop has been requested."""
        return self._spawner.stopping

    @property
    def current_tasks(self) -> int:
        """How many runs are executing now."""
        return self._spawner.in_flight

    @property
    def available_tasks(self) -> int | None:
        """How many more runs could start now (None with no limit)."""
        return self._spawner.available

    def status(self) -> dict[str, Any]:
        """The snapshot served at ``GET /status``."""
        in_flight = {
            key: [{"id": str(i), "started_at": at.isoformat()} for i, at in runs.items()]
            for key, runs in self.in_flight_task_runs.items()
            if runs
        }
        return {
            "client_id": self.client_id,
            "started_at": None if self._started_at is None else self._started_at.isoformat(),
            "stopping": self.stopping,
            "connected": self._subscription.connected,
            "limit": self.limit,
            "current": self.current_tasks,
            "available": self.available_tasks,
            "tasks": sorted(self.tasks),
            "finished": {key: n for key, n in self.finished_task_runs.items() if n},
            "failed": {key: n for key, n in self.failed_task_runs.items() if n},
            "in_flight": in_flight,
        }

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start the worker in the background; return once it is subscribed."""
        stack = contextlib.AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        try:
            await nursery.start(self.start)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._background = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop gracefully (see :meth:`start`) and wait until it has stopped."""
        stack, self._background = self._background, None
        if stack is None:
            raise RuntimeError("__aexit__ without __aenter__")
        self._begin_stop(self.shutdown_timeout)
        # The nursery is not told of an error in the block, which would cancel
        # the runs at once: the stop stays graceful, and the error then goes on.
        try:
            await stack.__aexit__(None, None, None)
        except BaseExceptionGroup as group:
            found = leaves(group)
            # One error of the worker's own comes out as itself, as from start().
            error = found[0] if len(found) == 1 and isinstance(found[0], Exception) else group
            if exc is not None:
                raise BaseExceptionGroup(
                    "the block and the worker both failed", [exc, error]
                ) from None
            raise error from None

    @needs_trio(None)
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
        if self._stopped.is_set():
            raise RuntimeError("a TaskWorker runs once and this one has stopped: make a new one")
        self._started = True
        self._started_at = datetime.datetime.now(datetime.UTC)
        self._token = trio.lowlevel.current_trio_token()
        log.info(
            "worker %s serving %s (limit %s) from %s",
            self.client_id,
            ", ".join(sorted(self.tasks)),
            self.limit,
            ", ".join(redact_url(url) for url in api_urls(self.api_url)),
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = bound_client(self.api_url)
                if client is None:
                    http = await stack.enter_async_context(
                        pooled_http(self.api_url, self._api_key)
                    )
                    client = TaskWorkerClient(self.api_url, http)
                self._spawner.client = client
                self._logs.post = client.post_logs
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._logs.run)
                    if (
                        self.handle_signals
                        and threading.current_thread() is threading.main_thread()
                    ):
                        nursery.start_soon(self._watch_signals)
                    if self.status_server_port is not None:
                        # Imported here: a worker without a status server never
                        # loads Hypercorn, Starlette or prometheus_client.
                        from ._status import StatusServer

                        status = StatusServer(self.status, port=self.status_server_port)
                        await nursery.start(status.run)
                    await nursery.start(self._subscribe)
                    task_status.started()
                    await self._spawner.run()
                    await self._subscription.flush()
                    # Records of runs handed back (bounded: the stop is under way).
                    await self._logs.close()
                    nursery.cancel_scope.cancel()
        finally:
            self._spawner.client = None
            self._logs.post = None
            self._started = False
            self._stopped.set()
            log.info("worker %s stopped", self.client_id)
        if self._subscription.fatal is not None:
            raise self._subscription.fatal

    @needs_trio(None)
    async def stop(self) -> None:
        """Stop the worker gracefully (see :meth:`start`).

        Returns once :meth:`start` has finished, except when called from inside
        one of this worker's own runs, where waiting would never end: then it
        returns at once. Calling it on a worker that is not running does nothing.
        """
        if not self._started:
            return
        self._begin_stop(self.shutdown_timeout)
        if not self._spawner.inside_run():
            await self._stopped.wait()

    def handle_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Stop gracefully; usable as a ``signal.signal`` handler.

        The first call starts a graceful stop; a second one cancels the runs
        still in flight at once (they are handed back). The worker handles
        SIGTERM and SIGINT this way while it runs (unless
        ``handle_signals=False``); call this to wire other signals.
        """
        log.info("worker %s received signal %s: stopping", self.client_id, signum)
        if self._token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        if not self.stopping:
            self._begin_stop(self.shutdown_timeout)
        else:
            log.info("second signal %s: cancelling runs in flight now", signum)
            self._begin_stop(0.0)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.handle_sigterm(signum, None)

    def _begin_stop(self, grace: float) -> None:
        """Take no more runs; give the in-flight ones ``grace`` seconds."""
        if not self._started:
            return
        if not self.stopping:
            log.info(
                "worker %s stopping: %d runs in flight get %.1f s to finish",
                self.client_id,
                self.current_tasks,
                grace,
            )
        self._spawner.begin_stop(grace)
        self._subscription.drain()

    def _stop_from_a_run(self) -> None:
        self._begin_stop(self.shutdown_timeout)

    def _report(self, message: WorkerMessage, generation: int | None) -> None:
        self._subscription.post(message, generation)

    async def _subscribe(self, *, task_status: trio.TaskStatus[None]) -> None:
        await self._subscription.run(task_status=task_status)
        if self._subscription.fatal is not None:
            self._begin_stop(0.0)

    @needs_trio(None)
    async def execute_task_run(self, task_run: TaskRun) -> TaskRunState:
        """Run one run here and now, under the limiter, and report it if subscribed.

        Returns the state the worker reports: COMPLETED, FAILED, CANCELLED
        (the caller cancelled it, or the task raised :class:`StopTaskWorker`),
        or SCHEDULED when the run was handed back (the worker stopped). A
        FAILED run with retries left is rescheduled by the server, not here.
        """
        report = await self._spawner.execute(task_run)
        if isinstance(report, Released):
            return TaskRunState.SCHEDULED
        return report.state


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _flag_from_env(name: str) -> bool:
    """An on/off setting from the environment (unset: off); ConfigurationError otherwise."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name}={value!r}: use 1/true/yes/on or 0/false/no/off")


def serve(
    *tasks: TaskDefinition[Any, Any],
    limit: int | None = 10,
    status_server_port: int | None = None,
    handle_signals: bool = True,
    shutdown_timeout: float = 30.0,
    api_url: str | None = None,
    api_key: str | None = None,
) -> Awaitable[None]:
    """Serve ``tasks`` with a :class:`TaskWorker` until it is stopped.

    Inside a trio run, ``await serve(...)``. Called from plain synchronous
    code (a script's ``if __name__ == "__main__":``), it runs trio itself and
    blocks until the worker stops, as Prefect's ``serve`` does.

    With ``status_server_port`` it also serves ``GET /status`` on 127.0.0.1.
    SIGTERM or SIGINT stop it gracefully (a second signal at once), and so
    does :class:`StopTaskWorker` raised by a task. ``handle_signals=False``
    installs no signal handler, for an application that handles signals
    itself. Such an application stops the worker gracefully by keeping a
    :class:`TaskWorker` and calling :meth:`TaskWorker.stop` (or using
    ``async with``); cancelling ``serve`` stops it at once, like a lost
    connection: runs in flight are redelivered and count as redeliveries.
    ``api_url`` and ``api_key`` default to ``TRIO_TASKWORKER_API_URL`` and
    ``TRIO_TASKWORKER_API_KEY``.
    Raises :class:`ConfigurationError` for bad arguments before anything runs.
    """
    worker = TaskWorker(
        *tasks,
        limit=limit,
        shutdown_timeout=shutdown_timeout,
        api_url=api_url,
        status_server_port=status_server_port,
        handle_signals=handle_signals,
        api_key=api_key,
    )
    if in_trio_run():
        return worker.start()
    trio.run(worker.start)
    return _Served()


class _Served:
    """What :func:`serve` returns once it has run trio itself: awaiting it does nothing."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that ends at once
