"""The server's subscription handler against a fake websocket, on the autojump clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from trio_taskworker import TaskRunState
from trio_taskworker._models import Deliver, Subscribed, TaskRunCreate
from trio_taskworker._serialization import decode_server_frame
from trio_taskworker._server import SQLiteStore
from trio_taskworker._server._app import AppState, SubscriptionHandler
from trio_taskworker._server._dispatch import Dispatcher, Waiters

EPOCH = 1_700_000_000.0


def now() -> float:
    return EPOCH + trio.current_time()


class FakeWebSocket:
    """Just what the handler uses of Starlette's WebSocket, over memory channels."""

    def __init__(self) -> None:
        self.to_server, self._incoming = trio.open_memory_channel[dict[str, Any]](100)
        self._outgoing, self.from_server = trio.open_memory_channel[Any](100)
        self.closed: tuple[int, str] | None = None

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        return await self._incoming.receive()

    async def send_text(self, text: str) -> None:
        await self._outgoing.send(decode_server_frame(text))

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        await self._outgoing.send(("closed", code, reason))

    async def send_frame(self, messages: list[dict[str, Any]]) -> None:
        await self.to_server.send({"type": "websocket.receive", "text": json.dumps(messages)})


@pytest.fixture
async def app_state(nursery: trio.Nursery, memory_store: SQLiteStore) -> AppState:
    dispatcher = Dispatcher(memory_store, now)
    await nursery.start(dispatcher.run)
    return AppState(
        store=memory_store, dispatcher=dispatcher, waiters=Waiters(), now=now, lease_seconds=30.0
    )


SUBSCRIBE = {"type": "subscribe", "keys": ["k"], "client_id": "w", "credits": 1}


async def test_silent_worker_loses_its_leases(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, app_state: AppState
) -> None:
    (run_id,) = await app_state.store.create_runs([TaskRunCreate(task_key="k")], now())
    ws = FakeWebSocket()
    nursery.start_soon(SubscriptionHandler(app_state, ws).run)  # type: ignore[arg-type]
    await ws.send_frame([SUBSCRIBE])
    (subscribed,) = await ws.from_server.receive()
    assert isinstance(subscribed, Subscribed) and subscribed.lease_seconds == 30.0
    (deliver,) = await ws.from_server.receive()
    assert isinstance(deliver, Deliver)
    run = deliver.runs[0]
    await ws.send_frame([{"type": "started", "id": str(run.id), "attempt": run.attempt}])
    start = trio.current_time()
    # Heartbeats keep the lease for as long as they come.
    for _ in range(5):
        await trio.sleep(20)
        await ws.send_frame([{"type": "heartbeat"}])
    assert ws.closed is None
    # Then silence: after one lease the server closes and releases the run.
    closed = await ws.from_server.receive()
    assert closed[:2] == ("closed", 3008) and "lease expired" in closed[2]
    assert trio.current_time() - start == pytest.approx(100 + 30)
    await trio.testing.wait_all_tasks_blocked()
    (after,) = await app_state.store.read_runs([run_id])
    assert after.state is TaskRunState.SCHEDULED and after.redeliveries == 1


async def test_no_subscribe_in_time_is_closed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, app_state: AppState
) -> None:
    ws = FakeWebSocket()
    nursery.start_soon(SubscriptionHandler(app_state, ws).run)  # type: ignore[arg-type]
    closed = await ws.from_server.receive()
    assert closed[:2] == ("closed", 1013) and "no subscribe message in time" in closed[2]
