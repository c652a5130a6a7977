"""trio_taskworker.testing: the in-memory cluster, its pytest fixture, and a user's view
of both (a pytest subprocess that only has the installed package)."""

from __future__ import annotations

import os
import re
import textwrap
import time

import pytest
import trio
import trio.testing

from trio_taskworker import (
    ServerUnavailable,
    TaskRunCancelled,
    TaskRunState,
    TaskRunTimedOut,
    gather_results,
    task,
)
from trio_taskworker._client import client_for
from trio_taskworker.testing import TEST_CLUSTER_URL, TaskCluster, open_test_cluster

pytest_plugins = ["pytester"]

S = TaskRunState
calls: list[str] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    calls.clear()


@task
async def add(x: int, y: int = 1) -> int:
    return x + y


@task
def multiply(x: int, y: int) -> int:
    return x * y


@task
async def boom(message: str) -> None:
    raise ValueError(message)


@task(retries=1, retry_delay_seconds=3600)
async def flaky(x: int) -> int:
    calls.append(f"flaky {x}")
    if len(calls) == 1:
        raise RuntimeError("first attempt fails")
    return x * 2


@task(timeout_seconds=5)
async def too_slow() -> None:
    await trio.sleep(60)


@task
async def hold() -> None:
    calls.append("started")
    try:
        await trio.sleep_forever()
    finally:
        calls.append("finally")


@task
async def reverse(data: bytes) -> bytes:
    return data[::-1]


@task
async def add_later(x: int) -> int:
    # A task that submits another run and awaits it: the worker's runs see the
    # cluster too.
    return await (await add.delay(x, y=100)).result()


async def test_value_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    async with open_test_cluster(add) as cluster:
        fut = await add.delay(1, y=2)
        assert fut.api_url == TEST_CLUSTER_URL == cluster.api_url
        assert await fut.result() == 3
        (run,) = await cluster.runs(add)
        assert (run.id, run.state, run.attempt) == (fut.task_run_id, S.COMPLETED, 1)


async def test_failed_run_reraises_the_task_exception(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(boom):
        fut = await boom.delay("no luck")
        with pytest.raises(ValueError, match="no luck"):
            await fut.result()
        assert (await fut.wait()).state is S.FAILED


async def test_one_hour_retry_takes_no_real_time(autojump_clock: trio.testing.MockClock) -> None:
    began, virtual_began = time.perf_counter(), trio.current_time()
    async with open_test_cluster(flaky) as cluster:
        fut = await flaky.delay(21)
        assert await fut.result() == 42
        run = await fut.wait()
    real, virtual = time.perf_counter() - began, trio.current_time() - virtual_began
    assert calls == ["flaky 21", "flaky 21"]
    assert (run.state, run.attempt, run.retry_count) == (S.COMPLETED, 2, 1)
    assert run.finished_at is not None and run.started_at is not None
    assert (run.finished_at - run.created_at).total_seconds() >= 3600
    assert virtual >= 3600
    assert real < 5, f"a one-hour retry took {real:.2f} s of real time"
    assert cluster.worker.status()["finished"]


async def test_timeout_fails_on_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    async with open_test_cluster(too_slow):
        began = trio.current_time()
        fut = await too_slow.delay()
        with pytest.raises(TaskRunTimedOut):
            await fut.result()
        assert 5 <= trio.current_time() - began < 60


async def test_cancel_a_long_run(autojump_clock: trio.testing.MockClock) -> None:
    async with open_test_cluster(hold) as cluster:
        fut = await hold.delay()
        await trio.sleep(1)
        assert (await fut.wait(timeout=0)).state is S.RUNNING
        assert cluster.worker.current_tasks == 1
        await fut.cancel()
        with pytest.raises(TaskRunCancelled):
            await fut.result()
        assert calls == ["started", "finally"]
        assert cluster.worker.current_tasks == 0


async def test_map_and_gather_with_sync_and_async_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(add, multiply, limit=2) as cluster:
        sums = await add.map([1, 2, 3], [10, 20, 30])
        products = await multiply.map([1, 2, 3], [10, 20, 30])
        assert await sums.result() == [11, 22, 33]
        assert await gather_results(list(products)) == [10, 40, 90]
        assert len(await cluster.runs(state=S.COMPLETED)) == 6


async def test_large_parameter_and_result_go_through_blobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    data = os.urandom(200 * 1024)
    async with open_test_cluster(reverse):
        fut = await reverse.delay(data)
        assert await fut.result() == data[::-1]
        run = await fut.wait()
        assert run.parameters is None and run.parameters_ref is not None
        assert run.result is None and run.result_ref is not None


async def test_runs_of_a_task_reach_the_cluster(autojump_clock: trio.testing.MockClock) -> None:
    async with open_test_cluster(add, add_later) as cluster:
        assert await (await add_later.delay(1)).result() == 101
        assert [r.task_key for r in await cluster.runs()] == [add_later.key, add.key]


async def test_start_worker_later_and_several_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster() as cluster:
        with pytest.raises(RuntimeError, match="no worker"):
            _ = cluster.worker
        fut = await add.delay(1)
        await trio.sleep(60)
        assert (await fut.wait(timeout=0)).state is S.SCHEDULED  # nobody serves add yet
        first = await cluster.start_worker(add, limit=1)
        second = await cluster.start_worker(multiply)
        assert await fut.result() == 2
        assert await (await multiply.delay(3, 4)).result() == 12
        assert cluster.workers == (first, second) and cluster.worker is first
        assert first.limit == 1
    assert not first.started and not second.started  # stopped with the block


async def test_the_block_stops_workers_gracefully(autojump_clock: trio.testing.MockClock) -> None:
    async with open_test_cluster(hold) as cluster:
        await hold.delay()
        await trio.sleep(1)
        began = trio.current_time()
    # The run in flight got the worker's grace, then was cancelled.
    assert trio.current_time() - began == pytest.approx(5.0, abs=1)
    assert calls == ["started", "finally"]
    assert not cluster.worker.started


async def test_an_error_in_the_block_comes_out_unwrapped() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with open_test_cluster(hold):
            await hold.delay()
            raise KeyError("mine")


@task
def submits_blocking(x: int) -> str:
    try:
        add.delay_sync(x)
    except ServerUnavailable as exc:
        return str(exc)
    return "reached a server"


async def test_a_sync_task_in_the_cluster_cannot_reach_a_real_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(add, submits_blocking):
        # Its thread inherits the cluster's binding, so the twin goes to the
        # cluster's unresolvable URL, not to TRIO_TASKWORKER_API_URL.
        message = await (await submits_blocking.delay(1)).result()
    assert TEST_CLUSTER_URL in message


async def test_outside_the_block_nothing_is_bound() -> None:
    before = os.environ.get("TRIO_TASKWORKER_API_URL")
    async with open_test_cluster(add) as cluster:
        assert client_for() is cluster.client
        fut = await add.delay(1)
    assert client_for() is not cluster.client
    assert os.environ.get("TRIO_TASKWORKER_API_URL") == before  # the process's is untouched
    with pytest.raises(ServerUnavailable, match=re.escape(TEST_CLUSTER_URL)):
        await fut.result()


async def test_sync_twins_refuse_to_block_the_clusters_thread() -> None:
    async with open_test_cluster(add):
        # A blocking call would stall the trio thread the cluster runs on.
        with pytest.raises(RuntimeError, match="this thread runs trio"):
            add.delay_sync(1)
        fut = await add.delay(1)
        with pytest.raises(RuntimeError, match="await the async method"):
            fut.result_sync()
        assert await fut.result() == 2
        # From another thread, a twin goes to the URL it is given: the cluster's
        # is not a real address, so nothing leaves the process.
        with pytest.raises(ServerUnavailable, match=re.escape(TEST_CLUSTER_URL)):
            await trio.to_thread.run_sync(fut.result_sync)


async def test_real_clock_works_too() -> None:
    async with open_test_cluster(add, multiply):
        with trio.fail_after(10):
            assert await (await multiply.delay(6, 7)).result() == 42


# --- the pytest fixture ------------------------------------------------------------------


async def test_fixture_gives_a_cluster_without_a_worker(
    autojump_clock: trio.testing.MockClock, task_cluster: TaskCluster
) -> None:
    assert task_cluster.workers == ()
    await task_cluster.start_worker(flaky)
    assert await (await flaky.delay(5)).result() == 10
    (run,) = await task_cluster.runs(flaky)
    assert run.retry_count == 1


USER_TESTS = """
import time

import trio
from trio_taskworker import TaskRunState, task

seen = []


@task(retries=1, retry_delay_seconds=3600)
async def flaky(x: int) -> int:
    seen.append(x)
    if len(seen) == 1:
        raise RuntimeError("first attempt fails")
    return x * 2


async def test_retry_in_an_hour(task_cluster, autojump_clock):
    began = time.perf_counter()
    await task_cluster.start_worker(flaky)
    fut = await flaky.delay(21)
    assert await fut.result() == 42
    run = await fut.wait()
    assert (run.state, run.retry_count) == (TaskRunState.COMPLETED, 1)
    assert trio.current_time() >= 3600
    assert time.perf_counter() - began < 5


def test_a_plain_test_is_untouched():
    assert seen == [21, 21]
"""


def test_a_user_gets_the_fixture_from_the_installed_package(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        textwrap.dedent(
            """
            [pytest]
            trio_mode = true
            filterwarnings = error
            """
        )
    )
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_retry_in_an_hour PASSED*"])


def test_the_plugin_leaves_sessions_without_pytest_trio_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:trio", "-W", "error"
    )
    result.assert_outcomes(passed=1)
    listed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:trio", "--fixtures")
    listed.stdout.fnmatch_lines(["task_cluster -- *trio_taskworker*pytest_plugin.py*"])
