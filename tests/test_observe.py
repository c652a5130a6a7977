"""What the server tells people about runs: history, logs, retry, workers, tasks,
the event stream and the dashboard's files (the CLI, the dashboard and the metrics
have their own tests)."""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

import httpx
import pytest
import trio

from trio_taskworker import TaskRunState, TaskServer, TaskWorker, task
from trio_taskworker._models import Finished as FinishedReport
from trio_taskworker._models import LogRecord, Started, TaskRunCreate
from trio_taskworker._server._events import MAX_PENDING, Events
from trio_taskworker._server._sqlite import SQLiteStore
from trio_taskworker._server._ui import CONTENT_SECURITY_POLICY
from trio_taskworker.testing import TEST_CLUSTER_URL, TaskCluster, open_test_cluster

from .helpers import wait_until

S = TaskRunState
attempts: list[int] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    attempts.clear()


@task(retries=1, retry_delay_seconds=60)
async def flaky() -> str:
    attempts.append(1)
    if len(attempts) == 1:
        raise RuntimeError("first attempt fails")
    return "ok"


@task
async def boom() -> None:
    raise ValueError("always")


@task
async def hold() -> None:
    await trio.sleep_forever()


async def _get(cluster: TaskCluster, path: str, **kwargs: Any) -> httpx.Response:
    async with cluster.server.open_http(TEST_CLUSTER_URL) as http:
        return await http.get(path, **kwargs)


async def _post(cluster: TaskCluster, path: str, **kwargs: Any) -> httpx.Response:
    async with cluster.server.open_http(TEST_CLUSTER_URL) as http:
        return await http.post(path, **kwargs)


def _timeline(response: httpx.Response) -> list[tuple[str, int]]:
    assert response.status_code == 200, response.text
    return [(entry["state"], entry["attempt"]) for entry in response.json()["history"]]


# --- history and retry ----------------------------------------------------------------


async def test_history_records_every_state_of_a_retried_run(autojump_clock: Any) -> None:
    async with open_test_cluster(flaky) as cluster:
        fut = await flaky.delay()
        assert await fut.result() == "ok"
        history = await _get(cluster, f"/runs/{fut.task_run_id}/history")
    assert _timeline(history) == [
        ("SCHEDULED", 0),
        ("PENDING", 1),
        ("RUNNING", 1),
        ("SCHEDULED", 1),  # the automatic retry, with its message
        ("PENDING", 2),
        ("RUNNING", 2),
        ("COMPLETED", 2),
    ]
    entries = history.json()["history"]
    assert entries[3]["message"].startswith("retry 1 of 1")
    times = [datetime.datetime.fromisoformat(e["timestamp"]) for e in entries]
    assert times == sorted(times)
    assert (times[4] - times[3]).total_seconds() >= 60  # the retry waited its delay


async def test_retry_by_request_queues_an_ended_run_as_a_new_attempt(
    autojump_clock: Any,
) -> None:
    async with open_test_cluster(boom) as cluster:
        fut = await boom.delay()
        await fut.wait()
        run_id = fut.task_run_id
        assert (await cluster.client.read_run(run_id)).state is S.FAILED
        retried = await _post(cluster, f"/runs/{run_id}/retry")
        assert retried.status_code == 200, retried.text
        body = retried.json()
        assert body["state"] == "SCHEDULED"
        assert body["error"] is None and body["finished_at"] is None
        assert body["message"] == "retried by request after FAILED"
        ended = await cluster.client.wait_run(run_id)
        assert ended.state is S.FAILED and ended.attempt == 2
        timeline = _timeline(await _get(cluster, f"/runs/{run_id}/history"))
        assert timeline[-4:] == [("SCHEDULED", 1), ("PENDING", 2), ("RUNNING", 2), ("FAILED", 2)]

        # Only an ended run that did not complete can be retried.
        done = await cluster.client.read_run(run_id)
        assert done.state is S.FAILED
        unknown = await _post(cluster, f"/runs/{uuid.uuid4()}/retry")
        assert unknown.status_code == 404
        bad = await _post(cluster, "/runs/not-a-uuid/retry")
        assert bad.status_code == 422
        queued = await hold.delay()  # no worker serves it: it stays SCHEDULED
        refused = await _post(cluster, f"/runs/{queued.task_run_id}/retry")
        assert refused.status_code == 409
        assert "is SCHEDULED" in refused.json()["detail"]


async def test_a_completed_run_cannot_be_retried(autojump_clock: Any) -> None:
    async with open_test_cluster(flaky) as cluster:
        fut = await flaky.delay()
        await fut.result()
        refused = await _post(cluster, f"/runs/{fut.task_run_id}/retry")
    assert refused.status_code == 409
    assert "is COMPLETED" in refused.json()["detail"]


async def test_history_and_logs_of_an_unknown_run_are_404(autojump_clock: Any) -> None:
    async with open_test_cluster() as cluster:
        for path in ("history", "logs"):
            response = await _get(cluster, f"/runs/{uuid.uuid4()}/{path}")
            assert response.status_code == 404
            assert response.json()["detail"].startswith("no run")


# --- logs -----------------------------------------------------------------------------


def _record(run_id: uuid.UUID, message: str, level: str = "INFO") -> LogRecord:
    return LogRecord(
        run_id=run_id,
        attempt=1,
        timestamp=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        level=level,
        logger="tasks",
        message=message,
    )


async def test_logs_are_bounded_per_run_and_the_rest_counted(nursery: trio.Nursery) -> None:
    store = SQLiteStore(":memory:", threaded=False)
    store.max_logs_per_run = 3
    await nursery.start(store.run)
    (run_id,) = await store.create_runs([TaskRunCreate(task_key="k")], 1.0)
    records = [_record(run_id, f"line {i}") for i in range(5)]
    stranger = _record(uuid.uuid4(), "for no run")
    assert await store.put_logs([*records, stranger]) == (3, 2, 1)
    assert await store.put_logs([_record(run_id, "late")]) == (0, 1, 0)
    found = await store.read_logs(run_id)
    assert found is not None
    kept, dropped = found
    assert [r.message for r in kept] == ["line 0", "line 1", "line 2"]
    assert dropped == 3
    assert await store.read_logs(uuid.uuid4()) is None


async def test_post_logs_validates_the_batch(autojump_clock: Any) -> None:
    async with open_test_cluster() as cluster:
        created = await _post(cluster, "/runs", json={"runs": [{"task_key": "k"}]})
        (run_id,) = created.json()["ids"]
        good = {
            "run_id": str(run_id),
            "attempt": 0,
            "timestamp": "2026-01-01T00:00:00+00:00",
            "level": "WARNING",
            "logger": "x",
            "message": "<b>not markup</b>",
        }
        accepted = await _post(cluster, "/logs", json={"records": [good]})
        assert accepted.status_code == 202
        assert accepted.json() == {"stored": 1, "dropped": 0, "unknown": 0}
        for bad, reason in [
            ({**good, "level": "LOUD"}, "level"),
            ({**good, "message": "x" * 16385}, "message"),
            ({**good, "run_id": "nope"}, "run_id"),
        ]:
            refused = await _post(cluster, "/logs", json={"records": [bad]})
            assert refused.status_code == 422, bad
            assert reason in refused.json()["detail"]
        too_many = await _post(cluster, "/logs", json={"records": [good] * 1001})
        assert too_many.status_code == 422
        logs = await _get(cluster, f"/runs/{run_id}/logs")
    assert logs.status_code == 200
    assert [(r["level"], r["message"]) for r in logs.json()["logs"]] == [
        ("WARNING", "<b>not markup</b>")
    ]
    assert logs.json()["dropped"] == 0


async def test_retention_deletes_a_runs_history_and_logs(nursery: trio.Nursery) -> None:
    store = SQLiteStore(":memory:", threaded=False)
    await nursery.start(store.run)
    (run_id,) = await store.create_runs([TaskRunCreate(task_key="k")], 1.0)
    await store.put_logs([_record(run_id, "hello")])
    await store.cancel_run(run_id, 2.0)
    assert len(await store.read_history(run_id) or []) == 2
    deleted, _ = await store.delete_ended_runs(ended_before=10.0, limit=10)
    assert deleted == 1

    def leftovers(cur: Any) -> list[int]:
        counts = []
        for table in ("run_logs", "run_log_counts", "task_runs"):
            cur.execute(f"SELECT COUNT(*) FROM {table}")
            counts.append(cur.fetchone()[0])
        return counts

    assert await store.runner.transact(leftovers) == [0, 0, 0]


# --- lists, tasks and workers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "matches"),
    [
        ("a", {"plain"}),
        ("b,c", {"plain"}),
        ('x", "a', {"quote"}),
        ("%", {"percent"}),
        ("_", {"underscore"}),
        ("ab", {"ab"}),
        ("nowhere", set()),
    ],
)
async def test_the_tag_filter_matches_whole_tags_only(
    nursery: trio.Nursery, wanted: str, matches: set[str]
) -> None:
    store = SQLiteStore(":memory:", threaded=False)
    await nursery.start(store.run)
    tagged = {
        "plain": ("a", "b,c"),
        "quote": ('x", "a',),
        "percent": ("%",),
        "underscore": ("_",),
        "ab": ("ab", "abc"),
    }
    creates = [TaskRunCreate(task_key=name, tags=tags) for name, tags in tagged.items()]
    await store.create_runs(creates, 1.0)
    found = await store.list_runs(None, None, 100, 0, tag=wanted)
    assert {run.task_key for run in found} == matches


async def test_task_stats_count_each_key(nursery: trio.Nursery) -> None:
    store = SQLiteStore(":memory:", threaded=False)
    await nursery.start(store.run)
    now = 10_000.0
    later = datetime.datetime.fromtimestamp(now + 600, datetime.UTC)
    await store.create_runs(
        [
            TaskRunCreate(task_key="k"),
            TaskRunCreate(task_key="k"),
            TaskRunCreate(task_key="k"),
            TaskRunCreate(task_key="k", scheduled_time=later),
        ],
        now - 100,
    )
    claimed = await store.claim_runs(["k"], 2, "conn", now - 90)
    done, failing = claimed
    await store.apply_reports(
        "conn",
        [
            Started(id=done.id, attempt=1),
            FinishedReport(id=done.id, attempt=1, state=S.COMPLETED),
            Started(id=failing.id, attempt=1),
            FinishedReport(id=failing.id, attempt=1, state=S.FAILED, retry=False),
        ],
        now - 30,
    )
    (stats,) = [s for s in await store.task_stats(now, {"k": 2}) if s.task_key == "k"]
    assert (stats.queued, stats.scheduled, stats.running) == (1, 1, 0)
    assert (stats.completed_last_hour, stats.failed_last_hour) == (1, 1)
    assert stats.oldest_queued_seconds == pytest.approx(100.0)
    assert len(stats.ended_per_minute) == 60 and stats.ended_per_minute[-1] == 2
    assert stats.workers == 2
    # A key only a worker serves is listed too; an hour later the ends are gone.
    listed = await store.task_stats(now + 3600, {"idle": 1})
    assert [s.task_key for s in listed] == ["idle", "k"]
    assert sum(listed[1].ended_per_minute) == 0


async def test_workers_show_their_limit_and_runs_in_flight(autojump_clock: Any) -> None:
    async with open_test_cluster(hold, limit=3) as cluster:
        fut = await hold.delay()
        await cluster.client.wait_run(fut.task_run_id, timeout=0.5)
        response = await _get(cluster, "/workers")
        assert response.status_code == 200
        (worker,) = response.json()["workers"]
        assert worker["client_id"] == cluster.worker.client_id
        assert worker["task_keys"] == [hold.key]
        assert worker["limit"] == 3 and worker["in_flight"] == 1
        assert worker["last_seen"] >= worker["connected_at"]
        assert worker["draining"] is False
        tasks = (await _get(cluster, "/tasks")).json()["tasks"]
        assert [(t["task_key"], t["running"], t["workers"]) for t in tasks] == [(hold.key, 1, 1)]
        await fut.cancel()


# --- the event stream -----------------------------------------------------------------


def test_events_carry_no_traceback_and_a_short_error() -> None:
    from trio_taskworker._models import ErrorInfo, TaskRun
    from trio_taskworker._server._events import MAX_EVENT_ERROR

    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    run = TaskRun(
        id=uuid.uuid4(),
        task_key="k",
        task_name="k",
        state=S.FAILED,
        created_at=now,
        scheduled_time=now,
        result=b"pickled exception",
        error=ErrorInfo(type="E", message="m" * 100_000, traceback="t" * 100_000),
    )
    events = Events()
    with events.open_stream() as stream:
        events.runs([run])
        (event,) = stream._pending
        data = json.loads(event.data)
        assert data["result"] is None and data["error"]["traceback"] == ""
        assert len(data["error"]["message"]) == MAX_EVENT_ERROR
        events.runs([run] * (MAX_PENDING + 1))  # more than a stream holds: one reset
        assert [e.name for e in stream._pending] == ["run", "reset"]


async def test_event_streams_are_bounded(server: TaskServer) -> None:
    from trio_taskworker._server._events import MAX_STREAMS

    assert server.state is not None
    streams = [server.state.events.open_stream() for _ in range(MAX_STREAMS)]
    for stream in streams:
        stream.__enter__()
    async with httpx.AsyncClient(base_url=str(server.url)) as http:
        refused = await http.get("/events")
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    for stream in streams:
        stream.__exit__(None, None, None)


def test_a_stream_that_falls_behind_is_reset() -> None:
    events = Events()
    with events.open_stream() as stream:
        for _ in range(MAX_PENDING + 5):
            events.workers(1)
        assert len(stream._pending) <= MAX_PENDING
        assert stream._pending[0].name == "reset"


async def _events(response: httpx.Response) -> Any:
    """The (name, data) pairs of a ``text/event-stream`` response, as they come."""
    name = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


async def test_events_stream_runs_and_workers_live(server: TaskServer) -> None:
    seen: list[tuple[str, Any]] = []
    ready = trio.Event()

    async def read() -> None:
        async with (
            httpx.AsyncClient(base_url=str(server.url), timeout=None) as http,
            http.stream("GET", "/events") as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for name, data in _events(response):
                seen.append((name, data))
                if name == "ready":
                    ready.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await ready.wait()
        async with httpx.AsyncClient(base_url=str(server.url)) as http:
            created = await http.post(
                "/runs", json={"runs": [{"task_key": hold.key, "parameters_preview": "()"}]}
            )
            (run_id,) = created.json()["ids"]
            worker = TaskWorker(hold, api_url=server.url, handle_signals=False)
            nursery.start_soon(worker.start)
            await wait_until(lambda: _states(seen, run_id)[-1:] == ["RUNNING"])
            await http.post(f"/runs/{run_id}/cancel")
            await wait_until(lambda: _states(seen, run_id)[-1:] == ["CANCELLED"])
            await worker.stop()
            await wait_until(lambda: ("workers", {"connected": 0}) in seen)
        nursery.cancel_scope.cancel()
    states = _states(seen, run_id)
    assert states[0] == "SCHEDULED"
    assert states[-3:] == ["RUNNING", "CANCELLING", "CANCELLED"]
    assert ("workers", {"connected": 1}) in seen
    runs = [data for name, data in seen if name == "run"]
    # Events carry no payloads: a browser never gets pickles or long previews.
    assert all(r["parameters"] is None and r["parameters_preview"] is None for r in runs)


def _states(seen: list[tuple[str, Any]], run_id: str) -> list[str]:
    return [data["state"] for name, data in seen if name == "run" and data["id"] == run_id]


async def test_events_stream_ends_when_the_server_stops(server: TaskServer) -> None:
    async with (
        httpx.AsyncClient(base_url=str(server.url), timeout=None) as http,
        http.stream("GET", "/events") as response,
    ):
        names = []
        async for name, _ in _events(response):
            names.append(name)
            if name == "ready":
                await server.stop()
    assert names == ["ready"]


# --- the dashboard's files ------------------------------------------------------------


async def test_dashboard_files_are_served_with_a_strict_policy(server: TaskServer) -> None:
    async with httpx.AsyncClient(base_url=str(server.url)) as http:
        bare = await http.get("/ui")
        assert bare.status_code == 308 and bare.headers["location"] == "/ui/"
        page = await http.get("/ui/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        for path in ("/ui/nothing.js", "/ui/../_app.py", "/ui/%2e%2e/_app.py"):
            assert (await http.get(path)).status_code == 404, path


async def test_dashboard_files_need_no_key_but_its_data_does(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    key = "k" * 32
    srv = TaskServer(port=0, data_dir=tmp_path / "keyed", api_keys=[key])
    await nursery.start(srv.run)
    async with httpx.AsyncClient(base_url=str(srv.url)) as http:
        assert (await http.get("/ui/")).status_code == 200
        assert (await http.get("/events")).status_code == 401
        assert (await http.get("/workers")).status_code == 401
        listed = await http.get("/workers", headers={"authorization": f"Bearer {key}"})
        assert listed.status_code == 200
    await srv.stop()


# --- the error a reader sees ----------------------------------------------------------


@task
def sync_fails() -> None:
    raise KeyError("from a sync task")


async def test_a_failed_runs_traceback_starts_in_the_users_code(autojump_clock: Any) -> None:
    async with open_test_cluster(boom, sync_fails) as cluster:
        for failing in (boom, sync_fails):
            fut = await failing.delay()
            await fut.wait()
            error = (await cluster.client.read_run(fut.task_run_id)).error
            assert error is not None
            first_frame = error.traceback.splitlines()[1]
            assert first_frame.strip().startswith(f'File "{__file__}"'), error.traceback
            for machinery in ("_spawner.py", "trio/_threads.py", "outcome/"):
                assert machinery not in error.traceback


# --- metrics the handlers feed --------------------------------------------------------


@task(cache_key_fn=lambda context, parameters: "always the same")
async def cached() -> int:
    return 7


def _sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_a_cache_hit_counts_as_a_created_and_ended_run(autojump_clock: Any) -> None:
    async with open_test_cluster(cached) as cluster:
        first = await cached.delay()
        assert await first.result() == 7
        hit = await cached.delay()
        assert await hit.result() == 7
        assert (await cluster.client.read_run(hit.task_run_id)).attempt == 0  # no worker ran it
        text = (await _get(cluster, "/metrics")).text
    labels = {"task_key": cached.key}
    assert _sample(text, "trio_taskworker_runs_created_total", **labels) == 2
    ended = _sample(text, "trio_taskworker_runs_ended_total", state="COMPLETED", **labels)
    assert ended == 2
