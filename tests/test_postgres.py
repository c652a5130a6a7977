"""PostgreSQL only: several stores on one database, start-up races, lost connections.

Like the contract suite, these FAIL when PostgreSQL cannot be reached, unless
``TRIO_TASKWORKER_TEST_POSTGRES=skip`` (see tests/test_store_contract.py).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_taskworker import (
    ConfigurationError,
    TaskRunState,
    TaskServer,
    TaskWorker,
    open_client,
    task,
)
from trio_taskworker._models import TaskRunCreate
from trio_taskworker._server._maintenance import Maintenance
from trio_taskworker._server._store import SCHEMA_VERSION, StoreUnavailable

from . import e2e_tasks as e2e
from .conftest import Proc, _env, cli, worker
from .test_store_contract import admin_url, postgres_database


@pytest.fixture
def database_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def create(key: str = "m:f") -> TaskRunCreate:
    return TaskRunCreate(task_key=key, parameters=b"p")


def store(url: str, **kwargs: Any) -> Any:
    from trio_taskworker._server._postgres import PostgresStore

    return PostgresStore(url, **kwargs)


def admin(sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(admin_url(), autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


async def test_two_stores_claiming_at_once_never_lease_one_run_twice(database_url: str) -> None:
    async with trio.open_nursery() as nursery:
        first = store(database_url, max_size=4)
        second = store(database_url, max_size=4)
        await nursery.start(first.run)
        await nursery.start(second.run)
        created = set(await first.create_runs([create() for _ in range(600)], now=1.0))
        created |= set(await second.create_runs([create("m:g") for _ in range(400)], now=1.0))
        got: list[tuple[uuid.UUID, str]] = []

        async def claimer(replica: Any, owner: str) -> None:
            while runs := await replica.claim_runs(["m:f", "m:g"], 9, owner, now=2.0):
                got.extend((r.id, owner) for r in runs)
                assert all(r.attempt == 1 for r in runs)

        async with trio.open_nursery() as claimers:
            for i in range(4):
                claimers.start_soon(claimer, first, f"a{i}")
                claimers.start_soon(claimer, second, f"b{i}")
        ids = [run_id for run_id, _ in got]
        assert len(ids) == len(set(ids)) == 1000 and set(ids) == created
        # What each claim returned is what the database holds.
        counts = await first.lease_counts()
        assert sum(counts.values()) == 1000
        assert counts == {o: sum(1 for _, w in got if w == o) for o in counts}

        def seqs(cur: Any) -> list[int]:
            cur.execute("SELECT seq FROM task_runs")
            return [int(row[0]) for row in cur.fetchall()]

        found = await second.runner.transact(seqs)
        assert len(found) == len(set(found)) == 1000  # from the sequence: never shared
        nursery.cancel_scope.cancel()


async def test_three_stores_starting_at_once_on_an_empty_database(database_url: str) -> None:
    stores = [store(database_url, min_size=1, max_size=2) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:
            for s in stores:
                starting.start_soon(nursery.start, s.run)
        for i, s in enumerate(stores):
            await s.create_runs([create(f"k{i}")], now=1.0)
        listed = await stores[0].list_runs(None, None, 10, 0)
        assert sorted(r.task_key for r in listed) == ["k0", "k1", "k2"]

        def version(cur: Any) -> list[int]:
            cur.execute("SELECT version FROM schema_version")
            return [int(row[0]) for row in cur.fetchall()]

        assert await stores[2].runner.transact(version) == [SCHEMA_VERSION]
        nursery.cancel_scope.cancel()


async def test_an_unreachable_database_fails_the_start_without_its_password() -> None:
    unreachable = "postgresql://someone:s3cret@127.0.0.1:1/nothing"
    s = store(unreachable, connect_timeout=1.0)
    assert "s3cret" not in repr(s)
    refused = pytest.RaisesExc(ConfigurationError, match=r"someone:\*\*\*@127\.0\.0\.1:1")
    with pytest.RaisesGroup(refused, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(s.run)
    assert "s3cret" not in repr(s)


async def test_lost_connections_are_replaced_and_an_unavailable_database_is_a_503(
    database_url: str,
) -> None:
    name = database_url.rsplit("/", 1)[1]
    s = store(database_url, min_size=2, max_size=2, connect_timeout=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        (run_id,) = await s.create_runs([create()], now=1.0)
        # The server restarts (its backends end): the next operation goes on,
        # on a new connection.
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        assert [r.id for r in await s.read_runs([run_id])] == [run_id]
        # Now it refuses connections: StoreUnavailable (the server answers 503).
        admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        with pytest.raises(StoreUnavailable):
            await s.read_runs([run_id])
        admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        with trio.fail_after(30):
            while True:
                try:
                    assert [r.id for r in await s.read_runs([run_id])] == [run_id]
                    break
                except StoreUnavailable:
                    await trio.sleep(0.2)
        nursery.cancel_scope.cancel()


# --- the server on PostgreSQL -------------------------------------------------------


@task
async def add(x: int, y: int = 1) -> int:
    return x + y


@task
async def big(n: int) -> bytes:
    return b"z" * n


async def test_a_server_on_postgresql_runs_tasks_and_sweeps(
    nursery: trio.Nursery, database_url: str, tmp_path: Path
) -> None:
    server = TaskServer(port=0, database_url=database_url, data_dir=tmp_path / "unused")
    assert "postgresql://" in repr(server)
    await nursery.start(server.run)
    assert not (tmp_path / "unused").exists()  # no data directory, no lock
    worker = TaskWorker(add, big, api_url=str(server.url), handle_signals=False)
    await nursery.start(worker.start)
    async with open_client(server.url):
        fut = await add.delay(1, y=2)
        assert await fut.result(timeout=20) == 3
        assert await (await big.delay(200_000)).result(timeout=20) == b"z" * 200_000
        run = await fut.wait()
        assert run.state is TaskRunState.COMPLETED and run.attempt == 1
    state = server.state
    assert state is not None
    # Retention runs on PostgreSQL too (without SQLite's vacuum steps).
    sweep = await Maintenance(state.store, 1.0, lambda: time.time() + 3600).sweep()
    assert sweep.runs == 2 and sweep.blobs >= 1 and sweep.bytes_freed == 0
    await worker.stop()
    await server.stop()


async def test_a_database_url_must_be_postgresql(tmp_path: Path) -> None:
    server = TaskServer(port=0, database_url="sqlite:///x.db", data_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="postgresql://"):
        await server.run()


def server_on(database_url: str, log: Path) -> tuple[Proc, str]:
    """``server start`` with ``TRIO_TASKWORKER_DATABASE_URL``; the process and its ready line."""
    with open(log, "w") as err:
        popen = subprocess.Popen(
            cli("server", "start", "--port", "0"),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_env(TRIO_TASKWORKER_DATABASE_URL=database_url),
        )
    assert popen.stdout is not None
    line = popen.stdout.readline()
    popen.stdout.close()
    server = Proc(popen=popen, log=log)
    if "ready at " in line:
        server.url = line.split("ready at ")[1].split()[0]
    return server, line


@pytest.mark.e2e
async def test_the_cli_upgrades_a_database_and_a_server_process_serves_from_it(
    database_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    def upgrade(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli("db", "upgrade", *args), capture_output=True, text=True, env=_env(), timeout=60
        )

    for _ in range(2):  # creating, then finding it current: both fine
        done = await trio.to_thread.run_sync(upgrade, "--database-url", database_url)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"schema version {SCHEMA_VERSION} is ready in {database_url}\n"
    both = await trio.to_thread.run_sync(
        upgrade, "--database-url", database_url, "--data-dir", str(tmp_path)
    )
    assert both.returncode == 1 and both.stderr.count("\n") == 1
    assert "not both" in both.stderr

    # The server takes the URL from the environment (a password stays out of `ps`).
    server, line = await trio.to_thread.run_sync(server_on, database_url, tmp_path / "server.log")
    procs.append(server)
    assert f"(data in {database_url})" in line, server.log.read_text()
    worker(server, procs, tmp_path, "tests/e2e_tasks.py:add")
    async with open_client(server.url):
        fut = await e2e.add.delay(1, y=2)
        assert await fut.result(timeout=30) == 3
    import psycopg

    with psycopg.connect(database_url) as conn:  # the run is in PostgreSQL
        rows = conn.execute("SELECT id, state FROM task_runs").fetchall()
    assert rows == [(str(fut.task_run_id), "COMPLETED")]
