"""End to end, hardening: what a second server, a broken file or a hostile client
cannot do to a real server process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket

from trio_taskworker import ConfigurationError, TaskServer, open_client

from . import e2e_tasks as t
from .conftest import Proc, start_server, start_worker
from .helpers import wait_until

pytestmark = pytest.mark.e2e


def server_cli(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_taskworker", "server", "start", "--port", "0",
         "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


async def test_a_second_server_on_one_data_directory_exits_naming_the_first(
    tmp_path: Path, procs: list[Proc]
) -> None:
    first = start_server(tmp_path / "data")
    procs.append(first)
    worker = start_worker(first.url, "tests/e2e_tasks.py:add", log=tmp_path / "worker.log")
    procs.append(worker)
    second = await trio.to_thread.run_sync(server_cli, tmp_path / "data")
    assert second.returncode == 1
    (line,) = second.stderr.strip().splitlines()
    assert "is in use by another server" in line and f"pid {first.pid} " in line
    # The first server and its worker never noticed.
    async with open_client(first.url):
        assert await (await t.add.delay(1, y=2)).result(timeout=30) == 3


async def test_a_corrupt_database_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "runs.sqlite3").write_bytes(b"this is not a database" * 500)
    result = await trio.to_thread.run_sync(server_cli, data)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "runs.sqlite3 is not a usable SQLite database" in line


async def test_two_servers_in_one_process_on_one_directory(tmp_path: Path) -> None:
    first = TaskServer(port=0, data_dir=tmp_path / "data")
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        with pytest.raises(ConfigurationError, match="in use by another server"):
            await TaskServer(port=0, data_dir=tmp_path / "data").run()
        await first.stop()
    # Once the first has returned, the directory is free again.
    again = TaskServer(port=0, data_dir=tmp_path / "data")
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        await again.stop()


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ('[{"type": "subscribe", "keys": ["\\ud800"], "client_id": "x", "credits": 1}]',
         "no low surrogate"),
        ('[{"type": "subscribe", "keys": ["k"], "client_id": "x", "credits": NaN}]',
         "NaN is not a JSON number"),
        ("[" * 5_000 + "]" * 5_000, "nested too deeply"),
        ('[{"type": "subscribe", "keys": ["k"], "client_id": "x", "credits": 1, "\\ud800": 1}]',
         "no low surrogate"),
    ],
    ids=["lone surrogate", "NaN", "deep nesting", "lone surrogate in a field name"],
)  # fmt: skip
async def test_a_hostile_websocket_frame_is_refused_and_the_server_carries_on(
    tmp_path: Path, procs: list[Proc], frame: str, reason: str
) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    procs.append(start_worker(server.url, "tests/e2e_tasks.py:add", log=tmp_path / "w.log"))
    host, port = server.url.removeprefix("http://").split(":")
    # The stream is ours to close: trio-websocket leaves its socket to the garbage
    # collector when the server closes first.
    async with await trio.open_tcp_stream(host, int(port)) as stream, trio.open_nursery() as n:
        ws = await trio_websocket.wrap_client_stream(n, stream, host, "/subscribe")
        await ws.send_message(frame)
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason.code == 1008
    assert reason in (closed.value.reason.reason or "")
    async with open_client(server.url):
        assert await (await t.add.delay(2, y=3)).result(timeout=30) == 5


async def test_a_full_disk_answers_503_and_the_server_carries_on(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """SQLite's ``max_page_count`` stands in for a full disk: every write fails
    with "database or disk is full" until it is raised again."""
    from trio_taskworker import ServerError, TaskWorker

    server = TaskServer(port=0, data_dir=tmp_path / "data")
    await nursery.start(server.run)
    assert server.state is not None
    store = server.state.store
    worker = TaskWorker(t.add, api_url=server.url, handle_signals=False)
    await nursery.start(worker.start)
    async with open_client(server.url) as client:
        assert await (await t.add.delay(1)).result(timeout=30) == 2

        def pages(cur: Any) -> int:
            cur.execute("PRAGMA page_count")
            return int(cur.fetchone()[0])

        full = await store.runner.transact(pages)
        await store.runner.transact(lambda cur: cur.execute(f"PRAGMA max_page_count = {full}"))
        with pytest.raises(ServerError) as refused:
            for i in range(200):  # fills the last free pages, then the disk is "full"
                await t.add.map(["x" * 1000] * 50, [i] * 50)
        assert refused.value.status_code == 503
        assert "database or disk is full" in refused.value.detail
        assert (await client.health())["status"] == "ok"  # reads still work
        await store.runner.transact(lambda cur: cur.execute("PRAGMA max_page_count = 1073741823"))
        assert await (await t.add.delay(41)).result(timeout=30) == 42
        assert worker.started  # its connection was never dropped
    await worker.stop()
    await server.stop()


async def test_a_run_no_reader_can_use_is_crashed_and_the_queue_moves_on(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A row that validated once but breaks every reader now (written by an older
    version, or by hand) must not stop dispatch, or the server, on every start."""
    from trio_taskworker import TaskRunState, TaskWorker

    server = TaskServer(port=0, data_dir=tmp_path / "data")
    await nursery.start(server.run)
    assert server.state is not None
    bad = "00000000-0000-0000-0000-000000000bad"

    def insert_unreadable(cur: Any) -> None:
        cur.execute(
            "INSERT INTO task_runs (id, task_key, task_name, state, created_at,"
            " scheduled_time, attempt, retries, retry_count, retry_delay_seconds,"
            " redeliveries, tags, seq, error)"
            " VALUES (?, ?, 'add', 'SCHEDULED', 0, 0, 0, 0, 0, 0, 0, 'not json', 0, ?)",
            (bad, t.add.key, "{not json either"),
        )

    await server.state.store.runner.transact(insert_unreadable)
    worker = TaskWorker(t.add, api_url=server.url, handle_signals=False)
    await nursery.start(worker.start)
    async with open_client(server.url) as client:
        assert await (await t.add.delay(1, y=1)).result(timeout=30) == 2
        rows = await client.list_runs(state=TaskRunState.CRASHED)
    (crashed,) = rows
    assert str(crashed.id) == bad
    assert (crashed.message or "").startswith("the stored run cannot be read:")
    await worker.stop()
    await server.stop()


def test_a_password_in_a_url_never_reaches_a_log_line_or_an_error() -> None:
    from trio_taskworker._client import redact_url

    assert redact_url("http://user:s3cret@host:8080/x") == "http://user:***@host:8080/x"
    assert redact_url("http://host:8080") == "http://host:8080"


async def test_client_strings_cannot_forge_a_server_log_line(
    tmp_path: Path, procs: list[Proc]
) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    host, port = server.url.removeprefix("http://").split(":")
    forged = "x\n2026-01-01 00:00:00,000 ERROR forged: the server was hacked"
    frame = json.dumps(
        [{"type": "subscribe", "keys": ["k\nforged"], "client_id": forged, "credits": 1}]
    )
    async with await trio.open_tcp_stream(host, int(port)) as stream, trio.open_nursery() as n:
        ws = await trio_websocket.wrap_client_stream(n, stream, host, "/subscribe")
        await ws.send_message(frame)
        await ws.get_message()  # subscribed: the server has logged it
        await ws.aclose()
    async with open_client(server.url) as client:
        fut = await t.add.with_options().apply_async((1,))  # a normal run, then a forged key
        create, payload = t.add.run_create((1,), {})
        forged_key = "k\n2026-01-01 00:00:00,000 ERROR forged: from a task key"
        (run_id,) = await client.submit([(attrs.evolve(create, task_key=forged_key), payload)])
        await client.cancel_run(run_id)  # the server logs the run's new state
        await fut.cancel()
    server.stop()
    lines = server.output().splitlines()
    assert not any(line.startswith("2026-01-01 00:00:00,000 ERROR forged: from") for line in lines)
    assert not any(line.startswith("2026-01-01 00:00:00,000 ERROR forged") for line in lines)
    assert any("subscribed" in line and "\\n2026-01-01" in line for line in lines)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_eight_concurrent_60_mib_uploads_do_not_take_the_servers_memory(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """Blob uploads go to a temporary file and into SQLite in chunks: the server's
    peak memory stays far below the 480 MiB it is sent at once."""
    server = start_server(tmp_path / "data")
    procs.append(server)
    size = 60 * 1024 * 1024
    payloads = [bytes([i]) * size for i in range(8)]
    refs: list[str] = [""] * 8
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

        async def upload(i: int) -> None:
            response = await http.post("/blobs", content=payloads[i])
            assert response.status_code == 201, response.text
            refs[i] = response.json()["id"]

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(upload, i)
        peak = peak_rss_mb(server.pid)
        stored = await http.get(f"/blobs/{refs[5]}")
        assert stored.content == payloads[5]  # every byte arrived, in order
    # Holding the bodies would take 480 MiB and more; measured about 170 MB.
    assert peak < 300, f"server peak RSS {peak:.0f} MB for 480 MiB of uploads"


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"runs": [{"task_key": "k", "scheduled_time": "0001-01-01T00:00:00+05:00"}]}, 422,
         "between the years"),
        ({"runs": [{"task_key": "k", "retry_delay_seconds": 1e12}]}, 422, "100 years"),
        ('{"runs": [{"task_key": "k", "timeout_seconds": NaN}]}', 422, "NaN"),
        ([{"task_key": "k"}], 422, "JSON object"),
        ('{"runs": ' + "[" * 5000 + "]" * 5000 + "}", 422, "nested too deeply"),
        ({"runs": [{"task_key": "k", "tags": "io"}]}, 422, "list of strings"),
        ({"runs": [{"task_key": "k", "max_redeliveries": 2**70}]}, 422, "64 bits"),
    ],
    ids=["year 0 after UTC", "retry delay 1e12", "NaN", "top-level list", "deep nesting",
         "tags as a string", "integer past 64 bits"],
)  # fmt: skip
async def test_a_hostile_request_is_a_clear_4xx_and_the_server_carries_on(
    tmp_path: Path, procs: list[Proc], body: Any, status: int, reason: str
) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    procs.append(start_worker(server.url, "tests/e2e_tasks.py:add", log=tmp_path / "w.log"))
    content = body if isinstance(body, str) else json.dumps(body)
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.post(
            "/runs", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == status and reason in response.json()["detail"]
        assert (await http.get("/runs")).json() == {"runs": []}  # nothing was stored
    async with open_client(server.url):
        assert await (await t.add.delay(2, y=2)).result(timeout=30) == 4


async def test_a_password_in_the_api_url_stays_out_of_the_workers_log(
    tmp_path: Path, procs: list[Proc]
) -> None:
    server = start_server(tmp_path / "data")
    procs.append(server)
    with_password = server.url.replace("http://", "http://someone:s3cret-pw@")
    log = tmp_path / "w.log"
    worker = start_worker(with_password, "tests/e2e_tasks.py:add", log=log)
    procs.append(worker)
    await wait_until(lambda: "serving" in worker.output())
    worker.stop()
    assert "s3cret-pw" not in log.read_text()
    assert "someone:***@" in log.read_text()


async def test_a_result_ref_naming_no_blob_is_refused(memory_store: Any) -> None:
    from trio_taskworker._models import Finished, Started, TaskRunCreate
    from trio_taskworker._states import TaskRunState as S

    (run_id,) = await memory_store.create_runs([TaskRunCreate(task_key="k")], 1.0)
    (run,) = await memory_store.claim_runs(["k"], 1, "conn", 2.0)
    outcome = await memory_store.apply_reports(
        "conn",
        [
            Started(id=run_id, attempt=run.attempt),
            Finished(id=run_id, attempt=run.attempt, state=S.COMPLETED, result_ref="nope"),
        ],
        3.0,
    )
    assert outcome.rejected == ((run_id, "no stored blob 'nope' for result_ref"),)
    (after,) = await memory_store.read_runs([run_id])
    assert after.state is S.RUNNING and after.result_ref is None  # never a dangling ref
