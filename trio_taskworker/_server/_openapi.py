"""The server's OpenAPI document, with schemas derived from the attrs models.

Deriving the schemas from the same classes that cattrs (un)structures keeps
the document in step with what the server really accepts and returns; a
test validates live responses against it.
"""

from __future__ import annotations

import datetime
import enum
import types
import typing
import uuid
from typing import Any

import attrs

from .. import _models
from .._states import TaskRunState
from .._version import __version__

__all__ = ["openapi_document"]

_SCHEMA_MODELS = (
    _models.ErrorInfo,
    _models.TaskRun,
    _models.TaskRunCreate,
    _models.TaskRunCreateBatch,
    _models.CreatedRuns,
    _models.RunList,
    _models.WaitRequest,
)


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        (inner,) = members
        schema = _type_schema(inner)
        if "$ref" in schema:
            return {"anyOf": [schema, {"type": "null"}]}
        return {**schema, "type": [schema["type"], "null"]}
    if origin is tuple:
        return {"type": "array", "items": _type_schema(typing.get_args(tp)[0])}
    if attrs.has(tp):
        return {"$ref": f"#/components/schemas/{tp.__name__}"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": "string", "enum": [m.value for m in tp]}
    simple: dict[Any, dict[str, Any]] = {
        str: {"type": "string"},
        int: {"type": "integer"},
        float: {"type": "number"},
        bool: {"type": "boolean"},
        uuid.UUID: {"type": "string", "format": "uuid"},
        datetime.datetime: {"type": "string", "format": "date-time"},
        bytes: {"type": "string", "format": "byte"},
    }
    return dict(simple[tp])


def _model_schema(cls: type) -> dict[str, Any]:
    attrs.resolve_types(cls, globalns=vars(_models))
    properties = {}
    required = []
    for field in attrs.fields(cls):
        properties[field.name] = _type_schema(field.type)
        if field.default is attrs.NOTHING:
            required.append(field.name)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    if cls.__doc__:
        schema["description"] = " ".join(cls.__doc__.split())
    return schema


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("Error")}


def _run_id() -> dict[str, Any]:
    return {
        "name": "run_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }


def _timeout(default: float) -> dict[str, Any]:
    return {
        "name": "timeout",
        "in": "query",
        "required": False,
        "schema": {"type": "number", "minimum": 0, "maximum": 300, "default": default},
    }


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document for every HTTP route of the server."""
    schemas = {cls.__name__: _model_schema(cls) for cls in _SCHEMA_MODELS}
    schemas["Error"] = {
        "type": "object",
        "properties": {"detail": {"type": "string"}},
        "required": ["detail"],
    }
    schemas["BlobRef"] = {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}},
        "required": ["id"],
    }
    schemas["Health"] = {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ok"]},
            "version": {"type": "string"},
            "runs": {"type": "object", "additionalProperties": {"type": "integer"}},
            "subscribers": {"type": "integer"},
        },
        "required": ["status", "version", "runs", "subscribers"],
    }
    bad = _error("The request is malformed; `detail` says how.")
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "summary": "Server health and run counts per state",
                "operationId": "health",
                "responses": {"200": {"description": "Healthy", "content": _json("Health")}},
            }
        },
        "/runs": {
            "post": {
                "summary": "Create one or many runs in one transaction",
                "operationId": "createRuns",
                "requestBody": {"required": True, "content": _json("TaskRunCreateBatch")},
                "responses": {
                    "201": {"description": "Created", "content": _json("CreatedRuns")},
                    "413": _error("The body is larger than the server accepts."),
                    "422": bad,
                },
            },
            "get": {
                "summary": "List runs, oldest first, without payloads",
                "operationId": "listRuns",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": _type_schema(TaskRunState),
                    },
                    {
                        "name": "task_key",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1000,
                            "default": 200,
                        },
                    },
                    {
                        "name": "offset",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0, "default": 0},
                    },
                ],
                "responses": {
                    "200": {"description": "A page of runs", "content": _json("RunList")},
                    "422": bad,
                },
            },
        },
        "/runs/wait": {
            "post": {
                "summary": "Wait until all (or the first) of the given runs have ended",
                "operationId": "waitRuns",
                "requestBody": {"required": True, "content": _json("WaitRequest")},
                "responses": {
                    "200": {
                        "description": "The ended runs among `ids` (empty after the timeout)",
                        "content": _json("RunList"),
                    },
                    "422": bad,
                },
            }
        },
        "/runs/{run_id}": {
            "get": {
                "summary": "Read one run, with its payloads",
                "operationId": "readRun",
                "parameters": [_run_id()],
                "responses": {
                    "200": {"description": "The run", "content": _json("TaskRun")},
                    "404": _error("No such run."),
                    "422": bad,
                },
            }
        },
        "/runs/{run_id}/wait": {
            "get": {
                "summary": "Long-poll until the run ends; after `timeout` return it as it is",
                "operationId": "waitRun",
                "parameters": [_run_id(), _timeout(30.0)],
                "responses": {
                    "200": {"description": "The run", "content": _json("TaskRun")},
                    "404": _error("No such run."),
                    "422": bad,
                },
            }
        },
        "/runs/{run_id}/cancel": {
            "post": {
                "summary": "Cancel a run: a queued one at once, a running one via its worker",
                "operationId": "cancelRun",
                "parameters": [_run_id()],
                "responses": {
                    "200": {
                        "description": "The run, now CANCELLED or CANCELLING",
                        "content": _json("TaskRun"),
                    },
                    "404": _error("No such run."),
                    "409": _error("The run has already ended."),
                    "422": bad,
                },
            }
        },
        "/blobs": {
            "post": {
                "summary": "Store a payload blob (pickled parameters or result)",
                "operationId": "putBlob",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
                "responses": {
                    "201": {"description": "Stored", "content": _json("BlobRef")},
                    "413": _error("The blob is larger than the server accepts."),
                },
            }
        },
        "/blobs/{blob_id}": {
            "get": {
                "summary": "Read a payload blob",
                "operationId": "getBlob",
                "parameters": [
                    {
                        "name": "blob_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "format": "uuid"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The blob's bytes",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    "404": _error("No such blob."),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": {"description": "The OpenAPI document"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trio_taskworker server",
            "version": __version__,
            "description": "REST API of the trio_taskworker server. Workers subscribe over"
            " the websocket at /subscribe (see the protocol page of the docs).",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
