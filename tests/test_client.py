"""The shared clients: one pooled client per trio run, one blocking client per thread."""

from __future__ import annotations

import datetime
import threading
import uuid

import httpx
import pytest
import trio

from trio_taskworker import (
    TaskRun,
    TaskRunNotFound,
    TaskRunState,
    TaskServer,
    TaskWorker,
    task,
)
from trio_taskworker._client import (
    COMPANIONS,
    ENDED_CACHE_RUNS,
    TaskWorkerClient,
    _Tracker,
    client_for,
    open_client,
    shared_client,
    sync_client,
)
from trio_taskworker._serialization import loads_payload


@task
async def double(x: int) -> int:
    return 2 * x


def test_one_shared_client_per_trio_run_closed_when_it_ends() -> None:
    seen: list[TaskWorkerClient] = []

    async def main() -> None:
        first = shared_client("http://127.0.0.1:1")
        assert shared_client("http://127.0.0.1:1/") is first  # the same server
        assert shared_client("http://127.0.0.1:2") is not first
        assert client_for("http://127.0.0.1:1") is first
        seen.append(first)

    trio.run(main)
    trio.run(main)
    first, second = seen
    assert first is not second  # each trio run has its own
    assert first._http.is_closed and second._http.is_closed  # closed as their runs ended


async def test_open_client_wins_inside_its_block() -> None:
    async with open_client("http://127.0.0.1:1") as opened:
        assert client_for() is opened
        assert client_for("http://127.0.0.1:1") is opened
        assert client_for("http://127.0.0.1:2") is shared_client("http://127.0.0.1:2")
    assert client_for("http://127.0.0.1:1") is shared_client("http://127.0.0.1:1")


def test_one_blocking_client_per_thread() -> None:
    here = sync_client("http://127.0.0.1:1")
    assert sync_client("http://127.0.0.1:1") is here
    there: list[object] = []
    thread = threading.Thread(target=lambda: there.append(sync_client("http://127.0.0.1:1")))
    thread.start()
    thread.join()
    (theirs,) = there
    assert theirs is not here
    assert theirs._http.is_closed  # type: ignore[attr-defined]  # closed as its thread ended
    assert not here._http.is_closed


def _run(run_id: uuid.UUID, state: TaskRunState = TaskRunState.COMPLETED) -> TaskRun:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    return TaskRun(
        id=run_id, task_key="k", task_name="k", state=state, created_at=now, scheduled_time=now,
        result=b"r",
    )  # fmt: skip


def test_the_tracker_asks_about_the_next_unfinished_runs_and_keeps_what_ended() -> None:
    tracker = _Tracker()
    ids = [uuid.uuid4() for _ in range(COMPANIONS + 5)]
    tracker.submitted(ids)
    asked = tracker.companions(ids[3])
    assert asked[0] == ids[3] and len(asked) == COMPANIONS and len(set(asked)) == COMPANIONS
    tracker.saw([_run(ids[0]), _run(ids[1])])
    assert ids[0] not in tracker.watched and tracker.companions(ids[5])[1] == ids[2]
    assert tracker.take(ids[1]) == _run(ids[1])
    assert tracker.take(ids[1]) is None  # handed out once
    assert tracker.ended_bytes == 1  # ids[0]'s one-byte result is still kept


def test_the_tracker_is_bounded() -> None:
    tracker = _Tracker()
    runs = [_run(uuid.uuid4()) for _ in range(ENDED_CACHE_RUNS + 3)]
    tracker.saw(runs)
    assert len(tracker.ended) == ENDED_CACHE_RUNS
    assert tracker.take(runs[0].id) is None and tracker.take(runs[-1].id) is not None


async def test_awaiting_results_one_by_one_costs_few_requests(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    worker = TaskWorker(double, api_url=server.url, handle_signals=False)
    await nursery.start(worker.start)
    url = str(server.url)
    requests: list[str] = []

    async def count(request: httpx.Request) -> None:
        requests.append(f"{request.method} {request.url.path}")

    async with httpx.AsyncClient(base_url=url, event_hooks={"request": [count]}) as http:
        client = TaskWorkerClient(url, http)
        ids = await client.submit(double.map_creates((range(100),), {}))
        await shared_client(url).wait_runs(ids, timeout=30)  # all ended before we ask
        requests.clear()
        runs = [await client.wait_run(run_id, timeout=30) for run_id in ids]
    assert [loads_payload(run.result) for run in runs] == [2 * i for i in range(100)]  # type: ignore[arg-type]
    assert requests == ["POST /runs/wait"] * len(requests)
    assert len(requests) <= -(-100 // (COMPANIONS - 1)) + 1  # not one per run
    with pytest.raises(TaskRunNotFound):  # a run it did not submit still gets a clear 404
        await shared_client(url).wait_run(uuid.uuid4(), timeout=1)
