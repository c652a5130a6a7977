"""The worker's run execution, without a server, on trio's autojump clock.

Reports are read where they leave the spawner (its ``report`` callable) and the
subscription (its ``connect`` factory), the seams the worker wires them through.
"""

from __future__ import annotations

import contextlib
import datetime
import uuid
from collections.abc import AsyncIterator

import attrs
import httpx
import pytest
import trio
import trio.testing

from trio_taskworker import (
    ConfigurationError,
    StopTaskWorker,
    Task,
    TaskRun,
    TaskRunState,
    TaskRunTimedOut,
    TaskWorker,
    should_try_to_read_parameters,
    task,
)
from trio_taskworker._client import TaskWorkerClient
from trio_taskworker._models import (
    Finished,
    Heartbeat,
    Released,
    Started,
    Subscribed,
    option_values,
)
from trio_taskworker._serialization import (
    decode_worker_frame,
    dumps_payload,
    encode_frame,
    loads_payload,
)
from trio_taskworker._spawner import Spawner
from trio_taskworker._subscription import Subscription

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
async def big_result() -> bytes:
    return b"z" * 100_000  # past the inline limit: a blob


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
        # A run carries the options it was submitted with: its task's.
        **option_values(t.options),  # type: ignore[attr-defined]
    )


@attrs.define
class Reports:
    """A spawner's reports as they leave it, and its requests to stop the worker."""

    sent: list[object] = attrs.field(factory=list)
    stops: int = 0


def spawner(*tasks: Task[..., object], limit: int | None = 10) -> tuple[Spawner, Reports]:
    reports = Reports()

    def stop() -> None:
        reports.stops += 1

    made = Spawner(
        {t.key: t for t in tasks},
        limit,
        report=lambda message, generation: reports.sent.append(message),
        request_stop=stop,
    )
    return made, reports


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
    assert worker.status()["finished"] == {add.key: 1, sync_add.key: 1}
    assert worker.available_tasks == 2
    runs, reports = spawner(add, sync_add, limit=2)
    await runs.execute(make_run(add, 1, y=2))
    await runs.execute(make_run(sync_add, 3, 4))
    finished = [m for m in reports.sent if isinstance(m, Finished)]
    assert [loads_payload(m.result) for m in finished] == [3, 7]  # type: ignore[arg-type]


async def test_task_error_is_failed_with_the_exception() -> None:
    worker = TaskWorker(broken)
    assert await worker.execute_task_run(make_run(broken, "nope")) is TaskRunState.FAILED
    runs, reports = spawner(broken)
    await runs.execute(make_run(broken, "nope"))
    (finished,) = reports.sent
    assert isinstance(finished, Finished) and finished.error is not None
    assert finished.error.type == "builtins.KeyError"
    assert "KeyError: 'nope'" in finished.error.traceback
    exc = loads_payload(finished.result)  # type: ignore[arg-type]
    assert type(exc) is KeyError and exc.args == ("nope",)


async def test_bad_parameters_fail_the_run_not_the_worker() -> None:
    runs, reports = spawner(add)
    run = make_run(add)  # add() without x
    assert (await runs.execute(run)).state is TaskRunState.FAILED  # type: ignore[union-attr]
    junk = await runs.execute(attrs.evolve(run, parameters=b"junk"))
    assert junk.state is TaskRunState.FAILED  # type: ignore[union-attr]
    errors = [m.error.type for m in reports.sent if isinstance(m, Finished) and m.error]
    assert errors == ["builtins.TypeError", "trio_taskworker._exceptions.SerializationError"]


async def test_unknown_task_key_fails() -> None:
    runs, reports = spawner(add)
    run = make_run(broken, "x")
    assert (await runs.execute(run)).state is TaskRunState.FAILED  # type: ignore[union-attr]
    (finished,) = reports.sent
    assert "no task" in finished.error.message  # type: ignore[union-attr]


async def test_timeout_fails_the_run(autojump_clock: trio.testing.MockClock) -> None:
    runs, reports = spawner(slow)
    start = trio.current_time()
    assert (await runs.execute(make_run(slow))).state is TaskRunState.FAILED  # type: ignore[union-attr]
    assert trio.current_time() - start == pytest.approx(5)
    (finished,) = reports.sent
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

    runs, reports = spawner(spin)
    assert (await runs.execute(make_run(spin))).state is TaskRunState.FAILED  # type: ignore[union-attr]
    assert seen == ["cancelled"]
    (finished,) = reports.sent
    assert finished.error.type.endswith("TaskRunTimedOut")  # type: ignore[union-attr]


async def test_stop_task_worker_ends_its_run_cancelled() -> None:
    assert await TaskWorker(stopper).execute_task_run(make_run(stopper)) is TaskRunState.CANCELLED
    runs, reports = spawner(stopper)
    await runs.execute(make_run(stopper))
    assert reports.stops == 1  # the worker was asked to stop
    assert not [m for m in reports.sent if isinstance(m, Released)]  # never handed back
    (finished,) = [m for m in reports.sent if isinstance(m, Finished)]
    assert finished.state is TaskRunState.CANCELLED
    assert "StopTaskWorker (enough)" in (finished.message or "")


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
        "tasks", "finished", "failed", "in_flight",
    }  # fmt: skip


def test_should_try_to_read_parameters() -> None:
    run = make_run(add, 1)
    assert should_try_to_read_parameters(add, run)
    assert not should_try_to_read_parameters(no_params, run)
    empty = attrs.evolve(run, parameters=None)
    assert not should_try_to_read_parameters(add, empty)
    assert should_try_to_read_parameters(add, attrs.evolve(empty, parameters_ref="ref"))


async def test_started_report_precedes_finished_in_leased_runs() -> None:
    runs, reports = spawner(add)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runs.run)
        runs.deliver(1, make_run(add, 1))
        await trio.testing.wait_all_tasks_blocked()
        runs.begin_stop(0.0)
    kinds = [type(m) for m in reports.sent]
    assert kinds[:2] == [Started, Finished]


async def test_heartbeats_every_third_of_the_lease(autojump_clock: trio.testing.MockClock) -> None:
    frames: list[str] = []

    @attrs.define
    class Socket:
        replies: list[str] = attrs.field(
            factory=lambda: [encode_frame([Subscribed(connection_id="c", lease_seconds=30)])]
        )

        async def send_message(self, message: str) -> None:
            frames.append(message)

        async def get_message(self) -> str:
            if self.replies:
                return self.replies.pop()
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        async def ping(self) -> None:
            pass

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[Socket]:
        yield Socket()

    runs, _ = spawner(add)
    subscription = Subscription(
        connect=connect, sink=runs, keys=(add.key,), client_id="w", window=10
    )
    with trio.move_on_after(35):
        await subscription.run()
    sent = [m for frame in frames for m in decode_worker_frame(frame)]
    beats = [m for m in sent if isinstance(m, Heartbeat)]
    assert len(beats) == 3


async def test_a_run_that_returns_in_time_keeps_its_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @task(timeout_seconds=5)
    async def just_in_time() -> str:
        await trio.sleep(4.9)
        return "made it"

    runs, reports = spawner(just_in_time)
    report = await runs.execute(make_run(just_in_time))
    assert report.state is TaskRunState.COMPLETED  # type: ignore[union-attr]
    (finished,) = reports.sent
    assert loads_payload(finished.result) == "made it"  # type: ignore[union-attr]


def client_for(handler: object) -> tuple[TaskWorkerClient, httpx.AsyncClient]:
    http = httpx.AsyncClient(
        base_url="http://server",
        transport=httpx.MockTransport(handler),  # type: ignore[arg-type]
    )
    return TaskWorkerClient("http://server", http), http


def unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_an_unreachable_server_hands_blob_runs_back() -> None:
    """A payload the worker cannot read or store is a connection problem, not a failure."""
    runs, reports = spawner(add, big_result)
    runs.client, http = client_for(unreachable)
    async with http:
        by_blob = attrs.evolve(make_run(add, 1), parameters=None, parameters_ref=str(uuid.uuid4()))
        report = await runs.execute(by_blob)
        assert isinstance(report, Released) and "cannot read its parameters" in report.reason
        report = await runs.execute(make_run(big_result))
        assert isinstance(report, Released) and "cannot store its result" in report.reason
    assert [type(m) for m in reports.sent] == [Released, Released]  # reported, not FAILED


async def test_a_missing_parameters_blob_fails_the_run_with_a_server_error() -> None:
    def missing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "no blob"})

    runs, _ = spawner(add)
    runs.client, http = client_for(missing)
    async with http:
        run = attrs.evolve(make_run(add, 1), parameters=None, parameters_ref=str(uuid.uuid4()))
        report = await runs.execute(run)
    assert isinstance(report, Finished) and report.state is TaskRunState.FAILED
    assert report.error is not None
    assert report.error.type == "trio_taskworker._exceptions.ServerError"
    assert "404" in report.error.message


async def test_a_large_result_is_stored_as_a_blob() -> None:
    stored: list[bytes] = []

    def blobs(request: httpx.Request) -> httpx.Response:
        stored.append(request.content)
        return httpx.Response(201, json={"id": "b1"})

    runs, _ = spawner(big_result)
    runs.client, http = client_for(blobs)
    async with http:
        report = await runs.execute(make_run(big_result))
    assert isinstance(report, Finished) and report.state is TaskRunState.COMPLETED
    assert (report.result, report.result_ref) == (None, "b1")
    assert loads_payload(stored[0]) == b"z" * 100_000


async def test_a_run_lost_while_waiting_for_a_slot_never_starts() -> None:
    gate = trio.Event()

    @task
    async def hold() -> None:
        await gate.wait()

    runs, reports = spawner(hold, add, limit=1)
    waiting = make_run(add, 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runs.run)
        nursery.start_soon(runs.execute, make_run(hold))  # takes the only slot
        await trio.testing.wait_all_tasks_blocked()
        runs.deliver(1, waiting)
        await trio.testing.wait_all_tasks_blocked()  # it waits for the slot
        runs.connection_lost(1)
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        runs.begin_stop(0.0)
    assert not [m for m in reports.sent if getattr(m, "id", None) == waiting.id]
    assert runs.finished == {hold.key: 1}


async def test_a_run_delivered_during_a_stop_goes_straight_back() -> None:
    runs, reports = spawner(add)
    runs.begin_stop(30.0)
    run = make_run(add, 1)
    runs.deliver(1, run)
    assert reports.sent == [Released(id=run.id, attempt=1, reason="the worker is stopping")]
