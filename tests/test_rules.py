"""The retry, redelivery, cancel-wins and fencing rules, without a database."""

from __future__ import annotations

import uuid

import pytest

from trio_taskworker._models import ErrorInfo, Finished, Released, Started
from trio_taskworker._rules import (
    Changes,
    Report,
    on_cancel,
    on_lost_lease,
    on_report,
    refusal,
)
from trio_taskworker._states import IllegalTransition, TaskRunState, check_transition

S = TaskRunState
RUN = uuid.uuid4()
ERROR = ErrorInfo(type="builtins.ValueError", message="no")


def report_on(state: S, report: Report, *, retries: int = 0, retry_count: int = 0) -> Changes:
    return on_report(
        state=state,
        report=report,
        retries=retries,
        retry_count=retry_count,
        retry_delay_seconds=30.0,
        now=10.0,
    )


def finished(state: S, **kwargs: object) -> Finished:
    return Finished(id=RUN, attempt=1, state=state, **kwargs)  # type: ignore[arg-type]


# --- fencing -------------------------------------------------------------------------


def test_the_lease_holder_is_heard() -> None:
    assert refusal(holder="c1", attempt=2, owner="c1", report=Started(id=RUN, attempt=2)) is None


@pytest.mark.parametrize(
    ("holder", "report_attempt"),
    [("c2", 2), ("c1", 1), (None, 2)],
    ids=["another connection", "an earlier attempt", "no lease"],
)
def test_a_report_without_the_lease_is_refused(holder: str | None, report_attempt: int) -> None:
    reason = refusal(
        holder=holder, attempt=2, owner="c1", report=Started(id=RUN, attempt=report_attempt)
    )
    assert reason == "stale lease: the run is at attempt 2 on another lease"


# --- reports -------------------------------------------------------------------------


def test_started_runs() -> None:
    changes = report_on(S.PENDING, Started(id=RUN, attempt=1))
    assert changes == {"state": S.RUNNING, "started_at": 10.0}
    check_transition(S.PENDING, S.RUNNING)


def test_started_is_not_special_cased_for_a_cancelling_run() -> None:
    # The rule asks for RUNNING; the state machine is what refuses it.
    changes = report_on(S.CANCELLING, Started(id=RUN, attempt=1))
    assert changes["state"] is S.RUNNING
    with pytest.raises(IllegalTransition):
        check_transition(S.CANCELLING, changes["state"])


CANCELLED = {"state": S.CANCELLED, "finished_at": 10.0, "lease_owner": None}


@pytest.mark.parametrize(
    "report",
    [
        finished(S.COMPLETED, result=b"r"),
        finished(S.FAILED, result=b"e", error=ERROR),
        finished(S.CANCELLED),
        Released(id=RUN, attempt=1, reason="stopping"),
    ],
    ids=["completed", "failed with retries left", "cancelled", "released"],
)
def test_cancel_wins_whatever_the_worker_says_of_a_cancelling_run(report: Report) -> None:
    assert report_on(S.CANCELLING, report, retries=3) == CANCELLED


def test_a_cancelled_report_cancels_a_running_run() -> None:
    assert report_on(S.RUNNING, finished(S.CANCELLED), retries=3) == CANCELLED
    check_transition(S.RUNNING, S.CANCELLED)


@pytest.mark.parametrize("state", [S.PENDING, S.RUNNING])
def test_released_goes_back_to_the_queue_with_the_reason(state: S) -> None:
    changes = report_on(state, Released(id=RUN, attempt=1, reason="the worker is stopping"))
    assert changes == {
        "state": S.SCHEDULED,
        "lease_owner": None,
        "message": "the worker is stopping",
    }
    check_transition(state, S.SCHEDULED)


def test_a_failure_with_retries_left_is_rescheduled_later() -> None:
    report = finished(S.FAILED, result=b"e", error=ERROR)
    changes = report_on(S.RUNNING, report, retries=3, retry_count=1)
    assert changes == {
        "state": S.SCHEDULED,
        "scheduled_time": 40.0,
        "retry_count": 2,
        "lease_owner": None,
        "error": ERROR,
        "message": "retry 2 of 3 after a failure, in 30 s",
    }
    assert "result" not in changes  # the pickled exception is kept only when it ends


def test_a_failure_with_no_retries_left_fails_the_run() -> None:
    report = finished(S.FAILED, result=b"e", error=ERROR)
    changes = report_on(S.RUNNING, report, retries=2, retry_count=2)
    assert changes == {
        "state": S.FAILED,
        "finished_at": 10.0,
        "lease_owner": None,
        "result": b"e",
        "result_ref": None,
        "result_preview": None,
        "error": ERROR,
    }


def test_the_workers_retry_delay_overrides_the_option() -> None:
    report = finished(S.FAILED, error=ERROR, retry_delay_seconds=4.5)
    changes = report_on(S.RUNNING, report, retries=3, retry_count=0)
    assert changes["state"] is S.SCHEDULED and changes["scheduled_time"] == 14.5
    assert changes["message"] == "retry 1 of 3 after a failure, in 4.5 s"


def test_a_failure_the_worker_will_not_retry_ends_failed_with_its_reason() -> None:
    reason = "not retried: retry_condition_fn returned False"
    report = finished(S.FAILED, error=ERROR, retry=False, message=reason)
    changes = report_on(S.RUNNING, report, retries=3, retry_count=0)
    assert changes["state"] is S.FAILED and changes["message"] == reason
    assert "retry_count" not in changes


def test_a_run_the_worker_ends_cancelled_keeps_the_workers_reason() -> None:
    report = finished(S.CANCELLED, message="the task raised StopTaskWorker: bye")
    assert report_on(S.RUNNING, report, retries=3) == {
        **CANCELLED,
        "message": "the task raised StopTaskWorker: bye",
    }


def test_completed_keeps_the_result() -> None:
    report = finished(S.COMPLETED, result_ref="blob", result_preview="[1, 2]")
    changes = report_on(S.RUNNING, report, retries=3)
    assert changes == {
        "state": S.COMPLETED,
        "finished_at": 10.0,
        "lease_owner": None,
        "result": None,
        "result_ref": "blob",
        "result_preview": "[1, 2]",
        "error": None,
    }


@pytest.mark.parametrize("claimed", [S.CRASHED, S.RUNNING, S.SCHEDULED, S.PENDING])
def test_a_worker_cannot_report_other_endings(claimed: S) -> None:
    with pytest.raises(IllegalTransition) as caught:
        report_on(S.RUNNING, finished(claimed), retries=3)
    assert (caught.value.current, caught.value.target) == (S.RUNNING, claimed)


# --- lost leases ---------------------------------------------------------------------


def lost(state: S, *, redeliveries: int = 0, max_redeliveries: int | None = None) -> Changes:
    return on_lost_lease(
        state=state,
        redeliveries=redeliveries,
        max_redeliveries=max_redeliveries,
        default_max_redeliveries=3,
        reason="the worker's connection was lost",
        now=10.0,
    )


def test_a_pending_run_is_requeued_without_counting() -> None:
    assert lost(S.PENDING, redeliveries=5, max_redeliveries=0) == {
        "state": S.SCHEDULED,
        "lease_owner": None,
    }


def test_a_cancelling_run_is_cancelled() -> None:
    assert lost(S.CANCELLING, redeliveries=5, max_redeliveries=0) == {
        "state": S.CANCELLED,
        "finished_at": 10.0,
        "lease_owner": None,
        "message": "the worker's connection was lost",
    }


@pytest.mark.parametrize(
    ("redeliveries", "max_redeliveries"),
    [(0, 1), (2, None), (4, 5)],
    ids=["own limit", "server default", "own limit above the default"],
)
def test_a_running_run_is_redelivered_under_the_limit(
    redeliveries: int, max_redeliveries: int | None
) -> None:
    changes = lost(S.RUNNING, redeliveries=redeliveries, max_redeliveries=max_redeliveries)
    assert changes == {
        "state": S.SCHEDULED,
        "lease_owner": None,
        "redeliveries": redeliveries + 1,
        "message": "redelivered: the worker's connection was lost",
    }
    check_transition(S.RUNNING, S.SCHEDULED)


@pytest.mark.parametrize(
    ("redeliveries", "max_redeliveries", "limit"),
    [(1, 1, 1), (3, None, 3), (0, 0, 0)],
    ids=["own limit", "server default", "zero is a limit, not the default"],
)
def test_a_running_run_crashes_at_the_limit(
    redeliveries: int, max_redeliveries: int | None, limit: int
) -> None:
    changes = lost(S.RUNNING, redeliveries=redeliveries, max_redeliveries=max_redeliveries)
    assert changes == {
        "state": S.CRASHED,
        "finished_at": 10.0,  # it has ended: retention counts from here
        "lease_owner": None,
        "message": f"the worker's connection was lost; it had been redelivered"
        f" {redeliveries} times, the limit is {limit}",
    }
    check_transition(S.RUNNING, S.CRASHED)


# --- caller cancels ------------------------------------------------------------------


def test_cancelling_a_cancelling_run_changes_nothing() -> None:
    assert on_cancel(state=S.CANCELLING, now=10.0) is None


def test_cancelling_a_running_run_asks_its_worker() -> None:
    assert on_cancel(state=S.RUNNING, now=10.0) == {
        "state": S.CANCELLING,
        "message": "cancelled by the caller",
    }


@pytest.mark.parametrize("state", [S.SCHEDULED, S.PENDING])
def test_cancelling_a_queued_run_cancels_it_at_once(state: S) -> None:
    assert on_cancel(state=state, now=10.0) == {
        "state": S.CANCELLED,
        "finished_at": 10.0,
        "lease_owner": None,
        "message": "cancelled by the caller",
    }
    check_transition(state, S.CANCELLED)


@pytest.mark.parametrize("state", [S.COMPLETED, S.FAILED, S.CANCELLED, S.CRASHED])
def test_cancelling_an_ended_run_asks_for_a_refused_transition(state: S) -> None:
    changes = on_cancel(state=state, now=10.0)
    assert changes is not None and changes["state"] is S.CANCELLED
    with pytest.raises(IllegalTransition):
        check_transition(state, changes["state"])
