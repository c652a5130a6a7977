"""Waits share their requests: consecutive and concurrent ``result()`` calls.

A real worker and the server's real handlers in this trio run, joined in
memory (``open_test_cluster``), on trio's autojump clock. Each test counts
the ``POST /runs/wait`` requests the caller's client sends.
"""

from __future__ import annotations

import datetime
import uuid

import attrs
import httpx
import pytest
import trio

from trio_taskworker import (
    ALL_COMPLETED,
    TaskRunFuture,
    TaskRunNotFound,
    gather_results,
    task,
    wait,
)
from trio_taskworker._client import MAX_SEEN_BYTES, MAX_UNSEEN_RUNS, _Ends
from trio_taskworker._models import TaskRun
from trio_taskworker._states import TaskRunState
from trio_taskworker.testing import TaskCluster, open_test_cluster


@task
async def slow_square(x: int) -> int:
    await trio.sleep(1 + x % 3)
    return x * x


@attrs.define
class Requests:
    """What the client sent: waits, and the most wait requests in flight at once."""

    waits: int = 0
    in_flight: int = 0
    most_in_flight: int = 0

    async def on_request(self, request: httpx.Request) -> None:
        if request.url.path.startswith("/runs/") and request.url.path.endswith("wait"):
            self.waits += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    async def on_response(self, response: httpx.Response) -> None:
        path = response.request.url.path
        if path.startswith("/runs/") and path.endswith("wait"):
            self.in_flight -= 1


def counted(cluster: TaskCluster) -> Requests:
    requests = Requests()
    http = cluster.client._http
    http.event_hooks = {"request": [requests.on_request], "response": [requests.on_response]}
    return requests


async def all_ended(cluster: TaskCluster, ids: list[uuid.UUID]) -> None:
    """Let (virtual) time pass until the runs have ended, without the client."""
    await trio.sleep(60)
    runs = await cluster.server.state.store.read_runs(ids)
    assert len(runs) == len(ids) and all(r.state.is_terminal for r in runs)


async def test_results_asked_one_by_one_after_the_runs_ended_cost_one_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(slow_square, limit=100) as cluster:
        futs = await slow_square.map(range(200))
        await all_ended(cluster, [f.task_run_id for f in futs])
        requests = counted(cluster)
        assert [await f.result() for f in futs] == [x * x for x in range(200)]
        # The first request names the first run and 999 others: every run ended
        # is in its answer, and the next 199 calls find theirs here.
        assert requests.waits == 1


async def test_results_asked_one_by_one_while_runs_end_share_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(slow_square, limit=20) as cluster:
        futs = await slow_square.map(range(200))
        requests = counted(cluster)
        assert [await f.result() for f in futs] == [x * x for x in range(200)]
        # Runs end in ten waves (limit 20); each answer brings a wave.
        assert requests.waits < 40


async def test_concurrent_waits_keep_one_request_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(slow_square, limit=10) as cluster:
        futs = await slow_square.map(range(60))
        requests = counted(cluster)
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await futs[i].result()

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(one, i)
        assert results == {i: i * i for i in range(60)}
        assert requests.most_in_flight == 1
        assert requests.waits < 60


async def test_a_wait_that_times_out_returns_the_run_as_it_is_and_others_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(slow_square, limit=1) as cluster:
        first, second = await slow_square.map([2, 0])  # 3 s, then 1 s, one at a time
        early = await second.wait(timeout=1)
        assert early.state is TaskRunState.SCHEDULED
        assert await first.result() == 4
        assert await second.result() == 0
        assert cluster.client._ends.wanted == {}


async def test_a_run_that_is_gone_does_not_stop_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(slow_square) as cluster:
        # A run submitted here that retention has since deleted: asked about
        # with the others, it makes the server answer 404.
        cluster.client._ends.submitted([uuid.uuid4()])
        fut = await slow_square.delay(3)
        assert await fut.result() == 9
        assert cluster.client._ends.unseen == {}


def ended_run(size: int) -> TaskRun:
    at = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    return TaskRun(
        id=uuid.uuid4(),
        task_key="k",
        task_name="k",
        state=TaskRunState.COMPLETED,
        created_at=at,
        scheduled_time=at,
        result=b"x" * size,
    )


def test_what_is_kept_is_bounded() -> None:
    ends = _Ends()
    big = [ended_run(MAX_SEEN_BYTES // 4) for _ in range(6)]
    ends.ended(big)
    # The oldest were forgotten to stay under the bound; the newest are kept.
    assert ends.seen_bytes <= MAX_SEEN_BYTES
    assert list(ends.seen) == [run.id for run in big[-4:]]
    assert ends.take(big[0].id) is None
    assert ends.take(big[-1].id) == big[-1]
    ends.submitted([uuid.uuid4() for _ in range(20_000)])
    assert len(ends.unseen) == MAX_UNSEEN_RUNS


async def test_a_wait_for_a_run_the_server_does_not_know_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(slow_square) as cluster:
        await slow_square.map(range(3))  # others to ask about alongside
        with pytest.raises(TaskRunNotFound):
            await TaskRunFuture(uuid.uuid4(), cluster.api_url).result()


async def test_runs_whose_end_was_seen_elsewhere_are_not_asked_about_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(slow_square) as cluster:
        futs = await slow_square.map(range(20))
        assert await gather_results(futs) == [x * x for x in range(20)]
        ends = cluster.client._ends
        assert ends.unseen == {} and ends.seen == {}
        more = await slow_square.map(range(5))
        done, _ = await wait(more, return_when=ALL_COMPLETED)
        assert len(done) == 5 and ends.unseen == {}
