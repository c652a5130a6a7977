"""Small helpers for tests that talk to real sockets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import trio

from trio_taskworker import TaskRunState


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition that another task or process will make true.

    Used only where real I/O is involved (an autojump clock cannot drive
    sockets); the outcome does not depend on how long anything takes.
    """
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the condition lives in another process or socket
            await trio.sleep(0.005)


async def wait_for_runs(
    client: Any,
    futures: Sequence[Any],
    state: TaskRunState,
    count: int | None = None,
    timeout: float = 30.0,
) -> None:
    """Poll the server until ``count`` (default: all) of the runs are in ``state``."""
    want = len(futures) if count is None else count
    with trio.fail_after(timeout):
        while True:
            states = [(await client.read_run(f.task_run_id)).state for f in futures]
            if sum(s is state for s in states) >= want:
                return
            await trio.sleep(0.02)
