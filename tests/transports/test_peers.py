"""Third-party servers: mcp-server-time (Python, stdio) and server-everything (TypeScript: stdio, SSE, HTTP)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import anyio
import pytest

from tests.transports.conftest import EVERYTHING, everything_server, needs_everything
from transports import ConnectionLost, HttpTarget, StdioTarget, connect

pytestmark = pytest.mark.anyio


async def test_mcp_server_time_resolves_next_to_the_interpreter() -> None:
    # A PATH without the venv: the command must still resolve from the directory of sys.executable.
    bin_dir = os.path.dirname(sys.executable)
    assert shutil.which("mcp-server-time", path="/usr/bin:/bin") is None
    assert shutil.which("mcp-server-time", path=bin_dir) is not None
    target = StdioTarget(command="mcp-server-time", env={"PATH": "/usr/bin:/bin"})
    async with connect(target, startup_timeout=20) as conn:
        names = {t.name for t in await conn.list_all_tools(timeout=10)}
        assert {"get_current_time", "convert_time"} <= names
        result = await conn.call_tool("get_current_time", {"timezone": "Asia/Tokyo"}, timeout=10)
        assert not result.is_error
        payload = json.loads(result.content[0].text)  # type: ignore[union-attr]  # get_current_time answers in a text block
        assert payload["timezone"] == "Asia/Tokyo" and payload["datetime"].endswith("+09:00")


async def _exercise_everything(conn: object) -> None:
    tools = await conn.list_all_tools(timeout=15)  # type: ignore[attr-defined]  # conn: a Connection, typed object here
    names = {t.name for t in tools}
    assert {"echo", "get-sum"} <= names
    echoed = await conn.call_tool("echo", {"message": "hello"}, timeout=10)  # type: ignore[attr-defined]  # conn: a Connection, typed object here
    assert "hello" in echoed.content[0].text
    summed = await conn.call_tool("get-sum", {"a": 2, "b": 3}, timeout=10)  # type: ignore[attr-defined]  # conn: a Connection, typed object here
    assert "5" in summed.content[0].text
    # TypeScript servers are on the handshake era: auto mode must have fallen back.
    assert conn.protocol_version.startswith("2025")  # type: ignore[attr-defined]  # conn: a Connection, typed object here


@needs_everything
async def test_everything_stdio() -> None:
    target = StdioTarget(command="node", args=(str(EVERYTHING), "stdio"))
    async with connect(target, startup_timeout=30) as conn:
        assert conn.pid is not None
        await _exercise_everything(conn)


@needs_everything
async def test_everything_streamable_http() -> None:
    with everything_server("streamableHttp", "/mcp") as (_, url):
        async with connect(HttpTarget(url=url), startup_timeout=30) as conn:
            await _exercise_everything(conn)


@needs_everything
async def test_everything_legacy_sse() -> None:
    with everything_server("sse", "/sse") as (_, url):
        async with connect(HttpTarget(url=url, kind="sse"), startup_timeout=30) as conn:
            await _exercise_everything(conn)


def _messages_received(log: Path, mode: str) -> int:
    """How many client messages server-everything has logged receiving (one line each, per transport)."""
    marker = {"streamableHttp": "Received MCP POST request", "sse": "Client Message from"}[mode]
    return log.read_text(errors="replace").count(marker)


@needs_everything
@pytest.mark.parametrize(
    ("mode", "path", "kind"), [("streamableHttp", "/mcp", "streamable_http"), ("sse", "/sse", "sse")]
)
async def test_everything_killed_mid_call(mode: str, path: str, kind: str, tmp_path: Path) -> None:
    # 2025-era streamable HTTP: the SDK alone would retry the broken response stream for seconds and never
    # end the session; the watchdog must turn the server's death into ConnectionLost and `closed` at once.
    log = tmp_path / "everything.log"
    with everything_server(mode, path, log=log) as (proc, url):
        async with connect(HttpTarget(url=url, kind=kind), startup_timeout=30) as conn:  # type: ignore[arg-type]  # kind: "streamable_http" or "sse", from the parametrization
            await conn.call_tool(
                "echo", {"message": "idle"}, timeout=10
            )  # the handshake's messages are all in
            received = _messages_received(log, mode)
            ended = anyio.Event()

            async def call() -> None:
                with pytest.raises(ConnectionLost):
                    await conn.call_tool(
                        "trigger-long-running-operation", {"duration": 30, "steps": 30}, timeout=60
                    )
                ended.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                with anyio.fail_after(20):  # the server logs each message it receives: the call is in
                    while _messages_received(log, mode) == received:  # noqa: ASYNC110 - another process
                        await anyio.sleep(0.01)
                os.killpg(proc.pid, 9)
                with anyio.fail_after(5):  # the death is noticed, not waited out (the call's timeout is 60 s)
                    await ended.wait()
                    await conn.closed.wait()
            with pytest.raises(ConnectionLost) as after:
                await conn.call_tool("echo", {"message": "x"}, timeout=5)
            assert after.value.sent is False
