"""The server's Prometheus metrics, served at ``GET /metrics``.

:class:`ServerMetrics` owns a registry of its own (never prometheus_client's
global one: several servers may share a process, as in the tests). The server
feeds it events as they happen (runs created, runs changed, redeliveries,
store batches) and hands it snapshots of the queues and the workers when it
is scraped; the gauges are built from those snapshots at each scrape, so a
task key that has gone from the snapshot leaves no gauge behind.

Label cardinality is bounded: no label carries a run or connection id, and
at most ``max_task_keys`` distinct task keys become ``task_key`` label values
(the first ones seen); every later key is counted under
:data:`OTHER_TASK_KEY`. The names and their meaning are listed in
``docs/reference/metrics.rst``.

Only :meth:`ServerMetrics.store_batch` may be called from another thread (a
store's); the other methods run on the server's trio thread.
"""

from __future__ import annotations

import collections
import datetime
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

import attrs
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .._models import TaskRun, TaskStats, WorkerInfo
from .._states import TaskRunState
from .._version import __version__

__all__ = [
    "DURATION_BUCKETS",
    "MAX_TASK_KEYS",
    "OTHER_TASK_KEY",
    "ServerMetrics",
]

#: The most distinct task keys used as label values; later keys share :data:`OTHER_TASK_KEY`.
MAX_TASK_KEYS = 1000
#: The ``task_key`` label value of every key past :data:`MAX_TASK_KEYS` (task keys
#: are ``module:function`` names, so no real key looks like this).
OTHER_TASK_KEY = "_other"
#: Buckets of the start-delay and run-duration histograms: 1 ms to 4 hours, in seconds.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, 7200.0, 14400.0,
)  # fmt: skip
#: Buckets of the store batch size: the writer takes at most 512 operations at once.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Buckets of the store batch latency, in seconds: 100 µs to 10 s.
BATCH_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Buckets of the runs leased per claim: a claim leases at most a connection's credits.
CLAIM_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
#: The most runs whose current attempt's start is remembered (runs that have
#: started and not ended); past it the oldest are forgotten.
MAX_TRACKED_RUNS = 100_000
#: The most recent run ends remembered, so that a run reported ended twice is
#: counted once; past it the oldest are forgotten.
MAX_REMEMBERED_ENDS = 20_000

_PREFIX = "trio_taskworker_"


@attrs.define
class _Attempt:
    """What is known of one attempt of a run: the current one, or the next one
    once the run is queued again."""

    attempt: int
    #: When the attempt became due, when known.
    due: datetime.datetime | None = None
    #: The run's ``started_at`` when last seen (an earlier attempt's until this one starts).
    started_at: datetime.datetime | None = None
    #: The attempt's start is observed (so its end is timed).
    running: bool = False


def _seconds(later: datetime.datetime, earlier: datetime.datetime) -> float:
    return (later - earlier).total_seconds()


def _label(text: str) -> str:
    """``text`` as a label value that can be encoded (a lone surrogate cannot)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@attrs.define
class _TaskChildren:
    """One task_key label value's series of the metrics observed per run, each
    made when first observed (a series made is exported, zero or not)."""

    label: str
    #: The metrics (labelled families) whose series these are.
    _start_delays: Histogram
    _durations: Histogram
    _ends: Counter
    _start_delay: Histogram | None = None
    _duration: Histogram | None = None
    _ended: dict[str, Counter] = attrs.field(factory=dict)

    def start_delay(self) -> Histogram:
        if self._start_delay is None:
            self._start_delay = self._start_delays.labels(self.label)
        return self._start_delay

    def duration(self) -> Histogram:
        if self._duration is None:
            self._duration = self._durations.labels(self.label)
        return self._duration

    def ended(self, state: str) -> Counter:
        counter = self._ended.get(state)
        if counter is None:
            counter = self._ended[state] = self._ends.labels(self.label, state)
        return counter


@attrs.define(eq=False)
class _WithoutCreated(Collector):
    """``registry``'s metrics without the ``*_created`` series of its counters and
    histograms (when each started: a series per label set that dashboards do not
    use). prometheus_client's switch for them is process-wide, which is not the
    server's to set when it is embedded."""

    registry: CollectorRegistry

    def collect(self) -> Iterable[Metric]:
        for metric in self.registry.collect():
            if metric.type in _HAS_CREATED:
                created = metric.name + "_created"
                # A copy: a collector may hand out the same Metric at each scrape.
                copy = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                copy.samples = [s for s in metric.samples if s.name != created]
                metric = copy
            yield metric


_HAS_CREATED = frozenset({"counter", "histogram", "summary"})


@attrs.define(eq=False)
class _StatementCount(Collector):
    """The store's statement count, read at scrape time (the runner keeps it)."""

    read: Callable[[], int]

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            _PREFIX + "store_statements",
            "SQL statements the store has run (PostgreSQL; COMMITs included).",
            value=self.read(),
        )


@attrs.define(eq=False)
class _FeedGauges(Collector):
    """The clients' feeds, read at scrape time: how many, and what they hold."""

    read: Callable[[], tuple[int, int, int]]

    def collect(self) -> Iterable[Metric]:
        feeds, runs, held = self.read()
        yield GaugeMetricFamily(
            _PREFIX + "feeds", "Clients' feeds of ended runs on this server.", value=feeds
        )
        yield GaugeMetricFamily(
            _PREFIX + "feed_runs",
            "Runs the feeds watch, or hold ended and not yet acknowledged.",
            value=runs,
        )
        yield GaugeMetricFamily(
            _PREFIX + "feed_bytes", "Bytes of ended runs the feeds hold.", value=held
        )


@attrs.define(eq=False)
class _Snapshots(Collector):
    """Gauges built at scrape time from the snapshots :meth:`ServerMetrics.render` got."""

    task_label: Callable[[str], str]
    tasks: Sequence[TaskStats] = ()
    workers: Sequence[WorkerInfo] = ()

    def collect(self) -> Iterable[Metric]:
        yield from self._tasks()
        yield from self._workers()

    def _tasks(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily(
            _PREFIX + "runs_queued",
            "Runs that are due and wait for a worker, by task key.",
            labels=["task_key"],
        )
        scheduled = GaugeMetricFamily(
            _PREFIX + "runs_scheduled",
            "Runs that wait for their scheduled time (a retry delay included), by task key.",
            labels=["task_key"],
        )
        running = GaugeMetricFamily(
            _PREFIX + "runs_running",
            "Runs leased to a worker (PENDING, RUNNING or CANCELLING), by task key.",
            labels=["task_key"],
        )
        oldest = GaugeMetricFamily(
            _PREFIX + "oldest_queued_run_age_seconds",
            "How long the oldest queued run has been due, by task key (0 when none is queued).",
            labels=["task_key"],
        )
        workers = GaugeMetricFamily(
            _PREFIX + "task_workers",
            "Connected workers that serve the task key.",
            labels=["task_key"],
        )
        # Several keys past the cap share one label value: their counts add up,
        # and the oldest age is the oldest of them.
        sums: dict[str, list[float]] = {}
        for stats in self.tasks:
            row = sums.setdefault(self.task_label(stats.task_key), [0, 0, 0, 0, 0])
            row[0] += stats.queued
            row[1] += stats.scheduled
            row[2] += stats.running
            row[3] = max(row[3], stats.oldest_queued_seconds or 0.0)
            row[4] += stats.workers
        for key, row in sorted(sums.items()):
            for family, value in zip(
                (queued, scheduled, running, oldest, workers), row, strict=True
            ):
                family.add_metric([key], value)
        yield from (queued, scheduled, running, oldest, workers)

    def _workers(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            _PREFIX + "workers_connected", "Worker connections subscribed to the server."
        )
        connected.add_metric([], len(self.workers))
        draining = GaugeMetricFamily(
            _PREFIX + "workers_draining",
            "Connected workers that are stopping and take no more runs.",
        )
        draining.add_metric([], sum(1 for w in self.workers if w.draining))
        in_flight = GaugeMetricFamily(
            _PREFIX + "workers_runs_in_flight",
            "Runs leased to connected workers now, all workers together.",
        )
        in_flight.add_metric([], sum(w.in_flight for w in self.workers))
        limit = GaugeMetricFamily(
            _PREFIX + "workers_limit",
            "The sum of the connected workers' limits (how many runs they take at once).",
        )
        limit.add_metric([], sum(w.limit for w in self.workers))
        yield from (connected, draining, in_flight, limit)


@attrs.define(eq=False)
class ServerMetrics:
    """The server's metrics in a registry of their own.

    ``max_task_keys`` bounds the ``task_key`` label values (see the module
    docstring). ``max_tracked_runs`` bounds the runs whose current attempt is
    remembered (started, not ended) and ``max_remembered_ends`` the run ends
    remembered to count each once; past either, the oldest are forgotten.
    ``now`` is the clock (UNIX seconds) used to time an attempt
    that ended without an end state, such as a failure that will be retried;
    the server passes its own. ``process=False`` leaves out prometheus_client's
    ``process_*`` and ``python_*`` metrics.
    """

    max_task_keys: int = MAX_TASK_KEYS
    max_tracked_runs: int = MAX_TRACKED_RUNS
    max_remembered_ends: int = MAX_REMEMBERED_ENDS
    now: Callable[[], float] = time.time
    process: bool = True
    registry: CollectorRegistry = attrs.field(init=False, factory=CollectorRegistry)
    _task_keys: set[str] = attrs.field(init=False, factory=set)
    #: Each task_key label value's series of the per-run metrics, kept: not
    #: looked up per run (``labels()`` takes a lock and builds a key each time).
    _children: dict[str, _TaskChildren] = attrs.field(init=False, factory=dict)
    _attempts: collections.OrderedDict[uuid.UUID, _Attempt] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _ends: collections.OrderedDict[uuid.UUID, int] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _snapshots: _Snapshots = attrs.field(init=False)
    _created: Counter = attrs.field(init=False)
    _ended: Counter = attrs.field(init=False)
    _redelivered: Counter = attrs.field(init=False)
    _start_delay: Histogram = attrs.field(init=False)
    _duration: Histogram = attrs.field(init=False)
    _batch_operations: Histogram = attrs.field(init=False)
    _batch_seconds: Histogram = attrs.field(init=False)
    _claim_runs: Histogram = attrs.field(init=False)
    _waits: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self._created = Counter(
            _PREFIX + "runs_created",
            "Runs created, by task key.",
            ["task_key"],
            registry=registry,
        )
        self._ended = Counter(
            _PREFIX + "runs_ended",
            "Runs that reached an end state (COMPLETED, FAILED, CANCELLED, CRASHED),"
            " by task key and state.",
            ["task_key", "state"],
            registry=registry,
        )
        self._redelivered = Counter(
            _PREFIX + "runs_redelivered",
            "Running runs whose worker was lost and that were queued again, by task key.",
            ["task_key"],
            registry=registry,
        )
        self._start_delay = Histogram(
            _PREFIX + "run_start_delay_seconds",
            "From when an attempt was due to when its worker started it, by task key.",
            ["task_key"],
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self._duration = Histogram(
            _PREFIX + "run_duration_seconds",
            "From an attempt's start to its end (whatever the end), by task key.",
            ["task_key"],
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self._batch_operations = Histogram(
            _PREFIX + "store_batch_operations",
            "Operations committed together in one store transaction (SQLite's group commit).",
            registry=registry,
            buckets=BATCH_SIZE_BUCKETS,
        )
        self._batch_seconds = Histogram(
            _PREFIX + "store_batch_duration_seconds",
            "How long one store transaction took, from its first operation to its commit.",
            registry=registry,
            buckets=BATCH_SECONDS_BUCKETS,
        )
        self._claim_runs = Histogram(
            _PREFIX + "dispatch_claim_runs",
            "Runs leased to a worker connection in one claim (the claim's batch size).",
            registry=registry,
            buckets=CLAIM_BUCKETS,
        )
        self._waits = Counter(
            _PREFIX + "wait_requests",
            "Requests that waited for runs to end, by kind: `feed` (a page of a client's"
            " feed of ended runs), `run` (one run), `runs` (a list of runs).",
            ["kind"],
            registry=registry,
        )
        info = Gauge(
            _PREFIX + "build_info",
            "Always 1; the server's version is in the label.",
            ["version"],
            registry=registry,
        )
        info.labels(__version__).set(1)
        self._snapshots = _Snapshots(self._task_label)
        registry.register(self._snapshots)
        if self.process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def _task_label(self, task_key: str) -> str:
        """The ``task_key`` label value of ``task_key``: itself among the first
        ``max_task_keys`` keys seen, :data:`OTHER_TASK_KEY` after."""
        if task_key in self._task_keys:
            return _label(task_key)
        if len(self._task_keys) < self.max_task_keys:
            self._task_keys.add(task_key)
            return _label(task_key)
        return OTHER_TASK_KEY

    def _of_task(self, task_key: str) -> _TaskChildren:
        label = self._task_label(task_key)
        children = self._children.get(label)
        if children is None:
            children = self._children[label] = _TaskChildren(
                label, self._start_delay, self._duration, self._ended
            )
        return children

    def runs_created(self, task_keys: Sequence[str]) -> None:
        """Count new runs: the task key of each, in one ``POST /runs`` batch."""
        for key, n in collections.Counter(task_keys).items():
            self._created.labels(self._task_label(key)).inc(n)

    def runs_redelivered(self, task_keys: Sequence[str]) -> None:
        """Count running runs requeued because their worker was lost."""
        for key, n in collections.Counter(task_keys).items():
            self._redelivered.labels(self._task_label(key)).inc(n)

    def runs_claimed(self, n: int) -> None:
        """Observe one claim that leased ``n`` runs to a worker connection."""
        self._claim_runs.observe(n)

    def wait_request(self, kind: str) -> None:
        """Count one request that waits for runs to end (``feed``, ``run`` or ``runs``)."""
        self._waits.labels(kind).inc()

    def watch_feeds(self, read: Callable[[], tuple[int, int, int]]) -> None:
        """Export ``read()``, the feeds' count, runs and bytes, as gauges."""
        self.registry.register(_FeedGauges(read))

    def count_statements(self, read: Callable[[], int]) -> None:
        """Export ``read()``, the store's SQL statements so far, as a counter."""
        self.registry.register(_StatementCount(read))

    def store_batch(self, operations: int, seconds: float) -> None:
        """Observe one committed store batch of ``operations`` that took ``seconds``.

        Safe to call from the SQLite writer's thread.
        """
        self._batch_operations.observe(operations)
        self._batch_seconds.observe(seconds)

    def runs_changed(self, runs: Sequence[TaskRun]) -> None:
        """Observe runs as they are after a store change, in any state.

        The same run may come again, unchanged or several changes later:
        a run end is counted once, and each attempt's start delay and
        duration are observed once. An attempt has started when the run shows
        a ``started_at`` not seen before (the server sets it when the worker
        reports the start, and keeps it until the next start), which may first
        show in an end state or in a retry: a worker's start and finish
        reports are applied together. An attempt is due when the run was
        claimed (its ``scheduled_time`` then) or, when it was queued again
        (retried, redelivered, released), at its new ``scheduled_time`` or at
        that change, whichever is later. The time between an attempt's start
        and its end is observed whatever the end, including a failure that is
        retried and a lost worker (timed to the change, as these carry no
        ``finished_at``).
        """
        for run in runs:
            self._observe(run)

    def _observe(self, run: TaskRun) -> None:
        # What tells this end from a later one (the run retried, and ended again).
        end = hash((run.attempt, run.state, run.finished_at))
        if run.state.is_terminal and self._ends.get(run.id) == end:
            return  # this end is already counted
        known = self._attempts.get(run.id)
        if self._is_new_start(run, known):
            assert run.started_at is not None
            due = known.due if known is not None and known.attempt == run.attempt else None
            if due is None and run.scheduled_time <= run.started_at:
                # Not seen queued: due at its scheduled time. (A retry moves
                # scheduled_time past the failed attempt's start; then when the
                # attempt became due is not known, and no delay is observed.)
                due = run.scheduled_time
            if due is not None:
                self._of_task(run.task_key).start_delay().observe(
                    max(0.0, _seconds(run.started_at, due))
                )
            known = _Attempt(run.attempt, started_at=run.started_at, running=True)
            self._remember(run.id, known)
        if known is not None and known.running and known.attempt == run.attempt:
            seconds = None
            if run.state.is_terminal and run.finished_at is not None:
                seconds = _seconds(run.finished_at, known.started_at or run.finished_at)
            elif run.state is TaskRunState.SCHEDULED:
                # Retried, redelivered or released: no finished_at; the change is now.
                seconds = self.now() - (known.started_at or run.scheduled_time).timestamp()
            if seconds is not None:
                # Once: the entry is replaced (queued again) or dropped (ended) below.
                self._of_task(run.task_key).duration().observe(max(0.0, seconds))
        if run.state is TaskRunState.SCHEDULED:
            if known is None or known.attempt != run.attempt + 1:
                # Queued (again): the next attempt is due at its scheduled time,
                # or now when that has passed (a redelivery keeps the old one).
                now = datetime.datetime.fromtimestamp(self.now(), datetime.UTC)
                due = max(run.scheduled_time, now)
                self._remember(run.id, _Attempt(run.attempt + 1, due, run.started_at))
        elif run.state is TaskRunState.PENDING:
            if known is None or known.attempt != run.attempt:
                # Claimed without having been seen queued.
                self._remember(run.id, _Attempt(run.attempt, run.scheduled_time, run.started_at))
        elif run.state.is_terminal:
            self._of_task(run.task_key).ended(run.state.value).inc()
            self._attempts.pop(run.id, None)
            self._ends[run.id] = end
            self._ends.move_to_end(run.id)
            while len(self._ends) > self.max_remembered_ends:
                self._ends.popitem(last=False)

    @staticmethod
    def _is_new_start(run: TaskRun, known: _Attempt | None) -> bool:
        """True when ``run`` shows a start of its current attempt not yet observed."""
        if run.started_at is None or run.state is TaskRunState.PENDING:
            # A PENDING run has not started this attempt: a started_at is an earlier one's.
            return False
        if known is not None:
            return known.started_at != run.started_at
        # Unknown run: these states are also reached from PENDING, with an
        # earlier attempt's started_at. Better one observation missed than one
        # made up.
        return run.attempt <= 1 or run.state not in _MAYBE_NOT_STARTED

    def _remember(self, run_id: uuid.UUID, attempt: _Attempt) -> None:
        self._attempts[run_id] = attempt
        self._attempts.move_to_end(run_id)
        while len(self._attempts) > self.max_tracked_runs:
            self._attempts.popitem(last=False)

    def render(
        self, tasks: Sequence[TaskStats], workers: Sequence[WorkerInfo]
    ) -> tuple[bytes, str]:
        """The body and content type of ``GET /metrics``, with the queue and
        worker gauges built from ``tasks`` and ``workers`` (``GET /tasks`` and
        ``GET /workers``)."""
        self._snapshots.tasks = tasks
        self._snapshots.workers = workers
        try:
            return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_PLAIN_0_0_4
        finally:
            self._snapshots.tasks = self._snapshots.workers = ()


#: States reached both from RUNNING (the current attempt started) and from
#: PENDING or SCHEDULED (it did not).
_MAYBE_NOT_STARTED = frozenset(
    {TaskRunState.SCHEDULED, TaskRunState.CANCELLED, TaskRunState.CRASHED}
)
