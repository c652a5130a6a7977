"""Small helpers for tests that talk to real sockets."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition that another task or process will make true.

    Used only where real I/O is involved (an autojump clock cannot drive
    sockets); the outcome does not depend on how long anything takes.
    """
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the condition lives in another process or socket
            await trio.sleep(0.005)
