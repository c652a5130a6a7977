"""The storage layer: claims, fencing, retries and releases, on SQLite in memory."""

from __future__ import annotations

import functools
import operator
import threading
import types
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_taskworker import TaskRunState
from trio_taskworker._models import (
    ErrorInfo,
    Finished,
    Released,
    Started,
    TaskRunCreate,
)
from trio_taskworker._server import SQLiteStore, _store
from trio_taskworker._server._sqlite import SQLiteRunner
from trio_taskworker._server._store import StoreError

S = TaskRunState


def create(key: str = "m:f", **kwargs: object) -> TaskRunCreate:
    return TaskRunCreate(task_key=key, parameters=b"p", **kwargs)  # type: ignore[arg-type]


async def test_create_read_list(memory_store: SQLiteStore) -> None:
    ids = await memory_store.create_runs([create(), create("m:g")], now=100.0)
    runs = {r.id: r for r in await memory_store.read_runs(ids)}
    assert [runs[i].task_key for i in ids] == ["m:f", "m:g"]
    assert all(r.state is S.SCHEDULED and r.parameters == b"p" for r in runs.values())
    assert runs[ids[0]].scheduled_time.timestamp() == 100.0
    listed = await memory_store.list_runs(None, "m:g", 10, 0)
    assert [r.id for r in listed] == [ids[1]]
    assert listed[0].parameters is None  # lists leave payloads out
    assert (await memory_store.counts())["SCHEDULED"] == 2


async def test_ids_are_time_ordered_version_7(
    memory_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run and blob ids begin with the creation time in milliseconds, so that
    ids made later sort after earlier ones (and the key index grows at its end)."""
    clock = types.SimpleNamespace(time_ns=lambda: 1_796_000_000_123_456_789)
    monkeypatch.setattr(_store, "time", clock)
    first = await memory_store.create_runs([create() for _ in range(50)], now=1.0)
    ref = uuid.UUID(await memory_store.put_blob(b"x", 1.0))
    for made in [*first, ref]:
        assert made.version == 7 and made.variant == uuid.RFC_4122
        assert made.int >> 80 == 1_796_000_000_123
    assert len({*first, ref}) == 51  # the random bits tell apart ids of one millisecond
    clock.time_ns = lambda: 1_796_000_000_124_000_000
    later = await memory_store.create_runs([create() for _ in range(50)], now=2.0)
    assert max(map(str, [*first, ref])) < min(map(str, later))


def test_new_ids_have_74_random_bits_and_a_48_bit_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [_store.new_id() for _ in range(2000)]
    low = (1 << 80) - 1
    # Every one of the 74 bits varies, and nothing else below the time does.
    assert functools.reduce(operator.or_, (i.int & low for i in ids)) == _store._V7_RANDOM | (
        _store._V7_FIXED
    )
    assert all(i.int & low & ~_store._V7_RANDOM == _store._V7_FIXED for i in ids)
    # A clock before 1970 counts as 1970; one past 48 bits of milliseconds starts over.
    for nanoseconds, millisecond in ((-1, 0), (-(10**12), 0), ((1 << 48) * 10**6 + 5, 0)):
        monkeypatch.setattr(_store, "time", types.SimpleNamespace(time_ns=lambda n=nanoseconds: n))
        made = _store.new_id()
        assert made.version == 7 and made.int >> 80 == millisecond


async def test_claim_is_fair_across_keys_and_respects_n(memory_store: SQLiteStore) -> None:
    await memory_store.create_runs([create("a") for _ in range(10)], now=1.0)
    await memory_store.create_runs([create("b") for _ in range(2)], now=2.0)
    claimed = await memory_store.claim_runs(["a", "b"], 4, "conn", now=5.0)
    assert [r.task_key for r in claimed] == ["a", "b", "a", "b"]
    assert all(r.state is S.PENDING and r.attempt == 1 for r in claimed)
    again = await memory_store.claim_runs(["a", "b"], 100, "conn2", now=5.0)
    assert len(again) == 8 and {r.task_key for r in again} == {"a"}
    assert not set(r.id for r in claimed) & set(r.id for r in again)


async def test_claim_honours_scheduled_time(memory_store: SQLiteStore) -> None:
    import datetime

    at = datetime.datetime.fromtimestamp(50.0, datetime.UTC)
    (run_id,) = await memory_store.create_runs([create(scheduled_time=at)], now=10.0)
    assert await memory_store.claim_runs(["m:f"], 1, "c", now=49.9) == []
    assert await memory_store.next_due(["m:f"]) == 50.0
    (run,) = await memory_store.claim_runs(["m:f"], 1, "c", now=50.0)
    assert run.id == run_id


async def _leased(store: SQLiteStore, **kwargs: object) -> tuple[uuid.UUID, int]:
    await store.create_runs([create(**kwargs)], now=1.0)
    (run,) = await store.claim_runs(["m:f"], 1, "c1", now=1.0)
    return run.id, run.attempt


async def test_fencing_refuses_stale_and_foreign_reports(memory_store: SQLiteStore) -> None:
    run_id, attempt = await _leased(memory_store)
    foreign = await memory_store.apply_reports("c2", [Started(id=run_id, attempt=attempt)], 2.0)
    assert foreign.rejected and "stale lease" in foreign.rejected[0][1]
    # The connection goes away; the run is leased again, as attempt 2.
    await memory_store.release_owner("c1", now=3.0)
    (again,) = await memory_store.claim_runs(["m:f"], 1, "c2", now=3.0)
    assert again.attempt == attempt + 1
    late = await memory_store.apply_reports(
        "c1", [Finished(id=run_id, attempt=attempt, state=S.COMPLETED, result=b"old")], 4.0
    )
    assert late.rejected and not late.changed
    unknown = await memory_store.apply_reports("c2", [Started(id=uuid.uuid4(), attempt=1)], 4.0)
    assert unknown.rejected[0][1] == "no such run"


async def test_illegal_transition_is_refused(memory_store: SQLiteStore) -> None:
    run_id, attempt = await _leased(memory_store)
    # Finished before Started: PENDING cannot become COMPLETED.
    outcome = await memory_store.apply_reports(
        "c1", [Finished(id=run_id, attempt=attempt, state=S.COMPLETED)], 2.0
    )
    assert "cannot become COMPLETED" in outcome.rejected[0][1]
    (run,) = await memory_store.read_runs([run_id])
    assert run.state is S.PENDING


async def test_failure_with_retries_is_rescheduled_in_the_queue(memory_store: SQLiteStore) -> None:
    run_id, attempt = await _leased(memory_store, retries=1, retry_delay_seconds=30.0)
    error = ErrorInfo(type="builtins.ValueError", message="no")
    await memory_store.apply_reports(
        "c1",
        [
            Started(id=run_id, attempt=attempt),
            Finished(id=run_id, attempt=attempt, state=S.FAILED, result=b"e", error=error),
        ],
        now=10.0,
    )
    (run,) = await memory_store.read_runs([run_id])
    assert (run.state, run.retry_count, run.scheduled_time.timestamp()) == (S.SCHEDULED, 1, 40.0)
    assert run.error == error
    assert await memory_store.claim_runs(["m:f"], 1, "c1", now=39.0) == []
    (again,) = await memory_store.claim_runs(["m:f"], 1, "c1", now=40.0)
    await memory_store.apply_reports(
        "c1",
        [
            Started(id=run_id, attempt=again.attempt),
            Finished(id=run_id, attempt=again.attempt, state=S.FAILED, result=b"e", error=error),
        ],
        now=41.0,
    )
    (run,) = await memory_store.read_runs([run_id])
    assert (run.state, run.result) == (S.FAILED, b"e")


async def test_release_requeues_pending_and_redelivers_running(memory_store: SQLiteStore) -> None:
    await memory_store.create_runs([create(max_redeliveries=1), create(max_redeliveries=1)], 1.0)
    first, second = await memory_store.claim_runs(["m:f"], 2, "c1", now=1.0)
    await memory_store.apply_reports("c1", [Started(id=first.id, attempt=first.attempt)], 2.0)
    outcome = await memory_store.release_owner("c1", now=3.0)
    states = {r.id: r for r in outcome.changed}
    assert states[first.id].state is S.SCHEDULED and states[first.id].redeliveries == 1
    assert states[second.id].state is S.SCHEDULED and states[second.id].redeliveries == 0
    # Once more while running: the redelivery limit of 1 is spent, so it crashes.
    (run,) = [r for r in await memory_store.claim_runs(["m:f"], 2, "c2", 4.0) if r.id == first.id]
    await memory_store.apply_reports("c2", [Started(id=run.id, attempt=run.attempt)], 5.0)
    outcome = await memory_store.release_owner("c2", now=6.0)
    crashed = {r.id: r for r in outcome.changed}[first.id]
    assert crashed.state is S.CRASHED
    assert "redelivered 1 times" in (crashed.message or "")


async def test_released_by_worker_is_not_counted(memory_store: SQLiteStore) -> None:
    run_id, attempt = await _leased(memory_store)
    await memory_store.apply_reports(
        "c1",
        [Started(id=run_id, attempt=attempt), Released(id=run_id, attempt=attempt, reason="stop")],
        2.0,
    )
    (run,) = await memory_store.read_runs([run_id])
    assert (run.state, run.redeliveries, run.message) == (S.SCHEDULED, 0, "stop")


async def test_blobs(memory_store: SQLiteStore) -> None:
    ref = await memory_store.put_blob(b"\x00" * 1000, 1.0)
    assert await memory_store.get_blob(ref) == b"\x00" * 1000
    assert await memory_store.get_blob(str(uuid.uuid4())) is None
    assert (
        len(await memory_store.create_runs([TaskRunCreate(task_key="k", parameters_ref=ref)], 1.0))
        == 1
    )
    with pytest.raises(StoreError, match="no stored blob"):
        await memory_store.create_runs([TaskRunCreate(task_key="k", parameters_ref="nope")], 1.0)


async def test_a_refused_operation_does_not_undo_its_batch(memory_store: SQLiteStore) -> None:
    """Group commit: one failing operation in a batch leaves the others committed."""
    results: dict[str, object] = {}

    async def good() -> None:
        results["good"] = await memory_store.create_runs([create()], 1.0)

    async def bad() -> None:
        try:
            await memory_store.create_runs([TaskRunCreate(task_key="k", parameters_ref="x")], 1.0)
        except StoreError as exc:
            results["bad"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bad)
        nursery.start_soon(good)
    assert isinstance(results["bad"], StoreError)
    assert (await memory_store.counts())["SCHEDULED"] == 1
    # The other order: the good operation ran first, and the ids it returns are
    # the ones committed.
    results.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(good)
        nursery.start_soon(bad)
    assert isinstance(results["bad"], StoreError)
    assert (await memory_store.counts())["SCHEDULED"] == 2
    ids = results["good"]
    assert isinstance(ids, list) and len(await memory_store.read_runs(ids)) == 1


async def test_file_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    async with trio.open_nursery() as nursery:
        store = SQLiteStore(path)
        await nursery.start(store.run)
        ids = await store.create_runs([create(), create()], 1.0)
        await store.claim_runs(["m:f"], 1, "gone", 1.0)
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        store = SQLiteStore(path)
        await nursery.start(store.run)
        recovered = await store.release_all(2.0)
        assert len(recovered.changed) == 1
        runs = await store.read_runs(ids)
        assert {r.state for r in runs} == {S.SCHEDULED}
        ids2 = await store.create_runs([create()], 3.0)
        listed = await store.list_runs(None, None, 10, 0)
        assert [r.id for r in listed] == [*ids2, *reversed(ids)]  # newest first; seq carries on
        nursery.cancel_scope.cancel()


async def test_cancel_queued_running_and_ended(memory_store: SQLiteStore) -> None:
    from trio_taskworker._states import IllegalTransition

    queued, leased, running = await memory_store.create_runs([create(), create(), create()], 1.0)
    run, owner = await memory_store.cancel_run(queued, 2.0)
    assert (run.state, owner) == (S.CANCELLED, None)
    claimed = await memory_store.claim_runs(["m:f"], 2, "c1", 2.0)
    assert {r.id for r in claimed} == {leased, running}
    run, owner = await memory_store.cancel_run(leased, 3.0)
    assert (run.state, owner) == (S.CANCELLED, "c1")  # never starts
    (r,) = [c for c in claimed if c.id == running]
    await memory_store.apply_reports("c1", [Started(id=running, attempt=r.attempt)], 3.0)
    run, owner = await memory_store.cancel_run(running, 4.0)
    assert (run.state, owner) == (S.CANCELLING, "c1")
    # The worker reports it finished anyway (a sync task that returned): still CANCELLED.
    await memory_store.apply_reports(
        "c1", [Finished(id=running, attempt=r.attempt, state=S.COMPLETED, result=b"x")], 5.0
    )
    (run,) = await memory_store.read_runs([running])
    assert run.state is S.CANCELLED and run.result is None
    refused = await memory_store.apply_reports("c1", [Started(id=leased, attempt=1)], 5.0)
    assert refused.rejected
    with pytest.raises(IllegalTransition):
        await memory_store.cancel_run(running, 6.0)
    with pytest.raises(StoreError):
        await memory_store.cancel_run(uuid.uuid4(), 6.0)


async def test_cancelling_run_whose_worker_vanishes_is_cancelled(
    memory_store: SQLiteStore,
) -> None:
    run_id, attempt = await _leased(memory_store)
    await memory_store.apply_reports("c1", [Started(id=run_id, attempt=attempt)], 2.0)
    await memory_store.cancel_run(run_id, 3.0)
    outcome = await memory_store.release_owner("c1", 4.0)
    assert outcome.changed[0].state is S.CANCELLED


async def test_an_operation_that_raises_is_undone_alone(memory_store: SQLiteStore) -> None:
    """The writer runs a batch without savepoints; when one operation raises, the
    batch is undone and run again with a savepoint around each operation."""
    (existing,) = await memory_store.create_runs([create()], 1.0)
    results: dict[str, object] = {}

    def write_then_fail(cur: Any) -> None:
        cur.execute("UPDATE task_runs SET task_name = 'changed'")
        raise ValueError("refused after writing")

    async def bad() -> None:
        try:
            await memory_store.runner.transact(write_then_fail)
        except ValueError as exc:
            results["bad"] = exc

    async def good() -> None:
        results["good"] = await memory_store.create_runs([create("m:g")], 2.0)

    async with trio.open_nursery() as nursery:  # both join one batch
        nursery.start_soon(good)
        nursery.start_soon(bad)
        nursery.start_soon(good)
    assert isinstance(results["bad"], ValueError)
    runs = await memory_store.list_runs(None, None, 10, 0)
    assert len(runs) == 3  # both good operations committed, each once
    assert all(r.task_name != "changed" for r in runs)  # the failed write was undone
    assert existing in {r.id for r in runs}


async def test_counts_and_listings_read_beside_the_writer(tmp_path: Path) -> None:
    """On a file, the reads that may scan the table (counts, task statistics,
    listings) use a second connection in a worker thread: they finish while the
    writer is busy, and never run on the event loop's thread."""
    store = SQLiteStore(tmp_path / "runs.sqlite", threaded=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        (run_id,) = await store.create_runs([create()], 1.0)
        release = threading.Event()
        writing = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def hold(cur: Any) -> None:
            token.run_sync_soon(writing.set)
            release.wait(10)  # the writer's thread waits here until the reads are done
            cur.execute("UPDATE task_runs SET name = 'held' WHERE id = ?", (str(run_id),))

        async def write() -> None:
            await store.runner.transact(hold)

        nursery.start_soon(write)
        await writing.wait()
        try:
            with trio.fail_after(10):
                assert (await store.counts())["SCHEDULED"] == 1
                assert [r.id for r in await store.list_runs(None, None, 10, 0)] == [run_id]
                (stats,) = await store.task_stats(2.0, {})
                assert stats.queued == 1
                thread = await store.runner.read(lambda cur: threading.get_ident())
                assert thread != threading.get_ident()
        finally:
            release.set()
        # The write went on after them, and a read sees it once it has committed.
        await store.runner.transact(lambda cur: None)
        (listed,) = await store.list_runs(None, None, 10, 0)
        assert listed.name == "held"
        nursery.cancel_scope.cancel()
    with pytest.raises(StoreError, match="closed"):
        await store.counts()


class _HeldRead:
    """A read that holds its snapshot until released (in the reader's thread)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.reading = trio.Event()
        self.token = trio.lowlevel.current_trio_token()

    def __call__(self, cur: Any) -> int:
        cur.execute("SELECT COUNT(*) FROM task_runs")
        (n,) = cur.fetchone()
        self.token.run_sync_soon(self.reading.set)
        self.release.wait(10)
        return int(n)


async def test_the_writer_checkpoints_between_reads_so_that_the_log_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint made while a read holds a snapshot cannot let the log start
    over; under steady reads the log would grow and the writer checkpoint after
    every batch. A checkpoint that comes due during a read waits for it to end
    (new reads wait meanwhile), and is then complete."""
    from trio_taskworker._server import _sqlite

    results: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        _sqlite,
        "_checkpoint",
        lambda conn: results.append(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()),
    )
    for name in ("CHECKPOINT_CHANGES", "CHECKPOINT_BYTES"):
        monkeypatch.setattr(_sqlite, name, 10**12)
    monkeypatch.setattr(_sqlite, "CHECKPOINT_BATCHES", 5)
    store = SQLiteStore(tmp_path / "runs.sqlite", threaded=False)
    batches: list[int] = []
    store.runner.on_batch = lambda operations, seconds: batches.append(operations)  # type: ignore[attr-defined]
    later: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.create_runs([create()], 1.0)
        held = _HeldRead()
        nursery.start_soon(store.runner.read, held)
        await held.reading.wait()
        for _ in range(6):
            await store.create_runs([create()], 1.0)
        assert results == []  # due, and waiting for the read to end

        read_done = trio.Event()

        async def read_later() -> None:
            later.append(await store.runner.read(lambda cur: 1))
            read_done.set()

        nursery.start_soon(read_later)
        await trio.testing.wait_all_tasks_blocked()
        assert later == []  # new reads wait for the checkpoint
        written = len(batches)
        held.release.set()
        with trio.fail_after(10):
            await read_done.wait()  # no write comes: the read's end has the writer look
        ((busy, logged, copied),) = results
        assert busy == 0 and logged == copied  # complete: the log starts over
        assert len(batches) == written  # and that look was no transaction
        nursery.cancel_scope.cancel()


async def test_a_read_that_fails_keeps_its_error_and_the_reader(tmp_path: Path) -> None:
    """SQLite may end a read's transaction itself (out of memory or disk): the
    error is the read's, not the ROLLBACK's, and the next read works."""
    import sqlite3

    store = SQLiteStore(tmp_path / "runs.sqlite", threaded=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)

        def fails(cur: Any) -> None:
            cur.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")

        with pytest.raises(_store.StoreUnavailable, match="disk I/O error"):
            await store.runner.read(fails)
        assert (await store.counts())["SCHEDULED"] == 0
        nursery.cancel_scope.cancel()


async def test_reads_queued_as_the_store_stops_find_it_closed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "runs.sqlite", threaded=False)
    outcomes: list[object] = []
    async with trio.open_nursery() as outer, trio.open_nursery() as inner:
        await inner.start(store.run)
        held = _HeldRead()
        outer.start_soon(store.runner.read, held)
        await held.reading.wait()

        async def queued() -> None:
            try:
                outcomes.append(await store.counts())
            except StoreError as exc:
                outcomes.append(exc)

        outer.start_soon(queued)
        await trio.testing.wait_all_tasks_blocked()
        inner.cancel_scope.cancel()  # the store stops; it waits for the read in flight
        held.release.set()
    (outcome,) = outcomes
    assert isinstance(outcome, StoreError) and "closed" in str(outcome)


async def test_a_second_connection_that_cannot_open_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from trio_taskworker import ConfigurationError
    from trio_taskworker._server import _sqlite

    real_connect = sqlite3.connect
    calls: list[object] = []

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        calls.append(args)
        if len(calls) == 2:
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(_sqlite.sqlite3, "connect", connect)
    store = SQLiteStore(tmp_path / "runs.sqlite", threaded=False)
    with pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
    (error,) = caught.value.exceptions
    assert isinstance(error, ConfigurationError)
    assert "runs.sqlite: cannot open a second connection" in str(error)


async def test_without_reads_waits_for_the_read_in_flight_and_holds_new_ones(
    tmp_path: Path,
) -> None:
    """What the retention sweep runs its log truncation in."""
    store = SQLiteStore(tmp_path / "runs.sqlite", threaded=False)
    runner = store.runner
    assert isinstance(runner, SQLiteRunner)
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        held = _HeldRead()
        nursery.start_soon(runner.read, held)
        await held.reading.wait()
        all_done = trio.Event()

        async def read_after() -> None:
            await runner.read(lambda cur: None)
            order.append("read")
            all_done.set()

        async def quiet() -> None:
            async with runner.without_reads():
                order.append("quiet")
                nursery.start_soon(read_after)
                await trio.testing.wait_all_tasks_blocked()
                assert runner._reading.statistics().tasks_waiting == 1  # the new read waits
                order.append("quiet done")

        nursery.start_soon(quiet)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # it waits for the read in flight
        held.release.set()
        with trio.fail_after(10):
            await all_done.wait()
        assert order == ["quiet", "quiet done", "read"]
        nursery.cancel_scope.cancel()


async def test_a_reader_outside_the_server_does_not_make_reads_wait_for_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot held outside the server (a shell, a backup) keeps the log
    from starting over whatever the server does: then its reads do not wait for
    checkpoints, until one completes again."""
    import sqlite3

    from trio_taskworker._server import _sqlite

    for name in ("CHECKPOINT_CHANGES", "CHECKPOINT_BYTES"):
        monkeypatch.setattr(_sqlite, name, 10**12)
    monkeypatch.setattr(_sqlite, "CHECKPOINT_BATCHES", 2)
    path = tmp_path / "runs.sqlite"
    store = SQLiteStore(path, threaded=False)
    runner = store.runner
    assert isinstance(runner, SQLiteRunner)

    async def write(n: int) -> None:
        for _ in range(n):
            await store.create_runs([create()], 1.0)
        await store.runner.transact(lambda cur: None)  # after the checkpoint, if one was due

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await write(1)
        outside = sqlite3.connect(path)
        outside.execute("BEGIN")
        outside.execute("SELECT COUNT(*) FROM task_runs").fetchone()
        await write(2)
        assert runner._pause_reads_for_checkpoints is False  # that one left the log partly copied
        held = _HeldRead()
        read_done = trio.Event()

        async def hold_a_read() -> None:
            await runner.read(held)
            read_done.set()

        nursery.start_soon(hold_a_read)
        await held.reading.wait()
        await write(3)
        assert runner._reads_paused is None  # due, but pausing reads would buy nothing
        held.release.set()
        await read_done.wait()
        outside.rollback()
        outside.close()
        await write(2)
        assert runner._pause_reads_for_checkpoints is True  # complete again
        nursery.cancel_scope.cancel()


def _files(path: Path) -> tuple[int, int]:
    """The sizes of the database file and of its write-ahead log."""
    return path.stat().st_size, path.with_name(path.name + "-wal").stat().st_size


async def test_the_writer_copies_the_log_back_between_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's checkpoint inside a commit is off: without the writer's own,
    everything stays in the log; with it, the log is copied back into the
    database file."""
    from trio_taskworker._server import _sqlite

    async def write(path: Path) -> tuple[int, int]:
        store = SQLiteStore(path, threaded=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            run = TaskRunCreate(task_key="m:f", parameters=bytes(2000))
            for _ in range(300):
                await store.create_runs([run], 1.0)
            sizes = _files(path)
            nursery.cancel_scope.cancel()
        return sizes

    for name in ("CHECKPOINT_BATCHES", "CHECKPOINT_CHANGES", "CHECKPOINT_BYTES"):
        monkeypatch.setattr(_sqlite, name, 10**12)
    database, unchecked = await write(tmp_path / "a.sqlite")
    assert unchecked > 300 * 2000 and database < 300 * 2000  # all of it in the log
    monkeypatch.setattr(_sqlite, "CHECKPOINT_BATCHES", 20)
    database, log = await write(tmp_path / "b.sqlite")
    assert database > 300 * 2000  # copied back
    assert log < unchecked / 5  # and the log started over (20 batches' worth)


async def test_the_write_ahead_log_stays_bounded_in_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few large transactions (blob uploads of up to 64 MiB) fill the log
    long before 200 batches. Past CHECKPOINT_BYTES the writer checkpoints,
    and the log starts over: it never holds much more than that and one
    transaction."""
    from trio_taskworker._server import _sqlite

    async def upload(path: Path, database: Path | None = None) -> int:
        store = SQLiteStore(path, threaded=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for _ in range(40):
                await store.put_blob(bytes(64 * 1024), 1.0)
            _, log = _files(database or path)
            nursery.cancel_scope.cancel()
        return log

    for name in ("CHECKPOINT_BATCHES", "CHECKPOINT_CHANGES", "CHECKPOINT_BYTES"):
        monkeypatch.setattr(_sqlite, name, 10**12)
    unbounded = await upload(tmp_path / "a.sqlite")
    monkeypatch.setattr(_sqlite, "CHECKPOINT_BYTES", 256 * 1024)
    bounded = await upload(tmp_path / "b.sqlite")
    # A bound, and the database behind a symlink (SQLite names the log after
    # the file it resolves to).
    real = tmp_path / "volume" / "c.sqlite"
    real.parent.mkdir()
    real.touch()
    (tmp_path / "c.sqlite").symlink_to(real)
    behind_a_link = await upload(tmp_path / "c.sqlite", real)
    assert unbounded > 40 * 64 * 1024
    for log in (bounded, behind_a_link):
        assert log <= 256 * 1024 + 2 * 90 * 1024, f"the log holds {log} bytes"


def test_a_history_line_with_text_that_is_not_unicode_is_kept_readable() -> None:
    from trio_taskworker._server._store import _entry, _parse_history

    (change,) = _parse_history(_entry("FAILED", 1, "bad name \udcff", 1.5))
    assert change.message == "bad name \\udcff" and change.state is TaskRunState.FAILED


async def test_every_operation_queued_at_shutdown_fails_with_store_error(
    tmp_path: Path,
) -> None:
    """Each one is told the store closed (they shared one outcome, which
    unwraps once: the second caller got AlreadyUsedError)."""
    import threading

    store = SQLiteStore(tmp_path / "q.sqlite", threaded=True)
    release = threading.Event()
    errors: list[str] = []

    async def queued() -> None:
        try:
            await store.runner.transact(lambda cur: None)
        except Exception as exc:
            errors.append(type(exc).__name__)

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        nursery.start_soon(store.runner.transact, lambda cur: release.wait(10))
        await trio.testing.wait_all_tasks_blocked()  # the writer waits on that batch
        async with trio.open_nursery() as callers:
            for _ in range(3):
                callers.start_soon(queued)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
            release.set()
    assert errors == ["StoreError"] * 3
