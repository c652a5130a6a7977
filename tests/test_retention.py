"""Retention: which runs and blobs a sweep deletes, in batches, on the server's
clock, and the SQLite file giving the space back."""

from __future__ import annotations

import datetime
import logging
import math
import sqlite3
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from trio_taskworker import ConfigurationError, TaskRunState, TaskServer
from trio_taskworker._cli import _parser
from trio_taskworker._models import Finished, Started, TaskRunCreate
from trio_taskworker._server import SQLiteStore, Store
from trio_taskworker._server._app import build_app
from trio_taskworker._server._maintenance import (
    DEFAULT_RETENTION,
    Maintenance,
    prepare_sqlite_file,
    retention_seconds,
)
from trio_taskworker.testing import trio_wall_time

S = TaskRunState
DAY = 86400.0


def create(key: str = "m:f", **kwargs: object) -> TaskRunCreate:
    if "parameters_ref" not in kwargs:
        kwargs["parameters"] = b"p"
    return TaskRunCreate(task_key=key, **kwargs)  # type: ignore[arg-type]


async def finish(
    store: Store,
    key: str,
    now: float,
    state: TaskRunState = S.COMPLETED,
    *,
    result_ref: str | None = None,
    **kwargs: object,
) -> uuid.UUID:
    """Create a run of ``key`` and have a worker end it in ``state`` at ``now``."""
    (run_id,) = await store.create_runs([create(key, **kwargs)], now)
    (run,) = await store.claim_runs([key], 1, "w", now)
    assert run.id == run_id
    outcome = await store.apply_reports(
        "w",
        [
            Started(id=run_id, attempt=run.attempt),
            Finished(id=run_id, attempt=run.attempt, state=state, result_ref=result_ref),
        ],
        now,
    )
    assert not outcome.rejected
    return run_id


async def existing(store: Store, *ids: uuid.UUID) -> set[uuid.UUID]:
    return {run.id for run in await store.read_runs(ids)}


# --- settings ----------------------------------------------------------------------------


def test_retention_takes_seconds_or_a_timedelta_and_zero_or_none_is_forever() -> None:
    assert retention_seconds(datetime.timedelta(hours=12)) == 12 * 3600
    assert retention_seconds(90) == 90.0
    assert retention_seconds(0.5) == 0.5
    assert retention_seconds(None) is None
    assert retention_seconds(0) is None
    assert retention_seconds(datetime.timedelta(0)) is None
    for bad in (-1, math.inf, math.nan, datetime.timedelta(days=-1), 101 * 365 * DAY, "7d"):
        with pytest.raises(ConfigurationError, match="retention must be"):
            retention_seconds(bad)  # type: ignore[arg-type]
    assert TaskServer().retention == DEFAULT_RETENTION == 7 * DAY
    assert TaskServer(retention=datetime.timedelta(days=1)).retention == DAY
    with pytest.raises(ConfigurationError):
        TaskServer(retention=-5)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * DAY),
        ("12h", 12 * 3600.0),
        ("30m", 1800.0),
        ("45s", 45.0),
        ("2w", 14 * DAY),
        ("1.5h", 5400.0),
        ("3600", 3600.0),
        ("0.5", 0.5),
        ("0", None),
        ("0d", None),
        ("forever", None),
        ("Forever", None),
    ],
)
def test_cli_retention_durations(text: str, seconds: float | None) -> None:
    args = _parser().parse_args(["server", "start", "--retention", text])
    assert args.retention == seconds


def test_cli_retention_default_is_seven_days() -> None:
    assert _parser().parse_args(["server", "start"]).retention == 7 * DAY


@pytest.mark.parametrize("text", ["", "d", "soon", "-1d", "7x", "inf", "nan", "1e400"])
def test_cli_refuses_a_bad_retention(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["server", "start", f"--retention={text}"])
    assert exit_.value.code == 2
    assert "expected a duration such as 7d" in capsys.readouterr().err


# --- the store ---------------------------------------------------------------------------


async def test_only_runs_that_ended_before_the_cutoff_are_deleted(
    memory_store: SQLiteStore,
) -> None:
    store = memory_store
    completed = await finish(store, "done", 10.0)
    failed = await finish(store, "bad", 11.0, S.FAILED)
    (cancelled,) = await store.create_runs([create("gone")], 5.0)
    await store.cancel_run(cancelled, 12.0)
    recent = await finish(store, "late", 100.0)
    # Runs that have not ended, however old: never deleted.
    (scheduled,) = await store.create_runs([create("queued")], 1.0)
    (pending,) = await store.create_runs([create("leased")], 1.0)
    await store.claim_runs(["leased"], 1, "w", 1.0)
    (running,) = await store.create_runs([create("busy")], 1.0)
    (claim,) = await store.claim_runs(["busy"], 1, "w", 1.0)
    await store.apply_reports("w", [Started(id=running, attempt=claim.attempt)], 1.0)
    (cancelling,) = await store.create_runs([create("stopping")], 1.0)
    (claim,) = await store.claim_runs(["stopping"], 1, "w", 1.0)
    await store.apply_reports("w", [Started(id=cancelling, attempt=claim.attempt)], 1.0)
    await store.cancel_run(cancelling, 2.0)
    alive = (scheduled, pending, running, cancelling)
    states = {run.id: run.state for run in await store.read_runs(alive)}
    assert [states[run_id] for run_id in alive] == [
        S.SCHEDULED,
        S.PENDING,
        S.RUNNING,
        S.CANCELLING,
    ]

    assert (await store.delete_ended_runs(ended_before=10.0, limit=100))[0] == 0  # strictly before
    assert (await store.delete_ended_runs(ended_before=50.0, limit=100))[0] == 3
    assert await existing(store, completed, failed, cancelled) == set()
    assert await existing(store, recent, *alive) == {recent, *alive}
    assert (await store.delete_ended_runs(ended_before=1e12, limit=100))[0] == 1
    assert await existing(store, recent, *alive) == set(alive)


async def test_a_crashed_run_counts_from_when_a_sweep_first_saw_it(
    memory_store: SQLiteStore,
) -> None:
    store = memory_store
    (run_id,) = await store.create_runs([create(max_redeliveries=0)], 1.0)
    (claim,) = await store.claim_runs(["m:f"], 1, "w", 1.0)
    await store.apply_reports("w", [Started(id=run_id, attempt=claim.attempt)], 1.0)
    await store.release_owner("w", 500.0)
    (run,) = await store.read_runs([run_id])
    # A crash records when the run ended...
    assert run.state is S.CRASHED and run.finished_at is not None
    assert run.finished_at.timestamp() == 500.0
    # ...but one stored by an older version has no end time:
    await store.runner.transact(
        lambda cur: cur.execute(
            "UPDATE task_runs SET finished_at = NULL WHERE id = ?", (str(run_id),)
        )
    )
    # without an end time it is not deleted, however old it is...
    assert (await store.delete_ended_runs(ended_before=1e12, limit=10))[0] == 0
    # ...until a sweep gives it one; then it is kept for the retention from there.
    assert await store.stamp_crashed_runs(now=600.0) == 1
    assert await store.stamp_crashed_runs(now=700.0) == 0  # the first time holds
    (run,) = await store.read_runs([run_id])
    assert run.finished_at is not None and run.finished_at.timestamp() == 600.0
    assert (await store.delete_ended_runs(ended_before=600.0, limit=10))[0] == 0
    assert (await store.delete_ended_runs(ended_before=600.5, limit=10))[0] == 1


async def test_runs_are_deleted_in_batches_oldest_first(memory_store: SQLiteStore) -> None:
    ids = []
    for i in range(25):
        (run_id,) = await memory_store.create_runs([create()], float(i))
        await memory_store.cancel_run(run_id, float(i))
        ids.append(run_id)
    assert (await memory_store.delete_ended_runs(ended_before=100.0, limit=10))[0] == 10
    assert await existing(memory_store, *ids) == set(ids[10:])
    assert (await memory_store.delete_ended_runs(ended_before=100.0, limit=10))[0] == 10
    assert (await memory_store.delete_ended_runs(ended_before=100.0, limit=10))[0] == 5
    assert (await memory_store.delete_ended_runs(ended_before=100.0, limit=10))[0] == 0
    assert await existing(memory_store, *ids) == set()


async def test_referenced_blobs_stay_and_old_unreferenced_ones_go(
    memory_store: SQLiteStore,
) -> None:
    store = memory_store
    params = await store.put_blob(b"parameters of a queued run", 1.0)
    await store.create_runs([create("queued", parameters_ref=params)], 1.0)
    shared = await store.put_blob(b"a cached result", 1.0)
    original = await finish(store, "cached", 2.0, result_ref=shared, cache_key="k")
    (copy,) = await store.create_runs([create("cached", cache_key="k")], 50.0)
    (run,) = await store.read_runs([copy])
    assert (run.state, run.result_ref) == (S.COMPLETED, shared)
    orphan = await store.put_blob(b"uploaded, never used", 1.0)
    young = await store.put_blob(b"uploaded for a run being submitted", 99.0)
    # The original ends long before its cached copy: only the original goes,
    # and it names the blob it shares with the copy.
    assert await store.delete_ended_runs(ended_before=10.0, limit=10) == (1, [shared])
    assert await existing(store, original, copy) == {copy}

    every = [params, shared, orphan, young, str(uuid.uuid4())]  # and one that never was
    assert await store.delete_unreferenced_blobs(every, created_before=98.0) == (1, [])
    assert await store.get_blob(orphan) is None
    for kept in (params, shared, young):
        assert await store.get_blob(kept) is not None
    # Once the copy is gone too, nothing references the shared blob.
    assert await store.delete_ended_runs(ended_before=60.0, limit=10) == (1, [shared])
    assert await store.delete_unreferenced_blobs(every, created_before=98.0) == (1, [])
    assert await store.get_blob(shared) is None
    assert await store.get_blob(params) is not None and await store.get_blob(young) is not None
    # The young one, once past the grace period.
    assert await store.delete_unreferenced_blobs(every, created_before=100.0) == (1, [])
    assert await store.get_blob(young) is None


async def test_blobs_are_listed_in_pages_by_age(memory_store: SQLiteStore) -> None:
    store = memory_store
    refs = [await store.put_blob(b"x", at) for at in (1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0)]
    by_age = sorted(zip((1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0), refs, strict=True))
    first = await store.list_blobs(None, 5.0, None, limit=3)
    assert first == by_age[:3]
    second = await store.list_blobs(None, 5.0, first[-1], limit=3)
    assert second == by_age[3:6]
    assert await store.list_blobs(None, 5.0, second[-1], limit=3) == []
    # From a time on (a sweep's window), then past a page within it.
    window = await store.list_blobs(2.0, 4.0, None, limit=2)
    assert window == by_age[1:3]
    assert await store.list_blobs(2.0, 4.0, window[-1], limit=2) == by_age[3:5]


async def test_a_transaction_deletes_a_bounded_number_of_bytes(
    memory_store: SQLiteStore,
) -> None:
    store = memory_store
    refs = [await store.put_blob(b"y" * 10, float(i)) for i in range(5)]
    assert await store.delete_unreferenced_blobs(refs, 100.0, max_bytes=25) == (2, refs[2:])
    # One blob always goes, whatever its size.
    assert await store.delete_unreferenced_blobs(refs[2:], 100.0, max_bytes=5) == (1, refs[3:])
    assert await store.delete_unreferenced_blobs(refs[3:], 100.0, max_bytes=25) == (2, [])
    assert [await store.get_blob(ref) for ref in refs] == [None] * 5


# --- a sweep -----------------------------------------------------------------------------


async def test_a_sweep_deletes_expired_runs_then_their_blobs(memory_store: SQLiteStore) -> None:
    store = memory_store
    now = [10 * DAY]
    sweeper = Maintenance(store, retention=DAY, now=lambda: now[0], batch=2)
    assert (sweeper.interval, sweeper.blob_grace) == (60.0, 3600.0)
    assert Maintenance(store, 5.0, lambda: 0.0).blob_grace == 5.0
    old_blob = await store.put_blob(b"result", 8 * DAY)
    old = [await finish(store, "m:f", 8 * DAY, result_ref=old_blob)]
    old += [await finish(store, "m:f", 8 * DAY + i) for i in range(4)]
    recent = await finish(store, "m:f", 9.5 * DAY)
    (queued,) = await store.create_runs([create()], DAY)
    fresh_blob = await store.put_blob(b"being submitted", 10 * DAY - 60)

    sweep = await sweeper.sweep()
    assert (sweep.runs, sweep.blobs, sweep.bytes_freed) == (5, 1, 0)
    assert sweep.batches == 3 + 1  # 2 + 2 + 1 runs, then one look at the blobs
    assert await existing(store, *old, recent, queued) == {recent, queued}
    assert await store.get_blob(old_blob) is None
    assert await store.get_blob(fresh_blob) is not None
    now[0] += 0.6 * DAY
    sweep = await sweeper.sweep()
    assert (sweep.runs, sweep.blobs) == (1, 1)
    assert await existing(store, recent, queued) == {queued}


async def test_a_sweep_looks_only_at_blobs_that_may_have_become_deletable(
    memory_store: SQLiteStore,
) -> None:
    store = memory_store
    now = [10 * DAY]
    sweeper = Maintenance(store, retention=DAY, now=lambda: now[0], batch=2)
    refs = [await store.put_blob(b"queued", DAY + i) for i in range(5)]
    await store.create_runs([create(parameters_ref=ref) for ref in refs], 2 * DAY)
    first = await sweeper.sweep()
    assert (first.blobs, first.batches) == (0, 1 + 3)  # one for runs, 2 + 2 + 1 blobs
    now[0] += 60
    second = await sweeper.sweep()
    assert (second.blobs, second.batches) == (0, 1)  # none has changed
    orphan = await store.put_blob(b"never named", now[0])
    now[0] += 3599
    assert (await sweeper.sweep()).blobs == 0  # not old enough yet
    now[0] += 2
    third = await sweeper.sweep()
    assert (third.blobs, third.batches) == (1, 2)
    assert await store.get_blob(orphan) is None


async def test_a_failed_sweep_is_logged_and_the_next_one_runs(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SQLiteStore(":memory:", threaded=False)
    await nursery.start(store.run)
    calls = []

    def now() -> float:
        calls.append(trio.current_time())
        if len(calls) == 1:
            raise RuntimeError("the clock broke")
        return trio_wall_time()

    await nursery.start(Maintenance(store, DAY, now).run)
    await trio.sleep(61)
    assert len(calls) == 2 and calls[1] - calls[0] == pytest.approx(60)
    assert "retention sweep failed" in caplog.text and "the clock broke" in caplog.text


# --- the SQLite file ---------------------------------------------------------------------


def _size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def _auto_vacuum(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    finally:
        conn.close()


async def _fill(path: Path, runs: int, now: float) -> list[uuid.UUID]:
    async with trio.open_nursery() as nursery:
        store = SQLiteStore(path, threaded=False)
        await nursery.start(store.run)
        ids = await store.create_runs(
            [TaskRunCreate(task_key="m:f", parameters=bytes(5000)) for _ in range(runs)], now
        )
        for run_id in ids[:-1]:
            await store.cancel_run(run_id, now)
        nursery.cancel_scope.cancel()
    return ids


async def test_the_file_gives_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    prepare_sqlite_file(path)
    assert _auto_vacuum(path) == 2  # INCREMENTAL, set before the first table
    ids = await _fill(path, 2000, now=1.0)
    before = _size(path)
    assert before > 10_000_000
    async with trio.open_nursery() as nursery:
        store = SQLiteStore(path, threaded=False)
        await nursery.start(store.run)
        sweep = await Maintenance(store, 10.0, lambda: 100.0, sqlite_path=path).sweep()
        assert sweep.runs == 1999 and sweep.bytes_freed > 9_000_000
        assert await existing(store, *ids) == {ids[-1]}  # the queued one stays
        nursery.cancel_scope.cancel()
    assert _size(path) < before / 10


async def test_an_older_file_is_converted_once_and_keeps_its_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "runs.sqlite3"
    ids = await _fill(path, 50, now=1.0)  # as a server without retention made it
    assert _auto_vacuum(path) == 0
    prepare_sqlite_file(path)
    assert _auto_vacuum(path) == 2
    assert "converting" in caplog.text and "converted" in caplog.text
    caplog.clear()
    prepare_sqlite_file(path)
    assert not caplog.text  # once
    async with trio.open_nursery() as nursery:
        store = SQLiteStore(path, threaded=False)
        await nursery.start(store.run)
        assert await existing(store, *ids) == set(ids)
        nursery.cancel_scope.cancel()


def test_a_file_that_is_not_a_database_is_left_to_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runs.sqlite3"
    path.write_bytes(b"this is not a database" * 500)
    prepare_sqlite_file(path)
    assert path.read_bytes() == b"this is not a database" * 500
    assert not caplog.records  # the store reports it, in one line


# --- the server --------------------------------------------------------------------------


async def test_the_server_forgets_ended_runs_after_the_retention(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "trio_taskworker._server._maintenance")
    server = TaskServer(
        port=0,
        data_dir=tmp_path / "data",
        now=trio_wall_time,
        retention=datetime.timedelta(days=2),
    )
    await nursery.start(server.run)
    assert server.state is not None
    store = server.state.store
    start = trio_wall_time()
    blob = await store.put_blob(b"the result", start)
    first = await finish(store, "m:f", start, result_ref=blob)
    (queued,) = await store.create_runs([create("nobody-serves-this")], start)

    await trio.sleep(DAY)
    second = await finish(store, "m:f", trio_wall_time())
    await trio.sleep(DAY + 120)  # the first ended two days and two minutes ago

    # The server's own routes, in process: sockets would let the clock jump.
    transport = httpx.ASGITransport(app=build_app(server.state))
    async with httpx.AsyncClient(transport=transport, base_url="http://server") as http:
        assert (await http.get(f"/runs/{first}")).status_code == 404
        assert (await http.get(f"/blobs/{blob}")).status_code == 404
        assert (await http.get(f"/runs/{second}")).status_code == 200
        assert (await http.get(f"/runs/{queued}")).json()["state"] == "SCHEDULED"
        await trio.sleep(DAY)
        assert (await http.get(f"/runs/{second}")).status_code == 404
        assert (await http.get(f"/runs/{queued}")).status_code == 200
    assert "retention: deleted 1 runs" in caplog.text
    await server.stop()


async def test_a_server_without_retention_keeps_everything(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = TaskServer(port=0, data_dir=tmp_path / "data", now=trio_wall_time, retention=0)
    await nursery.start(server.run)
    assert server.state is not None
    store = server.state.store
    run_id = await finish(store, "m:f", trio_wall_time())
    await trio.sleep(400 * DAY)  # no sweep to wake up for
    assert await existing(store, run_id) == {run_id}
    assert _auto_vacuum(tmp_path / "data" / "runs.sqlite3") == 0  # never converted
    await server.stop()
