"""End to end, hardening: what a second server, a broken file or a hostile client
cannot do to a real server process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_taskworker import ConfigurationError, TaskServer, open_client

from . import e2e_tasks as t
from .conftest import Proc, start_server, start_worker

pytestmark = pytest.mark.e2e


def server_cli(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_taskworker", "server", "start", "--port", "0",
         "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


async def test_a_second_server_on_one_data_directory_exits_naming_the_first(
    tmp_path: Path, procs: list[Proc]
) -> None:
    first = start_server(tmp_path / "data")
    procs.append(first)
    worker = start_worker(first.url, "tests/e2e_tasks.py:add", log=tmp_path / "worker.log")
    procs.append(worker)
    second = await trio.to_thread.run_sync(server_cli, tmp_path / "data")
    assert second.returncode == 1
    (line,) = second.stderr.strip().splitlines()
    assert "is in use by another server" in line and f"pid {first.pid} " in line
    # The first server and its worker never noticed.
    async with open_client(first.url):
        assert await (await t.add.delay(1, y=2)).result(timeout=30) == 3


async def test_a_corrupt_database_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "runs.sqlite3").write_bytes(b"this is not a database" * 500)
    result = await trio.to_thread.run_sync(server_cli, data)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "runs.sqlite3 is not a usable SQLite database" in line


async def test_two_servers_in_one_process_on_one_directory(tmp_path: Path) -> None:
    first = TaskServer(port=0, data_dir=tmp_path / "data")
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        with pytest.raises(ConfigurationError, match="in use by another server"):
            await TaskServer(port=0, data_dir=tmp_path / "data").run()
        await first.stop()
    # Once the first has returned, the directory is free again.
    again = TaskServer(port=0, data_dir=tmp_path / "data")
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        await again.stop()
