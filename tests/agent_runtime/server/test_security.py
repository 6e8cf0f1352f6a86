"""The HTTP server's guards: DNS-rebinding protection (Host/Origin), CORS, API keys and body limits."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import httpx
import openai
import pytest

from agent_runtime.cli.common import parse_memory
from agent_runtime.cli.serve import settings_from_args
from agent_runtime.errors import ConfigError
from agent_runtime.server.app import OpenAIServer, ServerSettings, create_app
from agent_runtime.server.security import SecuritySettings
from tests.agent_runtime.server.test_app import ServerThread

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def open_server() -> Iterator[tuple[OpenAIServer, str]]:
    srv = create_app(None, settings=ServerSettings(security=SecuritySettings(max_body_bytes=64 * 1024)))
    with ServerThread(srv.app) as st:
        yield srv, st.url


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    srv = create_app(None, settings=ServerSettings(security=SecuritySettings(api_key=KEY)))
    with ServerThread(srv.app) as st:
        yield st.url


def test_foreign_host_is_refused(open_server: tuple[OpenAIServer, str]) -> None:
    url = open_server[1]
    port = url.rsplit(":", 1)[1]
    r = httpx.get(url + "/v1/models", headers={"Host": f"attacker.example:{port}"})
    assert r.status_code == 421
    assert r.json()["error"]["code"] == "invalid_host"
    r = httpx.get(url + "/v1/models", headers={"Host": "127.0.0.1.attacker.example"})
    assert r.status_code == 421
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host


def test_foreign_origin_is_refused(open_server: tuple[OpenAIServer, str]) -> None:
    url = open_server[1]
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Origin": "https://evil.example"},
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "invalid_origin"
    assert httpx.get(url + "/v1/models", headers={"Origin": "null"}).status_code == 403
    ok = httpx.get(url + "/v1/models", headers={"Origin": "http://localhost:3000"})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    preflight = httpx.options(
        url + "/v1/chat/completions",
        headers={"Origin": "http://127.0.0.1:5173", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 204
    assert "POST" in preflight.headers["access-control-allow-methods"]


def test_configured_origin_and_host_are_accepted() -> None:
    s = SecuritySettings(allowed_hosts=("assistant.lan",), allowed_origins=("app://jan",))
    assert s.host_allowed("assistant.lan:8000") and not s.host_allowed("other.lan")
    assert s.origin_allowed("app://jan") and not s.origin_allowed("app://other")


def test_api_key_is_required_when_configured(keyed_server: str) -> None:
    url = keyed_server
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # liveness probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).models.list().data == []


def test_binding_beyond_loopback_needs_a_key() -> None:
    with pytest.raises(ValueError, match="API key"):
        create_app(None, settings=ServerSettings(security=SecuritySettings(bind_host="0.0.0.0")))
    args = argparse.Namespace(
        host="0.0.0.0",
        api_key=None,
        allowed_host=[],
        allowed_origin=[],
        max_body_bytes=4 * 2**20,
        max_concurrent=8,
        served_model_name=None,
    )
    with pytest.raises(ConfigError, match="API key"):
        settings_from_args(args)
    args.api_key = KEY
    assert settings_from_args(args).security.api_key == KEY
    # bound to a real interface, any Host may reach us (the key is the gate) but Origins are still checked
    s = SecuritySettings(bind_host="0.0.0.0", api_key=KEY)
    assert s.host_allowed("10.1.2.3:8000") and not s.origin_allowed("https://evil.example")


def test_body_size_limit(open_server: tuple[OpenAIServer, str]) -> None:
    _srv, url = open_server
    big = b'{"model": "x", "messages": [], "pad": "' + b"a" * (100 * 1024) + b'"}'
    r = httpx.post(url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "x", "pad": "'
        for _ in range(100):
            yield b"a" * 1024
        yield b'"}'

    r = httpx.post(
        url + "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    text = httpx.get(url + "/metrics").text
    assert 'agent_runtime_http_rejected_requests_total{reason="413"}' in text


def test_agents_only_server_has_no_engine_model(open_server: tuple[OpenAIServer, str]) -> None:
    url = open_server[1]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert client.models.list().data == []
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}])


def test_memory_sizes() -> None:
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("2GiB") == 2 * 2**30
    assert parse_memory("0.25") == 0.25
    assert parse_memory("1000000") == 1_000_000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_memory("lots")


def test_listening_socket_disables_nagle() -> None:
    """Small SSE chunks must leave at once: accepted sockets carry TCP_NODELAY (asyncio sets it only for
    sockets whose proto is TCP; without it keep-alive streams stall ~40 ms on delayed ACKs)."""
    import socket

    from agent_runtime.cli.common import bind_socket

    listener = bind_socket("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname()[:2])
    conn, _ = listener.accept()
    try:
        assert conn.proto == socket.IPPROTO_TCP
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for s in (conn, client, listener):
            s.close()
