"""Benchmark on PostgreSQL: one and two server replicas in front of one database.

For each row (``--replicas 1,2`` by default) this creates a fresh database
``ttw_bench_<random>`` through ``--postgres URL`` (a database the role may
create databases from, default ``postgresql://postgres@127.0.0.1:5432/postgres``),
creates the schema (``trio-taskworker db upgrade``), starts N server processes
on it (127.0.0.1, each its own port) and one worker process per replica
(``task serve bench_tasks.py:noop_async --limit 100 --api-url`` its replica),
then submits ``--runs`` no-op async runs on the batch path (``map`` and
``gather_results`` inside ``open_client``), half to each replica when there
are two, each submitter talking to its own replica only. Every process is
stopped by its PID, and the database is dropped, even on error.

Each row reports:

- end-to-end runs/s;
- the mean claim batch (runs leased per claim) from the servers' histogram
  ``trio_taskworker_dispatch_claim_runs``, and SQL statements per run from
  ``trio_taskworker_store_statements_total``, summed over replicas (null when
  the server does not export them), and store transactions per run from
  ``trio_taskworker_store_batch_operations_count``;
- WAL bytes per run (``pg_current_wal_lsn()`` before and after: the whole
  cluster's WAL, so other databases' writes in the same window count too;
  ``other_databases_xact_commit`` says how busy they were), and the bench
  database's own share when the ``pg_walinspect`` extension is available: the
  records of the window that touch its relations or belong to a transaction
  that did (so its commit records too), full-page images counted apart;
- commits per run (``xact_commit`` of the bench database in ``pg_stat_database``,
  read after the backends have flushed their statistics);
- PostgreSQL's CPU seconds per 1,000 runs: the user and system time of every
  process named ``postgres`` (backends, WAL writer, checkpointer, ...) plus the
  time of the children the postmaster has reaped (a backend that exits in the
  window is counted there); and, separately, of the bench database's own
  backends alive at the start or the end (one that exits in between is missed);
- the server, worker and driver processes' CPU per 1,000 runs.

Usage::

    python benchmarks/bench_postgres.py [--postgres URL] [--runs 3000] [--replicas 1,2]
        [--synchronous-commit off]   # what waiting for the WAL flush costs
    python benchmarks/bench.py --postgres [URL] --no-peers   # inside the full JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _procs import _TICKS, cpu_seconds, rate, stop  # noqa: E402
from bench_tasks import noop_async  # noqa: E402

from trio_taskworker import gather_results, open_client  # noqa: E402

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TASKS = HERE / "bench_tasks.py"
#: Runs each replica serves before the measured ones (connections, pools, caches).
WARM_UP = 200
#: How long PostgreSQL backends may keep their statistics before flushing them
#: (PGSTAT_IDLE_INTERVAL is 10 s), plus a margin.
STATS_FLUSH_SECONDS = 11.0
CLAIM = "trio_taskworker_dispatch_claim_runs"
STATEMENTS = "trio_taskworker_store_statements_total"
TRANSACTIONS = "trio_taskworker_store_batch_operations_count"


# --- the database ----------------------------------------------------------------------------


def _connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True)


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead of its own."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


@contextlib.contextmanager
def fresh_database(admin_url: str, synchronous_commit: str | None = None) -> Iterator[str]:
    """Create ``ttw_bench_<random>``, yield its URL, and drop it at the end, even on error.

    ``synchronous_commit`` (``on``/``off``) is set on that database only, for the
    connections made to it: ``off`` shows what waiting for the WAL flush costs.
    """
    name = f"ttw_bench_{secrets.token_hex(4)}"
    with _connect(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        if synchronous_commit is not None:
            conn.execute(
                f'ALTER DATABASE "{name}" SET synchronous_commit = '
                + {"on": "on", "off": "off"}[synchronous_commit]
            )
    try:
        yield with_database(admin_url, name)
    finally:
        with _connect(admin_url) as conn:
            # WITH (FORCE): a server stopped with SIGKILL may leave a backend behind a while.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _postgres_pids() -> list[int]:
    """The PIDs of every process whose comm is ``postgres`` (readable by anyone in /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
    return pids


def _reaped_cpu_seconds(pid: int) -> float:
    """User + system time of the children ``pid`` has waited for (cutime + cstime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[13]) + int(fields[14])) / _TICKS


def postgres_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds of ``pids`` by PID; a PID gone is left out."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[pid] = cpu_seconds(pid)
    return out


def postgres_cpu_total() -> float:
    """Every postgres process's CPU, plus what its parents reaped from exited children.

    The postmaster is the parent of every backend; its cutime/cstime grows by a
    backend's whole CPU when the backend exits, so one that exits between two
    readings is still counted (and one alive at both is counted once, by itself).
    """
    total = 0.0
    for pid in _postgres_pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid) + _reaped_cpu_seconds(pid)
    return total


#: The WAL records of a window that are the bench database's: those touching its
#: relations (``rel TABLESPACE/DATABASE/RELFILENODE`` in ``block_ref``), and every
#: record of a transaction that wrote one (its commit record, for one).
OWN_WAL = """
WITH r AS (SELECT * FROM pg_get_wal_records_info(%(start)s, %(end)s)),
own AS (
    SELECT DISTINCT xid::text AS xid FROM r
    WHERE block_ref LIKE %(pattern)s AND xid::text <> '0'
)
SELECT count(*), coalesce(sum(record_length), 0), coalesce(sum(fpi_length), 0) FROM r
WHERE block_ref LIKE %(pattern)s OR xid::text IN (SELECT xid FROM own)
"""


class Database:
    """Readings of the bench database and of the cluster.

    Statistics are read on a connection to ``admin_url`` (so that the readings
    add no commit to the bench database's count); the bench database's WAL
    records are read as the window ends, on a connection to it, through
    ``pg_walinspect`` when it can be created there (it goes with the database).
    """

    def __init__(self, admin_url: str, name: str) -> None:
        self.conn = _connect(admin_url)
        self.name = name
        self.url = with_database(admin_url, name)
        self.walinspect_missing: str | None = None
        try:
            with _connect(self.url) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        except Exception as exc:  # not installed, or no right to create it
            self.walinspect_missing = f"pg_walinspect unavailable: {exc}".strip()

    def close(self) -> None:
        self.conn.close()

    def own_wal(self, before: str, after: str) -> dict[str, int] | str:
        """The bench database's WAL records between two LSNs, or why they are unknown.

        Read as soon as the window ends: a checkpoint (any ``DROP DATABASE`` on
        the cluster makes one) may recycle the segments. The read is one
        transaction in the bench database (:attr:`OWN_WAL_COMMITS`).
        """
        if self.walinspect_missing is not None:
            return self.walinspect_missing
        oid = self.conn.execute(
            "SELECT oid FROM pg_database WHERE datname = %s", (self.name,)
        ).fetchone()[0]
        try:
            with _connect(self.url) as conn:
                records, total, fpi = conn.execute(
                    OWN_WAL, {"start": before, "end": after, "pattern": f"% rel %/{oid}/%"}
                ).fetchone()
        except Exception as exc:  # the segments were recycled already
            return f"unknown: {exc}".strip()
        return {"records": int(records), "bytes": int(total), "full_page_image_bytes": int(fpi)}

    #: Commits :meth:`own_wal` adds to the bench database's count.
    OWN_WAL_COMMITS = 1

    def wal_lsn(self) -> str:
        return str(self.conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])

    def wal_bytes(self, before: str, after: str) -> int:
        row = self.conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (after, before)).fetchone()
        return int(row[0])

    def commits(self) -> dict[str, int]:
        """xact_commit of every database, by name."""
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = self.conn.execute(
            "SELECT datname, xact_commit FROM pg_stat_database WHERE datname IS NOT NULL"
        ).fetchall()
        return {str(d): int(c) for d, c in rows}

    def others_committed(self, before: dict[str, int], after: dict[str, int]) -> int:
        """Commits in the other databases between two readings (a database dropped
        in between is left out: its count went with it)."""
        return sum(c - before.get(d, 0) for d, c in after.items() if d != self.name)

    def backends(self) -> list[int]:
        """The PIDs of the backends connected to the bench database (the servers' pools)."""
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.name,)
        ).fetchall()
        return [int(r[0]) for r in rows]


# --- the servers' metrics ----------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """The samples of ``url``'s /metrics this benchmark reads, summed over their labels."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    wanted = (f"{CLAIM}_sum", f"{CLAIM}_count", STATEMENTS, TRANSACTIONS)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        name = name.split("{", 1)[0]
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(rest.split()[0])
        elif name == f"{CLAIM}_bucket":
            le = line.split('le="', 1)[1].split('"', 1)[0]
            key = f"{CLAIM}_bucket:{le}"
            out[key] = out.get(key, 0.0) + float(rest.split()[0])
    return out


def _sum_scrapes(scrapes: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in scrapes:
        for k, v in s.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float | None:
    if name not in after:
        return None
    return after[name] - before.get(name, 0.0)


def claim_batches(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    """Mean runs per claim in the window, and the largest bucket any claim reached."""
    count = _delta(after, before, f"{CLAIM}_count")
    total = _delta(after, before, f"{CLAIM}_sum")
    if count is None or total is None:
        return None
    largest = None
    below = 0.0
    for key in sorted(
        (k for k in after if k.startswith(f"{CLAIM}_bucket:")),
        key=lambda k: float(k.split(":", 1)[1]),
    ):
        cumulative = after[key] - before.get(key, 0.0)
        if cumulative > below:
            largest = key.split(":", 1)[1]  # some claims fell in this bucket
        below = cumulative
    return {
        "claims": int(count),
        "runs_claimed": int(total),
        "mean_runs_per_claim": round(total / count, 2) if count else None,
        "largest_bucket_reached": largest,
    }


# --- processes ---------------------------------------------------------------------------------


def _cli(args: list[str], stdout: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trio_taskworker", "--log-level", "WARNING", *args],
        stdout=stdout,
        text=True,
    )


def start_server(database_url: str) -> tuple[subprocess.Popen[str], str]:
    server = _cli(
        ["server", "start", "--database-url", database_url, "--port", "0"], subprocess.PIPE
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    server.stdout.close()
    if "ready at " not in line:
        stop(server)
        raise RuntimeError(f"the server did not start: {line!r}")
    return server, line.split("ready at ")[1].split()[0]


def wait_subscribers(url: str, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health", timeout=60).json()["subscribers"] != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} never counted {count} subscribers")
        time.sleep(0.1)


def upgrade(database_url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "trio_taskworker", "db", "upgrade", "--database-url", database_url],
        check=True,
        stdout=subprocess.DEVNULL,
    )


# --- the measured work -------------------------------------------------------------------------


async def _batch_on(url: str, first: int, n: int) -> None:
    """``n`` runs on the batch path, through the replica at ``url`` only."""
    async with open_client(url):
        futures = await noop_async.map(range(first, first + n))
        values = await gather_results(futures, timeout=600)
    assert values == list(range(first, first + n))


async def batch_split(urls: list[str], n: int) -> None:
    """``n`` runs split evenly between the replicas, submitted and awaited at once."""
    share = -(-n // len(urls))
    async with trio.open_nursery() as nursery:
        for i, url in enumerate(urls):
            first = i * share
            nursery.start_soon(_batch_on, url, first, min(share, n - first))


def _per_1000(seconds: float, runs: int) -> float:
    return round(1000 * seconds / runs, 3)


def _per_run(value: float | None, runs: int, digits: int = 2) -> float | None:
    return None if value is None else round(value / runs, digits)


def row(
    admin_url: str, replicas: int, runs: int, limit: str, synchronous_commit: str | None = None
) -> dict[str, Any]:
    """One row: ``replicas`` servers and as many workers on a fresh database."""
    with fresh_database(admin_url, synchronous_commit) as database_url:
        upgrade(database_url)
        name = urllib.parse.urlsplit(database_url).path.lstrip("/")
        db = Database(admin_url, name)
        procs: list[subprocess.Popen[str]] = []
        try:
            servers, urls = [], []
            for _ in range(replicas):
                server, url = start_server(database_url)
                procs.append(server)
                servers.append(server)
                urls.append(url)
            workers = []
            for url in urls:
                worker = _cli(
                    ["task", "serve", f"{TASKS}:noop_async", "--limit", limit, "--api-url", url]
                )
                procs.append(worker)
                workers.append(worker)
            for url in urls:
                wait_subscribers(url, 1)
            trio.run(batch_split, urls, WARM_UP * replicas)
            time.sleep(STATS_FLUSH_SECONDS)  # the warm-up's statistics reach pg_stat_database

            own = {"server": [p.pid for p in servers], "worker": [p.pid for p in workers]}
            cpu_before = {k: sum(cpu_seconds(p) for p in v) for k, v in own.items()}
            driver_before = cpu_seconds(os.getpid())
            metrics_before = _sum_scrapes([scrape(u) for u in urls])
            commits_before = db.commits()
            backends = set(db.backends())
            backend_cpu_before = postgres_cpu(sorted(backends))
            pg_before = postgres_cpu_total()
            lsn_before = db.wal_lsn()
            began = time.perf_counter()

            trio.run(batch_split, urls, runs)

            seconds = time.perf_counter() - began
            lsn_after = db.wal_lsn()
            pg_after = postgres_cpu_total()
            backends_after = set(db.backends())
            backend_cpu_after = postgres_cpu(sorted(backends | backends_after))
            cpu_after = {k: sum(cpu_seconds(p) for p in v) for k, v in own.items()}
            driver_after = cpu_seconds(os.getpid())
            metrics_after = _sum_scrapes([scrape(u) for u in urls])
            wal_bytes = db.wal_bytes(lsn_before, lsn_after)
            own_wal = db.own_wal(lsn_before, lsn_after)
            time.sleep(STATS_FLUSH_SECONDS)
            commits_after = db.commits()
        finally:
            for proc in reversed(procs):  # workers first, then servers
                stop(proc)
            db.close()

    statements = _delta(metrics_after, metrics_before, STATEMENTS)
    transactions = _delta(metrics_after, metrics_before, TRANSACTIONS)
    # A backend gone by the end is missing from backend_cpu_after, its time lost.
    backend_cpu = sum(t - backend_cpu_before.get(p, 0.0) for p, t in backend_cpu_after.items())
    commits = commits_after[name] - commits_before[name]
    if not isinstance(own_wal, str):
        commits -= Database.OWN_WAL_COMMITS
    return {
        "replicas": replicas,
        **rate(runs, seconds),
        "claim_batch": claim_batches(metrics_before, metrics_after),
        "statements_per_run": _per_run(statements, runs),
        "store_transactions_per_run": _per_run(transactions, runs),
        "xact_commit_per_run": round(commits / runs, 2),
        "wal_bytes_per_run": round(wal_bytes / runs),
        "bench_database_wal_per_run": (
            own_wal
            if isinstance(own_wal, str)
            else {k: round(v / runs, 1) for k, v in own_wal.items()}
        ),
        "cpu_seconds_per_1000_runs": {
            "postgres_all_processes": _per_1000(pg_after - pg_before, runs),
            "postgres_bench_backends": _per_1000(backend_cpu, runs),
            "servers": _per_1000(cpu_after["server"] - cpu_before["server"], runs),
            "workers": _per_1000(cpu_after["worker"] - cpu_before["worker"], runs),
            "driver": _per_1000(driver_after - driver_before, runs),
        },
        "bench_backends": {"at_start": len(backends), "at_end": len(backends_after)},
        "other_databases_xact_commit": db.others_committed(commits_before, commits_after),
    }


def run_postgres(
    admin_url: str = DEFAULT_URL,
    runs: int = 3000,
    limit: str = "100",
    replicas: tuple[int, ...] = (1, 2),
    synchronous_commit: str | None = None,
) -> dict[str, Any]:
    """Every row, as one JSON-ready dict."""
    with _connect(admin_url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('synchronous_commit', 'fsync', 'wal_level', 'max_connections')"
            ).fetchall()
        )
    parts = urllib.parse.urlsplit(admin_url)
    return {
        "database": {
            "host": f"{parts.hostname}:{parts.port or 5432}",
            "server_version": version,
            "settings": settings,
        },
        "runs": runs,
        "worker_limit": limit,
        "workload": "noop_async on the batch path (map + gather_results in open_client), "
        "one worker process per replica, each submitter on its own replica",
        "bench_database_synchronous_commit": synchronous_commit or "the cluster's",
        "rows": [row(admin_url, k, runs, limit, synchronous_commit) for k in replicas],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres", default=DEFAULT_URL, metavar="URL", help=DEFAULT_URL)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--limit", default="100", help="each worker's --limit")
    parser.add_argument("--replicas", default="1,2", help="comma-separated rows (default 1,2)")
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default=None,
        help="set on the bench database only (default: the cluster's setting)",
    )
    args = parser.parse_args()
    replicas = tuple(int(k) for k in args.replicas.split(",") if k)
    began = time.perf_counter()
    report = run_postgres(args.postgres, args.runs, args.limit, replicas, args.synchronous_commit)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
