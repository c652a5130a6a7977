"""The store contract: one suite of store behaviours, run unchanged on SQLite and PostgreSQL.

Each test gets a fresh database: a SQLite file in ``tmp_path``, or a PostgreSQL
database ``ttw_test_<random>`` created on the server named by
``TRIO_TASKWORKER_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``) and dropped at teardown.

When PostgreSQL cannot be reached, its cases FAIL, saying so: CI starts
PostgreSQL, and a silent skip would hide a broken CI. Set
``TRIO_TASKWORKER_TEST_POSTGRES=skip`` to skip them instead.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_taskworker import ConfigurationError, TaskRunState
from trio_taskworker._models import (
    OPTION_NAMES,
    ErrorInfo,
    Finished,
    LogRecord,
    Released,
    Started,
    TaskRunCreate,
    option_values,
)
from trio_taskworker._server import SQLiteStore
from trio_taskworker._server._store import (
    IDEMPOTENCY_SECONDS,
    SCHEMA_VERSION,
    Idempotency,
    IdempotencyConflict,
    Store,
    StoreError,
)
from trio_taskworker._states import IllegalTransition

S = TaskRunState

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# --- PostgreSQL databases for tests -------------------------------------------------


def admin_url() -> str:
    """The PostgreSQL URL the tests create their databases through."""
    return os.environ.get("TRIO_TASKWORKER_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)


def require_postgres() -> None:
    """Fail (or skip, with ``TRIO_TASKWORKER_TEST_POSTGRES=skip``) when PostgreSQL
    or its driver is not there."""
    skip = os.environ.get("TRIO_TASKWORKER_TEST_POSTGRES", "") == "skip"
    try:
        import psycopg
    except ImportError:
        problem = "psycopg is not installed (pip install 'trio-taskworker[postgres]')"
    else:
        try:
            with psycopg.connect(admin_url(), connect_timeout=5, autocommit=True):
                return
        except psycopg.Error as exc:
            from trio_taskworker._client import redact_url

            problem = f"PostgreSQL is not reachable at {redact_url(admin_url())}: {exc}"
    if skip:
        pytest.skip(f"{problem} (TRIO_TASKWORKER_TEST_POSTGRES=skip)")
    pytest.fail(
        f"{problem}. Start PostgreSQL, point TRIO_TASKWORKER_TEST_POSTGRES_URL at one,"
        " or set TRIO_TASKWORKER_TEST_POSTGRES=skip to skip the PostgreSQL cases.",
        pytrace=False,
    )


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """Create an empty database ``ttw_test_<random>``; yield its URL; drop it."""
    require_postgres()
    import psycopg

    name = f"ttw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    parts = urllib.parse.urlsplit(admin_url())
    try:
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin_url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- the backends -------------------------------------------------------------------


@attrs.define
class Backend:
    """One fresh database and a way to open stores on it."""

    name: str
    new_store: Callable[[], Store]

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Store]:
        """A store on this database, running until the block ends."""
        store = self.new_store()
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield store
            nursery.cancel_scope.cancel()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "runs.sqlite3"
        yield Backend("sqlite", lambda: SQLiteStore(path, threaded=False))
        return
    with postgres_database() as url:
        from trio_taskworker._server._postgres import PostgresStore

        yield Backend("postgresql", lambda: PostgresStore(url, min_size=1, max_size=4))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    async with backend.open() as opened:
        yield opened


def create(key: str = "m:f", **kwargs: Any) -> TaskRunCreate:
    return TaskRunCreate(task_key=key, parameters=b"p", **kwargs)


def at(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


async def leased(store: Store, owner: str = "c1", **kwargs: Any) -> tuple[uuid.UUID, int]:
    (run_id,) = await store.create_runs([create(**kwargs)], now=1.0)
    (run,) = await store.claim_runs(["m:f"], 1, owner, now=1.0)
    assert run.id == run_id
    return run.id, run.attempt


async def finish(
    store: Store, run_id: uuid.UUID, attempt: int, now: float, state: S = S.COMPLETED, **kw: Any
) -> None:
    outcome = await store.apply_reports(
        "c1",
        [
            Started(id=run_id, attempt=attempt),
            Finished(id=run_id, attempt=attempt, state=state, **kw),
        ],
        now,
    )
    assert not outcome.rejected


# --- creating, reading, listing -----------------------------------------------------


async def test_create_read_and_count(store: Store) -> None:
    ids = await store.create_runs([create(), create("m:g", name="named")], now=100.0)
    runs = {r.id: r for r in await store.read_runs(ids)}
    assert [runs[i].task_key for i in ids] == ["m:f", "m:g"]
    assert all(r.state is S.SCHEDULED and r.parameters == b"p" for r in runs.values())
    assert runs[ids[0]].created_at == runs[ids[0]].scheduled_time == at(100.0)
    assert runs[ids[1]].name == "named" and runs[ids[0]].task_name == "m:f"
    assert await store.read_runs([uuid.uuid4()]) == []
    counts = await store.counts()
    assert counts["SCHEDULED"] == 2 and set(counts) == {s.value for s in S}


async def test_every_option_is_stored(store: Store) -> None:
    options = {
        "retries": 2,
        "retry_delay_seconds": 1.5,
        "timeout_seconds": 9.0,
        "max_redeliveries": 4,
        "tags": ("a", "b"),
    }
    assert set(options) == set(OPTION_NAMES)  # a new option needs a value here
    created = create(**options)
    (run_id,) = await store.create_runs([created], now=1.0)
    (run,) = await store.read_runs([run_id])
    (listed,) = await store.list_runs(None, None, 10, 0)
    assert option_values(run) == option_values(listed) == option_values(created) == options


async def test_lists_are_newest_first_with_filters_and_pages(store: Store) -> None:
    first = await store.create_runs([create("a"), create("b")], now=1.0)
    second = await store.create_runs([create("a"), create("b")], now=2.0)
    newest_first = [*reversed(second), *reversed(first)]
    listed = await store.list_runs(None, None, 10, 0)
    assert [r.id for r in listed] == newest_first
    assert all(r.parameters is None for r in listed)  # lists leave payloads out
    assert [r.id for r in await store.list_runs(None, None, 2, 1)] == newest_first[1:3]
    assert [r.id for r in await store.list_runs(None, "a", 10, 0)] == [second[0], first[0]]
    await store.cancel_run(first[1], 3.0)
    assert [r.id for r in await store.list_runs(S.CANCELLED, None, 10, 0)] == [first[1]]
    assert [r.id for r in await store.list_runs(S.SCHEDULED, "b", 10, 0)] == [second[1]]
    assert await store.list_runs(S.RUNNING, None, 10, 0) == []


async def test_the_tag_filter_matches_whole_tags_only(store: Store) -> None:
    tags = {
        "plain": ("x",),
        "longer": ("xy",),
        "two": ("y", "x"),
        "percent": ("50%",),
        "under": ("a_b",),
        "quote": ('say "x"',),
        "backslash": ("back\\slash",),
        "comma": ("x, y",),
        "upper": ("Prod",),
        "lower": ("prod",),
    }
    ids = {}
    for label, run_tags in tags.items():
        (ids[label],) = await store.create_runs([create(tags=run_tags)], now=1.0)

    async def tagged(tag: str) -> set[str]:
        found = {r.id for r in await store.list_runs(None, None, 100, 0, tag=tag)}
        return {label for label, run_id in ids.items() if run_id in found}

    assert await tagged("x") == {"plain", "two"}
    assert await tagged("50%") == {"percent"}
    assert await tagged("50") == set()
    assert await tagged("a_b") == {"under"}
    assert await tagged("aXb") == set()
    assert await tagged('say "x"') == {"quote"}
    assert await tagged("back\\slash") == {"backslash"}
    assert await tagged("x, y") == {"comma"}
    assert await tagged("y") == {"two"}
    assert await tagged("prod") == {"lower"}  # case counts, on every database
    assert await tagged("X") == set()


async def test_a_missing_parameters_blob_refuses_the_whole_batch(store: Store) -> None:
    bad = TaskRunCreate(task_key="k", parameters_ref=str(uuid.uuid4()))
    with pytest.raises(StoreError, match="no stored blob"):
        await store.create_runs([create(), bad], 1.0)
    assert await store.list_runs(None, None, 10, 0) == []
    # The store goes on serving after a refusal.
    assert len(await store.create_runs([create()], 2.0)) == 1


async def test_a_cached_result_completes_a_new_run(store: Store) -> None:
    run_id, attempt = await leased(store, cache_key="ck", cache_expiration=100.0)
    await finish(store, run_id, attempt, 10.0, result=b"cached", result_preview="'cached'")
    (hit,) = await store.create_runs([create(cache_key="ck")], now=50.0)
    (run,) = await store.read_runs([hit])
    assert (run.state, run.result, run.attempt) == (S.COMPLETED, b"cached", 0)
    assert str(run_id) in (run.message or "")
    (miss,) = await store.create_runs([create(cache_key="ck")], now=200.0)  # expired
    (run,) = await store.read_runs([miss])
    assert run.state is S.SCHEDULED


async def test_seq_carries_on_after_reopening(backend: Backend) -> None:
    async with backend.open() as store:
        ids = await store.create_runs([create(), create()], 1.0)
        await store.claim_runs(["m:f"], 1, "gone", 1.0)
    async with backend.open() as store:
        recovered = await store.release_all(2.0)
        assert len(recovered.changed) == 1
        assert {r.state for r in await store.read_runs(ids)} == {S.SCHEDULED}
        later = await store.create_runs([create()], 3.0)
        listed = await store.list_runs(None, None, 10, 0)
        assert [r.id for r in listed] == [*later, *reversed(ids)]


async def test_the_schema_version_is_recorded_and_a_newer_one_refused(backend: Backend) -> None:
    async with backend.open() as store:

        def version(cur: Any) -> list[int]:
            cur.execute("SELECT version FROM schema_version")
            return [int(row[0]) for row in cur.fetchall()]

        assert await store.runner.transact(version) == [SCHEMA_VERSION]
        await store.runner.transact(
            lambda cur: cur.execute(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
        )
    refused = pytest.RaisesExc(ConfigurationError, match="newer")
    with pytest.RaisesGroup(refused, flatten_subgroups=True):
        async with backend.open():
            pass  # pragma: no cover


async def test_a_row_stored_under_older_rules_stays_readable(store: Store) -> None:
    (run_id,) = await store.create_runs([create()], now=1.0)
    mark = store.runner.dialect.placeholder
    await store.runner.transact(
        lambda cur: cur.execute(
            f"UPDATE task_runs SET retry_delay_seconds = {mark}, timeout_seconds = {mark}",
            (float("inf"), float("nan")),
        )
    )
    (run,) = await store.read_runs([run_id])
    assert run.retry_delay_seconds == float("inf")
    assert [r.id for r in await store.list_runs(None, None, 10, 0)] == [run_id]
    (claimed,) = await store.claim_runs(["m:f"], 1, "conn", 2.0)
    assert claimed.id == run_id and claimed.state is S.PENDING


# --- claims -------------------------------------------------------------------------


async def test_claims_are_round_robin_and_never_twice(store: Store) -> None:
    await store.create_runs([create("a") for _ in range(10)], now=1.0)
    await store.create_runs([create("b") for _ in range(2)], now=2.0)
    claimed = await store.claim_runs(["a", "b"], 4, "conn", now=5.0)
    assert [r.task_key for r in claimed] == ["a", "b", "a", "b"]
    assert all(r.state is S.PENDING and r.attempt == 1 for r in claimed)
    again = await store.claim_runs(["a", "b"], 100, "conn2", now=5.0)
    assert len(again) == 8 and {r.task_key for r in again} == {"a"}
    assert not {r.id for r in claimed} & {r.id for r in again}
    assert await store.claim_runs(["a", "b"], 100, "conn3", now=5.0) == []
    assert await store.lease_counts() == {"conn": 4, "conn2": 8}


async def test_claims_take_the_oldest_due_first(store: Store) -> None:
    (late,) = await store.create_runs([create(scheduled_time=at(50.0))], now=10.0)
    (early,) = await store.create_runs([create(scheduled_time=at(20.0))], now=11.0)
    assert await store.claim_runs(["m:f"], 5, "c", now=19.9) == []
    assert await store.next_due(["m:f"]) == 20.0
    assert await store.next_due(["other"]) is None
    assert [r.id for r in await store.claim_runs(["m:f"], 5, "c", now=20.0)] == [early]
    assert [r.id for r in await store.claim_runs(["m:f"], 5, "c", now=60.0)] == [late]


async def test_concurrent_claims_never_lease_a_run_twice(store: Store) -> None:
    created = set(await store.create_runs([create() for _ in range(200)], now=1.0))
    got: list[uuid.UUID] = []

    async def claimer(owner: str) -> None:
        while runs := await store.claim_runs(["m:f"], 7, owner, now=2.0):
            got.extend(r.id for r in runs)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(claimer, f"c{i}")
    assert len(got) == len(set(got)) == 200 and set(got) == created


# --- reports and fencing ------------------------------------------------------------


async def test_reports_complete_a_run(store: Store) -> None:
    run_id, attempt = await leased(store)
    outcome = await store.apply_reports(
        "c1",
        [
            Started(id=run_id, attempt=attempt),
            Finished(id=run_id, attempt=attempt, state=S.COMPLETED, result=b"r"),
        ],
        now=2.0,
    )
    assert not outcome.rejected and [r.state for r in outcome.changed] == [S.COMPLETED]
    (run,) = await store.read_runs([run_id])
    assert (run.state, run.result, run.started_at, run.finished_at) == (
        S.COMPLETED,
        b"r",
        at(2.0),
        at(2.0),
    )
    assert await store.lease_counts() == {}


async def test_one_batch_of_reports_of_different_shapes(store: Store) -> None:
    """Runs of one batch whose reports change different columns are each written
    as their own reports say (the batch groups runs by the columns they change)."""
    ids = await store.create_runs([create() for _ in range(5)], now=1.0)
    runs = {r.id: r for r in await store.claim_runs(["m:f"], 5, "c1", now=1.0)}
    done, started, failed, retried, stale = ids
    error = ErrorInfo(type="ValueError", message="no")
    outcome = await store.apply_reports(
        "c1",
        [
            Started(id=done, attempt=runs[done].attempt),
            Started(id=started, attempt=runs[started].attempt),
            Started(id=failed, attempt=runs[failed].attempt),
            Finished(id=done, attempt=runs[done].attempt, state=S.COMPLETED, result=b"r1"),
            Finished(
                id=failed, attempt=runs[failed].attempt, state=S.FAILED, error=error, retry=False
            ),
            Started(id=retried, attempt=runs[retried].attempt),
            Started(id=stale, attempt=runs[stale].attempt + 1),
        ],
        now=2.0,
    )
    assert [run_id for run_id, _ in outcome.rejected] == [stale]
    assert {r.id: r.state for r in outcome.changed} == {
        done: S.COMPLETED,
        started: S.RUNNING,
        failed: S.FAILED,
        retried: S.RUNNING,
    }
    now = {r.id: r for r in await store.read_runs(ids)}
    assert (now[done].result, now[done].finished_at) == (b"r1", at(2.0))
    assert (now[started].started_at, now[started].finished_at) == (at(2.0), None)
    assert now[failed].error == error and now[failed].result is None
    assert now[stale].state is S.PENDING and now[stale].started_at is None
    history = await store.read_history(done)
    assert history is not None
    assert [c.state for c in history] == [S.SCHEDULED, S.PENDING, S.RUNNING, S.COMPLETED]


async def test_fencing_by_owner_and_attempt(store: Store) -> None:
    run_id, attempt = await leased(store)
    foreign = await store.apply_reports("c2", [Started(id=run_id, attempt=attempt)], 2.0)
    assert foreign.rejected and "stale lease" in foreign.rejected[0][1]
    await store.release_owner("c1", now=3.0)
    (again,) = await store.claim_runs(["m:f"], 1, "c2", now=3.0)
    assert again.attempt == attempt + 1
    late = await store.apply_reports(
        "c1", [Finished(id=run_id, attempt=attempt, state=S.COMPLETED, result=b"old")], 4.0
    )
    assert late.rejected and not late.changed
    stale = await store.apply_reports("c2", [Started(id=run_id, attempt=attempt)], 4.0)
    assert stale.rejected
    unknown = await store.apply_reports("c2", [Started(id=uuid.uuid4(), attempt=1)], 4.0)
    assert unknown.rejected[0][1] == "no such run"
    # Finished before Started: PENDING cannot become COMPLETED.
    illegal = await store.apply_reports(
        "c2", [Finished(id=run_id, attempt=again.attempt, state=S.COMPLETED)], 5.0
    )
    assert "cannot become COMPLETED" in illegal.rejected[0][1]
    (run,) = await store.read_runs([run_id])
    assert (run.state, run.attempt) == (S.PENDING, again.attempt)


async def test_a_result_ref_naming_no_blob_is_refused(store: Store) -> None:
    run_id, attempt = await leased(store)
    outcome = await store.apply_reports(
        "c1",
        [
            Started(id=run_id, attempt=attempt),
            Finished(id=run_id, attempt=attempt, state=S.COMPLETED, result_ref="nope"),
        ],
        2.0,
    )
    assert [reason for _, reason in outcome.rejected] == ["no stored blob 'nope' for result_ref"]


async def test_a_failure_with_retries_goes_back_to_the_queue(store: Store) -> None:
    run_id, attempt = await leased(store, retries=1, retry_delay_seconds=30.0)
    error = ErrorInfo(type="builtins.ValueError", message="no")
    await finish(store, run_id, attempt, 10.0, state=S.FAILED, result=b"e", error=error)
    (run,) = await store.read_runs([run_id])
    assert (run.state, run.retry_count, run.scheduled_time) == (S.SCHEDULED, 1, at(40.0))
    assert run.error == error
    assert await store.claim_runs(["m:f"], 1, "c1", now=39.0) == []
    (again,) = await store.claim_runs(["m:f"], 1, "c1", now=40.0)
    await finish(store, run_id, again.attempt, 41.0, state=S.FAILED, result=b"e", error=error)
    (run,) = await store.read_runs([run_id])
    assert (run.state, run.result, run.attempt) == (S.FAILED, b"e", 2)


# --- releases, redelivery, cancel, retry --------------------------------------------


async def test_release_requeues_pending_redelivers_running_within_limits(store: Store) -> None:
    await store.create_runs([create(max_redeliveries=1), create(max_redeliveries=1)], 1.0)
    first, second = await store.claim_runs(["m:f"], 2, "c1", now=1.0)
    await store.apply_reports("c1", [Started(id=first.id, attempt=first.attempt)], 2.0)
    outcome = await store.release_owner("c1", now=3.0)
    states = {r.id: r for r in outcome.changed}
    assert states[first.id].state is S.SCHEDULED and states[first.id].redeliveries == 1
    assert states[second.id].state is S.SCHEDULED and states[second.id].redeliveries == 0
    assert outcome.redelivered == ("m:f",) and outcome.requeued
    (run,) = [r for r in await store.claim_runs(["m:f"], 2, "c2", 4.0) if r.id == first.id]
    await store.apply_reports("c2", [Started(id=run.id, attempt=run.attempt)], 5.0)
    outcome = await store.release_owner("c2", now=6.0)
    crashed = {r.id: r for r in outcome.changed}[first.id]
    assert crashed.state is S.CRASHED and "redelivered 1 times" in (crashed.message or "")
    assert (await store.release_owner("c2", now=7.0)).changed == ()


async def test_release_all_frees_every_lease(store: Store) -> None:
    await store.create_runs([create() for _ in range(3)], 1.0)
    await store.claim_runs(["m:f"], 1, "a", 1.0)
    await store.claim_runs(["m:f"], 2, "b", 1.0)
    outcome = await store.release_all(2.0)
    assert len(outcome.changed) == 3 and await store.lease_counts() == {}


async def test_a_release_by_the_worker_is_not_counted(store: Store) -> None:
    run_id, attempt = await leased(store)
    await store.apply_reports(
        "c1",
        [Started(id=run_id, attempt=attempt), Released(id=run_id, attempt=attempt, reason="stop")],
        2.0,
    )
    (run,) = await store.read_runs([run_id])
    assert (run.state, run.redeliveries, run.message) == (S.SCHEDULED, 0, "stop")


async def test_cancel_queued_leased_running_ended_and_unknown(store: Store) -> None:
    queued, leased_id, running = await store.create_runs([create(), create(), create()], 1.0)
    run, owner = await store.cancel_run(queued, 2.0)
    assert (run.state, owner) == (S.CANCELLED, None)
    claimed = await store.claim_runs(["m:f"], 2, "c1", 2.0)
    assert {r.id for r in claimed} == {leased_id, running}
    run, owner = await store.cancel_run(leased_id, 3.0)
    assert (run.state, owner) == (S.CANCELLED, "c1")
    (r,) = [c for c in claimed if c.id == running]
    await store.apply_reports("c1", [Started(id=running, attempt=r.attempt)], 3.0)
    run, owner = await store.cancel_run(running, 4.0)
    assert (run.state, owner) == (S.CANCELLING, "c1")
    await store.apply_reports(
        "c1", [Finished(id=running, attempt=r.attempt, state=S.COMPLETED, result=b"x")], 5.0
    )
    (run,) = await store.read_runs([running])
    assert run.state is S.CANCELLED and run.result is None
    with pytest.raises(IllegalTransition):
        await store.cancel_run(running, 6.0)
    with pytest.raises(StoreError):
        await store.cancel_run(uuid.uuid4(), 6.0)


async def test_a_cancelling_run_whose_worker_vanishes_is_cancelled(store: Store) -> None:
    run_id, attempt = await leased(store)
    await store.apply_reports("c1", [Started(id=run_id, attempt=attempt)], 2.0)
    await store.cancel_run(run_id, 3.0)
    outcome = await store.release_owner("c1", 4.0)
    assert outcome.changed[0].state is S.CANCELLED


async def test_retry_run_queues_an_ended_run_again(store: Store) -> None:
    run_id, attempt = await leased(store)
    error = ErrorInfo(type="builtins.ValueError", message="no")
    await finish(store, run_id, attempt, 2.0, state=S.FAILED, error=error)
    run = await store.retry_run(run_id, 3.0)
    assert (run.state, run.error, run.finished_at, run.scheduled_time) == (
        S.SCHEDULED,
        None,
        None,
        at(3.0),
    )
    (again,) = await store.claim_runs(["m:f"], 1, "c1", 3.0)
    assert again.attempt == attempt + 1
    await finish(store, run_id, again.attempt, 4.0)
    with pytest.raises(IllegalTransition):
        await store.retry_run(run_id, 5.0)  # COMPLETED
    with pytest.raises(StoreError):
        await store.retry_run(uuid.uuid4(), 5.0)


# --- history and logs ---------------------------------------------------------------


async def test_history_records_every_state_change_in_order(store: Store) -> None:
    run_id, attempt = await leased(store)
    await finish(store, run_id, attempt, 2.0)
    history = await store.read_history(run_id)
    assert history is not None
    assert [(h.state, h.attempt) for h in history] == [
        (S.SCHEDULED, 0),
        (S.PENDING, 1),
        (S.RUNNING, 1),
        (S.COMPLETED, 1),
    ]
    assert history[-1].timestamp == at(2.0)
    assert await store.read_history(uuid.uuid4()) is None


async def test_logs_are_bounded_per_run(store: Store) -> None:
    store.max_logs_per_run = 3
    run_id, _ = await leased(store)

    def record(i: int, run: uuid.UUID = run_id) -> LogRecord:
        return LogRecord(
            run_id=run, attempt=1, timestamp=at(10.0 + i), level="INFO", message=f"m{i}"
        )

    assert await store.put_logs([record(0), record(1)]) == (2, 0, 0)
    assert await store.put_logs([record(2), record(3), record(4, uuid.uuid4())]) == (1, 1, 1)
    assert await store.put_logs([record(5)]) == (0, 1, 0)
    found = await store.read_logs(run_id)
    assert found is not None
    records, dropped = found
    assert [r.message for r in records] == ["m0", "m1", "m2"] and dropped == 2
    assert records[0].timestamp == at(10.0) and records[0].level == "INFO"
    assert await store.read_logs(uuid.uuid4()) is None


async def test_text_with_a_nul_character_is_kept(store: Store) -> None:
    # PostgreSQL text cannot hold NUL: it is stored marked (U+FFFD), not refused
    # (a refusal there would be a 503, retried for ever).
    run_id, _ = await leased(store)
    record = LogRecord(
        run_id=run_id, attempt=1, timestamp=at(10.0), level="INFO", message="a\x00b"
    )
    assert await store.put_logs([record]) == (1, 0, 0)
    found = await store.read_logs(run_id)
    assert found is not None
    (kept,), _ = found
    assert kept.message in ("a\x00b", "a\ufffdb")


# --- statistics ---------------------------------------------------------------------


async def test_task_stats_and_lease_counts(store: Store) -> None:
    now = 10_000.0
    await store.create_runs([create("a") for _ in range(3)], now=now - 100)
    await store.create_runs([create("a", scheduled_time=at(now + 60))], now=now)
    (run,) = await store.claim_runs(["a"], 1, "w1", now)
    await store.apply_reports("w1", [Started(id=run.id, attempt=run.attempt)], now)
    (done,) = await store.create_runs([create("b")], now=now - 50)
    (claimed,) = await store.claim_runs(["b"], 1, "w2", now - 50)
    await store.apply_reports(
        "w2",
        [
            Started(id=done, attempt=claimed.attempt),
            Finished(id=done, attempt=claimed.attempt, state=S.COMPLETED),
        ],
        now - 30,
    )
    stats = {s.task_key: s for s in await store.task_stats(now, {"a": 2, "c": 1})}
    assert set(stats) == {"a", "b", "c"}
    a, b, c = stats["a"], stats["b"], stats["c"]
    assert (a.queued, a.scheduled, a.running, a.workers) == (2, 1, 1, 2)
    assert a.oldest_queued_seconds == 100.0
    assert (b.completed_last_hour, b.failed_last_hour, b.running) == (1, 0, 0)
    assert sum(b.ended_per_minute) == 1 and b.ended_per_minute[59] == 1
    assert (c.queued, c.workers) == (0, 1)
    assert await store.lease_counts() == {"w1": 1}


# --- blobs and retention ------------------------------------------------------------


async def test_blobs_round_trip(store: Store) -> None:
    big = os.urandom(3 * 1024 * 1024 + 17)  # more than one chunk of incremental blob I/O
    ref = await store.put_blob(big, 1.0)
    small = await store.put_blob(b"\x00" * 1000, 1.0)
    assert await store.get_blob(ref) == big
    assert await store.get_blob(small) == b"\x00" * 1000
    assert await store.get_blob(str(uuid.uuid4())) is None
    (run_id,) = await store.create_runs([TaskRunCreate(task_key="k", parameters_ref=ref)], 1.0)
    (run,) = await store.read_runs([run_id])
    assert run.parameters_ref == ref and run.parameters is None


async def test_retention_deletes_ended_runs_and_unreferenced_blobs(store: Store) -> None:
    kept_ref = await store.put_blob(b"kept", 1.0)
    old_ref = await store.put_blob(b"old", 1.0)
    loose_ref = await store.put_blob(b"loose", 1.0)
    young_ref = await store.put_blob(b"young", 500.0)
    ended = []
    for ref in (old_ref, None, None):
        run_id, attempt = await leased(store)
        if ref is not None:
            await store.runner.transact(
                lambda cur, r=ref, i=run_id: cur.execute(
                    f"UPDATE task_runs SET parameters_ref = '{r}' WHERE id = '{i}'"
                )
            )
        await finish(store, run_id, attempt, 10.0)
        ended.append(run_id)
    (crashed_id, _) = await leased(store)
    await store.runner.transact(
        lambda cur: cur.execute(
            f"UPDATE task_runs SET state = 'CRASHED', lease_owner = NULL WHERE id = '{crashed_id}'"
        )
    )
    (alive,) = await store.create_runs(
        [TaskRunCreate(task_key="k", parameters_ref=kept_ref)], 20.0
    )
    assert await store.stamp_crashed_runs(30.0) == 1
    assert await store.stamp_crashed_runs(31.0) == 0
    deleted, refs = await store.delete_ended_runs(ended_before=25.0, limit=2)
    assert deleted == 2
    deleted2, refs2 = await store.delete_ended_runs(ended_before=25.0, limit=2)
    assert deleted2 == 1 and set(refs + refs2) == {old_ref}
    assert await store.read_runs(ended) == []
    assert await store.read_history(ended[0]) is None
    assert [r.id for r in await store.read_runs([alive, crashed_id])] != []
    # Blobs: paged oldest first, then deleted when no run names them.
    page = await store.list_blobs(None, 100.0, None, 2)
    assert len(page) == 2
    rest = await store.list_blobs(None, 100.0, page[-1], 2)
    assert {ref for _, ref in page + rest} == {kept_ref, old_ref, loose_ref}
    assert await store.list_blobs(200.0, 600.0, None, 10) == [(500.0, young_ref)]
    done, left = await store.delete_unreferenced_blobs(
        [kept_ref, old_ref, loose_ref, young_ref], created_before=100.0
    )
    assert (done, left) == (2, [])
    assert await store.get_blob(kept_ref) == b"kept"  # a run names it
    assert await store.get_blob(young_ref) == b"young"  # within the grace period
    assert await store.get_blob(old_ref) is None and await store.get_blob(loose_ref) is None
    a = await store.put_blob(b"a" * 100, 1.0)
    b = await store.put_blob(b"b" * 100, 1.0)
    done, left = await store.delete_unreferenced_blobs([a, b], 100.0, max_bytes=150)
    assert (done, left) == (1, [b])


# --- idempotency keys ---------------------------------------------------------------


async def test_idempotency_keys(store: Store) -> None:
    key = Idempotency("k1", "hash-a")
    ids = await store.create_runs([create(), create()], 1.0, key)
    assert await store.create_runs([create(), create()], 2.0, key) == ids
    assert len(await store.list_runs(None, None, 10, 0)) == 2
    with pytest.raises(IdempotencyConflict):
        await store.create_runs([create()], 3.0, Idempotency("k1", "hash-b"))
    later = await store.create_runs([create()], 4.0 + IDEMPOTENCY_SECONDS, key)
    assert later != ids and len(later) == 1


# --- replicas -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_replicas(backend: Backend) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores open at once on one database, as two server replicas have them."""
    async with backend.open() as a, backend.open() as b:
        assert a.replica_id != b.replica_id
        yield a, b


async def test_a_dead_replicas_runs_are_freed_and_a_live_ones_kept(backend: Backend) -> None:
    async with two_replicas(backend) as (a, b):
        # Leases are judged by the database's clock: a negative one has run out.
        assert not await a.renew_replica(lease_seconds=600.0)  # no row yet
        assert await a.renew_replica(lease_seconds=600.0)
        await b.renew_replica(lease_seconds=600.0)
        ids = await a.create_runs([create(), create(), create()], now=1.0)
        pending, running = await a.claim_runs(["m:f"], 2, "a-conn", now=12.0)
        (kept,) = await b.claim_runs(["m:f"], 1, "b-conn", now=12.0)
        assert {pending.id, running.id, kept.id} == set(ids)
        started = Started(id=running.id, attempt=running.attempt)
        assert not (await a.apply_reports("a-conn", [started], now=12.0)).rejected

        assert (await b.rescue_runs(now=15.0)).changed == ()  # a's lease still holds
        assert await a.renew_replica(lease_seconds=-1.0)  # ... until a stops renewing it
        outcome = await b.rescue_runs(now=17.0)
        after = {r.id: r for r in outcome.changed}
        assert set(after) == {pending.id, running.id}
        # Never started: back in the queue. Started: redelivered, and counted.
        assert after[pending.id].state is S.SCHEDULED and after[pending.id].redeliveries == 0
        assert after[running.id].state is S.SCHEDULED and after[running.id].redeliveries == 1
        assert "replica" in (after[running.id].message or "")
        assert outcome.redelivered == ("m:f",)
        (still,) = await b.read_runs([kept.id])
        assert still.state is S.PENDING  # b is alive: its lease stands

        # a was only slow: its late report is refused, and it takes a new lease.
        late = Finished(id=running.id, attempt=running.attempt, state=S.COMPLETED, result=b"r")
        assert (await a.apply_reports("a-conn", [late], now=18.0)).rejected
        assert not await a.renew_replica(lease_seconds=600.0)
        assert (await b.rescue_runs(now=19.0)).changed == ()


async def test_the_rescue_is_fenced(backend: Backend) -> None:
    async with two_replicas(backend) as (a, b):
        await a.renew_replica(lease_seconds=-1.0)  # a is dead from the start
        await b.renew_replica(lease_seconds=600.0)
        ended, relet = await a.create_runs([create(), create()], now=1.0)
        first, second = await a.claim_runs(["m:f"], 2, "c1", now=2.0)
        await finish(a, first.id, first.attempt, now=3.0, result=b"r")
        # a's other run goes back through a release (its connection closed),
        # and b leases it again: a's runs are b's now, or ended.
        await a.release_owner("c1", now=3.0)
        (again,) = await b.claim_runs(["m:f"], 1, "b-conn", now=4.0)
        assert again.id == second.id
        assert (await b.rescue_runs(now=100.0)).changed == ()
        runs = {r.id: r for r in await b.read_runs([ended, relet])}
        assert runs[ended].state is S.COMPLETED and runs[ended].result == b"r"
        assert runs[relet].state is S.PENDING and runs[relet].attempt == 2


async def test_a_retired_replica_is_gone_and_a_run_of_no_replica_is_freed(
    backend: Backend,
) -> None:
    async with two_replicas(backend) as (a, b):
        await a.renew_replica(lease_seconds=600.0)
        await b.renew_replica(lease_seconds=600.0)
        run_id, _ = await leased(a)
        await a.retire_replica()
        outcome = await b.rescue_runs(now=2.0)
        assert [r.id for r in outcome.changed] == [run_id]
        # A run leased by a server of schema version 1 names no replica.
        (relet,) = await b.claim_runs(["m:f"], 1, "old-server", now=2.5)
        assert relet.id == run_id
        await b.runner.transact(
            lambda cur: cur.execute("UPDATE task_runs SET lease_replica = NULL")
        )
        outcome = await b.rescue_runs(now=3.0)
        assert [(r.id, r.state) for r in outcome.changed] == [(run_id, S.SCHEDULED)]


async def test_cancelling_runs_are_listed_by_their_replica_and_cancelled_when_it_dies(
    backend: Backend,
) -> None:
    async with two_replicas(backend) as (a, b):
        run_id, attempt = await leased(a, owner="a-conn")
        await a.apply_reports("a-conn", [Started(id=run_id, attempt=attempt)], now=2.0)
        run, owner = await b.cancel_run(run_id, now=3.0)
        assert run.state is S.CANCELLING and owner == "a-conn"
        assert await a.cancelling_runs() == [(run_id, "a-conn")]
        assert await b.cancelling_runs() == []
        # a dies before its worker reports: the cancel wins.
        await a.retire_replica()
        await b.renew_replica(lease_seconds=600.0)
        (freed,) = (await b.rescue_runs(now=5.0)).changed
        assert freed.id == run_id and freed.state is S.CANCELLED
        assert await a.cancelling_runs() == []
