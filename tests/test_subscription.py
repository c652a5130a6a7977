"""The server's subscription handler against a fake websocket, on the autojump clock."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing

from trio_taskworker import TaskRunState
from trio_taskworker._models import Deliver, Drained, Subscribed, TaskRun, TaskRunCreate
from trio_taskworker._rules import Report
from trio_taskworker._serialization import decode_server_frame
from trio_taskworker._server import SQLiteStore, _app
from trio_taskworker._server._app import AppState, SubscriptionHandler
from trio_taskworker._server._dispatch import Dispatcher, Waiters
from trio_taskworker._server._store import Outcome

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


class GatedStore(SQLiteStore):
    """A store whose first report application waits for ``gate``; it records
    how many reports each application carried."""

    def __init__(self) -> None:
        super().__init__(":memory:", threaded=False)
        self.gate = trio.Event()
        self.applied: list[int] = []

    async def apply_reports(self, owner: str, reports: Sequence[Report], now: float) -> Outcome:
        self.applied.append(len(reports))
        if len(self.applied) == 1:
            await self.gate.wait()
        return await super().apply_reports(owner, reports, now)


@pytest.fixture
async def gated_state(nursery: trio.Nursery) -> AppState:
    store = GatedStore()
    await nursery.start(store.run)
    dispatcher = Dispatcher(store, now)
    await nursery.start(dispatcher.run)
    return AppState(
        store=store, dispatcher=dispatcher, waiters=Waiters(), now=now, lease_seconds=30.0
    )


def finished(run: TaskRun) -> list[dict[str, Any]]:
    """A no-op run's whole life as one frame: started, finished, its credit back."""
    return [
        {"type": "started", "id": str(run.id), "attempt": run.attempt},
        {"type": "finished", "id": str(run.id), "attempt": run.attempt, "state": "COMPLETED"},
        {"type": "credit", "n": 1},
    ]


async def subscribed_with_runs(
    nursery: trio.Nursery, state: AppState, n: int
) -> tuple[FakeWebSocket, list[TaskRun]]:
    """A fake worker subscribed with ``n`` credits, and the ``n`` runs delivered to it."""
    await state.store.create_runs([TaskRunCreate(task_key="k") for _ in range(n)], now())
    ws = FakeWebSocket()
    nursery.start_soon(SubscriptionHandler(state, ws).run)  # type: ignore[arg-type]
    await ws.send_frame([{**SUBSCRIBE, "credits": n}])
    (subscribed,) = await ws.from_server.receive()
    assert isinstance(subscribed, Subscribed)
    (deliver,) = await ws.from_server.receive()
    assert isinstance(deliver, Deliver) and len(deliver.runs) == n
    return ws, list(deliver.runs)


async def first_frame_at_the_gate(
    nursery: trio.Nursery, state: AppState, n: int
) -> tuple[GatedStore, FakeWebSocket, list[TaskRun]]:
    """:func:`subscribed_with_runs`, then the first run's frame sent and held at the gate."""
    store = state.store
    assert isinstance(store, GatedStore)
    ws, runs = await subscribed_with_runs(nursery, state, n)
    await ws.send_frame(finished(runs[0]))
    await trio.testing.wait_all_tasks_blocked()
    return store, ws, runs


async def test_frames_that_queue_during_an_application_are_applied_together(
    nursery: trio.Nursery, gated_state: AppState
) -> None:
    store, ws, runs = await first_frame_at_the_gate(nursery, gated_state, 3)
    assert store.applied == [2]  # the first frame's two reports, held at the gate
    # Three more frames arrive while that one is applied: they wait, read.
    await ws.send_frame(finished(runs[1]))
    await ws.send_frame(finished(runs[2]))
    await ws.send_frame([{"type": "drain", "seq": 7}])
    await trio.testing.wait_all_tasks_blocked()
    assert store.applied == [2]
    store.gate.set()
    # One more application carries both frames' reports; the drain is answered after it.
    (drained,) = await ws.from_server.receive()
    assert drained == Drained(seq=7)
    assert store.applied == [2, 4]
    ended = await store.read_runs([r.id for r in runs])
    assert [r.state for r in ended] == [TaskRunState.COMPLETED] * 3


async def test_a_bad_frame_closes_after_the_frames_before_it_are_applied(
    nursery: trio.Nursery, gated_state: AppState
) -> None:
    store, ws, (run,) = await first_frame_at_the_gate(nursery, gated_state, 1)
    await ws.send_frame([{"type": "credit", "n": -1}])
    await trio.testing.wait_all_tasks_blocked()
    assert ws.closed is None  # not before the frame ahead of it is applied
    store.gate.set()
    closed = await ws.from_server.receive()
    assert closed[:2] == ("closed", 1008) and "credits must stay in" in closed[2]
    # The run's end was applied, not released for a redelivery.
    (after,) = await store.read_runs([run.id])
    assert (after.state, after.redeliveries) == (TaskRunState.COMPLETED, 0)


async def test_a_credit_overflow_does_not_drop_the_good_frames_queued_before_it(
    nursery: trio.Nursery, gated_state: AppState
) -> None:
    store, ws, (r0, r1) = await first_frame_at_the_gate(nursery, gated_state, 2)
    await ws.send_frame(finished(r1))  # a good frame, read while the first is applied
    await ws.send_frame([{"type": "credit", "n": 100_000}])  # then one past MAX_CREDITS
    await trio.testing.wait_all_tasks_blocked()
    store.gate.set()
    closed = await ws.from_server.receive()
    assert closed[:2] == ("closed", 1008) and "credits must stay in" in closed[2]
    await trio.testing.wait_all_tasks_blocked()
    assert store.applied == [2, 2]
    ended = await store.read_runs([r0.id, r1.id])
    assert [r.state for r in ended] == [TaskRunState.COMPLETED] * 2


async def test_the_reader_stops_reading_ahead_past_its_byte_bound(
    nursery: trio.Nursery, gated_state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_app, "MAX_BYTES_AHEAD", 100)
    store = gated_state.store
    assert isinstance(store, GatedStore)
    ws, runs = await subscribed_with_runs(nursery, gated_state, 4)
    for run in runs:  # each frame is over 100 bytes
        await ws.send_frame(finished(run))
    await trio.testing.wait_all_tasks_blocked()
    # The first frame is being applied, the second read and queued (past the
    # bound), the other two not read yet.
    assert store.applied == [2]
    assert ws.to_server.statistics().current_buffer_used == 2
    store.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert ws.to_server.statistics().current_buffer_used == 0
    ended = await store.read_runs([r.id for r in runs])
    assert [r.state for r in ended] == [TaskRunState.COMPLETED] * 4


async def test_reports_are_timed_when_their_frame_arrived(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, gated_state: AppState
) -> None:
    store, ws, (_, r1) = await first_frame_at_the_gate(nursery, gated_state, 2)
    arrived = now()
    await ws.send_frame(finished(r1))
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep(5)  # the second frame waits for the first one's application
    store.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    (after,) = await store.read_runs([r1.id])
    assert after.started_at is not None and after.finished_at is not None
    assert after.started_at.timestamp() == pytest.approx(arrived)
    assert after.finished_at.timestamp() == pytest.approx(arrived)
