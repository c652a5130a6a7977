"""Test your tasks inside one trio run: the real server and a real worker, in memory.

:func:`open_test_cluster` runs the server's own HTTP handlers, dispatcher,
subscription handler and SQLite store (in memory), and a real
:class:`~trio_taskworker.TaskWorker`, as tasks of the current trio run. No
socket is opened: HTTP goes through ``httpx.ASGITransport`` and the worker's
websocket is a pair of memory channels. Every clock involved is trio's, so a
test on ``trio.testing.MockClock(autojump_threshold=0)`` sees a one-hour retry
delay or a lease expiry pass at once.

The pieces, for tests that need to reach further in:

- :class:`InProcessServer`: the server minus its sockets, with a ``connect``
  factory for ``TaskWorker(connect=...)`` and a way to cut connections;
- :func:`trio_wall_time`: the server's clock, epoch seconds that follow trio's;
- :data:`TEST_CLUSTER_URL`: the URL the cluster's client and workers use.

The pytest fixture ``task_cluster`` (:mod:`trio_taskworker.pytest_plugin`)
wraps :func:`open_test_cluster`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import httpx
import trio
import trio_websocket

from ._client import TaskWorkerClient, using_client
from ._definition import TaskDefinition
from ._models import TaskRun
from ._server import SQLiteStore, Store
from ._server._app import AppState, SubscriptionHandler, build_app
from ._server._dispatch import Dispatcher, Waiters
from ._states import TaskRunState
from ._subscription import WebSocket
from ._worker import TaskWorker

__all__ = [
    "TEST_CLUSTER_URL",
    "InProcessServer",
    "TaskCluster",
    "open_test_cluster",
    "trio_wall_time",
]

#: The URL of every test cluster. ``.invalid`` never resolves (RFC 6761), so a
#: call that cannot use the cluster's in-process client (a ``*_sync`` twin in a
#: sync task the cluster runs, a future used after the block) fails with
#: :class:`~trio_taskworker.ServerUnavailable` naming it instead of reaching a
#: real server. (A subprocess does not know the cluster at all.)
TEST_CLUSTER_URL = "http://trio-taskworker-test-cluster.invalid"

#: How long a closing in-process server waits for its subscriptions to end.
_CLOSE_GRACE = 2.0
#: ``GET /runs`` answers at most this many runs per request.
_PAGE = 1000

_wall_offset: trio.lowlevel.RunVar[float] = trio.lowlevel.RunVar("trio_taskworker_wall_offset")


def trio_wall_time() -> float:
    """Epoch seconds that advance with trio's clock (virtual time under a MockClock).

    The first call in a trio run anchors it to ``time.time()``; from then on it
    moves exactly as ``trio.current_time()`` does, so scheduled times, retry
    delays and leases the server computes pass when trio's clock says so. All
    callers within one trio run see the same clock.
    """
    try:
        offset = _wall_offset.get()
    except LookupError:
        offset = time.time() - trio.current_time()
        _wall_offset.set(offset)
    return offset + trio.current_time()


# --- the in-process websocket ----------------------------------------------------------


def _gone() -> trio_websocket.ConnectionClosed:
    return trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1006, "gone"))


@attrs.define(eq=False)
class _ServerEnd:
    """What ``SubscriptionHandler`` uses of Starlette's WebSocket."""

    incoming: trio.MemoryReceiveChannel[dict[str, Any]]
    outgoing: trio.MemorySendChannel[tuple[Any, ...]]

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        try:
            return await self.incoming.receive()
        except trio.EndOfChannel:
            return {"type": "websocket.disconnect", "code": 1006}

    async def send_text(self, text: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.outgoing.send(("text", text))

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.outgoing.send(("close", code, reason))


@attrs.define(eq=False)
class _WorkerEnd:
    """What the worker uses of trio-websocket's WebSocketConnection."""

    outgoing: trio.MemorySendChannel[dict[str, Any]]
    incoming: trio.MemoryReceiveChannel[tuple[Any, ...]]

    async def send_message(self, text: str) -> None:
        try:
            await self.outgoing.send({"type": "websocket.receive", "text": text})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _gone() from None

    async def get_message(self) -> str:
        try:
            item = await self.incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise _gone() from None
        if item[0] == "close":
            raise trio_websocket.ConnectionClosed(trio_websocket.CloseReason(item[1], item[2]))
        return str(item[1])

    async def ping(self) -> None:
        pass


# --- the server ------------------------------------------------------------------------


@attrs.define(eq=False)
class InProcessServer:
    """The real server's dispatcher, store, HTTP routes and subscription handler,
    running in ``nursery`` with no socket.

    Build it with :meth:`start`. :meth:`connect` is a ``connect`` factory for
    ``TaskWorker(connect=...)``; :meth:`open_http` is an ``httpx.AsyncClient``
    that calls the server's HTTP handlers directly.
    """

    #: Where the dispatcher and each connection's handler run.
    nursery: trio.Nursery
    #: What the handlers share: the store, the dispatcher, the waiters.
    state: AppState
    _cuts: list[trio.CancelScope] = attrs.field(init=False, factory=list)

    @classmethod
    async def start(
        cls,
        nursery: trio.Nursery,
        store: Store,
        lease_seconds: float = 30.0,
        now: Callable[[], float] = trio_wall_time,
    ) -> InProcessServer:
        """Start the dispatcher in ``nursery`` over a running ``store``; return the server.

        ``now`` is the server's clock in epoch seconds (default
        :func:`trio_wall_time`). Nothing is stopped here: cancel ``nursery``
        (after :meth:`close`, for an orderly end).
        """
        dispatcher = Dispatcher(store, now)
        await nursery.start(dispatcher.run)
        state = AppState(
            store=store,
            dispatcher=dispatcher,
            waiters=Waiters(),
            now=now,
            lease_seconds=lease_seconds,
        )
        return cls(nursery, state)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[WebSocket]:
        """Open one in-process worker connection; the server sees a disconnect on exit.

        Usable as ``TaskWorker(connect=server.connect)``: the server side is a
        real ``SubscriptionHandler`` started in :attr:`nursery`.
        """
        to_server_send, to_server_receive = trio.open_memory_channel[dict[str, Any]](1000)
        to_worker_send, to_worker_receive = trio.open_memory_channel[tuple[Any, ...]](1000)
        server_end = _ServerEnd(to_server_receive, to_worker_send)
        # _ServerEnd has the part of Starlette's WebSocket that the handler uses.
        handler = SubscriptionHandler(self.state, server_end)  # type: ignore[arg-type]
        self.nursery.start_soon(handler.run)
        with trio.CancelScope() as cut:
            self._cuts.append(cut)
            try:
                yield _WorkerEnd(to_server_send, to_worker_receive)
            finally:
                to_server_send.close()
                to_worker_receive.close()

    def cut_connections(self) -> None:
        """Drop every worker connection without a goodbye (network loss, kill -9)."""
        for cut in self._cuts:
            cut.cancel()
        self._cuts.clear()

    def open_http(self, base_url: str) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose requests the server's HTTP handlers answer
        in the calling task (``httpx.ASGITransport``: no socket, whole responses).

        Close it (``async with``) when done; that closes nothing of the server.
        """
        transport = httpx.ASGITransport(app=build_app(self.state))
        return httpx.AsyncClient(transport=transport, base_url=base_url)

    async def close(self) -> None:
        """Shut down as ``TaskServer.stop`` does: close subscriptions with 1001,
        answer waiting requests, and wait up to two seconds for connections to end.

        Returns then; the dispatcher and store keep running until their nursery
        is cancelled.
        """
        state = self.state
        if state.stopping.is_set():
            return
        state.stopping.set()
        state.waiters.stop()
        if state.connections:
            with trio.move_on_after(_CLOSE_GRACE):
                await state.connections_closed.wait()


# --- the cluster -----------------------------------------------------------------------


@attrs.define(eq=False)
class TaskCluster:
    """An in-memory server with its workers, made by :func:`open_test_cluster`.

    Inside the block, ``delay``/``apply_async``/``map`` and the async
    ``TaskRunFuture`` methods go to this cluster through :attr:`client`.
    """

    #: The in-process server (its ``state`` holds the store and dispatcher).
    server: InProcessServer
    #: The client that ``delay``/``result`` use inside the block.
    client: TaskWorkerClient
    _nursery: trio.Nursery
    _workers: list[TaskWorker] = attrs.field(init=False, factory=list)

    @property
    def api_url(self) -> str:
        """The cluster's URL (:data:`TEST_CLUSTER_URL`); futures carry it."""
        return self.client.api_url

    @property
    def workers(self) -> tuple[TaskWorker, ...]:
        """Every worker started in this cluster, in order."""
        return tuple(self._workers)

    @property
    def worker(self) -> TaskWorker:
        """The first worker started; ``RuntimeError`` if there is none yet."""
        if not self._workers:
            raise RuntimeError(
                "this cluster has no worker: pass tasks to open_test_cluster() "
                "or call start_worker()"
            )
        return self._workers[0]

    async def start_worker(
        self,
        *tasks: TaskDefinition[Any, Any],
        limit: int | None = 10,
        shutdown_timeout: float = 5.0,
    ) -> TaskWorker:
        """Start a :class:`~trio_taskworker.TaskWorker` for ``tasks`` in the cluster.

        Returns once it has subscribed, so runs queued afterwards (or before)
        reach it. ``limit`` and ``shutdown_timeout`` are the worker's; the
        cluster stops it gracefully when the block ends. Raises
        :class:`~trio_taskworker.ConfigurationError` for bad arguments, as
        ``TaskWorker`` does.
        """
        worker = TaskWorker(
            *tasks,
            limit=limit,
            shutdown_timeout=shutdown_timeout,
            api_url=self.api_url,
            handle_signals=False,
            connect=self.server.connect,
        )
        # The worker reads and stores large payloads through the client bound
        # here, whichever task calls start_worker.
        with using_client(self.client):
            await self._nursery.start(worker.start)
        self._workers.append(worker)
        return worker

    async def runs(
        self,
        task: TaskDefinition[Any, Any] | str | None = None,
        *,
        state: TaskRunState | None = None,
    ) -> list[TaskRun]:
        """Every run the server holds, oldest first and without payloads.

        ``task`` (a task or its key) and ``state`` narrow the list.
        """
        key = task.key if isinstance(task, TaskDefinition) else task
        runs: list[TaskRun] = []
        while True:
            page = await self.client.list_runs(
                state=state, task_key=key, limit=_PAGE, offset=len(runs)
            )
            runs.extend(page)
            if len(page) < _PAGE:
                return runs[::-1]  # the server lists newest first

    async def _stop_workers(self) -> None:
        for worker in self._workers:
            await worker.stop()


@contextlib.asynccontextmanager
async def open_test_cluster(
    *tasks: TaskDefinition[Any, Any], limit: int | None = 10
) -> AsyncIterator[TaskCluster]:
    """Run an in-memory server, and a worker for ``tasks`` if any, in this trio run.

    Inside the block, ``delay``, ``apply_async``, ``map`` and the futures'
    ``result``, ``wait`` and ``cancel`` go to the cluster (and so do those
    called by tasks the cluster's workers run). ``limit`` is the worker's.
    Yields the :class:`TaskCluster`, whose worker has subscribed already.

    When the block ends normally the workers stop gracefully (runs in flight
    get their ``shutdown_timeout``), then the server closes and everything it
    ran is cancelled. When the block raises, everything is cancelled at once
    and the block's exception propagates unchanged. An error inside the
    cluster itself (a worker that crashed) comes out as an exception group.

    The blocking ``*_sync`` twins cannot reach the cluster: called on its trio
    thread they raise ``RuntimeError`` (a blocking call there would stall the
    cluster that should answer it).
    """
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        store = SQLiteStore(":memory:", threaded=False)
        await nursery.start(store.run)
        server = await InProcessServer.start(nursery, store)
        async with server.open_http(TEST_CLUSTER_URL) as http:
            client = TaskWorkerClient(TEST_CLUSTER_URL, http)
            with using_client(client):
                cluster = TaskCluster(server, client, nursery)
                if tasks:
                    await cluster.start_worker(*tasks, limit=limit)
                try:
                    yield cluster
                except BaseException as exc:
                    # Re-raised below, outside the nursery, so that it does
                    # not come out wrapped in an exception group.
                    body_error = exc
                else:
                    await cluster._stop_workers()
                    await server.close()
        nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
