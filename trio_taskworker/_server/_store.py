"""The storage layer: every query, run by a backend's transaction runner.

:class:`Store` is what the server uses. Each of its methods hands one
synchronous function of a DB-API cursor to a :class:`Runner`, which runs it
inside a transaction and hands back its value or its error. The SQLite runner
(:mod:`._sqlite`) queues it to a group-commit writer; a PostgreSQL runner
would take a pooled connection. The SQL is portable (``?`` placeholders are
rewritten for drivers that want ``%s``), rows are read by column name, and
every state decision is a pure rule of :mod:`trio_taskworker._rules`: the SQL
reads a row, asks the rule, checks the transition and writes.

What does differ between databases is declared once, in the runner's
:class:`Dialect` (SQLite's is the default, :data:`SQLITE`; PostgreSQL's is in
:mod:`._postgres`): where ``seq`` comes from, the row locks that keep
concurrent transactions from claiming one run twice or overwriting each
other's change, the key column of the append-only tables, and the lock that
lets several servers create the schema at once. The store never asks which
database it runs on.

The schema is versioned (table ``schema_version``, :data:`SCHEMA_VERSION`): a
server creates or upgrades it on start, and refuses a database that a newer
version has upgraded.

Times are stored as UNIX seconds (floating point); payloads as opaque bytes.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any, NamedTuple, Protocol, TypeVar

import attrs
import orjson
import trio

from .. import _rules
from .._exceptions import ConfigurationError
from .._models import (
    OPTION_NAMES,
    ErrorInfo,
    LogRecord,
    StateChange,
    TaskOptions,
    TaskRun,
    TaskRunCreate,
    TaskStats,
    option_values,
)
from .._rules import Changes, Report
from .._serialization import converter
from .._states import TERMINAL_STATES, IllegalTransition, TaskRunState, check_transition

__all__ = [
    "IDEMPOTENCY_SECONDS",
    "SCHEMA_VERSION",
    "SQLITE",
    "Cursor",
    "Dialect",
    "Idempotency",
    "IdempotencyConflict",
    "Outcome",
    "Report",
    "Runner",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "new_id",
]

T = TypeVar("T")

#: A version 7 UUID's fixed bits below its 48-bit timestamp: version 7, variant RFC 9562.
_V7_FIXED = (0x7 << 76) | (0x2 << 62)
#: The 74 random bits of a version 7 UUID, among its 80 low bits.
_V7_RANDOM = ((1 << 80) - 1) & ~((0xF << 76) | (0x3 << 62))
#: The 48 bits of its timestamp (milliseconds since 1970).
_V7_TIME = (1 << 48) - 1


def new_id() -> uuid.UUID:
    """A new run or blob id: a version 7 UUID (RFC 9562), which begins with
    the time in milliseconds and ends with 74 random bits.

    Ids made one after another sort together, so the primary key's index
    grows at its end, where its pages are in the cache, instead of at random
    pages: with random (version 4) ids, creating runs in a table of 200,000
    cost about twice what it cost in an empty one, against a third more with
    these (``python benchmarks/ids.py``). A clock before 1970 counts as 1970
    (and one past the 48 bits, in the year 10889, starts over at 0).
    """
    random = int.from_bytes(os.urandom(10)) & _V7_RANDOM
    millisecond = max(0, time.time_ns() // 1_000_000) & _V7_TIME
    return uuid.UUID(int=millisecond << 80 | _V7_FIXED | random)


@attrs.frozen
class _Refused:
    """An operation that refused before it wrote anything. Returned rather than
    raised, so the runner need not undo and re-run the batch around it (a client
    cancelling runs that have ended must not double the writer's work)."""

    error: Exception


class StoreError(Exception):
    """A request the store refuses (unknown blob reference, bad page size...)."""


class StoreUnavailable(Exception):
    """The database cannot do the operation now (a full disk, an I/O error, a
    damaged page): not the request's fault, and not a reason to stop serving.
    The HTTP routes answer 503; the dispatcher waits and tries again."""


class IdempotencyConflict(StoreError):
    """An ``Idempotency-Key`` came back with a different request body."""


#: How long a ``POST /runs`` idempotency key is remembered, in seconds.
IDEMPOTENCY_SECONDS = 24 * 3600.0


@attrs.frozen
class Idempotency:
    """A request's ``Idempotency-Key`` and the SHA-256 of its body."""

    key: str
    body_hash: str


@attrs.frozen(kw_only=True)
class Outcome:
    """What a batch of changes did: runs whose state changed, and refused reports.

    ``redelivered`` holds the task keys of the RUNNING runs among ``changed``
    that went back to the queue because their worker was lost.
    """

    changed: tuple[TaskRun, ...] = ()
    rejected: tuple[tuple[uuid.UUID, str], ...] = ()
    redelivered: tuple[str, ...] = ()

    @property
    def requeued(self) -> bool:
        """True if any run went back to SCHEDULED (the dispatcher should look)."""
        return any(r.state is TaskRunState.SCHEDULED for r in self.changed)


class Cursor(Protocol):
    """The part of a DB-API cursor the store uses (sqlite3's and psycopg's both fit)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...
    @property
    def description(self) -> Any: ...
    @property
    def rowcount(self) -> int: ...


@attrs.frozen(kw_only=True)
class Dialect:
    """What differs between databases in the store's SQL; the defaults are SQLite's.

    A runner names its dialect, and :class:`Store` reads these values instead
    of testing which database it runs on.
    """

    name: str = "sqlite"
    #: The driver's parameter marker: ``?`` for sqlite3, ``%s`` for psycopg.
    placeholder: str = "?"
    #: The key column type of the append-only table run_logs,
    #: numbered by the database in insertion order.
    identity: str = "INTEGER PRIMARY KEY"
    #: Run first in the schema's transaction, so that servers starting at once
    #: on an empty database create and upgrade it one at a time. None: the
    #: database already lets one writer at a time in (SQLite's BEGIN IMMEDIATE).
    schema_lock: str | None = None
    #: Statements run after the portable schema.
    extra_schema: tuple[str, ...] = ()
    #: A query giving ``?`` new ``seq`` values, one per row. None: one process
    #: owns the database, and ``seq`` counts in memory from ``MAX(seq)`` at start
    #: (no statement per create).
    next_seqs: str | None = None
    #: Appended to a read whose rows the transaction then changes, so that a
    #: concurrent transaction waits instead of writing over the change. SQLite
    #: needs none: its one writer runs one transaction at a time.
    lock_rows: str = ""
    #: Appended to the claim's read of due runs: rows that another transaction
    #: is claiming are passed over, never leased twice.
    skip_locked: str = ""
    #: A whole number no greater than ``{}`` (the argument is never negative
    #: where the store uses it; SQLite's CAST truncates, PostgreSQL's rounds).
    floor: str = "CAST(({}) AS INTEGER)"
    #: Run first in ``create_runs`` with an idempotency key (the key as its
    #: parameter): a concurrent request with the same key waits for this one
    #: to commit, then finds its ids. None: one writer at a time already.
    key_lock: str | None = None
    #: The database's clock, in UNIX seconds: replica leases are written and
    #: judged by it, so the replicas' own clocks need not agree.
    clock: str = "((julianday('now') - 2440587.5) * 86400.0)"
    #: Run first in a maintenance transaction (the rescue of dead replicas'
    #: runs); its one value is true when this transaction has the turn, and
    #: the turn ends with the transaction. None: always its turn.
    maintenance_turn: str | None = None


#: SQLite's dialect.
SQLITE = Dialect()

#: The schema this version creates (see ``schema_version``). Raise it with
#: each change to the schema, and upgrade older databases in ``_init_schema``.
SCHEMA_VERSION = 2


class Runner(Protocol):
    """A backend: it runs functions of a cursor, each inside a transaction."""

    @property
    def dialect(self) -> Dialect:
        """How the database's SQL differs from the portable SQL (see :class:`Dialect`)."""

    async def run(
        self, setup: Callable[[Cursor], None], *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Serve transactions until cancelled.

        Runs ``setup`` in a first transaction, then ``task_status.started()``.
        On the way out it closes its connections, and every function handed to
        :meth:`transact` that has not run fails with :class:`StoreError`.
        """

    async def read(self, fn: Callable[[Cursor], T]) -> T:
        """Run ``fn``, which only reads, in a transaction of its own, without
        holding up the writes or the event loop while it runs (a count over a
        large table); it sees what had committed when it began. Raises as
        :meth:`transact` does.
        """

    async def transact(self, fn: Callable[[Cursor], T]) -> T:
        """Run ``fn`` inside a transaction; return its value or raise its error.

        A function that raises leaves no change behind, and may have been run
        more than once: it must change nothing outside the database. An
        expected refusal is better returned than raised. Once handed over, the
        function runs even if the caller is cancelled, so that a caller is never
        told a change failed that in fact committed. Raises :class:`StoreError`
        once the runner is closed.
        """


class _Row(NamedTuple):
    """A row of ``task_runs`` by column name: ``_Row._make(row)`` takes any driver's row.

    A named tuple, not a dict per row: it costs a fifth as much to build, and
    reading rows is most of the server's hot path.
    """

    id: str
    task_key: str
    task_name: str
    state: str
    created_at: float
    scheduled_time: float
    started_at: float | None
    finished_at: float | None
    attempt: int
    retries: int
    retry_count: int
    retry_delay_seconds: float
    timeout_seconds: float | None
    max_redeliveries: int | None
    redeliveries: int
    tags: str
    parameters: bytes | None
    parameters_ref: str | None
    result: bytes | None
    result_ref: str | None
    error: str | None
    message: str | None
    lease_owner: str | None
    seq: int
    name: str | None
    cache_key: str | None
    cache_expiration: float | None
    parameters_preview: str | None
    result_preview: str | None
    history: str | None


_COLUMNS = ", ".join(_Row._fields)
#: What lists leave out: the payloads and their previews, which can be long.
_PAYLOADS = ("parameters", "result", "parameters_preview", "result_preview", "history")
#: Lists leave the payloads out; the names stay in place.
_LIGHT_COLUMNS = ", ".join("NULL" if name in _PAYLOADS else name for name in _Row._fields)

# The option columns come from the one declaration of the options.
_INSERT_NAMES = (
    "id", "task_key", "task_name", "state", "created_at", "scheduled_time", "parameters",
    "parameters_ref", "seq", "name", "cache_key", "cache_expiration", "parameters_preview",
    "history", *OPTION_NAMES,
)  # fmt: skip
_INSERT = (
    f"INSERT INTO task_runs ({', '.join(_INSERT_NAMES)}, attempt, retry_count, redeliveries)"
    f" VALUES ({', '.join('?' * len(_INSERT_NAMES))}, 0, 0, 0)"
)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS task_runs (
        id VARCHAR(36) PRIMARY KEY,
        task_key TEXT NOT NULL,
        task_name TEXT NOT NULL,
        state VARCHAR(16) NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        scheduled_time DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        attempt INTEGER NOT NULL,
        retries INTEGER NOT NULL,
        retry_count INTEGER NOT NULL,
        retry_delay_seconds DOUBLE PRECISION NOT NULL,
        timeout_seconds DOUBLE PRECISION,
        max_redeliveries INTEGER,
        redeliveries INTEGER NOT NULL,
        tags TEXT NOT NULL,
        parameters BYTEA,
        parameters_ref VARCHAR(36),
        result BYTEA,
        result_ref VARCHAR(36),
        error TEXT,
        message TEXT,
        lease_owner VARCHAR(64),
        seq BIGINT NOT NULL,
        name TEXT,
        cache_key TEXT,
        cache_expiration DOUBLE PRECISION,
        parameters_preview TEXT,
        result_preview TEXT,
        history TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_queue"
    " ON task_runs (state, task_key, scheduled_time, seq)",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_lease ON task_runs (lease_owner)",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_seq ON task_runs (seq)",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_cache ON task_runs (task_key, cache_key)"
    " WHERE cache_key IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS blobs (
        id VARCHAR(36) PRIMARY KEY,
        data BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        key VARCHAR(255) PRIMARY KEY,
        body_hash VARCHAR(64) NOT NULL,
        ids TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ix_idempotency_created ON idempotency_keys (created_at)",
    # Retention (see _maintenance): ended runs by end time, and the references
    # to blobs and blobs by age, so that a sweep never scans the tables. Partial
    # indexes cost nothing for the runs they leave out (most have no blob).
    "CREATE INDEX IF NOT EXISTS ix_task_runs_finished ON task_runs (finished_at)"
    " WHERE finished_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_parameters_ref ON task_runs (parameters_ref)"
    " WHERE parameters_ref IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_result_ref ON task_runs (result_ref)"
    " WHERE result_ref IS NOT NULL",
    # created_at is stored after the payload: without this index, reading it
    # would read every blob's bytes.
    "CREATE INDEX IF NOT EXISTS ix_blobs_created ON blobs (created_at, id)",
    # What people read (see docs/howto/watch-your-runs): each run's log
    # records, and how many records each run has, so that the bound is checked
    # without counting. (A run's state history is a column of its row.)
    """CREATE TABLE IF NOT EXISTS run_logs (
        id {identity},
        run_id VARCHAR(36) NOT NULL,
        attempt INTEGER NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        level VARCHAR(8) NOT NULL,
        logger TEXT NOT NULL,
        message TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ix_run_logs_run ON run_logs (run_id, id)",
    """CREATE TABLE IF NOT EXISTS run_log_counts (
        run_id VARCHAR(36) PRIMARY KEY,
        stored INTEGER NOT NULL,
        dropped INTEGER NOT NULL
    )""",
    # One row: the version of the schema (see SCHEMA_VERSION).
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    # Version 2: the servers sharing the database (replicas), each with a lease
    # it renews; a run's lease_replica names the replica whose connection
    # holds it, so that another replica can free it when that one dies.
    """CREATE TABLE IF NOT EXISTS replicas (
        id VARCHAR(36) PRIMARY KEY,
        started_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
)


#: Columns added since the first release, with their types: a data directory
#: made by an older version gains them on start (before the indexes are built).
ADDED_COLUMNS = {
    "name": "TEXT",
    "cache_key": "TEXT",
    "cache_expiration": "DOUBLE PRECISION",
    "parameters_preview": "TEXT",
    "result_preview": "TEXT",
    "history": "TEXT",
    "lease_replica": "VARCHAR(36)",
}

#: Where a run's rows are, and the column naming it: retention deletes them all.
_RUN_TABLES = (
    ("run_logs", "run_id"),
    ("run_log_counts", "run_id"),
    ("task_runs", "id"),
)
#: The states ``Store.retry_run`` takes a run from.
RETRYABLE_STATES = frozenset({TaskRunState.FAILED, TaskRunState.CRASHED, TaskRunState.CANCELLED})
#: The states counted as running in task statistics.
_RUNNING = (TaskRunState.PENDING.value, TaskRunState.RUNNING.value, TaskRunState.CANCELLING.value)
#: Appends to a run's ``history`` column, in the UPDATE that changes its state.
#: The history is a column, not a table of its own: each state change already
#: rewrites the row, and a row per change (with its index) cost 15% of the
#: server's throughput.
_APPEND_HISTORY = "history = COALESCE(history, '') || ?"


def _entry(state: str, attempt: int, message: str | None, now: float) -> str:
    """One line of a run's ``history``: ``[at, state, attempt, message]`` as JSON."""
    try:
        return orjson.dumps([now, state, attempt, message]).decode() + "\n"
    except orjson.JSONEncodeError:  # a message that is not valid Unicode
        assert message is not None
        readable = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return orjson.dumps([now, state, attempt, readable]).decode() + "\n"


def _row_entry(row: _Row, now: float) -> str:
    return _entry(row.state, row.attempt, row.message, now)


def _parse_history(text: str | None) -> list[StateChange]:
    changes = []
    for line in (text or "").splitlines():
        at, state, attempt, message = orjson.loads(line)
        changes.append(
            StateChange(
                timestamp=_dt(at), state=TaskRunState(state), attempt=attempt, message=message
            )
        )
    return changes


def _like(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern (with ``ESCAPE '\\'``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


#: How much of a blob is copied into its row at a time.
_BLOB_CHUNK = 1024 * 1024


#: Ids per ``IN (...)`` list: SQLite allows 32,766 parameters, and long lists plan slowly.
_ID_CHUNK = 500


def _in(values: Sequence[Any]) -> str:
    return "(" + ",".join("?" * len(values)) + ")"


def _dt(value: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(value, datetime.UTC)


def _dt_or_none(value: float | None) -> datetime.datetime | None:
    return None if value is None else _dt(value)


def _option_columns(options: TaskOptions) -> Iterable[Any]:
    """The option column values, in ``OPTION_NAMES`` order."""
    values = option_values(options)
    values["tags"] = json.dumps(list(values["tags"]))
    return values.values()


def _change(row: _Row, changes: Changes) -> tuple[_Row, dict[str, Any]]:
    """Check the transition; return the row as changed and the column values to write."""
    state = changes["state"]
    check_transition(TaskRunState(row.state), state)
    values = {**changes, "state": state.value}
    if "error" in values:
        error = values["error"]
        values["error"] = None if error is None else json.dumps(converter.unstructure(error))
    return row._replace(**values), values


def _row_to_run(row: _Row) -> TaskRun:
    options = {name: getattr(row, name) for name in OPTION_NAMES}
    tags = row.tags
    options["tags"] = () if tags == "[]" else json.loads(tags)  # most runs have no tags
    parameters, result, error = row.parameters, row.result, row.error
    return TaskRun(
        id=uuid.UUID(row.id),
        task_key=row.task_key,
        task_name=row.task_name,
        state=TaskRunState(row.state),
        created_at=_dt(row.created_at),
        scheduled_time=_dt(row.scheduled_time),
        started_at=_dt_or_none(row.started_at),
        finished_at=_dt_or_none(row.finished_at),
        attempt=row.attempt,
        retry_count=row.retry_count,
        redeliveries=row.redeliveries,
        parameters=None if parameters is None else bytes(parameters),
        parameters_ref=row.parameters_ref,
        result=None if result is None else bytes(result),
        result_ref=row.result_ref,
        error=None if error is None else converter.structure(json.loads(error), ErrorInfo),
        message=row.message,
        name=row.name,
        cache_key=row.cache_key,
        cache_expiration=row.cache_expiration,
        parameters_preview=row.parameters_preview,
        result_preview=row.result_preview,
        **options,
    )


def _readable(rows: Iterable[_Row]) -> list[TaskRun]:
    """The runs of ``rows`` for a reader; a row that cannot be read comes back as
    a CRASHED stand-in saying why, so one bad row never fails a whole answer."""
    runs = []
    for row in rows:
        try:
            runs.append(_row_to_run(row))
        except Exception as exc:
            try:
                epoch = _dt(0.0)
                runs.append(
                    TaskRun(
                        id=uuid.UUID(str(row.id)),
                        task_key=str(row.task_key),
                        task_name=str(row.task_name),
                        state=TaskRunState.CRASHED,
                        created_at=epoch,
                        scheduled_time=epoch,
                        message=f"the stored run cannot be read: {exc!r}",
                    )
                )
            except Exception:
                continue  # not even its id: nothing a reader could use
    return runs


@attrs.define(eq=False)
class Store:
    """What the server stores: runs, leases and blobs, over a :class:`Runner`.

    Start it with ``await nursery.start(store.run)``; it is ready (schema
    created) when that returns. ``default_max_redeliveries`` applies to runs
    whose task did not set ``max_redeliveries``. Every method runs in one
    transaction of its own, and raises :class:`StoreError` once the store is
    closed.
    """

    runner: Runner
    default_max_redeliveries: int = 3
    #: The most log records kept per run; later ones are counted, not stored.
    max_logs_per_run: int = 1000
    #: This server's name among the replicas sharing the database: unique to
    #: each start, so a restarted server never inherits a dead one's leases.
    replica_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    _dialect: Dialect = attrs.field(init=False, repr=False)
    _placeholder: str = attrs.field(init=False, repr=False)
    #: Appended to a read by id of rows about to change ("" when the dialect needs no lock).
    _lock_by_id: str = attrs.field(init=False, repr=False)
    #: The last ``seq`` given out, when the dialect counts it in memory; ``seq``
    #: orders runs by creation.
    _seq: int = attrs.field(init=False, default=0)
    #: :meth:`_update_sql`'s statements, by the columns they write.
    _update_sqls: dict[tuple[str, ...], str] = attrs.field(init=False, factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        self._dialect = self.runner.dialect
        self._placeholder = self._dialect.placeholder
        lock = self._dialect.lock_rows
        self._lock_by_id = f" ORDER BY id{lock}" if lock else ""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the backend until cancelled; ``task_status.started()`` once the schema exists.

        On the way out the backend closes its connections, and every operation
        still waiting fails with :class:`StoreError`. Raises
        :class:`ConfigurationError` when the database's schema is newer than
        this version knows.
        """
        await self.runner.run(self._init_schema, task_status=task_status)

    def _q(self, sql: str) -> str:
        return sql if self._placeholder == "?" else sql.replace("?", self._placeholder)

    def _init_schema(self, cur: Cursor) -> None:
        """Create or upgrade the schema, in the runner's first transaction."""
        dialect = self._dialect
        if dialect.schema_lock is not None:
            cur.execute(dialect.schema_lock)
        table, *rest = (s.replace("{identity}", dialect.identity) for s in SCHEMA)
        cur.execute(table)
        cur.execute("SELECT * FROM task_runs LIMIT 0")
        present = {column[0] for column in cur.description}
        for name, kind in ADDED_COLUMNS.items():
            if name not in present:
                cur.execute(f"ALTER TABLE task_runs ADD COLUMN {name} {kind}")
        for statement in (*rest, *dialect.extra_schema):
            cur.execute(statement)
        cur.execute("SELECT version FROM schema_version")
        found = [int(row[0]) for row in cur.fetchall()]
        version = max(found, default=0)
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"the database's schema is version {version}, made by a newer"
                f" trio_taskworker; this one knows up to version {SCHEMA_VERSION}: upgrade it"
            )
        if not found:
            cur.execute(
                self._q("INSERT INTO schema_version (version) VALUES (?)"), (SCHEMA_VERSION,)
            )
        elif version < SCHEMA_VERSION or len(found) > 1:
            # (Upgrades from an older version go here, before the version is raised.)
            cur.execute("DELETE FROM schema_version")
            cur.execute(
                self._q("INSERT INTO schema_version (version) VALUES (?)"), (SCHEMA_VERSION,)
            )
        if dialect.next_seqs is None:
            cur.execute("SELECT MAX(seq) FROM task_runs")
            self._seq = int(cur.fetchone()[0] or 0)

    def _next_seqs(self, cur: Cursor, n: int) -> Sequence[int]:
        """``n`` new ``seq`` values, ascending."""
        sql = self._dialect.next_seqs
        if sql is None:
            first = self._seq + 1
            self._seq += n
            return range(first, first + n)
        cur.execute(self._q(sql), (n,))
        return sorted(int(row[0]) for row in cur.fetchall())

    # --- runs ---------------------------------------------------------------------

    async def _transact(self, fn: Callable[[Cursor], T | _Refused]) -> T:
        """``runner.transact``, raising the error of an operation that refused."""
        result = await self.runner.transact(fn)
        if isinstance(result, _Refused):
            raise result.error
        return result

    async def create_runs(
        self,
        creates: Sequence[TaskRunCreate],
        now: float,
        idempotency: Idempotency | None = None,
    ) -> list[uuid.UUID]:
        """Create all runs in one transaction; return their ids in order.

        A run with a ``cache_key`` that matches a COMPLETED run of its task
        whose cache has not expired is created COMPLETED, with that run's
        result and a message naming it. Raises :class:`StoreError`, creating
        none, if a ``parameters_ref`` names no stored blob.

        With ``idempotency``, a key seen before (within
        :data:`IDEMPOTENCY_SECONDS`) with the same body returns the ids it
        created then and creates nothing; with another body it raises
        :class:`IdempotencyConflict`. The key is stored in the same
        transaction as the runs, so either both exist or neither does.
        """

        def create(cur: Cursor) -> list[uuid.UUID] | _Refused:
            if idempotency is not None:
                if self._dialect.key_lock is not None:
                    cur.execute(self._q(self._dialect.key_lock), (idempotency.key,))
                seen = self._seen_key(cur, idempotency, now)
                if seen is not None:
                    return seen
            ids = []
            rows = []
            cached: list[tuple[str, _Row]] = []
            seqs = self._next_seqs(cur, len(creates))
            created = _entry(TaskRunState.SCHEDULED.value, 0, None, now)
            for c, seq in zip(creates, seqs, strict=True):
                if c.parameters_ref is not None and not self._has_blob(cur, c.parameters_ref):
                    return _Refused(
                        StoreError(f"no stored blob {c.parameters_ref!r} for parameters_ref")
                    )
                run_id = new_id()
                ids.append(run_id)
                scheduled = now if c.scheduled_time is None else c.scheduled_time.timestamp()
                rows.append(
                    (
                        str(run_id), c.task_key, c.task_name or c.task_key,
                        TaskRunState.SCHEDULED.value, now, scheduled, c.parameters,
                        c.parameters_ref, seq, c.name, c.cache_key, c.cache_expiration,
                        c.parameters_preview, created, *_option_columns(c),
                    )
                )  # fmt: skip
                if c.cache_key is not None and scheduled <= now:
                    # A run scheduled for later is not answered from the cache now.
                    hit = self._cache_hit(cur, c.task_key, c.cache_key, now)
                    if hit is not None:
                        cached.append((str(run_id), hit))
            cur.executemany(self._q(_INSERT), rows)
            for cached_id, hit in cached:
                message = f"cached: the result of run {hit.id}"
                self._update(
                    cur,
                    cached_id,
                    {
                        "state": TaskRunState.COMPLETED.value,
                        "finished_at": now,
                        "result": hit.result,
                        "result_ref": hit.result_ref,
                        "result_preview": hit.result_preview,
                        "message": message,
                    },
                    _entry(TaskRunState.COMPLETED.value, 0, message, now),
                )
            if idempotency is not None:
                cur.execute(
                    self._q(
                        "INSERT INTO idempotency_keys (key, body_hash, ids, created_at)"
                        " VALUES (?, ?, ?, ?)"
                    ),
                    (idempotency.key, idempotency.body_hash, ",".join(map(str, ids)), now),
                )
            return ids

        return await self._transact(create)

    def _seen_key(
        self, cur: Cursor, idempotency: Idempotency, now: float
    ) -> list[uuid.UUID] | _Refused | None:
        """The ids an earlier request with this key created, or None if it is new."""
        cur.execute(
            self._q("DELETE FROM idempotency_keys WHERE created_at < ?"),
            (now - IDEMPOTENCY_SECONDS,),
        )
        cur.execute(
            self._q("SELECT body_hash, ids FROM idempotency_keys WHERE key = ?"),
            (idempotency.key,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        if row[0] != idempotency.body_hash:
            return _Refused(
                IdempotencyConflict(
                    f"Idempotency-Key {idempotency.key!r} was used before with another body"
                )
            )
        return [uuid.UUID(i) for i in str(row[1]).split(",") if i]

    def _cache_hit(self, cur: Cursor, task_key: str, cache_key: str, now: float) -> _Row | None:
        """The newest run of ``task_key`` with ``cache_key`` that a worker COMPLETED
        (a cached copy, with attempt 0, never counts: it would restart the clock)
        and whose cache has not expired."""
        cur.execute(
            self._q(
                f"SELECT {_COLUMNS} FROM task_runs WHERE task_key = ? AND cache_key = ?"
                " AND state = 'COMPLETED' AND attempt > 0"
                " AND (cache_expiration IS NULL OR finished_at + cache_expiration > ?)"
                " ORDER BY finished_at DESC LIMIT 1"
            ),
            (task_key, cache_key, now),
        )
        raw = cur.fetchone()
        return None if raw is None else _Row._make(raw)

    async def read_runs(self, ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        """Return the runs that exist among ``ids`` (any order), with payloads."""
        if not ids:
            return []

        def read(cur: Cursor) -> list[TaskRun]:
            rows = self._read_rows(cur, [str(i) for i in ids])
            return _readable(rows.values())

        return await self.runner.transact(read)

    def _read_rows(
        self, cur: Cursor, ids: Sequence[str], *, lock: bool = False
    ) -> dict[str, _Row]:
        """The rows of ``ids`` that exist; with ``lock``, locked until the
        transaction ends, because it is about to change them."""
        suffix = ""
        if lock and self._lock_by_id:
            # In one order, so that two transactions locking some of the same
            # runs wait for each other instead of deadlocking.
            ids = sorted(ids)
            suffix = self._lock_by_id
        rows: dict[str, _Row] = {}
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = list(ids[start : start + _ID_CHUNK])
            cur.execute(
                self._q(f"SELECT {_COLUMNS} FROM task_runs WHERE id IN {_in(chunk)}{suffix}"),
                chunk,
            )
            for raw in cur.fetchall():
                row = _Row._make(raw)
                rows[row.id] = row
        return rows

    async def list_runs(
        self,
        state: TaskRunState | None,
        task_key: str | None,
        limit: int,
        offset: int,
        tag: str | None = None,
    ) -> list[TaskRun]:
        """Return a page of runs, newest first, without payloads or previews."""
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state.value)
        if task_key is not None:
            where.append("task_key = ?")
            params.append(task_key)
        if tag is not None:
            # Tags are stored as a JSON list with ", " between items. A quote
            # inside a tag is escaped in that text, so an item, quotes included,
            # is found only where it starts after "[" or ", " and ends before
            # "]" or ",": never inside another tag.
            item = _like(json.dumps(tag))
            where.append(
                "(tags LIKE ? ESCAPE '\\' OR tags LIKE ? ESCAPE '\\'"
                " OR tags LIKE ? ESCAPE '\\' OR tags LIKE ? ESCAPE '\\')"
            )
            params.extend([f"[{item}]", f"[{item},%", f"%, {item}]", f"%, {item},%"])
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = self._q(
            f"SELECT {_LIGHT_COLUMNS} FROM task_runs {clause} ORDER BY seq DESC LIMIT ? OFFSET ?"
        )

        def list_(cur: Cursor) -> list[TaskRun]:
            cur.execute(sql, [*params, limit, offset])
            return _readable(_Row._make(raw) for raw in cur.fetchall())

        return await self.runner.read(list_)

    async def read_history(self, run_id: uuid.UUID) -> list[StateChange] | None:
        """The run's state changes, oldest first; None when there is no such run."""

        def read(cur: Cursor) -> list[StateChange] | None:
            cur.execute(self._q("SELECT history FROM task_runs WHERE id = ?"), (str(run_id),))
            row = cur.fetchone()
            return None if row is None else _parse_history(row[0])

        return await self.runner.transact(read)

    def _exists(self, cur: Cursor, run_id: str) -> bool:
        cur.execute(self._q("SELECT 1 FROM task_runs WHERE id = ?"), (run_id,))
        return cur.fetchone() is not None

    async def put_logs(self, records: Sequence[LogRecord]) -> tuple[int, int, int]:
        """Store log records, at most :attr:`max_logs_per_run` per run.

        Returns how many were stored, how many were dropped because their run
        had reached the bound (counted with the run, see :meth:`read_logs`),
        and how many named no run.
        """
        by_run: dict[str, list[LogRecord]] = {}
        for record in records:
            by_run.setdefault(str(record.run_id), []).append(record)

        def put(cur: Cursor) -> tuple[int, int, int]:
            ids = list(by_run)
            known: dict[str, int] = {}
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                cur.execute(
                    self._q(
                        "SELECT task_runs.id, run_log_counts.stored FROM task_runs"
                        " LEFT JOIN run_log_counts ON run_log_counts.run_id = task_runs.id"
                        f" WHERE task_runs.id IN {_in(chunk)}"
                    ),
                    chunk,
                )
                known.update((run_id, int(stored or 0)) for run_id, stored in cur.fetchall())
            rows: list[tuple[Any, ...]] = []
            counts: list[tuple[str, int, int]] = []
            stored = dropped = unknown = 0
            for run_id, run_records in by_run.items():
                if run_id not in known:
                    unknown += len(run_records)
                    continue
                room = max(0, self.max_logs_per_run - known[run_id])
                kept = run_records[:room]
                rows.extend(
                    (run_id, r.attempt, r.timestamp.timestamp(), r.level, r.logger, r.message)
                    for r in kept
                )
                counts.append((run_id, len(kept), len(run_records) - len(kept)))
                stored += len(kept)
                dropped += len(run_records) - len(kept)
            cur.executemany(
                self._q(
                    "INSERT INTO run_logs (run_id, attempt, at, level, logger, message)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                ),
                rows,
            )
            cur.executemany(
                self._q(
                    "INSERT INTO run_log_counts (run_id, stored, dropped) VALUES (?, ?, ?)"
                    " ON CONFLICT (run_id) DO UPDATE SET"
                    " stored = run_log_counts.stored + excluded.stored,"
                    " dropped = run_log_counts.dropped + excluded.dropped"
                ),
                counts,
            )
            return stored, dropped, unknown

        return await self.runner.transact(put)

    async def read_logs(self, run_id: uuid.UUID) -> tuple[list[LogRecord], int] | None:
        """The run's log records, oldest first, and how many were dropped; None
        when there is no such run."""

        def read(cur: Cursor) -> tuple[list[LogRecord], int] | None:
            key = str(run_id)
            if not self._exists(cur, key):
                return None
            cur.execute(
                self._q(
                    "SELECT attempt, at, level, logger, message FROM run_logs"
                    " WHERE run_id = ? ORDER BY id"
                ),
                (key,),
            )
            records = [
                LogRecord(
                    run_id=run_id,
                    attempt=attempt,
                    timestamp=_dt(at),
                    level=level,
                    logger=logger,
                    message=message,
                )
                for attempt, at, level, logger, message in cur.fetchall()
            ]
            cur.execute(self._q("SELECT dropped FROM run_log_counts WHERE run_id = ?"), (key,))
            row = cur.fetchone()
            return records, 0 if row is None else int(row[0])

        return await self.runner.transact(read)

    async def retry_run(self, run_id: uuid.UUID, now: float) -> TaskRun:
        """Queue an ended run again (FAILED, CRASHED or CANCELLED), due now.

        Its next delivery is a new attempt. The result, error and times of the
        last attempt are cleared and its redeliveries start again from zero; its
        ``retry_count`` stays, so a task's own ``retries`` are not given back.
        This is the one way out of an end state, and only on request: no rule
        of :mod:`trio_taskworker._rules` takes it. Raises :class:`StoreError`
        (unknown run) or :class:`IllegalTransition` (any other state).
        """

        def retry(cur: Cursor) -> TaskRun | _Refused:
            row = self._read_rows(cur, [str(run_id)], lock=True).get(str(run_id))
            if row is None:
                return _Refused(StoreError(f"no run {run_id}"))
            state = TaskRunState(row.state)
            if state not in RETRYABLE_STATES:
                return _Refused(IllegalTransition(state, TaskRunState.SCHEDULED))
            values: dict[str, Any] = {
                "state": TaskRunState.SCHEDULED.value,
                "scheduled_time": now,
                "started_at": None,
                "finished_at": None,
                "result": None,
                "result_ref": None,
                "result_preview": None,
                "error": None,
                "message": f"retried by request after {state.value}",
                "lease_owner": None,
                "redeliveries": 0,
            }
            updated = row._replace(**values)
            self._update(cur, row.id, values, _row_entry(updated, now))
            return _row_to_run(updated)

        return await self._transact(retry)

    async def lease_counts(self) -> dict[str, int]:
        """How many runs each connection holds a lease on, by connection id."""

        def count(cur: Cursor) -> dict[str, int]:
            cur.execute(
                "SELECT lease_owner, COUNT(*) FROM task_runs"
                " WHERE lease_owner IS NOT NULL GROUP BY lease_owner"
            )
            return {str(owner): int(n) for owner, n in cur.fetchall()}

        return await self.runner.transact(count)

    async def task_stats(self, now: float, served: Mapping[str, int]) -> list[TaskStats]:
        """What each task key is doing (see :class:`~trio_taskworker._models.TaskStats`).

        ``served`` maps the keys connected workers serve to how many serve each;
        those keys are listed even with no runs.
        """
        hour_ago = now - 3600.0

        def stats(cur: Cursor) -> list[TaskStats]:
            keys: dict[str, dict[str, Any]] = {}

            def of(key: str) -> dict[str, Any]:
                return keys.setdefault(
                    key,
                    {
                        "queued": 0,
                        "scheduled": 0,
                        "running": 0,
                        "completed": 0,
                        "failed": 0,
                        "oldest": None,
                        "minutes": [0] * 60,
                    },
                )

            # The queue index leads with state: each of these reads only the
            # unended runs, however many ended ones the table holds.
            cur.execute(
                self._q(
                    "SELECT task_key, COUNT(*), MIN(scheduled_time) FROM task_runs"
                    " WHERE state = 'SCHEDULED' AND scheduled_time <= ? GROUP BY task_key"
                ),
                (now,),
            )
            for key, n, oldest in cur.fetchall():
                entry = of(key)
                entry["queued"] = int(n)
                entry["oldest"] = max(0.0, now - float(oldest))
            cur.execute(
                self._q(
                    "SELECT task_key, COUNT(*) FROM task_runs"
                    " WHERE state = 'SCHEDULED' AND scheduled_time > ? GROUP BY task_key"
                ),
                (now,),
            )
            for key, n in cur.fetchall():
                of(key)["scheduled"] = int(n)
            cur.execute(
                "SELECT task_key, COUNT(*) FROM task_runs"
                f" WHERE state IN ('{_RUNNING[0]}', '{_RUNNING[1]}', '{_RUNNING[2]}')"
                " GROUP BY task_key"
            )
            for key, n in cur.fetchall():
                of(key)["running"] = int(n)
            # Ended in the last hour, by the index on finished_at, counted by the
            # database per key, state and minute: at a few hundred runs a second
            # that is most of a million rows, too many to count here.
            minute = self._dialect.floor.format("(finished_at - ?) / 60")
            cur.execute(
                self._q(
                    f"SELECT task_key, state, {minute}, COUNT(*) FROM task_runs"
                    " WHERE finished_at >= ? GROUP BY 1, 2, 3"
                ),
                (hour_ago, hour_ago),
            )
            for key, state, at_minute, n in cur.fetchall():
                entry = of(key)
                if state == TaskRunState.COMPLETED.value:
                    entry["completed"] += n
                elif state in (TaskRunState.FAILED.value, TaskRunState.CRASHED.value):
                    entry["failed"] += n
                entry["minutes"][min(59, max(0, int(at_minute)))] += n
            for key in served:
                of(key)
            return [
                TaskStats(
                    task_key=key,
                    queued=entry["queued"],
                    scheduled=entry["scheduled"],
                    running=entry["running"],
                    completed_last_hour=entry["completed"],
                    failed_last_hour=entry["failed"],
                    oldest_queued_seconds=entry["oldest"],
                    ended_per_minute=tuple(entry["minutes"]),
                    workers=served.get(key, 0),
                )
                for key, entry in sorted(keys.items())
            ]

        return await self.runner.read(stats)

    async def counts(self) -> dict[str, int]:
        """The number of runs in each state."""

        def count(cur: Cursor) -> dict[str, int]:
            cur.execute("SELECT state, COUNT(*) FROM task_runs GROUP BY state")
            found = {state: int(n) for state, n in cur.fetchall()}
            return {s.value: found.get(s.value, 0) for s in TaskRunState}

        return await self.runner.read(count)

    # --- dispatch -----------------------------------------------------------------

    async def claim_runs(
        self, keys: Sequence[str], n: int, owner: str, now: float
    ) -> list[TaskRun]:
        """Lease up to ``n`` due runs of ``keys`` to ``owner``, round-robin across keys."""

        def claim(cur: Cursor) -> list[TaskRun]:
            # One indexed query per key, then round-robin: a key with a deep backlog
            # cannot starve the others, and no query scans the whole queue.
            select = self._q(
                f"SELECT {_COLUMNS} FROM task_runs WHERE state = 'SCHEDULED'"
                " AND task_key = ? AND scheduled_time <= ?"
                f" ORDER BY scheduled_time, seq LIMIT ?{self._dialect.skip_locked}"
            )
            per_key: list[list[Any]] = []
            for key in keys:
                cur.execute(select, (key, now, n))
                fetched = cur.fetchall()
                if fetched:
                    per_key.append(fetched)
            chosen: list[_Row] = []
            depth = 0
            while len(chosen) < n and per_key:
                per_key = [rows for rows in per_key if len(rows) > depth]
                for rows in per_key:
                    if len(chosen) == n:
                        break
                    chosen.append(_Row._make(rows[depth]))
                depth += 1
            leased: list[TaskRun] = []
            updates: list[tuple[str, str, str, str]] = []
            unreadable: list[tuple[str, str]] = []
            pending = TaskRunState.PENDING.value
            for row in chosen:
                attempt = row.attempt + 1
                try:
                    leased.append(
                        _row_to_run(
                            row._replace(state=pending, attempt=attempt, lease_owner=owner)
                        )
                    )
                except Exception as exc:  # a row no reader can use (written by hand?)
                    unreadable.append((f"the stored run cannot be read: {exc!r}", row.id))
                    continue
                updates.append(
                    (owner, self.replica_id, _entry(pending, attempt, None, now), row.id)
                )
            cur.executemany(
                self._q(
                    "UPDATE task_runs SET state = 'PENDING', attempt = attempt + 1,"
                    f" lease_owner = ?, lease_replica = ?, {_APPEND_HISTORY}"
                    " WHERE id = ? AND state = 'SCHEDULED'"
                ),
                updates,
            )
            if unreadable:
                # Never delivered, never retried: CRASHED with the reason, so the
                # queue moves on instead of failing on the same row forever.
                crashed = TaskRunState.CRASHED.value
                cur.executemany(
                    self._q(
                        "UPDATE task_runs SET state = 'CRASHED', message = ?, finished_at = ?,"
                        f" {_APPEND_HISTORY} WHERE id = ? AND state = 'SCHEDULED'"
                    ),
                    [
                        (reason, now, _entry(crashed, 0, reason, now), run_id)
                        for reason, run_id in unreadable
                    ],
                )
            return leased

        return await self.runner.transact(claim)

    async def next_due(self, keys: Sequence[str]) -> float | None:
        """The earliest ``scheduled_time`` among SCHEDULED runs of ``keys``."""
        if not keys:
            return None
        sql = self._q(
            "SELECT MIN(scheduled_time) FROM task_runs WHERE state = 'SCHEDULED'"
            f" AND task_key IN {_in(keys)}"
        )

        def due(cur: Cursor) -> float | None:
            cur.execute(sql, list(keys))
            row = cur.fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self.runner.transact(due)

    # --- state changes ------------------------------------------------------------

    def _write(self, cur: Cursor, row: _Row, changes: Changes, now: float) -> _Row:
        """Check the transition, update the row in the database and its history,
        return it as updated."""
        updated, values = _change(row, changes)
        self._update(cur, row.id, values, _row_entry(updated, now))
        return updated

    def _update_sql(self, columns: tuple[str, ...]) -> str:
        """The UPDATE that writes ``columns`` and appends to the history, by id."""
        sql = self._update_sqls.get(columns)
        if sql is None:
            assignments = ", ".join([*(f"{name} = ?" for name in columns), _APPEND_HISTORY])
            sql = self._q(f"UPDATE task_runs SET {assignments} WHERE id = ?")
            self._update_sqls[columns] = sql  # a handful: the column sets _rules writes
        return sql

    def _update(self, cur: Cursor, run_id: str, values: dict[str, Any], history: str) -> None:
        """Write ``values`` to the run's row, and append ``history`` (lines of
        :func:`_entry`) to its history."""
        cur.execute(self._update_sql(tuple(values)), [*values.values(), history, run_id])

    async def apply_reports(self, owner: str, reports: Sequence[Report], now: float) -> Outcome:
        """Apply a worker's reports in order, refusing those that do not hold the lease."""

        def apply(cur: Cursor) -> Outcome:
            keys = [str(report.id) for report in reports]
            rows = self._read_rows(cur, list(dict.fromkeys(keys)), lock=True)
            # Each report sees the row as the reports before it left it; each run
            # changed is returned once, as it ends up.
            changed: dict[str, _Row] = {}
            # Columns to write per run: a run's reports in one batch (often
            # "started" and "finished" together) cost one UPDATE.
            dirty: dict[str, dict[str, Any]] = {}
            rejected: list[tuple[uuid.UUID, str]] = []
            history: dict[str, str] = {}
            for key, report in zip(keys, reports, strict=True):
                row = rows.get(key)
                if row is None:
                    rejected.append((report.id, "no such run"))
                    continue
                refusal = _rules.refusal(
                    holder=row.lease_owner, attempt=row.attempt, owner=owner, report=report
                )
                if refusal is not None:
                    rejected.append((report.id, refusal))
                    continue
                ref = getattr(report, "result_ref", None)
                if ref is not None and not self._has_blob(cur, ref):
                    # A result no caller could ever read: refused, as a
                    # parameters_ref naming no blob is when a run is created.
                    rejected.append((report.id, f"no stored blob {ref!r} for result_ref"))
                    continue
                try:
                    changes = _rules.on_report(
                        state=TaskRunState(row.state),
                        report=report,
                        retries=row.retries,
                        retry_count=row.retry_count,
                        retry_delay_seconds=row.retry_delay_seconds,
                        now=now,
                    )
                    updated, values = _change(row, changes)
                except IllegalTransition as exc:
                    rejected.append((report.id, str(exc)))
                    continue
                rows[row.id] = changed[row.id] = updated
                dirty.setdefault(row.id, {}).update(values)
                history[row.id] = history.get(row.id, "") + _row_entry(updated, now)
            # One executemany per set of columns written: most runs of a batch
            # change the same ones ("started" and "finished" together, or one).
            by_columns: dict[tuple[str, ...], list[list[Any]]] = {}
            for run_id, values in dirty.items():
                by_columns.setdefault(tuple(values), []).append(
                    [*values.values(), history[run_id], run_id]
                )
            for columns, params in by_columns.items():
                cur.executemany(self._update_sql(columns), params)
            return Outcome(
                changed=tuple(_row_to_run(row) for row in changed.values()),
                rejected=tuple(rejected),
            )

        return await self.runner.transact(apply)

    def _release(self, cur: Cursor, reason: str, now: float) -> Outcome:
        """Requeue, redeliver or crash the leased rows just selected on ``cur``."""
        return self._release_rows(cur, [_Row._make(raw) for raw in cur.fetchall()], reason, now)

    def _release_rows(self, cur: Cursor, rows: Sequence[_Row], reason: str, now: float) -> Outcome:
        """Requeue, redeliver or crash these leased (and locked) rows."""
        changed = []
        redelivered = []
        for row in rows:
            changes = _rules.on_lost_lease(
                state=TaskRunState(row.state),
                redeliveries=row.redeliveries,
                max_redeliveries=row.max_redeliveries,
                default_max_redeliveries=self.default_max_redeliveries,
                reason=reason,
                now=now,
            )
            updated = self._write(cur, row, changes, now)
            if updated.redeliveries > row.redeliveries:
                redelivered.append(row.task_key)
            changed.append(_row_to_run(updated))
        return Outcome(changed=tuple(changed), redelivered=tuple(redelivered))

    async def release_owner(self, owner: str, now: float) -> Outcome:
        """``owner``'s connection is gone: requeue, redeliver or crash its runs."""

        def release(cur: Cursor) -> Outcome:
            cur.execute(
                self._q(
                    f"SELECT {_COLUMNS} FROM task_runs WHERE lease_owner = ?{self._lock_by_id}"
                ),
                (owner,),
            )
            return self._release(cur, "the worker's connection was lost", now)

        return await self.runner.transact(release)

    async def release_all(self, now: float) -> Outcome:
        """At start-up: every lease belongs to a connection of a previous process."""

        def release(cur: Cursor) -> Outcome:
            cur.execute(
                f"SELECT {_COLUMNS} FROM task_runs WHERE lease_owner IS NOT NULL{self._lock_by_id}"
            )
            return self._release(cur, "the server restarted", now)

        return await self.runner.transact(release)

    # --- replicas -----------------------------------------------------------------

    async def renew_replica(self, lease_seconds: float) -> bool:
        """Hold (or extend) this replica's lease for ``lease_seconds`` from now,
        by the database's clock.

        Returns False when it had no row: at its first call, or because the
        others took it for dead and may have freed its runs (their leases are
        fenced, so a late report on one is refused). The row is written either way.
        """
        clock = self._dialect.clock

        def renew(cur: Cursor) -> bool:
            cur.execute(
                self._q(f"UPDATE replicas SET expires_at = {clock} + ? WHERE id = ?"),
                (lease_seconds, self.replica_id),
            )
            if cur.rowcount == 1:
                return True
            cur.execute(
                self._q(
                    "INSERT INTO replicas (id, started_at, expires_at)"
                    f" VALUES (?, {clock}, {clock} + ?)"
                ),
                (self.replica_id, lease_seconds),
            )
            return False

        return await self.runner.transact(renew)

    async def retire_replica(self) -> None:
        """This replica stops: drop its lease (its connections released their runs)."""

        def retire(cur: Cursor) -> None:
            cur.execute(self._q("DELETE FROM replicas WHERE id = ?"), (self.replica_id,))

        await self.runner.transact(retire)

    async def rescue_runs(self, now: float) -> Outcome:
        """Free the runs leased through replicas whose lease has expired by the
        database's clock (or that never had one: a server of version 1), as a
        lost connection frees them, and forget those replicas. ``now`` (the
        server's clock) stamps the runs' changes.

        Safe on several replicas at once (the server runs it on one: see
        :mod:`._replicas`). Fenced: each run is read ``FOR UPDATE`` and freed
        only while it is still leased through a dead replica, so a run that
        just ended, or that a live replica leased again, is never touched.
        """

        clock = self._dialect.clock
        live_sql = f"SELECT id FROM replicas WHERE expires_at >= {clock}"

        def rescue(cur: Cursor) -> Outcome:
            turn = self._dialect.maintenance_turn
            if turn is not None:
                cur.execute(turn)
                if not cur.fetchone()[0]:
                    return Outcome()  # another replica is at it right now
            cur.execute(
                self._q(
                    f"SELECT {_COLUMNS}, lease_replica FROM task_runs"
                    " WHERE lease_owner IS NOT NULL"
                    f" AND (lease_replica IS NULL OR lease_replica NOT IN ({live_sql}))"
                    f"{self._lock_by_id}"
                )
            )
            locked = [(_Row._make(raw[:-1]), raw[-1]) for raw in cur.fetchall()]
            # Asked again now that the rows are locked: a statement sees what
            # committed before it began, and a replica that started meanwhile
            # may have leased one of them since the first look.
            cur.execute(live_sql)
            live = {str(row[0]) for row in cur.fetchall()}
            dead = [row for row, replica in locked if replica not in live]
            outcome = self._release_rows(
                cur, dead, "its server replica stopped renewing its lease", now
            )
            cur.execute(f"DELETE FROM replicas WHERE expires_at < {clock}")
            return outcome

        return await self.runner.transact(rescue)

    async def ended_ids(self, ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """Those of ``ids`` whose run has ended (a light read: no payloads)."""
        return [run_id for run_id, ended in (await self.run_ends(ids)).items() if ended]

    async def run_ends(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bool]:
        """Those of ``ids`` that name a run, each with whether it has ended (no payloads)."""
        terminal = {s.value for s in TERMINAL_STATES}

        def read(cur: Cursor) -> dict[uuid.UUID, bool]:
            found: dict[uuid.UUID, bool] = {}
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = [str(i) for i in ids[start : start + _ID_CHUNK]]
                cur.execute(
                    self._q(f"SELECT id, state FROM task_runs WHERE id IN {_in(chunk)}"), chunk
                )
                found.update((uuid.UUID(row[0]), row[1] in terminal) for row in cur.fetchall())
            return found

        return await self.runner.transact(read)

    async def cancelling_runs(self) -> list[tuple[uuid.UUID, str]]:
        """The CANCELLING runs leased through this replica, with their connections."""

        def read(cur: Cursor) -> list[tuple[uuid.UUID, str]]:
            cur.execute(
                self._q(
                    "SELECT id, lease_owner FROM task_runs WHERE state = 'CANCELLING'"
                    " AND lease_replica = ? AND lease_owner IS NOT NULL"
                ),
                (self.replica_id,),
            )
            return [(uuid.UUID(row[0]), str(row[1])) for row in cur.fetchall()]

        return await self.runner.transact(read)

    async def cancel_run(self, run_id: uuid.UUID, now: float) -> tuple[TaskRun, str | None]:
        """Cancel a run; return it and the connection that holds its lease, if any.

        Raises :class:`StoreError` for an unknown run and :class:`IllegalTransition`
        for one that has already ended.
        """

        def cancel(cur: Cursor) -> tuple[TaskRun, str | None] | _Refused:
            row = self._read_rows(cur, [str(run_id)], lock=True).get(str(run_id))
            if row is None:
                return _Refused(StoreError(f"no run {run_id}"))
            owner = row.lease_owner
            try:
                changes = _rules.on_cancel(state=TaskRunState(row.state), now=now)
            except IllegalTransition as exc:  # it has ended already
                return _Refused(exc)
            if changes is not None:
                row = self._write(cur, row, changes, now)
            return _row_to_run(row), owner

        return await self._transact(cancel)

    # --- blobs --------------------------------------------------------------------

    async def put_blob(self, data: bytes, now: float) -> str:
        """Store a payload; return its reference (see :meth:`put_blob_file`)."""
        return await self.put_blob_file(io.BytesIO(data), now)

    async def put_blob_file(self, source: IO[bytes], now: float) -> str:
        """Store a payload read from ``source`` (from its start); return its reference.

        On SQLite the bytes go into the row in chunks (``zeroblob`` then
        incremental blob I/O), so neither the server nor the writer ever holds
        the whole payload; another backend reads it whole.
        """
        ref = str(new_id())

        def put(cur: Cursor) -> str:
            source.seek(0, 2)
            size = source.tell()
            source.seek(0)
            connection = getattr(cur, "connection", None)
            if connection is None or not hasattr(connection, "blobopen"):
                cur.execute(
                    self._q("INSERT INTO blobs (id, data, created_at) VALUES (?, ?, ?)"),
                    (ref, source.read(), now),
                )
                return ref
            cur.execute(
                "INSERT INTO blobs (id, data, created_at) VALUES (?, zeroblob(?), ?)",
                (ref, size, now),
            )
            cur.execute("SELECT rowid FROM blobs WHERE id = ?", (ref,))
            (rowid,) = cur.fetchone()
            with connection.blobopen("blobs", "data", rowid) as blob:
                while chunk := source.read(_BLOB_CHUNK):
                    blob.write(chunk)
            return ref

        return await self.runner.transact(put)

    async def get_blob(self, ref: str) -> bytes | None:
        """Return a stored payload, or None."""
        return await self.runner.transact(lambda cur: self._get_blob(cur, ref))

    def _has_blob(self, cur: Cursor, ref: str) -> bool:
        cur.execute(self._q("SELECT 1 FROM blobs WHERE id = ?"), (ref,))
        return cur.fetchone() is not None

    def _get_blob(self, cur: Cursor, ref: str) -> bytes | None:
        cur.execute(self._q("SELECT data FROM blobs WHERE id = ?"), (ref,))
        row = cur.fetchone()
        return None if row is None else bytes(row[0])

    # --- retention ----------------------------------------------------------------

    async def stamp_crashed_runs(self, now: float) -> int:
        """Give the CRASHED runs that have no ``finished_at`` the time ``now``; return how many.

        A run whose lease was lost once too often ends CRASHED without an end
        time. Retention counts from ``finished_at``, so the first sweep after
        such a run ended records one; the run is then kept for the whole
        retention period, however long it had run before.
        """
        select = self._q("SELECT id FROM task_runs WHERE state = ? AND finished_at IS NULL")

        def stamp(cur: Cursor) -> int:
            cur.execute(select, (TaskRunState.CRASHED.value,))
            ids = [row[0] for row in cur.fetchall()]
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                cur.execute(
                    self._q(
                        f"UPDATE task_runs SET finished_at = ? WHERE id IN {_in(chunk)}"
                        " AND finished_at IS NULL"
                    ),
                    [now, *chunk],
                )
            return len(ids)

        return await self.runner.transact(stamp)

    async def delete_ended_runs(self, ended_before: float, limit: int) -> tuple[int, list[str]]:
        """Delete up to ``limit`` runs, oldest first, that ended before ``ended_before``.

        Only runs in a terminal state with a ``finished_at`` are deleted: a run
        that has not ended is never touched. Returns how many were deleted
        (fewer than ``limit``: none is left) and the blobs they named, which
        stay until :meth:`delete_unreferenced_blobs`.
        """
        # The state is checked here, not in SQL: with ``state IN (...)`` in the
        # query, SQLite picks the queue index and sorts every ended run. Only an
        # ended run has a finished_at, so the check is a second guard.
        select = self._q(
            "SELECT id, state, parameters_ref, result_ref FROM task_runs"
            f" WHERE finished_at < ? ORDER BY finished_at LIMIT ?{self._dialect.skip_locked}"
        )
        terminal = {state.value for state in TERMINAL_STATES}

        def delete(cur: Cursor) -> tuple[int, list[str]]:
            cur.execute(select, (ended_before, limit))
            ids: list[str] = []
            refs: list[str] = []
            for run_id, state, parameters_ref, result_ref in cur.fetchall():
                if state in terminal:
                    ids.append(run_id)
                    refs.extend(ref for ref in (parameters_ref, result_ref) if ref is not None)
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                for table, column in _RUN_TABLES:
                    cur.execute(
                        self._q(f"DELETE FROM {table} WHERE {column} IN {_in(chunk)}"), chunk
                    )
            return len(ids), list(dict.fromkeys(refs))

        return await self.runner.transact(delete)

    async def list_blobs(
        self,
        created_from: float | None,
        created_before: float,
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[tuple[float, str]]:
        """Up to ``limit`` blobs created in ``[created_from, created_before)``,
        oldest first and past ``after``, as ``(created_at, ref)``.

        Pass the last one as ``after`` for the next page; fewer than ``limit``:
        there is no next page. ``created_from=None`` starts at the oldest.
        """
        where = ["created_at < ?"]
        params: list[Any] = [created_before]
        if after is not None:
            # Alone: with ``created_at >= ?`` as well, SQLite would seek by that
            # and step over every blob before ``after``, on every page.
            where.append("(created_at, id) > (?, ?)")
            params.extend(after)
        elif created_from is not None:
            where.append("created_at >= ?")
            params.append(created_from)
        sql = self._q(
            f"SELECT created_at, id FROM blobs WHERE {' AND '.join(where)}"
            " ORDER BY created_at, id LIMIT ?"
        )

        def page(cur: Cursor) -> list[tuple[float, str]]:
            cur.execute(sql, [*params, limit])
            return [(float(created), str(ref)) for created, ref in cur.fetchall()]

        return await self.runner.transact(page)

    async def delete_unreferenced_blobs(
        self, refs: Sequence[str], created_before: float, max_bytes: int = 8 * 1024 * 1024
    ) -> tuple[int, list[str]]:
        """Delete those of ``refs`` that no run names and that were created
        before ``created_before``.

        Returns how many were deleted, and the refs it did not look at: the
        transaction stops once it has deleted ``max_bytes`` (but deletes one
        blob at least), since freeing a blob's pages takes time in proportion
        to its size. Pass at most a few thousand refs at a time.

        A blob named by a run's ``parameters_ref`` or ``result_ref``, of any run
        in any state (cached runs share their original's result blob), is kept.
        The check and the delete are one transaction, so a run created meanwhile
        either found its blob or was refused; a blob uploaded but not yet named
        by a run is protected only by ``created_before`` (the caller's grace
        period).
        """
        refs = list(dict.fromkeys(refs))

        def delete(cur: Cursor) -> tuple[int, list[str]]:
            sizes: dict[str, int] = {}
            for start in range(0, len(refs), _ID_CHUNK):
                chunk = refs[start : start + _ID_CHUNK]
                cur.execute(
                    self._q(
                        f"SELECT id, LENGTH(data) FROM blobs WHERE id IN {_in(chunk)}"
                        " AND created_at < ?"
                        " AND NOT EXISTS (SELECT 1 FROM task_runs WHERE parameters_ref = blobs.id)"
                        " AND NOT EXISTS (SELECT 1 FROM task_runs WHERE result_ref = blobs.id)"
                    ),
                    [*chunk, created_before],
                )
                sizes.update((ref, int(size)) for ref, size in cur.fetchall())
            doomed: list[str] = []
            left: list[str] = []
            budget = max_bytes
            for position, ref in enumerate(refs):
                if ref not in sizes:
                    continue
                if doomed and sizes[ref] > budget:
                    left = refs[position:]
                    break
                doomed.append(ref)
                budget -= sizes[ref]
            for start in range(0, len(doomed), _ID_CHUNK):
                chunk = doomed[start : start + _ID_CHUNK]
                cur.execute(self._q(f"DELETE FROM blobs WHERE id IN {_in(chunk)}"), chunk)
            return len(doomed), left

        return await self.runner.transact(delete)
