"""What a client knows of its feed on the server: which of its runs the feed
watches, and which ends it has heard and nobody has taken yet.

The server side is ``_server/_feeds``. A client submits runs naming its feed;
one waiting caller at a time long-polls the feed for the runs that ended, and
every caller takes its own run's end from here. This module does no I/O (the
client's methods send the requests), so its bookkeeping is tested alone.
"""

from __future__ import annotations

import uuid
from typing import Final

import attrs
import trio

from ._models import FeedPage, TaskRun

__all__ = ["HEAVY", "FeedState", "Heavy"]

#: The most ended runs a client keeps for callers that have not asked yet; past
#: it the oldest are forgotten, and a caller asking for one asks the server.
MAX_HELD = 10_000


class Heavy:
    """An end the feed named without the run (its result was too large to carry)."""


#: The end of a run whose snapshot is to be read from the server.
HEAVY: Final = Heavy()


@attrs.define(eq=False)
class FeedState:
    """One client's side of its feed (see the module's docstring)."""

    #: The feed's id on the server, chosen here.
    feed_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    #: Runs the server's feed watches, whose end has not been heard yet.
    covered: dict[uuid.UUID, None] = attrs.field(factory=dict)
    #: Ends heard and not taken yet, oldest first.
    ended: dict[uuid.UUID, TaskRun | Heavy] = attrs.field(factory=dict)
    #: What the next poll acknowledges (0: nothing yet).
    cursor: int = 0
    #: Counts the times the feed was lost, so that a page asked for before is dropped.
    generation: int = 0
    #: A caller is polling the feed now; the others wait for :attr:`changed`.
    polling: bool = False
    #: Set when something here changed: an end heard, the feed lost, a poll over.
    changed: trio.Event = attrs.field(factory=trio.Event)

    def submitted(self, ids: list[uuid.UUID], answer: str | None) -> None:
        """``ids`` were created; ``answer`` is the server's ``Feed`` header."""
        if answer == "new":
            # A feed made just now: the server lost the one we knew (a restart,
            # another replica, idle too long), and with it what it watched.
            self.lost()
        elif answer != "watching":
            return
        self.covered.update(dict.fromkeys(ids))

    def lost(self) -> None:
        """The server knows the feed no more: what it watched is waited for one by one."""
        self.covered.clear()
        self.cursor = 0
        self.generation += 1
        self.wake()

    def heard(self, page: FeedPage) -> None:
        """A page of the feed arrived."""
        ends: list[tuple[uuid.UUID, TaskRun | Heavy]] = [(run.id, run) for run in page.runs]
        ends += [(run_id, HEAVY) for run_id in page.heavy]
        for run_id, end in ends:
            if run_id in self.covered:
                del self.covered[run_id]
                self.ended[run_id] = end
        self.cursor = page.cursor
        while len(self.ended) > MAX_HELD:
            del self.ended[next(iter(self.ended))]
        self.wake()

    def take(self, run_id: uuid.UUID) -> TaskRun | Heavy | None:
        """The end heard for ``run_id`` (it is forgotten here), or None."""
        return self.ended.pop(run_id, None)

    def wake(self) -> None:
        """Tell the callers waiting here to look again."""
        self.changed.set()
        self.changed = trio.Event()
