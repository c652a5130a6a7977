"""``get_run_context()``: what a task can learn about the run executing it. No I/O."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import attrs

from ._exceptions import MissingContextError
from ._models import TaskRun

__all__ = ["TaskRunContext", "get_run_context", "run_context"]


@attrs.frozen(kw_only=True, slots=False)  # no slots: ``parameters`` is cached
class TaskRunContext:
    """The run a worker is executing: ``task_run`` (its snapshot as delivered,
    with ``.id``), the ``task`` and the ``parameters`` by name (defaults filled in).

    A ``cache_key_fn`` gets one too, on the submitting side, where the run
    does not exist yet: there ``task_run`` is None.
    """

    task: Any
    task_run: TaskRun | None
    #: The call's arguments as given; ``parameters`` names them.
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = attrs.field(factory=dict)

    @functools.cached_property
    def parameters(self) -> dict[str, Any]:
        """The arguments by parameter name, defaults filled in (bound when first
        asked for: most runs never ask)."""
        parameters: dict[str, Any] = self.task.parameters_of(self.args, self.kwargs)
        return parameters

    @property
    def attempt(self) -> int:
        """Which delivery of the run this is (1 for the first; 0 before any)."""
        return 0 if self.task_run is None else self.task_run.attempt


_current: contextvars.ContextVar[TaskRunContext | None] = contextvars.ContextVar(
    "trio_taskworker_run_context", default=None
)


def get_run_context() -> TaskRunContext:
    """The :class:`TaskRunContext` of the run executing this code.

    Works in async tasks and in sync tasks (their worker thread carries the
    context). Raises :class:`MissingContextError` anywhere else.
    """
    context = _current.get()
    if context is None:
        raise MissingContextError(
            "get_run_context() was called outside a run: it works only inside a task"
            " that a worker is executing"
        )
    return context


@contextlib.contextmanager
def run_context(context: TaskRunContext) -> Iterator[TaskRunContext]:
    """Make ``context`` what :func:`get_run_context` returns inside the block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
