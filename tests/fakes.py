"""An in-process transport between a real worker and the real server handler.

The worker's subscription and the server's ``SubscriptionHandler`` talk over memory
channels instead of a socket, so whole scenarios run on trio's autojump clock:
deterministic, and no time passes for real.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio
import trio_websocket

from trio_taskworker._server import SQLiteStore
from trio_taskworker._server._app import AppState, SubscriptionHandler
from trio_taskworker._server._dispatch import Dispatcher, Waiters

EPOCH = time.time()


def now() -> float:
    """Wall-clock seconds that follow trio's clock (virtual under autojump)."""
    return EPOCH + trio.current_time()


@attrs.define(eq=False)
class _ServerEnd:
    """What ``SubscriptionHandler`` uses of Starlette's WebSocket."""

    incoming: trio.MemoryReceiveChannel[dict[str, Any]]
    outgoing: trio.MemorySendChannel[tuple[Any, ...]]

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        try:
            return await self.incoming.receive()
        except trio.EndOfChannel:
            return {"type": "websocket.disconnect", "code": 1006}

    async def send_text(self, text: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.outgoing.send(("text", text))

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.outgoing.send(("close", code, reason))


@attrs.define(eq=False)
class _WorkerEnd:
    """What the worker uses of trio-websocket's WebSocketConnection."""

    outgoing: trio.MemorySendChannel[dict[str, Any]]
    incoming: trio.MemoryReceiveChannel[tuple[Any, ...]]

    async def send_message(self, text: str) -> None:
        try:
            await self.outgoing.send({"type": "websocket.receive", "text": text})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise trio_websocket.ConnectionClosed(
                trio_websocket.CloseReason(1006, "gone")
            ) from None

    async def get_message(self) -> str:
        try:
            item = await self.incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio_websocket.ConnectionClosed(
                trio_websocket.CloseReason(1006, "gone")
            ) from None
        if item[0] == "close":
            raise trio_websocket.ConnectionClosed(trio_websocket.CloseReason(item[1], item[2]))
        return str(item[1])

    async def ping(self) -> None:
        pass


@attrs.define(eq=False)
class InProcessServer:
    """The server's dispatcher, store and subscription handler, minus HTTP."""

    nursery: trio.Nursery
    state: AppState
    _cuts: list[trio.CancelScope] = attrs.field(factory=list)

    @classmethod
    async def start(
        cls, nursery: trio.Nursery, store: SQLiteStore, lease_seconds: float = 30.0
    ) -> InProcessServer:
        dispatcher = Dispatcher(store, now)
        await nursery.start(dispatcher.run)
        state = AppState(
            store=store,
            dispatcher=dispatcher,
            waiters=Waiters(),
            now=now,
            lease_seconds=lease_seconds,
        )
        return cls(nursery, state)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        """A ``connect`` factory for ``TaskWorker(connect=...)``: one in-process connection."""
        to_server_send, to_server_receive = trio.open_memory_channel[dict[str, Any]](1000)
        to_worker_send, to_worker_receive = trio.open_memory_channel[tuple[Any, ...]](1000)
        server_end = _ServerEnd(to_server_receive, to_worker_send)
        self.nursery.start_soon(SubscriptionHandler(self.state, server_end).run)  # type: ignore[arg-type]
        with trio.CancelScope() as cut:
            self._cuts.append(cut)
            try:
                yield _WorkerEnd(to_server_send, to_worker_receive)
            finally:
                # The socket is gone: the server sees a disconnect.
                to_server_send.close()
                to_worker_receive.close()

    def cut_connections(self) -> None:
        """Drop every worker connection without a goodbye (network loss, kill -9)."""
        for cut in self._cuts:
            cut.cancel()
        self._cuts.clear()
