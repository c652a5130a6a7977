"""Task definitions: a function, its key and its options. No I/O.

:class:`TaskDefinition` is what a worker needs of a task; the public
:class:`~trio_taskworker.Task` (in ``_task``) adds the ways to queue runs.

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
from typing import Any, Generic, ParamSpec, Self, TypeVar

import attrs

from ._exceptions import ConfigurationError
from ._models import TaskOptions, TaskRunCreate, option_values
from ._serialization import dumps_payload

__all__ = ["TaskDefinition", "evolve_options", "module_name_for_path"]

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


def evolve_options(options: TaskOptions, changes: dict[str, Any]) -> TaskOptions:
    """``options`` with ``changes``; :class:`ConfigurationError` names a bad or unknown one."""
    try:
        return attrs.evolve(options, **changes)
    except TypeError as exc:
        known = ", ".join(option_values(options))
        raise ConfigurationError(f"{exc}; the task options are: {known}") from None


class TaskDefinition(Generic[P, R]):
    """A function with its key and :class:`TaskOptions`: what a worker needs of a task.

    :class:`Task` adds the ways to queue runs. Calling the definition calls
    the function directly (an async task returns its coroutine).
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
        self.options: TaskOptions = evolve_options(options or TaskOptions(), changes)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)

    def with_options(self, **changes: Any) -> Self:
        """A copy of this task whose runs carry these options instead (same key).

        Takes the fields of :class:`TaskOptions`; raises :class:`ConfigurationError`
        for an unknown option or a bad value.
        """
        options = evolve_options(self.options, changes)
        return type(self)(self.fn, name=self.name, key=self.key, options=options)

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

    def run_create(
        self,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        scheduled_time: datetime.datetime | None = None,
    ) -> tuple[TaskRunCreate, bytes]:
        """Bind and pickle one call: the run to create and its pickled parameters.

        Raises ``TypeError`` when the arguments do not fit the signature and
        ``ValueError`` for a ``scheduled_time`` without a timezone. The client
        decides whether the payload travels inline or as a blob.
        """
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

    def map_creates(
        self, iterables: tuple[Iterable[Any], ...], kw_iterables: dict[str, Iterable[Any]]
    ) -> list[tuple[TaskRunCreate, bytes]]:
        """:meth:`run_create` for each zipped element of the iterables (see ``Task.map``)."""
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
                self.run_create(row[:npos], dict(zip(names, row[npos:], strict=True)), None)
            )
        return calls
