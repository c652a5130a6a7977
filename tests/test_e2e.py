"""End to end: a real server process, real worker processes started with the CLI,
a real SQLite file, and websockets over 127.0.0.1."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from trio_taskworker import (
    TaskRunState,
    TaskRunTimedOut,
    gather_results,
    open_client,
)

from . import e2e_tasks as t
from .conftest import Proc, free_port, start_server, worker
from .helpers import wait_for_runs, wait_until

pytestmark = pytest.mark.e2e

TASKS_FILE = "tests/e2e_tasks.py"


async def test_results_exceptions_and_map(
    server_proc: Proc, procs: list[Proc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One entrypoint by file path, the others by module: the keys must agree.
    worker(server_proc, procs, tmp_path, f"{TASKS_FILE}:add", "tests.e2e_tasks:mul",
           "tests.e2e_tasks:explode")  # fmt: skip
    async with open_client(server_proc.url):
        assert await (await t.add.delay(1, y=2)).result(timeout=30) == 3
        assert await (await t.mul.delay(6, 7)).result(timeout=30) == 42
        futs = await t.add.map([1, 2, 3], [10, 20, 30])
        assert await gather_results(futs, timeout=30) == [11, 22, 33]
        boom = await t.explode.delay("it broke")
        with pytest.raises(t.CustomError, match=r"^it broke$"):
            await boom.result(timeout=30)
        run = await boom.wait()
        assert run.state is TaskRunState.FAILED
        assert run.error is not None and run.error.type == "tests.e2e_tasks.CustomError"
    # Plain synchronous code, no trio: submit and wait (the URL comes from the environment).
    monkeypatch.setenv("TRIO_TASKWORKER_API_URL", server_proc.url)
    sync_result = await trio.to_thread.run_sync(
        lambda: t.add.delay_sync(20, 22).result_sync(timeout=30)
    )
    assert sync_result == 42


async def test_retries(server_proc: Proc, procs: list[Proc], tmp_path: Path) -> None:
    worker(server_proc, procs, tmp_path, f"{TASKS_FILE}:fail_until")
    async with open_client(server_proc.url):
        recovers = await t.fail_until.delay(str(tmp_path / "a"), 2)
        gives_up = await t.fail_until.delay(str(tmp_path / "b"), 5)
        assert await recovers.result(timeout=30) == 3
        run = await recovers.wait()
        assert (run.state, run.retry_count, run.attempt) == (TaskRunState.COMPLETED, 2, 3)
        with pytest.raises(ValueError, match="call 3 fails"):
            await gives_up.result(timeout=30)
        run = await gives_up.wait()
        assert (run.state, run.retry_count) == (TaskRunState.FAILED, 2)


async def test_timeout(server_proc: Proc, procs: list[Proc], tmp_path: Path) -> None:
    worker(server_proc, procs, tmp_path, f"{TASKS_FILE}:too_slow")
    async with open_client(server_proc.url):
        fut = await t.too_slow.delay()
        with pytest.raises(TaskRunTimedOut, match=r"timeout of 0\.5 s"):
            await fut.result(timeout=30)


async def test_scheduled_time(server_proc: Proc, procs: list[Proc], tmp_path: Path) -> None:
    worker(server_proc, procs, tmp_path, f"{TASKS_FILE}:add")
    async with open_client(server_proc.url):
        # The worker is serving first: on a loaded machine its start alone can
        # take longer than the delay below.
        now = await t.add.delay(0)
        assert await now.result(timeout=30) == 1
        at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1.5)
        later = await t.add.apply_async((1,), {"y": 1}, scheduled_time=at)
        assert (await later.wait(timeout=0)).state is TaskRunState.SCHEDULED
        assert await later.result(timeout=30) == 2
        run = await later.wait()
        assert run.started_at is not None and run.started_at >= at


async def test_limit_is_respected(server_proc: Proc, procs: list[Proc], tmp_path: Path) -> None:
    worker(server_proc, procs, tmp_path, f"{TASKS_FILE}:record", "--limit", "2")
    folder = tmp_path / "intervals"
    folder.mkdir()
    async with open_client(server_proc.url):
        names = [f"r{i}" for i in range(8)]
        futs = await t.record.map([str(folder)] * 8, names, [0.2] * 8)
        assert sorted(await gather_results(futs, timeout=60)) == names
    events = []
    for path in folder.iterdir():
        start, end, _pid = json.loads(path.read_text())
        events += [(start, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    assert peak == 2


async def test_status_server(server_proc: Proc, procs: list[Proc], tmp_path: Path) -> None:
    port = free_port()
    worker_proc = worker(server_proc, procs, tmp_path, f"{TASKS_FILE}:wait_for_file", "--limit",
                         "3", "--status-server-port", str(port))  # fmt: skip
    gate = tmp_path / "gate"
    async with open_client(server_proc.url), httpx.AsyncClient() as http:
        fut = await t.wait_for_file.delay(str(gate))

        async def status() -> dict[str, object]:
            return (await http.get(f"http://127.0.0.1:{port}/status")).json()  # type: ignore[no-any-return]

        body: dict[str, object] = {}
        with trio.fail_after(30):
            while body.get("current") != 1:
                try:
                    body = await status()
                except httpx.TransportError:
                    body = {}
                await trio.sleep(0.02)
        assert body["limit"] == 3 and body["available"] == 2 and body["stopping"] is False
        assert body["tasks"] == [t.wait_for_file.key]
        in_flight = body["in_flight"][t.wait_for_file.key]  # type: ignore[index]
        assert in_flight[0]["id"] == str(fut.task_run_id)
        assert str(body["client_id"]).startswith(f"{socket.gethostname()}-{worker_proc.pid}-")
        assert body["started_at"]
        gate.write_text("done")
        assert await fut.result(timeout=30) == "done"
        body = await status()
        assert body["finished"] == {t.wait_for_file.key: 1} and body["current"] == 0


async def test_sigterm_finishes_in_flight_runs_and_exits_0(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    proc = worker(server_proc, procs, tmp_path, f"{TASKS_FILE}:wait_for_file")
    gate = tmp_path / "gate"
    async with open_client(server_proc.url) as client:
        fut = await t.wait_for_file.delay(str(gate))
        await wait_for_runs(client, [fut], TaskRunState.RUNNING)
        proc.signal(signal.SIGTERM)
        # The worker keeps the run going through its grace period.
        await wait_until(lambda: "stopping: 1 runs in flight" in proc.output())
        gate.write_text("finished after SIGTERM")
        assert await fut.result(timeout=30) == "finished after SIGTERM"
    assert proc.wait(30) == 0


async def test_restarted_server_keeps_and_runs_its_queue(
    tmp_path: Path, procs: list[Proc]
) -> None:
    data = tmp_path / "data"
    first = start_server(data)
    procs.append(first)
    async with open_client(first.url):
        futs = await t.add.map(range(20))
    first.signal(signal.SIGKILL)  # no chance to flush anything
    first.wait()
    port = int(first.url.rsplit(":", 1)[1])
    second = start_server(data, port=port)
    procs.append(second)
    worker(second, procs, tmp_path, f"{TASKS_FILE}:add")
    async with open_client(second.url):
        assert await gather_results(futs, timeout=60) == [i + 1 for i in range(20)]


async def test_future_is_portable_and_result_times_out(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    async with open_client(server_proc.url):
        fut = await t.wait_for_file.delay(str(gate))
        # No worker yet: a result with a timeout gives up with TimeoutError.
        with pytest.raises(TimeoutError):
            await fut.result(timeout=0.3)
    pickled = pickle.dumps(fut)
    worker(server_proc, procs, tmp_path, f"{TASKS_FILE}:wait_for_file")
    gate.write_text("from another process")
    # Another process, with no trio of its own, waits on the same run.
    code = (
        "import pickle, sys; fut = pickle.loads(sys.stdin.buffer.read());"
        " print(fut.result_sync(timeout=30))"
    )
    result = await trio.run_process(
        [sys.executable, "-c", code], stdin=pickled, capture_stdout=True,
        cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert result.stdout.decode().strip() == "from another process"
    assert await fut.result(timeout=30) == "from another process"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nocolon"], "must look like"),
        (["no_such_module_abc:fn"], "cannot import module 'no_such_module_abc'"),
        (["tests/e2e_tasks.py:missing"], "has no 'missing'"),
        (["--module", "no_such_module_abc"], "cannot import module"),
        ([], "give at least one ENTRYPOINT"),
    ],
)
def test_cli_bad_entrypoint_exits_1_with_one_line(args: list[str], needle: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_taskworker", "task", "serve", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_cli_usage_error_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_taskworker", "task", "serve", "x:y", "--limit", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--limit" in result.stderr


def test_server_sigint_exits_0(tmp_path: Path, procs: list[Proc]) -> None:
    proc = start_server(tmp_path / "data")
    procs.append(proc)
    proc.signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert (tmp_path / "data" / "runs.sqlite3").is_file()


def test_server_port_in_use_exits_1_with_one_line(tmp_path: Path, procs: list[Proc]) -> None:
    first = start_server(tmp_path / "a")
    procs.append(first)
    port = first.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "trio_taskworker", "server", "start", "--port", port,
         "--data-dir", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("trio-taskworker: error")]
    assert len(errors) == 1 and "Address already in use" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


PLAIN_SUBMITTER = """
import trio
from tests import e2e_tasks as t

async def main():
    futs = await t.add.map(range(50), [1] * 50)
    print([await f.result(timeout=30) for f in futs] == [i + 1 for i in range(50)])
    print(await (await t.mul.delay(6, 7)).result(timeout=30))
    print(await (await t.add.map([1, 2], [3, 4])).result(timeout=30))

trio.run(main)
print(t.add.delay_sync(20, 22).result_sync(timeout=30))
print(t.add.delay_sync(1, 2).result_sync(timeout=30))
"""


def test_a_plain_script_opens_nothing_and_leaves_nothing_open(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    """The path the README teaches, in its own process: no open_client, warnings
    as errors (an unclosed connection would be a ResourceWarning)."""
    worker(server_proc, procs, tmp_path, f"{TASKS_FILE}:add", f"{TASKS_FILE}:mul")
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", PLAIN_SUBMITTER],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "TRIO_TASKWORKER_API_URL": server_proc.url},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True", "42", "[4, 6]", "42", "3"]
    assert "ResourceWarning" not in done.stderr, done.stderr
