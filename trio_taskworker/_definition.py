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
import reprlib
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, ParamSpec, Self, TypeVar

import attrs

from ._context import TaskRunContext
from ._exceptions import ConfigurationError
from ._models import MAX_PREVIEW, TaskOptions, TaskRunCreate, option_values
from ._policy import LocalOptions, split_options
from ._serialization import dumps_payload

__all__ = [
    "TaskDefinition",
    "evolve_local",
    "evolve_options",
    "module_name_for_path",
    "preview_call",
    "preview_value",
    "unmapped",
]

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
        known = ", ".join([*option_values(options), *_LOCAL_NAMES])
        raise ConfigurationError(f"{exc}; the task options are: {known}") from None


_LOCAL_NAMES = sorted(f.name for f in attrs.fields(LocalOptions) if f.name != "retry_delays")


def evolve_local(
    options: TaskOptions, local: LocalOptions, changes: dict[str, Any]
) -> tuple[TaskOptions, LocalOptions]:
    """Both kinds of options with ``changes`` (see :func:`split_options`)."""
    wire, local_changes = split_options(changes)
    return evolve_options(options, wire), attrs.evolve(local, **local_changes)


# --- previews: what people read instead of the pickles -------------------------------

#: What a preview says of a value whose ``repr`` raised.
UNREPRESENTABLE = "<unrepresentable>"
_CUT = "..."


class _Limits(reprlib.Repr):
    """``reprlib``'s shortening, with :data:`UNREPRESENTABLE` for a ``repr`` that raises.

    reprlib shortens containers and strings on its own; the limits keep a
    preview to a line or two whatever the value holds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = self.maxother = 200
        self.maxlong = 100
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 10
        self.maxdeque = self.maxarray = self.maxdict = 10

    def repr_instance(self, x: Any, level: int) -> str:
        # reprlib's own fallback names the object's address, which tells a
        # reader nothing.
        try:
            text = repr(x)
        except Exception:
            return UNREPRESENTABLE
        if not isinstance(text, str):
            return UNREPRESENTABLE
        if len(text) > self.maxother:
            head = max(0, (self.maxother - 3) // 2)
            tail = max(0, self.maxother - 3 - head)
            text = text[:head] + "..." + text[len(text) - tail :]
        return text


_limits = _Limits()


def _short(value: Any) -> str:
    try:
        return _limits.repr(value)
    except Exception:  # reprlib calls len() and iterates on its own, unguarded
        return UNREPRESENTABLE


def _cap(text: str) -> str:
    return text if len(text) <= MAX_PREVIEW else text[: MAX_PREVIEW - len(_CUT)] + _CUT


def preview_value(value: Any) -> str:
    """A short ``repr`` of ``value`` (``reprlib``'s), at most ``MAX_PREVIEW`` characters.

    Never raises: a value whose ``repr`` raises is ``<unrepresentable>``.
    """
    return _cap(_short(value))


def preview_call(arguments: dict[str, Any]) -> str:
    """A short, readable form of a call's arguments by name: ``x=1, y='abc'``.

    Each value as :func:`preview_value` shows it; at most ``MAX_PREVIEW``
    characters in all, and it never raises.
    """
    parts: list[str] = []
    length = 0
    for name, value in arguments.items():
        part = f"{name}={_short(value)}"
        parts.append(part)
        length += len(part) + 2
        if length > MAX_PREVIEW:
            break  # the rest would be cut anyway
    return _cap(", ".join(parts))


@attrs.frozen
class unmapped:
    """Wrap an argument of ``Task.map`` to pass it whole to every run, not element-wise.

    ``add.map([1, 2], unmapped([10, 20]))`` queues ``add(1, [10, 20])`` and
    ``add(2, [10, 20])``. Strings, bytes and values that are not iterable are
    passed whole without it.
    """

    value: Any


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
        local: LocalOptions | None = None,
        **changes: Any,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"a task needs a function, got {type(fn).__name__}")
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "task"))
        self.key: str = key or f"{_module_name(fn)}:{getattr(fn, '__qualname__', self.name)}"
        self.options: TaskOptions
        #: The options that are functions or lists, kept in this process.
        self.local: LocalOptions
        self.options, self.local = evolve_local(
            options or TaskOptions(), local or LocalOptions(), changes
        )
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)

    def with_options(self, **changes: Any) -> Self:
        """A copy of this task with these options instead (same key).

        Takes the fields of :class:`TaskOptions` and the local options (see
        :func:`task`); raises :class:`ConfigurationError` for an unknown
        option or a bad value. ``name`` changes the display name.
        """
        name = changes.pop("name", self.name)
        options, local = evolve_local(self.options, self.local, changes)
        return type(self)(self.fn, name=name, key=self.key, options=options, local=local)

    def __repr__(self) -> str:
        return f"<Task {self.name!r} key={self.key!r}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    # --- building runs ------------------------------------------------------------

    def _bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        try:
            return self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None

    def parameters_of(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by parameter name, defaults filled in.

        Raises ``TypeError`` when they do not fit the signature.
        """
        bound = self._bind(args, kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def run_create(
        self,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        scheduled_time: datetime.datetime | None = None,
    ) -> tuple[TaskRunCreate, bytes]:
        """Bind and pickle one call: the run to create and its pickled parameters.

        The run carries a ``parameters_preview`` of the arguments as given
        (see :func:`preview_call`), for people to read. Raises ``TypeError``
        when the arguments do not fit the signature and ``ValueError`` for a
        ``scheduled_time`` without a timezone. The client decides whether the
        payload travels inline or as a blob.
        """
        if scheduled_time is not None and (
            not isinstance(scheduled_time, datetime.datetime) or scheduled_time.tzinfo is None
        ):
            raise ValueError("scheduled_time must be a timezone-aware datetime")
        bound = self._bind(args, kwargs)
        payload = dumps_payload((bound.args, bound.kwargs))
        preview = preview_call(bound.arguments)
        name = cache_key = None
        local = self.local
        if local.task_run_name is not None or local.cache_key_fn is not None:
            parameters = self.parameters_of(args, kwargs)
            name = local.run_name(parameters)
            cache_key = self._cache_key(args, kwargs, parameters)
        create = TaskRunCreate(
            task_key=self.key,
            task_name=self.name,
            scheduled_time=scheduled_time,
            name=name,
            cache_key=cache_key,
            cache_expiration=None if cache_key is None else local.cache_expiration,
            parameters_preview=preview,
            **option_values(self.options),
        )
        return create, payload

    def _cache_key(
        self, args: Sequence[Any], kwargs: dict[str, Any], parameters: dict[str, Any]
    ) -> str | None:
        fn = self.local.cache_key_fn
        if fn is None:
            return None
        context = TaskRunContext(task=self, task_run=None, args=tuple(args), kwargs=kwargs)
        key = fn(context, parameters)
        if key is not None and not isinstance(key, str):
            raise ConfigurationError(f"cache_key_fn returned {key!r}, not a string or None")
        return key

    def map_creates(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[tuple[TaskRunCreate, bytes]]:
        """:meth:`run_create` for each zipped element of the mapped arguments (see ``Task.map``).

        An iterable argument is mapped; one wrapped in :class:`unmapped`, a
        string, bytes or a value that is not iterable goes whole to every run.
        """
        names = list(kwargs)
        columns = [_column(value) for value in (*args, *kwargs.values())]
        lengths = {len(c) for c in columns if c is not None}
        if not lengths:
            raise ValueError("map() needs at least one iterable argument to map over")
        if len(lengths) != 1:
            mapped = [len(c) for c in columns if c is not None]
            raise ValueError(f"map() iterables differ in length: {mapped}")
        (count,) = lengths
        npos = len(args)
        calls = []
        for i in range(count):
            row = [_whole(value) if c is None else c[i] for value, c in zip(
                (*args, *kwargs.values()), columns, strict=True
            )]  # fmt: skip
            calls.append(
                self.run_create(row[:npos], dict(zip(names, row[npos:], strict=True)), None)
            )
        return calls


def _column(value: Any) -> list[Any] | None:
    """A mapped argument's elements, or None when it goes whole to every run."""
    if isinstance(value, unmapped | str | bytes | bytearray) or not isinstance(value, Iterable):
        return None
    return list(value)


def _whole(value: Any) -> Any:
    return value.value if isinstance(value, unmapped) else value
