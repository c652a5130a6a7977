"""The worker's run execution, without a server, on trio's autojump clock."""

from __future__ import annotations

import datetime
import uuid

import pytest
import trio
import trio.testing

from trio_taskworker import (
    ConfigurationError,
    StopTaskWorker,
    TaskRun,
    TaskRunState,
    TaskRunTimedOut,
    TaskWorker,
    should_try_to_read_parameters,
    task,
)
from trio_taskworker._models import Finished, Released, Started
from trio_taskworker._serialization import dumps_payload, loads_payload

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@task
async def add(x: int, y: int = 1) -> int:
    return x + y


@task
def sync_add(x: int, y: int) -> int:
    return x + y


@task
async def no_params() -> str:
    return "none"


@task(timeout_seconds=5)
async def slow() -> None:
    await trio.sleep(3600)


@task
async def broken(message: str) -> None:
    raise KeyError(message)


@task
async def stopper() -> None:
    raise StopTaskWorker("enough")


def make_run(t: object, *args: object, **kwargs: object) -> TaskRun:
    key = t.key  # type: ignore[attr-defined]
    return TaskRun(
        id=uuid.uuid4(),
        task_key=key,
        task_name=key,
        state=TaskRunState.PENDING,
        created_at=NOW,
        scheduled_time=NOW,
        attempt=1,
        parameters=dumps_payload((args, kwargs)),
    )


def reports(worker: TaskWorker) -> list[object]:
    return [m for _, m in worker._outbox.messages]


def test_constructor_checks() -> None:
    with pytest.raises(ConfigurationError, match="at least one task"):
        TaskWorker()
    with pytest.raises(ConfigurationError, match="not a task"):
        TaskWorker(print)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="limit"):
        TaskWorker(add, limit=0)
    worker = TaskWorker(add, sync_add, limit=None)
    assert worker.limit is None and worker.available_tasks is None
    assert worker.client_id != TaskWorker(add).client_id
    assert not worker.started and worker.current_tasks == 0


async def test_async_and_sync_runs_complete() -> None:
    worker = TaskWorker(add, sync_add, limit=2)
    assert await worker.execute_task_run(make_run(add, 1, y=2)) is TaskRunState.COMPLETED
    assert await worker.execute_task_run(make_run(sync_add, 3, 4)) is TaskRunState.COMPLETED
    finished = [m for m in reports(worker) if isinstance(m, Finished)]
    assert [loads_payload(m.result) for m in finished] == [3, 7]  # type: ignore[arg-type]
    assert worker.status()["finished"] == {add.key: 1, sync_add.key: 1}
    assert worker.available_tasks == 2


async def test_task_error_is_failed_with_the_exception() -> None:
    worker = TaskWorker(broken)
    assert await worker.execute_task_run(make_run(broken, "nope")) is TaskRunState.FAILED
    (finished,) = reports(worker)
    assert isinstance(finished, Finished) and finished.error is not None
    assert finished.error.type == "builtins.KeyError"
    assert "KeyError: 'nope'" in finished.error.traceback
    exc = loads_payload(finished.result)  # type: ignore[arg-type]
    assert type(exc) is KeyError and exc.args == ("nope",)


async def test_bad_parameters_fail_the_run_not_the_worker() -> None:
    worker = TaskWorker(add)
    run = make_run(add)  # add() without x
    assert await worker.execute_task_run(run) is TaskRunState.FAILED
    import attrs

    assert (
        await worker.execute_task_run(attrs.evolve(run, parameters=b"junk")) is TaskRunState.FAILED
    )
    errors = [m.error.type for m in reports(worker) if isinstance(m, Finished) and m.error]
    assert errors == ["builtins.TypeError", "trio_taskworker._exceptions.SerializationError"]


async def test_unknown_task_key_fails() -> None:
    worker = TaskWorker(add)
    run = make_run(broken, "x")
    assert await worker.execute_task_run(run) is TaskRunState.FAILED
    (finished,) = reports(worker)
    assert "no task" in finished.error.message  # type: ignore[union-attr]


async def test_timeout_fails_the_run(autojump_clock: trio.testing.MockClock) -> None:
    worker = TaskWorker(slow)
    start = trio.current_time()
    assert await worker.execute_task_run(make_run(slow)) is TaskRunState.FAILED
    assert trio.current_time() - start == pytest.approx(5)
    (finished,) = reports(worker)
    assert finished.error.type.endswith("TaskRunTimedOut")  # type: ignore[union-attr]
    assert isinstance(loads_payload(finished.result), TaskRunTimedOut)  # type: ignore[union-attr]


async def test_sync_task_timeout_honours_check_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[str] = []

    @task(timeout_seconds=1)
    def spin() -> None:
        try:
            while True:
                trio.from_thread.check_cancelled()
                trio.from_thread.run(trio.sleep, 0.25)
        except trio.Cancelled:
            seen.append("cancelled")
            raise

    worker = TaskWorker(spin)
    assert await worker.execute_task_run(make_run(spin)) is TaskRunState.FAILED
    assert seen == ["cancelled"]
    (finished,) = reports(worker)
    assert finished.error.type.endswith("TaskRunTimedOut")  # type: ignore[union-attr]


async def test_stop_task_worker_hands_the_run_back() -> None:
    worker = TaskWorker(stopper)
    worker._started = True  # as if start() were running
    state = await worker.execute_task_run(make_run(stopper))
    assert state is TaskRunState.SCHEDULED
    assert worker.stopping
    released = [m for m in reports(worker) if isinstance(m, Released)]
    assert len(released) == 1 and "StopTaskWorker: enough" in released[0].reason


async def test_limit_bounds_concurrency(autojump_clock: trio.testing.MockClock) -> None:
    running = 0
    peak = 0

    @task
    async def busy() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(1)
        running -= 1

    worker = TaskWorker(busy, limit=3)
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(worker.execute_task_run, make_run(busy))
        await trio.testing.wait_all_tasks_blocked()
        assert worker.current_tasks == 3 and worker.available_tasks == 0
    assert peak == 3
    assert worker.status()["finished"] == {busy.key: 10}


async def test_status_shows_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    gate = trio.Event()

    @task
    async def wait_gate() -> None:
        await gate.wait()

    worker = TaskWorker(wait_gate, limit=4)
    run = make_run(wait_gate)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.execute_task_run, run)
        await trio.testing.wait_all_tasks_blocked()
        status = worker.status()
        assert status["current"] == 1 and status["available"] == 3
        (entry,) = status["in_flight"][wait_gate.key]
        assert entry["id"] == str(run.id)
        datetime.datetime.fromisoformat(entry["started_at"])
        gate.set()
    assert worker.status()["in_flight"] == {}
    assert set(worker.status()) == {
        "client_id", "started_at", "stopping", "connected", "limit", "current", "available",
        "tasks", "finished", "in_flight",
    }  # fmt: skip


def test_should_try_to_read_parameters() -> None:
    run = make_run(add, 1)
    assert should_try_to_read_parameters(add, run)
    assert not should_try_to_read_parameters(no_params, run)
    import attrs

    empty = attrs.evolve(run, parameters=None)
    assert not should_try_to_read_parameters(add, empty)
    assert should_try_to_read_parameters(add, attrs.evolve(empty, parameters_ref="ref"))


async def test_started_report_precedes_finished_in_leased_runs() -> None:
    worker = TaskWorker(add)
    run = make_run(add, 1)
    await worker._limiter.acquire_on_behalf_of((run.id, run.attempt))
    await worker._run_leased(run, worker._generation)
    kinds = [type(m) for m in reports(worker)]
    assert kinds[:2] == [Started, Finished]


async def test_heartbeats_every_third_of_the_lease(autojump_clock: trio.testing.MockClock) -> None:
    from trio_taskworker._models import Heartbeat

    worker = TaskWorker(add)
    with trio.move_on_after(35):
        await worker._heartbeat(worker._generation, 30 / 3)
    beats = [m for m in reports(worker) if isinstance(m, Heartbeat)]
    assert len(beats) == 3


async def test_a_run_that_returns_in_time_keeps_its_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @task(timeout_seconds=5)
    async def just_in_time() -> str:
        await trio.sleep(4.9)
        return "made it"

    worker = TaskWorker(just_in_time)
    assert await worker.execute_task_run(make_run(just_in_time)) is TaskRunState.COMPLETED
    (finished,) = reports(worker)
    assert loads_payload(finished.result) == "made it"  # type: ignore[union-attr]
