"""What the server pushes to watchers: runs created or changed, workers coming and going.

:class:`Events` fans each event out to every open stream (``GET /events``,
read by the dashboard). A stream holds at most :data:`MAX_PENDING` events; a
reader that falls further behind gets one ``reset`` instead of the events it
missed, and refetches what it shows. Nothing is kept for a stream that is not
open, and publishing costs nothing while no stream is open, so the hot path of
a server nobody watches is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import attrs
import trio

from .._models import TaskRun
from .._serialization import to_json

__all__ = ["MAX_EVENT_ERROR", "MAX_PENDING", "MAX_STREAMS", "Event", "EventStream", "Events"]

#: The most events one stream holds for its reader before it is reset.
MAX_PENDING = 1000
#: The most streams open at once; ``GET /events`` answers 503 past it.
MAX_STREAMS = 100
#: The longest error message an event carries (the run itself has it whole).
MAX_EVENT_ERROR = 1000


@attrs.frozen
class Event:
    """One server-sent event: its name and its JSON data."""

    name: str
    data: str

    def encode(self) -> bytes:
        """The event in the ``text/event-stream`` framing (the data is one line of JSON)."""
        return f"event: {self.name}\ndata: {self.data}\n\n".encode()


RESET = Event("reset", "{}")


@attrs.define(eq=False)
class EventStream:
    """The events waiting for one reader."""

    _pending: list[Event] = attrs.field(factory=list)
    _ready: trio.Event = attrs.field(factory=trio.Event)
    #: Set when the server stops: :meth:`take` returns at once, empty.
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    def put(self, event: Event) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._pending = [RESET]
        else:
            self._pending.append(event)
        self._ready.set()

    async def take(self) -> list[Event]:
        """Wait for events and take them all, oldest first (once closed, it
        returns at once with what was left)."""
        await self._ready.wait()
        events, self._pending = self._pending, []
        self._ready = trio.Event()
        return events


@attrs.define(eq=False)
class Events:
    """The open streams, and what is published to them."""

    _streams: set[EventStream] = attrs.field(factory=set)
    _closed: bool = False

    @property
    def full(self) -> bool:
        """True when :data:`MAX_STREAMS` streams are open."""
        return len(self._streams) >= MAX_STREAMS

    @property
    def watched(self) -> bool:
        """True while at least one stream is open."""
        return bool(self._streams)

    @contextlib.contextmanager
    def open_stream(self) -> Iterator[EventStream]:
        """A stream that receives every event published while the block runs."""
        stream = EventStream()
        if self._closed:
            stream.close()
        self._streams.add(stream)
        try:
            yield stream
        finally:
            self._streams.discard(stream)

    def close(self) -> None:
        """The server is stopping: every open stream ends."""
        self._closed = True
        for stream in self._streams:
            stream.close()

    def _publish(self, event: Event) -> None:
        for stream in self._streams:
            stream.put(event)

    def runs(self, runs: Sequence[TaskRun]) -> None:
        """Runs were created or changed: each is sent as it is now, without
        payloads or previews, and with at most :data:`MAX_EVENT_ERROR` characters
        of its error's message and none of its traceback (a reader that wants
        them reads the run). More runs than a stream holds make one ``reset``."""
        if not self._streams:
            return
        if len(runs) > MAX_PENDING:
            self._publish(RESET)
            return
        for run in runs:
            error = run.error
            if error is not None:
                error = attrs.evolve(error, message=error.message[:MAX_EVENT_ERROR], traceback="")
            light = attrs.evolve(
                run,
                parameters=None,
                result=None,
                parameters_preview=None,
                result_preview=None,
                error=error,
            )
            self._publish(Event("run", to_json(light).decode()))

    def runs_reset(self) -> None:
        """Too many runs changed at once to send each: readers refetch."""
        self._publish(RESET)

    def workers(self, connected: int) -> None:
        """A worker connected or disconnected; ``connected`` are connected now."""
        if self._streams:
            self._publish(Event("workers", f'{{"connected": {connected}}}'))
