"""A real worker against a real server, both in this process, over 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from trio_taskworker import (
    ProtocolError,
    StopTaskWorker,
    TaskRunFutureList,
    TaskRunState,
    TaskServer,
    TaskWorker,
    gather_results,
    open_client,
    task,
)
from trio_taskworker._subscription import WebSocket, websocket_connector

from .helpers import wait_until

gate = trio.Event()
active = 0
peak = 0


@task
async def add(x: int, y: int = 1) -> int:
    return x + y


@task
def sync_mul(x: int, y: int) -> int:
    return x * y


@task
async def gated(i: int) -> int:
    global active, peak
    active += 1
    peak = max(peak, active)
    try:
        await gate.wait()
    finally:
        active -= 1
    return i


@task
async def big(n: int) -> bytes:
    return b"z" * n


cleanups: list[str] = []


@task
async def cancellable(i: int) -> int:
    global active
    active += 1
    try:
        await trio.sleep_forever()
    finally:
        active -= 1
        cleanups.append(f"finally {i}")
    return i


@task
def sync_cancellable() -> str:
    global active
    active += 1
    try:
        while True:
            trio.from_thread.check_cancelled()
            trio.from_thread.run(trio.sleep, 0.01)
    finally:
        active -= 1
        cleanups.append("sync finally")


@task
async def quitter() -> None:
    raise StopTaskWorker("the task asked to stop")


@pytest.fixture(autouse=True)
def _reset_gate() -> None:
    global gate, active, peak
    cleanups.clear()
    gate = trio.Event()
    active = peak = 0


async def start_worker(nursery: trio.Nursery, url: str, *tasks: Any, **kwargs: Any) -> TaskWorker:
    worker = TaskWorker(*tasks, api_url=url, handle_signals=False, **kwargs)
    await nursery.start(worker.start)
    return worker


async def test_runs_complete_through_the_server(nursery: trio.Nursery, server: TaskServer) -> None:
    await start_worker(nursery, str(server.url), add, sync_mul)
    async with open_client(server.url):
        fut = await add.delay(1, y=2)
        assert await fut.result(timeout=20) == 3
        futs = await sync_mul.map([1, 2, 3], [4, 5, 6])
        assert await gather_results(futs, timeout=20) == [4, 10, 18]
        run = await fut.wait()
        assert run.state is TaskRunState.COMPLETED and run.attempt == 1


async def test_large_parameters_and_results_go_through_blobs(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    await start_worker(nursery, str(server.url), big, add)
    async with open_client(server.url):
        value = await (await big.delay(200_000)).result(timeout=20)
        assert value == b"z" * 200_000
        big_number = 10**200_000
        fut = await add.delay(big_number, 1)
        run = await fut.wait(timeout=20)
        assert run.parameters is None and run.parameters_ref is not None
        assert await fut.result() == big_number + 1


async def test_limit_is_never_exceeded(nursery: trio.Nursery, server: TaskServer) -> None:
    worker = await start_worker(nursery, str(server.url), gated, limit=3)
    async with open_client(server.url) as client:
        futs = await gated.map(range(10))
        await wait_until(lambda: active == 3)
        # Credits: the server leased exactly as many runs as the worker can start.
        states = [r.state for r in await client.list_runs()]
        leased = {TaskRunState.PENDING, TaskRunState.RUNNING}
        assert sum(s in leased for s in states) == 3
        assert worker.available_tasks == 0
        gate.set()
        assert await gather_results(futs, timeout=20) == list(range(10))
    assert peak == 3


async def test_two_workers_share_runs_and_none_twice(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    w1 = await start_worker(nursery, str(server.url), add, limit=2)
    w2 = await start_worker(nursery, str(server.url), add, limit=2)
    async with open_client(server.url) as client:
        futs = await add.map(range(200))
        assert await gather_results(futs, timeout=30) == [i + 1 for i in range(200)]
        runs = await client.wait_runs([f.task_run_id for f in futs])
        assert all(r.attempt == 1 for r in runs)  # each run was delivered exactly once
    done = w1.status()["finished"].get(add.key, 0) + w2.status()["finished"].get(add.key, 0)
    assert done == 200


async def test_stop_drains_in_flight_runs(nursery: trio.Nursery, server: TaskServer) -> None:
    worker = await start_worker(nursery, str(server.url), gated, limit=2)
    async with open_client(server.url):
        futs = await gated.map(range(4))
        await wait_until(lambda: active == 2)
        async with trio.open_nursery() as inner:
            inner.start_soon(worker.stop)
            await wait_until(lambda: worker.stopping)
            gate.set()
        assert not worker.started
        finished = [await f.wait(timeout=0) for f in futs]
        states = sorted(r.state.value for r in finished)
        # The two in flight finished; the two never taken stay queued.
        assert states == ["COMPLETED", "COMPLETED", "SCHEDULED", "SCHEDULED"]


async def test_stop_after_grace_hands_runs_back(nursery: trio.Nursery, server: TaskServer) -> None:
    worker = await start_worker(nursery, str(server.url), gated, limit=1, shutdown_timeout=0)
    async with open_client(server.url):
        fut = await gated.delay(1)
        await wait_until(lambda: active == 1)
        await worker.stop()
        run = await fut.wait(timeout=0)
        assert run.state is TaskRunState.SCHEDULED
        assert run.redeliveries == 0 and "stop" in (run.message or "")
        # Another worker picks it up.
        gate.set()
        await start_worker(nursery, str(server.url), gated)
        assert await fut.result(timeout=20) == 1


async def test_stop_task_worker_from_a_task(nursery: trio.Nursery, server: TaskServer) -> None:
    worker = TaskWorker(quitter, api_url=server.url, handle_signals=False)
    async with open_client(server.url):
        fut = await quitter.delay()
        with trio.fail_after(20):
            await worker.start()  # returns by itself
        run = await fut.wait(timeout=0)
        assert run.state is TaskRunState.CANCELLED
        assert "StopTaskWorker" in (run.message or "")


async def test_serve_returns_normally_on_stop_task_worker(server: TaskServer) -> None:
    from trio_taskworker import serve

    async with open_client(server.url):
        fut = await quitter.delay()
        with trio.fail_after(20):
            await serve(quitter, limit=1, status_server_port=0, api_url=server.url)
        assert (await fut.wait(timeout=0)).state is TaskRunState.CANCELLED


async def test_cancel_queued_and_running_runs(nursery: trio.Nursery, server: TaskServer) -> None:
    from trio_taskworker import TaskRunCancelled

    cleanups.clear()
    await start_worker(nursery, str(server.url), cancellable, limit=1)
    async with open_client(server.url):
        running = await cancellable.delay(1)
        queued = await cancellable.delay(2)  # the limit keeps it in the queue
        await wait_until(lambda: active == 1)
        assert (await queued.cancel()).state is TaskRunState.CANCELLED
        snapshot = await running.cancel()
        assert snapshot.state in (TaskRunState.CANCELLING, TaskRunState.CANCELLED)
        with trio.fail_after(10):
            run = await running.wait()
        assert run.state is TaskRunState.CANCELLED
        assert cleanups == ["finally 1"]  # the queued one never started
        with pytest.raises(TaskRunCancelled):
            await running.result()
        with pytest.raises(TaskRunCancelled):
            await queued.result()
        # Cancelling an ended run changes nothing.
        assert (await running.cancel()).state is TaskRunState.CANCELLED


async def test_cancel_sync_run_at_check_cancelled(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    cleanups.clear()
    await start_worker(nursery, str(server.url), sync_cancellable)
    async with open_client(server.url):
        fut = await sync_cancellable.delay()
        await wait_until(lambda: active == 1)
        await fut.cancel()
        assert (await fut.wait(timeout=20)).state is TaskRunState.CANCELLED
        assert cleanups == ["sync finally"]


async def test_worker_reconnects_after_server_restart(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    first = TaskServer(port=0, data_dir=tmp_path)
    async with trio.open_nursery() as server_nursery:
        url = await server_nursery.start(first.run)
        worker = await start_worker(nursery, url, add)
        await first.stop()
    await wait_until(lambda: not worker.status()["connected"])
    port = int(url.rsplit(":", 1)[1])
    second = TaskServer(port=port, data_dir=tmp_path)
    await nursery.start(second.run)
    await wait_until(lambda: worker.status()["connected"])
    async with open_client(url):
        assert await (await add.delay(41)).result(timeout=20) == 42
    await second.stop()


async def test_lost_connection_redelivers_running_runs(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    cuts: list[trio.CancelScope] = []
    real = websocket_connector(str(server.url))

    @contextlib.asynccontextmanager
    async def cuttable() -> AsyncIterator[WebSocket]:
        async with real() as ws:
            with trio.CancelScope() as cut:
                cuts.append(cut)
                yield ws

    await start_worker(nursery, str(server.url), gated, connect=cuttable)
    async with open_client(server.url) as client:
        fut = await gated.delay(7)
        await wait_until(lambda: active == 1)
        # Cut the worker's connection without a goodbye: the server must take
        # the lease back and redeliver; the worker cancels its orphaned attempt.
        cuts[-1].cancel()
        attempts: list[int] = []

        async def redelivered() -> None:
            run = await client.read_run(fut.task_run_id)
            attempts.append(run.attempt)

        with trio.fail_after(20):
            while not attempts or attempts[-1] < 2:
                await redelivered()
        gate.set()
        assert await fut.result(timeout=20) == 7
        final = await fut.wait()
        assert final.attempt == 2 and final.redeliveries == 1
        assert "connection was lost" in (final.message or "")


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        (["hello"], "invalid subscribe"),
        ([json.dumps([{"type": "credit", "n": 1}])], "first message must be a lone subscribe"),
        ([json.dumps([{"type": "subscribe", "keys": [], "client_id": "x", "credits": 1}])],
         "at least one non-empty task key"),
        ([json.dumps([{"type": "subscribe", "keys": ["k"], "client_id": "x", "credits": -1}])],
         "credits must be in"),
        ([json.dumps([{"type": "subscribe", "keys": ["k"], "client_id": "x", "credits": 1}]),
          "[{]"], "invalid message"),
        ([json.dumps([{"type": "subscribe", "keys": ["k"], "client_id": "x", "credits": 1}]),
          json.dumps([{"type": "credit", "n": -5}])], "credits must stay in"),
        # Two credits in one frame count together against the cap.
        ([json.dumps([{"type": "subscribe", "keys": ["k"], "client_id": "x", "credits": 1}]),
          json.dumps([{"type": "credit", "n": 60_000}, {"type": "credit", "n": 60_000}])],
         "credits must stay in"),
        ([json.dumps([{"type": "subscribe", "keys": ["k"], "client_id": "x", "credits": 1}]),
          json.dumps([{"type": "subscribe", "keys": ["k"], "client_id": "x", "credits": 1}])],
         "subscribe may only be sent once"),
        # A result's preview is shown to people: bounded like any text.
        ([json.dumps([{"type": "subscribe", "keys": ["k"], "client_id": "x", "credits": 1}]),
          json.dumps([{"type": "finished", "id": "00000000-0000-0000-0000-000000000000",
                       "attempt": 1, "state": "COMPLETED", "result_preview": "x" * 2001}])],
         "invalid message"),
    ],
)  # fmt: skip
async def test_bad_websocket_messages_close_with_a_reason(
    nursery: trio.Nursery, server: TaskServer, frames: list[str], reason: str
) -> None:
    host, port = str(server.url).removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        async with trio.open_nursery() as inner:
            ws = await trio_websocket.wrap_client_stream(inner, stream, host, "/subscribe")
            for frame in frames:
                await ws.send_message(frame)
            with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            inner.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
    assert closed.value.reason.code == 1008
    assert reason in (closed.value.reason.reason or "")
    # The server is fine afterwards.
    async with open_client(server.url) as client:
        assert (await client.health())["status"] == "ok"


async def test_a_refused_worker_stops_with_an_error(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    nameless = task(add.fn)
    nameless.key = ""  # an empty key is refused by the server
    worker = TaskWorker(nameless, api_url=server.url, handle_signals=False)
    with trio.fail_after(20), pytest.raises(ProtocolError, match="refused this worker: 1008"):
        await worker.start()


async def test_stop_when_server_never_came(nursery: trio.Nursery) -> None:
    from .conftest import free_port

    worker = TaskWorker(add, api_url=f"http://127.0.0.1:{free_port()}", handle_signals=False)
    async with trio.open_nursery() as inner:
        inner.start_soon(worker.start)
        await wait_until(lambda: worker.started)
        with trio.fail_after(10):
            await worker.stop()
    assert not worker.started


async def test_a_rejected_handshake_stops_the_worker(server: TaskServer) -> None:
    # A URL whose path has no websocket route: the handshake gets an HTTP 4xx.
    worker = TaskWorker(add, api_url=f"{server.url}/nowhere", handle_signals=False)
    with trio.fail_after(20), pytest.raises(ProtocolError, match="refused the subscription"):
        await worker.start()


async def test_result_raises_crashed_and_cancelled() -> None:
    import datetime
    import uuid

    from trio_taskworker import TaskRun, TaskRunCancelled, TaskRunCrashed
    from trio_taskworker._client import SyncClient

    now = datetime.datetime.now(datetime.UTC)

    def run(state: TaskRunState) -> TaskRun:
        return TaskRun(
            id=uuid.uuid4(), task_key="k", task_name="k", state=state, created_at=now,
            scheduled_time=now, message="it had been redelivered 3 times",
        )  # fmt: skip

    with SyncClient("http://127.0.0.1:9") as client:  # these need no request
        with pytest.raises(TaskRunCrashed, match="redelivered 3 times"):
            client.load_result(run(TaskRunState.CRASHED))
        with pytest.raises(TaskRunCancelled):
            client.load_result(run(TaskRunState.CANCELLED))
        with pytest.raises(TimeoutError, match="still RUNNING"):
            client.load_result(run(TaskRunState.RUNNING))


async def test_a_refusal_after_subscribing_raises_protocol_error(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    """The close reaches start() as a ProtocolError, not wrapped in the nurseries'
    exception groups."""
    real = websocket_connector(str(server.url))

    @attrs.define
    class Garbling:
        ws: Any
        sent: int = 0

        async def send_message(self, message: str) -> None:
            self.sent += 1
            await self.ws.send_message(message if self.sent == 1 else "not json")

        async def get_message(self) -> str | bytes:
            return await self.ws.get_message()  # type: ignore[no-any-return]

        async def ping(self) -> None:
            await self.ws.ping()

    @contextlib.asynccontextmanager
    async def garbling() -> AsyncIterator[WebSocket]:
        async with real() as ws:
            yield Garbling(ws)

    async def submit() -> None:
        async with open_client(server.url):
            await add.delay(1)  # the worker's "started" report is the frame garbled

    worker = TaskWorker(add, api_url=server.url, handle_signals=False, connect=garbling)
    nursery.start_soon(submit)
    with trio.fail_after(20), pytest.raises(ProtocolError, match="1008 invalid message"):
        await worker.start()


async def test_map_futures_are_awaited_as_a_whole(
    nursery: trio.Nursery, server: TaskServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start_worker(nursery, str(server.url), add)
    async with open_client(server.url):
        futs = await add.map([1, 2, 3])
        assert isinstance(futs, TaskRunFutureList) and len(futs) == 3
        assert await futs.result(timeout=20) == [2, 3, 4]
        assert [run.state for run in await futs.wait(timeout=20)] == [TaskRunState.COMPLETED] * 3
        assert pickle.loads(pickle.dumps(futs)) == futs
        assert await TaskRunFutureList[int]().result() == []
    url = str(server.url)

    def in_plain_code() -> list[int]:
        futures = add.map_sync([10, 20])
        assert [r.state for r in futures.wait_sync(timeout=20)] == [TaskRunState.COMPLETED] * 2
        return futures.result_sync(timeout=20)

    monkeypatch.setenv("TRIO_TASKWORKER_API_URL", url)
    assert await trio.to_thread.run_sync(in_plain_code) == [11, 21]


@task
async def length(data: bytes) -> int:
    return len(data)


async def test_deliveries_larger_than_a_mebibyte_reach_the_worker(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    """Forty runs with 50 kB inline parameters make a delivery frame of about 2.7 MB,
    past trio-websocket's default 1 MiB message limit."""
    worker = TaskWorker(length, api_url=server.url, handle_signals=False, limit=40)
    async with open_client(server.url):
        futs = await length.map([bytes(50_000)] * 40)
        await nursery.start(worker.start)
        assert await futs.result(timeout=20) == [50_000] * 40
        assert {run.attempt for run in await futs.wait()} == {1}
