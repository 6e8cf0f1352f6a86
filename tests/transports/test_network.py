"""Streamable HTTP (stateful/stateless), legacy SSE and WebSocket against the real demo server on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import uvicorn
from websockets.asyncio.server import serve

from examples.servers.demo_server import build_server
from examples.servers.ws_server import _serve_connection
from tests.conftest import wait_for_call
from tests.transports.conftest import listening_demo
from transports import ConnectError, ConnectionLost, HttpTarget, Target, WebSocketTarget, connect
from transports.http import request_headers

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024

KINDS: dict[str, tuple[tuple[str, ...], Callable[[str], Target]]] = {
    "http-stateful": (("--transport", "http"), lambda url: HttpTarget(url=url)),
    "http-stateless": (("--transport", "http", "--stateless"), lambda url: HttpTarget(url=url)),
    "sse": (("--transport", "sse"), lambda url: HttpTarget(url=url, kind="sse")),
    "ws": (("--transport", "ws"), lambda url: WebSocketTarget(url=url)),
}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_calls_big_result_and_server_killed_mid_call(kind: str, tmp_path: Path) -> None:
    flags, make = KINDS[kind]
    log = tmp_path / "calls.jsonl"
    with listening_demo(*flags, "--calls-log", str(log)) as (proc, url):
        async with connect(make(url), startup_timeout=15) as conn:
            assert conn.pid is None and conn.stderr is None
            names = {t.name for t in await conn.list_all_tools(timeout=10)}
            assert {"echo", "add", "big_output", "sleep"} <= names
            added = await conn.call_tool("add", {"a": 20, "b": 22}, timeout=5)
            assert added.content[0].text == "42"  # type: ignore[union-attr]  # add answers in a text block
            failed = await conn.call_tool("fail", {}, timeout=5)
            assert failed.is_error
            big = await conn.call_tool("big_output", {"n_bytes": 8 * MiB}, timeout=60)
            assert len(big.content[0].text) == 8 * MiB  # type: ignore[union-attr]  # big_output answers in one text block

            ended = anyio.Event()

            async def call() -> None:
                with pytest.raises(ConnectionLost):
                    await conn.call_tool("sleep", {"seconds": 30}, timeout=60)
                ended.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await wait_for_call(log, "sleep")  # the request reached the server: it is mid-call now
                proc.kill()
                with anyio.fail_after(5):  # the death is noticed, not waited out (the call's timeout is 60 s)
                    await ended.wait()
                    await conn.closed.wait()


async def test_paginated_listing_over_http() -> None:
    with listening_demo("--transport", "http", "--page-size", "5", "--extra-tools", "12") as (_, url):
        async with connect(HttpTarget(url=url), startup_timeout=15) as conn:
            names = [t.name for t in await conn.list_all_tools(timeout=10)]
            assert len(names) == len(set(names)) == 14 + 12


async def test_connect_refused_is_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for target in (
        HttpTarget(url=f"http://127.0.0.1:{port}/mcp", connect_timeout=2),
        HttpTarget(url=f"http://127.0.0.1:{port}/sse", kind="sse", connect_timeout=2),
        WebSocketTarget(url=f"ws://127.0.0.1:{port}/mcp", open_timeout=2),
    ):
        start = time.monotonic()
        with pytest.raises(ConnectError):
            async with connect(target, startup_timeout=10):
                pytest.fail("connected to a closed port")
        assert time.monotonic() - start < 5


def test_request_headers_bearer_wins() -> None:
    merged = request_headers({"X-Team": "a", "authorization": "Basic old"}, "tok")
    assert merged == {"X-Team": "a", "Authorization": "Bearer tok"}
    assert request_headers({"X-Team": "a"}, None) == {"X-Team": "a"}


def _bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_http_sends_headers_and_bearer() -> None:
    seen: list[dict[str, str]] = []
    app = build_server().streamable_http_app()

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await app(scope, receive, send)

    sock = _bound_socket()
    server = uvicorn.Server(uvicorn.Config(recording, log_level="warning", lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await anyio.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
        target = HttpTarget(url=url, headers={"X-Agent-Team": "blue"}, bearer_token="s3cret")
        async with connect(target, startup_timeout=15) as conn:
            result = await conn.call_tool("echo", {"text": "hi"}, timeout=5)
            assert result.content[0].text == "hi"  # type: ignore[union-attr]  # echo answers in a text block
        server.should_exit = True
    assert seen and all(h.get("authorization") == "Bearer s3cret" for h in seen)
    assert all(h.get("x-agent-team") == "blue" for h in seen)


async def test_websocket_headers_subprotocol_and_abrupt_close(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    lowlevel = build_server(calls_log=str(log))._lowlevel_server
    seen: list[Any] = []
    connections: list[Any] = []

    async def handler(ws: Any) -> None:
        seen.append(ws.request.headers)  # case-insensitive Headers
        connections.append(ws)
        await _serve_connection(lowlevel, ws)

    async with serve(handler, "127.0.0.1", 0, subprotocols=["mcp"]) as ws_server:  # type: ignore[list-item]  # websockets wants its Subprotocol NewType
        port = next(iter(ws_server.sockets)).getsockname()[1]
        target = WebSocketTarget(
            url=f"ws://127.0.0.1:{port}/mcp", headers={"X-Agent-Team": "red"}, bearer_token="t0k"
        )
        async with connect(target, startup_timeout=15) as conn:
            assert (await conn.call_tool("echo", {"text": "ws"}, timeout=5)).content[0].text == "ws"  # type: ignore[union-attr]  # echo answers in a text block, over the websocket too
            assert seen[0]["Authorization"] == "Bearer t0k" and seen[0]["X-Agent-Team"] == "red"
            assert seen[0]["Sec-WebSocket-Protocol"] == "mcp"
            ended = anyio.Event()

            async def call() -> None:
                with pytest.raises(ConnectionLost):
                    await conn.call_tool("sleep", {"seconds": 30}, timeout=60)
                ended.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await wait_for_call(log, "sleep")  # the request reached the server's tool: it is mid-call now
                connections[0].transport.abort()  # TCP drop, no close frame
                with anyio.fail_after(5):  # the drop is noticed, not waited out (the call's timeout is 60 s)
                    await ended.wait()
                    await conn.closed.wait()


async def test_websocket_without_mcp_subprotocol_is_rejected() -> None:
    async def handler(ws: Any) -> None:
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        with pytest.raises(ConnectError) as info:
            async with connect(WebSocketTarget(url=f"ws://127.0.0.1:{port}/"), startup_timeout=10):
                pytest.fail("accepted a server without the mcp subprotocol")
        assert "subprotocol" in info.value.reason
