"""A server-sent-events response that sends each chunk as soon as it is produced and stops producing (closing
the generator, which aborts the engine request) the moment the client disconnects."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import structlog
from starlette.types import Receive, Scope, Send

log = structlog.get_logger(__name__)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # reverse proxies (nginx) must not buffer the stream either
]


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone (the request body must already be consumed)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse:
    """ASGI response streaming `chunks` (already SSE-framed bytes).

    Unlike Starlette's StreamingResponse under ASGI 2.4 servers, it always listens for `http.disconnect`,
    so a client that goes away while the engine is still queueing or thinking cancels the work at once
    rather than at the next send. `on_close(disconnected)` runs exactly once, shielded, in every case.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        on_close: Callable[[bool], None] | None = None,
        status_code: int = 200,
    ) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.status_code = status_code
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    await wait_disconnect(receive)
                    if not completed:  # servers also report a disconnect once the response is complete
                        self.disconnected = True
                        tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    await send(
                        {"type": "http.response.start", "status": self.status_code, "headers": SSE_HEADERS}
                    )
                    async for chunk in self.chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    completed = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the server reports a vanished client on send (ASGI 2.4)
                    self.disconnected = True
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self.on_close is not None:
                    self.on_close(self.disconnected)
            if self.disconnected:
                log.info("client disconnected; generation cancelled")
