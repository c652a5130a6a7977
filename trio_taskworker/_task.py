"""The ``@task`` decorator and :class:`Task`: a definition that can queue runs.

A task wraps a plain function with the :class:`TaskOptions` its runs carry
(retries, timeout, tags) and a *key* that submitters and workers agree on
(see :mod:`._definition`). Calling a task runs it in-process;
:meth:`Task.delay` and friends queue runs on the server instead.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar, overload

from ._client import client_for, sync_client
from ._definition import TaskDefinition, evolve_local
from ._future import TaskRunFuture, TaskRunFutureList
from ._guard import needs_trio
from ._models import TaskOptions
from ._policy import LocalOptions

__all__ = ["Task", "task"]

P = ParamSpec("P")
R = TypeVar("R")


class Task(TaskDefinition[P, R]):
    """A function that can be run in the background by task workers.

    Build one with :func:`task`. ``task(*args, **kwargs)`` calls the function
    directly (an async task returns its coroutine), and nothing is queued.
    The async submitters raise ``RuntimeError`` at once outside a trio run,
    naming their ``*_sync`` twin.
    """

    # --- submitting (async) -------------------------------------------------------

    @needs_trio("delay_sync")
    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskRunFuture[R]:
        """Queue one run of this task with these arguments.

        Returns a :class:`TaskRunFuture` once the server has stored the run.
        Raises ``TypeError`` (before anything is sent) when the arguments do
        not fit the function's signature, and :class:`ServerError` or
        :class:`ServerUnavailable` when the server refuses or cannot be reached.
        """
        return await self.apply_async(args=args, kwargs=kwargs)

    @needs_trio("apply_sync")
    async def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        scheduled_time: datetime.datetime | None = None,
    ) -> TaskRunFuture[R]:
        """Queue one run; with ``scheduled_time`` it is not started before then."""
        create, payload = self.run_create(args, kwargs or {}, scheduled_time)
        client = client_for()
        (run_id,) = await client.submit([(create, payload)])
        return TaskRunFuture(run_id, client.api_url)

    @needs_trio("map_sync")
    async def map(
        self, *iterables: Iterable[Any], **kw_iterables: Iterable[Any]
    ) -> TaskRunFutureList[R]:
        """Queue one run per zipped element of the iterables, in one request.

        ``add.map([1, 2], [10, 20])`` queues ``add(1, 10)`` and ``add(2, 20)``;
        keyword iterables are zipped in the same way. An argument wrapped in
        :class:`unmapped`, a string, bytes, or a value that is not iterable goes
        whole to every run: ``add.map([1, 2], 10)`` queues ``add(1, 10)`` and
        ``add(2, 10)``. The mapped iterables must have the same length
        (``ValueError`` otherwise, and when none is mapped). Every call is bound
        before anything is sent, so one bad element sends nothing. Returns a
        :class:`TaskRunFutureList`: ``await (await add.map(xs)).result()``.
        """
        calls = self.map_creates(iterables, kw_iterables)
        client = client_for()
        ids = await client.submit(calls)
        return TaskRunFutureList(TaskRunFuture(run_id, client.api_url) for run_id in ids)

    # --- submitting (sync) --------------------------------------------------------

    def delay_sync(self, *args: P.args, **kwargs: P.kwargs) -> TaskRunFuture[R]:
        """Like :meth:`delay`, for plain synchronous code: no trio needed."""
        return self.apply_sync(args=args, kwargs=kwargs)

    def apply_sync(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        scheduled_time: datetime.datetime | None = None,
    ) -> TaskRunFuture[R]:
        """Like :meth:`apply_async`, for plain synchronous code."""
        create, payload = self.run_create(args, kwargs or {}, scheduled_time)
        client = sync_client()
        (run_id,) = client.submit([(create, payload)])
        return TaskRunFuture(run_id, client.api_url)

    def map_sync(
        self, *iterables: Iterable[Any], **kw_iterables: Iterable[Any]
    ) -> TaskRunFutureList[R]:
        """Like :meth:`map`, for plain synchronous code."""
        calls = self.map_creates(iterables, kw_iterables)
        client = sync_client()
        ids = client.submit(calls)
        return TaskRunFutureList(TaskRunFuture(run_id, client.api_url) for run_id in ids)


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *, name: str | None = None, key: str | None = None, **options: Any
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    key: str | None = None,
    **options: Any,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Turn a function (sync or async) into a :class:`Task`.

    Use it bare (``@task``) or with options (``@task(retries=2)``):

    - ``name``: a display name (default: the function's name);
    - ``key``: the key workers and submitters match on (default ``module:qualname``);
    - any field of :class:`TaskOptions` (``retries``, ``retry_delay_seconds``,
      ``timeout_seconds``, ``max_redeliveries``, ``tags``): they travel with
      each run and the server applies them;
    - the local options, which stay in this process (Prefect's names and
      meanings): ``retry_delay_seconds`` as a list or a function such as
      :func:`exponential_backoff`, ``retry_jitter_factor``,
      ``retry_condition_fn``, ``on_completion``, ``on_failure`` and
      ``log_prints`` (used by the worker's definition of the task),
      ``cache_key_fn``, ``cache_expiration`` and ``task_run_name`` (used by the
      submitter's). See :class:`LocalOptions`.

    Raises :class:`ConfigurationError` for an unknown option or one out of range.
    """
    if fn is not None:
        return Task(fn, name=name, key=key, **options)
    # Checked now, so a bad option fails where the decorator is written.
    checked, local = evolve_local(TaskOptions(), LocalOptions(), options)

    def decorate(f: Callable[P, R]) -> Task[P, R]:
        return Task(f, name=name, key=key, options=checked, local=local)

    return decorate
