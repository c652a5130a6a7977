"""End to end, authentication, exposure and TLS: real server and worker processes
started with the CLI, keys passed as flags and environment variables, and a
server on https/wss with a certificate made for the test."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from trio_taskworker import TaskRunState, open_client

from . import e2e_tasks as t
from .conftest import TESTS, Proc, _env, cli, start_server, start_worker

pytestmark = pytest.mark.e2e

SUBMIT_KEY = "e2e-submit-0123456789abcdef"
WORK_KEY = "e2e-work-0123456789abcdef"
ADMIN_KEY = "e2e-admin-0123456789abcdef"
#: As an operator would set it: one variable, comma-separated, with roles.
SERVER_KEYS = f"{SUBMIT_KEY}:submit,{WORK_KEY}:work,{ADMIN_KEY}:admin"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), capture_output=True, text=True, timeout=60, env=_env(**env), cwd=TESTS.parent
    )


@pytest.fixture
def keyed_server(tmp_path: Path, procs: list[Proc]) -> Proc:
    proc = start_server(tmp_path / "data", TRIO_TASKWORKER_SERVER_API_KEY=SERVER_KEYS)
    procs.append(proc)
    return proc


async def test_a_keyed_server_refuses_a_plain_request_and_accepts_the_key(
    keyed_server: Proc,
) -> None:
    url = keyed_server.url
    async with httpx.AsyncClient(base_url=url) as plain:
        # What the issue's curl did: post a run with no credentials.
        body = {"runs": [{"task_key": "tests.e2e_tasks:add", "parameters": "eA=="}]}
        refused = await plain.post("/runs", json=body)
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/json"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "API key" in refused.json()["detail"]
        assert (await plain.get("/runs")).status_code == 401
        assert (await plain.get("/openapi.json")).status_code == 401
        assert (await plain.get("/health")).json()["status"] == "ok"
        accepted = await plain.post(
            "/runs", json=body, headers={"authorization": f"Bearer {SUBMIT_KEY}"}
        )
        assert accepted.status_code == 201
        forbidden = await plain.get("/runs", headers={"authorization": f"Bearer {SUBMIT_KEY}"})
        assert forbidden.status_code == 403
        listed = await plain.get("/runs", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert [r["id"] for r in listed.json()["runs"]] == accepted.json()["ids"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (None, "4001 no API key; set TRIO_TASKWORKER_API_KEY"),
        ("e2e-wrong-0123456789abcdef", "4001 the API key is not valid"),
        (SUBMIT_KEY, "4003 this API key lacks the role 'work'"),
    ],
)
async def test_a_worker_whose_key_is_refused_exits_1_with_one_line(
    keyed_server: Proc, key: str | None, expected: str
) -> None:
    env = {"TRIO_TASKWORKER_API_URL": keyed_server.url}
    if key is not None:
        env["TRIO_TASKWORKER_API_KEY"] = key
    result = await trio.to_thread.run_sync(
        lambda: run_cli("--log-level", "WARNING", "task", "serve", "tests.e2e_tasks:add", **env)
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line == f"trio-taskworker: error: the server refused this worker: {expected}"
    assert key is None or key not in result.stderr


async def test_keys_by_role_run_a_task_and_cancel_one(
    keyed_server: Proc, procs: list[Proc], tmp_path: Path
) -> None:
    worker = start_worker(
        keyed_server.url,
        "tests.e2e_tasks:add",
        "tests.e2e_tasks:wait_for_file",
        log=tmp_path / "worker.log",
        TRIO_TASKWORKER_API_KEY=WORK_KEY,
    )
    procs.append(worker)
    async with open_client(keyed_server.url, api_key=SUBMIT_KEY):
        assert await (await t.add.delay(40, y=2)).result(timeout=30) == 42
        sleeping = await t.wait_for_file.delay(str(tmp_path / "never"))
        # The CLI's cancel reads its key from the environment, as workers do.
        run_id = str(sleeping.task_run_id)
        refused = await trio.to_thread.run_sync(
            lambda: run_cli("run", "cancel", run_id, "--api-url", keyed_server.url)
        )
        assert refused.returncode == 1 and "401" in refused.stderr
        done = await trio.to_thread.run_sync(
            lambda: run_cli(
                "run",
                "cancel",
                run_id,
                "--api-url",
                keyed_server.url,
                TRIO_TASKWORKER_API_KEY=SUBMIT_KEY,
            )
        )
        assert done.returncode == 0, done.stderr
        run = await sleeping.wait(timeout=30)
        assert run.state is TaskRunState.CANCELLED
    assert worker.popen.poll() is None
    assert WORK_KEY not in worker.output() and SUBMIT_KEY not in keyed_server.output()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "example.com"])
def test_listening_beyond_loopback_without_a_key_exits_1_with_one_line(
    tmp_path: Path, host: str
) -> None:
    result = run_cli(
        "server", "start", "--host", host, "--port", "0", "--data-dir", str(tmp_path / "d")
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("trio-taskworker: error: listening on ")
    assert "without an API key" in line and "--insecure" in line
    assert not (tmp_path / "d" / "runs.sqlite3").exists()


def test_insecure_listens_beyond_loopback_with_a_warning(
    tmp_path: Path, procs: list[Proc]
) -> None:
    proc = start_server(tmp_path / "data", "--host", "0.0.0.0", "--insecure")
    procs.append(proc)
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    warnings = [ln for ln in proc.output().splitlines() if " WARNING " in ln]
    assert len(warnings) == 1 and "without an API key" in warnings[0], proc.output()


def test_a_bad_key_on_the_command_line_is_one_line_without_the_key(tmp_path: Path) -> None:
    result = run_cli(
        "server", "start", "--port", "0", "--data-dir", str(tmp_path / "d"),
        "--api-key", f"{ADMIN_KEY}:admin", "--api-key", "tiny-key:submit",
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "API key #2 is 8 characters" in line and "tiny-key" not in line


# --- TLS ------------------------------------------------------------------------------


@attrs.frozen
class Tls:
    ca_file: Path
    certfile: Path
    keyfile: Path


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    import trustme  # a test dependency: certificates made on the spot

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = Tls(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_file))
    leaf.cert_chain_pems[0].write_to_path(str(files.certfile))
    leaf.private_key_pem.write_to_path(str(files.keyfile))
    return files


async def test_tls_round_trip_submit_over_https_work_over_wss(
    tmp_path: Path, procs: list[Proc], tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(
        tmp_path / "data",
        "--certfile", str(tls.certfile), "--keyfile", str(tls.keyfile),
        "--api-key", f"{SUBMIT_KEY}:submit", "--api-key", f"{WORK_KEY}:work",
    )  # fmt: skip
    procs.append(server)
    assert server.url.startswith("https://127.0.0.1:")
    worker = start_worker(
        server.url,
        "tests.e2e_tasks:add",
        log=tmp_path / "worker.log",
        TRIO_TASKWORKER_API_KEY=WORK_KEY,
        TRIO_TASKWORKER_CA_FILE=str(tls.ca_file),
    )
    procs.append(worker)
    monkeypatch.setenv("TRIO_TASKWORKER_CA_FILE", str(tls.ca_file))
    async with open_client(server.url, api_key=SUBMIT_KEY):
        future = await t.add.delay(1, y=2)
        assert await future.result(timeout=30) == 3
    # The worker took it over wss: the server logged its subscription.
    assert "subscribed to" in server.output()
    # Without the CA, the same worker refuses the server's certificate, once.
    env = {"TRIO_TASKWORKER_API_URL": server.url, "TRIO_TASKWORKER_API_KEY": WORK_KEY}
    serve = ("--log-level", "WARNING", "task", "serve", "tests.e2e_tasks:add")
    untrusting = await trio.to_thread.run_sync(lambda: run_cli(*serve, **env))
    assert untrusting.returncode == 1
    (line,) = untrusting.stderr.strip().splitlines()
    assert "TLS certificate of 127.0.0.1" in line and "TRIO_TASKWORKER_CA_FILE" in line
    # And plain http to the https port gets nothing.
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(server.url.replace("https://", "http://") + "/health")
