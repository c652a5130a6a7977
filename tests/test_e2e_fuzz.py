"""Schemathesis against a real server process and its own ``/openapi.json``:
every operation, with an API key, from the spec's examples, its boundaries
(coverage) and generated data. No 5xx, every response as documented, and the
server healthy afterwards, running a run to completion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_taskworker import open_client

from . import e2e_tasks as t
from .conftest import Proc, start_server, worker

pytestmark = pytest.mark.e2e

KEY = "fuzz-key-0123456789abcdef"


def schemathesis(url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
         "--header", f"Authorization: Bearer {KEY}",
         # An event stream stays open until the server stops: tests/test_observe.py
         # reads it; here it would only wait out the request timeout.
         "--exclude-path", "/events",
         "--checks", "all",
         "--phases", "examples,coverage,fuzzing",
         "--max-examples", "10",
         "--generation-deterministic",
         "--request-timeout", "20",
         "--no-color"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=workdir,  # its cache directory goes there, not into the repository
    )  # fmt: skip


async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    tmp_path: Path, procs: list[Proc]
) -> None:
    # Waits held one second at most (the schema allows 300): the fuzzer asks for long ones.
    server = start_server(tmp_path / "data", "--max-wait", "1", TRIO_TASKWORKER_SERVER_API_KEY=KEY)
    procs.append(server)
    result = await trio.to_thread.run_sync(schemathesis, server.url, tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    # Every operation was tested, but the event stream.
    assert "18 selected / 19 total" in report
    worker(server, procs, tmp_path, "tests/e2e_tasks.py:add", TRIO_TASKWORKER_API_KEY=KEY)
    async with open_client(server.url, api_key=KEY) as client:
        assert (await client.health())["status"] == "ok"
        assert await (await t.add.delay(20, y=22)).result(timeout=30) == 42
