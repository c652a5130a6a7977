"""Signed payloads: with TRIO_TASKWORKER_SIGNING_KEY set, every pickle is signed and
nothing unsigned, forged or altered is unpickled, by a worker or by a caller."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import cloudpickle
import httpx
import pytest

from trio_taskworker import (
    SerializationError,
    TaskRun,
    TaskRunFailed,
    TaskRunState,
    task,
)
from trio_taskworker._client import TaskWorkerClient
from trio_taskworker._models import ErrorInfo, Finished
from trio_taskworker._serialization import (
    SIGNING_KEY_ENV,
    dumps_payload,
    loads_payload,
    signing_keys,
)
from trio_taskworker._spawner import Spawner

KEY = "k3y-for-tests-only"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
HEADER = b"TTWS\x01"  # the documented envelope: magic, version 1, tag, pickle
TAG = 32


class MakesADirectory:
    """Unpickling this creates a directory: a payload that runs code when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.path),)


def signed_with(key: str, value: object) -> bytes:
    pickled = bytes(cloudpickle.dumps(value))
    tag = hmac.new(key.encode(), HEADER + pickled, hashlib.sha256).digest()
    return HEADER + tag + pickled


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    return KEY


# --- the envelope ------------------------------------------------------------------


def test_without_a_key_payloads_are_plain_pickles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    data = dumps_payload({"x": 1})
    assert data[0] == 0x80 and data == cloudpickle.dumps({"x": 1})
    assert loads_payload(data) == {"x": 1}


def test_signed_round_trip_in_the_documented_envelope(key: str) -> None:
    value = ((1, "two"), {"three": [3.0]})
    data = dumps_payload(value)
    pickled = cloudpickle.dumps(value)
    assert data == signed_with(key, value)
    assert data[:5] == HEADER and data[5 + TAG :] == pickled
    assert key.encode() not in data
    assert loads_payload(data) == value


def test_the_key_is_read_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    plain = dumps_payload(1)
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    signed = dumps_payload(1)
    assert plain[0] == 0x80 and signed.startswith(HEADER)


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        ("", ()),
        ("  ,, ", ()),
        ("one", (b"one",)),
        (" new , old ,", (b"new", b"old")),
        ("caf\u00e9", ("caf\u00e9".encode(),)),
    ],
)
def test_the_variable_is_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch, raw: str, keys: tuple[bytes, ...]
) -> None:
    monkeypatch.setenv(SIGNING_KEY_ENV, raw)
    assert signing_keys() == keys


# --- what is refused, and the message that says why ---------------------------------


def test_an_unsigned_payload_is_refused_when_a_key_is_set(key: str) -> None:
    with pytest.raises(
        SerializationError, match=r"refusing to unpickle the payload: it is not si"
    ):
        loads_payload(cloudpickle.dumps(1))
    with pytest.raises(SerializationError, match=f"{SIGNING_KEY_ENV} is set") as refused:
        loads_payload(cloudpickle.dumps(1), what="parameters")
    assert str(refused.value).startswith("refusing to unpickle the parameters:")
    assert key not in str(refused.value)


def test_a_payload_signed_with_another_key_is_refused(key: str) -> None:
    with pytest.raises(
        SerializationError, match=f"not signed with this process's {SIGNING_KEY_ENV}"
    ):
        loads_payload(signed_with("some other key", 1))


@pytest.mark.parametrize(
    "offset",
    [5, 5 + TAG - 1, 5 + TAG, -1],
    ids=["first tag byte", "last tag byte", "first pickle byte", "last pickle byte"],
)
def test_any_altered_byte_is_refused(key: str, offset: int) -> None:
    data = bytearray(dumps_payload(("a", 1)))
    data[offset] ^= 0x01
    with pytest.raises(SerializationError, match="forged or altered"):
        loads_payload(bytes(data))


def test_a_truncated_or_unknown_envelope_is_refused(key: str) -> None:
    data = dumps_payload(1)
    with pytest.raises(SerializationError, match="truncated"):
        loads_payload(data[: 5 + TAG - 1])
    with pytest.raises(SerializationError, match="forged or altered"):
        loads_payload(data[:-1])
    with pytest.raises(SerializationError, match="envelope version 2, and this"):
        loads_payload(b"TTWS\x02" + data[5:])


def test_a_signed_payload_is_refused_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    with pytest.raises(SerializationError, match="this process has none to verify it with"):
        loads_payload(signed_with(KEY, 1))


def test_rotation_the_first_key_signs_and_every_key_verifies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = signed_with("old", "before")
    monkeypatch.setenv(SIGNING_KEY_ENV, "new,old")
    assert loads_payload(old) == "before"
    new = dumps_payload("after")
    assert new == signed_with("new", "after")
    monkeypatch.setenv(SIGNING_KEY_ENV, "new")
    assert loads_payload(new) == "after"
    with pytest.raises(SerializationError, match="forged or altered"):
        loads_payload(old)  # once "old" is retired, what it signed is refused


def test_the_signature_is_checked_before_anything_is_unpickled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    evil = MakesADirectory(tmp_path / "pwned")
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    forged = [
        cloudpickle.dumps(evil),  # unsigned
        signed_with("a guessed key", evil),
        HEADER + bytes(TAG) + cloudpickle.dumps(evil),  # a blank tag
        b"TTWS\x02" + signed_with(KEY, evil)[5:],  # a version that is not checked
    ]
    for data in forged:
        with pytest.raises(SerializationError, match="refusing to unpickle"):
            loads_payload(data)
    monkeypatch.delenv(SIGNING_KEY_ENV)
    with pytest.raises(SerializationError, match="refusing to unpickle"):
        loads_payload(signed_with(KEY, evil))
    assert not evil.path.exists()
    # The payloads were live: the genuine one does run its code when loaded.
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    loads_payload(signed_with(KEY, evil))
    assert evil.path.is_dir()


# --- the worker and the caller ------------------------------------------------------


@task
async def echo(value: object) -> object:
    return value


def a_run(parameters: bytes, **changes: Any) -> TaskRun:
    run = TaskRun(
        id=uuid.uuid4(),
        task_key=echo.key,
        task_name="echo",
        state=TaskRunState.PENDING,
        created_at=NOW,
        scheduled_time=NOW,
        attempt=1,
        parameters=parameters,
    )
    return attrs.evolve(run, **changes)


async def run_in_spawner(run: TaskRun) -> Finished:
    sent: list[object] = []
    spawner = Spawner(
        {echo.key: echo},
        1,
        report=lambda message, generation: sent.append(message),
        request_stop=lambda: None,
    )
    await spawner.execute(run)
    (finished,) = sent
    assert isinstance(finished, Finished)
    return finished


async def test_a_worker_with_the_key_runs_signed_parameters_and_signs_its_result(
    key: str,
) -> None:
    finished = await run_in_spawner(a_run(dumps_payload(((["value"],), {}))))
    assert finished.state is TaskRunState.COMPLETED
    assert finished.result is not None and finished.result.startswith(HEADER)
    assert loads_payload(finished.result) == ["value"]


async def test_a_worker_with_the_key_fails_a_run_with_unsigned_parameters(
    key: str, tmp_path: Path
) -> None:
    evil = MakesADirectory(tmp_path / "pwned")
    for parameters in [cloudpickle.dumps(((evil,), {})), signed_with("other", ((evil,), {}))]:
        finished = await run_in_spawner(a_run(parameters))
        assert finished.state is TaskRunState.FAILED and finished.error is not None
        assert finished.error.type == "trio_taskworker._exceptions.SerializationError"
        assert finished.error.message.startswith("refusing to unpickle the parameters: it is")
        # The exception it reports is signed, so a caller with the key gets it back.
        assert finished.result is not None and finished.result.startswith(HEADER)
        assert isinstance(loads_payload(finished.result), SerializationError)
    assert not evil.path.exists()


async def test_a_worker_without_the_key_fails_a_run_with_signed_parameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parameters = signed_with(KEY, ((1,), {}))
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    finished = await run_in_spawner(a_run(parameters))
    assert finished.state is TaskRunState.FAILED and finished.error is not None
    assert "has none to verify it with" in finished.error.message


@contextlib.asynccontextmanager
async def offline_client() -> AsyncIterator[TaskWorkerClient]:
    def no_request(request: httpx.Request) -> httpx.Response:
        raise AssertionError("inline payloads need no request")

    transport = httpx.MockTransport(no_request)
    async with httpx.AsyncClient(base_url="http://server", transport=transport) as http:
        yield TaskWorkerClient("http://server", http)


async def test_a_caller_with_the_key_refuses_an_unsigned_result(key: str, tmp_path: Path) -> None:
    evil = MakesADirectory(tmp_path / "pwned")
    error = ErrorInfo(type="builtins.ValueError", message="no", traceback="")
    async with offline_client() as client:
        for result in [cloudpickle.dumps(evil), signed_with("other", evil)]:
            completed = a_run(b"", state=TaskRunState.COMPLETED, result=result)
            with pytest.raises(SerializationError, match="refusing to unpickle"):
                await client.load_result(completed)
            # A FAILED run's pickled exception is refused too; the run's error
            # text (plain JSON, never unpickled) stands in for it.
            failed = a_run(b"", state=TaskRunState.FAILED, result=result, error=error)
            with pytest.raises(TaskRunFailed) as stand_in:
                await client.load_result(failed)
            assert str(stand_in.value) == "builtins.ValueError: no"
            (note,) = stand_in.value.__notes__  # and it says why the pickle was not used
            assert note.startswith("the run's pickled exception was not used: refusing")
        assert not evil.path.exists()
        ok = a_run(b"", state=TaskRunState.COMPLETED, result=dumps_payload(42))
        assert await client.load_result(ok) == 42


def test_the_server_never_unpickles() -> None:
    server = Path(__file__).parent.parent / "trio_taskworker" / "_server"
    for path in server.glob("*.py"):
        source = path.read_text()
        for needle in ("loads_payload", "cloudpickle", "pickle.load", "import pickle"):
            assert needle not in source, f"{path.name} mentions {needle}"
