"""Prefect parity on the worker side: retry policies, hooks, run context, run
names, caching, worker attributes, ``async with`` and ``serve``. A real worker
and the real server handler over the in-process transport, on the autojump clock."""

from __future__ import annotations

import datetime
import inspect
import itertools
import os
import signal
import socket
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trio_taskworker import ConfigurationError, TaskRun, TaskRunState, TaskWorker, serve, task
from trio_taskworker._context import TaskRunContext, get_run_context
from trio_taskworker._definition import unmapped
from trio_taskworker._exceptions import MissingContextError
from trio_taskworker._policy import LocalOptions, State, exponential_backoff
from trio_taskworker._serialization import loads_payload
from trio_taskworker._server import SQLiteStore
from trio_taskworker._states import IllegalTransition
from trio_taskworker.testing import trio_wall_time

from .fakes import InProcessServer
from .test_semantics import run_of, run_when, srv, start, submit

__all__ = ["srv"]  # the fixture, shared with the semantics table

S = TaskRunState
attempt_times: list[float] = []
hook_calls: list[tuple[str, str, Any]] = []
contexts: list[tuple[uuid.UUID, int, dict[str, Any]]] = []
executions: list[int] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    for found in (attempt_times, hook_calls, contexts, executions):
        found.clear()


def ended(run: TaskRun) -> bool:
    return run.state.is_terminal


# --- retry delays ------------------------------------------------------------------


@task(retries=3, retry_delay_seconds=[1, 10, 100])
async def fails_with_listed_delays() -> None:
    attempt_times.append(trio.current_time())
    raise RuntimeError("again")


@task(retries=3, retry_delay_seconds=exponential_backoff(2))
async def fails_with_backoff() -> None:
    attempt_times.append(trio.current_time())
    raise RuntimeError("again")


def gaps() -> list[float]:
    return [round(b - a) for a, b in itertools.pairwise(attempt_times)]


@pytest.mark.parametrize(
    ("failing", "expected"),
    [(fails_with_listed_delays, [1, 10, 100]), (fails_with_backoff, [2, 4, 8])],
)
async def test_retry_delays_follow_the_list_or_the_function(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    srv: InProcessServer,
    failing: Any,
    expected: list[int],
) -> None:
    await start(nursery, srv, failing)
    run = await run_when(srv, await submit(srv, failing), ended)
    assert (run.state, run.retry_count, run.attempt) == (S.FAILED, 3, 4)
    assert gaps() == expected


def test_a_list_shorter_than_the_retries_repeats_its_last_delay() -> None:
    local = LocalOptions(retry_delays=(1.0, 5.0))
    assert [local.retry_delay(n, 4, default=0.0) for n in range(4)] == [1.0, 5.0, 5.0, 5.0]


def test_jitter_scales_each_delay_within_the_factor() -> None:
    local = LocalOptions(retry_delays=(10.0,), retry_jitter_factor=0.5)
    assert local.retry_delay(0, 1, 0.0, uniform=lambda lo, hi: lo) == 5.0
    assert local.retry_delay(0, 1, 0.0, uniform=lambda lo, hi: hi) == 15.0
    unbounded = LocalOptions(retry_jitter_factor=3.0)
    assert unbounded.retry_delay(0, 1, 4.0, uniform=lambda lo, hi: lo) == 0.0  # never negative


def test_a_delay_function_that_returns_nonsense_is_a_configuration_error() -> None:
    local = LocalOptions(retry_delays=lambda retries: ["soon"])
    with pytest.raises(ConfigurationError, match="returned"):
        local.retry_delay(0, 1, 0.0)


@pytest.mark.parametrize(
    "bad",
    [[], ["1"], [float("nan")], [-1], "5", 1e12, float("inf")],
)
def test_bad_retry_delays_are_refused_where_the_task_is_defined(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="retry_delay_seconds"):
        task(retries=1, retry_delay_seconds=bad)(lambda: None)


def test_with_options_replaces_a_delay_list_with_a_number() -> None:
    listed = task(retries=2, retry_delay_seconds=[3, 4])(lambda: None)
    assert listed.options.retry_delay_seconds == 3.0  # the first delay, for the server
    plain = listed.with_options(retry_delay_seconds=7)
    assert plain.local.retry_delays is None and plain.options.retry_delay_seconds == 7.0


# --- retry condition -----------------------------------------------------------------


def retry_only_timeouts(t: Any, run: TaskRun, state: State) -> bool:
    try:
        state.result()
    except TimeoutError:
        return True
    except Exception:
        return False
    return False


@task(retries=5, retry_condition_fn=retry_only_timeouts)
async def flaky(kind: str) -> None:
    executions.append(1)
    if len(executions) < 3:
        raise TimeoutError("slow upstream") if kind == "timeout" else ValueError("bad input")


async def test_retry_condition_true_retries(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, flaky)
    run = await run_when(srv, await submit(srv, flaky, "timeout"), ended)
    assert (run.state, run.retry_count, len(executions)) == (S.COMPLETED, 2, 3)


async def test_retry_condition_false_fails_at_once_and_says_why(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, flaky)
    run = await run_when(srv, await submit(srv, flaky, "value"), ended)
    assert (run.state, run.retry_count, len(executions)) == (S.FAILED, 0, 1)
    assert run.message == "not retried: retry_condition_fn returned False"
    assert run.error is not None and run.error.message == "bad input"


def broken_condition(t: Any, run: TaskRun, state: State) -> bool:
    raise LookupError("condition bug")


@task(retries=2, retry_condition_fn=broken_condition)
async def fails_with_broken_condition() -> None:
    raise ValueError("task error")


async def test_a_retry_condition_that_raises_ends_the_run_failed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, fails_with_broken_condition)
    run = await run_when(srv, await submit(srv, fails_with_broken_condition), ended)
    assert run.state is S.FAILED and "LookupError('condition bug')" in (run.message or "")


# --- hooks ---------------------------------------------------------------------------


async def record_completion(t: Any, run: TaskRun, state: State) -> None:
    hook_calls.append(("completion", run.state.value, state.result()))


def record_failure(t: Any, run: TaskRun, state: State) -> None:  # a sync hook: in a thread
    hook_calls.append(("failure", run.state.value, repr(state.result(raise_on_failure=False))))


def broken_hook(t: Any, run: TaskRun, state: State) -> None:
    raise RuntimeError("hook bug")


@task(on_completion=[broken_hook, record_completion], on_failure=[record_failure])
async def doubles(x: int) -> int:
    return 2 * x


@task(retries=1, on_failure=record_failure)
async def always_fails() -> None:
    executions.append(1)
    raise KeyError("nope")


async def hooks_done(count: int) -> None:
    """Hooks run after the report, sync ones in threads: wait on the virtual clock."""
    with trio.fail_after(60):
        while len(hook_calls) < count:  # noqa: ASYNC110 - filled by a worker thread
            await trio.sleep(1)
    await trio.sleep(5)  # and no more come


async def test_completion_hooks_run_in_order_and_a_broken_one_changes_nothing(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, doubles)
    run = await run_when(srv, await submit(srv, doubles, 21), ended)
    assert run.state is S.COMPLETED
    await hooks_done(1)
    assert hook_calls == [("completion", "COMPLETED", 42)]


async def test_failure_hooks_run_once_when_the_run_fails_for_good(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, always_fails)
    run = await run_when(srv, await submit(srv, always_fails), ended)
    assert (run.state, len(executions)) == (S.FAILED, 2)
    await hooks_done(1)
    assert hook_calls == [("failure", "FAILED", "KeyError('nope')")]  # not after attempt 1


hook_release = threading.Event()
hook_gate: list[trio.Event] = []


async def slow_notification(t: Any, run: TaskRun, state: State) -> None:
    await hook_gate[0].wait()


@task(on_completion=slow_notification)
async def notified() -> int:
    return 1


async def test_hooks_run_after_the_report_and_do_not_delay_the_result(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    hook_gate[:] = [trio.Event()]
    worker = await start(nursery, srv, notified)
    run_id = await submit(srv, notified)
    run = await run_when(srv, run_id, ended)
    assert run.state is S.COMPLETED
    assert worker.current_tasks == 0 and worker.available_tasks == 9  # the hook holds a slot
    # A cancel while the hook runs finds the run ended: it stays COMPLETED.
    with pytest.raises(IllegalTransition):
        await srv.state.store.cancel_run(run_id, srv.state.now())
    hook_gate[0].set()
    await trio.testing.wait_all_tasks_blocked()
    assert worker.available_tasks == 10


def hangs(t: Any, run: TaskRun, state: State) -> None:
    hook_release.wait(30)  # a sync hook stuck on I/O


@task(on_completion=hangs)
async def with_a_hanging_hook() -> int:
    return 7


async def test_a_hanging_sync_hook_cannot_hold_a_stop(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    hook_release.clear()
    worker = await start(nursery, srv, with_a_hanging_hook, shutdown_timeout=5)
    run = await run_when(srv, await submit(srv, with_a_hanging_hook), ended)
    assert run.state is S.COMPLETED  # reported before its hook
    before = trio.current_time()
    await worker.stop()
    assert trio.current_time() - before == pytest.approx(5)  # the grace, not the hook
    hook_release.set()


# --- run context ---------------------------------------------------------------------


@task
async def async_context(x: int, y: int = 5) -> None:
    context = get_run_context()
    assert context.task is async_context
    assert context.task_run is not None
    contexts.append((context.task_run.id, context.attempt, context.parameters))


@task
def sync_context(word: str) -> None:
    context = get_run_context()  # in the worker's thread
    assert context.task_run is not None
    contexts.append((context.task_run.id, context.attempt, context.parameters))


async def test_run_context_in_async_and_sync_tasks(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, async_context, sync_context)
    first = await submit(srv, async_context, 1)
    second = await submit(srv, sync_context, "hi")
    await run_when(srv, first, ended)
    await run_when(srv, second, ended)
    assert sorted(contexts, key=lambda c: len(c[2]), reverse=True) == [
        (first, 1, {"x": 1, "y": 5}),
        (second, 1, {"word": "hi"}),
    ]


def test_run_context_outside_a_run_is_a_clear_error() -> None:
    with pytest.raises(MissingContextError, match="outside a run"):
        get_run_context()


# --- run names -----------------------------------------------------------------------


def test_task_run_name_from_a_template_or_a_function() -> None:
    templated = task(task_run_name="add-{x}-{y}")(lambda x, y=2: x + y)
    assert templated.run_create((1,), {})[0].name == "add-1-2"
    by_function = task(task_run_name=lambda parameters: f"n{parameters['x']}")(lambda x: x)
    assert by_function.run_create((7,), {})[0].name == "n7"
    constant = task(task_run_name=lambda: "fixed")(lambda x: x)
    assert constant.run_create((7,), {})[0].name == "fixed"


def test_a_template_naming_a_missing_parameter_fails_before_sending() -> None:
    t = task(task_run_name="run-{nope}")(lambda x: x)
    with pytest.raises(ConfigurationError, match="nope"):
        t.run_create((1,), {})


# --- caching -------------------------------------------------------------------------


def by_first_argument(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    assert context.task_run is None  # evaluated where the run is submitted
    return f"k{parameters['x']}"


@task(cache_key_fn=by_first_argument, cache_expiration=datetime.timedelta(hours=1))
async def expensive(x: int) -> int:
    executions.append(x)
    return x * 10


async def test_a_cached_run_completes_at_once_with_the_earlier_result(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, expensive)
    first = await run_when(srv, await submit(srv, expensive, 4), ended)
    second = await run_of(srv, await submit(srv, expensive, 4))
    other = await run_when(srv, await submit(srv, expensive, 5), ended)
    assert second.state is S.COMPLETED and second.result == first.result
    assert second.message == f"cached: the result of run {first.id}"
    assert second.result is not None and loads_payload(second.result) == 40
    assert other.result is not None and loads_payload(other.result) == 50
    assert executions == [4, 5]
    await trio.sleep(3000)
    # Hits do not restart the clock, and keep naming the run that computed the value.
    late = await run_of(srv, await submit(srv, expensive, 4))
    assert late.message == f"cached: the result of run {first.id}"
    await trio.sleep(601)  # an hour after the first run: the cache has expired
    third = await run_when(srv, await submit(srv, expensive, 4), ended)
    assert third.message is None and executions == [4, 5, 4]


async def test_a_run_scheduled_for_later_is_not_answered_from_the_cache(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    await start(nursery, srv, expensive)
    await run_when(srv, await submit(srv, expensive, 4), ended)
    create, payload = expensive.run_create((4,), {}, now_dt() + datetime.timedelta(seconds=60))
    (later,) = await srv.state.store.create_runs(
        [attrs.evolve(create, parameters=payload)], srv.state.now()
    )
    srv.state.dispatcher.wake()
    assert (await run_of(srv, later)).state is S.SCHEDULED
    run = await run_when(srv, later, ended)
    assert run.state is S.COMPLETED and run.message is None and executions == [4, 4]


def now_dt() -> datetime.datetime:
    return datetime.datetime.fromtimestamp(trio_wall_time(), datetime.UTC)


# --- map -----------------------------------------------------------------------------


def test_map_passes_unmapped_strings_and_scalars_whole() -> None:
    t = task(lambda x, y, z, w: None)
    calls = t.map_creates(([1, 2], unmapped([10, 20]), "ab"), {"w": 5})
    assert [loads_payload(payload) for _, payload in calls] == [
        ((1, [10, 20], "ab", 5), {}),
        ((2, [10, 20], "ab", 5), {}),
    ]
    with pytest.raises(ValueError, match="at least one iterable"):
        t.map_creates((1, unmapped([1]), "s"), {"w": 1})
    with pytest.raises(ValueError, match="differ in length"):
        t.map_creates(([1, 2], [1]), {"z": 1, "w": 1})


# --- the worker's attributes and lifetime -------------------------------------------


@task
async def waits_for_gate(gate: int) -> int:
    await trio.sleep(10)
    return gate


async def test_worker_attributes_as_prefect_names_them(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, srv: InProcessServer
) -> None:
    worker = TaskWorker(
        waits_for_gate, doubles, api_url="http://in-process", handle_signals=False,
        connect=srv.connect,
    )  # fmt: skip
    assert worker.started_at is None
    assert worker.task_keys == {waits_for_gate.key, doubles.key}
    assert f"{socket.gethostname()}-{os.getpid()}-" in worker.client_id
    await nursery.start(worker.start)
    assert worker.started_at is not None
    run_id = await submit(srv, waits_for_gate, 1)
    await run_when(srv, run_id, lambda r: r.state is S.RUNNING)
    (in_flight,) = worker.in_flight_task_runs[waits_for_gate.key]
    assert in_flight == run_id and worker.in_flight_task_runs[doubles.key] == {}
    await run_when(srv, run_id, ended)
    assert worker.finished_task_runs == {waits_for_gate.key: 1, doubles.key: 0}


async def test_async_with_starts_the_worker_and_stops_it_gracefully(
    autojump_clock: trio.testing.MockClock, srv: InProcessServer
) -> None:
    async with TaskWorker(
        waits_for_gate, api_url="http://in-process", handle_signals=False, connect=srv.connect
    ) as worker:
        assert worker.started
        run_id = await submit(srv, waits_for_gate, 3)
        await run_when(srv, run_id, lambda r: r.state is S.RUNNING)
    # The block's exit waited for the run in flight instead of cancelling it.
    assert not worker.started
    assert (await run_of(srv, run_id)).state is S.COMPLETED


@pytest.mark.parametrize("handle_signals", [True, False])
async def test_signal_handlers_are_installed_only_when_asked(
    autojump_clock: trio.testing.MockClock, srv: InProcessServer, handle_signals: bool
) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    worker = TaskWorker(
        doubles, api_url="http://in-process", handle_signals=handle_signals, connect=srv.connect
    )
    async with worker:
        await trio.sleep(1)
        during = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert (during != before) is handle_signals


async def test_the_block_error_comes_out_as_itself_after_a_graceful_stop(
    autojump_clock: trio.testing.MockClock, srv: InProcessServer
) -> None:
    with pytest.raises(KeyError, match="from the block"):
        async with TaskWorker(
            waits_for_gate, api_url="http://in-process", handle_signals=False,
            connect=srv.connect,
        ):  # fmt: skip
            run_id = await submit(srv, waits_for_gate, 1)
            await run_when(srv, run_id, lambda r: r.state is S.RUNNING)
            raise KeyError("from the block")
    assert (await run_of(srv, run_id)).state is S.COMPLETED  # the run in flight finished


async def test_a_worker_runs_once(
    autojump_clock: trio.testing.MockClock, srv: InProcessServer
) -> None:
    worker = TaskWorker(doubles, api_url="http://in-process", handle_signals=False,
                        connect=srv.connect)  # fmt: skip
    async with worker:
        pass
    with pytest.raises(RuntimeError, match="runs once"):
        async with worker:
            pass


async def test_cancelling_a_worker_is_an_abrupt_stop(
    autojump_clock: trio.testing.MockClock, srv: InProcessServer
) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, srv, waits_for_gate)
        run_id = await submit(srv, waits_for_gate, 1)
        await run_when(srv, run_id, lambda r: r.state is S.RUNNING)
        nursery.cancel_scope.cancel()  # what cancelling serve() or start() does
    run = await run_when(srv, run_id, lambda r: r.state is S.SCHEDULED)
    # No hand-back was sent: the server saw the connection go, and counted it.
    assert run.redeliveries == 1
    assert run.message == "redelivered: the worker's connection was lost"


def test_worker_lifecycle_calls_outside_trio_raise_at_once() -> None:
    worker = TaskWorker(doubles, api_url="http://in-process")
    for call in (worker.start, worker.stop):
        with pytest.raises(RuntimeError, match="needs a running trio run"):
            call()
    run = TaskRun(
        id=uuid.uuid4(), task_key=doubles.key, task_name="d", state=S.PENDING,
        created_at=datetime.datetime.now(datetime.UTC),
        scheduled_time=datetime.datetime.now(datetime.UTC),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="execute_task_run"):
        worker.execute_task_run(run)


async def test_serve_inside_trio_returns_the_workers_coroutine() -> None:
    with pytest.raises(ConfigurationError, match="at least one task"):
        serve()  # bad arguments fail before anything runs, in or out of trio
    pending = serve(doubles, api_url="http://127.0.0.1:9", handle_signals=False)
    assert inspect.iscoroutine(pending) and pending.cr_code.co_name == "start"
    pending.close()


# --- the store's schema --------------------------------------------------------------


async def test_a_data_directory_from_before_the_new_columns_is_upgraded(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "runs.sqlite3"
    db = sqlite3.connect(path)
    from trio_taskworker._server._store import ADDED_COLUMNS, SCHEMA

    old_table = SCHEMA[0]
    for name, kind in ADDED_COLUMNS.items():
        old_table = old_table.replace(f",\n        {name} {kind}", "")
    assert "cache_key" not in old_table
    db.execute(old_table)
    db.execute(
        "INSERT INTO task_runs (id, task_key, task_name, state, created_at, scheduled_time,"
        " attempt, retries, retry_count, retry_delay_seconds, redeliveries, tags, seq)"
        " VALUES (?, 'm:f', 'f', 'COMPLETED', 1, 1, 1, 0, 0, 0, 0, '[]', 1)",
        (str(uuid.UUID(int=1)),),
    )
    db.commit()
    db.close()
    store = SQLiteStore(path, threaded=False)
    await nursery.start(store.run)
    (old,) = await store.read_runs([uuid.UUID(int=1)])
    assert (old.state, old.name, old.cache_key) == (S.COMPLETED, None, None)
