"""Random interleavings of the cancellation table's events, against its invariants.

Hypothesis generates a program (a first worker, then events: submits of every
kind, caller cancels, stops, signals, StopTaskWorker, dropped connections,
killed and silent workers, server restarts, workers joining, time passing) and
:func:`tests.explore_machine.run_program` runs it on the real worker and server
in one trio run on a virtual clock, checking the invariants after every event
and after a final drain. A failing program is shrunk and printed as code that
rebuilds it; it belongs in ``test_explored_regressions.py``.

Profiles (``TRIO_TASKWORKER_EXPLORE``): ``ci`` (the default) runs a fixed, small
set of examples, the same on every run; ``explore`` runs many (``nox -s explore``,
``TRIO_TASKWORKER_EXPLORE_EXAMPLES``, a printed ``--hypothesis-seed``).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from trio_taskworker import TaskRunState

from .explore_machine import (
    KEYS,
    Advance,
    Cancel,
    Cut,
    InvariantViolated,
    Join,
    Kill,
    Nudge,
    Program,
    Restart,
    Signal,
    Silence,
    Stop,
    StopTask,
    Submit,
    Tamper,
    is_path,
    run_program,
)

settings.register_profile(
    "ci",
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    max_examples=int(os.environ.get("TRIO_TASKWORKER_EXPLORE_EXAMPLES", "3000")),
    deadline=None,
    # Failing programs are kept (and replayed first next time) where git ignores them.
    database=DirectoryBasedExampleDatabase(".nox/explore-examples"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("TRIO_TASKWORKER_EXPLORE", "ci")

worker = st.integers(min_value=0, max_value=3)
joins = st.builds(
    Join,
    limit=st.integers(min_value=1, max_value=3),
    shutdown_timeout=st.sampled_from([0.0, 2.0, 10.0]),
)
submits = st.builds(
    Submit,
    kind=st.sampled_from([kind for kind in KEYS if kind != "quitter"]),
    seconds=st.sampled_from([0, 1, 3, 10, 40]),
    fails=st.sampled_from([0, 0, 1, 99]),
    retries=st.integers(min_value=0, max_value=2),
    retry_delay=st.sampled_from([0.0, 1.0, 10.0]),
    delay=st.none() | st.sampled_from([1.0, 15.0, 60.0]),
    max_redeliveries=st.none() | st.integers(min_value=0, max_value=2),
    timeout=st.none() | st.sampled_from([2.0, 7.0]),
)
events = st.one_of(
    submits,
    submits,
    st.builds(Cancel, run=st.integers(min_value=0, max_value=20)),
    st.builds(Stop, worker=worker),
    st.builds(Signal, worker=worker),
    st.builds(StopTask),
    st.builds(Cut, worker=st.none() | worker),
    st.builds(Kill, worker=worker),
    st.builds(
        Silence,
        worker=worker,
        seconds=st.sampled_from([3.0, 20.0, 40.0]),
        reconnects=st.booleans(),
    ),
    st.builds(Restart, graceful=st.booleans()),
    joins,
    st.builds(Advance, seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0, 30.0])),
    st.builds(Advance, seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0, 30.0])),
    st.builds(Nudge, rounds=st.integers(min_value=0, max_value=6)),
    st.builds(Nudge, rounds=st.integers(min_value=0, max_value=6)),
)
programs = st.builds(
    Program,
    first=joins,
    # A few runs first, so that most events meet runs in flight.
    events=st.tuples(
        st.lists(submits, min_size=1, max_size=6), st.lists(events, min_size=3, max_size=40)
    ).map(lambda parts: (*parts[0], *parts[1])),
    lease_seconds=st.just(12.0),
)


@settings(settings.get_profile(PROFILE))
@given(programs)
def test_no_interleaving_breaks_an_invariant(program: Program) -> None:
    explorer = run_program(program)
    for name in sorted({type(e).__name__ for e in program.events}):
        event(f"rule {name}")
    runs = explorer.ended
    for state, n in sorted(Counter(r.state.value for r in runs.values()).items()):
        event(f"some run ended {state}")
        del n
    if any(r.redeliveries for r in runs.values()):
        event("some run was redelivered")
    if any(ex.how == "returned after a cancel" for ex in explorer.rec.executions):
        event("a sync task returned after its cancel")


def test_the_explorer_sees_every_outcome() -> None:
    """One program that reaches every final state and every rule, so that a change
    that silently disabled a rule (or the checks) does not go unnoticed."""
    explorer = run_program(
        Program(
            Join(limit=2, shutdown_timeout=2.0),
            (
                Submit(kind="async", seconds=3),  # COMPLETED
                Submit(kind="sync", fails=99),  # FAILED
                Submit(kind="async", seconds=40, max_redeliveries=0),  # CRASHED below
                Advance(1.0),
                Cut(None),  # the long run was redelivered 0 times: CRASHED
                Submit(kind="sync", seconds=40, retries=1, retry_delay=1.0, timeout=7.0),
                Cancel(3),
                Silence(0, 20.0),
                Advance(30.0),
                Join(limit=1, shutdown_timeout=0.0),
                Submit(kind="stubborn", seconds=10),
                Advance(1.0),
                Signal(1),
                Signal(1),
                StopTask(),
                Restart(graceful=True),
                Kill(0),
                Stop(2),
                Advance(10.0),
            ),
        )
    )
    states = Counter(r.state.value for r in explorer.ended.values())
    assert set(states) == {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}, states


# --- the checks catch what they should -------------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "caught"),
    [
        # A run that had ended starts again: not a path in the state table.
        ("UPDATE task_runs SET state = 'RUNNING'", "not a path in the state table"),
        # A result that is not its function's value (a stale attempt's, say).
        (
            "UPDATE task_runs SET result = (SELECT result FROM task_runs WHERE result IS NOT NULL"
            " ORDER BY seq DESC LIMIT 1)",
            "COMPLETED with",
        ),
        # A write to runs that had ended.
        ("UPDATE task_runs SET attempt = attempt + 1", "COMPLETED -> COMPLETED"),
        # A caller's cancel that did not hold.
        ("UPDATE task_runs SET state = 'COMPLETED' WHERE state = 'CANCELLED'", "not a path"),
        # More retries than the run allows.
        ("UPDATE task_runs SET retry_count = 5", "retried 5 times"),
    ],
)
def test_the_checks_catch_a_planted_violation(tamper: str, caught: str) -> None:
    with pytest.raises(InvariantViolated, match=caught):
        run_program(
            Program(
                Join(limit=2),
                (
                    Submit(kind="async", seconds=1),
                    Submit(kind="sync", seconds=1),
                    Submit(kind="async", seconds=30),
                    Advance(3.0),
                    Cancel(2),
                    Tamper(tamper),
                ),
            )
        )


def test_a_run_is_lost_if_no_worker_serves_it() -> None:
    """The drain reports a run that never ends (here: its key is not served)."""
    with pytest.raises(InvariantViolated, match="runs lost"):
        run_program(
            Program(
                Join(),
                (Submit(delay=15.0), Tamper("UPDATE task_runs SET task_key = 'nobody:serves'")),
            )
        )


@pytest.mark.parametrize(
    ("first", "second", "allowed"),
    [
        ("SCHEDULED", "PENDING", True),
        ("PENDING", "COMPLETED", True),  # started and finished in one batch
        ("PENDING", "CANCELLING", False),
        ("SCHEDULED", "COMPLETED", False),
        ("CANCELLING", "COMPLETED", False),
        ("COMPLETED", "SCHEDULED", False),
        ("RUNNING", "SCHEDULED", True),
    ],
)
def test_one_write_is_a_path_in_the_state_table(first: str, second: str, allowed: bool) -> None:
    assert is_path(TaskRunState(first), TaskRunState(second)) is allowed
