"""`agent-runtime auth login|status|logout` as a subprocess against a real authorization server and a protected
MCP server on 127.0.0.1 (the test plays the browser), then the Runtime using the stored tokens."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import anyio
import pytest

from agent_runtime.config import load_config
from agent_runtime.tools.runtime import Runtime
from tests.agent_runtime.cli.test_cold_start import NEVER, _imported
from tests.conftest import PYTHON, ROOT
from tests.transports.oauth_servers import auth_and_server, follow_authorization

pytestmark = pytest.mark.anyio


def _env(state: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("AGENT_RUNTIME_CONFIG", "DISPLAY", "WAYLAND_DISPLAY")
    }
    return env | {"PYTHONPATH": str(ROOT), "AGENT_RUNTIME_STATE_DIR": str(state)}


async def _cli(*args: str, state: Path) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(60):
        return await anyio.run_process(
            [PYTHON, "-m", "agent_runtime.cli.main", "auth", *args], env=_env(state), check=False
        )


async def test_login_status_runtime_call_logout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    async with auth_and_server() as (auth, server):
        config = tmp_path / "cfg.json"
        entry = {"url": server.url, "auth": {"type": "oauth", "scopes": ["mcp"]}}
        config.write_text(json.dumps({"mcpServers": {"prot": entry, "plain": {"command": "true"}}}))
        cmd = [PYTHON, "-m", "agent_runtime.cli.main", "auth", "login", "prot", "--no-browser"]
        with anyio.fail_after(60):
            async with await anyio.open_process(
                [*cmd, "--config", str(config), "--timeout", "30"], env=_env(state)
            ) as proc:
                assert proc.stdout is not None
                printed = b""
                while not any(line.startswith(b"http") for line in printed.split(b"\n")[:-1]):
                    printed += await proc.stdout.receive()  # the URL line, complete
                url = next(line for line in printed.decode().splitlines() if line.startswith("http"))
                assert url.startswith(f"{auth.base}/authorize?") and "code_challenge_method=S256" in url
                assert await follow_authorization(url) == 200
                rest = b""
                async for chunk in proc.stdout:
                    rest += chunk
                assert await proc.wait() == 0
        assert b"Logged in to prot: valid until" in rest
        token_file = state / "oauth" / "prot.json"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        tokens = json.loads(token_file.read_text())["tokens"]

        status = await _cli("status", "--config", str(config), "--json", state=state)
        assert status.returncode == 0, status.stderr
        (row,) = json.loads(status.stdout)["servers"]
        assert row["server"] == "prot" and row["state"] == "valid" and row["refreshable"]
        assert tokens["access_token"].encode() not in status.stdout + status.stderr
        assert tokens["refresh_token"].encode() not in status.stdout + status.stderr

        monkeypatch.setenv("AGENT_RUNTIME_STATE_DIR", str(state))
        runtime_config = load_config(config)
        async with Runtime(runtime_config, ready_timeout=20) as rt:
            result = await rt.call_tool("prot__echo", {"text": "through the runtime"}, timeout=10)
            assert result.content[0].text == "through the runtime"  # type: ignore[union-attr]  # a text block
        assert server.seen_tokens[-1] == tokens["access_token"]

        out = await _cli("logout", "prot", "--config", str(config), state=state)
        assert out.returncode == 0 and b"stored tokens deleted" in out.stdout
        assert not token_file.exists()
        status = await _cli("status", "prot", "--config", str(config), state=state)
        assert status.stdout.strip() == b"prot: none"

        # Without tokens the supervisor does not open a browser: the server fails with the login hint.
        async with Runtime(runtime_config, ready_timeout=10) as rt:
            (prot,) = [s for s in rt.servers() if s.name == "prot"]
            assert prot.last_error is not None and "agent-runtime auth login prot" in prot.last_error


async def test_auth_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    async with auth_and_server() as (auth, server):
        auth.malformed_metadata = True
        config = tmp_path / "cfg.json"
        entry = {"url": server.url, "auth": {"type": "oauth"}}
        config.write_text(json.dumps({"mcpServers": {"plain": {"command": "true"}, "prot": entry}}))
        res = await _cli("login", "prot", "--no-browser", "--config", str(config), state=tmp_path)
        assert res.returncode == 2, res.stderr
        assert b"no valid authorization server metadata" in res.stderr and b"Traceback" not in res.stderr
    async with auth_and_server(prm_resource="http://127.0.0.1:1/someone-else") as (auth, server):
        entry = {"url": server.url, "auth": {"type": "oauth"}}
        config.write_text(json.dumps({"mcpServers": {"prot": entry}}))
        res = await _cli("login", "prot", "--no-browser", "--config", str(config), state=tmp_path)
        assert res.returncode == 2, res.stderr
        assert b"does not match" in res.stderr and b"Traceback" not in res.stderr


async def test_config_errors_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"mcpServers": {"plain": {"command": "true"}}}))
    res = await _cli("login", "plain", "--config", str(config), state=tmp_path)
    assert res.returncode == 2 and b"has no OAuth" in res.stderr and b"Traceback" not in res.stderr
    res = await _cli("logout", "nope", "--config", str(config), state=tmp_path)
    assert res.returncode == 2 and b"is not configured" in res.stderr


def test_auth_status_does_not_import_torch(tmp_path: Path) -> None:
    config = tmp_path / "cfg.json"
    entry = {"url": "http://127.0.0.1:9/mcp", "auth": {"type": "oauth"}}
    config.write_text(json.dumps({"mcpServers": {"s": entry}}))
    res, top = _imported("auth", "status", "--config", str(config), tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "s: none" in res.stdout
    heavy = {"torch", "transformers", "xgrammar"} & NEVER
    assert not top & heavy, f"auth status imported {sorted(top & heavy)}"
