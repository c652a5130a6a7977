"""End to end, retention: a real server process started with ``--retention``
forgets finished runs and their blobs, keeps unfinished ones, and its SQLite
file shrinks."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_taskworker import TaskRunState, gather_results, open_client

from . import e2e_tasks as t
from .conftest import Proc, start_server, start_worker
from .helpers import wait_for_runs

pytestmark = pytest.mark.e2e

#: Pickled, this is well over the inline limit: parameters and results become blobs.
BIG = "x" * 300_000
#: ``mul(BIG, 2)`` repeats the string: a blob of parameters and a bigger one of result.
repeat: Any = t.mul


def file_size(data_dir: Path) -> int:
    """The database file and its write-ahead log, in bytes."""
    return sum(
        path.stat().st_size
        for path in data_dir.glob("runs.sqlite3*")
        if path.name.endswith(("runs.sqlite3", "-wal"))
    )


async def poll(predicate: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Ask the server process again and again until ``predicate()`` is true; fail
    after ``timeout`` (real time: another process does the work)."""
    with trio.fail_after(timeout):
        while not await predicate():  # noqa: ASYNC110 - the condition lives in another process
            await trio.sleep(0.05)


async def shrunk_below(data_dir: Path, size: int) -> bool:
    return file_size(data_dir) < size


async def test_finished_runs_and_their_blobs_go_unfinished_ones_stay_and_the_file_shrinks(
    tmp_path: Path, procs: list[Proc]
) -> None:
    data = tmp_path / "data"
    gate = tmp_path / "gate"
    # A server that keeps everything (as before retention existed) fills the file.
    keeper = start_server(data, "--retention", "forever", log_name="server1.log")
    procs.append(keeper)
    url = keeper.url
    port = int(url.rsplit(":", 1)[1])
    worker = start_worker(
        url, "tests.e2e_tasks:mul", "tests.e2e_tasks:wait_for_file", log=tmp_path / "worker.log"
    )
    procs.append(worker)
    async with open_client(url) as client:
        done = await repeat.map([BIG] * 30, [2] * 30)
        assert await gather_results(done, timeout=60) == [BIG * 2] * 30
        finished = [await client.read_run(f.task_run_id) for f in done]
        blobs = [ref for run in finished for ref in (run.parameters_ref, run.result_ref)]
        assert all(blobs)
        queued = await t.explode.delay(BIG)  # no worker serves it: it stays SCHEDULED
        running = await t.wait_for_file.delay(str(gate))  # runs until the gate opens
        await wait_for_runs(client, [running], TaskRunState.RUNNING)
        (queued_blob,) = [(await client.read_run(queued.task_run_id)).parameters_ref]
        assert queued_blob is not None
    keeper.stop()
    before = file_size(data)
    assert before > 20_000_000

    # The same file, served with a retention of a second.
    server = start_server(data, "--retention", "1s", port=port, log_name="server2.log")
    procs.append(server)
    async with httpx.AsyncClient(base_url=url) as http:

        async def status(path: str) -> int:
            return (await http.get(path)).status_code

        async def all_gone() -> bool:
            paths = [f"/runs/{f.task_run_id}" for f in done] + [f"/blobs/{b}" for b in blobs]
            return all([await status(path) == 404 for path in paths])

        await poll(all_gone)
        await poll(lambda: shrunk_below(data, before // 10))
        # Unfinished runs stay, with their blobs.
        assert (await http.get(f"/runs/{queued.task_run_id}")).json()["state"] == "SCHEDULED"
        assert await status(f"/blobs/{queued_blob}") == 200
        # The worker reconnected; the run that was running was redelivered and runs again.
        await poll(lambda: state_is(http, running.task_run_id, "RUNNING"))

        # While it serves, a run that finishes goes a second or two later.
        async with open_client(url) as client:
            fresh = await repeat.delay(BIG, 3)
            # The snapshot the wait answers with, then its result blob: within
            # milliseconds of the end, well inside the second it is kept.
            run = await fresh.wait(timeout=30)
            assert await client.load_result(run) == BIG * 3
        assert run.parameters_ref is not None and run.result_ref is not None

        async def fresh_gone() -> bool:
            return (
                await status(f"/runs/{fresh.task_run_id}") == 404
                and await status(f"/blobs/{run.result_ref}") == 404
                and await status(f"/blobs/{run.parameters_ref}") == 404
            )

        await poll(fresh_gone)
        assert (await http.get(f"/runs/{running.task_run_id}")).json()["state"] == "RUNNING"
        assert await status(f"/blobs/{queued_blob}") == 200
    server.stop()
    log = server.output()
    assert "converting" in log and "to incremental vacuum, once" in log
    assert "retention: deleted" in log


async def state_is(http: httpx.AsyncClient, run_id: uuid.UUID, state: str) -> bool:
    return bool((await http.get(f"/runs/{run_id}")).json()["state"] == state)
