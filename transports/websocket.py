"""WebSocket transport (the SDK has none): subprotocol `mcp`, one JSON-RPC message per text frame.

Wire-compatible with mcp 1.x's websocket server and mistral.rs's client; keepalive pings, bounded close.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import mcp_types as types
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.shared.message import SessionMessage
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import CloseCode
from websockets.typing import Subprotocol

from transports.errors import ConnectError, too_large_reason
from transports.http import request_headers
from transports.pending import PendingRequests
from transports.targets import WebSocketTarget

log = structlog.get_logger(__name__)

SUBPROTOCOL = Subprotocol("mcp")

Streams = tuple[MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]]


@contextlib.asynccontextmanager
async def websocket_transport(target: WebSocketTarget) -> AsyncIterator[Streams]:
    """Open the socket, then pump frames <-> SessionMessages until either side closes."""
    try:
        ws = await ws_connect(
            target.url,
            subprotocols=[SUBPROTOCOL],
            additional_headers=request_headers(target.headers, target.bearer_token),
            open_timeout=target.open_timeout,
            ping_interval=target.ping_interval,
            ping_timeout=target.ping_interval,
            close_timeout=target.close_timeout,
            max_size=target.max_message_bytes,  # websockets fails the connection (1009) past it
            compression=None,  # MCP payloads are small or already large JSON; deflate costs more than it saves
        )
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
        raise ConnectError(
            f"could not open WebSocket {target.url}: {exc}", "check the URL and the server"
        ) from exc
    if ws.subprotocol != SUBPROTOCOL:
        with anyio.CancelScope(shield=True):
            await ws.close()
        raise ConnectError(
            f"WebSocket server at {target.url} did not accept subprotocol {SUBPROTOCOL!r}",
            "the server must speak MCP over WebSocket",
        )
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    requests = PendingRequests()  # ours, unanswered: what an oversized message fails

    async def reader() -> None:
        try:
            async with read_writer:
                try:
                    async for frame in ws:
                        text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
                        try:
                            message = types.jsonrpc_message_adapter.validate_json(text, by_name=False)
                        except ValueError:
                            log.warning("skipped a non-JSON-RPC WebSocket frame", url=target.url)
                            continue
                        requests.answered(message)
                        await read_writer.send(SessionMessage(message))
                except ConnectionClosed as exc:
                    log.info("WebSocket closed", url=target.url, code=exc.code)
                    if _too_big(exc):
                        # websockets refused a message over max_size and closed the connection: say so to
                        # every request still waiting, rather than a bare "connection closed".
                        reason = (
                            too_large_reason(None, target.max_message_bytes) + "; the connection was closed"
                        )
                        log.warning("WebSocket message over max_message_bytes", url=target.url)
                        for reply in requests.fail_all(reason):
                            await read_writer.send(reply)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def writer() -> None:
        try:
            async with write_reader:
                async for session_message in write_reader:
                    requests.sent(session_message.message)
                    await ws.send(session_message.message.model_dump_json(by_alias=True, exclude_unset=True))
        except (ConnectionClosed, anyio.BrokenResourceError, anyio.ClosedResourceError):
            read_writer.close()  # the socket is gone: pending requests must see EOF, not hang

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer)
        try:
            yield read_stream, write_stream
        finally:
            with anyio.CancelScope(shield=True):
                write_stream.close()
                # websockets bounds the close handshake by close_timeout itself; this is a backstop.
                with anyio.move_on_after(target.close_timeout + 1):
                    await ws.close()
                read_stream.close()
            tg.cancel_scope.cancel()


def _too_big(exc: ConnectionClosed) -> bool:
    """The connection ended because a message exceeded max_size (close code 1009, sent by us)."""
    return any(
        frame is not None and frame.code == CloseCode.MESSAGE_TOO_BIG for frame in (exc.sent, exc.rcvd)
    )
