"""API keys and roles: who may call which route, and who may listen where.

A server given API keys answers every HTTP request but the public routes
(``GET /health``) with ``401`` unless it carries ``Authorization: Bearer KEY``
for one of its keys, and with ``403`` when that key lacks every role the
route accepts (:attr:`~._routes.Endpoint.roles`). The ``/subscribe``
websocket is accepted and then closed with :data:`CLOSE_UNAUTHORIZED` or
:data:`CLOSE_FORBIDDEN` and a reason, so that the worker can say why it stops
(a refused handshake would reach it as a bare HTTP status).

A key entry is written ``KEY`` (every role) or ``KEY:ROLE+ROLE`` with roles
from :class:`~._routes.Role`; several entries are separated by commas::

    s3cr3t-for-the-web-app:submit,s3cr3t-for-the-workers:work,s3cr3t-for-ops

A key is at least :data:`MIN_KEY_LENGTH` characters of the RFC 6750 token
alphabet (letters, digits, ``-._~+/`` and a trailing ``=``), so that it fits in
a header unchanged and cannot be confused with the separators.

Keys are compared in constant time: the presented key's SHA-256 digest is
compared with every configured key's digest by :func:`hmac.compare_digest`,
all of them, whatever matches, so neither the length of a key nor which one
matched shows in the time an answer takes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from typing import Any

import attrs
from starlette.responses import JSONResponse

from .._exceptions import ConfigurationError
from ._routes import ANY_ROLE, ENDPOINTS, PUBLIC, UI_PREFIX, Role

__all__ = [
    "CLOSE_FORBIDDEN",
    "CLOSE_UNAUTHORIZED",
    "MIN_KEY_LENGTH",
    "ApiKey",
    "Authenticate",
    "KeyRing",
    "Refusal",
    "exposure_problem",
    "is_loopback",
    "key_ring",
]

#: Websocket close codes (in the 4000s, the application's own range, which the
#: worker treats as fatal): no valid key, and a valid key without the role.
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
#: Shorter keys are refused: they could be guessed by trying.
MIN_KEY_LENGTH = 16

_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_BEARER = re.compile(r"bearer[ \t]+([^ \t]*)[ \t]*", re.IGNORECASE)
_ENV_HINT = "trio_taskworker clients and workers send TRIO_TASKWORKER_API_KEY"


def _digest(secret: str) -> bytes:
    # latin-1: how ASGI servers decode header bytes, so any header round-trips.
    return hashlib.sha256(secret.encode("latin-1", "replace")).digest()


@attrs.frozen(kw_only=True)
class ApiKey:
    """One configured key: the digest of its secret (never the secret) and its roles."""

    digest: bytes = attrs.field(repr=False)
    roles: frozenset[Role]


def _parse_entry(entry: str, position: int) -> ApiKey:
    # Errors name the entry by position, never by its text: that is the secret.
    secret, sep, role_text = entry.strip().partition(":")
    where = f"API key #{position}"
    if not secret:
        raise ConfigurationError(f"{where} is empty")
    if not _TOKEN68.fullmatch(secret):
        raise ConfigurationError(
            f"{where} may only hold letters, digits, '-._~+/' and a trailing '='"
        )
    if len(secret) < MIN_KEY_LENGTH:
        raise ConfigurationError(
            f"{where} is {len(secret)} characters; use at least {MIN_KEY_LENGTH}, for example"
            ' python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    if not sep:
        return ApiKey(digest=_digest(secret), roles=ANY_ROLE)
    roles = set()
    for name in role_text.split("+"):
        try:
            roles.add(Role(name.strip().lower()))
        except ValueError:
            raise ConfigurationError(
                f"{where} names an unknown role {name!r}; the roles are "
                + ", ".join(r.value for r in Role)
            ) from None
    if Role.ADMIN in roles:
        roles.update(Role)
    return ApiKey(digest=_digest(secret), roles=frozenset(roles))


@attrs.frozen
class KeyRing:
    """The server's API keys. Empty (the default), every request is let through."""

    keys: tuple[ApiKey, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> KeyRing:
        """Parse ``KEY`` or ``KEY:ROLE+ROLE`` entries, each possibly a comma-separated list.

        Raises :class:`ConfigurationError` for a malformed or repeated key,
        without quoting the key.
        """
        keys: list[ApiKey] = []
        for text in entries:
            for part in text.split(","):
                if not part.strip() and "," in text:
                    continue  # a trailing comma in an environment variable
                key = _parse_entry(part, len(keys) + 1)
                if any(hmac.compare_digest(key.digest, k.digest) for k in keys):
                    raise ConfigurationError(f"API key #{len(keys) + 1} repeats an earlier key")
                keys.append(key)
        return cls(tuple(keys))

    @property
    def enabled(self) -> bool:
        """True when the server has keys, and so refuses requests without one."""
        return bool(self.keys)

    def roles_for(self, authorization: str | None) -> frozenset[Role] | None:
        """The roles of the key in an ``Authorization`` header; None when none matches."""
        if authorization is None:
            return None
        match = _BEARER.fullmatch(authorization)
        if match is None:
            return None
        presented = _digest(match.group(1))
        found: frozenset[Role] | None = None
        for key in self.keys:  # every key, even after a match: constant time
            if hmac.compare_digest(presented, key.digest):
                found = key.roles
        return found

    def check(self, authorization: str | None, needed: frozenset[Role]) -> Refusal | None:
        """Why a request with this ``Authorization`` header may not call a route
        that accepts ``needed``; None when it may."""
        if not self.enabled or needed == PUBLIC:
            return None
        roles = self.roles_for(authorization)
        if roles is None:
            if authorization is None:
                return Refusal(
                    status=401,
                    detail="this server needs an API key: send 'Authorization: Bearer <key>'"
                    f" ({_ENV_HINT})",
                    challenge="Bearer",
                    close_reason="no API key; set TRIO_TASKWORKER_API_KEY",
                )
            return Refusal(
                status=401,
                detail="the API key is not valid (expected 'Authorization: Bearer <key>')",
                challenge='Bearer error="invalid_token"',
                close_reason="the API key is not valid",
            )
        if roles & needed:
            return None
        # Not "or 'admin'": that holds every role, and is no advice to a worker.
        names = " or ".join(sorted(f"'{r.value}'" for r in needed))
        return Refusal(
            status=403,
            detail=f"this API key lacks the role this needs: {names}",
            challenge='Bearer error="insufficient_scope"',
            close_reason=f"this API key lacks the role {names}",
        )


def key_ring(value: KeyRing | str | Iterable[str]) -> KeyRing:
    """A :class:`KeyRing` from itself, one entry string, or several (a converter)."""
    if isinstance(value, KeyRing):
        return value
    if isinstance(value, str):
        value = [value]
    return KeyRing.parse(value)


@attrs.frozen(kw_only=True)
class Refusal:
    """A request turned away: ``status`` (401 or 403) with ``detail`` over HTTP,
    ``close_code`` with ``close_reason`` on the websocket."""

    status: int
    detail: str
    #: The ``WWW-Authenticate`` header (RFC 6750).
    challenge: str
    close_reason: str

    @property
    def close_code(self) -> int:
        return CLOSE_UNAUTHORIZED if self.status == 401 else CLOSE_FORBIDDEN

    def response(self) -> JSONResponse:
        """The HTTP answer: ``{"detail": ...}`` with the ``WWW-Authenticate`` challenge."""
        return JSONResponse(
            {"detail": self.detail},
            status_code=self.status,
            headers={"www-authenticate": self.challenge},
        )


#: Paths where every method is public: no key is asked for on them.
_PUBLIC_PATHS = frozenset(
    {e.path for e in ENDPOINTS} - {e.path for e in ENDPOINTS if e.roles != PUBLIC}
)

_Scope = dict[str, Any]


def _is_public(path: str) -> bool:
    """True for the public endpoints and the dashboard's files (see ``_ui``)."""
    return path in _PUBLIC_PATHS or path == UI_PREFIX or path.startswith(f"{UI_PREFIX}/")


class Authenticate:
    """ASGI middleware: an HTTP request without a valid key gets 401 before routing.

    This is the outer gate, so an unknown path or a wrong method tells a
    caller without a key nothing either; each route then checks its own roles
    (403). Websockets pass through: their handler accepts, then closes with
    the refusal's code, so the reason reaches the worker.
    """

    def __init__(self, app: Any, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: _Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not _is_public(scope["path"]):
            refusal = self.keys.check(header(scope, b"authorization"), ANY_ROLE)
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def header(scope: _Scope, name: bytes) -> str | None:
    """The first ``name`` header of an ASGI scope (lower-case bytes), or None."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True when ``host`` (a bind address) reaches only this machine."""
    host = host.strip().strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that might resolve anywhere, or "" (every interface)


def exposure_problem(host: str, keys: KeyRing) -> str | None:
    """Why binding ``host`` with these keys exposes the server; None when it does not.

    Anyone who can open a connection can run code in the workers (parameters
    are pickles), so only loopback may go without a key.
    """
    if keys.enabled or is_loopback(host):
        return None
    return (
        f"listening on {host or 'every interface'} without an API key lets anyone who can"
        " reach the server run code in the workers"
    )
