"""Tasks served by real worker processes in the end-to-end tests."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import trio

from trio_taskworker import task


class CustomError(Exception):
    """An exception type of the user's own, to check it comes back as itself."""


@task
async def add(x: int, y: int = 1) -> int:
    return x + y


@task
def mul(x: int, y: int) -> int:
    return x * y


@task
async def explode(message: str) -> None:
    raise CustomError(message)


@task(retries=2, retry_delay_seconds=0.2)
def fail_until(counter: str, failures: int) -> int:
    """Fail the first ``failures`` calls, then return the number of calls."""
    path = Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls <= failures:
        raise ValueError(f"call {calls} fails")
    return calls


@task(timeout_seconds=0.5)
async def too_slow() -> None:
    await trio.sleep(60)


@task
async def record(folder: str, name: str, seconds: float) -> str:
    """Write when this run started and ended, for concurrency checks."""
    start = time.time()
    await trio.sleep(seconds)
    end = time.time()
    await trio.Path(folder, f"{name}.json").write_text(json.dumps([start, end, os.getpid()]))
    return name


@task
async def wait_for_file(path: str) -> str:
    """Run until ``path`` exists (the test creates it when it wants the run to end)."""
    gate = trio.Path(path)
    while not await gate.exists():  # noqa: ASYNC110 - another process makes the file
        await trio.sleep(0.01)
    return await gate.read_text()


@task(max_redeliveries=20)
async def slow_add(x: int) -> int:
    await trio.sleep(0.05)
    return x + 1000


@task
async def cancellable_marker(marker: str) -> None:
    """Run until cancelled; the ``finally:`` block leaves a marker file."""
    try:
        await trio.sleep_forever()
    finally:
        Path(marker).write_text("finally ran")  # noqa: ASYNC240 - must not checkpoint here


@task(max_redeliveries=20)
async def gated_add(starts: str, gate: str, x: int) -> int:
    """Leave a file in ``starts`` for each execution (named by ``x`` and this
    process), then run until ``gate`` exists, and return ``x + 1000``."""
    name = f"{x}.{os.getpid()}.{uuid.uuid4().hex}"
    await trio.Path(starts, name).write_text("")
    opened = trio.Path(gate)
    while not await opened.exists():  # noqa: ASYNC110 - the test makes the file
        await trio.sleep(0.01)
    return x + 1000
