"""Benchmark: the three caller paths, RSS, idle cost, backlog, and the peers, as one JSON.

Starts a real server process (SQLite in a temporary folder) and a real worker
process (``task serve ... --limit 100``), both on 127.0.0.1, drives them from
this process, stops both by PID, then runs the peers (benchmarks/peers.py:
Dramatiq, Celery, Huey) with the same workload, and prints one JSON document.

The rows (each for an async task and for a sync task, which runs in a worker
thread):

- ``plain_path``: what the README teaches, in a fresh ``trio.run`` with nothing
  opened: ``futs = await t.map(xs)``, then ``[await f.result() for f in futs]``;
- ``open_client_plain``: the same loop inside ``async with open_client()``;
- ``batch_path``: ``await gather_results(futs)`` inside ``open_client()``.

Each row also has a latency loop, one run at a time: submit->start from the
server's timestamps (``created_at``->``started_at``, the measure the targets use) and from
the wall clock (just before ``delay()`` -> ``time.time()`` in the task body, the
measure the peers get), and ``delay()`` to result in the caller.

Usage::

    python benchmarks/bench.py [--runs 5000] [--no-peers] [--backlog N] [--postgres [URL]]
    python -m nox -s bench -- --runs 5000            # the same, in a fresh venv
    python -m nox -s bench -- --backlog 1000000      # the 1M-backlog figure (minutes)
    python -m nox -s bench -- --postgres --no-peers  # adds the PostgreSQL rows

``--postgres`` adds a ``postgres`` section: one and two server replicas on a
fresh PostgreSQL database (benchmarks/bench_postgres.py, which also runs alone);
with it the peers are skipped unless ``--peers`` names them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _procs import CpuWatch, cpu_percent, memory, percentiles, rate, stop  # noqa: E402
from bench_postgres import DEFAULT_URL as DEFAULT_POSTGRES_URL  # noqa: E402
from bench_tasks import (  # noqa: E402
    never_served,
    noop_async,
    noop_sync,
    stamp_async,
    stamp_sync,
)

import trio_taskworker  # noqa: E402
from trio_taskworker import gather_results, open_client  # noqa: E402

BATCH = 1000
TASKS = HERE / "bench_tasks.py"
PAIRS = {"async": (noop_async, stamp_async), "sync": (noop_sync, stamp_sync)}
#: The processes whose CPU each end-to-end figure reports (set once they run).
WATCH: dict[str, int | list[int]] = {}


# --- processes ---------------------------------------------------------------------------


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trio_taskworker", "--log-level", "WARNING", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def health(url: str) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{url}/health", timeout=60).json()
    return result


def wait_subscribers(url: str, count: int, timeout: float = 120.0) -> None:
    """Wait until the server counts ``count`` subscribed workers."""
    deadline = time.monotonic() + timeout
    while health(url)["subscribers"] != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server never counted {count} subscribers")
        time.sleep(0.1)


def data_size_mb(folder: str) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).iterdir()) / 1e6, 1)


# --- rows ----------------------------------------------------------------------------------


async def submit_all(task, n: int) -> list:  # type: ignore[no-untyped-def]
    """Map in requests of BATCH runs, as the map submission figure measures."""
    futures = []
    for start_at in range(0, n, BATCH):
        futures += await task.map(range(start_at, min(n, start_at + BATCH)))
    return futures


async def latency(task, n: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """One run at a time: delay(), await the result, then read the run's timestamps."""
    server_side: list[float] = []
    wall_clock: list[float] = []
    round_trip: list[float] = []
    watch = CpuWatch(WATCH)
    for i in range(n):
        sent_at = time.time()
        began = time.perf_counter()
        fut = await task.delay(i)
        started_at = await fut.result(timeout=60)
        round_trip.append(time.perf_counter() - began)
        wall_clock.append(started_at - sent_at)
        run = await fut.wait()
        assert run.started_at is not None
        server_side.append((run.started_at - run.created_at).total_seconds())
    return {
        "runs": n,
        "submit_to_start": percentiles(server_side),
        "submit_to_start_wall_clock": percentiles(wall_clock),
        "delay_to_result_round_trip": percentiles(round_trip),
        "cpu_percent_of_a_core": watch.percent(),
    }


async def one_by_one(futures: list[Any]) -> list[Any]:
    """What the README teaches: await each future's result in turn."""
    return [await f.result(timeout=600) for f in futures]


async def all_at_once(futures: list[Any]) -> list[Any]:
    """The batch path: one long-poll per thousand runs."""
    return await gather_results(futures, timeout=600)


async def end_to_end(task, n: int, wait) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Submit ``n`` runs with ``map``, then ``wait`` for their values."""
    watch = CpuWatch(WATCH)
    began = time.perf_counter()
    futures = await task.map(range(n))
    submitted = time.perf_counter()
    values = await wait(futures)
    finished = time.perf_counter()
    assert values == list(range(n))
    return {
        **rate(n, finished - began),
        "submit_seconds": round(submitted - began, 3),
        "cpu_percent_of_a_core": watch.percent(),
    }


async def plain_path(kind: str, n: int, latency_runs: int) -> dict[str, object]:
    """A fresh trio run with nothing opened, as a new user writes it."""
    noop, stamp = PAIRS[kind]
    return {
        "end_to_end": await end_to_end(noop, n, one_by_one),
        "latency": await latency(stamp, latency_runs),
    }


async def in_open_client(n: int, latency_runs: int) -> dict[str, Any]:
    async with open_client():
        # Warm up connections, the worker's thread pool and the server's caches.
        for noop, _ in PAIRS.values():
            await gather_results(await noop.map(range(200)))
        rows: dict[str, Any] = {"batch_path": {}, "open_client_plain": {}}
        for kind, (noop, _) in PAIRS.items():
            rows["batch_path"][kind] = {"end_to_end": await end_to_end(noop, n, all_at_once)}
        for kind, (noop, stamp) in PAIRS.items():
            rows["open_client_plain"][kind] = {
                "end_to_end": await end_to_end(noop, n, one_by_one),
                "latency": await latency(stamp, latency_runs),
            }
        return rows


async def map_submission(n: int) -> dict[str, float]:
    async with open_client():
        began = time.perf_counter()
        await submit_all(never_served, n)
        return {**rate(n, time.perf_counter() - began), "batch": BATCH}


async def batch_async(n: int, latency_runs: int) -> dict[str, Any]:
    async with open_client():
        return {
            "end_to_end": await end_to_end(noop_async, n, all_at_once),
            "latency": await latency(stamp_async, latency_runs),
        }


# --- idle cost -------------------------------------------------------------------------------


def idle_cost(
    url: str,
    server: subprocess.Popen[str],
    worker: subprocess.Popen[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Server CPU with only the bench worker connected, then with N more idle workers."""
    time.sleep(2)  # let the last runs' reports settle
    pids = [server.pid, worker.pid]
    baseline = cpu_percent(pids, args.idle_seconds)
    env = dict(os.environ)
    n = args.idle_workers
    if args.idle_mode == "one-process":
        procs = [
            subprocess.Popen(
                [sys.executable, str(HERE / "idle_workers.py"), str(n)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
        ]
    else:
        procs = [
            start(["task", "serve", f"{TASKS}:idle_only", "--limit", "1"], env) for _ in range(n)
        ]
    try:
        began = time.perf_counter()
        wait_subscribers(url, 1 + n)
        connected = time.perf_counter() - began
        time.sleep(2)  # past the subscriptions' first messages
        loaded = cpu_percent(pids + [p.pid for p in procs], args.idle_seconds)
        idle_rss = [memory(p.pid)["rss_mb"] for p in procs]
        server_rss = memory(server.pid)["rss_mb"]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            stop(proc)
    return {
        "idle_workers": n,
        "how": (
            f"{n} TaskWorker(idle_only, limit=1) in one extra process, one websocket each"
            if args.idle_mode == "one-process"
            else f"{n} `trio-taskworker task serve bench_tasks.py:idle_only --limit 1` processes"
        ),
        "seconds_measured": args.idle_seconds,
        "seconds_to_connect_all": round(connected, 1),
        "server_cpu_percent_of_a_core": {
            "bench_worker_only": baseline[0],
            f"with_{n}_idle_workers": loaded[0],
            "added_by_idle_workers": round(loaded[0] - baseline[0], 2),
        },
        "bench_worker_cpu_percent": {"alone": baseline[1], f"with_{n}_idle": loaded[1]},
        "idle_worker_processes_cpu_percent": round(sum(loaded[2:]), 2),
        "idle_worker_processes_rss_mb": round(sum(idle_rss), 1),
        "server_rss_mb_with_idle_workers": server_rss,
    }


# --- backlog ---------------------------------------------------------------------------------


def backlog(
    url: str, data: str, server: subprocess.Popen[str], queued: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Queue ``--backlog`` runs of never_served; rate and RSS with it vs without."""
    target = args.backlog
    top_up = max(0, target - queued)
    began = time.perf_counter()
    by_tenth = trio.run(_submit_never_served, top_up)
    submitted = time.perf_counter() - began
    counts = health(url)["runs"]
    with_backlog = trio.run(batch_async, args.runs, args.latency_runs)
    rss = memory(server.pid)
    return {
        "queued_never_served": queued + top_up,
        "run_counts_by_state": counts,
        "top_up": (
            {**rate(top_up, submitted), "batch": BATCH, "runs_per_second_by_tenth": by_tenth}
            if top_up
            else None
        ),
        "server_rss_mb_after_queueing": rss["rss_mb"],
        "server_peak_rss_mb": rss["peak_rss_mb"],
        "sqlite_files_mb": data_size_mb(data),
        "batch_async_with_backlog": with_backlog,
    }


async def _submit_never_served(n: int) -> list[float]:
    """Queue ``n`` runs in requests of BATCH, keeping no futures; runs/s per tenth of them."""
    tenth = max(BATCH, -(-n // (10 * BATCH)) * BATCH)
    rates: list[float] = []
    async with open_client():
        began = time.perf_counter()
        for start_at in range(0, n, BATCH):
            await never_served.map(range(start_at, min(n, start_at + BATCH)))
            done = min(n, start_at + BATCH)
            if done % tenth == 0 or done == n:
                now = time.perf_counter()
                rates.append(round((done - (len(rates) * tenth)) / (now - began), 1))
                began = now
    return rates


# --- report --------------------------------------------------------------------------------


def _get(tree: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def ratios(ours: dict[str, Any], peers: dict[str, Any]) -> dict[str, Any]:
    """Ours / theirs: above 1 is better for us on runs/s, below 1 on latency."""
    rows = {
        f"{row}_{kind}": _get(ours, "rows", row, kind, "end_to_end", "runs_per_second")
        for row in ("plain_path", "open_client_plain", "batch_path")
        for kind in ("async", "sync")
    }
    p50 = _get(ours, "rows", "plain_path", "async", "latency", "submit_to_start_wall_clock")
    p50_sync = _get(ours, "rows", "plain_path", "sync", "latency", "submit_to_start_wall_clock")
    out: dict[str, Any] = {
        "note": "ours / theirs. end_to_end: runs/s, above 1 means we are faster. "
        "submit_to_start_p50: wall-clock submit->start on both sides, below 1 means we "
        "start sooner. submit: our map submission (requests of 1,000) vs their one-call-"
        "per-run submit loop."
    }
    for name, peer in peers.items():
        theirs = _get(peer, "end_to_end", "runs_per_second")
        their_p50 = _get(peer, "latency", "submit_to_start", "p50_ms")
        if not theirs or not their_p50:
            out[name] = None
            continue
        out[name] = {
            "end_to_end": {k: round(v / theirs, 2) for k, v in rows.items() if v},
            "submit_to_start_p50": {
                "plain_path_async": round(p50["p50_ms"] / their_p50, 2) if p50 else None,
                "plain_path_sync": round(p50_sync["p50_ms"] / their_p50, 2) if p50_sync else None,
            },
            "submit": round(
                ours["map_submission"]["runs_per_second"] / peer["submit"]["runs_per_second"],
                2,
            ),
        }
    return out


def targets(ours: dict[str, Any]) -> dict[str, Any]:
    """The project's targets next to what was measured (None: not measured in this run)."""

    def check(measured: float | None, op: str, target: float) -> dict[str, Any]:
        met = None
        if measured is not None:
            met = {"<=": measured <= target, ">=": measured >= target, "<": measured < target}[op]
        return {"measured": measured, "target": f"{op} {target:g}", "met": met}

    plain = _get(ours, "rows", "plain_path", "async")
    back = ours.get("backlog") or {}
    queued = back.get("queued_never_served", 0)
    before = _get(back, "batch_async_without_backlog", "end_to_end", "runs_per_second")
    after = _get(back, "batch_async_with_backlog", "end_to_end", "runs_per_second")
    return {
        "plain_path_async_runs_per_second": check(
            _get(plain, "end_to_end", "runs_per_second"), ">=", 3000
        ),
        "plain_path_submit_to_start_p50_ms": check(
            _get(plain, "latency", "submit_to_start", "p50_ms"), "<=", 1
        ),
        "plain_path_submit_to_start_p99_ms": check(
            _get(plain, "latency", "submit_to_start", "p99_ms"), "<=", 3
        ),
        "batch_path_async_runs_per_second": check(
            _get(ours, "rows", "batch_path", "async", "end_to_end", "runs_per_second"), ">=", 5000
        ),
        "batch_path_sync_runs_per_second": check(
            _get(ours, "rows", "batch_path", "sync", "end_to_end", "runs_per_second"), ">=", 2000
        ),
        "map_submission_runs_per_second": check(
            _get(ours, "map_submission", "runs_per_second"), ">=", 30000
        ),
        "backlog_server_rss_mb": {
            **check(back.get("server_rss_mb_after_queueing"), "<=", 250),
            "queued": queued,
            "note": None if queued >= 1_000_000 else "the target is for 1,000,000 queued runs",
        },
        "backlog_rate_ratio": {
            **check(round(after / before, 3) if before and after else None, ">=", 0.8),
            "queued": queued,
            "note": None if queued >= 1_000_000 else "the target is for 1,000,000 queued runs",
        },
        "worker_idle_rss_mb": check(_get(ours, "rss_mb", "worker", "idle"), "<=", 60),
        "idle_workers_server_cpu_percent": check(
            _get(
                ours,
                "idle_cost",
                "server_cpu_percent_of_a_core",
                f"with_{_get(ours, 'idle_cost', 'idle_workers')}_idle_workers",
            ),
            "<",
            2,
        ),
    }


# --- main ----------------------------------------------------------------------------------


def ours(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="trio-taskworker-bench-") as data:
        env = dict(os.environ)
        server = start(["server", "start", "--port", "0", "--data-dir", data], env)
        assert server.stdout is not None
        line = server.stdout.readline()
        server.stdout.close()
        url = line.split("ready at ")[1].split()[0]
        env["TRIO_TASKWORKER_API_URL"] = os.environ["TRIO_TASKWORKER_API_URL"] = url
        entrypoints = [f"{TASKS}:{t.__name__}" for pair in PAIRS.values() for t in pair]
        worker = start(["task", "serve", *entrypoints, "--limit", args.limit], env)
        WATCH.update(server=server.pid, worker=worker.pid, driver=os.getpid())
        try:
            wait_subscribers(url, 1)
            time.sleep(1)
            rss: dict[str, dict[str, float]] = {
                "server": {"idle": memory(server.pid)["rss_mb"]},
                "worker": {"idle": memory(worker.pid)["rss_mb"]},
            }
            report: dict[str, Any] = {
                "rows": trio.run(in_open_client, args.runs, args.latency_runs)
            }
            report["rows"] = {"plain_path": {}, **report["rows"]}
            for kind in PAIRS:
                report["rows"]["plain_path"][kind] = trio.run(
                    plain_path, kind, args.runs, args.latency_runs
                )
            for name, proc in (("server", server), ("worker", worker)):
                now = memory(proc.pid)
                rss[name].update(after_runs=now["rss_mb"], peak=now["peak_rss_mb"])
            report["rss_mb"] = rss
            if args.idle_workers:
                report["idle_cost"] = idle_cost(url, server, worker, args)
            if args.backlog:
                # The same measure just before, on a queue with no never_served runs.
                without = trio.run(batch_async, args.runs, args.latency_runs)
            report["map_submission"] = trio.run(map_submission, args.runs)
            if args.backlog:
                report["backlog"] = {
                    "batch_async_without_backlog": without,
                    **backlog(url, data, server, args.runs, args),
                }
            else:
                report["backlog"] = {
                    "skipped": "pass --backlog N (e.g. 1000000) to measure it",
                }
            for name, proc in (("server", server), ("worker", worker)):
                rss[name]["end"] = memory(proc.pid)["rss_mb"]
                rss[name]["peak"] = memory(proc.pid)["peak_rss_mb"]
        finally:
            stop(worker)
            stop(server)
    return report


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the package had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=HERE.parent, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_changes_in_trio_taskworker": bool(
            git("status", "--porcelain", "--", "trio_taskworker")
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5_000, help="runs per row (default 5000)")
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--limit", default="100", help="the bench worker's --limit")
    parser.add_argument("--idle-workers", type=int, default=50, help="0 skips the idle cost")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--idle-mode",
        choices=("one-process", "processes"),
        default="one-process",
        help="idle workers as TaskWorkers in one process, or one CLI process each",
    )
    parser.add_argument(
        "--backlog", type=int, default=0, help="queue N never-served runs and measure (0: skip)"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip Dramatiq, Celery, Huey")
    parser.add_argument(
        "--peers",
        default=None,
        help="comma-separated subset of dramatiq,celery,huey (default: all, none with --postgres)",
    )
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=DEFAULT_POSTGRES_URL,
        default=None,
        metavar="URL",
        help="also measure one and two replicas on PostgreSQL; URL is where a fresh database "
        f"is created and dropped (default {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--postgres-replicas", default="1,2", help="the PostgreSQL rows (default 1,2)"
    )
    args = parser.parse_args()

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    began = time.perf_counter()
    figures = ours(args)
    ours_seconds = time.perf_counter() - began
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "trio_taskworker": trio_taskworker.__version__,
            "load_average_at_start": load_at_start,
        },
        "code": code_version(),
        "runs": args.runs,
        "worker_limit": args.limit,
        "ours": figures,
        "ours_wall_seconds": round(ours_seconds, 1),
    }
    report["targets"] = targets(figures)
    if args.postgres:
        from bench_postgres import run_postgres

        replicas = tuple(int(k) for k in args.postgres_replicas.split(",") if k)
        report["postgres"] = run_postgres(args.postgres, args.runs, args.limit, replicas)
    if not args.no_peers and (args.peers is not None or not args.postgres):
        from peers import run_peers

        names = tuple(n for n in (args.peers or "dramatiq,celery,huey").split(",") if n)
        report["peers"] = run_peers(args.runs, args.latency_runs, names)
        report["ratios"] = ratios(figures, report["peers"])
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
