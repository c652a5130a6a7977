"""Shared fixtures: in-process stores and servers, and real server/worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from trio_taskworker import TaskServer
from trio_taskworker._server import SQLiteStore

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _no_signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's exported signing key must not change the tests (or reach the
    processes they start); the signing tests set it themselves."""
    monkeypatch.delenv("TRIO_TASKWORKER_SIGNING_KEY", raising=False)


@pytest.fixture
async def memory_store(nursery: trio.Nursery) -> SQLiteStore:
    """A SQLite store in memory that runs its SQL on the trio thread (autojump-safe)."""
    store = SQLiteStore(":memory:", threaded=False)
    await nursery.start(store.run)
    return store


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[TaskServer]:
    """A real server (Hypercorn on 127.0.0.1, port 0, SQLite file) in this process."""
    srv = TaskServer(port=0, data_dir=tmp_path / "server")
    await nursery.start(srv.run)
    yield srv
    await srv.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define(eq=False)
class Proc:
    """A child process started with the CLI, stopped by PID at teardown."""

    popen: subprocess.Popen[str]
    log: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def _env(url: str | None = None, **extra: str) -> dict[str, str]:
    """This environment for a child process, without a developer's own
    TRIO_TASKWORKER_* settings (keys, URL), plus ``url`` and ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TRIO_TASKWORKER_") or k == "TRIO_TASKWORKER_HOME"
    }
    env["PYTHONUNBUFFERED"] = "1"
    if url:
        env["TRIO_TASKWORKER_API_URL"] = url
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    """The command line of ``trio-taskworker *args`` in this interpreter."""
    return [sys.executable, "-m", "trio_taskworker", *args]


def start_server(
    data_dir: Path, *args: str, port: int = 0, log_name: str = "server.log", **env: str
) -> Proc:
    """``trio-taskworker server start`` with extra flags and environment; waits for
    its ready line and returns the process with the URL it printed."""
    log = data_dir.parent / log_name
    with open(log, "a") as err:
        popen = subprocess.Popen(
            cli("server", "start", "--port", str(port), "--data-dir", str(data_dir), *args),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_env(**env),
        )
    assert popen.stdout is not None
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        line = popen.stdout.readline()
        if "ready at" in line or not line:
            break
    popen.stdout.close()
    if "ready at" not in line:
        popen.kill()
        popen.wait()
        raise RuntimeError(f"server did not start: {line!r} {log.read_text()}")
    return Proc(popen, log, line.split("ready at ")[1].split()[0])


def start_worker(url: str, *args: str, log: Path, **env: str) -> Proc:
    """``trio-taskworker task serve *args`` against ``url``, from the repository root."""
    with open(log, "a") as out:
        popen = subprocess.Popen(
            cli("task", "serve", *args),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(url, **env),
            cwd=TESTS.parent,
        )
    return Proc(popen, log, url)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes registered here are stopped (by PID) after the test."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def server_proc(tmp_path: Path, procs: list[Proc]) -> Proc:
    """A real server process on a fresh data directory, stopped after the test."""
    proc = start_server(tmp_path / "data")
    procs.append(proc)
    return proc


def worker(server: Proc, procs: list[Proc], tmp_path: Path, *args: str, **env: str) -> Proc:
    """A real worker process for ``server``, stopped after the test."""
    proc = start_worker(server.url, *args, log=tmp_path / f"worker{len(procs)}.log", **env)
    procs.append(proc)
    return proc
