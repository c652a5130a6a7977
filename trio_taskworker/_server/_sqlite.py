"""The embedded SQLite backend: one connection, one writer task, group commit.

Every transaction handed to :class:`SQLiteRunner` is queued to a single
writer task. It takes all the operations waiting at that moment and runs
them in one transaction, then commits once and wakes their callers. When an
operation fails, the batch is undone and run again with a savepoint around
each operation, so that one refused operation does not undo the others (a
savepoint per operation on every batch cost more than the rare retry). While
a batch commits, the next one gathers. This is what lets the server take
thousands of small changes a second (see STACK-NOTES: one writer with group
commit beats a transaction per change about tenfold).

The database runs in WAL mode with ``synchronous=NORMAL``: a committed
transaction survives the server process being killed; only a power loss
can take the last few.

The reads that may scan a large table (counts per state and per task, run
listings: what health checks, metrics scrapes and the dashboard ask for) go
to a second connection instead, one at a time, in a worker thread: with a
million runs queued such a read takes a few hundred milliseconds, and on the
writer it held up every write and the event loop for as long. The log can
start over after a checkpoint only when no read holds a snapshot of it, so
the writer checkpoints only between two reads: when one is due while a read
runs, new reads wait until the writer has made it, right after that read.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
import outcome
import trio

from .._exceptions import ConfigurationError
from ._store import SQLITE, Cursor, Dialect, Store, StoreError, StoreUnavailable

__all__ = ["SQLiteRunner", "SQLiteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The most operations one transaction takes; the rest wait for the next.
MAX_BATCH = 512


#: The write-ahead log is copied back into the database (checkpointed) by the
#: writer between two batches, in a worker thread, after this many batches,
#: this many rows changed, or once the log's file is past this many bytes,
#: whichever comes first. SQLite's own checkpoint ran inside whichever commit
#: filled the log, on the event loop (where batches run by default), and
#: everything waited for it. The log's file is cut back to CHECKPOINT_BYTES
#: when it starts over (``journal_size_limit``), so its size tells when a few
#: large transactions (blob uploads) have filled it.
CHECKPOINT_BATCHES = 200
CHECKPOINT_CHANGES = 4000
CHECKPOINT_BYTES = 4 * 1024 * 1024


@attrs.define(eq=False)
class _Op:
    fn: Callable[[Cursor], Any]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: outcome.Outcome[Any] | None = None


@attrs.define(eq=False)
class SQLiteRunner:
    """The :class:`~._store.Runner` for one SQLite file (``":memory:"`` for tests).

    ``threaded=True`` runs each batch in a worker thread, so the event loop
    never waits on SQLite; ``threaded=False`` runs it on the trio thread,
    which avoids a thread hop per batch and keeps tests on trio's autojump
    clock deterministic.
    """

    dialect: ClassVar[Dialect] = SQLITE

    path: str | Path
    threaded: bool = True
    #: Called after each batch with how many operations it ran and how long
    #: it took, in seconds (for metrics).
    on_batch: Callable[[int, float], None] | None = None
    _send: trio.MemorySendChannel[_Op] = attrs.field(init=False, repr=False)
    _receive: trio.MemoryReceiveChannel[_Op] = attrs.field(init=False, repr=False)
    #: The connection :meth:`read` uses, while the runner runs on a file; None
    #: for ``":memory:"`` (a second connection would open another database).
    _reader: sqlite3.Connection | None = attrs.field(init=False, default=None, repr=False)
    _reading: trio.Lock = attrs.field(init=False, factory=trio.Lock, repr=False)
    #: Set while a checkpoint waits for the read in flight to end: new reads
    #: wait for it (see :meth:`read`).
    _reads_paused: trio.Event | None = attrs.field(init=False, default=None, repr=False)
    #: False once a checkpoint with no read of ours in flight left the log
    #: partly copied: a reader outside this process (a shell, a backup) holds
    #: a snapshot, and pausing reads would buy nothing. True again once a
    #: checkpoint completes.
    _pause_reads_for_checkpoints: bool = attrs.field(init=False, default=True, repr=False)
    _stopped: bool = attrs.field(init=False, default=False, repr=False)
    #: The database's file as SQLite opened it (a symlink resolved); "" for ":memory:".
    _file: str = attrs.field(init=False, default="", repr=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[_Op](4 * MAX_BATCH)

    def _connect(self, setup: Callable[[Cursor], None]) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # see CHECKPOINT_BATCHES
            conn.execute(f"PRAGMA journal_size_limit={CHECKPOINT_BYTES}")
            conn.execute("PRAGMA busy_timeout=5000")
            # LIKE matches case as on PostgreSQL (the tag filter: "prod" is not "Prod").
            conn.execute("PRAGMA case_sensitive_like=ON")
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            setup(cur)
            cur.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ConfigurationError(
                f"{self.path} is not a usable SQLite database ({exc}); move it aside,"
                " or start with another --data-dir"
            ) from None
        except BaseException:  # a schema newer than this version knows
            conn.close()
            raise
        return conn

    async def run(
        self,
        setup: Callable[[Cursor], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the writer until cancelled; ``task_status.started()`` once ``setup`` committed.

        On the way out it closes the database connection, and every operation
        still queued or in the batch at hand fails with :class:`StoreError`.
        """
        conn = await self._call_sync(partial(self._connect, setup))
        batch: list[_Op] = []
        # SQLite names the log after the file it opened (a symlink resolved).
        (_, _, file), *_ = conn.execute("PRAGMA database_list").fetchall()
        self._file = file
        wal = Path(f"{file}-wal") if file else None  # "" for ":memory:"
        batches = 0
        changes = conn.total_changes
        try:
            if file:
                self._reader = _open_reader(file)
            task_status.started()
            while True:
                batch = [await self._receive.receive()]
                # Let the tasks that are ready run first: the operations they
                # queue join this transaction instead of paying a commit each.
                await trio.lowlevel.cancel_shielded_checkpoint()
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                if all(op.fn is _nothing for op in batch):
                    # Only the turn a read asked for (see _end_read): no transaction.
                    for op in batch:
                        op.result = outcome.Value(None)
                else:
                    began = time.perf_counter()
                    await self._call_sync(partial(self._execute, conn, batch))
                    if self.on_batch is not None:
                        self.on_batch(len(batch), time.perf_counter() - began)
                    batches += 1
                for op in batch:
                    op.done.set()
                batch = []
                if wal is not None and (
                    batches >= CHECKPOINT_BATCHES
                    or conn.total_changes - changes >= CHECKPOINT_CHANGES
                    or _size(wal) > CHECKPOINT_BYTES
                ):
                    if self._reading.locked():
                        # A read holds a snapshot: after a checkpoint now the log
                        # could not start over. New reads wait; the one in flight
                        # has the writer look again as it ends (see read()).
                        if self._pause_reads_for_checkpoints and self._reads_paused is None:
                            self._reads_paused = trio.Event()
                        continue
                    # In a worker thread even when batches run on the trio
                    # thread: the event loop goes on meanwhile, and the
                    # operations that arrive wait for the next batch.
                    self._reading.acquire_nowait()
                    try:
                        complete = await _in_thread(self.threaded, partial(_checkpoint, conn))
                    finally:
                        self._reading.release()
                        self._resume_reads()
                    self._pause_reads_for_checkpoints = complete
                    batches, changes = 0, conn.total_changes
        finally:
            while True:
                try:
                    batch.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            # No checkpoint since the drain: nothing can slip in before this close.
            self._receive.close()
            for op in batch:
                if op.result is None:  # (one Error each: an outcome unwraps once)
                    op.result = outcome.Error(StoreError("the store is closed"))
                op.done.set()
            conn.close()
            self._stopped = True
            self._resume_reads()  # to find the store closed
            with trio.CancelScope(shield=True):
                async with self._reading:  # a read in its thread ends first
                    if self._reader is not None:
                        self._reader.close()
                        self._reader = None

    async def _call_sync(self, fn: Callable[[], T]) -> T:
        if self.threaded:
            return await trio.to_thread.run_sync(fn)
        return fn()

    @staticmethod
    def _execute(conn: sqlite3.Connection, batch: list[_Op]) -> None:
        cur = conn.cursor()
        try:
            if not _run_batch(cur, batch, savepoints=False):
                # One operation failed: undo the batch and run it again with a
                # savepoint around each operation, so the failure undoes only its own.
                # (SQLite may have rolled back already: a full disk ends the transaction.)
                if conn.in_transaction:
                    cur.execute("ROLLBACK")
                _run_batch(cur, batch, savepoints=True)
        except sqlite3.Error as exc:
            log.exception("SQLite transaction failed; %d operations refused", len(batch))
            if conn.in_transaction:
                conn.rollback()
            for op in batch:
                op.result = outcome.Error(exc)

    async def read(self, fn: Callable[[Cursor], T]) -> T:
        """Run ``fn``, which only reads, on the second connection in a worker
        thread (inline under trio's MockClock), in a transaction that sees what
        had committed when it began; reads take turns. On ``":memory:"`` it
        joins the next batch, as :meth:`transact`.
        """
        if self._reader is None and not self._stopped:
            return await self.transact(fn)  # ":memory:", or not started yet
        while True:
            while self._reads_paused is not None:
                await self._reads_paused.wait()
            await self._reading.acquire()
            if self._reads_paused is None:
                break
            self._end_read()  # a checkpoint came due while it waited its turn
        try:
            reader = self._reader
            if reader is None or self._stopped:
                raise StoreError("the store is closed")
            try:
                return await _in_thread(self.threaded, partial(_read, reader, fn))
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
                if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError):
                    raise  # a bug in a query, not the database's state
                raise StoreUnavailable(f"the database refused the read: {exc}") from exc
        finally:
            self._end_read()

    def _end_read(self) -> None:
        """Let the next read go; the last one out while a checkpoint waits has
        the writer look again now (with an empty operation), not at its next
        batch, which may be a while away."""
        self._reading.release()
        if self._reads_paused is not None and not self._reading.locked():
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                self._send.send_nowait(_Op(_nothing))  # (a full queue: a batch is near)

    def _resume_reads(self) -> None:
        if self._reads_paused is not None:
            self._reads_paused.set()
            self._reads_paused = None

    async def truncate_log(self) -> None:
        """Copy the write-ahead log back and cut its file to zero bytes.

        Checkpoints reuse the log, and shorten it only to ``journal_size_limit``
        as it starts over; the retention sweep's page moves (a large
        ``incremental_vacuum``) go through it. With no read in flight: SQLite's
        TRUNCATE checkpoint holds the write lock while it waits for readers. It
        waits at most a second for the writer; if it is busy, the log is cut
        at a later sweep.
        """
        if self._file:
            async with self.without_reads():
                await trio.to_thread.run_sync(_truncate_log, self._file)

    @contextlib.asynccontextmanager
    async def without_reads(self) -> AsyncIterator[None]:
        """No read in flight while the block runs; reads that come wait for it
        (the retention sweep cuts the log back: SQLite's TRUNCATE checkpoint
        holds the write lock while it waits for readers)."""
        await self._reading.acquire()
        try:
            yield
        finally:
            self._end_read()

    async def transact(self, fn: Callable[[Cursor], T]) -> T:
        """Run ``fn`` in the next batch; return or raise as it did.

        When an operation of the batch raises, the batch is undone and run again
        with a savepoint around each operation, so ``fn`` may run twice: it must
        change nothing but the database (ids it makes are returned from the run
        that committed).

        Raises :class:`StoreError` once the writer has stopped, and the
        ``sqlite3.Error`` that made a whole batch fail.
        """
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
        try:
            value: T = op.result.unwrap()
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
            if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError):
                raise  # a bug in a query, not the database's state
            raise StoreUnavailable(f"the database refused the operation: {exc}") from exc
        return value


@attrs.define(eq=False, init=False)
class SQLiteStore(Store):
    """A :class:`~._store.Store` in one SQLite file (``":memory:"`` for tests).

    Start it with ``await nursery.start(store.run)``; it is ready (schema
    created) when that returns. ``threaded`` is :class:`SQLiteRunner`'s.
    """

    def __init__(
        self, path: str | Path, default_max_redeliveries: int = 3, threaded: bool = True
    ) -> None:
        self.__attrs_init__(SQLiteRunner(path, threaded), default_max_redeliveries)


async def _in_thread(threaded: bool, fn: Callable[[], T]) -> T:
    """``fn()`` in a worker thread, so that the event loop goes on; inline
    under a virtual clock (tests on trio's MockClock), where a thread would
    let the clock jump while it runs."""
    if threaded or not _clock_is_virtual():
        return await trio.to_thread.run_sync(fn)
    return fn()


def _open_reader(file: str) -> sqlite3.Connection:
    """The connection for :meth:`SQLiteRunner.read`: it may not write."""
    try:
        reader = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise ConfigurationError(f"{file}: cannot open a second connection ({exc})") from None
    try:
        reader.execute("PRAGMA query_only=ON")
        reader.execute("PRAGMA busy_timeout=5000")
        reader.execute("PRAGMA case_sensitive_like=ON")  # as the writer's: the tag filter
    except sqlite3.Error as exc:
        reader.close()
        raise ConfigurationError(f"{file}: cannot set up a second connection ({exc})") from None
    return reader


def _read(reader: sqlite3.Connection, fn: Callable[[Cursor], T]) -> T:
    """``fn`` in one read transaction (one snapshot for all its statements)."""
    cur = reader.cursor()
    cur.execute("BEGIN")
    try:
        return fn(cur)
    finally:
        # It wrote nothing: this only ends the snapshot. (SQLite may have ended
        # the transaction itself, out of memory or disk: the error is fn's.)
        if reader.in_transaction:
            cur.execute("ROLLBACK")


def _truncate_log(file: str) -> None:
    with contextlib.closing(sqlite3.connect(file, timeout=1.0, isolation_level=None)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy:
        log.debug("the write-ahead log was busy; it is cut back at a later sweep")


def _nothing(cur: Cursor) -> None:
    """An operation that only makes the writer take a turn (see ``_end_read``)."""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # not there (yet)
        return 0


def _clock_is_virtual() -> bool:
    # Without trio.testing imported there is no MockClock (and importing it
    # here would cost the server 10 MB).
    testing = sys.modules.get("trio.testing")
    return testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock)


def _checkpoint(conn: sqlite3.Connection) -> bool:
    """Copy what the write-ahead log holds into the database file (without
    waiting for readers), so that the log starts over instead of growing.
    True when all of it was copied."""
    try:
        busy, logged, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error as exc:  # a full disk: the next one tries again
        log.warning("SQLite checkpoint failed: %s", exc)
        return False
    return not busy and logged == copied


def _run_batch(cur: sqlite3.Cursor, batch: list[_Op], *, savepoints: bool) -> bool:
    """Run the batch in one transaction and commit it; False (uncommitted) when an
    operation fails and there are no savepoints to undo just that one."""
    cur.execute("BEGIN IMMEDIATE")
    for op in batch:
        if savepoints:
            cur.execute("SAVEPOINT op")
        op.result = outcome.capture(op.fn, cur)
        if isinstance(op.result, outcome.Error):
            if not savepoints:
                return False
            if not cur.connection.in_transaction:
                # SQLite ended the whole transaction (a full disk): every
                # operation of the batch fails with this error.
                raise op.result.error
            cur.execute("ROLLBACK TO op")
        if savepoints:
            cur.execute("RELEASE op")
    cur.execute("COMMIT")
    return True
