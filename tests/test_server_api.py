"""The REST API against a real in-process server: answers, errors, and the OpenAPI document."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import httpx
import pytest
import trio
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from trio_taskworker import TaskRunState, TaskServer
from trio_taskworker._models import Finished, Started
from trio_taskworker._server._openapi import openapi_document

from .helpers import wait_until


@pytest.fixture
async def http(server: TaskServer) -> Any:
    async with httpx.AsyncClient(base_url=str(server.url)) as client:
        yield client


def _resolve(node: Any, components: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _resolve(components[node["$ref"].rsplit("/", 1)[1]], components)
        return {k: _resolve(v, components) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, components) for v in node]
    return node


def check_against_spec(path: str, method: str, response: httpx.Response) -> None:
    """The response must be documented, and its JSON body must fit its schema."""
    doc = openapi_document()
    documented = doc["paths"][path][method]["responses"]
    assert str(response.status_code) in documented, (path, method, response.status_code)
    content = documented[str(response.status_code)].get("content", {})
    if "application/json" in content:
        schema = _resolve(content["application/json"]["schema"], doc["components"]["schemas"])
        OAS31Validator(schema).validate(response.json())


def create_body(**overrides: Any) -> dict[str, Any]:
    run = {"task_key": "mod:fn", "parameters": base64.b64encode(b"x").decode()}
    run.update(overrides)
    return {"runs": [run]}


def test_openapi_document_is_valid() -> None:
    validate_spec(openapi_document())


async def test_openapi_served_and_covers_every_route(
    server: TaskServer, http: httpx.AsyncClient
) -> None:
    from starlette.routing import Route

    from trio_taskworker._server._app import AppState, build_app
    from trio_taskworker._server._routes import UI_PREFIX

    response = await http.get("/openapi.json")
    assert response.status_code == 200
    served = response.json()
    assert served == openapi_document()
    assert server.state is not None
    app = build_app(server.state)
    # The dashboard's files are pages, not API: they are not in the document.
    routes = {
        (r.path, m.lower())
        for r in app.routes
        if isinstance(r, Route) and not r.path.startswith(UI_PREFIX)
        for m in r.methods or ()
    } - {(p, "head") for p in served["paths"]}
    documented = {(p, m) for p, ops in served["paths"].items() for m in ops}
    assert routes == documented
    _ = AppState


async def test_health(http: httpx.AsyncClient) -> None:
    response = await http.get("/health")
    check_against_spec("/health", "get", response)
    assert response.json()["status"] == "ok"


async def test_create_read_list_wait(http: httpx.AsyncClient) -> None:
    created = await http.post("/runs", json={"runs": create_body()["runs"] * 3})
    check_against_spec("/runs", "post", created)
    assert created.status_code == 201
    ids = created.json()["ids"]
    assert len(ids) == 3
    one = await http.get(f"/runs/{ids[0]}")
    check_against_spec("/runs/{run_id}", "get", one)
    assert one.json()["state"] == "SCHEDULED"
    listed = await http.get("/runs", params={"state": "SCHEDULED", "task_key": "mod:fn"})
    check_against_spec("/runs", "get", listed)
    assert [r["id"] for r in listed.json()["runs"]] == ids[::-1]  # newest first
    waited = await http.get(f"/runs/{ids[0]}/wait", params={"timeout": 0})
    check_against_spec("/runs/{run_id}/wait", "get", waited)
    assert waited.json()["state"] == "SCHEDULED"
    many = await http.post("/runs/wait", json={"ids": ids, "timeout": 0})
    check_against_spec("/runs/wait", "post", many)
    assert many.json() == {"runs": []}


async def test_blobs_round_trip(http: httpx.AsyncClient) -> None:
    data = bytes(range(256)) * 1000
    stored = await http.post("/blobs", content=data)
    check_against_spec("/blobs", "post", stored)
    ref = stored.json()["id"]
    read = await http.get(f"/blobs/{ref}")
    assert read.status_code == 200 and read.content == data
    created = await http.post("/runs", json={"runs": [{"task_key": "k", "parameters_ref": ref}]})
    assert created.status_code == 201


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "needle"),
    [
        ("post", "/runs", {"content": b"{"}, 422, "not valid JSON"),
        ("post", "/runs", {"json": {"runs": []}}, 422, "at least one run"),
        ("post", "/runs", {"content": b'{"runs": [{"task_key": "a"}], "\\ud800": 1}'}, 422,
         "surrogate"),
        ("post", "/runs", {"json": {"runs": [{}]}}, 422, "task_key"),
        ("post", "/runs", {"json": create_body(task_key="")}, 422, "task_key must not be empty"),
        ("post", "/runs", {"json": create_body(retries=-1)}, 422, "retries"),
        ("post", "/runs", {"json": create_body(timeout_seconds=0)}, 422, "timeout_seconds"),
        ("post", "/runs", {"json": create_body(parameters="***")}, 422, "base64"),
        ("post", "/runs", {"json": create_body(scheduled_time="2030-01-01T00:00:00")}, 422,
         "no timezone"),
        ("post", "/runs", {"json": create_body(parameters_ref=str(uuid.uuid4()))}, 422,
         "not both"),
        ("post", "/runs", {"json": {"runs": [{"task_key": "k", "parameters_ref": "nope"}]}}, 404,
         "no stored blob"),
        ("post", "/runs", {"json": create_body(surprise=1)}, 422, "surprise"),
        ("post", "/runs", {"json": create_body(tags="io")}, 422, "list of strings"),
        ("post", "/runs", {"json": create_body(tags={"io": 1})}, 422, "list of strings"),
        ("post", "/runs", {"json": create_body(retries=2**63)}, 422, "retries"),
        ("post", "/runs", {"json": create_body(parameters_preview="x" * 2001)}, 422,
         "parameters_preview must be at most 2000"),
        ("post", "/runs", {"json": create_body(parameters_preview=5)}, 422,
         "parameters_preview"),
        ("post", "/runs", {"json": create_body(retry_delay_seconds=-1)}, 422, "retry_delay"),
        ("post", "/runs", {"content": b'{"runs": [{"task_key": "k", "timeout_seconds": NaN}]}'},
         422, "NaN is not a JSON number"),
        ("post", "/runs", {"content": b'{"runs": [{"task_key": "k", "retries": Infinity}]}'},
         422, "Infinity is not a JSON number"),
        ("post", "/runs", {"content": b'{"runs": [{"task_key": "\\ud800"}]}'}, 422,
         "no low surrogate"),
        ("post", "/runs", {"content": b'{"runs": ' + b"[" * 5000 + b"]" * 5000 + b"}"}, 422,
         "nested too deeply"),
        ("post", "/runs", {"json": create_body(max_redeliveries=2**70)}, 422, "64 bits"),
        ("post", "/runs", {"json": create_body(retry_delay_seconds=1e12)}, 422, "100 years"),
        ("post", "/runs", {"json": create_body(scheduled_time="0001-01-01T00:00:00+05:00")},
         422, "between the years"),
        ("post", "/runs", {"json": create_body(scheduled_time="9999-12-31T23:00:00-05:00")},
         422, "between the years"),
        ("post", "/runs", {"json": create_body(cache_expiration=-1)}, 422, "cache_expiration"),
        ("post", "/runs", {"json": create_body(name=5)}, 422, "expected a string"),
        ("post", "/runs", {"json": [create_body()]}, 422, "JSON object"),
        ("post", "/runs/wait", {"content": b"null"}, 422, "JSON object"),
        ("get", "/runs/not-a-uuid", {}, 422, "not a UUID"),
        ("get", f"/runs/{uuid.uuid4()}", {}, 404, "no run"),
        ("get", f"/runs/{uuid.uuid4()}/wait", {}, 404, "no run"),
        ("get", f"/runs/{uuid.uuid4()}/wait?timeout=-1", {}, 422, "timeout"),
        ("get", f"/runs/{uuid.uuid4()}/wait?timeout=abc", {}, 422, "must be a number"),
        ("get", "/runs?state=DONE", {}, 422, "unknown state"),
        ("get", "/runs?limit=0", {}, 422, "limit"),
        ("post", "/runs/wait", {"json": {"ids": ["x"]}}, 422, "ids"),
        ("post", "/runs/wait", {"json": {"ids": {}}}, 422, "expected a list"),
        ("post", "/runs/wait", {"json": {"ids": [str(uuid.uuid4())], "timeout": 300}}, 404,
         "no run"),
        ("get", "/runs/wait", {}, 405, "use POST /runs/wait"),
        ("get", "/runs?offset=4611686018427387905", {}, 422, "offset"),
        ("get", "/runs?offset=1.5", {}, 422, "an integer"),
        ("post", "/runs", {"json": {"runs": []}}, 422, "at least one run"),
        ("post", "/runs", {"content": b'{"runs": [{"task_key": "a"}], "\\ud800": 1}'}, 422,
         "surrogate"),
        ("post", "/runs/wait", {"json": {"ids": [], "timeout": 1000}}, 422, "timeout"),
        ("post", "/runs/wait", {"json": {"ids": [], "return_when": "SOON"}}, 422, "return_when"),
        ("get", f"/blobs/{uuid.uuid4()}", {}, 404, "no blob"),
        ("get", "/blobs/../etc", {}, 404, ""),
        ("get", "/nowhere", {}, 404, "Not Found"),
        ("delete", "/runs", {}, 405, "Method Not Allowed"),
    ],
)  # fmt: skip
async def test_bad_requests_get_clear_errors(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    needle: str,
) -> None:
    response = await http.request(method.upper(), path, **kwargs)
    assert response.status_code == status
    assert needle in response.json()["detail"]


@pytest.mark.parametrize("path", list(openapi_document()["paths"]))
async def test_wrong_method_lists_the_allowed_ones(http: httpx.AsyncClient, path: str) -> None:
    url = path
    for param in ("{run_id}", "{blob_id}", "{feed_id}"):
        url = url.replace(param, str(uuid.uuid4()))
    response = await http.delete(url)
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}
    allowed = {m.upper() for m in openapi_document()["paths"][path]}
    if "GET" in allowed:
        allowed.add("HEAD")
        assert (await http.head(url)).status_code in (200, 404)
    assert set(response.headers["allow"].split(", ")) == allowed


async def test_body_limit(nursery: trio.Nursery, tmp_path: Any) -> None:
    srv = TaskServer(port=0, data_dir=tmp_path, max_body_bytes=1000)
    url = await nursery.start(srv.run)
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/blobs", content=b"x" * 1001)
        assert response.status_code == 413
        assert "limit" in response.json()["detail"]
        check_against_spec("/blobs", "post", response)
        assert (await client.post("/blobs", content=b"x" * 1000)).status_code == 201
    await srv.stop()


async def test_wait_returns_when_the_server_stops(nursery: trio.Nursery, tmp_path: Any) -> None:
    srv = TaskServer(port=0, data_dir=tmp_path)
    url = await nursery.start(srv.run)
    async with httpx.AsyncClient(base_url=url) as client:
        (run_id,) = (await client.post("/runs", json=create_body())).json()["ids"]
        answers = []

        async def wait() -> None:
            answers.append(await client.get(f"/runs/{run_id}/wait", params={"timeout": 300}))

        async with trio.open_nursery() as inner:
            inner.start_soon(wait)
            await wait_until(lambda: bool(srv.state and srv.state.waiters.watched))
            await srv.stop()
        assert answers[0].status_code == 200
        assert answers[0].json()["state"] == "SCHEDULED"


async def _ended_run(server: TaskServer, http: httpx.AsyncClient, state: str) -> str:
    """A run of its own task that a worker connection took and ended in ``state``."""
    assert server.state is not None
    store = server.state.store
    key = f"mod:{uuid.uuid4().hex}"
    created = await http.post("/runs", json=create_body(task_key=key))
    (run,) = await store.claim_runs([key], 1, "c1", time.time() + 1)
    reports = [
        Started(id=run.id, attempt=run.attempt),
        Finished(id=run.id, attempt=run.attempt, state=TaskRunState(state), retry=False),
    ]
    assert not (await store.apply_reports("c1", reports, time.time() + 1)).rejected
    return str(created.json()["ids"][0])


async def test_wait_for_many_reads_payloads_only_of_runs_that_ended(
    server: TaskServer, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``POST /runs/wait`` looks up states first, then reads the ended runs;
    a run retried or deleted between the two is waited for or reported missing."""
    assert server.state is not None
    store = server.state.store
    pending = (await http.post("/runs", json=create_body())).json()["ids"][0]
    done = await _ended_run(server, http, "COMPLETED")
    retried = await _ended_run(server, http, "FAILED")
    deleted = await _ended_run(server, http, "COMPLETED")
    read: list[list[str]] = []
    read_runs = type(store).read_runs

    async def racing_read(self: Any, ids: Any) -> Any:
        # Between the two reads: one ended run is retried, and in a second
        # wait another is deleted (as retention would).
        read.append(sorted(str(i) for i in ids))
        if len(read) == 1:
            await store.retry_run(uuid.UUID(retried), time.time() + 1)
        else:
            await store.runner.transact(
                lambda cur: cur.execute("DELETE FROM task_runs WHERE id = ?", (deleted,))
            )
        return await read_runs(self, ids)

    monkeypatch.setattr(type(store), "read_runs", racing_read)
    first = await http.post("/runs/wait", json={"ids": [pending, done, retried], "timeout": 0.2})
    assert first.status_code == 200
    assert read == [sorted([done, retried])]  # never the pending run's payload
    assert [r["id"] for r in first.json()["runs"]] == [done]  # the retried run: not ended
    second = await http.post("/runs/wait", json={"ids": [done, deleted], "timeout": 0})
    assert second.status_code == 404 and deleted in second.json()["detail"]
