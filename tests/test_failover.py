"""Several server URLs (replicas of one server): clients and workers use the
first that answers and fail over to the next."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from trio_taskworker import (
    ConfigurationError,
    ServerError,
    ServerUnavailable,
    SyncClient,
    TaskRunState,
    TaskServer,
    TaskWorker,
    TaskWorkerClient,
    open_client,
    task,
)
from trio_taskworker._client import (
    RETRY_DELAYS,
    answering_url,
    api_url_from_env,
    api_urls,
    normalize_api_url,
    shared_client,
)
from trio_taskworker._models import CreatedRuns
from trio_taskworker._serialization import to_json

from . import e2e_tasks as t
from .conftest import TESTS, Proc, _env, cli, free_port, start_server, start_worker


@task
async def add(x: int, y: int = 1) -> int:
    return x + y


def closed_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


# --- the parser ------------------------------------------------------------------------


def test_a_list_of_urls_is_split_and_normalized() -> None:
    assert api_urls(" http://a:1/ ,, https://b/x/ ,") == ("http://a:1", "https://b/x")
    assert normalize_api_url("http://a:1/, https://b/x") == "http://a:1,https://b/x"
    # One URL is what it always was.
    assert api_urls("http://127.0.0.1:4200/") == ("http://127.0.0.1:4200",)
    assert normalize_api_url("http://127.0.0.1:4200/") == "http://127.0.0.1:4200"


def test_the_environment_may_list_several(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_TASKWORKER_API_URL", "http://a:1, http://b:2/")
    assert api_url_from_env() == "http://a:1,http://b:2"
    monkeypatch.setenv("TRIO_TASKWORKER_API_URL", "  ")
    assert api_url_from_env() == "http://127.0.0.1:4200"


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("", "no server URL in ''"),
        (" , ,", "no server URL in ' , ,'"),
        ("ftp://a", "'ftp://a'"),
        ("http://a, 127.0.0.1:4200", "'127.0.0.1:4200'"),
        ("http://a,http://", "'http:'"),
        ("http://a:port", "'http://a:***'"),
        ("http://a,http://user:s3cret@b:port", "'http://***@b:***'"),
        # A comma in a password cuts the URL in two: neither half may show it.
        ("http://user:pa,ss@b:4200", "'http://user:***'"),
        ("http://a,ss@b:4200", "'***@b:4200'"),
    ],
)
def test_a_bad_item_is_refused_in_one_line(value: str, named: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        api_urls(value)
    message = str(caught.value)
    assert named in message and "\n" not in message and "s3cret" not in message
    with pytest.raises(ConfigurationError):
        TaskWorker(add, api_url=value or ",")


async def test_one_list_is_one_client_however_it_is_spelled() -> None:
    first = shared_client("http://127.0.0.1:1, http://127.0.0.1:2/")
    assert shared_client("http://127.0.0.1:1,http://127.0.0.1:2") is first
    assert first.api_url == "http://127.0.0.1:1,http://127.0.0.1:2"
    assert shared_client("http://127.0.0.1:2,http://127.0.0.1:1") is not first


# --- HTTP, over a fake network -----------------------------------------------------------


class Network:
    """A MockTransport: which hosts refuse connections or drop answers, and what was sent."""

    def __init__(
        self,
        refuse: set[str] = set(),  # noqa: B006
        drop: set[str] = set(),  # noqa: B006
        unavailable: set[str] = set(),  # noqa: B006
    ) -> None:
        self.refuse, self.drop, self.unavailable = refuse, drop, unavailable
        self.sent: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.sent.append(host)
        if host in self.refuse:
            raise httpx.ConnectError("refused", request=request)
        if host in self.drop:  # it arrived, and the answer was lost
            raise httpx.ReadError("connection reset", request=request)
        if host in self.unavailable:  # cut off from the database
            return httpx.Response(503, json={"detail": "the server cannot store this now"})
        if request.url.path == "/runs" and request.method == "POST":
            return httpx.Response(201, content=to_json(CreatedRuns(ids=(uuid.UUID(int=1),))))
        return httpx.Response(200, json={"status": "ok", "host": host})

    def client(self, api_url: str) -> tuple[TaskWorkerClient, httpx.AsyncClient]:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))
        return TaskWorkerClient(api_url, http), http


async def test_calls_stay_on_the_url_that_answered(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trio_taskworker._client")
    net = Network(refuse={"a"})
    client, http = net.client("http://a,http://b,http://c")
    async with http:
        for _ in range(3):
            assert (await client.health())["host"] == "b"
        assert net.sent == ["a", "b", "b", "b"]  # "a" was tried once, then left alone
        net.refuse = {"b"}
        net.sent.clear()
        for _ in range(2):
            assert (await client.health())["host"] == "c"
        assert net.sent == ["b", "c", "c"]
    lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert lines == [  # one line per failover
        "http://a unreachable (ConnectError('refused')); trying http://b",
        "http://b unreachable (ConnectError('refused')); trying http://c",
    ]


async def test_every_url_is_tried_once_and_named_when_none_answers() -> None:
    net = Network(refuse={"a", "b"})
    client, http = net.client("http://u:s3cret@a,http://b")
    async with http:
        with pytest.raises(ServerUnavailable) as caught:
            await client.read_run(uuid.uuid4())
    assert net.sent == ["a", "b"]  # not a retry call: one round
    message = str(caught.value)
    assert message.startswith("cannot reach http://u:***@a, http://b: ConnectError")
    assert "s3cret" not in message


async def test_a_retry_call_goes_round_again_after_jittered_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = Network(refuse={"a", "b"})
    client, http = net.client("http://a,http://b")
    start = trio.current_time()
    async with http:
        with pytest.raises(ServerUnavailable, match=r"^cannot reach http://a, http://b: "):
            await client.submit([t.add.run_create((1,), {})])
    # A round of both URLs at once, then one more round after each wait.
    assert net.sent == ["a", "b"] * (len(RETRY_DELAYS) + 1)
    assert trio.current_time() - start <= sum(RETRY_DELAYS)


async def test_a_call_that_may_have_arrived_is_not_sent_twice() -> None:
    net = Network(drop={"a"})
    client, http = net.client("http://a,http://b")
    async with http:
        with pytest.raises(ServerUnavailable, match=r"^cannot reach http://a: ReadError"):
            await client.post_logs([])  # a repeat would store the records twice
        assert net.sent == ["a"]
        net.drop = {"a", "b"}  # "a" failed, so "b" is current now
        net.sent.clear()
        # A read may go to the other replica at once, but only once to each.
        with pytest.raises(ServerUnavailable, match=r"^cannot reach http://b, http://a: "):
            await client.read_run(uuid.uuid4())
        assert net.sent == ["b", "a"]


async def test_a_submission_whose_answer_was_lost_goes_to_the_next_replica(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys: list[str | None] = []
    net = Network(drop={"a"})

    def handle(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("idempotency-key"))
        return net.handle(request)

    start = trio.current_time()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        client = TaskWorkerClient("http://a,http://b", http)
        assert await client.submit([t.add.run_create((1,), {})]) == [uuid.UUID(int=1)]
    assert net.sent == ["a", "b"]
    assert keys[0] and keys[0] == keys[1]  # the same key: the database knows it
    assert trio.current_time() - start <= RETRY_DELAYS[0]  # after a jittered wait


async def test_a_replica_that_answers_503_is_passed_over_by_calls_safe_to_repeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = Network(unavailable={"a"})
    client, http = net.client("http://a,http://b")
    async with http:
        assert (await client.health())["host"] == "b"
        assert await client.submit([t.add.run_create((1,), {})]) == [uuid.UUID(int=1)]
        assert net.sent == ["a", "b", "b"]  # then it stays on b
        # A call that is not safe to repeat is not sent to another replica.
        net.unavailable, net.sent = {"b"}, []
        with pytest.raises(ServerError) as refused:
            await client.post_logs([])
        assert refused.value.status_code == 503 and net.sent == ["b"]
        # When every replica answers 503, the caller hears the 503.
        net.unavailable, net.sent = {"a", "b"}, []
        with pytest.raises(ServerError) as caught:
            await client.read_run(uuid.uuid4())
        assert caught.value.status_code == 503 and net.sent == ["b", "a"]


# --- HTTP, over real sockets -------------------------------------------------------------


async def test_a_client_skips_a_closed_port_and_gets_its_result(
    nursery: trio.Nursery, server: TaskServer
) -> None:
    worker = TaskWorker(add, api_url=str(server.url), handle_signals=False)
    await nursery.start(worker.start)
    async with open_client(f"{closed_url()},{server.url}") as client:
        fut = await add.delay(1, y=2)
        assert await fut.result(timeout=20) == 3
        assert (await client.read_run(fut.task_run_id)).state is TaskRunState.COMPLETED
    # Blocking code too, and the CLI's way of choosing one server to talk to.
    urls = f"{closed_url()},{server.url}"

    def blocking() -> tuple[str, str]:
        with SyncClient(urls) as sync:
            state = sync.read_run(fut.task_run_id).state
        return str(state), answering_url(urls)

    assert await trio.to_thread.run_sync(blocking) == ("COMPLETED", server.url)
    await worker.stop()


async def test_only_closed_ports_raise_server_unavailable_naming_them() -> None:
    one, two = closed_url(), closed_url()
    async with open_client(f"{one}, {two}") as client:
        with pytest.raises(ServerUnavailable, match=f"^cannot reach {one}, {two}: ConnectError"):
            await client.read_run(uuid.uuid4())
    with pytest.raises(ServerUnavailable, match=f"^cannot reach {one}, {two}: ConnectError"):
        await trio.to_thread.run_sync(answering_url, f"{one},{two}")


# --- workers -----------------------------------------------------------------------------


async def test_a_worker_skips_a_closed_port_and_completes_a_run(
    nursery: trio.Nursery, server: TaskServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_taskworker._subscription")
    dead = closed_url()
    worker = TaskWorker(add, api_url=f"{dead},{server.url}", handle_signals=False)
    await nursery.start(worker.start)  # returns once subscribed
    async with open_client(server.url):
        fut = await add.delay(20, y=22)
        assert await fut.result(timeout=20) == 42
        assert (await fut.wait()).state is TaskRunState.COMPLETED
    lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert lines and lines[0].startswith(f"{dead} unreachable (")
    assert lines[0].endswith(f"; trying {server.url}")
    await worker.stop()


async def test_a_worker_whose_server_goes_away_moves_to_the_other(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Two servers on two databases stand in for two replicas of one: what is
    # under test is which one the worker is connected to.
    first = TaskServer(port=0, data_dir=tmp_path / "one")
    second = TaskServer(port=0, data_dir=tmp_path / "two")
    await nursery.start(first.run)
    await nursery.start(second.run)
    worker = TaskWorker(add, api_url=f"{first.url},{second.url}", handle_signals=False)
    await nursery.start(worker.start)
    async with open_client(first.url):
        assert await (await add.delay(1)).result(timeout=20) == 2  # the first URL serves
    await first.stop()
    async with open_client(second.url):
        fut = await add.delay(2)
        assert await fut.result(timeout=20) == 3
    assert worker.status()["connected"]
    await worker.stop()
    await second.stop()


# --- end to end --------------------------------------------------------------------------

CLIENT_SCRIPT = """
from tests import e2e_tasks as t
print(t.add.delay_sync(20, y=22).result_sync(timeout=30))
"""


def run(command: list[str], urls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=_env(urls), cwd=TESTS.parent, capture_output=True, text=True, timeout=60
    )


@pytest.mark.e2e
def test_e2e_a_dead_url_first_in_the_environment(tmp_path: Path, procs: list[Proc]) -> None:
    live = start_server(tmp_path / "data")
    procs.append(live)
    dead = closed_url()
    urls = f"{dead},{live.url}"
    worker = start_worker(urls, "tests/e2e_tasks.py:add", log=tmp_path / "worker.log")
    procs.append(worker)
    # A client script: the worker serves the run it submits, and its result comes back.
    done = run([sys.executable, "-c", CLIENT_SCRIPT], urls)
    assert (done.returncode, done.stdout) == (0, "42\n"), done.stderr
    assert f"{dead} unreachable (" in worker.output()
    # The CLI's observing commands use the first URL that answers.
    listed = run(cli("run", "ls", "--json"), urls)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)["runs"]
    assert row["state"] == "COMPLETED"
    # A malformed list is one line and exit 1.
    bad = run(cli("run", "ls", "--api-url", f"{live.url},localhost:4200"), urls)
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        "trio-taskworker: error: the server URL 'localhost:4200' is not an http:// or"
        " https:// URL with a host (several go separated by commas)"
    ]
