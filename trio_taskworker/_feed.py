"""What a client knows of its feed on the server: the runs it submitted and
has not asked the feed to watch yet, the runs the feed watches, and the ends
it has heard that nobody has taken yet.

The server side is ``_server/_feeds``. When a caller awaits the result of a
run this client submitted, the client asks its feed to watch that run and the
next ones it submitted (a caller that awaits one result usually awaits the
next); one waiting caller at a time long-polls the feed for the runs that
ended, and every caller takes its own run's end from here. This module does
no I/O (the client's methods send the requests), so its bookkeeping is tested
alone.
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from typing import Final

import attrs
import trio

from ._models import MAX_WATCH_IDS, FeedPage, FeedWatched, TaskRun

__all__ = ["HEAVY", "MAX_HELD", "MAX_UNWATCHED", "FeedState", "Heavy"]

#: The most ended runs a client keeps for callers that have not asked yet; past
#: it the oldest are forgotten, and a caller asking for one asks the server.
MAX_HELD = 10_000
#: The most submitted runs a client remembers as not watched yet; past it the
#: oldest are forgotten, and their results are waited for one by one.
MAX_UNWATCHED = 50_000


class Heavy:
    """An end the feed named without the run (its result was too large to carry)."""


#: The end of a run whose snapshot is to be read from the server.
HEAVY: Final = Heavy()


@attrs.define(eq=False)
class FeedState:
    """One client's side of its feed (see the module's docstring)."""

    #: The feed's id on the server, chosen here.
    feed_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    #: The feed's epoch on the server, once it has said (see FeedWatched).
    epoch: int | None = None
    #: Runs this client submitted that the feed has not been asked to watch, oldest
    #: first (ordered dicts: forgetting the oldest costs the same however many went).
    unwatched: OrderedDict[uuid.UUID, None] = attrs.field(factory=OrderedDict)
    #: Runs named by the watch request in flight.
    asking: dict[uuid.UUID, None] = attrs.field(factory=dict)
    #: Runs the server's feed watches, whose end has not been heard yet.
    covered: dict[uuid.UUID, None] = attrs.field(factory=dict)
    #: Ends heard and not taken yet, oldest first.
    ended: OrderedDict[uuid.UUID, TaskRun | Heavy] = attrs.field(factory=OrderedDict)
    #: What the next poll acknowledges (0: nothing yet).
    cursor: int = 0
    #: Counts the times the feed was lost, so that an answer to a request sent
    #: before is dropped.
    generation: int = 0
    #: A caller is polling the feed now; the others wait for :attr:`changed`.
    polling: bool = False
    #: Set when something here changed: an end heard, the feed lost, a request over.
    changed: trio.Event = attrs.field(factory=trio.Event)

    def submitted(self, ids: list[uuid.UUID]) -> None:
        """This client created runs ``ids``."""
        self.unwatched.update(dict.fromkeys(ids))
        while len(self.unwatched) > MAX_UNWATCHED:
            self.unwatched.popitem(last=False)

    def to_watch(self, run_id: uuid.UUID) -> list[uuid.UUID]:
        """``run_id`` and the oldest others submitted and not watched yet (at most
        :data:`~._models.MAX_WATCH_IDS`): what one watch request names. They
        are :attr:`asking` until its answer."""
        self.unwatched.pop(run_id, None)
        ids = [run_id, *itertools.islice(self.unwatched, MAX_WATCH_IDS - 1)]
        for other in ids[1:]:
            del self.unwatched[other]
        self.asking = dict.fromkeys(ids)
        return ids

    @property
    def watching(self) -> bool:
        """A caller is asking the feed to watch runs now (:attr:`asking`)."""
        return bool(self.asking)

    def not_asked(self) -> None:
        """The watch request got no answer: its runs are to be asked for again."""
        self.submitted(list(self.asking))
        self.asking = {}
        self.wake()

    def refused(self) -> None:
        """The feed watches none of the runs asked for: they are waited for one by one."""
        self.asking = {}
        self.wake()

    def watched(self, ids: list[uuid.UUID], answer: FeedWatched) -> None:
        """The feed watches ``ids`` (but those it refused): ``answer`` came back."""
        self.asking = {}
        if answer.epoch != self.epoch:
            if self.epoch is not None:
                # A feed made anew: the server lost the one we knew (a restart,
                # another replica, idle too long), and with it what it watched.
                self.lost()
            self.epoch = answer.epoch
        refused = set(answer.refused)
        self.covered.update(
            (run_id, None) for run_id in ids if run_id not in refused and run_id not in self.ended
        )
        self.wake()

    def lost(self) -> None:
        """The server knows the feed no more: what it watched is waited for one by one."""
        self.covered.clear()
        self.cursor = 0
        self.epoch = None
        self.generation += 1
        self.wake()

    def heard(self, page: FeedPage) -> None:
        """A page of the feed arrived."""
        ends: list[tuple[uuid.UUID, TaskRun | Heavy]] = [(run.id, run) for run in page.runs]
        ends += [(run_id, HEAVY) for run_id in page.heavy]
        for run_id, end in ends:
            # A run named by the watch request in flight can end before its
            # answer arrives (an end it found is in the feed at once).
            if run_id in self.covered or run_id in self.asking:
                self.covered.pop(run_id, None)
                self.ended[run_id] = end
        self.cursor = page.cursor
        while len(self.ended) > MAX_HELD:
            self.ended.popitem(last=False)
        self.wake()

    def take(self, run_id: uuid.UUID) -> TaskRun | Heavy | None:
        """The end heard for ``run_id`` (it is forgotten here), or None."""
        return self.ended.pop(run_id, None)

    def wake(self) -> None:
        """Tell the callers waiting here to look again."""
        self.changed.set()
        self.changed = trio.Event()
