"""Serve any lowlevel MCP `Server` over WebSocket: subprotocol `mcp`, one JSON-RPC message per text frame.

Each connection gets its own `Server.run` over a pair of memory streams (the same loop stdio uses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import mcp_types as types
from mcp.server.lowlevel.server import Server
from mcp.shared.message import SessionMessage
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

SUBPROTOCOL = "mcp"
MiB = 1024 * 1024


async def _serve_connection(server: Server[Any], ws: ServerConnection) -> None:
    if ws.subprotocol != SUBPROTOCOL:
        await ws.close(1002, "subprotocol 'mcp' required")
        return
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    async def frames_in() -> None:
        async with read_writer:
            try:
                async for frame in ws:
                    text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
                    try:
                        message = types.jsonrpc_message_adapter.validate_json(text, by_name=False)
                    except ValueError as exc:
                        await read_writer.send(exc)
                        continue
                    await read_writer.send(SessionMessage(message))
            except ConnectionClosed:
                pass

    async def frames_out() -> None:
        async with write_reader:
            async for session_message in write_reader:
                try:
                    await ws.send(session_message.message.model_dump_json(by_alias=True, exclude_unset=True))
                except ConnectionClosed:
                    return

    async with anyio.create_task_group() as tg:
        tg.start_soon(frames_in)
        tg.start_soon(frames_out)
        await server.run(read_stream, write_stream, server.create_initialization_options())
        tg.cancel_scope.cancel()


async def serve_websocket(
    server: Server[Any],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    path: str = "/mcp",
    max_message_size: int = 64 * MiB,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve until cancelled; `on_listening` gets the URL once the socket is bound (port 0 picks one)."""

    async def handler(ws: ServerConnection) -> None:
        await _serve_connection(server, ws)

    async with serve(
        handler,
        host,
        port,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]  # websockets wants its Subprotocol NewType
        max_size=max_message_size,
        compression=None,
    ) as ws_server:
        bound_port = next(iter(ws_server.sockets)).getsockname()[1]
        if on_listening is not None:
            on_listening(f"ws://{host}:{bound_port}{path}")
        await anyio.sleep_forever()
