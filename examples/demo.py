"""The quickstart demo: start a server and a worker, submit runs, print results.

Run it with ``python -m nox -s demo`` (or ``python examples/demo.py`` once the
package is installed). Everything it starts, it stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from demo_tasks import add, divide, word_count  # noqa: E402

from trio_taskworker import gather_results, open_client  # noqa: E402


def start_server(data_dir: str) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "trio_taskworker", "--log-level", "WARNING", "server", "start",
         "--port", "0", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert server.stdout is not None
    line = server.stdout.readline()
    server.stdout.close()
    if "ready at" not in line:
        server.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return server, line.split("ready at ")[1].split()[0]


async def submit_and_print() -> None:
    async with open_client():
        one = await add.delay(1, y=2)
        print("add(1, y=2)             =", await one.result(timeout=30))

        many = await add.map(range(5), range(10, 15))
        print("add.map(0..4, 10..14)   =", await gather_results(many, timeout=30))

        count = await word_count.delay("structured concurrency all the way down")
        print("word_count(...)         =", await count.result(timeout=30))

        bad = await divide.delay(1, 0)
        try:
            await bad.result(timeout=30)
        except ZeroDivisionError as exc:
            run = await bad.wait()
            print(f"divide(1, 0) raised     : ZeroDivisionError({exc}) [run is {run.state}]")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trio-taskworker-demo-") as data_dir:
        server, url = start_server(data_dir)
        print(f"server at {url}, SQLite in {data_dir}")
        os.environ["TRIO_TASKWORKER_API_URL"] = url
        worker = subprocess.Popen(
            [sys.executable, "-m", "trio_taskworker", "--log-level", "WARNING", "task", "serve",
             f"{HERE / 'demo_tasks.py'}:add", f"{HERE / 'demo_tasks.py'}:word_count",
             f"{HERE / 'demo_tasks.py'}:divide", "--limit", "4"],
        )  # fmt: skip
        print(f"worker started (pid {worker.pid})")
        try:
            trio.run(submit_and_print)
        finally:
            for proc, name in ((worker, "worker"), (server, "server")):
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(30)
                print(f"{name} stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
