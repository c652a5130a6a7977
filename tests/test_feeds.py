"""Feeds of ended runs: the server's bookkeeping, the client's, and both together.

A caller awaiting results one by one (``[await f.result() for f in futs]``)
asks its client's feed to watch that run and the next ones the client
submitted, and shares one long-poll of the feed with every other waiting
caller; a run no feed watches, or one whose feed the server lost, is waited
for alone.
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
from trio_taskworker._feed import HEAVY, MAX_HELD, MAX_UNWATCHED, FeedState
from trio_taskworker._models import MAX_WATCH_IDS, FeedPage, FeedWatched, TaskRun
from trio_taskworker._serialization import from_json
from trio_taskworker._server import _feeds
from trio_taskworker._server._dispatch import Waiters
from trio_taskworker._server._feeds import (
    FEED_IDLE_SECONDS,
    FEED_MAX_ENTRY_BYTES,
    FEED_MAX_RUNS,
    FEED_PAGE_RUNS,
    Feed,
    Feeds,
)
from trio_taskworker._server._store import StoreUnavailable

from .helpers import wait_until
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


OWNER = "owner"


@pytest.fixture
def feeds() -> Feeds:
    return Feeds(Waiters(), trio.current_time)


def open_feed(feeds: Feeds, owner: str = OWNER) -> Feed:
    feed = feeds.open(str(uuid.uuid4()), owner)
    assert feed is not None
    return feed


# --- the server's feeds, alone --------------------------------------------------------


async def test_a_feed_hears_the_ends_of_the_runs_it_watches(feeds: Feeds) -> None:
    feed = open_feed(feeds)
    assert feeds.open(feed.id, OWNER) is feed
    ids = [uuid.uuid4() for _ in range(3)]
    assert feeds.watch(feed, ids) == ids
    assert feeds.watch(feed, ids) == []  # watched already
    # A run it does not watch, and one not ended yet, are not in the page.
    feeds.waiters.notify([ended(ids[0]), ended(uuid.uuid4()), ended(ids[2])])
    feeds.waiters.notify([attrs.evolve(ended(ids[1]), state=TaskRunState.RUNNING)])
    # An ended run leaves the waiters at once (a replica's poll no longer reads it).
    assert feeds.waiters.watched_ids() == [ids[1]]
    page = page_of(await feeds.poll(feed, 0, timeout=0))
    assert [run.id for run in page.runs] == [ids[0], ids[2]]
    assert page.heavy == ()
    assert feeds.runs == 3


async def test_an_end_is_kept_without_its_parameters_whoever_never_polls(feeds: Feeds) -> None:
    feed = open_feed(feeds)
    ids = [uuid.uuid4() for _ in range(50)]
    feeds.watch(feed, ids)
    big = b"p" * 65536
    feeds.waiters.notify([ended(i, parameters=big, result=b"r") for i in ids])
    # Kept as JSON without the parameters, not as the runs the waiters were handed.
    assert all(data is not None and len(data) < 2000 for _, _, data in feed.log)
    assert 0 < feeds.held_bytes < 50 * 2000
    page = page_of(await feeds.poll(feed, 0, timeout=0))
    assert all(r.parameters is None and r.result == b"r" for r in page.runs)


async def test_a_page_lost_on_the_way_is_sent_again_until_acknowledged(feeds: Feeds) -> None:
    feed = open_feed(feeds)
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
    assert feeds.runs == 0 and feeds.held_bytes == 0 and feeds.waiters.watched == 0


async def test_a_feed_is_found_only_by_its_owner_and_epoch(feeds: Feeds) -> None:
    feed = open_feed(feeds)
    assert feeds.get(feed.id, OWNER, feed.epoch) is feed
    assert feeds.get(feed.id, "someone else", feed.epoch) is None
    assert feeds.get(feed.id, OWNER, feed.epoch + 1) is None
    assert feeds.open(feed.id, "someone else") is None
    # Made again under the same id (after a restart), it has another epoch.
    feeds._drop(feed)
    again = feeds.open(feed.id, OWNER)
    assert again is not None and again.epoch != feed.epoch
    assert feeds.get(feed.id, OWNER, feed.epoch) is None


async def test_a_cursor_the_feed_never_gave_is_refused(feeds: Feeds) -> None:
    feed = open_feed(feeds)
    with pytest.raises(ValueError, match="never gave"):
        await feeds.poll(feed, 1, timeout=0)
    run_id = uuid.uuid4()
    feeds.watch(feed, [run_id])
    feeds.waiters.notify([ended(run_id)])
    cursor = page_of(await feeds.poll(feed, 0, timeout=0)).cursor
    assert cursor == 1
    with pytest.raises(ValueError, match="never gave"):
        await feeds.poll(feed, cursor + 1, timeout=0)


async def test_a_poll_waits_for_an_end_then_answers_at_once(
    feeds: Feeds, autojump_clock: trio.testing.MockClock
) -> None:
    feed = open_feed(feeds)
    run_id = uuid.uuid4()
    feeds.watch(feed, [run_id])
    began = trio.current_time()
    empty = page_of(await feeds.poll(feed, 0, timeout=5))
    assert empty.runs == () and trio.current_time() - began == pytest.approx(5)

    answered: list[FeedPage] = []

    async def poll() -> None:
        answered.append(page_of(await feeds.poll(feed, empty.cursor, timeout=30)))

    async with trio.open_nursery() as nursery:
        # Two polls in flight at once (a repeat after a timeout): both are answered.
        nursery.start_soon(poll)
        nursery.start_soon(poll)
        await trio.sleep(2)
        began = trio.current_time()
        feeds.waiters.notify([ended(run_id)])
    assert [[r.id for r in page.runs] for page in answered] == [[run_id], [run_id]]
    assert trio.current_time() == began


async def test_stopping_answers_a_waiting_poll(
    feeds: Feeds, autojump_clock: trio.testing.MockClock
) -> None:
    feed = open_feed(feeds)
    feeds.watch(feed, [uuid.uuid4()])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feeds.poll, feed, 0, 30.0)
        await trio.sleep(1)
        began = trio.current_time()
        feeds.stop()
    assert trio.current_time() == began
    with trio.fail_after(0.1):
        await feeds.poll(feed, 0, 30.0)


async def test_a_feed_watches_no_more_than_its_limit(
    feeds: Feeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = open_feed(feeds)
    feeds.watch(feed, [uuid.uuid4() for _ in range(FEED_MAX_RUNS - 1)])
    # All or nothing: a batch that does not fit is not watched at all.
    two = [uuid.uuid4(), uuid.uuid4()]
    with pytest.raises(OverflowError, match="at most"):
        feeds.watch(feed, two)
    assert not any(run_id in feed.pending for run_id in two)
    assert feeds.watch(feed, two[:1]) == two[:1]
    assert feeds.runs == FEED_MAX_RUNS
    feeds.unwatch(feed, two[:1])
    assert feeds.runs == FEED_MAX_RUNS - 1
    # All feeds together have a bound of their own.
    monkeypatch.setattr(_feeds, "MAX_FEED_RUNS_TOTAL", FEED_MAX_RUNS + 5)
    with pytest.raises(OverflowError):
        feeds.watch(open_feed(feeds), [uuid.uuid4() for _ in range(7)])


async def test_large_ends_and_ends_past_the_bytes_bound_are_named_without_the_run(
    feeds: Feeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = open_feed(feeds)
    small, large = uuid.uuid4(), uuid.uuid4()
    feeds.watch(feed, [small, large])
    feeds.waiters.notify(
        [ended(small, result=b"x"), ended(large, result=b"x" * FEED_MAX_ENTRY_BYTES)]
    )
    page = page_of(await feeds.poll(feed, 0, timeout=0))
    assert [r.id for r in page.runs] == [small] and page.heavy == (large,)
    monkeypatch.setattr(_feeds, "MAX_FEED_BYTES", feeds.held_bytes + 10)
    late = uuid.uuid4()
    feeds.watch(feed, [late])
    feeds.waiters.notify([ended(late, result=b"x")])
    page = page_of(await feeds.poll(feed, page.cursor, timeout=0))
    assert page.runs == () and page.heavy == (late,)


async def test_a_page_holds_at_most_a_thousand_runs(feeds: Feeds) -> None:
    feed = open_feed(feeds)
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
    idle, busy = open_feed(feeds), open_feed(feeds)
    feeds.watch(idle, [uuid.uuid4()])
    feeds.watch(busy, [uuid.uuid4()])
    async with trio.open_nursery() as nursery:
        # The busy feed is being polled all along; a poll in flight keeps it.
        nursery.start_soon(feeds.poll, busy, 0, FEED_IDLE_SECONDS + 60)
        await trio.sleep(FEED_IDLE_SECONDS + 20)
        open_feed(feeds)  # a sweep happens as feeds are opened
        assert feeds.get(idle.id, OWNER, idle.epoch) is None
        assert feeds.get(busy.id, OWNER, busy.epoch) is busy
        assert feeds.runs == 1 and feeds.waiters.watched == 1
        nursery.cancel_scope.cancel()


async def test_one_key_may_hold_only_so_many_feeds(feeds: Feeds) -> None:
    mine = [open_feed(feeds, "mine") for _ in range(_feeds.MAX_FEEDS_PER_OWNER)]
    assert feeds.open(str(uuid.uuid4()), "mine") is None
    assert feeds.open(mine[0].id, "mine") is mine[0]  # its own feeds it still reaches
    assert open_feed(feeds, "theirs") is not None
    feeds._drop(mine[0])
    assert feeds.open(str(uuid.uuid4()), "mine") is not None


# --- the client's bookkeeping, alone ----------------------------------------------------


def test_an_end_heard_before_the_watch_answer_is_kept() -> None:
    # Another caller's poll can bring the end of a run that the watch request
    # in flight found ended, before that request's answer arrives.
    state = FeedState()
    a, b = uuid.uuid4(), uuid.uuid4()
    state.submitted([a, b])
    assert state.to_watch(a) == [a, b]
    state.heard(FeedPage(runs=(ended(a),), cursor=1))
    state.watched([a, b], FeedWatched(epoch=3))
    assert list(state.covered) == [b]  # a is not waited for again
    assert state.take(a) == ended(a)


def test_a_watch_names_the_run_and_the_oldest_others_not_watched() -> None:
    state = FeedState()
    ids = [uuid.uuid4() for _ in range(MAX_WATCH_IDS + 10)]
    state.submitted(ids)
    first = state.to_watch(ids[5])
    assert first == [ids[5], *ids[:5], *ids[6:MAX_WATCH_IDS]]
    assert list(state.unwatched) == ids[MAX_WATCH_IDS:]
    assert list(state.asking) == first
    state.not_asked()  # no answer: asked again later
    assert not state.asking and set(state.unwatched) == set(ids)
    state.to_watch(ids[0])
    state.refused()  # the feed is full: none is watched, nor asked again
    assert not state.asking and ids[0] not in state.unwatched
    state.submitted([uuid.uuid4() for _ in range(MAX_UNWATCHED)])
    assert len(state.unwatched) == MAX_UNWATCHED  # the oldest are forgotten
    assert ids[-1] not in state.unwatched


def test_the_client_takes_ends_of_covered_runs_once() -> None:
    state = FeedState()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    state.watched([a, b, c], FeedWatched(epoch=5, refused=(c,)))
    assert list(state.covered) == [a, b] and state.epoch == 5
    stray = uuid.uuid4()
    state.heard(FeedPage(runs=(ended(a), ended(stray)), heavy=(b,), cursor=7))
    assert state.cursor == 7 and not state.covered
    assert state.take(a) == ended(a) and state.take(a) is None
    assert state.take(b) is HEAVY
    assert state.take(stray) is None  # not covered: not kept


def test_a_feed_made_anew_means_the_earlier_runs_are_not_watched() -> None:
    state = FeedState()
    old, new = uuid.uuid4(), uuid.uuid4()
    state.watched([old], FeedWatched(epoch=5))
    state.cursor = 41
    state.watched([new], FeedWatched(epoch=6))
    assert list(state.covered) == [new] and state.cursor == 0 and state.epoch == 6
    assert state.generation == 1
    state.lost()
    assert not state.covered and state.epoch is None and state.generation == 2


def test_the_client_holds_a_bounded_number_of_untaken_ends() -> None:
    state = FeedState()
    ids = [uuid.uuid4() for _ in range(MAX_HELD + 3)]
    state.watched(ids, FeedWatched(epoch=1))
    state.heard(FeedPage(runs=tuple(ended(i) for i in ids), cursor=1))
    assert len(state.ended) == MAX_HELD
    assert state.take(ids[0]) is None and state.take(ids[-1]) is not None


# --- server and client together, in this process -------------------------------------------

flaky_calls: dict[int, int] = {}


@task
async def double(x: int) -> int:
    return 2 * x


@task
async def fails(x: int) -> int:
    raise KeyError(x)


@task
async def flaky(x: int) -> int:
    flaky_calls[x] = flaky_calls.get(x, 0) + 1
    if flaky_calls[x] == 1:
        raise ValueError("first call fails")
    return x


@task
async def sized(n: int) -> bytes:
    return b"y" * n


def waits(server: TaskServer) -> dict[str, float]:
    """The server's wait requests so far, by kind (its metrics)."""
    assert server.state is not None
    found = {}
    for metric in server.state.metrics.registry.collect():
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
        futs = await double.map(range(3000))
        values = [await f.result(timeout=30) for f in futs]
    assert values == [2 * i for i in range(3000)]
    counted = waits(server)
    assert counted.get("run", 0) == 0
    assert 3 <= counted["feed"] < 3000 // 2  # a page per poll, not a request per run
    assert server.state is not None and server.state.feeds.runs <= FEED_PAGE_RUNS


async def test_failures_and_large_results_come_through_the_feed(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    await start_worker(nursery, server, fails, sized)
    async with open_client(server.url):
        failing = await fails.delay(3)
        large = await sized.delay(100_000)  # past the inline limit: a blob
        medium = await sized.delay(FEED_MAX_ENTRY_BYTES)  # inline, too large for a page
        small = await sized.delay(10)
        assert await small.result(timeout=30) == b"y" * 10
        assert waits(server).get("run", 0) == 0
        with pytest.raises(KeyError):
            await failing.result(timeout=30)
        assert await large.result(timeout=30) == b"y" * 100_000
        assert await medium.result(timeout=30) == b"y" * FEED_MAX_ENTRY_BYTES
        # The failure is read again (a retry could have undone it), and the
        # heavy one is read: the feed only named it.
        assert waits(server)["run"] == 2
        assert await medium.result(timeout=30) == b"y" * FEED_MAX_ENTRY_BYTES
        assert waits(server)["run"] == 3  # taken already: read from the server


async def test_a_retry_by_request_after_the_end_was_heard_gives_the_new_end(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    flaky_calls.clear()
    await start_worker(nursery, server, flaky)
    async with open_client(server.url) as client, httpx.AsyncClient() as http:
        first, second = await flaky.map([1, 2])
        # Awaiting the second has the feed watch the first too, and hear its end.
        with pytest.raises(ValueError):
            await second.result(timeout=30)
        await wait_until(lambda: first.task_run_id in client._feed.ended)
        retried = await http.post(f"{server.url}/runs/{first.task_run_id}/retry")
        assert retried.status_code == 200
        assert await first.result(timeout=30) == 1


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
    feeds = server.state.feeds
    await start_worker(nursery, server, double)
    async with open_client(server.url) as client:
        futs = await double.map(range(20))
        assert await futs[0].result(timeout=30) == 0
        # Lost as after a restart or idle time: the next poll answers 404.
        (feed,) = feeds._feeds.values()
        feeds._drop(feed)
        assert [await f.result(timeout=30) for f in futs[1:]] == [2 * i for i in range(1, 20)]
        assert client._feed.epoch is None
        # New runs ask for the feed again, which is made anew and serves them.
        before = waits(server).get("run", 0)
        more = await double.map(range(10))
        assert [await f.result(timeout=30) for f in more] == [2 * i for i in range(10)]
        assert waits(server).get("run", 0) == before
        assert client._feed.epoch is not None and client._feed.epoch != feed.epoch


async def test_a_feed_made_anew_behind_the_clients_back_is_noticed(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    assert server.state is not None
    feeds = server.state.feeds
    async with open_client(server.url) as client:
        old = await double.map(range(5))
        with pytest.raises(TimeoutError):  # no worker yet: this has the feed watch all 5
            await old[0].result(timeout=0.5)
        assert len(client._feed.covered) == 5
        (feed,) = feeds._feeds.values()
        feeds._drop(feed)
        # The next watch makes the feed anew, with another epoch: the client
        # learns that the 5 are watched no more.
        new = await double.map(range(3))
        with pytest.raises(TimeoutError):
            await new[0].result(timeout=0.5)
        assert set(client._feed.covered) == {f.task_run_id for f in new}
        await start_worker(nursery, server, double)
        assert [await f.result(timeout=30) for f in old + new] == [0, 2, 4, 6, 8, 0, 2, 4]


async def test_a_timeout_while_another_caller_polls_returns_in_time(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    # No worker serves the task: nothing ends.
    async with open_client(server.url) as client:
        slow, quick = await double.map([1, 2])
        async with trio.open_nursery() as callers:
            callers.start_soon(slow.result)  # the poller, for up to 30 s a poll
            await wait_until(lambda: client._feed.polling)
            with trio.fail_after(5):
                with pytest.raises(TimeoutError, match="still SCHEDULED"):
                    await quick.result(timeout=0.5)
            callers.cancel_scope.cancel()
        # The cancelled poller left the feed to the next caller.
        assert not client._feed.polling
        await start_worker(nursery, server, double)
        assert await quick.result(timeout=30) == 4
        assert await slow.result(timeout=30) == 2


async def test_a_failed_watch_is_asked_again_by_the_next_wait(
    nursery: trio.Nursery, server: TaskServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.state is not None
    state = server.state

    async def unavailable(self: Any, ids: Any) -> Any:
        raise StoreUnavailable("disk full")

    monkeypatch.setattr(type(state.store), "run_ends", unavailable)
    async with open_client(server.url) as client:
        futs = await double.map([1, 2])
        with pytest.raises(Exception, match="disk full"):
            await futs[0].result(timeout=1)
        # Asked again next time (the server may watch them already: no harm).
        assert set(client._feed.unwatched) == {f.task_run_id for f in futs}
        monkeypatch.undo()
        await start_worker(nursery, server, double)
        assert [await f.result(timeout=30) for f in futs] == [2, 4]
        assert waits(server).get("run", 0) == 0


async def test_a_watch_that_failed_before_it_read_is_made_good_by_the_next(
    server: TaskServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.state is not None
    store_type = type(server.state.store)
    run_ends = store_type.run_ends
    failures = [StoreUnavailable("disk full")]

    async def fails_once(self: Any, ids: Any) -> Any:
        if failures:
            raise failures.pop()
        return await run_ends(self, ids)

    monkeypatch.setattr(store_type, "run_ends", fails_once)
    body = {"runs": [{"task_key": "mod:fn"}, {"task_key": "mod:fn"}]}
    feed = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=str(server.url)) as http:
        ids = (await http.post("/runs", json=body)).json()["ids"]
        # Ended before any watch: only a read can tell.
        assert (await http.post(f"/runs/{ids[0]}/cancel")).status_code == 200
        failed = await http.post(f"/feeds/{feed}/watch", json={"ids": ids})
        assert failed.status_code == 503
        again = await http.post(f"/feeds/{feed}/watch", json={"ids": ids})
        assert again.status_code == 200
        epoch = again.json()["epoch"]
        page = await http.get(f"/feeds/{feed}", params={"epoch": epoch, "timeout": 0})
        assert [r["id"] for r in page.json()["runs"]] == ids[:1]
        assert server.state.feeds.runs == 2  # the other is still watched


@pytest.mark.parametrize("status", [404, 405, 409, 501])
def test_a_server_without_feeds_or_room_makes_the_client_wait_alone(status: int) -> None:
    from trio_taskworker._client import _op_watch_feed

    op = _op_watch_feed("f", [uuid.uuid4()])
    call = next(op)
    assert call.path == "/feeds/f/watch"
    with pytest.raises(StopIteration) as done:
        op.send(httpx.Response(status, json={"detail": "no"}))
    assert done.value.value is None


async def test_a_cache_hit_ends_through_the_feed(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    await start_worker(nursery, server, double)
    cached = double.with_options(cache_key_fn=lambda *a, **k: "same")
    async with open_client(server.url):
        # Alone, a run is waited for in one request of its own.
        assert await (await cached.delay(5)).result(timeout=30) == 10
        assert waits(server) == {"run": 1}
        hit, other = await cached.delay(6), await double.delay(7)
        assert await hit.result(timeout=30) == 10
        assert await other.result(timeout=30) == 14
        assert waits(server)["run"] == 1 and waits(server)["feed"] >= 1
        run = await hit.wait()
        assert run.message is not None and run.message.startswith("cached")


async def test_the_feed_routes_answer_as_documented(server: TaskServer) -> None:
    body = {"runs": [{"task_key": "mod:fn"}, {"task_key": "mod:fn"}]}
    feed = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=str(server.url)) as http:
        ids = (await http.post("/runs", json=body)).json()["ids"]
        unknown_run = str(uuid.uuid4())
        watched = await http.post(f"/feeds/{feed}/watch", json={"ids": [*ids, unknown_run]})
        check_against_spec("/feeds/{feed_id}/watch", "post", watched)
        assert watched.status_code == 200 and watched.json()["refused"] == [unknown_run]
        metrics = (await http.get("/metrics")).text
        assert "\ntrio_taskworker_feeds 1.0\n" in metrics
        assert "\ntrio_taskworker_feed_runs 2.0\n" in metrics
        epoch = watched.json()["epoch"]
        poll = await http.get(f"/feeds/{feed}", params={"epoch": epoch, "timeout": 0})
        check_against_spec("/feeds/{feed_id}", "get", poll)
        assert poll.json()["runs"] == [] and poll.json()["cursor"] == 0
        cancel = await http.post(f"/runs/{ids[0]}/cancel")
        assert cancel.json()["state"] == "CANCELLED"
        poll = await http.get(f"/feeds/{feed}", params={"epoch": epoch, "timeout": 5})
        assert [r["id"] for r in poll.json()["runs"]] == ids[:1]
        for params in ({"after": "-1"}, {"timeout": "nan"}, {"epoch": str(2**54)}):
            refused = await http.get(f"/feeds/{feed}", params={"epoch": epoch, **params})
            assert refused.status_code == 422, params
            check_against_spec("/feeds/{feed_id}", "get", refused)
        for bad in (
            await http.post(f"/feeds/{feed}/watch", json={"ids": ["x"]}),
            await http.post(f"/feeds/{feed}/watch", json={"ids": [unknown_run] * 1001}),
            await http.post("/feeds/not-a-uuid/watch", json={"ids": []}),
            await http.get("/feeds/" + "x" * 40),
        ):
            assert bad.status_code == 422, bad.text
        gone = [
            await http.get(f"/feeds/{uuid.uuid4()}", params={"epoch": epoch}),
            await http.get(f"/feeds/{feed}", params={"epoch": epoch + 1}),
            await http.get(f"/feeds/{feed}", params={"epoch": epoch, "after": 5}),
            # Another key (or none) does not reach this feed.
            await http.get(
                f"/feeds/{feed}", params={"epoch": epoch}, headers={"authorization": "Bearer x"}
            ),
        ]
        for answer in gone:
            assert answer.status_code == 404, answer.text
            check_against_spec("/feeds/{feed_id}", "get", answer)
        taken = await http.post(
            f"/feeds/{feed}/watch", json={"ids": ids}, headers={"authorization": "Bearer x"}
        )
        assert taken.status_code == 409
        check_against_spec("/feeds/{feed_id}/watch", "post", taken)


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


def test_each_client_has_a_feed_of_its_own() -> None:
    async def main() -> tuple[str, str]:
        shared = client_for("http://127.0.0.1:1")
        async with open_client("http://127.0.0.1:1") as opened:
            return shared._feed.feed_id, opened._feed.feed_id

    first, second = trio.run(main)
    assert first != second
