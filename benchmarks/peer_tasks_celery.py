"""Celery tasks for benchmarks/peers.py: Redis broker and Redis result backend."""

from __future__ import annotations

import os
import time

from celery import Celery

URL = os.environ.get("PEER_CELERY_REDIS_URL", "redis://127.0.0.1:6379/8")

app = Celery("peer_tasks_celery", broker=URL, backend=URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=3600,
)


@app.task
def noop(i: int) -> int:
    return i


@app.task
def stamp(i: int) -> float:
    return time.time()
