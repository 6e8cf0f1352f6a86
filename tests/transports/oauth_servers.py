"""A small OAuth 2.1 authorization server and an MCP server behind bearer auth, both real HTTP on 127.0.0.1.

The authorization server auto-approves (the test plays the browser by following its redirect), checks PKCE,
redirect URIs, client authentication and the `resource` indicator, and records every request. The protected
server checks each token's audience, expiry, revocation and scope, answering 401 / 403 with the
`WWW-Authenticate` challenges of the MCP authorization spec.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route


@dataclass
class Grant:
    client_id: str
    audience: str | None
    scopes: set[str]
    expires_at: float
    revoked: bool = False


@dataclass
class AuthServer:
    """An in-memory authorization server; `base` is set once it listens."""

    base: str = ""
    access_ttl: int = 3600
    scopes_supported: list[str] = field(default_factory=lambda: ["mcp", "admin"])
    malformed_metadata: bool = False
    cimd: bool = False
    openid_only: bool = False  # metadata only at /.well-known/openid-configuration
    audience_override: str | None = None  # a broken server: tokens for this audience, whatever was asked
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)  # client_id -> registration
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, Grant] = field(default_factory=dict)
    refresh: dict[str, Grant] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request
    token_requests: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/oauth-authorization-server", self.metadata),
                Route("/.well-known/openid-configuration", self.metadata),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
                Route("/register", self.register, methods=["POST"]),
            ],
            middleware=[],
        )

    async def metadata(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path))
        if self.openid_only and request.url.path.endswith("oauth-authorization-server"):
            return Response("not found", status_code=404)
        if self.malformed_metadata:
            return Response('{"issuer": 42, "authorization_endpoint": ', media_type="application/json")
        return JSONResponse(
            {
                "issuer": self.base,
                "authorization_endpoint": f"{self.base}/authorize",
                "token_endpoint": f"{self.base}/token",
                "registration_endpoint": f"{self.base}/register",
                "scopes_supported": self.scopes_supported,
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": [
                    "none",
                    "client_secret_basic",
                    "client_secret_post",
                ],
                "client_id_metadata_document_supported": self.cimd,
            }
        )

    def add_client(self, client_id: str, secret: str | None, redirect_uris: list[str] | None = None) -> None:
        self.clients[client_id] = {"client_secret": secret, "redirect_uris": redirect_uris or []}

    async def register(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path))
        body = await request.json()
        client_id = f"dyn-{secrets.token_hex(4)}"
        self.clients[client_id] = {"client_secret": None, "redirect_uris": body.get("redirect_uris") or []}
        return JSONResponse(
            {**body, "client_id": client_id, "token_endpoint_auth_method": "none"}, status_code=201
        )

    def _redirect_ok(self, client_id: str, uri: str) -> bool:
        if client_id.startswith("https://"):
            return self.cimd  # a client ID metadata document (not fetched: loopback only here)
        client = self.clients.get(client_id)
        return client is not None and uri in client["redirect_uris"]

    async def authorize(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path))
        q = request.query_params
        client_id, redirect_uri = q.get("client_id", ""), q.get("redirect_uri", "")
        if not self._redirect_ok(client_id, redirect_uri):
            return Response("unknown client or redirect_uri", status_code=400)
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return Response("PKCE S256 required", status_code=400)
        code = secrets.token_urlsafe(16)
        self.codes[code] = {
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "challenge": q["code_challenge"],
            "resource": q.get("resource"),
            "scopes": set((q.get("scope") or "").split()),
        }
        target = f"{redirect_uri}?{urlencode({'code': code, 'state': q.get('state', '')})}"
        return RedirectResponse(target, status_code=302)

    def _client_auth(self, request: Request, form: dict[str, str]) -> str | None:
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            cid, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        else:
            cid, secret = form.get("client_id", ""), form.get("client_secret", "")
        client = self.clients.get(cid)
        if cid.startswith("https://") and self.cimd:
            return cid
        if client is None or (client["client_secret"] is not None and client["client_secret"] != secret):
            return None
        return cid

    def _issue(self, client_id: str, audience: str | None, scopes: set[str]) -> dict[str, Any]:
        access, refresh = f"at-{secrets.token_hex(12)}", f"rt-{secrets.token_hex(12)}"
        audience = self.audience_override or audience
        self.tokens[access] = Grant(client_id, audience, scopes, time.time() + self.access_ttl)
        self.refresh[refresh] = Grant(client_id, audience, scopes, float("inf"))
        return {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": self.access_ttl,
            "refresh_token": refresh,
            "scope": " ".join(sorted(scopes)),
        }

    async def token(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path))
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.token_requests.append(form)
        client_id = self._client_auth(request, form)
        if client_id is None:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        kind = form.get("grant_type")
        if kind == "authorization_code":
            code = self.codes.pop(form.get("code", ""), None)
            if (
                code is None
                or code["client_id"] != client_id
                or code["redirect_uri"] != form.get("redirect_uri")
            ):
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
            if base64.urlsafe_b64encode(digest).decode().rstrip("=") != code["challenge"]:
                return JSONResponse({"error": "invalid_grant", "error_description": "PKCE"}, status_code=400)
            return JSONResponse(self._issue(client_id, form.get("resource"), code["scopes"]))
        if kind == "refresh_token":
            old = self.refresh.pop(form.get("refresh_token", ""), None)
            if old is None or old.revoked or old.client_id != client_id:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            return JSONResponse(self._issue(client_id, form.get("resource") or old.audience, old.scopes))
        if kind == "client_credentials":
            scopes = set((form.get("scope") or "").split())
            return JSONResponse(self._issue(client_id, form.get("resource"), scopes))
        return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)

    def revoke_all(self) -> None:
        for grant in [*self.tokens.values(), *self.refresh.values()]:
            grant.revoked = True

    def expire_all(self) -> None:
        for grant in self.tokens.values():
            grant.expires_at = 0.0


def build_mcp() -> MCPServer:
    mcp = MCPServer("protected")

    @mcp.tool()
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    @mcp.tool()
    def admin(text: str) -> str:
        """Needs the admin scope."""
        return f"admin:{text}"

    arrived: set[str] = set()
    both = anyio.Event()

    @mcp.tool()
    async def rendezvous(who: str) -> str:
        """Returns once two different callers are inside it (concurrent calls only)."""
        arrived.add(who)
        if len(arrived) >= 2:
            both.set()
        with anyio.fail_after(5):
            await both.wait()
        return who

    return mcp


@dataclass
class ProtectedServer:
    """An MCP server (streamable HTTP at /mcp, SSE at /sse) that accepts only tokens `auth` issued for it."""

    auth: AuthServer
    base: str = ""
    prm_resource: str | None = None  # what its resource metadata claims (default: its own /mcp URL)
    prm_servers: list[str] | None = None
    challenge_metadata: bool = True  # name the resource metadata in WWW-Authenticate (else: well-known only)
    json_response: bool = False  # answer each POST with one JSON body, sent when the call is done
    seen_tokens: list[str | None] = field(default_factory=list)
    refusals: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def app(self) -> Any:
        mcp = build_mcp()
        http_app = mcp.streamable_http_app(json_response=self.json_response)
        sse_app = mcp.sse_app()

        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await http_app(scope, receive, send)
                return
            path = scope["path"]
            if path.startswith("/.well-known/oauth-protected-resource"):
                await self._prm(send, path.removeprefix("/.well-known/oauth-protected-resource") or "/mcp")
                return
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            token = headers.get("authorization", "")
            token = token[7:] if token.startswith("Bearer ") else None
            self.seen_tokens.append(token)
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            sse = path.startswith(("/sse", "/messages"))
            status, challenge = self._check(token, body, "/sse" if sse else "/mcp")
            if status:
                self.refusals.append(status)
                await _respond(send, status, [(b"www-authenticate", challenge.encode())])
                return
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            app = sse_app if sse else http_app
            await app(scope, replay, send)

        return asgi

    def _check(self, token: str | None, body: bytes, path: str) -> tuple[int, str]:
        meta = f'resource_metadata="{self.base}/.well-known/oauth-protected-resource{path}"'
        if not self.challenge_metadata:
            meta = 'realm="mcp"'
        grant = self.auth.tokens.get(token or "")
        if grant is None or grant.revoked or grant.expires_at < time.time():
            return 401, f'Bearer error="invalid_token", scope="mcp", {meta}'
        if grant.audience != f"{self.base}{path}":  # RFC 8707: only tokens issued for this server
            return 401, f'Bearer error="invalid_token", error_description="wrong audience", {meta}'
        with contextlib.suppress(ValueError, AttributeError):
            message = json.loads(body)
            if message.get("method") == "tools/call" and message["params"]["name"] == "admin":
                if "admin" not in grant.scopes:
                    return 403, f'Bearer error="insufficient_scope", scope="mcp admin", {meta}'
        return 0, ""

    async def _prm(self, send: Any, path: str) -> None:
        doc = {
            "resource": self.prm_resource or f"{self.base}{path}",
            "authorization_servers": self.prm_servers or [self.auth.base],
            "scopes_supported": ["mcp"],
        }
        await _respond(send, 200, [(b"content-type", b"application/json")], json.dumps(doc).encode())


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on `sock` inside the caller's task; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True


@contextlib.asynccontextmanager
async def auth_and_server(**protected: Any) -> AsyncIterator[tuple[AuthServer, ProtectedServer]]:
    """An authorization server and a protected MCP server on two ephemeral ports (two origins)."""
    auth = AuthServer()
    server = ProtectedServer(auth, **protected)
    auth_sock, server_sock = bound_socket(), bound_socket()
    auth.base = f"http://127.0.0.1:{auth_sock.getsockname()[1]}"
    server.base = f"http://127.0.0.1:{server_sock.getsockname()[1]}"
    async with serving(auth.app(), auth_sock), serving(server.app(), server_sock):
        yield auth, server


async def follow_authorization(url: str) -> int:
    """Play the browser: GET the authorization URL and follow its redirect to the loopback listener."""
    import httpx2

    async with httpx2.AsyncClient(follow_redirects=True, timeout=10) as http:
        response = await http.get(url)
        return response.status_code


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
