"""OAuth for HTTP/SSE servers against a real authorization server and a protected MCP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import stat
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
import keyring
import keyring.backend
import keyring.errors
import pytest
import structlog
from mcp.shared.auth import OAuthToken

from tests.transports.oauth_servers import (
    ProtectedServer,
    auth_and_server,
    bound_socket,
    follow_authorization,
    query_of,
)
from transports import HttpTarget, connect
from transports.oauth import AuthFailed, AuthRequired, login, token_store
from transports.targets import OAuthSettings
from transports.tokens import TokenStore, TokenStoreError

pytestmark = pytest.mark.anyio


def oauth_target(
    server: ProtectedServer, tmp: Path, *, kind: str = "streamable_http", **kw: Any
) -> HttpTarget:
    url = server.url if kind == "streamable_http" else f"{server.base}/sse"
    settings = OAuthSettings(token_file=tmp / "state" / "oauth" / "srv.json", login_hint="log in", **kw)
    return HttpTarget(url=url, kind=kind, oauth=settings, connect_timeout=5, read_timeout=10)  # type: ignore[arg-type]  # kind is a Literal


async def browser(url: str) -> None:
    assert await follow_authorization(url) == 200


async def call_echo(target: HttpTarget, text: str = "hi") -> str:
    async with connect(target, startup_timeout=15) as conn:
        result = await conn.call_tool("echo", {"text": text}, timeout=5)
        return result.content[0].text  # type: ignore[union-attr]  # echo answers with one text block


def stored(target: HttpTarget) -> dict[str, Any]:
    assert target.oauth is not None and target.oauth.token_file is not None
    record: dict[str, Any] = json.loads(target.oauth.token_file.read_text())
    return record


@pytest.mark.parametrize("kind", ["streamable_http", "sse"])
async def test_login_with_registration_then_calls_with_stored_token(tmp_path: Path, kind: str) -> None:
    async with auth_and_server() as (auth, server):
        target = oauth_target(server, tmp_path, kind=kind)
        with pytest.raises(AuthRequired, match="log in"):  # nothing stored yet: no browser from connect
            await call_echo(target)
        grant = await login(target, open_url=browser, timeout=20)
        assert grant.state() == "valid" and grant.scope == "mcp"
        assert ("POST", "/register") in auth.requests  # dynamic client registration
        code_request = next(r for r in auth.token_requests if r["grant_type"] == "authorization_code")
        assert code_request["resource"] == target.url and code_request["code_verifier"]
        assert await call_echo(target) == "hi"
        token = stored(target)["tokens"]["access_token"]
        assert server.seen_tokens[-1] == token
        file = target.oauth.token_file  # type: ignore[union-attr]  # set by oauth_target
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert stat.S_IMODE(file.parent.stat().st_mode) == 0o700


async def test_client_credentials_and_step_up_on_insufficient_scope(tmp_path: Path) -> None:
    async with auth_and_server() as (auth, server):
        auth.add_client("machine", "machine-secret-123")
        target = oauth_target(
            server,
            tmp_path,
            grant="client_credentials",
            client_id="machine",
            client_secret="machine-secret-123",
        )
        async with connect(target, startup_timeout=15) as conn:
            first = await conn.call_tool("echo", {"text": "a"}, timeout=5)
            assert first.content[0].text == "a"  # type: ignore[union-attr]  # a text block
            granted = stored(target)["tokens"]["scope"]
            assert "admin" not in granted.split()
            result = await conn.call_tool("admin", {"text": "b"}, timeout=10)
            assert result.content[0].text == "admin:b"  # type: ignore[union-attr]  # a text block
        assert 403 in server.refusals
        cc = [r for r in auth.token_requests if r["grant_type"] == "client_credentials"]
        assert len(cc) == 2 and set(cc[-1]["scope"].split()) >= {"mcp", "admin"}
        assert all(r["resource"] == target.url for r in cc)
        assert "client_secret" not in cc[0]  # client_secret_basic: in the header, not the body


async def test_expired_token_is_refreshed_at_the_discovered_endpoint(tmp_path: Path) -> None:
    async with auth_and_server() as (auth, server):
        target = oauth_target(server, tmp_path)
        await login(target, open_url=browser, timeout=20)
        old = stored(target)["tokens"]["access_token"]
        record = stored(target)
        record["expires_at"] = 1.0  # a later run finds it expired
        target.oauth.token_file.write_text(json.dumps(record))  # type: ignore[union-attr]  # set above
        assert await call_echo(target) == "hi"
        refreshes = [r for r in auth.token_requests if r["grant_type"] == "refresh_token"]
        assert len(refreshes) == 1 and refreshes[0]["resource"] == target.url
        assert old not in server.seen_tokens[-1:]
        assert stored(target)["tokens"]["access_token"] != old


async def test_revoked_access_token_refreshes_then_revoked_refresh_needs_login(tmp_path: Path) -> None:
    async with auth_and_server() as (auth, server):
        target = oauth_target(server, tmp_path)
        await login(target, open_url=browser, timeout=20)
        for grant in auth.tokens.values():
            grant.revoked = True  # access tokens only: the refresh token still works
        assert await call_echo(target) == "hi"
        assert any(r["grant_type"] == "refresh_token" for r in auth.token_requests)
        auth.revoke_all()
        with pytest.raises(AuthRequired, match="needs an OAuth login"):
            await call_echo(target)


async def test_token_bound_to_its_resource_is_never_sent_elsewhere(tmp_path: Path) -> None:
    async with auth_and_server() as (_auth, server):
        target = oauth_target(server, tmp_path)
        await login(target, open_url=browser, timeout=20)
        token = stored(target)["tokens"]["access_token"]
        # The same token file, now configured for another server URL: the record does not apply there.
        moved = HttpTarget(url=f"{server.base}/other", oauth=target.oauth, connect_timeout=5)
        before = len(server.seen_tokens)
        assert await token_store(moved).get_tokens() is None
        with pytest.raises(AuthRequired):
            await call_echo(moved)
        assert token not in server.seen_tokens[before:]


async def test_wrong_audience_token_refused_by_the_server(tmp_path: Path) -> None:
    async with auth_and_server() as (auth, server):
        auth.audience_override = "http://127.0.0.1:1/elsewhere"  # tokens for another resource
        target = oauth_target(server, tmp_path)
        with pytest.raises(AuthFailed, match="refused the token"):
            await login(target, open_url=browser, timeout=20)
        assert server.refusals.count(401) >= 2  # the first challenge, then the wrong-audience token


async def test_malformed_authorization_server_metadata_is_a_typed_error(tmp_path: Path) -> None:
    async with auth_and_server() as (auth, server):
        auth.malformed_metadata = True
        with pytest.raises(AuthFailed, match="metadata"):
            await login(oauth_target(server, tmp_path), open_url=browser, timeout=20)
        assert not auth.token_requests and ("POST", "/register") not in auth.requests


async def test_resource_metadata_for_another_resource_is_refused(tmp_path: Path) -> None:
    """A server whose metadata sends us to an authorization server (another origin) for someone else's
    resource: refused before any registration or token request; nothing stored, no token leaves."""
    async with auth_and_server() as (auth, victim):
        async with auth_and_server(prm_resource=victim.url) as (evil_auth, evil):
            target = oauth_target(evil, tmp_path)
            with pytest.raises(AuthFailed, match="does not match"):
                await login(target, open_url=browser, timeout=20)
            assert not evil_auth.token_requests and not auth.token_requests
            assert not target.oauth.token_file.exists()  # type: ignore[union-attr]  # set by oauth_target


async def test_state_mismatch_and_non_loopback_redirect_refused(tmp_path: Path) -> None:
    async with auth_and_server() as (auth, server):
        target = oauth_target(server, tmp_path)

        async def forged(url: str) -> None:
            q = query_of(url)
            async with httpx2.AsyncClient(timeout=5) as http:
                reply = await http.get(f"{q['redirect_uri']}?code=stolen&state=not-{q['state']}")
                assert reply.status_code == 400

        with pytest.raises(AuthFailed, match="state mismatch"):
            await login(target, open_url=forged, timeout=20)
        assert not any(r["grant_type"] == "authorization_code" for r in auth.token_requests)
        with pytest.raises(AuthFailed, match="not a loopback"):
            await login(target, open_url=browser, timeout=20, redirect_host="0.0.0.0")


async def test_no_token_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as captured:
        async with auth_and_server() as (auth, server):
            auth.add_client("machine", "machine-secret-123")
            target = oauth_target(
                server,
                tmp_path,
                grant="client_credentials",
                client_id="machine",
                client_secret="machine-secret-123",
            )
            assert await call_echo(target) == "hi"
            secrets = [*auth.tokens, *auth.refresh, "machine-secret-123"]
    text = caplog.text + json.dumps(captured, default=str)
    assert secrets and not [s for s in secrets if s in text]


async def test_pre_registered_client_on_a_fixed_port_and_openid_discovery(tmp_path: Path) -> None:
    with bound_socket() as sock:
        port = sock.getsockname()[1]  # a free port for the configured redirect, released before login
    async with auth_and_server() as (auth, server):
        auth.openid_only = True
        auth.add_client("pre-registered", "pre-secret-456", [f"http://127.0.0.1:{port}/callback"])
        target = oauth_target(
            server, tmp_path, client_id="pre-registered", client_secret="pre-secret-456", redirect_port=port
        )
        await login(target, open_url=browser, timeout=20)
        assert ("GET", "/.well-known/openid-configuration") in auth.requests
        assert ("POST", "/register") not in auth.requests
        assert await call_echo(target) == "hi"


async def test_client_id_metadata_document_instead_of_registration(tmp_path: Path) -> None:
    async with auth_and_server() as (auth, server):
        auth.cimd = True
        doc = "https://agent.example.com/oauth/client.json"
        seen: list[str] = []

        async def remember(url: str) -> None:
            seen.append(url)
            await browser(url)

        await login(oauth_target(server, tmp_path, client_metadata_url=doc), open_url=remember, timeout=20)
        assert ("POST", "/register") not in auth.requests
        assert query_of(seen[0])["client_id"] == doc


async def test_keyring_store_without_the_package_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "keyring", None)  # what `import keyring` meets where it is not installed
    async with auth_and_server() as (_auth, server):
        target = HttpTarget(url=server.url, oauth=OAuthSettings(keyring_key="srv"), connect_timeout=5)
        with pytest.raises(TokenStoreError, match="keyring"):
            await call_echo(target)


class _MemoryKeyring(keyring.backend.KeyringBackend):
    """A keyring backend held in memory: the `keyring` package's own API, with no OS service behind it here."""

    priority = 1  # type: ignore[assignment]  # keyring declares it as a classproperty

    def __init__(self) -> None:
        super().__init__()
        self.items: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.items.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError(username)


async def test_keyring_store_keeps_the_tokens_in_the_keyring_and_nothing_on_disk(tmp_path: Path) -> None:
    backend = _MemoryKeyring()
    previous = keyring.get_keyring()
    keyring.set_keyring(backend)
    try:
        async with auth_and_server() as (_auth, server):
            settings = OAuthSettings(keyring_key="srv", login_hint="log in")
            target = HttpTarget(url=server.url, oauth=settings, connect_timeout=5, read_timeout=10)
            grant = await login(target, open_url=browser, timeout=20)
            assert grant.state() == "valid"
            assert await call_echo(target) == "hi"
            [(service, key)] = backend.items
            record = json.loads(backend.items[(service, key)])
            assert record["tokens"]["access_token"] == server.seen_tokens[-1]
            assert token_store(target).path is None  # a keyring store, no file behind it
            token_store(target).delete()
            assert backend.items == {}
            with pytest.raises(AuthRequired):
                await call_echo(target)
    finally:
        keyring.set_keyring(previous)


async def test_client_secret_goes_only_to_the_configured_issuer(tmp_path: Path) -> None:
    async with auth_and_server() as (real, _), auth_and_server() as (evil, server):
        evil.add_client("machine", None)  # it would accept (and keep) whatever it is sent
        target = oauth_target(
            server,
            tmp_path,
            grant="client_credentials",
            client_id="machine",
            client_secret="machine-secret-123",
            issuer=real.base,
        )
        with pytest.raises(AuthFailed, match=f"not {real.base}"):
            await call_echo(target)
        assert not evil.token_requests and not real.token_requests


async def test_concurrent_calls_are_not_serialised_by_the_auth_flow(tmp_path: Path) -> None:
    """In JSON mode a POST's response headers come only when its call is done: two calls that each wait
    for the other finish only if the second is sent while the first is still running."""
    async with auth_and_server(json_response=True) as (auth, server):
        auth.add_client("machine", "machine-secret-123")
        target = oauth_target(
            server,
            tmp_path,
            grant="client_credentials",
            client_id="machine",
            client_secret="machine-secret-123",
        )
        answers: list[str] = []
        async with connect(target, startup_timeout=15) as conn:

            async def call(who: str) -> None:
                result = await conn.call_tool("rendezvous", {"who": who}, timeout=8)
                answers.append(result.content[0].text)  # type: ignore[union-attr]  # a text block

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "a")
                tg.start_soon(call, "b")
        assert sorted(answers) == ["a", "b"]


async def test_well_known_discovery_and_client_credentials_login_without_a_browser(tmp_path: Path) -> None:
    async with auth_and_server(challenge_metadata=False) as (auth, server):
        auth.add_client("machine", "machine-secret-123")
        target = oauth_target(
            server,
            tmp_path,
            grant="client_credentials",
            client_id="machine",
            client_secret="machine-secret-123",
        )

        async def no_browser(url: str) -> None:
            raise AssertionError(f"client_credentials opened {url}")

        grant = await login(target, open_url=no_browser, timeout=20)
        assert grant.state() == "valid" and grant.client_id is None  # pre-registered: nothing registered
        assert [r["grant_type"] for r in auth.token_requests] == ["client_credentials"]


def test_token_store_corrupt_file_and_atomic_writes(tmp_path: Path) -> None:
    path = tmp_path / "oauth" / "s.json"
    store = TokenStore.file(path, "http://127.0.0.1:1/mcp")
    anyio.run(store.set_tokens, OAuthToken(access_token="at-123456", expires_in=60))
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.json"]  # no temporary file left behind
    assert store.grant() is not None and store.grant().state() == "valid"  # type: ignore[union-attr]  # checked
    path.write_text("{not json")
    with pytest.raises(TokenStoreError, match="corrupt"):
        store.grant()
    assert store.delete() and not store.delete()
