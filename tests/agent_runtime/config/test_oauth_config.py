"""The per-server `auth` key: OAuth settings for HTTP/SSE servers, located errors, secrets recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_runtime.config import parse_config, redacted_target, state_dir
from agent_runtime.errors import ConfigError
from transports.targets import HttpTarget


def one(auth: dict[str, object], env: dict[str, str] | None = None, **server: object) -> HttpTarget:
    entry = {"url": "https://mcp.example.com/mcp", "auth": auth, **server}
    config = parse_config(
        json.dumps({"mcpServers": {"gh": entry}}), env=env or {"AGENT_RUNTIME_STATE_DIR": "/st"}
    )
    target = config.servers[0].target
    assert isinstance(target, HttpTarget)
    return target


def test_auth_key_becomes_oauth_settings_with_a_token_file_under_the_state_dir() -> None:
    target = one({"type": "oauth", "scopes": ["repo", "read:org"], "redirect_port": 8765})
    assert target.oauth is not None
    assert target.oauth.grant == "authorization_code" and target.oauth.scopes == ("repo", "read:org")
    assert target.oauth.redirect_port == 8765
    assert target.oauth.token_file == Path("/st/oauth/gh.json")
    assert "agent-runtime auth login gh" in target.oauth.login_hint


def test_client_secret_is_a_secret_and_shown_masked() -> None:
    text = json.dumps(
        {
            "mcpServers": {
                "m2m": {
                    "type": "sse",
                    "url": "http://127.0.0.1:9/sse",
                    "auth": {
                        "type": "oauth",
                        "grant": "client_credentials",
                        "client_id": "bot",
                        "client_secret": "${env:SECRET}",
                    },
                }
            }
        }
    )
    config = parse_config(text, env={"SECRET": "s3cr3t-value", "XDG_STATE_HOME": "/xdg"})
    server = config.servers[0]
    assert server.secrets == ("s3cr3t-value",)
    assert isinstance(server.target, HttpTarget) and server.target.oauth is not None
    assert server.target.oauth.client_secret == "s3cr3t-value"
    assert server.target.oauth.token_file == Path("/xdg/agent-runtime/oauth/m2m.json")
    shown = json.dumps(redacted_target(server))
    assert "s3cr3t-value" not in shown and '"grant": "client_credentials"' in shown


def test_state_dir_order() -> None:
    assert state_dir({"AGENT_RUNTIME_STATE_DIR": "/a", "XDG_STATE_HOME": "/b"}) == Path("/a")
    assert state_dir({"XDG_STATE_HOME": "/b"}) == Path("/b/agent-runtime")
    assert state_dir({}) == Path.home() / ".local/state/agent-runtime"


def test_loopback_redirect_uri_accepted() -> None:
    target = one(
        {
            "type": "oauth",
            "client_id": "pre",
            "redirect_uri": "http://localhost:8765/cb",
            "issuer": "https://as.example",
        }
    )
    assert target.oauth is not None and target.oauth.issuer == "https://as.example"
    assert (target.oauth.redirect_port, target.oauth.redirect_path, target.oauth.client_id) == (
        8765,
        "/cb",
        "pre",
    )


@pytest.mark.parametrize(
    ("auth", "server", "where", "says"),
    [
        (
            {"type": "oauth", "redirect_uri": "http://evil.example.com:80/cb"},
            {},
            "auth.redirect_uri",
            "loopback",
        ),
        ({"type": "oauth", "redirect_uri": "https://127.0.0.1:80/cb"}, {}, "auth.redirect_uri", "loopback"),
        ({"type": "oauth"}, {"bearer_token": "abcdefgh"}, "bearer_token", "both bearer_token and auth"),
        ({"type": "oauth"}, {"headers": {"Authorization": "Bearer x"}}, "auth", "Authorization header"),
        ({"type": "oauth", "grant": "client_credentials"}, {}, "auth.client_id", "needs client_id"),
        (
            {"type": "oauth", "client_metadata_url": "http://x.example/c.json"},
            {},
            "auth.client_metadata_url",
            "https",
        ),
        ({"type": "basic"}, {}, "auth.type", "oauth"),
        ({"type": "oauth", "issuer": "auth.example.com"}, {}, "auth.issuer", "http"),
        ({"type": "oauth", "redirect_port": 70000}, {}, "auth.redirect_port", "65535"),
    ],
)
def test_bad_auth_is_located(
    auth: dict[str, object], server: dict[str, object], where: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as info:
        one(auth, **server)
    assert info.value.json_path == f"mcpServers.gh.{where}"


def test_auth_on_stdio_or_websocket_is_an_error() -> None:
    for entry in (
        {"command": "x", "auth": {"type": "oauth"}},
        {"url": "ws://h/x", "auth": {"type": "oauth"}},
    ):
        with pytest.raises(ConfigError, match="HTTP and SSE servers") as info:
            parse_config(json.dumps({"mcpServers": {"s": entry}}), env={})
        assert info.value.json_path == "mcpServers.s.auth"
