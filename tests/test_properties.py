"""Properties, searched by Hypothesis: the wire decoder and the state rules.

- Whatever JSON (or not-JSON) arrives, the decoder returns a model or raises
  :class:`InvalidPayload`: never another exception, which would be a 500 or a
  dropped connection.
- Whatever a worker reports and whatever happens to its lease, the rules only
  ask for transitions the state table allows, and a run that has ended stays so.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from trio_taskworker._models import (
    ErrorInfo,
    Finished,
    Released,
    Started,
    TaskRunCreateBatch,
    WaitRequest,
)
from trio_taskworker._rules import on_cancel, on_lost_lease, on_report
from trio_taskworker._serialization import (
    InvalidPayload,
    decode_worker_frame,
    encode_frame,
    from_json,
)
from trio_taskworker._states import IllegalTransition, TaskRunState, check_transition

S = TaskRunState
FAST = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every CI run
    suppress_health_check=[HealthCheck.too_slow],
)

# JSON values, with the awkward corners: huge and negative numbers, odd strings
# (lone surrogates included), deep-ish nesting.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["type", "id", "attempt", "state", "n", "keys", "client_id", "credits", "reason",
     "result", "error", "message", "retry", "retry_delay_seconds", "seq", "runs",
     "task_key", "ids", "timeout", "return_when", "scheduled_time", "tags", "name"]
)  # fmt: skip
message_types = st.sampled_from(
    ["subscribe", "credit", "started", "finished", "released", "drain", "heartbeat", "bogus"]
)
# Objects that look like messages: a known type and known field names, any values.
messages = st.fixed_dictionaries(
    {"type": message_types}, optional={}
).flatmap(lambda base: st.dictionaries(field_names, json_values, max_size=6).map(
    lambda fields: {**fields, **base}
))  # fmt: skip


def decodes_or_refuses(decode: Any, data: str | bytes) -> None:
    with contextlib.suppress(InvalidPayload):
        decode(data)


@FAST
@given(st.lists(messages, max_size=4) | json_values)
def test_the_worker_frame_decoder_returns_messages_or_refuses(frame: Any) -> None:
    decodes_or_refuses(decode_worker_frame, json.dumps(frame))


@FAST
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_bytes_that_are_not_json_are_refused(data: bytes | str) -> None:
    decodes_or_refuses(decode_worker_frame, data)
    decodes_or_refuses(lambda d: from_json(d, TaskRunCreateBatch), data)


@FAST
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "runs": st.lists(st.dictionaries(field_names, json_values, max_size=6), max_size=3)
            | json_values,
            "ids": st.lists(json_values, max_size=3) | json_values,
            "timeout": json_values,
            "return_when": json_values,
        },
    )
)
def test_request_bodies_build_a_model_or_are_refused(body: dict[str, Any]) -> None:
    data = json.dumps(body)
    decodes_or_refuses(lambda d: from_json(d, TaskRunCreateBatch), data)
    decodes_or_refuses(lambda d: from_json(d, WaitRequest), data)


RUN = uuid.UUID(int=7)
reports = st.one_of(
    st.builds(Started, id=st.just(RUN), attempt=st.just(1)),
    st.builds(
        Finished,
        id=st.just(RUN),
        attempt=st.just(1),
        state=st.sampled_from(list(S)),
        error=st.none() | st.just(ErrorInfo(type="E", message="m")),
        retry=st.booleans(),
        retry_delay_seconds=st.none() | st.floats(min_value=0, max_value=1e6),
    ),
    st.builds(Released, id=st.just(RUN), attempt=st.just(1), reason=st.just("stopping")),
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("report"), reports),
        st.tuples(st.just("lost"), st.none()),
        st.tuples(st.just("cancel"), st.none()),
    ),
    max_size=12,
)


@FAST
@given(
    start=st.sampled_from([S.PENDING, S.RUNNING, S.SCHEDULED]),
    retries=st.integers(0, 3),
    max_redeliveries=st.none() | st.integers(0, 3),
    steps=events,
)
def test_the_rules_only_take_legal_transitions(
    start: TaskRunState,
    retries: int,
    max_redeliveries: int | None,
    steps: list[tuple[str, Any]],
) -> None:
    state, retry_count, redeliveries = start, 0, 0
    for kind, report in steps:
        try:
            if kind == "report":
                changes = on_report(
                    state=state,
                    report=report,
                    retries=retries,
                    retry_count=retry_count,
                    retry_delay_seconds=1.0,
                    now=100.0,
                )
            elif kind == "lost":
                if state not in (S.PENDING, S.RUNNING, S.CANCELLING):
                    continue  # only a leased run has a lease to lose
                changes = on_lost_lease(
                    state=state,
                    redeliveries=redeliveries,
                    max_redeliveries=max_redeliveries,
                    default_max_redeliveries=3,
                    reason="gone",
                    now=100.0,
                )
            else:
                found = on_cancel(state=state, now=100.0)
                if found is None:
                    continue
                changes = found
            check_transition(state, changes["state"])
        except IllegalTransition:
            continue  # refused as the store refuses it: the run is unchanged
        if state.is_terminal:
            raise AssertionError(f"{state} left its end state for {changes['state']}")
        state = changes["state"]
        retry_count = changes.get("retry_count", retry_count)
        redeliveries = changes.get("redeliveries", redeliveries)
        assert retry_count <= retries
        assert redeliveries <= (3 if max_redeliveries is None else max_redeliveries)


def test_a_frame_survives_its_own_encoding() -> None:
    frame = [Started(id=RUN, attempt=1), Released(id=RUN, attempt=1, reason="x")]
    assert decode_worker_frame(encode_frame(frame)) == frame
