"""Feeds of ended runs: the server's bookkeeping, the client's, and both together.

A caller awaiting results one by one (``[await f.result() for f in futs]``)
shares one long-poll of its client's feed with every other waiting caller; a
run no feed watches, or one whose feed the server lost, is waited for alone.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import attrs
import httpx
import pytest
import trio

from trio_taskworker import TaskRunState, TaskServer, TaskWorker, open_client, task
from trio_taskworker._client import client_for
from trio_taskworker._feed import HEAVY, MAX_HELD, FeedState
from trio_taskworker._models import FeedPage, TaskRun
from trio_taskworker._serialization import from_json
from trio_taskworker._server._dispatch import Waiters
from trio_taskworker._server._feeds import (
    FEED_IDLE_SECONDS,
    FEED_MAX_ENTRY_BYTES,
    FEED_MAX_RUNS,
    FEED_PAGE_RUNS,
    Feeds,
)

from .test_server_api import check_against_spec

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def ended(run_id: uuid.UUID, state: TaskRunState = TaskRunState.COMPLETED, **kw: Any) -> TaskRun:
    return TaskRun(
        id=run_id,
        task_key="mod:fn",
        task_name="fn",
        state=state,
        created_at=T0,
        scheduled_time=T0,
        **kw,
    )


def page_of(data: bytes) -> FeedPage:
    return from_json(data, FeedPage)


# --- the server's feeds, alone --------------------------------------------------------


@pytest.fixture
def feeds() -> Feeds:
    return Feeds(Waiters(), trio.current_time)


async def test_a_feed_hears_the_ends_of_the_runs_it_watches(feeds: Feeds) -> None:
    opened = feeds.open(str(uuid.uuid4()))
    assert opened is not None
    feed, made = opened
    assert made and feeds.open(feed.id) == (feed, False)
    ids = [uuid.uuid4() for _ in range(3)]
    assert feeds.watch(feed, ids)
    # A run it does not watch, and one not ended yet, are not in the page.
    feeds.waiters.notify([ended(ids[0]), ended(uuid.uuid4()), ended(ids[2])])
    feeds.waiters.notify([attrs.evolve(ended(ids[1]), state=TaskRunState.RUNNING)])
    page = page_of(await feeds.poll(feed, 0, timeout=0))
    assert [run.id for run in page.runs] == [ids[0], ids[2]]
    assert page.heavy == ()
    assert all(run.parameters is None for run in page.runs)
    assert feeds.runs == 3


async def test_a_page_lost_on_the_way_is_sent_again_until_acknowledged(feeds: Feeds) -> None:
    feed, _ = feeds.open(str(uuid.uuid4())) or pytest.fail("no feed")
    ids = [uuid.uuid4() for _ in range(2)]
    feeds.watch(feed, ids)
    feeds.waiters.notify([ended(ids[0])])
    first = page_of(await feeds.poll(feed, 0, timeout=0))
    again = page_of(await feeds.poll(feed, 0, timeout=0))
    assert first == again and [r.id for r in first.runs] == [ids[0]]
    feeds.waiters.notify([ended(ids[1])])
    second = page_of(await feeds.poll(feed, first.cursor, timeout=0))
    assert [r.id for r in second.runs] == [ids[1]]
    assert second.cursor > first.cursor
    # Acknowledged: the feed holds nothing more, and watches nothing more.
    last = page_of(await feeds.poll(feed, second.cursor, timeout=0))
    assert last.runs == () and last.cursor == second.cursor
    assert feeds.runs == 0 and feeds.waiters.watched == 0


async def test_a_cursor_the_feed_never_gave_is_refused(feeds: Feeds) -> None:
    # A feed made again under the same id (after a restart) starts elsewhere, so
    # the old cursor cannot acknowledge ends the client has not seen.
    feed_id = str(uuid.uuid4())
    old, _ = feeds.open(feed_id) or pytest.fail("no feed")
    run_id = uuid.uuid4()
    feeds.watch(old, [run_id])
    feeds.waiters.notify([ended(run_id)])
    cursor = page_of(await feeds.poll(old, 0, timeout=0)).cursor
    feeds._drop(old)
    new, made = feeds.open(feed_id) or pytest.fail("no feed")
    assert made and new.start != old.start
    with pytest.raises(ValueError, match="never gave"):
        await feeds.poll(new, cursor, timeout=0)
    with pytest.raises(ValueError, match="never gave"):
        await feeds.poll(new, new.start + 1, timeout=0)


async def test_a_poll_waits_for_an_end_then_answers_at_once(
    feeds: Feeds, autojump_clock: trio.testing.MockClock
) -> None:
    feed, _ = feeds.open(str(uuid.uuid4())) or pytest.fail("no feed")
    run_id = uuid.uuid4()
    feeds.watch(feed, [run_id])
    began = trio.current_time()
    empty = page_of(await feeds.poll(feed, 0, timeout=5))
    assert empty.runs == () and trio.current_time() - began == pytest.approx(5)

    async def end_later() -> None:
        await trio.sleep(2)
        feeds.waiters.notify([ended(run_id)])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(end_later)
        began = trio.current_time()
        page = page_of(await feeds.poll(feed, empty.cursor, timeout=30))
    assert [r.id for r in page.runs] == [run_id]
    assert trio.current_time() - began == pytest.approx(2)


async def test_stopping_answers_a_waiting_poll(
    feeds: Feeds, autojump_clock: trio.testing.MockClock
) -> None:
    feed, _ = feeds.open(str(uuid.uuid4())) or pytest.fail("no feed")
    feeds.watch(feed, [uuid.uuid4()])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feeds.poll, feed, 0, 30.0)
        await trio.sleep(1)
        feeds.stop()
        with trio.fail_after(0.1):
            await feeds.poll(feed, 0, 30.0)


async def test_a_feed_watches_no_more_than_its_limit(feeds: Feeds) -> None:
    feed, _ = feeds.open(str(uuid.uuid4())) or pytest.fail("no feed")
    assert feeds.watch(feed, [uuid.uuid4() for _ in range(FEED_MAX_RUNS - 1)])
    # All or nothing: a batch that does not fit is not watched at all.
    two = [uuid.uuid4(), uuid.uuid4()]
    assert not feeds.watch(feed, two)
    assert not any(run_id in feed.pending for run_id in two)
    assert feeds.watch(feed, two[:1])
    assert feeds.runs == FEED_MAX_RUNS
    feeds.unwatch(feed, two[:1])
    assert feeds.runs == FEED_MAX_RUNS - 1


async def test_a_large_end_is_named_without_its_run(feeds: Feeds) -> None:
    feed, _ = feeds.open(str(uuid.uuid4())) or pytest.fail("no feed")
    small, large = uuid.uuid4(), uuid.uuid4()
    feeds.watch(feed, [small, large])
    feeds.waiters.notify(
        [ended(small, result=b"x"), ended(large, result=b"x" * FEED_MAX_ENTRY_BYTES)]
    )
    page = page_of(await feeds.poll(feed, 0, timeout=0))
    assert [r.id for r in page.runs] == [small] and page.heavy == (large,)


async def test_a_page_holds_at_most_a_thousand_runs(feeds: Feeds) -> None:
    feed, _ = feeds.open(str(uuid.uuid4())) or pytest.fail("no feed")
    ids = [uuid.uuid4() for _ in range(FEED_PAGE_RUNS + 5)]
    feeds.watch(feed, ids)
    feeds.waiters.notify([ended(run_id) for run_id in ids])
    first = page_of(await feeds.poll(feed, 0, timeout=0))
    second = page_of(await feeds.poll(feed, first.cursor, timeout=0))
    assert len(first.runs) == FEED_PAGE_RUNS and len(second.runs) == 5
    assert [r.id for r in first.runs + second.runs] == ids


async def test_a_feed_nobody_polls_is_dropped_with_what_it_watched(
    feeds: Feeds, autojump_clock: trio.testing.MockClock
) -> None:
    idle, _ = feeds.open(str(uuid.uuid4())) or pytest.fail("no feed")
    busy, _ = feeds.open(str(uuid.uuid4())) or pytest.fail("no feed")
    feeds.watch(idle, [uuid.uuid4()])
    feeds.watch(busy, [uuid.uuid4()])
    async with trio.open_nursery() as nursery:
        # The busy feed is being polled all along; a poll in flight keeps it.
        nursery.start_soon(feeds.poll, busy, 0, FEED_IDLE_SECONDS + 60)
        await trio.sleep(FEED_IDLE_SECONDS + 20)
        feeds.open(str(uuid.uuid4()))  # a sweep happens as feeds are opened
        assert feeds.get(idle.id) is None and feeds.get(busy.id) is busy
        assert feeds.runs == 1 and feeds.waiters.watched == 1
        nursery.cancel_scope.cancel()


# --- the client's bookkeeping, alone ----------------------------------------------------


def test_the_client_takes_ends_of_covered_runs_once() -> None:
    state = FeedState()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    state.submitted([a, b], "new")
    state.submitted([c], None)  # the server did not watch this one
    assert list(state.covered) == [a, b]
    stray = uuid.uuid4()
    state.heard(FeedPage(runs=(ended(a), ended(stray)), heavy=(b,), cursor=7))
    assert state.cursor == 7 and not state.covered
    assert state.take(a) == ended(a) and state.take(a) is None
    assert state.take(b) is HEAVY
    assert state.take(stray) is None  # not covered: not kept


def test_a_feed_made_anew_means_the_earlier_runs_are_not_watched() -> None:
    state = FeedState()
    old, new = uuid.uuid4(), uuid.uuid4()
    state.submitted([old], "new")
    state.cursor = 41
    state.submitted([new], "new")
    assert list(state.covered) == [new] and state.cursor == 0 and state.generation == 2
    state.lost()
    assert not state.covered and state.generation == 3


def test_the_client_holds_a_bounded_number_of_untaken_ends() -> None:
    state = FeedState()
    ids = [uuid.uuid4() for _ in range(MAX_HELD + 3)]
    state.submitted(ids, "watching")
    state.heard(FeedPage(runs=tuple(ended(i) for i in ids), cursor=1))
    assert len(state.ended) == MAX_HELD
    assert state.take(ids[0]) is None and state.take(ids[-1]) is not None


# --- server and client together, in this process -------------------------------------------


@task
async def double(x: int) -> int:
    return 2 * x


@task
async def fails(x: int) -> int:
    raise KeyError(x)


@task
async def sized(n: int) -> bytes:
    return b"y" * n


def waits(server: TaskServer) -> dict[str, float]:
    """The server's wait requests so far, by kind (its metrics)."""
    assert server.state is not None
    counter = server.state.metrics.registry
    found = {}
    for metric in counter.collect():
        if metric.name == "trio_taskworker_wait_requests":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    found[sample.labels["kind"]] = sample.value
    return found


async def start_worker(nursery: trio.Nursery, server: TaskServer, *tasks: Any) -> None:
    worker = TaskWorker(*tasks, api_url=str(server.url), handle_signals=False, limit=50)
    await nursery.start(worker.start)


async def test_results_one_by_one_share_the_feed(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    await start_worker(nursery, server, double)
    async with open_client(server.url):
        futs = await double.map(range(300))
        values = [await f.result(timeout=30) for f in futs]
    assert values == [2 * i for i in range(300)]
    counted = waits(server)
    assert counted.get("run", 0) == 0
    assert 1 <= counted["feed"] < 100


async def test_failures_and_large_results_come_through_the_feed(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    await start_worker(nursery, server, fails, sized)
    async with open_client(server.url):
        failing = await fails.delay(3)
        large = await sized.delay(100_000)  # past the inline limit: a blob
        medium = await sized.delay(FEED_MAX_ENTRY_BYTES)  # inline, too large for a page
        with pytest.raises(KeyError):
            await failing.result(timeout=30)
        assert await large.result(timeout=30) == b"y" * 100_000
        assert await medium.result(timeout=30) == b"y" * FEED_MAX_ENTRY_BYTES
        # Asked again, each is read from the server: the feed's copy was taken.
        assert await medium.result(timeout=30) == b"y" * FEED_MAX_ENTRY_BYTES
    assert waits(server).get("run", 0) >= 2  # the heavy one, and the repeat


async def test_many_concurrent_callers_each_get_their_own_result(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    await start_worker(nursery, server, double)
    got: dict[int, int] = {}

    async def await_one(i: int, fut: Any) -> None:
        got[i] = await fut.result(timeout=30)

    async with open_client(server.url):
        futs = await double.map(range(200))
        async with trio.open_nursery() as callers:
            for i, fut in enumerate(futs):
                callers.start_soon(await_one, i, fut)
    assert got == {i: 2 * i for i in range(200)}
    assert waits(server).get("run", 0) == 0


async def test_a_feed_the_server_lost_falls_back_to_waiting_run_by_run(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    assert server.state is not None
    async with open_client(server.url):
        futs = await double.map(range(20))
        # Lost as after a restart or idle time: the poll answers 404.
        feeds = server.state.feeds
        (feed,) = feeds._feeds.values()
        feeds._drop(feed)
        await start_worker(nursery, server, double)
        assert [await f.result(timeout=30) for f in futs] == [2 * i for i in range(20)]
        assert waits(server)["run"] == 20
        # The next submission makes the feed anew, and it serves again.
        more = await double.map(range(10))
        assert [await f.result(timeout=30) for f in more] == [2 * i for i in range(10)]
        assert waits(server)["run"] == 20


async def test_a_timeout_while_another_caller_polls_returns_in_time(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    # No worker serves the task: nothing ends.
    async with open_client(server.url):
        slow, quick = await double.map([1, 2])
        async with trio.open_nursery() as callers:
            callers.start_soon(slow.result)  # the poller, for up to 30 s a poll
            await trio.sleep(0.2)
            with trio.fail_after(5):
                with pytest.raises(TimeoutError, match="still SCHEDULED"):
                    await quick.result(timeout=0.5)
            callers.cancel_scope.cancel()
        # The cancelled poller left the feed to the next caller.
        await start_worker(nursery, server, double)
        assert await quick.result(timeout=30) == 4
        assert await slow.result(timeout=30) == 2


async def test_a_cache_hit_ends_through_the_feed(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    await start_worker(nursery, server, double)
    cached = double.with_options(cache_key_fn=lambda *a, **k: "same")
    async with open_client(server.url):
        assert await (await cached.delay(5)).result(timeout=30) == 10
        hit = await cached.delay(6)
        assert await hit.result(timeout=30) == 10
        run = await hit.wait()
        assert run.message is not None and run.message.startswith("cached")


async def test_the_feed_routes_answer_as_documented(server: TaskServer) -> None:
    body = {"runs": [{"task_key": "mod:fn"}]}
    feed = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=str(server.url)) as http:
        bad = await http.post("/runs", params={"feed": "not-a-uuid"}, json=body)
        assert bad.status_code == 422 and "feed must be a UUID" in bad.json()["detail"]
        first = await http.post("/runs", params={"feed": feed}, json=body)
        second = await http.post("/runs", params={"feed": feed}, json=body)
        plain = await http.post("/runs", json=body)
        assert first.headers["feed"] == "new" and second.headers["feed"] == "watching"
        assert "feed" not in plain.headers
        check_against_spec("/runs", "post", first)
        poll = await http.get(f"/feeds/{feed}", params={"timeout": 0})
        check_against_spec("/feeds/{feed_id}", "get", poll)
        assert poll.json()["runs"] == [] and poll.json()["cursor"] > 0
        cancel = await http.post(f"/runs/{first.json()['ids'][0]}/cancel")
        assert cancel.json()["state"] == "CANCELLED"
        poll = await http.get(
            f"/feeds/{feed}", params={"timeout": 5, "after": poll.json()["cursor"]}
        )
        assert [r["id"] for r in poll.json()["runs"]] == first.json()["ids"]
        for params in ({"after": "-1"}, {"timeout": "nan"}, {"after": str(2**63)}):
            refused = await http.get(f"/feeds/{feed}", params=params)
            assert refused.status_code == 422, params
            check_against_spec("/feeds/{feed_id}", "get", refused)
        unknown = await http.get(f"/feeds/{uuid.uuid4()}")
        stale = await http.get(f"/feeds/{feed}", params={"after": 1})
        malformed = await http.get("/feeds/x" * 40)
        for answer in (unknown, stale):
            assert answer.status_code == 404
            check_against_spec("/feeds/{feed_id}", "get", answer)
        assert malformed.status_code in (404, 422)
        # A replayed idempotency key gives the earlier runs, which the feed does not watch.
        key = {"idempotency-key": "k1"}
        once = await http.post("/runs", params={"feed": feed}, json=body, headers=key)
        replay = await http.post("/runs", params={"feed": feed}, json=body, headers=key)
        assert once.headers["feed"] == "watching" and "feed" not in replay.headers
        assert replay.json() == once.json()


async def test_the_blocking_client_waits_without_a_feed(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    await start_worker(nursery, server, double)
    async with open_client(server.url):
        value = await trio.to_thread.run_sync(
            lambda: double.delay_sync(21).result_sync(timeout=30)
        )
    assert value == 42
    assert waits(server)["run"] == 1 and "feed" not in waits(server)


def test_client_for_has_a_feed_per_client() -> None:
    async def main() -> tuple[str, str]:
        shared = client_for("http://127.0.0.1:1")
        async with open_client("http://127.0.0.1:1") as opened:
            return shared._feed.feed_id, opened._feed.feed_id

    first, second = trio.run(main)
    assert first != second
