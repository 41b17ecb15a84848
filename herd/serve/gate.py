"""The ASGI gate in front of the routes: a request's API key, then its body's size, checked before anything reads or
parses the body. FastAPI parses a body before it runs a route's dependencies, so without the gate a caller with no
key got a 400 for malformed JSON (not a 401), and any body, however large, was read into memory and parsed on the
event loop. It knows nothing of routes beyond the `needs_key` test it is given, nor of what a body holds."""
from __future__ import annotations

from typing import Awaitable, Callable

from .schemas import APIError


class Gate:
    """check_key(scope): the API key's verdict on a request, an APIError to answer or None to let it through.
    flag: the `herd serve` flag that sets max_body_bytes, named in the 413."""

    def __init__(self, app, check_key: Callable[[dict], APIError | None], max_body_bytes: int, flag: str):
        self.app, self.check_key, self.max_body, self.flag = app, check_key, max_body_bytes, flag

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.check_key(scope)
        if refused is None:
            refused = self._declared_too_large(scope)
        if refused is not None:
            return await refused.response()(scope, receive, send)
        body, refused = await self._read_body(receive)
        if refused is not None:
            return await refused.response()(scope, receive, send)
        if body is not None:                            # None: the client went away while sending it
            await self.app(scope, _replay(body, receive), send)

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body is {size}; this server takes at most {self.max_body} bytes "
                             f"(herd serve {self.flag})", code="request_too_large")

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
