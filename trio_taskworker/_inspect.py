"""What the CLI's observing commands ask the server, and how they print it.

``run ls``, ``run show``, ``run retry``, ``run cancel``, ``worker ls`` and
``task ls`` each make one to three blocking HTTP requests (:class:`Inspector`)
and print the answer either as text for people (the ``*_text`` functions:
tables that fit the terminal, one row per line) or as JSON for programs (the
``*_json`` functions: the HTTP API's own documents and field names).

Two promises hold for every output:

- Text that came from the server (task keys, messages, tracebacks, logs) is
  escaped (:func:`escape`) before it reaches a terminal, so a control character
  or an ANSI escape sequence in it cannot move the cursor, recolour the screen
  or forge a line. JSON needs no such care: ``json.dumps`` escapes them.
- The pickled ``parameters`` and ``result`` (base64 in the API) are never
  printed and never unpickled; ``parameters_preview`` and ``result_preview``,
  the readable ``repr`` the client and worker made, stand in for them.

Every problem becomes an :class:`InspectError`, one line for stderr.
"""

from __future__ import annotations

import datetime
import json
import re
import unicodedata
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import attrs
import httpx

from ._client import _tls, _unreachable, api_url_from_env, auth_headers, redact_url
from ._models import (
    RunHistory,
    RunList,
    RunLogs,
    StateChange,
    TaskOptions,
    TaskRun,
    TaskStats,
    TaskStatsList,
    WorkerInfo,
    WorkerList,
)
from ._serialization import InvalidPayload, converter, from_json
from ._states import TaskRunState

__all__ = [
    "InspectError",
    "Inspector",
    "escape",
    "open_inspector",
    "run_json",
    "run_text",
    "runs_json",
    "runs_text",
    "tasks_json",
    "tasks_text",
    "workers_json",
    "workers_text",
]

#: The fields of a run that hold pickles (base64 in JSON): never printed.
PICKLED_FIELDS = ("parameters", "result")
#: Routes that need a key with the admin role; every other one needs submit.
_ADMIN_PATHS = ("/runs", "/workers", "/tasks")
#: A short id (``run ls`` shows the last 8 hex digits) is looked for among this
#: many of the newest runs.
SHORT_ID_SEARCH_RUNS = 10_000
_PAGE = 1000
_MIN_DIGITS = 4
_HEX_DIGITS = re.compile(r"[0-9a-f]+")
#: The space between table columns.
_GAP = "  "


class InspectError(Exception):
    """A problem to report in one line, with exit code 1."""


# --- HTTP ----------------------------------------------------------------------------


@attrs.define(eq=False)
class Inspector:
    """Blocking calls to one server's observing routes. Open it with :func:`open_inspector`.

    Each method returns the decoded answer or raises :class:`InspectError`
    with a line that says what to do: the server is unreachable, it wants a
    key (or a key with another role), the run is unknown, the answer made no
    sense. A 409 is the caller's to explain (:meth:`retry`, :meth:`cancel`).
    """

    api_url: str
    _http: httpx.Client

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        run_id: uuid.UUID | None = None,
        allow: tuple[int, ...] = (),
    ) -> httpx.Response:
        what = f"{method} {path.replace(str(run_id), '{id}') if run_id else path}"
        try:
            response = self._http.request(method, path, params=params)
        except httpx.TransportError as exc:
            raise InspectError(str(_unreachable(self.api_url, exc))) from None
        except (httpx.InvalidURL, httpx.HTTPError) as exc:
            raise InspectError(f"cannot use {redact_url(self.api_url)!r}: {exc}") from None
        status = response.status_code
        if status < 400 or status in allow:
            return response
        detail = escape(_detail(response))
        if status == 401:
            raise InspectError(
                f"server answered 401: {detail}; set TRIO_TASKWORKER_API_KEY to a key with the"
                f" {_role(path)} role"
            )
        if status == 403:
            raise InspectError(
                f"server answered 403: {detail}; {what} needs a key with the {_role(path)} role"
            )
        if status == 404 and run_id is not None:
            raise InspectError(f"no run {run_id} on {redact_url(self.api_url)} (404)")
        if status in (404, 405, 501):
            raise InspectError(
                f"server answered {status} to {what}: {detail} (a server older than this command?)"
            )
        raise InspectError(f"server answered {status} to {what}: {detail}")

    def _get(self, cls: type[Any], path: str, **kwargs: Any) -> Any:
        response = self._request("GET", path, **kwargs)
        return _decode(response, cls, f"GET {path}")

    def list_runs(
        self,
        *,
        state: TaskRunState | None = None,
        task_key: str | None = None,
        tag: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> list[TaskRun]:
        """The newest runs first, without payloads (``GET /runs``, admin role)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        for name, value in (("state", state), ("task_key", task_key), ("tag", tag)):
            if value is not None:
                params[name] = str(value)
        runs: RunList = self._get(RunList, "/runs", params=params)
        return list(runs.runs)

    def read_run(self, run_id: uuid.UUID) -> TaskRun:
        """One run with its fields (``GET /runs/{id}``)."""
        run: TaskRun = self._get(TaskRun, f"/runs/{run_id}", run_id=run_id)
        return run

    def history(self, run_id: uuid.UUID) -> list[StateChange]:
        """Every state the run went through, oldest first (``GET /runs/{id}/history``)."""
        answer: RunHistory = self._get(RunHistory, f"/runs/{run_id}/history", run_id=run_id)
        return list(answer.history)

    def logs(self, run_id: uuid.UUID) -> RunLogs:
        """The run's stored log records, oldest first (``GET /runs/{id}/logs``)."""
        answer: RunLogs = self._get(RunLogs, f"/runs/{run_id}/logs", run_id=run_id)
        return answer

    def retry(self, run_id: uuid.UUID) -> TaskRun:
        """Send a FAILED, CRASHED or CANCELLED run back to the queue as a new attempt.

        Raises :class:`InspectError` naming the run's state when it is in another one.
        """
        return self._act(run_id, "retry", "only a FAILED, CRASHED or CANCELLED run can be retried")

    def cancel(self, run_id: uuid.UUID) -> TaskRun:
        """Cancel a run; raises :class:`InspectError` naming its state when it has ended."""
        return self._act(run_id, "cancel", "it has ended")

    def _act(self, run_id: uuid.UUID, action: str, why: str) -> TaskRun:
        path = f"/runs/{run_id}/{action}"
        response = self._request("POST", path, run_id=run_id, allow=(409,))
        if response.status_code == 409:
            # The server's detail may not name the state; the run does.
            try:
                state = str(self.read_run(run_id).state)
            except InspectError:
                state = f"in a state that refuses it ({escape(_detail(response))})"
            raise InspectError(f"cannot {action} run {run_id}: it is {state} ({why})")
        run: TaskRun = _decode(response, TaskRun, f"POST {path}")
        return run

    def workers(self) -> list[WorkerInfo]:
        """The connected workers (``GET /workers``, admin role)."""
        answer: WorkerList = self._get(WorkerList, "/workers")
        return list(answer.workers)

    def tasks(self) -> list[TaskStats]:
        """What each task key is doing (``GET /tasks``, admin role)."""
        answer: TaskStatsList = self._get(TaskStatsList, "/tasks")
        return list(answer.tasks)

    def resolve(self, text: str) -> uuid.UUID:
        """The run id that ``text`` names: a whole UUID, or the end of one's hex digits.

        An end (``run ls`` shows the last 8 digits) is looked for among the
        newest :data:`SHORT_ID_SEARCH_RUNS` runs, which needs the admin role;
        none or several matches is an :class:`InspectError`.
        """
        try:
            return uuid.UUID(text)
        except ValueError:
            pass
        digits = text.strip().lower().replace("-", "")
        if len(digits) < _MIN_DIGITS or not _HEX_DIGITS.fullmatch(digits):
            raise InspectError(
                f"{escape(text)!r} is not a run id (a UUID, or at least its last"
                f" {_MIN_DIGITS} hex digits)"
            )
        found: set[uuid.UUID] = set()
        for offset in range(0, SHORT_ID_SEARCH_RUNS, _PAGE):
            page = self.list_runs(limit=_PAGE, offset=offset)
            found.update(run.id for run in page if run.id.hex.endswith(digits))
            if len(found) > 1 or len(page) < _PAGE:
                break
        if not found:
            raise InspectError(
                f"no run whose id ends with {digits!r} among the newest"
                f" {SHORT_ID_SEARCH_RUNS} runs (a short id is the last 8 hex digits);"
                " give the whole id"
            )
        if len(found) > 1:
            raise InspectError(f"{len(found)} runs have ids that end with {digits!r}: give more")
        return found.pop()


def _role(path: str) -> str:
    return "admin" if path in _ADMIN_PATHS else "submit"


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def _decode(response: httpx.Response, cls: type[Any], what: str) -> Any:
    try:
        return from_json(response.content, cls)
    except InvalidPayload as exc:
        raise InspectError(f"the server's answer to {what} made no sense: {exc}") from None


@contextmanager
def open_inspector(
    api_url: str | None = None, *, transport: httpx.BaseTransport | None = None
) -> Iterator[Inspector]:
    """An :class:`Inspector` for ``api_url`` (default ``TRIO_TASKWORKER_API_URL``).

    It sends ``TRIO_TASKWORKER_API_KEY`` as a bearer token and verifies TLS as
    every client does (``TRIO_TASKWORKER_CA_FILE``). ``transport`` replaces the
    network, for tests. The connections close when the block ends.
    """
    url = (api_url or api_url_from_env()).rstrip("/")
    headers = auth_headers(None)
    if transport is None:
        http = httpx.Client(base_url=url, verify=_tls(), headers=headers, timeout=30.0)
    else:
        http = httpx.Client(base_url=url, transport=transport, headers=headers)
    with http:
        yield Inspector(url, http)


# --- text: escaping, widths, tables --------------------------------------------------

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str, *, multiline: bool = False) -> str:
    r"""``text`` safe for a terminal: each character that does not print (control
    characters such as ESC, format characters such as a right-to-left override,
    line separators, lone surrogates, unassigned code points) becomes a Python
    escape such as ``\x1b``. With ``multiline``, newlines and tabs stay.
    """
    if text.isprintable():
        return text
    keep = "\n\t" if multiline else ""
    return "".join(ch if ch.isprintable() or ch in keep else _escape_char(ch) for ch in text)


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    """How many terminal columns ``text`` (already escaped) takes."""
    if text.isascii():
        return len(text)
    return sum(_char_width(ch) for ch in text)


def shorten(text: str, width: int, *, keep: Literal["start", "end"] = "end") -> str:
    """``text`` cut to at most ``width`` columns, ``...`` marking the cut; ``keep``
    says which end survives (a task key's end names its function)."""
    if display_width(text) <= width:
        return text
    marker = "..." if width > 3 else ""
    room = width - len(marker)
    chars = text if keep == "start" else text[::-1]
    kept: list[str] = []
    used = 0
    for ch in chars:
        used += _char_width(ch)
        if used > room:
            break
        kept.append(ch)
    piece = "".join(kept)
    return piece + marker if keep == "start" else marker + piece[::-1]


@attrs.frozen(kw_only=True)
class Column:
    """A table column: ``flexible`` ones shrink (keeping ``keep``) to fit the width."""

    header: str
    right: bool = False
    flexible: bool = False
    keep: Literal["start", "end"] = "end"
    minimum: int = 8


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> str:
    """A header line and one line per row, at most ``width`` columns wide when the
    flexible columns can shrink enough. Cells must already be escaped."""
    widths = [
        max([display_width(c.header), *(display_width(row[i]) for row in rows)])
        for i, c in enumerate(columns)
    ]
    excess = sum(widths) + len(_GAP) * (len(columns) - 1) - width
    while excess > 0:
        shrinkable = [
            i for i, c in enumerate(columns) if c.flexible and widths[i] > max(c.minimum, 1)
        ]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    lines = []
    for cells in [[c.header for c in columns], *rows]:
        parts = []
        for column, size, cell in zip(columns, widths, cells, strict=True):
            cell = shorten(cell, size, keep=column.keep)
            pad = " " * (size - display_width(cell))
            parts.append(pad + cell if column.right else cell + pad)
        lines.append(_GAP.join(parts).rstrip())
    return "\n".join(lines)


def _utc(moment: datetime.datetime) -> datetime.datetime:
    return moment.astimezone(datetime.UTC)


def compact_duration(seconds: float) -> str:
    """``0.42s``, ``4.2s``, ``42s``, ``12m05s``, ``5h03m``, ``3d04h``: at most 6 columns."""
    if seconds < 0:
        seconds = 0.0
    if seconds < 10:
        return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def ago(moment: datetime.datetime, now: datetime.datetime) -> str:
    """How long before ``now`` ``moment`` was, in its largest unit: ``45s ago``, ``3d ago``."""
    seconds = int((now - moment).total_seconds())
    if seconds < 0:
        return f"in {_largest_unit(-seconds)}"
    return f"{_largest_unit(seconds)} ago"


def _largest_unit(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def timestamp(moment: datetime.datetime) -> str:
    """``2025-01-31 12:00:00.123Z``: UTC to the millisecond."""
    return _utc(moment).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _run_duration(run: TaskRun, now: datetime.datetime) -> str:
    if run.started_at is None:
        return "-"
    if run.finished_at is None:
        if run.state.is_terminal:
            return "-"
        # Still going: the time so far, marked as such.
        return compact_duration((now - run.started_at).total_seconds()) + "+"
    return compact_duration((run.finished_at - run.started_at).total_seconds())


def short_id(value: uuid.UUID | str) -> str:
    """The last 8 hex digits of an id: what the tables show (``run show`` takes them).

    The last, not the first: a run id begins with the time it was made (UUID
    version 7), so runs made within a minute share their first 8 digits.
    """
    return str(value).replace("-", "")[-8:]


# --- the outputs ---------------------------------------------------------------------

_RUN_COLUMNS = (
    Column(header="ID"),
    Column(header="TASK", flexible=True, keep="end", minimum=12),
    Column(header="STATE"),
    Column(header="ATTEMPT", right=True),
    Column(header="CREATED", right=True),
    Column(header="DURATION", right=True),
)


def runs_text(runs: Sequence[TaskRun], now: datetime.datetime, width: int = 80) -> str:
    """The ``run ls`` table: a header, then one line per run, in the order given."""
    rows = [
        [
            short_id(run.id),
            escape(run.task_key),
            str(run.state),
            str(run.attempt),
            ago(run.created_at, now),
            _run_duration(run, now),
        ]
        for run in runs
    ]
    return render_table(_RUN_COLUMNS, rows, width)


def _field_order() -> list[str]:
    """A run's field names, its own before the options it shares with every task."""
    options = {field.name for field in attrs.fields(TaskOptions)}
    names = [field.name for field in attrs.fields(TaskRun)]
    return [n for n in names if n not in options] + [n for n in names if n in options]


def _run_fields(run: TaskRun) -> dict[str, Any]:
    unstructured: dict[str, Any] = converter.unstructure(run)
    return {
        name: unstructured[name]
        for name in _field_order()
        if name in unstructured and name not in PICKLED_FIELDS
    }


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _dumps(document: Any) -> str:
    return json.dumps(document, indent=2)


def runs_json(runs: Sequence[TaskRun]) -> str:
    """``{"runs": [...]}`` as ``GET /runs`` has it, without the pickled fields."""
    return _dumps({"runs": [_run_fields(run) for run in runs]})


def run_json(run: TaskRun, history: Sequence[StateChange], logs: RunLogs) -> str:
    """The run's fields (without the pickled ones; ``error`` carries its
    ``traceback``), plus ``history``, ``logs`` and ``logs_dropped``."""
    document = _run_fields(run)
    document["history"] = converter.unstructure(list(history))
    document["logs"] = converter.unstructure(list(logs.logs))
    document["logs_dropped"] = logs.dropped
    return _dumps(document)


def _payload(run: TaskRun, name: str) -> str:
    inline: bytes | None = getattr(run, name)
    ref: str | None = getattr(run, f"{name}_ref")
    if inline is not None:
        return f"pickled, {len(inline)} bytes inline (not shown)"
    if ref is not None:
        return f"pickled, in blob {escape(ref)} (not shown)"
    return "-"


def _value(value: Any, now: datetime.datetime) -> str:
    if value is None or value == ():
        return "-"
    if isinstance(value, datetime.datetime):
        return f"{timestamp(value)} ({ago(value, now)})"
    if isinstance(value, tuple):
        return ", ".join(escape(str(item)) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    return escape(str(value))


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def run_text(
    run: TaskRun, history: Sequence[StateChange], logs: RunLogs, now: datetime.datetime
) -> str:
    """The ``run show`` report: every field, the history, the error and the logs."""
    rows: list[tuple[str, str]] = []
    for name in _field_order():
        if name in PICKLED_FIELDS:
            rows.append((name, _payload(run, name)))
        elif name in ("parameters_ref", "result_ref", "error"):
            continue  # with its payload above; the error has a section of its own
        else:
            rows.append((name, _value(getattr(run, name), now)))
        if name == "finished_at":
            rows.append(("duration", _run_duration(run, now)))
    label = max(len(name) for name, _ in rows)
    lines = [f"run {run.id}"]
    lines += [f"  {name.ljust(label)}  {value}" for name, value in rows]

    lines += ["", f"history ({_plural(len(history), 'change')}):"]
    for change in history:
        note = f"  {escape(change.message)}" if change.message else ""
        lines.append(
            f"  {timestamp(change.timestamp)}  {str(change.state).ljust(10)}"
            f"  attempt {change.attempt}{note}"
        )

    lines += ["", "error:" if run.error else "error: -"]
    if run.error is not None:
        lines.append(f"  {escape(run.error.type)}: {escape(run.error.message)}")
        if run.error.traceback:
            lines.append(_indent(escape(run.error.traceback.rstrip(), multiline=True)))

    dropped = f"; {logs.dropped} more dropped by the server" if logs.dropped else ""
    lines += ["", f"logs ({_plural(len(logs.logs), 'record')}{dropped}):"]
    for record in logs.logs:
        logger = f" {escape(record.logger)}:" if record.logger else ""
        head = f"  {timestamp(record.timestamp)} {record.level:<8} #{record.attempt}{logger} "
        message = escape(record.message, multiline=True).rstrip("\n").split("\n")
        lines.append(head + message[0])
        lines += [" " * len(head) + rest for rest in message[1:]]
    return "\n".join(lines)


_WORKER_COLUMNS = (
    Column(header="CONN"),
    Column(header="CLIENT ID", flexible=True, keep="start", minimum=10),
    Column(header="TASK KEYS", flexible=True, keep="start", minimum=10),
    Column(header="LIMIT", right=True),
    Column(header="IN-FLIGHT", right=True),
    Column(header="CONNECTED", right=True),
    Column(header="LAST SEEN", right=True),
)


def workers_text(workers: Sequence[WorkerInfo], now: datetime.datetime, width: int = 80) -> str:
    """The ``worker ls`` table; a draining worker's limit shows ``draining``."""
    rows = [
        [
            short_id(w.connection_id),
            escape(w.client_id),
            escape(", ".join(w.task_keys)),
            "draining" if w.draining else str(w.limit),
            str(w.in_flight),
            ago(w.connected_at, now),
            ago(w.last_seen, now),
        ]
        for w in workers
    ]
    return render_table(_WORKER_COLUMNS, rows, width)


def workers_json(workers: Sequence[WorkerInfo]) -> str:
    """``{"workers": [...]}`` as ``GET /workers`` has it."""
    return _dumps(converter.unstructure(WorkerList(workers=tuple(workers))))


_TASK_COLUMNS = (
    Column(header="TASK", flexible=True, keep="end", minimum=12),
    Column(header="QUEUED", right=True),
    Column(header="SCHED", right=True),
    Column(header="RUNNING", right=True),
    Column(header="DONE/1H", right=True),
    Column(header="FAILED/1H", right=True),
    Column(header="OLDEST", right=True),
    Column(header="WORKERS", right=True),
)


def tasks_text(tasks: Sequence[TaskStats], width: int = 80) -> str:
    """The ``task ls`` table: DONE/1H and FAILED/1H count runs that ended in the
    last hour; OLDEST is how long the oldest queued run has waited."""
    rows = [
        [
            escape(t.task_key),
            str(t.queued),
            str(t.scheduled),
            str(t.running),
            str(t.completed_last_hour),
            str(t.failed_last_hour),
            "-" if t.oldest_queued_seconds is None else compact_duration(t.oldest_queued_seconds),
            str(t.workers),
        ]
        for t in tasks
    ]
    return render_table(_TASK_COLUMNS, rows, width)


def tasks_json(tasks: Sequence[TaskStats]) -> str:
    """``{"tasks": [...]}`` as ``GET /tasks`` has it."""
    return _dumps(converter.unstructure(TaskStatsList(tasks=tuple(tasks))))
