"""Feeds: one stream per client of "these runs ended".

A client that awaits results names a feed (a UUID of its own) and asks it to
watch runs (``POST /feeds/{feed_id}/watch``): the server registers them with
the waiters first, then reads which have ended already, so no end slips
between the two. The client long-polls ``GET /feeds/{feed_id}?epoch=&after=``
and gets every watched run that has ended since, a page at a time, with small
results inline: awaiting many results one by one costs a request per page
instead of one per run.

A feed lives in the memory of one server process, and each is made with a
random ``epoch``. It is gone after a restart, on another replica, and once
nobody has polled it for :data:`FEED_IDLE_SECONDS`; a poll naming a feed or an
epoch the server does not have answers 404, and the client waits for those
runs one by one. Every limit here refuses to watch more runs (the client
falls back the same way); none drops an end a feed has heard.

An end is kept as the JSON of the run without its parameters, made when the
run ends; the bytes all feeds hold are bounded, and an end past the bound (or
too large on its own) is kept as the run's id alone (``heavy``).
"""

from __future__ import annotations

import collections
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
    "FEED_MAX_ENTRY_BYTES",
    "FEED_MAX_RUNS",
    "FEED_PAGE_RUNS",
    "MAX_FEEDS",
    "MAX_FEEDS_PER_OWNER",
    "MAX_FEED_BYTES",
    "MAX_FEED_RUNS_TOTAL",
    "Feed",
    "Feeds",
    "feed_id",
]

#: The most runs one feed watches or holds ended, not yet acknowledged, at once.
FEED_MAX_RUNS = 10_000
#: The most runs all feeds together watch or hold. On PostgreSQL each replica
#: looks at the runs watched here every poll (the fallback for a lost notification).
MAX_FEED_RUNS_TOTAL = 100_000
#: The most feeds a server keeps; past it, a new feed is refused.
MAX_FEEDS = 1_000
#: The most feeds one API key (one ``Authorization`` header) may have at once.
MAX_FEEDS_PER_OWNER = 100
#: A feed nobody has polled for this long is dropped (with what it watched).
FEED_IDLE_SECONDS = 300.0
#: The most runs one poll answers with; the rest wait for the next poll.
FEED_PAGE_RUNS = 1_000
#: An ended run whose JSON is longer than this is sent as ``heavy`` (its id only).
FEED_MAX_ENTRY_BYTES = 4 * 1024
#: The most bytes of ended runs all feeds hold; past it, ends are kept as ``heavy``.
MAX_FEED_BYTES = 64 * 1024 * 1024
#: How often, at most, idle feeds are looked for.
_SWEEP_SECONDS = 10.0
#: Epochs are below 2**53, so that any JSON reader holds them exactly.
_EPOCHS = 2**53


def feed_id(text: str) -> str:
    """The canonical form of a feed id; ``ValueError`` unless ``text`` is a UUID."""
    if len(text) > 36:
        raise ValueError("a feed id is a UUID")
    return str(uuid.UUID(text))


@attrs.define(eq=False)
class _FeedWatch(Watch):
    """The waiters' handle on a feed: an end goes into the feed's log at once."""

    feed: Feed | None = None
    feeds: Feeds | None = None

    def heard(self, run: TaskRun) -> None:
        assert self.feed is not None and self.feeds is not None
        self.feeds.heard(self.feed, [run])


@attrs.define(eq=False)
class Feed:
    """One client's feed: the runs it watches and the ends not yet acknowledged."""

    id: str
    #: Whose feed it is: a digest of the ``Authorization`` header that made it.
    owner: str
    touched: float
    #: Names this feed among the feeds made under the same id (before a restart).
    epoch: int = attrs.field(factory=lambda: random.randrange(1, _EPOCHS))
    #: Watched runs whose end the feed has not heard yet (registered with the waiters).
    pending: set[uuid.UUID] = attrs.field(factory=set)
    #: Ended runs not yet acknowledged: (sequence number, id, JSON or None for heavy).
    log: deque[tuple[int, uuid.UUID, bytes | None]] = attrs.field(factory=deque)
    #: The sequence number of the last end put in the log.
    seq: int = 0
    #: Polls in flight; a feed being polled is never idle.
    polls: int = 0
    #: Set, and replaced, as ends arrive.
    arrived: trio.Event = attrs.field(factory=trio.Event)
    watch: _FeedWatch = attrs.field(factory=_FeedWatch)

    @property
    def size(self) -> int:
        return len(self.pending) + len(self.log)


@attrs.define(eq=False)
class Feeds:
    """The server's feeds, and what they may hold."""

    waiters: Waiters
    clock: Callable[[], float]
    _feeds: dict[str, Feed] = attrs.field(init=False, factory=dict)
    #: Feeds per owner.
    _owned: collections.Counter[str] = attrs.field(init=False, factory=collections.Counter)
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

    @property
    def held_bytes(self) -> int:
        """Bytes of ended runs held by all feeds together."""
        return self._bytes

    def get(self, feed_id: str, owner: str, epoch: int) -> Feed | None:
        """The feed ``feed_id`` of ``owner`` made at ``epoch``, if this server has it."""
        feed = self._feeds.get(feed_id)
        if feed is None or feed.owner != owner or feed.epoch != epoch:
            return None
        return feed

    def open(self, feed_id: str, owner: str) -> Feed | None:
        """The feed ``feed_id`` of ``owner``, made now if there is none; None
        when the server keeps :data:`MAX_FEEDS` feeds already, the owner
        :data:`MAX_FEEDS_PER_OWNER`, or another owner has one under that id."""
        now = self.clock()
        self.sweep(now)
        feed = self._feeds.get(feed_id)
        if feed is not None:
            return feed if feed.owner == owner else None
        if len(self._feeds) >= MAX_FEEDS or self._owned[owner] >= MAX_FEEDS_PER_OWNER:
            return None
        feed = self._feeds[feed_id] = Feed(feed_id, owner, touched=now)
        self._owned[owner] += 1
        feed.watch.feed, feed.watch.feeds = feed, self
        return feed

    def watch(self, feed: Feed, ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """Watch ``ids`` for ``feed``; returns those it watches now that it did
        not before. Raises ``OverflowError``, watching none, when that would
        pass a limit."""
        new = [run_id for run_id in dict.fromkeys(ids) if run_id not in feed.pending]
        if feed.size + len(new) > FEED_MAX_RUNS or self._runs + len(new) > MAX_FEED_RUNS_TOTAL:
            raise OverflowError(f"a feed watches at most {FEED_MAX_RUNS} runs at a time")
        feed.pending.update(new)
        self._runs += len(new)
        self.waiters.add(feed.watch, new)
        return new

    def unwatch(self, feed: Feed, ids: Iterable[uuid.UUID]) -> None:
        """Stop watching ``ids`` for ``feed`` (runs that do not exist)."""
        gone = [run_id for run_id in ids if run_id in feed.pending]
        feed.pending.difference_update(gone)
        self._runs -= len(gone)
        self.waiters.discard(feed.watch, gone)

    def heard(self, feed: Feed, runs: Iterable[TaskRun]) -> None:
        """These runs ended: the ones ``feed`` watches go into its log."""
        ended = []
        for run in runs:
            if run.id in feed.pending and run.state.is_terminal:
                feed.pending.discard(run.id)
                feed.seq += 1
                feed.log.append((feed.seq, run.id, self._entry(run)))
                ended.append(run.id)
        if ended:
            self.waiters.discard(feed.watch, ended)
            feed.arrived.set()
            feed.arrived = trio.Event()

    async def poll(self, feed: Feed, after: int, timeout: float) -> bytes:
        """A :class:`~.._models.FeedPage` as JSON: the ends after ``after``,
        waiting up to ``timeout`` seconds for one when there are none yet.

        ``after`` acknowledges the ends up to it (the feed forgets them); 0
        acknowledges none. Raises ``ValueError`` for a cursor this feed never gave.
        """
        if not 0 <= after <= feed.seq:
            raise ValueError(f"this feed never gave cursor {after}")
        self._acknowledge(feed, after)
        feed.polls += 1
        try:
            self.sweep(self.clock())
            with trio.move_on_after(timeout):
                while not feed.log and not self._stopping:
                    await feed.arrived.wait()
        finally:
            feed.polls -= 1
            feed.touched = self.clock()
        return self._page(feed, after)

    def stop(self) -> None:
        """The server is stopping: polls answer at once with what they have."""
        self._stopping = True
        for feed in self._feeds.values():
            feed.arrived.set()

    def _entry(self, run: TaskRun) -> bytes | None:
        # What result() needs: the caller has the parameters already.
        data = to_json(run, parameters=None, parameters_preview=None)
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
        cursor = after
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

    def sweep(self, now: float) -> None:
        """Drop the feeds nobody has polled for :data:`FEED_IDLE_SECONDS`."""
        if now - self._swept_at < _SWEEP_SECONDS:
            return
        self._swept_at = now
        for feed in [f for f in self._feeds.values() if f.polls == 0]:
            if now - feed.touched > FEED_IDLE_SECONDS:
                self._drop(feed)

    def _drop(self, feed: Feed) -> None:
        del self._feeds[feed.id]
        self._owned[feed.owner] -= 1
        if not self._owned[feed.owner]:
            del self._owned[feed.owner]
        self.waiters.discard(feed.watch, feed.pending)
        self._runs -= len(feed.pending)
        feed.pending.clear()
        self._acknowledge(feed, feed.seq)
