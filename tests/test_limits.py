"""Request bodies within the server's limits: size, bytes held at once, and time."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from starlette.exceptions import HTTPException
from starlette.requests import Request

from trio_taskworker._server import SQLiteStore
from trio_taskworker._server._app import AppState, _body
from trio_taskworker._server._dispatch import Dispatcher, Waiters
from trio_taskworker.testing import trio_wall_time


def state(store: SQLiteStore, **limits: Any) -> AppState:
    return AppState(
        store=store,
        dispatcher=Dispatcher(store, trio_wall_time),
        waiters=Waiters(),
        now=trio_wall_time,
        **limits,
    )


def request(
    chunks: list[bytes], *, then_wait: bool = False, declared: int | None = None
) -> Request:
    """A request whose body arrives in ``chunks``; with ``then_wait`` the sender stalls."""
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending) or then_wait}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {"type": "http", "method": "POST", "path": "/blobs", "headers": headers}
    return Request(scope, receive)


async def test_a_body_within_the_limits_arrives_whole(memory_store: SQLiteStore) -> None:
    app = state(memory_store)
    assert await _body(request([b"ab", b"cd"]), app) == b"abcd"
    assert app.bodies_in_flight == 0


async def test_a_body_over_the_size_limit_is_413(memory_store: SQLiteStore) -> None:
    app = state(memory_store, max_body_bytes=3)
    with pytest.raises(HTTPException) as declared:
        await _body(request([b"abcd"], declared=4), app)
    assert declared.value.status_code == 413
    with pytest.raises(HTTPException) as streamed:
        await _body(request([b"ab", b"cd"]), app)
    assert streamed.value.status_code == 413 and app.bodies_in_flight == 0


async def test_too_many_bytes_held_at_once_is_503_and_frees_its_share(
    memory_store: SQLiteStore,
) -> None:
    app = state(memory_store, max_bodies_in_flight=10)
    app.bodies_in_flight = 6  # other uploads hold 6 bytes now
    with pytest.raises(HTTPException) as busy:
        await _body(request([b"abc", b"defg"]), app)
    assert busy.value.status_code == 503 and busy.value.headers == {"Retry-After": "1"}
    assert app.bodies_in_flight == 6  # the refused request gave back what it held
    app.bodies_in_flight = 0
    assert await _body(request([b"abc", b"defg"]), app) == b"abcdefg"


async def test_a_stalled_body_is_408_after_the_body_timeout(
    autojump_clock: trio.testing.MockClock, memory_store: SQLiteStore
) -> None:
    app = state(memory_store, body_timeout=60.0)
    start = trio.current_time()
    with pytest.raises(HTTPException) as slow:
        await _body(request([b"abc"], then_wait=True), app)
    assert slow.value.status_code == 408
    assert trio.current_time() - start == pytest.approx(60.0)
    assert app.bodies_in_flight == 0


async def test_a_streamed_upload_over_the_limit_is_413_and_holds_nothing(
    memory_store: SQLiteStore,
) -> None:
    from trio_taskworker._server._app import _receive

    app = state(memory_store, max_body_bytes=3)
    written: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        written.append(chunk)

    with pytest.raises(HTTPException) as big:
        await _receive(request([b"ab", b"cd"]), app, sink)  # chunked: no content-length
    assert big.value.status_code == 413 and written == [b"ab"]
    assert app.bodies_in_flight == 0  # a streamed body never counts as held
