"""The dashboard's files, served at ``/ui/`` from the package (no build step, no CDN).

The files under ``ui/`` are read once, when the app is built, into a map from
their path to their bytes: a request can name only a file that is there, so no
path from a client ever reaches the file system. Every answer carries a
Content-Security-Policy that allows only the server's own scripts, styles and
API (no inline script or style, no other origin), so text the dashboard shows
from runs (task keys, logs, tracebacks) cannot run as code even if a bug put it
into the page as markup.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ._routes import UI_PREFIX

__all__ = ["CONTENT_SECURITY_POLICY", "UI_DIR", "ui_routes"]

UI_DIR = Path(__file__).parent / "ui"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new version of the package must show at once, not after a cache expires.
    "Cache-Control": "no-cache",
}


def _load(root: Path) -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                if media_type.startswith("text/") or media_type.endswith("javascript"):
                    media_type += "; charset=utf-8"
                files[path.relative_to(root).as_posix()] = (path.read_bytes(), media_type)
    return files


def ui_routes(root: Path = UI_DIR) -> list[BaseRoute]:
    """The routes that serve the files under ``root`` at :data:`UI_PREFIX`."""
    files = _load(root)

    async def redirect(request: Request) -> Response:
        return RedirectResponse(f"{UI_PREFIX}/", status_code=308)

    async def serve(request: Request) -> Response:
        name = request.path_params["path"] or "index.html"
        found = files.get(name)
        if found is None:
            return JSONResponse({"detail": f"no file {name!r} in the dashboard"}, 404)
        body, media_type = found
        return Response(body, media_type=media_type, headers=_HEADERS)

    return [
        Route(UI_PREFIX, redirect, methods=["GET", "HEAD"]),
        Route(f"{UI_PREFIX}/{{path:path}}", serve, methods=["GET", "HEAD"]),
    ]
