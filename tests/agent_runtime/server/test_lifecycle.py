"""Liveness vs readiness and request ids on a real server (uvicorn on 127.0.0.1, no model: a server that is
starting answers /health and refuses the API until the engine and agents are attached)."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest

from agent_runtime.cli.serve import settings_from_args
from agent_runtime.errors import ConfigError
from agent_runtime.server.app import ServerSettings, create_app
from agent_runtime.server.security import SecuritySettings
from tests.agent_runtime.server.test_app import ServerThread


def test_starting_server_is_live_not_ready_then_ready_then_draining() -> None:
    srv = create_app(None, starting=True)
    with ServerThread(srv.app) as st, httpx.Client(base_url=st.url) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["ready"] is False
        ready = http.get("/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "starting", "waiting_for": ["model", "mcp_servers"], "in_flight": 0}
        refused = http.get("/v1/models")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "not_ready"
        post = http.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert post.status_code == 503  # refused before the body is even parsed

        srv.readiness.model_loaded = True
        assert http.get("/ready").json()["waiting_for"] == ["mcp_servers"]
        srv.attach(None, None)  # an agents-only server with no agents: nothing left to wait for
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert http.get("/health").json()["ready"] is True
        assert http.get("/v1/models").json() == {"object": "list", "data": []}

        srv.readiness.draining = True  # what SIGTERM sets
        ready = http.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert http.get("/health").status_code == 200
        assert "shutting down" in http.get("/v1/models").json()["error"]["message"]


def test_request_ids_in_headers_and_error_bodies() -> None:
    settings = ServerSettings(security=SecuritySettings(api_key="k"))
    srv = create_app(None, settings=settings)
    with ServerThread(srv.app) as st, httpx.Client(base_url=st.url) as http:
        auth = {"Authorization": "Bearer k"}
        # a plain client id is kept, on success and on errors (the app's and the security layer's)
        ok = http.get("/v1/models", headers={**auth, "X-Request-Id": "client-42.a:b"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-42.a:b"
        missing = http.get("/v1/models/nope", headers={**auth, "X-Request-Id": "client-43"})
        assert missing.status_code == 404 and missing.headers["x-request-id"] == "client-43"
        assert missing.json()["error"]["request_id"] == "client-43"
        assert missing.json()["error"]["code"] == "model_not_found"
        denied = http.get("/v1/models", headers={"X-Request-Id": "client-44"})
        assert denied.status_code == 401 and denied.json()["error"]["request_id"] == "client-44"
        bad = http.post("/v1/completions", content=b"{", headers={**auth, "X-Request-Id": "client-45"})
        assert bad.status_code == 400 and bad.json()["error"]["request_id"] == "client-45"
        # none sent, or one unfit for logs and headers (spaces, too long): a fresh one per request
        ids = set()
        for sent in [None, "has spaces", "x" * 200, "bad\tchar"]:
            r = http.get("/health", headers={} if sent is None else {"X-Request-Id": sent})
            rid = r.headers["x-request-id"]
            assert rid != sent and len(rid) == 32 and rid.isalnum()
            ids.add(rid)
        assert len(ids) == 4


def test_api_key_from_a_file(tmp_path: Path) -> None:
    """A container secret: `--api-key-file` wins over `--api-key`; a missing or empty file is a usage error."""
    secret = tmp_path / "api_key"
    secret.write_text("sk-from-file\n")
    args = argparse.Namespace(
        host="0.0.0.0", api_key="sk-flag", api_key_file=str(secret), allowed_host=[], allowed_origin=[],
        max_body_bytes=4 * 2**20, max_concurrent=8, served_model_name=None,
    )  # fmt: skip
    assert settings_from_args(args).security.api_key == "sk-from-file"
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        settings_from_args(args)
    args.api_key_file = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot read"):
        settings_from_args(args)
