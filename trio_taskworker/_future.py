"""The caller's handle on a queued run."""

from __future__ import annotations

import uuid
from typing import Any, Generic, TypeVar

import attrs

from ._client import client_for, sync_client
from ._models import TaskRun

__all__ = ["TaskRunFuture", "TaskRunFutureList", "gather_results"]

R = TypeVar("R")


@attrs.frozen
class TaskRunFuture(Generic[R]):
    """A handle on one run: its id and the server it was submitted to.

    It holds no connection, so it can be stored, pickled, and awaited in
    another trio run or another process. Each method talks to the server
    through the client of an enclosing :func:`open_client` block when there
    is one for the same URL, and through the trio run's (or, for the ``*_sync``
    methods, the thread's) shared pooled client otherwise.
    """

    task_run_id: uuid.UUID
    api_url: str | None = None

    async def wait(self, timeout: float | None = None) -> TaskRun:
        """Wait for the run to end and return its snapshot.

        The server holds the request open until the run changes state (no
        polling loop). After ``timeout`` seconds it returns the snapshot as it
        is then, which may not have ended: check ``run.state.is_terminal``.
        """
        return await client_for(self.api_url).wait_run(self.task_run_id, timeout)

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the run to end and return the task's return value.

        Raises the task's own exception (same type and message) when the run
        FAILED, :class:`TaskRunFailed` when that exception could not be
        rebuilt, :class:`TaskRunCancelled` or :class:`TaskRunCrashed` for those
        states, and ``TimeoutError`` when ``timeout`` passes first.
        """
        client = client_for(self.api_url)
        run = await client.wait_run(self.task_run_id, timeout)
        value: R = await client.load_result(run)
        return value

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

    def result_sync(self, timeout: float | None = None) -> R:
        """:meth:`result` for plain synchronous code (no trio needed)."""
        client = sync_client(self.api_url)
        run = client.wait_run(self.task_run_id, timeout)
        value: R = client.load_result(run)
        return value


async def gather_results(
    futures: list[TaskRunFuture[Any]], timeout: float | None = None
) -> list[Any]:
    """Wait for many runs at once (one long-poll per thousand) and return their values.

    Raises the first failure in ``futures`` order, like :meth:`TaskRunFuture.result`,
    and ``TimeoutError`` if they have not all ended after ``timeout`` seconds.
    All futures must come from the same server.
    """
    if not futures:
        return []
    urls = {f.api_url for f in futures}
    if len(urls) != 1:
        raise ValueError("gather_results() needs futures from one server")
    client = client_for(urls.pop())
    runs = await client.wait_runs([f.task_run_id for f in futures], timeout)
    return [await client.load_result(run) for run in runs]


class TaskRunFutureList(list[TaskRunFuture[R]], Generic[R]):
    """The futures that ``Task.map`` returns: a plain list, also awaitable as a whole.

    ``await futures.result()`` is :func:`gather_results` over the list. All its
    futures come from one server.
    """

    async def result(self, timeout: float | None = None) -> list[R]:
        """Every run's value, in order; raises as :meth:`TaskRunFuture.result` does.

        ``TimeoutError`` if they have not all ended after ``timeout`` seconds.
        """
        return await gather_results(list(self), timeout)

    async def wait(self, timeout: float | None = None) -> list[TaskRun]:
        """Wait for every run to end and return their snapshots, in order.

        ``TimeoutError`` if they have not all ended after ``timeout`` seconds.
        """
        if not self:
            return []
        return await client_for(self._api_url()).wait_runs(self._ids(), timeout)

    def result_sync(self, timeout: float | None = None) -> list[R]:
        """:meth:`result` for plain synchronous code."""
        if not self:
            return []
        client = sync_client(self._api_url())
        return [client.load_result(run) for run in self.wait_sync(timeout)]

    def wait_sync(self, timeout: float | None = None) -> list[TaskRun]:
        """:meth:`wait` for plain synchronous code."""
        if not self:
            return []
        return sync_client(self._api_url()).wait_runs(self._ids(), timeout)

    def _ids(self) -> list[uuid.UUID]:
        return [future.task_run_id for future in self]

    def _api_url(self) -> str | None:
        urls = {future.api_url for future in self}
        if len(urls) > 1:
            raise ValueError("a TaskRunFutureList needs futures from one server")
        return urls.pop() if urls else None
