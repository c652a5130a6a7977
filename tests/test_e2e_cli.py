"""End to end, the observing commands: a real server process, a real worker
process, and ``trio-taskworker run ls|show|retry|cancel``, ``worker ls`` and
``task ls`` run as a user would, in their text and JSON forms, and their
one-line errors."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_taskworker import TaskRunState, open_client
from trio_taskworker._cli import load_entrypoint

from .conftest import TESTS, Proc, _env, cli, free_port, start_server, worker
from .helpers import wait_for_runs

pytestmark = pytest.mark.e2e

#: The tasks the worker serves, written to a file for each test.
TASKS = '''
import trio
from pathlib import Path

from trio_taskworker import get_run_logger, task


@task(tags=["nightly"])
async def greet(name: str) -> str:
    log = get_run_logger()
    log.info("hello %s", name)
    log.warning("two lines\\nand an escape \\x1b[31m")
    return f"hi {name}"


@task
def fail_once(marker: str) -> str:
    """Fail the first time (no retries), succeed when run again."""
    if not Path(marker).exists():
        Path(marker).write_text("failed once")
        raise ValueError("the first attempt fails")
    get_run_logger().info("second time lucky")
    return "second time"


@task
async def wait_for_file(path: str) -> str:
    while not Path(path).exists():
        await trio.sleep(0.01)
    return Path(path).read_text()
'''


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), capture_output=True, text=True, timeout=60, env=_env(**env), cwd=TESTS.parent
    )


def ok(*args: str, **env: str) -> str:
    """stdout of a command that must succeed quietly (no log line per request)."""
    result = run_cli(*args, **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def error_line(*args: str, **env: str) -> str:
    """The one stderr line of a command that must exit 1."""
    result = run_cli(*args, **env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("trio-taskworker: error: ")
    return line.removeprefix("trio-taskworker: error: ")


def reader_gone(*args: str) -> tuple[int, str]:
    """The exit code and stderr of a command whose stdout reader closed first."""
    with subprocess.Popen(
        cli(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=TESTS.parent,
    ) as piped:
        assert piped.stdout is not None and piped.stderr is not None
        piped.stdout.close()  # before the command has even started
        return piped.wait(60), piped.stderr.read()


def as_json(*args: str) -> Any:
    return json.loads(ok(*args, "--json"))


async def async_cli(*args: str) -> str:
    return await trio.to_thread.run_sync(lambda: ok(*args))


async def test_see_runs_workers_and_tasks_retry_and_cancel_from_the_cli(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    tasks_file = tmp_path / "cli_tasks.py"
    tasks_file.write_text(TASKS)
    entry = [f"{tasks_file}:{name}" for name in ("greet", "fail_once", "wait_for_file")]
    greet, fail_once, waiter = (load_entrypoint(e) for e in entry)
    served = worker(server_proc, procs, tmp_path, *entry)
    url = server_proc.url
    api = ("--api-url", url)
    gate = tmp_path / "gate"

    async with open_client(url) as client:
        greeted = await greet.delay("world")
        assert await greeted.result(timeout=30) == "hi world"
        failing = await fail_once.delay(str(tmp_path / "marker"))
        with pytest.raises(ValueError, match="the first attempt fails"):
            await failing.result(timeout=30)
        waiting = await waiter.delay(str(gate))
        await wait_for_runs(client, [waiting], TaskRunState.RUNNING)
        ids = [str(f.task_run_id) for f in (waiting, failing, greeted)]  # newest first

        # run ls: a header and one line per run, newest first, in 80 columns.
        header, *rows = ok("run", "ls", *api).splitlines()
        assert header.split() == ["ID", "TASK", "STATE", "ATTEMPT", "CREATED", "DURATION"]
        # The last 8 hex digits: these runs were made within a second, and
        # a run id begins with its creation time.
        assert [row[:8] for row in rows] == [i[-8:] for i in ids]
        assert [row.split()[2] for row in rows] == ["RUNNING", "FAILED", "COMPLETED"]
        assert all(len(line) <= 80 for line in [header, *rows])
        assert rows[2].split()[1].endswith(":greet")

        # A reader that goes away first (``run ls | head``) gets no error line.
        assert await trio.to_thread.run_sync(reader_gone, "run", "ls", *api) == (0, "")

        listed = as_json("run", "ls", *api)["runs"]
        assert [r["id"] for r in listed] == ids
        assert [r["task_key"] for r in listed] == [waiter.key, fail_once.key, greet.key]
        assert [r["attempt"] for r in listed] == [1, 1, 1]
        assert {"state", "created_at", "started_at", "finished_at", "tags"} <= set(listed[0])
        assert "parameters" not in listed[0]
        (failed,) = as_json("run", "ls", "--state", "failed", *api)["runs"]
        assert failed["id"] == ids[1] and failed["state"] == "FAILED"
        (tagged,) = as_json("run", "ls", "--tag", "nightly", *api)["runs"]
        assert tagged["id"] == ids[2] and tagged["tags"] == ["nightly"]
        (by_key,) = as_json("run", "ls", "--task", waiter.key, *api)["runs"]
        assert by_key["id"] == ids[0]
        assert [r["id"] for r in as_json("run", "ls", "--limit", "2", *api)["runs"]] == ids[:2]

        # run show: history, result preview and logs, by short id as run ls shows it.
        shown = ok("run", "show", ids[2][-8:], *api)
        assert f"run {ids[2]}" in shown
        assert "result_preview       'hi world'" in shown
        assert "name='world'" in shown  # the parameters' preview; the pickle is not shown
        history = [line.split()[2] for line in shown.split("history")[1].splitlines()[1:5]]
        assert history == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
        assert "INFO     #1" in shown and "hello world" in shown
        assert "two lines\n" in shown and "and an escape \\x1b[31m" in shown
        assert "\x1b" not in shown

        report = as_json("run", "show", ids[1], *api)
        assert report["id"] == ids[1] and report["state"] == "FAILED"
        assert report["error"]["type"].endswith("ValueError")
        assert report["error"]["message"] == "the first attempt fails"
        assert 'raise ValueError("the first attempt fails")' in report["error"]["traceback"]
        assert [h["state"] for h in report["history"]][-1] == "FAILED"
        assert all({"timestamp", "state", "attempt"} <= set(h) for h in report["history"])
        assert "parameters" not in report and "result" not in report
        traceback_text = ok("run", "show", ids[1], *api)
        assert "Traceback (most recent call last):" in traceback_text
        assert "ValueError: the first attempt fails" in traceback_text

        # worker ls and task ls, while one run is in flight.
        (seen,) = as_json("worker", "ls", *api)["workers"]
        assert sorted(seen["task_keys"]) == sorted([greet.key, fail_once.key, waiter.key])
        assert seen["limit"] == 10 and seen["in_flight"] == 1 and not seen["draining"]
        header, row = ok("worker", "ls", *api).splitlines()
        assert header.split()[:3] == ["CONN", "CLIENT", "ID"]
        assert row.startswith(seen["connection_id"][-8:]) and len(row) <= 80
        stats = {t["task_key"]: t for t in as_json("task", "ls", *api)["tasks"]}
        assert stats[greet.key]["completed_last_hour"] == 1
        assert stats[fail_once.key]["failed_last_hour"] == 1
        assert stats[waiter.key]["running"] == 1 and stats[waiter.key]["queued"] == 0
        table = ok("task", "ls", *api).splitlines()
        assert table[0].split()[0] == "TASK" and all(len(line) <= 80 for line in table)
        assert len(table) == 1 + len(stats)

        # run retry: the failed run goes back to the queue and runs as attempt 2.
        assert ok("run", "retry", ids[1][-8:], *api).strip() == f"run {ids[1]} is SCHEDULED"
        assert await failing.result(timeout=30) == "second time"
        again = as_json("run", "show", ids[1], *api)
        assert again["state"] == "COMPLETED" and again["attempt"] == 2
        assert [h["attempt"] for h in again["history"]][-1] == 2
        assert any("second time lucky" in r["message"] for r in again["logs"])
        refused = error_line("run", "retry", ids[2], *api)
        assert refused.startswith(f"cannot retry run {ids[2]}: it is COMPLETED")

        # run cancel, and a second cancel of the ended run.
        cancelled = await async_cli("run", "cancel", ids[0], *api)
        assert cancelled.strip() in (f"run {ids[0]} is {s}" for s in ("CANCELLING", "CANCELLED"))
        assert (await waiting.wait(timeout=30)).state is TaskRunState.CANCELLED
        assert error_line("run", "cancel", ids[0], *api).startswith(
            f"cannot cancel run {ids[0]}: it is CANCELLED"
        )

        # Unknown runs, whole or short.
        unknown = str(uuid.uuid4())
        assert error_line("run", "show", unknown, *api) == f"no run {unknown} on {url} (404)"
        assert error_line("run", "retry", unknown, *api) == f"no run {unknown} on {url} (404)"
        assert "no run whose id ends with" in error_line("run", "show", "ffffffff", *api)
    assert served.popen.poll() is None


ADMIN_KEY = "cli-admin-0123456789abcdef"
SUBMIT_KEY = "cli-submit-0123456789abcdef"


def test_error_exits_unreachable_server_keys_and_usage(tmp_path: Path, procs: list[Proc]) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    for command in (["run", "ls"], ["worker", "ls"], ["task", "ls"], ["run", "show", "abcd1234"]):
        line = error_line(*command, "--api-url", nowhere)
        assert line.startswith(f"cannot reach {nowhere}: ConnectError")
    # The URL may come from the environment, as for workers.
    assert error_line("task", "ls", TRIO_TASKWORKER_API_URL=nowhere).startswith(
        f"cannot reach {nowhere}"
    )

    server = start_server(
        tmp_path / "data",
        TRIO_TASKWORKER_SERVER_API_KEY=f"{ADMIN_KEY}:admin,{SUBMIT_KEY}:submit",
    )
    procs.append(server)
    api = ("--api-url", server.url)
    for command in (["run", "ls"], ["worker", "ls"], ["task", "ls"]):
        missing = error_line(*command, *api)
        assert missing.startswith("server answered 401: ")
        assert missing.endswith("set TRIO_TASKWORKER_API_KEY to a key with the admin role")
        weak = error_line(*command, *api, TRIO_TASKWORKER_API_KEY=SUBMIT_KEY)
        assert weak.startswith("server answered 403: ")
        assert weak.endswith("needs a key with the admin role")
        ok(*command, *api, TRIO_TASKWORKER_API_KEY=ADMIN_KEY)
    unknown = str(uuid.uuid4())
    missing = error_line("run", "show", unknown, *api)
    assert missing.startswith("server answered 401: ") and missing.endswith("submit role")
    assert (
        error_line("run", "show", unknown, *api, TRIO_TASKWORKER_API_KEY=SUBMIT_KEY)
        == f"no run {unknown} on {server.url} (404)"
    )
    assert "is not a run id" in error_line("run", "show", "not-a-run", *api)
    assert SUBMIT_KEY not in server.output() and ADMIN_KEY not in server.output()

    usage = run_cli("run", "ls", "--limit", "many", *api)
    assert usage.returncode == 2 and "usage:" in usage.stderr
