"""Replicas: several servers on one PostgreSQL database.

Any replica serves any request and any worker. What one replica does that
the others must hear of goes over a :class:`Bus`: runs became due (their
dispatchers look), runs ended (their waiting requests answer), a run must be
cancelled (the replica holding its worker's connection tells it). The bus is a
hint, never the truth: every replica also polls (:class:`Replica`), so a lost
notification delays, and never loses, what it carried.

Each replica holds a lease, a row of ``replicas`` renewed by heartbeats. At
each renewal every replica tries to free the runs leased through replicas whose
lease has expired, as a lost connection frees them (see ``Store.rescue_runs``):
the one whose transaction gets the rescue lock does it, and fencing makes it
safe even if two did. The replica that holds the maintenance lock for its
session (:attr:`Bus.leader`) runs the retention sweep.

A single server on SQLite has the :class:`LocalBus`: nothing to tell, always
the leader, and no replica lease (its data directory lock already says that it
is alone, and it frees every lease at start).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import attrs
import trio

from .._models import DEFAULT_REPLICA_LEASE
from ._store import Outcome, Store, StoreError, StoreUnavailable

__all__ = ["DEFAULT_REPLICA_LEASE", "Bus", "Hearer", "LocalBus", "Replica"]

log = logging.getLogger(__name__)

#: How often a replica looks for what a lost notification would have told it.
DEFAULT_POLL_SECONDS = 1.0


class Hearer(Protocol):
    """What a replica does with what the others tell it (the app's state)."""

    def heard_due(self) -> None:
        """Runs became due through another replica."""

    async def heard_ended(self, ids: Sequence[uuid.UUID] | None) -> None:
        """These runs ended through another replica (None: some runs, unnamed)."""

    def heard_cancel(self, run_id: uuid.UUID, owner: str) -> None:
        """A caller cancelled a run leased to connection ``owner``, maybe ours."""


class Bus(Protocol):
    """How a replica tells the others what they must hear, as a hint."""

    @property
    def leader(self) -> bool:
        """True while this replica holds the maintenance lock."""

    def runs_due(self) -> None:
        """Runs were created or queued again."""

    def runs_ended(self, ids: Sequence[uuid.UUID]) -> None:
        """These runs ended."""

    def cancel(self, run_id: uuid.UUID, owner: str) -> None:
        """A run leased to connection ``owner`` of another replica must be cancelled."""


@attrs.define(eq=False)
class LocalBus:
    """The bus of a server alone on its database: nobody to tell."""

    leader: bool = True

    def runs_due(self) -> None:
        pass

    def runs_ended(self, ids: Sequence[uuid.UUID]) -> None:
        pass

    def cancel(self, run_id: uuid.UUID, owner: str) -> None:
        pass


@attrs.define(eq=False)
class Replica:
    """Keeps this replica's lease, rescues dead replicas' runs, and polls.

    Run it with ``nursery.start``: it has taken its lease when that returns.
    ``on_rescued`` gets each rescue's :class:`Outcome`; ``poll`` is called
    every ``poll_seconds`` (the fallback for lost notifications).
    """

    store: Store
    bus: Bus
    now: Callable[[], float]
    on_rescued: Callable[[Outcome], None]
    poll: Callable[[], Awaitable[None]]
    lease_seconds: float = DEFAULT_REPLICA_LEASE
    poll_seconds: float = DEFAULT_POLL_SECONDS
    _lease_lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _retired: bool = attrs.field(init=False, default=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled; ``task_status.started()`` once the lease is held."""
        await self.store.renew_replica(self.lease_seconds)
        log.info("replica %s holds its lease (%g s)", self.store.replica_id, self.lease_seconds)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_lease)
            nursery.start_soon(self._poll)

    async def _keep_lease(self) -> None:
        while True:
            await trio.sleep(self.lease_seconds / 3)
            try:
                async with self._lease_lock:
                    if self._retired:
                        return
                    renewed = await self.store.renew_replica(self.lease_seconds)
                if not renewed:
                    log.warning(
                        "replica %s had lost its lease (the others took it for dead and may"
                        " have freed its runs); it holds a new one",
                        self.store.replica_id,
                    )
                # Every replica, not only the leader: a leader that froze
                # (SIGSTOP, a hung loop) keeps its session, and its lock.
                await self.rescue()
            except (StoreError, StoreUnavailable) as exc:
                log.warning("replica lease not renewed: %s", exc)

    async def retire(self) -> None:
        """This replica stops: drop its lease, and renew it no more."""
        async with self._lease_lock:
            self._retired = True
            await self.store.retire_replica()

    async def rescue(self) -> Outcome:
        """Free the runs of dead replicas now; hand the outcome to ``on_rescued``."""
        outcome = await self.store.rescue_runs(self.now())
        if outcome.changed:
            log.warning(
                "freed %d runs leased through replicas that stopped renewing their lease",
                len(outcome.changed),
            )
            self.on_rescued(outcome)
        return outcome

    async def _poll(self) -> None:
        while True:
            await trio.sleep(self.poll_seconds)
            try:
                await self.poll()
            except (StoreError, StoreUnavailable) as exc:
                log.debug("replica poll skipped: %s", exc)
