"""JSON for the wire (cattrs) and pickles for payloads (cloudpickle).

The server uses only the JSON half. It never calls :func:`loads_payload`:
payloads are opaque bytes to it. With ``TRIO_TASKWORKER_SIGNING_KEY`` set,
payloads are signed and checked before unpickling (see :func:`loads_payload`).
This module imports no I/O library.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import hashlib
import hmac
import json
import os
import typing
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
import cattrs
import cloudpickle
import orjson
from cattrs.fns import identity
from cattrs.strategies import configure_tagged_union
from cattrs.v import format_exception

from ._exceptions import SerializationError
from ._models import (
    Cancel,
    Credit,
    Deliver,
    Drain,
    Drained,
    Finished,
    Heartbeat,
    Rejected,
    Released,
    ReturnWhen,
    ServerMessage,
    Started,
    Subscribe,
    Subscribed,
    TaskRunCreate,
    TaskRunCreateBatch,
    WorkerMessage,
)
from ._states import TaskRunState

__all__ = [
    "SIGNING_KEY_ENV",
    "InvalidPayload",
    "converter",
    "create_batch_json",
    "decode_server_frame",
    "decode_worker_frame",
    "dumps_payload",
    "encode_frame",
    "from_json",
    "loads_payload",
    "signing_keys",
    "to_json",
]

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True)


class InvalidPayload(ValueError):
    """JSON that does not fit the expected shape; the message says where."""


def _structure_uuid(value: object, _: type) -> uuid.UUID:
    if not isinstance(value, str):
        raise ValueError(f"expected a UUID string, got {type(value).__name__}")
    return uuid.UUID(value)


# A time the server stores (UNIX seconds) and adds delays of up to a century to.
_FIRST_YEAR = 1970
_LAST_YEAR = 9000


def _structure_datetime(value: object, _: type) -> datetime.datetime:
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 string, got {type(value).__name__}")
    parsed = datetime.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"datetime {value!r} has no timezone")
    try:
        year = parsed.astimezone(datetime.UTC).year
    except OverflowError:
        year = 0
    if not _FIRST_YEAR <= year <= _LAST_YEAR:
        raise ValueError(
            f"datetime {value!r} is not between the years {_FIRST_YEAR} and {_LAST_YEAR} UTC"
        )
    return parsed


def _structure_bytes(value: object, _: type) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64: {exc}") from None


#: The longest string any field may hold, in characters (a traceback is the
#: longest there is); fields with tighter rules check them in their model.
MAX_TEXT = 1_000_000


def _structure_str(value: object, _: type) -> str:
    # cattrs would turn 5 into "5"; a wrong type is a client bug worth reporting.
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"a string of {len(value)} characters is longer than {MAX_TEXT}")
    if not value.isascii():  # ASCII, the common case, cannot hold a surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string is not valid Unicode (a lone surrogate)") from None
    return value


def _structure_int(value: object, _: type) -> int:
    if isinstance(value, float) and value.is_integer():
        # JSON has one number type: 776.0 is the integer 776 (as JSON Schema
        # says). The parser reads an integer past 64 bits as a float, and a
        # float from 2**53 on may stand for several integers: none is taken.
        if not -(2.0**63) < value < 2.0**63:
            raise ValueError("an integer does not fit in 64 bits")
        if abs(value) >= 2.0**53:
            raise ValueError("from 2**53 on, write an integer with no fraction or exponent")
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError("an integer does not fit in 64 bits")
    return value


def _structure_bool(value: object, _: type) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {type(value).__name__}")
    return value


def _structure_float(value: object, _: type) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return float(value)


converter.register_structure_hook(uuid.UUID, _structure_uuid)
converter.register_unstructure_hook(uuid.UUID, str)
converter.register_structure_hook(datetime.datetime, _structure_datetime)
converter.register_unstructure_hook(datetime.datetime, lambda d: d.isoformat())
converter.register_structure_hook(bytes, _structure_bytes)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


converter.register_unstructure_hook(bytes, _b64)
converter.register_structure_hook(str, _structure_str)
# Registered after str: TaskRunState is a str subclass and must not fall to that hook.
converter.register_structure_hook(TaskRunState, lambda value, _: TaskRunState(value))
converter.register_structure_hook(ReturnWhen, lambda value, _: ReturnWhen(value))
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(bool, _structure_bool)


def _structure_strings(value: object, _: type) -> tuple[str, ...]:
    # cattrs would iterate a string (or a dict's keys) into a tuple of them.
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    return tuple(_structure_str(item, str) for item in value)


converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_strings)


def _is_list_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _structure_tuple(value: object, tp: Any) -> tuple[Any, ...]:
    # cattrs would take any iterable: a dict's keys, a string's characters.
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    item = typing.get_args(tp)[0]
    return tuple(converter.structure(element, item) for element in value)


converter.register_structure_hook_func(
    lambda t: _is_list_tuple(t) and t != tuple[str, ...], _structure_tuple
)
converter.register_structure_hook(float, _structure_float)

_WORKER_TAGS = {
    Subscribe: "subscribe",
    Credit: "credit",
    Started: "started",
    Finished: "finished",
    Released: "released",
    Drain: "drain",
    Heartbeat: "heartbeat",
}
_SERVER_TAGS = {
    Subscribed: "subscribed",
    Deliver: "deliver",
    Rejected: "rejected",
    Cancel: "cancel",
    Drained: "drained",
}
configure_tagged_union(
    WorkerMessage, converter, tag_generator=lambda cls: _WORKER_TAGS[cls], tag_name="type"
)
configure_tagged_union(
    ServerMessage, converter, tag_generator=lambda cls: _SERVER_TAGS[cls], tag_name="type"
)


def _wire_datetime(value: datetime.datetime) -> datetime.datetime | str:
    # orjson writes a UTC datetime as isoformat() does; an offset with seconds
    # it would round to the minute, so any other zone is written here.
    return value if value.tzinfo is datetime.UTC else value.isoformat()


#: What :func:`to_json` and :func:`encode_frame` unstructure with: the same
#: hooks, except that UUIDs and UTC datetimes are left to orjson, which
#: writes them as ``str()`` and ``isoformat()`` do, in a fraction of the time
#: (a run's JSON in 3.5 us instead of 7.4).
_wire = converter.copy()
_wire.register_unstructure_hook(uuid.UUID, identity)
_wire.register_unstructure_hook(datetime.datetime, _wire_datetime)


def _format_leaf(exc: BaseException, type_: type | None) -> str:
    # Our hooks raise ValueError with a precise reason; keep it.
    if isinstance(exc, ValueError) and str(exc):
        return str(exc)
    return format_exception(exc, type_)


def _describe(exc: Exception) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc, format_exception=_format_leaf))
    return str(exc)


#: What cattrs and the models' checks raise for data that does not fit.
_STRUCTURE_ERRORS = (cattrs.BaseValidationError, ValueError, TypeError, KeyError, AttributeError)

#: Whether a type is an attrs class, remembered (``attrs.has`` per message
#: showed in profiles); the types are the code's own, a few dozen.
_is_attrs: Callable[[Any], bool] = functools.cache(attrs.has)


def structure(data: Any, cls: type[T]) -> T:
    """Build ``cls`` from JSON-ready data; raise :class:`InvalidPayload` with a reason."""
    if _is_attrs(cls) and not isinstance(data, dict):
        raise InvalidPayload(f"expected a JSON object, got {type(data).__name__}")
    try:
        return converter.structure(data, cls)
    except _STRUCTURE_ERRORS as exc:
        raise InvalidPayload(_describe(exc)) from None


def _dumps(build: Callable[[cattrs.Converter], Any]) -> bytes:
    """The JSON of ``build(converter)``: orjson's, with :data:`_wire`.

    orjson refuses a string that is not valid Unicode (a lone surrogate, as
    ``os.fsdecode`` makes of a bad file name). Such data is encoded by the
    json module instead, which escapes it, and whoever receives it refuses it
    with a reason (a 422, a close code), as before orjson.
    """
    try:
        return orjson.dumps(build(_wire))
    except orjson.JSONEncodeError:
        return json.dumps(build(converter), separators=(",", ":")).encode()


def to_json(value: Any, **replace: Any) -> bytes:
    """Encode an attrs value as compact JSON bytes (UTF-8); ``replace`` sets
    fields of its JSON object to these JSON-ready values instead."""

    def build(using: cattrs.Converter) -> Any:
        data = using.unstructure(value)
        if replace:
            unknown = replace.keys() - data.keys()
            if unknown:
                raise KeyError(f"{type(value).__name__} has no field {sorted(unknown)}")
            data.update(replace)
        return data

    return _dumps(build)


def create_batch_json(
    batch: TaskRunCreateBatch, parameters: Sequence[tuple[bytes | None, str | None]]
) -> bytes:
    """The JSON of ``batch`` with each run's parameters replaced: ``(inline,
    ref)`` pairs in the runs' order. The same bytes as :func:`to_json` of the
    batch with each run evolved, without building every run again (``map``
    sends thousands)."""

    def build(using: cattrs.Converter) -> Any:
        unstructure = using.get_unstructure_hook(TaskRunCreate)
        runs = []
        for create, (inline, ref) in zip(batch.runs, parameters, strict=True):
            run = unstructure(create)
            run["parameters"] = None if inline is None else _b64(inline)
            run["parameters_ref"] = ref
            runs.append(run)
        return {"runs": runs}

    return _dumps(build)


def _load_json(data: bytes | str) -> Any:
    """Parse JSON strictly (orjson): no NaN or Infinity, no number that
    overflows a double, no lone surrogate, valid UTF-8, and at most 1,024
    levels of nesting."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(f"not valid JSON: {_reason(exc)}") from None


def _reason(exc: orjson.JSONDecodeError) -> str:
    if exc.msg.startswith("depth limit exceeded"):
        return "nested too deeply"
    if exc.msg.startswith("str is not valid UTF-8"):
        return "not valid UTF-8 (JSON must be UTF-8, without a byte order mark)"
    text = str(exc.doc)  # orjson gives the document as str (empty when not UTF-8)
    for constant in _CONSTANTS:
        if text.startswith(constant, exc.pos):
            return f"{constant} is not a JSON number (at character {exc.pos})"
    return str(exc)


#: What Python's own json module would have read as numbers.
_CONSTANTS = ("NaN", "Infinity", "-Infinity")


def from_json(data: bytes | str, cls: type[T]) -> T:
    """Decode JSON into ``cls``; raise :class:`InvalidPayload` with a reason."""
    return structure(_load_json(data), cls)


def encode_frame(messages: Sequence[WorkerMessage] | Sequence[ServerMessage]) -> str:
    """Encode a websocket frame: a JSON array of tagged messages."""
    union = WorkerMessage if isinstance(messages[0], tuple(_WORKER_TAGS)) else ServerMessage
    return _dumps(lambda using: [using.unstructure(m, union) for m in messages]).decode()


_WORKER_TYPES = {tag: cls for cls, tag in _WORKER_TAGS.items()}
_SERVER_TYPES = {tag: cls for cls, tag in _SERVER_TAGS.items()}


def _decode_frame(data: str | bytes, union: Any, types: dict[str, type]) -> list[Any]:
    raw = _load_json(data)
    if not isinstance(raw, list) or not raw:
        raise InvalidPayload("a frame must be a non-empty JSON array of messages")
    messages: list[Any] = []
    for item in raw:
        # Straight to the message's class by its tag (the union's own dispatch
        # cost a fifth of decoding a report); anything the class refuses goes
        # through the union, whose error says what is wrong.
        tag = item.get("type") if isinstance(item, dict) else None
        cls = types.get(tag) if isinstance(tag, str) else None
        if cls is not None:
            body = dict(item)
            del body["type"]
            try:
                messages.append(converter.structure(body, cls))
                continue
            except _STRUCTURE_ERRORS:
                pass
        messages.append(structure(item, union))
    return messages


def decode_worker_frame(data: str | bytes) -> list[WorkerMessage]:
    """Decode a frame sent by a worker."""
    return _decode_frame(data, WorkerMessage, _WORKER_TYPES)


def decode_server_frame(data: str | bytes) -> list[ServerMessage]:
    """Decode a frame sent by the server."""
    return _decode_frame(data, ServerMessage, _SERVER_TYPES)


#: The environment variable with the payload signing keys, comma-separated: the
#: first signs, and a payload signed with any of them verifies (key rotation).
SIGNING_KEY_ENV = "TRIO_TASKWORKER_SIGNING_KEY"

# A signed payload is _SIGNED_HEADER (magic, then a version byte), a 32-byte
# HMAC-SHA256 tag of the header and the pickle, then the pickle. cloudpickle
# writes protocol 5, whose first byte is 0x80, so an unsigned payload never
# starts with the magic.
_SIGNED_MAGIC = b"TTWS"
_SIGNED_VERSION = 1
_SIGNED_HEADER = _SIGNED_MAGIC + bytes([_SIGNED_VERSION])
_TAG_SIZE = hashlib.sha256().digest_size


def signing_keys() -> tuple[bytes, ...]:
    """The keys in ``TRIO_TASKWORKER_SIGNING_KEY``, read now; empty when it is unset or blank.

    Read at each call, not at import, so a test or a process that sets the
    variable late is obeyed. Spaces around each key are ignored, as are empty
    entries; a key is the bytes the environment gave.
    """
    raw = os.environ.get(SIGNING_KEY_ENV, "")
    # surrogateescape: the variable's own bytes, even where they are not UTF-8.
    return tuple(
        key.strip().encode("utf-8", "surrogateescape") for key in raw.split(",") if key.strip()
    )


def _tag(key: bytes, pickled: bytes | memoryview) -> bytes:
    mac = hmac.new(key, _SIGNED_HEADER, hashlib.sha256)
    mac.update(pickled)
    return mac.digest()


def dumps_payload(value: object) -> bytes:
    """Pickle a payload with cloudpickle; raise :class:`SerializationError` if it cannot.

    With ``TRIO_TASKWORKER_SIGNING_KEY`` set, the pickle is signed with its
    first key (HMAC-SHA256) in a small envelope that :func:`loads_payload` checks.
    """
    try:
        pickled = bytes(cloudpickle.dumps(value))
    except Exception as exc:
        raise SerializationError(f"cannot pickle {type(value).__name__}: {exc}") from exc
    keys = signing_keys()
    if not keys:
        return pickled
    return b"".join((_SIGNED_HEADER, _tag(keys[0], pickled), pickled))


def _verified(data: bytes, keys: tuple[bytes, ...], what: str) -> bytes | memoryview:
    """The pickle inside ``data``, once its signature is checked; never unpickles."""
    refusing = f"refusing to unpickle the {what}"
    signed = data.startswith(_SIGNED_MAGIC)
    if not keys:
        if signed:
            raise SerializationError(
                f"{refusing}: it is signed with a {SIGNING_KEY_ENV}, and this process has"
                f" none to verify it with (give every submitter and worker the same key)"
            )
        return data
    if not signed:
        raise SerializationError(
            f"{refusing}: it is not signed, and this process requires a signature"
            f" ({SIGNING_KEY_ENV} is set; give every submitter and worker the same key)"
        )
    if len(data) < len(_SIGNED_HEADER) + _TAG_SIZE:
        raise SerializationError(f"{refusing}: its signed envelope is truncated")
    version = data[len(_SIGNED_MAGIC)]
    if version != _SIGNED_VERSION:
        raise SerializationError(
            f"{refusing}: it is signed in envelope version {version}, and this"
            f" trio_taskworker reads version {_SIGNED_VERSION}"
        )
    tag = data[len(_SIGNED_HEADER) : len(_SIGNED_HEADER) + _TAG_SIZE]
    pickled = memoryview(data)[len(_SIGNED_HEADER) + _TAG_SIZE :]
    # Every key is tried, so a payload signed before a rotation still verifies.
    if not any(hmac.compare_digest(tag, _tag(key, pickled)) for key in keys):
        raise SerializationError(
            f"{refusing}: it is not signed with this process's {SIGNING_KEY_ENV}"
            f" (forged or altered, or signed with another key)"
        )
    return pickled


def loads_payload(data: bytes, *, what: str = "payload") -> Any:
    """Unpickle a payload. Only clients and workers call this, never the server.

    With ``TRIO_TASKWORKER_SIGNING_KEY`` set, a payload without a valid
    signature from one of its keys is refused; without it, a signed payload is
    refused too, since it cannot be checked. Either way the signature is
    checked before anything is unpickled. ``what`` names the payload
    ("parameters", "result") in the messages. Raises
    :class:`SerializationError` if the payload is refused or cannot be unpickled.
    """
    pickled = _verified(data, signing_keys(), what)
    try:
        return cloudpickle.loads(pickled)
    except Exception as exc:
        raise SerializationError(f"cannot unpickle {what}: {exc}") from exc
