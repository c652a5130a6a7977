"""The dispatcher and waiters, with an in-memory store and trio's autojump clock."""

from __future__ import annotations

import datetime

import pytest
import trio
import trio.testing

from trio_taskworker import TaskRunState
from trio_taskworker._models import Deliver, Finished, Started, TaskRunCreate
from trio_taskworker._server import SQLiteStore
from trio_taskworker._server._dispatch import CLAIM_INTERVAL, Dispatcher, Subscriber, Waiters

EPOCH = 1_700_000_000.0


def clock_now() -> float:
    """Wall-clock time that follows trio's (virtual) clock."""
    return EPOCH + trio.current_time()


@pytest.fixture
async def dispatcher(nursery: trio.Nursery, memory_store: SQLiteStore) -> Dispatcher:
    d = Dispatcher(memory_store, clock_now)
    await nursery.start(d.run)
    return d


async def next_delivery(sub) -> Deliver:  # type: ignore[no-untyped-def]
    with trio.fail_after(10_000):
        (message,) = await sub.next_messages()
    assert isinstance(message, Deliver)
    return message


async def leased(
    dispatcher: Dispatcher, store: SQLiteStore, *, credits: int, runs: int
) -> tuple[Subscriber, Deliver]:
    """A connection with ``credits``, ``runs`` runs queued for it, and its first delivery."""
    sub = dispatcher.add(["k"], "w", credits=credits)
    await store.create_runs([TaskRunCreate(task_key="k") for _ in range(runs)], clock_now())
    dispatcher.wake()
    return sub, await next_delivery(sub)


async def test_delivers_no_more_than_credits(
    autojump_clock: trio.testing.MockClock,
    memory_store: SQLiteStore,
    dispatcher: Dispatcher,
) -> None:
    sub, first = await leased(dispatcher, memory_store, credits=3, runs=10)
    assert len(first.runs) == 3 and sub.credits == 0
    await trio.testing.wait_all_tasks_blocked()
    assert (await memory_store.counts())["PENDING"] == 3
    dispatcher.grant(sub, 2)
    second = await next_delivery(sub)
    assert len(second.runs) == 2
    assert (await memory_store.counts())["PENDING"] == 5


async def test_only_subscribed_keys(
    autojump_clock: trio.testing.MockClock,
    memory_store: SQLiteStore,
    dispatcher: Dispatcher,
) -> None:
    await memory_store.create_runs(
        [TaskRunCreate(task_key="a"), TaskRunCreate(task_key="b")], clock_now()
    )
    sub = dispatcher.add(["b"], "w", credits=5)
    delivered = await next_delivery(sub)
    assert [r.task_key for r in delivered.runs] == ["b"]


async def test_scheduled_run_waits_until_due_without_polling(
    autojump_clock: trio.testing.MockClock,
    memory_store: SQLiteStore,
    dispatcher: Dispatcher,
) -> None:
    sub = dispatcher.add(["k"], "w", credits=1)
    due = datetime.datetime.fromtimestamp(clock_now() + 3600, datetime.UTC)
    await memory_store.create_runs([TaskRunCreate(task_key="k", scheduled_time=due)], clock_now())
    dispatcher.wake()
    start = trio.current_time()
    delivered = await next_delivery(sub)
    assert trio.current_time() - start == pytest.approx(3600, abs=1e-6)
    assert delivered.runs[0].scheduled_time == due


async def test_retry_waits_in_the_queue(
    autojump_clock: trio.testing.MockClock,
    memory_store: SQLiteStore,
    dispatcher: Dispatcher,
) -> None:
    sub = dispatcher.add(["k"], "w", credits=1)
    await memory_store.create_runs(
        [TaskRunCreate(task_key="k", retries=1, retry_delay_seconds=120.0)], clock_now()
    )
    dispatcher.wake()
    (run,) = (await next_delivery(sub)).runs
    outcome = await memory_store.apply_reports(
        sub.id,
        [
            Started(id=run.id, attempt=run.attempt),
            Finished(id=run.id, attempt=run.attempt, state=TaskRunState.FAILED),
        ],
        clock_now(),
    )
    assert outcome.requeued
    failed_at = trio.current_time()
    dispatcher.grant(sub, 1)
    (again,) = (await next_delivery(sub)).runs
    assert again.id == run.id and again.attempt == 2 and again.retry_count == 1
    assert trio.current_time() - failed_at == pytest.approx(120, abs=1e-6)


async def test_fair_across_subscribers(
    autojump_clock: trio.testing.MockClock,
    memory_store: SQLiteStore,
    dispatcher: Dispatcher,
) -> None:
    subs = [dispatcher.add(["k"], f"w{i}", credits=2) for i in range(2)]
    await memory_store.create_runs([TaskRunCreate(task_key="k") for _ in range(4)], clock_now())
    dispatcher.wake()
    counts = [len((await next_delivery(s)).runs) for s in subs]
    assert counts == [2, 2]


async def test_waiters_wake_on_terminal_only() -> None:
    import uuid

    from trio_taskworker._models import TaskRun

    waiters = Waiters()
    run_id = uuid.uuid4()
    now = datetime.datetime.now(datetime.UTC)

    def snapshot(state: TaskRunState) -> TaskRun:
        return TaskRun(
            id=run_id, task_key="k", task_name="k", state=state, created_at=now, scheduled_time=now
        )

    with waiters.watch([run_id]) as watch:
        waiters.notify([snapshot(TaskRunState.RUNNING)])
        assert not watch.event.is_set() and not watch.ended
        waiters.notify([snapshot(TaskRunState.COMPLETED)])
        assert watch.event.is_set()
        assert watch.ended[run_id].state is TaskRunState.COMPLETED
    assert waiters.watched == 0
    with waiters.watch([run_id]) as watch:
        waiters.stop()
        assert watch.event.is_set()


async def test_a_store_that_refuses_pauses_dispatch_and_it_resumes(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, memory_store: SQLiteStore
) -> None:
    from trio_taskworker._server._dispatch import STORE_RETRY_SECONDS
    from trio_taskworker._server._store import StoreUnavailable

    refusals = 3

    class FullDisk:
        """The store, except that its first claims fail as on a full disk."""

        def __getattr__(self, name: str) -> object:
            return getattr(memory_store, name)

        async def claim_runs(self, *args: object) -> object:
            nonlocal refusals
            if refusals:
                refusals -= 1
                raise StoreUnavailable("database or disk is full")
            return await memory_store.claim_runs(*args)  # type: ignore[arg-type]

    dispatcher = Dispatcher(FullDisk(), clock_now)  # type: ignore[arg-type]
    await nursery.start(dispatcher.run)
    sub = dispatcher.add(["k"], "w", credits=1)
    await memory_store.create_runs([TaskRunCreate(task_key="k")], clock_now())
    start = trio.current_time()
    dispatcher.wake()
    delivered = await next_delivery(sub)  # the dispatcher did not die: it retried
    assert len(delivered.runs) == 1 and refusals == 0
    assert trio.current_time() - start == pytest.approx(3 * STORE_RETRY_SECONDS)


async def test_credits_handed_back_soon_after_a_lease_are_leased_together(
    autojump_clock: trio.testing.MockClock,
    memory_store: SQLiteStore,
    dispatcher: Dispatcher,
) -> None:
    sub, first = await leased(dispatcher, memory_store, credits=10, runs=30)
    leased_at = trio.current_time()
    assert len(first.runs) == 10
    # Runs out, and credits trickling back one at a time: leased together, once
    # CLAIM_INTERVAL has passed since the last lease.
    for _ in range(3):
        dispatcher.grant(sub, 1)
        await trio.testing.wait_all_tasks_blocked()
    second = await next_delivery(sub)
    assert len(second.runs) == 3
    assert trio.current_time() - leased_at == pytest.approx(CLAIM_INTERVAL)


async def test_a_connection_with_all_its_credits_is_leased_at_once(
    autojump_clock: trio.testing.MockClock,
    memory_store: SQLiteStore,
    dispatcher: Dispatcher,
) -> None:
    sub, _ = await leased(dispatcher, memory_store, credits=2, runs=1)
    dispatcher.grant(sub, 1)  # the run ended: the worker is idle again
    await trio.testing.wait_all_tasks_blocked()
    began = trio.current_time()
    await memory_store.create_runs([TaskRunCreate(task_key="k")], clock_now())
    dispatcher.wake()
    await next_delivery(sub)
    assert trio.current_time() == began  # no wait on an idle worker


async def test_a_paced_connection_still_gets_a_run_that_comes_due(
    autojump_clock: trio.testing.MockClock,
    memory_store: SQLiteStore,
    dispatcher: Dispatcher,
) -> None:
    sub, _ = await leased(dispatcher, memory_store, credits=2, runs=1)
    due = datetime.datetime.fromtimestamp(clock_now() + 60, datetime.UTC)
    await memory_store.create_runs([TaskRunCreate(task_key="k", scheduled_time=due)], clock_now())
    dispatcher.wake()  # paced (one run out, leased just now), then nothing due for a minute
    began = trio.current_time()
    delivered = await next_delivery(sub)
    assert len(delivered.runs) == 1
    assert trio.current_time() - began == pytest.approx(60, abs=1e-6)


async def test_pacing_knows_a_window_larger_than_the_credits_subscribed_with(
    autojump_clock: trio.testing.MockClock,
    memory_store: SQLiteStore,
    dispatcher: Dispatcher,
) -> None:
    # A worker that reconnects with all its runs in flight subscribes with 0
    # credits; the credits its runs hand back later show its window.
    sub = dispatcher.add(["k"], "w", credits=0)
    await memory_store.create_runs([TaskRunCreate(task_key="k") for _ in range(5)], clock_now())
    dispatcher.grant(sub, 2)
    first = await next_delivery(sub)
    leased_at = trio.current_time()
    assert len(first.runs) == 2
    dispatcher.grant(sub, 1)  # one of two back: runs are out, so it waits
    second = await next_delivery(sub)
    assert len(second.runs) == 1
    assert trio.current_time() - leased_at == pytest.approx(CLAIM_INTERVAL)
