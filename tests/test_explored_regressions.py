"""What the interleaving explorer (``test_explore.py``) found, as plain tests.

Each test is a shrunk failing program, or the smallest direct reproduction of
it, named after what it shows. None needs Hypothesis to reproduce: they run the
real worker and server in process on trio's autojump clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio
import trio.testing

from trio_taskworker import TaskRunState, TaskWorker, task
from trio_taskworker._server import SQLiteStore

from .explore_machine import Cut, Join, Silence, Submit, program, run_program
from .fakes import InProcessServer, now

S = TaskRunState


@task(key="explored:nap")
async def nap(seconds: float) -> str:
    await trio.sleep(seconds)
    return "slept"


async def submit(srv: InProcessServer, create_and_payload: tuple[Any, bytes]) -> Any:
    create, payload = create_and_payload
    (run_id,) = await srv.state.store.create_runs(
        [attrs.evolve(create, parameters=payload)], now()
    )
    srv.state.dispatcher.wake()
    return run_id


async def state_of(srv: InProcessServer, run_id: Any) -> TaskRunState:
    await trio.testing.wait_all_tasks_blocked()
    (run,) = await srv.state.store.read_runs([run_id])
    return run.state


async def test_a_late_subscribe_does_not_stop_the_worker_for_good(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, memory_store: SQLiteStore
) -> None:
    """The explorer's program: ``Join(limit=1)``, ``Submit(seconds=1)``,
    ``Silence(0, 20.0, reconnects=True)``, ``Cut(None)``: the worker reconnects
    while its uplink stalls, and its subscribe waits 20 s."""
    srv = await InProcessServer.start(nursery, memory_store)
    stall_first = True

    @contextlib.asynccontextmanager
    async def slow_uplink() -> AsyncIterator[Any]:
        # The first connection's first message (the subscribe) waits 11 s: the
        # uplink stalled, the worker's loop was blocked, the network was slow.
        nonlocal stall_first
        stall, stall_first = stall_first, False
        async with srv.connect() as ws:

            class Stalled:
                async def send_message(self, text: str) -> None:
                    nonlocal stall
                    if stall:
                        stall = False
                        await trio.sleep(11)
                    await ws.send_message(text)

                async def get_message(self) -> Any:
                    return await ws.get_message()

                async def ping(self) -> None:
                    await ws.ping()

            yield Stalled()

    worker = TaskWorker(
        nap, api_url="http://in-process", handle_signals=False, connect=slow_uplink
    )
    outcome: list[BaseException | None] = []

    async def serve() -> None:
        try:
            await worker.start()
        except Exception as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    nursery.start_soon(serve)
    await trio.sleep(30)
    # A transient stall is no reason to stop: the worker reconnects and serves.
    assert not outcome, outcome
    run_id = await submit(srv, nap.run_create((1,), {}))
    await trio.sleep(5)
    assert await state_of(srv, run_id) is S.COMPLETED
    await worker.stop()


def test_a_late_subscribe_as_the_explorer_found_it() -> None:
    """The same finding as the explorer shrank it (every invariant checked)."""
    run_program(
        program(
            Join(limit=1, shutdown_timeout=0.0),
            Submit(kind="async", seconds=1),
            Silence(worker=0, seconds=20.0, reconnects=True),
            Cut(worker=None),
        )
    )


async def test_a_runs_timeout_option_is_applied_by_the_worker(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, memory_store: SQLiteStore
) -> None:
    srv = await InProcessServer.start(nursery, memory_store)
    worker = TaskWorker(
        nap, api_url="http://in-process", handle_signals=False, connect=srv.connect
    )
    await nursery.start(worker.start)
    run_id = await submit(srv, nap.with_options(timeout_seconds=5).run_create((100,), {}))
    await trio.sleep(10)
    (run,) = await srv.state.store.read_runs([run_id])
    assert run.timeout_seconds == 5  # the server has it
    assert run.state is S.FAILED, run.state  # TaskOptions: "the run FAILS ... after this"
    assert run.error is not None and run.error.type.endswith("TaskRunTimedOut")
    await worker.stop()
