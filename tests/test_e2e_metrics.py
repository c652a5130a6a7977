"""End to end, metrics: a real server process and a real worker process with its
status server; runs that complete, fail, and are retried; both /metrics scraped
over HTTP and parsed as Prometheus text."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_taskworker import TaskRunState, gather_results, open_client

from . import e2e_tasks as t
from .conftest import Proc, free_port, start_server, worker

pytestmark = pytest.mark.e2e

TASKS_FILE = "tests/e2e_tasks.py"
ADMIN_KEY = "e2e-metrics-admin-0123456789abcdef"
SUBMIT_KEY = "e2e-metrics-submit-0123456789abcdef"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(http: httpx.AsyncClient, url: str, **headers: str) -> Samples:
    response = await http.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def scrape_until(
    read: Callable[[], Awaitable[Samples]], ready: Callable[[Samples], bool]
) -> Samples:
    """Scrape until ``ready`` (the other process may still be applying the last
    report); the values checked afterwards must then be exact."""
    samples: Samples = {}
    with trio.fail_after(30):
        while True:
            try:
                samples = await read()
            except httpx.TransportError:  # the worker's status server is starting
                samples = {}
            if ready(samples):
                return samples
            await trio.sleep(0.02)


async def test_server_and_worker_metrics(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    port = free_port()
    tasks = [f"{TASKS_FILE}:{name}" for name in ("add", "explode", "fail_until")]
    worker(server_proc, procs, tmp_path, *tasks, "--limit", "3", "--status-server-port", str(port))
    add, explode, fail_until = t.add.key, t.explode.key, t.fail_until.key
    async with open_client(server_proc.url), httpx.AsyncClient() as http:
        added = await t.add.map([1, 2, 3, 4])
        exploded = [await t.explode.delay("no"), await t.explode.delay("never")]
        # Three attempts, each failing: one run, FAILED in the end.
        gives_up = await t.fail_until.delay(str(tmp_path / "counter"), 5)
        assert await gather_results(added, timeout=30) == [2, 3, 4, 5]
        for fut in exploded:
            assert (await fut.wait(timeout=30)).state is TaskRunState.FAILED
        run = await gives_up.wait(timeout=30)
        assert run.state is TaskRunState.FAILED and run.finished_at is not None

        server = await scrape(http, server_proc.url)
        created = "trio_taskworker_runs_created_total"
        ended = "trio_taskworker_runs_ended_total"
        assert value(server, created, task_key=add) == 4
        assert value(server, created, task_key=explode) == 2
        assert value(server, created, task_key=fail_until) == 1
        assert value(server, ended, task_key=add, state="COMPLETED") == 4
        assert value(server, ended, task_key=explode, state="FAILED") == 2
        assert value(server, ended, task_key=fail_until, state="FAILED") == 1
        assert value(server, ended, task_key=add, state="FAILED") is None
        # One observation per attempt: four, two, and three (two retries).
        for key, attempts in [(add, 4), (explode, 2), (fail_until, 3)]:
            for histogram in ("run_start_delay_seconds", "run_duration_seconds"):
                name = f"trio_taskworker_{histogram}"
                assert value(server, f"{name}_count", task_key=key) == attempts, (key, name)
                assert value(server, f"{name}_bucket", task_key=key, le="+Inf") == attempts
        # Its life was three waits to start, three attempts, and two retry
        # delays of 0.2 s: these are not part of a start delay.
        delays = value(server, "trio_taskworker_run_start_delay_seconds_sum", task_key=fail_until)
        spent = value(server, "trio_taskworker_run_duration_seconds_sum", task_key=fail_until)
        assert delays is not None and spent is not None
        life = (run.finished_at - run.created_at).total_seconds()
        assert delays + spent == pytest.approx(life - 2 * 0.2, abs=0.05)
        assert value(server, "trio_taskworker_workers_connected") == 1
        assert value(server, "trio_taskworker_workers_limit") == 3
        assert value(server, "trio_taskworker_workers_runs_in_flight") == 0
        assert value(server, "trio_taskworker_task_workers", task_key=add) == 1
        assert value(server, "trio_taskworker_runs_queued", task_key=add) == 0
        assert value(server, "trio_taskworker_runs_running", task_key=add) == 0
        assert value(server, "trio_taskworker_runs_redelivered_total", task_key=add) is None
        batches = value(server, "trio_taskworker_store_batch_operations_count")
        operations = value(server, "trio_taskworker_store_batch_operations_sum")
        assert batches is not None and operations is not None and operations >= batches > 0
        assert value(server, "trio_taskworker_store_batch_duration_seconds_count") == batches

        status = f"http://127.0.0.1:{port}"
        finished = "trio_taskworker_worker_runs_finished_total"
        failed = "trio_taskworker_worker_runs_failed_total"
        mine = await scrape_until(
            lambda: scrape(http, status),
            lambda s: value(s, failed, task_key=fail_until) == 3,
        )
        assert value(mine, finished, task_key=add) == 4
        assert value(mine, finished, task_key=explode) == 2
        assert value(mine, finished, task_key=fail_until) == 3
        assert value(mine, failed, task_key=explode) == 2
        assert value(mine, failed, task_key=add) is None
        assert value(mine, "trio_taskworker_worker_limit") == 3
        assert value(mine, "trio_taskworker_worker_runs_in_flight") == 0
        assert value(mine, "trio_taskworker_worker_connected") == 1


async def test_metrics_need_the_admin_role(tmp_path: Path, procs: list[Proc]) -> None:
    proc = start_server(
        tmp_path / "data",
        TRIO_TASKWORKER_SERVER_API_KEY=f"{ADMIN_KEY}:admin,{SUBMIT_KEY}:submit",
    )
    procs.append(proc)
    async with httpx.AsyncClient() as http:
        url = f"{proc.url}/metrics"
        assert (await http.get(url)).status_code == 401
        forbidden = await http.get(url, headers={"authorization": f"Bearer {SUBMIT_KEY}"})
        assert forbidden.status_code == 403
        samples = await scrape(http, proc.url, authorization=f"Bearer {ADMIN_KEY}")
        assert value(samples, "trio_taskworker_workers_connected") == 0
