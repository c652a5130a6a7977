"""End to end: results awaited one by one come through the client's feed.

Real server and worker processes on 127.0.0.1. A plain script (nothing opened)
awaits 400 results in turn and the server counts its wait requests; a server
killed with SIGKILL and restarted loses its feeds, and the same futures still
give their results, each waited for alone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from trio_taskworker import ServerUnavailable, open_client

from . import e2e_tasks as t
from .conftest import Proc, start_server, worker
from .helpers import wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[1]
TASKS = "tests/e2e_tasks.py"

PLAIN = """
import trio
from tests.e2e_tasks import add

async def main():
    futs = await add.map(range(400))
    values = [await f.result(timeout=60) for f in futs]
    assert values == [i + 1 for i in range(400)], values
    print("sum", sum(values))

trio.run(main)
"""


async def wait_requests(url: str) -> dict[str, float]:
    """The server's ``trio_taskworker_wait_requests_total``, by kind."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    found = re.findall(r'^trio_taskworker_wait_requests_total\{kind="(\w+)"\} (\S+)$', text, re.M)
    return {kind: float(value) for kind, value in found}


async def test_a_plain_script_awaits_results_one_by_one_in_few_requests(
    server_proc: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    worker(server_proc, procs, tmp_path, f"{TASKS}:add", "--limit", "100")
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-X", "dev", "-W", "error", "-c", PLAIN],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, "TRIO_TASKWORKER_API_URL": server_proc.url},
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["sum", str(sum(range(1, 401)))]
    counted = await wait_requests(server_proc.url)
    # Every result came from a page of the feed: none was waited for alone.
    assert counted.get("run", 0) == 0, counted
    assert 1 <= counted["feed"] < 400, counted


async def test_futures_outlive_a_server_killed_with_their_feed(
    tmp_path: Path, procs: list[Proc]
) -> None:
    data = tmp_path / "data"
    server = start_server(data)
    procs.append(server)
    url = server.url
    async with open_client(url) as client:
        futs = await t.add.map(range(30))  # no worker yet: they wait
        async with trio.open_nursery() as nursery:
            failed = trio.Event()

            async def await_first() -> None:
                with pytest.raises(ServerUnavailable):
                    await futs[0].result(timeout=60)
                failed.set()

            nursery.start_soon(await_first)
            await wait_until(lambda: client._feed.polling)  # its poll of the feed is out
            server.signal(signal.SIGKILL)
            await trio.to_thread.run_sync(server.wait)
            with trio.fail_after(30):
                await failed.wait()
        restarted = start_server(data, port=int(url.rsplit(":", 1)[1]), log_name="server2.log")
        procs.append(restarted)
        worker(restarted, procs, tmp_path, f"{TASKS}:add")
        # The new server has no such feed: each run is waited for alone.
        assert [await f.result(timeout=60) for f in futs] == [i + 1 for i in range(30)]
        assert (await wait_requests(url)).get("run") == 30
        # New runs get a new feed, which serves them again.
        more = await t.add.map(range(20))
        assert [await f.result(timeout=60) for f in more] == [i + 1 for i in range(20)]
        assert (await wait_requests(url)).get("run") == 30
