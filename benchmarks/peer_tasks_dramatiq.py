"""Dramatiq actors for benchmarks/peers.py: Redis broker and Redis result backend."""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

URL = os.environ.get("PEER_DRAMATIQ_REDIS_URL", "redis://127.0.0.1:6379/7")

broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=RedisBackend(url=URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=0)
def noop(i: int) -> int:
    return i


@dramatiq.actor(store_results=True, max_retries=0)
def stamp(i: int) -> float:
    return time.time()
