"""HTTP clients for the server's REST API: :class:`TaskWorkerClient` (trio) and
:class:`SyncClient` (plain blocking code).

Each API operation is written once, as a generator that yields the requests
it needs and receives their responses (the sans-I/O shape httpx and hypercorn
use internally); the two clients only differ in how they send a request.

Payloads (pickled parameters and results) go inline with the run when they
are small and as a stored blob otherwise. That decision, and reading either
form back, is written once here (:func:`_op_store_payload`,
:func:`_op_load_payload`) and used by submitters and workers alike.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import os
import random
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import attrs
import httpx
import trio

from ._exceptions import (
    ConfigurationError,
    RemoteTraceback,
    SerializationError,
    ServerError,
    ServerUnavailable,
    TaskRunCancelled,
    TaskRunCrashed,
    TaskRunFailed,
    TaskRunNotFound,
)
from ._feed import FeedState
from ._guard import in_trio_run
from ._models import (
    CreatedRuns,
    FeedPage,
    FeedWatch,
    FeedWatched,
    LogBatch,
    LogRecord,
    ReturnWhen,
    RunList,
    TaskRun,
    TaskRunCreate,
    TaskRunCreateBatch,
    WaitRequest,
)
from ._serialization import create_batch_json, from_json, loads_payload, to_json
from ._states import TaskRunState

__all__ = [
    "DEFAULT_API_URL",
    "INLINE_PAYLOAD_LIMIT",
    "StoredPayload",
    "SyncClient",
    "TaskWorkerClient",
    "answering_url",
    "api_key_from_env",
    "api_url_from_env",
    "api_urls",
    "auth_headers",
    "bound_client",
    "client_for",
    "fits_inline",
    "load_payload",
    "normalize_api_url",
    "open_client",
    "pooled_http",
    "redact_url",
    "shared_client",
    "store_payload",
    "sync_client",
    "using_client",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_API_URL = "http://127.0.0.1:4200"
#: Payloads up to this size travel inline with the run; larger ones become blobs.
INLINE_PAYLOAD_LIMIT = 64 * 1024
#: The longest one long-poll request waits on the server before asking again.
LONG_POLL_SECONDS = 30.0
_CONNECT_TIMEOUT = 10.0


def redact_url(url: str) -> str:
    """``url`` fit for a log line or an error message: a password in it becomes ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port is not None else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def _redact_item(item: str) -> str:
    """A refused item of a URL list, fit for an error message.

    The list is split at its commas before anything is parsed, so a password
    holding a comma is cut in two, and either half can be an item: whatever
    stands before an ``@``, and a "port" that is not a number, is hidden.
    """
    scheme, sep, rest = item.partition("://")
    if not sep:
        scheme, rest = "", item
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    host, colon, port = netloc.rpartition(":")
    if colon and port and not port.isdigit():
        netloc = f"{host}:***"
    return f"{scheme}{sep}{netloc}{slash}{path}"


def api_urls(api_url: str) -> tuple[str, ...]:
    """The server URLs in ``api_url``: one, or several replicas of one server
    separated by commas (``"http://a:4200,http://b:4200"``).

    Whitespace and trailing slashes are stripped and empty items dropped.
    Raises :class:`ConfigurationError`, naming the item, unless each is an
    ``http://`` or ``https://`` URL with a host.
    """
    urls = tuple(url for item in api_url.split(",") if (url := item.strip().rstrip("/")))
    if not urls:
        raise ConfigurationError(f"no server URL in {api_url!r}")
    for url in urls:
        try:
            parts = urllib.parse.urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            ok = False
        if not ok:
            raise ConfigurationError(
                f"the server URL {_redact_item(url)!r} is not an http:// or https:// URL"
                " with a host (several go separated by commas)"
            )
    return urls


def normalize_api_url(api_url: str) -> str:
    """``api_url`` as clients know it: its URLs (see :func:`api_urls`) joined by commas.

    Two spellings of the same servers give the same string, so it can key the
    shared clients. One URL comes back as itself, without a trailing slash.
    """
    return ",".join(api_urls(api_url))


def api_url_from_env() -> str:
    """The server URL(s) from ``TRIO_TASKWORKER_API_URL``, or ``http://127.0.0.1:4200``.

    Normalized (:func:`normalize_api_url`); several URLs are replicas to fail
    over across. Raises :class:`ConfigurationError` for a malformed value.
    """
    return normalize_api_url(
        os.environ.get("TRIO_TASKWORKER_API_URL", "").strip() or DEFAULT_API_URL
    )


def _unreachable(where: str | Sequence[str], exc: httpx.TransportError) -> ServerUnavailable:
    """The error for a request that never got an answer from ``where`` (a URL, or
    every URL tried), naming an untrusted certificate when that is why (httpx
    shows it as a bare ``ConnectError('')``)."""
    urls = ", ".join(redact_url(url) for url in ([where] if isinstance(where, str) else where))
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return ServerUnavailable(
            f"cannot reach {urls}: its TLS certificate is not trusted"
            f" ({cause.verify_message}); set TRIO_TASKWORKER_CA_FILE to the CA bundle"
            " that signed it"
        )
    return ServerUnavailable(f"cannot reach {urls}: {exc!r}")


def api_key_from_env() -> str | None:
    """The API key from ``TRIO_TASKWORKER_API_KEY``, or None when it is unset or empty."""
    return os.environ.get("TRIO_TASKWORKER_API_KEY", "").strip() or None


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The headers that carry ``api_key`` (default: from the environment), if there is one.

    HTTP requests and the worker's websocket handshake both send these.
    """
    key = api_key_from_env() if api_key is None else api_key
    return {"authorization": f"Bearer {key}"} if key else {}


@attrs.frozen(kw_only=True)
class _Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    content: bytes | None = None
    content_type: str = "application/json"
    read_timeout: float = 30.0
    #: Safe to send again after a transport error (the drivers then retry it,
    #: the same request, up to len(RETRY_DELAYS) times, after a jittered wait).
    retry: bool = False
    #: Safe to send to another replica after a transport error even if this one
    #: may have received it (a read, or a write whose repeat changes nothing):
    #: each server URL gets it once, at once, but it is not sent twice to the
    #: same server unless ``retry`` says so. With one URL this changes nothing.
    idempotent: bool = False
    idempotency_key: str | None = None


#: Waits before each retry of a request that is safe to send again, in seconds
#: (the most: each wait is drawn between zero and this, so that the clients of a
#: server that went away do not all come back at the same moment).
RETRY_DELAYS = (0.1, 0.5, 2.0)

_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


class _ReplicaUnavailable(httpx.TransportError):
    """A replica answered 503: it cannot reach its database now (or is
    overloaded). Another replica of the list may well serve the call, so a
    call that is safe to send again moves on as after a transport error."""


@attrs.define(eq=False)
class _Route:
    """A client's server URLs and the one it sends to now.

    Sticky: calls go to the current URL for as long as it answers. A URL that
    fails makes the next one current, so later calls skip it at once; a call
    that fails at the same time as another one moves from where it was, and
    does not skip a URL another call moved to. The URL that answered last is
    current, whatever calls in between met.
    """

    urls: tuple[str, ...]
    current: int = 0

    def answered(self, url: str) -> None:
        """``url`` answered a call: stay there."""
        self.current = self.urls.index(url)

    def deliver(
        self, call: _Call
    ) -> Generator[tuple[str, float], httpx.Response | httpx.TransportError, httpx.Response]:
        """Where to send ``call``, and how long to wait first; the driver sends
        in what each attempt got (an answer or a transport error) and gets the
        next place, until the answer to hand back is returned.

        A 503 (a replica cut off from its database, or overloaded) sends a call
        that is safe to send again to another replica, as a transport error
        does; when every replica says so, the 503 is the answer.
        """
        attempts = self.attempts(call)
        url, delay = next(attempts)
        while True:
            got = yield url, delay
            if isinstance(got, httpx.TransportError):
                url, delay = attempts.send(got)
                continue
            unavailable = got.status_code == 503 and len(self.urls) > 1
            if not (unavailable and (call.idempotent or call.retry)):
                self.answered(url)
                return got
            try:
                url, delay = attempts.send(_ReplicaUnavailable(f"{url} answered 503"))
            except ServerUnavailable:
                return got

    def attempts(
        self, call: _Call
    ) -> Generator[tuple[str, float], httpx.TransportError, NoReturn]:
        """Where to send ``call``, and how long to wait first; the driver sends
        in each transport error it meets and gets the next place.

        A connect error (nothing was sent) moves on to the next URL at once,
        whatever the call. Once every URL has failed, a ``retry`` call waits and
        goes round again, up to ``len(RETRY_DELAYS)`` times; any other raises
        :class:`ServerUnavailable` naming every URL tried. Another transport
        error (the server may have the request) sends the call again only if
        it is ``retry`` (on the next URL, after a wait) or ``idempotent`` (on
        the next URL not tried yet in this round).
        """
        n = len(self.urls)
        index = self.current
        delays = iter(RETRY_DELAYS if call.retry else ())
        tried: dict[str, None] = {}
        failed = 0  # URLs that failed since the last wait
        delay = 0.0
        while True:
            exc = yield self.urls[index], delay
            url = self.urls[index]
            tried[url] = None
            if self.current == index:
                self.current = (index + 1) % n
            # Another URL at once, or (a possibly received request) only after a wait.
            at_once = isinstance(exc, _CONNECT_ERRORS) or (call.idempotent and not call.retry)
            failed = failed + 1 if at_once else n
            if failed < n:
                delay = 0.0
            elif (wait := next(delays, None)) is not None:
                delay, failed = random.uniform(0.0, wait), 0
            else:
                raise _unreachable(list(tried), exc) from exc
            index = (index + 1) % n
            if n == 1:
                log.info("%s %s: %r; retrying", call.method, call.path, exc)
            else:
                log.info(
                    "%s unreachable (%r); trying %s",
                    redact_url(url),
                    exc,
                    redact_url(self.urls[index]),
                )


Operation = Generator[_Call, httpx.Response, T]


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        detail = response.text[:500] or response.reason_phrase
    if response.status_code == 404 and "run" in detail:
        raise TaskRunNotFound(404, detail)
    raise ServerError(response.status_code, detail)


@attrs.frozen
class StoredPayload:
    """Where a payload went: ``inline`` bytes to send with the run, or a blob ``ref``."""

    inline: bytes | None
    ref: str | None


# --- operations ----------------------------------------------------------------------


def _op_put_blob(data: bytes) -> Operation[str]:
    # A retry may store the blob twice; the copy nothing references is deleted later.
    response = yield _Call(
        method="POST",
        path="/blobs",
        content=data,
        content_type="application/octet-stream",
        retry=True,
    )
    _raise_for_status(response)
    return str(response.json()["id"])


def _op_get_blob(ref: str) -> Operation[bytes]:
    response = yield _Call(method="GET", path=f"/blobs/{ref}", idempotent=True)
    _raise_for_status(response)
    return response.content


def fits_inline(data: bytes) -> bool:
    """True when a payload is small enough to travel inline with its run."""
    return len(data) <= INLINE_PAYLOAD_LIMIT


def _op_store_payload(data: bytes) -> Operation[StoredPayload]:
    """Keep a small payload inline; store a large one as a blob."""
    if fits_inline(data):
        return StoredPayload(data, None)
    ref = yield from _op_put_blob(data)
    return StoredPayload(None, ref)


def _op_load_payload(inline: bytes | None, ref: str | None) -> Operation[bytes | None]:
    """The payload bytes, whichever way they were stored (None if there are none)."""
    if inline is None and ref is not None:
        inline = yield from _op_get_blob(ref)
    return inline


def _op_submit(calls: Sequence[tuple[TaskRunCreate, bytes]]) -> Operation[list[uuid.UUID]]:
    batch = TaskRunCreateBatch(runs=tuple(create for create, _ in calls))  # checks the size
    parameters = []
    for _, payload in calls:
        stored = yield from _op_store_payload(payload)
        parameters.append((stored.inline, stored.ref))
    # One key per submission: a retry after a lost answer gets the same ids back
    # instead of creating the runs twice (and an error never hides created runs).
    # The server keeps the keys in its database, so a replica that shares it
    # answers the replay with the same ids too.
    response = yield _Call(
        method="POST",
        path="/runs",
        content=create_batch_json(batch, parameters),
        retry=True,
        idempotency_key=uuid.uuid4().hex,
    )
    _raise_for_status(response)
    return list(from_json(response.content, CreatedRuns).ids)


def _op_watch_feed(feed: str, ids: Sequence[uuid.UUID]) -> Operation[FeedWatched | None]:
    """Ask the feed to watch ``ids``: its answer, or None when it watches none of
    them (it is full, the server keeps as many feeds as it may, or it is a
    server without feeds)."""
    response = yield _Call(
        method="POST",
        path=f"/feeds/{feed}/watch",
        content=to_json(FeedWatch(ids=tuple(ids))),
        idempotent=True,  # a repeat watches nothing more
    )
    if response.status_code in (404, 405, 409, 501):
        return None
    _raise_for_status(response)
    return from_json(response.content, FeedWatched)


def _op_poll_feed(feed: str, epoch: int, after: int, wait: float) -> Operation[FeedPage | None]:
    """One long-poll of the feed: the page, or None when the server has no such feed."""
    response = yield _Call(
        method="GET",
        path=f"/feeds/{feed}",
        params={"epoch": epoch, "after": after, "timeout": wait},
        read_timeout=wait + _CONNECT_TIMEOUT,
        idempotent=True,  # a repeat acknowledges what the first one did
    )
    if response.status_code == 404:
        return None
    _raise_for_status(response)
    return from_json(response.content, FeedPage)


def _op_read_run(run_id: uuid.UUID) -> Operation[TaskRun]:
    response = yield _Call(method="GET", path=f"/runs/{run_id}", idempotent=True)
    _raise_for_status(response)
    return from_json(response.content, TaskRun)


def _op_list_runs(
    state: TaskRunState | None, task_key: str | None, limit: int, offset: int
) -> Operation[list[TaskRun]]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if state is not None:
        params["state"] = str(state)
    if task_key is not None:
        params["task_key"] = task_key
    response = yield _Call(method="GET", path="/runs", params=params, idempotent=True)
    _raise_for_status(response)
    return list(from_json(response.content, RunList).runs)


#: A driver's clock, in seconds: ``trio.current_time`` for the trio client (so a
#: wait follows a test's virtual clock), ``time.monotonic`` for the blocking one.
Clock = Callable[[], float]


def _remaining(deadline: float | None, clock: Clock) -> float:
    if deadline is None:
        return LONG_POLL_SECONDS
    return max(0.0, min(LONG_POLL_SECONDS, deadline - clock()))


def _op_wait_run(run_id: uuid.UUID, timeout: float | None, clock: Clock) -> Operation[TaskRun]:
    deadline = None if timeout is None else clock() + timeout
    while True:
        wait = _remaining(deadline, clock)
        response = yield _Call(
            method="GET",
            path=f"/runs/{run_id}/wait",
            params={"timeout": wait},
            read_timeout=wait + _CONNECT_TIMEOUT,
            idempotent=True,  # a long-poll only reads
        )
        _raise_for_status(response)
        run = from_json(response.content, TaskRun)
        if run.state.is_terminal or (deadline is not None and clock() >= deadline):
            return run


#: Ids per ``POST /runs/wait`` request, so each body and answer stays a sensible size.
_WAIT_CHUNK = 1000
#: Waiting for the first of more runs than one request watches, how long one
#: long-poll lasts before the other chunks are looked at again.
_SWEEP_SECONDS = 1.0


def _op_post_wait(
    ids: Sequence[uuid.UUID], wait: float, return_when: ReturnWhen
) -> Operation[list[TaskRun]]:
    """One ``POST /runs/wait``: the runs among ``ids`` that have ended when it answers."""
    response = yield _Call(
        method="POST",
        path="/runs/wait",
        content=to_json(WaitRequest(ids=tuple(ids), timeout=wait, return_when=return_when)),
        read_timeout=wait + _CONNECT_TIMEOUT,
        idempotent=True,  # a POST, but it only reads
    )
    _raise_for_status(response)
    return list(from_json(response.content, RunList).runs)


def _finish_order(run: TaskRun) -> tuple[bool, float]:
    return (run.finished_at is None, run.finished_at.timestamp() if run.finished_at else 0.0)


def _op_wait_ended(
    ids: Sequence[uuid.UUID], timeout: float | None, clock: Clock, return_when: ReturnWhen
) -> Operation[list[TaskRun]]:
    """Wait until every run in ``ids`` has ended (``ALL_ENDED``) or one has
    (``FIRST_ENDED``), or until ``timeout``; return the runs that have ended by
    then, in the order they ended. None may have, when the time is up.
    """
    deadline = None if timeout is None else clock() + timeout
    ended: dict[uuid.UUID, TaskRun] = {}
    pending = list(dict.fromkeys(ids))
    while pending:
        wait = _remaining(deadline, clock)
        first, rest = pending[:_WAIT_CHUNK], pending[_WAIT_CHUNK:]
        runs: list[TaskRun] = []
        if return_when is ReturnWhen.FIRST_ENDED and rest:
            # A request watches one chunk. Look at the others without waiting,
            # then long-poll the first only briefly, so that an end in any chunk
            # is seen within about _SWEEP_SECONDS.
            for start in range(0, len(rest), _WAIT_CHUNK):
                chunk = rest[start : start + _WAIT_CHUNK]
                runs += yield from _op_post_wait(chunk, 0.0, return_when)
            wait = 0.0 if runs else min(wait, _SWEEP_SECONDS)
        runs += yield from _op_post_wait(first, wait, return_when)
        ended.update((run.id, run) for run in runs)
        pending = [i for i in pending if i not in ended]
        if return_when is ReturnWhen.FIRST_ENDED and ended:
            break
        if deadline is not None and clock() >= deadline:
            break
    return sorted(ended.values(), key=_finish_order)


def _op_wait_runs(
    ids: Sequence[uuid.UUID], timeout: float | None, clock: Clock
) -> Operation[list[TaskRun]]:
    """Wait until every run in ``ids`` has ended; return them in the order given.

    Raises ``TimeoutError`` if some have not ended after ``timeout`` seconds.
    """
    runs = yield from _op_wait_ended(ids, timeout, clock, ReturnWhen.ALL_ENDED)
    done = {run.id: run for run in runs}
    missing = len(set(ids) - done.keys())
    if missing:
        raise TimeoutError(f"{missing} of {len(ids)} runs had not ended in time")
    return [done[i] for i in ids]


def _op_cancel(run_id: uuid.UUID) -> Operation[TaskRun]:
    # Idempotent in effect: a repeat finds the run ended (409), and then the
    # answer is the run as it ended, as for the first request.
    response = yield _Call(method="POST", path=f"/runs/{run_id}/cancel", idempotent=True)
    if response.status_code == 409:
        # It ended first: there is nothing to cancel, so say how it ended.
        return (yield from _op_read_run(run_id))
    _raise_for_status(response)
    return from_json(response.content, TaskRun)


def _op_result(run: TaskRun) -> Operation[Any]:
    """Turn an ended run into its value, or raise what it stands for."""
    if run.state is TaskRunState.COMPLETED:
        data = yield from _op_load_payload(run.result, run.result_ref)
        return None if data is None else loads_payload(data, what="result")
    if run.state is TaskRunState.FAILED:
        data = yield from _op_load_payload(run.result, run.result_ref)
        exc: BaseException | None = None
        refused: SerializationError | None = None
        if data is not None:
            try:
                exc = loads_payload(data, what="pickled exception")
            except SerializationError as refusal:
                refused = refusal
        error = run.error
        # The worker-side frames, printed below "The above exception was the
        # direct cause", as concurrent.futures does for a process pool.
        cause = RemoteTraceback(error.traceback) if error and error.traceback else None
        if not isinstance(exc, BaseException):
            exc = TaskRunFailed(
                error.type if error else "UnknownError",
                error.message if error else (run.message or "the run failed"),
                error.traceback if error else "",
            )
            if refused is not None:
                exc.add_note(f"the run's pickled exception was not used: {refused}")
        if cause is None:
            raise exc
        raise exc from cause
    if run.state is TaskRunState.CANCELLED:
        raise TaskRunCancelled(f"run {run.id} was cancelled" + _suffix(run.message))
    if run.state is TaskRunState.CRASHED:
        raise TaskRunCrashed(f"run {run.id} crashed" + _suffix(run.message))
    raise TimeoutError(f"run {run.id} is still {run.state}")


def _suffix(message: str | None) -> str:
    return f": {message}" if message else ""


#: How long one ``POST /logs`` may take; a run's end waits for its logs only so long.
_LOGS_READ_TIMEOUT = 10.0


def _op_post_logs(records: Sequence[LogRecord]) -> Operation[dict[str, int]]:
    # Not retried here, nor sent to another replica after it may have arrived
    # (a repeat would store the records twice): the worker's log shipper
    # retries a whole batch itself, with its own backoff, and gives up on it
    # in the end.
    response = yield _Call(
        method="POST",
        path="/logs",
        content=to_json(LogBatch(records=tuple(records))),
        read_timeout=_LOGS_READ_TIMEOUT,
    )
    _raise_for_status(response)
    counts: dict[str, int] = response.json()
    return counts


def _op_answer() -> Operation[None]:
    """Any answer at all: the server is there (see :func:`answering_url`)."""
    yield _Call(method="GET", path="/health", idempotent=True, read_timeout=_CONNECT_TIMEOUT)


def _op_health() -> Operation[dict[str, Any]]:
    response = yield _Call(method="GET", path="/health", idempotent=True)
    _raise_for_status(response)
    result: dict[str, Any] = response.json()
    return result


# --- drivers -------------------------------------------------------------------------


def _build(http: httpx.Client | httpx.AsyncClient, url: str, call: _Call) -> httpx.Request:
    timeout = httpx.Timeout(_CONNECT_TIMEOUT, read=call.read_timeout)
    headers = {"content-type": call.content_type} if call.content is not None else {}
    if call.idempotency_key is not None:
        headers["idempotency-key"] = call.idempotency_key
    # An absolute URL: the client's base_url (if any) is one server of several.
    return http.build_request(
        call.method,
        url + call.path,
        params=call.params,
        content=call.content,
        headers=headers,
        timeout=timeout,
    )


@attrs.define(eq=False)
class TaskWorkerClient:
    """A trio client for one server. Open it with :func:`open_client`.

    Every method raises :class:`ServerUnavailable` when the server cannot be
    reached and :class:`ServerError` when it answers with an error.

    ``api_url`` may name several replicas of one server, separated by commas:
    requests go to the first that answers and fail over to the next on a
    transport error (see :func:`api_urls`). ``http`` sends absolute URLs.
    """

    api_url: str = attrs.field(converter=normalize_api_url)
    _http: httpx.AsyncClient
    _route: _Route = attrs.field(init=False)
    _feed: FeedState = attrs.field(init=False, factory=FeedState)

    def __attrs_post_init__(self) -> None:
        self._route = _Route(api_urls(self.api_url))

    async def _drive(self, op: Operation[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(await self._send(call))
        except StopIteration as stop:
            value: T = stop.value
            return value

    async def _send(self, call: _Call) -> httpx.Response:
        route = self._route.deliver(call)
        url, delay = next(route)
        while True:
            if delay:
                await trio.sleep(delay)
            got: httpx.Response | httpx.TransportError
            try:
                got = await self._http.send(_build(self._http, url, call))
            except httpx.TransportError as exc:
                got = exc
            try:
                url, delay = route.send(got)
            except StopIteration as done:
                response: httpx.Response = done.value
                return response

    async def submit(self, calls: Sequence[tuple[TaskRunCreate, bytes]]) -> list[uuid.UUID]:
        """Create runs from ``(create, pickled parameters)`` pairs in one request.

        Returns the new runs' ids in order. Large parameters are stored as
        blobs first (see :meth:`store_payload`).
        """
        ids = await self._drive(_op_submit(calls))
        self._feed.submitted(ids)
        return ids

    async def wait_end(self, run_id: uuid.UUID, timeout: float | None = None) -> TaskRun:
        """:meth:`wait_run` for an ended run, through this client's feed for the
        runs it submitted.

        The first wait for one of them asks the feed to watch it and the next
        ones this client submitted (when there are none, it waits for the run
        alone, in one request); the callers waiting on watched runs share
        one long-poll, and each takes its own run's end. A run this client did
        not submit, or whose feed the server lost, is waited for alone. An end
        the feed brings comes without the run's parameters; one that a retry
        by request could have undone since (anything but COMPLETED) is read
        again.
        """
        feed = self._feed
        deadline = None if timeout is None else trio.current_time() + timeout
        while True:
            end = feed.take(run_id)
            left = None if deadline is None else max(0.0, deadline - trio.current_time())
            if isinstance(end, TaskRun) and end.state is TaskRunState.COMPLETED:
                return end
            if end is not None or left == 0.0:
                return await self.wait_run(run_id, left)
            if run_id in feed.covered:
                if not feed.polling:
                    await self._poll_feed(_remaining(deadline, trio.current_time))
                    continue
            elif run_id in feed.asking:
                pass  # the watch request in flight names it: wait for its answer
            elif run_id in feed.unwatched:
                if len(feed.unwatched) == 1:
                    # Nothing else to watch: one long-poll of its own costs one
                    # request, where watching and polling would cost two.
                    del feed.unwatched[run_id]
                    return await self.wait_run(run_id, left)
                if not feed.watching:
                    await self._watch_feed(run_id)
                    continue
            else:
                return await self.wait_run(run_id, left)
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await feed.changed.wait()

    async def _watch_feed(self, run_id: uuid.UUID) -> None:
        feed = self._feed
        ids = feed.to_watch(run_id)  # asking: the feed is being asked until the answer
        try:
            answer = await self._drive(_op_watch_feed(feed.feed_id, ids))
        except BaseException:
            feed.not_asked()  # the next waiter asks again
            raise
        if answer is None:
            feed.refused()
        else:
            feed.watched(ids, answer)

    async def _poll_feed(self, wait: float) -> None:
        feed = self._feed
        generation = feed.generation
        feed.polling = True
        try:
            page = await self._drive(
                _op_poll_feed(feed.feed_id, feed.epoch or 0, feed.cursor, wait)
            )
        finally:
            feed.polling = False
            feed.wake()
        if generation != feed.generation:
            return  # the feed was lost meanwhile: this page is of the one before
        if page is None:
            feed.lost()
        else:
            feed.heard(page)

    async def read_run(self, run_id: uuid.UUID) -> TaskRun:
        """Return the run's current snapshot; raise :class:`TaskRunNotFound` if unknown."""
        return await self._drive(_op_read_run(run_id))

    async def list_runs(
        self,
        *,
        state: TaskRunState | None = None,
        task_key: str | None = None,
        limit: int = 200,
        offset: int = 0,
    ) -> list[TaskRun]:
        """List runs, newest first, without their payloads."""
        return await self._drive(_op_list_runs(state, task_key, limit, offset))

    async def wait_run(self, run_id: uuid.UUID, timeout: float | None = None) -> TaskRun:
        """Long-poll until the run ends; after ``timeout`` return it as it is."""
        return await self._drive(_op_wait_run(run_id, timeout, trio.current_time))

    async def wait_runs(
        self, ids: Sequence[uuid.UUID], timeout: float | None = None
    ) -> list[TaskRun]:
        """Wait for all of ``ids`` to end; raise ``TimeoutError`` after ``timeout``."""
        return await self._drive(_op_wait_runs(ids, timeout, trio.current_time))

    async def wait_ended(
        self,
        ids: Sequence[uuid.UUID],
        timeout: float | None = None,
        *,
        return_when: ReturnWhen = ReturnWhen.FIRST_ENDED,
    ) -> list[TaskRun]:
        """Wait until one of ``ids`` has ended (or all, with ``ReturnWhen.ALL_ENDED``).

        Returns the runs among ``ids`` that have ended by then, in the order
        they ended. After ``timeout`` seconds it returns what has ended, which
        may be nothing; it does not raise ``TimeoutError``.
        """
        return await self._drive(_op_wait_ended(ids, timeout, trio.current_time, return_when))

    async def cancel_run(self, run_id: uuid.UUID) -> TaskRun:
        """Cancel a run (see :meth:`TaskRunFuture.cancel`)."""
        return await self._drive(_op_cancel(run_id))

    async def load_result(self, run: TaskRun) -> Any:
        """Return an ended run's value, or raise its exception (as TaskRunFuture.result does)."""
        return await self._drive(_op_result(run))

    async def put_blob(self, data: bytes) -> str:
        """Store a payload blob; return its reference."""
        return await self._drive(_op_put_blob(data))

    async def get_blob(self, ref: str) -> bytes:
        """Read a stored payload blob."""
        return await self._drive(_op_get_blob(ref))

    async def health(self) -> dict[str, Any]:
        """Return the server's ``/health`` document."""
        return await self._drive(_op_health())

    async def post_logs(self, records: Sequence[LogRecord]) -> dict[str, int]:
        """Send run log records (at most ``MAX_LOG_RECORDS``) in one ``POST /logs``.

        Returns the server's counts (``stored``, ``dropped``, ``unknown``). One
        request, not retried: raises :class:`ServerUnavailable` or
        :class:`ServerError` as the other methods do.
        """
        return await self._drive(_op_post_logs(records))


def _offline(op: Operation[T]) -> T:
    """Finish an operation that needs no request, with no client at hand."""
    try:
        call = next(op)
    except StopIteration as stop:
        value: T = stop.value
        return value
    op.close()
    raise ServerUnavailable(f"{call.method} {call.path} needs the server, and there is no client")


async def store_payload(client: TaskWorkerClient | None, data: bytes) -> StoredPayload:
    """Keep ``data`` inline if it is small, else store it as a blob through ``client``.

    Raises :class:`ServerUnavailable` when a blob is needed and the server
    cannot be reached (or there is no client), and :class:`ServerError` when
    it refuses the blob.
    """
    op = _op_store_payload(data)
    return _offline(op) if client is None else await client._drive(op)


async def load_payload(
    client: TaskWorkerClient | None, inline: bytes | None, ref: str | None
) -> bytes | None:
    """A payload's bytes from its inline form or its blob (None if it has neither).

    Raises as :func:`store_payload` does; a missing blob is a :class:`ServerError`.
    """
    op = _op_load_payload(inline, ref)
    return _offline(op) if client is None else await client._drive(op)


_current: contextvars.ContextVar[TaskWorkerClient | None] = contextvars.ContextVar(
    "trio_taskworker_client", default=None
)


def _tls() -> ssl.SSLContext:
    """The TLS context every client and worker connection verifies servers with.

    The system's trust store and httpx's (certifi's bundle, or
    ``SSL_CERT_FILE``); or, when ``TRIO_TASKWORKER_CA_FILE`` names a PEM
    bundle, that bundle alone. Raises :class:`ConfigurationError` when it
    cannot be loaded.
    """
    return _tls_for(os.environ.get("TRIO_TASKWORKER_CA_FILE") or None)


@functools.cache
def _tls_for(ca_file: str | None) -> ssl.SSLContext:
    # httpx builds a TLS context for every client it makes (about 30 ms: it
    # loads the CA bundle), even for http://. One per process is enough.
    if ca_file is None:
        # httpx's default (certifi, or SSL_CERT_FILE/SSL_CERT_DIR) plus the
        # system store: a private CA installed system-wide is trusted, and a
        # Python without a system store (python.org's macOS build) still
        # verifies public certificates.
        context = httpx.create_ssl_context()
        context.load_default_certs()
        return context
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"TRIO_TASKWORKER_CA_FILE={ca_file!r} is not a usable CA bundle: {exc}"
        ) from None


def pooled_http(url: str, api_key: str | None = None) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for ``url``: the shared TLS context, no connection cap,
    and ``api_key`` (default: ``TRIO_TASKWORKER_API_KEY``) as a bearer token.

    Its ``base_url`` is the first of ``url``'s servers; :class:`TaskWorkerClient`
    sends absolute URLs, so one pool serves every replica."""
    # No cap on connections: every long-poll holds one for up to 30 s, and a
    # hundred callers awaiting results must not starve one that submits.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    return httpx.AsyncClient(
        base_url=api_urls(url)[0], limits=limits, verify=_tls(), headers=auth_headers(api_key)
    )


@contextlib.asynccontextmanager
async def open_client(
    api_url: str | None = None, *, api_key: str | None = None
) -> AsyncIterator[TaskWorkerClient]:
    """Open a pooled client, and make it the one that ``delay``/``result`` use inside.

    Without ``api_url`` it reads ``TRIO_TASKWORKER_API_URL``; without
    ``api_key``, ``TRIO_TASKWORKER_API_KEY`` (sent as ``Authorization: Bearer``).
    Closing the block closes the connection pool. Outside such a block, calls
    share one pooled client per server for the whole trio run (see
    :func:`shared_client`), so opening one is only needed to choose when its
    connections close, or to give a key other than the environment's.
    """
    url = normalize_api_url(api_url or api_url_from_env())
    async with pooled_http(url, api_key) as http:
        with using_client(TaskWorkerClient(url, http)) as client:
            yield client


@contextlib.contextmanager
def using_client(client: TaskWorkerClient) -> Iterator[TaskWorkerClient]:
    """Make ``client`` the one that ``delay``/``result`` (and workers) use inside the block.

    :func:`open_client` is this around a new pooled client; the in-memory
    test cluster binds a client over an in-process transport the same way.
    """
    token = _current.set(client)
    try:
        yield client
    finally:
        _current.reset(token)


def bound_client(api_url: str) -> TaskWorkerClient | None:
    """The client bound by an enclosing :func:`using_client` for ``api_url``, if any."""
    client = _current.get()
    if client is not None and client.api_url == normalize_api_url(api_url):
        return client
    return None


_shared: trio.lowlevel.RunVar[dict[str, TaskWorkerClient]] = trio.lowlevel.RunVar(
    "trio_taskworker_shared_clients"
)


def shared_client(api_url: str | None = None) -> TaskWorkerClient:
    """This trio run's pooled client for ``api_url`` (default: from the environment).

    Made on first use; a system task owns it and closes its connections when
    the trio run ends, so callers never open or close anything.
    """
    url = normalize_api_url(api_url or api_url_from_env())
    try:
        clients = _shared.get()
    except LookupError:
        clients = {}
        _shared.set(clients)
    client = clients.get(url)
    if client is None:
        client = clients[url] = TaskWorkerClient(url, pooled_http(url))
        trio.lowlevel.spawn_system_task(
            _close_when_the_run_ends, client, name=f"trio_taskworker client for {url}"
        )
    return client


async def _close_when_the_run_ends(client: TaskWorkerClient) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CONNECT_TIMEOUT
            try:
                await client._http.aclose()
            except Exception:  # an error here would crash the whole trio run
                log.debug("closing the shared client failed", exc_info=True)


def client_for(api_url: str | None = None) -> TaskWorkerClient:
    """The client of the enclosing :func:`open_client` if its URL fits, else the shared one."""
    client = _current.get()
    if client is not None and (api_url is None or normalize_api_url(api_url) == client.api_url):
        return client
    return shared_client(api_url)


@attrs.define(eq=False)
class SyncClient:
    """A blocking client for code that does not run trio (a Flask view, a script).

    Use it as a context manager. ``Task.delay_sync`` and
    ``TaskRunFuture.result_sync`` share one per thread (see :func:`sync_client`).
    """

    #: One URL, or several replicas separated by commas (see :class:`TaskWorkerClient`).
    api_url: str = attrs.field(factory=api_url_from_env, converter=normalize_api_url)
    #: Sent as a bearer token; None reads ``TRIO_TASKWORKER_API_KEY``.
    api_key: str | None = attrs.field(default=None, repr=False)
    _http: httpx.Client = attrs.field(init=False)
    _route: _Route = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._route = _Route(api_urls(self.api_url))
        self._http = httpx.Client(
            base_url=self._route.urls[0], verify=_tls(), headers=auth_headers(self.api_key)
        )

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _drive(self, op: Operation[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(self._send(call))
        except StopIteration as stop:
            value: T = stop.value
            return value

    def _send(self, call: _Call) -> httpx.Response:
        route = self._route.deliver(call)
        url, delay = next(route)
        while True:
            if delay:
                time.sleep(delay)
            got: httpx.Response | httpx.TransportError
            try:
                got = self._http.send(_build(self._http, url, call))
            except httpx.TransportError as exc:
                got = exc
            try:
                url, delay = route.send(got)
            except StopIteration as done:
                response: httpx.Response = done.value
                return response

    @property
    def current_url(self) -> str:
        """The server URL requests go to now (the one that last answered)."""
        return self._route.urls[self._route.current]

    def submit(self, calls: Sequence[tuple[TaskRunCreate, bytes]]) -> list[uuid.UUID]:
        """See :meth:`TaskWorkerClient.submit`."""
        return self._drive(_op_submit(calls))

    def read_run(self, run_id: uuid.UUID) -> TaskRun:
        """See :meth:`TaskWorkerClient.read_run`."""
        return self._drive(_op_read_run(run_id))

    def wait_run(self, run_id: uuid.UUID, timeout: float | None = None) -> TaskRun:
        """See :meth:`TaskWorkerClient.wait_run`."""
        return self._drive(_op_wait_run(run_id, timeout, time.monotonic))

    def wait_runs(self, ids: Sequence[uuid.UUID], timeout: float | None = None) -> list[TaskRun]:
        """See :meth:`TaskWorkerClient.wait_runs`."""
        return self._drive(_op_wait_runs(ids, timeout, time.monotonic))

    def wait_ended(
        self,
        ids: Sequence[uuid.UUID],
        timeout: float | None = None,
        *,
        return_when: ReturnWhen = ReturnWhen.FIRST_ENDED,
    ) -> list[TaskRun]:
        """See :meth:`TaskWorkerClient.wait_ended`."""
        return self._drive(_op_wait_ended(ids, timeout, time.monotonic, return_when))

    def cancel_run(self, run_id: uuid.UUID) -> TaskRun:
        """See :meth:`TaskWorkerClient.cancel_run`."""
        return self._drive(_op_cancel(run_id))

    def load_result(self, run: TaskRun) -> Any:
        """See :meth:`TaskWorkerClient.load_result`."""
        return self._drive(_op_result(run))


class _SyncClients(dict[str, "SyncClient"]):
    """One thread's shared blocking clients; closed with the thread's locals."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()

    def __del__(self) -> None:
        if self.pid == os.getpid():  # a forked child must not close its parent's sockets
            for client in self.values():
                client.close()


_sync_local = threading.local()


def sync_client(api_url: str | None = None) -> SyncClient:
    """This thread's pooled :class:`SyncClient` for ``api_url``, made on first use.

    Without ``api_url`` it uses the server of the enclosing :func:`open_client`
    block when there is one (a sync task's thread inherits it), as the async
    calls do, and ``TRIO_TASKWORKER_API_URL`` otherwise.

    Shared by ``delay_sync``, ``result_sync`` and friends, so consecutive calls
    reuse one connection; it closes when the thread ends (a thread still alive
    at exit leaves its connections to the operating system).

    Raises ``RuntimeError`` on a thread that runs trio: a blocking call there
    would stall every task of the run (and a server in the same run could never
    answer it). Await the async method instead, or call the twin from a worker
    thread (``trio.to_thread.run_sync``).
    """
    if in_trio_run():
        raise RuntimeError(
            "the *_sync calls block their thread, and this thread runs trio: await the"
            " async method instead (delay, result, wait, cancel...)"
        )
    bound = _current.get()  # an open_client()/using_client() block, carried into threads
    if api_url is None and bound is not None:
        api_url = bound.api_url
    url = normalize_api_url(api_url or api_url_from_env())
    clients: _SyncClients | None = getattr(_sync_local, "clients", None)
    if clients is None or clients.pid != os.getpid():
        clients = _sync_local.clients = _SyncClients()
    client = clients.get(url)
    if client is None:
        client = clients[url] = SyncClient(url)
    return client


def answering_url(api_url: str | None = None, *, api_key: str | None = None) -> str:
    """The first of ``api_url``'s servers that answers (default: from the environment).

    For code that talks to one server at a time (the CLI's observing
    commands). One URL comes back as it is, without a request; of several,
    each is asked for ``GET /health`` in turn, and any answer will do. Raises
    :class:`ServerUnavailable` naming them all when none answers.
    """
    urls = api_urls(api_url or api_url_from_env())
    if len(urls) == 1:
        return urls[0]
    with SyncClient(",".join(urls), api_key) as client:
        client._drive(_op_answer())
        return client.current_url
