"""Huey tasks for benchmarks/peers.py: SqliteHuey (queue and results in one SQLite file)."""

from __future__ import annotations

import os
import time

from huey import SqliteHuey

huey = SqliteHuey("peers", filename=os.environ.get("PEER_HUEY_DB", "peers-huey.db"))


@huey.task()
def noop(i: int) -> int:
    return i


@huey.task()
def stamp(i: int) -> float:
    return time.time()
