"""The worker's optional status server: ``GET /status`` as JSON on 127.0.0.1."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["StatusServer"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class StatusServer:
    """Serves whatever ``snapshot()`` returns (a JSON-ready dict) at ``GET /status``."""

    snapshot: Callable[[], dict[str, Any]]
    host: str = "127.0.0.1"
    port: int = 0

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(url)`` once listening."""

        async def status(request: Request) -> Response:
            return JSONResponse(self.snapshot())

        app = Starlette(routes=[Route("/status", status, methods=["GET"])])
        config = hypercorn.config.Config()
        config.bind = [f"{self.host}:{self.port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        async with trio.open_nursery() as nursery:
            serve = partial(hypercorn.trio.serve, app, config)  # type: ignore[arg-type]
            binds = await nursery.start(serve)
            url = str(binds[0])
            log.info("worker status on %s/status", url)
            task_status.started(url)
