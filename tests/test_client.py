"""The shared clients: one pooled client per trio run, one blocking client per thread."""

from __future__ import annotations

import threading

import trio

from trio_taskworker._client import (
    TaskWorkerClient,
    client_for,
    open_client,
    shared_client,
    sync_client,
)


def test_one_shared_client_per_trio_run_closed_when_it_ends() -> None:
    seen: list[TaskWorkerClient] = []

    async def main() -> None:
        first = shared_client("http://127.0.0.1:1")
        assert shared_client("http://127.0.0.1:1/") is first  # the same server
        assert shared_client("http://127.0.0.1:2") is not first
        assert client_for("http://127.0.0.1:1") is first
        seen.append(first)

    trio.run(main)
    trio.run(main)
    first, second = seen
    assert first is not second  # each trio run has its own
    assert first._http.is_closed and second._http.is_closed  # closed as their runs ended


async def test_open_client_wins_inside_its_block() -> None:
    async with open_client("http://127.0.0.1:1") as opened:
        assert client_for() is opened
        assert client_for("http://127.0.0.1:1") is opened
        assert client_for("http://127.0.0.1:2") is shared_client("http://127.0.0.1:2")
    assert client_for("http://127.0.0.1:1") is shared_client("http://127.0.0.1:1")


def test_one_blocking_client_per_thread() -> None:
    here = sync_client("http://127.0.0.1:1")
    assert sync_client("http://127.0.0.1:1") is here
    there: list[object] = []
    thread = threading.Thread(target=lambda: there.append(sync_client("http://127.0.0.1:1")))
    thread.start()
    thread.join()
    (theirs,) = there
    assert theirs is not here
    assert theirs._http.is_closed  # type: ignore[attr-defined]  # closed as its thread ended
    assert not here._http.is_closed
