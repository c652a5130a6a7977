from __future__ import annotations

import datetime
import json
import uuid

import attrs
import pytest

from trio_taskworker import SerializationError, TaskRunState
from trio_taskworker._models import (
    Credit,
    Deliver,
    Drain,
    ErrorInfo,
    Finished,
    ServerMessage,
    Started,
    Subscribe,
    TaskRun,
    TaskRunCreate,
    TaskRunCreateBatch,
    WorkerMessage,
)
from trio_taskworker._serialization import (
    InvalidPayload,
    create_batch_json,
    decode_server_frame,
    decode_worker_frame,
    dumps_payload,
    encode_frame,
    from_json,
    loads_payload,
    structure,
    to_json,
)

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def _run() -> TaskRun:
    return TaskRun(
        id=uuid.uuid4(),
        task_key="m:f",
        task_name="f",
        state=TaskRunState.PENDING,
        created_at=NOW,
        scheduled_time=NOW,
        attempt=1,
        tags=("a", "b"),
        parameters=b"\x00\x01binary",
    )


def test_worker_frame_round_trip() -> None:
    run_id = uuid.uuid4()
    messages = [
        Subscribe(keys=("m:f",), client_id="w", credits=3),
        Started(id=run_id, attempt=1),
        Finished(id=run_id, attempt=1, state=TaskRunState.COMPLETED, result=b"\x80"),
        Credit(n=1),
    ]
    decoded = decode_worker_frame(encode_frame(messages))
    assert decoded == messages
    assert isinstance(decoded[2], Finished)
    assert decoded[2].state is TaskRunState.COMPLETED


def test_server_frame_round_trip() -> None:
    message = Deliver(runs=(_run(),))
    assert decode_server_frame(encode_frame([message])) == [message]


def test_run_json_round_trip() -> None:
    run = _run()
    assert from_json(to_json(run), TaskRun) == run


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        ("not json", "not valid JSON"),
        ("{}", "non-empty JSON array"),
        ("[]", "non-empty JSON array"),
        ('[{"type": "nope"}]', "nope"),
        ('[{"type": "credit", "n": "5"}]', "expected an integer"),
        ('[{"type": "credit", "n": 5.5}]', "expected an integer"),
        ('[{"type": "credit", "n": 1, "extra": 2}]', "extra"),
        ('[{"type": "started", "id": "zzz", "attempt": 1}]', "id"),
    ],
)
def test_bad_worker_frames(frame: str, needle: str) -> None:
    with pytest.raises(InvalidPayload, match=needle):
        decode_worker_frame(frame)


def test_an_integral_json_number_is_an_integer() -> None:
    # JSON has one number type, and JSON Schema calls 5.0 an integer.
    assert decode_worker_frame('[{"type": "credit", "n": 5.0}]') == [Credit(n=5)]


def test_naive_datetime_refused() -> None:
    body = to_json(TaskRunCreateBatch(runs=(TaskRunCreate(task_key="k", scheduled_time=NOW),)))
    naive = body.replace(b"+00:00", b"")
    with pytest.raises(InvalidPayload, match="no timezone"):
        from_json(naive, TaskRunCreateBatch)


def test_bad_base64_refused() -> None:
    with pytest.raises(InvalidPayload, match="base64"):
        from_json(b'{"runs": [{"task_key": "k", "parameters": "!!"}]}', TaskRunCreateBatch)


def test_payload_round_trip_and_errors() -> None:
    assert loads_payload(dumps_payload(((1, 2), {"y": 3}))) == ((1, 2), {"y": 3})
    import threading

    with pytest.raises(SerializationError, match="cannot pickle"):
        dumps_payload(threading.Lock())
    with pytest.raises(SerializationError, match="cannot unpickle"):
        loads_payload(b"garbage")


def test_a_create_batch_encodes_as_the_batch_of_evolved_runs_would() -> None:
    creates = (
        TaskRunCreate(task_key="k", parameters_preview="x=1", tags=("a",), retries=2),
        TaskRunCreate(
            task_key="k",
            name="second",
            scheduled_time=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
        ),
    )
    parameters = [(b"\x80pickle", None), (None, "blob-1")]
    evolved = TaskRunCreateBatch(
        runs=tuple(
            attrs.evolve(c, parameters=inline, parameters_ref=ref)
            for c, (inline, ref) in zip(creates, parameters, strict=True)
        )
    )
    encoded = create_batch_json(TaskRunCreateBatch(runs=creates), parameters)
    assert encoded == to_json(evolved)
    assert from_json(encoded, TaskRunCreateBatch) == evolved


def test_to_json_replaces_fields_as_the_evolved_value_would_encode() -> None:
    run = attrs.evolve(_run(), parameters_preview="(1, 2)")
    replaced = to_json(run, parameters=None, parameters_preview=None)
    assert replaced == to_json(attrs.evolve(run, parameters=None, parameters_preview=None))
    assert from_json(replaced, TaskRun) == attrs.evolve(
        run, parameters=None, parameters_preview=None
    )


@pytest.mark.parametrize(
    "item",
    [
        {"type": "started", "id": "not-a-uuid", "attempt": 1},
        {"type": "finished", "id": str(uuid.uuid4()), "attempt": 1, "state": "DONE"},
        {"type": "credit", "n": "3"},
        {"type": "started", "id": str(uuid.uuid4()), "attempt": 1, "extra": 1},
        {"type": ["started"]},
        {"type": "nope"},
        {"id": str(uuid.uuid4())},
        ["started"],
    ],
)
def test_a_bad_message_in_a_frame_is_refused_with_the_unions_reason(item: object) -> None:
    """Messages go straight to their class by tag; what it refuses is described
    as the tagged union describes it."""
    with pytest.raises(InvalidPayload) as in_frame:
        decode_worker_frame(json.dumps([item]))
    with pytest.raises(InvalidPayload) as alone:
        structure(item, WorkerMessage)
    assert str(in_frame.value) == str(alone.value) != ""


def test_wire_json_is_what_the_converter_unstructures() -> None:
    """UUIDs and UTC datetimes are left to orjson on the wire; the JSON is the
    same as the converter's strings, and other zones keep their exact offset."""
    import orjson

    from trio_taskworker._serialization import converter

    odd_zone = datetime.timezone(datetime.timedelta(hours=-1, seconds=-90))
    run = attrs.evolve(
        _run(),
        started_at=NOW.replace(microsecond=0),
        finished_at=NOW.astimezone(odd_zone),
    )
    assert to_json(run) == orjson.dumps(converter.unstructure(run))
    assert b'"finished_at":"2026-01-02T02:02:35-01:01:30"' in to_json(run)
    create = TaskRunCreate(task_key="m:f", scheduled_time=NOW.astimezone(odd_zone))
    assert to_json(create) == orjson.dumps(converter.unstructure(create))
    frame = [Deliver(runs=(run, _run()))]
    assert encode_frame(frame) == json.dumps(
        [converter.unstructure(m, ServerMessage) for m in frame], separators=(",", ":")
    )


@pytest.mark.parametrize(
    "literal",
    [
        "-9223372036854775809",  # -(2**63) - 1: read as the float -(2.0**63)
        "-9223372036854776832",  # the last one that rounds to it
        "9223372036854775808",  # 2**63, read as an int
        "18446744073709551616",  # 2**64, read as a float
    ],
)
def test_an_integer_past_64_bits_is_refused_however_the_parser_reads_it(literal: str) -> None:
    with pytest.raises(InvalidPayload, match="64 bits"):
        decode_worker_frame(f'[{{"type": "drain", "seq": {literal}}}]')


def test_a_lone_surrogate_in_a_report_is_sent_and_refused_by_the_server() -> None:
    """json.dumps (ensure_ascii) wrote a lone surrogate as ``\\udcff``, and the
    server refused the frame with a reason (1008, the worker stopped with a
    ProtocolError); a task's exception message can hold one (os.fsdecode of
    a file name). Encoding must not raise TypeError in the worker instead."""
    report = Finished(
        id=uuid.uuid4(),
        attempt=1,
        state=TaskRunState.FAILED,
        error=ErrorInfo(type="builtins.ValueError", message="bad name \udcff"),
    )
    frame = encode_frame([report])
    with pytest.raises(InvalidPayload, match="surrogate"):
        decode_worker_frame(frame)


def test_an_integer_written_as_a_float_past_2_to_the_53_is_refused() -> None:
    """Such a float stands for several integers (9007199254740993.0 reads as
    ...992): none is taken."""
    with pytest.raises(InvalidPayload, match="2\\*\\*53"):
        decode_worker_frame('[{"type": "drain", "seq": 9007199254740993.0}]')
    assert decode_worker_frame('[{"type": "drain", "seq": 9007199254740992}]')[0] == Drain(
        seq=2**53
    )
    assert decode_worker_frame('[{"type": "drain", "seq": 776.0}]')[0] == Drain(seq=776)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff", "not valid UTF-8"),
        ("{}".encode("utf-16"), "not valid UTF-8"),
        (b"\xef\xbb\xbf[]", "byte order mark"),
        (b'[{"type": "credit", "n": -Infinity}]', "Infinity is not a JSON number"),
        (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
        (b"[1e400]", "infinity"),
    ],
)
def test_json_that_cannot_be_parsed_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidPayload, match="not valid JSON") as refused:
        decode_worker_frame(data)
    assert reason in str(refused.value)
