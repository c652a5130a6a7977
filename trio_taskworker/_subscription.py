"""The worker's subscription: one websocket to the server at a time, reconnecting.

::

    Subscription.run()
    └── connection loop   (full-jitter backoff; one *generation* per connection)
        └── one connection
            ├── reader     (deliveries, cancels, drained answers, refused reports)
            ├── sender     (the outbox: reports, with credits merged)
            ├── heartbeat  (every third of the lease)
            └── pinger     (ws.ping under a timeout: the only way to see a frozen peer)

Runs and cancels go to a :class:`RunSink` (the spawner); reports come back
through :meth:`Subscription.post`. A report belongs to the connection whose
lease it answers: when that connection is gone, the server has released the
lease, so the report is dropped rather than sent on a later connection.

The connection itself comes from a ``connect`` factory (by default
:func:`websocket_connector`), the seam through which tests substitute an
in-process transport, as httpx takes a ``transport=``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from ._client import INLINE_PAYLOAD_LIMIT, _tls, api_urls, auth_headers, redact_url
from ._exceptions import ConfigurationError, ProtocolError, leaves
from ._models import (
    Cancel,
    Credit,
    Deliver,
    Drain,
    Drained,
    Heartbeat,
    Rejected,
    Subscribe,
    Subscribed,
    TaskRun,
    WorkerMessage,
)
from ._serialization import InvalidPayload, decode_server_frame, encode_frame

__all__ = [
    "Connect",
    "RunSink",
    "Subscription",
    "WebSocket",
    "max_frame_bytes",
    "websocket_connector",
]

log = logging.getLogger(__name__)

#: Reconnect backoff: full jitter, doubling from the base to the cap.
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0
#: How often the worker pings the server, and how long it waits for the pong.
PING_INTERVAL = 10.0
PING_TIMEOUT = 10.0
#: The longest a TCP connect, or a websocket handshake, may take.
CONNECT_TIMEOUT = 10.0
#: After the last run ends during a stop, how long to wait for reports to go out.
FLUSH_TIMEOUT = 5.0
#: Close codes after which reconnecting cannot help.
_FATAL_CLOSE_CODES = range(4000, 5000)
_CLOSE_POLICY = 1008

_TRANSPORT_ERRORS = (
    OSError,
    trio_websocket.HandshakeError,
    trio_websocket.ConnectionClosed,
    trio.TooSlowError,
)


class WebSocket(Protocol):
    """What the subscription uses of a websocket (trio-websocket's connection fits)."""

    async def send_message(self, message: str) -> None: ...

    async def get_message(self) -> str | bytes: ...

    async def ping(self) -> None: ...


#: Opens one connection to the server's ``/subscribe`` and closes it on exit.
Connect = Callable[[], AbstractAsyncContextManager[WebSocket]]


class RunSink(Protocol):
    """Where the subscription hands what the server sends (the spawner)."""

    @property
    def in_flight(self) -> int:
        """Runs started and not yet ended."""
        ...

    def deliver(self, generation: int, run: TaskRun) -> None:
        """A run leased on connection ``generation``; ProtocolError past the credits."""

    def cancel(self, run_id: uuid.UUID) -> None:
        """The caller cancelled this run."""

    def connection_lost(self, generation: int) -> None:
        """Connection ``generation`` is gone and the server takes its leases back."""


def max_frame_bytes(window: int) -> int:
    """The largest frame the server may send a worker that holds ``window`` credits.

    A delivery carries at most that many runs, each with parameters of at most
    :data:`INLINE_PAYLOAD_LIMIT` bytes inline (base64 in JSON) and its other
    fields; a mebibyte more leaves room for the rest of the frame.
    """
    per_run = INLINE_PAYLOAD_LIMIT * 4 // 3 + 64 * 1024
    return window * per_run + 1024 * 1024


def websocket_connector(
    api_url: str, *, max_message_size: int = 1024 * 1024, api_key: str | None = None
) -> Connect:
    """The default ``connect``: a trio-websocket connection to ``{api_url}/subscribe``.

    ``api_url`` may name several replicas of one server, separated by commas
    (see :func:`api_urls`): each connection goes to the current one, and a
    connection that fails or drops makes the next one current, in rotation,
    for the next attempt (the subscription's backoff comes in between).

    ``https://`` URLs connect over TLS (wss), verified as the HTTP clients
    verify (the system trust store, or ``TRIO_TASKWORKER_CA_FILE``). The
    handshake carries ``api_key`` (default: ``TRIO_TASKWORKER_API_KEY``) as
    ``Authorization: Bearer``. Frames larger than ``max_message_size`` close
    the connection (1009); the worker passes :func:`max_frame_bytes` of its
    window. Raises :class:`ConfigurationError` for a URL that is neither
    http nor https, or a CA file that cannot be loaded.
    """
    urls = api_urls(api_url)
    tls = _tls() if any(urlsplit(url).scheme == "https" for url in urls) else None
    headers = [(k.encode(), v.encode()) for k, v in auth_headers(api_key).items()]
    current = 0
    # False from a failure until a connection succeeds again: the first
    # failover of an outage is news (INFO), the rotation that may follow is not.
    answered = True

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[WebSocket]:
        nonlocal current, answered
        index = current
        try:
            async with connect_to(urls[index]) as ws:
                answered = True
                yield ws
        except BaseException as exc:
            if len(urls) > 1 and current == index and not _cancelled(exc):
                current = (index + 1) % len(urls)
                log.log(
                    logging.INFO if answered else logging.DEBUG,
                    "%s unreachable (%r); trying %s",
                    redact_url(urls[index]),
                    leaves(exc)[0] if isinstance(exc, BaseExceptionGroup) else exc,
                    redact_url(urls[current]),
                )
                answered = False
            raise

    @contextlib.asynccontextmanager
    async def connect_to(api_url: str) -> AsyncIterator[WebSocket]:
        url = urlsplit(api_url)
        secure = tls if url.scheme == "https" else None
        host = url.hostname or "127.0.0.1"
        port = url.port or (443 if secure else 80)
        resource = url.path.rstrip("/") + "/subscribe"
        # trio-websocket leaves the TCP socket open when the peer ends the
        # connection, so the stream is opened here and closed in ``finally``.
        # Neither the TCP connect nor the handshake has a timeout of its own;
        # a server killed mid-handshake must not hold the worker forever.
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
        try:
            if secure is not None:
                stream = trio.SSLStream(
                    stream, secure, server_hostname=host, https_compatible=True
                )
                with trio.fail_after(CONNECT_TIMEOUT):
                    await _tls_handshake(stream, host, port)
            async with trio.open_nursery() as nursery:
                with trio.fail_after(CONNECT_TIMEOUT):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        host,
                        resource,
                        extra_headers=headers,
                        message_queue_size=64,
                        max_message_size=max_message_size,
                    )
                yield ws
                nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    return connect


def _cancelled(exc: BaseException) -> bool:
    """True when ``exc`` is only a cancellation (a stop), not a failed connection."""
    found = leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return all(isinstance(e, trio.Cancelled) for e in found)


async def _tls_handshake(stream: trio.SSLStream[trio.SocketStream], host: str, port: int) -> None:
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            # Retrying cannot make an untrusted certificate trusted.
            raise ConfigurationError(
                f"the TLS certificate of {host}:{port} is not trusted ({cause.verify_message});"
                " set TRIO_TASKWORKER_CA_FILE to the CA bundle that signed it"
            ) from None
        # Anything else (a reset, a server that speaks plain http) may pass.
        raise ConnectionError(f"TLS handshake with {host}:{port} failed: {cause!r}") from exc


@attrs.define(eq=False)
class _Outbox:
    """Reports and credits waiting for the sender, tagged with their connection."""

    messages: list[tuple[int, WorkerMessage]] = attrs.field(factory=list)
    has_mail: trio.Event = attrs.field(factory=trio.Event)

    def put(self, generation: int, message: WorkerMessage) -> None:
        self.messages.append((generation, message))
        self.has_mail.set()

    def take(self, generation: int) -> list[WorkerMessage]:
        """Everything for this connection, credits merged; older connections' dropped."""
        taken, self.messages = self.messages, []
        self.has_mail = trio.Event()
        out: list[WorkerMessage] = []
        credit = 0
        for gen, message in taken:
            if gen != generation:
                continue  # the server already released that lease
            if isinstance(message, Credit):
                credit += message.n
            else:
                out.append(message)
        if credit:
            out.append(Credit(n=credit))
        return out


@attrs.define(eq=False)
class Subscription:
    """Keeps one subscription to the server alive and carries messages both ways.

    ``window`` is the most runs the worker takes at once: a new connection
    opens with ``window`` minus the runs in flight as credits. The sink grants
    the rest one :class:`Credit` at a time, through :meth:`post`.
    """

    connect: Connect
    sink: RunSink
    keys: tuple[str, ...]
    client_id: str
    window: int
    #: The error that made the subscription give up for good, if any.
    fatal: BaseException | None = attrs.field(init=False, default=None)
    connected: bool = attrs.field(init=False, default=False)
    draining: bool = attrs.field(init=False, default=False)
    generation: int = attrs.field(init=False, default=0)
    _outbox: _Outbox = attrs.field(init=False, factory=_Outbox)
    _ready: trio.TaskStatus[None] = attrs.field(init=False, default=trio.TASK_STATUS_IGNORED)
    _reconnect_scope: trio.CancelScope | None = attrs.field(init=False, default=None)
    _drain_seq: int = attrs.field(init=False, default=0)
    _drained_seq: int = attrs.field(init=False, default=-1)
    _drained: trio.Event = attrs.field(init=False, factory=trio.Event)

    # --- what the rest of the worker calls ----------------------------------------------

    def post(self, message: WorkerMessage, generation: int | None = None) -> None:
        """Send ``message`` on connection ``generation`` (default: the current one)."""
        self._outbox.put(self.generation if generation is None else generation, message)

    def drain(self) -> None:
        """Ask the server for no more runs; end the subscription with this connection.

        Reports keep flowing while the current connection lasts. Once it is
        gone the subscription does not reconnect: the server has released its
        leases and requeued its runs, so nothing is left to report on it.
        """
        if not self.draining:
            self.draining = True
            self.post(Drain(seq=0))
        if not self.connected and self._reconnect_scope is not None:
            self._reconnect_scope.cancel()

    async def flush(self) -> None:
        """Wait (a bounded time) until the server has applied every report.

        The server answers a :class:`Drain` only after it has applied all the
        reports sent before it, so once the answer arrives, callers see final
        states on the server.
        """
        if not self.connected:
            return
        self._drain_seq += 1
        seq = self._drain_seq
        self.post(Drain(seq=seq))
        with trio.move_on_after(FLUSH_TIMEOUT):
            while self.connected and self._drained_seq < seq:
                self._drained = trio.Event()
                await self._drained.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay subscribed, reconnecting with backoff, until drained or cancelled.

        ``task_status.started()`` once the first subscription is accepted (or
        the loop ends first). Returns when a connection ends while draining,
        or when the server refused the worker for good: then :attr:`fatal`
        holds a :class:`ProtocolError` or a :class:`ConfigurationError`.
        """
        self._ready = task_status
        failures = 0
        outage_logged = False
        while not self.draining:
            lost: BaseException | None = None
            with trio.CancelScope() as self._reconnect_scope:
                try:
                    await self._connect_once()
                except* (ProtocolError, ConfigurationError) as group:
                    self.fatal = _first(group)
                except* trio_websocket.ConnectionRejected as group:
                    lost = self._rejected(group)
                except* _TRANSPORT_ERRORS as group:
                    lost = _first(group)
                    # A refusal can also surface through a send (the hello,
                    # when the server closed first), not only through _receive.
                    if isinstance(lost, trio_websocket.ConnectionClosed):
                        self.fatal = _refusal(lost)
            if self.fatal is not None:
                # INFO, not ERROR: the worker raises it, and the CLI prints it
                # as its one error line.
                log.info("worker %s stops: %s", self.client_id, self.fatal)
                break
            if self.draining:
                break
            if lost is None:
                failures = 0
                outage_logged = False
                continue
            if not outage_logged:
                log.warning("worker %s lost the server (%r); reconnecting", self.client_id, lost)
                outage_logged = True
            failures += 1
            delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(failures, 16)))
            with trio.CancelScope() as self._reconnect_scope:
                await trio.sleep(delay)
        self._mark_ready()

    # --- the connection loop ------------------------------------------------------------

    def _rejected(
        self, group: BaseExceptionGroup[trio_websocket.ConnectionRejected]
    ) -> BaseException | None:
        rejected = _first(group)
        assert isinstance(rejected, trio_websocket.ConnectionRejected)
        status = rejected.status_code or 0
        if 400 <= status < 500:
            # A refusal (wrong URL, not authorised) will not heal by retrying.
            self.fatal = ProtocolError(f"the server refused the subscription: HTTP {status}")
            return None
        return rejected

    def _mark_ready(self) -> None:
        ready, self._ready = self._ready, trio.TASK_STATUS_IGNORED
        if ready is not trio.TASK_STATUS_IGNORED:
            ready.started()

    async def _connect_once(self) -> None:
        try:
            async with self.connect() as ws:
                await self._serve(ws)
        finally:
            self.connected = False
            self._drained.set()  # nobody waits on a connection that is gone
            self.sink.connection_lost(self.generation)

    async def _serve(self, ws: WebSocket) -> None:
        self.generation += 1
        generation = self.generation
        credits = 0 if self.draining else max(0, self.window - self.sink.in_flight)
        hello = Subscribe(keys=self.keys, client_id=self.client_id, credits=credits)
        await ws.send_message(encode_frame([hello]))
        with trio.fail_after(PING_TIMEOUT):
            reply = await _receive(ws)
        if not reply or not isinstance(reply[0], Subscribed):
            raise ProtocolError(f"expected a subscribed message, got {reply!r}")
        self.connected = True
        lease_seconds = reply[0].lease_seconds
        log.info("worker %s subscribed (connection %s)", self.client_id, reply[0].connection_id)
        self._mark_ready()
        if self.draining:
            self.post(Drain(seq=0), generation)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sender, ws, generation)
            nursery.start_soon(self._pinger, ws)
            nursery.start_soon(self._heartbeat, generation, lease_seconds / 3)
            await self._reader(ws, generation)
            nursery.cancel_scope.cancel()

    async def _reader(self, ws: WebSocket, generation: int) -> None:
        while True:
            for message in await _receive(ws):
                if isinstance(message, Deliver):
                    for run in message.runs:
                        log.debug("received run %s attempt %d", run.id, run.attempt)
                        self.sink.deliver(generation, run)
                elif isinstance(message, Rejected):
                    log.warning(
                        "the server refused a report on run %s: %s", message.id, message.reason
                    )
                elif isinstance(message, Drained):
                    self._drained_seq = max(self._drained_seq, message.seq)
                    self._drained.set()
                elif isinstance(message, Cancel):
                    self.sink.cancel(message.id)

    async def _sender(self, ws: WebSocket, generation: int) -> None:
        while True:
            await self._outbox.has_mail.wait()
            # Let the runs that are about to report do so first: one frame then
            # carries them all, and the server applies them in one transaction.
            await trio.lowlevel.cancel_shielded_checkpoint()
            messages = self._outbox.take(generation)
            if messages:
                await ws.send_message(encode_frame(messages))

    async def _heartbeat(self, generation: int, interval: float) -> None:
        """Keep the leases alive: the server drops a connection silent for a lease."""
        while True:
            await trio.sleep(interval)
            self.post(Heartbeat(), generation)

    async def _pinger(self, ws: WebSocket) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            # ping() waits for its pong with no timeout of its own.
            with trio.fail_after(PING_TIMEOUT):
                await ws.ping()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a connection ended with: the first leaf of ``group``.

    Errors arrive wrapped once per nursery they crossed (the connection's, the
    websocket's), and sometimes two at once: the socket dies under the reader
    and a sibling together. They share one cause, so the first stands for it;
    the others are logged at DEBUG, not lost.
    """
    first, *others = leaves(group)
    for other in others:
        log.debug("also raised as the connection ended: %r", other)
    return first


def _refusal(closed: trio_websocket.ConnectionClosed) -> ProtocolError | None:
    """The error to stop with when the server closed with a code that reconnecting
    cannot cure (a policy violation, or one of the 4000s: no valid API key, ...)."""
    reason = closed.reason
    if reason is None or not (reason.code in _FATAL_CLOSE_CODES or reason.code == _CLOSE_POLICY):
        return None
    return ProtocolError(f"the server refused this worker: {reason.code} {reason.reason}")


async def _receive(ws: WebSocket) -> list[Any]:
    try:
        data = await ws.get_message()
    except trio_websocket.ConnectionClosed as exc:
        refusal = _refusal(exc)
        if refusal is not None:
            raise refusal from None
        raise
    try:
        return list(decode_server_frame(data))
    except InvalidPayload as exc:
        raise ProtocolError(f"the server sent an invalid message: {exc}") from None
