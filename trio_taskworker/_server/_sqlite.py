"""The embedded SQLite backend: one connection, one writer task, group commit.

Every operation is queued to a single writer task. It takes all the
operations waiting at that moment and runs them in one transaction, each
inside its own savepoint so that one refused operation does not undo the
others, then commits once and wakes their callers. While a batch commits,
the next one gathers. This is what lets the server take thousands of small
changes a second (see STACK-NOTES: one writer with group commit beats a
transaction per change about tenfold).

The database runs in WAL mode with ``synchronous=NORMAL``: a committed
transaction survives the server process being killed; only a power loss
can take the last few.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import outcome
import trio

from .._models import TaskRun, TaskRunCreate
from .._states import TaskRunState
from ._store import Outcome, Report, SQLRuns, Store, StoreError

__all__ = ["SQLiteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The most operations one transaction takes; the rest wait for the next.
MAX_BATCH = 512


@attrs.define(eq=False)
class _Op:
    fn: Callable[[sqlite3.Cursor], Any]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: outcome.Outcome[Any] | None = None


@attrs.define(eq=False)
class SQLiteStore(Store):
    """A :class:`Store` in one SQLite file (``":memory:"`` for tests).

    Start it with ``await nursery.start(store.run)``; it is ready (schema
    created) when that returns. ``threaded=True`` runs each batch in a worker
    thread, so the event loop never waits on SQLite; ``threaded=False`` runs
    it on the trio thread, which avoids a thread hop per batch and keeps tests
    on trio's autojump clock deterministic.
    """

    path: str | Path
    default_max_redeliveries: int = 3
    threaded: bool = True
    _sql: SQLRuns = attrs.field(init=False)
    _send: trio.MemorySendChannel[_Op] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[_Op] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._sql = SQLRuns(
            placeholder="?", default_max_redeliveries=self.default_max_redeliveries
        )
        self._send, self._receive = trio.open_memory_channel[_Op](4 * MAX_BATCH)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        self._sql.init_schema(cur)
        cur.execute("COMMIT")
        return conn

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer until cancelled; ``task_status.started()`` once the schema exists.

        On the way out it closes the database connection, and every operation
        still queued or in the batch at hand fails with :class:`StoreError`.
        """
        conn = await self._call_sync(self._connect)
        batch: list[_Op] = []
        try:
            task_status.started()
            while True:
                batch = [await self._receive.receive()]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._call_sync(partial(self._execute, conn, batch))
                for op in batch:
                    op.done.set()
                batch = []
        finally:
            closed = outcome.Error(StoreError("the store is closed"))
            while True:
                try:
                    batch.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            # No checkpoint since the drain: nothing can slip in before this close.
            self._receive.close()
            for op in batch:
                if op.result is None:
                    op.result = closed
                op.done.set()
            conn.close()

    async def _call_sync(self, fn: Callable[[], T]) -> T:
        if self.threaded:
            return await trio.to_thread.run_sync(fn)
        return fn()

    @staticmethod
    def _execute(conn: sqlite3.Connection, batch: list[_Op]) -> None:
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            for op in batch:
                cur.execute("SAVEPOINT op")
                op.result = outcome.capture(op.fn, cur)
                if isinstance(op.result, outcome.Error):
                    cur.execute("ROLLBACK TO op")
                cur.execute("RELEASE op")
            cur.execute("COMMIT")
        except sqlite3.Error as exc:
            log.exception("SQLite transaction failed; %d operations refused", len(batch))
            if conn.in_transaction:
                conn.rollback()
            for op in batch:
                op.result = outcome.Error(exc)

    async def _call(self, fn: Callable[[sqlite3.Cursor], T]) -> T:
        op = _Op(fn)
        try:
            await self._send.send(op)
        except trio.BrokenResourceError:
            raise StoreError("the store is closed") from None
        # Shielded: once queued, the operation will run, and its caller must
        # not be told it failed when it in fact committed.
        with trio.CancelScope(shield=True):
            await op.done.wait()
        assert op.result is not None
        value: T = op.result.unwrap()
        return value

    # --- Store ----------------------------------------------------------------------

    async def create_runs(self, creates: Sequence[TaskRunCreate], now: float) -> list[uuid.UUID]:
        return await self._call(lambda cur: self._sql.create_runs(cur, creates, now))

    async def read_runs(self, ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        return await self._call(lambda cur: self._sql.read_runs(cur, ids))

    async def list_runs(
        self, state: TaskRunState | None, task_key: str | None, limit: int, offset: int
    ) -> list[TaskRun]:
        return await self._call(
            lambda cur: self._sql.list_runs(cur, state, task_key, limit, offset)
        )

    async def claim_runs(
        self, keys: Sequence[str], n: int, owner: str, now: float
    ) -> list[TaskRun]:
        return await self._call(lambda cur: self._sql.claim_runs(cur, keys, n, owner, now))

    async def next_due(self, keys: Sequence[str]) -> float | None:
        return await self._call(lambda cur: self._sql.next_due(cur, keys))

    async def apply_reports(self, owner: str, reports: Sequence[Report], now: float) -> Outcome:
        return await self._call(lambda cur: self._sql.apply_reports(cur, owner, reports, now))

    async def release_owner(self, owner: str, now: float) -> Outcome:
        return await self._call(lambda cur: self._sql.release_owner(cur, owner, now))

    async def release_all(self, now: float) -> Outcome:
        return await self._call(lambda cur: self._sql.release_all(cur, now))

    async def put_blob(self, data: bytes, now: float) -> str:
        return await self._call(lambda cur: self._sql.put_blob(cur, data, now))

    async def get_blob(self, ref: str) -> bytes | None:
        return await self._call(lambda cur: self._sql.get_blob(cur, ref))

    async def counts(self) -> dict[str, int]:
        return await self._call(self._sql.counts)

    async def cancel_run(self, run_id: uuid.UUID, now: float) -> tuple[TaskRun, str | None]:
        return await self._call(lambda cur: self._sql.cancel_run(cur, run_id, now))
