"""End to end, signed payloads: a real server process that has no key, real worker
processes and callers that have one, and hostile clients that do not."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import cloudpickle
import httpx
import pytest
import trio
import trio_websocket

from trio_taskworker import (
    SerializationError,
    TaskRunFailed,
    TaskRunState,
    open_client,
)
from trio_taskworker._models import (
    Deliver,
    ErrorInfo,
    Finished,
    Started,
    Subscribe,
    WorkerMessage,
)
from trio_taskworker._serialization import (
    SIGNING_KEY_ENV,
    decode_server_frame,
    encode_frame,
)

from . import e2e_tasks as t
from .conftest import Proc, start_server, start_worker
from .test_signing import HEADER, KEY, MakesADirectory, signed_with

pytestmark = pytest.mark.e2e

SERIALIZATION_ERROR = "trio_taskworker._exceptions.SerializationError"


@pytest.fixture
def server(tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch) -> Proc:
    """A server started without the key: it never needs it."""
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    proc = start_server(tmp_path / "data")
    procs.append(proc)
    return proc


def worker_with_key(server: Proc, procs: list[Proc], tmp_path: Path, key: str) -> Proc:
    """A worker serving add and explode, with ``key`` in its environment."""
    proc = start_worker(server.url, "tests/e2e_tasks.py:add", "tests.e2e_tasks:explode",
                        log=tmp_path / "worker.log", **{SIGNING_KEY_ENV: key})  # fmt: skip
    procs.append(proc)
    return proc


async def test_signed_runs_complete_and_a_caller_with_another_key_is_refused(
    server: Proc, procs: list[Proc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_with_key(server, procs, tmp_path, KEY)
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    async with open_client(server.url) as client:
        added = await t.add.delay(1, y=2)
        assert await added.result(timeout=30) == 3
        run = await client.read_run(added.task_run_id)
        assert run.parameters is not None and run.parameters.startswith(HEADER)
        assert run.result is not None and run.result.startswith(HEADER)
        boom = await t.explode.delay("signed")
        with pytest.raises(t.CustomError, match=r"^signed$"):
            await boom.result(timeout=30)
        # A caller whose key the worker does not hold: the worker refuses its
        # parameters, and the exception it reports is signed with a key this
        # caller cannot check, so the run's error text stands in for it.
        monkeypatch.setenv(SIGNING_KEY_ENV, "another key")
        stranger = await t.add.delay(1)
        with pytest.raises(TaskRunFailed) as failed:
            await stranger.result(timeout=30)
        assert failed.value.exc_type == SERIALIZATION_ERROR
        assert failed.value.message.startswith(
            "refusing to unpickle the parameters: it is not signed"
        )
        assert (await stranger.wait()).state is TaskRunState.FAILED
    assert KEY not in (tmp_path / "worker.log").read_text()


async def test_a_raw_post_of_a_pickle_without_the_key_fails_the_run_and_runs_no_code(
    server: Proc, procs: list[Proc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_with_key(server, procs, tmp_path, KEY)
    unsigned = MakesADirectory(tmp_path / "unsigned")
    forged = MakesADirectory(tmp_path / "forged")
    payloads = [cloudpickle.dumps(((unsigned,), {})), signed_with("a guess", ((forged,), {}))]
    # What `curl -X POST /runs` can send: no library, no key.
    body = {
        "runs": [
            {"task_key": t.add.key, "parameters": base64.b64encode(p).decode()} for p in payloads
        ]
    }
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.post("/runs", json=body)
    assert response.status_code == 201, response.text
    ids = [uuid.UUID(i) for i in response.json()["ids"]]
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    async with open_client(server.url) as client:
        runs = await client.wait_runs(ids, timeout=30)
        for run in runs:
            assert run.state is TaskRunState.FAILED and run.error is not None
            assert run.error.type == SERIALIZATION_ERROR
            assert "refusing to unpickle the parameters: it is not signed" in run.error.message
            # The worker's exception is signed: a caller with the key gets it back as itself.
            with pytest.raises(SerializationError, match="refusing to unpickle"):
                await client.load_result(run)
        # The worker carries on with runs it can trust.
        assert await (await t.add.delay(2)).result(timeout=30) == 3
    assert not unsigned.path.exists() and not forged.path.exists()


async def test_a_rogue_subscriber_cannot_hand_a_caller_a_pickle(
    server: Proc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil = MakesADirectory(tmp_path / "pwned")
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    host, port = server.url.removeprefix("http://").split(":")
    async with open_client(server.url) as client:
        completes = await t.add.delay(1)
        fails = await t.add.delay(2)
        # The rogue: any process that opens /subscribe, with no key.
        async with (
            await trio.open_tcp_stream(host, int(port)) as stream,
            trio.open_nursery() as nursery,
        ):
            ws = await trio_websocket.wrap_client_stream(nursery, stream, host, "/subscribe")
            subscribe = Subscribe(keys=(t.add.key,), client_id="rogue", credits=2)
            await ws.send_message(encode_frame([subscribe]))
            taken: dict[uuid.UUID, int] = {}
            with trio.fail_after(30):
                while len(taken) < 2:
                    for message in decode_server_frame(await ws.get_message()):
                        if isinstance(message, Deliver):
                            taken.update({run.id: run.attempt for run in message.runs})
            pickle = cloudpickle.dumps(evil)
            error = ErrorInfo(type="builtins.ValueError", message="rogue", traceback="")
            reports: list[WorkerMessage] = [Started(id=i, attempt=a) for i, a in taken.items()]
            reports += [
                Finished(id=completes.task_run_id, attempt=taken[completes.task_run_id],
                         state=TaskRunState.COMPLETED, result=pickle),
                Finished(id=fails.task_run_id, attempt=taken[fails.task_run_id],
                         state=TaskRunState.FAILED, result=pickle, error=error),
            ]  # fmt: skip
            await ws.send_message(encode_frame(reports))
            await client.wait_runs([completes.task_run_id, fails.task_run_id], timeout=30)
            await ws.aclose()
        with pytest.raises(SerializationError, match="refusing to unpickle the result: it is not"):
            await completes.result(timeout=30)
        # A FAILED run's pickle is refused the same way; its JSON error text stands in.
        with pytest.raises(TaskRunFailed) as stand_in:
            await fails.result(timeout=30)
        assert str(stand_in.value) == "builtins.ValueError: rogue"
        assert "refusing to unpickle the pickled exception" in stand_in.value.__notes__[0]
    assert not evil.path.exists()
