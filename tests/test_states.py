from __future__ import annotations

import pytest

from trio_taskworker import TaskRunState
from trio_taskworker._states import TERMINAL_STATES, IllegalTransition, check_transition

S = TaskRunState


def test_members() -> None:
    assert [s.name for s in S] == [
        "SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLING", "CANCELLED",
        "CRASHED",
    ]  # fmt: skip
    assert S("RUNNING") is S.RUNNING


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.SCHEDULED, S.PENDING),
        (S.PENDING, S.RUNNING),
        (S.PENDING, S.SCHEDULED),
        (S.RUNNING, S.COMPLETED),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.SCHEDULED),
        (S.RUNNING, S.CANCELLING),
        (S.CANCELLING, S.CANCELLED),
    ],
)
def test_allowed(current: TaskRunState, target: TaskRunState) -> None:
    check_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.SCHEDULED, S.RUNNING),
        (S.SCHEDULED, S.COMPLETED),
        (S.PENDING, S.COMPLETED),
        (S.CANCELLING, S.COMPLETED),
        *[(t, S.SCHEDULED) for t in sorted(TERMINAL_STATES)],
        *[(t, S.RUNNING) for t in sorted(TERMINAL_STATES)],
    ],
)
def test_refused(current: TaskRunState, target: TaskRunState) -> None:
    with pytest.raises(IllegalTransition, match=f"a {current} run cannot become {target}"):
        check_transition(current, target)


def test_terminal() -> None:
    assert {s for s in S if s.is_terminal} == {S.COMPLETED, S.FAILED, S.CANCELLED, S.CRASHED}
