"""The caller's side of issue 9: the guard on async entry points outside trio,
as_completed and wait (and their blocking twins), and the worker's traceback
as the cause of a re-raised exception.

Most tests run a real worker and the server's real HTTP handlers in this trio
run, joined by memory channels and ``httpx.ASGITransport``, on trio's autojump
clock: a run that sleeps ten seconds ends at once, in the right order. The
blocking twins need a socket, so their tests use the ``server`` fixture.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import threading
import traceback
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any, assert_type

import attrs
import httpx
import pytest
import trio
import trio.testing

from trio_taskworker import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    DoneAndNotDoneFutures,
    Task,
    TaskRunCancelled,
    TaskRunFailed,
    TaskRunFuture,
    TaskRunFutureList,
    TaskRunState,
    TaskServer,
    TaskWorker,
    TaskWorkerClient,
    as_completed,
    as_completed_sync,
    gather_results,
    gather_results_sync,
    open_client,
    task,
    wait,
    wait_sync,
)
from trio_taskworker._client import using_client
from trio_taskworker._exceptions import RemoteTraceback
from trio_taskworker._server import SQLiteStore
from trio_taskworker._server._app import build_app

from .fakes import InProcessServer

URL = "http://futures-api.invalid"


@task
async def add(x: int, y: int = 1) -> int:
    return x + y


# Task types an async function's result as its coroutine (Task[P, R] takes R
# from the function), so the typing checks below use sync tasks.
@task
def mul(x: int, y: int) -> int:
    return x * y


@task
def shout(text: str) -> str:
    return text.upper()


@task
async def nap(seconds: float) -> float:
    await trio.sleep(seconds)
    return seconds


@task
async def hold() -> None:
    await trio.sleep_forever()


@task
async def fails_after(seconds: float, message: str) -> None:
    await trio.sleep(seconds)
    raise LookupError(message)  # the raising line


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()  # cannot be pickled: the worker sends no exception


@task
async def fails_unpicklably() -> None:
    raise Unpicklable("cannot travel")


# --- an in-memory cluster on the autojump clock -------------------------------------


@attrs.define(eq=False)
class Cluster:
    srv: InProcessServer
    client: TaskWorkerClient
    nursery: trio.Nursery

    async def start_worker(self, *tasks: Task[Any, Any], limit: int = 10) -> TaskWorker:
        worker = TaskWorker(
            *tasks, limit=limit, api_url=URL, handle_signals=False, connect=self.srv.connect
        )
        with using_client(self.client):  # the worker reads and stores payloads through it
            await self.nursery.start(worker.start)
        return worker


@pytest.fixture
async def cluster(nursery: trio.Nursery, memory_store: SQLiteStore) -> AsyncIterator[Cluster]:
    """The real server handlers and store in memory; ``delay``/``result`` go to them.

    Tests that use it ask for ``autojump_clock`` too: pytest-trio takes the
    clock from the test's own parameters only.
    """
    srv = await InProcessServer.start(nursery, memory_store)
    transport = httpx.ASGITransport(app=build_app(srv.state))
    async with httpx.AsyncClient(transport=transport, base_url=URL) as http:
        client = TaskWorkerClient(URL, http)
        with using_client(client):
            yield Cluster(srv, client, nursery)


async def elapsed_since(start: float) -> float:
    return trio.current_time() - start


# --- the guard ------------------------------------------------------------------------

FUTURE = TaskRunFuture[int](uuid.uuid4(), URL)

OUTSIDE_TRIO: list[tuple[str, Callable[[], object]]] = [
    ("delay_sync", lambda: add.delay(1, 2)),
    ("apply_sync", lambda: add.apply_async((1,))),
    ("map_sync", lambda: add.map([1, 2])),
    ("wait_sync", lambda: FUTURE.wait()),
    ("result_sync", lambda: FUTURE.result()),
    ("cancel_sync", lambda: FUTURE.cancel()),
    ("result_sync", lambda: TaskRunFutureList([FUTURE]).result()),
    ("wait_sync", lambda: TaskRunFutureList([FUTURE]).wait()),
    ("gather_results_sync", lambda: gather_results([FUTURE])),
    ("as_completed_sync", lambda: as_completed([FUTURE])),
    ("wait_sync", lambda: wait([FUTURE])),
]


@pytest.mark.parametrize(("twin", "call"), OUTSIDE_TRIO, ids=[t for t, _ in OUTSIDE_TRIO])
def test_async_entry_points_raise_at_once_outside_trio(
    twin: str, call: Callable[[], object]
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=rf"needs a running trio run.* call {twin}\(\)"):
            call()
        gc.collect()  # an unawaited coroutine would warn as it is collected
    assert [str(w.message) for w in caught] == []


def test_guarded_methods_keep_their_name_signature_and_docs() -> None:
    assert Task.delay.__name__ == "delay"
    assert list(inspect.signature(TaskRunFuture.result).parameters) == ["self", "timeout"]
    assert "task's return value" in (TaskRunFuture.result.__doc__ or "")
    assert list(inspect.signature(wait).parameters) == ["futures", "timeout", "return_when"]


async def test_inside_trio_they_still_work_and_keep_precise_types(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(mul, shout)
    # assert_type is checked by mypy (run it over this file); at runtime it is a no-op.
    future = assert_type(await mul.delay(3, 4), TaskRunFuture[int])
    assert assert_type(await future.result(), int) == 12
    assert (await future.wait()).state is TaskRunState.COMPLETED
    futures = assert_type(await mul.map([1, 2], [10, 20]), TaskRunFutureList[int])
    assert assert_type(await futures.result(), list[int]) == [10, 40]
    assert [r.state for r in await futures.wait()] == [TaskRunState.COMPLETED] * 2
    assert await gather_results([future, *futures]) == [12, 10, 40]
    later = await mul.apply_async((5, 5))
    assert (await later.cancel()).state in {TaskRunState.CANCELLED, TaskRunState.COMPLETED}
    outcome = assert_type(await wait([future]), DoneAndNotDoneFutures[int])
    assert outcome.done == {future}
    assert [f async for f in as_completed([future])] == [future]
    # Futures of different tasks go together: a future only hands its value out.
    loud = await shout.delay("hi")
    mixed = assert_type(await wait([future, loud]), DoneAndNotDoneFutures[object])
    assert mixed.done == {future, loud}


# --- as_completed ---------------------------------------------------------------------


async def test_as_completed_yields_in_finishing_order(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(nap)
    slow, quick, middle = [await nap.delay(s) for s in (30.0, 10.0, 20.0)]
    start = trio.current_time()
    seen = []
    async for future in as_completed([slow, quick, middle]):
        seen.append((future, round(await elapsed_since(start))))
    # Each comes as its run ends, not when the slowest does.
    assert seen == [(quick, 10), (middle, 20), (slow, 30)]
    assert [f is g for (f, _), g in zip(seen, (quick, middle, slow), strict=True)] == [True] * 3


async def test_as_completed_ended_runs_first_each_future_once(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(nap)
    done = await nap.delay(0)
    await done.wait()
    later = await nap.delay(5)
    assert [f async for f in as_completed([later, done, later, done])] == [done, later]
    nothing: list[TaskRunFuture[float]] = []
    assert [f async for f in as_completed(nothing)] == []


async def test_as_completed_times_out_after_yielding_what_ended(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(nap, hold)
    quick, stuck = await nap.delay(1), await hold.delay()
    start = trio.current_time()
    seen = []
    with pytest.raises(TimeoutError, match="1 of 2 runs had not ended"):
        async for future in as_completed([stuck, quick], timeout=5):
            seen.append(future)
    assert seen == [quick]
    assert await elapsed_since(start) == pytest.approx(5, abs=0.5)


async def test_more_runs_than_one_request_watches(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    """Past a thousand runs one long-poll cannot watch them all: an end in a later
    thousand is still seen within about a second."""
    futures = list(await nap.map([60.0] * 2500))  # no worker: they stay queued
    last = futures[-1]
    start = trio.current_time()

    async def cancel_later() -> None:
        await trio.sleep(10)
        await last.cancel()

    cluster.nursery.start_soon(cancel_later)
    done, not_done = await wait(futures, return_when=FIRST_COMPLETED)
    assert done == {last} and len(not_done) == 2499
    assert 10 <= await elapsed_since(start) <= 11.5


# --- wait -----------------------------------------------------------------------------


async def test_wait_all_completed(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(nap)
    futures = [await nap.delay(s) for s in (3, 1, 2)]
    start = trio.current_time()
    outcome = await wait(futures)
    assert outcome == DoneAndNotDoneFutures(set(futures), set())
    assert await elapsed_since(start) == pytest.approx(3, abs=0.5)
    assert await wait([], return_when=ALL_COMPLETED) == (set(), set())


async def test_wait_first_completed_returns_with_one_done(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(nap)
    quick, slow, slower = [await nap.delay(s) for s in (1, 10, 20)]
    start = trio.current_time()
    done, not_done = await wait([slow, quick, slower], return_when=FIRST_COMPLETED)
    assert (done, not_done) == ({quick}, {slow, slower})
    assert await elapsed_since(start) == pytest.approx(1, abs=0.5)


async def test_wait_first_exception(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(nap, fails_after)
    ok = await nap.delay(1)
    bad = await fails_after.delay(3, "no")
    slow = await nap.delay(20)
    start = trio.current_time()
    done, not_done = await wait([ok, bad, slow], return_when=FIRST_EXCEPTION)
    # It looked past the first run that COMPLETED and stopped at the failure.
    assert (done, not_done) == ({ok, bad}, {slow})
    assert await elapsed_since(start) == pytest.approx(3, abs=0.5)
    # With no failure it is ALL_COMPLETED; a cancelled run counts as not COMPLETED.
    fine = [await nap.delay(s) for s in (1, 2)]
    assert await wait(fine, return_when=FIRST_EXCEPTION) == (set(fine), set())
    in_an_hour = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    queued = await fails_after.apply_async((1, "x"), scheduled_time=in_an_hour)
    await queued.cancel()
    assert (await wait([queued, slow], return_when=FIRST_EXCEPTION)).done == {queued}


async def test_wait_timeout_returns_what_ended(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(nap, hold)
    quick, stuck = await nap.delay(1), await hold.delay()
    start = trio.current_time()
    done, not_done = await wait([quick, stuck], timeout=5)  # does not raise
    assert (done, not_done) == ({quick}, {stuck})
    assert await elapsed_since(start) == pytest.approx(5, abs=0.5)
    # A zero timeout still asks once, so what has ended is reported as done.
    assert await wait([quick, stuck], timeout=0) == ({quick}, {stuck})


async def test_gather_results_still_times_out(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(nap, hold)
    quick, stuck = await nap.delay(1), await hold.delay()
    with pytest.raises(TimeoutError, match="1 of 2 runs had not ended"):
        await gather_results([quick, stuck], timeout=5)


async def test_bad_arguments_fail_before_anything_is_sent() -> None:
    here, there = TaskRunFuture[int](uuid.uuid4(), URL), TaskRunFuture[int](uuid.uuid4(), "x")
    # No server exists: a ValueError proves nothing was sent.
    for call in (
        lambda: as_completed([here, there]),
        lambda: as_completed_sync([here, there]),
        lambda: wait_sync([here, there]),
        lambda: gather_results_sync([here, there]),
    ):
        with pytest.raises(ValueError, match="needs futures from one server"):
            call()
    with pytest.raises(ValueError, match="needs futures from one server"):
        await wait([here, there])
    with pytest.raises(ValueError, match="needs futures from one server"):
        await gather_results([here, there])
    with pytest.raises(ValueError, match="return_when must be one of"):
        await wait([here], return_when="FIRST_ENDED")  # type: ignore[arg-type]


def test_futures_are_hashable_and_equal_by_run_and_server() -> None:
    run_id = uuid.uuid4()
    assert {TaskRunFuture[int](run_id, URL), TaskRunFuture[int](run_id, URL)} == {
        TaskRunFuture[int](run_id, URL)
    }
    assert TaskRunFuture[int](run_id, URL) != TaskRunFuture[int](run_id, "http://other")


# --- the blocking twins, against a real server on 127.0.0.1 ----------------------------


async def test_sync_twins(server: TaskServer) -> None:
    """No worker: runs end because they are cancelled, in an order the test chooses."""
    async with open_client(server.url):
        first, second, third, never = [await hold.delay() for _ in range(4)]
        for future in (second, first, third):
            await future.cancel()
    futures = [first, second, third, never]

    def blocking() -> None:
        seen = []
        with pytest.raises(TimeoutError, match="1 of 4 runs"):
            for future in as_completed_sync(futures, timeout=0):
                seen.append(future)
        assert seen == [second, first, third]  # the order they ended in
        assert wait_sync(futures, timeout=0) == ({first, second, third}, {never})
        assert wait_sync(futures, return_when=FIRST_COMPLETED).not_done == {never}
        assert wait_sync([never, first], return_when=FIRST_EXCEPTION).done == {first}
        assert list(as_completed_sync([])) == []
        with pytest.raises(TaskRunCancelled, match="was cancelled"):
            gather_results_sync([first])
        assert TaskRunFutureList([first]).wait_sync()[0].state is TaskRunState.CANCELLED
        never.cancel_sync()

    # In a thread: the server answers from this trio run, which must not block.
    await trio.to_thread.run_sync(blocking)


# --- the worker's traceback as the cause ----------------------------------------------


async def test_reraised_exception_has_the_worker_traceback_as_cause(
    autojump_clock: trio.testing.MockClock, cluster: Cluster
) -> None:
    await cluster.start_worker(fails_after, fails_unpicklably)
    future = await fails_after.delay(0, "bad input")
    with pytest.raises(LookupError) as info:
        await future.result()  # type: ignore[unused-coroutine]  # see mul
    exc = info.value
    assert type(exc) is LookupError and str(exc) == "bad input"  # unchanged
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fails_after" in cause.traceback
    assert "raise LookupError(message)  # the raising line" in cause.traceback
    printed = "".join(traceback.format_exception(exc))
    assert "The above exception was the direct cause" in printed
    assert printed.index("in fails_after") < printed.index("await future.result()")

    # When the exception itself could not travel, TaskRunFailed stands in, with the same cause.
    stand_in = await fails_unpicklably.delay()
    with pytest.raises(TaskRunFailed, match="Unpicklable: cannot travel") as failed:
        await stand_in.result()  # type: ignore[unused-coroutine]  # see mul
    assert isinstance(failed.value.__cause__, RemoteTraceback)
    assert "in fails_unpicklably" in failed.value.__cause__.traceback
