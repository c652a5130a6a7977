"""What happens to a run: the retry, redelivery and cancel-wins rules.

Each rule is a pure function of the facts a store has read (the run's state,
its counts and options, a report, the time) and returns the changes to make,
a :data:`Changes` mapping of run field (which is also its column) to new
value. A store reads the row, calls the rule, checks the transition with
:func:`~trio_taskworker._states.check_transition` and writes the changes, so
every backend decides the same way. This module imports no I/O library.
"""

from __future__ import annotations

from typing import Any

from ._models import Finished, Released, Started
from ._states import IllegalTransition, TaskRunState

__all__ = [
    "CANCELLED_BY_CALLER",
    "Changes",
    "Report",
    "on_cancel",
    "on_lost_lease",
    "on_report",
    "refusal",
]

#: What a worker reports about a run it holds.
Report = Started | Finished | Released

#: The fields of a run to set, and their new values. ``state`` is always there
#: (a :class:`TaskRunState`); times are UNIX seconds, ``error`` an ``ErrorInfo``.
Changes = dict[str, Any]

CANCELLED_BY_CALLER = "cancelled by the caller"

_S = TaskRunState


def refusal(*, holder: str | None, attempt: int, owner: str, report: Report) -> str | None:
    """Why ``owner``'s report is not heard, or None when it holds the run's lease.

    ``holder`` and ``attempt`` are the run's lease owner and attempt: a report
    must come from the holder and name the current attempt (the fencing token).
    """
    if holder != owner or attempt != report.attempt:
        return f"stale lease: the run is at attempt {attempt} on another lease"
    return None


def on_report(
    *,
    state: TaskRunState,
    report: Report,
    retries: int,
    retry_count: int,
    retry_delay_seconds: float,
    now: float,
) -> Changes:
    """The changes a worker's ``report`` makes to a run in ``state``.

    Raises :class:`IllegalTransition` for a finish a worker may not report
    (anything but COMPLETED, FAILED or CANCELLED).
    """
    if isinstance(report, Started):
        return {"state": _S.RUNNING, "started_at": now}
    if state is _S.CANCELLING:
        # Whatever the worker says of a run the caller cancels, the cancel wins
        # (a sync task may return, or a stopping worker hand it back).
        return {"state": _S.CANCELLED, "finished_at": now, "lease_owner": None}
    if isinstance(report, Released):
        return {"state": _S.SCHEDULED, "lease_owner": None, "message": report.reason}
    if report.state is _S.CANCELLED:
        # The worker ended it (a task that raised StopTaskWorker): it says why.
        changes: Changes = {"state": _S.CANCELLED, "finished_at": now, "lease_owner": None}
        if report.message is not None:
            changes["message"] = report.message
        return changes
    if report.state is _S.FAILED and retry_count < retries and report.retry:
        delay = retry_delay_seconds
        if report.retry_delay_seconds is not None:
            delay = report.retry_delay_seconds
        return {
            "state": _S.SCHEDULED,
            "scheduled_time": now + delay,
            "retry_count": retry_count + 1,
            "lease_owner": None,
            "error": report.error,
            "message": f"retry {retry_count + 1} of {retries} after a failure, in {delay:g} s",
        }
    if report.state not in (_S.COMPLETED, _S.FAILED):
        raise IllegalTransition(state, report.state)
    changes = {
        "state": report.state,
        "finished_at": now,
        "lease_owner": None,
        "result": report.result,
        "result_ref": report.result_ref,
        "result_preview": report.result_preview,
        "error": report.error,
    }
    if report.message is not None:
        changes["message"] = report.message
    return changes


def on_lost_lease(
    *,
    state: TaskRunState,
    redeliveries: int,
    max_redeliveries: int | None,
    default_max_redeliveries: int,
    reason: str,
    now: float,
) -> Changes:
    """The changes to a leased run in ``state`` whose lease is gone for ``reason``.

    ``max_redeliveries`` is the run's option; None means ``default_max_redeliveries``.
    """
    if state is _S.PENDING:
        # It never started: back to the queue, not counted as a redelivery.
        return {"state": _S.SCHEDULED, "lease_owner": None}
    if state is _S.CANCELLING:
        return {"state": _S.CANCELLED, "finished_at": now, "lease_owner": None, "message": reason}
    limit = default_max_redeliveries if max_redeliveries is None else max_redeliveries
    if redeliveries < limit:
        return {
            "state": _S.SCHEDULED,
            "lease_owner": None,
            "redeliveries": redeliveries + 1,
            "message": f"redelivered: {reason}",
        }
    return {
        "state": _S.CRASHED,
        "finished_at": now,
        "lease_owner": None,
        "message": f"{reason}; it had been redelivered {redeliveries} times, the limit is {limit}",
    }


def on_cancel(*, state: TaskRunState, now: float) -> Changes | None:
    """The changes a caller's cancel makes to a run in ``state``; None: no change.

    A RUNNING run becomes CANCELLING (its lease holder is told, and reports
    CANCELLED or loses the lease); a queued one is CANCELLED at once. For an
    ended run the changes ask for a transition that ``check_transition`` refuses.
    """
    if state is _S.CANCELLING:
        return None
    if state is _S.RUNNING:
        return {"state": _S.CANCELLING, "message": CANCELLED_BY_CALLER}
    return {
        "state": _S.CANCELLED,
        "finished_at": now,
        "lease_owner": None,
        "message": CANCELLED_BY_CALLER,
    }
