"""Two server replicas on one PostgreSQL database, in this process.

They share nothing but the database: what one does reaches the other through
LISTEN/NOTIFY, and through each replica's poll when a notification is lost.
The end-to-end tests with server processes (SIGKILL, failover) are in
test_e2e_replicas.py.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_taskworker import TaskRunState, TaskServer, TaskWorker, open_client, task
from trio_taskworker._models import TaskRunCreate
from trio_taskworker._server._postgres import (
    CHANNEL_CANCEL,
    CHANNEL_DUE,
    CHANNEL_ENDED,
    MAINTENANCE_LOCK_KEY,
    RESCUE_LOCK_KEY,
    PostgresBus,
    PostgresStore,
)
from trio_taskworker._server._store import Idempotency, StoreUnavailable

from . import e2e_tasks as e2e
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


hold = e2e.cancellable_marker


async def cancel_reaches_the_run(client: Any, marker: Path) -> None:
    """Start ``hold``, cancel it once it runs: it ends CANCELLED, its ``finally:`` ran."""
    fut = await hold.delay(str(marker))
    await wait_for_runs(client, [fut], S.RUNNING)
    await fut.cancel()
    assert (await fut.wait(timeout=20)).state is S.CANCELLED
    assert await trio.Path(marker).read_text() == "finally ran"


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
            await cancel_reaches_the_run(client, marker)
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
            await cancel_reaches_the_run(client, marker)
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


# --- what a review found --------------------------------------------------------------


def _hold_lock(url: str, key: int) -> Any:
    """A connection of another process, as it were, holding advisory lock ``key``."""
    import psycopg

    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    return conn


async def test_the_rescue_takes_turns_and_a_frozen_lock_holder_does_not_stop_it(
    nursery: trio.Nursery, database_url: str
) -> None:
    a, b = PostgresStore(database_url, max_size=2), PostgresStore(database_url, max_size=2)
    for s in (a, b):
        await nursery.start(s.run)
    await a.renew_replica(lease_seconds=-1.0)  # a's lease has run out
    await b.renew_replica(lease_seconds=600.0)
    (run_id,) = await a.create_runs([TaskRunCreate(task_key="k", parameters=b"p")], now=1.0)
    await a.claim_runs(["k"], 1, "a-conn", now=1.0)
    # A replica that froze holding the retention lock for its session (its
    # connection stays open): the rescue does not need that lock.
    frozen = await trio.to_thread.run_sync(_hold_lock, database_url, MAINTENANCE_LOCK_KEY)
    # While another replica's rescue transaction runs, this one skips its turn.
    busy = await trio.to_thread.run_sync(_hold_lock, database_url, RESCUE_LOCK_KEY)
    try:
        assert (await b.rescue_runs(now=10.0)).changed == ()
        await trio.to_thread.run_sync(busy.close)
        (freed,) = (await b.rescue_runs(now=10.0)).changed
        assert freed.id == run_id and freed.state is S.SCHEDULED
    finally:
        await trio.to_thread.run_sync(frozen.close)
        await trio.to_thread.run_sync(busy.close)


async def test_a_repeated_submission_waits_for_the_first_to_commit_and_gets_its_ids(
    nursery: trio.Nursery, database_url: str
) -> None:
    """A client that failed over sends ``POST /runs`` again, with the same key, to
    another replica while the first replica's transaction is still open."""
    import psycopg

    store = PostgresStore(database_url, max_size=2)
    await nursery.start(store.run)
    first_ids = [str(uuid.uuid4())]

    def first_replica_commits_late() -> Any:
        # What the first replica's create_runs does, held open.
        conn = psycopg.connect(database_url)
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("k1",))
        conn.execute(
            "INSERT INTO idempotency_keys (key, body_hash, ids, created_at) VALUES (%s,%s,%s,%s)",
            ("k1", "h", ",".join(first_ids), 1.0),
        )
        return conn

    conn = await trio.to_thread.run_sync(first_replica_commits_late)
    got: list[uuid.UUID] = []

    async def second() -> None:
        create = TaskRunCreate(task_key="k", parameters=b"p")
        got.extend(await store.create_runs([create], 2.0, Idempotency("k1", "h")))

    def waiting_on_the_key() -> bool:
        with psycopg.connect(database_url, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
            ).fetchone()
            return bool(row and row[0])

    async with trio.open_nursery() as inner:
        inner.start_soon(second)
        with trio.fail_after(20):
            while not await trio.to_thread.run_sync(waiting_on_the_key):  # noqa: ASYNC110 - another connection
                await trio.sleep(0.02)
        assert got == []
        await trio.to_thread.run_sync(conn.commit)
    await trio.to_thread.run_sync(conn.close)
    assert [str(i) for i in got] == first_ids
    assert await store.list_runs(None, None, 10, 0) == []  # nothing created twice


async def test_the_listener_survives_losing_its_connection_while_requests_wait(
    nursery: trio.Nursery,
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psycopg

    caplog.set_level(logging.DEBUG, logger="trio_taskworker._server._postgres")
    async with replicas(nursery, database_url, tmp_path, n=1) as (a,):
        state = a.state
        assert state is not None
        with state.waiters.watch([uuid.uuid4()]):

            async def unavailable(self: Any, ids: Any) -> Any:
                raise StoreUnavailable("the database is coming back")

            # The look after the reconnect fails: the server must go on.
            monkeypatch.setattr(PostgresStore, "ended_ids", unavailable)

            def kill_listener() -> None:
                with psycopg.connect(database_url, autocommit=True) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'trio-taskworker listener'"
                    )

            await trio.to_thread.run_sync(kill_listener)
            await wait_until(lambda: "replica listener lost its connection" in caplog.text)
            await wait_until(lambda: "could not be acted on" in caplog.text)
        async with httpx.AsyncClient(base_url=str(a.url)) as http:
            assert (await http.get("/health")).json()["status"] == "ok"


async def test_a_lone_server_forgets_the_cancels_it_told(server: TaskServer) -> None:
    state = server.state
    assert state is not None
    (run_id,) = await state.store.create_runs([TaskRunCreate(task_key="k")], 1.0)
    sub = state.dispatcher.add(["k"], "w", 0)
    await state.store.claim_runs(["k"], 1, sub.id, 1.0)
    run = await state.cancel(run_id)
    assert run.state is S.CANCELLED
    assert state._told_cancel == {}


async def test_hostile_notifications_are_ignored_and_the_replica_goes_on(
    nursery: trio.Nursery,
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anyone with a connection to the database can NOTIFY on the channels."""
    import psycopg

    async with replicas(nursery, database_url, tmp_path) as (a, b):
        worker = TaskWorker(add, api_url=str(b.url), handle_signals=False)
        await nursery.start(worker.start)
        hostile = [
            (CHANNEL_ENDED, "someone not-a-uuid,also-not"),
            (CHANNEL_ENDED, "someone " + "9" * 7000),
            (CHANNEL_CANCEL, "someone not-a-uuid owner"),
            (CHANNEL_CANCEL, f"someone {uuid.uuid4()} no-such-connection"),
            (CHANNEL_CANCEL, ""),
            (CHANNEL_DUE, "\x01\x02 \U0001f600"),
        ]

        def notify() -> None:
            with psycopg.connect(database_url, autocommit=True) as conn:
                for channel, payload in hostile:
                    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

        await trio.to_thread.run_sync(notify)
        await wait_until(
            lambda: sum("ignored a malformed notification" in m for m in caplog.messages) >= 3
        )
        # Both replicas still serve, and still hear each other.
        async with open_client(a.url):
            assert await (await add.delay(4, 5)).result(timeout=20) == 9
        await worker.stop()
