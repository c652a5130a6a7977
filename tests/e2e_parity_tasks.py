"""Tasks served by real worker processes in the Prefect-parity end-to-end tests."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from trio_taskworker import StopTaskWorker, exponential_backoff, task
from trio_taskworker._context import TaskRunContext, get_run_context
from trio_taskworker._policy import State


def _bump(path: str) -> int:
    counter = Path(path)
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    return calls


@task
async def quitter() -> None:
    raise StopTaskWorker("maintenance")


@task(task_run_name="whoami-{label}")
async def whoami(label: str, extra: int = 3) -> dict[str, Any]:
    context = get_run_context()
    assert context.task_run is not None
    return {
        "id": str(context.task_run.id),
        "attempt": context.attempt,
        "parameters": context.parameters,
        "pid": os.getpid(),
    }


def by_value(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"square-{parameters['x']}"


@task(cache_key_fn=by_value, cache_expiration=3600)
def cached_square(x: int, counter: str) -> int:
    _bump(counter)
    return x * x


def write_failure(task: Any, run: Any, state: State) -> None:
    Path(os.environ["PARITY_HOOK_FILE"]).write_text(
        f"{run.id} {run.state.value} {state.result(raise_on_failure=False)!r}"
    )


def only_connection_errors(task: Any, run: Any, state: State) -> bool:
    return isinstance(state.result(raise_on_failure=False), ConnectionError)


@task(
    retries=3,
    retry_delay_seconds=[0.05, 0.1],
    retry_condition_fn=only_connection_errors,
    on_failure=[write_failure],
)
def flaky(counter: str) -> int:
    calls = _bump(counter)
    if calls <= 2:
        raise ConnectionError(f"call {calls}: connection reset")
    raise ValueError(f"call {calls}: not worth retrying")


async def announce(task: Any, run: Any, state: State) -> None:
    print(f"completed {run.id} with {state.result()!r}", flush=True)


@task(on_completion=[announce])
async def scale(x: int, factor: list[int]) -> int:
    return x * sum(factor)


@task(retries=2, retry_delay_seconds=exponential_backoff(0.2), retry_jitter_factor=0.5)
def backs_off(times: str) -> None:
    with open(times, "a") as out:
        out.write(f"{time.time()}\n")
    raise RuntimeError("still down")
