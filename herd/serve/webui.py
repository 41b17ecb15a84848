"""The chat page `herd serve` answers at `/` (`--no-webui` turns it off): one static HTML page, its script and its
style sheet, read from herd/serve/static/ and sent as they are (no build step, nothing fetched from elsewhere).
It knows nothing of models or of the API: the page talks to /v1 like any other client."""
from __future__ import annotations

from pathlib import Path

from fastapi.responses import Response

from .schemas import APIError

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The page's own script and style only, images from data:/blob: URLs (attachments), requests to this server only.
# Defence in depth: the page never turns model text into HTML, and were it to, no script from it could run.
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
          "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


async def chat_page():
    return _send("index.html", "text/html; charset=utf-8")


async def webui_asset(name: str):
    if name not in ASSETS:
        raise APIError(404, f"no web UI file {name!r}; the page's files are {', '.join(ASSETS)}",
                       type="not_found_error")
    return _send(name, ASSETS[name])


def _send(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=HEADERS)
