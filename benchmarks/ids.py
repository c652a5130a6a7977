"""What the run ids cost the store as its table grows: random ids against time-ordered ones.

Creates runs through the SQLite store (``Store.create_runs``, on the trio
thread, as the server runs it), in batches of 1,000, into a fresh database
file, once with version 4 (random) UUIDs and once with the store's own ids
(``new_id``: version 7, time-ordered), and prints for each the milliseconds per
batch of the first and of the last ten batches::

    python benchmarks/ids.py [--runs 200000]

The primary key is an index of the ids: random ids land on random pages of
it, and once the index outgrows SQLite's page cache most inserts read a page.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import trio

from trio_taskworker._models import TaskRunCreate
from trio_taskworker._server import _store
from trio_taskworker._server._sqlite import SQLiteStore

BATCH = 1000


async def fill(path: Path, runs: int) -> list[float]:
    """Milliseconds per batch of BATCH creates, in order."""
    payload = b"\x80\x05" + bytes(60)
    creates = [TaskRunCreate(task_key="bench:noop", parameters=payload) for _ in range(BATCH)]
    spent = []
    store = SQLiteStore(path, threaded=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for _ in range(runs // BATCH):
            began = time.perf_counter()
            await store.create_runs(creates, time.time())
            spent.append((time.perf_counter() - began) * 1000)
        nursery.cancel_scope.cancel()
    return spent


def measure(make_id: Callable[[], uuid.UUID], runs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder, mock.patch.object(_store, "new_id", make_id):
        spent = trio.run(fill, Path(folder) / "runs.db", runs)
    return {
        "first_10_ms": round(statistics.mean(spent[:10]), 1),
        "last_10_ms": round(statistics.mean(spent[-10:]), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200_000)
    args = parser.parse_args()
    arms = (("version 4 (random)", uuid.uuid4), ("version 7 (new_id)", _store.new_id))
    for name, make_id in arms:
        result = measure(make_id, args.runs)
        print(
            f"{name}: {result['first_10_ms']} ms per {BATCH} creates at first,"
            f" {result['last_10_ms']} ms at {args.runs:,} runs"
        )


if __name__ == "__main__":
    main()
