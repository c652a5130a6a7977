"""The interleaving explorer: a program of events run against the real worker and
server, with the invariants of the cancellation semantics checked after every step.

A *program* is a first worker (:class:`Join`) and a list of events. :func:`run_program`
interprets it inside one fresh ``trio.run`` on a virtual clock: the real
:class:`~trio_taskworker.TaskWorker` (``connect=`` an in-process link), the real
``SubscriptionHandler``, ``Dispatcher`` and ``AppState`` of
:class:`~trio_taskworker.testing.InProcessServer`, and one in-memory
:class:`SQLiteStore` that outlives server restarts. After each event the
explorer lets every task run until all of them wait (no virtual time passes;
a :class:`Nudge` instead lets only a few scheduling rounds pass), then checks
the invariants; at the end it keeps a worker alive until the queue has
drained, stops everything gracefully, and checks the final states.

The invariants (``check`` after every step, ``drain`` and ``final_check`` at the end):

1. every accepted run ends COMPLETED, FAILED, CANCELLED or CRASHED after the
   drain: none is lost or stuck;
2. it ends as the rules say: COMPLETED only from a clean return of its final
   attempt, FAILED only with its retries used up, CANCELLED only by the caller
   or ``StopTaskWorker``, CRASHED only at exactly ``max_redeliveries``;
3. every write of the store (an SQLite trigger records them all) is an edge of
   the state table, or a worker's start and next report applied together;
4. ``attempt`` equals the claims; each attempt executes at most once; attempts
   executed <= 1 + retries + redeliveries + hand-backs, within the limits;
5. no two executions of one run are live while virtual time passes, and a
   COMPLETED run's result is the value of its final attempt (fencing);
6. an execution whose attempt no longer holds the run is cancelled before
   virtual time moves on (no ghosts);
7. a run the caller cancelled stays CANCELLING/CANCELLED, starts no new
   attempt, and ends CANCELLED;
8. every execution that entered its task function left it (``finally:`` ran);
9. a worker never executes more than ``limit`` runs at once;
10. no execution outlives its run's ``timeout_seconds``;
11. after a stop's grace (``stop()``, SIGTERM, ``StopTaskWorker``), or at once
    after a second signal, the worker executes nothing;
12. ``stop()`` returns within ``shutdown_timeout`` + the drain handshake's 5 s;
13. after a clean stop (nothing cut, silenced, killed or restarted meanwhile),
    no run its connection held is redelivered or crashed for that connection;
14. ``start()`` never raises, no server handler raises, nothing logs at ERROR.

Hypothesis generates programs (``tests/test_explore.py``) and shrinks a failing
one; the shrunk program, pasted into ``tests/test_explored_regressions.py``,
reproduces it without Hypothesis. An event's ``repr`` is the code that builds it.

Determinism. Virtual time only moves when every task waits (trio's autojump
clock), so a program's outcome does not depend on how fast the machine is, with
two exceptions that this module closes:

- a sync task runs in a thread; while its Python code runs, the trio side may
  look idle and the clock would jump. :class:`ClockGate` holds the clock while
  any sync run is in flight outside :meth:`Recorder.parked_sleep`;
- trio shuffles its run queue, and the worker's reconnect backoff draws from
  ``random``. Under Hypothesis both are seeded per example (trio registers its
  scheduler's random with Hypothesis when Hypothesis is imported).

What is left: a sync task's thread reaches trio at a real moment, so within one
virtual instant its exit may land before or after another task's step. Final
states did not depend on it in repeated runs of one program.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import httpx
import trio
import trio.testing

from trio_taskworker import (
    StopTaskWorker,
    TaskRun,
    TaskRunState,
    TaskWorker,
    get_run_context,
    task,
)
from trio_taskworker._client import TaskWorkerClient, fits_inline, using_client
from trio_taskworker._models import Subscribed
from trio_taskworker._serialization import decode_server_frame, loads_payload
from trio_taskworker._server import SQLiteStore
from trio_taskworker._server._app import build_app
from trio_taskworker._states import IllegalTransition, check_transition
from trio_taskworker._subscription import FLUSH_TIMEOUT
from trio_taskworker.testing import InProcessServer

S = TaskRunState
#: The server's clock: epoch seconds that follow trio's virtual clock from a fixed
#: origin, so that two runs of one program compute the same floats.
EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z
#: The server's default ``max_redeliveries`` (``Store.default_max_redeliveries``).
DEFAULT_MAX_REDELIVERIES = 3
#: Virtual seconds the final drain may take before a run that has not ended is lost.
DRAIN_BUDGET = 3000.0
#: A run's value: what a COMPLETED run's result must be.
KEYS = {
    "async": "explore:async",
    "sync": "explore:sync",
    "stubborn": "explore:stubborn",
    "quitter": "explore:quitter",
    "big": "explore:big",
}
#: A ``big`` run's label is padded to this many characters: its parameters and
#: its result are stored as blobs (over ``INLINE_PAYLOAD_LIMIT``), through HTTP.
BIG = 70_000
#: The URL the workers' HTTP client (blobs) uses; it reaches the current server.
URL = "http://explorer.invalid"
_SYNC_KEYS = (KEYS["sync"], KEYS["stubborn"])


def now() -> float:
    return EPOCH + trio.current_time()


def value_of(label: str, attempt: int) -> str:
    """What a run returns: its label and the attempt that computed it (so a
    result from a stale attempt cannot pass for the current one's)."""
    return f"{label}@{attempt}"


# --- the events --------------------------------------------------------------------------


@attrs.frozen
class Join:
    """A worker joins: ``limit`` runs at once, ``shutdown_timeout`` of grace on a stop."""

    limit: int = 2
    shutdown_timeout: float = 5.0


@attrs.frozen
class Submit:
    """Queue one run.

    ``kind``: ``async``/``sync`` (sleep ``seconds``, then fail while the run's
    ``retry_count < fails``, else return), ``stubborn`` (sync, and it swallows a
    cancel and returns its value anyway), ``big`` (async, with parameters and a
    result too large to travel inline: blobs), ``quitter`` (raises
    ``StopTaskWorker``). ``delay``: scheduled that many seconds later. The rest
    are the run's options (``with_options`` at submit time).
    """

    kind: str = "async"
    seconds: int = 0
    fails: int = 0
    retries: int = 0
    retry_delay: float = 0.0
    delay: float | None = None
    max_redeliveries: int | None = None
    timeout: float | None = None


@attrs.frozen
class Cancel:
    """The caller cancels accepted run number ``run`` (modulo how many there are)."""

    run: int = 0


@attrs.frozen
class Stop:
    """``await worker.stop()`` (in the background) on worker number ``worker``."""

    worker: int = 0


@attrs.frozen
class Signal:
    """``worker.handle_sigterm(SIGTERM)``; a second one ends the grace at once."""

    worker: int = 0


@attrs.frozen
class StopTask:
    """Queue a run of a task that raises ``StopTaskWorker``: the worker that runs it
    stops, and the run ends CANCELLED."""


@attrs.frozen
class Cut:
    """Drop worker ``worker``'s connection without a goodbye (None: every connection,
    through ``InProcessServer.cut_connections``)."""

    worker: int | None = None


@attrs.frozen
class Kill:
    """Kill worker ``worker`` without cleanup: its connection drops, its scope is
    cancelled, and nothing it does afterwards reaches the server."""

    worker: int = 0


@attrs.frozen
class Silence:
    """Worker ``worker``'s connection sends nothing for ``seconds`` (its sends wait;
    what it is sent still arrives): past the lease, the server closes it with 3008.

    ``reconnects``: the connections it opens meanwhile are silent too (its first
    message, the subscribe, waits as well).
    """

    worker: int = 0
    seconds: float = 20.0
    reconnects: bool = False


@attrs.frozen
class Restart:
    """Restart the server on the same store: a new dispatcher and ``AppState`` after
    ``release_all``, as ``TaskServer.run`` does at start. ``graceful``: close the
    subscriptions with 1001 first; else they drop as in a kill -9."""

    graceful: bool = False


@attrs.frozen
class Advance:
    """Let ``seconds`` of virtual time pass."""

    seconds: float = 1.0


@attrs.frozen
class Nudge:
    """Apply the next event after only ``rounds`` of trio's scheduling rounds,
    instead of once every task waits: it lands while messages, reports and
    wake-ups of the previous event are still on their way. (Rounds are counted
    only while no sync task's thread is busy; otherwise the step settles.)"""

    rounds: int = 0


@attrs.frozen
class Tamper:
    """Run ``sql`` on the store behind the server's back. Never generated: the
    explorer's own tests use it to plant a violation and see the checks catch it."""

    sql: str


Event = (
    Join
    | Submit
    | Cancel
    | Stop
    | Signal
    | StopTask
    | Cut
    | Kill
    | Silence
    | Restart
    | Advance
    | Nudge
    | Tamper
)


@attrs.frozen
class Program:
    """What one example runs: the first worker, the events, the server's lease."""

    first: Join = Join()
    events: tuple[Event, ...] = ()
    lease_seconds: float = 12.0


class InvariantViolated(AssertionError):
    """An invariant of the cancellation semantics does not hold."""


# --- instrumentation: what the tasks record ----------------------------------------------


@attrs.define(eq=False)
class Execution:
    """One call of a task function for one attempt of a run, on one worker."""

    run_id: uuid.UUID
    attempt: int
    worker: int
    kind: str
    entered: float
    left: float | None = None
    #: ``returned``, ``raised``, ``cancelled`` or ``stop``.
    how: str | None = None


@attrs.define(eq=False)
class Recorder:
    """Every execution's enter and exit, and what that says at once (limits, fencing)."""

    limits: dict[int, int | None] = attrs.field(factory=dict)
    executions: list[Execution] = attrs.field(factory=list)
    live: dict[uuid.UUID, list[Execution]] = attrs.field(factory=dict)
    #: Runs the caller cancelled, with the attempt they were at.
    cancelled_at: dict[uuid.UUID, int] = attrs.field(factory=dict)
    violations: list[str] = attrs.field(factory=list)
    #: Sync runs' threads waiting in :meth:`parked_sleep` (the clock may jump).
    parked: int = 0
    log: list[str] = attrs.field(factory=list)

    def note(self, text: str) -> None:
        self.log.append(f"t={trio.current_time():8.3f} {text}")

    def enter(self, worker: int, kind: str, run: TaskRun) -> Execution:
        t = trio.current_time()
        ex = Execution(run.id, run.attempt, worker, kind, t)
        self.note(f"worker {worker} enters {kind} run {_short(run.id)} attempt {run.attempt}")
        for other in self.executions:
            if other.run_id == run.id and other.attempt == run.attempt:
                self.violations.append(
                    f"run {_short(run.id)} attempt {run.attempt} executed twice "
                    f"(workers {other.worker} and {worker})"
                )
        if run.id in self.cancelled_at and run.attempt > self.cancelled_at[run.id]:
            self.violations.append(
                f"run {_short(run.id)} started attempt {run.attempt} after the caller "
                f"cancelled it at attempt {self.cancelled_at[run.id]}"
            )
        self.executions.append(ex)
        self.live.setdefault(run.id, []).append(ex)
        limit = self.limits.get(worker)
        busy = sum(1 for exs in self.live.values() for e in exs if e.worker == worker)
        if limit is not None and busy > limit:
            self.violations.append(
                f"worker {worker} runs {busy} tasks at once; its limit is {limit}"
            )
        return ex

    def leave(self, ex: Execution, how: str) -> None:
        ex.left = trio.current_time()
        ex.how = how
        self.note(f"worker {ex.worker} leaves run {_short(ex.run_id)} attempt {ex.attempt}: {how}")
        self.live[ex.run_id].remove(ex)
        for other in self.executions:
            if other is not ex and other.run_id == ex.run_id and _overlap(ex, other, ex.left) > 0:
                self.violations.append(
                    f"run {_short(ex.run_id)}: attempts {other.attempt} (worker {other.worker}) "
                    f"and {ex.attempt} (worker {ex.worker}) were live together for "
                    f"{_overlap(ex, other, ex.left):g} s"
                )

    async def parked_sleep(self, seconds: float) -> None:
        """What a sync task's thread sleeps on (``trio.from_thread.run``): the virtual
        clock may jump meanwhile, and the run's cancellation reaches it here."""
        self.parked += 1
        try:
            await trio.sleep(seconds)
        finally:
            self.parked -= 1


def _overlap(a: Execution, b: Execution, t: float) -> float:
    end = min(t if a.left is None else a.left, t if b.left is None else b.left)
    return end - max(a.entered, b.entered)


def _short(run_id: uuid.UUID) -> str:
    # The end: a run id begins with the time it was made (UUID version 7).
    return run_id.hex[-6:]


class Boom(Exception):
    """What a failing task raises."""


def make_tasks(rec: Recorder, worker: int) -> list[Any]:
    """One worker's definitions of the explorer's tasks: same keys for every worker,
    functions that record which worker ran them."""

    async def run_async(kind: str, label: str, seconds: int, fails: int) -> str:
        run = get_run_context().task_run
        assert run is not None
        ex = rec.enter(worker, kind, run)
        how = "raised"
        try:
            if seconds:
                await trio.sleep(seconds)
            if run.retry_count < fails:
                raise Boom(f"{label} fails at retry {run.retry_count}")
            how = "returned"
            return value_of(label, run.attempt)
        except trio.Cancelled:
            how = "cancelled"
            raise
        finally:
            rec.leave(ex, how)

    def run_sync(kind: str, label: str, seconds: int, fails: int, stubborn: bool) -> str:
        run = get_run_context().task_run
        assert run is not None
        ex = trio.from_thread.run_sync(rec.enter, worker, kind, run)
        how = "raised"
        try:
            try:
                for _ in range(seconds):
                    trio.from_thread.check_cancelled()
                    trio.from_thread.run(rec.parked_sleep, 1)
            except trio.Cancelled:
                if not stubborn:
                    raise
                how = "returned after a cancel"
                return value_of(label, run.attempt)
            if run.retry_count < fails:
                raise Boom(f"{label} fails at retry {run.retry_count}")
            how = "returned"
            return value_of(label, run.attempt)
        except trio.Cancelled:
            how = "cancelled"
            raise
        finally:
            trio.from_thread.run_sync(rec.leave, ex, how)

    async def a(label: str, seconds: int, fails: int) -> str:
        return await run_async("async", label, seconds, fails)

    def s(label: str, seconds: int, fails: int) -> str:
        return run_sync("sync", label, seconds, fails, stubborn=False)

    def sb(label: str, seconds: int, fails: int) -> str:
        return run_sync("stubborn", label, seconds, fails, stubborn=True)

    async def b(label: str, seconds: int, fails: int) -> str:
        return await run_async("big", label, seconds, fails)

    async def q(label: str, seconds: int, fails: int) -> str:
        run = get_run_context().task_run
        assert run is not None
        ex = rec.enter(worker, "quitter", run)
        try:
            raise StopTaskWorker(f"{label} asks the worker to stop")
        finally:
            rec.leave(ex, "stop")

    return [
        task(key=KEYS["async"])(a),
        task(key=KEYS["sync"])(s),
        task(key=KEYS["stubborn"])(sb),
        task(key=KEYS["quitter"])(q),
        task(key=KEYS["big"])(b),
    ]


#: The submitter's definitions (only their keys and options matter to the server).
_SUBMITTER = {kind: t for kind, t in zip(KEYS, make_tasks(Recorder(), -1), strict=True)}


# --- the clock -----------------------------------------------------------------------------


class ClockGate(trio.abc.Instrument):
    """Keeps trio's autojump clock from jumping while ``busy()``: while a sync
    task's thread runs Python code the trio side looks idle, but no virtual time
    may pass under it. After every task step the gate sets the clock's public
    ``autojump_threshold`` to 0 (jump when idle) or infinity (wait for the thread)."""

    def __init__(self, clock: trio.testing.MockClock, busy: Callable[[], bool]) -> None:
        self.clock = clock
        self.busy = busy
        self.shut = False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        shut = self.busy()
        if shut != self.shut:
            self.shut = shut
            self.clock.autojump_threshold = math.inf if shut else 0


# --- the cluster under test ------------------------------------------------------------------


@attrs.define(eq=False)
class WorkerSlot:
    """One worker the program started, and what the explorer knows of it."""

    index: int
    worker: TaskWorker
    join: Join
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    cuts: list[trio.CancelScope] = attrs.field(factory=list)
    links: list[_Link] = attrs.field(factory=list)
    #: Until when every connection of the worker is silent (``Silence(reconnects=True)``).
    silent_until: float = -math.inf
    killed: bool = False
    signals: int = 0
    ended: bool = False
    error: BaseException | None = None
    #: From this virtual time on the worker may execute nothing: a stop's grace
    #: has ended, or a second signal came.
    deadline: float = math.inf
    #: Virtual times at which its connection was disturbed (cut, silenced, its
    #: server restarted), and until when a silence lasts.
    disturbed: list[float] = attrs.field(factory=list)
    #: Connections a clean stop ended: none of their runs may be released as lost.
    cleanly_closed: set[str] = attrs.field(factory=set)


@attrs.define(eq=False)
class _Link:
    """The worker's end of an in-process connection, with silence and death."""

    ws: Any
    slot: WorkerSlot
    silent_until: float = -math.inf
    #: The server's id for this connection (the runs' ``lease_owner``), once subscribed.
    connection_id: str | None = None

    async def send_message(self, text: str) -> None:
        # The silence can only grow while it lasts (an event extends it), so the
        # loop re-reads it after each wait.
        while (until := max(self.silent_until, self.slot.silent_until)) > trio.current_time():  # noqa: ASYNC110
            await trio.sleep_until(until)
        if self.slot.killed:
            await trio.sleep_forever()  # a dead process sends nothing
        await self.ws.send_message(text)

    async def get_message(self) -> str | bytes:
        data: str | bytes = await self.ws.get_message()
        if self.connection_id is None:
            for message in decode_server_frame(data):
                if isinstance(message, Subscribed):
                    self.connection_id = message.connection_id
        return data

    async def ping(self) -> None:
        await self.ws.ping()


class _ToCurrentServer(httpx.AsyncBaseTransport):
    """HTTP to whichever server is up now (the real handlers, through
    ``httpx.ASGITransport``); refused while it restarts."""

    def __init__(self, explorer: Explorer) -> None:
        self.explorer = explorer
        self.apps: dict[int, httpx.ASGITransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        server = self.explorer.server
        if not self.explorer.server_up or server is None:
            raise httpx.ConnectError("connection refused: the server is down", request=request)
        app = self.apps.get(id(server.state))
        if app is None:
            app = self.apps[id(server.state)] = httpx.ASGITransport(app=build_app(server.state))
        return await app.handle_async_request(request)


@attrs.define(eq=False)
class Explorer:
    """Runs one program; holds the cluster and the observations."""

    program: Program
    rec: Recorder = attrs.field(factory=Recorder)
    store: SQLiteStore = attrs.field(init=False)
    server: InProcessServer | None = None
    server_up: bool = False
    slots: list[WorkerSlot] = attrs.field(factory=list)
    #: Accepted runs: id -> the Submit (or StopTask) that queued it, and its label.
    runs: dict[uuid.UUID, tuple[Submit, str]] = attrs.field(factory=dict)
    stops: list[tuple[int, float, float | None]] = attrs.field(factory=list)
    history_seen: int = 0
    #: Per run, the virtual time the explorer first saw it not held by an attempt
    #: that is still executing (see :meth:`check`).
    ghost_since: dict[tuple[uuid.UUID, int], float] = attrs.field(factory=dict)
    #: The state of each run at the last check.
    last: dict[uuid.UUID, TaskRun] = attrs.field(factory=dict)
    #: Every run as it ended, after the final drain.
    ended: dict[uuid.UUID, TaskRun] = attrs.field(factory=dict)
    #: What the package logged at ERROR.
    errors: list[str] = attrs.field(factory=list)
    #: The workers' HTTP client (blobs), over :class:`_ToCurrentServer`.
    client: TaskWorkerClient = attrs.field(init=False)
    _nursery: trio.Nursery | None = None
    _server_scope: trio.CancelScope | None = None
    _server_done: trio.Event | None = None

    # --- the clock gate ---------------------------------------------------------------

    def busy(self) -> bool:
        """True while some sync run is in flight outside ``parked_sleep`` (its thread,
        or the trio side around it, is doing something that takes no virtual time)."""
        in_flight = 0
        for slot in self.slots:
            if slot.worker.current_tasks:
                runs = slot.worker.in_flight_task_runs
                in_flight += sum(len(runs.get(key, ())) for key in _SYNC_KEYS)
        return in_flight > self.rec.parked

    async def nudge(self, rounds: int) -> None:
        """Let ``rounds`` scheduling rounds pass (see :class:`Nudge`)."""
        for _ in range(rounds):
            if self.busy():
                await self.settle()
                return
            await trio.lowlevel.checkpoint()

    async def settle(self) -> None:
        """Let every task run until all wait on time (no virtual time passes)."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if not self.busy():
                return
            # A thread is working: wait for it (real time; the clock stands still).
            await trio.testing.wait_all_tasks_blocked(cushion=0.0005)

    # --- the server ---------------------------------------------------------------------

    async def start_server(self) -> None:
        assert self._nursery is not None
        self._server_done = trio.Event()
        self.server = await self._nursery.start(self._serve)
        self.server_up = True

    async def _serve(self, *, task_status: trio.TaskStatus[InProcessServer]) -> None:
        assert self._server_done is not None
        done = self._server_done
        try:
            with trio.CancelScope() as self._server_scope:
                async with trio.open_nursery() as nursery:
                    srv = await InProcessServer.start(
                        nursery, self.store, lease_seconds=self.program.lease_seconds, now=now
                    )
                    task_status.started(srv)
                    await trio.sleep_forever()
        finally:
            done.set()

    async def restart_server(self, graceful: bool) -> None:
        assert self.server is not None and self._server_scope is not None
        assert self._server_done is not None
        self.server_up = False  # from now on a connection attempt is refused
        for slot in self.slots:
            slot.disturbed.append(trio.current_time())
        old = self.server
        if graceful:
            await old.close()
        # The in-process transport has no socket to close: drop what is left.
        old.cut_connections()
        for slot in self.slots:
            for cut in slot.cuts:
                cut.cancel()
        self._server_scope.cancel()
        await self._server_done.wait()
        released = await self.store.release_all(now())
        self.rec.note(f"server restarted; release_all released {len(released.changed)} runs")
        await self.start_server()

    # --- workers ------------------------------------------------------------------------

    def connector(
        self, slot: WorkerSlot
    ) -> Callable[[], contextlib.AbstractAsyncContextManager[Any]]:
        @contextlib.asynccontextmanager
        async def connect() -> AsyncIterator[Any]:
            if not self.server_up or self.server is None:
                raise OSError("connection refused: the server is down")
            async with self.server.connect() as ws:
                with trio.CancelScope() as cut:
                    link = _Link(ws, slot)
                    slot.cuts.append(cut)
                    slot.links.append(link)
                    try:
                        yield link
                    finally:
                        slot.cuts.remove(cut)
                        slot.links.remove(link)

        return connect

    async def join(self, join: Join) -> WorkerSlot:
        assert self._nursery is not None
        index = len(self.slots)
        slot = WorkerSlot(index, None, join)  # type: ignore[arg-type]
        slot.worker = TaskWorker(
            *make_tasks(self.rec, index),
            limit=join.limit,
            shutdown_timeout=join.shutdown_timeout,
            api_url=URL,
            handle_signals=False,
            connect=self.connector(slot),
        )
        self.rec.limits[index] = join.limit
        self.slots.append(slot)
        self._nursery.start_soon(self._run_worker, slot)
        return slot

    async def _run_worker(self, slot: WorkerSlot) -> None:
        try:
            with slot.scope, using_client(self.client):
                await slot.worker.start()
        except Exception as exc:  # any error out of start() breaks an invariant
            slot.error = exc
        finally:
            slot.ended = True

    def slot(self, index: int) -> WorkerSlot | None:
        return self.slots[index % len(self.slots)] if self.slots else None

    def stopping(self, slot: WorkerSlot, grace: float) -> None:
        """``slot`` was asked to stop now with ``grace``: note its deadline."""
        if slot.worker.started:
            slot.deadline = min(slot.deadline, trio.current_time() + grace)

    async def _stop(self, slot: WorkerSlot) -> None:
        began = trio.current_time()
        entry = (slot.index, began, None)
        self.stops.append(entry)
        self.stopping(slot, slot.join.shutdown_timeout)
        links = list(slot.links)
        await slot.worker.stop()
        ended = trio.current_time()
        self.stops[self.stops.index(entry)] = (slot.index, began, ended)
        clean = not slot.killed and not any(t >= began for t in slot.disturbed)
        if clean:
            # Every run it held was reported (finished or handed back) before it
            # disconnected: the drain handshake said so.
            slot.cleanly_closed.update(link.connection_id for link in links if link.connection_id)

    # --- events -------------------------------------------------------------------------

    async def submit(self, sub: Submit) -> None:
        assert self.server is not None
        label = f"r{len(self.runs)}"
        if sub.kind == "big":
            label = label.ljust(BIG, ".")
        definition = _SUBMITTER[sub.kind].with_options(
            retries=sub.retries,
            retry_delay_seconds=sub.retry_delay,
            max_redeliveries=sub.max_redeliveries,
            timeout_seconds=sub.timeout,
        )
        when = None
        if sub.delay is not None:
            when = datetime.datetime.fromtimestamp(now() + sub.delay, datetime.UTC)
        create, payload = definition.run_create((label, sub.seconds, sub.fails), {}, when)
        if fits_inline(payload):
            create = attrs.evolve(create, parameters=payload)
        else:  # as the client does: a blob first, then the run that refers to it
            ref = await self.store.put_blob(payload, now())
            create = attrs.evolve(create, parameters_ref=ref)
        (run_id,) = await self.store.create_runs([create], now())
        self.runs[run_id] = (sub, label)
        self.rec.note(f"submitted {label[:8]} = run {_short(run_id)}: {sub!r}")
        if self.server_up:
            self.server.state.dispatcher.wake()

    async def apply(self, event: Event) -> None:
        self.rec.note(f"event {event!r}")
        if isinstance(event, Join):
            await self.join(event)
        elif isinstance(event, Submit):
            await self.submit(event)
        elif isinstance(event, StopTask):
            await self.submit(Submit(kind="quitter"))
        elif isinstance(event, Cancel):
            if not self.runs:
                return
            run_id = list(self.runs)[event.run % len(self.runs)]
            assert self.server is not None
            try:
                run = await self.server.state.cancel(run_id)
            except IllegalTransition:
                return  # it had ended
            self.rec.cancelled_at.setdefault(run_id, run.attempt)
            self.rec.note(f"cancelled run {_short(run_id)}: now {run.state}")
        elif isinstance(event, Stop):
            slot = self.slot(event.worker)
            if slot is not None:
                assert self._nursery is not None
                self._nursery.start_soon(self._stop, slot)
        elif isinstance(event, Signal):
            slot = self.slot(event.worker)
            if slot is not None:
                slot.signals += 1
                first = not slot.worker.stopping
                slot.worker.handle_sigterm(signal.SIGTERM, None)
                self.stopping(slot, slot.join.shutdown_timeout if first else 0.0)
        elif isinstance(event, Cut):
            if event.worker is None:
                if self.server is not None:
                    self.server.cut_connections()
                for slot in self.slots:
                    slot.disturbed.append(trio.current_time())
            else:
                slot = self.slot(event.worker)
                if slot is not None:
                    slot.disturbed.append(trio.current_time())
                    for cut in slot.cuts:
                        cut.cancel()
        elif isinstance(event, Kill):
            slot = self.slot(event.worker)
            if slot is not None and not slot.ended:
                slot.killed = True
                for cut in slot.cuts:
                    cut.cancel()
                slot.scope.cancel()
        elif isinstance(event, Silence):
            slot = self.slot(event.worker)
            if slot is not None:
                until = trio.current_time() + event.seconds
                slot.disturbed.append(until)
                for link in slot.links:
                    link.silent_until = max(link.silent_until, until)
                if event.reconnects:
                    slot.silent_until = max(slot.silent_until, until)
        elif isinstance(event, Restart):
            await self.restart_server(event.graceful)
        elif isinstance(event, Advance):
            await trio.sleep(event.seconds)
        elif isinstance(event, Tamper):
            await self.store.runner.transact(lambda cur: cur.execute(event.sql))
        else:  # pragma: no cover
            raise AssertionError(f"unknown event {event!r}")

    # --- checks -------------------------------------------------------------------------

    def fail(self, what: str) -> None:
        trace = "\n".join(self.rec.log[-80:])
        raise InvariantViolated(f"{what}\n--- the last events and executions ---\n{trace}")

    async def read_all(self) -> dict[uuid.UUID, TaskRun]:
        runs = await self.store.read_runs(list(self.runs))
        return {run.id: run for run in runs}

    async def new_history(self) -> list[tuple[Any, ...]]:
        seen = self.history_seen

        def read(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(
                "SELECT n, id, old, new, attempt, retry_count, redeliveries,"
                " old_retry_count, old_redeliveries, message, old_owner FROM explore_history"
                " WHERE n > ? ORDER BY n",
                (seen,),
            )
            return [tuple(row) for row in cur.fetchall()]

        rows = await self.store.runner.transact(read)
        if rows:
            self.history_seen = rows[-1][0]
        return rows

    async def check(self) -> None:
        """The invariants that hold after every step."""
        if self.rec.violations:
            self.fail(self.rec.violations[0])
        for slot in self.slots:
            if slot.error is not None:
                self.fail(f"worker {slot.index}'s start() raised {slot.error!r}")
            limit = slot.join.limit
            if limit is not None and slot.worker.current_tasks > limit:
                self.fail(
                    f"worker {slot.index} has {slot.worker.current_tasks} runs in flight; "
                    f"its limit is {limit}"
                )
        if self.errors:
            self.fail(f"logged at ERROR: {self.errors[0]}")
        closed = {c: slot.index for slot in self.slots for c in slot.cleanly_closed}
        for row in await self.new_history():
            (
                _n,
                run_id,
                old,
                new,
                attempt,
                _r,
                redeliveries,
                _or,
                old_redeliveries,
                message,
                owner,
            ) = row
            if old is None:
                continue
            if not is_path(S(old), S(new)):
                self.fail(
                    f"run {run_id[-6:]} went {old} -> {new} (attempt {attempt}): "
                    "not a path in the state table"
                )
            if owner in closed and (new == "CRASHED" or redeliveries != old_redeliveries):
                self.fail(
                    f"run {run_id[-6:]} (attempt {attempt}) went {old} -> {new} ({message}) "
                    f"after worker {closed[owner]} stopped cleanly: its report was not "
                    "applied before stop() returned"
                )
        runs = await self.read_all()
        t = trio.current_time()
        for slot in self.slots:
            deadline = slot.deadline
            for ex in self.rec.executions:
                if ex.worker == slot.index and ex.how == "stop" and ex.left is not None:
                    deadline = min(deadline, ex.left + slot.join.shutdown_timeout)
            for exs in self.rec.live.values():
                for ex in exs:
                    if ex.worker == slot.index and t > deadline + 1e-9:
                        self.fail(
                            f"worker {slot.index} still executes run {_short(ex.run_id)} "
                            f"attempt {ex.attempt} {t - deadline:g} s after its stop's "
                            "deadline"
                        )
        for run_id, run in runs.items():
            sub, _label = self.runs[run_id]
            limit = (
                DEFAULT_MAX_REDELIVERIES if sub.max_redeliveries is None else sub.max_redeliveries
            )
            if run.retry_count > sub.retries:
                self.fail(f"run {_short(run_id)} retried {run.retry_count} times of {sub.retries}")
            if run.redeliveries > limit:
                self.fail(f"run {_short(run_id)} redelivered {run.redeliveries} times of {limit}")
            if run_id in self.rec.cancelled_at and run.state not in (S.CANCELLING, S.CANCELLED):
                self.fail(f"run {_short(run_id)} was cancelled by the caller, and is {run.state}")
            for ex in self.rec.live.get(run_id, ()):
                # An execution whose attempt no longer holds the run is a ghost: its
                # worker must cancel it before any virtual time passes.
                held = run.attempt == ex.attempt and run.state in (
                    S.PENDING,
                    S.RUNNING,
                    S.CANCELLING,
                )
                key = (run_id, ex.attempt)
                if held:
                    self.ghost_since.pop(key, None)
                    continue
                since = self.ghost_since.setdefault(key, t)
                if t > since:
                    self.fail(
                        f"run {_short(run_id)} attempt {ex.attempt} still executes on worker "
                        f"{ex.worker} {t - since:g} s after the server saw it {run.state} at "
                        f"attempt {run.attempt}"
                    )
            for ex in self.rec.live.get(run_id, ()):
                for other in self.rec.live[run_id]:
                    if other is not ex and _overlap(ex, other, t) > 0:
                        self.fail(
                            f"run {_short(run_id)}: attempts {ex.attempt} and {other.attempt} "
                            f"are live together for {_overlap(ex, other, t):g} s"
                        )
            if sub.timeout is not None:
                for ex in self.rec.live.get(run_id, ()):
                    if t - ex.entered > sub.timeout:
                        self.fail(
                            f"run {_short(run_id)} attempt {ex.attempt} has run "
                            f"{t - ex.entered:g} s, past its timeout of {sub.timeout:g} s"
                        )
        self.last = runs
        for index, began, ended in self.stops:
            slot = self.slots[index]
            bound = slot.join.shutdown_timeout + FLUSH_TIMEOUT
            took = (t if ended is None else ended) - began
            if took > bound + 1e-6:
                self.fail(
                    f"worker {index}'s stop() has taken {took:g} s; shutdown_timeout "
                    f"{slot.join.shutdown_timeout:g} s + flush {FLUSH_TIMEOUT:g} s"
                )

    def live_workers(self) -> list[WorkerSlot]:
        return [s for s in self.slots if not s.ended and not s.killed and not s.worker.stopping]

    async def drain(self) -> dict[uuid.UUID, TaskRun]:
        """Keep a worker alive until every run has ended; then stop them all."""
        if not self.server_up:
            await self.start_server()
        for slot in self.slots:
            slot.silent_until = -math.inf
            for link in slot.links:
                link.silent_until = -math.inf
        deadline = trio.current_time() + DRAIN_BUDGET
        joined = 0
        while True:
            runs = await self.read_all()
            if all(run.state.is_terminal for run in runs.values()):
                break
            if trio.current_time() >= deadline:
                stuck = {
                    _short(i): (r.state.value, r.attempt, r.message)
                    for i, r in runs.items()
                    if not r.state.is_terminal
                }
                self.fail(f"runs lost: not ended after a drain of {DRAIN_BUDGET:g} s: {stuck}")
            if not self.live_workers():
                joined += 1
                self.rec.note("the drain starts a fresh worker")
                await self.join(Join(limit=4, shutdown_timeout=5.0))
            await trio.sleep(5)
            await self.settle()
            await self.check()
        for slot in self.slots:
            if not slot.ended:
                await slot.worker.stop()
        await self.settle()
        await self.check()
        for slot in self.slots:
            if not slot.ended:
                self.fail(f"worker {slot.index} did not stop")
        return await self.read_all()

    async def final_check(self, runs: dict[uuid.UUID, TaskRun]) -> None:
        """The invariants of the end: every run ended as the rules say."""
        history = await self.full_history()
        for ex in self.rec.executions:
            if ex.left is None:
                self.fail(
                    f"run {_short(ex.run_id)} attempt {ex.attempt} on worker {ex.worker} "
                    "never left its task function (its finally: did not run)"
                )
        for run_id, run in runs.items():
            sub, label = self.runs[run_id]
            name = f"run {_short(run_id)} ({label[:8]}, {sub.kind})"
            executions = [ex for ex in self.rec.executions if ex.run_id == run_id]
            rows = history.get(run_id, [])
            claims = sum(1 for r in rows if r[2] == "SCHEDULED" and r[3] == "PENDING")
            if claims != run.attempt:
                self.fail(f"{name}: attempt {run.attempt} but {claims} claims in its history")
            handbacks = sum(
                1
                for r in rows
                if r[3] == "SCHEDULED"
                and r[2] in ("PENDING", "RUNNING")
                and r[5] == r[7]
                and r[6] == r[8]
            )
            attempts = {ex.attempt for ex in executions}
            if len(attempts) > 1 + run.retry_count + run.redeliveries + handbacks:
                self.fail(
                    f"{name}: {len(attempts)} attempts executed; retries {run.retry_count}, "
                    f"redeliveries {run.redeliveries}, hand-backs {handbacks}"
                )
            if run_id in self.rec.cancelled_at and run.state is not S.CANCELLED:
                self.fail(f"{name}: the caller cancelled it, and it ended {run.state}")
            if run.state is S.COMPLETED:
                data = run.result
                if run.result_ref is not None:
                    data = await self.store.get_blob(run.result_ref)
                result = None if data is None else loads_payload(data)
                expected = value_of(label, run.attempt)
                if result != expected:
                    self.fail(
                        f"{name}: COMPLETED with {str(result)[:20]!r}, expected {expected[:20]!r}"
                    )
                if not any(
                    ex.attempt == run.attempt and ex.how == "returned" for ex in executions
                ):
                    self.fail(f"{name}: COMPLETED, but attempt {run.attempt} never returned")
                if sub.kind == "quitter" or run.retry_count < sub.fails:
                    self.fail(f"{name}: COMPLETED, but its task fails at retry {run.retry_count}")
            elif run.state is S.FAILED:
                last = [ex for ex in executions if ex.attempt == run.attempt]
                # A return counts only if nothing cancelled it (a stubborn task
                # that swallowed its timeout's cancel has its value dropped).
                if not last or last[0].how == "returned":
                    self.fail(f"{name}: FAILED at attempt {run.attempt}, which did not fail")
                if run.retry_count != sub.retries:
                    self.fail(f"{name}: FAILED after {run.retry_count} retries of {sub.retries}")
            elif run.state is S.CANCELLED:
                if run_id not in self.rec.cancelled_at and sub.kind != "quitter":
                    self.fail(f"{name}: CANCELLED, but nobody cancelled it ({run.message})")
                if (
                    sub.kind == "quitter"
                    and run_id not in self.rec.cancelled_at
                    and "StopTaskWorker" not in (run.message or "")
                ):
                    self.fail(f"{name}: CANCELLED with message {run.message!r}")
            elif run.state is S.CRASHED:
                limit = (
                    DEFAULT_MAX_REDELIVERIES
                    if sub.max_redeliveries is None
                    else sub.max_redeliveries
                )
                if run.redeliveries != limit:
                    self.fail(f"{name}: CRASHED after {run.redeliveries} redeliveries of {limit}")
            else:
                self.fail(f"{name}: ended {run.state}")

    async def full_history(self) -> dict[uuid.UUID, list[tuple[Any, ...]]]:
        def read(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(
                "SELECT n, id, old, new, attempt, retry_count, redeliveries,"
                " old_retry_count, old_redeliveries, message FROM explore_history ORDER BY n"
            )
            return [tuple(row) for row in cur.fetchall()]

        by_run: dict[uuid.UUID, list[tuple[Any, ...]]] = {}
        for row in await self.store.runner.transact(read):
            by_run.setdefault(uuid.UUID(row[1]), []).append(row)
        return by_run

    # --- the whole run ------------------------------------------------------------------

    async def main(self) -> None:
        violated: InvariantViolated | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.store = SQLiteStore(":memory:", threaded=False)
            await nursery.start(self.store.run)
            http = httpx.AsyncClient(transport=_ToCurrentServer(self), base_url=URL)
            self.client = TaskWorkerClient(URL, http)
            await self.store.runner.transact(_record_history)
            await self.start_server()
            try:
                await self.apply(self.program.first)
                await self.settle()
                await self.check()
                events = self.program.events
                for i, event in enumerate(events):
                    if isinstance(event, Nudge):
                        continue
                    await self.apply(event)
                    after = events[i + 1] if i + 1 < len(events) else None
                    if isinstance(after, Nudge):
                        await self.nudge(after.rounds)
                    else:
                        await self.settle()
                        await self.check()
                self.ended = await self.drain()
                await self.final_check(self.ended)
            except InvariantViolated as exc:
                # Raised below, outside the nursery, so that it is not wrapped
                # in an exception group.
                violated = exc
            nursery.cancel_scope.cancel()
        if violated is not None:
            raise violated


#: The store's own history of state changes, written by SQLite itself, so that no
#: intermediate state a batch passes through is missed between two checks.
_HISTORY = (
    """CREATE TABLE explore_history (
        n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, old TEXT, new TEXT, attempt INTEGER,
        retry_count INTEGER, redeliveries INTEGER, old_retry_count INTEGER,
        old_redeliveries INTEGER, message TEXT, old_owner TEXT)""",
    """CREATE TRIGGER explore_insert AFTER INSERT ON task_runs BEGIN
        INSERT INTO explore_history (id, old, new, attempt, retry_count, redeliveries,
            old_retry_count, old_redeliveries, message)
        VALUES (NEW.id, NULL, NEW.state, NEW.attempt, NEW.retry_count, NEW.redeliveries,
            NULL, NULL, NEW.message);
    END""",
    """CREATE TRIGGER explore_update AFTER UPDATE ON task_runs
    WHEN OLD.state IS NOT NEW.state OR OLD.attempt IS NOT NEW.attempt BEGIN
        INSERT INTO explore_history (id, old, new, attempt, retry_count, redeliveries,
            old_retry_count, old_redeliveries, message, old_owner)
        VALUES (NEW.id, OLD.state, NEW.state, NEW.attempt, NEW.retry_count,
            NEW.redeliveries, OLD.retry_count, OLD.redeliveries, NEW.message, OLD.lease_owner);
    END""",
)


def _record_history(cur: Any) -> None:
    for statement in _HISTORY:
        cur.execute(statement)


def is_path(old: TaskRunState, new: TaskRunState) -> bool:
    """One write of the store moved ``old`` to ``new``: an edge of the state table,
    or a worker's ``started`` and its next report (a finish or a hand-back)
    applied together, PENDING -> RUNNING -> ``new``."""
    try:
        check_transition(old, new)
        return True
    except IllegalTransition:
        pass
    if old is not S.PENDING or new not in (S.COMPLETED, S.FAILED, S.CANCELLED, S.SCHEDULED):
        return False
    check_transition(S.PENDING, S.RUNNING)
    try:
        check_transition(S.RUNNING, new)
        return True
    except IllegalTransition:
        return False


class _Errors(logging.Handler):
    """Collects what the package logs at ERROR: a sign of trouble in any program."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "trio_taskworker._spawner" and hasattr(record, "run_id"):
            return  # a task's own failure (logged at ERROR with its run id): not trouble
        self.into.append(f"{record.name}: {record.getMessage()}")


def run_program(program: Program) -> Explorer:
    """Run ``program`` in a fresh trio run on a virtual clock; raise
    :class:`InvariantViolated` (or the error that escaped) if it breaks an invariant.
    Returns the explorer, for tests that look further."""
    explorer = Explorer(program)
    clock = trio.testing.MockClock(autojump_threshold=0)
    logger = logging.getLogger("trio_taskworker")
    handler = _Errors(explorer.errors)
    logger.addHandler(handler)
    try:
        trio.run(explorer.main, clock=clock, instruments=[ClockGate(clock, explorer.busy)])
    finally:
        logger.removeHandler(handler)
    return explorer


def program(first: Join, *events: Event, lease_seconds: float = 12.0) -> Program:
    """``Program(first, events, lease_seconds)``, written as a call for regression tests."""
    return Program(first, tuple(events), lease_seconds)


__all__ = [
    "Advance",
    "Cancel",
    "Cut",
    "Event",
    "Explorer",
    "InvariantViolated",
    "Join",
    "Kill",
    "Nudge",
    "Program",
    "Restart",
    "Signal",
    "Silence",
    "Stop",
    "StopTask",
    "Submit",
    "Tamper",
    "is_path",
    "program",
    "run_program",
]
