"""No-op tasks for the benchmark: they measure the machinery, not the work."""

from __future__ import annotations

import time

from trio_taskworker import task


@task
async def noop_async(i: int) -> int:
    return i


@task
def noop_sync(i: int) -> int:
    return i


@task
async def stamp_async(i: int) -> float:
    """When the run's body started, by the machine's wall clock (for submit->start)."""
    return time.time()


@task
def stamp_sync(i: int) -> float:
    """The same, for a sync task (run in a worker thread)."""
    return time.time()


@task
async def never_served(i: int) -> int:
    """No worker serves it: its runs stay queued (map submission, the backlog)."""
    return i


@task
async def idle_only(i: int) -> int:
    """Served only by the idle workers, and never submitted."""
    return i
