"""No-op tasks for the benchmark: they measure the machinery, not the work."""

from __future__ import annotations

from trio_taskworker import task


@task
async def noop_async(i: int) -> int:
    return i


@task
def noop_sync(i: int) -> int:
    return i


@task
async def never_served(i: int) -> int:
    return i
