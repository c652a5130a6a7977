"""Two server replicas on one PostgreSQL database, in this process.

They share nothing but the database: what one does reaches the other through
LISTEN/NOTIFY, and through each replica's poll when a notification is lost.
The end-to-end tests with server processes (SIGKILL, failover) are in
test_e2e_replicas.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from trio_taskworker import TaskRunState, TaskServer, TaskWorker, open_client, task
from trio_taskworker._server._postgres import PostgresBus

from .helpers import wait_for_runs, wait_until
from .test_store_contract import postgres_database

S = TaskRunState


@pytest.fixture
def database_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@task
async def add(x: int, y: int) -> int:
    return x + y


@task
async def hold(marker: str) -> None:
    """Run until cancelled; ``finally:`` leaves a marker file."""
    try:
        await trio.sleep_forever()
    finally:
        Path(marker).write_text("finally ran")  # noqa: ASYNC240 - must not checkpoint here


@contextlib.asynccontextmanager
async def replicas(
    nursery: trio.Nursery, url: str, tmp_path: Path, n: int = 2, **kwargs: float
) -> AsyncIterator[list[TaskServer]]:
    servers = [
        TaskServer(port=0, database_url=url, data_dir=tmp_path / f"unused{i}", **kwargs)
        for i in range(n)
    ]
    for server in servers:
        await nursery.start(server.run)
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def test_a_run_submitted_to_one_replica_runs_through_the_other(
    nursery: trio.Nursery, database_url: str, tmp_path: Path
) -> None:
    # No poll within the test: only the notifications can tell B and A.
    async with replicas(nursery, database_url, tmp_path, replica_poll_seconds=3600) as (a, b):
        worker = TaskWorker(add, api_url=str(b.url), handle_signals=False)
        await nursery.start(worker.start)
        async with open_client(a.url):
            futs = await add.map([1, 2, 3], [10, 20, 30])
            # A waits on A for runs that end through B: the notification answers.
            assert [await f.result(timeout=20) for f in futs] == [11, 22, 33]
        await worker.stop()


async def test_a_cancel_on_one_replica_reaches_the_worker_on_the_other(
    nursery: trio.Nursery, database_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    async with replicas(nursery, database_url, tmp_path, replica_poll_seconds=3600) as (a, b):
        worker = TaskWorker(hold, api_url=str(b.url), handle_signals=False)
        await nursery.start(worker.start)
        async with open_client(a.url) as client:
            fut = await hold.delay(str(marker))
            await wait_for_runs(client, [fut], S.RUNNING)
            await fut.cancel()
            run = await fut.wait(timeout=20)
            assert run.state is S.CANCELLED
        assert marker.read_text() == "finally ran"
        await worker.stop()


async def test_what_a_lost_notification_carried_reaches_the_other_replica_by_its_poll(
    nursery: trio.Nursery, database_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    async with replicas(nursery, database_url, tmp_path, replica_poll_seconds=0.2) as (a, b):
        for server in (a, b):
            state = server.state
            assert state is not None and isinstance(state.bus, PostgresBus)
            state.bus.hearer = None  # deaf: only the polls are left
        worker = TaskWorker(add, hold, api_url=str(b.url), handle_signals=False)
        await nursery.start(worker.start)
        async with open_client(a.url) as client:
            assert await (await add.delay(2, 3)).result(timeout=20) == 5
            fut = await hold.delay(str(marker))
            await wait_for_runs(client, [fut], S.RUNNING)
            await fut.cancel()
            assert (await fut.wait(timeout=20)).state is S.CANCELLED
        assert marker.read_text() == "finally ran"
        await worker.stop()


async def test_one_replica_holds_the_maintenance_lock_and_it_passes_on(
    nursery: trio.Nursery, database_url: str, tmp_path: Path
) -> None:
    async with replicas(nursery, database_url, tmp_path, n=1) as (a,):
        assert a.state is not None
        await wait_until(lambda: a.state is not None and a.state.bus.leader)
        async with replicas(nursery, database_url, tmp_path / "b", n=1) as (b,):
            assert b.state is not None
            assert not b.state.bus.leader
            await a.stop()
            await wait_until(lambda: b.state is not None and b.state.bus.leader)
