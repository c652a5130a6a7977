"""Benchmark: end-to-end runs/s, map submission rate, and submit-to-start latency.

Starts a real server process (SQLite in a temporary folder) and a real worker
process, both on 127.0.0.1, drives them from this process, stops both, and
prints one JSON document. Usage: ``python benchmarks/bench.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_tasks import never_served, noop_async, noop_sync  # noqa: E402

import trio_taskworker  # noqa: E402
from trio_taskworker import open_client  # noqa: E402

BATCH = 1000


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trio_taskworker", "--log-level", "WARNING", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100)
    return {
        "p50_ms": round(cuts[49] * 1000, 2),
        "p90_ms": round(cuts[89] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def submit_all(task, n: int) -> list:  # type: ignore[no-untyped-def]
    futures = []
    for start_at in range(0, n, BATCH):
        futures += await task.map(range(start_at, min(n, start_at + BATCH)))
    return futures


async def end_to_end(client, task, n: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    futures = await submit_all(task, n)
    submitted = time.perf_counter()
    runs = await client.wait_runs([f.task_run_id for f in futures], timeout=600)
    finished = time.perf_counter()
    assert all(r.state is trio_taskworker.TaskRunState.COMPLETED for r in runs)
    values = [await client.load_result(r) for r in runs[:10]]
    assert values == list(range(10))
    return {
        "runs": n,
        "seconds": round(finished - began, 3),
        "runs_per_second": round(n / (finished - began), 1),
        "submit_seconds": round(submitted - began, 3),
    }


async def latency(client, task, n: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """One run at a time: submit, wait for the result; server times give submit->start."""
    to_start: list[float] = []
    round_trip: list[float] = []
    for i in range(n):
        began = time.perf_counter()
        fut = await task.delay(i)
        run = await fut.wait(timeout=60)
        round_trip.append(time.perf_counter() - began)
        assert run.started_at is not None
        to_start.append((run.started_at - run.created_at).total_seconds())
    return {
        "runs": n,
        "submit_to_start": percentiles(to_start),
        "delay_to_result_round_trip": percentiles(round_trip),
    }


async def plain_path(n: int, latency_runs: int) -> dict[str, object]:
    """What the README teaches, with no client opened: map, then await each result."""
    began = time.perf_counter()
    futures = await noop_async.map(range(n))
    values = [await f.result(timeout=600) for f in futures]
    seconds = time.perf_counter() - began
    assert values == list(range(n))
    to_start: list[float] = []
    round_trip: list[float] = []
    for i in range(latency_runs):
        began = time.perf_counter()
        fut = await noop_async.delay(i)
        assert await fut.result(timeout=60) == i
        round_trip.append(time.perf_counter() - began)
        run = await fut.wait()
        assert run.started_at is not None
        to_start.append((run.started_at - run.created_at).total_seconds())
    return {
        "end_to_end": {
            "runs": n,
            "seconds": round(seconds, 3),
            "runs_per_second": round(n / seconds, 1),
        },
        "latency": {
            "runs": latency_runs,
            "submit_to_start": percentiles(to_start),
            "delay_to_result_round_trip": percentiles(round_trip),
        },
    }


async def bench(n: int, latency_runs: int) -> dict[str, object]:
    async with open_client() as client:
        # Warm up connections and the worker's imports.
        await client.wait_runs([f.task_run_id for f in await submit_all(noop_async, 200)])
        await client.wait_runs([f.task_run_id for f in await submit_all(noop_sync, 200)])
        began = time.perf_counter()
        await submit_all(never_served, n)
        map_seconds = time.perf_counter() - began
        return {
            "map_submission": {
                "runs": n,
                "batch": BATCH,
                "seconds": round(map_seconds, 3),
                "runs_per_second": round(n / map_seconds, 1),
            },
            "end_to_end_async": await end_to_end(client, noop_async, n),
            "end_to_end_sync": await end_to_end(client, noop_sync, n),
            "latency_async": await latency(client, noop_async, latency_runs),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--limit", default="100")
    parser.add_argument("--plain-runs", type=int, default=5_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trio-taskworker-bench-") as data:
        env = dict(os.environ)
        server = start(["server", "start", "--port", "0", "--data-dir", data], env)
        assert server.stdout is not None
        line = server.stdout.readline()
        server.stdout.close()
        url = line.split("ready at ")[1].split()[0]
        env["TRIO_TASKWORKER_API_URL"] = os.environ["TRIO_TASKWORKER_API_URL"] = url
        worker = start(
            ["task", "serve", f"{HERE / 'bench_tasks.py'}:noop_async",
             f"{HERE / 'bench_tasks.py'}:noop_sync", "--limit", args.limit],
            env,
        )  # fmt: skip
        try:
            results = trio.run(bench, args.runs, args.latency_runs)
            # A fresh trio run with nothing opened, as a new user writes it.
            results["plain_path_async"] = trio.run(plain_path, args.plain_runs, args.latency_runs)
        finally:
            for proc in (worker, server):
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "trio_taskworker": trio_taskworker.__version__,
        },
        "worker_limit": args.limit,
        **results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
