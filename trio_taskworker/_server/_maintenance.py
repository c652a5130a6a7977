"""Retention: the server forgets runs that ended long ago, and gives the space back.

:class:`Maintenance` runs in the server's background nursery. Once at start
and then every :data:`SWEEP_SECONDS` (or every ``retention``, when that is
shorter) it sweeps:

1. CRASHED runs without an end time (stored by an earlier version) get one
   (see :meth:`Store.stamp_crashed_runs`);
2. runs that ended (COMPLETED, FAILED, CANCELLED, CRASHED) more than
   ``retention`` ago are deleted, :data:`BATCH` rows per transaction, so the
   single writer is never held for long and other requests go in between;
3. blobs that no run references any more and that are older than the grace
   period are deleted, :data:`BATCH` (or 8 MiB) per transaction. Only two kinds
   of blob can have become deletable since the last sweep: those the deleted
   runs named, and those that have just grown older than the grace period
   (uploads no run ever named: a failed submission, a result the server
   refused). A sweep looks at those only, not at every blob, except the first
   sweep of a process (and the one after a failed sweep), which looks at all;
4. with the SQLite file, the freed pages go back to the OS:
   ``PRAGMA incremental_vacuum`` moves at most :data:`VACUUM_PAGES` pages per
   transaction and shortens the file, then a ``wal_checkpoint(TRUNCATE)``
   empties the write-ahead log that the moves went through. On PostgreSQL
   (no ``sqlite_path``) this step is skipped: autovacuum makes the deleted
   rows' space reusable, and the tables do not shrink on disk.

The blob grace period is :data:`BLOB_GRACE_SECONDS`, or ``retention`` when that
is shorter. It closes the one race: a blob is uploaded (``POST /blobs``) before the
run that names it is created (``POST /runs``), and a worker uploads a result
blob before it reports the run finished. Between the two the blob is named by
no run, and only its age protects it. A sweep never deletes a blob younger than
the grace period, and once a run names it, it stays as long as any run (the
run, or a cached copy sharing its result) does. A run created naming a blob a
sweep has deleted is refused (``POST /runs`` answers 422); a worker's report is
not checked that way, so a result reported more than the grace period after its
upload would name a missing blob.

Incremental vacuum needs ``auto_vacuum=INCREMENTAL``, which SQLite only sets
before the first table exists (and before the file is put in WAL mode).
:func:`prepare_sqlite_file` sets it on a new file, and converts an older file
once with a ``VACUUM`` when the server starts, before it listens.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from .._exceptions import ConfigurationError
from ._sqlite import SQLiteRunner
from ._store import Cursor, Store, StoreError

__all__ = [
    "BATCH",
    "BLOB_GRACE_SECONDS",
    "DEFAULT_RETENTION",
    "MAX_RETENTION",
    "SWEEP_SECONDS",
    "Maintenance",
    "Sweep",
    "prepare_sqlite_file",
    "retention_seconds",
]

log = logging.getLogger(__name__)

#: How long an ended run is kept by default: seven days, in seconds.
DEFAULT_RETENTION = 7 * 24 * 3600.0
#: The longest retention the server accepts (100 years); longer is "forever".
MAX_RETENTION = 100 * 365 * 24 * 3600.0
#: How often the server sweeps (and once at start).
SWEEP_SECONDS = 60.0
#: The youngest an unreferenced blob may be when it is deleted.
BLOB_GRACE_SECONDS = 3600.0
#: Rows deleted (or blobs looked at) per transaction.
BATCH = 1000
#: Pages given back per transaction (4 MiB with SQLite's default page size).
VACUUM_PAGES = 1000
#: ``PRAGMA auto_vacuum`` says 2 for INCREMENTAL.
_INCREMENTAL = 2


def retention_seconds(value: float | datetime.timedelta | None) -> float | None:
    """``TaskServer.retention`` as seconds, or None to keep runs forever.

    Takes seconds or a :class:`~datetime.timedelta`; None or zero keep runs
    forever. Raises :class:`ConfigurationError` for a negative, non-finite
    or longer than 100 years value.
    """
    if value is None:
        return None
    try:
        seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_RETENTION:
        raise ConfigurationError(
            f"retention must be 0 (forever) or a number of seconds up to 100 years, got {value!r}"
        )
    return seconds or None


@attrs.frozen(kw_only=True)
class Sweep:
    """What one sweep did."""

    runs: int = 0
    blobs: int = 0
    #: Transactions the deletes took (runs and blobs).
    batches: int = 0
    #: Bytes given back to the OS (0 without a SQLite file).
    bytes_freed: int = 0
    seconds: float = 0.0


@attrs.define(eq=False)
class Maintenance:
    """Deletes what ``retention`` has expired; run it with ``nursery.start``.

    ``now`` is the server's clock; the sweeps are spaced on trio's. With
    ``sqlite_path`` (the store's file), freed space goes back to the OS.
    """

    store: Store
    retention: float
    now: Callable[[], float]
    sqlite_path: Path | None = None
    batch: int = BATCH
    #: True when this server is the one that sweeps: with replicas, the one
    #: holding the maintenance lock (two sweeping at once would only repeat work).
    has_turn: Callable[[], bool] = lambda: True
    #: Blobs created before this have been looked at since they passed the
    #: grace period; None: look at all of them at the next sweep.
    _blobs_seen_until: float | None = attrs.field(init=False, default=None)

    @property
    def interval(self) -> float:
        """Seconds between sweeps: a minute, or ``retention`` when that is shorter."""
        return min(SWEEP_SECONDS, self.retention)

    @property
    def blob_grace(self) -> float:
        """The youngest an unreferenced blob may be when deleted: an hour, or less
        when ``retention`` is shorter."""
        return min(BLOB_GRACE_SECONDS, self.retention)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep at once, then every :attr:`interval`, until cancelled; never returns.

        ``task_status.started()`` comes before the first sweep, so a start with
        much to delete is not delayed. A failed sweep is logged and tried again
        at the next interval: housekeeping never takes the server down.
        """
        task_status.started()
        while True:
            try:
                if self.has_turn():
                    await self.sweep()
            except StoreError as exc:
                log.warning("retention sweep skipped: %s", exc)
            except Exception:
                log.exception("retention sweep failed; the next is in %g s", self.interval)
            await trio.sleep(self.interval)

    async def sweep(self) -> Sweep:
        """Delete expired runs and unreferenced blobs, then give the space back.

        Returns what it did. Raises what the store raises (the sweep stops there;
        what it deleted before stays deleted).
        """
        started = time.perf_counter()
        now = self.now()
        store = self.store
        seen_until, self._blobs_seen_until = self._blobs_seen_until, None
        await store.stamp_crashed_runs(now)
        runs = blobs = batches = 0
        named: list[str] = []
        while True:
            deleted, refs = await store.delete_ended_runs(now - self.retention, self.batch)
            runs += deleted
            batches += 1
            named.extend(refs)
            # Their blobs now, while the list is short.
            if len(named) >= self.batch or deleted < self.batch:
                done, steps = await self._delete_blobs(named, now)
                blobs += done
                batches += steps
                named = []
            if deleted < self.batch:
                break
        # Uploads that have grown older than the grace period since the last sweep.
        cutoff = now - self.blob_grace
        after: tuple[float, str] | None = None
        while True:
            page = await store.list_blobs(seen_until, cutoff, after, self.batch)
            done, steps = await self._delete_blobs([ref for _, ref in page], now)
            blobs += done
            batches += steps
            if len(page) < self.batch:
                break
            after = page[-1]
        # Only now: a sweep that failed before this looks at every blob again.
        self._blobs_seen_until = cutoff if seen_until is None else max(seen_until, cutoff)
        freed = await self._give_back() if self.sqlite_path is not None else 0
        sweep = Sweep(
            runs=runs,
            blobs=blobs,
            batches=batches,
            bytes_freed=freed,
            seconds=time.perf_counter() - started,
        )
        if runs or blobs or freed:
            log.info(
                "retention: deleted %d runs that ended more than %g s ago and %d unreferenced"
                " blobs, gave %d bytes back, in %.3f s",
                runs,
                self.retention,
                blobs,
                freed,
                sweep.seconds,
            )
        return sweep

    async def _delete_blobs(self, refs: list[str], now: float) -> tuple[int, int]:
        """Delete those of ``refs`` that no run names and are past the grace
        period; return how many, and in how many transactions."""
        deleted = steps = 0
        while refs:
            done, left = await self.store.delete_unreferenced_blobs(
                refs[: self.batch], now - self.blob_grace
            )
            deleted += done
            steps += 1
            refs = left + refs[self.batch :]
        return deleted, steps

    async def _give_back(self) -> int:
        """Return the free pages at the end of the SQLite file to the OS; bytes freed."""
        freed = 0
        while True:
            pages, page_size, left = await self.store.runner.transact(_vacuum_step)
            freed += pages * page_size
            if not pages or not left:
                break
        if freed and isinstance(self.store.runner, SQLiteRunner):
            # The vacuum's page moves went through the log: cut it back.
            await self.store.runner.truncate_log()
        return freed


def _vacuum_step(cur: Cursor) -> tuple[int, int, int]:
    """Move up to :data:`VACUUM_PAGES` free pages off the end of the file.

    Returns the pages freed, the page size and the free pages left. Does
    nothing on a file that is not in incremental auto-vacuum mode.
    """
    cur.execute("PRAGMA auto_vacuum")
    if cur.fetchone()[0] != _INCREMENTAL:
        return 0, 0, 0
    cur.execute("PRAGMA page_size")
    page_size = int(cur.fetchone()[0])
    cur.execute("PRAGMA freelist_count")
    free = int(cur.fetchone()[0])
    # One page per statement: Python's sqlite3 steps a statement that returns
    # no columns once, and incremental_vacuum frees one page per step, so
    # ``incremental_vacuum(N)`` would free one page, not N.
    for _ in range(min(free, VACUUM_PAGES)):
        cur.execute("PRAGMA incremental_vacuum(1)")
    cur.execute("PRAGMA freelist_count")
    left = int(cur.fetchone()[0])
    return free - left, page_size, left


def prepare_sqlite_file(path: Path) -> None:
    """Make ``path`` give freed space back (``auto_vacuum=INCREMENTAL``).

    A new file gets the mode before its first table. An existing file in
    another mode is converted once with ``VACUUM``, which rewrites it (about
    as long as copying the file, and as much free disk again); run this before
    the store opens the file. A conversion that fails (a full disk) is logged,
    and the server runs on: deleted runs' space is then reused, not given
    back. A file that is not a database is left to the store, which reports it.
    """
    if not path.exists() or path.stat().st_size == 0:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute(f"PRAGMA auto_vacuum={_INCREMENTAL}")
            # Writes the header, which keeps the mode until the first table exists.
            conn.execute("PRAGMA journal_mode=WAL")
        return
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        try:
            mode = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
        except sqlite3.DatabaseError:
            return
        if mode == _INCREMENTAL:
            return
        size = path.stat().st_size
        log.info("retention: converting %s (%d bytes) to incremental vacuum, once", path, size)
        started = time.perf_counter()
        try:
            conn.execute(f"PRAGMA auto_vacuum={_INCREMENTAL}")
            conn.execute("VACUUM")
        except sqlite3.Error as exc:
            log.warning(
                "retention: could not convert %s (%s); deleted runs' space will be reused"
                " but not given back to the OS",
                path,
                exc,
            )
            return
    # After the close: the rewrite went through the write-ahead log, and the
    # close checkpoints it into the file.
    log.info(
        "retention: converted %s in %.1f s; %d bytes now",
        path,
        time.perf_counter() - started,
        path.stat().st_size,
    )
