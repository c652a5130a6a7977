"""The worker's optional status server on 127.0.0.1: ``GET /status`` (JSON) and
``GET /metrics`` (Prometheus text), both read from the worker's snapshot."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["StatusCollector", "StatusServer"]

log = logging.getLogger(__name__)

_PREFIX = "trio_taskworker_worker_"


def _label(text: str) -> str:
    """``text`` as a label value that can be encoded (a lone surrogate cannot)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _gauge(name: str, documentation: str, value: Any) -> Iterable[Metric]:
    """A gauge without labels, or nothing when ``value`` is None (no limit)."""
    if value is not None:
        yield GaugeMetricFamily(_PREFIX + name, documentation, value=float(value))


def _by_key(name: str, documentation: str, counts: Mapping[str, int] | None) -> Metric:
    family = CounterMetricFamily(_PREFIX + name, documentation, labels=["task_key"])
    for key, n in sorted((counts or {}).items()):
        family.add_metric([_label(key)], n)
    return family


@attrs.define(eq=False)
class StatusCollector(Collector):
    """Prometheus metrics read from a worker's :meth:`~TaskWorker.status` snapshot
    at each scrape. The task keys are the worker's own tasks, a bounded set."""

    snapshot: Callable[[], dict[str, Any]]

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot()
        yield from _gauge("runs_in_flight", "Runs executing on this worker now.", snap["current"])
        yield from _gauge(
            "limit",
            "The most runs this worker executes at once (absent: no limit).",
            snap["limit"],
        )
        yield from _gauge(
            "runs_available",
            "How many more runs this worker could start now (absent: no limit).",
            snap.get("available"),
        )
        yield from _gauge(
            "connected", "1 while the worker's subscription is connected.", snap.get("connected")
        )
        yield from _gauge(
            "stopping", "1 once the worker has been asked to stop.", snap.get("stopping")
        )
        yield _by_key(
            "runs_finished",
            "Runs that ended on this worker, whatever their outcome, by task key.",
            snap.get("finished"),
        )
        yield _by_key(
            "runs_failed",
            "Runs that failed on this worker (also counted as finished), by task key.",
            snap.get("failed"),
        )


@attrs.define(eq=False)
class StatusServer:
    """Serves whatever ``snapshot()`` returns (a JSON-ready dict, a worker's
    :meth:`~TaskWorker.status`) at ``GET /status``, and metrics made from it
    (see :class:`StatusCollector`) at ``GET /metrics``."""

    snapshot: Callable[[], dict[str, Any]]
    host: str = "127.0.0.1"
    port: int = 0

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(url)`` once listening."""
        # A registry of its own: several workers may share a process.
        registry = CollectorRegistry()
        registry.register(StatusCollector(self.snapshot))

        async def status(request: Request) -> Response:
            return JSONResponse(self.snapshot())

        async def metrics(request: Request) -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

        app = Starlette(
            routes=[
                Route("/status", status, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"]),
            ]
        )
        config = hypercorn.config.Config()
        config.bind = [f"{self.host}:{self.port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        async with trio.open_nursery() as nursery:
            serve = partial(hypercorn.trio.serve, app, config)  # type: ignore[arg-type]
            binds = await nursery.start(serve)
            url = str(binds[0])
            log.info("worker status on %s/status and %s/metrics", url, url)
            task_status.started(url)
