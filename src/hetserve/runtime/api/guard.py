"""The checks every HTTP request passes before a route sees it, and the last resort for errors.

In order: the Host header (``Access.host_allowed``: 400), the API key on /v1 routes (401), a JSON
content type on POST (415: a web page can send ``text/plain`` or form bodies cross-site without the
browser asking the server first, but not ``application/json``), a declared ``Content-Length`` within
``max_body_bytes`` (413; a body without one is counted as it is read). An exception that escapes a
route becomes a 500 with a fixed message (the details go to the log), answered on the same
connection, which stays open.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from .limits import Access, ServerLimits
from .protocol import APIError

log = logging.getLogger("hetserve.serve")

INTERNAL_ERROR = "internal server error (the server log has the details)"


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> tuple[int, list, bytes]:
    body = json.dumps(exc.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return exc.status, raw, body


class Guard:
    """Pure ASGI middleware (it does not buffer streamed responses)."""

    def __init__(self, app, access: Access, limits: ServerLimits):
        self.app, self.access, self.limits = app, access, limits
        self._key = access.api_key.encode() if access.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._check(scope)
        if refused is not None:
            await _send(send, *error_response(*refused))
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send(send, *error_response(APIError(500, INTERNAL_ERROR, type="server_error")))
            # a response already under way (a stream) just ends; its client sees the stream stop

    def _check(self, scope) -> tuple[APIError, dict[str, str]] | None:
        headers = _headers(scope)
        host = headers.get("host")
        if not self.access.host_allowed(host):
            return (
                APIError(
                    400,
                    f"the Host header {host[:100]!r} is not one this server answers to; start the server "
                    "with --allowed-hosts NAME to accept it",
                    code="host_not_allowed",
                ),
                {},
            )
        path = scope.get("path", "")
        if self._key is not None and (path == "/v1" or path.startswith("/v1/")):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
                return (
                    APIError(
                        401,
                        "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                        code="invalid_api_key",
                    ),
                    {"WWW-Authenticate": "Bearer"},
                )
        if scope.get("method") == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return (
                    APIError(
                        415,
                        "the request body must be JSON, sent with the header 'Content-Type: application/json'"
                        + (f" (got {media[:60]!r})" if media else ""),
                        code="unsupported_media_type",
                    ),
                    {},
                )
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
                return (body_too_large(self.limits.max_body_bytes), {"Connection": "close"})
        return None


def body_too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than this server's limit of {limit} bytes", code="body_too_large"
    )


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _send(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
