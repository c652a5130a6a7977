"""A task's local options: the ones that are functions or lists. No I/O.

:class:`~trio_taskworker.TaskOptions` travel with every run and the server
applies them. The options here never leave the process that defines the
task: the worker uses its own definition's retry delays, retry condition and
hooks, and the submitter its own run-name template and cache-key function.
They follow Prefect's task options of the same names.
"""

from __future__ import annotations

import datetime
import inspect
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from ._exceptions import ConfigurationError
from ._models import MAX_SECONDS, check_number, seconds_validator
from ._states import TaskRunState

__all__ = [
    "LOCAL_OPTION_NAMES",
    "LocalOptions",
    "State",
    "exponential_backoff",
    "split_options",
]

#: ``hook(task, task_run, state)``: run by the worker when a run ends.
Hook = Callable[[Any, Any, "State"], Any]
#: A function of the number of retries that returns one delay per retry.
DelayFunction = Callable[[int], Sequence[float]]


@attrs.frozen(kw_only=True)
class State:
    """How an attempt ended, as hooks and ``retry_condition_fn`` see it.

    Shaped like Prefect's state: ``type``, ``message``, ``is_completed()``,
    ``is_failed()`` and ``result()``, which returns the task's value or raises
    its exception.
    """

    type: TaskRunState
    message: str | None = None
    value: Any = None
    exception: BaseException | None = None

    def is_completed(self) -> bool:
        """True for a COMPLETED run."""
        return self.type is TaskRunState.COMPLETED

    def is_failed(self) -> bool:
        """True for a FAILED attempt."""
        return self.type is TaskRunState.FAILED

    def result(self, raise_on_failure: bool = True) -> Any:
        """The task's value; for a failure, raise its exception (or return it)."""
        if self.exception is not None:
            if raise_on_failure:
                raise self.exception
            return self.exception
        return self.value


def exponential_backoff(backoff_factor: float) -> DelayFunction:
    """Retry delays that double: ``backoff_factor``, then twice that, four times...

    Pass it as ``retry_delay_seconds=exponential_backoff(10)`` (10, 20, 40 s...).
    """
    check_number("backoff_factor", backoff_factor, maximum=math.inf)

    def delays(retries: int) -> list[float]:
        return [min(backoff_factor * 2.0**n, MAX_SECONDS) for n in range(retries)]

    return delays


def _check_delay(name: str, value: Any) -> float:
    check_number(name, value)
    return float(value)


def _to_delays(value: Any) -> Any:
    if value is None or callable(value):
        return value
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigurationError(
            f"retry_delay_seconds must be a number, a list of numbers or a function, got {value!r}"
        )
    if not value:
        raise ConfigurationError("retry_delay_seconds must not be an empty list")
    return tuple(_check_delay("retry_delay_seconds", v) for v in value)


def _to_hooks(value: Any) -> tuple[Hook, ...]:
    hooks = (value,) if callable(value) else tuple(value or ())
    for hook in hooks:
        if not callable(hook):
            raise ConfigurationError(f"a hook must be callable, got {hook!r}")
    return hooks


def _to_seconds(value: Any) -> Any:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return value


def _optional_function(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not callable(value):
        raise ConfigurationError(f"{attribute.name} must be callable, got {value!r}")


def _optional_bool(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigurationError(f"{attribute.name} must be True, False or None, got {value!r}")


def _run_name(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, str) and not callable(value):
        raise ConfigurationError(f"{attribute.name} must be a string or a function, got {value!r}")


@attrs.frozen(kw_only=True)
class LocalOptions:
    """The options of a task that stay in the process that defines it.

    - ``retry_delays``: a tuple with one delay per retry (the last one repeats),
      or a function of the number of retries returning such a list; given as
      ``retry_delay_seconds=[...]`` or ``retry_delay_seconds=fn``;
    - ``retry_jitter_factor``: each delay is multiplied by a random factor in
      ``[1 - j, 1 + j]`` (never below 0), so failed runs do not retry in step;
    - ``retry_condition_fn(task, task_run, state) -> bool``: evaluated by the
      worker after a failure with retries left; ``False`` ends the run FAILED;
    - ``on_completion``/``on_failure``: hooks ``(task, task_run, state)`` the
      worker runs when a run COMPLETES, or FAILS for good;
    - ``cache_key_fn(context, parameters) -> str | None`` and ``cache_expiration``
      (a timedelta or seconds): evaluated by the submitter (see ``Task.delay``);
    - ``task_run_name``: a template formatted with the run's parameters by
      name, or a function (of nothing, or of the parameters dict);
    - ``log_prints``: ``True`` sends the run's ``print()`` calls (to stdout) to
      its run logger at INFO instead of stdout; ``False`` never does; ``None``
      (the default) follows the worker's ``TRIO_TASKWORKER_LOG_PRINTS``.
    """

    retry_delays: tuple[float, ...] | DelayFunction | None = attrs.field(
        default=None, converter=_to_delays
    )
    retry_jitter_factor: float | None = attrs.field(
        default=None, validator=seconds_validator(optional=True, maximum=math.inf)
    )
    retry_condition_fn: Callable[[Any, Any, State], Any] | None = attrs.field(
        default=None, validator=_optional_function
    )
    on_completion: tuple[Hook, ...] = attrs.field(default=(), converter=_to_hooks)
    on_failure: tuple[Hook, ...] = attrs.field(default=(), converter=_to_hooks)
    cache_key_fn: Callable[[Any, dict[str, Any]], str | None] | None = attrs.field(
        default=None, validator=_optional_function
    )
    cache_expiration: float | None = attrs.field(
        default=None, converter=_to_seconds, validator=seconds_validator(optional=True)
    )
    task_run_name: str | Callable[..., str] | None = attrs.field(default=None, validator=_run_name)
    log_prints: bool | None = attrs.field(default=None, validator=_optional_bool)

    def retry_delay(
        self,
        retry_count: int,
        retries: int,
        default: float,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> float:
        """The delay before retry ``retry_count + 1`` of ``retries``.

        ``default`` is the run's ``retry_delay_seconds``, used when no list or
        function was given. Raises :class:`ConfigurationError` when a delay
        function returns something that is not a list of delays.
        """
        if self.retry_delays is None:
            delays: Sequence[float] = (default,)
        elif callable(self.retry_delays):
            returned = self.retry_delays(retries)
            try:
                delays = _to_delays(list(returned))
            except (ConfigurationError, TypeError) as exc:
                raise ConfigurationError(
                    f"the retry delay function returned {returned!r}: {exc}"
                ) from None
        else:
            delays = self.retry_delays
        delay = delays[min(retry_count, len(delays) - 1)]
        if self.retry_jitter_factor:
            j = self.retry_jitter_factor
            delay *= uniform(max(0.0, 1.0 - j), 1.0 + j)
        return min(delay, MAX_SECONDS)

    def run_name(self, parameters: Mapping[str, Any]) -> str | None:
        """The run's display name from ``task_run_name`` and its parameters, or None.

        Raises :class:`ConfigurationError` when the template names a parameter
        the run does not have, or the function does not return a string.
        """
        template = self.task_run_name
        if template is None:
            return None
        if isinstance(template, str):
            try:
                return template.format(**parameters)
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
                raise ConfigurationError(
                    f"task_run_name {template!r} cannot be formatted with the parameters"
                    f" {sorted(parameters)}: {exc!r}"
                ) from None
        positional = (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        )
        takes_parameters = any(
            p.kind in positional for p in inspect.signature(template).parameters.values()
        )
        try:
            name = template(dict(parameters)) if takes_parameters else template()
        except Exception as exc:
            raise ConfigurationError(f"task_run_name {template!r} raised {exc!r}") from exc
        if not isinstance(name, str):
            raise ConfigurationError(f"task_run_name returned {name!r}, not a string")
        return name


#: The names :func:`split_options` routes to :class:`LocalOptions`.
LOCAL_OPTION_NAMES = frozenset({f.name for f in attrs.fields(LocalOptions)} - {"retry_delays"}) | {
    "retry_delay_seconds"
}


def split_options(changes: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split option keywords into (wire option changes, local option changes).

    ``retry_delay_seconds`` goes to the wire when it is a number; a list or a
    function becomes the local ``retry_delays``, and the wire option gets the
    first delay (0 for a function), which is what a worker without this
    task's definition would use.
    """
    wire: dict[str, Any] = {}
    local: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "retry_delay_seconds":
            if value is None or isinstance(value, int | float):  # the validator says no to None
                wire[name] = value
                local["retry_delays"] = None
            else:
                local["retry_delays"] = delays = _to_delays(value)
                wire[name] = 0.0 if callable(delays) else delays[0]
        elif name in LOCAL_OPTION_NAMES:
            local[name] = value
        else:
            wire[name] = value
    return wire, local
