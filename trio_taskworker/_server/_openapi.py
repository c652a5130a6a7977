"""The server's OpenAPI document, with schemas derived from the attrs models.

Deriving the schemas from the same classes that cattrs (un)structures keeps
the document in step with what the server really accepts and returns; a
test validates live responses against it. The ``paths`` come from the same
route table (:mod:`._routes`) that the app builds its routes from.
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
from .._version import __version__
from ._routes import (
    ANY_ROLE,
    BYTES,
    ENDPOINTS,
    PUBLIC,
    Endpoint,
    Param,
    PathId,
    QueryText,
    Reply,
    Role,
)

__all__ = ["openapi_document"]

_SCHEMA_MODELS = (
    _models.ErrorInfo,
    _models.TaskRun,
    _models.TaskRunCreate,
    _models.TaskRunCreateBatch,
    _models.CreatedRuns,
    _models.RunList,
    _models.WaitRequest,
    _models.FeedWatch,
    _models.FeedWatched,
    _models.FeedPage,
    _models.StateChange,
    _models.RunHistory,
    _models.LogRecord,
    _models.LogBatch,
    _models.RunLogs,
    _models.WorkerInfo,
    _models.WorkerList,
    _models.TaskStats,
    _models.TaskStatsList,
)

_NAME = {"maxLength": _models.MAX_NAME}
_SECONDS = {"minimum": 0.0, "maximum": _models.MAX_SECONDS}
_COUNT = {"minimum": 0, "maximum": _models.MAX_COUNT}
_CREATE = _models.TaskRunCreate
_LOG = _models.LogRecord

#: Limits the models' validators enforce, shown on the fields they bound.
_FIELD_LIMITS: dict[tuple[type, str], dict[str, Any]] = {
    (_CREATE, "task_key"): {"minLength": 1, **_NAME},
    (_CREATE, "task_name"): _NAME,
    (_CREATE, "name"): _NAME,
    (_CREATE, "cache_key"): _NAME,
    (_CREATE, "tags"): {"maxItems": _models.MAX_TAGS, "items": {"type": "string", **_NAME}},
    (_CREATE, "retries"): _COUNT,
    (_CREATE, "max_redeliveries"): _COUNT,
    (_CREATE, "retry_delay_seconds"): _SECONDS,
    (_CREATE, "cache_expiration"): _SECONDS,
    (_CREATE, "timeout_seconds"): {"exclusiveMinimum": 0.0, "maximum": _models.MAX_SECONDS},
    # 1970 to 9000 UTC is what the server accepts; these years are inside it in
    # any time zone.
    (_CREATE, "scheduled_time"): {"pattern": "^(197[1-9]|19[89][0-9]|[2-8][0-9]{3})-"},
    (_models.TaskRunCreateBatch, "runs"): {
        "minItems": 1,
        "maxItems": _models.MAX_RUNS_PER_REQUEST,
    },
    (_models.WaitRequest, "ids"): {"maxItems": _models.MAX_RUNS_PER_REQUEST},
    (_models.WaitRequest, "timeout"): {"minimum": 0.0, "maximum": _models.MAX_WAIT_SECONDS},
    (_models.FeedWatch, "ids"): {"maxItems": _models.MAX_WATCH_IDS},
    (_CREATE, "parameters_preview"): {"maxLength": _models.MAX_PREVIEW},
    (_LOG, "attempt"): _COUNT,
    (_LOG, "level"): {"enum": list(_models.LOG_LEVELS)},
    (_LOG, "logger"): _NAME,
    (_LOG, "message"): {"maxLength": _models.MAX_LOG_MESSAGE},
    (_LOG, "timestamp"): {"pattern": "^(197[1-9]|19[89][0-9]|[2-8][0-9]{3})-"},
    (_models.LogBatch, "records"): {"maxItems": _models.MAX_LOG_RECORDS},
}


#: Rules across fields, as the models' own checks state them.
_MODEL_RULES: dict[type, dict[str, Any]] = {
    # "give parameters or parameters_ref, not both"
    _CREATE: {
        "not": {
            "required": ["parameters", "parameters_ref"],
            "properties": {
                "parameters": {"type": "string"},
                "parameters_ref": {"type": "string"},
            },
        }
    },
}


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
        properties[field.name] = {
            **_type_schema(field.type),
            **_FIELD_LIMITS.get((cls, field.name), {}),
        }
        if field.default is attrs.NOTHING:
            required.append(field.name)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        **_MODEL_RULES.get(cls, {}),
    }
    if required:
        schema["required"] = required
    if cls.__doc__:
        schema["description"] = " ".join(cls.__doc__.split())
    return schema


def _content(body: str) -> dict[str, Any]:
    if body == BYTES:
        return {BYTES: {"schema": {"type": "string", "format": "binary"}}}
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}


def _reply(reply: Reply) -> dict[str, Any]:
    if reply.body is None:
        return {"description": reply.description}
    return {"description": reply.description, "content": _content(reply.body)}


def _parameter(param: Param) -> dict[str, Any]:
    if isinstance(param, PathId):
        schema: dict[str, Any] = {"type": "string", "format": "uuid"}
        return {"name": param.name, "in": "path", "required": True, "schema": schema}
    if isinstance(param, QueryText):
        schema = {"type": "string"} if param.choices is None else _type_schema(param.choices)
    elif param.integer:
        schema = {
            "type": "integer",
            "minimum": int(param.minimum),
            "maximum": int(param.maximum),
            "default": int(param.default),
        }
    else:
        schema = {
            "type": "number",
            "minimum": param.minimum,
            "maximum": param.maximum,
            "default": param.default,
        }
    return {"name": param.name, "in": "query", "required": False, "schema": schema}


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": endpoint.operation_id,
    }
    if endpoint.params:
        operation["parameters"] = [_parameter(p) for p in endpoint.params]
    if endpoint.body is not None:
        # Bytes may be empty (an empty blob is a blob); a JSON body may not.
        required = endpoint.body != BYTES
        operation["requestBody"] = {"required": required, "content": _content(endpoint.body)}
    operation["responses"] = {str(code): _reply(r) for code, r in endpoint.replies.items()}
    if endpoint.roles == PUBLIC:
        operation["security"] = []
        return operation
    roles = sorted(endpoint.roles | {Role.ADMIN})
    # Requirement objects are alternatives; the roles inside one are all needed.
    operation["security"] = [{_SECURITY_SCHEME: [role.value]} for role in roles]
    operation["description"] = (
        "On a server with API keys, needs a key with the role "
        + " or ".join(f"`{role.value}`" for role in roles)
        + "."
    )
    operation["responses"].setdefault("401", _reply(_UNAUTHORIZED))
    if endpoint.roles != ANY_ROLE:
        operation["responses"].setdefault("403", _reply(_FORBIDDEN))
    return operation


_SECURITY_SCHEME = "apiKey"
_UNAUTHORIZED = Reply(
    description="The server has API keys and the request carries none of them.", body="Error"
)
_FORBIDDEN = Reply(description="The API key lacks the role this needs.", body="Error")


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
    schemas["LogsAccepted"] = {
        "type": "object",
        "properties": {
            "stored": {"type": "integer", "minimum": 0},
            "dropped": {"type": "integer", "minimum": 0},
            "unknown": {"type": "integer", "minimum": 0},
        },
        "required": ["stored", "dropped", "unknown"],
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
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trio_taskworker server",
            "version": __version__,
            "description": "REST API of the trio_taskworker server. Workers subscribe over"
            " the websocket at /subscribe (see the protocol page of the docs).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                _SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key of the server, as `Authorization: Bearer KEY`."
                    " Only asked for when the server was started with API keys.",
                }
            },
        },
    }
