"""The storage interface, and the SQL that implements it over any DB-API connection.

:class:`Store` is what the server needs from a backend. :class:`SQLRuns`
holds every query and every state decision, written against a plain DB-API
connection in portable SQL (``?`` placeholders are rewritten for drivers that
want ``%s``), so the SQLite backend and a PostgreSQL one differ only in how
they connect and how they run a transaction.

Times are stored as UNIX seconds (floating point); payloads as opaque bytes.
"""

from __future__ import annotations

import abc
import datetime
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import attrs

from .._models import ErrorInfo, Finished, Released, Started, TaskRun, TaskRunCreate
from .._serialization import converter
from .._states import IllegalTransition, TaskRunState, check_transition

__all__ = ["Outcome", "SQLRuns", "Store", "StoreError"]

Report = Started | Finished | Released


class StoreError(Exception):
    """A request the store refuses (unknown blob reference, bad page size...)."""


@attrs.frozen(kw_only=True)
class Outcome:
    """What a batch of changes did: runs whose state changed, and refused reports."""

    changed: tuple[TaskRun, ...] = ()
    rejected: tuple[tuple[uuid.UUID, str], ...] = ()

    @property
    def requeued(self) -> bool:
        """True if any run went back to SCHEDULED (the dispatcher should look)."""
        return any(r.state is TaskRunState.SCHEDULED for r in self.changed)


class Store(abc.ABC):
    """What the server needs from a storage backend. All methods are async."""

    @abc.abstractmethod
    async def create_runs(self, creates: Sequence[TaskRunCreate], now: float) -> list[uuid.UUID]:
        """Create all runs in one transaction; return their ids in order."""

    @abc.abstractmethod
    async def read_runs(self, ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        """Return the runs that exist among ``ids`` (any order), with payloads."""

    @abc.abstractmethod
    async def list_runs(
        self, state: TaskRunState | None, task_key: str | None, limit: int, offset: int
    ) -> list[TaskRun]:
        """Return a page of runs, oldest first, without payloads."""

    @abc.abstractmethod
    async def claim_runs(
        self, keys: Sequence[str], n: int, owner: str, now: float
    ) -> list[TaskRun]:
        """Lease up to ``n`` due runs of ``keys`` to ``owner``, round-robin across keys."""

    @abc.abstractmethod
    async def next_due(self, keys: Sequence[str]) -> float | None:
        """The earliest ``scheduled_time`` among SCHEDULED runs of ``keys``."""

    @abc.abstractmethod
    async def apply_reports(self, owner: str, reports: Sequence[Report], now: float) -> Outcome:
        """Apply a worker's reports in order, refusing those that do not hold the lease."""

    @abc.abstractmethod
    async def release_owner(self, owner: str, now: float) -> Outcome:
        """``owner``'s connection is gone: requeue, redeliver or crash its runs."""

    @abc.abstractmethod
    async def release_all(self, now: float) -> Outcome:
        """At start-up: every lease belongs to a connection of a previous process."""

    @abc.abstractmethod
    async def put_blob(self, data: bytes, now: float) -> str:
        """Store a payload; return its reference."""

    @abc.abstractmethod
    async def get_blob(self, ref: str) -> bytes | None:
        """Return a stored payload, or None."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """The number of runs in each state."""

    @abc.abstractmethod
    async def cancel_run(self, run_id: uuid.UUID, now: float) -> tuple[TaskRun, str | None]:
        """Cancel a run; return it and the connection that holds its lease, if any.

        Raises :class:`StoreError` for an unknown run and :class:`IllegalTransition`
        for one that has already ended.
        """


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...


_COLUMNS = (
    "id, task_key, task_name, state, created_at, scheduled_time, started_at, finished_at,"
    " attempt, retries, retry_count, retry_delay_seconds, timeout_seconds, max_redeliveries,"
    " redeliveries, tags, parameters, parameters_ref, result, result_ref, error, message,"
    " lease_owner, seq"
)
_LIGHT_COLUMNS = _COLUMNS.replace("parameters,", "NULL,").replace(" result,", " NULL,")
#: Position of each column in a row selected with ``_COLUMNS``.
_COL = {name.strip(): i for i, name in enumerate(_COLUMNS.split(","))}
_STATE, _ATTEMPT, _RETRIES, _RETRY_COUNT, _RETRY_DELAY = (
    _COL[n] for n in ("state", "attempt", "retries", "retry_count", "retry_delay_seconds")
)
_MAX_REDELIVERIES, _REDELIVERIES, _OWNER = (
    _COL[n] for n in ("max_redeliveries", "redeliveries", "lease_owner")
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
        seq BIGINT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_queue"
    " ON task_runs (state, task_key, scheduled_time, seq)",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_lease ON task_runs (lease_owner)",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_seq ON task_runs (seq)",
    """CREATE TABLE IF NOT EXISTS blobs (
        id VARCHAR(36) PRIMARY KEY,
        data BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
)


def _dt(value: float | None) -> datetime.datetime | None:
    if value is None:
        return None
    return datetime.datetime.fromtimestamp(value, datetime.UTC)


def _row_to_run(row: Sequence[Any]) -> TaskRun:
    (
        id_, key, name, state, created, scheduled, started, finished, attempt, retries,
        retry_count, retry_delay, timeout, max_redeliveries, redeliveries, tags, parameters,
        parameters_ref, result, result_ref, error, message, _owner, _seq,
    ) = row  # fmt: skip
    return TaskRun(
        id=uuid.UUID(id_),
        task_key=key,
        task_name=name,
        state=TaskRunState(state),
        created_at=_dt(created),  # type: ignore[arg-type]
        scheduled_time=_dt(scheduled),  # type: ignore[arg-type]
        started_at=_dt(started),
        finished_at=_dt(finished),
        attempt=attempt,
        retries=retries,
        retry_count=retry_count,
        retry_delay_seconds=retry_delay,
        timeout_seconds=timeout,
        max_redeliveries=max_redeliveries,
        redeliveries=redeliveries,
        tags=tuple(json.loads(tags)),
        parameters=None if parameters is None else bytes(parameters),
        parameters_ref=parameters_ref,
        result=None if result is None else bytes(result),
        result_ref=result_ref,
        error=None if error is None else converter.structure(json.loads(error), ErrorInfo),
        message=message,
    )


@attrs.define(eq=False)
class SQLRuns:
    """Every query and state decision, run on a DB-API cursor inside a transaction.

    The methods are synchronous: a backend calls them inside its own
    transaction (and thread). ``placeholder`` is ``?`` for sqlite3 and ``%s``
    for psycopg. ``default_max_redeliveries`` applies to runs whose task did
    not set ``max_redeliveries``.
    """

    placeholder: str = "?"
    default_max_redeliveries: int = 3
    _seq: int = attrs.field(init=False, default=0)

    def q(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _in(self, values: Sequence[Any]) -> str:
        return "(" + ",".join("?" * len(values)) + ")"

    def init_schema(self, cur: Cursor) -> None:
        for statement in SCHEMA:
            cur.execute(statement)
        cur.execute("SELECT MAX(seq) FROM task_runs")
        row = cur.fetchone()
        self._seq = int(row[0] or 0)

    # --- runs ---------------------------------------------------------------------

    def create_runs(
        self, cur: Cursor, creates: Sequence[TaskRunCreate], now: float
    ) -> list[uuid.UUID]:
        ids = []
        rows = []
        for create in creates:
            if (
                create.parameters_ref is not None
                and self.get_blob(cur, create.parameters_ref) is None
            ):
                raise StoreError(f"no stored blob {create.parameters_ref!r} for parameters_ref")
            run_id = uuid.uuid4()
            ids.append(run_id)
            self._seq += 1
            scheduled = now if create.scheduled_time is None else create.scheduled_time.timestamp()
            rows.append(
                (
                    str(run_id), create.task_key, create.task_name or create.task_key,
                    TaskRunState.SCHEDULED.value, now, scheduled, create.retries,
                    create.retry_delay_seconds, create.timeout_seconds, create.max_redeliveries,
                    json.dumps(list(create.tags)), create.parameters, create.parameters_ref,
                    self._seq,
                )
            )  # fmt: skip
        sql = self.q(
            "INSERT INTO task_runs (id, task_key, task_name, state, created_at, scheduled_time,"
            " attempt, retries, retry_count, retry_delay_seconds, timeout_seconds,"
            " max_redeliveries, redeliveries, tags, parameters, parameters_ref, seq)"
            " VALUES (?, ?, ?, ?, ?, ?, 0, ?, 0, ?, ?, ?, 0, ?, ?, ?, ?)"
        )
        for row in rows:
            cur.execute(sql, row)
        return ids

    def read_runs(self, cur: Cursor, ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        rows = self._read_rows(cur, [str(i) for i in ids])
        return [_row_to_run(row) for row in rows.values()]

    def _read_rows(self, cur: Cursor, ids: Sequence[str]) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            cur.execute(
                self.q(f"SELECT {_COLUMNS} FROM task_runs WHERE id IN {self._in(chunk)}"), chunk
            )
            for row in cur.fetchall():
                rows[row[0]] = list(row)
        return rows

    def list_runs(
        self,
        cur: Cursor,
        state: TaskRunState | None,
        task_key: str | None,
        limit: int,
        offset: int,
    ) -> list[TaskRun]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state.value)
        if task_key is not None:
            where.append("task_key = ?")
            params.append(task_key)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        cur.execute(
            self.q(
                f"SELECT {_LIGHT_COLUMNS} FROM task_runs {clause} ORDER BY seq LIMIT ? OFFSET ?"
            ),
            [*params, limit, offset],
        )
        return [_row_to_run(row) for row in cur.fetchall()]

    def counts(self, cur: Cursor) -> dict[str, int]:
        cur.execute("SELECT state, COUNT(*) FROM task_runs GROUP BY state")
        found = {state: int(n) for state, n in cur.fetchall()}
        return {s.value: found.get(s.value, 0) for s in TaskRunState}

    # --- dispatch -----------------------------------------------------------------

    def claim_runs(
        self, cur: Cursor, keys: Sequence[str], n: int, owner: str, now: float
    ) -> list[TaskRun]:
        # One indexed query per key, then round-robin: a key with a deep backlog
        # cannot starve the others, and no query scans the whole queue.
        per_key: list[list[Any]] = []
        for key in keys:
            cur.execute(
                self.q(
                    f"SELECT {_COLUMNS} FROM task_runs WHERE state = 'SCHEDULED'"
                    " AND task_key = ? AND scheduled_time <= ?"
                    " ORDER BY scheduled_time, seq LIMIT ?"
                ),
                (key, now, n),
            )
            rows = cur.fetchall()
            if rows:
                per_key.append(rows)
        chosen: list[list[Any]] = []
        depth = 0
        while len(chosen) < n and per_key:
            per_key = [rows for rows in per_key if len(rows) > depth]
            for rows in per_key:
                if len(chosen) == n:
                    break
                chosen.append(list(rows[depth]))
            depth += 1
        update = self.q(
            "UPDATE task_runs SET state = 'PENDING', attempt = attempt + 1, lease_owner = ?"
            " WHERE id = ? AND state = 'SCHEDULED'"
        )
        runs = []
        for row in chosen:
            cur.execute(update, (owner, row[0]))
            row[_STATE] = TaskRunState.PENDING.value
            row[_ATTEMPT] += 1
            row[_OWNER] = owner
            runs.append(_row_to_run(row))
        return runs

    def next_due(self, cur: Cursor, keys: Sequence[str]) -> float | None:
        if not keys:
            return None
        cur.execute(
            self.q(
                "SELECT MIN(scheduled_time) FROM task_runs WHERE state = 'SCHEDULED'"
                f" AND task_key IN {self._in(keys)}"
            ),
            list(keys),
        )
        row = cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # --- state changes ------------------------------------------------------------

    def _write(self, cur: Cursor, row: list[Any], changes: dict[str, Any]) -> TaskRun:
        """Check the transition, update the row in the database and in memory."""
        if "state" in changes:
            check_transition(TaskRunState(row[_STATE]), TaskRunState(changes["state"]))
        names = list(changes)
        assignments = ", ".join(f"{name} = ?" for name in names)
        cur.execute(
            self.q(f"UPDATE task_runs SET {assignments} WHERE id = ?"),
            [changes[name] for name in names] + [row[0]],
        )
        for name in names:
            row[_COL[name]] = changes[name]
        return _row_to_run(row)

    def apply_reports(
        self, cur: Cursor, owner: str, reports: Sequence[Report], now: float
    ) -> Outcome:
        rows = self._read_rows(cur, list(dict.fromkeys(str(r.id) for r in reports)))
        changed: dict[str, TaskRun] = {}
        rejected: list[tuple[uuid.UUID, str]] = []
        for report in reports:
            row = rows.get(str(report.id))
            if row is None:
                rejected.append((report.id, "no such run"))
                continue
            if row[_OWNER] != owner or row[_ATTEMPT] != report.attempt:
                rejected.append(
                    (
                        report.id,
                        f"stale lease: the run is at attempt {row[_ATTEMPT]} on another lease",
                    )
                )
                continue
            try:
                run = self._apply_one(cur, row, report, now)
            except IllegalTransition as exc:
                rejected.append((report.id, str(exc)))
                continue
            changed[row[0]] = run
        return Outcome(changed=tuple(changed.values()), rejected=tuple(rejected))

    def _apply_one(self, cur: Cursor, row: list[Any], report: Report, now: float) -> TaskRun:
        state = TaskRunState(row[_STATE])
        if isinstance(report, Started):
            return self._write(cur, row, {"state": "RUNNING", "started_at": now})
        if state is TaskRunState.CANCELLING or (
            isinstance(report, Finished) and report.state is TaskRunState.CANCELLED
        ):
            # Whatever the worker says of a run the caller cancels, the cancel wins
            # (a sync task may return, or a stopping worker hand it back).
            return self._write(
                cur, row, {"state": "CANCELLED", "finished_at": now, "lease_owner": None}
            )
        if isinstance(report, Released):
            return self._write(
                cur,
                row,
                {"state": "SCHEDULED", "lease_owner": None, "message": report.reason},
            )
        error = None if report.error is None else json.dumps(converter.unstructure(report.error))
        retries, retry_count = row[_RETRIES], row[_RETRY_COUNT]
        if report.state is TaskRunState.FAILED and retry_count < retries:
            return self._write(
                cur,
                row,
                {
                    "state": "SCHEDULED",
                    "scheduled_time": now + row[_RETRY_DELAY],
                    "retry_count": retry_count + 1,
                    "lease_owner": None,
                    "error": error,
                    "message": f"retry {retry_count + 1} of {retries} after a failure",
                },
            )
        if report.state not in (TaskRunState.COMPLETED, TaskRunState.FAILED):
            raise IllegalTransition(state, report.state)
        return self._write(
            cur,
            row,
            {
                "state": report.state.value,
                "finished_at": now,
                "lease_owner": None,
                "result": report.result,
                "result_ref": report.result_ref,
                "error": error,
            },
        )

    def _release_rows(
        self, cur: Cursor, rows: Iterable[Sequence[Any]], reason: str, now: float
    ) -> Outcome:
        changed = []
        for raw in rows:
            row = list(raw)
            state = TaskRunState(row[_STATE])
            if state is TaskRunState.PENDING:
                # It never started: back to the queue, not counted as a redelivery.
                changes: dict[str, Any] = {"state": "SCHEDULED", "lease_owner": None}
            elif state is TaskRunState.CANCELLING:
                changes = {
                    "state": "CANCELLED",
                    "finished_at": now,
                    "lease_owner": None,
                    "message": reason,
                }
            else:
                limit = row[_MAX_REDELIVERIES]
                if limit is None:
                    limit = self.default_max_redeliveries
                redeliveries = row[_REDELIVERIES]
                if redeliveries < limit:
                    changes = {
                        "state": "SCHEDULED",
                        "lease_owner": None,
                        "redeliveries": redeliveries + 1,
                        "message": f"redelivered: {reason}",
                    }
                else:
                    changes = {
                        "state": "CRASHED",
                        "lease_owner": None,
                        "message": f"{reason}; it had been redelivered {redeliveries} times,"
                        f" the limit is {limit}",
                    }
            changed.append(self._write(cur, row, changes))
        return Outcome(changed=tuple(changed))

    def release_owner(self, cur: Cursor, owner: str, now: float) -> Outcome:
        cur.execute(self.q(f"SELECT {_COLUMNS} FROM task_runs WHERE lease_owner = ?"), (owner,))
        return self._release_rows(cur, cur.fetchall(), "the worker's connection was lost", now)

    def release_all(self, cur: Cursor, now: float) -> Outcome:
        cur.execute(f"SELECT {_COLUMNS} FROM task_runs WHERE lease_owner IS NOT NULL")
        return self._release_rows(cur, cur.fetchall(), "the server restarted", now)

    def cancel_run(self, cur: Cursor, run_id: uuid.UUID, now: float) -> tuple[TaskRun, str | None]:
        rows = self._read_rows(cur, [str(run_id)])
        row = rows.get(str(run_id))
        if row is None:
            raise StoreError(f"no run {run_id}")
        state = TaskRunState(row[_STATE])
        owner = row[_OWNER]
        message = "cancelled by the caller"
        if state is TaskRunState.CANCELLING:
            return _row_to_run(row), owner
        if state is TaskRunState.RUNNING:
            # The lease holder is told; it reports CANCELLED (or the lease is lost).
            return self._write(cur, row, {"state": "CANCELLING", "message": message}), owner
        changes = {
            "state": "CANCELLED",
            "finished_at": now,
            "lease_owner": None,
            "message": message,
        }
        return self._write(cur, row, changes), owner

    # --- blobs --------------------------------------------------------------------

    def put_blob(self, cur: Cursor, data: bytes, now: float) -> str:
        ref = str(uuid.uuid4())
        cur.execute(
            self.q("INSERT INTO blobs (id, data, created_at) VALUES (?, ?, ?)"), (ref, data, now)
        )
        return ref

    def get_blob(self, cur: Cursor, ref: str) -> bytes | None:
        cur.execute(self.q("SELECT data FROM blobs WHERE id = ?"), (ref,))
        row = cur.fetchone()
        return None if row is None else bytes(row[0])
