"""OAuth 2.1 for HTTP and SSE servers (the MCP authorization spec): an `httpx2.Auth` built on the SDK's
OAuthClientProvider, and `login`, which runs the browser step against a loopback redirect listener.

The SDK does discovery (protected-resource metadata from `WWW-Authenticate` and the well-known URLs,
authorization-server metadata with the OpenID fallback), PKCE S256, dynamic registration, client ID
metadata documents, the `resource` parameter, scope selection, step-up on 403 and refresh. This module adds
what it lacks: the client_credentials grant on the same provider, a pre-registered client, tokens bound to
the canonical resource and sent only to the server's origin, no guessed token/registration endpoints (the
legacy fallback would hand a refresh token to the MCP server), metadata kept with the tokens so a later run
refreshes at the right endpoint, a refresh on 401 before giving up, and typed errors instead of a hung request.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import httpx2
import structlog
from mcp.client.auth import OAuthClientProvider, OAuthFlowError
from mcp.client.auth.utils import extract_field_from_www_auth, issuers_match, union_scopes
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthMetadata,
    ProtectedResourceMetadata,
)
from mcp.shared.auth_utils import resource_url_from_server_url
from mcp_types import LATEST_PROTOCOL_VERSION
from pydantic import AnyUrl, ValidationError

from transports.errors import ConnectError, TransportError
from transports.targets import HttpTarget, OAuthSettings
from transports.tokens import StoredGrant, TokenStore

log = structlog.get_logger(__name__)
# The SDK logs each flow error with a traceback through stdlib logging (printed on a CLI's stderr); every
# one of them reaches the user here as a typed error and a structlog warning instead.
logging.getLogger("mcp.client.auth.oauth2").setLevel(logging.CRITICAL)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_CALLBACK_READ_SECS = 5.0  # a browser sends its redirect request at once; a silent connection is dropped
_CALLBACK_MAX_HEAD = 16 * 1024


class AuthRequired(ConnectError):
    """The server needs OAuth tokens this process does not have and may not get without a person."""


class AuthFailed(ConnectError):
    """Discovery, registration, the authorization step or the token exchange failed, or was refused as unsafe."""


def canonical_resource(url: str) -> str:
    """The RFC 8707 resource a server's tokens are bound to."""
    return resource_url_from_server_url(url)


def token_store(target: HttpTarget) -> TokenStore:
    """The store that holds `target`'s tokens (file or keyring, as its OAuth settings say)."""
    settings = _settings(target)
    resource = canonical_resource(target.url)
    if settings.keyring_key is not None:
        return TokenStore.keyring(settings.keyring_key, resource)
    if settings.token_file is None:
        raise AuthFailed(f"no token store configured for {target.url}", "set a token file or the keyring")
    return TokenStore.file(settings.token_file, resource)


def _settings(target: HttpTarget) -> OAuthSettings:
    if target.oauth is None:
        raise AuthFailed(f"{target.url} is not configured for OAuth", 'add "auth": {"type": "oauth"}')
    return target.oauth


def _origin(url: str | httpx2.URL) -> tuple[str, str]:
    parts = urlsplit(str(url))
    return parts.scheme.lower(), parts.netloc.lower()


@dataclass(slots=True)
class _Interaction:
    """The browser step of an authorization_code login: show the URL, then wait for the redirect."""

    redirect_uri: str
    open_url: Callable[[str], Awaitable[None]]
    wait_callback: Callable[[], Awaitable[AuthorizationCodeResult]]


class OAuth(OAuthClientProvider):
    """The MCP authorization flow for one server, as an `httpx2.Auth` on the client that talks to it.

    Without an interaction (the supervisor), an authorization_code server gets its stored tokens, refreshed
    when expired or refused; when nothing works the request fails at once and `failure` says why (the
    transport raises it), instead of opening a browser from a background task.
    """

    def __init__(
        self, target: HttpTarget, store: TokenStore, interaction: _Interaction | None = None
    ) -> None:
        self._target = target
        self._oauth = _settings(target)
        self._store = store
        self._interaction = interaction
        self._configured_scope = " ".join(self._oauth.scopes) or None
        self.failure: TransportError | None = None
        self.client_name = self._oauth.client_name
        client_credentials = self._oauth.grant == "client_credentials"
        metadata = OAuthClientMetadata(
            redirect_uris=[AnyUrl(interaction.redirect_uri)] if interaction is not None else None,
            grant_types=["client_credentials"]
            if client_credentials
            else ["authorization_code", "refresh_token"],
            response_types=[] if client_credentials else ["code"],
            token_endpoint_auth_method=self._auth_method(),
            scope=self._configured_scope,
            client_name=self._oauth.client_name,
        )
        super().__init__(
            target.url,
            metadata,
            store,
            redirect_handler=interaction.open_url if interaction is not None else None,
            callback_handler=interaction.wait_callback if interaction is not None else None,
            client_metadata_url=self._oauth.client_metadata_url,
        )

    def _auth_method(self) -> Literal["client_secret_basic", "none"]:
        if self._oauth.client_id is not None and self._oauth.client_secret:
            return "client_secret_basic"
        return "none"  # a public client: PKCE protects the code

    # -- the SDK's hooks

    async def _initialize(self) -> None:
        await super()._initialize()
        record = await anyio.to_thread.run_sync(self._store.record)
        if self.context.current_tokens is not None:
            self.context.token_expiry_time = await self._store.expires_at()
        # Metadata discovered when the tokens were issued: a refresh goes to that token endpoint.
        with contextlib.suppress(ValidationError, TypeError):
            if record.get("oauth_metadata"):
                self.context.oauth_metadata = OAuthMetadata.model_validate(record["oauth_metadata"])
            if record.get("resource_metadata"):
                prm = ProtectedResourceMetadata.model_validate(record["resource_metadata"])
                self.context.protected_resource_metadata = prm
                self.context.auth_server_url = str(prm.authorization_servers[0])
        if self._oauth.client_id is not None:
            self.context.client_info = OAuthClientInformationFull(
                client_id=self._oauth.client_id,
                client_secret=self._oauth.client_secret or None,
                redirect_uris=self.context.client_metadata.redirect_uris,
                grant_types=self.context.client_metadata.grant_types,
                token_endpoint_auth_method=self._auth_method(),
            )

    def _add_auth_header(self, request: httpx2.Request) -> None:
        # Tokens are bound to this server: never sent to another origin, whatever asks for it.
        if _origin(request.url) != _origin(self._target.url):
            request.headers.pop("Authorization", None)
            return
        super()._add_auth_header(request)

    async def _perform_authorization(self) -> httpx2.Request:
        self.context.client_metadata.scope = union_scopes(
            self._configured_scope, self.context.client_metadata.scope
        )
        if self._oauth.grant == "client_credentials":
            return self._client_credentials_request()
        return await super()._perform_authorization()

    def _client_credentials_request(self) -> httpx2.Request:
        if self.context.client_info is None:
            raise OAuthFlowError("client_credentials needs a client_id")
        data: dict[str, str] = {"grant_type": "client_credentials"}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        data, headers = self.context.prepare_token_auth(data, headers)
        if self.context.client_info.token_endpoint_auth_method in (None, "none"):
            data["client_id"] = self.context.client_info.client_id
        data["resource"] = self.context.get_resource_url()
        if self.context.client_metadata.scope:
            data["scope"] = self.context.client_metadata.scope
        return httpx2.Request("POST", self._get_token_endpoint(), data=data, headers=headers)

    async def _handle_token_response(self, response: httpx2.Response) -> None:
        await super()._handle_token_response(response)
        self.failure = None  # tokens again: an earlier failure no longer explains anything
        await self._save_metadata()

    async def _handle_refresh_response(self, response: httpx2.Response) -> bool:
        ok = await super()._handle_refresh_response(response)
        if ok:
            self.failure = None
            await self._save_metadata()
        return ok

    async def _save_metadata(self) -> None:
        fields: dict[str, Any] = {}
        if self.context.oauth_metadata is not None:
            fields["oauth_metadata"] = self.context.oauth_metadata.model_dump(mode="json", exclude_none=True)
        if self.context.protected_resource_metadata is not None:
            fields["resource_metadata"] = self.context.protected_resource_metadata.model_dump(
                mode="json", exclude_none=True
            )
        if fields:
            await self._store.update(**fields)

    # -- the flow, around the SDK's

    def _select_authorization_server(self, advertised: list[str]) -> str:
        issuer = self._oauth.issuer
        return next((s for s in advertised if issuer is not None and issuers_match(s, issuer)), advertised[0])

    def _can_authorize(self) -> bool:
        return self._oauth.grant == "client_credentials" or self._interaction is not None

    @staticmethod
    def _refused(response: httpx2.Response) -> bool:
        return response.status_code == 401 or (
            response.status_code == 403
            and extract_field_from_www_auth(response, "error") == "insufficient_scope"
        )

    def _check_outgoing(self, outgoing: httpx2.Request) -> None:
        """Refuse a registration or token request to an endpoint no valid metadata named.

        The SDK falls back to `/register` and `/token` on the MCP server's own origin when discovery found
        nothing usable (missing or malformed metadata); that would send a refresh token or client secret to
        a server that never claimed to be an authorization server.
        """
        if outgoing.method != "POST":
            return
        metadata = self.context.oauth_metadata
        if metadata is None:
            raise AuthFailed(
                f"no valid authorization server metadata for {self._target.url}",
                "the server's OAuth metadata is missing or malformed; check its well-known URLs",
            )
        issuer = self._oauth.issuer
        if issuer is not None and not issuers_match(str(metadata.issuer), issuer):
            # The MCP server chose this authorization server; a configured client's secret goes only to its own.
            raise AuthFailed(
                f"{self._target.url} sent us to authorization server {metadata.issuer}, not {issuer}",
                "check the server URL, or the configured issuer",
            )
        known = {str(metadata.token_endpoint)}
        if metadata.registration_endpoint is not None:
            known.add(str(metadata.registration_endpoint))
        if str(outgoing.url) not in known:
            raise AuthFailed(
                f"refused an OAuth request to {outgoing.url}: not an endpoint its metadata names"
            )

    def _login_needed(self, response: httpx2.Response) -> AuthRequired:
        scope = extract_field_from_www_auth(response, "scope")
        wants = f" (it asks for scope {scope!r})" if scope and response.status_code == 403 else ""
        return AuthRequired(f"{self._target.url} needs an OAuth login{wants}", self._oauth.login_hint)

    async def _auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        if self._initialized and self.context.is_token_valid():
            # The common case skips the SDK's flow, which holds its lock until the response headers come:
            # a JSON-mode server answering one slow tool call would hold back every other call.
            self._add_auth_header(request)
            response = yield request
            if not self._refused(response):
                return
            if response.status_code == 401:
                self.context.token_expiry_time = 1.0  # refused: expired for the SDK, which refreshes first
        inner = super()._auth_flow(request)
        sent = 0
        try:
            outgoing = await inner.__anext__()
            while True:
                if outgoing is not request:
                    self._check_outgoing(outgoing)
                response = yield outgoing
                if outgoing is request and self._refused(response):
                    sent += 1
                    if sent > 1:
                        raise AuthFailed(
                            f"{self._target.url} refused the token the authorization server issued"
                        )
                    if not self._can_authorize():
                        if response.status_code == 401 and self._can_refresh():
                            refresh = await self._refresh_token()
                            self._check_outgoing(refresh)
                            if await self._handle_refresh_response((yield refresh)):
                                self._add_auth_header(request)
                                retried = yield request
                                if not self._refused(retried):
                                    return
                        self.failure = self._login_needed(response)
                        log.info("oauth login needed", server=self._target.url, status=response.status_code)
                        return
                outgoing = await inner.asend(response)
        except StopAsyncIteration:
            return
        except (OAuthFlowError, TransportError, ValidationError, httpx2.HTTPError) as exc:
            self.failure = exc if isinstance(exc, TransportError) else _typed(exc, self._target.url)
            log.warning("oauth flow failed", server=self._target.url, error=self.failure.reason)
            # The caller gets a plain 401 for its request (it fails at once); `failure` says why.
            request.headers.pop("Authorization", None)
            yield request
        finally:
            await inner.aclose()

    def _can_refresh(self) -> bool:
        return self.context.can_refresh_token() and self.context.oauth_metadata is not None

    async def preflight(self) -> None:
        """Fail before connecting when an authorization_code server has no tokens and no way to get one."""
        if self._can_authorize():
            return
        if await self._store.get_tokens() is None:
            raise AuthRequired(f"no OAuth tokens stored for {self._target.url}", self._oauth.login_hint)


def _typed(exc: Exception, url: str) -> AuthFailed:
    if isinstance(exc, ValidationError):
        return AuthFailed(f"malformed OAuth response for {url}: {exc.error_count()} invalid fields")
    if isinstance(exc, httpx2.HTTPError):
        return AuthFailed(f"OAuth request for {url} failed: {type(exc).__name__}", "check the network path")
    return AuthFailed(f"OAuth for {url} failed: {exc}")


@contextlib.asynccontextmanager
async def server_auth(target: HttpTarget) -> AsyncIterator[OAuth | None]:
    """The Auth for a transport's HTTP client (None without OAuth); a refusal it recorded replaces the
    transport's own error, so the caller sees why (log in, bad metadata) instead of an HTTP status."""
    if target.oauth is None:
        yield None
        return
    auth = OAuth(target, token_store(target))
    await auth.preflight()
    try:
        yield auth
    except Exception:
        if auth.failure is not None:
            raise auth.failure from None
        raise


# --------------------------------------------------------------------------------------------- login


@dataclass(slots=True)
class _Callback:
    """A one-shot loopback listener for the authorization redirect; checks `state` before taking the code."""

    host: str
    path: str
    port: int = 0
    expected_state: str | None = None
    result: AuthorizationCodeResult | None = None
    error: TransportError | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def redirect_uri(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    async def wait(self) -> AuthorizationCodeResult:
        await self.done.wait()  # bounded by login's overall deadline
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            head = b""
            with anyio.move_on_after(_CALLBACK_READ_SECS):
                while b"\r\n\r\n" not in head and len(head) < _CALLBACK_MAX_HEAD:
                    try:
                        head += await stream.receive(4096)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
            status, body = self._answer(head)
            reply = (
                f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
            ).encode() + body
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(reply)

    def _answer(self, head: bytes) -> tuple[str, bytes]:
        try:
            method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return "400 Bad Request", b"bad request"
        parts = urlsplit(target)
        if method != "GET" or parts.path != self.path:
            return "404 Not Found", b"not found"
        if self.done.is_set():
            return "409 Conflict", b"this login is already finished"
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        state = params.get("state")
        if self.expected_state is None or state != self.expected_state:
            # A redirect this login did not start (forged, or an old tab): refuse it and end the login.
            self._finish(error=AuthFailed("OAuth state mismatch: the redirect did not come from this login"))
            return "400 Bad Request", b"<p>Login refused: state mismatch.</p>"
        if "error" in params:
            why = params.get("error_description") or params["error"]
            self._finish(error=AuthFailed(f"the authorization server refused the login: {why[:200]}"))
            return "200 OK", b"<p>Login refused by the authorization server. You can close this tab.</p>"
        code = params.get("code")
        if not code:
            self._finish(error=AuthFailed("the authorization redirect carried no code"))
            return "400 Bad Request", b"<p>No authorization code.</p>"
        self._finish(result=AuthorizationCodeResult(code=code, state=state, iss=params.get("iss")))
        return "200 OK", b"<p>Logged in to agent-runtime. You can close this tab.</p>"

    def _finish(
        self, *, result: AuthorizationCodeResult | None = None, error: TransportError | None = None
    ) -> None:
        self.result, self.error = result, error
        self.done.set()


def _loopback(host: str) -> str:
    if host.strip("[]").lower() not in {h.strip("[]") for h in LOOPBACK_HOSTS}:
        raise AuthFailed(
            f"redirect host {host!r} is not a loopback address",
            "the login listens on 127.0.0.1, ::1 or localhost only",
        )
    return "127.0.0.1" if host.lower() == "localhost" else host.strip("[]")


async def login(
    target: HttpTarget,
    *,
    open_url: Callable[[str], Awaitable[None]],
    timeout: float,  # noqa: ASYNC109 - the whole login (a person in a browser) has one deadline
    redirect_host: str = "127.0.0.1",
) -> StoredGrant:
    """Discover, register, authorize (the person approves in a browser shown `open_url`'s URL; the code
    comes back to a loopback listener) and store the tokens. client_credentials servers need no person.

    Raises AuthFailed (refused, unsafe or malformed at any step), TokenStoreError, or TimeoutError.
    """
    settings = _settings(target)
    store = token_store(target)
    bind = _loopback(redirect_host)
    callback = _Callback(host=redirect_host, path=settings.redirect_path)
    with anyio.fail_after(timeout):
        try:
            listener = await anyio.create_tcp_listener(local_host=bind, local_port=settings.redirect_port)
        except OSError as exc:
            raise AuthFailed(
                f"cannot listen on {bind}:{settings.redirect_port} for the login redirect: {exc.strerror}",
                "free that port or change redirect_port",
            ) from None
        async with listener, anyio.create_task_group() as tg:
            callback.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            tg.start_soon(listener.serve, callback.handle)

            async def show(url: str) -> None:
                callback.expected_state = parse_qs(urlsplit(url).query).get("state", [None])[0]
                await open_url(url)

            interaction = _Interaction(callback.redirect_uri, show, callback.wait)
            # A fresh login: old tokens go, and a registration made for another redirect URI too.
            client = await store.get_client_info()
            keep = bool(client and any(str(u) == callback.redirect_uri for u in client.redirect_uris or ()))
            await store.clear_tokens(keep_client=keep)
            auth = OAuth(target, store, interaction)
            try:
                status = await _probe(target, auth)
            finally:
                tg.cancel_scope.cancel()
    if auth.failure is not None:
        raise auth.failure
    grant = await anyio.to_thread.run_sync(store.grant)
    if grant is None or not grant.has_access_token:
        raise AuthFailed(
            f"{target.url} answered HTTP {status} and no token was issued", "check the server's auth"
        )
    if status in (401, 403):
        raise AuthFailed(f"{target.url} refused the new token (HTTP {status})")
    log.info("oauth login done", server=target.url, state=grant.state())
    return grant


async def _probe(target: HttpTarget, auth: OAuth) -> int:
    """One request to the server through `auth` (the flow runs on its 401); the server's final status."""
    timeout = httpx2.Timeout(target.connect_timeout, read=target.connect_timeout)
    headers = {**target.headers, "MCP-Protocol-Version": LATEST_PROTOCOL_VERSION}
    async with httpx2.AsyncClient(auth=auth, timeout=timeout, headers=headers) as http:
        if target.kind == "sse":
            async with http.stream("GET", target.url, headers={"Accept": "text/event-stream"}) as response:
                return response.status_code
        body = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": LATEST_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": auth.client_name, "version": "0"},
            },
        }
        accept = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        async with http.stream("POST", target.url, content=json.dumps(body), headers=accept) as response:
            status = response.status_code
            session = response.headers.get("mcp-session-id")
        if session and status < 300:
            with contextlib.suppress(httpx2.HTTPError):  # ending the probe's session is a courtesy
                await http.delete(target.url, headers={"mcp-session-id": session})
        return status
