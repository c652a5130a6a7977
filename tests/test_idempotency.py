"""Idempotent submission: a ``POST /runs`` retried with its ``Idempotency-Key``
gets the same ids and creates nothing new, in the store, over HTTP and through
the client's retries; end to end through a proxy that loses the first answer."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_taskworker import TaskServer, open_client
from trio_taskworker._client import TaskWorkerClient
from trio_taskworker._server import SQLiteStore
from trio_taskworker._server._store import Idempotency, IdempotencyConflict

from . import e2e_tasks as t
from .conftest import Proc, start_server, start_worker


def body(key: str = "m:f") -> dict[str, Any]:
    return {"runs": [{"task_key": key}, {"task_key": key}]}


async def count_runs(http: httpx.AsyncClient) -> int:
    response = await http.get("/runs", params={"limit": 1000})
    return len(response.json()["runs"])


@pytest.fixture
async def http(server: TaskServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=str(server.url)) as client:
        yield client


async def test_the_same_key_and_body_return_the_same_ids(http: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "submission-1"}
    first = await http.post("/runs", json=body(), headers=headers)
    again = await http.post("/runs", json=body(), headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert await count_runs(http) == 2
    other = await http.post("/runs", json=body(), headers={"Idempotency-Key": "submission-2"})
    assert other.json() != first.json() and await count_runs(http) == 4


async def test_a_key_reused_with_another_body_is_a_conflict(http: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "k"}
    assert (await http.post("/runs", json=body(), headers=headers)).status_code == 201
    conflict = await http.post("/runs", json=body("m:g"), headers=headers)
    assert conflict.status_code == 409
    assert "used before with another body" in conflict.json()["detail"]
    assert await count_runs(http) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "caf\u00e9"])
async def test_a_malformed_key_is_refused(http: httpx.AsyncClient, key: str) -> None:
    response = await http.post(
        "/runs",
        json=body(),
        headers={"Idempotency-Key": key.encode("utf-8")},  # type: ignore[dict-item]
    )
    assert response.status_code == 422 and "Idempotency-Key" in response.json()["detail"]
    assert await count_runs(http) == 0


async def test_keys_are_forgotten_after_a_day(
    autojump_clock: trio.testing.MockClock, memory_store: SQLiteStore
) -> None:
    from trio_taskworker._models import TaskRunCreate

    creates = [TaskRunCreate(task_key="m:f")]
    key = Idempotency("k", "h")
    first = await memory_store.create_runs(creates, 1000.0, key)
    assert await memory_store.create_runs(creates, 1000.0 + 86_000, key) == first
    with pytest.raises(IdempotencyConflict):
        await memory_store.create_runs(creates, 1000.0 + 86_000, Idempotency("k", "other"))
    later = await memory_store.create_runs(creates, 1000.0 + 86_401, key)
    assert later != first


async def test_the_client_retries_a_lost_answer_with_the_same_key(server: TaskServer) -> None:
    """The server created the runs, but the answer never arrived (a connection
    closed by the keep-alive timer, say): the retry must not create them again."""
    keys: list[str | None] = []
    real = httpx.AsyncHTTPTransport()  # closed with the client below

    class LosesTheFirstAnswer(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await real.handle_async_request(request)
            if request.url.path == "/runs" and request.method == "POST":
                keys.append(request.headers.get("idempotency-key"))
                if len(keys) == 1:
                    await response.aread()
                    raise httpx.RemoteProtocolError("connection closed", request=request)
            return response

    url = str(server.url)
    async with real, httpx.AsyncClient(base_url=url, transport=LosesTheFirstAnswer()) as raw:
        client = TaskWorkerClient(url, raw)
        create, payload = t.add.run_create((1,), {})
        ids = await client.submit([(create, payload)])
        listed = await client.list_runs()
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0]
    assert [r.id for r in listed] == ids  # one run, the one whose id the caller got


async def test_without_a_server_a_submission_fails_after_its_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_taskworker import ServerUnavailable

    attempts = 0

    class Refuses(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            nonlocal attempts
            attempts += 1
            raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(base_url="http://x", transport=Refuses()) as raw:
        client = TaskWorkerClient("http://x", raw)
        with pytest.raises(ServerUnavailable, match="cannot reach http://x"):
            await client.submit([t.add.run_create((1,), {})])
        assert attempts == 4  # the first try and three retries
        attempts = 0
        with pytest.raises(ServerUnavailable):
            await client.read_run(uuid.uuid4())
        assert attempts == 1  # a read is not retried by the client


# --- end to end ----------------------------------------------------------------------


async def _drop_first_post_answer(
    listener: trio.SocketListener, target: tuple[str, int], dropped: list[int]
) -> None:
    """A TCP proxy: it forwards everything, except that the first ``POST /runs``
    it sees reaches the server and its answer is thrown away with the connection."""

    async def pipe(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def handle(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream(*target) as upstream:
            first = await client.receive_some(65536)
            await upstream.send_all(first)
            if first.startswith(b"POST /runs ") and not dropped:
                dropped.append(1)
                await upstream.receive_some(65536)  # the server has answered: lose it
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, client, upstream)
                await pipe(upstream, client)
                nursery.cancel_scope.cancel()

    await trio.serve_listeners(handle, [listener])


@pytest.mark.e2e
async def test_a_lost_answer_through_a_real_proxy_creates_no_ghost_runs(
    tmp_path: Path, procs: list[Proc], nursery: trio.Nursery
) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    procs.append(start_worker(server.url, "tests/e2e_tasks.py:add", log=tmp_path / "w.log"))
    host, port = server.url.removeprefix("http://").split(":")
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    dropped: list[int] = []
    nursery.start_soon(_drop_first_post_answer, listener, (host, int(port)), dropped)
    proxy = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
    async with open_client(proxy) as client:
        fut = await t.add.delay(20, y=22)
        assert dropped == [1]  # the first answer was lost, and the call still succeeded
        assert await fut.result(timeout=30) == 42
        assert [r.id for r in await client.list_runs()] == [fut.task_run_id]
    nursery.cancel_scope.cancel()
