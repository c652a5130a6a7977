"""Tasks served by the real worker process of the dashboard's browser test."""

from __future__ import annotations

from pathlib import Path

import trio

from trio_taskworker import get_run_logger, task

#: In a failure message, to see the page show markup as text.
MARKUP = "<b>not bold</b><img src=x>"


@task(tags=["demo"])
async def greet(name: str) -> str:
    get_run_logger().info("greeting %s", name)
    return f"hello {name}"


@task(tags=["demo", "flaky"])
def flaky(counter: str) -> int:
    """Fail the first call (with markup in the message), succeed after that."""
    path = Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    logger = get_run_logger()
    logger.info("call %d", calls)
    if calls == 1:
        logger.error("giving up on call %d %s", calls, MARKUP)
        raise ValueError(f"call {calls} fails {MARKUP}")
    return calls


@task
async def hold(gate: str, marker: str) -> str:
    """Run until ``gate`` exists or the run is cancelled; ``finally:`` leaves ``marker``."""
    get_run_logger().info("holding until %s exists", gate)
    try:
        path = trio.Path(gate)
        while not await path.exists():  # noqa: ASYNC110 - another process makes the file
            await trio.sleep(0.01)
        return "released"
    finally:
        Path(marker).write_text("finally ran")  # noqa: ASYNC240 - must not checkpoint here
