"""Server replicas as real processes on one PostgreSQL database.

Each test gets a fresh database (``postgres_database()``) and starts
``trio-taskworker server start --database-url URL --port 0`` several times:
the processes share nothing but the database. The replica lease is short
(``--replica-lease 2``) where a test SIGKILLs a replica that held runs, so
they are freed in seconds; the other tests keep the default lease, which a
stalled event loop on a busy machine cannot outlast.
The in-process replica tests are in test_replicas.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trio_taskworker import TaskRunState, gather_results, open_client
from trio_taskworker._server._store import SCHEMA_VERSION

from . import e2e_tasks as t
from .conftest import Proc, _env, cli, start_worker
from .helpers import wait_for_runs, wait_until
from .test_store_contract import postgres_database

pytestmark = pytest.mark.e2e

S = TaskRunState
TASKS_FILE = "tests/e2e_tasks.py"
SHORT_LEASE = 2.0


@pytest.fixture
def database_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def procs(database_url: str, procs: list[Proc]) -> list[Proc]:
    """conftest's ``procs``, set up after the database: its processes are stopped
    before the database is dropped."""
    return procs


def launch(database_url: str, log: Path, procs: list[Proc], *args: str) -> Proc:
    """Start a replica (not waiting for it), registered in ``procs`` at once."""
    with open(log, "a") as err:
        popen = subprocess.Popen(
            cli("server", "start", "--port", "0", "--database-url", database_url, *args),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_env(),
        )  # fmt: skip
    proc = Proc(popen, log)
    procs.append(proc)
    return proc


def ready(proc: Proc) -> Proc:
    """Wait for the replica's ready line; set and return its URL."""
    stdout = proc.popen.stdout
    assert stdout is not None
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        line = stdout.readline()
        if "ready at" in line or not line:
            break
    stdout.close()
    if "ready at" not in line:
        raise RuntimeError(f"replica did not start: {line!r} {proc.output()}")
    proc.url = line.split("ready at ")[1].split()[0]
    return proc


async def start_replicas(
    database_url: str, tmp_path: Path, procs: list[Proc], n: int = 2, lease: float | None = None
) -> list[Proc]:
    """``n`` replicas started together: all launched before any is waited for.
    ``lease``: their ``--replica-lease`` (default: the server's)."""
    args = () if lease is None else ("--replica-lease", str(lease))

    def start() -> list[Proc]:
        started = [
            launch(database_url, tmp_path / f"replica{len(procs)}.log", procs, *args)
            for _ in range(n)
        ]
        return [ready(proc) for proc in started]

    return await trio.to_thread.run_sync(start)


async def new_worker(url: str, procs: list[Proc], tmp_path: Path, *args: str) -> Proc:
    def start() -> Proc:
        return start_worker(url, *args, log=tmp_path / f"worker{len(procs)}.log")

    proc = await trio.to_thread.run_sync(start)
    procs.append(proc)
    return proc


async def sigkill(proc: Proc) -> None:
    proc.signal(signal.SIGKILL)
    await trio.to_thread.run_sync(proc.wait)


async def query(database_url: str, sql: str) -> list[tuple[object, ...]]:
    import psycopg

    def run() -> list[tuple[object, ...]]:
        with psycopg.connect(database_url) as conn:
            return conn.execute(sql).fetchall()

    return await trio.to_thread.run_sync(run)


async def test_a_run_submitted_to_one_replica_runs_through_the_other(
    database_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    a, b = await start_replicas(database_url, tmp_path, procs)
    await new_worker(b.url, procs, tmp_path, f"{TASKS_FILE}:add", f"{TASKS_FILE}:mul")
    async with open_client(a.url) as client:
        adds = await t.add.map([1, 2, 3], [10, 20, 30])
        product = await t.mul.delay(6, 7)
        # A answers for runs that a worker connected to B ran.
        assert await gather_results(adds, timeout=30) == [11, 22, 33]
        assert await product.result(timeout=30) == 42
        runs = await client.wait_runs([f.task_run_id for f in [*adds, product]], timeout=30)
        assert {(r.state, r.attempt, r.redeliveries) for r in runs} == {(S.COMPLETED, 1, 0)}


async def test_three_replicas_starting_together_on_an_empty_database(
    database_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    replicas = await start_replicas(database_url, tmp_path, procs, n=3)
    assert len({r.url for r in replicas}) == 3
    await new_worker(replicas[0].url, procs, tmp_path, f"{TASKS_FILE}:add")
    for i, replica in enumerate(replicas):
        async with open_client(replica.url) as client:
            assert (await client.health())["status"] == "ok"
            assert await (await t.add.delay(i, y=100)).result(timeout=30) == 100 + i
    rows = await query(database_url, "SELECT version FROM schema_version")
    assert rows == [(SCHEMA_VERSION,)]
    leases = await query(database_url, "SELECT count(*) FROM replicas")
    assert leases == [(3,)]
    states = await query(database_url, "SELECT state, count(*) FROM task_runs GROUP BY state")
    assert states == [("COMPLETED", 3)]


async def test_a_cancel_on_one_replica_reaches_a_run_on_the_other(
    database_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    a, b = await start_replicas(database_url, tmp_path, procs)
    await new_worker(b.url, procs, tmp_path, f"{TASKS_FILE}:cancellable_marker")
    marker = tmp_path / "marker"
    async with open_client(a.url) as client:
        fut = await t.cancellable_marker.delay(str(marker))
        await wait_for_runs(client, [fut], S.RUNNING)
        done = await trio.run_process(
            cli("run", "cancel", str(fut.task_run_id), "--api-url", a.url),
            capture_stdout=True,
            env=_env(),
        )
        assert done.stdout.decode().strip().endswith(("CANCELLING", "CANCELLED"))
        run = await fut.wait(timeout=30)
        assert run.state is S.CANCELLED
    assert await trio.Path(marker).read_text() == "finally ran"


async def test_sigkill_a_replica_mid_run_while_workers_fail_over(
    database_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    n = 200
    starts = tmp_path / "starts"
    starts.mkdir()
    gate = tmp_path / "gate"
    a, b = await start_replicas(database_url, tmp_path, procs, lease=SHORT_LEASE)
    # One worker on each replica, each with the other as its fallback.
    on_a = await new_worker(f"{a.url},{b.url}", procs, tmp_path, f"{TASKS_FILE}:gated_add")
    on_b = await new_worker(f"{b.url},{a.url}", procs, tmp_path, f"{TASKS_FILE}:gated_add")

    def executions() -> list[tuple[int, int]]:
        """(x, worker pid) of every execution so far."""
        found = [name.split(".") for name in os.listdir(starts)]
        return [(int(x), int(pid)) for x, pid, _ in found]

    def held_by(pid: int) -> set[int]:
        return {x for x, p in executions() if p == pid}

    async with open_client(b.url) as client:
        futs = await t.gated_add.map([str(starts)] * n, [str(gate)] * n, range(n))
        # The gate is shut: each worker holds its limit (10) of runs, RUNNING.
        await wait_until(lambda: len(held_by(on_a.pid)) == len(held_by(on_b.pid)) == 10)
        with trio.fail_after(30):  # and the server knows that they started
            while len(await client.list_runs(state=S.RUNNING)) < 20:  # noqa: ASYNC110 - on the server
                await trio.sleep(0.02)
        on_a_at_kill = held_by(on_a.pid)
        await sigkill(a)
        await trio.Path(gate).write_text("")
        assert await gather_results(futs, timeout=60) == [x + 1000 for x in range(n)]
        runs = await client.wait_runs([f.task_run_id for f in futs], timeout=30)

    assert {r.state for r in runs} == {S.COMPLETED}
    # The runs that A's worker held were freed (A's lease expired) and redelivered.
    redelivered = {x for x, r in enumerate(runs) if r.redeliveries >= 1}
    assert on_a_at_kill <= redelivered
    # At least once: every run executed, those freed twice or more.
    count = Counter(x for x, _ in executions())
    assert set(count) == set(range(n)) and count.total() >= n + len(on_a_at_kill)
    assert all(count[x] >= 2 for x in on_a_at_kill)
    # One row per run, each COMPLETED once, in the database itself.
    rows = await query(database_url, "SELECT state, count(*) FROM task_runs GROUP BY state")
    assert rows == [("COMPLETED", n)]
    assert on_a.popen.poll() is None and on_b.popen.poll() is None


async def test_a_submitter_fails_over_from_a_dead_replica(
    database_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    a, b = await start_replicas(database_url, tmp_path, procs)
    await new_worker(b.url, procs, tmp_path, f"{TASKS_FILE}:add")
    both = f"{a.url},{b.url}"
    async with open_client(both) as client:
        first = await t.add.delay(0)  # through A, which answers first
        assert await first.result(timeout=30) == 1
        await sigkill(a)  # the client's connections to A break
        futs = await t.add.map([1, 2, 3])
        assert await gather_results([first, *futs], timeout=30) == [1, 2, 3, 4]
        runs = await client.wait_runs([f.task_run_id for f in futs], timeout=30)
        assert {r.state for r in runs} == {S.COMPLETED}
    # The CLI, given both replicas in the environment, fails over too.
    shown = await trio.run_process(
        cli("run", "show", str(futs[0].task_run_id)), capture_stdout=True, env=_env(both)
    )
    assert str(futs[0].task_run_id) in shown.stdout.decode()
    assert "COMPLETED" in shown.stdout.decode()
