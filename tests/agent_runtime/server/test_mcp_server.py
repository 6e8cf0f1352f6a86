"""`agent-runtime mcp-server` as MCP hosts (Claude Desktop) use it: launched over stdio by the SDK client,
or over streamable HTTP; agent steps arrive as progress; closing the client leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError

from agent_runtime.server.agents import AgentChunk
from agent_runtime.server.mcp_server import AgentMCPServer
from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.anyio
TIME = str(Path(PYTHON).parent / "mcp-server-time")


def write_config(tmp: Path, extra: dict[str, Any] | None = None) -> Path:
    cfg = {"mcpServers": {"time": {"command": TIME, "args": ["--local-timezone", "UTC"]}}, **(extra or {})}
    path = tmp / "MCP_CONFIG.json"
    path.write_text(json.dumps(cfg))
    return path


# For tests about the MCP side only: agents on a remote backend, so no local model is loaded.
REMOTE_MODEL = {"model": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "unused"}}


def stdio_params(config: Path, *flags: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=PYTHON,
        args=["-m", "agent_runtime", "--log-level", "info", "mcp-server", "--config", str(config), *flags],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def descendants() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    }


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.add(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: set[int], limit: float = 15.0) -> None:
    """Poll (with a deadline) until every process in `pids` has exited."""
    deadline = time.monotonic() + limit
    while alive(pids):
        assert time.monotonic() < deadline, f"processes left behind: {alive(pids)}"
        time.sleep(0.05)


@pytest.mark.smollm2
async def test_stdio_runs_agents_reexports_tools_and_cleans_up(tmp_path: Path) -> None:
    """As Claude Desktop: launch over stdio, list and call run_agent with progress, close; nothing survives."""
    config = write_config(tmp_path)
    before = descendants()
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    params = stdio_params(config, "--expose-tools", "--kv-cache-memory", "512MiB")
    async with Client(params, read_timeout_seconds=180) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert list(tools)[:2] == ["run_agent", "list_agents"]
        assert "time__get_current_time" in tools
        assert tools["run_agent"].input_schema["required"] == ["task"]
        assert tools["run_agent"].input_schema["properties"]["agent"]["enum"] == ["default"]
        listed = await client.call_tool("list_agents", {})
        assert [a["name"] for a in json.loads(listed.content[0].text)] == ["default"]  # type: ignore[union-attr]  # list_agents answers one text block of JSON
        result = await client.call_tool("time__get_current_time", {"timezone": "Asia/Tokyo"})
        assert not result.is_error and "Asia/Tokyo" in result.content[0].text  # type: ignore[union-attr]  # get_current_time answers in a text block

        run = await client.call_tool(
            "run_agent", {"task": "What time is it in Tokyo?"}, progress_callback=on_progress
        )
        assert run.content[0].text  # type: ignore[union-attr]  # run_agent's final answer is a text block
        assert run.structured_content is not None and run.structured_content["agent"] == "default"
        calls = run.structured_content["tool_calls"]
        assert calls and all(c["name"] == "time__get_current_time" for c in calls)  # it used mcp-server-time
        assert len(progress) == run.structured_content["steps"] >= 2  # each call: started, finished
        assert [v for v, _ in progress] == list(range(1, len(progress) + 1))
        assert progress[0][1] and "time__get_current_time" in progress[0][1]
        unknown = await client.call_tool("run_agent", {"task": "hi", "agent": "nobody"})
        assert unknown.is_error and "default" in unknown.content[0].text  # type: ignore[union-attr]  # an unknown agent's error is a text block naming the agents
        spawned = descendants() - before
        assert len(spawned) >= 2  # our server and its mcp-server-time child
    await anyio.to_thread.run_sync(wait_gone, spawned)


async def test_stdio_without_expose_tools_offers_only_agent_tools(tmp_path: Path) -> None:
    config = write_config(tmp_path, REMOTE_MODEL)
    async with Client(stdio_params(config), read_timeout_seconds=60) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["run_agent", "list_agents"]
        with pytest.raises(
            MCPError, match="unknown tool"
        ):  # not exported: a protocol error, as the spec asks
            await client.call_tool("time__get_current_time", {"timezone": "UTC"})


def test_stdin_eof_exits_and_stops_children(tmp_path: Path) -> None:
    """A host that dies closes our stdin: the server must exit by itself and take its children along."""
    config = write_config(tmp_path, REMOTE_MODEL)
    proc = subprocess.Popen(
        [PYTHON, "-m", "agent_runtime", "mcp-server", "--config", str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    proc.stdin.write((json.dumps(init) + "\n").encode())
    proc.stdin.flush()
    line = proc.stdout.readline()
    reply = json.loads(line)  # stdout carries only JSON-RPC
    assert reply["id"] == 1 and "serverInfo" in reply["result"]
    children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    assert children, "the configured MCP server should be running"
    proc.stdin.close()
    code = proc.wait(30)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, stderr[-3000:]
    assert proc.stdout.read() == b""
    assert "stdin closed" in stderr
    wait_gone(children)


class StepsHost:
    """An agent host whose agent reports two steps, then answers with the task reversed."""

    def names(self) -> list[str]:
        return ["reverser", "other"]

    def describe(self, name: str) -> str:
        return f"the {name} agent"

    async def stream(self, name: str, messages: list[dict[str, Any]]) -> AsyncIterator[AgentChunk]:
        task = messages[-1]["content"]
        yield AgentChunk("step", text=f"{name}: thinking about {task!r}")
        yield AgentChunk("step", text=f"{name}: calling a tool")
        yield AgentChunk("final", text=task[::-1], data={"finish_reason": "stop"})


async def test_run_agent_reports_steps_as_progress() -> None:
    server = AgentMCPServer(StepsHost())  # type: ignore[arg-type]  # StepsHost.stream is an async generator annotated AsyncIterator; the protocol says AsyncGenerator
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async with Client(server.server) as client:
        listed = await client.call_tool("list_agents", {})
        assert listed.structured_content == {
            "agents": [
                {"name": "reverser", "description": "the reverser agent"},
                {"name": "other", "description": "the other agent"},
            ]
        }
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["run_agent"].input_schema["properties"]["agent"]["enum"] == ["reverser", "other"]
        r = await client.call_tool(
            "run_agent", {"task": "abc", "agent": "other"}, progress_callback=on_progress
        )
        assert not r.is_error and r.content[0].text == "cba"  # type: ignore[union-attr]  # the reverser's answer comes back as one text block
        assert r.structured_content["steps"] == 2 and r.structured_content["agent"] == "other"
        assert progress == [(1, "other: thinking about 'abc'"), (2, "other: calling a tool")]
        bad = await client.call_tool("run_agent", {"task": "abc", "agent": "nobody"})
        assert bad.is_error and "reverser" in bad.content[0].text  # type: ignore[union-attr]  # the error for an unknown agent is a text block listing the known ones
        empty = await client.call_tool("run_agent", {"task": "  "})
        assert empty.is_error


def test_http_mode_with_rebinding_protection(tmp_path: Path) -> None:
    config = write_config(tmp_path, REMOTE_MODEL)
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "agent_runtime",
            "mcp-server",
            "--config",
            str(config),
            "--http",
            "0",
            "--expose-tools",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("LISTENING "), line
        url = line.split()[1]

        async def check() -> None:
            async with Client(url) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                assert {"run_agent", "list_agents", "time__get_current_time"} <= set(names)
                r = await client.call_tool("time__get_current_time", {"timezone": "Europe/Paris"})
                assert "Europe/Paris" in r.content[0].text  # type: ignore[union-attr]  # mcp-server-time answers in a text block

        anyio.run(check)
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        accept = {"Accept": "application/json, text/event-stream"}
        r = httpx.post(url, json=init, headers={"Host": "evil.example", **accept})
        assert r.status_code == 421
        r = httpx.post(url, json=init, headers={"Origin": "https://evil.example", **accept})
        assert r.status_code == 403
    finally:
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.terminate()
        code = proc.wait(30)
        assert code in (0, 143), proc.stderr.read()[-3000:] if proc.stderr else code
    wait_gone(children)


def test_desktop_example_configs_are_valid() -> None:
    """The copy-paste Claude Desktop configs are valid Claude-format files launching our MCP server mode."""
    from agent_runtime.config import load_config
    from tests.conftest import EXAMPLES

    for name in ("claude_desktop_config.json", "claude_desktop_config.aggregated.json"):
        config = load_config(EXAMPLES / "desktop" / name)
        (server,) = config.servers
        assert server.target.args[0] == "mcp-server"  # type: ignore[union-attr]  # a desktop config launches our command: a StdioTarget
        assert "--config" in server.target.args  # type: ignore[union-attr]  # a desktop config launches our command: a StdioTarget
    jan = json.loads((EXAMPLES / "desktop" / "jan_provider.json").read_text())
    assert jan["base_url"].endswith("/v1")
