"""Tasks served by real worker processes in tests/test_e2e_futures.py."""

from __future__ import annotations

import trio

from trio_taskworker import task


@task
async def nap(seconds: float) -> float:
    """Sleep, then return how long: runs of different durations end in that order."""
    await trio.sleep(seconds)
    return seconds


def check_order(order_id: int) -> None:
    """A worker-side frame below the task's own, to find in the caller's traceback."""
    raise KeyError(f"no order {order_id}")  # raised in the worker


@task
def look_up_order(order_id: int) -> None:
    check_order(order_id)
