"""Feeds: one stream per client of "these runs ended".

A client names a feed (a UUID of its own) when it submits runs
(``POST /runs?feed=...``); the server watches those runs for it from before
they exist, so no end can slip past. The client then long-polls
``GET /feeds/{feed_id}?after=CURSOR`` and gets every watched run that has
ended since, a page at a time, with small results inline: awaiting many
results costs one request per page instead of one per run.

A feed lives in the memory of one server process. It is gone after a restart,
on another replica, and once nobody has polled it for :data:`FEED_IDLE_SECONDS`;
the poll then answers 404 and the client waits for those runs one by one, as
it does for runs no feed watches. Every limit here refuses to watch more (the
client falls back the same way); none drops an end a feed has heard.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import attrs
import trio

from .._models import TaskRun
from .._serialization import to_json
from ._dispatch import Waiters, Watch

__all__ = [
    "FEED_IDLE_SECONDS",
    "FEED_MAX_RUNS",
    "FEED_PAGE_RUNS",
    "MAX_FEEDS",
    "Feed",
    "Feeds",
    "feed_id",
]

#: The most runs one feed watches or holds ended, not yet acknowledged, at once.
FEED_MAX_RUNS = 10_000
#: The most runs all feeds together watch or hold.
MAX_FEED_RUNS_TOTAL = 200_000
#: The most feeds a server keeps; past it, runs are submitted but not watched.
MAX_FEEDS = 1_000
#: A feed nobody has polled for this long is dropped (with what it watched).
FEED_IDLE_SECONDS = 300.0
#: The most runs one poll answers with; the rest wait for the next poll.
FEED_PAGE_RUNS = 1_000
#: An ended run whose JSON is longer than this is sent as ``heavy`` (its id only).
FEED_MAX_ENTRY_BYTES = 8 * 1024
#: The most bytes of ended runs all feeds hold; past it, ends are sent as ``heavy``.
MAX_FEED_BYTES = 64 * 1024 * 1024
#: How often, at most, idle feeds are looked for.
_SWEEP_SECONDS = 10.0


def feed_id(text: str) -> str:
    """The canonical form of a feed id; ``ValueError`` unless ``text`` is a UUID."""
    if len(text) > 36:
        raise ValueError("a feed id is a UUID")
    return str(uuid.UUID(text))


@attrs.define(eq=False)
class Feed:
    """One client's feed: the runs it watches and the ends not yet acknowledged."""

    id: str
    touched: float
    #: Registered with the waiters for every id in ``pending``.
    watch: Watch = attrs.field(factory=Watch)
    #: Watched runs whose end the feed has not heard yet.
    pending: set[uuid.UUID] = attrs.field(factory=set)
    #: Ended runs not yet acknowledged: (sequence number, id, JSON or None for heavy).
    log: deque[tuple[int, uuid.UUID, bytes | None]] = attrs.field(factory=deque)
    #: Where this feed's sequence numbers start: a random number, so that a
    #: cursor given by an earlier feed of the same id (before a restart) is
    #: refused instead of acknowledging ends the client never saw.
    start: int = attrs.field(factory=lambda: random.randrange(1, 2**60))
    #: The sequence number of the last end put in the log.
    seq: int = attrs.field(default=attrs.Factory(lambda self: self.start, takes_self=True))
    #: Polls in flight; a feed being polled is never idle.
    polls: int = 0

    @property
    def size(self) -> int:
        return len(self.pending) + len(self.log)


@attrs.define(eq=False)
class Feeds:
    """The server's feeds, and what they may hold."""

    waiters: Waiters
    clock: Callable[[], float]
    _feeds: dict[str, Feed] = attrs.field(init=False, factory=dict)
    #: Runs watched or held by all feeds.
    _runs: int = attrs.field(init=False, default=0)
    #: Bytes of ended runs held by all feeds.
    _bytes: int = attrs.field(init=False, default=0)
    _swept_at: float = attrs.field(init=False, default=float("-inf"))
    _stopping: bool = attrs.field(init=False, default=False)

    def __len__(self) -> int:
        return len(self._feeds)

    @property
    def runs(self) -> int:
        """Runs watched or held, not yet acknowledged, by all feeds together."""
        return self._runs

    def get(self, feed_id: str) -> Feed | None:
        return self._feeds.get(feed_id)

    def open(self, feed_id: str) -> tuple[Feed, bool] | None:
        """The feed ``feed_id``, and whether it was made just now; None when the
        server keeps :data:`MAX_FEEDS` feeds already."""
        now = self.clock()
        self._sweep(now)
        feed = self._feeds.get(feed_id)
        if feed is not None:
            return feed, False
        if len(self._feeds) >= MAX_FEEDS:
            return None
        feed = self._feeds[feed_id] = Feed(feed_id, touched=now)
        if self._stopping:
            feed.watch.event.set()
        return feed, True

    def watch(self, feed: Feed, ids: Sequence[uuid.UUID]) -> bool:
        """Watch all of ``ids`` (runs that do not exist yet: nothing has ended)
        for ``feed``; False, watching none, when that would pass a limit."""
        new = [run_id for run_id in dict.fromkeys(ids) if run_id not in feed.pending]
        if feed.size + len(new) > FEED_MAX_RUNS or self._runs + len(new) > MAX_FEED_RUNS_TOTAL:
            return False
        feed.pending.update(new)
        self._runs += len(new)
        self.waiters.add(feed.watch, new)
        return True

    def unwatch(self, feed: Feed, ids: Iterable[uuid.UUID]) -> None:
        """Stop watching ``ids`` for ``feed`` (runs that were not created after all)."""
        gone = [run_id for run_id in ids if run_id in feed.pending]
        feed.pending.difference_update(gone)
        self._runs -= len(gone)
        self.waiters.discard(feed.watch, gone)

    async def poll(self, feed: Feed, after: int, timeout: float) -> bytes:
        """A :class:`~.._models.FeedPage` as JSON: the ends after ``after``,
        waiting up to ``timeout`` seconds for one when there are none yet.

        ``after`` acknowledges the ends up to it (the feed forgets them); 0
        acknowledges none. Raises ``ValueError`` for a cursor this feed never gave.
        """
        if after and not feed.start <= after <= feed.seq:
            raise ValueError(f"this feed never gave cursor {after}")
        self._acknowledge(feed, after)
        feed.polls += 1
        try:
            self._sweep(self.clock())
            with trio.move_on_after(timeout):
                while not self._collect(feed) and not self._stopping:
                    await feed.watch.event.wait()
            self._collect(feed)
        finally:
            feed.polls -= 1
            feed.touched = self.clock()
        return self._page(feed, after)

    def stop(self) -> None:
        """The server is stopping: polls answer at once with what they have."""
        self._stopping = True
        for feed in self._feeds.values():
            feed.watch.event.set()

    def _collect(self, feed: Feed) -> bool:
        """Move the ends the watch heard into the log; True if the log holds any."""
        ended = feed.watch.take()
        if ended:
            self.waiters.discard(feed.watch, ended)
            for run_id, run in ended.items():
                if run_id in feed.pending:
                    feed.pending.discard(run_id)
                    feed.seq += 1
                    feed.log.append((feed.seq, run_id, self._entry(run)))
        return bool(feed.log)

    def _entry(self, run: TaskRun) -> bytes | None:
        # What result() needs: the caller has the parameters already.
        data = to_json(attrs.evolve(run, parameters=None, parameters_preview=None))
        if len(data) > FEED_MAX_ENTRY_BYTES or self._bytes + len(data) > MAX_FEED_BYTES:
            return None
        self._bytes += len(data)
        return data

    def _acknowledge(self, feed: Feed, after: int) -> None:
        log = feed.log
        while log and log[0][0] <= after:
            _, _, data = log.popleft()
            self._runs -= 1
            if data is not None:
                self._bytes -= len(data)

    def _page(self, feed: Feed, after: int) -> bytes:
        runs: list[bytes] = []
        heavy: list[bytes] = []
        cursor = after or feed.start
        for seq, run_id, data in feed.log:
            if len(runs) + len(heavy) == FEED_PAGE_RUNS:
                break
            if data is None:
                heavy.append(b'"%s"' % str(run_id).encode())
            else:
                runs.append(data)
            cursor = seq
        return b'{"runs":[%s],"heavy":[%s],"cursor":%d}' % (
            b",".join(runs),
            b",".join(heavy),
            cursor,
        )

    def _sweep(self, now: float) -> None:
        """Drop the feeds nobody has polled for :data:`FEED_IDLE_SECONDS`."""
        if now - self._swept_at < _SWEEP_SECONDS:
            return
        self._swept_at = now
        for feed in [f for f in self._feeds.values() if f.polls == 0]:
            if now - feed.touched > FEED_IDLE_SECONDS:
                self._drop(feed)

    def _drop(self, feed: Feed) -> None:
        del self._feeds[feed.id]
        self.waiters.discard(feed.watch, feed.pending)
        self._runs -= len(feed.pending)
        feed.pending.clear()
        self._acknowledge(feed, feed.seq)
