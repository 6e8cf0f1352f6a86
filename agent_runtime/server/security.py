"""ASGI middleware guarding the HTTP API: Host/Origin checks (DNS-rebinding protection), CORS for allowed
origins, Bearer API keys and request body limits. Pure ASGI so streaming responses pass through untouched."""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent_runtime.server.errors import APIError, too_large, unauthorized

log = structlog.get_logger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_MAX_BODY = 4 * 1024 * 1024


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str) -> str:
    """The name part of a Host header value (`[::1]:8000` -> `::1`, `localhost:80` -> `localhost`)."""
    value = host_header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(slots=True)
class SecuritySettings:
    """`bind_host` is the address the server listens on; bound beyond loopback, an API key is mandatory."""

    bind_host: str = "127.0.0.1"
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # extra Host names; "*" accepts any
    allowed_origins: tuple[str, ...] = ()  # extra origins (scheme://host[:port]); "*" accepts any
    max_body_bytes: int = DEFAULT_MAX_BODY
    public_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/health", "/ready"}))  # probes

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.bind_host)

    def problem(self) -> str | None:
        """Why these settings must not be served, or None."""
        if not self.loopback_only and not self.api_key:
            return f"binding to {self.bind_host} needs an API key"
        if self.max_body_bytes < 1024:
            return "max_body_bytes must be at least 1024"
        return None

    def host_allowed(self, host_header: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        if not host_header:
            return False
        name = _hostname(host_header)
        if name in (h.lower() for h in self.allowed_hosts):
            return True
        if self.loopback_only:
            # DNS rebinding: a browser page on evil.example resolving to 127.0.0.1 still sends its own Host.
            return is_loopback(name)
        # Bound to a real interface the key is the gate; any Host that reached us is acceptable.
        return True

    def origin_allowed(self, origin: str) -> bool:
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        return (
            parts.scheme in ("http", "https") and parts.hostname is not None and is_loopback(parts.hostname)
        )

    def key_ok(self, authorization: str | None) -> bool:
        if not self.api_key:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


class BodyTooLarge(APIError):
    """Raised from `receive` when a body without Content-Length grows past the limit; the app's APIError
    handler answers 413 (the middleware answers it itself if the app let it escape before responding)."""

    def __init__(self, limit: int) -> None:
        err = too_large(limit)
        super().__init__(err.status, err.message, code=err.code)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _send_error(send: Send, err: APIError, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(err.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in err.headers.items()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    """Refuses before the app runs: foreign Host (421), foreign Origin (403), missing key (401), big body (413)."""

    def __init__(self, app: ASGIApp, settings: SecuritySettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        s = self.settings
        headers = _headers(scope)
        if not s.host_allowed(headers.get("host")):
            log.warning("request refused: Host not allowed", host=headers.get("host"), hint="--allowed-host")
            await _send_error(send, APIError(421, "Invalid Host header", code="invalid_host"))
            return
        origin = headers.get("origin")
        cors: list[tuple[bytes, bytes]] = []
        if origin is not None:
            if not s.origin_allowed(origin):
                log.warning("request refused: Origin not allowed", origin=origin, hint="--allowed-origin")
                await _send_error(send, APIError(403, "Origin not allowed", code="invalid_origin"))
                return
            cors = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        *cors,
                        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                        (b"access-control-allow-headers", b"authorization, content-type, x-stainless-os"),
                        (b"access-control-max-age", b"600"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] not in s.public_paths and not s.key_ok(headers.get("authorization")):
            await _send_error(send, unauthorized(), cors)
            return
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > s.max_body_bytes
            except ValueError:
                await _send_error(send, APIError(400, "Invalid Content-Length header"), cors)
                return
            if too_big:
                await _send_error(send, too_large(s.max_body_bytes), cors)
                return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > s.max_body_bytes:  # chunked bodies carry no Content-Length
                    raise BodyTooLarge(s.max_body_bytes)
            return message

        async def send_with_cors(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_cors)
        except BodyTooLarge:
            if not started:
                await _send_error(send, too_large(s.max_body_bytes), cors)
