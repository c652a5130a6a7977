"""The observing commands without a server: formatting, widths, escaping, the
messages for each HTTP answer (over ``httpx.MockTransport``), and exit codes."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import httpx
import pytest

from trio_taskworker._cli import main
from trio_taskworker._inspect import (
    InspectError,
    Inspector,
    ago,
    compact_duration,
    display_width,
    escape,
    open_inspector,
    run_json,
    run_text,
    runs_json,
    runs_text,
    shorten,
    tasks_json,
    tasks_text,
    workers_text,
)
from trio_taskworker._models import (
    ErrorInfo,
    LogRecord,
    RunLogs,
    StateChange,
    TaskRun,
    TaskStats,
    WorkerInfo,
)
from trio_taskworker._serialization import converter
from trio_taskworker._states import TaskRunState

from .conftest import free_port

NOW = datetime.datetime(2025, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
#: Text a hostile server (or a task) could send: an ANSI colour, a cursor move
#: with a carriage return, a right-to-left override, a C1 CSI, a NUL and a lone surrogate.
HOSTILE = "a\x1b[31mred\rX\u202eevil\x9b2J\x00\ud800z"


def _run(**changes: Any) -> TaskRun:
    fields: dict[str, Any] = {
        "id": uuid.UUID("0123abcd-0000-4000-8000-000000000001"),
        "task_key": "app.tasks:add",
        "task_name": "add",
        "state": TaskRunState.COMPLETED,
        "created_at": NOW - datetime.timedelta(minutes=5),
        "scheduled_time": NOW - datetime.timedelta(minutes=5),
        "started_at": NOW - datetime.timedelta(minutes=4),
        "finished_at": NOW - datetime.timedelta(minutes=4) + datetime.timedelta(seconds=2.5),
        "attempt": 1,
    }
    fields.update(changes)
    return TaskRun(**fields)


def _lines_fit(text: str, width: int) -> None:
    for line in text.splitlines():
        assert display_width(line) <= width, (width, line)


# --- escaping and widths ---------------------------------------------------------------


def test_escape_turns_every_non_printing_character_into_a_visible_escape() -> None:
    escaped = escape(HOSTILE)
    assert escaped == "a\\x1b[31mred\\rX\\u202eevil\\x9b2J\\x00\\ud800z"
    assert escaped.isprintable()
    escaped.encode("utf-8")  # a lone surrogate would not encode


def test_escape_keeps_printable_text_and_multiline_keeps_lines() -> None:
    for text in ("plain", "café ünïcode", "日本語のタスク", "(1, 'two')"):
        assert escape(text) == text
    assert escape("one\ntwo\tx") == "one\\ntwo\\tx"
    assert escape("one\ntwo\tx\r\x1b", multiline=True) == "one\ntwo\tx\\r\\x1b"


@pytest.mark.parametrize(
    ("text", "width", "keep", "expected"),
    [
        ("short", 10, "end", "short"),
        ("pkg.module.sub:function", 14, "end", "...ub:function"),
        ("pkg.module.sub:function", 14, "start", "pkg.module...."),
        ("日本語日本語", 7, "start", "日本..."),
        ("abcdef", 3, "end", "def"),
    ],
)
def test_shorten_cuts_to_the_width_and_keeps_the_chosen_end(
    text: str, width: int, keep: Any, expected: str
) -> None:
    got = shorten(text, width, keep=keep)
    assert got == expected
    assert display_width(got) <= width


def test_wide_characters_count_two_columns() -> None:
    assert display_width("ab") == 2
    assert display_width("日本") == 4
    assert display_width("e\u0301") == 1  # a combining accent takes no column


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-1, "0.00s"),
        (0.4219, "0.42s"),
        (4.25, "4.2s"),
        (42.9, "42s"),
        (725, "12m05s"),
        (5 * 3600 + 3 * 60 + 59, "5h03m"),
        (3 * 86400 + 4 * 3600 + 1, "3d04h"),
    ],
)
def test_compact_duration(seconds: float, text: str) -> None:
    assert compact_duration(seconds) == text


@pytest.mark.parametrize(
    ("delta", "text"),
    [(0, "0s ago"), (59, "59s ago"), (61, "1m ago"), (7200, "2h ago"), (-30, "in 30s")],
)
def test_ago(delta: float, text: str) -> None:
    assert ago(NOW - datetime.timedelta(seconds=delta), NOW) == text


# --- run ls ----------------------------------------------------------------------------


def _varied_runs() -> list[TaskRun]:
    return [
        _run(
            id=uuid.uuid4(),
            task_key="a.very.long.package.name.that.goes.on.and.on.and.on:the_function_name",
            state=TaskRunState.CANCELLING,
            attempt=123,
        ),
        _run(id=uuid.uuid4(), task_key="日本語のモジュール名前はとても長いです:関数", attempt=2),
        _run(id=uuid.uuid4(), task_key=HOSTILE, state=TaskRunState.FAILED),
        _run(
            id=uuid.uuid4(),
            state=TaskRunState.RUNNING,
            finished_at=None,
            started_at=NOW - datetime.timedelta(seconds=90),
        ),
        _run(
            id=uuid.uuid4(),
            state=TaskRunState.SCHEDULED,
            started_at=None,
            finished_at=None,
            created_at=NOW - datetime.timedelta(days=400),
        ),
    ]


@pytest.mark.parametrize("width", [80, 64])
def test_run_table_fits_the_terminal_one_line_per_run(width: int) -> None:
    runs = _varied_runs()
    text = runs_text(runs, NOW, width)
    lines = text.splitlines()
    assert len(lines) == 1 + len(runs)
    assert lines[0].split() == ["ID", "TASK", "STATE", "ATTEMPT", "CREATED", "DURATION"]
    _lines_fit(text, width)
    for run, line in zip(runs, lines[1:], strict=True):
        assert line.startswith(run.id.hex[-8:] + "  ")
        assert str(run.state) in line
    assert lines[1].split()[1].endswith("_name")  # the function end of a key survives
    assert "\x1b" not in text and "\r" not in text and "\\ud800z" in lines[3]
    assert lines[4].endswith("1m30s+")  # still running: the time so far
    assert lines[5].endswith("400d ago         -")  # never started


def test_run_table_shows_whole_keys_when_there_is_room() -> None:
    key = "a.very.long.package.name:function"
    text = runs_text([_run(task_key=key)], NOW, 200)
    assert key in text
    (_, row) = text.splitlines()
    assert row.split() == ["00000001", key, "COMPLETED", "1", "5m", "ago", "2.5s"]


def test_run_table_with_no_runs_is_the_header() -> None:
    assert runs_text([], NOW).split() == ["ID", "TASK", "STATE", "ATTEMPT", "CREATED", "DURATION"]


def test_runs_json_has_the_api_field_names_and_no_pickles() -> None:
    runs = [_run(task_key=HOSTILE, parameters=b"\x80\x05pickle", parameters_preview="(1, 2)")]
    document = json.loads(runs_json(runs))
    (run,) = document["runs"]
    assert run["id"] == str(runs[0].id)
    assert run["task_key"] == HOSTILE  # the value itself, not escaped
    assert run["state"] == "COMPLETED" and run["attempt"] == 1
    assert run["parameters_preview"] == "(1, 2)"
    assert "parameters" not in run and "result" not in run
    expected = set(converter.unstructure(runs[0])) - {"parameters", "result"}
    assert set(run) == expected
    assert list(run)[:2] == ["id", "task_key"]


# --- run show --------------------------------------------------------------------------

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "app/tasks.py", line 3, in explode\n'
    "    raise CustomError(message)\n"
    "CustomError: boom \x1b]0;title\x07\n"
)


def _failed() -> tuple[TaskRun, list[StateChange], RunLogs]:
    run = _run(
        state=TaskRunState.FAILED,
        parameters=b"\x80\x05secret-pickle",
        result_ref="blob-123",
        parameters_preview="message='boom'",
        error=ErrorInfo(type="CustomError", message="boom \x1b[2J", traceback=TRACEBACK),
        tags=("nightly", "x\x1by"),
    )
    history = [
        StateChange(timestamp=NOW - datetime.timedelta(minutes=5), state=s, attempt=a)
        for s, a in ((TaskRunState.SCHEDULED, 0), (TaskRunState.PENDING, 1))
    ] + [StateChange(timestamp=NOW, state=TaskRunState.FAILED, attempt=1, message="gave\nup")]
    logs = RunLogs(
        logs=(
            LogRecord(
                run_id=run.id,
                attempt=1,
                timestamp=NOW,
                level="WARNING",
                logger="app",
                message="first line\nsecond \x1b[1m",
            ),
        ),
        dropped=7,
    )
    return run, history, logs


def test_run_show_text_has_every_field_history_traceback_and_logs() -> None:
    run, history, logs = _failed()
    text = run_text(run, history, logs, NOW)
    labels = {line.split()[0] for line in text.splitlines() if line.startswith("  ")}
    shown_elsewhere = {"parameters_ref", "result_ref", "error"}
    assert {f.name for f in attrs.fields(TaskRun)} - shown_elsewhere <= labels
    assert "\x1b" not in text and "\x07" not in text
    assert all(line.isprintable() for line in text.splitlines())
    pickled = run.parameters or b""
    assert "secret-pickle" not in text  # neither raw nor base64
    assert base64.b64encode(pickled).decode()[:12] not in text
    assert "pickled, 15 bytes inline (not shown)" in text
    assert "pickled, in blob blob-123 (not shown)" in text
    assert "message='boom'" in text
    assert "nightly, x\\x1by" in text
    assert "  CustomError: boom \\x1b[2J" in text
    assert '      File "app/tasks.py", line 3, in explode' in text  # the traceback, indented
    assert "    CustomError: boom \\x1b]0;title\\x07" in text
    assert "history (3 changes):" in text
    assert "2025-03-01 12:00:00.000Z  FAILED      attempt 1  gave\\nup" in text
    assert "logs (1 record; 7 more dropped by the server):" in text
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if "first line" in line)
    first, second = lines[at : at + 2]
    assert first.endswith("WARNING  #1 app: first line")
    assert second == " " * first.index("first line") + "second \\x1b[1m"


def test_run_show_json_adds_history_error_and_logs_and_hides_pickles() -> None:
    run, history, logs = _failed()
    document = json.loads(run_json(run, history, logs))
    assert document["id"] == str(run.id) and document["state"] == "FAILED"
    assert "parameters" not in document and "result" not in document
    assert document["result_ref"] == "blob-123"
    assert document["error"]["traceback"] == TRACEBACK
    assert [h["state"] for h in document["history"]] == ["SCHEDULED", "PENDING", "FAILED"]
    assert document["history"][0]["timestamp"] == (NOW - datetime.timedelta(minutes=5)).isoformat()
    (record,) = document["logs"]
    assert record["message"] == "first line\nsecond \x1b[1m"
    assert {"timestamp", "level", "message", "attempt", "logger"} <= set(record)
    assert document["logs_dropped"] == 7


# --- worker ls, task ls ----------------------------------------------------------------


def test_worker_table_fits_and_marks_draining_workers() -> None:
    workers = [
        WorkerInfo(
            connection_id=uuid.uuid4().hex,
            client_id="a-really-long-hostname.example.internal-12345-abcdef",
            task_keys=("app.tasks:add", "app.tasks:mul", "app.reports:nightly_report"),
            limit=10,
            in_flight=3,
            connected_at=NOW - datetime.timedelta(hours=2),
            last_seen=NOW - datetime.timedelta(seconds=4),
        ),
        WorkerInfo(
            connection_id="0" * 24 + "c0ffee00",
            client_id=HOSTILE,
            task_keys=(HOSTILE,),
            limit=1,
            in_flight=0,
            connected_at=NOW,
            last_seen=NOW,
            draining=True,
        ),
    ]
    text = workers_text(workers, NOW, 80)
    _lines_fit(text, 80)
    header, first, second = text.splitlines()
    assert header.split()[:5] == ["CONN", "CLIENT", "ID", "TASK", "KEYS"]
    assert first.startswith(workers[0].connection_id[-8:] + "  a-really")
    assert first.split()[-6:] == ["10", "3", "2h", "ago", "4s", "ago"]
    assert second.startswith("c0ffee00  a\\x1b[31m") and "draining" in second
    assert "\x1b" not in text


def test_task_table_fits_and_json_keeps_the_api_fields() -> None:
    tasks = [
        TaskStats(
            task_key="a.long.package.name.for.reports:nightly_report",
            queued=12,
            scheduled=3,
            running=4,
            completed_last_hour=1234,
            failed_last_hour=5,
            oldest_queued_seconds=725.0,
            ended_per_minute=(0,) * 60,
            workers=2,
        ),
        TaskStats(
            task_key=HOSTILE,
            queued=0,
            scheduled=0,
            running=0,
            completed_last_hour=0,
            failed_last_hour=0,
            oldest_queued_seconds=None,
            ended_per_minute=(1,) * 60,
        ),
    ]
    text = tasks_text(tasks, 80)
    _lines_fit(text, 80)
    header, first, second = text.splitlines()
    assert header.split() == [
        "TASK", "QUEUED", "SCHED", "RUNNING", "DONE/1H", "FAILED/1H", "OLDEST", "WORKERS"
    ]  # fmt: skip
    assert first.split()[1:] == ["12", "3", "4", "1234", "5", "12m05s", "2"]
    assert first.split()[0].endswith(":nightly_report")
    assert second.split()[-2:] == ["-", "0"] and "\x1b" not in text
    document = json.loads(tasks_json(tasks))
    assert document["tasks"][1]["task_key"] == HOSTILE
    assert document["tasks"][0]["oldest_queued_seconds"] == 725.0
    assert len(document["tasks"][0]["ended_per_minute"]) == 60


# --- the HTTP side, over a fake transport ----------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def fake() -> Iterator[Callable[[Handler], Inspector]]:
    """An Inspector whose requests go to a handler instead of the network."""
    with contextlib.ExitStack() as stack:

        def make(handler: Handler) -> Inspector:
            return stack.enter_context(
                open_inspector("http://server.test", transport=httpx.MockTransport(handler))
            )

        yield make


def _json(document: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(document), headers={"content-type": "application/json"}
    )


def test_list_runs_sends_the_filters_and_the_key(
    fake: Callable[[Handler], Inspector], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIO_TASKWORKER_API_KEY", "k" * 20)
    seen: list[httpx.Request] = []
    run = _run()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _json({"runs": [converter.unstructure(run)]})

    api = fake(handler)
    assert api.list_runs(state=TaskRunState.FAILED, task_key="a:b", tag="t", limit=5) == [run]
    (request,) = seen
    assert request.url.path == "/runs"
    assert dict(request.url.params) == {
        "state": "FAILED",
        "task_key": "a:b",
        "tag": "t",
        "limit": "5",
        "offset": "0",
    }
    assert request.headers["authorization"] == "Bearer " + "k" * 20


@pytest.mark.parametrize(
    ("status", "call", "message"),
    [
        (401, "list", "server answered 401: no key; set TRIO_TASKWORKER_API_KEY to a key with"
         " the admin role"),
        (401, "show", "server answered 401: no key; set TRIO_TASKWORKER_API_KEY to a key with"
         " the submit role"),
        (403, "workers", "server answered 403: no key; GET /workers needs a key with the admin"
         " role"),
        (403, "tasks", "server answered 403: no key; GET /tasks needs a key with the admin role"),
        (404, "show", "no run 0123abcd-0000-4000-8000-000000000001 on http://server.test (404)"),
        (501, "workers", "server answered 501 to GET /workers: no key (a server older than this"
         " command?)"),
        (503, "list", "server answered 503 to GET /runs: no key"),
    ],
)  # fmt: skip
def test_each_error_answer_is_one_line_saying_what_to_do(
    fake: Callable[[Handler], Inspector], status: int, call: str, message: str
) -> None:
    api = fake(lambda request: _json({"detail": "no key"}, status))
    calls: dict[str, Callable[[], object]] = {
        "list": api.list_runs,
        "show": lambda: api.read_run(_run().id),
        "workers": api.workers,
        "tasks": api.tasks,
    }
    with pytest.raises(InspectError) as caught:
        calls[call]()
    assert str(caught.value) == message


def test_a_hostile_error_detail_is_escaped(fake: Callable[[Handler], Inspector]) -> None:
    api = fake(lambda request: _json({"detail": HOSTILE}, 500))
    with pytest.raises(InspectError) as caught:
        api.tasks()
    assert str(caught.value).isprintable() and escape(HOSTILE) in str(caught.value)


def test_an_unreachable_server_and_a_nonsense_answer(
    fake: Callable[[Handler], Inspector],
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(InspectError, match=r"^cannot reach http://server\.test: ConnectError"):
        fake(refuse).workers()
    with pytest.raises(InspectError, match=r"answer to GET /tasks made no sense"):
        fake(lambda request: _json({"tasks": "many"})).tasks()


@pytest.mark.parametrize(
    ("action", "state", "why"),
    [
        ("retry", "COMPLETED", "only a FAILED, CRASHED or CANCELLED run can be retried"),
        ("cancel", "FAILED", "it has ended"),
    ],
)
def test_a_refused_retry_or_cancel_names_the_state(
    fake: Callable[[Handler], Inspector], action: str, state: str, why: str
) -> None:
    run = _run(state=TaskRunState(state))

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            assert request.url.path == f"/runs/{run.id}/{action}"
            return _json({"detail": "refused"}, 409)
        return _json(converter.unstructure(run))

    api = fake(handler)
    with pytest.raises(InspectError) as caught:
        api.retry(run.id) if action == "retry" else api.cancel(run.id)
    assert str(caught.value) == f"cannot {action} run {run.id}: it is {state} ({why})"


def test_retry_returns_the_run_back_in_the_queue(fake: Callable[[Handler], Inspector]) -> None:
    run = _run(state=TaskRunState.SCHEDULED, attempt=1)
    api = fake(lambda request: _json(converter.unstructure(run)))
    assert api.retry(run.id) == run


def test_a_short_id_is_found_among_the_newest_runs(fake: Callable[[Handler], Inspector]) -> None:
    ids = [uuid.UUID(int=n) for n in range(1, 2501)]  # distinct last 8 hex digits
    ids.append(uuid.UUID("ffffffff-ffff-4000-8000-00000000000a"))  # shares 0000000a
    documents = [converter.unstructure(_run(id=i)) for i in ids]
    pages: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        offset, limit = int(request.url.params["offset"]), int(request.url.params["limit"])
        pages.append(offset)
        return _json({"runs": documents[offset : offset + limit]})

    api = fake(handler)
    target = ids[2200]
    assert api.resolve(target.hex[-8:]) == target
    assert pages == [0, 1000, 2000]  # it pages until the end
    assert api.resolve(str(target)) == target  # a whole id needs no search
    assert api.resolve(target.hex.upper()) == target
    with pytest.raises(InspectError, match="2 runs have ids that end with '0000000a'"):
        api.resolve("0000000a")
    with pytest.raises(InspectError, match="no run whose id ends with 'ffffffff'"):
        api.resolve("ffffffff")
    for bad in ("abc", "xyz12345", "", "12 34"):
        with pytest.raises(InspectError, match="is not a run id"):
            api.resolve(bad)


# --- main: exit codes and logging ------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "ls", "--limit", "0"],
        ["run", "ls", "--limit", "1001"],
        ["run", "ls", "--state", "DONE"],
        ["run", "show"],
        ["run", "retry"],
        ["worker", "ls", "--bogus"],
        ["task", "ls", "extra"],
        ["run", "list"],
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "ls"],
        ["run", "show", "0123abcd-0000-4000-8000-000000000001", "--json"],
        ["run", "retry", "0123abcd-0000-4000-8000-000000000001"],
        ["run", "cancel", "0123abcd-0000-4000-8000-000000000001"],
        ["worker", "ls"],
        ["task", "ls", "--json"],
        ["run", "show", "not-an-id"],
    ],
)
def test_errors_exit_1_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main([*argv, "--api-url", url]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    expected = "is not a run id" if "not-an-id" in argv else f"cannot reach {url}"
    assert line.startswith("trio-taskworker: error: ") and expected in line


def test_the_cli_quiets_httpx_request_lines_unless_debugging(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    main(["run", "ls", "--api-url", url])
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("httpcore").level == logging.WARNING
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    main(["--log-level", "DEBUG", "run", "ls", "--api-url", url])
    assert logging.getLogger("httpx").level == logging.NOTSET
    capsys.readouterr()
