"""Tasks for the quickstart demo: one async, one sync, one that fails."""

from __future__ import annotations

import time

import trio

from trio_taskworker import task


@task
async def add(x: int, y: int = 1) -> int:
    await trio.sleep(0.05)  # pretend to wait on I/O
    return x + y


@task(retries=1, retry_delay_seconds=0.2)
def word_count(text: str) -> int:
    time.sleep(0.01)  # pretend to work; sync tasks run in a worker thread
    return len(text.split())


@task
async def divide(a: float, b: float) -> float:
    return a / b
