"""The ASGI layers in front of the routes: body size limit, API key, and request metrics. Pure
ASGI rather than BaseHTTPMiddleware, so streamed answers pass through untouched."""
from __future__ import annotations

import hmac
import time

from ragrt.serve.http_errors import error
from ragrt.serve.metrics import Metrics


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, by Content-Length when sent and by
    counting otherwise, so an oversized upload is never held in memory whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, receive, send)
        seen, over = 0, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _TooLarge
            return message

        async def guarded(message):
            # The framework turns a failed body read into its own error response; ours replaces it.
            if not over:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._refuse(scope, receive, send)

        try:
            await self.app(scope, counted, guarded)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = error(413, f"the request body is over {self.limit} bytes", "request_too_large")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class Auth:
    """Bearer-key check in front of every route but the `open` ones; with no key, everything passes."""

    def __init__(self, app, key: str | None, open: frozenset[str]):
        self.app, self.key, self.open = app, key, open

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or scope["path"] in self.open:
            return await self.app(scope, receive, send)
        # The scheme is case-insensitive (RFC 7235): "bearer KEY" is as good as "Bearer KEY".
        scheme, _, credentials = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(b" "), self.key.encode()):
            return await self.app(scope, receive, send)
        response = error(401, "missing or wrong API key: send Authorization: Bearer KEY", "unauthorized",
                         {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class Observe:
    """Counts every request and times it to its last byte; unknown paths share one label."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - t0)
