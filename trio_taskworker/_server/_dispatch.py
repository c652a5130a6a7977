"""Event-driven dispatch of runs to subscribed worker connections, and run waiters.

The dispatcher sleeps until something can change who gets what: runs were
created or requeued, a worker granted credits, or a scheduled run came due.
It then leases runs to each connection with credits, in rotating order, and
never more runs than the connection has credits for.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

import attrs
import trio

from .._models import Deliver, ServerMessage, TaskRun
from ._store import Store, StoreUnavailable

__all__ = ["Dispatcher", "Subscriber", "Waiters", "Watch"]

log = logging.getLogger(__name__)

#: How long the dispatcher waits before trying a store that refused an operation.
STORE_RETRY_SECONDS = 1.0
#: The most credits a connection may hold; a worker asking for more is refused.
MAX_CREDITS = 100_000
#: A connection with runs out (fewer credits than the most it has held) that was
#: leased runs less than this long ago is leased again this long after that:
#: the credits its runs hand back meanwhile are leased together, in one claim
#: and one delivery, instead of a few at a time. A connection with all its
#: credits (an idle worker) is leased at once.
CLAIM_INTERVAL = 0.002


@attrs.define(eq=False)
class Subscriber:
    """One worker connection as the dispatcher sees it.

    ``limit`` is the credits it subscribed with; ``connected_at`` and
    ``last_seen`` (updated on every frame it sends) are server clock times.
    """

    id: str
    keys: tuple[str, ...]
    client_id: str
    credits: int = 0
    draining: bool = False
    closed: bool = False
    limit: int = 0
    connected_at: float = 0.0
    last_seen: float = 0.0
    #: When runs were last leased to it (trio's clock).
    last_claim: float = -math.inf
    #: The most credits it has held: its worker's window as far as seen (after a
    #: reconnect with runs in flight, ``limit`` is less). Fewer means runs are out.
    window: int = 0
    _outbox: list[ServerMessage] = attrs.field(factory=list)
    _has_mail: trio.Event = attrs.field(factory=trio.Event)

    def post(self, message: ServerMessage) -> None:
        """Queue a message for this connection's sender.

        The outbox needs no bound of its own: deliveries are bounded by the
        connection's credits, and the other messages answer its own reports.
        """
        self._outbox.append(message)
        self._has_mail.set()

    async def next_messages(self) -> list[ServerMessage]:
        """Wait for queued messages and take them all."""
        await self._has_mail.wait()
        messages, self._outbox = self._outbox, []
        self._has_mail = trio.Event()
        return messages


@attrs.define(eq=False)
class Dispatcher:
    """Leases due runs to subscribers with credits. Run it with ``nursery.start``."""

    store: Store
    now: Callable[[], float]
    _subscribers: dict[str, Subscriber] = attrs.field(init=False, factory=dict)
    _wakeup: trio.Event = attrs.field(init=False, factory=trio.Event)
    _rotation: int = attrs.field(init=False, default=0)
    #: Called with the runs each claim leased (now PENDING), for watchers.
    on_claimed: Callable[[Sequence[TaskRun]], None] | None = None

    def wake(self) -> None:
        """Something changed (runs queued, credits granted): look again."""
        self._wakeup.set()

    def add(self, keys: Iterable[str], client_id: str, credits: int) -> Subscriber:
        """Register a new connection; it starts with ``credits``."""
        now = self.now()
        sub = Subscriber(
            id=uuid.uuid4().hex,
            keys=tuple(dict.fromkeys(keys)),
            client_id=client_id,
            limit=credits,
            connected_at=now,
            last_seen=now,
        )
        sub.credits = sub.window = credits
        self._subscribers[sub.id] = sub
        self.wake()
        return sub

    def remove(self, sub: Subscriber) -> None:
        """Forget a connection. Its leases are released by the caller, in the store."""
        sub.closed = True
        self._subscribers.pop(sub.id, None)

    def grant(self, sub: Subscriber, n: int) -> None:
        """Add ``n`` credits to a connection."""
        if not sub.draining:
            sub.credits += n
            sub.window = max(sub.window, sub.credits)
            self.wake()

    def drain(self, sub: Subscriber) -> None:
        """The worker is stopping: no more runs for it."""
        sub.draining = True
        sub.credits = 0

    def subscriber(self, connection_id: str) -> Subscriber | None:
        """The live connection with this id, if any."""
        return self._subscribers.get(connection_id)

    @property
    def subscribers(self) -> list[Subscriber]:
        return list(self._subscribers.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dispatch until cancelled. ``task_status.started()`` right away."""
        task_status.started()
        while True:
            # A fresh event before looking: a wake() during the pass is not lost.
            self._wakeup = trio.Event()
            try:
                paced, short = await self._dispatch_once()
                # Only a claim that found fewer due runs than it asked for can
                # leave runs scheduled for later: when is the next one due? (A
                # connection granted credits during a pass has woken the next.)
                keys = sorted({k for s in short if s.credits > 0 for k in s.keys})
                due = await self.store.next_due(keys) if keys else None
            except StoreUnavailable as exc:
                # A full disk or a damaged page must not stop the server: try again soon.
                log.warning("dispatch paused: %s; retrying in %g s", exc, STORE_RETRY_SECONDS)
                await trio.sleep(STORE_RETRY_SECONDS)
                continue
            except Exception:
                # A bug must not take the whole server down with the dispatcher either.
                log.exception("dispatch failed; retrying in %g s", STORE_RETRY_SECONDS)
                await trio.sleep(STORE_RETRY_SECONDS)
                continue
            deadline = min(
                (s.last_claim + CLAIM_INTERVAL for s in paced),
                default=math.inf,
            )
            if due is not None:
                deadline = min(deadline, trio.current_time() + max(0.0, due - self.now()))
            with trio.move_on_at(deadline):
                await self._wakeup.wait()

    async def _dispatch_once(self) -> tuple[list[Subscriber], list[Subscriber]]:
        """Lease runs to each connection with credits; return those made to wait
        (see :data:`CLAIM_INTERVAL`) and those leased fewer runs than they asked for."""
        paced: list[Subscriber] = []
        short: list[Subscriber] = []
        subs = [s for s in self._subscribers.values() if s.credits > 0]
        if not subs:
            return paced, short
        self._rotation = (self._rotation + 1) % len(subs)
        for sub in subs[self._rotation :] + subs[: self._rotation]:
            if sub.closed or sub.credits <= 0:
                continue
            if sub.credits < sub.window and trio.current_time() < sub.last_claim + CLAIM_INTERVAL:
                paced.append(sub)
                continue
            asked = sub.credits
            runs = await self.store.claim_runs(sub.keys, asked, sub.id, self.now())
            if len(runs) < asked:
                short.append(sub)
            if not runs:
                continue
            sub.last_claim = trio.current_time()
            if sub.closed:
                # It went away while we claimed: its release may have run first.
                await self.store.release_owner(sub.id, self.now())
                self.wake()
                continue
            sub.credits -= len(runs)
            log.debug("leased %d runs to connection %s", len(runs), sub.id)
            if self.on_claimed is not None:
                self.on_claimed(runs)
            sub.post(Deliver(runs=tuple(runs)))
        return paced, short


@attrs.define(eq=False)
class Watch:
    """What one waiting request has seen: the runs that ended, and an event."""

    event: trio.Event = attrs.field(factory=trio.Event)
    ended: dict[uuid.UUID, TaskRun] = attrs.field(factory=dict)

    def take(self) -> dict[uuid.UUID, TaskRun]:
        """The runs that ended since the last call, and a fresh event for the next."""
        taken, self.ended = self.ended, {}
        self.event = trio.Event()
        return taken

    def heard(self, run: TaskRun) -> None:
        """A run this watch waits on has ended (``run`` is its snapshot)."""
        self.ended[run.id] = run
        self.event.set()


@attrs.define(eq=False)
class Waiters:
    """Wakes the requests that wait for runs to end.

    A notification carries the ended run's snapshot, so a waiting request
    learns what it waits for without reading the store again.
    """

    _watches: dict[uuid.UUID, set[Watch]] = attrs.field(init=False, factory=dict)
    _stopping: bool = attrs.field(init=False, default=False)

    @contextlib.contextmanager
    def watch(self, ids: Iterable[uuid.UUID]) -> Iterator[Watch]:
        """A :class:`Watch` over ``ids``; its event is set as any of them ends."""
        watch = Watch()
        watched = list(dict.fromkeys(ids))
        self.add(watch, watched)
        try:
            yield watch
        finally:
            self.discard(watch, watched)

    def add(self, watch: Watch, ids: Iterable[uuid.UUID]) -> None:
        """Set ``watch``'s event as any of ``ids`` ends, until :meth:`discard`.

        For a watch that outlives one request (a feed); a request uses :meth:`watch`.
        """
        if self._stopping:
            watch.event.set()
        for run_id in ids:
            self._watches.setdefault(run_id, set()).add(watch)

    def discard(self, watch: Watch, ids: Iterable[uuid.UUID]) -> None:
        """``watch`` waits on ``ids`` no more."""
        for run_id in ids:
            watches = self._watches.get(run_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[run_id]

    @property
    def watched(self) -> int:
        """How many run ids some request is waiting on."""
        return len(self._watches)

    def watched_ids(self) -> list[uuid.UUID]:
        """The run ids some request is waiting on."""
        return list(self._watches)

    def watched_among(self, ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
        """Those of ``ids`` that some request is waiting on."""
        return [run_id for run_id in ids if run_id in self._watches]

    def notify(self, runs: Iterable[TaskRun]) -> None:
        """Hand the runs among these that have ended to whoever waits on them."""
        for run in runs:
            if run.state.is_terminal:
                watches = self._watches.get(run.id)
                if watches:
                    # A copy: a watch may stop watching the run as it hears of it.
                    for watch in tuple(watches):
                        watch.heard(run)

    def stop(self) -> None:
        """Release every waiter (the server is shutting down)."""
        self._stopping = True
        for watches in self._watches.values():
            for watch in watches:
                watch.event.set()
