"""End to end: run logs, log_prints and previews through real server and worker
processes (the tasks are served from this module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from trio_taskworker import TaskRunState, get_run_logger, open_client, task

from .conftest import Proc, worker

pytestmark = pytest.mark.e2e

#: More records than the server keeps for one run (its bound is 1000).
FLOOD = 3000


@task(log_prints=True)
async def logs_and_prints(x: int, label: str) -> dict[str, Any]:
    get_run_logger().warning("working on %s", label)
    print("printed", x)
    return {"x": x, "label": label}


@task
def floods(n: int) -> int:
    logger = get_run_logger()
    for i in range(n):
        logger.info("flood %d", i)
    return n


async def test_logs_prints_and_previews(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    proc = worker(server_proc, procs, tmp_path, "tests.test_e2e_runlog:logs_and_prints")
    async with open_client(server_proc.url):
        future = await logs_and_prints.delay(3, label="abc")
        assert await future.result(timeout=30) == {"x": 3, "label": "abc"}
        run_id = future.task_run_id
    # Right after result(): the worker sends a run's records before reporting its end.
    async with httpx.AsyncClient(base_url=server_proc.url) as http:
        logs = (await http.get(f"/runs/{run_id}/logs")).json()
        run = (await http.get(f"/runs/{run_id}")).json()
    assert [(r["level"], r["message"], r["attempt"]) for r in logs["logs"]] == [
        ("WARNING", "working on abc", 1),
        ("INFO", "printed 3", 1),
    ]
    assert logs["dropped"] == 0 and all(r["run_id"] == str(run_id) for r in logs["logs"])
    assert run["parameters_preview"] == "x=3, label='abc'"
    assert run["result_preview"] == "{'label': 'abc', 'x': 3}"  # reprlib sorts keys
    # The worker's own log has both, with the run id; the print did not reach stdout.
    output = proc.output()
    lines = [
        line for line in output.splitlines() if "working on abc" in line or "printed 3" in line
    ]
    assert len(lines) == 2 and all(str(run_id) in line for line in lines), output


async def test_a_flood_of_logs_is_bounded_and_the_run_completes(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    worker(server_proc, procs, tmp_path, "tests.test_e2e_runlog:floods")
    async with open_client(server_proc.url):
        future = await floods.delay(FLOOD)
        assert await future.result(timeout=60) == FLOOD
        run = await future.wait()
        assert run.state is TaskRunState.COMPLETED
    async with httpx.AsyncClient(base_url=server_proc.url) as http:
        logs = (await http.get(f"/runs/{future.task_run_id}/logs")).json()
    kept = [r["message"] for r in logs["logs"]]
    # The oldest are kept in order, and what was not kept is counted.
    assert kept == [f"flood {i}" for i in range(len(kept))] and 0 < len(kept) < FLOOD
    assert logs["dropped"] == FLOOD - len(kept)
