"""What the HTTP server accepts (``ServerLimits``) and from whom (``Access``), and the uvicorn set-up that
enforces the connection-level limits.

uvicorn closes a connection that stays idle ``timeout_keep_alive`` seconds after a response and answers
503 once ``limit_concurrency`` connections are open, but it waits forever for the headers of a request
that is sent slowly (or never). ``_timed_protocol`` adds that: a connection must deliver a request's
headers within ``header_timeout`` seconds of opening, or of its first byte after the previous response,
else it is closed. A request's body must arrive within ``body_timeout`` (checked where it is read:
``server.read_body``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

#: Host header names that always reach the server (with the address it listens on).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Bind addresses that listen on every interface.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 8 * 2**20  # a request body (413 beyond)
    max_prompt_chars: int = 1_000_000  # characters of text prompts or message contents in one request
    max_prompts_per_request: int = 64  # prompts in one /v1/completions request
    default_max_tokens: int = 1024  # chat requests without max_tokens (capped by the context)
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    body_timeout: float = 60.0  # seconds for a request's body to arrive (408 beyond)
    timeout_keep_alive: float = 5.0  # seconds an idle connection is kept open
    limit_concurrency: int | None = 512  # open connections (503 beyond); None: no limit

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_prompts_per_request", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("header_timeout", "body_timeout", "timeout_keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError("limit_concurrency must be at least 1")


@dataclass(frozen=True)
class Access:
    """Who may use the server: ``api_key`` (None: anyone) is required as ``Authorization: Bearer KEY`` on
    every /v1 route; the Host header must name one of ``allowed_hosts`` (``*``: any) or be an IP address.

    Checking the Host header stops DNS rebinding (a web page whose name resolves to 127.0.0.1 reaching
    the server from the user's browser); an IP address in it cannot come from that attack."""

    api_key: str | None = None
    allowed_hosts: frozenset[str] = field(default_factory=lambda: frozenset(LOCAL_HOSTS))

    @classmethod
    def for_bind(cls, host: str, extra: list[str] | None = None, api_key: str | None = None) -> Access:
        """The default for a server listening on ``host``: local names, ``host`` itself and ``extra``."""
        names = {*LOCAL_HOSTS, *(h.strip().lower() for h in extra or [] if h.strip())}
        if host not in WILDCARD_HOSTS:
            names.add(host.lower())
        return cls(api_key=api_key or None, allowed_hosts=frozenset(names))

    def host_allowed(self, header: str | None) -> bool:
        if header is None or "*" in self.allowed_hosts:
            return True  # HTTP/1.0 without a Host header: not a browser
        name = _host_name(header)
        if name is None:
            return False
        if name in self.allowed_hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def _host_name(header: str) -> str | None:
    """``Example.COM:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``; None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        if end < 0 or (header[end + 1 :] and not header[end + 1 :].startswith(":")):
            return None
        return header[1:end]
    name, _, port = header.partition(":")
    if port and not port.isdigit():
        return None
    return name.rstrip(".") or None


def _timed_protocol(header_timeout: float) -> type:
    """uvicorn's HTTP protocol class, closing a connection whose request headers do not arrive within
    ``header_timeout`` seconds (see the module docstring)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class TimedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        _header_timer: Any = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting_for_headers():
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting_for_headers(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

    return TimedHTTPProtocol


def uvicorn_config(app, host: str, port: int, limits: ServerLimits, log_level: str = "info", **kwargs):
    """The ``uvicorn.Config`` serving ``app`` with ``limits``' connection-level limits."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=_timed_protocol(limits.header_timeout),
        timeout_keep_alive=limits.timeout_keep_alive,  # type: ignore[arg-type]
        limit_concurrency=limits.limit_concurrency,
        lifespan="on",
        **kwargs,
    )
