"""API keys, roles and TLS: the ASGI app's 401 and 403 for every route and role,
the websocket refusal, keys as the client and the worker send them, and a server
on https/wss, all in this process."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from trio_taskworker import (
    ConfigurationError,
    ProtocolError,
    ServerError,
    ServerUnavailable,
    SyncClient,
    TaskRunNotFound,
    TaskServer,
    TaskWorker,
    open_client,
    task,
)
from trio_taskworker._models import Subscribed
from trio_taskworker._serialization import decode_server_frame
from trio_taskworker._server import SQLiteStore, _auth
from trio_taskworker._server._app import AppState, SubscriptionHandler, build_app
from trio_taskworker._server._auth import KeyRing, exposure_problem, is_loopback
from trio_taskworker._server._dispatch import Dispatcher, Waiters
from trio_taskworker._server._openapi import openapi_document
from trio_taskworker._server._routes import ENDPOINTS, PUBLIC

from . import e2e_tasks as t
from .test_server_api import check_against_spec, create_body

SUBMIT_KEY = "submit-key-0123456789abcdef"
WORK_KEY = "work-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
BOTH_KEY = "submit-and-work-0123456789"
ALL_KEY = "all-roles-0123456789abcdef"
KEY_ENTRIES = [
    f"{SUBMIT_KEY}:submit",
    f"{WORK_KEY}:work",
    f"{ADMIN_KEY}:admin,{BOTH_KEY}:submit+work",
    ALL_KEY,
]
ROLES_OF = {
    SUBMIT_KEY: {"submit"},
    WORK_KEY: {"work"},
    ADMIN_KEY: {"submit", "work", "admin"},
    BOTH_KEY: {"submit", "work"},
    ALL_KEY: {"submit", "work", "admin"},
}

#: Who may call what, as docs/howto/secure-the-server.rst promises (None: no key).
DOCUMENTED = {
    ("GET", "/health"): None,
    ("POST", "/runs"): {"submit"},
    ("GET", "/runs"): {"admin"},
    ("GET", "/feeds/{feed_id}"): {"submit"},
    ("POST", "/feeds/{feed_id}/watch"): {"submit"},
    ("POST", "/runs/wait"): {"submit"},
    ("GET", "/runs/{run_id}"): {"submit"},
    ("GET", "/runs/{run_id}/wait"): {"submit"},
    ("POST", "/runs/{run_id}/cancel"): {"submit"},
    ("GET", "/runs/{run_id}/history"): {"submit"},
    ("GET", "/runs/{run_id}/logs"): {"submit"},
    ("POST", "/runs/{run_id}/retry"): {"submit"},
    ("POST", "/logs"): {"work"},
    ("GET", "/workers"): {"admin"},
    ("GET", "/tasks"): {"admin"},
    ("GET", "/events"): {"admin"},
    ("GET", "/metrics"): {"admin"},
    ("POST", "/blobs"): {"submit", "work"},
    ("GET", "/blobs/{blob_id}"): {"submit", "work"},
    ("GET", "/openapi.json"): {"submit", "work", "admin"},
}


def now() -> float:
    return 1_700_000_000.0 + trio.current_time()


@pytest.fixture
async def keyed_state(nursery: trio.Nursery, memory_store: SQLiteStore) -> AppState:
    dispatcher = Dispatcher(memory_store, now)
    await nursery.start(dispatcher.run)
    return AppState(
        store=memory_store,
        dispatcher=dispatcher,
        waiters=Waiters(),
        now=now,
        keys=KeyRing.parse(KEY_ENTRIES),
    )


@pytest.fixture
async def asgi(keyed_state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(keyed_state))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_every_route_has_the_documented_roles() -> None:
    table = {
        (e.method, e.path): None if e.roles == PUBLIC else {r.value for r in e.roles}
        for e in ENDPOINTS
    }
    assert table == DOCUMENTED


async def _call(client: httpx.AsyncClient, method: str, path: str, key: str | None) -> Any:
    concrete = path.replace("{run_id}", str(uuid.uuid4())).replace("{blob_id}", str(uuid.uuid4()))
    kwargs: dict[str, Any] = {"headers": {} if key is None else bearer(key)}
    if (method, path) == ("POST", "/runs"):
        kwargs["json"] = create_body()
    elif (method, path) == ("POST", "/runs/wait"):
        kwargs["json"] = {"ids": [], "timeout": 0}
    elif (method, path) == ("POST", "/blobs"):
        kwargs["content"] = b"payload"
    elif (method, path) == ("POST", "/logs"):
        kwargs["json"] = {"records": []}
    elif path.endswith("/wait"):
        kwargs["params"] = {"timeout": 0}
    return await client.request(method, concrete, **kwargs)


@pytest.mark.parametrize(("method", "path"), sorted(DOCUMENTED))
@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef", *ROLES_OF])
async def test_each_route_answers_each_key_by_its_roles(
    asgi: httpx.AsyncClient, keyed_state: AppState, method: str, path: str, key: str | None
) -> None:
    # The in-process transport reads whole bodies: the event stream must end
    # after its first event, as it does when the server stops.
    keyed_state.events.close()
    needed = DOCUMENTED[(method, path)]
    response = await _call(asgi, method, path, key)
    if needed is not None and key not in ROLES_OF:
        assert response.status_code == 401
        assert "API key" in response.json()["detail"]
        challenge = response.headers["www-authenticate"]
        assert challenge == ("Bearer" if key is None else 'Bearer error="invalid_token"')
    elif needed is not None and not needed & ROLES_OF[key]:
        assert response.status_code == 403
        assert "lacks the role" in response.json()["detail"]
        assert response.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    else:
        # Let through: the route's own answer (201, 200, or 404 for a made-up id).
        assert response.status_code not in (401, 403), response.text
        assert response.status_code < 500
    check_against_spec(path, method.lower(), response)


async def test_submit_key_creates_admin_key_lists(asgi: httpx.AsyncClient) -> None:
    created = await asgi.post("/runs", json=create_body(), headers=bearer(SUBMIT_KEY))
    assert created.status_code == 201
    (run_id,) = created.json()["ids"]
    read = await asgi.get(f"/runs/{run_id}", headers=bearer(SUBMIT_KEY))
    assert read.status_code == 200 and read.json()["id"] == run_id
    assert (await asgi.get("/runs", headers=bearer(SUBMIT_KEY))).status_code == 403
    listed = await asgi.get("/runs", headers=bearer(ADMIN_KEY))
    assert [r["id"] for r in listed.json()["runs"]] == [run_id]
    # A worker's key reads the blob a submitter stored, and nothing else.
    blob = await asgi.post("/blobs", content=b"big parameters", headers=bearer(SUBMIT_KEY))
    ref = blob.json()["id"]
    got = await asgi.get(f"/blobs/{ref}", headers=bearer(WORK_KEY))
    assert got.content == b"big parameters"
    assert (await asgi.get(f"/runs/{run_id}", headers=bearer(WORK_KEY))).status_code == 403


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/nowhere"), ("DELETE", "/runs"), ("GET", "/health/")]
)
async def test_without_a_key_unknown_routes_say_nothing_but_401(
    asgi: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await asgi.request(method, path)
    assert response.status_code == 401 and "detail" in response.json()
    with_key = await asgi.request(method, path, headers=bearer(ADMIN_KEY))
    assert with_key.status_code in (404, 405, 307)


async def test_health_needs_no_key_even_with_keys(asgi: httpx.AsyncClient) -> None:
    assert (await asgi.get("/health")).json()["status"] == "ok"
    assert (await asgi.head("/health")).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        f"Basic {SUBMIT_KEY}",
        f"Bearer {SUBMIT_KEY}x",
        f"Bearer {SUBMIT_KEY[:-1]}",
        f"Bearer{SUBMIT_KEY}",
        f"Bearer {SUBMIT_KEY} extra",
        "Bearer ",
        "Bearer \u00e9t\u00e9-0123456789abcdef",
    ],
)
async def test_malformed_or_near_miss_credentials_are_401(
    asgi: httpx.AsyncClient, header: str
) -> None:
    response = await asgi.post(
        "/runs", json=create_body(), headers={"authorization": header.encode("latin-1")}
    )
    assert response.status_code == 401


async def test_the_scheme_is_case_insensitive(asgi: httpx.AsyncClient) -> None:
    response = await asgi.post(
        "/runs", json=create_body(), headers={"authorization": f"bearer  {SUBMIT_KEY}"}
    )
    assert response.status_code == 201


async def test_without_keys_nothing_is_asked(
    nursery: trio.Nursery, memory_store: SQLiteStore
) -> None:
    dispatcher = Dispatcher(memory_store, now)
    await nursery.start(dispatcher.run)
    state = AppState(store=memory_store, dispatcher=dispatcher, waiters=Waiters(), now=now)
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/runs")).status_code == 200
        assert (await client.get("/runs", headers=bearer("anything-at-all-12345"))).is_success


def test_openapi_documents_the_scheme_and_the_refusals() -> None:
    doc = openapi_document()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["apiKey"]["description"],
    }
    for (method, path), needed in DOCUMENTED.items():
        operation = doc["paths"][path][method.lower()]
        if needed is None:
            assert operation["security"] == []
            assert "401" not in operation["responses"]
            continue
        alternatives = {role for req in operation["security"] for role in req["apiKey"]}
        assert alternatives == needed | {"admin"}
        assert "401" in operation["responses"]
        assert ("403" in operation["responses"]) == (needed != {"submit", "work", "admin"})


# --- the websocket -----------------------------------------------------------------


@attrs.define
class HeaderWebSocket:
    """What the subscription handler uses of Starlette's WebSocket, headers included."""

    headers: dict[str, str]
    sent: list[Any] = attrs.field(factory=list)
    closed: tuple[int, str] | None = None
    incoming: list[dict[str, Any]] = attrs.field(factory=list)
    accepted: bool = False

    async def accept(self) -> None:
        self.accepted = True

    async def receive(self) -> dict[str, Any]:
        if self.incoming:
            return self.incoming.pop(0)
        await trio.sleep_forever()
        raise AssertionError

    async def send_text(self, text: str) -> None:
        self.sent.extend(decode_server_frame(text))

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


SUBSCRIBE = {"type": "subscribe", "keys": ["k"], "client_id": "w", "credits": 1}


@pytest.mark.parametrize(
    ("key", "code", "reason"),
    [
        (None, 4001, "no API key"),
        ("not-a-key-0123456789abcdef", 4001, "not valid"),
        (SUBMIT_KEY, 4003, "lacks the role 'work'"),
        (ADMIN_KEY, None, None),
        (WORK_KEY, None, None),
    ],
)
async def test_subscribe_needs_a_key_with_the_work_role(
    autojump_clock: trio.testing.MockClock,
    keyed_state: AppState,
    key: str | None,
    code: int | None,
    reason: str | None,
) -> None:
    ws = HeaderWebSocket(headers={} if key is None else bearer(key))
    ws.incoming.append({"type": "websocket.receive", "text": json.dumps([SUBSCRIBE])})
    with trio.move_on_after(1):
        await SubscriptionHandler(keyed_state, ws).run()  # type: ignore[arg-type]
    # Accepted first either way, so that a refusal's reason reaches the worker.
    assert ws.accepted
    if code is None:
        assert ws.closed is None and isinstance(ws.sent[0], Subscribed)
    else:
        assert ws.closed is not None and ws.closed[0] == code and reason in ws.closed[1]
        assert ws.sent == [] and not keyed_state.dispatcher.subscribers


# --- keys ---------------------------------------------------------------------------


def test_key_entries_and_roles() -> None:
    ring = KeyRing.parse(
        ["aaaaaaaaaaaaaaaa:submit+WORK , bbbbbbbbbbbbbbbb", "cccccccccccccccc:admin,"]
    )
    assert [set(k.roles) for k in ring.keys] == [
        {"submit", "work"},
        {"submit", "work", "admin"},
        {"submit", "work", "admin"},
    ]
    assert ring.roles_for("Bearer aaaaaaaaaaaaaaaa") == {"submit", "work"}
    assert ring.roles_for("Bearer dddddddddddddddd") is None
    assert ring.roles_for(None) is None
    assert not KeyRing.parse([]).enabled


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("", "API key #1 is empty"),
        ("short-secret", "use at least 16"),
        ("has a space in it 0123456789", "may only hold"),
        ('quote"d-0123456789abcdef', "may only hold"),
        ("good-key-0123456789abcdef:root", "unknown role 'root'"),
        ("good-key-0123456789abcdef:", "unknown role ''"),
        ("good-key-0123456789abcdef,good-key-0123456789abcdef:work", "#2 repeats"),
    ],
)
def test_bad_key_entries_are_refused_without_quoting_the_key(entry: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        KeyRing.parse([entry])
    secret = entry.split(":")[0].split(",")[0]
    if len(secret) >= 4:
        assert secret not in str(caught.value)


def test_a_key_is_compared_with_every_key_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ring = KeyRing.parse([f"key-{i:02d}-0123456789abcdef" for i in range(20)])
    compared: list[tuple[bytes, bytes]] = []
    real = _auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(_auth.hmac, "compare_digest", counting)
    assert ring.roles_for("Bearer key-00-0123456789abcdef") is not None
    # No early exit on the first key, and fixed-length digests, never the keys.
    assert len(compared) == 20
    assert all(len(a) == len(b) == 32 for a, b in compared)
    assert "key-00" not in repr(ring)


def test_the_server_repr_holds_no_key(tmp_path: Path) -> None:
    server = TaskServer(data_dir=tmp_path, api_keys=[SUBMIT_KEY])
    assert SUBMIT_KEY not in repr(server) and server.api_keys.enabled
    with pytest.raises(ConfigurationError, match="use at least 16"):
        TaskServer(data_dir=tmp_path, api_keys="tiny")


# --- exposure -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.10", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    assert (exposure_problem(host, KeyRing()) is None) is loopback
    assert exposure_problem(host, KeyRing.parse([ALL_KEY])) is None


async def test_a_server_on_every_interface_without_a_key_does_not_start(
    tmp_path: Path,
) -> None:
    server = TaskServer(host="0.0.0.0", port=0, data_dir=tmp_path)
    with pytest.raises(ConfigurationError, match=r"without an API key .* --insecure"):
        await server.run()
    assert server.url is None and not (tmp_path / "runs.sqlite3").exists()


async def test_tls_needs_both_files_and_usable_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="both a certificate file and a key file"):
        await TaskServer(port=0, data_dir=tmp_path, certfile=tmp_path / "c.pem").run()
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(ConfigurationError, match="cannot load the TLS certificate"):
        await TaskServer(
            port=0, data_dir=tmp_path, certfile=tmp_path / "c.pem", keyfile=tmp_path / "k.pem"
        ).run()


# --- a real server in this process: the client and the worker send their key ---------


@pytest.fixture
async def keyed_server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[TaskServer]:
    server = TaskServer(port=0, data_dir=tmp_path / "server", api_keys=KEY_ENTRIES)
    await nursery.start(server.run)
    yield server
    await server.stop()


@task
async def reverse(data: bytes) -> bytes:
    return data[::-1]


async def test_submit_key_and_work_key_run_a_task(keyed_server: TaskServer) -> None:
    url = str(keyed_server.url)
    worker = TaskWorker(t.add, reverse, api_url=url, api_key=WORK_KEY, handle_signals=False)
    async with worker, open_client(url, api_key=SUBMIT_KEY) as client:
        future = await t.add.delay(1, y=2)
        assert await future.result(timeout=10) == 3
        # Past the inline limit, parameters and result travel as blobs: the
        # worker reads and stores them with its work key alone.
        big = bytes(range(256)) * 1024
        reversed_ = await reverse.delay(big)
        assert await reversed_.result(timeout=10) == big[::-1]
        run = await reversed_.wait()
        assert run.parameters_ref is not None and run.result_ref is not None
        with pytest.raises(ServerError) as caught:
            await client.list_runs()
        assert caught.value.status_code == 403


async def test_a_worker_with_a_refused_key_stops_with_the_reason(
    keyed_server: TaskServer,
) -> None:
    url = str(keyed_server.url)
    for key, reason in [
        ("wrong-key-0123456789abcdef", "4001 the API key is not valid"),
        (SUBMIT_KEY, "4003 this API key lacks the role 'work'"),
    ]:
        worker = TaskWorker(t.add, api_url=url, api_key=key, handle_signals=False)
        with trio.fail_after(10), pytest.raises(ProtocolError, match=reason):
            await worker.start()


async def test_clients_read_the_key_from_the_environment(
    keyed_server: TaskServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(keyed_server.url)

    def read_unknown_run() -> None:
        with SyncClient(url) as client:
            client.read_run(uuid.uuid4())

    with pytest.raises(ServerError, match="needs an API key") as caught:
        await trio.to_thread.run_sync(read_unknown_run)
    assert caught.value.status_code == 401
    monkeypatch.setenv("TRIO_TASKWORKER_API_KEY", SUBMIT_KEY)
    # Past the gate: the server looked and found no such run.
    with pytest.raises(TaskRunNotFound):
        await trio.to_thread.run_sync(read_unknown_run)
    async with open_client(url) as client:
        with pytest.raises(TaskRunNotFound):
            await client.read_run(uuid.uuid4())


# --- TLS ------------------------------------------------------------------------------


@attrs.frozen
class Tls:
    ca_file: Path
    certfile: Path
    keyfile: Path
    other_ca_file: Path


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    import trustme  # a test dependency: certificates made on the spot

    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = Tls(
        ca_file=folder / "ca.pem",
        certfile=folder / "server.pem",
        keyfile=folder / "server.key",
        other_ca_file=folder / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca_file))
    leaf.cert_chain_pems[0].write_to_path(str(files.certfile))
    leaf.private_key_pem.write_to_path(str(files.keyfile))
    trustme.CA().cert_pem.write_to_path(str(files.other_ca_file))
    return files


async def test_https_and_wss_round_trip(
    nursery: trio.Nursery, tmp_path: Path, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = TaskServer(
        port=0,
        data_dir=tmp_path,
        api_keys=KEY_ENTRIES,
        certfile=tls.certfile,
        keyfile=tls.keyfile,
    )
    url = await nursery.start(server.run)
    assert url.startswith("https://127.0.0.1:")
    monkeypatch.setenv("TRIO_TASKWORKER_CA_FILE", str(tls.ca_file))
    worker = TaskWorker(t.add, api_url=url, api_key=WORK_KEY, handle_signals=False)
    async with worker, open_client(url, api_key=SUBMIT_KEY):
        assert await (await t.add.delay(20, y=22)).result(timeout=10) == 42
    # Plain http to the TLS port is not served.
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(url.replace("https://", "http://") + "/health")
    await server.stop()


async def test_an_untrusted_certificate_is_refused_by_clients_and_workers(
    nursery: trio.Nursery, tmp_path: Path, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = TaskServer(
        port=0, data_dir=tmp_path, api_keys=[ALL_KEY], certfile=tls.certfile, keyfile=tls.keyfile
    )
    url = await nursery.start(server.run)
    monkeypatch.setenv("TRIO_TASKWORKER_CA_FILE", str(tls.other_ca_file))
    async with open_client(url, api_key=ALL_KEY) as client:
        with pytest.raises(ServerUnavailable, match="TLS certificate is not trusted"):
            await client.health()
    worker = TaskWorker(t.add, api_url=url, api_key=ALL_KEY, handle_signals=False)
    with trio.fail_after(10), pytest.raises(ConfigurationError, match="is not trusted"):
        await worker.start()
    await server.stop()


def test_a_missing_ca_file_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIO_TASKWORKER_CA_FILE", str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigurationError, match="not a usable CA bundle"):
        SyncClient("https://127.0.0.1:1")
