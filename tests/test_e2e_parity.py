"""End to end, Prefect parity: a real server process, real worker processes
(started with the CLI or as user scripts), a real SQLite file, 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from trio_taskworker import TaskRunState, open_client

from . import e2e_parity_tasks as t
from .conftest import TESTS, Proc, worker
from .helpers import wait_until

pytestmark = pytest.mark.e2e

TASKS = "tests.e2e_parity_tasks"


def script(server: Proc, procs: list[Proc], tmp_path: Path, name: str, body: str) -> Proc:
    """Run a user's script (in the repo root, so ``tests.*`` imports) against the server."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    log = tmp_path / f"{name}.log"
    env = dict(os.environ, TRIO_TASKWORKER_API_URL=server.url, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(TESTS.parent)
    with open(log, "w") as out:
        popen = subprocess.Popen(
            [sys.executable, str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=TESTS.parent,
        )
    proc = Proc(popen, log, server.url)
    procs.append(proc)
    return proc


async def test_stop_task_worker_ends_the_run_and_spares_the_next_worker(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    first = worker(server_proc, procs, tmp_path, f"{TASKS}:quitter")
    async with open_client(server_proc.url):
        fut = await t.quitter.delay()
        run = await fut.wait(timeout=30)
        assert first.wait(30) == 0  # the worker stopped by itself, gracefully
        assert run.state is TaskRunState.CANCELLED and run.attempt == 1
        assert "StopTaskWorker (maintenance)" in (run.message or "")
        # A second worker for the same task is not taken down by the same run.
        second = worker(server_proc, procs, tmp_path, f"{TASKS}:quitter")
        await wait_until(lambda: "serving" in second.output())
        assert (await fut.wait(timeout=1)).attempt == 1
        assert second.popen.poll() is None


async def test_run_context_run_name_cache_and_retry_policy_in_real_processes(
    server_proc: Proc, procs: list[Proc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook_file = tmp_path / "hook.txt"
    monkeypatch.setenv("PARITY_HOOK_FILE", str(hook_file))
    worker(server_proc, procs, tmp_path, f"{TASKS}:whoami", f"{TASKS}:cached_square",
           f"{TASKS}:flaky", f"{TASKS}:backs_off")  # fmt: skip
    counter = str(tmp_path / "calls")
    async with open_client(server_proc.url):
        fut = await t.whoami.delay("a")
        seen = await fut.result(timeout=30)
        assert seen["id"] == str(fut.task_run_id) and seen["attempt"] == 1
        assert seen["parameters"] == {"label": "a", "extra": 3}
        assert (await fut.wait()).name == "whoami-a"
        renamed = await t.whoami.with_options(task_run_name="renamed-{label}").delay("b")
        assert (await renamed.wait(timeout=30)).name == "renamed-b"

        first = await t.cached_square.delay(9, counter)
        assert await first.result(timeout=30) == 81
        again = await t.cached_square.delay(9, counter)
        cached = await again.wait(timeout=0)  # complete on arrival: no worker involved
        assert cached.state is TaskRunState.COMPLETED and cached.attempt == 0
        assert cached.message == f"cached: the result of run {first.task_run_id}"
        assert await again.result() == 81
        assert (await trio.Path(counter).read_text()) == "1"  # executed once

        failing = await t.flaky.delay(str(tmp_path / "flaky_calls"))
        with pytest.raises(ValueError, match="call 3: not worth retrying"):
            await failing.result(timeout=30)
        run = await failing.wait()
        # Two connection errors were retried; the ValueError was not.
        assert (run.state, run.retry_count, run.attempt) == (TaskRunState.FAILED, 2, 3)
        assert run.message == "not retried: retry_condition_fn returned False"
        # Hooks run once the run is reported.
        await wait_until(lambda: hook_file.exists() and hook_file.read_text().endswith("')"))
        assert hook_file.read_text() == (
            f"{run.id} FAILED ValueError('call 3: not worth retrying')"
        )

        times = tmp_path / "times"
        backing_off = await t.backs_off.delay(str(times))
        run = await backing_off.wait(timeout=30)
        assert (run.state, run.retry_count) == (TaskRunState.FAILED, 2)
        started = [float(line) for line in (await trio.Path(times).read_text()).split()]
        # exponential_backoff(0.2) with jitter 0.5: at least 0.1 s, then at least 0.2 s.
        assert started[1] - started[0] >= 0.1 and started[2] - started[1] >= 0.2


async def test_serve_called_from_a_plain_script_runs_trio_itself(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    proc = script(server_proc, procs, tmp_path, "serve_script.py", f"""
        from trio_taskworker import serve
        from {TASKS} import whoami

        if __name__ == "__main__":
            serve(whoami, limit=2)  # no trio.run: it blocks, as Prefect's does
            print("serve returned", flush=True)
    """)  # fmt: skip
    async with open_client(server_proc.url):
        seen = await (await t.whoami.delay("from-a-script")).result(timeout=30)
    assert seen["pid"] == proc.pid
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "serve returned" in proc.output()


async def test_serve_without_signal_handling_leaves_sigterm_to_the_app(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    proc = script(server_proc, procs, tmp_path, "app.py", f"""
        import functools
        import signal

        import trio

        from trio_taskworker import serve
        from {TASKS} import whoami


        async def main() -> None:
            async with trio.open_nursery() as nursery:
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    nursery.start_soon(functools.partial(serve, whoami, handle_signals=False))
                    count = 0
                    async for _ in signals:
                        count += 1
                        print(f"app got SIGTERM {{count}}", flush=True)
                        if count == 2:
                            break
                nursery.cancel_scope.cancel()  # the app decides when its worker goes
            print("app exited", flush=True)


        trio.run(main)
    """)  # fmt: skip
    async with open_client(server_proc.url):
        seen = await (await t.whoami.delay("before")).result(timeout=30)
        assert seen["pid"] == proc.pid
        proc.signal(signal.SIGTERM)
        await wait_until(lambda: "app got SIGTERM 1" in proc.output())
        # The app got the signal, and its worker still serves.
        seen = await (await t.whoami.delay("after")).result(timeout=30)
        assert seen["pid"] == proc.pid
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "app exited" in proc.output()


async def test_an_app_embeds_a_worker_with_async_with(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    proc = script(server_proc, procs, tmp_path, "embed.py", f"""
        import trio

        from trio_taskworker import TaskWorker, unmapped
        from {TASKS} import scale


        async def main() -> None:
            async with TaskWorker(scale, limit=2, handle_signals=False) as worker:
                futures = await scale.map([1, 2, 3], unmapped([4, 6]))
                print("results", await futures.result(), flush=True)
                print("finished", worker.finished_task_runs, flush=True)
            print("stopped", worker.started, flush=True)


        trio.run(main)
    """)  # fmt: skip
    assert proc.wait(60) == 0, proc.output()
    output = proc.output()
    assert "results [10, 20, 30]" in output
    assert f"finished {{'{t.scale.key}': 3}}" in output
    assert "stopped False" in output
    assert sorted(line.split(" with ")[1] for line in output.splitlines()
                  if line.startswith("completed ")) == ["10", "20", "30"]  # fmt: skip
