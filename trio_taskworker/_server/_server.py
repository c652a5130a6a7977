"""The server: storage, dispatcher and the ASGI app on Hypercorn's trio worker."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from .._exceptions import ConfigurationError
from .._models import MAX_WAIT_SECONDS
from ._app import AppState, build_app
from ._auth import KeyRing, exposure_problem, key_ring
from ._dispatch import Dispatcher, Waiters
from ._maintenance import DEFAULT_RETENTION, Maintenance, prepare_sqlite_file, retention_seconds
from ._postgres import (
    PostgresBus,
    PostgresRunner,
    PostgresStore,
    is_postgres_url,
    redact_conninfo,
)
from ._replicas import DEFAULT_POLL_SECONDS, DEFAULT_REPLICA_LEASE, Bus, LocalBus, Replica
from ._sqlite import SQLiteRunner, SQLiteStore
from ._store import Store, StoreError, StoreUnavailable

__all__ = ["TaskServer", "default_data_dir"]

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """``$TRIO_TASKWORKER_HOME``, or ``~/.trio-taskworker``."""
    home = os.environ.get("TRIO_TASKWORKER_HOME")
    return Path(home) if home else Path.home() / ".trio-taskworker"


@contextlib.contextmanager
def lock_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir/server.lock`` for the block: one server per data directory.

    Two servers on one SQLite file would each believe they own every lease and
    release the other's. The lock is an advisory ``flock``, released by the
    kernel when the process ends however it ends (``kill -9`` included).
    Raises :class:`ConfigurationError` naming the holder when it is taken.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "server.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "an unknown process"
            raise ConfigurationError(
                f"the data directory {data_dir} is in use by another server ({holder});"
                " stop it, or give this one another --data-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


@attrs.define(eq=False)
class TaskServer:
    """The trio_taskworker server.

    ``await nursery.start(server.run)`` hands back the URL it listens on
    (port 0 picks a free port). :meth:`stop` shuts it down gracefully:
    subscriptions are closed with 1001 first, waiting requests answered,
    then Hypercorn stops; :meth:`run` then returns.

    ``lease_seconds`` is how long a worker connection keeps its leases after
    the last message it sent; workers send heartbeats three times per lease.

    ``store`` defaults to SQLite in ``data_dir`` (file ``runs.sqlite3``).
    With ``database_url`` (``postgresql://USER:PASSWORD@HOST:PORT/DB``, needs
    the ``postgres`` extra) the runs live in that PostgreSQL database instead:
    the schema is created or upgraded on start, and ``data_dir`` is neither
    used nor locked. Servers started on one database are replicas (see
    :mod:`._replicas` and docs/howto/run-replicas): each holds a lease that
    it renews every third of ``replica_lease_seconds``, and when one dies the
    runs leased through it are freed that long after its last renewal. They
    tell each other what changed with LISTEN/NOTIFY, and poll every
    ``replica_poll_seconds`` for what a lost notification would have said.
    The SQLite writer runs each batch on the trio thread by default: a thread hop
    costs more than a typical batch of small statements, and measured end to
    end this doubles throughput (see docs/performance). A very large batch
    (10,000 runs in one request) then holds the event loop for tens of
    milliseconds; ``sqlite_in_thread=True`` trades throughput for that.

    ``retention`` (seconds or a :class:`~datetime.timedelta`; default 7 days;
    None or 0 keep everything forever): runs that ended longer ago are
    deleted, with the blobs no run references any more, by a sweep at start
    and every minute, and the SQLite file gives the space back (see the
    Retention section of docs/howto/run-server).

    With ``api_keys`` every route but ``GET /health`` needs one of them (see
    docs/howto/secure-the-server); a malformed key raises
    :class:`ConfigurationError` here. ``certfile`` and ``keyfile`` (PEM) make
    it serve https and wss.
    """

    host: str = "127.0.0.1"
    port: int = 4200
    data_dir: Path = attrs.field(factory=default_data_dir, converter=Path)
    store: Store | None = None
    #: A ``postgresql://`` URL: the runs live there instead of ``data_dir``.
    database_url: str | None = attrs.field(
        default=None, repr=lambda url: "None" if url is None else repr(redact_conninfo(url))
    )
    default_max_redeliveries: int = 3
    max_body_bytes: int = 64 * 1024 * 1024
    sqlite_in_thread: bool = False
    lease_seconds: float = 30.0
    #: On PostgreSQL: how long a replica that stopped renewing its lease keeps its runs.
    replica_lease_seconds: float = DEFAULT_REPLICA_LEASE
    #: On PostgreSQL: how often a replica looks for what notifications would have told it.
    replica_poll_seconds: float = DEFAULT_POLL_SECONDS
    #: The longest the server holds a wait request, whatever it asks for.
    max_wait_seconds: float = MAX_WAIT_SECONDS
    retention: float | None = attrs.field(default=DEFAULT_RETENTION, converter=retention_seconds)
    now: Callable[[], float] = time.time
    #: ``KEY`` or ``KEY:ROLE+ROLE`` entries (see :mod:`._auth`); none means no
    #: key is asked for, which only a loopback ``host`` allows unless ``insecure``.
    api_keys: KeyRing = attrs.field(factory=KeyRing, converter=key_ring, repr=False)
    insecure: bool = False
    #: PEM files: with both, the server speaks https and wss.
    certfile: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    keyfile: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    url: str | None = attrs.field(init=False, default=None)
    _state: AppState | None = attrs.field(init=False, default=None)
    _shutdown: trio.Event = attrs.field(init=False, factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` (returns) or cancellation (stops at once).

        ``task_status.started(url)`` once the socket listens and queued runs
        from a previous process are back in the queue. With the default SQLite
        store it holds ``data_dir/server.lock`` while it runs, and raises
        :class:`ConfigurationError` naming the holder when another server has
        it, or when the database file is not a usable SQLite database (or, with
        ``database_url``, the PostgreSQL database cannot be reached). It also
        raises :class:`ConfigurationError` before binding when ``host`` is not
        loopback and there is no API key (unless ``insecure``, which logs a
        warning instead), and when the TLS files cannot be loaded.
        """
        problem = exposure_problem(self.host, self.api_keys)
        if problem is not None and not self.insecure:
            raise ConfigurationError(
                f"{problem}: give an API key (--api-key or TRIO_TASKWORKER_SERVER_API_KEY),"
                " or --insecure if only trusted peers can reach it"
            )
        if problem is not None:
            log.warning("%s (--insecure)", problem)
        self._check_tls_files()
        if self.database_url is not None:
            if self.store is not None:
                raise ConfigurationError("give a store or a database_url, not both")
            if not is_postgres_url(self.database_url):
                raise ConfigurationError(
                    "the database URL must start with postgresql:// (got"
                    f" {redact_conninfo(self.database_url)!r}); SQLite lives in the data directory"
                )
        with contextlib.ExitStack() as held:
            if self.store is None and self.database_url is None:
                held.enter_context(lock_data_dir(self.data_dir))
            await self._run(task_status)

    def _check_tls_files(self) -> None:
        # Hypercorn would load them only once it binds, and a bad file would
        # then surface as a traceback from inside its nursery.
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigurationError("TLS needs both a certificate file and a key file")
        if self.certfile is None or self.keyfile is None:
            return
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.certfile, self.keyfile
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot load the TLS certificate {self.certfile} with the key {self.keyfile}:"
                f" {exc}"
            ) from None

    async def _run(self, task_status: trio.TaskStatus[str]) -> None:
        async with trio.open_nursery() as background:
            store = self.store
            sqlite_path = None
            if store is None and self.database_url is not None:
                store = PostgresStore(
                    self.database_url, default_max_redeliveries=self.default_max_redeliveries
                )
                await background.start(store.run)
                log.info("using the PostgreSQL database %s", redact_conninfo(self.database_url))
            elif store is None:
                sqlite_path = self.data_dir / "runs.sqlite3"
                if self.retention is not None:
                    await trio.to_thread.run_sync(prepare_sqlite_file, sqlite_path)
                store = SQLiteStore(
                    sqlite_path,
                    default_max_redeliveries=self.default_max_redeliveries,
                    threaded=self.sqlite_in_thread,
                )
                await background.start(store.run)
            listener = None
            if isinstance(store.runner, PostgresRunner):
                # Replicas: another server may hold leases in this database.
                listener = PostgresBus(store.runner, store.replica_id)
                await background.start(listener.run)
            else:
                # Alone on the database: every lease is a previous process's.
                recovered = await store.release_all(self.now())
                if recovered.changed:
                    log.info(
                        "released %d runs leased before the last shutdown", len(recovered.changed)
                    )
            bus: Bus = LocalBus() if listener is None else listener
            dispatcher = Dispatcher(store, self.now)
            await background.start(dispatcher.run)
            if self.retention is not None:
                maintenance = Maintenance(
                    store, self.retention, self.now, sqlite_path, has_turn=lambda: bus.leader
                )
                await background.start(maintenance.run)
            state = self._state = AppState(
                store=store,
                dispatcher=dispatcher,
                waiters=Waiters(),
                now=self.now,
                max_body_bytes=self.max_body_bytes,
                lease_seconds=self.lease_seconds,
                max_wait_seconds=self.max_wait_seconds,
                keys=self.api_keys,
                bus=bus,
            )
            if isinstance(store.runner, SQLiteRunner | PostgresRunner):
                store.runner.on_batch = state.metrics.store_batch
            replica = None
            if listener is not None:
                listener.hearer = state
                runner = listener.runner
                state.metrics.count_statements(lambda: runner.statements)
                replica = Replica(
                    store,
                    listener,
                    self.now,
                    on_rescued=state.changed,
                    poll=state.poll,
                    lease_seconds=self.replica_lease_seconds,
                    poll_seconds=self.replica_poll_seconds,
                )
                await background.start(replica.run)
            config = hypercorn.config.Config()
            config.bind = [f"{self.host}:{self.port}"]
            config.accesslog = None
            config.errorlog = logging.getLogger("hypercorn.error")
            config.graceful_timeout = 5.0
            config.websocket_max_message_size = self.max_body_bytes + 1024 * 1024
            if self.certfile is not None and self.keyfile is not None:
                config.certfile = str(self.certfile)
                config.keyfile = str(self.keyfile)
            async with trio.open_nursery() as web:
                binds = await web.start(
                    partial(
                        hypercorn.trio.serve,
                        build_app(self._state),  # type: ignore[arg-type]
                        config,
                        shutdown_trigger=self._shutdown.wait,
                    )
                )
                self.url = str(binds[0])
                log.info("trio_taskworker server listening on %s", self.url)
                task_status.started(self.url)
            if replica is not None:
                # Stopped gracefully: its connections have released their runs.
                # (Bounded by the pool's lock and statement timeouts.)
                try:
                    await replica.retire()
                except (StoreError, StoreUnavailable) as exc:
                    log.info("replica lease left to expire: %s", exc)
            background.cancel_scope.cancel()

    @property
    def state(self) -> AppState | None:
        """What the routes share (store, dispatcher, waiters) while it runs; else None."""
        return self._state

    async def stop(self) -> None:
        """Shut down gracefully; returns once shutdown has begun.

        Subscriptions close with 1001 ("going away") before Hypercorn is told
        to stop, so no worker waits out a grace period or sees 1006.
        """
        state = self._state
        if state is not None and not state.stopping.is_set():
            state.stopping.set()
            state.waiters.stop()
            state.feeds.stop()
            state.events.close()
            if state.connections:
                with trio.move_on_after(2):
                    await state.connections_closed.wait()
        self._shutdown.set()
