"""The checks every HTTP request passes before a route sees it, and the last resort for errors.

In order: the Host header (``Access.host_allowed``: 400), then the API key on /v1 routes (401). (The
routes that take a body check its content type and size: ``server.read_body``.) An exception that
escapes a route becomes a 500 with a fixed message (the details go to the log), answered on the same
connection, which stays open.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from .limits import Access
from .protocol import APIError

log = logging.getLogger("hetserve.serve")

INTERNAL_ERROR = "internal server error (the server log has the details)"


def error_response(exc: APIError) -> tuple[int, list, bytes]:
    body = json.dumps(exc.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
    return exc.status, raw, body


class Guard:
    """Pure ASGI middleware (it does not buffer streamed responses)."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access
        self._key = access.api_key.encode() if access.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._check(scope)
        if refused is not None:
            await _send(send, *error_response(refused))
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

    def _check(self, scope) -> APIError | None:
        headers = _headers(scope)
        host = headers.get("host")
        if not self.access.host_allowed(host):
            return APIError(
                400,
                f"the Host header {str(host)[:100]!r} is not one this server answers to; start the server "
                "with --allowed-hosts NAME to accept it",
                code="host_not_allowed",
            )
        path = scope.get("path", "")
        if self._key is not None and (path == "/v1" or path.startswith("/v1/")):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
                return APIError(
                    401,
                    "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return None


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _send(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
