"""Run states and the rules for moving between them.

The server owns the state machine: every change goes through
:func:`check_transition`, which refuses anything not drawn here::

    SCHEDULED ──claim──► PENDING ──start──► RUNNING ──► COMPLETED | FAILED | CRASHED
        ▲                   │                  │
        └──── requeue ──────┴──── retry, ──────┤
                                 redeliver,    └──cancel──► CANCELLING ──► CANCELLED
                                 release

A SCHEDULED or PENDING run that is cancelled becomes CANCELLED at once.

The end states are final for workers and for every rule. One request, and only
that, leaves them: a retry by request (``POST /runs/{id}/retry``) puts a FAILED,
CRASHED or CANCELLED run back to SCHEDULED (see ``Store.retry_run``).

This module imports no I/O library.
"""

from __future__ import annotations

import enum

__all__ = ["TERMINAL_STATES", "IllegalTransition", "TaskRunState", "check_transition"]


class TaskRunState(enum.StrEnum):
    """Where a run is in its life. The values are the names, upper case."""

    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"

    @property
    def is_terminal(self) -> bool:
        """True when the run has ended: no worker or rule changes it again (only a
        retry by request queues a FAILED, CRASHED or CANCELLED run again)."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {TaskRunState.COMPLETED, TaskRunState.FAILED, TaskRunState.CANCELLED, TaskRunState.CRASHED}
)

_S = TaskRunState
_ALLOWED: dict[TaskRunState, frozenset[TaskRunState]] = {
    _S.SCHEDULED: frozenset({_S.PENDING, _S.CANCELLED}),
    _S.PENDING: frozenset({_S.RUNNING, _S.SCHEDULED, _S.CANCELLED, _S.CRASHED}),
    _S.RUNNING: frozenset(
        {_S.COMPLETED, _S.FAILED, _S.CRASHED, _S.SCHEDULED, _S.CANCELLING, _S.CANCELLED}
    ),
    _S.CANCELLING: frozenset({_S.CANCELLED, _S.CRASHED}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.CRASHED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change that the state machine does not allow."""

    def __init__(self, current: TaskRunState, target: TaskRunState) -> None:
        super().__init__(f"a {current} run cannot become {target}")
        self.current = current
        self.target = target


def check_transition(current: TaskRunState, target: TaskRunState) -> None:
    """Raise :class:`IllegalTransition` unless ``current`` may become ``target``."""
    if target not in _ALLOWED[current]:
        raise IllegalTransition(current, target)
