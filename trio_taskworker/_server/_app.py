"""The ASGI application: the REST API and the worker subscription websocket.

Every malformed request gets a 4xx with ``{"detail": ...}``; every malformed
websocket message closes the connection with 1008 and a reason. The server
never unpickles anything it is sent.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from .._exceptions import leaves
from .._models import (
    MAX_WAIT_SECONDS,
    Cancel,
    CreatedRuns,
    Credit,
    Drain,
    Drained,
    FeedWatch,
    FeedWatched,
    Finished,
    Heartbeat,
    LogBatch,
    Rejected,
    Released,
    ReturnWhen,
    RunHistory,
    RunList,
    RunLogs,
    Started,
    Subscribe,
    Subscribed,
    TaskRun,
    TaskRunCreateBatch,
    TaskStats,
    TaskStatsList,
    WaitRequest,
    WorkerInfo,
    WorkerList,
    WorkerMessage,
)
from .._serialization import (
    InvalidPayload,
    decode_worker_frame,
    encode_frame,
    from_json,
    to_json,
)
from .._states import IllegalTransition, TaskRunState
from .._version import __version__
from ._auth import Authenticate, KeyRing
from ._dispatch import MAX_CREDITS, Dispatcher, Subscriber, Waiters
from ._events import MAX_PENDING, MAX_STREAMS, Events
from ._feeds import Feeds, feed_id
from ._metrics import ServerMetrics
from ._openapi import openapi_document
from ._replicas import Bus, LocalBus
from ._routes import (
    AFTER,
    BLOB_ID,
    ENDPOINTS,
    EPOCH,
    FEED_ID,
    LIMIT,
    OFFSET,
    PUBLIC,
    RUN_ID,
    STATE,
    SUBSCRIBE_ROLES,
    TAG,
    TASK_KEY,
    WAIT_TIMEOUT,
    QueryNumber,
    Role,
)
from ._store import (
    Idempotency,
    IdempotencyConflict,
    Outcome,
    Store,
    StoreError,
    StoreUnavailable,
)
from ._ui import ui_routes

__all__ = ["AppState", "SubscriptionHandler", "build_app"]

log = logging.getLogger(__name__)

#: Close codes the server uses on the subscription websocket.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
#: The worker sent nothing for a whole lease: its leases are released.
CLOSE_LEASE_EXPIRED = 3008
#: "Try again later": the subscribe came too late (a stalled network, a blocked
#: worker). Not the worker's fault for good, so it reconnects.
CLOSE_TRY_AGAIN = 1013
#: How long a new connection has to send its ``subscribe`` message.
SUBSCRIBE_TIMEOUT = 10.0
#: Frames, and their bytes, that a worker's connection reads ahead while the
#: reports before them are applied; the next transaction applies them all.
#: Beyond either bound, the reader waits.
MAX_FRAMES_AHEAD = 32
MAX_BYTES_AHEAD = 8 * 1024 * 1024
#: What a subscribed worker may send.
_FROM_SUBSCRIBED_WORKER = (Started, Finished, Released, Credit, Drain, Heartbeat)
#: How often an idle ``GET /events`` stream sends a comment, so that proxies
#: and the browser keep it open and a dead peer is noticed.
EVENTS_KEEPALIVE = 15.0


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC)


@attrs.define(eq=False)
class AppState:
    """What the routes share: the store, the dispatcher, the waiters, limits and keys.

    With an empty ``keys`` (the default) nothing asks for an API key.
    """

    store: Store
    dispatcher: Dispatcher
    waiters: Waiters
    now: Callable[[], float]
    max_body_bytes: int = 64 * 1024 * 1024
    #: The most bytes of request bodies held at once, across all requests.
    max_bodies_in_flight: int = 256 * 1024 * 1024
    #: The longest a request body may take to arrive, in seconds.
    body_timeout: float = 60.0
    #: The longest a wait request is held, whatever it asks: the client asks again.
    max_wait_seconds: float = MAX_WAIT_SECONDS
    bodies_in_flight: int = 0
    lease_seconds: float = 30.0
    keys: KeyRing = attrs.field(factory=KeyRing)
    stopping: trio.Event = attrs.field(factory=trio.Event)
    connections: int = 0
    connections_closed: trio.Event = attrs.field(factory=trio.Event)
    #: What ``GET /events`` streams are told.
    events: Events = attrs.field(factory=Events)
    #: What ``GET /metrics`` shows.
    metrics: ServerMetrics = attrs.field(
        default=attrs.Factory(lambda self: ServerMetrics(now=self.now), takes_self=True)
    )
    #: The clients' feeds of ended runs (see :mod:`._feeds`).
    feeds: Feeds = attrs.field(
        default=attrs.Factory(lambda self: Feeds(self.waiters, self.now), takes_self=True)
    )
    #: How this server tells the other replicas on its database (see :mod:`._replicas`).
    bus: Bus = attrs.field(factory=LocalBus)
    #: The CANCELLING runs whose worker has been told, with its connection.
    _told_cancel: dict[uuid.UUID, str] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self.dispatcher.on_claimed = self.claimed
        feeds = self.feeds
        self.metrics.watch_feeds(lambda: (len(feeds), feeds.runs, feeds.held_bytes))

    def claimed(self, runs: Sequence[TaskRun]) -> None:
        """The dispatcher leased ``runs`` to a worker (they are PENDING now)."""
        self.events.runs(runs)
        self.metrics.runs_changed(runs)
        self.metrics.runs_claimed(len(runs))

    async def cancel(self, run_id: uuid.UUID) -> TaskRun:
        """Cancel a run and tell the worker holding its lease, wherever it is.

        Raises :class:`StoreError` (unknown run) or :class:`IllegalTransition` (ended).
        """
        run, owner = await self.store.cancel_run(run_id, self.now())
        if owner is not None and not self._tell_cancel(run_id, owner):
            # Leased through another replica (or a connection just gone).
            self.bus.cancel(run_id, owner)
        self.changed(Outcome(changed=(run,)))  # (forgets the telling if it ended)
        return run

    def _tell_cancel(self, run_id: uuid.UUID, owner: str) -> bool:
        """Tell connection ``owner`` to cancel the run, if it is one of ours."""
        sub = self.dispatcher.subscriber(owner)
        if sub is None:
            return False
        sub.post(Cancel(id=run_id))
        self._told_cancel[run_id] = owner
        return True

    def changed(self, outcome: Outcome) -> None:
        self.events.runs(outcome.changed)
        self.metrics.runs_changed(outcome.changed)
        if outcome.redelivered:
            self.metrics.runs_redelivered(outcome.redelivered)
        self.waiters.notify(outcome.changed)
        ended = [run.id for run in outcome.changed if run.state.is_terminal]
        if ended:
            self.bus.runs_ended(ended)
            if self._told_cancel:
                for run_id in ended:
                    self._told_cancel.pop(run_id, None)
        if outcome.requeued:
            self.dispatcher.wake()
            self.bus.runs_due()
        for run in outcome.changed:
            log.info("run %s (%r) is %s", run.id, run.task_key, run.state)

    # --- what the other replicas tell (see _replicas.Hearer) ------------------------

    def heard_due(self) -> None:
        self.dispatcher.wake()

    async def heard_ended(self, ids: Sequence[uuid.UUID] | None) -> None:
        """Runs ended through another replica: answer the requests waiting on
        them here, and the event streams. ``None`` (too many to name): look at
        every run waited on, as the poll does."""
        if ids is None:
            await self._look_at_waited_runs()
            return
        wanted = list(ids) if self.events.watched else self.waiters.watched_among(ids)
        if wanted:
            runs = [run for run in await self.store.read_runs(wanted) if run.state.is_terminal]
            self.waiters.notify(runs)
            self.events.runs(runs)

    async def _look_at_waited_runs(self) -> None:
        # Ids first, so that payloads are read only for the runs that have ended.
        ended = await self.store.ended_ids(self.waiters.watched_ids())
        if ended:
            self.waiters.notify(await self.store.read_runs(ended))

    def heard_cancel(self, run_id: uuid.UUID, owner: str) -> None:
        self._tell_cancel(run_id, owner)

    async def poll(self) -> None:
        """What notifications carry, looked up: the fallback for a lost one."""
        self.dispatcher.wake()
        self.feeds.sweep(self.now())  # what idle feeds watch is not looked up
        await self._look_at_waited_runs()
        cancelling = dict(await self.store.cancelling_runs())
        for run_id, owner in cancelling.items():
            if self._told_cancel.get(run_id) != owner:
                self._tell_cancel(run_id, owner)
        self._told_cancel = {
            run_id: owner
            for run_id, owner in self._told_cancel.items()
            if cancelling.get(run_id) == owner
        }


def _safe(text: str) -> str:
    """``text`` with what cannot be sent or logged as one line escaped: lone
    surrogates (not encodable) and control characters (a newline would start a
    forged log line). Client data reaches error messages through parsers."""
    if text.isascii() and text.isprintable():
        return text
    escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in escaped)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": _safe(detail)}, status_code=status)


def _json(value: Any, status: int = 200) -> Response:
    return Response(to_json(value), status_code=status, media_type="application/json")


async def _receive(
    request: Request, state: AppState, sink: Callable[[bytes], Awaitable[None]] | None
) -> list[bytes]:
    """Read the request's body within the server's limits, chunk by chunk.

    Without a ``sink`` the chunks are held in memory and returned; with one,
    each goes to the sink (a file) and nothing is held. 413 over
    ``max_body_bytes``; 503 (with ``Retry-After``) when the bodies held in memory
    at once would pass ``max_bodies_in_flight`` bytes, so a burst of large
    requests cannot take the server's memory; 408 when the body has not arrived
    within ``body_timeout`` seconds (a slow or stalled sender).
    """
    limit = state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = held = 0
    try:
        with trio.move_on_after(state.body_timeout) as timer:
            async with contextlib.aclosing(request.stream()) as stream:
                async for chunk in stream:
                    size += len(chunk)
                    if size > limit:
                        raise HTTPException(413, f"the body is over the limit of {limit} bytes")
                    if sink is not None:
                        await sink(chunk)
                        continue
                    if state.bodies_in_flight + len(chunk) > state.max_bodies_in_flight:
                        raise HTTPException(
                            503,
                            "the server is receiving too many large bodies at once; retry shortly",
                            headers={"Retry-After": "1"},
                        )
                    state.bodies_in_flight += len(chunk)
                    held += len(chunk)
                    chunks.append(chunk)
        if timer.cancelled_caught:
            raise HTTPException(408, f"the body did not arrive within {state.body_timeout:g} s")
        return chunks
    finally:
        state.bodies_in_flight -= held


async def _body(request: Request, state: AppState) -> bytes:
    """The request's body, held in memory, within the limits of :func:`_receive`."""
    return b"".join(await _receive(request, state, None))


def _run_id(request: Request) -> uuid.UUID:
    raw = request.path_params[RUN_ID.name]
    if raw == "wait":
        # GET /runs/wait reaches the GET /runs/{run_id} route: it is a wrong method.
        raise HTTPException(405, "use POST /runs/wait", headers={"Allow": "POST"})
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise HTTPException(422, f"run id {raw!r} is not a UUID") from None


def _feed_id(request: Request) -> str:
    try:
        return feed_id(request.path_params[FEED_ID.name])
    except ValueError:
        raise HTTPException(422, f"{FEED_ID.name} must be a UUID") from None


def _owner(request: Request) -> str:
    """Whose feed a request may use: a digest of its ``Authorization`` header
    (the same for every request without one)."""
    return hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()


def _query_number(request: Request, param: QueryNumber) -> float:
    raw = request.query_params.get(param.name)
    if raw is None:
        return param.default
    try:
        # An integer is parsed as one: past 2**53 a float would round into range.
        value = int(raw) if param.integer else float(raw)
    except ValueError:
        kind = "an integer" if param.integer else "a number"
        raise HTTPException(
            422, f"query parameter {param.name!r} must be {kind}, got {raw!r}"
        ) from None
    if not param.minimum <= value <= param.maximum:
        raise HTTPException(
            422, f"query parameter {param.name!r} must be in [{param.minimum}, {param.maximum}]"
        )
    return value


_Handler = Callable[[Request], Awaitable[Response]]


def build_app(state: AppState) -> Starlette:
    """Build the Starlette application over ``state``: the routes of
    :data:`~._routes.ENDPOINTS` and the ``/subscribe`` websocket, each behind
    the roles it needs when ``state.keys`` has keys (see :mod:`._auth`)."""

    async def subscribe(websocket: WebSocket) -> None:
        await SubscriptionHandler(state, websocket).run()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        response = _error(exc.status_code, exc.detail)
        # Keeps the Allow header of a 405.
        response.headers.update(exc.headers or {})
        return response

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("%s %r: %s", request.method, request.url.path, _safe(str(exc)))
        response = _error(503, f"the server cannot store this now: {exc}")
        response.headers["Retry-After"] = "5"
        return response

    handlers = _Handlers(state)
    by_path: dict[str, dict[str, _Handler]] = {}
    for endpoint in ENDPOINTS:
        by_path.setdefault(endpoint.path, {})[endpoint.method] = _guarded(
            state.keys, endpoint.roles, getattr(handlers, endpoint.handler)
        )
    routes: list[BaseRoute] = [
        Route(path, _by_method(methods), methods=list(methods))
        for path, methods in by_path.items()
    ]
    routes.append(WebSocketRoute("/subscribe", subscribe))
    routes.extend(ui_routes())
    return Starlette(
        routes=routes,
        middleware=[Middleware(Authenticate, keys=state.keys)] if state.keys.enabled else [],
        exception_handlers={HTTPException: http_error, StoreUnavailable: store_unavailable},
    )


def _guarded(keys: KeyRing, roles: frozenset[Role], handler: _Handler) -> _Handler:
    """``handler`` behind the check of the caller's key: 401 without one, 403
    without one of ``roles``."""
    if not keys.enabled or roles == PUBLIC:
        return handler

    async def guarded(request: Request) -> Response:
        refusal = keys.check(request.headers.get("authorization"), roles)
        if refusal is not None:
            return refusal.response()
        return await handler(request)

    return guarded


def _by_method(handlers: dict[str, _Handler]) -> _Handler:
    # One Route per path, not one per method: Starlette answers a wrong method
    # with the first Route whose path matches, so only a single Route can name
    # every allowed method in the 405's Allow header.
    if "GET" in handlers:
        handlers = {**handlers, "HEAD": handlers["GET"]}

    async def endpoint(request: Request) -> Response:
        return await handlers[request.method](request)

    return endpoint


#: A blob upload is held in memory up to this size, and on disk past it.
_SPOOL_BYTES = 1024 * 1024


#: The header that makes ``POST /runs`` safe to retry (see ``Store.create_runs``).
IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@attrs.define(eq=False)
class _Handlers:
    """The HTTP handlers; each :class:`~._routes.Endpoint` names its own."""

    state: AppState

    async def health(self, request: Request) -> Response:
        state = self.state
        return JSONResponse(
            {
                "status": "ok",
                "version": __version__,
                "runs": await state.store.counts(),
                "subscribers": len(state.dispatcher.subscribers),
            }
        )

    async def create_runs(self, request: Request) -> Response:
        state = self.state
        body = await _body(request, state)
        try:
            batch = from_json(body, TaskRunCreateBatch)
        except InvalidPayload as exc:
            return _error(422, f"invalid run batch: {exc}")
        raw_key = request.headers.get(IDEMPOTENCY_HEADER)
        idempotency = None
        if raw_key is not None:
            if not _IDEMPOTENCY_KEY.fullmatch(raw_key):
                return _error(
                    422, f"{IDEMPOTENCY_HEADER} must be 1 to 255 visible ASCII characters"
                )
            idempotency = Idempotency(raw_key, hashlib.sha256(body).hexdigest())
        try:
            ids = await state.store.create_runs(batch.runs, state.now(), idempotency)
        except IdempotencyConflict as exc:
            return _error(409, str(exc))
        except StoreError as exc:  # a parameters_ref that names no stored blob
            return _error(404, str(exc))
        state.dispatcher.wake()
        state.bus.runs_due()
        log.info("created %d runs", len(ids))
        state.metrics.runs_created([c.task_key for c in batch.runs])
        cached = any(c.cache_key is not None for c in batch.runs)
        if state.events.watched and len(ids) > MAX_PENDING:
            state.events.runs_reset()
        elif cached or state.events.watched:
            # A cache hit is created COMPLETED: it has ended, for metrics too.
            created = await state.store.read_runs(ids)
            state.events.runs(created)
            state.metrics.runs_changed([r for r in created if r.state.is_terminal])
        return _json(CreatedRuns(ids=tuple(ids)), 201)

    async def watch_feed(self, request: Request) -> Response:
        state = self.state
        name = _feed_id(request)
        try:
            wanted = from_json(await _body(request, state), FeedWatch).ids
        except InvalidPayload as exc:
            return _error(422, f"invalid watch request: {exc}")
        feed = state.feeds.open(name, _owner(request))
        if feed is None:
            return _error(409, "this server keeps as many feeds as it may, or the id is taken")
        try:
            state.feeds.watch(feed, wanted)
        except OverflowError as exc:
            return _error(409, str(exc))
        # Watched first, then read: an end is heard either way, never missed.
        # Every run asked about is read, watched before or not: an earlier
        # request for it may have failed before it read.
        waiting = [run_id for run_id in dict.fromkeys(wanted) if run_id in feed.pending]
        found = await state.store.run_ends(waiting)
        missing = [run_id for run_id in waiting if run_id not in found]
        state.feeds.unwatch(feed, missing)
        ended = [run_id for run_id, is_ended in found.items() if is_ended]
        if ended:
            state.feeds.heard(feed, await state.store.read_runs(ended))
        return _json(FeedWatched(epoch=feed.epoch, refused=tuple(missing)))

    async def poll_feed(self, request: Request) -> Response:
        state = self.state
        name = _feed_id(request)
        epoch = int(_query_number(request, EPOCH))
        after = int(_query_number(request, AFTER))
        timeout = min(_query_number(request, WAIT_TIMEOUT), state.max_wait_seconds)
        feed = state.feeds.get(name, _owner(request), epoch)
        if feed is None:
            return _error(404, "no such feed on this server: wait for its runs one by one")
        state.metrics.wait_request("feed")
        try:
            page = await state.feeds.poll(feed, after, timeout)
        except ValueError as exc:
            return _error(404, f"not this feed's cursor: {exc}")
        return Response(page, media_type="application/json")

    async def list_runs(self, request: Request) -> Response:
        raw_state = request.query_params.get(STATE.name)
        try:
            run_state = None if raw_state is None else TaskRunState(raw_state)
        except ValueError:
            return _error(422, f"unknown state {raw_state!r}")
        limit = int(_query_number(request, LIMIT))
        offset = int(_query_number(request, OFFSET))
        runs = await self.state.store.list_runs(
            run_state,
            request.query_params.get(TASK_KEY.name),
            limit,
            offset,
            tag=request.query_params.get(TAG.name),
        )
        return _json(RunList(runs=tuple(runs)))

    async def read_run(self, request: Request) -> Response:
        run_id = _run_id(request)
        runs = await self.state.store.read_runs([run_id])
        if not runs:
            return _error(404, f"no run {run_id}")
        return _json(runs[0])

    async def wait_run(self, request: Request) -> Response:
        state = self.state
        run_id = _run_id(request)
        timeout = _query_number(request, WAIT_TIMEOUT)
        state.metrics.wait_request("run")
        with state.waiters.watch([run_id]) as watch:
            runs = await state.store.read_runs([run_id])
            if not runs:
                return _error(404, f"no run {run_id}")
            if not runs[0].state.is_terminal:
                with trio.move_on_after(min(timeout, self.state.max_wait_seconds)):
                    await watch.event.wait()
                if run_id in watch.ended:
                    return _json(watch.ended[run_id])
                runs = await state.store.read_runs([run_id])
        return _json(runs[0])

    async def wait_runs(self, request: Request) -> Response:
        state = self.state
        try:
            wait = from_json(await _body(request, state), WaitRequest)
        except InvalidPayload as exc:
            return _error(422, f"invalid wait request: {exc}")
        state.metrics.wait_request("runs")
        wanted = set(wait.ids)
        with state.waiters.watch(wanted) as watch:
            # States first (no payloads): most runs waited for have not ended,
            # and those that end from now on come through the watch.
            ends = await state.store.run_ends(wait.ids)
            done = [run_id for run_id, has_ended in ends.items() if has_ended]
            read = await state.store.read_runs(done)
            # An ended run may have been retried since (it is watched) or
            # deleted by retention since (it is missing, as below).
            ended = {r.id: r for r in read if r.state.is_terminal}
            gone = (wanted - ends.keys()) | set(done).difference(r.id for r in read)
            if gone:
                # A run that does not exist (or was deleted by retention) would
                # never end: say so now instead of holding the wait forever.
                missing = sorted(str(i) for i in gone)
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                return _error(404, f"no run {', '.join(missing[:3])}{more}")
            with trio.move_on_after(min(wait.timeout, state.max_wait_seconds)):
                while not _satisfied(wait.return_when, len(ended), len(wanted)):
                    await watch.event.wait()
                    ended.update(watch.take())  # only what is new: no re-copying
                    if state.stopping.is_set():
                        break
            ended.update(watch.take())
        return _json(RunList(runs=tuple(ended.values())))

    async def cancel_run(self, request: Request) -> Response:
        run_id = _run_id(request)
        try:
            run = await self.state.cancel(run_id)
        except StoreError:
            return _error(404, f"no run {run_id}")
        except IllegalTransition as exc:
            return _error(409, f"run {run_id} cannot be cancelled: {exc}")
        return _json(run)

    async def put_blob(self, request: Request) -> Response:
        state = self.state
        # Streamed to a temporary file (memory past the first MiB would be one
        # upload's whole size), then copied into the store in chunks.
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:

            async def write(chunk: bytes) -> None:
                # A chunk (tens of KiB) to the page cache: cheaper than a thread hop.
                spool.write(chunk)

            try:
                await _receive(request, state, write)
            except OSError as exc:  # the temporary directory is full
                return _error(503, f"the server cannot hold this upload now: {exc}")
            ref = await state.store.put_blob_file(spool, state.now())
        return JSONResponse({"id": ref}, status_code=201)

    async def get_blob(self, request: Request) -> Response:
        ref = request.path_params[BLOB_ID.name]
        try:
            uuid.UUID(ref)
        except ValueError:
            return _error(404, f"no blob {ref!r}")
        data = await self.state.store.get_blob(ref)
        if data is None:
            return _error(404, f"no blob {ref!r}")
        return Response(data, media_type="application/octet-stream")

    async def run_history(self, request: Request) -> Response:
        run_id = _run_id(request)
        history = await self.state.store.read_history(run_id)
        if history is None:
            return _error(404, f"no run {run_id}")
        return _json(RunHistory(history=tuple(history)))

    async def run_logs(self, request: Request) -> Response:
        run_id = _run_id(request)
        found = await self.state.store.read_logs(run_id)
        if found is None:
            return _error(404, f"no run {run_id}")
        records, dropped = found
        return _json(RunLogs(logs=tuple(records), dropped=dropped))

    async def retry_run(self, request: Request) -> Response:
        state = self.state
        run_id = _run_id(request)
        try:
            run = await state.store.retry_run(run_id, state.now())
        except StoreError:
            return _error(404, f"no run {run_id}")
        except IllegalTransition as exc:
            return _error(
                409,
                f"run {run_id} is {exc.current.value}: only a FAILED, CRASHED or CANCELLED"
                " run can be retried",
            )
        state.changed(Outcome(changed=(run,)))
        state.dispatcher.wake()
        log.info("run %s retried by request", run_id)
        return _json(run)

    async def put_logs(self, request: Request) -> Response:
        try:
            batch = from_json(await _body(request, self.state), LogBatch)
        except InvalidPayload as exc:
            return _error(422, f"invalid log batch: {exc}")
        stored, dropped, unknown = await self.state.store.put_logs(batch.records)
        return JSONResponse(
            {"stored": stored, "dropped": dropped, "unknown": unknown}, status_code=202
        )

    async def _workers(self) -> list[WorkerInfo]:
        state = self.state
        leases = await state.store.lease_counts()
        return [
            WorkerInfo(
                connection_id=sub.id,
                client_id=sub.client_id,
                task_keys=sub.keys,
                limit=sub.limit,
                in_flight=leases.get(sub.id, 0),
                connected_at=_utc(sub.connected_at),
                last_seen=_utc(sub.last_seen),
                draining=sub.draining,
            )
            for sub in sorted(state.dispatcher.subscribers, key=lambda s: s.connected_at)
        ]

    async def list_workers(self, request: Request) -> Response:
        return _json(WorkerList(workers=tuple(await self._workers())))

    async def list_tasks(self, request: Request) -> Response:
        return _json(TaskStatsList(tasks=tuple(await self._task_stats())))

    async def _task_stats(self) -> list[TaskStats]:
        state = self.state
        served: dict[str, int] = {}
        for sub in state.dispatcher.subscribers:
            for key in sub.keys:
                served[key] = served.get(key, 0) + 1
        return await state.store.task_stats(state.now(), served)

    async def events(self, request: Request) -> Response:
        state = self.state
        if state.events.full:
            response = _error(503, f"{MAX_STREAMS} event streams are open already")
            response.headers["Retry-After"] = "5"
            return response

        async def stream() -> AsyncIterator[bytes]:
            with state.events.open_stream() as events:
                yield b"event: ready\ndata: {}\n\n"
                while not events.closed:
                    # No yield inside the cancel scope: this is an async generator.
                    taken = None
                    with trio.move_on_after(EVENTS_KEEPALIVE):
                        taken = await events.take()
                    if taken is None:
                        yield b": keepalive\n\n"
                    elif taken:
                        yield b"".join(event.encode() for event in taken)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def metrics(self, request: Request) -> Response:
        body, media_type = self.state.metrics.render(
            await self._task_stats(), await self._workers()
        )
        return Response(body, headers={"Content-Type": media_type})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


def _satisfied(return_when: ReturnWhen, ended: int, wanted: int) -> bool:
    if return_when is ReturnWhen.FIRST_ENDED:
        return ended > 0
    return ended >= wanted


class _Closed(Exception):
    """The subscription ends; ``code`` and ``reason`` go in the close frame."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


#: Which close wins when several end a subscription at once: what the worker did
#: (a 1008 tells it to stop rather than reconnect and repeat it, an expired
#: lease says its runs were released) says more than the server-wide shutdown.
_CLOSE_PRECEDENCE = (CLOSE_POLICY, CLOSE_TRY_AGAIN, CLOSE_LEASE_EXPIRED, CLOSE_GOING_AWAY)


def _most_telling(group: BaseExceptionGroup[_Closed]) -> _Closed:
    """The :class:`_Closed` of ``group`` to send, by :data:`_CLOSE_PRECEDENCE`;
    the others are logged, not lost."""
    closes = leaves(group)
    rank = {code: i for i, code in enumerate(_CLOSE_PRECEDENCE)}
    chosen = min(closes, key=lambda c: rank.get(c.code, len(rank)))
    for other in closes:
        if other is not chosen:
            log.info("subscription also closing (not sent): %s", _safe(other.reason))
    return chosen


@attrs.define(eq=False)
class _Frame:
    """A worker's frame, read and checked: its messages, its size in bytes, and
    when it arrived (server clock)."""

    messages: list[WorkerMessage]
    size: int
    received: float


@attrs.define(eq=False)
class _ReadAhead:
    """The bytes of the frames a connection has read and not yet applied."""

    size: int = 0
    #: Set when the applier takes frames (the reader waits on it past MAX_BYTES_AHEAD).
    taken: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class SubscriptionHandler:
    """One worker's websocket: a reader, a sender, and a watch on server shutdown.

    ``websocket`` is Starlette's, or anything with its ``accept``, ``receive``,
    ``send_text`` and ``close`` (tests join it to a real worker over memory
    channels), and ``headers`` when ``state.keys`` has keys: a connection
    without a valid key with the ``work`` role is closed with 4001 or 4003.
    """

    state: AppState
    websocket: WebSocket
    sub: Subscriber | None = None
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def run(self) -> None:
        state = self.state
        await self.websocket.accept()
        state.connections += 1
        state.connections_closed = trio.Event()
        closed: _Closed | None = None
        try:
            try:
                await self._serve()
            except* _Closed as group:
                # Raised inside a nursery, so the reader and the shutdown watch
                # may both raise in the same tick; one close frame can carry one.
                closed = _most_telling(group)
            if closed is not None:
                log.info("closing subscription: %s", _safe(closed.reason))
                await self._close(closed.code, closed.reason)
        finally:
            state.connections -= 1
            if state.connections == 0:
                state.connections_closed.set()
            if self.sub is not None:
                state.dispatcher.remove(self.sub)
                state.events.workers(len(state.dispatcher.subscribers))
                try:
                    with trio.CancelScope(shield=True):
                        outcome = await state.store.release_owner(self.sub.id, state.now())
                except (StoreError, StoreUnavailable):
                    # The server is going down, or its database refuses writes:
                    # the next start (or the next release) frees these leases.
                    log.info("worker %r unsubscribed as the server stops", self.sub.client_id)
                else:
                    state.changed(outcome)
                    log.info(
                        "worker %r unsubscribed; %d leased runs released",
                        self.sub.client_id,
                        len(outcome.changed),
                    )

    async def _close(self, code: int, reason: str) -> None:
        with trio.move_on_after(1):
            async with self._send_lock:
                try:
                    await self.websocket.close(code, _safe(reason)[:120])
                except Exception:  # the peer may already be gone
                    log.debug("close after disconnect", exc_info=True)

    async def _receive_frame(self) -> str | bytes | None:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        return text if text is not None else message.get("bytes")

    async def _serve(self) -> None:
        state = self.state
        if state.keys.enabled:
            # Checked after the accept, so the close frame's reason tells the
            # worker why; a refused handshake would reach it as a bare status.
            refusal = state.keys.check(
                self.websocket.headers.get("authorization"), SUBSCRIBE_ROLES
            )
            if refusal is not None:
                raise _Closed(refusal.close_code, refusal.close_reason)
        if state.stopping.is_set():
            raise _Closed(CLOSE_GOING_AWAY, "the server is shutting down")
        with trio.move_on_after(SUBSCRIBE_TIMEOUT) as scope:
            first = await self._receive_frame()
        if scope.cancelled_caught:
            raise _Closed(CLOSE_TRY_AGAIN, "no subscribe message in time")
        if first is None:
            return
        try:
            messages = decode_worker_frame(first)
        except InvalidPayload as exc:
            raise _Closed(CLOSE_POLICY, f"invalid subscribe: {exc}") from None
        hello = messages[0]
        if len(messages) != 1 or not isinstance(hello, Subscribe):
            raise _Closed(CLOSE_POLICY, "the first message must be a lone subscribe")
        if not hello.keys or not all(hello.keys):
            raise _Closed(CLOSE_POLICY, "subscribe needs at least one non-empty task key")
        if not 0 <= hello.credits <= MAX_CREDITS:
            raise _Closed(CLOSE_POLICY, f"credits must be in [0, {MAX_CREDITS}]")
        self.sub = state.dispatcher.add(hello.keys, hello.client_id, hello.credits)
        state.events.workers(len(state.dispatcher.subscribers))
        # %r: the id and keys come from the client, and a newline must not
        # forge a log line.
        log.info(
            "worker %r subscribed to %r with %d credits",
            hello.client_id,
            hello.keys,
            hello.credits,
        )
        await self._send(
            [Subscribed(connection_id=self.sub.id, lease_seconds=state.lease_seconds)]
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sender, self.sub)
            nursery.start_soon(self._watch_stopping)
            await self._reader(self.sub)
            nursery.cancel_scope.cancel()

    async def _send(self, messages: list[Any]) -> None:
        # trio.Lock.acquire yields a scheduling round even when the lock is
        # free, and that round let HTTP answers and the dispatcher's next query
        # go ahead of every delivery: a free lock (the usual case) is taken at once.
        if self._send_lock.locked():
            await self._send_lock.acquire()
        else:
            self._send_lock.acquire_nowait()
        try:
            await self.websocket.send_text(encode_frame(messages))
        finally:
            self._send_lock.release()

    async def _sender(self, sub: Subscriber) -> None:
        while True:
            await self._send(await sub.next_messages())

    async def _watch_stopping(self) -> None:
        await self.state.stopping.wait()
        raise _Closed(CLOSE_GOING_AWAY, "the server is shutting down")

    async def _reader(self, sub: Subscriber) -> None:
        """Read and check frames; hand their messages to the applier in order."""
        send, receive = trio.open_memory_channel[_Frame](MAX_FRAMES_AHEAD)
        ahead = _ReadAhead()
        closing: _Closed | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._applier, sub, receive, ahead)
            async with send:
                try:
                    await self._read_frames(sub, send, ahead)
                except _Closed as exc:
                    closing = exc  # once the frames read before it are applied
        if closing is not None:
            raise closing

    async def _read_frames(
        self, sub: Subscriber, send: trio.MemorySendChannel[_Frame], ahead: _ReadAhead
    ) -> None:
        state = self.state
        while True:
            # The lease lives as long as the worker keeps talking.
            with trio.move_on_after(state.lease_seconds) as lease:
                data = await self._receive_frame()
            if lease.cancelled_caught:
                raise _Closed(
                    CLOSE_LEASE_EXPIRED,
                    f"lease expired: nothing from the worker for {state.lease_seconds:g} s",
                )
            if data is None:
                return
            sub.last_seen = received = state.now()
            try:
                messages = decode_worker_frame(data)
            except InvalidPayload as exc:
                raise _Closed(CLOSE_POLICY, f"invalid message: {exc}") from None
            for message in messages:
                if isinstance(message, Credit) and message.n < 0:
                    raise _Closed(CLOSE_POLICY, f"credits must stay in [0, {MAX_CREDITS}]")
                if not isinstance(message, _FROM_SUBSCRIBED_WORKER):
                    raise _Closed(CLOSE_POLICY, "subscribe may only be sent once")
            ahead.size += len(data)
            await send.send(_Frame(messages, len(data), received))
            while ahead.size > MAX_BYTES_AHEAD:
                ahead.taken = trio.Event()
                await ahead.taken.wait()

    async def _applier(
        self, sub: Subscriber, receive: trio.MemoryReceiveChannel[_Frame], ahead: _ReadAhead
    ) -> None:
        """Apply the frames read, in order: all those waiting at once, in one transaction.

        While one batch is applied, the frames that arrive queue up (see
        MAX_FRAMES_AHEAD), and the next batch takes them all: under load, many
        frames' reports cost one transaction. Credits are granted after the
        reports sent before them are applied, and a drain is answered after.
        A frame that would take the credits past MAX_CREDITS closes the
        connection once the frames before it are applied.
        """
        state = self.state
        async for first in receive:
            frames = [first]
            while True:
                try:
                    frames.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            ahead.size -= sum(frame.size for frame in frames)
            ahead.taken.set()
            messages: list[WorkerMessage] = []
            granted = 0
            refused: _Closed | None = None
            received = first.received
            for frame in frames:
                adds = sum(m.n for m in frame.messages if isinstance(m, Credit))
                if sub.credits + granted + adds > MAX_CREDITS:
                    refused = _Closed(CLOSE_POLICY, f"credits must stay in [0, {MAX_CREDITS}]")
                    break
                granted += adds
                messages += frame.messages
                received = frame.received
            reports = [m for m in messages if isinstance(m, Started | Finished | Released)]
            if reports:
                # Timed (started_at, finished_at) when the last of these frames
                # arrived, not after the wait for the frames ahead of them.
                outcome = await state.store.apply_reports(sub.id, reports, received)
                state.changed(outcome)
                for run_id, reason in outcome.rejected:
                    log.warning("refused a report on run %s: %s", run_id, _safe(reason))
                    sub.post(Rejected(id=run_id, reason=reason))
            for message in messages:
                if isinstance(message, Credit):
                    state.dispatcher.grant(sub, message.n)
                elif isinstance(message, Drain):
                    state.dispatcher.drain(sub)
                    sub.post(Drained(seq=message.seq))
            if refused is not None:
                raise refused
