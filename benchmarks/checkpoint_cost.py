"""What one SQLite checkpoint costs, and how much of it is the sync to disk.

Builds a table of 50,000 rows in a temporary WAL database, then ten times:
commits N small transactions (13 rows changed at random places each, about
what one run's create, lease and report change), and times a PASSIVE
checkpoint, as the server's writer does it. Once with ``synchronous=NORMAL``
(the server's setting: the checkpoint syncs the log and the database file)
and once with ``synchronous=OFF`` (no sync: the copying alone)::

    python benchmarks/checkpoint_cost.py [--transactions 50 200 600]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

ROWS = 50_000
CHANGES_PER_TRANSACTION = 13


def measure(folder: Path, synchronous: str, transactions: int) -> tuple[float, float]:
    """(megabytes in the log before a checkpoint, median milliseconds per checkpoint)."""
    path = folder / f"{synchronous}-{transactions}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?, ?)", ((i, os.urandom(300)) for i in range(ROWS)))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    spent = []
    logged = 0.0
    for _ in range(10):
        for _ in range(transactions):
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(CHANGES_PER_TRANSACTION):
                conn.execute(
                    "UPDATE t SET v = ? WHERE id = ?", (os.urandom(300), random.randrange(ROWS))
                )
            conn.execute("COMMIT")
        logged = Path(f"{path}-wal").stat().st_size / 1e6
        began = time.perf_counter()
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        spent.append((time.perf_counter() - began) * 1000)
    conn.close()
    return logged, statistics.median(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transactions", type=int, nargs="+", default=[50, 200, 600])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for synchronous in ("NORMAL", "OFF"):
            for transactions in args.transactions:
                logged, median = measure(Path(folder), synchronous, transactions)
                print(
                    f"synchronous={synchronous}: {transactions} transactions, log"
                    f" {logged:.1f} MB, checkpoint median {median:.2f} ms"
                )


if __name__ == "__main__":
    main()
