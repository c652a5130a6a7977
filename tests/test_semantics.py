"""The cancellation semantics table, row by row: a real worker and the real
server handler joined by an in-process transport, on trio's autojump clock."""

from __future__ import annotations

import contextlib
import datetime
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trio_taskworker import StopTaskWorker, TaskRun, TaskRunState, TaskWorker, task
from trio_taskworker._server import SQLiteStore

from .fakes import InProcessServer, now

S = TaskRunState
EPOCH_DT = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
observed: list[str] = []


@task
async def hold(name: str) -> str:
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        observed.append(f"{name} cancelled")
        raise
    finally:
        observed.append(f"{name} finally")


@task
async def nap(name: str, seconds: float) -> str:
    try:
        await trio.sleep(seconds)
    except trio.Cancelled:
        observed.append(f"{name} cancelled")
        raise
    return name


@task
def sync_hold(name: str) -> str:
    try:
        while True:
            trio.from_thread.check_cancelled()
            trio.from_thread.run(trio.sleep, 1)
    except trio.Cancelled:
        observed.append(f"{name} cancelled")
        raise


@task
async def quit_worker() -> None:
    raise StopTaskWorker("done here")


gates: list[trio.Event] = []


@task
async def gate() -> None:
    await gates[-1].wait()


async def occupy_the_slot(nursery: trio.Nursery, worker: TaskWorker) -> trio.Event:
    """Hold a slot with ``gate`` through the public ``execute_task_run`` until the event is set."""
    event = trio.Event()
    gates.append(event)
    run = TaskRun(
        id=uuid.uuid4(), task_key=gate.key, task_name=gate.name, state=S.PENDING,
        created_at=EPOCH_DT, scheduled_time=EPOCH_DT, attempt=1,
    )  # fmt: skip
    nursery.start_soon(worker.execute_task_run, run)
    await trio.testing.wait_all_tasks_blocked()
    assert worker.available_tasks == 0
    return event


@pytest.fixture(autouse=True)
def _clear() -> None:
    observed.clear()


@pytest.fixture
async def srv(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, memory_store: SQLiteStore
) -> InProcessServer:
    return await InProcessServer.start(nursery, memory_store)


async def submit(srv: InProcessServer, t: Any, *args: Any) -> uuid.UUID:
    create, payload = t.run_create(args, {})
    (run_id,) = await srv.state.store.create_runs(
        [attrs.evolve(create, parameters=payload)], now()
    )
    srv.state.dispatcher.wake()
    return run_id


async def run_of(srv: InProcessServer, run_id: uuid.UUID) -> TaskRun:
    await trio.testing.wait_all_tasks_blocked()
    (run,) = await srv.state.store.read_runs([run_id])
    return run


async def run_when(
    srv: InProcessServer, run_id: uuid.UUID, ready: Callable[[TaskRun], bool], step: float = 1.0
) -> TaskRun:
    """Poll on the virtual clock until ``ready(run)``; sync tasks live in threads,
    so quiescence alone does not say when they have got somewhere."""
    with trio.fail_after(400):
        while not ready(run := await run_of(srv, run_id)):  # noqa: ASYNC110
            await trio.sleep(step)
    return run


async def start(nursery: trio.Nursery, srv: InProcessServer, *tasks: Any, **kw: Any) -> TaskWorker:
    worker = TaskWorker(
        *tasks, api_url="http://in-process", handle_signals=False, connect=srv.connect, **kw
    )
    await nursery.start(worker.start)
    return worker


# --- caller cancel -------------------------------------------------------------------


async def test_caller_cancel_queued(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, hold, limit=1)
    first = await submit(srv, hold, "first")
    queued = await submit(srv, hold, "queued")
    assert (await run_of(srv, queued)).state is S.SCHEDULED
    assert (await srv.state.cancel(queued)).state is S.CANCELLED
    await srv.state.cancel(first)
    assert (await run_of(srv, first)).state is S.CANCELLED
    # The queued run never started, even with the slot free again.
    assert (await run_of(srv, queued)).state is S.CANCELLED
    assert observed == ["first cancelled", "first finally"]


async def test_caller_cancel_leased_not_started(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    worker = await start(nursery, srv, hold, gate, limit=1)
    # Hold the only slot from outside, so a delivered run waits to start.
    blocker = await occupy_the_slot(nursery, worker)
    run_id = await submit(srv, hold, "leased")
    assert (await run_of(srv, run_id)).state is S.PENDING
    assert (await srv.state.cancel(run_id)).state is S.CANCELLED
    await trio.testing.wait_all_tasks_blocked()  # the worker has heard of the cancel
    blocker.set()
    assert (await run_of(srv, run_id)).state is S.CANCELLED
    assert observed == []  # it never started
    assert worker.current_tasks == 0


async def test_caller_cancel_running_async(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, hold)
    run_id = await submit(srv, hold, "a")
    assert (await run_of(srv, run_id)).state is S.RUNNING
    began = trio.current_time()
    assert (await srv.state.cancel(run_id)).state is S.CANCELLING
    run = await run_of(srv, run_id)
    assert run.state is S.CANCELLED and run.retry_count == 0 and run.redeliveries == 0
    assert trio.current_time() - began < 1
    assert observed == ["a cancelled", "a finally"]


async def test_caller_cancel_running_sync(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, sync_hold)
    run_id = await submit(srv, sync_hold, "s")
    await run_when(srv, run_id, lambda r: r.state is S.RUNNING)
    await srv.state.cancel(run_id)
    await run_when(srv, run_id, lambda r: r.state is S.CANCELLED)
    assert observed == ["s cancelled"]


# --- stop, signals, StopTaskWorker ---------------------------------------------------


async def test_stop_gives_grace_then_hands_back(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    worker = await start(nursery, srv, nap, limit=2, shutdown_timeout=10)
    quick = await submit(srv, nap, "quick", 5)
    slow = await submit(srv, nap, "slow", 3600)
    queued = await submit(srv, nap, "queued", 1)
    assert (await run_of(srv, slow)).state is S.RUNNING
    began = trio.current_time()
    await worker.stop()
    assert trio.current_time() - began == pytest.approx(10, abs=0.1)
    assert (await run_of(srv, quick)).state is S.COMPLETED  # finished within the grace
    handed = await run_of(srv, slow)
    assert (handed.state, handed.redeliveries) == (S.SCHEDULED, 0)  # back, not counted
    assert (await run_of(srv, queued)).state is S.SCHEDULED  # never taken
    assert observed == ["slow cancelled"]
    # Another worker finishes the handed-back run and the queued one.
    await start(nursery, srv, nap, limit=2)
    await trio.sleep(2)
    assert (await run_of(srv, queued)).state is S.COMPLETED
    assert (await run_of(srv, slow)).state is S.RUNNING


async def test_second_signal_ends_the_grace(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    worker = await start(nursery, srv, hold, shutdown_timeout=3600)
    run_id = await submit(srv, hold, "h")
    assert (await run_of(srv, run_id)).state is S.RUNNING
    worker.handle_sigterm(15, None)
    await trio.testing.wait_all_tasks_blocked()
    assert worker.stopping and (await run_of(srv, run_id)).state is S.RUNNING
    began = trio.current_time()
    worker.handle_sigterm(15, None)  # a second signal
    await worker.stop()  # returns once the worker has stopped
    assert trio.current_time() - began < 1
    run = await run_of(srv, run_id)
    assert (run.state, run.redeliveries) == (S.SCHEDULED, 0)
    assert observed == ["h cancelled", "h finally"]


async def test_stop_task_worker_ends_its_run_and_no_other_worker_takes_it(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    worker = TaskWorker(
        quit_worker, nap, api_url="http://in-process", handle_signals=False,
        shutdown_timeout=10, connect=srv.connect,
    )  # fmt: skip
    other = await submit(srv, nap, "other", 3)
    quitter = await submit(srv, quit_worker)
    with trio.fail_after(60):
        await worker.start()  # returns by itself
    assert worker.stopping  # the task's StopTaskWorker stopped the worker
    run = await run_of(srv, quitter)
    assert (run.state, run.attempt, run.redeliveries) == (S.CANCELLED, 1, 0)
    assert "StopTaskWorker (done here)" in (run.message or "")
    assert (await run_of(srv, other)).state is S.COMPLETED  # the others get the grace
    # Not a poison pill: the next worker serving the task is not stopped by it.
    second = await start(nursery, srv, quit_worker)
    await trio.sleep(60)
    assert not second.stopping
    assert (await run_of(srv, quitter)).attempt == 1


# --- lost connection, lease ----------------------------------------------------------


async def test_lost_connection_redelivers_and_cancels_the_orphan(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    worker = await start(nursery, srv, hold)
    run_id = await submit(srv, hold, "r")
    assert (await run_of(srv, run_id)).state is S.RUNNING
    srv.cut_connections()
    run = await run_of(srv, run_id)
    # The worker reconnected and got the run again as attempt 2.
    assert (run.state, run.attempt, run.redeliveries) == (S.RUNNING, 2, 1)
    assert observed == ["r cancelled", "r finally"]  # the orphaned attempt 1
    assert worker.current_tasks == 1


async def test_redeliveries_are_bounded(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    limited = task(max_redeliveries=1)(hold.fn)
    limited.key = hold.key
    await start(nursery, srv, hold)
    create, payload = limited.run_create(("x",), {})
    (run_id,) = await srv.state.store.create_runs(
        [attrs.evolve(create, parameters=payload)], now()
    )
    srv.state.dispatcher.wake()
    for _ in range(2):
        assert (await run_of(srv, run_id)).state is S.RUNNING
        srv.cut_connections()
    run = await run_of(srv, run_id)
    assert run.state is S.CRASHED and "the limit is 1" in (run.message or "")


async def test_heartbeats_keep_a_long_run_leased(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, memory_store: SQLiteStore
) -> None:
    srv = await InProcessServer.start(nursery, memory_store, lease_seconds=30)
    await start(nursery, srv, nap)
    run_id = await submit(srv, nap, "long", 300)  # ten leases long
    run = await run_when(srv, run_id, lambda r: r.state is S.COMPLETED, step=10)
    assert (run.attempt, run.redeliveries) == (1, 0)


async def test_stop_hands_back_leased_runs(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    worker = await start(nursery, srv, hold, gate, limit=1)
    blocker = await occupy_the_slot(nursery, worker)  # the delivered run must wait
    run_id = await submit(srv, hold, "leased")
    assert (await run_of(srv, run_id)).state is S.PENDING
    async with trio.open_nursery() as inner:
        inner.start_soon(worker.stop)
        await trio.testing.wait_all_tasks_blocked()
        blocker.set()
    run = await run_of(srv, run_id)
    assert (run.state, run.redeliveries) == (S.SCHEDULED, 0)
    assert observed == []


async def test_stop_cancels_a_sync_run_after_the_grace(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    worker = await start(nursery, srv, sync_hold, shutdown_timeout=5)
    run_id = await submit(srv, sync_hold, "s")
    await run_when(srv, run_id, lambda r: r.state is S.RUNNING)
    await worker.stop()
    run = await run_of(srv, run_id)
    assert (run.state, run.redeliveries) == (S.SCHEDULED, 0)
    assert observed == ["s cancelled"]


async def test_lost_connection_cancels_a_sync_orphan(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, sync_hold)
    run_id = await submit(srv, sync_hold, "s")
    await run_when(srv, run_id, lambda r: r.state is S.RUNNING)
    srv.cut_connections()
    run = await run_when(srv, run_id, lambda r: r.attempt >= 2 and "s cancelled" in observed)
    assert run.redeliveries == 1 and run.state is S.RUNNING


async def test_queued_runs_are_untouched_by_worker_events(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    """Lost connections, second signals and StopTaskWorker never touch a queued run."""
    worker = await start(nursery, srv, hold, limit=1)
    await submit(srv, hold, "busy")
    queued = await submit(srv, nap, "queued", 1)  # waits for a worker that serves nap
    srv.cut_connections()
    assert (await run_of(srv, queued)).state is S.SCHEDULED
    worker.handle_sigterm(15, None)
    await trio.testing.wait_all_tasks_blocked()
    worker.handle_sigterm(15, None)  # a second signal: no grace
    await worker.stop()
    run = await run_of(srv, queued)
    assert (run.state, run.attempt, run.redeliveries) == (S.SCHEDULED, 0, 0)


@task
def stubborn(name: str) -> str:
    """A sync task that never checks for cancellation."""
    time.sleep(0.2)  # real time, in its thread; the test's clock is virtual
    observed.append(f"{name} returned")
    return name


async def test_a_stopping_worker_does_not_reconnect(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    """Connection lost while stopping, with a sync run still in flight: the server
    requeued that run already, so the worker waits for its thread without dialling
    the server again (it used to spin on reconnect attempts until the thread ended)."""
    attempts = 0

    @contextlib.asynccontextmanager
    async def counting() -> AsyncIterator[Any]:
        nonlocal attempts
        attempts += 1
        async with srv.connect() as ws:
            yield ws

    worker = TaskWorker(
        stubborn, api_url="http://in-process", handle_signals=False, connect=counting
    )
    await nursery.start(worker.start)
    run_id = await submit(srv, stubborn, "s")
    await run_when(srv, run_id, lambda r: r.state is S.RUNNING)
    worker.handle_sigterm(15, None)
    await trio.testing.wait_all_tasks_blocked()
    srv.cut_connections()
    await worker.stop()  # virtual time races ahead while the thread sleeps: no fail_after
    assert attempts == 1
    assert observed == ["s returned"]
    run = await run_of(srv, run_id)
    assert (run.state, run.redeliveries) == (S.SCHEDULED, 1)  # requeued by the server
