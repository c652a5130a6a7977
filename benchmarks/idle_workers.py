"""Many idle TaskWorkers in one process, each with its own websocket to the server.

``python benchmarks/idle_workers.py N`` starts N workers serving ``idle_only``
(a task nobody submits) with ``limit=1``, prints ``ready`` once every one is
subscribed, and stops them all on SIGTERM or SIGINT. The benchmark uses it to
measure what idle connected workers cost the server.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tasks import idle_only

from trio_taskworker import TaskWorker


async def main(n: int) -> None:
    workers = [TaskWorker(idle_only, limit=1, handle_signals=False) for _ in range(n)]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for worker in workers:
                await nursery.start(worker.start)
            print("ready", flush=True)
            async for _ in signals:
                break
            for worker in workers:
                nursery.start_soon(worker.stop)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
