"""The ASGI gate in front of the routes: a request's API key, then its body's size and items, checked before anything
parses the body. FastAPI parses a body before it runs a route's dependencies, so without the gate a caller with no
key got a 400 for malformed JSON (not a 401), and any body, however large, was read into memory and parsed on the
event loop (json.loads: 1.4 s for 16 MB of small numbers). It also makes the app's Limits the request's
(limits.current), for the schemas' checks. It knows nothing of routes beyond the `check_key` it is given, nor of
what a body means."""
from __future__ import annotations

from typing import Awaitable, Callable

from . import limits as request_limits
from .limits import Limits, flag
from .schemas import APIError, maybe_surrogates


class Gate:
    """check_key(scope): the API key's verdict on a request, an APIError to answer or None to let it through."""

    def __init__(self, app, check_key: Callable[[dict], APIError | None], limits: Limits):
        self.app, self.check_key, self.limits = app, check_key, limits
        self.max_body = limits.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = None
        refused = self.check_key(scope) or self._declared_too_large(scope)
        if refused is None:
            body, refused = await self._read_body(receive)
            if body is None and refused is None:        # the client went away while sending it
                return
            refused = refused or self._too_many_items(body)
        if refused is not None:
            return await refused.response()(scope, receive, send)
        request_limits.current.set(self.limits)
        maybe_surrogates.set(b"\\ud" in body or b"\\uD" in body or b"\xed" in body)
        await self.app(scope, _replay(body, receive), send)

    def _too_many_items(self, body: bytes) -> APIError | None:
        """Values (commas) and objects ('{') of the JSON, give or take: C-speed counts, a few ms for 16 MB, that
        bound the work of parsing and validating it (strings inside count too: prose and base64 have few)."""
        for what, n, name in (("JSON values (commas)", body.count(b",") + 1, "max_body_items"),
                              ("JSON objects ('{')", body.count(b"{"), "max_body_objects")):
            if n > getattr(self.limits, name):
                return APIError(413, f"the request body holds about {n} {what}; this server parses at most "
                                     f"{getattr(self.limits, name)} (herd serve {flag(name)})",
                                code="request_too_large")
        return None

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body is {size}; this server takes at most {self.max_body} bytes "
                             f"(herd serve {flag('max_body_mb')})", code="request_too_large")

    def _declared_too_large(self, scope) -> APIError | None:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                return self._too_large(f"{int(value)} bytes")
        return None

    async def _read_body(self, receive) -> tuple[bytes | None, APIError | None]:
        """The whole body (what FastAPI would read anyway), counted as it arrives: a body sent in chunks with no
        Content-Length is refused as soon as it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":       # http.disconnect
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", self._too_large(f"over {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """A receive() that gives the app the body already read, then what the client sends next (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
