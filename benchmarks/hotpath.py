"""Quick measures for before/after comparisons, against a running server.

Start a server and a worker first, then run this with the server's URL::

    python -m trio_taskworker server start --port 8765 --data-dir /tmp/hot &
    export TRIO_TASKWORKER_API_URL=http://127.0.0.1:8765
    python -m trio_taskworker task serve benchmarks/bench_tasks.py:noop_async --limit 100 &
    python benchmarks/hotpath.py batch 20000    # map in requests of 1,000, then gather_results
    python benchmarks/hotpath.py latency 1000   # one run at a time; percentiles from histories
    python benchmarks/hotpath.py latency 600 sleep  # the same, sleeping 8 ms instead of waiting
    python benchmarks/hotpath.py queue 1000000  # queue runs of a task no worker serves
    python benchmarks/hotpath.py monitor 3      # GET /health, /tasks, /metrics 3 times each,
                                                # probing GET /workers every 10 ms meanwhile

``latency`` reads each run's state history and prints, in milliseconds, the
medians and tails of created->leased (SCHEDULED->PENDING), leased->started
(PENDING->RUNNING) and created->started, leaving out the first 20 runs.
``monitor`` shows whether the reads that monitoring makes (counts over the
whole table) hold up the server: with a large queue each takes long, and a
trivial request made meanwhile should not wait for it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import percentiles
from bench_tasks import never_served, noop_async

from trio_taskworker import gather_results, open_client


async def submit(task, n: int) -> list:  # type: ignore[no-untyped-def]
    """``map`` in requests of 1,000 runs."""
    futures = []
    for start in range(0, n, 1000):
        futures += await task.map(range(start, min(n, start + 1000)))
    return futures


async def batch(n: int) -> None:
    async with open_client():
        await gather_results(await noop_async.map(range(500)))  # warm up
        began = time.perf_counter()
        values = await gather_results(await submit(noop_async, n), timeout=600)
        assert values == list(range(n))
        print(f"batch async {n} runs: {n / (time.perf_counter() - began):.0f} runs/s")


async def latency(n: int, sleep: bool = False) -> None:
    async with open_client():
        ids = []
        for i in range(n):
            future = await noop_async.delay(i)
            if sleep:  # no request of the caller's in flight while the run starts
                await trio.sleep(0.008)
            else:
                await future.result(timeout=60)
            ids.append(future.task_run_id)
    spans: dict[str, list[float]] = {"created->leased": [], "leased->started": []}
    spans["created->started"] = []
    async with httpx.AsyncClient(base_url=os.environ["TRIO_TASKWORKER_API_URL"]) as http:
        for run_id in ids[20:]:
            history = (await http.get(f"/runs/{run_id}/history")).json()["history"]
            at = {
                change["state"]: datetime.datetime.fromisoformat(change["timestamp"])
                for change in history
            }
            spans["created->leased"].append(_seconds(at, "SCHEDULED", "PENDING"))
            spans["leased->started"].append(_seconds(at, "PENDING", "RUNNING"))
            spans["created->started"].append(_seconds(at, "SCHEDULED", "RUNNING"))
    for name, values in spans.items():
        print(f"{name:18s} {_shown(values)}")


async def queue(n: int) -> None:
    async with open_client():
        await submit(never_served, n)


async def monitor(rounds: int) -> None:
    url = os.environ["TRIO_TASKWORKER_API_URL"]
    probes: list[float] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as heavy,
        httpx.AsyncClient(base_url=url, timeout=120) as light,
    ):
        done = trio.Event()

        async def probe() -> None:
            while not done.is_set():
                began = time.perf_counter()
                (await light.get("/workers")).raise_for_status()
                probes.append(time.perf_counter() - began)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            for _ in range(rounds):
                for path in ("/health", "/tasks", "/metrics"):
                    began = time.perf_counter()
                    (await heavy.get(path)).raise_for_status()
                    print(f"GET {path}: {(time.perf_counter() - began) * 1000:.0f} ms")
            done.set()
    print(f"GET /workers meanwhile ({len(probes)} requests): {_shown(probes)}")


def _seconds(at: dict[str, datetime.datetime], first: str, then: str) -> float:
    return (at[then] - at[first]).total_seconds()


def _shown(seconds: list[float]) -> str:
    return "  ".join(f"{name[:-3]} {ms:.2f} ms" for name, ms in percentiles(seconds).items())


def main() -> None:
    what, n = sys.argv[1], int(sys.argv[2])
    if what == "latency":
        trio.run(latency, n, sys.argv[3:] == ["sleep"])
    elif what in ("monitor", "queue"):
        trio.run({"monitor": monitor, "queue": queue}[what], n)
    else:
        trio.run(batch, n)


if __name__ == "__main__":
    main()
