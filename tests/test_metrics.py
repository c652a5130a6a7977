"""Metrics: ServerMetrics driven with run snapshots, and the worker's status metrics,
each checked by parsing the Prometheus text they expose."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_taskworker._models import TaskRun, TaskStats, WorkerInfo
from trio_taskworker._server._metrics import MAX_TASK_KEYS, OTHER_TASK_KEY, ServerMetrics
from trio_taskworker._states import TaskRunState
from trio_taskworker._status import StatusServer

S = TaskRunState
T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
KEY = "jobs:resize"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def at(seconds: float | None) -> datetime.datetime | None:
    return None if seconds is None else T0 + datetime.timedelta(seconds=seconds)


def snapshot(
    run_id: uuid.UUID,
    state: TaskRunState,
    *,
    attempt: int = 1,
    scheduled: float = 0.0,
    started: float | None = None,
    finished: float | None = None,
    key: str = KEY,
    **fields: Any,
) -> TaskRun:
    """The run ``run_id`` as the server would show it; times in seconds after T0."""
    return TaskRun(
        id=run_id,
        task_key=key,
        task_name="resize",
        state=state,
        created_at=T0,
        scheduled_time=T0 + datetime.timedelta(seconds=scheduled),
        started_at=at(started),
        finished_at=at(finished),
        attempt=attempt,
        **fields,
    )


def stats(key: str, queued: int = 0, scheduled: int = 0, running: int = 0, **kw: Any) -> TaskStats:
    return TaskStats(
        task_key=key,
        queued=queued,
        scheduled=scheduled,
        running=running,
        completed_last_hour=0,
        failed_last_hour=0,
        oldest_queued_seconds=kw.get("oldest"),
        ended_per_minute=(0,) * 60,
        workers=kw.get("workers", 0),
    )


def worker_info(n: int, limit: int, in_flight: int, draining: bool = False) -> WorkerInfo:
    return WorkerInfo(
        connection_id=f"c{n}",
        client_id=f"host-{n}",
        task_keys=(KEY,),
        limit=limit,
        in_flight=in_flight,
        connected_at=T0,
        last_seen=T0,
        draining=draining,
    )


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(
    metrics: ServerMetrics,
    tasks: Sequence[TaskStats] = (),
    workers: Sequence[WorkerInfo] = (),
) -> Samples:
    body, content_type = metrics.render(tasks, workers)
    assert content_type.startswith("text/plain; version=0.0.4")
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def observed(samples: Samples, histogram: str, key: str = KEY) -> tuple[float, float]:
    """(count, sum) of a histogram's series for ``key``; (0, 0) when it has none."""
    count = value(samples, f"{histogram}_count", task_key=key) or 0.0
    total = value(samples, f"{histogram}_sum", task_key=key) or 0.0
    return count, total


START = "trio_taskworker_run_start_delay_seconds"
DURATION = "trio_taskworker_run_duration_seconds"
ENDED = "trio_taskworker_runs_ended_total"


class Clock:
    """The metrics' clock, in UNIX seconds, set by the test."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return T0.timestamp() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock: Clock) -> ServerMetrics:
    return ServerMetrics(now=clock, process=False)


def test_runs_created_by_task_key(metrics: ServerMetrics) -> None:
    metrics.runs_created(["a:f", "a:f", "b:g"])
    samples = scrape(metrics)
    assert value(samples, "trio_taskworker_runs_created_total", task_key="a:f") == 2
    assert value(samples, "trio_taskworker_runs_created_total", task_key="b:g") == 1
    metrics.runs_created(["b:g"])
    assert value(scrape(metrics), "trio_taskworker_runs_created_total", task_key="b:g") == 2


def test_a_run_is_observed_once_however_often_it_is_shown(metrics: ServerMetrics) -> None:
    rid = uuid.uuid4()
    pending = snapshot(rid, S.PENDING, scheduled=1)
    running = snapshot(rid, S.RUNNING, scheduled=1, started=3)
    done = snapshot(rid, S.COMPLETED, scheduled=1, started=3, finished=8)
    metrics.runs_changed([pending, pending])
    samples = scrape(metrics)
    assert observed(samples, START) == (0, 0)
    assert value(samples, ENDED, task_key=KEY, state="COMPLETED") is None
    metrics.runs_changed([running])
    metrics.runs_changed([running])
    samples = scrape(metrics)
    assert observed(samples, START) == (1, 2.0)
    assert observed(samples, DURATION) == (0, 0)
    metrics.runs_changed([done, done])
    metrics.runs_changed([done])
    samples = scrape(metrics)
    assert observed(samples, START) == (1, 2.0)
    assert observed(samples, DURATION) == (1, 5.0)
    assert value(samples, ENDED, task_key=KEY, state="COMPLETED") == 1
    # The bucket counts agree: 2 s is past le=1 and within le=2.5.
    assert value(samples, f"{START}_bucket", task_key=KEY, le="1.0") == 0
    assert value(samples, f"{START}_bucket", task_key=KEY, le="2.5") == 1


def test_pending_to_ended_in_one_change(metrics: ServerMetrics) -> None:
    # The worker's start and finish reports arrive in one frame.
    rid = uuid.uuid4()
    metrics.runs_changed([snapshot(rid, S.PENDING)])
    metrics.runs_changed([snapshot(rid, S.FAILED, started=0.5, finished=0.75)])
    samples = scrape(metrics)
    assert observed(samples, START) == (1, 0.5)
    assert observed(samples, DURATION) == (1, 0.25)
    assert value(samples, ENDED, task_key=KEY, state="FAILED") == 1


def test_each_attempt_of_a_retried_run(metrics: ServerMetrics, clock: Clock) -> None:
    rid = uuid.uuid4()
    metrics.runs_changed([snapshot(rid, S.RUNNING, started=2)])
    # It failed at 6 s and waits until 10 s: no finished_at, the change is now.
    clock.offset = 6
    retry = snapshot(rid, S.SCHEDULED, scheduled=10, started=2, retry_count=1)
    metrics.runs_changed([retry, retry])
    samples = scrape(metrics)
    assert observed(samples, DURATION) == (1, 4.0)
    assert value(samples, ENDED, task_key=KEY, state="FAILED") is None
    # Claimed again: the started_at shown is the first attempt's.
    clock.offset = 20
    metrics.runs_changed([snapshot(rid, S.PENDING, attempt=2, scheduled=10, started=2)])
    samples = scrape(metrics)
    assert observed(samples, START) == (1, 2.0)
    assert observed(samples, DURATION) == (1, 4.0)
    metrics.runs_changed([snapshot(rid, S.RUNNING, attempt=2, scheduled=10, started=11)])
    metrics.runs_changed(
        [snapshot(rid, S.FAILED, attempt=2, scheduled=10, started=11, finished=14)]
    )
    samples = scrape(metrics)
    assert observed(samples, START) == (2, 2.0 + 1.0)
    assert observed(samples, DURATION) == (2, 4.0 + 3.0)
    assert value(samples, ENDED, task_key=KEY, state="FAILED") == 1


def test_start_and_retried_failure_in_one_change(metrics: ServerMetrics, clock: Clock) -> None:
    # The retry moved scheduled_time past the start; the claim showed when the
    # attempt was due.
    rid = uuid.uuid4()
    clock.offset = 3
    metrics.runs_changed([snapshot(rid, S.PENDING, scheduled=0.5)])
    metrics.runs_changed([snapshot(rid, S.SCHEDULED, scheduled=5, started=1, retry_count=1)])
    samples = scrape(metrics)
    assert observed(samples, START) == (1, 0.5)
    assert observed(samples, DURATION) == (1, 2.0)
    metrics.runs_changed(
        [snapshot(rid, S.COMPLETED, attempt=2, scheduled=5, started=7, finished=8)]
    )
    samples = scrape(metrics)
    assert observed(samples, START) == (2, 0.5 + 2.0)
    assert observed(samples, DURATION) == (2, 2.0 + 1.0)


def test_retried_failure_of_a_claim_not_seen(metrics: ServerMetrics, clock: Clock) -> None:
    # Without the claim, when the attempt was due is gone: no delay is
    # observed (rather than a negative one); its duration is.
    clock.offset = 3
    metrics.runs_changed([snapshot(uuid.uuid4(), S.SCHEDULED, scheduled=5, started=1)])
    samples = scrape(metrics)
    assert observed(samples, START) == (0, 0)
    assert observed(samples, DURATION) == (1, 2.0)


def test_a_redelivered_attempt_is_due_when_it_was_queued_again(
    metrics: ServerMetrics, clock: Clock
) -> None:
    rid = uuid.uuid4()
    metrics.runs_changed([snapshot(rid, S.PENDING, scheduled=1)])
    metrics.runs_changed([snapshot(rid, S.RUNNING, scheduled=1, started=2)])
    clock.offset = 30  # the worker was lost; scheduled_time stays in the past
    queued = snapshot(rid, S.SCHEDULED, scheduled=1, started=2, redeliveries=1)
    metrics.runs_changed([queued])
    clock.offset = 31
    metrics.runs_changed([queued])  # shown again: still due since 30 s
    metrics.runs_changed([snapshot(rid, S.PENDING, attempt=2, scheduled=1, started=2)])
    metrics.runs_changed([snapshot(rid, S.RUNNING, attempt=2, scheduled=1, started=31.5)])
    samples = scrape(metrics)
    assert observed(samples, START) == (2, 1.0 + 1.5)
    assert observed(samples, DURATION) == (1, 28.0)


def test_a_stale_started_at_is_not_a_start(metrics: ServerMetrics, clock: Clock) -> None:
    rid = uuid.uuid4()
    metrics.runs_changed([snapshot(rid, S.RUNNING, started=1)])
    clock.offset = 4  # the worker was lost: redelivered
    metrics.runs_changed([snapshot(rid, S.SCHEDULED, started=1, redeliveries=1)])
    # Claimed, then released before it started, then cancelled while queued:
    # started_at is still the first attempt's throughout.
    for state in (S.PENDING, S.SCHEDULED):
        metrics.runs_changed([snapshot(rid, state, attempt=2, started=1, redeliveries=1)])
    metrics.runs_changed([snapshot(rid, S.CANCELLED, attempt=2, started=1, finished=9)])
    samples = scrape(metrics)
    assert observed(samples, START) == (1, 1.0)
    assert observed(samples, DURATION) == (1, 3.0)
    assert value(samples, ENDED, task_key=KEY, state="CANCELLED") == 1


def test_an_unknown_run_with_an_earlier_attempts_start(metrics: ServerMetrics) -> None:
    # First seen ended as CANCELLED on attempt 2: its started_at may be attempt 1's.
    metrics.runs_changed([snapshot(uuid.uuid4(), S.CANCELLED, attempt=2, started=1, finished=9)])
    # First seen PENDING: this attempt has not started; started_at is an earlier one's.
    metrics.runs_changed([snapshot(uuid.uuid4(), S.PENDING, attempt=2, started=1)])
    # First seen RUNNING: started_at is this attempt's, whatever the attempt.
    metrics.runs_changed([snapshot(uuid.uuid4(), S.RUNNING, attempt=3, started=2)])
    samples = scrape(metrics)
    assert observed(samples, START) == (1, 2.0)
    assert observed(samples, DURATION) == (0, 0)
    assert value(samples, ENDED, task_key=KEY, state="CANCELLED") == 1


def test_cancelled_while_running(metrics: ServerMetrics) -> None:
    rid = uuid.uuid4()
    metrics.runs_changed([snapshot(rid, S.RUNNING, started=1)])
    metrics.runs_changed([snapshot(rid, S.CANCELLING, started=1)])
    metrics.runs_changed([snapshot(rid, S.CANCELLED, started=1, finished=1.5)])
    samples = scrape(metrics)
    assert observed(samples, START) == (1, 1.0)
    assert observed(samples, DURATION) == (1, 0.5)
    assert value(samples, ENDED, task_key=KEY, state="CANCELLED") == 1


def test_a_run_retried_after_its_end_ends_again(metrics: ServerMetrics) -> None:
    rid = uuid.uuid4()
    failed = snapshot(rid, S.FAILED, started=1, finished=2)
    metrics.runs_changed([failed])
    # POST /runs/{id}/retry clears started_at and finished_at.
    metrics.runs_changed([snapshot(rid, S.SCHEDULED, scheduled=10)])
    metrics.runs_changed([failed])  # a late copy of the first end: not a new end
    metrics.runs_changed([snapshot(rid, S.PENDING, attempt=2, scheduled=10)])
    metrics.runs_changed(
        [snapshot(rid, S.COMPLETED, attempt=2, scheduled=10, started=12, finished=15)]
    )
    samples = scrape(metrics)
    assert value(samples, ENDED, task_key=KEY, state="FAILED") == 1
    assert value(samples, ENDED, task_key=KEY, state="COMPLETED") == 1
    assert observed(samples, START) == (2, 1.0 + 2.0)
    assert observed(samples, DURATION) == (2, 1.0 + 3.0)


def test_remembered_ends_are_bounded(clock: Clock) -> None:
    def run_three_and_repeat_the_first(metrics: ServerMetrics) -> float | None:
        runs = [snapshot(uuid.uuid4(), S.CRASHED, finished=1) for _ in range(3)]
        metrics.runs_changed(runs)
        metrics.runs_changed(runs[:1])
        return value(scrape(metrics), ENDED, task_key=KEY, state="CRASHED")

    # With room for the three, the copy is known; with room for two, the
    # first end was forgotten to make room, and its copy counts again.
    assert run_three_and_repeat_the_first(ServerMetrics(process=False)) == 3
    assert run_three_and_repeat_the_first(ServerMetrics(max_remembered_ends=2, process=False)) == 4


def test_remembered_starts_are_bounded() -> None:
    def start_three_then_end_the_first(metrics: ServerMetrics) -> tuple[float, float]:
        ids = [uuid.uuid4() for _ in range(3)]
        metrics.runs_changed([snapshot(i, S.RUNNING, started=1) for i in ids])
        # Shown again as RUNNING: a forgotten start looks new.
        metrics.runs_changed([snapshot(ids[0], S.RUNNING, started=1)])
        return observed(scrape(metrics), START)

    assert start_three_then_end_the_first(ServerMetrics(process=False)) == (3, 3.0)
    assert start_three_then_end_the_first(ServerMetrics(max_tracked_runs=2, process=False)) == (
        4,
        4.0,
    )


def test_redeliveries(metrics: ServerMetrics) -> None:
    metrics.runs_redelivered([KEY, KEY, "other:task"])
    samples = scrape(metrics)
    assert value(samples, "trio_taskworker_runs_redelivered_total", task_key=KEY) == 2
    assert value(samples, "trio_taskworker_runs_redelivered_total", task_key="other:task") == 1


def test_store_batches(metrics: ServerMetrics) -> None:
    metrics.store_batch(1, 0.0002)
    metrics.store_batch(300, 0.02)
    samples = scrape(metrics)
    name = "trio_taskworker_store_batch_operations"
    assert value(samples, f"{name}_count") == 2
    assert value(samples, f"{name}_sum") == 301
    assert value(samples, f"{name}_bucket", le="1.0") == 1
    assert value(samples, f"{name}_bucket", le="256.0") == 1
    assert value(samples, f"{name}_bucket", le="512.0") == 2
    latency = "trio_taskworker_store_batch_duration_seconds"
    assert value(samples, f"{latency}_count") == 2
    assert value(samples, f"{latency}_sum") == pytest.approx(0.0202)
    assert value(samples, f"{latency}_bucket", le="0.00025") == 1


def test_queue_gauges_follow_the_snapshot(metrics: ServerMetrics) -> None:
    tasks = [
        stats("a:f", queued=3, scheduled=1, running=2, oldest=12.5, workers=2),
        stats("b:g", scheduled=4),
    ]
    samples = scrape(metrics, tasks)
    assert value(samples, "trio_taskworker_runs_queued", task_key="a:f") == 3
    assert value(samples, "trio_taskworker_runs_scheduled", task_key="a:f") == 1
    assert value(samples, "trio_taskworker_runs_running", task_key="a:f") == 2
    assert value(samples, "trio_taskworker_oldest_queued_run_age_seconds", task_key="a:f") == 12.5
    assert value(samples, "trio_taskworker_task_workers", task_key="a:f") == 2
    assert value(samples, "trio_taskworker_runs_scheduled", task_key="b:g") == 4
    assert value(samples, "trio_taskworker_oldest_queued_run_age_seconds", task_key="b:g") == 0
    # A key gone from the snapshot leaves no gauge behind.
    samples = scrape(metrics, [stats("b:g", queued=1)])
    assert not [k for k in samples if ("task_key", "a:f") in k[1]]
    assert value(samples, "trio_taskworker_runs_queued", task_key="b:g") == 1
    assert not [k for k in scrape(metrics) if k[0] == "trio_taskworker_runs_queued"]


def test_worker_gauges(metrics: ServerMetrics) -> None:
    workers = [worker_info(1, 4, 3), worker_info(2, 10, 0, draining=True)]
    samples = scrape(metrics, workers=workers)
    assert value(samples, "trio_taskworker_workers_connected") == 2
    assert value(samples, "trio_taskworker_workers_draining") == 1
    assert value(samples, "trio_taskworker_workers_runs_in_flight") == 3
    assert value(samples, "trio_taskworker_workers_limit") == 14
    samples = scrape(metrics)
    assert value(samples, "trio_taskworker_workers_connected") == 0
    # No connection or client id is a label value anywhere.
    labels = {v for _, ls in scrape(metrics, workers=workers) for _, v in ls}
    assert not labels & {"c1", "c2", "host-1", "host-2"}


def test_task_key_label_values_are_capped(clock: Clock) -> None:
    metrics = ServerMetrics(max_task_keys=2, process=False)
    metrics.runs_created(["a:f", "b:g", "c:h", "d:i", "a:f"])
    metrics.runs_changed([snapshot(uuid.uuid4(), S.COMPLETED, started=1, finished=2, key="e:j")])
    samples = scrape(
        metrics,
        [
            stats("a:f", queued=1),
            stats("c:h", queued=2, oldest=5),
            stats("d:i", queued=3, oldest=9),
        ],
    )
    created = "trio_taskworker_runs_created_total"
    assert value(samples, created, task_key="a:f") == 2
    assert value(samples, created, task_key="b:g") == 1
    assert value(samples, created, task_key=OTHER_TASK_KEY) == 2
    assert value(samples, ENDED, task_key=OTHER_TASK_KEY, state="COMPLETED") == 1
    assert observed(samples, DURATION, OTHER_TASK_KEY) == (1, 1.0)
    # Gauges of keys past the cap add up under the shared label; the oldest age is the oldest.
    assert value(samples, "trio_taskworker_runs_queued", task_key=OTHER_TASK_KEY) == 5
    age = "trio_taskworker_oldest_queued_run_age_seconds"
    assert value(samples, age, task_key=OTHER_TASK_KEY) == 9
    keys = {v for _, ls in samples for k, v in ls if k == "task_key"}
    assert keys == {"a:f", "b:g", OTHER_TASK_KEY}


def test_the_default_cap() -> None:
    metrics = ServerMetrics(process=False)
    metrics.runs_created([f"m:t{i}" for i in range(MAX_TASK_KEYS + 5)])
    samples = scrape(metrics)
    created = {
        dict(ls)["task_key"]: v
        for (name, ls), v in samples.items()
        if name == "trio_taskworker_runs_created_total"
    }
    assert MAX_TASK_KEYS == 1000
    assert len(created) == MAX_TASK_KEYS + 1
    assert created[OTHER_TASK_KEY] == 5 and created["m:t999"] == 1


def test_awkward_task_keys_are_escaped(metrics: ServerMetrics) -> None:
    keys = ['quote"s:and\\slash', "new\nline:x", "ünï:cödé", "lone:\ud800"]
    metrics.runs_created(keys)
    samples = scrape(metrics)
    found = {
        dict(ls)["task_key"]
        for name, ls in samples
        if name.startswith("trio_taskworker_runs_created")
    }
    assert found == {'quote"s:and\\slash', "new\nline:x", "ünï:cödé", "lone:\\ud800"}


def test_registries_are_separate() -> None:
    first, second = ServerMetrics(process=False), ServerMetrics(process=False)
    first.runs_created([KEY])
    assert value(scrape(first), "trio_taskworker_runs_created_total", task_key=KEY) == 1
    assert value(scrape(second), "trio_taskworker_runs_created_total", task_key=KEY) is None


def test_names_and_process_metrics() -> None:
    metrics = ServerMetrics()
    metrics.runs_created([KEY])
    metrics.runs_changed([snapshot(uuid.uuid4(), S.COMPLETED, started=1, finished=2)])
    body, _ = metrics.render([stats(KEY)], [worker_info(1, 1, 1)])
    families = list(text_string_to_metric_families(body.decode()))
    ours = [f for f in families if f.name.startswith("trio_taskworker_")]
    assert {f.name for f in families} - {f.name for f in ours} >= {"python_info"}
    assert all(f.name.startswith(("process_", "python_")) for f in families if f not in ours)
    for family in ours:
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
        assert not any(s.name.endswith("_created") for s in family.samples), family.name
        assert family.documentation
    assert (
        value(
            parse(body.decode()),
            "trio_taskworker_build_info",
            version=__import__("trio_taskworker").__version__,
        )
        == 1
    )


# --- the worker's status server ----------------------------------------------------


def worker_status(**changes: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "client_id": "host-1-abc",
        "connected": True,
        "stopping": False,
        "limit": 4,
        "current": 3,
        "available": 1,
        "tasks": ["a:f", "b:g"],
        "finished": {"a:f": 7, "b:g": 2},
        "failed": {"a:f": 2},
        "in_flight": {},
    }
    status.update(changes)
    return status


async def test_worker_metrics(nursery: trio.Nursery) -> None:
    current = worker_status()
    url = await nursery.start(StatusServer(lambda: current).run)
    async with httpx.AsyncClient() as http:

        async def scrape_worker() -> Samples:
            response = await http.get(f"{url}/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            return parse(response.text)

        samples = await scrape_worker()
        assert value(samples, "trio_taskworker_worker_runs_in_flight") == 3
        assert value(samples, "trio_taskworker_worker_limit") == 4
        assert value(samples, "trio_taskworker_worker_runs_available") == 1
        assert value(samples, "trio_taskworker_worker_connected") == 1
        assert value(samples, "trio_taskworker_worker_stopping") == 0
        finished = "trio_taskworker_worker_runs_finished_total"
        failed = "trio_taskworker_worker_runs_failed_total"
        assert value(samples, finished, task_key="a:f") == 7
        assert value(samples, finished, task_key="b:g") == 2
        assert value(samples, failed, task_key="a:f") == 2
        assert value(samples, failed, task_key="b:g") is None
        # Read at each scrape: no limit, no "failed" yet, stopping.
        current = worker_status(limit=None, available=None, stopping=True, current=0)
        del current["failed"]
        samples = await scrape_worker()
        assert value(samples, "trio_taskworker_worker_limit") is None
        assert value(samples, "trio_taskworker_worker_runs_available") is None
        assert value(samples, "trio_taskworker_worker_runs_in_flight") == 0
        assert value(samples, "trio_taskworker_worker_stopping") == 1
        assert not [k for k in samples if k[0] == failed]
        # /status is still there.
        assert (await http.get(f"{url}/status")).json()["stopping"] is True


def test_no_zero_valued_histogram_series_for_a_run_that_never_started(
    metrics: ServerMetrics,
) -> None:
    """A run cancelled before it started observes no start delay and no
    duration: neither histogram gets a series for its task key."""
    rid = uuid.uuid4()
    metrics.runs_changed([snapshot(rid, S.SCHEDULED)])
    metrics.runs_changed([snapshot(rid, S.CANCELLED, finished=1)])
    samples = scrape(metrics)
    assert value(samples, ENDED, task_key=KEY, state="CANCELLED") == 1
    assert value(samples, f"{START}_count", task_key=KEY) is None
    assert value(samples, f"{DURATION}_count", task_key=KEY) is None


def test_a_started_run_has_no_zero_valued_duration_series(metrics: ServerMetrics) -> None:
    rid = uuid.uuid4()
    metrics.runs_changed([snapshot(rid, S.RUNNING, started=1)])
    samples = scrape(metrics)
    assert observed(samples, START) == (1, 1.0)
    assert value(samples, f"{DURATION}_count", task_key=KEY) is None
