"""Fault injection with real processes: kill -9, SIGTERM, restarts, cancels."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_taskworker import ServerUnavailable, TaskRunState, gather_results, open_client

from . import e2e_tasks as t
from .conftest import Proc, start_server, start_worker
from .helpers import wait_for_runs, wait_until

pytestmark = pytest.mark.e2e

TASKS_FILE = "tests/e2e_tasks.py"


def new_worker(url: str, procs: list[Proc], tmp_path: Path, *args: str) -> Proc:
    proc = start_worker(url, *args, log=tmp_path / f"worker{len(procs)}.log")
    procs.append(proc)
    return proc


async def test_kill_9_workers_again_and_again_loses_nothing(
    tmp_path: Path, procs: list[Proc]
) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    async with open_client(server.url) as client:
        futs = await t.slow_add.map(range(80))
        done = 0
        for _round in range(4):
            if done == len(futs):
                break  # a loaded machine may run them all in fewer rounds
            worker = new_worker(server.url, procs, tmp_path, f"{TASKS_FILE}:slow_add",
                                "--limit", "4")  # fmt: skip
            # Kill it while it has runs in flight, after it made some progress.
            await wait_for_runs(client, futs, TaskRunState.COMPLETED, done + 1, timeout=60)
            worker.signal(signal.SIGKILL)
            worker.wait()
            runs = [await client.read_run(f.task_run_id) for f in futs]
            done = sum(r.state is TaskRunState.COMPLETED for r in runs)
        new_worker(server.url, procs, tmp_path, f"{TASKS_FILE}:slow_add", "--limit", "8")
        assert await gather_results(futs, timeout=60) == [i + 1000 for i in range(80)]
        runs = await client.wait_runs([f.task_run_id for f in futs])
        assert {r.state for r in runs} == {TaskRunState.COMPLETED}
        assert any(r.redeliveries > 0 for r in runs)  # the kills did hit running runs


async def test_kill_9_server_while_submitting_and_running(
    tmp_path: Path, procs: list[Proc]
) -> None:
    data = tmp_path / "data"
    server = start_server(data)
    procs.append(server)
    url = server.url
    new_worker(url, procs, tmp_path, f"{TASKS_FILE}:slow_add", "--limit", "4")
    accepted = []

    async def submit_until_refused() -> None:
        async with open_client(url):
            i = 0
            while True:
                try:
                    accepted.extend(await t.slow_add.map(range(i, i + 5)))
                except ServerUnavailable:
                    return
                i += 5
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit_until_refused)
        await wait_until(lambda: len(accepted) >= 100)
        server.signal(signal.SIGKILL)
        server.wait()
    port = int(url.rsplit(":", 1)[1])
    restarted = start_server(data, port=port, log_name="server2.log")
    procs.append(restarted)
    # The same worker reconnects by itself and finishes every accepted run.
    async with open_client(url):
        values = await gather_results(accepted, timeout=120)
    assert values == [int(v) for v in values]
    assert sorted(v - 1000 for v in values) == list(range(len(accepted)))


async def test_sigterm_with_short_grace_hands_runs_to_another_worker(
    tmp_path: Path, procs: list[Proc]
) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    gate = tmp_path / "gate"
    first = new_worker(server.url, procs, tmp_path, f"{TASKS_FILE}:wait_for_file",
                       "--shutdown-timeout", "0.2")  # fmt: skip
    async with open_client(server.url) as client:
        futs = await t.wait_for_file.map([str(gate)] * 3)
        await wait_for_runs(client, futs, TaskRunState.RUNNING)
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0
        runs = [await client.read_run(f.task_run_id) for f in futs]
        assert {r.state for r in runs} == {TaskRunState.SCHEDULED}
        assert {r.redeliveries for r in runs} == {0}  # a handback is not a redelivery
        gate.write_text("second worker")
        new_worker(server.url, procs, tmp_path, f"{TASKS_FILE}:wait_for_file")
        assert await gather_results(futs, timeout=30) == ["second worker"] * 3


async def test_cancel_running_async_run_from_the_cli(tmp_path: Path, procs: list[Proc]) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    new_worker(server.url, procs, tmp_path, f"{TASKS_FILE}:cancellable_marker")
    marker = tmp_path / "marker"
    async with open_client(server.url) as client:
        fut = await t.cancellable_marker.delay(str(marker))
        await wait_for_runs(client, [fut], TaskRunState.RUNNING)
        result = await trio.run_process(
            [sys.executable, "-m", "trio_taskworker", "run", "cancel", str(fut.task_run_id),
             "--api-url", server.url],
            capture_stdout=True,
        )  # fmt: skip
        assert result.stdout.decode().strip().endswith(("CANCELLING", "CANCELLED"))
        run = await fut.wait(timeout=30)
        assert run.state is TaskRunState.CANCELLED
        assert marker.read_text() == "finally ran"


def test_cli_cancel_bad_input(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "trio_taskworker", "run", "cancel", "not-a-uuid"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "is not a run id" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


async def test_idle_worker_reconnects_after_server_restart(
    tmp_path: Path, procs: list[Proc]
) -> None:
    data = tmp_path / "data"
    server = start_server(data)
    procs.append(server)
    worker = new_worker(server.url, procs, tmp_path, f"{TASKS_FILE}:add")
    async with open_client(server.url):
        assert await (await t.add.delay(1)).result(timeout=30) == 2
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    port = int(server.url.rsplit(":", 1)[1])
    again = start_server(data, port=port, log_name="server2.log")
    procs.append(again)
    async with open_client(again.url):
        assert await (await t.add.delay(41)).result(timeout=30) == 42
    assert worker.popen.poll() is None  # the same worker process did it
    assert worker.output().count("lost the server") == 1  # one line per outage


async def test_second_sigterm_stops_at_once_and_hands_runs_back(
    tmp_path: Path, procs: list[Proc]
) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    gate = tmp_path / "gate"
    worker = new_worker(server.url, procs, tmp_path, f"{TASKS_FILE}:wait_for_file",
                        "--shutdown-timeout", "3600")  # fmt: skip
    async with open_client(server.url) as client:
        futs = await t.wait_for_file.map([str(gate)] * 2)
        await wait_for_runs(client, futs, TaskRunState.RUNNING)
        worker.signal(signal.SIGTERM)
        await wait_until(lambda: "stopping: 2 runs in flight" in worker.output())
        worker.signal(signal.SIGTERM)  # do not wait out the hour
        assert worker.wait(30) == 0
        runs = [await client.read_run(f.task_run_id) for f in futs]
        assert {r.state for r in runs} == {TaskRunState.SCHEDULED}
        assert {r.redeliveries for r in runs} == {0}
