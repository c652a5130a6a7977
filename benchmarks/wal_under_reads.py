"""Does the write-ahead log still start over while reads run back to back?

Creates runs one at a time through the SQLite store (on the trio thread, as
the server runs it) for a few seconds, while two tasks read back to back on
the store's read connection, each read holding its snapshot for 50 ms (as a
count over a large table does), and prints how many runs were created, how
many checkpoints the writer made, the largest size the log's file reached,
how many reads were done and how long a read waited for its turn (its time
less the 50 ms)::

    python benchmarks/wal_under_reads.py [--seconds 4]

A checkpoint made while a read holds a snapshot cannot let the log start
over; if the writer made them regardless, the log would grow and the writer
would checkpoint after nearly every batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import percentiles

from trio_taskworker._models import TaskRunCreate
from trio_taskworker._server import _sqlite
from trio_taskworker._server._sqlite import SQLiteStore


def slow_count(cur: Any) -> None:
    cur.execute("SELECT COUNT(*) FROM task_runs")
    cur.fetchone()
    time.sleep(0.05)  # in the reader's thread: the snapshot is held meanwhile


async def measure(path: Path, seconds: float) -> None:
    checkpoints = 0
    checkpoint = _sqlite._checkpoint

    def counted(conn: Any) -> bool:
        nonlocal checkpoints
        checkpoints += 1
        return checkpoint(conn)

    _sqlite._checkpoint = counted
    store = SQLiteStore(path, threaded=False)
    log = Path(f"{path}-wal")
    created = largest = 0
    waits: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        stop = trio.current_time() + seconds

        async def reader() -> None:
            while trio.current_time() < stop:
                began = time.perf_counter()
                await store.runner.read(slow_count)
                waits.append(time.perf_counter() - began - 0.05)
                await trio.sleep(0.001)

        nursery.start_soon(reader)
        nursery.start_soon(reader)
        run = TaskRunCreate(task_key="bench:noop", parameters=bytes(200))
        while trio.current_time() < stop:
            await store.create_runs([run], time.time())
            created += 1
            largest = max(largest, _sqlite._size(log))  # (a stat, as the writer does)
        nursery.cancel_scope.cancel()
    wait = percentiles(waits)
    print(
        f"{created:,} runs created, {checkpoints:,} checkpoints,"
        f" largest log {largest / 2**20:.1f} MiB; {len(waits)} reads, waiting"
        f" p50 {wait['p50_ms']} ms, p99 {wait['p99_ms']} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        trio.run(measure, Path(folder) / "runs.sqlite", args.seconds)


if __name__ == "__main__":
    main()
