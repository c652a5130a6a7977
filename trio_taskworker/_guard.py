"""Async entry points that say so at once when called outside a trio run.

An ``async def`` called from plain synchronous code returns a coroutine that
never runs: Python only warns when it is garbage-collected, and the script
exits 0 having done nothing. :func:`needs_trio` turns such a function into a
plain one that checks for a running trio task first, so the mistake raises
where it is made and names the blocking twin to call instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import trio

__all__ = ["in_trio_run", "needs_trio"]

P = ParamSpec("P")
R = TypeVar("R")


def in_trio_run() -> bool:
    """True when called from a task of a running trio run."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def needs_trio(
    twin: str | None,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Make an async function raise ``RuntimeError`` at the call outside a trio run.

    ``twin`` names what to call from synchronous code instead (for example
    ``"delay_sync"``), or None when there is none. Inside a trio run the
    wrapped function returns its coroutine, exactly as before.
    """

    def decorate(
        fn: Callable[P, Coroutine[Any, Any, R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        name = fn.__qualname__

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
            if not in_trio_run():
                hint = f"; from synchronous code call {twin}() instead" if twin else ""
                raise RuntimeError(
                    f"{name}() is async and needs a running trio run "
                    f"(await it inside trio.run){hint}"
                )
            return fn(*args, **kwargs)

        return wrapper

    return decorate
