"""The caller's handle on a queued run, and waiting on many of them at once.

:func:`as_completed` and :func:`wait` follow ``concurrent.futures`` (and
Prefect): one hands back futures as their runs end, the other returns the
ended and the unended ones once a condition holds. Both wait on the server
with ``POST /runs/wait``, so nothing polls.

Every async entry point raises ``RuntimeError`` at once when called outside a
trio run, naming its blocking ``*_sync`` twin (see :mod:`._guard`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Final, Generic, Literal, NamedTuple, TypeVar

import attrs
import trio

from ._client import client_for, sync_client
from ._guard import in_trio_run, needs_trio
from ._models import ReturnWhen, TaskRun
from ._states import TaskRunState

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "DoneAndNotDoneFutures",
    "TaskRunFuture",
    "TaskRunFutureList",
    "as_completed",
    "as_completed_sync",
    "gather_results",
    "gather_results_sync",
    "wait",
    "wait_sync",
]

R = TypeVar("R")
# A future only hands its value out, so a future of int is a future of object,
# and futures of different tasks can be waited on together.
R_co = TypeVar("R_co", covariant=True)

#: :func:`wait` returns once any run has ended.
FIRST_COMPLETED: Final = "FIRST_COMPLETED"
#: :func:`wait` returns once any run has ended other than COMPLETED, or all have ended.
FIRST_EXCEPTION: Final = "FIRST_EXCEPTION"
#: :func:`wait` returns once every run has ended.
ALL_COMPLETED: Final = "ALL_COMPLETED"

ReturnWhenName = Literal["FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"]

#: What each :func:`wait` condition asks of one ``POST /runs/wait``: FIRST_EXCEPTION
#: cannot be said on the wire, so it waits run by run and looks at each.
_ON_THE_WIRE: dict[str, ReturnWhen] = {
    FIRST_COMPLETED: ReturnWhen.FIRST_ENDED,
    FIRST_EXCEPTION: ReturnWhen.FIRST_ENDED,
    ALL_COMPLETED: ReturnWhen.ALL_ENDED,
}


@attrs.frozen
class TaskRunFuture(Generic[R_co]):
    """A handle on one run: its id and the server it was submitted to.

    It holds no connection, so it can be stored, pickled, and awaited in
    another trio run or another process. Each method talks to the server
    through the client of an enclosing :func:`open_client` block when there
    is one for the same URL, and through the trio run's (or, for the ``*_sync``
    methods, the thread's) shared pooled client otherwise. Futures are
    hashable: two for the same run and server are equal.
    """

    task_run_id: uuid.UUID
    api_url: str | None = None

    @needs_trio("wait_sync")
    async def wait(self, timeout: float | None = None) -> TaskRun:
        """Wait for the run to end and return its snapshot.

        The server holds the request open until the run changes state (no
        polling loop). After ``timeout`` seconds it returns the snapshot as it
        is then, which may not have ended: check ``run.state.is_terminal``.
        """
        return await client_for(self.api_url).wait_run(self.task_run_id, timeout)

    @needs_trio("result_sync")
    async def result(self, timeout: float | None = None) -> R_co:
        """Wait for the run to end and return the task's return value.

        Raises the task's own exception (same type and message) when the run
        FAILED, with the worker-side traceback as its ``__cause__`` (a
        :class:`~trio_taskworker.RemoteTraceback`);
        :class:`TaskRunFailed` when that exception could not be rebuilt;
        :class:`TaskRunCancelled` or :class:`TaskRunCrashed` for those states;
        and ``TimeoutError`` when ``timeout`` passes first.
        """
        client = client_for(self.api_url)
        run = await client.wait_end(self.task_run_id, timeout)
        value: R_co = await client.load_result(run)
        return value

    @needs_trio("cancel_sync")
    async def cancel(self) -> TaskRun:
        """Cancel the run and return its snapshot.

        A queued run (SCHEDULED, or PENDING: leased but not started) becomes
        CANCELLED at once and never starts. A RUNNING one becomes CANCELLING;
        its worker cancels the run's scope and reports CANCELLED (an async task
        gets ``trio.Cancelled`` and its ``finally:`` blocks run; a sync task ends
        at its next ``trio.from_thread.check_cancelled()``, or when it returns,
        and its result is thrown away). A run that has already ended is returned
        as it is. Afterwards :meth:`result` raises :class:`TaskRunCancelled`.
        """
        return await client_for(self.api_url).cancel_run(self.task_run_id)

    def cancel_sync(self) -> TaskRun:
        """:meth:`cancel` for plain synchronous code."""
        return sync_client(self.api_url).cancel_run(self.task_run_id)

    def wait_sync(self, timeout: float | None = None) -> TaskRun:
        """:meth:`wait` for plain synchronous code (no trio needed)."""
        return sync_client(self.api_url).wait_run(self.task_run_id, timeout)

    def result_sync(self, timeout: float | None = None) -> R_co:
        """:meth:`result` for plain synchronous code (no trio needed)."""
        client = sync_client(self.api_url)
        run = client.wait_run(self.task_run_id, timeout)
        value: R_co = client.load_result(run)
        return value


def _one_server(futures: Iterable[TaskRunFuture[Any]], what: str) -> str | None:
    """The server all ``futures`` come from; ``ValueError`` if there are several."""
    urls = {future.api_url for future in futures}
    if len(urls) > 1:
        raise ValueError(f"{what} needs futures from one server, got {sorted(map(str, urls))}")
    return urls.pop() if urls else None


@needs_trio("gather_results_sync")
async def gather_results(
    futures: Iterable[TaskRunFuture[Any]], timeout: float | None = None
) -> list[Any]:
    """Wait for many runs at once (one long-poll per thousand) and return their values.

    Raises the first failure in ``futures`` order, like :meth:`TaskRunFuture.result`,
    and ``TimeoutError`` if they have not all ended after ``timeout`` seconds.
    All futures must come from the same server (``ValueError`` otherwise).
    """
    wanted = list(futures)
    if not wanted:
        return []
    client = client_for(_one_server(wanted, "gather_results()"))
    runs = await client.wait_runs([f.task_run_id for f in wanted], timeout)
    return [await client.load_result(run) for run in runs]


def gather_results_sync(
    futures: Iterable[TaskRunFuture[Any]], timeout: float | None = None
) -> list[Any]:
    """:func:`gather_results` for plain synchronous code."""
    wanted = list(futures)
    if not wanted:
        return []
    client = sync_client(_one_server(wanted, "gather_results_sync()"))
    runs = client.wait_runs([f.task_run_id for f in wanted], timeout)
    return [client.load_result(run) for run in runs]


class TaskRunFutureList(list[TaskRunFuture[R]], Generic[R]):
    """The futures that ``Task.map`` returns: a plain list, also awaitable as a whole.

    ``await futures.result()`` is :func:`gather_results` over the list. All its
    futures come from one server.
    """

    @needs_trio("result_sync")
    async def result(self, timeout: float | None = None) -> list[R]:
        """Every run's value, in order; raises as :meth:`TaskRunFuture.result` does.

        ``TimeoutError`` if they have not all ended after ``timeout`` seconds.
        """
        return await gather_results(self, timeout)

    @needs_trio("wait_sync")
    async def wait(self, timeout: float | None = None) -> list[TaskRun]:
        """Wait for every run to end and return their snapshots, in order.

        ``TimeoutError`` if they have not all ended after ``timeout`` seconds.
        """
        if not self:
            return []
        return await client_for(self._api_url()).wait_runs(self._ids(), timeout)

    def result_sync(self, timeout: float | None = None) -> list[R]:
        """:meth:`result` for plain synchronous code."""
        return gather_results_sync(self, timeout)

    def wait_sync(self, timeout: float | None = None) -> list[TaskRun]:
        """:meth:`wait` for plain synchronous code."""
        if not self:
            return []
        return sync_client(self._api_url()).wait_runs(self._ids(), timeout)

    def _ids(self) -> list[uuid.UUID]:
        return [future.task_run_id for future in self]

    def _api_url(self) -> str | None:
        return _one_server(self, "a TaskRunFutureList")


class DoneAndNotDoneFutures(NamedTuple, Generic[R]):
    """What :func:`wait` returns: the futures whose runs have ended, and the others."""

    done: set[TaskRunFuture[R]]
    not_done: set[TaskRunFuture[R]]


@attrs.define(eq=False)
class _Waiting(Generic[R]):
    """Waiting on many futures, whichever client sends the requests.

    Keeps which runs have not been seen ending, how long is left and what has
    ended, so :func:`as_completed` and :func:`wait` and their ``*_sync`` twins
    differ only in how they ask the server.
    """

    api_url: str | None
    clock: Callable[[], float]
    deadline: float | None
    pending: dict[uuid.UUID, TaskRunFuture[R]]
    done: set[TaskRunFuture[R]] = attrs.field(factory=set)
    failed: bool = False
    asked: bool = False

    @classmethod
    def start(
        cls,
        futures: Iterable[TaskRunFuture[R]],
        timeout: float | None,
        clock: Callable[[], float],
        what: str,
    ) -> _Waiting[R]:
        # Equal futures name the same run: each is waited on, and handed back, once.
        unique = list(dict.fromkeys(futures))
        api_url = _one_server(unique, what)
        deadline = None if timeout is None else clock() + timeout
        return cls(api_url, clock, deadline, {f.task_run_id: f for f in unique})

    def ids(self) -> list[uuid.UUID]:
        return list(self.pending)

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - self.clock())

    def take(self, runs: Iterable[TaskRun]) -> list[TaskRunFuture[R]]:
        """The futures of these ended runs, in their order; they are pending no more."""
        self.asked = True
        taken = []
        for run in runs:
            future = self.pending.pop(run.id, None)
            if future is not None:
                taken.append(future)
                self.failed |= run.state is not TaskRunState.COMPLETED
        self.done.update(taken)
        return taken

    def finished(self, return_when: str) -> bool:
        """True when :func:`wait` can return: its condition holds or the time is up."""
        if not self.pending:
            return True
        if return_when == FIRST_COMPLETED and self.done:
            return True
        if return_when == FIRST_EXCEPTION and self.failed:
            return True
        # The first request goes out even with no time left, to learn what has ended.
        return self.asked and self.remaining() == 0.0

    def timed_out(self) -> TimeoutError:
        total = len(self.pending) + len(self.done)
        return TimeoutError(f"{len(self.pending)} of {total} runs had not ended in time")

    def outcome(self) -> DoneAndNotDoneFutures[R]:
        return DoneAndNotDoneFutures(set(self.done), set(self.pending.values()))


def _require_trio(name: str, twin: str) -> None:
    # needs_trio only wraps coroutine functions; as_completed returns an async
    # iterator, so it checks at the call in the same words.
    if not in_trio_run():
        raise RuntimeError(
            f"{name}() is async and needs a running trio run (use it inside trio.run); "
            f"from synchronous code call {twin}() instead"
        )


def as_completed(
    futures: Iterable[TaskRunFuture[R]], timeout: float | None = None
) -> AsyncIterator[TaskRunFuture[R]]:
    """Yield each future as its run ends: ``async for future in as_completed(futures)``.

    Runs that have already ended come first. Equal futures are yielded once.
    Raises ``TimeoutError`` from the iteration when ``timeout`` seconds, counted
    from this call, pass before every run has ended (the ones that did end
    have been yielded by then). Raises ``ValueError`` at once when the futures
    come from more than one server, and ``RuntimeError`` when called outside a
    trio run (use :func:`as_completed_sync` there).
    """
    _require_trio("as_completed", "as_completed_sync")
    return _as_completed(_Waiting.start(futures, timeout, trio.current_time, "as_completed()"))


async def _as_completed(waiting: _Waiting[R]) -> AsyncIterator[TaskRunFuture[R]]:
    while waiting.pending:
        client = client_for(waiting.api_url)
        runs = await client.wait_ended(waiting.ids(), waiting.remaining())
        if not runs:
            raise waiting.timed_out()
        for future in waiting.take(runs):
            yield future


def as_completed_sync(
    futures: Iterable[TaskRunFuture[R]], timeout: float | None = None
) -> Iterator[TaskRunFuture[R]]:
    """:func:`as_completed` for plain synchronous code: a plain iterator."""
    return _as_completed_sync(
        _Waiting.start(futures, timeout, time.monotonic, "as_completed_sync()")
    )


def _as_completed_sync(waiting: _Waiting[R]) -> Iterator[TaskRunFuture[R]]:
    while waiting.pending:
        client = sync_client(waiting.api_url)
        runs = client.wait_ended(waiting.ids(), waiting.remaining())
        if not runs:
            raise waiting.timed_out()
        yield from waiting.take(runs)


def _on_the_wire(return_when: str) -> ReturnWhen:
    try:
        return _ON_THE_WIRE[return_when]
    except KeyError:
        raise ValueError(
            f"return_when must be one of {', '.join(_ON_THE_WIRE)}, not {return_when!r}"
        ) from None


@needs_trio("wait_sync")
async def wait(
    futures: Iterable[TaskRunFuture[R]],
    timeout: float | None = None,
    return_when: ReturnWhenName = ALL_COMPLETED,
) -> DoneAndNotDoneFutures[R]:
    """Wait until the ``return_when`` condition holds; return ``(done, not_done)``.

    ``ALL_COMPLETED`` (the default) waits for every run to end,
    ``FIRST_COMPLETED`` for any one, and ``FIRST_EXCEPTION`` for any one that
    ends other than COMPLETED (FAILED, CANCELLED or CRASHED), or for all.
    After ``timeout`` seconds it returns what has ended by then: it does not
    raise ``TimeoutError``. ``done`` holds every future whose run has ended when
    it returns (perhaps more than one, even for ``FIRST_COMPLETED``).

    Raises ``ValueError`` when the futures come from more than one server or
    ``return_when`` is unknown, and ``RuntimeError`` when called outside a trio
    run (use :func:`wait_sync` there).
    """
    wire = _on_the_wire(return_when)
    waiting = _Waiting.start(futures, timeout, trio.current_time, "wait()")
    while not waiting.finished(return_when):
        client = client_for(waiting.api_url)
        waiting.take(await client.wait_ended(waiting.ids(), waiting.remaining(), return_when=wire))
    return waiting.outcome()


def wait_sync(
    futures: Iterable[TaskRunFuture[R]],
    timeout: float | None = None,
    return_when: ReturnWhenName = ALL_COMPLETED,
) -> DoneAndNotDoneFutures[R]:
    """:func:`wait` for plain synchronous code."""
    wire = _on_the_wire(return_when)
    waiting = _Waiting.start(futures, timeout, time.monotonic, "wait_sync()")
    while not waiting.finished(return_when):
        client = sync_client(waiting.api_url)
        waiting.take(client.wait_ended(waiting.ids(), waiting.remaining(), return_when=wire))
    return waiting.outcome()
