"""End to end, issue 9's caller side: real server and worker processes.

A script that forgets it is not in trio is told so at once; a task's exception
comes back with the worker's frames as its cause; as_completed and wait see
runs end in the order they really do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from trio_taskworker import (
    FIRST_COMPLETED,
    TaskRunState,
    as_completed,
    open_client,
    wait,
)
from trio_taskworker._exceptions import RemoteTraceback

from . import e2e_futures_tasks as t
from .conftest import Proc, worker

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[1]
TASKS = "tests/e2e_futures_tasks.py"


def run_script(code: str, url: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a plain script, warnings as errors, like a user's first try."""
    return subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "TRIO_TASKWORKER_API_URL": url},
    )


FORGOT_TRIO = """
from tests.e2e_tasks import add

fut = add.delay(1, 2)
print("not reached", fut)
"""


def test_delay_outside_trio_fails_at_once_naming_delay_sync(server_proc: Proc) -> None:
    done = run_script(FORGOT_TRIO, server_proc.url)
    assert done.returncode != 0
    assert "not reached" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: Task.delay() is async"), done.stderr
    assert "call delay_sync() instead" in last
    assert "RuntimeWarning" not in done.stderr and "never awaited" not in done.stderr
    assert done.stderr.count("Error:") == 1, done.stderr  # one message, nothing else


async def test_failure_carries_the_worker_traceback(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    worker(server_proc, procs, tmp_path, f"{TASKS}:look_up_order")
    async with open_client(server_proc.url):
        future = await t.look_up_order.delay(42)
        with pytest.raises(KeyError) as info:
            await future.result(timeout=30)
    assert info.value.args == ("no order 42",)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    # The frames come from the worker process: its task function, and the line that raised.
    assert "in look_up_order" in cause.traceback and "in check_order" in cause.traceback
    assert 'raise KeyError(f"no order {order_id}")  # raised in the worker' in cause.traceback
    printed = "".join(traceback.format_exception(info.value))
    assert "The above exception was the direct cause of the following exception" in printed

    # A plain script that lets it propagate prints both sides.
    script = (
        "from tests.e2e_futures_tasks import look_up_order\n"
        "look_up_order.delay_sync(7).result_sync(timeout=30)\n"
    )
    done = run_script(script, server_proc.url)
    assert done.returncode == 1
    worker_side = done.stderr.index("in check_order")
    caller_side = done.stderr.index('File "<string>", line 2, in <module>')
    assert worker_side < caller_side, done.stderr
    assert done.stderr.strip().endswith("KeyError: 'no order 7'"), done.stderr


async def test_as_completed_and_wait_follow_the_runs(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    worker(server_proc, procs, tmp_path, f"{TASKS}:nap", "--limit", "10")
    async with open_client(server_proc.url):
        # Well apart, so the order does not depend on how fast anything starts.
        slow, quick, middle = [await t.nap.delay(s) for s in (4.0, 0.1, 2.0)]
        ended = [future async for future in as_completed([slow, quick, middle], timeout=60)]
        assert ended == [quick, middle, slow]

        first, long = await t.nap.delay(0.1), await t.nap.delay(60.0)
        done, not_done = await wait([long, first], timeout=60, return_when=FIRST_COMPLETED)
        assert (done, not_done) == ({first}, {long})
        assert (await long.cancel()).state in {TaskRunState.CANCELLING, TaskRunState.CANCELLED}

    # The blocking twins, from a plain script.
    script = (
        "from tests.e2e_futures_tasks import nap\n"
        "from trio_taskworker import as_completed_sync, wait_sync\n"
        "futs = [nap.delay_sync(s) for s in (2.0, 0.1)]\n"
        "print([f.result_sync() for f in as_completed_sync(futs, timeout=60)])\n"
        "print(len(wait_sync(futs, timeout=60).done))\n"
    )
    done_script = run_script(script, server_proc.url)
    assert done_script.returncode == 0, done_script.stderr
    assert done_script.stdout.splitlines() == ["[0.1, 2.0]", "2"]
