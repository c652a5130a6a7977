"""The fastest peers, with the same shape of workload as bench.py, on this machine.

Dramatiq (Redis db 7, one worker process x 10 threads), Celery (Redis db 8, one
worker with the threads pool x 10) and Huey (SqliteHuey in a temporary folder,
one consumer with 10 threads). For each: submit N no-op runs one call at a time
(each library's own idiom: ``send``/``delay``/calling the task), wait for all of
their results through the library's result backend, then a latency loop that
submits one run at a time and waits for it; the task returns ``time.time()``
when its body starts, so submit->start is measured with the wall clock, from
just before the submit call.

Each figure carries the CPU its worker (with its children) and this driver used,
and ``elsewhere``: the rest of the machine's busy time, Redis included.

A peer whose library does not import, or whose service does not answer, is
reported as ``{"skipped": reason}``; one that fails part way as
``{"error": ..., "log_tail": ...}``. Every worker process is started here and
stopped by PID (with its children); each Redis database is flushed before and
after (only that database). Usage: ``python benchmarks/peers.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _procs import CpuWatch, descendants, memory_of_tree, percentiles, rate, stop  # noqa: E402

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
DRAMATIQ_DB, CELERY_DB = 7, 8
THREADS = 10
WARMUP = 200
WAIT_SECONDS = 120.0
PEERS = ("dramatiq", "celery", "huey")


class Skip(Exception):
    """The peer cannot run here (library missing, service absent)."""


def _require(module: str, distribution: str) -> str:
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{distribution} is not installed (pip install {distribution})")
    return f"{distribution} {importlib.metadata.version(distribution)}"


def _redis(db: int) -> Any:
    _require("redis", "redis")
    import redis

    try:
        socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1).close()
    except OSError as exc:
        raise Skip(f"no Redis answers at {REDIS_HOST}:{REDIS_PORT}: {exc}") from None
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise Skip(f"no Redis answers at {REDIS_HOST}:{REDIS_PORT}: {exc}") from None
    return client


@contextmanager
def _flushed(db: int) -> Iterator[None]:
    client = _redis(db)
    client.flushdb()
    try:
        yield
    finally:
        client.flushdb()
        client.close()


@contextmanager
def _worker(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=HERE)
    try:
        yield proc
    finally:
        stop(proc)


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _poll(get: Callable[[], Any], timeout: float) -> Any:
    """Poll a non-blocking result getter every millisecond until it has a value."""
    deadline = time.monotonic() + timeout
    while (value := get()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("no result in time")
        time.sleep(0.001)
    return value


def _measure(
    submit_noop: Callable[[int], Any],
    wait_all: Callable[[list[Any]], list[Any]],
    submit_stamp: Callable[[int], Any],
    wait_one: Callable[[Any], Any],
    worker_pid: int,
    runs: int,
    latency_runs: int,
) -> dict[str, Any]:
    # Warm-up: also proves the worker is up and consuming.
    assert wait_all([submit_noop(i) for i in range(WARMUP)]) == list(range(WARMUP))
    idle = memory_of_tree(worker_pid)
    pids: dict[str, int | list[int]] = {
        "worker": [worker_pid, *descendants(worker_pid)],
        "driver": os.getpid(),
    }
    watch = CpuWatch(pids)
    began = time.perf_counter()
    handles = [submit_noop(i) for i in range(runs)]
    submitted = time.perf_counter()
    values = wait_all(handles)
    finished = time.perf_counter()
    end_to_end_cpu = watch.percent()
    assert values == list(range(runs)), "wrong results"
    after = memory_of_tree(worker_pid)
    to_start: list[float] = []
    round_trip: list[float] = []
    watch = CpuWatch(pids)
    for i in range(latency_runs):
        sent_at = time.time()
        started_at = wait_one(submit_stamp(i))
        round_trip.append(time.time() - sent_at)
        to_start.append(started_at - sent_at)
    return {
        "submit": rate(runs, submitted - began),
        "end_to_end": {
            **rate(runs, finished - began),
            "cpu_percent_of_a_core": end_to_end_cpu,
        },
        "latency": {
            "runs": latency_runs,
            "submit_to_start": percentiles(to_start),
            "submit_to_result_round_trip": percentiles(round_trip),
            "cpu_percent_of_a_core": watch.percent(),
        },
        "worker_rss_mb": {"idle": idle["rss_mb"], "after_runs": after["rss_mb"]},
        "worker_processes": after["processes"],
    }


def dramatiq_peer(runs: int, latency_runs: int, tmp: Path) -> dict[str, Any]:
    version = _require("dramatiq", "dramatiq")
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DRAMATIQ_DB}"
    env = {**os.environ, "PEER_DRAMATIQ_REDIS_URL": url}
    os.environ["PEER_DRAMATIQ_REDIS_URL"] = url
    log = tmp / "dramatiq.log"
    with _flushed(DRAMATIQ_DB):
        tasks = importlib.import_module("peer_tasks_dramatiq")
        args = [sys.executable, "-m", "dramatiq", "peer_tasks_dramatiq", "--path", str(HERE),
                "--processes", "1", "--threads", str(THREADS)]  # fmt: skip
        with _worker(args, env, log) as proc:

            def wait_one(message: Any) -> Any:
                return message.get_result(block=True, timeout=int(WAIT_SECONDS * 1000))

            try:
                figures = _measure(
                    tasks.noop.send,
                    lambda messages: [wait_one(m) for m in messages],
                    tasks.stamp.send,
                    wait_one,
                    proc.pid,
                    runs,
                    latency_runs,
                )
            except Exception as exc:
                return {"library": version, "error": repr(exc), "log_tail": _tail(log)}
    return {
        "library": version,
        "setup": f"RedisBroker db {DRAMATIQ_DB}; dramatiq --processes 1 --threads {THREADS}",
        "results_via": f"Results middleware, RedisBackend db {DRAMATIQ_DB}; "
        "message.get_result(block=True) one by one",
        **figures,
    }


def celery_peer(runs: int, latency_runs: int, tmp: Path) -> dict[str, Any]:
    version = _require("celery", "celery")
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{CELERY_DB}"
    env = {**os.environ, "PEER_CELERY_REDIS_URL": url, "PYTHONPATH": str(HERE)}
    os.environ["PEER_CELERY_REDIS_URL"] = url
    log = tmp / "celery.log"
    with _flushed(CELERY_DB):
        tasks = importlib.import_module("peer_tasks_celery")
        from celery.result import ResultSet

        args = [sys.executable, "-m", "celery", "-A", "peer_tasks_celery", "worker",
                "--pool", "threads", "--concurrency", str(THREADS), "--loglevel", "WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        with _worker(args, env, log) as proc:
            try:
                figures = _measure(
                    tasks.noop.delay,
                    lambda results: ResultSet(results).get(timeout=WAIT_SECONDS),
                    tasks.stamp.delay,
                    lambda result: result.get(timeout=WAIT_SECONDS),
                    proc.pid,
                    runs,
                    latency_runs,
                )
            except Exception as exc:
                return {"library": version, "error": repr(exc), "log_tail": _tail(log)}
            finally:
                tasks.app.close()
    return {
        "library": version,
        "setup": f"Redis broker db {CELERY_DB}; celery worker --pool threads --concurrency "
        f"{THREADS} --without-gossip --without-mingle --without-heartbeat",
        "results_via": f"Redis result backend db {CELERY_DB}; ResultSet(...).get() "
        "(native join over pub/sub), AsyncResult.get() in the latency loop",
        **figures,
    }


def huey_peer(runs: int, latency_runs: int, tmp: Path) -> dict[str, Any]:
    version = _require("huey", "huey")
    db = tmp / "huey.db"
    env = {**os.environ, "PEER_HUEY_DB": str(db), "PYTHONPATH": str(HERE)}
    os.environ["PEER_HUEY_DB"] = str(db)
    log = tmp / "huey.log"
    tasks = importlib.import_module("peer_tasks_huey")
    args = [sys.executable, "-m", "huey.bin.huey_consumer", "peer_tasks_huey.huey",
            "--workers", str(THREADS), "--worker-type", "thread"]  # fmt: skip
    with _worker(args, env, log) as proc:

        def wait_one(result: Any) -> Any:
            return _poll(result.get, WAIT_SECONDS)

        try:
            figures = _measure(
                tasks.noop,
                lambda results: [wait_one(r) for r in results],
                tasks.stamp,
                wait_one,
                proc.pid,
                runs,
                latency_runs,
            )
        except Exception as exc:
            return {"library": version, "error": repr(exc), "log_tail": _tail(log)}
    return {
        "library": version,
        "setup": f"SqliteHuey in a temporary folder; huey_consumer --workers {THREADS} "
        "--worker-type thread (default polling: 0.1 s initial delay, backoff 1.15, max 10 s)",
        "results_via": "Huey's result store in the same SQLite file; Result.get() polled "
        "every 1 ms one by one",
        **figures,
    }


RUNNERS: dict[str, Callable[[int, int, Path], dict[str, Any]]] = {
    "dramatiq": dramatiq_peer,
    "celery": celery_peer,
    "huey": huey_peer,
}


def run_peers(runs: int, latency_runs: int, names: tuple[str, ...] = PEERS) -> dict[str, Any]:
    """Each named peer's figures, one after another, or why it was skipped or failed."""
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="trio-taskworker-peers-") as tmp:
        for name in names:
            began = time.perf_counter()
            try:
                report[name] = RUNNERS[name](runs, latency_runs, Path(tmp))
            except Skip as exc:
                report[name] = {"skipped": str(exc)}
            except Exception as exc:
                report[name] = {"error": repr(exc)}
            report[name]["wall_seconds"] = round(time.perf_counter() - began, 1)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5_000)
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset")
    args = parser.parse_args()
    names = tuple(n for n in args.peers.split(",") if n)
    unknown = set(names) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    print(json.dumps(run_peers(args.runs, args.latency_runs, names), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
