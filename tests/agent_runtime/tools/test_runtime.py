"""The Runtime API over a real config file and real server processes."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from agent_runtime.config import load_config
from agent_runtime.errors import ConfigError
from agent_runtime.tools.runtime import Runtime, UnknownTool
from agent_runtime.tools.supervisor import ServerState, ServerUnavailable
from tests.conftest import EXAMPLES, PYTHON
from transports.errors import CallTimeout

DEMO = str(EXAMPLES / "servers" / "demo_server.py")


def write_config(tmp_path: Path) -> Path:
    doc = {
        "mcpServers": {
            "demo": {"command": PYTHON, "args": [DEMO]},
            "broken": {"command": "no-such-mcp-server-xyz"},
        },
        "runtime": {"reconnect": {"initial_delay_secs": 0.05, "max_delay_secs": 0.3}},
    }
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.anyio
async def test_runtime_lists_and_calls_namespaced_tools(tmp_path: Path) -> None:
    rt = Runtime.from_config(write_config(tmp_path))
    async with rt:
        names = [t.name for t in rt.tools()]
        assert "demo__echo" in names and names == sorted(names)
        assert rt.tools("broken") == []
        assert {t.server for t in rt.tools("demo")} == {"demo"}
        states = {s.name: s.state for s in rt.servers()}
        assert states == {"demo": ServerState.READY, "broken": ServerState.FAILED}

        result = await rt.call_tool("demo__add", {"a": 20, "b": 22})
        assert not result.is_error and result.structured_content == {"result": 42}

        failed = await rt.call_tool("demo__fail", {"message": "nope"})  # a tool error is a result
        assert failed.is_error and "nope" in failed.content[0].text

        with pytest.raises(UnknownTool) as unknown:
            await rt.call_tool("demo__ecoh", {"text": "x"})
        assert "demo__echo" in unknown.value.suggestions and "demo__echo" in str(unknown.value)

        with pytest.raises(ServerUnavailable) as down:  # its server is down: unavailable, not unknown
            await rt.call_tool("broken__anything", {})
        assert down.value.server == "broken" and "not found" in str(down.value)

        with pytest.raises(CallTimeout):
            await rt.call_tool("demo__sleep", {"seconds": 5}, timeout=0.3)
        assert (await rt.call_tool("demo__echo", {"text": "after"})).content[0].text == "after"
        pid = rt.servers()[0].pid
    assert pid is not None and not psutil.pid_exists(pid)
    assert all(s.state is ServerState.STOPPED for s in rt.servers())


@pytest.mark.anyio
async def test_errors_in_the_body_propagate_unwrapped_and_servers_stop(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    rt = Runtime.from_config(config)
    assert rt.config is config
    with pytest.raises(KeyError, match="boom"):
        async with rt:
            assert rt.registry.get("demo__echo") is not None
            raise KeyError("boom")
    assert len(rt.registry) == 0
    assert all(s.state is ServerState.STOPPED for s in rt.servers())


def test_from_config_without_a_default_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AGENT_RUNTIME_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="no config file"):
        Runtime.from_config()
    write_config(tmp_path)
    assert [s.name for s in Runtime.from_config().config.servers] == ["demo", "broken"]
