"""Task definitions: the ``@task`` decorator and :class:`Task`.

A task wraps a plain function with the :class:`TaskOptions` its runs carry
(retries, timeout, tags) and a *key* that submitters and workers agree on. Calling a
task runs it in-process; :meth:`Task.delay` and friends queue runs on the
server instead.

The key is ``"module:qualname"``. A function defined in a script run as
``__main__`` gets the module name the script would have when imported, so a
worker that loads ``path/to/mod.py:fn`` and one that loads ``pkg.mod:fn``
compute the same key as the submitting script.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import attrs

from ._exceptions import ConfigurationError
from ._models import TaskOptions, TaskRunCreate, option_values
from ._serialization import dumps_payload

if TYPE_CHECKING:
    from ._future import TaskRunFuture

__all__ = ["Task", "module_name_for_path", "task"]

P = ParamSpec("P")
R = TypeVar("R")


def module_name_for_path(path: Path) -> tuple[str, Path]:
    """Return the dotted module name of a ``.py`` file and the folder to import it from.

    The name climbs through parent folders for as long as they hold an
    ``__init__.py``, so ``src/pkg/mod.py`` is ``pkg.mod`` imported from ``src``.
    """
    path = path.resolve()
    parts = [path.stem] if path.stem != "__init__" else []
    folder = path.parent
    while (folder / "__init__.py").is_file():
        parts.append(folder.name)
        folder = folder.parent
    return ".".join(reversed(parts)), folder


def _module_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "__main__"
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and not spec.name.endswith("__main__"):
        return str(spec.name)
    file = getattr(main, "__file__", None)
    if file:
        return module_name_for_path(Path(file))[0]
    return module


class Task(Generic[P, R]):
    """A function that can be run in the background by task workers.

    Build one with :func:`task`. ``task(*args, **kwargs)`` calls the function
    directly (an async task returns its coroutine), and nothing is queued.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        key: str | None = None,
        options: TaskOptions | None = None,
        **changes: Any,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"a task needs a function, got {type(fn).__name__}")
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "task"))
        self.key: str = key or f"{_module_name(fn)}:{getattr(fn, '__qualname__', self.name)}"
        self.options: TaskOptions = _evolve(options or TaskOptions(), changes)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)

    def with_options(self, **changes: Any) -> Task[P, R]:
        """A copy of this task whose runs carry these options instead (same key).

        Takes the fields of :class:`TaskOptions`; raises :class:`ConfigurationError`
        for an unknown option or a bad value.
        """
        return Task(self.fn, name=self.name, key=self.key, options=_evolve(self.options, changes))

    def __repr__(self) -> str:
        return f"<Task {self.name!r} key={self.key!r}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    # --- building runs ------------------------------------------------------------

    def _bind(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        return bound.args, bound.kwargs

    def _run_create(
        self,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        scheduled_time: datetime.datetime | None,
    ) -> tuple[TaskRunCreate, bytes]:
        """Bind and pickle one call; the caller decides if the payload goes inline."""
        if scheduled_time is not None and (
            not isinstance(scheduled_time, datetime.datetime) or scheduled_time.tzinfo is None
        ):
            raise ValueError("scheduled_time must be a timezone-aware datetime")
        bound_args, bound_kwargs = self._bind(args, kwargs)
        payload = dumps_payload((bound_args, bound_kwargs))
        create = TaskRunCreate(
            task_key=self.key,
            task_name=self.name,
            scheduled_time=scheduled_time,
            **option_values(self.options),
        )
        return create, payload

    # --- submitting (async) -------------------------------------------------------

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskRunFuture[R]:
        """Queue one run of this task with these arguments.

        Returns a :class:`TaskRunFuture` once the server has stored the run.
        Raises ``TypeError`` (before anything is sent) when the arguments do
        not fit the function's signature, and :class:`ServerError` or
        :class:`ServerUnavailable` when the server refuses or cannot be reached.
        """
        return await self.apply_async(args=args, kwargs=kwargs)

    async def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        scheduled_time: datetime.datetime | None = None,
    ) -> TaskRunFuture[R]:
        """Queue one run; with ``scheduled_time`` it is not started before then."""
        from ._client import current_client

        create, payload = self._run_create(args, kwargs or {}, scheduled_time)
        async with current_client() as client:
            (future,) = await client.submit([(create, payload)])
        return future

    async def map(
        self, *iterables: Iterable[Any], **kw_iterables: Iterable[Any]
    ) -> list[TaskRunFuture[R]]:
        """Queue one run per zipped element of the iterables, in one request.

        ``add.map([1, 2], [10, 20])`` queues ``add(1, 10)`` and ``add(2, 20)``;
        keyword iterables are zipped in the same way. All iterables must have
        the same length (``ValueError`` otherwise). Every call is bound before
        anything is sent, so one bad element sends nothing.
        """
        from ._client import current_client

        calls = self._map_calls(iterables, kw_iterables)
        async with current_client() as client:
            return await client.submit(calls)

    def _map_calls(
        self, iterables: tuple[Iterable[Any], ...], kw_iterables: dict[str, Iterable[Any]]
    ) -> list[tuple[TaskRunCreate, bytes]]:
        names = list(kw_iterables)
        columns = [list(it) for it in iterables] + [list(kw_iterables[n]) for n in names]
        if not columns:
            raise ValueError("map() needs at least one iterable")
        if len({len(c) for c in columns}) != 1:
            raise ValueError(f"map() iterables differ in length: {[len(c) for c in columns]}")
        npos = len(iterables)
        calls = []
        for row in zip(*columns, strict=True):
            calls.append(
                self._run_create(row[:npos], dict(zip(names, row[npos:], strict=True)), None)
            )
        return calls

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
        from ._client import SyncClient

        create, payload = self._run_create(args, kwargs or {}, scheduled_time)
        with SyncClient() as client:
            (future,) = client.submit([(create, payload)])
        return future

    def map_sync(
        self, *iterables: Iterable[Any], **kw_iterables: Iterable[Any]
    ) -> list[TaskRunFuture[R]]:
        """Like :meth:`map`, for plain synchronous code."""
        from ._client import SyncClient

        calls = self._map_calls(iterables, kw_iterables)
        with SyncClient() as client:
            return client.submit(calls)


def _evolve(options: TaskOptions, changes: dict[str, Any]) -> TaskOptions:
    try:
        return attrs.evolve(options, **changes)
    except TypeError as exc:
        known = ", ".join(option_values(options))
        raise ConfigurationError(f"{exc}; the task options are: {known}") from None


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
      ``timeout_seconds``, ``max_redeliveries``, ``tags``).

    Raises :class:`ConfigurationError` for an unknown option or one out of range.
    """
    if fn is not None:
        return Task(fn, name=name, key=key, **options)
    # Checked now, so a bad option fails where the decorator is written.
    checked = _evolve(TaskOptions(), options)

    def decorate(f: Callable[P, R]) -> Task[P, R]:
        return Task(f, name=name, key=key, options=checked)

    return decorate
