"""Run logs, log_prints, previews and the worker's failure log lines, without a server.

The log shipper's requests are read where they leave it (its ``post`` callable)
and the spawner's reports where they leave the spawner (``report``), so the
order of the two can be checked; times run on trio's autojump clock.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sys
import uuid
from collections.abc import Sequence

import attrs
import pytest
import trio
import trio.testing

import trio_taskworker
from trio_taskworker import (
    ConfigurationError,
    MissingContextError,
    ServerError,
    ServerUnavailable,
    TaskRun,
    TaskRunContext,
    TaskRunState,
    TaskWorker,
    get_run_logger,
    task,
)
from trio_taskworker._context import run_context
from trio_taskworker._definition import UNREPRESENTABLE, preview_call, preview_value
from trio_taskworker._models import (
    MAX_LOG_MESSAGE,
    MAX_LOG_RECORDS,
    MAX_PREVIEW,
    Finished,
    LogRecord,
    option_values,
)
from trio_taskworker._runlog import (
    RUN_LOGGER_NAME,
    LogShipper,
    level_name,
    shorten_message,
)
from trio_taskworker._serialization import dumps_payload
from trio_taskworker._spawner import Spawner
from trio_taskworker.testing import TEST_CLUSTER_URL, open_test_cluster

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


# --- tasks -------------------------------------------------------------------------------


@task
async def chatty(x: int) -> int:
    logger = get_run_logger()
    logger.info("adding %d", x)
    logger.warning("careful with %(what)s", {"what": "this"})
    return x + 1


@task
def sync_chatty(x: int) -> int:
    get_run_logger().error("from a thread: %s", x)
    return x * 2


@task
async def quiet(x: int) -> int:
    return x


@task(log_prints=True)
async def printer(x: int) -> int:
    print("hello", x, sep="-")
    print("to stderr", file=sys.stderr)
    return x


@task(log_prints=True)
def sync_printer(x: int) -> int:
    print("sync hello", x)
    return x


@task
async def plain_printer() -> None:
    print("plain print")


@task
async def fails() -> None:
    raise KeyError("nope")


@task(retries=2, retry_delay_seconds=7)
async def fails_with_retries() -> None:
    raise ValueError("again")


@task
async def excepts() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        get_run_logger().exception("caught it")


@task
async def floods(n: int) -> int:
    logger = get_run_logger()
    for i in range(n):
        logger.info("record %d", i)
    return n


# --- helpers -----------------------------------------------------------------------------


def make_run(t: object, *args: object, attempt: int = 1, **kwargs: object) -> TaskRun:
    key = t.key  # type: ignore[attr-defined]
    return TaskRun(
        id=uuid.uuid4(),
        task_key=key,
        task_name=t.name,  # type: ignore[attr-defined]
        state=TaskRunState.PENDING,
        created_at=NOW,
        scheduled_time=NOW,
        attempt=attempt,
        parameters=dumps_payload((args, kwargs)),
        **option_values(t.options),  # type: ignore[attr-defined]
    )


@attrs.define
class Server:
    """What a fake ``POST /logs`` received, and what the spawner reported, in order."""

    events: list[tuple[str, object]] = attrs.field(factory=list)
    #: Raised by the next posts, one each (then they succeed).
    failures: list[Exception] = attrs.field(factory=list)
    hang: bool = False
    posts: int = 0

    async def post(self, records: Sequence[LogRecord]) -> dict[str, int]:
        self.posts += 1
        assert len(records) <= MAX_LOG_RECORDS
        await trio.sleep(0.01)  # a request takes time
        if self.hang:
            await trio.sleep_forever()
        if self.failures:
            raise self.failures.pop(0)
        self.events.extend(("log", r) for r in records)
        return {"stored": len(records), "dropped": 0, "unknown": 0}

    def report(self, message: object, generation: int | None) -> None:
        self.events.append(("report", message))

    @property
    def records(self) -> list[LogRecord]:
        return [r for kind, r in self.events if kind == "log"]  # type: ignore[misc]


def spawner(server: Server, *tasks: object, **kwargs: object) -> tuple[Spawner, LogShipper]:
    shipper = LogShipper(post=server.post)
    made = Spawner(
        {t.key: t for t in tasks},  # type: ignore[attr-defined]
        10,
        report=server.report,
        request_stop=lambda: None,
        logs=shipper,
        **kwargs,  # type: ignore[arg-type]
    )
    return made, shipper


@contextlib.asynccontextmanager
async def shipping(shipper: LogShipper):  # type: ignore[no-untyped-def]
    async with trio.open_nursery() as nursery:
        await nursery.start(shipper.run)
        yield
        nursery.cancel_scope.cancel()


def record(run_id: uuid.UUID, message: str = "m", attempt: int = 1) -> LogRecord:
    return LogRecord(
        run_id=run_id, attempt=attempt, timestamp=NOW, level="INFO", logger="t", message=message
    )


# --- get_run_logger ----------------------------------------------------------------------


def test_outside_a_run_it_raises_missing_context() -> None:
    with pytest.raises(MissingContextError, match="outside a run") as caught:
        get_run_logger()
    assert isinstance(caught.value, RuntimeError)
    assert "get_run_logger" in trio_taskworker.__all__


async def test_records_reach_the_server_before_the_run_is_reported(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, RUN_LOGGER_NAME)
    server = Server()
    runs, shipper = spawner(server, chatty, sync_chatty)
    async with shipping(shipper):
        a, s = make_run(chatty, 41), make_run(sync_chatty, 4, attempt=3)
        assert (await runs.execute(a)).state is TaskRunState.COMPLETED  # type: ignore[union-attr]
        assert (await runs.execute(s)).state is TaskRunState.COMPLETED  # type: ignore[union-attr]
    kinds = [
        (kind, getattr(item, "run_id", getattr(item, "id", None))) for kind, item in server.events
    ]
    # Each run's records, then its report: GET /runs/{id}/logs after result() sees them.
    assert kinds == [
        ("log", a.id),
        ("log", a.id),
        ("report", a.id),
        ("log", s.id),
        ("report", s.id),
    ]
    first, second, third = server.records
    assert (first.level, first.message, first.attempt) == ("INFO", "adding 41", 1)
    assert (second.level, second.message) == ("WARNING", "careful with this")
    assert (third.level, third.message, third.attempt) == ("ERROR", "from a thread: 4", 3)
    assert third.logger == RUN_LOGGER_NAME and third.timestamp.tzinfo is not None
    # The worker's own log has them too, with the run id in the line and the record.
    ours = [r for r in caplog.records if r.name == RUN_LOGGER_NAME]
    assert [r.getMessage() for r in ours] == [
        f"run {a.id} (chatty): adding 41",
        f"run {a.id} (chatty): careful with this",
        f"run {s.id} (sync_chatty): from a thread: 4",
    ]
    assert ours[2].run_id == str(s.id) and ours[2].attempt == 3  # type: ignore[attr-defined]
    assert ours[0].funcName == "chatty" and ours[2].funcName == "sync_chatty"


async def test_a_run_that_logs_nothing_costs_no_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server()
    runs, shipper = spawner(server, quiet)
    async with shipping(shipper):
        start = trio.current_time()
        await runs.execute(make_run(quiet, 1))
        assert trio.current_time() == start
        await trio.sleep(5)
    assert server.posts == 0 and [k for k, _ in server.events] == ["report"]


async def test_exception_sends_the_traceback(autojump_clock: trio.testing.MockClock) -> None:
    server = Server()
    runs, shipper = spawner(server, excepts)
    async with shipping(shipper):
        await runs.execute(make_run(excepts))
    (sent,) = server.records
    assert sent.level == "ERROR" and sent.message.startswith("caught it\nTraceback")
    assert "ZeroDivisionError: division by zero" in sent.message


async def test_the_logger_level_decides_what_is_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @task
    async def levels() -> None:
        logger = get_run_logger()
        logger.debug("debug")
        logger.log(25, "custom %s", 25)
        logger.log(5, "very low")

    server = Server()
    runs, shipper = spawner(server, levels)
    run_logger = logging.getLogger(RUN_LOGGER_NAME)
    assert run_logger.level == logging.INFO  # taken even when the root is at WARNING
    async with shipping(shipper):
        await runs.execute(make_run(levels))
        run_logger.setLevel(logging.NOTSET)
        try:
            logging.getLogger("trio_taskworker").setLevel(1)
            await runs.execute(make_run(levels))
        finally:
            logging.getLogger("trio_taskworker").setLevel(logging.NOTSET)
            run_logger.setLevel(logging.INFO)
    assert [(r.level, r.message) for r in server.records] == [
        ("WARNING", "custom 25"),
        ("DEBUG", "debug"),
        ("WARNING", "custom 25"),
        ("DEBUG", "very low"),
    ]


async def test_a_hand_made_run_context_logs_locally(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = make_run(quiet, 1)
    with run_context(TaskRunContext(task=quiet, task_run=run)):
        logger = get_run_logger()
        logger.info("local only %s", "yes")
    assert logger.shipper is None
    assert f"run {run.id} (quiet): local only yes" in caplog.messages
    with (
        run_context(TaskRunContext(task=quiet, task_run=None)),
        pytest.raises(MissingContextError),
    ):
        get_run_logger()


def test_level_names_and_shortening() -> None:
    assert [level_name(n) for n in (0, 10, 15, 20, 25, 31, 50, 99)] == [
        "DEBUG", "DEBUG", "INFO", "INFO", "WARNING", "WARNING", "CRITICAL", "CRITICAL",
    ]  # fmt: skip
    assert shorten_message("short") == "short"
    exact = "x" * MAX_LOG_MESSAGE
    assert shorten_message(exact) == exact
    for n in (MAX_LOG_MESSAGE + 1, 10 * MAX_LOG_MESSAGE):
        cut = shorten_message("y" * n)
        assert len(cut) <= MAX_LOG_MESSAGE and cut.startswith("y" * 1000)
        kept = cut.index(" ... [")
        assert cut.endswith(f" ... [{n - kept} more characters cut]")
    assert shorten_message("a\udcff") == "a\\udcff"
    assert len(shorten_message("\udcff" * MAX_LOG_MESSAGE)) <= MAX_LOG_MESSAGE


# --- log_prints ----------------------------------------------------------------------------


async def test_log_prints_sends_prints_to_the_run_logger(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    server = Server()
    runs, shipper = spawner(server, printer, sync_printer, plain_printer)
    async with shipping(shipper):
        await runs.execute(make_run(printer, 7))
        await runs.execute(make_run(sync_printer, 8))
        await runs.execute(make_run(plain_printer))
        print("outside any run")
    assert [(r.level, r.message) for r in server.records] == [
        ("INFO", "hello-7"),
        ("INFO", "sync hello 8"),
    ]
    out, err = capsys.readouterr()
    assert "hello" not in out and "plain print" in out and "outside any run" in out
    assert "to stderr" in err


async def test_log_prints_option_and_worker_default(
    autojump_clock: trio.testing.MockClock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = Server()
    turned_off = printer.with_options(log_prints=False)
    runs, shipper = spawner(server, plain_printer.with_options(log_prints=True))
    defaulted, default_shipper = spawner(server, plain_printer, log_prints=True)
    off, off_shipper = spawner(server, turned_off, log_prints=True)
    async with shipping(shipper), shipping(default_shipper), shipping(off_shipper):
        await runs.execute(make_run(plain_printer))
        await defaulted.execute(make_run(plain_printer))
        await off.execute(make_run(printer, 1))
    assert [r.message for r in server.records] == ["plain print", "plain print"]
    assert "hello-1" in capsys.readouterr().out
    with pytest.raises(ConfigurationError, match="log_prints"):
        task(log_prints="yes")(quiet.fn)
    monkeypatch.setenv("TRIO_TASKWORKER_LOG_PRINTS", "maybe")
    with pytest.raises(ConfigurationError, match="TRIO_TASKWORKER_LOG_PRINTS"):
        TaskWorker(quiet)
    monkeypatch.setenv("TRIO_TASKWORKER_LOG_PRINTS", "1")
    worker = TaskWorker(quiet)
    assert worker.execute_task_run is not None
    with pytest.raises(ConfigurationError, match="log_prints"):
        TaskWorker(quiet, log_prints="on")  # type: ignore[arg-type]


def test_print_keeps_its_own_errors() -> None:
    with pytest.raises(TypeError):
        print("x", sep=3)  # type: ignore[call-overload]


# --- failures, counters, previews ----------------------------------------------------------


async def test_failures_are_logged_with_traceback_and_counted(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    worker = TaskWorker(fails, fails_with_retries, quiet)
    failing = make_run(fails)
    retried = make_run(fails_with_retries)
    last = attrs.evolve(make_run(fails_with_retries), retry_count=2, attempt=3)
    assert await worker.execute_task_run(failing) is TaskRunState.FAILED
    assert await worker.execute_task_run(retried) is TaskRunState.FAILED
    assert await worker.execute_task_run(last) is TaskRunState.FAILED
    assert await worker.execute_task_run(make_run(quiet, 1)) is TaskRunState.COMPLETED
    lines = [
        r for r in caplog.records if r.name == "trio_taskworker._spawner" and "failed" in r.msg
    ]
    assert [(r.levelno, str(r.args[0])) for r in lines] == [  # type: ignore[index]
        (logging.ERROR, str(failing.id)),
        (logging.WARNING, str(retried.id)),
        (logging.ERROR, str(last.id)),
    ]
    assert all(r.exc_info for r in lines)
    assert [r.run_id for r in lines] == [str(failing.id), str(retried.id), str(last.id)]  # type: ignore[attr-defined]
    assert "KeyError: 'nope'" in caplog.text and "retry 1 of 2 in 7 s" in caplog.text
    assert "no retries left" in caplog.text
    assert worker.failed_task_runs == {fails.key: 1, fails_with_retries.key: 2, quiet.key: 0}
    assert worker.status()["failed"] == {fails.key: 1, fails_with_retries.key: 2}
    assert worker.status()["finished"] == {fails.key: 1, fails_with_retries.key: 2, quiet.key: 1}


def test_the_package_logger_has_only_a_null_handler() -> None:
    handlers = logging.getLogger("trio_taskworker").handlers
    assert [type(h) for h in handlers] == [logging.NullHandler]


class Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_parameters_preview() -> None:
    @task
    def f(x: int, y: str = "d", *rest: object, **options: object) -> None: ...

    create, _ = f.run_create((1, "abc"), {})
    assert create.parameters_preview == "x=1, y='abc'"
    create, _ = f.run_create((1, "a", 2, 3), {"k": Unrepresentable()})
    assert create.parameters_preview == "x=1, y='a', rest=(2, 3), options={'k': <unrepresentable>}"
    create, _ = f.run_create((list(range(1000)),), {})
    assert create.parameters_preview == "x=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...]"
    huge = preview_call({f"p{i}": "z" * 500 for i in range(100)})
    assert len(huge) == MAX_PREVIEW and huge.endswith("...")
    assert preview_value(Unrepresentable()) == UNREPRESENTABLE

    # reprlib picks its method by the type's name, and then calls len() itself.
    posing = type("list", (), {"__len__": lambda self: 1 // 0})()
    assert preview_value(posing) == UNREPRESENTABLE


async def test_result_preview() -> None:
    @task
    async def give(x: object) -> object:
        return x

    server = Server()
    runs, _ = spawner(server, give)
    for value, preview in [({"a": 1}, "{'a': 1}"), (Unrepresentable(), UNREPRESENTABLE)]:
        await runs.execute(make_run(give, value))
        finished = server.events[-1][1]
        assert isinstance(finished, Finished) and finished.result_preview == preview
    await runs.execute(make_run(fails))
    failed = server.events[-1][1]
    assert isinstance(failed, Finished) and failed.result_preview is None


# --- the shipper ---------------------------------------------------------------------------


async def test_batches_by_size_and_by_time(autojump_clock: trio.testing.MockClock) -> None:
    server = Server()
    shipper = LogShipper(post=server.post)
    run_id = uuid.uuid4()
    async with shipping(shipper):
        start = trio.current_time()
        for i in range(99):
            shipper.add(record(run_id, str(i)))
        await trio.sleep(0.4)
        assert server.posts == 0  # not yet: fewer than a batch
        await trio.sleep(0.2)
        assert server.posts == 1 and len(server.records) == 99
        for i in range(2500):
            shipper.add(record(run_id, str(i)))
        await trio.sleep(0.1)
        # A full batch goes at once, in requests of at most MAX_LOG_RECORDS.
        assert len(server.records) == 99 + 2500 and server.posts == 4
        assert trio.current_time() - start == pytest.approx(0.7)
    assert [r.message for r in server.records][99:102] == ["0", "1", "2"]


async def test_failed_posts_are_retried_then_dropped_with_one_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_taskworker._runlog")
    server = Server(failures=[ServerUnavailable("down"), ServerError(503, "busy")])
    shipper = LogShipper(post=server.post)
    run_id = uuid.uuid4()
    async with shipping(shipper):
        shipper.add(record(run_id, "one"))
        await shipper.flush_run(run_id, 1)
        assert [r.message for r in server.records] == ["one"] and server.posts == 3
        server.failures = [ServerUnavailable("down")] * 8
        for message in ("two", "three"):
            shipper.add(record(run_id, message))
            await shipper.flush_run(run_id, 1)
        assert server.posts == 3 + 8 and shipper.dropped == 2
        shipper.add(record(run_id, "four"))
        await shipper.flush_run(run_id, 1)
        # A refusal that will not pass is not retried.
        server.failures = [ServerError(422, "bad batch")]
        shipper.add(record(run_id, "five"))
        await shipper.flush_run(run_id, 1)
        assert server.posts == 3 + 8 + 2
    assert [r.message for r in server.records] == ["one", "four"]
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.endswith("_runlog")]
    later = "dropped; further losses are counted until the server takes them again"
    assert said == [
        (logging.WARNING, f"could not send 1 run log records (down): {later}"),
        (logging.INFO, "run logs reach the server again (1 more records were lost meanwhile)"),
        (
            logging.WARNING,
            f"could not send 1 run log records (server answered 422: bad batch): {later}",
        ),
    ]


async def test_a_hung_server_delays_a_run_only_by_the_flush_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(hang=True)
    runs, shipper = spawner(server, chatty)
    async with shipping(shipper):
        start = trio.current_time()
        report = await runs.execute(make_run(chatty, 1))
        assert report.state is TaskRunState.COMPLETED  # type: ignore[union-attr]
        assert trio.current_time() - start == pytest.approx(shipper.flush_timeout, abs=0.1)


async def test_an_unexpected_error_does_not_stop_the_shipper(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(failures=[RuntimeError("a bug")])
    shipper = LogShipper(post=server.post)
    run_id = uuid.uuid4()
    async with shipping(shipper):
        shipper.add(record(run_id, "lost"))
        await shipper.flush_run(run_id, 1)
        shipper.add(record(run_id, "kept"))
        await shipper.flush_run(run_id, 1)
    assert [r.message for r in server.records] == ["kept"]
    assert "sending run logs failed; 1 records dropped" in caplog.text


async def test_a_full_buffer_drops_the_oldest_and_says_so(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server()
    shipper = LogShipper(post=server.post, max_records=10, batch=1000)
    a, b = uuid.uuid4(), uuid.uuid4()
    for i in range(20):
        shipper.add(record(a, f"a{i}"))
    for i in range(5):
        shipper.add(record(b, f"b{i}", attempt=2))
    assert shipper.buffered == 10 and shipper.dropped == 15
    async with shipping(shipper):
        await shipper.flush_run(b, 2)
    note, *kept = server.records
    assert (note.run_id, note.level) == (a, "WARNING")
    assert note.message.startswith("15 log records of this run were dropped by the worker")
    assert [r.message for r in kept] == [
        *(f"a{i}" for i in range(15, 20)),
        *(f"b{i}" for i in range(5)),
    ]
    assert "the run log buffer was full (10 records): dropped the 15 oldest" in caplog.text
    # Bounded in characters too.
    small = LogShipper(post=server.post, max_chars=100)
    for _ in range(5):
        small.add(record(a, "x" * 40))
    assert small.buffered == 2 and small.dropped == 3


async def test_flush_run_returns_at_once_when_not_running() -> None:
    shipper = LogShipper()
    run_id = uuid.uuid4()
    shipper.add(record(run_id))
    with trio.fail_after(1):
        await shipper.flush_run(run_id, 1)
    await shipper.close(timeout=1)  # no post: the records are dropped
    assert shipper.buffered == 0 and shipper.dropped == 1


async def test_adds_from_threads_wake_the_shipper() -> None:
    # Real time (an autojump clock would move on while the thread runs): with
    # an hour between passes, only the thread's wake-up can send the records.
    server = Server()
    sent = trio.Event()

    async def post(records: Sequence[LogRecord]) -> object:
        answer = await server.post(records)
        sent.set()
        return answer

    shipper = LogShipper(post=post, interval=3600)
    run_id = uuid.uuid4()

    def many() -> None:
        for i in range(150):
            shipper.add(record(run_id, str(i)))

    async with shipping(shipper):
        await trio.to_thread.run_sync(many)
        with trio.fail_after(10):
            await sent.wait()
    assert len(server.records) >= 100


# --- through the in-process cluster (the real server handlers) ----------------------------


async def test_the_cluster_stores_a_runs_logs_and_previews(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(chatty, printer, fails) as cluster:
        future = await chatty.delay(41)
        assert await future.result() == 42
        printed = await printer.delay(5)
        await printed.result()
        await (await fails.delay()).wait()
        async with cluster.server.open_http(TEST_CLUSTER_URL) as http:
            logs = (await http.get(f"/runs/{future.task_run_id}/logs")).json()
            run = (await http.get(f"/runs/{future.task_run_id}")).json()
            printed_logs = (await http.get(f"/runs/{printed.task_run_id}/logs")).json()
        assert [(r["level"], r["message"]) for r in logs["logs"]] == [
            ("INFO", "adding 41"),
            ("WARNING", "careful with this"),
        ]
        assert [r["message"] for r in printed_logs["logs"]] == ["hello-5"]
        assert (run["parameters_preview"], run["result_preview"]) == ("x=41", "42")
        assert cluster.worker.failed_task_runs[fails.key] == 1


async def test_close_waits_for_the_batch_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    server = Server()

    started: list[int] = []

    async def post(records: Sequence[LogRecord]) -> object:
        started.append(len(records))
        await trio.sleep(0.01 * len(records))  # a big batch takes longer than a small one
        return await server.post(records)

    shipper = LogShipper(post=post)
    run_id = uuid.uuid4()
    async with shipping(shipper):
        for i in range(100):  # a full batch: the loop starts sending it at once
            shipper.add(record(run_id, f"first {i}"))
        await trio.testing.wait_all_tasks_blocked()
        assert started == [100] and not server.records  # in flight
        shipper.add(record(run_id, "last"))
        await shipper.close()
    messages = [r.message for r in server.records]
    assert messages == [*(f"first {i}" for i in range(100)), "last"]


async def test_an_idle_shipper_sets_no_timer(autojump_clock: trio.testing.MockClock) -> None:
    # A worker with nothing to send must not wake every half second (a long
    # stretch of virtual time would cost a wake-up per tick).
    server = Server()
    shipper = LogShipper(post=server.post)
    async with shipping(shipper):
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == math.inf
        shipper.add(record(uuid.uuid4()))
        await trio.sleep(1)
        assert server.posts == 1
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == math.inf
